"""`qembed review`: label a sample of synthetic pairs for relevance in the browser, judge it with an LLM,
and report relevance accuracy of the raw and the filtered data."""

from __future__ import annotations

from pathlib import Path

from qembed.cli.common import add_device_args, add_list, add_progress_args
from qembed.errors import QembedError

DEFAULT_SAMPLE = 0.05


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "review",
        help="label a sample of synthetic pairs for relevance in a web page; report accuracy raw vs filtered",
        description="The first run draws a seeded sample of --input (stratified by task and question type) "
        "into the --labels file; later runs reuse it. Without --report or a judge, serves a page to label "
        "the sample (keys 1 relevant, 0 not relevant, s skip, u undo; several reviewers by name); every "
        "label is appended to --labels as it is given. --report prints relevance accuracy of the raw and "
        "the filtered data with Wilson 95%% intervals, accuracy and kept share by cosine threshold (a plot "
        "next to --labels) and Cohen's kappa between reviewers. --judge-llm-base-url/--judge-llm-model "
        "label the sample with an LLM as reviewer llm:MODEL.",
    )
    p.add_argument("--labels", required=True, metavar="FILE",
                   help="labels file (JSONL): created with the sample on the first run, then appended to")  # fmt: skip
    add_list(p, "--input", metavar="FILE",
             help="synthetic pairs to sample (qembed synth output), then optionally its qembed filter output "
                  "(marks which sampled pairs the filter kept); needed only to create --labels")  # fmt: skip
    p.add_argument("--sample", type=float, metavar="FRACTION",
                   help=f"share of the pairs to sample, per task and question type (default: {DEFAULT_SAMPLE})")
    p.add_argument("--seed", type=int, metavar="N", help="seed of the sample (default: 0)")
    p.add_argument("--model", metavar="M",
                   help="embedder that scores every sampled pair as qembed filter does, for the cosine shown and "
                        "the threshold plot (default: the filter output's meta.score, where there is one)")  # fmt: skip
    add_device_args(p)
    p.add_argument("--report", action="store_true", help="print the report (and write the threshold plot) and exit")
    p.add_argument("--judge-llm-base-url", metavar="URL", help="OpenAI-compatible server of an LLM judge")
    p.add_argument("--judge-llm-model", metavar="NAME", help="model name of the LLM judge (its labels: reviewer llm:NAME)")
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key (never printed)")
    p.add_argument("--concurrency", type=int, default=8, help="judge requests in flight (default: 8)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per judge request attempt (default: 120)")
    p.add_argument("--max-retries", type=int, default=5, help="judge retries on 429/5xx/timeouts (default: 5)")
    p.add_argument("--host", default="127.0.0.1", help="address the page listens on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8100, help="TCP port of the page (default: 8100)")
    add_progress_args(p)
    p.set_defaults(func=run)


def plot_path(labels: str | Path) -> Path:
    """Where `--report` writes the threshold plot: `LABELS.threshold.png` next to the labels file."""
    labels = Path(labels)
    stem = labels.name[: -len(".jsonl")] if labels.name.endswith(".jsonl") else labels.name
    return labels.with_name(stem + ".threshold.png")


def _open_or_create(args) -> None:
    from qembed.review.labels import create_labels_file, read_review

    labels = Path(args.labels)
    inputs = args.input or []
    if labels.exists():
        header = read_review(labels).header
        for flag, given, kept in (("--sample", args.sample, header["sample"]), ("--seed", args.seed, header["seed"])):
            if given is not None and given != kept:
                raise QembedError(f"{labels} holds a sample drawn with {flag} {kept}: use a new --labels file for "
                                  "another sample")  # fmt: skip
        if inputs:
            print(f"{labels}: reusing its sample of {header['items']} items (--input is read only to create it)")
        return
    if not inputs:
        raise QembedError(f"{labels} does not exist: give --input (the synthetic pairs) to draw its sample")
    if len(inputs) > 2:
        raise QembedError("--input takes the raw pairs and, optionally, their filtered version (two files at most)")
    for path in inputs:
        if not Path(path).is_file():
            raise QembedError(f"input file not found: {path}")
        if Path(path).resolve() == labels.resolve():
            raise QembedError(f"--labels {labels} is also --input: write the labels somewhere else")
    embedder = None
    if args.model:
        from qembed.models.embedder import Embedder

        embedder = Embedder.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    review = create_labels_file(labels, inputs[0], inputs[1] if len(inputs) > 1 else None,
                                fraction=DEFAULT_SAMPLE if args.sample is None else args.sample,
                                seed=0 if args.seed is None else args.seed, embedder=embedder,
                                batch_tokens=args.batch_tokens)  # fmt: skip
    print(f"drew {len(review.items)} of {review.header['population']} pairs into {labels}")


def run(args) -> int:
    if bool(args.judge_llm_base_url) != bool(args.judge_llm_model):
        raise QembedError("an LLM judge needs both --judge-llm-base-url and --judge-llm-model")
    if args.sample is not None and not 0 < args.sample <= 1:
        raise QembedError(f"--sample {args.sample:g} is not a fraction in (0, 1]")
    _open_or_create(args)
    if args.judge_llm_base_url:
        from qembed.review.judge import judge_sample
        from qembed.synth.llm import OpenAIChat, RetryPolicy

        llm = OpenAIChat(args.judge_llm_base_url, args.judge_llm_model, api_key_env=args.api_key_env,
                         concurrency=args.concurrency, timeout=args.timeout,
                         retry=RetryPolicy(max_retries=args.max_retries))  # fmt: skip
        stats = judge_sample(args.labels, llm)
        print(f"{stats.reviewer}: labelled {stats.labelled} item(s), {stats.already} already done, "
              f"{stats.failed} failed")  # fmt: skip
        for reason, count in sorted(stats.reasons.items(), key=lambda kv: -kv[1]):
            print(f"  {count:>6}  {reason}")
    if args.report:
        from qembed.review.labels import read_review
        from qembed.review.report import build_report, format_report, threshold_plot

        report = build_report(read_review(args.labels))
        print(format_report(report))
        png = threshold_plot(report)
        if png is not None:
            from qembed.files import atomic_write_bytes

            atomic_write_bytes(plot_path(args.labels), png)
            print(f"\nthreshold plot: {plot_path(args.labels)}")
    if not args.report and not args.judge_llm_base_url:
        from qembed.review.app import serve

        serve(args.labels, host=args.host, port=args.port)
    return 0
