"""`qembed synth`: synthetic (query, passage) training pairs from a corpus with an LLM."""

from __future__ import annotations

import argparse

from qembed.cli.common import (
    RunFailed,
    add_device_args,
    add_list,
    add_output_args,
    add_progress_args,
    check_output,
)
from qembed.errors import QembedError


def _range(text: str) -> tuple[int, int]:
    try:
        low, high = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (two integers), got {text!r}") from None
    return low, high


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "synth",
        help="generate synthetic queries for a corpus with an LLM (persona -> config -> query)",
        description="Two-stage synthesis as in the Qwen3-Embedding report: for each document an LLM picks a "
        "persona (top-5 by embedding similarity), question type and difficulty, then writes the query under "
        "explicit type/difficulty/length/language requirements. Other tasks: sts, classification, bitext, or a "
        "seeded --task-mix of them. Appends to --output; rerun the same command to resume. Failures go to "
        "OUTPUT.rejects.jsonl.",
    )
    p.add_argument("--corpus", required=True, help="BEIR corpus.jsonl, another .jsonl with a text field, or .txt (one document per line)")
    p.add_argument("--text-field", default="text", help="text field of a .jsonl corpus (default: text)")
    add_output_args(p, help="output JSONL (appended: an existing one is resumed)", resumable=True)
    llm = p.add_mutually_exclusive_group(required=True)
    llm.add_argument("--llm-base-url", help="OpenAI-compatible server, e.g. http://localhost:8000/v1")
    llm.add_argument("--llm-local", metavar="PATH", help="a local transformers causal LM instead of a server")
    p.add_argument("--llm-model", help="model name sent to the server (required with --llm-base-url)")
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key (never printed)")
    tasks = p.add_mutually_exclusive_group()
    tasks.add_argument("--task", choices=["retrieval", "sts", "classification", "bitext"],
                       help="retrieval: (query, passage); sts: (paraphrase, sentence); classification: (text, "
                            "its label among --labels); bitext: (translation, segment) (default: retrieval)")  # fmt: skip
    tasks.add_argument("--task-mix", metavar="TASK=SHARE,...",
                       help="a task per document by a seeded draw, e.g. the Qwen3 mix "
                            "retrieval=0.45,sts=0.25,classification=0.2,bitext=0.1 (shares sum to 1)")  # fmt: skip
    p.add_argument("--labels", metavar="FILE",
                   help="classification labels: one per line, or JSONL with label and description (default: the "
                        "LLM proposes a set once from a sample of the corpus, kept in OUTPUT.labels.json)")  # fmt: skip
    p.add_argument("--glossary", metavar="FILE",
                   help="domain terms, one per line or TERM<TAB>DEFINITION: the terms a passage contains are "
                        "offered to the LLM as vocabulary; those used go to meta.terms")  # fmt: skip
    p.add_argument("--glossary-nearest", type=int, default=0, metavar="N",
                   help="also offer the N glossary terms nearest to the passage by --embed-model similarity (default: 0)")
    p.add_argument("--llm-negatives", type=int, default=0, metavar="N",
                   help="retrieval: ask the LLM for N passages on the query's topic that do not answer it; they go "
                        "to neg with meta.neg_source=llm (default: 0)")  # fmt: skip
    p.add_argument("--personas", help="persona file: JSONL with a 'persona' field (Persona Hub format) or text lines (default: the built-in library)")
    p.add_argument("--embed-model", default="Qwen/Qwen3-Embedding-0.6B", help="embedder that matches personas to documents")
    add_device_args(p, what="the persona embedder and a local LLM")
    add_list(p, "--languages", default=["en"], metavar="LANGS", help="query languages drawn per query, e.g. zh,en")
    p.add_argument("--queries-per-doc", type=int, default=1, help="queries generated per document")
    p.add_argument("--limit", type=int, help="only the first N documents of the corpus (default: all)")
    p.add_argument("--concurrency", type=int, default=8, help="documents in flight (default: 8)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request attempt (default: 120)")
    p.add_argument("--max-retries", type=int, default=5, help="retries on 429/5xx/timeouts (default: 5)")
    p.add_argument("--max-repairs", type=int, default=2, help="repair prompts after an unusable answer (default: 2)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the LLM")
    p.add_argument("--max-tokens", type=int, default=512, help="max new tokens per answer (default: 512)")
    p.add_argument("--words-range", type=_range, default=(4, 30), metavar="MIN,MAX", help="query length in words for space-separated languages (default: 4,30)")
    p.add_argument("--chars-range", type=_range, default=(6, 40), metavar="MIN,MAX", help="query length in characters for zh/ja/ko (default: 6,40)")
    p.add_argument("--seed", type=int, default=0, help="seed for the per-query draws of language and length")
    p.add_argument("--allow-thinking", action="store_true", help="do not send chat_template_kwargs={'enable_thinking': false}")
    p.add_argument("--local-batch-size", type=int, default=8, help="prompts per generate() call with --llm-local")
    add_progress_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from qembed.synth.generate import SynthConfig, rejects_path, synthesize_corpus
    from qembed.synth.llm import LocalChat, OpenAIChat, RetryPolicy
    from qembed.synth.mix import parse_task_mix

    config = SynthConfig(
        task=args.task or "retrieval", task_mix=parse_task_mix(args.task_mix) if args.task_mix else None,
        llm_negatives=args.llm_negatives, languages=args.languages, queries_per_doc=args.queries_per_doc,
        words_range=args.words_range, chars_range=args.chars_range, max_repairs=args.max_repairs,
        temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed, concurrency=args.concurrency,
    )  # fmt: skip
    if args.limit is not None and args.limit < 1:
        raise QembedError("--limit must be at least 1")
    check_output(args.output, corpus=args.corpus, personas=args.personas, labels=args.labels, glossary=args.glossary)
    if args.glossary_nearest and not args.glossary:
        raise QembedError("--glossary-nearest needs --glossary")
    if args.llm_base_url:
        if not args.llm_model:
            raise QembedError("--llm-model is required with --llm-base-url")
        llm = OpenAIChat(args.llm_base_url, args.llm_model, api_key_env=args.api_key_env,
                         concurrency=args.concurrency, timeout=args.timeout,
                         retry=RetryPolicy(max_retries=args.max_retries), disable_thinking=not args.allow_thinking)  # fmt: skip
    else:  # loaded only after the corpus and personas have been checked

        def llm():
            return LocalChat(args.llm_local, batch_size=args.local_batch_size, device=args.device, dtype=args.dtype)
    stats = synthesize_corpus(
        args.corpus, args.output, llm, config=config, personas=args.personas, embed_model=args.embed_model,
        device=args.device, dtype=args.dtype, batch_tokens=args.batch_tokens, text_field=args.text_field,
        limit=args.limit, overwrite=args.overwrite, labels=args.labels, glossary=args.glossary,
        glossary_nearest=args.glossary_nearest,
    )  # fmt: skip
    rate = stats.done / stats.seconds if stats.seconds else 0.0
    rejects = rejects_path(args.output)
    print(f"wrote {stats.done} record(s) to {args.output} ({rate:.1f}/s); {stats.failed} failed "
          f"(see {rejects}); {stats.skipped} already done")  # fmt: skip
    if len(config.tasks) > 1 and stats.tasks:
        print("  by task: " + ", ".join(f"{task} {stats.tasks[task]}" for task in config.tasks if task in stats.tasks))
    if stats.rejected_before:
        print(f"{stats.rejected_before} rejected for good in an earlier run (not retried; --overwrite starts afresh)")
    for reason, count in sorted(stats.reasons.items(), key=lambda kv: -kv[1]):
        print(f"  {count:>6}  {reason}")
    if stats.failed and not stats.done:
        raise RunFailed(f"no query was generated: all {stats.failed} job(s) failed (see {rejects})")
    return 0
