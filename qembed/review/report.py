"""The review report: relevance accuracy of the raw and the filtered data (Wilson 95 % intervals), by task,
question type, difficulty and language; accuracy and kept share against the cosine threshold; agreement
between reviewers (Cohen's kappa) and of each LLM judge with the human verdict.

An item's human verdict is the majority of its human labels (`skip` does not count; a tie gives no
verdict). Accuracy is the share of items with a verdict that are relevant."""

from __future__ import annotations

import html
import io
import math
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from qembed.review.labels import LLM_PREFIX, Review

BREAKDOWN = ("task", "question_type", "difficulty", "language")
Z95 = 1.959963984540054  # the normal quantile of a two-sided 95 % interval


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (`(0, 1)` when `n` is 0)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def cohen_kappa(pairs: list[tuple[bool, bool]]) -> float | None:
    """Cohen's kappa of two raters' binary labels on the same items (None when undefined: no items, or
    chance agreement 1 because both gave one label throughout)."""
    n = len(pairs)
    if n == 0:
        return None
    observed = sum(a == b for a, b in pairs) / n
    a_yes = sum(a for a, _ in pairs) / n
    b_yes = sum(b for _, b in pairs) / n
    expected = a_yes * b_yes + (1 - a_yes) * (1 - b_yes)
    if expected >= 1:
        return None
    return (observed - expected) / (1 - expected)


@dataclass(frozen=True)
class Proportion:
    successes: int
    n: int

    @property
    def rate(self) -> float | None:
        return self.successes / self.n if self.n else None

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.n)

    def as_dict(self) -> dict[str, Any]:
        low, high = self.interval
        return {"relevant": self.successes, "n": self.n, "accuracy": self.rate, "ci95": [low, high]}

    def text(self) -> str:
        if not self.n:
            return "–"
        low, high = self.interval
        return f"{100 * self.rate:.1f}% [{100 * low:.1f}, {100 * high:.1f}] ({self.successes}/{self.n})"


def _verdict(values: list[bool]) -> bool | None:
    yes = sum(values)
    no = len(values) - yes
    return None if yes == no else yes > no


def item_verdicts(review: Review) -> tuple[dict[str, bool], int]:
    """The human verdict per item (majority of human labels, skips left out), and the number of ties."""
    votes: dict[str, list[bool]] = {}
    for reviewer, labels in review.labels().items():
        if reviewer.startswith(LLM_PREFIX):
            continue
        for item, event in labels.items():
            if event["label"] != "skip":
                votes.setdefault(item, []).append(event["label"] == "relevant")
    verdicts = {item: v for item, values in votes.items() if (v := _verdict(values)) is not None}
    return verdicts, len(votes) - len(verdicts)


def _accuracy(items: list[dict[str, Any]], verdicts: dict[str, bool]) -> Proportion:
    judged = [verdicts[it["id"]] for it in items if it["id"] in verdicts]
    return Proportion(sum(judged), len(judged))


def _value(item: dict[str, Any], name: str) -> str:
    value = item.get(name)
    return "(none)" if value is None else str(value)


def _tables(items: list[dict[str, Any]], verdicts: dict[str, bool], filtered: bool) -> dict[str, Any]:
    kept = [it for it in items if it.get("kept")]
    tables: dict[str, Any] = {"overall": {"raw": _accuracy(items, verdicts).as_dict(),
                                          "filtered": _accuracy(kept, verdicts).as_dict() if filtered else None}}  # fmt: skip
    for name in BREAKDOWN:
        values = sorted({_value(it, name) for it in items})
        tables[name] = {
            value: {"raw": _accuracy([it for it in items if _value(it, name) == value], verdicts).as_dict(),
                    "filtered": _accuracy([it for it in kept if _value(it, name) == value], verdicts).as_dict()
                    if filtered else None}
            for value in values
        }  # fmt: skip
    return tables


