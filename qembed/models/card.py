"""Model cards: the `README.md` every model qembed writes (`train`, `merge`, `adapt`'s `best/`) carries.

A card is the Hugging Face model-card format: YAML front matter (`library_name`, `pipeline_tag`, `base_model`,
`license` of the base when its card states one, `tags`, and a `model-index` with the evaluation results qembed
measured), then usage (sentence-transformers, qembed, the query instruction), the training data and
configuration, and for `adapt` the before/after table. Writing one changes no other file of the folder, so it
loads as before (sentence-transformers, `Embedder`, `Reranker`).

The word for Matryoshka support appears only when the folder declared it before the card was written
(`qembed.models.layout.declares_matryoshka` reads cards too).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qembed.files import atomic_write_text
from qembed.models.layout import declares_matryoshka, read_record
from qembed.models.prompts import format_query

CARD_FILE = "README.md"
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.DOTALL)
_SNAPSHOT = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\]")
METRIC_NAMES = {"ndcg": "nDCG", "recall": "Recall", "mrr": "MRR", "map": "MAP", "precision": "Precision",
                "accuracy": "Accuracy"}  # fmt: skip
CONFIG_SKIP = {"model", "data", "output", "progress", "resume", "device", "data_sha256", "eval_dataset"}


@dataclass
class Evaluation:
    """Retrieval results qembed measured: metric fractions keyed as qembed keys them (`"ndcg@10"`)."""

    dataset: str
    split: str
    metrics: Mapping[str, float]
    label: str = ""  # e.g. the instruction setting, shown in the card's table


@dataclass
class CardContent:
    """What a card says besides what the folder itself tells (its `qembed.json`, prompts, Matryoshka)."""

    base_model: str | None
    origin: str  # one sentence: how the model was made
    tags: list[str] = field(default_factory=list)
    evaluations: list[Evaluation] = field(default_factory=list)
    sections: list[tuple[str, str]] = field(default_factory=list)  # (title, markdown)


# --------------------------------------------------------------------------------------------- reading
def read_front_matter(path: str | Path) -> dict[str, Any]:
    """The YAML front matter of a model card (`{}` when there is none or it does not parse)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_model_info(name_or_path: str | None, _depth: int = 0) -> tuple[str | None, str | None]:
    """(hub id, license) of a base model: a hub id as given (its card read from the local Hugging Face cache, never
    the network), a cached hub snapshot by its path, or a local folder by its own card's `base_model` / `qembed.json`
    (the nearest ancestor with a hub id); the license from the nearest card that states one."""
    if not name_or_path or _depth > 5:
        return None, None
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not path.exists():
        if text.count("/") != 1 or text.startswith((".", "/", "~")):
            return None, None
        card = _cached_hub_card(text)
        return text, (read_front_matter(card).get("license") if card else None)
    snapshot = _SNAPSHOT.search(str(path.resolve()) + "/")
    front = read_front_matter(path / CARD_FILE)
    license_ = front.get("license")
    if snapshot:
        return f"{snapshot['org']}/{snapshot['name']}", license_
    parent = front.get("base_model")
    parent = parent[0] if isinstance(parent, list) and parent else parent
    record = read_record(path)
    ancestor, ancestor_license = base_model_info(parent or (record.base_model if record else None), _depth + 1)
    return ancestor, license_ or ancestor_license


def _cached_hub_card(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, CARD_FILE)
    except Exception:  # noqa: BLE001 - an unreadable cache is the same as no cached card
        return None
    return Path(found) if isinstance(found, str) else None


