"""Domain balance for `qembed filter --balance`: downsample records so that a field's values have equal
shares, or given shares (`meta.domain=code:0.15`: code is 15 %, the other values share the rest in their
own proportions). Which records stay is a seeded draw; kept records keep their input order."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from qembed.errors import QembedError

MISSING = "(missing)"  # the group of records without the field


@dataclass(frozen=True)
class BalanceSpec:
    field: str  # a dotted path from the record root, e.g. meta.domain
    shares: dict[str, float] | None = None  # None: equal shares of every value

    def describe(self) -> str:
        if self.shares is None:
            return f"{self.field} (equal shares)"
        return f"{self.field}=" + ",".join(f"{value}:{share:g}" for value, share in self.shares.items())


def parse_balance(text: str) -> BalanceSpec:
    """`FIELD` (equal shares) or `FIELD=value:share,...` (shares between 0 and 1, summing to at most 1)."""
    field, sep, rest = text.partition("=")
    field = field.strip()
    if not field or any(not part for part in field.split(".")):
        raise QembedError(f"--balance: expected FIELD or FIELD=value:share,..., got {text!r}")
    if not sep:
        return BalanceSpec(field)
    shares: dict[str, float] = {}
    for part in (p.strip() for p in rest.split(",")):
        if not part:
            continue
        value, colon, share = part.rpartition(":")
        try:
            number = float(share)
        except ValueError:
            number = -1.0
        if not colon or not value.strip() or not 0 < number <= 1:
            raise QembedError(f"--balance: expected value:share with a share in (0, 1], got {part!r}")
        shares[value.strip()] = number
    if not shares:
        raise QembedError(f"--balance {text!r} gives no shares")
    if sum(shares.values()) > 1 + 1e-9:
        raise QembedError(f"--balance shares sum to {sum(shares.values()):g}, more than 1")
    return BalanceSpec(field, shares)


def field_value(record: dict[str, Any], path: str) -> str:
    """The value at a dotted path as text (`MISSING` when absent or null)."""
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            return MISSING
        value = value[part]
    return str(value)


def check_balance(records: list[dict[str, Any]], spec: BalanceSpec) -> None:
    """One-line errors, before any long work, when no record has the field or a named value."""
    values = {field_value(r, spec.field) for r in records}
    if values <= {MISSING}:
        raise QembedError(f"--balance: no record has {spec.field}")
    for value in spec.shares or {}:
        if value not in values:
            raise QembedError(f"--balance: no record has {spec.field} = {value}")


def balance_targets(counts: dict[str, int], spec: BalanceSpec) -> dict[str, int]:
    """How many records of each value to keep: the largest set that meets the shares."""
    if spec.shares is None:
        smallest = min(counts.values())
        return {value: smallest for value in counts}
    named = {v: s for v, s in spec.shares.items()}
    rest_share = 1.0 - sum(named.values())
    rest_count = sum(c for v, c in counts.items() if v not in named)
    limits = [counts.get(v, 0) / s for v, s in named.items()]
    if rest_share > 1e-9:
        limits.append(rest_count / rest_share)
    total = int(min(limits) + 1e-9)
    targets = {v: min(counts.get(v, 0), round(total * s)) for v, s in named.items()}
    others = {v: c for v, c in counts.items() if v not in named}
    rest_total = max(0, min(rest_count, total - sum(targets.values()))) if rest_share > 1e-9 else 0
    # the other values keep their own proportions (largest remainders get the leftover units)
    if others and rest_total:
        exact = {v: rest_total * c / rest_count for v, c in others.items()}
        floors = {v: int(x) for v, x in exact.items()}
        left = rest_total - sum(floors.values())
        for v in sorted(others, key=lambda v: floors[v] - exact[v])[:left]:
            floors[v] += 1
        targets.update(floors)
    else:
        targets.update({v: 0 for v in others})
    return targets


def balance_records(records: list[dict[str, Any]], spec: BalanceSpec, *, seed: int = 0) -> list[dict[str, Any]]:
    """The records kept so that `spec.field`'s values have the asked shares (see `balance_targets`)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        groups[field_value(record, spec.field)].append(i)
    if not groups:
        return []
    for value in spec.shares or {}:
        if value not in groups:
            raise QembedError(f"--balance: no record left with {spec.field} = {value} to balance against")
    if spec.shares is not None and sum(spec.shares.values()) < 1 - 1e-9 and set(groups) <= set(spec.shares):
        raise QembedError(f"--balance shares sum to {sum(spec.shares.values()):g} but no record left has another "
                          f"value of {spec.field}")  # fmt: skip
    targets = balance_targets({v: len(ix) for v, ix in groups.items()}, spec)
    keep: set[int] = set()
    for value, indices in groups.items():
        rng = random.Random(f"{seed}|balance|{spec.field}|{value}")
        keep.update(rng.sample(indices, targets.get(value, 0)))
    return [r for i, r in enumerate(records) if i in keep]
