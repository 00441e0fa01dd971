"""The LLM judge of `qembed review`: labels the sample's items with an LLM into the same labels file, as
reviewer `llm:MODEL`; items it has already labelled are skipped, so a stopped run resumes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qembed.data.jsonl import JsonlAppender
from qembed.progress import progress_bar
from qembed.review.labels import LLM_PREFIX, _now, new_event_id, read_review
from qembed.synth import prompts
from qembed.synth.generate import Rejected, ask
from qembed.synth.llm import ChatLLM
from qembed.synth.parsing import ParseError, extract_json, strip_think

_YES = {"true", "yes", "relevant", "1"}
_NO = {"false", "no", "not_relevant", "irrelevant", "0"}


def parse_judgement(raw: str) -> bool:
    """`{"relevant": true|false}` (or yes/no) → bool; `ParseError` otherwise."""
    try:
        value: Any = extract_json(raw).get("relevant")
    except ParseError:
        value = strip_think(raw).strip().strip(".").lower()
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _YES:
        return True
    if text in _NO:
        return False
    raise ParseError('expected {"relevant": true} or {"relevant": false}')


@dataclass
class JudgeStats:
    reviewer: str
    labelled: int = 0
    already: int = 0  # labelled by this judge in an earlier run
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def judge_sample(labels: str | Path, llm: ChatLLM, *, max_repairs: int = 1, max_tokens: int = 64,
                 show_progress: bool | None = None) -> JudgeStats:  # fmt: skip
    """Label every item of the labels file not yet labelled by `llm:{llm.model_name}`; each label is
    appended (flushed) as it comes. Closes `llm` at the end."""
    review = read_review(labels)
    reviewer = LLM_PREFIX + llm.model_name
    done = review.labels().get(reviewer, {})
    todo = [item for item in review.items if item["id"] not in done]
    stats = JudgeStats(reviewer, already=len(review.items) - len(todo))
    asyncio.run(_judge(review.path, todo, llm, reviewer, stats, max_repairs, max_tokens, show_progress))
    return stats


async def _judge(path, todo, llm, reviewer, stats, max_repairs, max_tokens, show_progress) -> None:
    bar = progress_bar(total=len(todo), unit="item", desc="judge", enabled=show_progress)

    async def one(item: dict[str, Any], out: JsonlAppender) -> None:
        messages = prompts.judge_messages(item["query"], item["passage"], item.get("task"), item.get("instruction"))
        try:
            relevant = await ask(llm, messages, parse_judgement, prompts.JUDGE_EXAMPLE, "judge",
                                 max_repairs=max_repairs, max_tokens=max_tokens, temperature=0.0)  # fmt: skip
        except Rejected as exc:
            stats.failed += 1
            key = exc.reason.split(":")[0]
            stats.reasons[key] = stats.reasons.get(key, 0) + 1
        else:
            out.write({"type": "label", "event": new_event_id(), "item": item["id"], "reviewer": reviewer,
                       "label": "relevant" if relevant else "not_relevant", "time": _now(),
                       "prompt_version": prompts.JUDGE_PROMPT_VERSION})  # fmt: skip
            stats.labelled += 1
        bar.update(1)

    try:
        with JsonlAppender(path) as out:
            await asyncio.gather(*(one(item, out) for item in todo))
    finally:
        bar.close()
        await llm.aclose()
