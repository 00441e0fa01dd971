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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qembed.data.jsonl import JsonlAppender, iter_jsonl, write_jsonl
from qembed.errors import QembedError
from qembed.models.card import train_card
from qembed.progress import progress_bar
from qembed.train import checkpoint, distributed
from qembed.train.config import CONFIG_FILE, TrainConfig, check_model, check_output, saved_record, validate

__all__ = ["TrainConfig", "Task", "TrainResult", "Run", "start_run", "run_training"]

log = logging.getLogger(__name__)
LOG_FILE = "train_log.jsonl"


@dataclass
class Task:
    """What a recipe gives the loop. `step(epoch, index, batch, scale)` runs forward + backward of one
    micro-batch with the loss multiplied by `scale` and returns (loss, samples, tokens)."""

    model: torch.nn.Module
    batches: Callable[[int], list[Any]]
    step: Callable[[int, int, Any, float], tuple[float, int, int]]
    export: Callable[[Path], None]
    evaluate: Callable[[], dict[str, float]] | None = None
    eval_split: str | None = None
    records: list = field(default_factory=list)  # the training records (for the model card's data summary)


@dataclass
class TrainResult:
    """What a training run returns: the output folder, the optimizer steps taken, the loss per step and the
    best evaluation (`{metric, value, step}`) when an evaluation dataset was given."""

    output: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    best: dict[str, Any] | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Run:
    """What `start_run` gives a recipe."""

    world: int
    rank: int
    records: list
    device: torch.device | None  # None: the loader's default
    eval_data: Any = None  # RetrievalDataset when cfg.eval_dataset


def start_run(cfg: TrainConfig, recipe: str) -> Run:
    """Common start of a training recipe, before any model is loaded: check every option (and, resuming, that
    they match the checkpoints'), join the process group (under torchrun), seed, read the training data and
    the evaluation split (records asking a carved dev query are left out), check the model's config."""
    from qembed.train.data import read_training_data
    from qembed.train.evalsplit import held_out, load_eval_dataset

    validate(cfg, recipe)
    check_output(cfg, bool(checkpoint.list_checkpoints(Path(cfg.output) / "checkpoints")))
    distributed.init_from_env()
    if distributed.rank() != 0:  # one copy of each warning
        logging.getLogger("qembed").setLevel(logging.ERROR)
    seed_everything(cfg.seed)
    eval_data = load_eval_dataset(cfg.eval_dataset, cfg.eval_split, seed=cfg.seed) if cfg.eval_dataset else None
    records = held_out(read_training_data(cfg.data), eval_data)
    check_model(cfg, recipe)
    device = torch.device(cfg.device) if cfg.device else None
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return Run(distributed.world_size(), distributed.rank(), records, device, eval_data)


@contextlib.contextmanager
def max_length(holder, length: int):
    """Temporarily set an Embedder's or Reranker's token limit (evaluation runs at the inference length)."""
    saved, holder.max_length = holder.max_length, length
    try:
        yield
    finally:
        holder.max_length = saved


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
    existing = checkpoint.list_checkpoints(ckpt_dir)  # start_run refused them unless resuming
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
        (output / CONFIG_FILE).write_text(json.dumps(saved_record(cfg), indent=2))
    logger = JsonlAppender(log_path, fsync=False) if is_main else None
    result = TrainResult(output=output, steps=state["step"])

    bar = progress_bar(
        total=total, initial=state["step"], desc="train", unit="step", enabled=None if cfg.progress and is_main else False
    )
    stop = state["step"] >= total
    last_save = time.monotonic()
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
                bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}", refresh=False)
                bar.update(1)
                stop = state["step"] >= total
                if task.evaluate and (stop or (cfg.eval_steps and state["step"] % cfg.eval_steps == 0)):
                    _evaluate(cfg, task, state, logger, ckpt_dir)
                due = bool(cfg.save_minutes) and time.monotonic() - last_save >= 60 * cfg.save_minutes
                if ((cfg.save_steps and state["step"] % cfg.save_steps == 0) or due) and not stop:
                    last_save = time.monotonic()
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
        train_card(output, cfg, records=task.records, eval_split=task.eval_split, steps=state["step"],
                   best_step=state.get("best_step") if cfg.load_best else None)  # fmt: skip
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
        logger.write({"step": state["step"], "split": task.eval_split, "eval": metrics, "best_step": state["best_step"]})
        names = dict.fromkeys([cfg.eval_metric, "recall@1", "recall@5", "recall@10"])
        shown = ", ".join(f"{k} {100 * metrics[k]:.2f}" for k in names if k in metrics)
        print(f"step {state['step']}: {task.eval_split} {shown} (best {cfg.eval_metric} {100 * state['best']:.2f} "
              f"at step {state['best_step']})", flush=True)
    _barrier()


def _barrier() -> None:
    if distributed.is_distributed():
        torch.distributed.barrier()
