"""The `instruction` stage of `qembed adapt` and its use in `final` and the report.

The stage (after `baseline`) lists the candidate query instructions once (`gather_candidates`: the model's
default, none, the closest mteb task's, `instruction.candidates`, and with `data.llm_base_url` some the LLM
writes from train pairs) and scores them on dev with the base model. `final` repeats the dev search for each
fine-tuned / merged model (`FinalInstructions`) and evaluates each variant with its own choice, beside the
`eval.instruction_modes`; the report shows the dev scores, and `best/`'s prompts get the recommended one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from qembed.errors import QembedError
from qembed.eval.instruction_search import (
    Candidate,
    SearchResult,
    describe,
    gather_candidates,
)

CANDIDATES = "candidates.json"
BASE = "base.json"
FINAL = "instructions.json"


def check_instruction_config(cfg: dict) -> None:
    """One-line errors for the `instruction` section."""
    section = cfg["instruction"]
    if section["llm_count"] < 0:
        raise QembedError(f"instruction.llm_count must be 0 or more, got {section['llm_count']}")
    if not all(isinstance(text, str) and text.strip() for text in section["candidates"]):
        raise QembedError("instruction.candidates (--instruction) must be non-empty texts")


def run_instruction_stage(cfg: dict, beir: Path, folder: Path, search: Callable[..., SearchResult]) -> None:
    """Write `candidates.json` and the base model's dev search `base.json` into the stage folder."""
    data, section = cfg["data"], cfg["instruction"]
    llm = None
    if data["llm_base_url"] and data["llm_model"] and section["llm_count"] > 0:
        from qembed.synth.llm import OpenAIChat

        llm = OpenAIChat(data["llm_base_url"], data["llm_model"], api_key_env=data["api_key_env"], concurrency=1)
    candidates = gather_candidates(beir, given=section["candidates"], llm=llm, llm_count=section["llm_count"],
                                   seed=cfg["seed"])  # fmt: skip
    (folder / CANDIDATES).write_text(json.dumps([c.to_dict() for c in candidates], indent=2, ensure_ascii=False))
    result = search(cfg["model"], candidates)
    (folder / BASE).write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    print("\n".join(result.lines()))


def load_candidates(out: Path) -> list[Candidate]:
    return [Candidate.from_dict(c) for c in json.loads((out / "instruction" / CANDIDATES).read_text())]


class FinalInstructions:
    """Each evaluated model's chosen query format (the base's from the stage, the others searched on dev
    here, once per model), kept in `final/instructions.json`."""

    def __init__(self, cfg: dict, out: Path, folder: Path, search: Callable[..., SearchResult]) -> None:
        self.base, self.folder, self.search = cfg["model"], folder, search
        self.candidates = load_candidates(out)
        base = SearchResult.from_dict(json.loads((out / "instruction" / BASE).read_text()))
        self.results: dict[str, SearchResult] = {self.base: base}
        self.variants: dict[str, str] = {}

    def chosen(self, variant: str, model: str):
        """The chosen (resolved) query format of `model`, evaluated as `variant`."""
        if model not in self.results:
            self.results[model] = self.search(model, self.candidates)
            print("\n".join(self.results[model].lines()))
        self.variants.setdefault(variant, model)
        payload = {name: self.results[m].to_dict() for name, m in self.variants.items()}
        (self.folder / FINAL).write_text(json.dumps(payload, indent=2, ensure_ascii=False))
        return self.results[model].query_format


def instruction_table(out: Path, metric: str) -> list[str]:
    """The report's section: each candidate's dev metric per evaluated model, the chosen one in bold."""
    path = out / "final" / FINAL
    if not path.is_file():
        return []
    searches = {name: SearchResult.from_dict(r) for name, r in json.loads(path.read_text()).items()}
    candidates = load_candidates(out)
    names = list(searches)
    lines = [f"## Query instruction (dev {metric})", "",
             "Candidates scored on the dev split; each model is evaluated with its best (bold). Candidates that "
             "encode like an earlier one are left out.", "",
             "| candidate | instruction | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]  # fmt: skip
    for candidate in candidates:
        cells, text = [], None
        for name in names:
            result = searches[name]
            index = next((i for i, r in enumerate(result.rows) if r["source"] == candidate.source
                          and (candidate.instruction is None or r["instruction"] == candidate.instruction)), None)  # fmt: skip
            if index is None:
                cells.append("–")
                continue
            text = text or describe(result.rows[index])
            value = f"{100 * result.rows[index]['score']:.2f}"
            cells.append(f"**{value}**" if index == result.chosen else value)
        if any(c != "–" for c in cells):
            lines.append(f"| {candidate.source} | {text} | " + " | ".join(cells) + " |")
    return [*lines, ""]
