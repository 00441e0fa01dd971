"""Resumable stages for recipes: each stage's fingerprint (its configuration, its upstream stages'
fingerprints and its external inputs) is kept in `OUTPUT/state.json`; a stage is skipped when it finished
with the same fingerprint, resumed (its folder kept) when it started with the same one and did not finish,
and rerun from an empty folder otherwise.

Files: `OUTPUT` is claimed as `qembed adapt`'s own (`qembed.files.claim_output_dir`: new, empty, or holding a
`state.json`); each stage folder carries the owner marker, and a stage only ever removes a folder whose marker
proves qembed wrote it. Time: each stage's wall and CPU seconds are saved every `HEARTBEAT` seconds while it
runs, so a killed attempt's time is counted when the stage resumes."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qembed.errors import QembedError
from qembed.files import (
    atomic_write_json,
    check_output_dir,
    claim_output_dir,
    is_owned,
    mark_owned,
    remove_owned_dir,
)

STATE_FILE = "state.json"
VERB = "adapt"
HEARTBEAT = 1.0  # seconds between saves of a running stage's time


@dataclass
class Stage:
    """One step: `run(folder)` does the work in `OUTPUT/<name>/`; `config` is what it depends on besides
    its upstream stages `after`; `inputs` are external files/folders whose content it reads; `on_resume(folder)`
    says what resuming will really do (e.g. "no checkpoint yet: training restarts"), None for "interrupted"."""

    name: str
    run: Callable[[Path], Any]
    config: dict
    after: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    on_resume: Callable[[Path], str | None] | None = None


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def input_signature(path: str) -> str:
    """Content signature of a file (sha1) or a folder's files (names, sizes, mtimes; the small ones' bytes)."""
    p = Path(path)
    digest = hashlib.sha1(str(path).encode())
    if p.is_file():
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    elif p.is_dir():
        for item in sorted(p.rglob("*")):
            if item.is_file():
                stat = item.stat()
                digest.update(f"{item.relative_to(p)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Pipeline:
    """Stages in order, their state on disk, the plan and the run."""

    def __init__(self, output: str | Path, stages: list[Stage], *, also_writes: tuple[str, ...] = ()) -> None:
        """`also_writes`: folders of `output` that stages replace besides their own (e.g. `best`)."""
        self.output = Path(output)
        self.stages = stages
        self.also_writes = also_writes
        self.state_path = self.output / STATE_FILE
        self.state: dict = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.fingerprints: dict[str, str] = {}
        self._lock = threading.Lock()
        for stage in stages:
            upstream = {name: self.fingerprints[name] for name in stage.after}
            inputs = {p: input_signature(p) for p in stage.inputs}
            self.fingerprints[stage.name] = _digest([stage.config, upstream, inputs])

    def plan(self) -> list[tuple[str, str, str]]:
        """(stage, action, reason): action is `done`, `run`, `resume` or `rerun`."""
        rows, rerun = [], set()
        for stage in self.stages:
            old = self.state.get(stage.name)
            if old is None:
                action, reason = "run", "not run yet"
            elif old["fingerprint"] == self.fingerprints[stage.name]:
                action, reason = ("done", "") if old["status"] == "done" else ("resume", "interrupted")
                note = stage.on_resume(self.output / stage.name) if action == "resume" and stage.on_resume else None
                reason = f"{reason}; {note}" if note else reason
            else:
                action, reason = "rerun", self._why(stage, old, rerun)
            if action != "done":
                rerun.add(stage.name)
            rows.append((stage.name, action, reason))
        return rows

    def _why(self, stage: Stage, old: dict, rerun: set) -> str:
        before, now = _flatten(old.get("config", {})), _flatten(stage.config)
        changed = [f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
                   if before.get(k) != now.get(k)]  # fmt: skip
        if changed:
            return "changed: " + "; ".join(changed)
        upstream = [name for name in stage.after if name in rerun]
        if upstream:
            return "input changed: " + ", ".join(upstream)
        return "inputs changed: " + ", ".join(stage.inputs) if stage.inputs else "state changed"

    def format_plan(self) -> str:
        words = {"done": "done", "run": "will run", "resume": "will resume", "rerun": "will rerun"}
        lines = [f"plan ({self.output}):"]
        for name, action, reason in self.plan():
            lines.append(f"  {name:<10} {words[action]}" + (f" ({reason})" if reason else ""))
        return "\n".join(lines)

    def run(self, log: Callable[[str], None] = print) -> None:
        """Run every stage that is not done; a failing stage raises `QembedError` naming it."""
        self.check()
        claim_output_dir(self.output, VERB, also_ours=(STATE_FILE,))
        for (name, action, _), stage in zip(self.plan(), self.stages):
            if action == "done":
                continue
            folder = self.output / name
            if action in ("run", "rerun"):
                remove_owned_dir(folder, VERB)
            mark_owned(folder, VERB)
            old = self.state.get(name, {}) if action == "resume" else {}
            previous = (old.get("seconds", 0.0), old.get("cpu_seconds", 0.0))
            self._save(name, "started", stage.config, *previous)
            log(f"== {name} ==")
            began, cpu = time.perf_counter(), time.process_time()

            def spent(previous=previous, began=began, cpu=cpu) -> tuple[float, float]:
                return previous[0] + time.perf_counter() - began, previous[1] + time.process_time() - cpu

            stop = threading.Event()
            beat = threading.Thread(target=self._heartbeat, args=(name, stage.config, spent, stop), daemon=True)
            beat.start()
            try:
                stage.run(folder)
            except QembedError as exc:
                raise QembedError(f"stage {name} failed: {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - one line naming the stage; `qembed -v` shows the traceback
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise QembedError(f"stage {name} failed: {type(exc).__name__}: {first}") from exc
            finally:
                stop.set()
                beat.join()
            self._save(name, "done", stage.config, *spent())

    def check(self) -> None:
        """One-line refusals, writing nothing: `OUTPUT` is not new, empty or a qembed run folder, or a stage
        that will run finds a folder qembed did not create (no owner marker) in its place."""
        check_output_dir(self.output, VERB, also_ours=(STATE_FILE,))
        names = [name for name, action, _ in self.plan() if action != "done"]
        for folder in (self.output / name for name in [*names, *(self.also_writes if names else ())]):
            if folder.exists() and not (folder.is_dir() and is_owned(folder, VERB)):
                raise QembedError(f"{folder} exists but qembed did not create it (no {VERB} marker): move it "
                                  "away; qembed never deletes or writes into folders it did not make")  # fmt: skip

    def _heartbeat(self, name: str, config: dict, spent: Callable[[], tuple[float, float]],
                   stop: threading.Event) -> None:  # fmt: skip
        while not stop.wait(HEARTBEAT):
            self._save(name, "started", config, *spent())

    def seconds(self) -> dict[str, dict[str, float]]:
        """Per stage: wall-clock `seconds` and `cpu_seconds` (this process, all threads) of its runs so far."""
        with self._lock:
            return {name: {"seconds": round(s.get("seconds", 0.0), 1), "cpu_seconds": round(s.get("cpu_seconds", 0.0), 1)}
                    for name, s in self.state.items()}  # fmt: skip

    def _save(self, name: str, status: str, config: dict, seconds: float, cpu_seconds: float = 0.0) -> None:
        with self._lock:
            self.state[name] = {"fingerprint": self.fingerprints[name], "status": status, "config": config,
                                "seconds": seconds, "cpu_seconds": cpu_seconds}  # fmt: skip
            atomic_write_json(self.state_path, self.state, default=str)
