"""Evaluation outputs: `metrics.json`, a side-by-side `report.md` table and a `recall_at_k.png` plot."""

from __future__ import annotations

import json
from pathlib import Path


def run_label(entry: dict) -> str:
    """A short readable name of a run: model, instruction setting, dim, reranker."""
    model = Path(entry["model"])
    name = f"{model.parent.name}/{model.name}" if model.name == "model" and model.parent.name else model.name
    instruction = entry.get("instruction")
    if instruction is None:
        parts = [name, "no instruction"]
    else:
        text = instruction if len(instruction) <= 40 else instruction[:37] + "..."
        parts = [name, f"instruction: {text}"]
    if entry.get("dim"):
        parts.append(f"{entry['dim']}d")
    if entry.get("quantize"):
        parts.append(entry["quantize"])
    if entry.get("reranker"):
        parts.append(f"+ {Path(entry['reranker']).name}")
    return " · ".join(parts)


def table_columns(entries: list[dict]) -> list[str]:
    """nDCG@10, every recall@k, MRR@10 and MAP@10 (10 replaced by the nearest k evaluated)."""
    keys = list(entries[0]["metrics"]) if entries else []
    ks = sorted({int(key.split("@")[1]) for key in keys})
    if not ks:
        return []
    k10 = min(ks, key=lambda k: (abs(k - 10), k))
    return [f"ndcg@{k10}"] + [f"recall@{k}" for k in ks] + [f"mrr@{k10}", f"map@{k10}"]


def markdown_table(entries: list[dict]) -> str:
    """Rows = runs, columns = metrics in %, the best value of each column in bold."""
    columns = table_columns(entries)
    best = {c: max(e["metrics"][c] for e in entries) for c in columns}
    lines = ["| run | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for entry in entries:
        cells = []
        for c in columns:
            value = f"{100 * entry['metrics'][c]:.2f}"
            cells.append(f"**{value}**" if len(entries) > 1 and entry["metrics"][c] == best[c] else value)
        lines.append(f"| {run_label(entry)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(entries: list[dict]) -> str:
    first = entries[0]
    lines = [
        f"# Retrieval evaluation: {first['dataset']} ({first['split']})",
        "",
        f"{first['num_queries']} queries, {first['num_docs']} documents, index `{first.get('index', 'faiss')}`. "
        "Metrics in %; best of each column in bold.",
        "",
        markdown_table(entries),
        "",
        "![recall@k](recall_at_k.png)",
        "",
        "| run | " + " | ".join(["encode corpus (s)", "encode queries (s)", "search (s)", "rerank (s)"]) + " |",
        "|---|---:|---:|---:|---:|",
    ]
    for entry in entries:
        t = entry["timings"]
        cells = [f"{t[key]:.1f}" if key in t else "-" for key in
                 ("encode_corpus_s", "encode_queries_s", "search_s", "rerank_s")]  # fmt: skip
        lines.append(f"| {run_label(entry)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_recall(entries: list[dict], path: str | Path) -> None:
    """Recall@k curves of every run on one plot (log-scaled k axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2 + 0.22 * len(entries)), dpi=100)
    ks: list[int] = []
    for entry in entries:
        points = sorted((int(key.split("@")[1]), value) for key, value in entry["metrics"].items()
                        if key.startswith("recall@"))  # fmt: skip
        ks = sorted(set(ks) | {k for k, _ in points})
        ax.plot([k for k, _ in points], [100 * v for _, v in points], marker="o", linewidth=2, label=run_label(entry))
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("k (documents retrieved)")
    ax.set_ylabel("recall@k (%)")
    first = entries[0]
    ax.set_title(f"Recall@k on {first['dataset']} ({first['split']}, {first['num_queries']} queries)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    # Below the axes, so long labels never hide a curve.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, frameon=False)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def write_outputs(entries: list[dict], output: str | Path) -> None:
    """Write `metrics.json`, `report.md` and `recall_at_k.png` into the folder `output`."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps(entries, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (output / "report.md").write_text(markdown_report(entries), encoding="utf-8")
    plot_recall(entries, output / "recall_at_k.png")
