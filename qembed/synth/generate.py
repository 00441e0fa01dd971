"""The synthesis pipeline: every document gets a task (one, or a seeded draw from a task mix); for every
(document, query index) job the LLM writes the pair — for retrieval a configuration (persona, question
type, difficulty) then the query under explicit requirements and, if asked, hard negatives; for
classification a category and a short text of it; for sts/bitext a paraphrase/translation — with the
glossary terms the passage contains offered as vocabulary. Each record is appended as it completes,
failures go to a rejects file, and a killed run resumes without duplicates."""

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
from qembed.synth.categories import (
    Category,
    categories_path,
    load_categories,
    parse_categories,
    proposal_sample,
    save_proposed,
)
from qembed.synth.glossary import Glossary, Term, terms_in
from qembed.synth.llm import ChatLLM, LLMError
from qembed.synth.mix import TASKS, assign_task
from qembed.synth.parsing import (
    ParseError,
    check_language,
    check_length,
    detect_language,
    extract_json,
    length_unit,
    match_character,
    parse_config,
    parse_text,
    strip_think,
    text_length,
)
from qembed.synth.personas import PersonaMatcher

log = logging.getLogger(__name__)

MAX_LABEL_NEGATIVES = 15  # other categories kept as a classification record's negatives (a seeded draw)


@dataclass
class SynthConfig:
    task: str = "retrieval"
    task_mix: dict[str, float] | None = None  # task -> share; replaces `task` (`qembed.synth.mix`)
    llm_negatives: int = 0  # hard negatives the LLM writes per retrieval query
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
        if self.task_mix is not None:
            unknown = set(self.task_mix) - set(TASKS)
            if unknown or not any(share > 0 for share in self.task_mix.values()):
                raise QembedError(f"bad task mix {self.task_mix}: give shares of {', '.join(TASKS)}")
        if self.llm_negatives < 0:
            raise QembedError("--llm-negatives must be 0 or more")
        self.languages = [lang.strip() for lang in self.languages if lang.strip()]
        if not self.languages:
            raise QembedError("no output language given (e.g. --languages zh,en)")
        for low, high in (self.words_range, self.chars_range):
            if not 1 <= low <= high:
                raise QembedError(f"bad length range {low},{high}: need 1 <= MIN <= MAX")
        if self.queries_per_doc < 1 or self.concurrency < 1:
            raise QembedError("--queries-per-doc and --concurrency must be at least 1")

    @property
    def tasks(self) -> list[str]:
        """The tasks this run can assign."""
        return [t for t in TASKS if (self.task_mix or {self.task: 1.0}).get(t, 0) > 0]

    def task_of(self, doc_id: str) -> str:
        """The task of a document: `task`, or its seeded draw from `task_mix`."""
        return self.task if self.task_mix is None else assign_task(doc_id, self.task_mix, self.seed)


@dataclass
class SynthStats:
    done: int = 0
    failed: int = 0
    skipped: int = 0  # already in the output from an earlier run
    rejected_before: int = 0  # rejected for good (not transient) by an earlier run: not retried
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)
    tasks: dict[str, int] = field(default_factory=dict)  # records written by this run, per task


def rejects_path(output: str | Path) -> Path:
    """`OUT.jsonl` → `OUT.rejects.jsonl` (next to the output)."""
    output = Path(output)
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(stem + ".rejects.jsonl")


_ID_TAGS = {"retrieval": "q", "classification": "cls"}


def query_id(doc_id: str, index: int, task: str = "retrieval") -> str:
    """`{doc_id}-q{index}` (retrieval), `{doc_id}-sts{index}`, `{doc_id}-cls{index}`, `{doc_id}-bitext{index}`:
    stable across runs, and distinct per task so several tasks can share one output file."""
    return f"{doc_id}-{_ID_TAGS.get(task, task)}{index}"


class Rejected(Exception):
    def __init__(self, stage: str, reason: str, raw: list[str], *, transient: bool = False) -> None:
        super().__init__(reason)
        self.stage, self.reason, self.raw, self.transient = stage, reason, raw, transient


