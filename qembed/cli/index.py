"""`qembed index build` (a persistent search index folder) and `qembed search` (query it)."""

from __future__ import annotations

import json
import os

from qembed.cli.common import (
    add_device_args,
    add_model_args,
    add_output_args,
    add_progress_args,
    add_quantize_arg,
)
from qembed.cli.engine import add_engine_args, engine_options
from qembed.errors import QembedError


def add_parser(subparsers) -> None:
    index = subparsers.add_parser("index", help="build a persistent search index folder")
    verbs = index.add_subparsers(dest="index_verb", required=True, metavar="<action>")
    p = verbs.add_parser("build", help="encode a corpus into an index folder (re-run: only new/changed documents)")
    add_model_args(p, help="embedding model: local folder or hub id")
    p.add_argument("--corpus", required=True, help="BEIR folder, corpus.jsonl, JSONL with 'text', or .txt")
    add_output_args(p, help="index folder to write (or rebuild: only new or changed documents are encoded)",
                    metavar="DIR")  # fmt: skip
    p.add_argument("--index", default="faiss", help="faiss | faiss:FACTORY[?nprobe=N] (IVF4096,Flat, HNSW32,SQ8, ...) | "
                   "hnsw[:m=32,...] | milvus:PATH.db | milvus:http://HOST:PORT[?index=HNSW&M=16] (docs/indexes.md)")  # fmt: skip
    p.add_argument("--dim", type=int, help="Matryoshka dimension, first N components re-normalised (default: full)")
    p.add_argument("--collection", help="Milvus collection name (default: a new unique name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing Milvus collection of that name")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="embedding cache (default: $QEMBED_CACHE or ~/.cache/qembed/embeddings)")  # fmt: skip
    add_milvus_token_arg(p)
    add_quantize_arg(p)
    add_progress_args(p)
    add_engine_args(p)
    p.set_defaults(func=run_build)

    s = subparsers.add_parser("search", help="search an index folder built by `qembed index build`")
    s.add_argument("--index", required=True, help="index folder written by `qembed index build`")
    s.add_argument("--query", action="append", default=[], metavar="TEXT",
                   help="a query text (repeat for several: the model is loaded once)")  # fmt: skip
    s.add_argument("--query-file", metavar="FILE",
                   help="file of queries: one per line, or JSONL with a 'text' or 'query' field per line "
                        "(--queries is embed's switch: one meaning per flag)")  # fmt: skip
    s.add_argument("--top-k", type=int, default=10, help="hits to print")
    s.add_argument("--instruction", help="query instruction (default: the model's own)")
    s.add_argument("--model", help="embedding model (default: the one recorded in the index)")
    s.add_argument("--reranker", help="re-score the first --rerank-top hits with this reranker")
    s.add_argument("--rerank-top", type=int, help="hits to rerank (default: --top-k)")
    s.add_argument("--json", action="store_true",
                   help="print one JSON object per query, one per line: {query, results}")  # fmt: skip
    add_search_param_args(s)
    add_milvus_token_arg(s)
    add_device_args(s, what="the models")
    add_quantize_arg(s)
    add_progress_args(s)
    s.set_defaults(func=run_search)


def add_milvus_token_arg(p) -> None:
    p.add_argument("--milvus-token-env", default="MILVUS_TOKEN", metavar="VAR",
                   help="environment variable holding the Milvus token (default: MILVUS_TOKEN)")  # fmt: skip


def add_search_param_args(p) -> None:
    p.add_argument("--nprobe", type=int, help="IVF lists searched per query (default: the index's own)")
    p.add_argument("--ef", type=int, help="HNSW candidate list per query (default: the index's own)")


def search_params(args):
    """The `SearchParams` of --nprobe/--ef (None when neither is given)."""
    from qembed.index import SearchParams

    if args.nprobe is None and args.ef is None:
        return None
    return SearchParams(nprobe=args.nprobe, ef=args.ef)


def milvus_token(args) -> str:
    return os.environ.get(args.milvus_token_env, "") if args.milvus_token_env else ""


def run_build(args) -> int:
    from qembed.data.corpus import check_corpus
    from qembed.index.store import build_index
    from qembed.models.embedder import Embedder

    engine = engine_options(args)
    size = check_corpus(args.corpus)  # a bad record, text or repeated id: one line now, not after hours of encoding
    embedder = Embedder.from_pretrained(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    try:
        embedder._check_dim(args.dim)
    except ValueError as exc:
        raise QembedError(str(exc)) from None
    result = build_index(embedder, args.corpus, args.output, index=args.index, dim=args.dim,
                         batch_tokens=args.batch_tokens, collection=args.collection, overwrite=args.overwrite,
                         token=milvus_token(args), cache_dir=args.cache_dir, corpus_size=size,
                         engine=engine)  # fmt: skip
    m = result.manifest
    where = f" (Milvus collection {m.collection})" if m.collection else ""
    recall = f", recall@10 {m.recall_at_10:.3f} of exact" if m.recall_at_10 is not None else ""
    print(f"indexed {m.count} documents into {args.output}{where}: {result.encoded} encoded, "
          f"{result.cached} from the cache, dim {m.dim}{recall}, {m.build_seconds:.1f} s")  # fmt: skip
    return 0


def run_search(args) -> int:
    from qembed.data.beir import read_query_file
    from qembed.index.store import Manifest, open_search_index, rerank_hits
    from qembed.models.embedder import Embedder

    if args.top_k < 1:
        raise QembedError("--top-k must be at least 1")
    queries = list(args.query) + (read_query_file(args.query_file) if args.query_file else [])
    if not queries:
        raise QembedError("give a query: --query TEXT (repeatable) or --query-file FILE")
    manifest = Manifest.read(args.index)
    params = search_params(args)
    embedder = Embedder.from_pretrained(args.model or manifest.model, device=args.device, dtype=args.dtype,
                                        quantize=args.quantize)  # fmt: skip
    index = open_search_index(args.index, embedder, token=milvus_token(args), params=params)
    reranker = None
    if args.reranker:
        from qembed.models.reranker import Reranker

        reranker = Reranker.from_pretrained(args.reranker, device=args.device, dtype=args.dtype, quantize=args.quantize)
    # All queries encoded and searched together; each is reranked on its own hits.
    found = index.search_vectors(index.encode_queries(queries, args.instruction), args.top_k)
    for number, (query, hits) in enumerate(zip(queries, found), start=1):
        if reranker is not None:
            hits = rerank_hits(reranker, query, hits, args.rerank_top, args.instruction)
        if args.json:
            results = [{k: v for k, v in vars(h).items() if v is not None} for h in hits]
            print(json.dumps({"query": query, "results": results}, ensure_ascii=False), flush=True)
            continue
        if len(queries) > 1:
            print(f"{'' if number == 1 else chr(10)}# query {number}: {' '.join(query.split())}")
        for rank, hit in enumerate(hits, start=1):
            rerank = f"\trerank={hit.rerank_score:.4f}" if hit.rerank_score is not None else ""
            text = " ".join(hit.text.split())
            print(f"{rank}\t{hit.score:.4f}{rerank}\t{hit.id}\t{text[:200]}")
    return 0
