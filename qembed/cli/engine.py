"""`--engine local|ray` and the Ray options of the verbs that encode a corpus (`embed`, `index build`, `eval`)."""

from __future__ import annotations

import argparse

from qembed.errors import QembedError


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """`--engine`, `--ray-address`, `--ray-actors`, `--ray-batch-size` (see `qembed.ray_engine`)."""
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="encode the corpus in this process (local) or on Ray Data actors (ray; needs the ray extra)")  # fmt: skip
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="Ray cluster to run on, e.g. 10.0.0.1:6379 or auto (default: start a local one for the run)")  # fmt: skip
    p.add_argument("--ray-actors", type=int, metavar="N",
                   help="model replicas on Ray (default: one per GPU, else one per 4 CPUs of the cluster)")  # fmt: skip
    p.add_argument("--ray-batch-size", type=int, default=1024, metavar="N",
                   help="texts per Ray actor call, also one cache shard (a killed job re-encodes only those in flight)")  # fmt: skip


def engine_options(args: argparse.Namespace):
    """The `RayOptions` of `--engine ray` (None for the local engine); a one-line error, before any model is
    loaded, when Ray is not installed or a Ray option is given without `--engine ray`."""
    if args.engine != "ray":
        given = [flag for flag, value in (("--ray-address", args.ray_address), ("--ray-actors", args.ray_actors))
                 if value is not None]  # fmt: skip
        if given:
            raise QembedError(f"{given[0]} needs --engine ray")
        return None
    from qembed.ray_engine import RayOptions, require_ray

    require_ray()
    return RayOptions(address=args.ray_address, actors=args.ray_actors, batch_size=args.ray_batch_size)