@dataclass
class _Job:
    doc: Document
    index: int
    task: str
    candidates: list[str] | None = None  # persona candidates (retrieval)
    terms: list[Term] | None = None  # glossary terms offered (None: no glossary)


async def _ask(llm: ChatLLM, messages: list[dict[str, str]], parse: Callable[[str], Any], example: str,
               stage: str, cfg: SynthConfig) -> Any:  # fmt: skip
    return await ask(llm, messages, parse, example, stage, max_repairs=cfg.max_repairs, max_tokens=cfg.max_tokens,
                     temperature=cfg.temperature)  # fmt: skip


async def ask(llm: ChatLLM, messages: list[dict[str, str]], parse: Callable[[str], Any], example: str, stage: str,
              *, max_repairs: int = 2, max_tokens: int = 512, temperature: float = 0.7) -> Any:  # fmt: skip
    """One LLM exchange with up to `max_repairs` repair turns; `Rejected` if nothing usable came back."""
    raw: list[str] = []
    for _ in range(max_repairs + 1):
        try:
            answer = await llm.chat(messages, max_tokens=max_tokens, temperature=temperature)
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


def _query_parser(language: str, length: int, unit: str, key: str = "query") -> Callable[[str], str]:
    def parse(raw: str) -> str:
        query = parse_text(raw, key)
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
        passage, config.character, config.question_type, config.difficulty, length, unit, language, job.terms or ()
    )
    query = await _ask(llm, messages, _query_parser(language, length, unit), prompts.QUERY_EXAMPLE, "query", cfg)
    meta = {"character": config.character, "question_type": config.question_type, "difficulty": config.difficulty,
            "language": language, "length": length, "length_unit": unit}  # fmt: skip
    result: dict[str, Any] = {"query": query, "pos": [job.doc.text], "meta": meta}
    if cfg.llm_negatives:
        result["neg"] = await _negatives(job, query, passage, llm, cfg)
        meta.update(neg_source="llm", llm_negatives=len(result["neg"]))
    return result


def _negatives_parser(count: int, passage: str, language: str) -> Callable[[str], list[str]]:
    def parse(raw: str) -> list[str]:
        obj = extract_json(raw)
        items = next((v for k, v in obj.items() if isinstance(v, list)), None)
        if items is None or not all(isinstance(i, str) for i in items):
            raise ParseError('expected {"passages": ["...", ...]}')
        unique: dict[str, str] = {}
        for item in (" ".join(i.split()) for i in items):
            if item and normalize_text(item) != normalize_text(passage):
                unique.setdefault(normalize_text(item), item)
        if len(unique) < count:
            raise ParseError(f"give {count} different passages, each different from the given passage")
        negatives = list(unique.values())[:count]
        for negative in negatives:
            check_language(negative, language)
        return negatives

    return parse


async def _negatives(job: _Job, query: str, passage: str, llm: ChatLLM, cfg: SynthConfig) -> list[str]:
    """`cfg.llm_negatives` passages on the query's topic that do not answer it."""
    language = detect_language(passage)
    messages = prompts.negatives_messages(query, passage, cfg.llm_negatives, language, job.terms or ())
    parse = _negatives_parser(cfg.llm_negatives, job.doc.text, language)
    return await _ask(llm, messages, parse, prompts.NEGATIVES_EXAMPLE, "negatives", cfg)


