"""The report of `qembed adapt`: `report.md`, `summary.json`, plots, and `best/` (the recommended model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qembed.data.beir import read_qrels, read_queries
from qembed.data.splits import write_training_queries
from qembed.errors import QembedError
from qembed.eval.instruction_search import write_query_prompt
from qembed.eval.report import plot_recall
from qembed.files import mark_owned, remove_owned_dir
from qembed.models.card import adapt_card
from qembed.models.prompts import QueryFormat
from qembed.recipes.adapt_instruction import instruction_table

COLUMNS = ["recall@1", "recall@5", "recall@10", "recall@30", "recall@100", "ndcg@10", "mrr@10"]


def _load(path: Path, default=None):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


MODES = {"none": "no instruction", "instruction": "instruction", "prompt": "query prompt"}


def _mode(entry: dict) -> str:
    """How an evaluation formatted its queries (`query_format` of `qembed.eval.evaluate`'s results)."""
    if entry["query_format"] == "instruction" and entry.get("instruction"):
        text = entry["instruction"]
        return f"instruction “{text if len(text) <= 40 else text[:39] + '…'}”"
    return MODES[entry["query_format"]]


def _label(entry: dict) -> str:
    return f"{entry['variant']} · {_mode(entry)}"


def results_table(entries: list[dict], columns: list[str]) -> str:
    """Metrics in %, best of each column in bold, and the difference to the base model with the same
    instruction setting in parentheses."""
    columns = [c for c in columns if c in entries[0]["metrics"]]
    best = {c: max(e["metrics"][c] for e in entries) for c in columns}
    base = {e["instruction"]: e for e in entries if e["variant"] == "base"}
    lines = ["| variant | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for e in entries:
        cells = []
        for c in columns:
            text = f"{100 * e['metrics'][c]:.2f}"
            if e["metrics"][c] == best[c] and len(entries) > 1:
                text = f"**{text}**"
            ref = base.get(e["instruction"])
            if ref is not None and ref is not e:
                text += f" ({100 * (e['metrics'][c] - ref['metrics'][c]):+.2f})"
            cells.append(text)
        lines.append(f"| {_label(e)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_training(log_path: Path, metric: str, path: Path) -> bool:
    """Training loss per step and the dev metric at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.is_file() else []
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    if not steps:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [100 * r["eval"].get(metric, float("nan")) for r in evals],
                 color="tab:orange", marker="o", label=f"dev {metric}")  # fmt: skip
        ax2.set_ylabel(f"dev {metric} (%)", color="tab:orange")
    ax.set_title("Training loss and dev metric")
    ax.grid(True, alpha=0.3)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_merge(curve: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for mode in dict.fromkeys(c["query_format"] for c in curve):
        points = [(c["t"], 100 * c["metrics"][metric]) for c in curve if c["query_format"] == mode]
        ax.plot(*zip(*points), marker="o", label=MODES[mode])
    ax.set_xlabel("slerp t (0 = base, 1 = fine-tuned)")
    ax.set_ylabel(f"dev {metric} (%)")
    ax.set_title("Merge weight chosen on dev")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def recommend(results: list[dict], metric: str) -> dict:
    """The variant (and instruction setting) with the best dev metric; ties go to the simpler, earlier one."""
    dev = [r for r in results if r["set"] == "dev"]
    best = max(enumerate(dev), key=lambda ie: (ie[1]["metrics"][metric], -ie[0]))[1]
    test = next(r for r in results if r["set"] == "test" and r["variant"] == best["variant"]
                and r["instruction"] == best["instruction"])  # fmt: skip
    return {"variant": best["variant"], "model": best["model"], "instruction": best["instruction"],
            "query_format": best["query_format"], "reranker": best["reranker"], "dev": best["metrics"], "test": test["metrics"]}  # fmt: skip


def write_report(cfg: dict, out: Path, seconds: dict[str, float]) -> dict:
    """Write `report.md`, `summary.json`, `recall_at_k.png`, `training.png`, `merge_t.png` and `best/`."""
    metric = cfg["eval"]["metric"]
    data = _load(out / "data" / "summary.json", {})
    mining = _load(out / "negatives" / "mined.summary.json", {})
    merge = _load(out / "merge" / "curve.json")
    results = _load(out / "final" / "results.json")
    baselines = _load(out / "baseline" / "test" / "metrics.json", [])
    choice = recommend(results, metric)

    best_dir = out / "best"
    if best_dir.exists() and not remove_owned_dir(best_dir, "adapt"):
        raise QembedError(f"{best_dir} exists but qembed did not create it (no adapt marker): move it away")
    from qembed.models.loading import resolve_model_dir

    shutil.copytree(resolve_model_dir(choice["model"]), best_dir, ignore=shutil.ignore_patterns("checkpoints", "train_log.jsonl"))
    mark_owned(best_dir, "adapt")
    write_query_prompt(best_dir, QueryFormat(choice["query_format"], choice["instruction"] or ""))  # serve applies it
    if choice["variant"] != "base":  # what chose these weights, so `qembed eval` can flag a leaked test split
        beir = out / "data" / "beir"
        queries = read_queries(beir / "queries.jsonl")
        write_training_queries(best_dir, {split: [queries[q] for q in read_qrels(beir / "qrels" / f"{split}.tsv")]
                                          for split in ("train", "dev") if (beir / "qrels" / f"{split}.tsv").is_file()})  # fmt: skip
    test = [r for r in results if r["set"] == "test"]
    plot_recall([{**r, "model": r["variant"], "dim": None} for r in test], out / "recall_at_k.png")
    has_training = plot_training(out / "train" / "model" / "train_log.jsonl", metric, out / "training.png")
    plot_merge(merge["curve"], metric, out / "merge_t.png")

    serve = f"qembed serve --model {best_dir}" + (f" --reranker {choice['reranker']}" if choice["reranker"] else "")
    negatives = mining.get("negatives", 0) / max(1, mining.get("queries", 1))
    lines = [
        f"# qembed adapt: {cfg['model']}",
        "",
        "## Data",
        "",
        f"- source: {data.get('source')}; corpus: {data.get('documents')} documents",
        f"- queries: train {data.get('train_queries')}, dev {data.get('dev_queries')}, test {data.get('test_queries')}"
        " (disjoint; queries sharing a positive document are in one split)",
        f"- hard negatives: {negatives:.2f} per train query on average ({mining.get('negatives', 0)} in all)",
        *[f"- {line}" for line in data.get("conversion", [])],
        "",
        f"## Test results ({test[0]['num_queries']} queries, {test[0]['num_docs']} documents)",
        "",
        "Metrics in %; best of each column in bold; in parentheses the difference to the base model with the",
        f"same instruction setting. The merge weight and the recommendation were chosen on dev ({metric}).",
        "",
        results_table(test, COLUMNS),
        "",
        "![recall@k](recall_at_k.png)",
        "",
        "## Recommendation",
        "",
        f"Deploy **{choice['variant']}** "
        + ("without a query instruction" if choice["query_format"] == "none" else f"with the {_mode(choice)}")
        + f" (best dev {metric}: {100 * choice['dev'][metric]:.2f}; test {metric}: {100 * choice['test'][metric]:.2f},"
        f" recall@5: {100 * choice['test'].get('recall@5', float('nan')):.2f}). It is copied to `best/`,"
        " with that query format as its default prompt (what `encode_queries` and `qembed serve` apply):",
        "",
        "```bash",
        serve,
        "```",
        "",
    ]  # fmt: skip
    dev = [r for r in results if r["set"] == "dev"]
    lines += ["## Dev results (what the choices saw)", "", results_table(dev, COLUMNS), ""]
    lines += instruction_table(out, metric)
    retention = [r for r in results if r["set"] == "retention"]
    if retention:
        lines += [f"## Retention: {retention[0]['dataset']} (test)", "", results_table(retention, COLUMNS), ""]
    if len(baselines) > 1:
        lines += ["## Baselines (test)", "", "| model | instruction | " + " | ".join(COLUMNS) + " |",
                  "|---|---|" + "---:|" * len(COLUMNS)]  # fmt: skip
        for b in baselines:
            cells = " | ".join(f"{100 * b['metrics'].get(c, float('nan')):.2f}" for c in COLUMNS)
            lines.append(f"| {b['model']} | {b['instruction'] or 'none'} | {cells} |")
        lines.append("")
    lines += ["## Training", ""]
    lines += ["![training](training.png)", ""] if has_training else ["(no training log)", ""]
    lines += [f"## Merge weight (dev {metric})", "", "| t | instruction | " + f"dev {metric} |", "|---:|---|---:|"]
    lines += [f"| {c['t']} | {_mode(c)} | {100 * c['metrics'][metric]:.2f} |"
              for c in merge["curve"]]  # fmt: skip
    lines += ["", f"Chosen: t = {merge['best_t']}.", "", "![merge t](merge_t.png)", "", "## Time per stage", "",
              "| stage | wall (s) | CPU (s) |", "|---|---:|---:|"]  # fmt: skip
    lines += [f"| {name} | {s['seconds']:.1f} | {s['cpu_seconds']:.1f} |" for name, s in seconds.items()]
    lines.append(f"| total | {sum(s['seconds'] for s in seconds.values()):.1f} | "
                 f"{sum(s['cpu_seconds'] for s in seconds.values()):.1f} |")
    lines += ["", "CPU time is the process's, all threads together; wall time also counts waiting for a busy CPU."]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    summary = {"model": cfg["model"], "data": data, "negatives": {k: mining.get(k) for k in ("queries", "negatives")},
               "merge": merge, "results": results, "baselines": baselines, "recommendation": {**choice, "serve": serve},
               "instruction_search": _load(out / "final" / "instructions.json"),
               "seconds": seconds}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    adapt_card(best_dir, summary, COLUMNS)
    return summary
