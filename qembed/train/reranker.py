"""Reranker fine-tuning: pointwise SFT on the Reranker's own pair format.

Qwen3-Reranker-style causal LMs: the target is the next token "yes" for a positive pair and "no" for a mined
negative; the loss is cross-entropy over the two logits (no, yes) at the last position, which equals binary
cross-entropy on `yes - no` — exactly the quantity `Reranker.score` turns into a probability. Cross-encoders
(sequence classification) train with binary cross-entropy on their relevance logit. Same loop, LoRA,
checkpoints, resume and evaluation as the embedder recipe.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from qembed.errors import QembedError
from qembed.train import distributed
from qembed.train.config import EVAL_KS, EVAL_METRICS
from qembed.train.data import batch_rng, epoch_batches, pair_batch
from qembed.train.embedder import export_model, prepare_model
from qembed.train.loop import Task, TrainConfig, TrainResult, autocast, max_length, run_training, start_run


def evaluate_reranker(
    rr, dataset, *, num_candidates: int = 20, max_queries: int = 200, seed: int = 0
) -> dict:
    """Rerank, for each test query (at most `max_queries`), its relevant documents plus seeded random corpus
    documents up to `num_candidates`; nDCG/recall/MRR@{1,5,10} of the resulting order (the evaluation
    engine's rerank stage, `qembed.eval.evaluate.evaluate_reranking`)."""
    from qembed.eval.evaluate import evaluate_reranking

    rng = random.Random(seed)
    doc_ids = dataset.doc_ids
    candidates = {}
    for qid in sorted(dataset.queries)[:max_queries]:
        chosen = list(dataset.qrels[qid])
        while len(chosen) < min(num_candidates, len(doc_ids)):
            doc = doc_ids[rng.randrange(len(doc_ids))]
            if doc not in chosen:
                chosen.append(doc)
        candidates[qid] = chosen
    was_training = rr.model.training
    rr.model.eval()
    try:
        return evaluate_reranking(rr, dataset, candidates, k=EVAL_KS["reranker"], metrics=EVAL_METRICS)
    finally:
        rr.model.train(was_training)


def train_reranker(cfg: TrainConfig, *, on_step=None) -> TrainResult:
    """Fine-tune a reranker on training-format JSONL files; `cfg.output` becomes a folder that
    `Reranker.from_pretrained` loads. Each record gives one positive pair and up to `cfg.num_negatives`
    negative pairs; `cfg.grad_cache_chunk` caps the pairs per forward pass."""
    from qembed import Reranker

    run = start_run(cfg, "reranker")
    world, rank, records = run.world, run.rank, run.records
    rr = Reranker.from_pretrained(cfg.model, device=run.device, dtype=torch.float32)
    inference_length, rr.max_length = rr.max_length, min(cfg.max_length, rr.max_length)
    if rr.kind == "qwen3" and rr.max_length <= len(rr._prefix) + len(rr._suffix):
        raise QembedError(f"--max-length {cfg.max_length} leaves no room for the reranker prompt")
    peft_model = prepare_model(rr.model, cfg)

    def batches(epoch: int):
        return epoch_batches(records, cfg.batch_size, seed=cfg.seed, epoch=epoch,
                             same_source=cfg.same_source_batches, min_size=world)  # fmt: skip

    def step(epoch: int, index: int, indices, scale: float):
        pairs = pair_batch(
            records, indices, num_negatives=cfg.num_negatives, rng=batch_rng(cfg.seed, epoch, index)
        )
        start, end = distributed.shard_bounds(len(pairs), world, rank)
        local = pairs[start:end]
        ids = [rr.prepare_pairs(q, [d], instruction=ins)[0] for q, d, ins, _ in local]
        labels = torch.tensor([label for *_, label in local], device=rr.device)
        size = cfg.grad_cache_chunk or len(ids) or 1
        total = 0.0
        for begin in range(0, len(ids), size):
            with autocast(rr.device, cfg.precision):
                logits = rr.forward_logits(rr.collate(ids[begin : begin + size]))
            # mean over the global batch; times world size because gradients are averaged across ranks
            loss = F.binary_cross_entropy_with_logits(
                logits.float(), labels[begin : begin + size], reduction="sum"
            )
            (loss * (scale * world / len(pairs))).backward()
            total += float(loss.detach())
        if distributed.is_distributed():
            summed = torch.tensor([total], device=rr.device)
            torch.distributed.all_reduce(summed)
            total = float(summed)
        return total / len(pairs), len(indices), sum(map(len, ids))

    def evaluate():
        with max_length(rr, inference_length):
            return evaluate_reranker(rr, run.eval_data, seed=cfg.seed)

    task = Task(
        model=rr.model, batches=batches, step=step, evaluate=evaluate if run.eval_data else None,
        export=lambda out: export_model(rr, peft_model, cfg, out, rr.model_dir),
        eval_split=run.eval_data.split if run.eval_data else None, records=records,
    )  # fmt: skip
    return run_training(cfg, task, on_step=on_step)