# --------------------------------------------------------------------------------------------- writing
def write_model_card(folder: str | Path, content: CardContent) -> Path:
    """Write `folder/README.md` for the model in `folder` (replacing a card copied from its base)."""
    folder = Path(folder)
    record = read_record(folder)
    adapter = (folder / "adapter_config.json").is_file()
    reranker = record is not None and record.kind == "reranker"
    matryoshka = not reranker and declares_matryoshka(folder)
    hub_id, license_ = base_model_info(content.base_model)
    name = folder.resolve().name

    meta: dict[str, Any] = {}
    if license_:
        meta["license"] = license_
    if hub_id:
        meta["base_model"] = hub_id
    meta["library_name"] = "peft" if adapter else "transformers" if reranker else "sentence-transformers"
    meta["pipeline_tag"] = "text-ranking" if reranker else "sentence-similarity"
    base_tags = ["reranker", "text-ranking"] if reranker else ["sentence-transformers", "sentence-similarity",
                                                               "feature-extraction"]  # fmt: skip
    meta["tags"] = list(dict.fromkeys([*base_tags, "qembed", *content.tags, *(["matryoshka"] if matryoshka else [])]))
    if content.evaluations:
        meta["model-index"] = [{"name": name, "results": [_index_entry(e, reranker) for e in content.evaluations]}]

    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "", f"# {name}", "",
             content.origin + _base_line(content.base_model, hub_id), ""]  # fmt: skip
    if matryoshka:
        lines += ["The embeddings are trained for Matryoshka truncation: the first N components, re-normalised, "
                  "are an embedding of their own (`dim=N`).", ""]  # fmt: skip
    lines += _usage(folder, name, record, adapter, reranker)
    if content.evaluations:
        lines += ["## Evaluation", "", "Measured by qembed (metrics in %):", "", *_evaluation_table(content.evaluations), ""]
    for title, body in content.sections:
        lines += [f"## {title}", "", body.rstrip(), ""]
    path = folder / CARD_FILE
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path


def _base_line(base_model: str | None, hub_id: str | None) -> str:
    if hub_id:
        return f" Base model: [{hub_id}](https://huggingface.co/{hub_id})."
    return f" Base model: `{Path(base_model).name}` (a local folder)." if base_model else ""


def _index_entry(evaluation: Evaluation, reranker: bool) -> dict[str, Any]:
    task = {"type": "text-ranking", "name": "Reranking"} if reranker else {"type": "retrieval", "name": "Retrieval"}
    return {
        "task": task,
        "dataset": {"name": evaluation.dataset, "type": evaluation.dataset, "split": evaluation.split},
        "metrics": [{"type": key.replace("@", "_at_"), "value": float(value), "name": _metric_name(key)}
                    for key, value in evaluation.metrics.items()],
    }  # fmt: skip


def _metric_name(key: str) -> str:
    metric, _, k = key.partition("@")
    return METRIC_NAMES.get(metric, metric) + (f"@{k}" if k else "")


def _evaluation_table(evaluations: Sequence[Evaluation]) -> list[str]:
    keys = list(dict.fromkeys(k for e in evaluations for k in e.metrics))
    rows = ["| dataset | split | setting | " + " | ".join(_metric_name(k) for k in keys) + " |",
            "|---|---|---|" + "---:|" * len(keys)]  # fmt: skip
    for e in evaluations:
        cells = " | ".join(f"{100 * e.metrics[k]:.2f}" if k in e.metrics else "" for k in keys)
        rows.append(f"| {e.dataset} | {e.split} | {e.label or '-'} | {cells} |")
    return rows


def _usage(folder: Path, name: str, record, adapter: bool, reranker: bool) -> list[str]:
    model_id = f"path/to/{name}"
    if adapter:
        return ["## Usage", "", "A LoRA adapter (peft) over its base model:", "", "```python",
                "from peft import PeftModel", "from transformers import AutoModel", "",
                "base = AutoModel.from_pretrained(\"BASE_MODEL\")",
                f"model = PeftModel.from_pretrained(base, \"{model_id}\").merge_and_unload()", "```", ""]  # fmt: skip
    if reranker:
        return ["## Usage", "", "```python", "from qembed import Reranker", "",
                f"reranker = Reranker.from_pretrained(\"{model_id}\")",
                "scores = reranker.score(\"what do rice plants need?\", [\"Rice grows in flooded fields.\", \"Tea likes hills.\"])",
                "```", "", "```bash", f"qembed serve --reranker {model_id}", "```", ""]  # fmt: skip
    prompts = _prompts(folder)
    query_prompt = prompts.get("query", "")
    instruction = query_prompt[len("Instruct: "):-len("\nQuery:")] if query_prompt.startswith("Instruct: ") and \
        query_prompt.endswith("\nQuery:") else None  # fmt: skip
    st_query = 'model.encode(queries, prompt_name="query")' if query_prompt else "model.encode(queries)"
    lines = ["## Usage", "", "With sentence-transformers:", "", "```python",
             "from sentence_transformers import SentenceTransformer", "",
             f"model = SentenceTransformer(\"{model_id}\")",
             "queries = [\"what do rice plants need?\"]", "documents = [\"Rice grows in flooded fields.\"]",
             f"query_embeddings = {st_query}", "document_embeddings = model.encode(documents)",
             "print(model.similarity(query_embeddings, document_embeddings))", "```", "",
             "With qembed:", "", "```python", "from qembed import Embedder", "",
             f"model = Embedder.from_pretrained(\"{model_id}\")",
             "query_embeddings = model.encode_queries([\"what do rice plants need?\"])",
             "document_embeddings = model.encode_documents([\"Rice grows in flooded fields.\"])", "```", "",
             "```bash", f"qembed serve --model {model_id}", "```", ""]  # fmt: skip
    if instruction:
        example = format_query("what do rice plants need?", instruction)
        lines += ["Queries take a one-line task instruction in the Qwen3 format (documents take none); the default "
                  "one, applied by `prompt_name=\"query\"` and `encode_queries`, is:", "", f"> {instruction}", "",
                  "A query with it reads `" + example.replace("\n", "\\n") + "`. For another task pass "
                  "`prompt=\"Instruct: <task>\\nQuery:\"` (sentence-transformers) or `instruction=\"<task>\"` (qembed).", ""]  # fmt: skip
    elif query_prompt:
        lines += [f"Queries are prefixed with the model's query prompt `{query_prompt!r}` (`prompt_name=\"query\"`).", ""]
    return lines


