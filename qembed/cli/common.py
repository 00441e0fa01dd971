"""Conventions shared by every verb: one help format (each option shows its real default), one list syntax
(comma-separated, and the flag may be repeated), and the shared argument groups: model (`--model`,
`--device`, `--dtype`, `--batch-tokens`), output (`--output`, `--overwrite`) and progress
(`--progress/--no-progress`)."""

from __future__ import annotations

import argparse
import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qembed.errors import QembedError


class RunFailed(QembedError):
    """The input was fine but the run produced nothing (e.g. every synthesis job failed): exit status 1."""

    exit_code = 1


class HelpFormatter(argparse.HelpFormatter):
    """Appends `(default: X)` to an option's help when it has a real default and does not state it (an
    option without help shows its default alone)."""

    @staticmethod
    def _default(action: argparse.Action) -> str:
        default = action.default
        if not action.option_strings or action.required or any(default is x for x in (None, False, argparse.SUPPRESS)):
            return ""
        if default in ([], ""):
            return ""
        shown = ",".join(str(x) for x in default) if isinstance(default, (list, tuple)) else str(default)
        return f"(default: {shown.replace('%', '%%')})"

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._default(action):
            action = copy.copy(action)
            action.help = self._default(action)
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = self._default(action)
        if default and "(default" not in text and "default:" not in text:
            text += " " + default
        return text


class UsageError(QembedError):
    """A command line argparse refuses (unknown flag, bad value): one line, exit status 2."""


class QembedParser(argparse.ArgumentParser):
    """The parser class of `qembed` and every verb and sub-verb (passed down through `add_subparsers`):
    help in `HelpFormatter`, and usage errors raised as `UsageError` instead of printing the usage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        message = re.sub(r"^argument ([^:]+): must ", r"\1 must ", message)  # "--k must be ..."
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def comma_list(item: Callable[[str], Any] = str) -> Callable[[str], list]:
    """An argparse `type` splitting `a,b,c` into converted items (empty items are ignored)."""

    def parse(text: str) -> list:
        try:
            return [item(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            kind = {"int": "integers", "float": "numbers"}.get(getattr(item, "__name__", ""), "values")
            raise argparse.ArgumentTypeError(f"must be comma-separated {kind}, got {text!r}") from None

    parse.__name__ = getattr(item, "__name__", "list")  # argparse names the type in its error messages
    return parse


class ListAction(argparse.Action):
    """A list option: `--flag a,b` and `--flag a --flag b` give the same list; the first use replaces the
    default. Use with `type=comma_list(...)`."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        current = getattr(namespace, self.dest, None)
        if current is None or current is self.default:
            current = []
        setattr(namespace, self.dest, [*current, *values])


def add_list(p: argparse.ArgumentParser, *flags: str, item: Callable[[str], Any] = str, **kwargs: Any):
    """Add a list option (see `ListAction`); `metavar` defaults to `A,B,...`."""
    kwargs.setdefault("metavar", "A,B")
    return p.add_argument(*flags, action=ListAction, type=comma_list(item), **kwargs)


def batch_tokens(text: str) -> int | None:
    """`--batch-tokens`: `auto` (None: the model's own default) or a positive integer."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected auto or a positive integer, got {text!r}")
    return value


def add_model_args(p: argparse.ArgumentParser, *, help: str, multiple: bool = False, batch: bool = True) -> None:
    """`--model` (required; a list with `multiple`) and the device options (`add_device_args`)."""
    if multiple:
        add_list(p, "--model", required=True, metavar="M", help=help)
    else:
        p.add_argument("--model", required=True, metavar="M", help=help)
    add_device_args(p, batch=batch)


def add_device_args(p: argparse.ArgumentParser, *, batch: bool = True, what: str = "the model") -> None:
    """`--device`, `--dtype` and, for verbs that encode, `--batch-tokens` (None: the model's own budget)."""
    p.add_argument("--device", help=f"device for {what}: cpu, cuda, cuda:1, mps (default: cuda when available, else cpu); "
                   "embed, index build and eval also take a list, cuda:0,cuda:1,..., one replica per GPU on Ray")  # fmt: skip
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"],
                   help=f"weights of {what} (default: bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU)")  # fmt: skip
    if batch:
        p.add_argument("--batch-tokens", type=batch_tokens, default=None, metavar="N",
                       help="padded tokens per encoding batch (default: auto, the model's own budget)")  # fmt: skip


def add_quantize_arg(p: argparse.ArgumentParser) -> None:
    """`--quantize int8`: int8 inference on the CPU (embedders: `qembed.models.openvino`; rerankers:
    `qembed.models.quantize`)."""
    p.add_argument("--quantize", choices=["int8"],
                   help="int8 on the CPU: faster, approximate; embedders need the cpu-fast extra "
                        "(default: off, the model's own weights)")  # fmt: skip


def add_output_args(p: argparse.ArgumentParser, *, help: str, resumable: bool = False, metavar: str = "FILE") -> None:
    """`--output` and, for verbs that resume an existing output, `--overwrite`."""
    p.add_argument("--output", required=True, metavar=metavar, help=help)
    if resumable:
        p.add_argument("--overwrite", action="store_true",
                       help="start afresh: discard what --output already holds instead of resuming it")  # fmt: skip


def add_progress_args(p: argparse.ArgumentParser) -> None:
    """`--progress/--no-progress` (see `qembed.progress`)."""
    p.add_argument("--progress", dest="progress_mode", action=argparse.BooleanOptionalAction, default=None,
                   help="force progress bars on, or all progress output off (default: bars on a terminal, "
                        "otherwise a plain progress line at most every 30 s)")  # fmt: skip


def check_output(output: str | Path, **inputs: str | Path | list | None) -> None:
    """One-line error when `--output` is the same path as an input (it would be overwritten)."""
    target = Path(output).expanduser().resolve()
    for name, value in inputs.items():
        for path in value if isinstance(value, (list, tuple)) else [value]:
            if path is not None and Path(path).expanduser().resolve() == target:
                flag = "--" + name.replace("_", "-")
                raise QembedError(f"--output {output} is also {flag}: write the output somewhere else")

