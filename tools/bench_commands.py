"""``ember bench``: which benchmark the arguments ask for (text generation, serving, embeddings), running it,
printing its report and writing the JSON. The options themselves are declared with the others in cli.py."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from .cli_options import EXIT_RUNTIME_ERROR, UsageError, eprint, kv_cache_config, speculative_config

if TYPE_CHECKING:
    from .bench import Runner


def _bench_embeddings(args: argparse.Namespace) -> bool:
    """Whether ``ember bench`` measures an embeddings model: MODEL's task decides, ``--embeddings`` without
    MODEL picks the embedded embeddings model; options of the other kind are refused."""
    from ember.runtime.pipelines import PipelineTask

    from .loading import model_task

    embeddings = args.embeddings
    if args.model is not None:
        task = model_task(args.model)
        if args.embeddings and task not in (None, PipelineTask.EMBEDDINGS_GENERATION):
            raise UsageError(f"--embeddings: {args.model} serves {task.value}, not embeddings")
        embeddings = embeddings or task == PipelineTask.EMBEDDINGS_GENERATION
    generation_only = ("--prompt-tokens", "--new-tokens", "--kv-cache-bit-width", "--request-rate")
    kind, other = ("an embeddings", generation_only) if embeddings else ("a text-generation", ("--sentences",))
    for option in other:
        if getattr(args, option[2:].replace("-", "_")) is not None:
            raise UsageError(f"{option} does not apply to {kind} model")
    peers = ("st",) if embeddings else ("hf", "ort-genai", "continuous")
    if args.compare not in (None, *peers):
        raise UsageError(f"--compare {args.compare} does not apply to {kind} model; use --compare "
                         + " or ".join(peers))
    if embeddings and args.encoding and len(args.encoding) > 1:
        raise UsageError("an embeddings benchmark takes one --encoding")
    return embeddings


def _generation_peer(args: argparse.Namespace, threads: int, cache_dir) -> Callable[[], Runner] | None:
    """The factory of the ``--compare`` peer of a text-generation benchmark (None without one)."""
    def hf():
        from .bench_hf import HFRunner  # with bench_st / bench_ort_genai, where the CLI brings in torch
        eprint("ember: loading the same weights in transformers for --compare hf ...")
        return HFRunner(args.model, threads)

    def ort_genai():
        from .bench_ort_genai import OrtGenaiRunner
        eprint("ember: preparing the onnxruntime-genai int4 model for --compare ort-genai (built once, "
                "then cached) ...")
        return OrtGenaiRunner(args.model, threads, cache_dir)

    def continuous():
        from .bench import EmberRunner, loaded_encoding
        from .loading import load_pipeline, pipeline_config

        eprint("ember: loading the same model with the continuous KV cache for --compare continuous ...")
        config = pipeline_config(args.model, encoding=args.encoding[0] if args.encoding else None,
                                 num_threads=threads, kv_cache_strategy="continuous",
                                 max_batch_size=args.batch_size or 8, max_length=args.prompt_tokens + args.new_tokens)
        loaded = load_pipeline(config)
        return EmberRunner(loaded, name=f"ember {loaded_encoding(loaded)} continuous")

    return {"hf": hf, "ort-genai": ort_genai, "continuous": continuous}.get(args.compare)


def run_bench(args: argparse.Namespace) -> int:
    if _bench_embeddings(args):
        return _cmd_bench_embeddings(args)
    from .bench import BANDWIDTH_MIB, check_encodings, load_encodings, run_benchmark
    from .bench_report import format_report

    build_errors: tuple[type[BaseException], ...] = ()
    if args.compare == "ort-genai":  # before minutes of loading: a missing package fails at once
        from .bench_ort_genai import OrtGenaiBuildError, require_ort_genai
        require_ort_genai()
        build_errors = (OrtGenaiBuildError,)
    args.prompt_tokens = 64 if args.prompt_tokens is None else args.prompt_tokens
    args.new_tokens = 128 if args.new_tokens is None else args.new_tokens
    if args.request_rate is not None and (args.http or not args.concurrency):
        raise UsageError("--request-rate applies to --concurrency through the engine (not --http)")
    if args.compare == "continuous" and not args.concurrency:
        raise UsageError("--compare continuous measures the engine's --concurrency levels against ember's own static "
                         "batch (--batch-size) on the continuous KV cache")
    engine_bench = (_cmd_bench_serving if args.concurrency or args.prefix_cache else
                    _cmd_bench_speculative if args.speculative or args.draft_model else None)
    if engine_bench is not None:
        try:
            return engine_bench(args)
        except build_errors as error:  # the ort-genai builder's failure: its message names the log
            eprint(f"ember: error: {error}")
            return EXIT_RUNTIME_ERROR
    batch_size = args.batch_size or 1
    encodings = check_encodings(args.model, args.encoding)
    pipelines, memory = load_encodings(args.model, encodings, num_threads=args.threads, batch_size=batch_size,
                                       max_length=args.prompt_tokens + args.new_tokens,
                                       announce=lambda text: eprint(f"ember: {text}"),
                                       kv_cache_bit_width=args.kv_cache_bit_width or 0)
    peer_factory = _generation_peer(args, pipelines[0].num_threads, pipelines[0].pipeline.pipeline_config.cache_dir)
    try:
        report = run_benchmark(pipelines, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                               batch_size=batch_size, runs=args.runs, warmup=args.warmup, peer_factory=peer_factory,
                               bandwidth_mib=args.bandwidth_mib or BANDWIDTH_MIB, load_memory=memory, progress=True)
    except build_errors as error:  # the ort-genai builder's failure: its message names the log
        eprint(f"ember: error: {error}")
        return EXIT_RUNTIME_ERROR
    report["model"] = args.model or "SmolLM2-135M-Instruct (embedded default)"
    print(format_report(report), flush=True)
    _write_json(args.json, report)
    return 0


def _cmd_bench_serving(args: argparse.Namespace) -> int:
    """``ember bench --concurrency`` / ``--prefix-cache``: requests through the engine (runtime/engine.py)."""
    from .bench_report import format_serving_report
    from .bench_serving import run_concurrency_benchmark, run_prefix_cache_benchmark
    from .loading import load_pipeline, pipeline_config

    if args.compare and (args.http or args.prefix_cache or not args.concurrency):
        raise UsageError("--compare applies to --concurrency (a static batch of --batch-size, default 8, of the "
                         "peer), not to --http / --prefix-cache")
    if args.encoding and len(args.encoding) > 1:
        raise UsageError("--concurrency / --prefix-cache measure one encoding at a time")
    kv = kv_cache_config(args)
    kv["kv_cache_strategy"] = kv["kv_cache_strategy"] or "paged"
    if args.prefix_cache and kv["kv_cache_strategy"] != "paged":
        raise UsageError("--prefix-cache needs the paged KV cache")
    if args.http and not args.concurrency:
        raise UsageError("--http needs --concurrency (the levels to measure)")
    levels = args.concurrency or []
    prompt_tokens = max([args.prompt_tokens + args.new_tokens] + ([512 + 2] if args.prefix_cache else []))
    config = pipeline_config(args.model, encoding=args.encoding[0] if args.encoding else None,
                             num_threads=args.threads, max_batch_size=max(levels + [1]),
                             max_length=prompt_tokens, **kv)  # the longest sequence the benchmark makes
    loaded = load_pipeline(config)
    eprint(f"ember: {loaded.describe()}")
    report = {"model": args.model or "SmolLM2-135M-Instruct (embedded default)",
              "encoding": loaded.pipeline.pipeline_model.artifact.manifest["encoding"],
              "kv_cache_strategy": kv["kv_cache_strategy"],
              "decode_slots": loaded.pipeline.pipeline_config.decode_slots
              if loaded.pipeline.pipeline_model.decode_slots is not None else 0,
              "threads": loaded.num_threads}
    if levels and args.http:
        from .bench_http import run_http_benchmark
        report["http"] = run_http_benchmark(loaded.pipeline, loaded.tokenizer, levels, prompt_tokens=args.prompt_tokens,
                                            new_tokens=args.new_tokens, runs=args.runs)
    elif levels:
        peer_factory = _generation_peer(args, loaded.num_threads, loaded.pipeline.pipeline_config.cache_dir)
        report["concurrency"] = run_concurrency_benchmark(
            loaded.pipeline, loaded.tokenizer, levels, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
            runs=args.runs, peer=peer_factory() if peer_factory is not None else None,
            peer_batch=args.batch_size or 8, request_rate=args.request_rate)
    if args.prefix_cache:
        report["prefix_cache"] = run_prefix_cache_benchmark(loaded.pipeline, loaded.tokenizer, runs=args.runs)
    print(format_serving_report(report), flush=True)
    _write_json(args.json, report)
    return 0


def _cmd_bench_speculative(args: argparse.Namespace) -> int:
    """``ember bench --speculative``: speculative against plain decoding, same model and encoding, one run."""
    from .bench_speculative import format_speculative_report, run_speculative_benchmark
    from .loading import load_pipeline, pipeline_config

    if (args.batch_size or 1) > 1 or (args.encoding and len(args.encoding) > 1):
        raise UsageError("--speculative measures batch 1 of one encoding")
    kv = kv_cache_config(args)
    if kv["kv_cache_strategy"] not in (None, "paged"):
        raise UsageError("--speculative needs the paged KV cache")
    kv["kv_cache_strategy"] = "paged"
    kv["decode_slots"] = 0  # plain decoding on the graph the verification runs: greedy output comparable bit for bit
    spec = speculative_config(args)
    # batch 1 is measured; 3 rows let the step-cost measurement hold its contexts side by side
    common = dict(encoding=args.encoding[0] if args.encoding else None, num_threads=args.threads, max_batch_size=3,
                  **kv)
    eprint("ember: loading the plain and the speculative pipelines (compiled on first use, then cached) ...")
    plain = load_pipeline(pipeline_config(args.model, **common))
    speculative = load_pipeline(pipeline_config(args.model, **common, **spec))
    k = speculative.pipeline.pipeline_config.num_speculative_tokens
    peer_factory = _generation_peer(args, plain.num_threads, plain.pipeline.pipeline_config.cache_dir)
    peer = peer_factory() if peer_factory is not None else None
    report = run_speculative_benchmark(plain, speculative, new_tokens=args.new_tokens, runs=args.runs,
                                       warmup=args.warmup, k=k, peer=peer)
    if peer is not None:
        report.update(peer=peer.name, peer_info=peer.info)
    report.update(model=args.model or "SmolLM2-135M-Instruct (embedded default)", method=spec["speculative"],
                  encoding=plain.pipeline.pipeline_model.artifact.manifest["encoding"], threads=plain.num_threads)
    print(format_speculative_report(report), flush=True)
    _write_json(args.json, report)
    return 0


def _cmd_bench_embeddings(args: argparse.Namespace) -> int:
    from ember.runtime.pipelines import PipelineTask

    from .bench_embeddings import BATCH_SIZE, LATENCY_ENCODES, SENTENCES, run_embeddings_benchmark
    from .bench_report import format_embeddings_report
    from .loading import embeddings_model, load_pipeline, pipeline_config

    model = embeddings_model(args.model)
    batch_size = args.batch_size or BATCH_SIZE
    encoding = args.encoding[0] if args.encoding else None
    loaded = load_pipeline(pipeline_config(model, encoding=encoding, num_threads=args.threads,
                                           max_batch_size=batch_size), task=PipelineTask.EMBEDDINGS_GENERATION)
    def st_peer():
        from .bench_st import STRunner  # with bench_hf / bench_ort_genai, where the CLI brings in torch
        eprint("ember: loading the same weights in sentence-transformers for --compare st ...")
        return STRunner(model, loaded.num_threads)

    peer_factory = st_peer if args.compare == "st" else None
    report = run_embeddings_benchmark(loaded, sentences=args.sentences or SENTENCES, batch_size=batch_size,
                                      latency_encodes=args.latency_encodes or LATENCY_ENCODES, runs=args.runs,
                                      warmup=args.warmup, peer_factory=peer_factory, progress=True)
    report["model"] = args.model or "all-MiniLM-L6-v2 (embedded default)"
    print(format_embeddings_report(report), flush=True)
    _write_json(args.json, report)
    return 0


def _write_json(path: str | None, report: dict) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        eprint(f"wrote {path}")