def _prompts(folder: Path) -> dict[str, str]:
    try:
        data = json.loads((folder / "config_sentence_transformers.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    prompts = data.get("prompts") if isinstance(data, dict) else None
    return prompts if isinstance(prompts, dict) else {}


# ------------------------------------------------------------------------------------- the save sites
def train_card(output: str | Path, cfg, *, records: Sequence = (), eval_split: str | None = None,
               steps: int = 0, best_step: int | None = None) -> Path:  # fmt: skip
    """The card of a `qembed train` output: the training data and configuration, and the evaluation of the saved
    weights from `train_log.jsonl` (the best step's when they were loaded, else the last step's)."""
    from qembed.data.beir import dataset_name
    from qembed.train.config import CONFIG_FILE, saved_record

    output = Path(output)
    evaluations = []
    evals = [r for r in _log(output / "train_log.jsonl") if isinstance(r.get("eval"), dict)]
    wanted = best_step if best_step is not None else steps
    chosen = next((r for r in evals if r.get("step") == wanted), None)
    if chosen is not None and cfg.eval_dataset:
        evaluations.append(Evaluation(dataset_name(cfg.eval_dataset), eval_split or cfg.eval_split, chosen["eval"],
                                      label=f"step {chosen['step']}"))  # fmt: skip
    unused = {*(() if cfg.lora else ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "merge_lora")),
              *(() if cfg.eval_dataset else ("eval_steps", "eval_split", "eval_metric", "load_best"))}
    saved = output / CONFIG_FILE  # written at the start of the run: the options, auto ones resolved
    options = json.loads(saved.read_text(encoding="utf-8")) if saved.is_file() else saved_record(cfg)
    config = {k: v for k, v in options.items()
              if k not in CONFIG_SKIP and k not in unused and v is not None and v != []}  # fmt: skip
    config["steps"] = steps
    sections = [("Training data", _data_summary(cfg.data, records)), ("Training configuration", _table(config))]
    return write_model_card(output, CardContent(
        base_model=cfg.model, origin="Fine-tuned with `qembed train`.", tags=["fine-tuned"],
        evaluations=evaluations, sections=sections,
    ))  # fmt: skip


def merge_card(output: str | Path, models: Sequence[str | Path], *, method: str, weights=None, t: float = 0.5) -> Path:
    """The card of a `qembed merge` output: the models merged and how."""
    if method == "slerp":
        how = f"spherical interpolation (slerp) at t = {t} (0: the first model, 1: the second)"
    else:
        shares = weights or [1.0] * len(models)
        how = "weighted average (" + ", ".join(f"{w:g}" for w in shares) + ")"
    body = "\n".join([f"Merged with `qembed merge`: {how}, parameter by parameter, of:", "",
                      *[f"{i}. `{m}`" for i, m in enumerate(models, start=1)]])  # fmt: skip
    return write_model_card(output, CardContent(
        base_model=str(models[0]), origin=f"A merge of {len(models)} models made with `qembed merge`.", tags=["merge"],
        sections=[("Merge", body)],
    ))  # fmt: skip


def adapt_card(best_dir: str | Path, summary: Mapping[str, Any], columns: Sequence[str]) -> Path:
    """The card of `qembed adapt`'s `best/`: the recommended variant's results from `summary.json` in the
    model-index, and the before/after table (base model and recommended variant on the test split)."""
    choice = summary["recommendation"]
    source = (summary.get("data") or {}).get("source", "")
    mine = [r for r in summary["results"] if r["variant"] == choice["variant"] and r["instruction"] == choice["instruction"]]
    evaluations = [Evaluation(_adapt_dataset(r, source), "test" if r["set"] != "dev" else "dev", r["metrics"],
                              label=r["set"]) for r in mine]  # fmt: skip
    test = [r for r in summary["results"] if r["set"] == "test"]
    before = next((r for r in test if r["variant"] == "base" and r["instruction"] == choice["instruction"]), None)
    after = next(r for r in test if r["variant"] == choice["variant"] and r["instruction"] == choice["instruction"])
    cols = [c for c in columns if c in after["metrics"]]
    table = ["| model | " + " | ".join(_metric_name(c) for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for label, row in (("before: base model", before), (f"after: {choice['variant']}", after)):
        if row is not None:
            table.append(f"| {label} | " + " | ".join(f"{100 * row['metrics'][c]:.2f}" for c in cols) + " |")
    if before is not None:
        table.append("| change | " + " | ".join(f"{100 * (after['metrics'][c] - before['metrics'][c]):+.2f}"
                                               for c in cols) + " |")  # fmt: skip
    setting = "without a query instruction" if choice["query_format"] == "none" else \
        f"with the query instruction `{choice['instruction']}`" if choice["instruction"] else "with the model's own query format"  # fmt: skip
    data = summary.get("data") or {}
    data_lines = [f"- source: {source or '?'}; corpus: {data.get('documents', '?')} documents",
                  f"- queries: train {data.get('train_queries', '?')}, dev {data.get('dev_queries', '?')}, "
                  f"test {data.get('test_queries', '?')} (disjoint)"]  # fmt: skip
    negatives = summary.get("negatives") or {}
    if negatives.get("queries"):
        data_lines.append(f"- hard negatives: {negatives.get('negatives')} for {negatives['queries']} train queries")
    merge = summary.get("merge") or {}
    sections = [("Before and after (test split)", "\n".join([
                    f"Evaluated {setting}; the variant was chosen on the dev split.", "", *table])),
                ("Training data", "\n".join(data_lines))]  # fmt: skip
    if merge.get("best_t") is not None:
        sections.append(("Merge", f"slerp of the base and the fine-tuned model at t = {merge['best_t']} (chosen on dev)."))
    return write_model_card(best_dir, CardContent(
        base_model=summary.get("model"), origin=f"Adapted to a domain with `qembed adapt` (recommended variant: "
        f"{choice['variant']}).", tags=["domain-adaptation"], evaluations=evaluations, sections=sections,
    ))  # fmt: skip


def _adapt_dataset(result: Mapping[str, Any], source: str) -> str:
    if result["set"] == "retention":
        return str(result.get("dataset") or "retention")
    return f"qembed-adapt-{source}" if source else "qembed-adapt"


def _log(path: Path) -> list[dict]:
    from qembed.data.jsonl import iter_jsonl

    return list(iter_jsonl(path, allow_truncated_tail=True)) if path.is_file() else []


def _data_summary(paths: Sequence[str], records: Sequence) -> str:
    lines = ["- files: " + ", ".join(f"`{Path(p).name}`" for p in paths)]
    if records:
        n = len(records)
        instructions = [r.instruction for r in records if getattr(r, "instruction", None)]
        lines += [f"- records: {n}; positives per record: {sum(len(r.pos) for r in records) / n:.2f}; "
                  f"hard negatives per record: {sum(len(r.neg) for r in records) / n:.2f}",
                  f"- records with their own instruction: {len(instructions)} "
                  f"({len(set(instructions))} distinct); the others used the model's default"]  # fmt: skip
        for text in list(dict.fromkeys(instructions))[:3]:
            lines.append(f"  - `{text}`")
    return "\n".join(lines)


def _table(values: Mapping[str, Any]) -> str:
    rows = ["| option | value |", "|---|---|"]
    rows += [f"| {k} | {', '.join(map(str, v)) if isinstance(v, list) else v} |" for k, v in values.items()]
    return "\n".join(rows)
