"""`qembed serve`: OpenAI-compatible embeddings, rerank and search over HTTP."""

from __future__ import annotations

import os

from qembed.cli.common import add_model_args, add_quantize_arg
from qembed.cli.index import add_search_param_args, search_params
from qembed.errors import QembedError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve embeddings / rerank / search over HTTP (OpenAI-compatible)")
    add_model_args(p, help="embedding model: local folder or hub id", batch=False)
    p.add_argument("--reranker", help="reranker model (enables /v1/rerank and reranked search)")
    p.add_argument("--index", help="index folder from `qembed index build` (enables /v1/search)")
    add_search_param_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--served-model-name", help="the model name clients send and the only one accepted "
                   "(default: the --model folder's name, or the hub id as given)")  # fmt: skip
    p.add_argument("--served-reranker-name", help="the same for --reranker (default: its folder's name or hub id)")
    p.add_argument("--api-key-env", metavar="VAR", help="require 'Authorization: Bearer <key>', key read from $VAR")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="padded tokens per forward pass")
    p.add_argument("--max-client-batch-size", type=int, default=2048, help="most inputs in one request")
    p.add_argument("--max-input-tokens", type=int, help="truncate (or refuse) inputs longer than this")
    p.add_argument("--no-auto-truncate", action="store_true", help="refuse over-long inputs (400) instead")
    p.add_argument("--max-concurrent-requests", type=int, default=512, help="past this, answer 429")
    p.add_argument("--max-request-bytes", type=int, default=2_000_000, help="larger bodies get 413")
    p.add_argument("--body-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="a request body must arrive within this time, else 408 (default: 5)")  # fmt: skip
    p.add_argument("--metrics-require-key", action="store_true",
                   help="/metrics needs the API key too (default: open, like /health)")  # fmt: skip
    p.add_argument("--no-batching", action="store_true", help="one request per forward pass (for comparisons)")
    p.add_argument("--milvus-token-env", default="MILVUS_TOKEN", metavar="VAR",
                   help="environment variable holding the Milvus token (default: MILVUS_TOKEN)")  # fmt: skip
    add_quantize_arg(p)
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    p.set_defaults(func=run)


def run(args) -> int:
    from qembed.models.embedder import Embedder
    from qembed.serve import ServeConfig, serve

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise QembedError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    for flag in ("max_batch_tokens", "max_client_batch_size", "max_concurrent_requests", "max_request_bytes"):
        if getattr(args, flag) < 1:
            raise QembedError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_input_tokens is not None and args.max_input_tokens < 2:
        raise QembedError("--max-input-tokens must be at least 2")
    if not args.body_timeout > 0:
        raise QembedError("--body-timeout must be more than 0 seconds")
    if args.metrics_require_key and not api_key:
        raise QembedError("--metrics-require-key needs --api-key-env")
    token = os.environ.get(args.milvus_token_env, "") if args.milvus_token_env else ""
    params = search_params(args)  # a bad value fails before the model loads
    embedder = Embedder.from_pretrained(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    index = None
    if args.index:
        from qembed.serve.generation import open_generation

        index = open_generation(args.index, embedder, token=token, params=params)
    reranker = None
    if args.reranker:
        from qembed.models.reranker import Reranker

        reranker = Reranker.from_pretrained(args.reranker, device=args.device, dtype=args.dtype,
                                            quantize=args.quantize)  # fmt: skip
    config = ServeConfig(
        served_model_name=args.served_model_name, served_reranker_name=args.served_reranker_name, api_key=api_key,
        max_batch_tokens=args.max_batch_tokens,
        max_client_batch_size=args.max_client_batch_size, max_input_tokens=args.max_input_tokens,
        auto_truncate=not args.no_auto_truncate, max_concurrent_requests=args.max_concurrent_requests,
        max_request_bytes=args.max_request_bytes, body_timeout=args.body_timeout,
        metrics_require_key=args.metrics_require_key, batching=not args.no_batching, milvus_token=token,
    )  # fmt: skip
    serve(embedder, reranker=reranker, index=index, config=config, host=args.host, port=args.port,
          log_level=args.log_level)  # fmt: skip
    return 0
