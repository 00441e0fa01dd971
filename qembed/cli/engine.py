"""`--engine local|ray`, the Ray options of the verbs that encode a corpus (`embed`, `index build`, `eval`) and
their multi-GPU shorthand `--device cuda:0,cuda:1,...`."""

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


def device_list(device: str | None) -> list[int] | None:
    """The CUDA device numbers of a `--device cuda:0,cuda:1,...` list (None for a single device); a one-line
    error for anything else in a list."""
    if not device or "," not in device:
        return None
    numbers = []
    for name in device.split(","):
        kind, _, number = name.strip().partition(":")
        if kind != "cuda" or not number.isdigit():
            raise QembedError(f"--device {device}: a list names CUDA devices, e.g. cuda:0,cuda:1 (got {name!r})")
        numbers.append(int(number))
    if len(set(numbers)) != len(numbers):
        raise QembedError(f"--device {device}: a device is named twice")
    return numbers


def engine_options(args: argparse.Namespace):
    """The `RayOptions` of `--engine ray` (None for the local engine); a one-line error, before any model is
    loaded, when Ray is not installed or a Ray option is given without `--engine ray`.

    `--device cuda:0,cuda:1,...` is the multi-GPU shorthand: a local Ray cluster on those GPUs with one model
    replica each (`--engine ray` implied); the driver's own model, which encodes the queries, loads on the
    first of them (`args.device` becomes that one)."""
    gpus = device_list(getattr(args, "device", None))
    if gpus is not None:
        if args.ray_address:
            raise QembedError("--device with a list starts a Ray cluster on this machine's GPUs: with --ray-address, "
                              "give --device cuda and the cluster's GPUs are used")  # fmt: skip
        if args.ray_actors is not None and args.ray_actors != len(gpus):
            raise QembedError(f"--device lists {len(gpus)} GPUs, one model replica each: --ray-actors {args.ray_actors}"
                              " does not match")  # fmt: skip
        import torch

        available = torch.cuda.device_count()
        if max(gpus) >= available:
            raise QembedError(f"--device {args.device}: this machine has {available} CUDA device(s)")
        args.engine, args.ray_actors, args.device = "ray", len(gpus), f"cuda:{gpus[0]}"
    if args.engine != "ray":
        given = [flag for flag, value in (("--ray-address", args.ray_address), ("--ray-actors", args.ray_actors))
                 if value is not None]  # fmt: skip
        if given:
            raise QembedError(f"{given[0]} needs --engine ray")
        return None
    from qembed.ray_engine import RayOptions, require_ray

    require_ray()
    return RayOptions(address=args.ray_address, actors=args.ray_actors, batch_size=args.ray_batch_size,
                      gpu_ids=tuple(gpus) if gpus is not None else None)  # fmt: skip
