"""Instruction search: which query instruction serves a model best on a dataset, judged on its dev split.

`gather_candidates` lists the candidates (independent of any model): the model's default, no instruction, the
mteb instruction of the closest task (`closest_mteb_task`), instructions the user gives, and instructions an
LLM writes from example (query, relevant passage) pairs of the train split (the dev split when there is no
train split; never the test split). `search_instruction` scores every candidate on the dev split with the
evaluation engine and picks the best (ties go to the earlier candidate: the model's default first);
`write_query_prompt` writes the chosen one into a model folder's sentence-transformers prompts, so
`Embedder.encode_queries`, `qembed serve` and sentence-transformers' `prompt_name="query"` apply it.
Instructions (mteb's and the LLM's) are tried on instruction-aware models only (those whose own query
format is a Qwen3 instruction); other models compare their own format, none, and the user's instructions.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qembed.data.beir import RetrievalDataset, read_qrels, read_queries
from qembed.errors import QembedError
from qembed.models.prompts import MODEL_DEFAULT, QueryFormat

log = logging.getLogger(__name__)

DEFAULT_METRIC = "ndcg@10"
SAMPLE_PAIRS = 8  # example (query, passage) pairs shown to the LLM
PASSAGE_CHARS = 400  # each example passage is cut to this many characters

# Query shape and language -> the mteb retrieval task whose instruction fits (when the folder's name names no task)
CLOSEST_TASKS = {
    ("zh", "question"): "T2Retrieval", ("zh", "claim"): "T2Retrieval", ("zh", "keywords"): "T2Retrieval",
    ("en", "question"): "NFCorpus", ("en", "claim"): "FEVER", ("en", "keywords"): "MSMARCO",
}  # fmt: skip
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
_QUESTION_WORDS = re.compile(r"^(what|how|why|when|where|which|who|whom|whose|is|are|do|does|did|can|could|should"
                             r"|would|will|was|were|has|have)\b", re.IGNORECASE)  # fmt: skip
_ZH_QUESTION = re.compile(r"[吗呢？?]|什么|怎么|怎样|如何|为什么|哪|多少|是否")


@dataclass(frozen=True)
class Candidate:
    """One instruction setting to try: `source` is `default` (the model's own), `none`, `mteb:<task>`, `given`
    (the user's) or `llm`; `instruction` is the text of the last three."""

    source: str
    instruction: str | None = None

    @property
    def setting(self) -> QueryFormat | str | None:
        """The `instruction` argument of `evaluate` / `Embedder.encode`."""
        if self.source == "default":
            return MODEL_DEFAULT
        return None if self.source == "none" else self.instruction

    def to_dict(self) -> dict:
        return {"source": self.source, "instruction": self.instruction}

    @classmethod
    def from_dict(cls, data: dict) -> Candidate:
        return cls(data["source"], data.get("instruction"))


@dataclass
class SearchResult:
    """Each candidate's dev metrics and the chosen one. `rows`: one per distinct query format, in candidate
    order: `source`, `instruction` (the resolved text, None for bare queries), `query_format` (kind), `score`
    (the choice metric) and `metrics`; `same_as` lists candidates that encode like an earlier one."""

    model: str
    split: str
    metric: str
    rows: list[dict]
    chosen: int
    same_as: list[dict] = field(default_factory=list)

    @property
    def best(self) -> dict:
        return self.rows[self.chosen]

    @property
    def query_format(self) -> QueryFormat:
        """The chosen query format, resolved (as `evaluate` and `write_query_prompt` take it)."""
        return QueryFormat(self.best["query_format"], self.best["instruction"] or "")

    def lines(self) -> list[str]:
        out = [f"{self.model}: {self.split} {self.metric} by query instruction"]
        for i, row in enumerate(self.rows):
            mark = "*" if i == self.chosen else " "
            out.append(f" {mark} {100 * row['score']:6.2f}  {row['source']:<16} {describe(row)}")
        out.append(f"chosen: {self.best['source']} ({describe(self.best)})")
        return out

    def to_dict(self) -> dict:
        return {"model": self.model, "split": self.split, "metric": self.metric, "rows": self.rows,
                "chosen": self.chosen, "same_as": self.same_as}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> SearchResult:
        return cls(data["model"], data["split"], data["metric"], data["rows"], data["chosen"], data.get("same_as", []))


def describe(row: dict) -> str:
    """A row's query format in words: the instruction text, the raw prompt, or `no instruction`."""
    if row["query_format"] == "none":
        return "no instruction"
    return row["instruction"] if row["query_format"] == "instruction" else f"prompt {row['instruction']!r}"


# ------------------------------------------------------------------------------------------- candidates
def query_shape(queries: Sequence[str]) -> tuple[str, str]:
    """(language, shape) of a sample of queries: `zh` when most hold Chinese characters, else `en`; shape
    `question`, `claim` (declarative sentences) or `keywords` by majority."""
    if not queries:
        return "en", "keywords"
    zh = sum(bool(_CJK.search(q)) for q in queries) > len(queries) / 2
    shapes = {"question": 0, "claim": 0, "keywords": 0}
    for q in queries:
        text = q.strip()
        if text.endswith(("?", "？")) or (_ZH_QUESTION.search(text) if zh else _QUESTION_WORDS.match(text)):
            shapes["question"] += 1
        elif text.endswith((".", "。")) and len(text.split()) >= 5:
            shapes["claim"] += 1
        else:
            shapes["keywords"] += 1
    return ("zh" if zh else "en"), max(shapes, key=lambda s: (shapes[s], s == "question"))


def closest_mteb_task(queries: Sequence[str], name: str | None = None) -> Candidate | None:
    """The mteb instruction of the task closest to a dataset: the retrieval task its folder's `name` names
    (e.g. `nfcorpus`, `scifact`), else the task of `CLOSEST_TASKS` for the queries' language and shape. None
    when mteb is not installed or the task has no instruction."""
    try:
        import mteb

        from qembed.eval.mteb_run import InstructionPolicy
    except ImportError:
        log.info("mteb is not installed: no mteb instruction candidate")
        return None
    task = None
    if name:
        key = re.sub(r"[^a-z0-9]", "", name.lower())
        for t in mteb.get_tasks(task_types=["Retrieval"]):
            if re.sub(r"[^a-z0-9]", "", t.metadata.name.lower()) in (key, key + "retrieval"):
                task = t
                break
    if task is None:
        task = mteb.get_task(CLOSEST_TASKS[query_shape(queries)])
    instruction = InstructionPolicy().instruction(task.metadata)
    return Candidate(f"mteb:{task.metadata.name}", instruction) if instruction else None


def example_pairs(dataset: str | Path, *, count: int = SAMPLE_PAIRS, seed: int = 0) -> list[tuple[str, str]]:
    """Up to `count` (query, relevant passage) pairs drawn from the train split (the dev split without one)."""
    from qembed.data.corpus import open_corpus

    folder = Path(dataset)
    split = "train" if (folder / "qrels" / "train.tsv").is_file() else "dev"
    qrels, queries = read_qrels(folder / "qrels" / f"{split}.tsv"), read_queries(folder / "queries.jsonl")
    judged = sorted(q for q, docs in qrels.items() if q in queries and any(g > 0 for g in docs.values()))
    chosen = random.Random(seed).sample(judged, min(count, len(judged)))
    corpus = open_corpus(folder / "corpus.jsonl", keep_blank=True)
    pairs = []
    for qid in chosen:
        doc = next((d for d, g in sorted(qrels[qid].items()) if g > 0 and d in corpus), None)
        if doc is not None:
            pairs.append((queries[qid], corpus[doc][:PASSAGE_CHARS]))
    return pairs


def llm_instructions(llm, pairs: Sequence[tuple[str, str]], count: int) -> list[str]:
    """`count` instructions an LLM (`qembed.synth.llm`'s `ChatLLM`) writes for a collection from example pairs."""
    import asyncio

    from qembed.synth.llm import LLMError
    from qembed.synth.parsing import ParseError, extract_json
    from qembed.synth.prompts import instruction_messages

    async def ask() -> str:
        try:
            return await llm.chat(instruction_messages(pairs, count), max_tokens=512, temperature=0.7)
        finally:
            await llm.aclose()

    try:
        reply = extract_json(asyncio.run(ask()))
    except (LLMError, ParseError) as exc:
        raise QembedError(f"the LLM wrote no instructions: {exc}") from None
    items = reply.get("instructions")
    if not isinstance(items, list):
        raise QembedError("the LLM wrote no instructions: its reply has no \"instructions\" list")
    written = []
    for item in items:
        if isinstance(item, str):
            text = " ".join(item.split()).removeprefix("Instruct:").strip()
            if text and text not in written:
                written.append(text)
    return written[:count]


def gather_candidates(dataset: str | Path, *, given: Sequence[str] = (), llm=None, llm_count: int = 3,
                      seed: int = 0, mteb: bool = True) -> list[Candidate]:  # fmt: skip
    """The candidates for a BEIR folder: default, none, the closest mteb task's, `given`, and (with `llm`, a
    `ChatLLM`) `llm_count` LLM-written ones. The test split is never read."""
    folder = Path(dataset)
    candidates = [Candidate("default"), Candidate("none")]
    if mteb:
        split = "train" if (folder / "qrels" / "train.tsv").is_file() else "dev"
        queries = read_queries(folder / "queries.jsonl")
        sample = [queries[q] for q in sorted(read_qrels(folder / "qrels" / f"{split}.tsv")) if q in queries][:200]
        closest = closest_mteb_task(sample, folder.resolve().name)
        if closest is not None:
            candidates.append(closest)
    candidates += [Candidate("given", text) for text in given if text]
    if llm is not None and llm_count > 0:
        candidates += [Candidate("llm", text) for text in llm_instructions(llm, example_pairs(folder, seed=seed), llm_count)]
    return candidates


# ------------------------------------------------------------------------------------------------ search
def check_metric(metric: str) -> int:
    """The cut-off of a choice metric such as `ndcg@10`; a one-line error for anything else."""
    from qembed.eval.metrics import METRICS

    name, _, cut = metric.partition("@")
    if name not in METRICS or not cut.isdigit() or int(cut) < 1:
        raise QembedError(f"instruction search metric must be one of {', '.join(METRICS)} at a cut-off, e.g. "
                          f"ndcg@10; got {metric!r}")  # fmt: skip
    return int(cut)


def search_instruction(model, dataset: RetrievalDataset | str | Path, candidates: Sequence[Candidate], *,
                       split: str = "dev", metric: str = DEFAULT_METRIC, **evaluate_options) -> SearchResult:  # fmt: skip
    """Score each candidate on the `split` (dev) queries of `dataset` with `model` (a name, folder or
    `Embedder`) and pick the best by `metric` (ties: the earlier candidate). `evaluate_options` go to
    `qembed.eval.evaluate.evaluate` (index, cache_dir, device, batch_tokens, ...)."""
    from qembed.eval.evaluate import DEFAULT_KS, evaluate
    from qembed.models.embedder import Embedder

    options = dict(evaluate_options)
    options["k"] = sorted({*options.get("k", DEFAULT_KS), check_metric(metric)})
    if not isinstance(dataset, RetrievalDataset):
        dataset = RetrievalDataset.load(dataset, split=split)
    emb = model if isinstance(model, Embedder) else Embedder.from_pretrained(
        model, device=options.pop("device", None), dtype=options.pop("dtype", None), quantize=options.pop("quantize", None))  # fmt: skip
    for key in ("device", "dtype", "quantize"):
        options.pop(key, None)
    aware = emb.default_query_format.kind == "instruction"
    tried = [c for c in candidates if aware or c.source in ("default", "none", "given")]
    formats, kept, same_as, seen = [], [], [], {}
    for candidate in tried:
        fmt = emb.resolve_query_format(candidate.setting)
        if fmt.prefix in seen:
            same_as.append({**candidate.to_dict(), "same_as": seen[fmt.prefix]})
            continue
        seen[fmt.prefix] = candidate.source
        formats.append(fmt)
        kept.append(candidate)
    results = evaluate(emb, dataset, split=split, instruction=formats, **options)
    rows = [{"source": c.source, "instruction": r["instruction"], "query_format": r["query_format"],
             "score": r["metrics"][metric], "metrics": r["metrics"]} for c, r in zip(kept, results, strict=True)]  # fmt: skip
    chosen = max(range(len(rows)), key=lambda i: (rows[i]["score"], -i))
    return SearchResult(str(model) if not isinstance(model, Embedder) else emb.name_or_path, split, metric, rows,
                        chosen, same_as)  # fmt: skip


# ---------------------------------------------------------------------------------------------- writing
def write_query_prompt(model_dir: str | Path, query_format: QueryFormat) -> None:
    """Make `query_format` the model folder's default query format: its `prompts["query"]` in
    `config_sentence_transformers.json` (the Qwen3 template around an instruction, a raw prompt, or an empty
    prompt for bare queries), which qembed and sentence-transformers both read."""
    import json

    from qembed.files import atomic_write_json

    if query_format.kind == "default":
        raise ValueError("resolve MODEL_DEFAULT against the model before writing it")
    path = Path(model_dir) / "config_sentence_transformers.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"default_prompt_name": None}
    data["prompts"] = {**(data.get("prompts") or {}), "query": query_format.prefix}
    atomic_write_json(path, data, ensure_ascii=False)
