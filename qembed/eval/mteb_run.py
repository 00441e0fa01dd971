"""MTEB and C-MTEB through the `mteb` package (the `mteb` extra).

qembed's models go to mteb through two small adapters: `MtebEmbedder` (mteb's encoder protocol, over
`Embedder`) and `MtebReranker` (its cross-encoder protocol, over `Reranker`). The embedder applies each task's
instruction (mteb's task metadata: one query prompt per task, the instructions Qwen3-Embedding's own evaluation
uses) to queries only, in the Qwen3 template, and the model's document prompt to documents; inputs of
symmetric tasks (STS, classification, clustering: mteb passes no prompt type) are all formatted as queries.
The task instruction is used for instruction-aware models (those whose own query format is an instruction);
other models keep their own query format. An instruction file (task name -> instruction) overrides, and
`use_task_instructions=False` encodes queries bare.

`LocalRetrievalTask` makes an mteb retrieval task of a BEIR folder (read by `qembed.data.beir`), so a run
needs no hub and works on the user's own data. `run_mteb` writes results in mteb's own layout
(`OUTPUT/results/<model>/<revision>/<task>.json`, readable with `mteb.ResultCache(OUTPUT).load_results()`);
a task already there for the same model, revision and settings is not run again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qembed.data.beir import RetrievalDataset
from qembed.errors import QembedError
from qembed.models.prompts import MODEL_DEFAULT, NO_INSTRUCTION, QueryFormat

log = logging.getLogger(__name__)

LOCAL_LANGUAGE = "und-Zyyy"  # ISO 639-3 "undetermined": a local folder's language is not declared
RETRIEVAL_CONFIGS = "its corpus, queries and qrels"


def require_mteb():
    """The `mteb` module, or a one-line error saying how to install it."""
    try:
        import mteb
    except ImportError:
        raise QembedError("qembed mteb needs the mteb package: pip install 'qembed[mteb]'") from None
    return mteb


# ------------------------------------------------------------------------------------------- instructions
def read_instruction_file(path: str | Path) -> dict[str, str]:
    """Task name -> query instruction, from a JSON object or a two-column TSV file (`task<TAB>instruction`;
    blank lines and lines starting with `#` are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise QembedError(f"instruction file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise QembedError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise QembedError(f"{path}: expected a JSON object of task name -> instruction text")
        return {k: v for k, v in data.items()}
    instructions: dict[str, str] = {}
    for number, row in enumerate(csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
        if not row or not "".join(row).strip() or row[0].startswith("#"):
            continue
        if len(row) != 2 or not row[0].strip():
            raise QembedError(f"{path}:{number}: expected two tab-separated columns: task name, instruction")
        instructions[row[0].strip()] = row[1]
    return instructions


@dataclass
class InstructionPolicy:
    """Which query format each task gets: an instruction file entry, else (with `use_task_instructions`) the
    task's mteb instruction for instruction-aware models, else the model's own format; with
    `use_task_instructions=False` and no file entry, bare queries. `local` names tasks made from local folders:
    they get the model's own query format (as `qembed eval` does), unless the file names them."""

    overrides: dict[str, str] = field(default_factory=dict)
    use_task_instructions: bool = True
    local: frozenset[str] = frozenset()

    def instruction(self, task_metadata) -> str | None:
        """The task's instruction text (an override, or mteb's query prompt), or None."""
        if task_metadata.name in self.overrides:
            return self.overrides[task_metadata.name] or None
        if not self.use_task_instructions or task_metadata.name in self.local:
            return None
        prompt = task_metadata.prompt
        if isinstance(prompt, dict):
            prompt = prompt.get("query")
        if not prompt:
            from mteb.abstasks.abstask import get_abstask_prompt

            prompt = get_abstask_prompt(task_metadata.name)
        return prompt or None

    def query_format(self, embedder, task_metadata) -> QueryFormat:
        if task_metadata.name in self.overrides:
            return QueryFormat.of(self.overrides[task_metadata.name] or None)
        if not self.use_task_instructions:
            return NO_INSTRUCTION
        own = embedder.resolve_query_format(MODEL_DEFAULT)
        if task_metadata.name in self.local or own.kind != "instruction":
            return own
        return QueryFormat.of(self.instruction(task_metadata))

    def reranker_instruction(self, reranker, task_metadata) -> str | None:
        """A Qwen3 reranker's instruction (None: its default); cross-encoders take none."""
        return self.instruction(task_metadata) if reranker.kind == "qwen3" else None


# ------------------------------------------------------------------------------------------------- models
def _texts(inputs) -> list[str]:
    return [text for batch in inputs for text in batch["text"]]


def model_meta(name_or_path: str, *, revision: str, kind: str, embed_dim: int | None, max_tokens: int | None,
               n_parameters: int | None, use_instructions: bool, experiment: Mapping[str, Any] | None):  # fmt: skip
    """mteb's `ModelMeta` for a qembed model: a hub id as its name, a local folder as `<parent>/<folder>`."""
    require_mteb()
    from mteb.models.model_meta import ModelMeta

    path = Path(name_or_path)
    name = str(name_or_path)
    if path.exists() or "/" not in name:
        name = f"{path.resolve().parent.name or 'local'}/{path.name}"
    return ModelMeta(
        loader=None, name=name, revision=revision, release_date=None, languages=None, n_parameters=n_parameters,
        memory_usage_mb=None, max_tokens=max_tokens, embed_dim=embed_dim, license=None, open_weights=True,
        public_training_code=None, public_training_data=None, framework=["PyTorch"],
        similarity_fn_name="cosine" if kind == "dense" else None, use_instructions=use_instructions,
        training_datasets=None, model_type=[kind], experiment_kwargs=dict(experiment) if experiment else None,
    )  # fmt: skip


def _revision(model) -> str:
    """The hub snapshot's commit for a hub model, else the weights fingerprint of the folder."""
    model_dir = Path(model.model_dir)
    if model_dir.parent.name == "snapshots" and len(model_dir.name) == 40:
        return model_dir.name
    from qembed.models.loading import weights_fingerprint

    return weights_fingerprint(model_dir)


def _parameters(model) -> int:
    return sum(p.numel() for p in model.model.parameters()) if model.model is not None else None


class MtebEmbedder:
    """An `Embedder` as an mteb encoder (`mteb.EncoderProtocol`): task instructions on queries only."""

    def __init__(self, embedder, *, policy: InstructionPolicy, dim: int | None = None,
                 batch_tokens: int | None = None, show_progress: bool | None = None,
                 experiment: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        self.embedder = embedder
        self.policy = policy
        self.dim = dim
        self.batch_tokens = batch_tokens
        self.show_progress = show_progress
        self.mteb_model_meta = model_meta(
            embedder.name_or_path, revision=_revision(embedder), kind="dense", embed_dim=dim or embedder.hidden_size,
            max_tokens=embedder.max_length, n_parameters=_parameters(embedder),
            use_instructions=embedder.default_query_format.kind == "instruction", experiment=experiment,
        )  # fmt: skip

    def query_format(self, task_metadata) -> QueryFormat:
        return self.policy.query_format(self.embedder, task_metadata)

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs) -> np.ndarray:
        """Vectors of the loader's texts: documents with the model's document prompt, everything else (queries,
        and the inputs of symmetric tasks) in the task's query format."""
        from mteb.types import PromptType

        texts = _texts(inputs)
        options = {"dim": self.dim, "batch_tokens": self.batch_tokens, "show_progress": self.show_progress}
        if prompt_type == PromptType.document:
            return self.embedder.encode_documents(texts, **options)
        return self.embedder.encode(texts, instruction=self.query_format(task_metadata), **options)

    def similarity(self, embeddings1, embeddings2):
        from mteb.similarity_functions import cos_sim

        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        from mteb.similarity_functions import pairwise_cos_sim

        return pairwise_cos_sim(embeddings1, embeddings2)


class MtebReranker:
    """A `Reranker` as an mteb cross-encoder (`mteb.CrossEncoderProtocol`): scores (query, document) pairs of
    reranking tasks with the task's instruction (Qwen3 rerankers)."""

    def __init__(self, reranker, *, policy: InstructionPolicy, batch_tokens: int | None = None,
                 show_progress: bool | None = None, experiment: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        self.reranker = reranker
        self.policy = policy
        self.batch_tokens = batch_tokens
        self.show_progress = show_progress
        self.mteb_model_meta = model_meta(
            reranker.name_or_path, revision=_revision(reranker), kind="cross-encoder", embed_dim=None,
            max_tokens=reranker.max_length, n_parameters=_parameters(reranker), use_instructions=reranker.kind == "qwen3",
            experiment=experiment,
        )  # fmt: skip

    def predict(self, inputs1, inputs2, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
                **kwargs) -> np.ndarray:  # fmt: skip
        pairs = list(zip(_texts(inputs1), _texts(inputs2), strict=True))
        scores = self.reranker.score_pairs(pairs, instruction=self.policy.reranker_instruction(self.reranker, task_metadata),
                                           batch_tokens=self.batch_tokens, show_progress=self.show_progress)  # fmt: skip
        return np.asarray(scores, dtype=np.float32)


# ------------------------------------------------------------------------------------------ local folders
def local_retrieval_task(folder: str | Path, split: str = "test", name: str | None = None):
    """An mteb retrieval task (nDCG@10 main score) over a BEIR folder; its name is the folder's name."""
    mteb = require_mteb()
    from mteb.abstasks.retrieval import AbsTaskRetrieval

    folder = Path(folder)
    if not folder.is_dir():
        raise QembedError(f"dataset folder not found: {folder}")
    if not (folder / "qrels" / f"{split}.tsv").is_file():
        available = sorted(p.stem for p in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
        raise QembedError(f"no qrels for split {split!r} in {folder} (available: {available or 'none'})")
    task_name = name or folder.resolve().name
    metadata = mteb.TaskMetadata(
        name=task_name, description=f"Local BEIR folder {folder}", reference=None,
        dataset={"path": str(folder.resolve()), "revision": _folder_revision(folder, split)}, type="Retrieval",
        category="t2t", modalities=["text"], eval_splits=[split], eval_langs=[LOCAL_LANGUAGE], main_score="ndcg_at_10",
        date=None, domains=None, task_subtypes=None, license=None, annotations_creators=None, dialect=None,
        sample_creation=None, bibtex_citation="",
    )  # fmt: skip

    class LocalRetrievalTask(AbsTaskRetrieval):
        """A BEIR folder read by `qembed.data.beir.RetrievalDataset` (the judged queries of one split)."""

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            from datasets import Dataset

            data = RetrievalDataset.load(folder, split=split)
            corpus = Dataset.from_dict({"id": data.doc_ids, "title": [""] * len(data.doc_ids),
                                        "text": list(data.iter_doc_texts())})  # fmt: skip
            queries = Dataset.from_dict({"id": data.query_ids, "text": [data.queries[q] for q in data.query_ids]})
            self.dataset = {"default": {split: {"corpus": corpus, "queries": queries, "relevant_docs": data.qrels,
                                                "top_ranked": None}}}  # fmt: skip
            self.data_loaded = True

    LocalRetrievalTask.metadata = metadata
    return LocalRetrievalTask()


def _folder_revision(folder: Path, split: str) -> str:
    """A short id of the folder's files (names, sizes, times), recorded as the task's dataset revision."""
    digest = hashlib.sha1()
    for path in (folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / f"{split}.tsv"):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


# -------------------------------------------------------------------------------------------------- runs
def resolve_tasks(tasks: Sequence[str] = (), benchmark: str | None = None) -> list:
    """mteb tasks by name and/or the tasks of a benchmark (e.g. "MTEB(cmn, v1)"); unknown names are one line."""
    mteb = require_mteb()
    resolved = []
    if benchmark:
        try:
            resolved += list(mteb.get_benchmark(benchmark).tasks)
        except (KeyError, ValueError) as exc:
            raise QembedError(f"unknown mteb benchmark {benchmark!r} ({_first_line(exc)})") from None
    for name in tasks:
        try:
            resolved.append(mteb.get_task(name))
        except (KeyError, ValueError) as exc:
            raise QembedError(f"unknown mteb task {name!r} ({_first_line(exc)})") from None
    unique = {task.metadata.name: task for task in resolved}
    return list(unique.values())


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().strip("'\"").removeprefix("KeyError: ")
    return text.splitlines()[0][:300] if text else type(exc).__name__


def check_hub_data(tasks: Sequence) -> None:
    """Fail in one line, before any model is loaded, when a task's data is neither in the local Hugging Face
    cache nor reachable on the hub: which dataset (and revision, and for retrieval tasks which parts) it needs,
    and how to give mteb a local copy."""
    from datasets import get_dataset_config_names

    for task in tasks:
        subtasks = getattr(task.metadata, "tasks", None)  # an aggregate task: its parts hold the data
        if subtasks:
            check_hub_data(subtasks)
            continue
        dataset = task.metadata.dataset
        try:
            get_dataset_config_names(dataset["path"], revision=dataset.get("revision"))
        except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError or its own errors offline
            raise QembedError(hub_data_message(task, exc)) from None


def hub_data_message(task, exc: Exception | None = None) -> str:
    metadata = task.metadata
    path, revision = metadata.dataset["path"], metadata.dataset.get("revision") or "main"
    parts = f" ({RETRIEVAL_CONFIGS})" if metadata.type in ("Retrieval", "Reranking") else ""
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") else ""
    return (f"{metadata.name} needs the Hugging Face dataset {path} at revision {revision}{parts}, which is neither "
            f"in the local Hugging Face cache nor reachable{offline}: on a machine with network run "
            f"`python -c \"import mteb; mteb.get_task('{metadata.name}').load_data()\"`, copy its Hugging Face cache "
            f"(~/.cache/huggingface, or $HF_HOME) here and set HF_HOME to it (with HF_HUB_OFFLINE=1), or run a BEIR "
            f"copy of the data with --dataset DIR")  # fmt: skip


@dataclass
class MtebScore:
    """One task's result as printed: the main score of each split and subset."""

    task: str
    model: str
    split: str
    subset: str
    metric: str  # the task's main score, e.g. "ndcg_at_10"
    value: float


def run_mteb(*, output: str | Path, model=None, reranker=None, tasks: Sequence[str] = (), benchmark: str | None = None,
             dataset: str | Path | None = None, split: str = "test", instruction_file: str | Path | None = None,
             use_task_instructions: bool = True, quantize: str | None = None, dim: int | None = None,
             batch_tokens: int | None = None, rerank_top: int = 100, device: str | None = None,
             dtype: str | None = None, show_progress: bool | None = None) -> list[MtebScore]:  # fmt: skip
    """Run mteb tasks (`tasks`, a `benchmark`, and/or a local BEIR `dataset`) with an embedder `model` and/or a
    `reranker`, writing mteb's results layout under `output`; returns the main scores.

    The reranker runs mteb's reranking tasks; on retrieval tasks it reorders the embedder's top `rerank_top`
    (mteb's two-stage evaluation: the embedder's predictions become the task's candidates). `quantize="int8"`,
    `dim`, an instruction file and `use_task_instructions=False` are recorded as mteb experiment settings, so
    their results sit beside, not over, the default run's.
    """
    mteb = require_mteb()
    if model is None and reranker is None:
        raise QembedError("give --model (an embedder), --reranker, or both")
    if dataset is None and not tasks and not benchmark:
        raise QembedError("give --tasks, --benchmark or --dataset")
    if rerank_top < 1:
        raise QembedError(f"--rerank-top must be at least 1, got {rerank_top}")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise QembedError(f"--output {output} is a file, not a folder")
    overrides = read_instruction_file(instruction_file) if instruction_file else {}
    hub_tasks = resolve_tasks(tasks, benchmark)
    local = [local_retrieval_task(dataset, split)] if dataset is not None else []
    local_names = frozenset(t.metadata.name for t in local)
    _check_instruction_names(overrides, {t.metadata.name for t in hub_tasks} | local_names, instruction_file)
    rerank_tasks = [t for t in hub_tasks if t.metadata.type == "Reranking"]
    if model is None:
        others = [t.metadata.name for t in [*hub_tasks, *local] if t.metadata.type != "Reranking"]
        if others:
            raise QembedError(f"a reranker alone runs reranking tasks only; give --model for {', '.join(others[:5])}")
    check_hub_data(hub_tasks)

    policy = InstructionPolicy(overrides, use_task_instructions, local_names)
    experiment: dict[str, Any] = {}
    if overrides:
        experiment["instructions"] = hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
    elif not use_task_instructions:
        experiment["instructions"] = "none"
    if quantize:
        experiment["quantize"] = quantize
    if not show_progress:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    cache = mteb.ResultCache(cache_path=output)
    encode_kwargs = {"batch_size": 512, "show_progress_bar": bool(show_progress)}
    scores: list[MtebScore] = []

    def evaluate(adapter, task_list, **kwargs) -> None:
        if not task_list:
            return
        results = mteb.evaluate(adapter, task_list, cache=cache, encode_kwargs=dict(encode_kwargs), co2_tracker=False,
                                show_progress_bar=bool(show_progress), **kwargs)  # fmt: skip
        metrics = {task.metadata.name: task.metadata.main_score for task in task_list}
        scores.extend(_main_scores(results, adapter.mteb_model_meta.name, metrics))

    emb_adapter = None
    if model is not None:
        from qembed.models.embedder import Embedder

        emb = model if isinstance(model, Embedder) else Embedder.from_pretrained(model, device=device, dtype=dtype,
                                                                                 quantize=quantize)  # fmt: skip
        if dim is not None and not (isinstance(dim, int) and 0 < dim <= emb.hidden_size):
            raise QembedError(f"--dim must be between 1 and {emb.hidden_size} for {emb.name_or_path}, got {dim!r}")
        emb_adapter = MtebEmbedder(emb, policy=policy, dim=dim, batch_tokens=batch_tokens, show_progress=show_progress,
                                   experiment={**experiment, **({"dim": dim} if dim else {})})  # fmt: skip
        first_stage = [t for t in hub_tasks if not (reranker is not None and t in rerank_tasks)]
        evaluate(emb_adapter, first_stage)
        predictions = output / "predictions" / emb_adapter.mteb_model_meta.model_name_as_path()
        # a local folder may have changed under the same name: always rerun it
        evaluate(emb_adapter, local, overwrite_strategy="always",
                 **({"prediction_folder": predictions} if reranker is not None else {}))  # fmt: skip
    if reranker is not None:
        from qembed.models.reranker import Reranker

        rr = reranker if isinstance(reranker, Reranker) else Reranker.from_pretrained(reranker, device=device, dtype=dtype,
                                                                                      quantize=quantize)  # fmt: skip
        rr_experiment = dict(experiment)
        if local:
            rr_experiment.update(first_stage=emb_adapter.mteb_model_meta.name, rerank_top=rerank_top)
        rr_adapter = MtebReranker(rr, policy=policy, batch_tokens=batch_tokens, show_progress=show_progress,
                                  experiment=rr_experiment)  # fmt: skip
        evaluate(MtebReranker(rr, policy=policy, batch_tokens=batch_tokens, show_progress=show_progress,
                              experiment=experiment), rerank_tasks)  # fmt: skip
        two_stage = []
        for task in local:
            again = local_retrieval_task(dataset, split, name=task.metadata.name)
            again.load_data()
            two_stage.append(again.convert_to_reranking(predictions, top_k=rerank_top))
        evaluate(rr_adapter, two_stage, overwrite_strategy="always")
    return scores


def _check_instruction_names(overrides: Mapping[str, str], running: set[str], path) -> None:
    """An instruction-file key that names no mteb task and no local folder of this run is a typo: one line."""
    if not overrides:
        return
    mteb = require_mteb()
    unknown = []
    for name in overrides:
        if name in running:
            continue
        try:
            mteb.get_task(name)
        except (KeyError, ValueError):
            unknown.append(name)
    if unknown:
        raise QembedError(f"{path}: {', '.join(repr(n) for n in unknown[:5])} name(s) no mteb task and no --dataset "
                          f"of this run")  # fmt: skip


def _main_scores(results, model_name: str, metrics: Mapping[str, str]) -> list[MtebScore]:
    rows = []
    for task_result in results.task_results:
        for split, entries in task_result.scores.items():
            for entry in entries:
                rows.append(MtebScore(task_result.task_name, model_name, split, entry.get("hf_subset", "default"),
                                      metrics.get(task_result.task_name, "main_score"), float(entry["main_score"])))  # fmt: skip
    if getattr(results, "exceptions", None):
        failed = "; ".join(f"{e.task_name}: {_first_line(Exception(e.exception))}" for e in results.exceptions)
        raise QembedError(f"mteb failed: {failed}")
    return rows
