"""Task kinds and the task mix: each document gets its task by a seeded draw, a pure function of
(seed, document id), so a resumed or `--limit`-ed run assigns every document the same task."""

from __future__ import annotations

import random

from qembed.errors import QembedError

TASKS = ("retrieval", "sts", "classification", "bitext")
#: The shares of the Qwen3-Embedding synthetic data (the documented example of `--task-mix`).
QWEN3_TASK_MIX = {"retrieval": 0.45, "sts": 0.25, "classification": 0.2, "bitext": 0.1}


def parse_task_mix(text: str) -> dict[str, float]:
    """`retrieval=0.45,sts=0.25,classification=0.2,bitext=0.1` → shares by task, in `TASKS` order. Shares
    must be non-negative and sum to 1 (within 0.01, then rescaled exactly)."""
    shares: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in TASKS:
            raise QembedError(f"--task-mix: expected TASK=SHARE with TASK one of {', '.join(TASKS)}, got {part!r}")
        if name in shares:
            raise QembedError(f"--task-mix names {name} twice")
        try:
            share = float(value)
        except ValueError:
            raise QembedError(f"--task-mix: {name}={value!r} is not a number") from None
        if not 0 <= share <= 1:
            raise QembedError(f"--task-mix: share {share:g} of {name} is not between 0 and 1")
        shares[name] = share
    total = sum(shares.values())
    if abs(total - 1) > 0.01:
        raise QembedError(f"--task-mix shares sum to {total:g}, not 1")
    scale = 1.0 if abs(total - 1) < 1e-9 else total  # rescale only a visible difference, not rounding
    return {task: shares[task] / scale for task in TASKS if shares.get(task)}


def assign_task(doc_id: str, mix: dict[str, float], seed: int = 0) -> str:
    """The task of document `doc_id` under `mix`: a uniform draw seeded by (seed, doc_id) placed on the
    cumulative shares (in `TASKS` order), independent of every other document."""
    draw = random.Random(f"{seed}|task-mix|{doc_id}").random()
    cumulative = 0.0
    last = None
    for task in TASKS:
        share = mix.get(task, 0.0)
        if share <= 0:
            continue
        cumulative += share
        last = task
        if draw < cumulative:
            return task
    if last is None:
        raise QembedError("the task mix is empty")
    return last
