"""The synthesis pipeline: for every (document, query index) job, ask the LLM for a configuration
(persona, question type, difficulty), then for the query under explicit requirements; append each record
as it completes, record failures in a rejects file, and resume a killed run without duplicates."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qembed.data.corpus import Document
from qembed.data.jsonl import JsonlAppender, iter_jsonl
from qembed.data.text import normalize_text
from qembed.errors import ModelNotFoundError, QembedError
from qembed.progress import progress_bar
from qembed.synth import prompts
from qembed.synth.llm import ChatLLM, LLMError
from qembed.synth.parsing import (
    ParseError,
    check_language,
    check_length,
    detect_language,
    length_unit,
    parse_config,
    parse_text,
    strip_think,
    text_length,
)
from qembed.synth.personas import PersonaMatcher

log = logging.getLogger(__name__)

TASKS = ("retrieval", "sts", "bitext")


@dataclass
class SynthConfig:
    task: str = "retrieval"
    languages: list[str] = field(default_factory=lambda: ["en"])
    queries_per_doc: int = 1
    words_range: tuple[int, int] = (4, 30)  # query length for space-separated languages
    chars_range: tuple[int, int] = (6, 40)  # query length for zh/ja/ko/th, in characters
    max_repairs: int = 2  # repair turns after an unusable answer
    temperature: float = 0.7
    max_tokens: int = 512
    max_doc_chars: int = 4000  # passage text shown to the LLM (records keep the full text)
    seed: int = 0
    concurrency: int = 8  # documents in flight (each is a chain of requests)
    chunk_size: int = 256  # documents matched to personas at once

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise QembedError(f"unknown task {self.task!r}: choose one of {', '.join(TASKS)}")
        self.languages = [lang.strip() for lang in self.languages if lang.strip()]
        if not self.languages:
            raise QembedError("no output language given (e.g. --languages zh,en)")
        for low, high in (self.words_range, self.chars_range):
            if not 1 <= low <= high:
                raise QembedError(f"bad length range {low},{high}: need 1 <= MIN <= MAX")
        if self.queries_per_doc < 1 or self.concurrency < 1:
            raise QembedError("--queries-per-doc and --concurrency must be at least 1")


@dataclass
class SynthStats:
    done: int = 0
    failed: int = 0
    skipped: int = 0  # already in the output from an earlier run
    rejected_before: int = 0  # rejected for good (not transient) by an earlier run: not retried
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)


def rejects_path(output: str | Path) -> Path:
    """`OUT.jsonl` → `OUT.rejects.jsonl` (next to the output)."""
    output = Path(output)
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(stem + ".rejects.jsonl")


def query_id(doc_id: str, index: int, task: str = "retrieval") -> str:
    """`{doc_id}-q{index}` (retrieval), `{doc_id}-sts{index}`, `{doc_id}-bitext{index}`: stable across
    runs, and distinct per task so several tasks can share one output file."""
    return f"{doc_id}-{'q' if task == 'retrieval' else task}{index}"


class Rejected(Exception):
    def __init__(self, stage: str, reason: str, raw: list[str], *, transient: bool = False) -> None:
        super().__init__(reason)
        self.stage, self.reason, self.raw, self.transient = stage, reason, raw, transient


@dataclass
class _Job:
    doc: Document
    index: int
    candidates: list[str] | None


async def _ask(llm: ChatLLM, messages: list[dict[str, str]], parse: Callable[[str], Any], example: str,
               stage: str, cfg: SynthConfig) -> Any:  # fmt: skip
    """One LLM exchange with up to `cfg.max_repairs` repair turns; `Rejected` if nothing usable came back."""
    raw: list[str] = []
    for _ in range(cfg.max_repairs + 1):
        try:
            answer = await llm.chat(messages, max_tokens=cfg.max_tokens, temperature=cfg.temperature)
        except LLMError as exc:
            raise Rejected(stage, f"llm_error: {exc}", raw, transient=exc.transient) from None
        raw.append(answer)
        try:
            return parse(answer)
        except ParseError as exc:
            problem = str(exc)
        shown = strip_think(answer) or answer
        shown = shown if len(shown) <= 2000 else shown[:2000] + " …"
        messages = [*messages, {"role": "assistant", "content": shown}, prompts.repair_message(problem, example)]
    raise Rejected(stage, f"unusable output: {problem}", raw)


def _query_parser(language: str, length: int, unit: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        query = parse_text(raw, "query")
        check_language(query, language)
        check_length(query, length, unit)
        return query

    return parse


_SENTENCE_END = re.compile(r"(?<=[。！？!?；])|(?<=[.;])\s+")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def _pick_sentence(text: str, rng: random.Random) -> str | None:
    """A sentence of sensible length for an STS pair (5–60 words, or 8–150 CJK characters)."""
    good = []
    for sentence in split_sentences(text):
        unit = length_unit(detect_language(sentence))
        n = text_length(sentence, unit)
        if (unit == "words" and 5 <= n <= 60) or (unit == "chars" and 8 <= n <= 150):
            good.append(sentence)
    return rng.choice(good) if good else None


def _pick_segment(text: str, rng: random.Random, max_chars: int = 400) -> str:
    """A run of consecutive sentences, up to `max_chars`, for a bitext pair."""
    sentences = split_sentences(text) or [text]
    start = rng.randrange(len(sentences))
    segment = sentences[start]
    for sentence in sentences[start + 1 :]:
        if len(segment) + len(sentence) + 1 > max_chars:
            break
        segment = f"{segment} {sentence}" if length_unit(detect_language(segment)) == "words" else segment + sentence
    return segment[:max_chars]


async def _retrieval(job: _Job, llm: ChatLLM, cfg: SynthConfig, rng: random.Random) -> dict[str, Any]:
    language = rng.choice(cfg.languages)
    unit = length_unit(language)
    length = rng.randint(*(cfg.chars_range if unit == "chars" else cfg.words_range))
    passage = job.doc.text[: cfg.max_doc_chars]
    candidates = job.candidates or []
    config = await _ask(llm, prompts.config_messages(passage, candidates), lambda raw: parse_config(raw, candidates),
                        prompts.CONFIG_EXAMPLE, "config", cfg)  # fmt: skip
    messages = prompts.query_messages(
        passage, config.character, config.question_type, config.difficulty, length, unit, language
    )
    query = await _ask(llm, messages, _query_parser(language, length, unit), prompts.QUERY_EXAMPLE, "query", cfg)
    meta = {"character": config.character, "question_type": config.question_type, "difficulty": config.difficulty,
            "language": language, "length": length, "length_unit": unit}  # fmt: skip
    return {"query": query, "pos": [job.doc.text], "meta": meta}


async def _sts(job: _Job, llm: ChatLLM, cfg: SynthConfig, rng: random.Random) -> dict[str, Any]:
    sentence = _pick_sentence(job.doc.text, rng)
    if sentence is None:
        raise Rejected("paraphrase", "no sentence of usable length in the document", [])
    language = detect_language(sentence)
    unit = length_unit(language)
    length = text_length(sentence, unit)

    def parse(raw: str) -> str:
        text = parse_text(raw, "paraphrase")
        check_language(text, language)
        check_length(text, length, unit)
        if normalize_text(text) == normalize_text(sentence):
            raise ParseError("the paraphrase repeats the sentence word for word")
        return text

    text = await _ask(llm, prompts.sts_messages(sentence, language), parse, prompts.STS_EXAMPLE, "paraphrase", cfg)
    meta = {"character": None, "question_type": "paraphrase", "difficulty": None, "language": language,
            "length": length, "length_unit": unit}  # fmt: skip
    return {"query": text, "pos": [sentence], "meta": meta}


async def _bitext(job: _Job, llm: ChatLLM, cfg: SynthConfig, rng: random.Random) -> dict[str, Any]:
    segment = _pick_segment(job.doc.text, rng)
    source = detect_language(segment)
    targets = [lang for lang in cfg.languages if lang.lower().split("-")[0] != source]
    if not targets:
        raise Rejected("translation", f"no target language in {cfg.languages} differs from the text's ({source})", [])
    target = rng.choice(targets)
    unit = length_unit(target)
    # a translation's length follows its source; allow for the change of script
    expected = text_length(segment, length_unit(source)) * (2 if unit == "chars" and length_unit(source) == "words" else 1)

    def parse(raw: str) -> str:
        text = parse_text(raw, "translation")
        check_language(text, target)
        check_length(text, max(expected, 10), unit)
        return text

    messages = prompts.bitext_messages(segment, source, target)
    text = await _ask(llm, messages, parse, prompts.BITEXT_EXAMPLE, "translation", cfg)
    meta = {"character": None, "question_type": "translation", "difficulty": None, "language": target,
            "length": text_length(text, unit), "length_unit": unit, "source_language": source}  # fmt: skip
    return {"query": text, "pos": [segment], "meta": meta}


_TASK_FUNCS = {"retrieval": _retrieval, "sts": _sts, "bitext": _bitext}


def _finished_ids(output: Path) -> tuple[set[str], set[str]]:
    """Query ids already written, and query ids rejected for a non-transient reason."""
    done: set[str] = set()
    if output.exists():
        done = {str(r["query_id"]) for r in iter_jsonl(output, allow_truncated_tail=True) if "query_id" in r}
    rejected: set[str] = set()
    rej = rejects_path(output)
    if rej.exists():
        for r in iter_jsonl(rej, allow_truncated_tail=True):
            if "query_id" in r and not r.get("transient"):
                rejected.add(str(r["query_id"]))
    return done, rejected


def synthesize(
    docs: list[Document],
    output: str | Path,
    llm: ChatLLM,
    *,
    matcher: PersonaMatcher | None = None,
    config: SynthConfig | None = None,
    show_progress: bool | None = None,
) -> SynthStats:
    """Generate `config.queries_per_doc` records per document into `output` (JSONL, appended, flushed per
    record); failures go to `rejects_path(output)`. Jobs already in the output (`stats.skipped`) or rejected
    for a non-transient reason (`stats.rejected_before`) are skipped, so rerunning the same command resumes;
    transient failures (timeouts, 429/5xx, local out-of-memory and runtime errors) are tried again. The retrieval task needs a
    `matcher` (persona candidates). Closes `llm` at the end."""
    cfg = config or SynthConfig()
    output = Path(output)
    if cfg.task == "retrieval" and matcher is None:
        raise QembedError("the retrieval task needs personas")
    done, rejected = _finished_ids(output)
    pending: list[tuple[Document, list[int]]] = []
    finished = done | rejected
    stats = SynthStats()
    for doc in docs:
        ids = [query_id(doc.doc_id, i, cfg.task) for i in range(cfg.queries_per_doc)]
        todo = [i for i, qid in enumerate(ids) if qid not in finished]
        stats.skipped += sum(qid in done for qid in ids)
        stats.rejected_before += sum(qid in rejected and qid not in done for qid in ids)
        if todo:
            pending.append((doc, todo))
    total = sum(len(t) for _, t in pending)
    start = time.perf_counter()
    if total:
        asyncio.run(_run(pending, total, output, llm, matcher, cfg, stats, show_progress))
    else:
        asyncio.run(llm.aclose())
    stats.seconds = time.perf_counter() - start
    return stats


async def _run(pending, total, output, llm, matcher, cfg, stats, show_progress) -> None:
    queue: asyncio.Queue = asyncio.Queue(maxsize=cfg.chunk_size * cfg.queries_per_doc + cfg.concurrency)
    task_func = _TASK_FUNCS[cfg.task]
    bar = progress_bar(total=total, unit="query", desc="synth", enabled=show_progress, smoothing=0.05)
    bar.set_postfix(done=0, failed=0)

    # a small first chunk gets requests going before the bulk of the persona matching
    first = min(cfg.chunk_size, 2 * cfg.concurrency)
    bounds = [0, *range(first, len(pending), cfg.chunk_size), len(pending)]

    async def produce() -> None:
        for begin, end in zip(bounds, bounds[1:]):
            chunk = pending[begin:end]
            candidates: list[Any] = [None] * len(chunk)
            if cfg.task == "retrieval":
                assert matcher is not None
                texts = [doc.text for doc, _ in chunk]
                if matcher.needs_embedder:  # embedding runs in a thread while requests stay in flight
                    candidates = await asyncio.to_thread(matcher.candidates, texts)
                else:
                    candidates = matcher.candidates(texts)
            for (doc, indices), cands in zip(chunk, candidates):
                for i in indices:
                    await queue.put(_Job(doc, i, cands))
        for _ in range(cfg.concurrency):
            await queue.put(None)

    def reject(writer: JsonlAppender, job: _Job, stage: str, reason: str, raw: list[str], transient: bool) -> None:
        writer.write({"query_id": query_id(job.doc.doc_id, job.index, cfg.task), "doc_id": job.doc.doc_id, "stage": stage,
                      "reason": reason, "transient": transient, "raw": raw, "llm_model": llm.model_name,
                      "prompt_version": prompts.PROMPT_VERSION})  # fmt: skip
        stats.failed += 1
        key = f"{stage}: {reason.split(':')[0]}"
        stats.reasons[key] = stats.reasons.get(key, 0) + 1

    async def work(out: JsonlAppender, rej: JsonlAppender) -> None:
        while (job := await queue.get()) is not None:
            rng = random.Random(f"{cfg.seed}|{cfg.task}|{job.doc.doc_id}|{job.index}")
            try:
                result = await task_func(job, llm, cfg, rng)
            except Rejected as exc:
                reject(rej, job, exc.stage, exc.reason, exc.raw, exc.transient)
            else:
                result["meta"].update(llm_model=llm.model_name, prompt_version=prompts.PROMPT_VERSION, task=cfg.task)
                out.write({"query": result["query"], "pos": result["pos"], "neg": [],
                           "query_id": query_id(job.doc.doc_id, job.index, cfg.task), "pos_ids": [job.doc.doc_id],
                           "meta": result["meta"]})  # fmt: skip
                stats.done += 1
            bar.set_postfix(done=stats.done, failed=stats.failed, refresh=False)
            bar.update(1)

    try:
        with JsonlAppender(output) as out, JsonlAppender(rejects_path(output)) as rej:
            tasks = [asyncio.create_task(produce())] + [
                asyncio.create_task(work(out, rej)) for _ in range(cfg.concurrency)
            ]
            finished, unfinished = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
            for task in finished:
                if task.exception() is not None:
                    raise task.exception()
    finally:
        bar.close()
        await llm.aclose()


def synthesize_corpus(
    corpus: str | Path,
    output: str | Path,
    llm: ChatLLM | Callable[[], ChatLLM],
    *,
    config: SynthConfig | None = None,
    personas: str | Path | None = None,
    embed_model: str = "Qwen/Qwen3-Embedding-0.6B",
    device: str | None = None,
    text_field: str = "text",
    limit: int | None = None,
    show_progress: bool | None = None,
    dtype: str | None = None,
    batch_tokens: int | None = None,
    overwrite: bool = False,
) -> SynthStats:
    """`synthesize` over a corpus file (read by `qembed.data.corpus.read_corpus`): loads the persona library (the shipped one
    when `personas` is None) and, when it has more than five entries, `embed_model` to match them
    (`device`, `dtype`, `batch_tokens`: None for its defaults). `llm` may be a zero-argument factory,
    called once the inputs have been read and checked. `overwrite` deletes the output and its rejects
    file first instead of resuming them."""
    from qembed.data.corpus import read_corpus
    from qembed.synth.personas import load_personas

    cfg = config or SynthConfig()
    try:
        docs = [Document(*item) for item in read_corpus(corpus, text_field=text_field, limit=limit).items()]
        matcher = None
        if cfg.task == "retrieval":
            library = load_personas(personas)
            embedder = None
            if len(library) > 5:
                from qembed.models.embedder import Embedder

                try:
                    embedder = Embedder.from_pretrained(embed_model, device=device, dtype=dtype)
                except ModelNotFoundError as exc:  # the user named it with --embed-model, not --model
                    raise ModelNotFoundError(str(exc).replace("--model ", "--embed-model ")) from None
            matcher = PersonaMatcher(library, embedder, batch_tokens=batch_tokens)
    except BaseException:
        if not callable(llm):
            asyncio.run(llm.aclose())
        raise
    if callable(llm):
        llm = llm()
    if overwrite:
        for path in (Path(output), rejects_path(output)):
            path.unlink(missing_ok=True)
    return synthesize(docs, output, llm, matcher=matcher, config=cfg, show_progress=show_progress)
