"""The training loop shared by the embedder and reranker recipes: AdamW with warm-up and linear/cosine decay,
gradient accumulation and clipping, JSONL logging, checkpoints with exact resumption, periodic evaluation
with best-checkpoint tracking."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from qembed.data.jsonl import JsonlAppender, iter_jsonl, write_jsonl
from qembed.errors import QembedError
from qembed.train import checkpoint, distributed

log = logging.getLogger(__name__)
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainConfig:
    """Options of `train_embedder` / `train_reranker` (the CLI flags of `qembed train`).

    `None` defaults are chosen from the model: `lora` (LoRA for models over 300M parameters, full fine-tuning
    below), `lr` (1e-4 with LoRA, 2e-5 full), `temperature` (embedder: 0.01 for last-token LLM embedders,
    0.05 for mean/CLS-pooling encoders), `lora_targets` (the attention and MLP projections of the family).
    """

    model: str
    data: list[str]
    output: str
    epochs: int = 1
    batch_size: int = 32
    lr: float | None = None
    lora: bool | None = None
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None
    merge_lora: bool = True
    temperature: float | None = None
    qq_dd: bool = True
    fn_margin: float | None = 0.1
    mrl_dims: list[int] | None = None
    num_negatives: int = 3
    grad_cache_chunk: int | None = None
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    scheduler: str = "linear"
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    max_length: int = 512
    save_steps: int = 500
    save_total_limit: int | None = 2
    resume: bool = False
    eval_dataset: str | None = None
    eval_steps: int = 0
    eval_split: str = "test"
    eval_metric: str = "ndcg@10"
    load_best: bool = False
    same_source_batches: bool = False
    seed: int = 0
    device: str | None = None
    precision: str = "auto"
    max_steps: int | None = None
    progress: bool = True


@dataclass
class Task:
    """What a recipe gives the loop. `step(epoch, index, batch, scale)` runs forward + backward of one
    micro-batch with the loss multiplied by `scale` and returns (loss, samples, tokens)."""

    model: torch.nn.Module
    batches: Callable[[int], list[Any]]
    step: Callable[[int, int, Any, float], tuple[float, int, int]]
    export: Callable[[Path], None]
    evaluate: Callable[[], dict[str, float]] | None = None


@dataclass
class TrainResult:
    output: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    best: dict[str, Any] | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start_run(cfg) -> tuple[int, int, list, torch.device | None]:
    """Common start of a training recipe: join the process group (under torchrun), seed, read the data and
    pick the device. Returns (world size, rank, records, device or None for the loader's default)."""
    from qembed.train.data import read_training_data

    distributed.init_from_env()
    seed_everything(cfg.seed)
    records = read_training_data(cfg.data)
    device = torch.device(cfg.device) if cfg.device else None
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return distributed.world_size(), distributed.rank(), records, device


def resolve_precision(device: torch.device, precision: str) -> str:
    """ "fp32" off CUDA; on CUDA "auto" means bf16 where supported, else fp16."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise QembedError(f"unknown precision {precision!r}: choose auto, fp32, bf16 or fp16")
    if device.type != "cuda" or precision == "fp32":
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast on CUDA (see `resolve_precision`); nothing elsewhere."""
    resolved = resolve_precision(device, precision)
    if resolved == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if resolved == "bf16" else torch.float16)


def make_scheduler(optimizer, name: str, warmup: int, total: int):
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    if name == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total)
    if name == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total)
    raise QembedError(f"unknown scheduler {name!r}: choose linear or cosine")


def _truncate_log(path: Path, last_step: int) -> None:
    if path.exists():
        kept = [r for r in iter_jsonl(path, allow_truncated_tail=True) if r.get("step", 0) <= last_step]
        write_jsonl(path, kept)


