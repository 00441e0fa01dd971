"""`qembed train embedder|reranker`: fine-tune on training-format JSONL files (see qembed.train)."""

from __future__ import annotations

import argparse

from qembed.cli.common import add_list, add_progress_args, check_output
from qembed.negatives import NUM_NEGATIVES


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder or hub id to start from")
    add_list(p, "--data", required=True, metavar="FILES",
             help="training JSONL file(s), comma-separated or repeated ({query, pos, neg})")
    p.add_argument(
        "--output", required=True, help="output folder: the trained model, checkpoints/ and train_log.jsonl"
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32, help="records per step (all ranks together)")
    p.add_argument("--lr", type=float, default=None, help="default: 1e-4 with LoRA, 2e-5 full fine-tuning")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="lora", action="store_true", default=None, help="train LoRA adapters")
    mode.add_argument("--full", dest="lora", action="store_false", help="full fine-tuning")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    add_list(p, "--lora-targets", default=None, metavar="NAMES", help="module names, e.g. q_proj,v_proj (default: by model family)")
    p.add_argument("--no-merge-lora", dest="merge_lora", action="store_false", help="export the adapter only")
    p.add_argument("--num-negatives", type=int, default=NUM_NEGATIVES, help="hard negatives used per record")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--scheduler", choices=["linear", "cosine"], default="linear")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--max-length", type=int, default=512, help="token limit per text during training")
    p.add_argument("--save-steps", type=int, default=500)
    p.add_argument("--save-total-limit", type=int, default=2)
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT/checkpoints"
    )
    p.add_argument("--eval-dataset", default=None, help="BEIR folder evaluated every --eval-steps")
    p.add_argument("--eval-steps", type=int, default=0)
    p.add_argument("--eval-split", default="test")
    p.add_argument("--eval-metric", default="ndcg@10", help="metric for best-checkpoint tracking")
    p.add_argument(
        "--load-best", action="store_true", help="export the best evaluated weights instead of the last"
    )
    p.add_argument("--same-source-batches", action="store_true", help="each batch from one --data file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="autocast on GPU"
    )
    p.add_argument("--max-steps", type=int, default=None)
    add_progress_args(p)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="fine-tune an embedder or a reranker")
    sub = parser.add_subparsers(dest="what", required=True, metavar="<embedder|reranker>")

    emb = sub.add_parser("embedder", help="contrastive fine-tuning (InfoNCE, Qwen3 options, GradCache, LoRA)")
    _common(emb)
    emb.add_argument(
        "--temperature", type=float, default=None, help="default 0.01 last-token, 0.05 mean/CLS pooling"
    )
    emb.add_argument("--qq-dd-terms", dest="qq_dd", action=argparse.BooleanOptionalAction, default=True,
                     help="Qwen3 in-batch query-query and document-document terms")  # fmt: skip
    emb.add_argument(
        "--fn-margin", type=float, default=0.1, help="false-negative mask margin (negative: off)"
    )
    add_list(emb, "--mrl-dims", item=int, default=None, metavar="DIMS", help="Matryoshka dims, e.g. 32,64,128,256")
    emb.add_argument("--grad-cache-chunk", type=int, default=None, help="GradCache chunk size (texts)")
    emb.set_defaults(func=run)

    rr = sub.add_parser("reranker", help="pointwise yes/no SFT (Qwen3-Reranker) or BCE (cross-encoders)")
    _common(rr)
    rr.add_argument("--grad-cache-chunk", type=int, default=None, help="pairs per forward pass (default: the whole batch)")
    rr.set_defaults(func=run)


def run(args) -> int:
    from qembed.train.loop import TrainConfig

    fields = set(TrainConfig.__dataclass_fields__)
    values = {k: v for k, v in vars(args).items() if k in fields}
    check_output(args.output, model=args.model, data=args.data)
    if getattr(args, "fn_margin", None) is not None and args.fn_margin < 0:
        values["fn_margin"] = None
    cfg = TrainConfig(**values)
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