async def _classification(job: _Job, llm: ChatLLM, cfg: SynthConfig, rng: random.Random,
                          categories: list[Category]) -> dict[str, Any]:  # fmt: skip
    language = rng.choice(cfg.languages)
    unit = length_unit(language)
    length = rng.randint(*(cfg.chars_range if unit == "chars" else cfg.words_range))
    names = [c.name for c in categories]
    text_parser = _query_parser(language, length, unit, key="text")

    def parse(raw: str) -> tuple[str, str]:
        obj = extract_json(raw)
        label = next((v for k, v in obj.items() if isinstance(k, str) and k.lower() in ("label", "category")), None)
        return match_character(label, names, "label"), text_parser(raw)

    labels = [(c.name, c.description) for c in categories]
    messages = prompts.classification_messages(job.doc.text[: cfg.max_doc_chars], labels, length, unit, language,
                                               job.terms or ())  # fmt: skip
    name, text = await _ask(llm, messages, parse, prompts.CLASSIFICATION_EXAMPLE, "classification", cfg)
    chosen = categories[names.index(name)]
    others = [c for c in categories if c is not chosen]
    if len(others) > MAX_LABEL_NEGATIVES:
        others = rng.sample(others, MAX_LABEL_NEGATIVES)
    meta = {"character": None, "question_type": "classification", "difficulty": None, "language": language,
            "length": length, "length_unit": unit, "label": chosen.name, "doc_id": job.doc.doc_id,
            "neg_source": "labels"}  # fmt: skip
    return {"query": text, "instruction": prompts.CLASSIFICATION_INSTRUCTION, "pos": [chosen.text()],
            "neg": [c.text() for c in others], "pos_ids": [f"label:{chosen.name}"],
            "neg_ids": [f"label:{c.name}" for c in others], "meta": meta}  # fmt: skip


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

    messages = prompts.bitext_messages(segment, source, target, job.terms or ())
    text = await _ask(llm, messages, parse, prompts.BITEXT_EXAMPLE, "translation", cfg)
    meta = {"character": None, "question_type": "translation", "difficulty": None, "language": target,
            "length": text_length(text, unit), "length_unit": unit, "source_language": source}  # fmt: skip
    return {"query": text, "pos": [segment], "meta": meta}


_TASK_FUNCS = {"retrieval": _retrieval, "sts": _sts, "bitext": _bitext}  # classification also takes categories


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
    glossary: Glossary | None = None,
    categories: list[Category] | None = None,
    show_progress: bool | None = None,
) -> SynthStats:
    """Generate `config.queries_per_doc` records per document into `output` (JSONL, appended, flushed per
    record); failures go to `rejects_path(output)`. Jobs already in the output (`stats.skipped`) or rejected
    for a non-transient reason (`stats.rejected_before`) are skipped, so rerunning the same command resumes;
    transient failures (timeouts, 429/5xx, local out-of-memory and runtime errors) are tried again. The
    retrieval task needs a `matcher` (persona candidates). The classification task uses `categories`, else
    those kept in `categories_path(output)`, else a set the LLM proposes once from a sample of `docs` (kept
    there). With a `glossary`, each passage's terms are offered to the LLM. Closes `llm` at the end."""
    cfg = config or SynthConfig()
    output = Path(output)
    if "retrieval" in cfg.tasks and matcher is None:
        raise QembedError("the retrieval task needs personas")
    done, rejected = _finished_ids(output)
    pending: list[tuple[Document, str, list[int]]] = []
    finished = done | rejected
    stats = SynthStats()
    for doc in docs:
        task = cfg.task_of(doc.doc_id)
        ids = [query_id(doc.doc_id, i, task) for i in range(cfg.queries_per_doc)]
        todo = [i for i, qid in enumerate(ids) if qid not in finished]
        stats.skipped += sum(qid in done for qid in ids)
        stats.rejected_before += sum(qid in rejected and qid not in done for qid in ids)
        if todo:
            pending.append((doc, task, todo))
    total = sum(len(t) for _, _, t in pending)
    if categories is None and any(task == "classification" for _, task, _ in pending):
        if categories_path(output).exists():
            categories = load_categories(categories_path(output))
    start = time.perf_counter()
    if total:
        asyncio.run(_run(pending, total, output, llm, matcher, cfg, stats, show_progress, glossary, categories, docs))
    else:
        asyncio.run(llm.aclose())
    stats.seconds = time.perf_counter() - start
    return stats


