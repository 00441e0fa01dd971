"""Embedder fine-tuning recipe: the Embedder's own formatting (instruction template, end-of-text token, pooling),
contrastive loss with the Qwen3 options, optional GradCache / LoRA / DDP, exported as a plain model folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from qembed.errors import QembedError
from qembed.models.layout import write_record
from qembed.models.prompts import MODEL_DEFAULT
from qembed.train import distributed
from qembed.train.config import EVAL_KS, EVAL_METRICS
from qembed.train.contrastive import LossConfig, contrastive_backward
from qembed.train.data import batch_rng, contrastive_batch, epoch_batches
from qembed.train.loop import Task, TrainConfig, TrainResult, autocast, max_length, run_training, start_run

log = logging.getLogger(__name__)

LORA_TARGETS = {
    "decoder": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bert": ["query", "key", "value", "dense"],
}
LORA_AUTO_ABOVE = 300_000_000  # parameters


def default_temperature(pooling: str) -> float:
    """0.01 for last-token LLM embedders (Qwen3-Embedding's τ), 0.05 for mean/CLS-pooling encoders."""
    return 0.01 if pooling == "lasttoken" else 0.05


def apply_lora(model: torch.nn.Module, cfg: TrainConfig):
    """Wrap `model` with LoRA adapters in place (peft); returns the `PeftModel`."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_targets
    if not targets:
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        targets = [t for family in LORA_TARGETS.values() for t in family if t in names]
    if not targets:
        raise QembedError("no LoRA target modules found: pass --lora-targets")
    config = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets
    )
    return get_peft_model(model, config)


def prepare_model(model: torch.nn.Module, cfg: TrainConfig):
    """LoRA or full fine-tuning (resolving `cfg.lora`/`cfg.lr` defaults), gradient checkpointing, train mode.
    Returns the PeftModel (LoRA) or None."""
    if cfg.lora is None:
        cfg.lora = sum(p.numel() for p in model.parameters()) > LORA_AUTO_ABOVE
    if cfg.lr is None:
        cfg.lr = 1e-4 if cfg.lora else 2e-5
    peft_model = apply_lora(model, cfg) if cfg.lora else None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return peft_model


def export_model(holder, peft_model, cfg: TrainConfig, output: Path, original_dir: Path) -> None:
    """Save the trained model as a plain folder (LoRA merged) with its base's tensor names or, with
    `merge_lora=False`, the adapter; either way with a `qembed.json` saying what it is (backbone class,
    pooling, dtype, Matryoshka training) for loading and merging."""
    if cfg.mrl_dims:
        holder.matryoshka = True
    if peft_model is not None and not cfg.merge_lora:
        peft_model.save_pretrained(output)
        holder.tokenizer.save_pretrained(output)
        write_record(output, holder.record())  # the class the adapter's module names belong to
        return
    if peft_model is not None:
        holder.model = peft_model.merge_and_unload()
    holder.model.eval()
    dtype = _saved_dtype(original_dir)
    if dtype is not None:
        holder.model.to(dtype)
    holder.save_pretrained(output)


def _saved_dtype(model_dir: Path) -> torch.dtype | None:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name)


def evaluate_embedder(emb, dataset, ks=EVAL_KS["embedder"]) -> dict[str, float]:
    """nDCG/recall/MRR on a `RetrievalDataset` with the model's current weights: the evaluation engine
    (`qembed.eval.evaluate`, exact search) with vectors kept in memory, as the weights change between calls."""
    from qembed.eval.evaluate import evaluate

    was_training = emb.model.training
    emb.model.eval()
    try:
        metrics = evaluate(emb, dataset, k=ks, cache=False, show_progress=False)[0]["metrics"]
    finally:
        emb.model.train(was_training)
    return {key: value for key, value in metrics.items() if key.split("@")[0] in EVAL_METRICS}


def train_embedder(cfg: TrainConfig, *, on_step=None) -> TrainResult:
    """Fine-tune an embedder on training-format JSONL files; `cfg.output` becomes a model folder that
    `Embedder.from_pretrained` loads. Launch under `torchrun` for multi-GPU (embeddings are gathered across
    ranks; see `qembed.train.distributed`)."""
    from qembed import Embedder

    run = start_run(cfg, "embedder")
    world, rank, records = run.world, run.rank, run.records
    emb = Embedder.from_pretrained(cfg.model, device=run.device, dtype=torch.float32)
    inference_length, emb.max_length = emb.max_length, min(cfg.max_length, emb.max_length)
    peft_model = prepare_model(emb.model, cfg)
    loss_cfg = LossConfig(
        temperature=cfg.temperature or default_temperature(emb.pooling), qq_dd=cfg.qq_dd, fn_margin=cfg.fn_margin,
        mrl_dims=cfg.mrl_dims,
    )  # fmt: skip
    doc_prompt = emb.document_prompt

    def prepare_queries(queries: list[str], instructions: list[str | None]) -> list[list[int]]:
        ids: list[list[int] | None] = [None] * len(queries)
        for instruction in set(instructions):
            rows = [i for i, ins in enumerate(instructions) if ins == instruction]
            prepared = emb.prepare([queries[i] for i in rows], instruction=instruction or MODEL_DEFAULT)
            for i, row_ids in zip(rows, prepared):
                ids[i] = row_ids
        return ids

    def encode(chunk) -> torch.Tensor:
        with autocast(emb.device, cfg.precision):
            return emb.forward_features(emb.collate(chunk))

    def batches(epoch: int):
        return epoch_batches(records, cfg.batch_size, seed=cfg.seed, epoch=epoch,
                             same_source=cfg.same_source_batches, min_size=max(2, world))  # fmt: skip

    def step(epoch: int, index: int, indices, scale: float):
        batch = contrastive_batch(
            records, indices, num_negatives=cfg.num_negatives, rng=batch_rng(cfg.seed, epoch, index)
        )
        start, end = distributed.shard_bounds(len(indices), world, rank)
        q_rows, d_rows = batch.shard(start, end)
        q_ids = prepare_queries([batch.queries[i] for i in q_rows], [batch.instructions[i] for i in q_rows])
        d_ids = emb.prepare([batch.docs[j] for j in d_rows], prompt=doc_prompt)
        loss = contrastive_backward(
            encode, q_ids, d_ids, batch.pos_index, batch.owner, loss_cfg, same_text=batch.same_text,
            chunk_size=cfg.grad_cache_chunk, cached=bool(cfg.grad_cache_chunk), scale=scale,
        )  # fmt: skip
        return loss, len(indices), sum(map(len, q_ids)) + sum(map(len, d_ids))

    def evaluate():
        with max_length(emb, inference_length):
            return evaluate_embedder(emb, run.eval_data)

    task = Task(
        model=emb.model, batches=batches, step=step, evaluate=evaluate if run.eval_data else None,
        export=lambda out: export_model(emb, peft_model, cfg, out, emb.model_dir),
        eval_split=run.eval_data.split if run.eval_data else None, records=records,
    )  # fmt: skip
    return run_training(cfg, task, on_step=on_step)
