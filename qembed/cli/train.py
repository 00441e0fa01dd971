"""`qembed train embedder|reranker`: fine-tune on training-format JSONL files (see qembed.train)."""

from __future__ import annotations

import argparse

from qembed.cli.common import add_list, add_progress_args, check_output
from qembed.train.config import TrainConfig

D = TrainConfig  # the CLI's defaults are the library's


def _margin(text: str) -> float | None:
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'off', got {text!r}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder or hub id to start from")
    add_list(p, "--data", required=True, metavar="FILES",
             help="training pairs, comma-separated or repeated: qembed JSONL ({query, pos, neg}), ms-swift or "
                  "sentence-transformers rows (JSONL, .parquet or a datasets folder; see qembed data convert)")  # fmt: skip
    p.add_argument(
        "--output", required=True, help="output folder: the trained model, checkpoints/ and train_log.jsonl"
    )
    p.add_argument("--epochs", type=int, default=D.epochs, help="passes over the training data")
    p.add_argument("--batch-size", type=int, default=D.batch_size, help="records per step (all ranks together)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-4 with LoRA, 2e-5 full)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="lora", action="store_true", default=None,
                      help="train LoRA adapters (default: LoRA above 300M parameters, else full)")  # fmt: skip
    mode.add_argument("--full", dest="lora", action="store_false", help="full fine-tuning")
    p.add_argument("--lora-r", type=int, default=D.lora_r, help="LoRA rank")
    p.add_argument("--lora-alpha", type=int, default=D.lora_alpha, help="LoRA scaling alpha")
    p.add_argument("--lora-dropout", type=float, default=D.lora_dropout, help="dropout on the LoRA input")
    add_list(p, "--lora-targets", default=None, metavar="NAMES",
             help="module names, e.g. q_proj,v_proj (default: attention and MLP projections of the family)")  # fmt: skip
    p.add_argument("--no-merge-lora", dest="merge_lora", action="store_false",
                   help="export the LoRA adapter instead of the merged model")  # fmt: skip
    p.add_argument("--num-negatives", type=int, default=D.num_negatives,
                   help="hard negatives used per record (drawn per epoch when a record has more)")  # fmt: skip
    p.add_argument("--grad-accum", type=int, default=D.grad_accum, help="batches per optimizer step")
    p.add_argument("--warmup-ratio", type=float, default=D.warmup_ratio, help="share of the steps warming up")
    p.add_argument("--scheduler", choices=["linear", "cosine"], default=D.scheduler, help="decay after warm-up")
    p.add_argument("--weight-decay", type=float, default=D.weight_decay, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=D.max_grad_norm, help="gradient clipping norm")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    p.add_argument("--max-length", type=int, default=D.max_length,
                   help="token limit per text during training (evaluation uses the model's inference limit)")  # fmt: skip
    p.add_argument("--save-steps", type=int, default=D.save_steps, help="checkpoint every N steps (0: never)")
    p.add_argument("--save-minutes", type=float, default=D.save_minutes, metavar="MIN",
                   help="also checkpoint after a step that ends this many minutes after the last checkpoint (0: never)")  # fmt: skip
    p.add_argument("--save-total-limit", type=int, default=D.save_total_limit, help="step checkpoints kept")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in OUTPUT/checkpoints (same options and data)")  # fmt: skip
    p.add_argument("--eval-dataset", default=None,
                   help="BEIR folder, evaluated every --eval-steps and at the end (default: no evaluation)")  # fmt: skip
    p.add_argument("--eval-steps", type=int, default=D.eval_steps, help="evaluate every N steps (0: at the end only)")
    p.add_argument("--eval-split", default=D.eval_split,
                   help="qrels split for evaluation and --load-best; 'dev' without qrels/dev.tsv carves a seeded "
                   "10%% of the train queries (left out of training); 'test' selects on test queries")  # fmt: skip
    p.add_argument("--eval-metric", default=D.eval_metric, help="metric for best-checkpoint tracking")
    p.add_argument("--load-best", action="store_true", help="export the best evaluated weights instead of the last")
    p.add_argument("--same-source-batches", action="store_true", help="each batch from one --data file")
    p.add_argument("--seed", type=int, default=D.seed, help="seed of batching, sampling and the dev split")
    p.add_argument("--device", default=None, help="torch device (default: the rank's GPU, else CPU)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=D.precision,
                   help="autocast on GPU (auto: bf16 where supported, else fp16; CPU: fp32)")  # fmt: skip
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps (default: all epochs)")
    add_progress_args(p)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="fine-tune an embedder or a reranker")
    sub = parser.add_subparsers(dest="what", required=True, metavar="<embedder|reranker>")

    emb = sub.add_parser("embedder", help="contrastive fine-tuning (InfoNCE, Qwen3 options, GradCache, LoRA)")  # fmt: skip
    _common(emb)
    emb.add_argument("--temperature", type=float, default=None,
                     help="InfoNCE temperature (default: 0.01 last-token pooling, 0.05 mean/CLS pooling)")  # fmt: skip
    emb.add_argument("--qq-dd-terms", dest="qq_dd", action=argparse.BooleanOptionalAction, default=D.qq_dd,
                     help="Qwen3 in-batch query-query and document-document terms")  # fmt: skip
    emb.add_argument("--fn-margin", type=_margin, default=D.fn_margin, metavar="MARGIN",
                     help="false-negative mask: drop candidates above s(q, pos) + MARGIN (>= 0); 'off' disables it")  # fmt: skip
    add_list(emb, "--mrl-dims", item=int, default=None, metavar="DIMS",
             help="Matryoshka dims (>= 32), e.g. 32,64,128,256 (default: off)")  # fmt: skip
    emb.add_argument("--grad-cache-chunk", type=int, default=None, metavar="N",
                     help="GradCache: texts per forward pass (default: the whole batch at once, no cache)")  # fmt: skip
    emb.set_defaults(func=run)

    rr = sub.add_parser("reranker", help="pointwise yes/no SFT (Qwen3-Reranker) or BCE (cross-encoders)")  # fmt: skip
    _common(rr)
    rr.add_argument("--grad-cache-chunk", type=int, default=None, metavar="N",
                    help="pairs per forward pass (default: the whole batch at once)")  # fmt: skip
    rr.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    return TrainConfig(**values)


def run(args) -> int:
    check_output(args.output, model=args.model, data=args.data)
    cfg = config_from_args(args)
    if args.what == "embedder":
        from qembed.train.embedder import train_embedder

        result = train_embedder(cfg)
    else:
        from qembed.train.reranker import train_reranker

        result = train_reranker(cfg)
    from qembed.train import distributed

    if distributed.rank() != 0:
        return 0
    last = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
    print(f"trained {result.steps} steps{last}; model saved to {result.output}")
    return 0
