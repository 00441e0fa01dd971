"""`qembed adapt`: adapt an embedder to a domain in one resumable run.

    data -> baseline -> instruction -> negatives -> train -> merge -> [reranker] -> final -> report

Each stage is a few calls into the library, working in `OUTPUT/<stage>/`; `qembed.recipes.stages` skips
finished stages, resumes interrupted ones and reruns changed ones. Only the dev split drives choices
(merge weight, recommended variant); the test split is read by the baseline and final evaluations only.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from qembed.data.beir import read_qrels, read_queries, write_beir
from qembed.data.corpus import read_corpus
from qembed.data.splits import SplitSizes, carve_dev, split_queries
from qembed.errors import QembedError
from qembed.eval.evaluate import evaluate
from qembed.models.prompts import MODEL_DEFAULT
from qembed.recipes.adapt_config import source_of
from qembed.recipes.adapt_instruction import (
    FinalInstructions,
    check_instruction_config,
    run_instruction_stage,
)
from qembed.recipes.stages import Pipeline, Stage

MODES = {"default": MODEL_DEFAULT, "none": None}
# train options that do not change the trained weights (training allows changing them on resume): left out
# of the train stage's fingerprint, so changing one resumes an interrupted training instead of restarting it
TRAIN_RUN_OPTIONS = ("device", "precision", "save_steps", "save_minutes", "evaluations")


def build_pipeline(cfg: dict, *, show_progress: bool | None = None) -> Pipeline:
    """The stages of an adapt run for the resolved configuration `cfg`."""
    out = Path(cfg["output"])
    beir = out / "data" / "beir"
    cache = cfg["eval"]["cache_dir"]  # None: the shared cache, so `index build` with best/ encodes nothing new
    data, ev = cfg["data"], cfg["eval"]
    modes = [MODES[m] for m in ev["instruction_modes"]]
    base = cfg["model"]
    mined = out / "negatives" / "mined.jsonl"

    def run_eval(models, split, folder, dataset=beir, instruction=modes, **kw):
        return evaluate(models, dataset, split=split, instruction=instruction, k=ev["k"], index=ev["index"],
                        cache_dir=cache, output=folder, show_progress=show_progress, **kw)  # fmt: skip

    def search(model, candidates):  # the dev split only
        from qembed.eval.instruction_search import search_instruction

        return search_instruction(model, beir, candidates, split="dev", metric=ev["metric"], k=ev["k"],
                                  index=ev["index"], cache_dir=cache, show_progress=show_progress)  # fmt: skip

    def stage_data(folder: Path) -> None:
        sizes = SplitSizes(data["dev_fraction"], data["test_fraction"], data["max_dev"], data["max_test"])
        summary: dict = {"source": source_of(cfg)}
        if summary["source"] == "qa":  # the split of `qembed data qa-to-beir`: one function for both verbs
            conversion = _qa_source(cfg, beir, sizes)
            summary["conversion"] = [line for line in conversion.lines() if not line.startswith("split:")]
            counts = {"train": conversion.num_train, "dev": conversion.num_dev, "test": conversion.num_test}
            summary.update(documents=conversion.num_docs, **{f"{k}_queries": v for k, v in counts.items()})
            (folder / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
            print(f"corpus {conversion.num_docs} documents; queries: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
            return
        if summary["source"] == "dataset":
            src = Path(data["dataset"])
            corpus, queries = read_corpus(src, keep_blank=True), read_queries(src / "queries.jsonl")
            train, test = ({q: j for q, j in read_qrels(src / "qrels" / f"{name}.tsv").items() if q in queries}
                           for name in ("train", "test"))  # fmt: skip
            qrels = carve_dev(train, test, sizes, seed=cfg["seed"])
        else:
            corpus, queries, judged = _llm_source(cfg, folder, summary)
            qrels = split_queries(judged, sizes, seed=cfg["seed"])
        write_beir(beir, corpus, {q: queries[q] for split in qrels.values() for q in split}, qrels)
        summary.update(documents=len(corpus), **{f"{k}_queries": len(v) for k, v in qrels.items()})
        (folder / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        print(f"corpus {len(corpus)} documents; queries: " + ", ".join(f"{k} {len(v)}" for k, v in qrels.items()))

    def stage_baseline(folder: Path) -> None:
        for split in ("dev", "test"):
            run_eval([base, *cfg["compare_models"]], split, folder / split)

    def stage_instruction(folder: Path) -> None:
        run_instruction_stage(cfg, beir, folder, search)

    def stage_negatives(folder: Path) -> None:
        from qembed.mine import mine_hard_negatives

        result = mine_hard_negatives(base, beir, mined, split="train", seed=cfg["seed"], index=ev["index"],
                                     cache_dir=cache, show_progress=show_progress, **cfg["negatives"])  # fmt: skip
        print("\n".join(result.lines()))

    def stage_train(folder: Path) -> None:
        from qembed.train import TrainConfig, train_embedder

        options = dict(cfg["train"])
        evaluations = options.pop("evaluations")
        train_queries = len(read_qrels(beir / "qrels" / "train.tsv"))
        steps = options["epochs"] * math.ceil(train_queries / options["batch_size"] / options["grad_accum"])
        eval_steps = math.ceil(steps / evaluations) if evaluations else 0
        result = train_embedder(TrainConfig(
            model=base, data=[str(mined)], output=str(folder / "model"), resume=True, seed=cfg["seed"],
            eval_dataset=str(beir) if eval_steps else None, eval_split="dev", eval_steps=eval_steps,
            eval_metric=ev["metric"], progress=show_progress is not False, **options,
        ))  # fmt: skip
        print(f"trained {result.steps} steps; last loss {result.losses[-1]:.4f}" if result.losses else "trained")
        _drop_checkpoints(folder / "model", cfg)

    def stage_merge(folder: Path) -> None:
        from qembed.merge import merge_models
        from qembed.models.loading import resolve_model_dir

        base_dir = resolve_model_dir(base)
        curve = []
        for t in map(float, cfg["merge"]["t"]):
            path = merge_models([base_dir, out / "train" / "model"], folder / f"t{t}", method="slerp", t=t)
            for entry in run_eval([str(path)], "dev", None):
                curve.append({"t": t, **{key: entry[key] for key in ("instruction", "query_format", "metrics")}})
        best = max(curve, key=lambda c: (c["metrics"][ev["metric"]], c["t"]))
        (folder / "curve.json").write_text(json.dumps({"best_t": best["t"], "curve": curve}, indent=2))
        for t in map(float, cfg["merge"]["t"]):  # keep the chosen candidate only (t = 1 is train/model itself)
            if t != best["t"] or t == 1.0:
                shutil.rmtree(folder / f"t{t}", ignore_errors=True)
        print("dev " + ev["metric"] + " by t: " + ", ".join(f"{c['t']}: {100 * c['metrics'][ev['metric']]:.2f}"
                                                             for c in curve) + f"; best t = {best['t']}")  # fmt: skip

    def stage_reranker(folder: Path) -> None:
        from qembed.train import TrainConfig, train_reranker

        rr = dict(cfg["reranker"])
        model = rr.pop("model")
        rr.pop("rerank_top")
        train_reranker(TrainConfig(model=model, data=[str(mined)], output=str(folder / "model"), resume=True,
                                   seed=cfg["seed"], progress=show_progress is not False, save_steps=50, **rr))  # fmt: skip
        _drop_checkpoints(folder / "model", cfg)

    def variants() -> list[tuple[str, str, str | None]]:
        """(name, embedder folder, reranker) evaluated at the end."""
        best_t = json.loads((out / "merge" / "curve.json").read_text())["best_t"]
        tuned = out / "train" / "model"
        merged = tuned if float(best_t) == 1.0 else out / "merge" / f"t{best_t}"
        rows = [("base", base, None), ("fine-tuned", str(tuned), None), (f"merged t={best_t}", str(merged), None)]
        if cfg["reranker"]["model"]:
            best = rows[-1][1]
            rows += [("merged + base reranker", best, cfg["reranker"]["model"]),
                     ("merged + fine-tuned reranker", best, str(out / "reranker" / "model"))]  # fmt: skip
        unique = {(m, r): (n, m, r) for n, m, r in reversed(rows)}  # a name per distinct run, first name wins
        return list(reversed(list(unique.values())))

    def stage_final(folder: Path) -> None:
        results = []
        sets = [("dev", beir), ("test", beir)]
        if ev["retention_dataset"]:
            sets.append(("retention", Path(ev["retention_dataset"])))
        chosen = FinalInstructions(cfg, out, folder, search) if searching else None
        for name, model, reranker in variants():
            settings = [chosen.chosen(name, model), *modes] if chosen else modes  # the choice first: it wins ties
            for split, dataset in sets:
                extra = {"reranker": reranker, "rerank_top": cfg["reranker"]["rerank_top"]} if reranker else {}
                for entry in run_eval([model], "dev" if split == "dev" else "test", None, dataset=dataset,
                                      instruction=settings, **extra):  # fmt: skip
                    results.append({"variant": name, "set": split, **entry})
        (folder / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))

    def stage_report(folder: Path) -> None:
        from qembed.recipes.adapt_report import write_report

        write_report(cfg, out, pipeline.seconds())

    searching = cfg["instruction"]["search"]
    stages = [
        Stage("data", stage_data, {"data": data, "seed": cfg["seed"]}, inputs=_inputs(cfg)),
        Stage("baseline", stage_baseline, {"models": [base, *cfg["compare_models"]], "eval": ev}, ["data"]),
    ]
    if searching:
        llm = [data["llm_base_url"], data["llm_model"]] if data["llm_base_url"] else None
        search_on = {key: ev[key] for key in ("metric", "k", "index")}
        stages.append(Stage("instruction", stage_instruction, {"model": base, "instruction": cfg["instruction"],
                                                               "llm": llm, "eval": search_on}, ["data"]))  # fmt: skip
    stages += [
        Stage("negatives", stage_negatives, {"model": base, "negatives": cfg["negatives"], "index": ev["index"]},
              ["data"]),  # fmt: skip
        Stage("train", stage_train, {"model": base, "metric": ev["metric"],
                                     "train": {k: v for k, v in cfg["train"].items() if k not in TRAIN_RUN_OPTIONS}},
              ["data", "negatives"], on_resume=_checkpoint_note),  # fmt: skip
        Stage("merge", stage_merge, {"merge": cfg["merge"], "eval": ev}, ["train"]),
    ]
    if cfg["reranker"]["model"]:
        stages.append(Stage("reranker", stage_reranker, {"reranker": cfg["reranker"]}, ["negatives"],
                            on_resume=_checkpoint_note))  # fmt: skip
    final_after = ["data", "merge", *(["reranker"] if cfg["reranker"]["model"] else []),
                   *(["instruction"] if searching else [])]  # fmt: skip
    stages.append(Stage("final", stage_final, {"eval": ev, "rerank_top": cfg["reranker"]["rerank_top"]}, final_after))
    stages.append(Stage("report", stage_report, {}, [s.name for s in stages]))
    pipeline = Pipeline(out, stages, also_writes=("best",))
    return pipeline


def _inputs(cfg: dict) -> list[str]:
    data = cfg["data"]
    return [*data["qa"], *([data["corpus"]] if data["corpus"] else []), *([data["dataset"]] if data["dataset"] else [])]


def _checkpoint_note(folder: Path) -> str | None:
    """What resuming a training stage will do: nothing to say when it has a checkpoint."""
    from qembed.train.checkpoint import list_checkpoints

    return None if list_checkpoints(folder / "model" / "checkpoints") else "no checkpoint yet: training restarts"


def _drop_checkpoints(model: Path, cfg: dict) -> None:
    """Training is done: its checkpoints (in the stage's own folder) go, unless `keep_checkpoints`."""
    if not cfg["keep_checkpoints"]:
        shutil.rmtree(model / "checkpoints", ignore_errors=True)


def _qa_source(cfg: dict, beir: Path, sizes: SplitSizes):
    """QA files -> the BEIR folder `beir` with train / dev / test qrels (`qa_to_beir`, as `qembed data
    qa-to-beir` with the same fields, sizes and seed)."""
    from qembed.data.qa_to_beir import qa_to_beir

    data = cfg["data"]
    return qa_to_beir(data["qa"], beir, question_field=data["question_field"], answer_field=data["answer_field"],
                      format=data["format"], encoding=data["encoding"], num_queries=sizes.max_test,
                      test_fraction=sizes.test_fraction, dev_fraction=sizes.dev_fraction, max_dev=sizes.max_dev,
                      seed=cfg["seed"])  # fmt: skip


def _llm_source(cfg: dict, folder: Path, summary: dict):
    """Documents + an LLM -> `synthesize_corpus` (appends, resumable) then `filter_file` with the base model."""
    from qembed.synth.filter import filter_file
    from qembed.synth.generate import SynthConfig, synthesize_corpus
    from qembed.synth.llm import OpenAIChat, RetryPolicy

    data, syn = cfg["data"], cfg["synth"]
    config = SynthConfig(languages=syn["languages"], queries_per_doc=syn["queries_per_doc"], seed=cfg["seed"],
                         concurrency=syn["concurrency"])  # fmt: skip

    def llm():
        return OpenAIChat(data["llm_base_url"], data["llm_model"], api_key_env=data["api_key_env"],
                          concurrency=syn["concurrency"], timeout=syn["timeout"],
                          retry=RetryPolicy(max_retries=syn["max_retries"]))  # fmt: skip

    stats = synthesize_corpus(data["corpus"], folder / "synth.jsonl", llm, config=config, personas=syn["personas"],
                              embed_model=syn["embed_model"] or cfg["model"], text_field=data["text_field"],
                              limit=syn["limit"], show_progress=False)  # fmt: skip
    report = filter_file(folder / "synth.jsonl", folder / "filtered.jsonl", cfg["model"],
                         threshold=syn["filter_threshold"])  # fmt: skip
    summary.update(synth_written=stats.done, synth_failed=stats.failed, filter_kept=report.kept)
    corpus = read_corpus(data["corpus"], text_field=data["text_field"], limit=syn["limit"])
    queries, qrels = {}, {}
    for record in (json.loads(line) for line in (folder / "filtered.jsonl").read_text().splitlines() if line):
        queries[record["query_id"]] = record["query"]
        qrels[record["query_id"]] = {doc_id: 1 for doc_id in record["pos_ids"]}
    if not qrels:
        raise QembedError("no LLM-written query survived the filter")
    return corpus, queries, qrels


def check_config(cfg: dict, *, check_sources: bool = True) -> None:
    """One-line errors for bad options, models and paths (`check_inputs`), before any long work; with
    `check_sources` the LLM server is asked once, briefly."""
    from qembed.data.qa_to_beir import read_qa

    for key in ("model", "output"):
        if not cfg[key]:
            raise QembedError(f"--{key} is required (or `{key}:` in the config file)")
    bad = [m for m in cfg["eval"]["instruction_modes"] if m not in MODES]
    if bad or not cfg["eval"]["instruction_modes"]:
        raise QembedError(f"eval.instruction_modes must be a list of {' / '.join(MODES)}, got {bad}")
    if not cfg["merge"]["t"] or not all(isinstance(t, (int, float)) and 0 <= t <= 1 for t in cfg["merge"]["t"]):
        raise QembedError(f"merge.t must be a list of numbers in [0, 1], got {cfg['merge']['t']}")
    check_instruction_config(cfg)
    if cfg["train"]["batch_size"] < 2 or cfg["train"]["epochs"] < 1:
        raise QembedError("train.batch_size must be at least 2 and train.epochs at least 1")
    source, data = source_of(cfg), cfg["data"]
    check_inputs(cfg)
    if source == "qa":  # the files are read (cheap) to tell SQuAD JSON, which needs no field names
        for path in data["qa"]:
            rows, squad = read_qa(Path(path), format=data["format"], encoding=data["encoding"])
            if squad:
                continue
            if not data["question_field"] or not data["answer_field"]:
                raise QembedError("--qa needs --question-field and --answer-field (unless the files are SQuAD JSON)")
            for field in (data["question_field"], data["answer_field"]):
                if not any(field in row for row in rows):
                    raise QembedError(f"{path}: no row has the field {field!r} (fields: {sorted(rows[0]) if rows else []})")
    elif source == "llm":
        if not data["llm_base_url"] or not data["llm_model"]:
            raise QembedError("--corpus needs --llm-base-url and --llm-model (the LLM that writes the queries)")
        if not Path(data["corpus"]).is_file():
            raise QembedError(f"corpus file not found: {data['corpus']}")
        if check_sources:
            _check_reachable(data["llm_base_url"])
    else:
        folder = Path(data["dataset"])
        for name in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv"):
            if not (folder / name).is_file():
                raise QembedError(f"--dataset {folder}: {name} not found (a BEIR folder with train and test qrels)")
    if source != "llm" and data["llm_base_url"] and cfg["instruction"]["search"] and cfg["instruction"]["llm_count"]:
        if not data["llm_model"]:
            raise QembedError("--llm-base-url needs --llm-model (the LLM that writes candidate instructions)")
        if check_sources:
            _check_reachable(data["llm_base_url"])


def check_inputs(cfg: dict) -> None:
    """Every model and path the run will read exists (a model: a local folder or a cached/downloadable hub
    id), checked before the first stage and by `--dry-run`; each error names the flag that gave the value."""
    from qembed.models.loading import resolve_model_dir

    data, ev = cfg["data"], cfg["eval"]
    source = source_of(cfg)
    models = [("--model", cfg["model"]), *(("--compare-model", m) for m in cfg["compare_models"]),
              ("--reranker", cfg["reranker"]["model"])]  # fmt: skip
    paths = [*(("--qa", p) for p in data["qa"]), ("--corpus", data["corpus"]), ("--dataset", data["dataset"])]
    if source == "llm":
        models.append(("synth.embed_model", cfg["synth"]["embed_model"]))
        paths.append(("synth.personas", cfg["synth"]["personas"]))
    for flag, path in paths:
        if path and not Path(path).exists():
            raise QembedError(f"{flag} {path}: not found")
    retention = ev["retention_dataset"]
    if retention:
        for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
            if not (Path(retention) / name).is_file():
                raise QembedError(f"--retention-dataset {retention}: {name} not found (a BEIR folder with test qrels)")
    for flag, name in models:
        if name:
            try:
                resolve_model_dir(name)
            except QembedError as exc:
                raise QembedError(f"{flag} {name}: " + str(exc).replace("--model ", f"{flag} ")) from None


def _check_reachable(base_url: str) -> None:
    import httpx

    try:
        httpx.get(base_url.rstrip("/") + "/models", timeout=10.0)
    except httpx.HTTPError as exc:
        raise QembedError(f"LLM server unreachable at {base_url} ({type(exc).__name__})") from None
