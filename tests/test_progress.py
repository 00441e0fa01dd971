"""Progress output: bars on a terminal, plain lines at a bounded rate off one, forced by --progress/--no-progress."""

from __future__ import annotations

import io
import re

import pytest

from qembed import progress
from qembed.progress import PlainProgress, forced_mode, progress_bar


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress, "_clock", fake)
    return fake


def test_plain_lines_at_most_every_interval_with_stage_counts_rate_and_eta(clock, monkeypatch, capsys):
    monkeypatch.delenv("QEMBED_PROGRESS_INTERVAL", raising=False)
    bar = progress_bar(total=100, desc="corpus", unit="text")  # stderr is not a terminal under capsys
    assert isinstance(bar, PlainProgress) and bar.every == 30.0
    with bar:
        for _ in range(10):  # 10 updates of 10 texts, 10 s apart: 100 s in all -> a line every 30 s
            clock.now += 10
            bar.update(10)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4  # at 30, 60 and 90 s, and the final line
    assert lines[0] == "qembed: corpus: 30/100 text (30%), 1 text/s, elapsed 30s, ETA 1m10s"
    assert lines[-1].startswith("qembed: corpus: 100/100 text (100%), 1 text/s, elapsed 1m40s")
    assert "ETA" not in lines[-1]


def test_short_step_prints_nothing_and_interval_is_configurable(clock, monkeypatch, capsys):
    with progress_bar(total=5, desc="quick") as bar:
        bar.update(5)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("QEMBED_PROGRESS_INTERVAL", "0")
    items = list(progress_bar(["a", "b"], desc="rerank", unit="query"))
    assert items == ["a", "b"]
    err = capsys.readouterr().err
    assert "qembed: rerank: 1/2 query (50%)" in err and "qembed: rerank: 2/2 query (100%)" in err


def test_postfix_and_unknown_total(clock):
    out = io.StringIO()
    bar = PlainProgress(desc="synth", unit="q", every=0, file=out)
    clock.now += 4
    bar.set_postfix(done=3, failed=1)
    bar.update(4)
    assert out.getvalue() == "qembed: synth: 4 q, 1 q/s, elapsed 4s, done=3, failed=1\n"


def test_forced_modes(capsys):
    with forced_mode(False):
        with progress_bar(total=3, desc="off") as bar:
            bar.update(3)
    with forced_mode(True):
        with progress_bar(total=3, desc="forced") as bar:
            bar.update(3)
    err = capsys.readouterr().err
    assert "off" not in err
    assert re.search(r"forced: 100%\|.*\| 3/3", err)  # a tqdm bar even though stderr is not a terminal
    assert not isinstance(progress_bar(total=1, enabled=False), PlainProgress)
    assert progress._mode is None