async def _propose_categories(docs: list[Document], output: Path, llm: ChatLLM, cfg: SynthConfig) -> list[Category]:
    """Ask the LLM once for a category set covering a sample of the corpus; keep it next to the output."""
    from qembed.synth.categories import MAX_PROPOSED, PROPOSAL_CHARS

    sample = proposal_sample([(d.doc_id, d.text) for d in docs], cfg.seed)
    messages = prompts.label_proposal_messages([text[:PROPOSAL_CHARS] for _, text in sample], MAX_PROPOSED)
    try:
        categories = await ask(llm, messages, parse_categories, prompts.LABELS_EXAMPLE, "labels",
                               max_repairs=cfg.max_repairs, max_tokens=max(cfg.max_tokens, 1024), temperature=0.3)  # fmt: skip
    except Rejected as exc:
        raise QembedError(f"the LLM did not propose a usable label set ({exc.reason}); pass --labels FILE") from None
    save_proposed(categories_path(output), categories, llm_model=llm.model_name, prompt_version=prompts.PROMPT_VERSION,
                  sample_ids=[doc_id for doc_id, _ in sample])  # fmt: skip
    log.info("proposed %d labels, kept in %s", len(categories), categories_path(output))
    return categories


async def _run(pending, total, output, llm, matcher, cfg, stats, show_progress, glossary, categories, docs) -> None:
    queue: asyncio.Queue = asyncio.Queue(maxsize=cfg.chunk_size * cfg.queries_per_doc + cfg.concurrency)
    bar = progress_bar(total=total, unit="query", desc="synth", enabled=show_progress, smoothing=0.05)
    bar.set_postfix(done=0, failed=0)

    # a small first chunk gets requests going before the bulk of the persona matching
    first = min(cfg.chunk_size, 2 * cfg.concurrency)
    bounds = [0, *range(first, len(pending), cfg.chunk_size), len(pending)]

    async def in_thread(function, texts):  # embedding runs in a thread while requests stay in flight
        return await asyncio.to_thread(function, texts) if texts else []

    async def produce() -> None:
        for begin, end in zip(bounds, bounds[1:]):
            chunk = pending[begin:end]
            candidates: dict[str, list[str]] = {}
            retrieval = [doc for doc, task, _ in chunk if task == "retrieval"]
            if retrieval:
                assert matcher is not None
                texts = [doc.text for doc in retrieval]
                found = await in_thread(matcher.candidates, texts) if matcher.needs_embedder else matcher.candidates(texts)
                candidates = {doc.doc_id: c for doc, c in zip(retrieval, found)}
            terms: dict[str, list[Term]] = {}
            if glossary is not None:
                texts = [doc.text[: cfg.max_doc_chars] for doc, _, _ in chunk]
                found = await in_thread(glossary.for_documents, texts) if glossary.needs_embedder \
                    else glossary.for_documents(texts)  # fmt: skip
                terms = {doc.doc_id: t for (doc, _, _), t in zip(chunk, found)}
            for doc, task, indices in chunk:
                for i in indices:
                    offered = terms.get(doc.doc_id) if task != "sts" else None  # a paraphrase keeps its words
                    await queue.put(_Job(doc, i, task, candidates.get(doc.doc_id), offered))
        for _ in range(cfg.concurrency):
            await queue.put(None)

    def reject(writer: JsonlAppender, job: _Job, stage: str, reason: str, raw: list[str], transient: bool) -> None:
        writer.write({"query_id": query_id(job.doc.doc_id, job.index, job.task), "doc_id": job.doc.doc_id,
                      "stage": stage, "reason": reason, "transient": transient, "raw": raw, "llm_model": llm.model_name,
                      "prompt_version": prompts.PROMPT_VERSION, "task": job.task})  # fmt: skip
        stats.failed += 1
        key = f"{stage}: {reason.split(':')[0]}"
        stats.reasons[key] = stats.reasons.get(key, 0) + 1

    def record(job: _Job, result: dict[str, Any]) -> dict[str, Any]:
        meta = result["meta"]
        if job.terms is not None:
            offered = [t.term for t in job.terms]
            meta.update(terms=terms_in(result["query"], offered), terms_offered=offered)
        meta.update(llm_model=llm.model_name, prompt_version=prompts.PROMPT_VERSION, task=job.task)
        out = {"query": result["query"]}
        if "instruction" in result:
            out["instruction"] = result["instruction"]
        out.update(pos=result["pos"], neg=result.get("neg", []),
                   query_id=query_id(job.doc.doc_id, job.index, job.task),
                   pos_ids=result.get("pos_ids", [job.doc.doc_id]))  # fmt: skip
        if "neg_ids" in result:
            out["neg_ids"] = result["neg_ids"]
        out["meta"] = meta
        return out

    async def work(out: JsonlAppender, rej: JsonlAppender) -> None:
        while (job := await queue.get()) is not None:
            rng = random.Random(f"{cfg.seed}|{job.task}|{job.doc.doc_id}|{job.index}")
            try:
                if job.task == "classification":
                    result = await _classification(job, llm, cfg, rng, categories)
                else:
                    result = await _TASK_FUNCS[job.task](job, llm, cfg, rng)
            except Rejected as exc:
                reject(rej, job, exc.stage, exc.reason, exc.raw, exc.transient)
            else:
                out.write(record(job, result))
                stats.done += 1
                stats.tasks[job.task] = stats.tasks.get(job.task, 0) + 1
            bar.set_postfix(done=stats.done, failed=stats.failed, refresh=False)
            bar.update(1)

    try:
        if categories is None and any(task == "classification" for _, task, _ in pending):
            categories = await _propose_categories(docs, output, llm, cfg)
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
    labels: str | Path | None = None,
    glossary: str | Path | None = None,
    glossary_nearest: int = 0,
) -> SynthStats:
    """`synthesize` over a corpus file (read by `qembed.data.corpus.read_corpus`): loads the persona library
    (the shipped one when `personas` is None) when retrieval is among the tasks, the category file `labels`
    (classification; without it the LLM proposes one), the `glossary` file, and `embed_model` when the
    library has more than five entries or `glossary_nearest` > 0 (`device`, `dtype`, `batch_tokens`: None
    for its defaults). `llm` may be a zero-argument factory, called once the inputs have been read and
    checked. `overwrite` deletes the output, its rejects file and a proposed label set first instead of
    resuming them."""
    from qembed.data.corpus import read_corpus
    from qembed.synth.glossary import load_glossary
    from qembed.synth.personas import load_personas

    cfg = config or SynthConfig()
    try:
        categories = load_categories(labels) if labels is not None else None
        terms = load_glossary(glossary) if glossary is not None else None
        docs = [Document(*item) for item in read_corpus(corpus, text_field=text_field, limit=limit).items()]
        library = load_personas(personas) if "retrieval" in cfg.tasks else None
        embedder = None
        if (library is not None and len(library) > 5) or (terms is not None and glossary_nearest > 0):
            from qembed.models.embedder import Embedder

            try:
                embedder = Embedder.from_pretrained(embed_model, device=device, dtype=dtype)
            except ModelNotFoundError as exc:  # the user named it with --embed-model, not --model
                raise ModelNotFoundError(str(exc).replace("--model ", "--embed-model ")) from None
        matcher = None if library is None else PersonaMatcher(library, embedder, batch_tokens=batch_tokens)
        vocabulary = None
        if terms is not None:
            vocabulary = Glossary(terms, embedder, nearest=glossary_nearest, batch_tokens=batch_tokens)
    except BaseException:
        if not callable(llm):
            asyncio.run(llm.aclose())
        raise
    if callable(llm):
        llm = llm()
    if overwrite:
        proposed = categories_path(output)
        for path in (Path(output), rejects_path(output), proposed):
            if path == proposed and labels is not None and Path(labels).resolve() == proposed.resolve():
                continue  # the user's --labels file, not ours to delete
            path.unlink(missing_ok=True)
    return synthesize(docs, output, llm, matcher=matcher, config=cfg, glossary=vocabulary, categories=categories,
                      show_progress=show_progress)  # fmt: skip
