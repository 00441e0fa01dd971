"""`qembed merge`: slerp or weighted linear merge of model checkpoints (see qembed.merge)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge checkpoints of one architecture (slerp or linear)")
    p.add_argument("--method", choices=["slerp", "linear"], default="slerp")
    p.add_argument("--models", nargs="+", required=True, help="model or LoRA adapter folders")
    p.add_argument("--weights", nargs="+", type=float, default=None, help="linear: one weight per model")
    p.add_argument("--t", type=float, default=0.5, help="slerp: 0 gives the first model, 1 the second")
    p.add_argument("--output", required=True, help="folder for the merged model")
    p.set_defaults(func=run)


def run(args) -> int:
    from qembed.merge import merge_models

    out = merge_models(args.models, args.output, method=args.method, weights=args.weights, t=args.t)
    print(f"merged {len(args.models)} models ({args.method}) into {out}")
    return 0