def threshold_curve(items: list[dict[str, Any]], verdicts: dict[str, bool], step: float = 0.01,
                    judges: dict[str, dict[str, bool]] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """For thresholds from below the lowest to the highest sampled cosine: the share of sampled items
    with cosine above it (kept share), the accuracy of those with a human verdict among them, and (under
    `judges`) each LLM judge's. Empty unless every item has a cosine (a kept share of part of the sample
    would mislead)."""
    scored = [it for it in items if it.get("cosine") is not None]
    if not scored or len(scored) < len(items):
        return []
    low = math.floor(min(it["cosine"] for it in scored) / step) * step - step
    high = max(it["cosine"] for it in scored)
    points = []
    for i in range(int(round((high - low) / step)) + 1):
        t = round(low + i * step, 6)
        above = [it for it in scored if it["cosine"] > t]
        accuracy = _accuracy(above, verdicts)
        by_judge = {name: _accuracy(above, labels).as_dict() for name, labels in (judges or {}).items()}
        points.append({"threshold": t, "kept_share": len(above) / len(scored), **accuracy.as_dict(), "judges": by_judge})
    return points


def _agreement(a: dict[str, bool], b: dict[str, bool]) -> dict[str, Any]:
    shared = sorted(set(a) & set(b))
    pairs = [(a[i], b[i]) for i in shared]
    agree = sum(x == y for x, y in pairs)
    return {"n": len(pairs), "agreement": agree / len(pairs) if pairs else None, "kappa": cohen_kappa(pairs)}


def build_report(review: Review) -> dict[str, Any]:
    """Every figure of the report as plain data (see the module docstring)."""
    items = review.items
    filtered = review.header.get("filtered") is not None
    verdicts, ties = item_verdicts(review)
    labels = review.labels()
    binary = {name: {item: e["label"] == "relevant" for item, e in done.items() if e["label"] != "skip"}
              for name, done in labels.items()}  # fmt: skip
    humans = sorted(n for n in labels if not n.startswith(LLM_PREFIX) and labels[n])
    judges = sorted(n for n in labels if n.startswith(LLM_PREFIX) and labels[n])
    reviewers = {
        name: {"labelled": len(labels[name]), "skipped": sum(e["label"] == "skip" for e in labels[name].values()),
               "relevant": sum(binary[name].values())}
        for name in humans + judges
    }  # fmt: skip
    agreement = [{"a": a, "b": b, **_agreement(binary[a], binary[b])} for a, b in combinations(humans + judges, 2)]
    kept = [it for it in items if it.get("kept")]
    llm = {
        name: {"vs_humans": _agreement(binary[name], verdicts),
               "raw": _accuracy(items, binary[name]).as_dict(),
               "filtered": _accuracy(kept, binary[name]).as_dict() if filtered else None}
        for name in judges
    }  # fmt: skip
    return {
        "labels_file": str(review.path), "raw": review.header.get("raw"), "filtered": review.header.get("filtered"),
        "sample": review.header.get("sample"), "population": review.header.get("population"),
        "filtered_population": review.header.get("filtered_population"), "items": len(items),
        "items_kept": len(kept) if filtered else None,
        "items_scored": sum(it.get("cosine") is not None for it in items), "with_verdict": len(verdicts), "ties": ties,
        "reviewers": reviewers, "accuracy": _tables(items, verdicts, filtered),
        "threshold": threshold_curve(items, verdicts, judges={name: binary[name] for name in judges}), "agreement": agreement, "llm_judges": llm,
    }  # fmt: skip


def _prop(d: dict[str, Any] | None) -> Proportion | None:
    return None if d is None else Proportion(d["relevant"], d["n"])


def _rows(report: dict[str, Any]) -> list[tuple[str, str, Proportion, Proportion | None]]:
    """(group, value, raw, filtered) rows of the accuracy tables."""
    acc = report["accuracy"]
    rows = [("overall", "", _prop(acc["overall"]["raw"]), _prop(acc["overall"]["filtered"]))]
    for name in BREAKDOWN:
        for value, cell in acc[name].items():
            rows.append((name, value, _prop(cell["raw"]), _prop(cell["filtered"])))
    return rows  # type: ignore[return-value]


def _kappa(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _share(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def threshold_rows(report: dict[str, Any], every: float = 0.05) -> list[dict[str, Any]]:
    """The threshold curve at multiples of `every` (for tables)."""
    return [p for p in report["threshold"] if abs(p["threshold"] / every - round(p["threshold"] / every)) < 1e-6]


def format_report(report: dict[str, Any]) -> str:
    """The report as plain text (what `qembed review --report` prints)."""
    lines = [f"labels: {report['labels_file']}",
             f"sample: {report['items']} items of {report['population']} raw pairs"
             + (f" ({report['items_kept']} kept by the filter)" if report["items_kept"] is not None else "")
             + f"; {report['with_verdict']} with a human verdict, {report['ties']} ties"]  # fmt: skip
    for name, r in report["reviewers"].items():
        lines.append(f"  {name}: {r['labelled']} labelled ({r['skipped']} skipped, {r['relevant']} relevant)")
    lines.append("")
    lines.append("relevance accuracy (human verdict), with Wilson 95% intervals:")
    rows = [("overall" if group == "overall" else f"{group}={value}", raw, filtered)
            for group, value, raw, filtered in _rows(report)]  # fmt: skip
    width = max(30, *(len(label) + 2 for label, _, _ in rows))
    lines.append(f"  {'':<{width}}{'raw':<36}filtered")
    for label, raw, filtered in rows:
        lines.append(f"  {label:<{width}}{raw.text():<36}{filtered.text() if filtered else 'no filtered input'}")
    rows = threshold_rows(report)
    if rows:
        judges = list(report["llm_judges"])
        lines += ["", "by cosine threshold (pairs with cosine above it):",
                  f"  {'threshold':>9}  {'kept':>6}  {'accuracy':<34}" + "".join(f"{name:<34}" for name in judges)]  # fmt: skip
        for p in rows:
            cells = [Proportion(p["relevant"], p["n"]).text()]
            cells += [_prop(p["judges"][name]).text() for name in judges]
            lines.append(f"  {p['threshold']:>9.2f}  {100 * p['kept_share']:>5.1f}%  " + "".join(f"{c:<34}" for c in cells))
        lines[-len(rows) - 1 :] = [line.rstrip() for line in lines[-len(rows) - 1 :]]
    elif report["items"]:
        lines += ["", f"no threshold curve: {report['items_scored']} of {report['items']} sampled items have a cosine "
                      "(create the labels file with --model to score them all)"]
    if report["agreement"]:
        lines += ["", "agreement between reviewers (items both labelled, skips left out):"]
        for a in report["agreement"]:
            lines.append(f"  {a['a']} / {a['b']}: n={a['n']}, agreement {_share(a['agreement'])}, "
                         f"kappa {_kappa(a['kappa'])}")
    for name, j in report["llm_judges"].items():
        v = j["vs_humans"]
        lines += ["", f"LLM judge {name}: vs the human verdict n={v['n']}, agreement {_share(v['agreement'])}, "
                      f"kappa {_kappa(v['kappa'])}",
                  f"  its accuracy: raw {_prop(j['raw']).text()}"
                  + (f", filtered {_prop(j['filtered']).text()}" if j["filtered"] else "")]  # fmt: skip
    return "\n".join(lines)


def threshold_plot(report: dict[str, Any]) -> bytes | None:
    """PNG: accuracy (with its Wilson band) and kept share against the cosine threshold; None without
    cosines."""
    points = report["threshold"]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [p["threshold"] for p in points]
    with_labels = [p for p in points if p["n"]]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    ax.plot(x, [p["kept_share"] for p in points], color="#777777", label="kept share of the sample")
    if with_labels:
        ax.plot([p["threshold"] for p in with_labels], [p["accuracy"] for p in with_labels], color="#1f77b4",
                label="relevance accuracy (human)")  # fmt: skip
        ax.fill_between([p["threshold"] for p in with_labels], [p["ci95"][0] for p in with_labels],
                        [p["ci95"][1] for p in with_labels], color="#1f77b4", alpha=0.15, label="Wilson 95% interval")  # fmt: skip
    for name in report["llm_judges"]:
        judged = [p for p in points if p["judges"][name]["n"]]
        ax.plot([p["threshold"] for p in judged], [p["judges"][name]["accuracy"] for p in judged], linestyle="--",
                label=f"relevance accuracy ({name})")  # fmt: skip
    ax.set_xlabel("cosine threshold (keep pairs above it)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(f"{report['with_verdict']} items with a human verdict", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def report_html(report: dict[str, Any], plot_png: bytes | None) -> str:
    """The `/report` page: self-contained HTML (the plot inline), no external assets."""
    import base64

    e = html.escape

    def cell(p: Proportion | None) -> str:
        return "<td>no filtered input</td>" if p is None else f"<td>{e(p.text())}</td>"

    all_rows = _rows(report)
    overall = all_rows[0]
    rows = "".join(f"<tr><th>{e(g)}</th><td>{e(v)}</td>{cell(raw)}{cell(flt)}</tr>" for g, v, raw, flt in all_rows[1:])
    people = "".join(f"<tr><td>{e(n)}</td><td>{r['labelled']}</td><td>{r['skipped']}</td><td>{r['relevant']}</td></tr>"
                     for n, r in report["reviewers"].items())  # fmt: skip
    agreement = "".join(
        f"<tr><td>{e(a['a'])}</td><td>{e(a['b'])}</td><td>{a['n']}</td>"
        f"<td>{_share(a['agreement'])}</td><td>{_kappa(a['kappa'])}</td></tr>"
        for a in report["agreement"]
    )
    judges = "".join(
        f"<tr><td>{e(n)}</td><td>{j['vs_humans']['n']}</td>"
        f"<td>{_share(j['vs_humans']['agreement'])}</td>"
        f"<td>{_kappa(j['vs_humans']['kappa'])}</td><td>{e(_prop(j['raw']).text())}</td>"
        f"<td>{e(_prop(j['filtered']).text()) if j['filtered'] else '–'}</td></tr>"
        for n, j in report["llm_judges"].items()
    )
    judge_names = list(report["llm_judges"])
    thresholds = "".join(f"<tr><td>{p['threshold']:.2f}</td><td>{100 * p['kept_share']:.1f}%</td>"
                         f"<td>{e(Proportion(p['relevant'], p['n']).text())}</td>"
                         + "".join(f"<td>{e(_prop(p['judges'][n]).text())}</td>" for n in judge_names) + "</tr>"
                         for p in threshold_rows(report))  # fmt: skip
    judge_heads = "".join(f"<th>{e(n)}</th>" for n in judge_names)
    plot = (f'<img alt="accuracy and kept share by cosine threshold" src="data:image/png;base64,'
            f'{base64.b64encode(plot_png).decode()}">' if plot_png else
            f"<p>No threshold curve: {report['items_scored']} of {report['items']} sampled items have a cosine "
            "(create the labels file with <code>--model</code> to score them all).</p>")  # fmt: skip
    kept = f", {report['items_kept']} kept by the filter" if report["items_kept"] is not None else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qembed review – report</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 980px; color: #222; padding: 0 16px; }}
table {{ border-collapse: collapse; margin: 8px 0 20px; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 3px 10px; text-align: left; }}
thead th {{ background: #f3f3f3; }} h2 {{ font-size: 17px; margin-top: 26px; }} img {{ max-width: 100%; }}
.note {{ color: #555; }}
</style></head><body>
<p><a href="/">← back to labelling</a></p>
<h1>Relevance of the synthetic pairs</h1>
<p class="note">{report['items']} sampled items of {report['population']} raw pairs{kept}; {report['with_verdict']}
with a human verdict (majority of human labels), {report['ties']} ties. Intervals: Wilson 95&nbsp;%.</p>
<h2>Relevance accuracy</h2>
<table><thead><tr><th></th><th>raw</th><th>filtered</th></tr></thead>
<tbody><tr><th>overall</th>{cell(overall[2])}{cell(overall[3])}</tr></tbody></table>
<h2>Accuracy and kept share against the cosine threshold</h2>
{plot}
<table><thead><tr><th>threshold</th><th>kept</th><th>accuracy above it (human)</th>{judge_heads}</tr></thead>
<tbody>{thresholds}</tbody></table>
<h2>By task, question type, difficulty and language</h2>
<table><thead><tr><th></th><th></th><th>raw</th><th>filtered</th></tr></thead><tbody>{rows}</tbody></table>
<h2>Reviewers</h2>
<table><thead><tr><th>reviewer</th><th>labelled</th><th>skipped</th><th>relevant</th></tr></thead><tbody>{people}</tbody></table>
<h2>Agreement (Cohen's κ)</h2>
<table><thead><tr><th>reviewer</th><th>reviewer</th><th>items</th><th>agreement</th><th>κ</th></tr></thead>
<tbody>{agreement}</tbody></table>
<h2>LLM judges against the human verdict</h2>
<table><thead><tr><th>judge</th><th>items</th><th>agreement</th><th>κ</th><th>its raw accuracy</th><th>its filtered accuracy</th></tr></thead>
<tbody>{judges}</tbody></table>
</body></html>
"""
