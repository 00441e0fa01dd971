"""`qembed merge`: slerp or weighted linear merge of model checkpoints (see qembed.merge)."""

from __future__ import annotations

from qembed.cli.common import add_list, add_output_args, add_progress_args, check_output


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge checkpoints of one architecture (slerp or linear)")
    p.add_argument("--method", choices=["slerp", "linear"], default="slerp",
                   help="slerp: spherical interpolation of two models; linear: weighted average of several")
    add_list(p, "--models", required=True, metavar="DIRS", help="model or LoRA adapter folders, e.g. a,b")
    add_list(p, "--weights", item=float, default=None, metavar="W",
             help="linear: one weight per model, e.g. 0.5,0.3,0.2 (default: equal weights)")
    p.add_argument("--t", type=float, default=0.5, help="slerp: 0 gives the first model, 1 the second")
    add_output_args(p, help="folder for the merged model", metavar="DIR")
    add_progress_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from qembed.merge import merge_models

    check_output(args.output, models=args.models)
    out = merge_models(args.models, args.output, method=args.method, weights=args.weights, t=args.t)
    print(f"merged {len(args.models)} models ({args.method}) into {out}")
    return 0
