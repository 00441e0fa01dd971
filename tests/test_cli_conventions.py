"""One set of CLI conventions for every verb: help with real defaults, one list syntax, one meaning per flag
name, the shared model/output/progress options, --output never equal to an input, and progress lines off a
terminal printed the same way by every long-running verb."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from qembed.cli import build_parser, main
from qembed.cli.common import ListAction
from qembed.data.beir import write_beir

MODEL_VERBS = {"embed", "rerank", "eval", "mine", "filter", "synth"}  # load a model and encode: --device/--dtype/--batch-tokens


def _leaves(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {prefix: parser}
    found = {}
    for name, sub in subs[0].choices.items():
        found.update(_leaves(sub, f"{prefix} {name}".strip()))
    return found


LEAVES = _leaves(build_parser())


def _options(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("verb", sorted(LEAVES))
def test_every_option_has_a_help_line_with_its_real_default(verb):
    parser = LEAVES[verb]
    text = parser.format_help()
    assert "(default: None)" not in text and "default: False" not in text
    formatter = parser._get_formatter()
    for action in _options(parser):
        shown = " ".join(formatter._format_action(action).split())  # the option's lines in --help, unwrapped
        assert action.help and action.help.strip(), f"{verb} {action.option_strings[0]} has no help"
        assert shown.count("default:") <= 1, f"{verb} {action.option_strings[0]}: {shown}"
        if action.default not in (None, False, [], ()) and not action.required:
            value = action.default if not isinstance(action.default, (list, tuple)) else action.default[0]
            value = f"{value:g}" if isinstance(value, float) else str(value)
            assert f"default: {value}" in shown, f"{verb} {action.option_strings[0]}: {shown}"
        if action.metavar is None and action.nargs != 0 and action.dest.upper() != action.option_strings[-1][2:].upper().replace("-", "_"):
            pytest.fail(f"{verb} {action.option_strings[-1]} is labelled {action.dest.upper()}")


def test_a_flag_name_means_the_same_in_every_verb():
    seen: dict[str, tuple] = {}
    for verb, parser in LEAVES.items():
        for action in _options(parser):
            for flag in action.option_strings:
                # one dest, and a switch everywhere or a value of one type everywhere (a list of files = files)
                kind = (action.dest, action.nargs == 0, getattr(action.type, "__name__", "str"))
                assert seen.setdefault(flag, (verb, kind))[1] == kind, f"{flag}: {verb} vs {seen[flag][0]}"
    defaults = {LEAVES[v]._option_string_actions["--num-negatives"].default for v in ("mine", "train embedder", "train reranker")}
    assert defaults == {3}


def test_lists_are_comma_separated_or_repeated_everywhere():
    for verb, parser in LEAVES.items():
        for action in _options(parser):
            if action.option_strings in (["--instruction"], ["--set"], ["--query"]):
                continue  # free text (may contain commas; adapt's --set KEY=[0.5,1.0]): repeat the flag
            assert action.nargs not in ("+", "*") and not isinstance(action, argparse._AppendAction), \
                f"{verb} {action.option_strings[0]} is a list without the common syntax"  # fmt: skip
    parse = build_parser().parse_args
    one = parse(["eval", "--model", "a,b", "--model", "c", "--dataset", "d", "--output", "o", "--k", "1,5", "--k", "10"])
    assert (one.model, one.k) == (["a", "b", "c"], [1, 5, 10])
    assert parse(["eval", "--model", "a", "--dataset", "d", "--output", "o"]).k == [1, 5, 10, 30, 100]
    assert parse(["merge", "--models", "a,b", "--weights", "0.3", "--weights", "0.7", "--output", "o"]).weights == [0.3, 0.7]
    assert parse(["train", "embedder", "--model", "m", "--data", "x.jsonl", "--data", "y.jsonl,z.jsonl", "--output", "o",
                  "--mrl-dims", "32,64"]).data == ["x.jsonl", "y.jsonl", "z.jsonl"]  # fmt: skip
    assert parse(["data", "qa-to-beir", "--input", "a.json,b.json", "--question-field", "q", "--answer-field", "a",
                  "--output", "o"]).input == ["a.json", "b.json"]  # fmt: skip
    synth = ["synth", "--corpus", "c", "--llm-base-url", "u", "--output", "o"]
    assert parse([*synth, "--languages", "zh", "--languages", "en"]).languages == ["zh", "en"]
    assert parse(synth).languages == ["en"]


def test_shared_groups_are_on_every_verb():
    for verb, parser in LEAVES.items():
        flags = parser._option_string_actions
        if verb != "serve":  # a server logs requests; it has no long step to report
            assert {"--progress", "--no-progress"} <= set(flags), verb
        if verb in MODEL_VERBS:
            assert {"--device", "--dtype", "--batch-tokens"} <= set(flags), verb
            assert flags["--batch-tokens"].default is None  # auto: the model's own budget
    parse = build_parser().parse_args
    assert parse(["filter", "--model", "m", "--input", "i", "--output", "o", "--batch-tokens", "4096"]).batch_tokens == 4096
    assert parse(["mine", "--model", "m", "--input", "i", "--output", "o", "--batch-tokens", "auto"]).batch_tokens is None
    assert isinstance(LEAVES["mine"]._option_string_actions["--chunk-size"], argparse._StoreAction)
    assert "--chunk-size" not in LEAVES["train reranker"]._option_string_actions
    assert isinstance(LEAVES["eval"]._option_string_actions["--model"], ListAction)


@pytest.mark.parametrize("verb", ["embed", "mine", "filter", "merge", "train", "data"])
def test_output_equal_to_an_input_is_a_one_line_error(verb, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"query": "q", "pos": ["p"]}\n')
    args = {
        "embed": ["embed", "--model", "m", "--input", str(src), "--output", str(src)],
        "mine": ["mine", "--model", "m", "--input", str(src), "--output", str(src)],
        "filter": ["filter", "--model", "m", "--input", str(src), "--output", str(src)],
        "merge": ["merge", "--models", f"{tmp_path},{tmp_path / 'b'}", "--output", str(tmp_path)],
        "train": ["train", "embedder", "--model", "m", "--data", str(src), "--output", str(src)],
        "data": ["data", "qa-to-beir", "--input", str(src), "--question-field", "q", "--answer-field", "a",
                 "--output", str(src)],
    }[verb]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is also --" in err, err
    assert src.read_text() == '{"query": "q", "pos": ["p"]}\n'


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    corpus = {f"d{i}": {"title": "", "text": f"note {i} about rice blast and maize rust"} for i in range(12)}
    queries = {f"q{i}": f"question {i} on rice" for i in range(4)}
    path = tmp_path_factory.mktemp("beir")
    write_beir(path, corpus, queries, {"test": {f"q{i}": {f"d{i}": 1} for i in range(4)},
                                       "train": {f"q{i}": {f"d{i}": 1} for i in range(4)}})  # fmt: skip
    return path


LINE = re.compile(r"^qembed: (?P<stage>[^:]+(?:: \w+)?): (?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+) \(\d+%\), "
                  r"[\d.e+]+ (?P=unit)/s, elapsed \w+")  # fmt: skip


def _progress_lines(err: str) -> dict[str, tuple[int, int]]:
    """Last done/total per stage from plain progress lines; every `qembed: ` line must match the format."""
    last = {}
    for line in err.splitlines():
        if line.startswith("qembed: "):
            match = LINE.match(line)
            assert match, line
            last[match["stage"]] = (int(match["done"]), int(match["total"]))
    return last


def test_off_a_terminal_every_long_step_prints_plain_progress_lines(beir, tiny_embedder_path, tmp_path, capsys,
                                                                   monkeypatch, one_torch_thread):  # fmt: skip
    monkeypatch.setenv("QEMBED_PROGRESS_INTERVAL", "0")  # a line per update instead of one per 30 s
    model = str(tiny_embedder_path)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"question {i} on rice", "pos": [f"note {i} about rice blast"],
                                         "neg": [f"note {i + 5} about maize"]}) + "\n" for i in range(6)))  # fmt: skip
    runs = {
        "eval": ["eval", "--model", model, "--dataset", str(beir), "--k", "1,5", "--cache-dir", str(tmp_path / "c"),
                 "--output", str(tmp_path / "eval")],
        "mine": ["mine", "--model", model, "--input", str(beir), "--range-min", "0", "--range-max", "5",
                 "--cache-dir", str(tmp_path / "c"), "--output", str(tmp_path / "mined.jsonl")],
        "train": ["train", "embedder", "--model", model, "--data", str(pairs), "--full", "--batch-size", "3",
                  "--save-steps", "0", "--output", str(tmp_path / "trained")],
    }  # fmt: skip
    expected = {"eval": {"tiny-qwen3-embedding0: corpus": (12, 12), "tiny-qwen3-embedding0: queries": (4, 4), "search": (4, 4)},
                "mine": {"corpus": (12, 12), "mining": (4, 4)}, "train": {"train": (2, 2)}}  # fmt: skip
    for verb, args in runs.items():
        assert main(args) == 0, verb
        stages = _progress_lines(capsys.readouterr().err)
        assert stages == expected[verb], (verb, stages)
    assert main([*runs["eval"], "--no-progress"]) == 0
    assert "qembed: " not in capsys.readouterr().err



def test_milvus_lite_run_logs_no_server_traceback(beir, tiny_embedder_path, tmp_path, caplog, capsys):
    args = ["eval", "--model", str(tiny_embedder_path), "--dataset", str(beir), "--cache-dir", str(tmp_path / "c"),
            "--index", f"milvus:{tmp_path / 'lite.db'}", "--output", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 0
    assert "ndcg@10" in capsys.readouterr().out
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not errors, errors  # e.g. grpc's "Exception calling application: Method not implemented!"


def test_usage_errors_are_one_line_exit_2(capsys):
    assert main(["eval", "--model", "m", "--dataset", "d", "--output", "o", "--k", "5,ten"]) == 2
    assert main(["mine", "--model", "m", "--input", "i", "--output", "o", "--batch-tokens", "0"]) == 2
    assert main(["embed", "--no-such-flag"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all("Traceback" not in x and "--help)" in x for x in lines)
    assert lines[0] == "qembed eval: error: --k must be comma-separated integers, got '5,ten' (see qembed eval --help)"


def test_make_demo_installs_once(tmp_path):
    """`make demo` installs when nothing is installed yet or pyproject.toml changed, then only runs the demo
    (dry runs: `make -n` prints the commands without running them)."""
    root = Path(__file__).resolve().parent.parent
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(root / name, tmp_path / name)

    def dry_run() -> str:
        return subprocess.run(["make", "-n", "demo"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout

    assert "pip install -e" in dry_run()  # first run: installs
    (tmp_path / ".make").mkdir()
    (tmp_path / ".make" / "install.stamp").touch()
    second = dry_run()
    assert "pip install" not in second and "-m qembed demo" in second
    os.utime(tmp_path / "pyproject.toml", (time.time() + 10, time.time() + 10))
    assert "pip install -e" in dry_run()  # dependencies changed: installs again