def run_training(
    cfg: TrainConfig, task: Task, *, on_step: Callable[[dict], None] | None = None
) -> TrainResult:
    """Train `task.model`'s trainable parameters as `cfg` says, then `task.export(cfg.output)` (rank 0)."""
    output = Path(cfg.output)
    ckpt_dir = output / "checkpoints"
    is_main = distributed.rank() == 0
    existing = checkpoint.list_checkpoints(ckpt_dir)
    if existing and not cfg.resume:
        raise QembedError(
            f"{ckpt_dir} already has checkpoints: pass --resume to continue, or use a new --output"
        )
    params = [p for p in task.model.parameters() if p.requires_grad]
    if not params:
        raise QembedError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    num_batches = len(task.batches(0))
    if num_batches == 0:
        raise QembedError("not enough training records for one batch")
    if cfg.grad_accum < 1:
        raise QembedError(f"--grad-accum must be at least 1, got {cfg.grad_accum}")
    steps_per_epoch = math.ceil(num_batches / cfg.grad_accum)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    scheduler = make_scheduler(optimizer, cfg.scheduler, int(cfg.warmup_ratio * total), total)
    device = params[0].device
    # fp16 needs loss scaling: the loss is multiplied by the scaler's factor, gradients unscaled before clipping
    scaler = torch.amp.GradScaler("cuda") if resolve_precision(device, cfg.precision) == "fp16" else None

    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "best": None, "best_step": None}
    log_path = output / LOG_FILE
    if cfg.resume and existing:
        state = checkpoint.load_checkpoint(existing[-1], task.model, optimizer, scheduler, scaler)
        log.warning("resuming from %s (step %d)", existing[-1], state["step"])
        if is_main:
            _truncate_log(log_path, state["step"])
    elif is_main and log_path.exists():
        log_path.unlink()
    if is_main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    logger = JsonlAppender(log_path, fsync=False) if is_main else None
    result = TrainResult(output=output, steps=state["step"])

    bar = tqdm(
        total=total, initial=state["step"], desc="train", unit="step", disable=not (cfg.progress and is_main)
    )
    stop = state["step"] >= total
    try:
        for epoch in range(state["epoch"], cfg.epochs):
            if stop:
                break
            batches = task.batches(epoch)
            start = state["batch"] if epoch == state["epoch"] else 0
            for group_start in range(start, len(batches), cfg.grad_accum):
                group = range(group_start, min(group_start + cfg.grad_accum, len(batches)))
                began = time.perf_counter()
                losses, samples, tokens = [], 0, 0
                loss_scale = float(scaler.scale(torch.ones((), device=device))) if scaler else 1.0
                for index in group:
                    loss, n, t = task.step(epoch, index, batches[index], loss_scale / len(group))
                    losses.append(loss)
                    samples, tokens = samples + n, tokens + t
                distributed.average_gradients(params)
                if scaler:
                    scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
                lr = scheduler.get_last_lr()[0]
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                elapsed = time.perf_counter() - began
                done = group.stop == len(batches)
                state.update(
                    step=state["step"] + 1,
                    epoch=epoch + 1 if done else epoch,
                    batch=0 if done else group.stop,
                )
                record = {
                    "step": state["step"], "epoch": epoch, "loss": sum(losses) / len(losses), "lr": lr,
                    "grad_norm": float(norm), "samples_per_s": samples / elapsed,
                    "tokens_per_s": tokens * distributed.world_size() / elapsed,
                }  # fmt: skip
                result.losses.append(record["loss"])
                if logger:
                    logger.write(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
                stop = state["step"] >= total
                if task.evaluate and cfg.eval_steps and (state["step"] % cfg.eval_steps == 0 or stop):
                    _evaluate(cfg, task, state, logger, ckpt_dir)
                if cfg.save_steps and state["step"] % cfg.save_steps == 0 and not stop:
                    if is_main:
                        checkpoint.save_checkpoint(
                            ckpt_dir,
                            task.model,
                            optimizer,
                            scheduler,
                            state,
                            keep=cfg.save_total_limit,
                            scaler=scaler,
                        )
                    _barrier()
                if on_step:
                    on_step(record)
                if stop:
                    break
    finally:
        bar.close()
        if logger:
            logger.close()

    if cfg.load_best and state.get("best_step") is not None:
        from safetensors.torch import load_file

        checkpoint.load_trainable_state(
            task.model, load_file(str(ckpt_dir / "best" / "trainable.safetensors"))
        )
    if is_main:
        task.export(output)
    _barrier()
    result.steps = state["step"]
    result.best = {"metric": cfg.eval_metric, "value": state["best"], "step": state["best_step"]}
    return result


def _evaluate(cfg: TrainConfig, task: Task, state: dict, logger, ckpt_dir: Path) -> None:
    if distributed.rank() == 0:
        metrics = task.evaluate()
        value = metrics.get(cfg.eval_metric)
        if value is None:
            raise QembedError(f"eval metric {cfg.eval_metric!r} not computed (have {sorted(metrics)})")
        if state["best"] is None or value > state["best"]:
            state.update(best=value, best_step=state["step"])
            checkpoint.save_best(ckpt_dir, task.model, {"step": state["step"], cfg.eval_metric: value})
        logger.write({"step": state["step"], "eval": metrics, "best_step": state["best_step"]})
    _barrier()


def _barrier() -> None:
    if distributed.is_distributed():
        torch.distributed.barrier()
