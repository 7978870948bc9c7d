"""``ember serve``: the OpenAI-compatible HTTP server (``ember.runtime.serve``) on uvicorn.

The command loads the models (compiling on first use, as ``ember generate`` does): a text-generation model behind
the continuous-batching engine with a paged KV cache by default (prefix caching on), and an embeddings model when
MODEL is an encoder or ``--embeddings-model`` names one. It binds 127.0.0.1 unless told otherwise: the API has no
authentication without ``--api-key``. SIGTERM (or Ctrl-C) stops accepting connections, lets running responses
finish for up to ``--shutdown-timeout`` seconds, then cancels what remains (freeing its KV cache) and exits; as
uvicorn does, the process then ends by that signal (status 143 for SIGTERM), so a supervisor sees why it stopped.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from .cli_options import (UsageError, add_kv_cache_bit_width, add_kv_cache_options, add_run_options,
                          add_speculative_options, byte_size, placement, eprint, kv_cache_config, positive,
                          speculative_config)

DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
EMBEDDINGS_BATCH_SIZE = 32
_DEFAULT_NAMES = {"text": "SmolLM2-135M-Instruct", "embeddings": "all-MiniLM-L6-v2"}


def add_command(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``serve`` on the ``ember`` command's subparsers."""
    p = commands.add_parser("serve", parents=parents, help="serve models over an OpenAI-compatible HTTP API",
                            description="Serve MODEL over an OpenAI-compatible API: /v1/models, /v1/completions, "
                                        "/v1/chat/completions, /v1/embeddings (an encoder: MODEL itself or "
                                        "--embeddings-model), /health and /metrics (Prometheus). Requests run "
                                        "together on the continuous-batching engine. Binds 127.0.0.1 by default.")
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="HF model directory, .gguf file or artifact (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $EMBER_API_KEY; none: open)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the name clients pass as `model` (default: MODEL's file or folder name)")
    p.add_argument("--embeddings-model", nargs="?", const="", default=None, metavar="MODEL",
                   help="also serve an encoder on /v1/embeddings: MODEL, or without it the embedded all-MiniLM-L6-v2")
    p.add_argument("--max-batch-size", type=positive, default=DEFAULT_MAX_BATCH_SIZE, metavar="N",
                   help=f"requests computed together (default: {DEFAULT_MAX_BATCH_SIZE}); more wait in a queue")
    p.add_argument("--max-num-batched-tokens", type=positive, default=256, metavar="N",
                   help="tokens per engine step (default: 256); longer prompts are computed in chunks of it")
    p.add_argument("--max-body-bytes", type=byte_size, default=None, metavar="BYTES",
                   help="larger request bodies are refused with 413 (default: 4M)")
    p.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT, metavar="SECONDS",
                   help="on SIGTERM, how long running responses may take to finish before they are cancelled "
                        f"(default: {DEFAULT_SHUTDOWN_TIMEOUT:g})")
    add_kv_cache_bit_width(p)
    add_kv_cache_options(p, "paged")
    add_speculative_options(p)
    add_run_options(p, cmd_serve)


def served_name(model: str | Path | None, given: str | None, kind: str) -> str:
    """The name a model is served under: the one given, the default model's, or its file or folder name."""
    if given:
        return given
    if model is None:
        return _DEFAULT_NAMES[kind]
    path = Path(model).expanduser()
    return path.stem if path.is_file() else path.resolve().name


def load_models(args: argparse.Namespace) -> Any:
    """Load what the options name into a ``ServedModels``."""
    from ember.runtime.pipelines import PipelineTask
    from ember.runtime.scheduler import SchedulerConfig
    from ember.runtime.serve import ServedEmbedder, ServedGenerator, ServedModels, ServerSettings

    from .loading import embeddings_model, load_pipeline, model_task, pipeline_config

    encoder_only = args.model is not None and model_task(args.model) == PipelineTask.EMBEDDINGS_GENERATION
    if encoder_only and (args.speculative or args.draft_model):
        raise UsageError(f"{args.model} is an embeddings model; --speculative / --draft-model are for text generation")
    if encoder_only and args.embeddings_model is not None:
        raise UsageError(f"{args.model} is an embeddings model; --embeddings-model names a second one, which needs "
                         f"a text-generation MODEL")
    generator = embedder = None
    if not encoder_only:
        kv = kv_cache_config(args)
        kv["kv_cache_strategy"] = kv["kv_cache_strategy"] or "paged"
        loaded = load_pipeline(pipeline_config(args.model, encoding=args.encoding, max_length=args.max_length,
                                               num_threads=args.threads, max_batch_size=args.max_batch_size, **kv,
                                               **speculative_config(args), **placement(args)))
        eprint(f"[ember] text generation: {loaded.describe()}")
        generator = ServedGenerator(served_name(args.model, args.served_model_name, "text"), loaded.pipeline,
                                    loaded.tokenizer, SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens))
    if encoder_only or args.embeddings_model is not None:
        embeddings_source = args.model if encoder_only else (args.embeddings_model or None)  # None: the default
        config = pipeline_config(embeddings_model(embeddings_source), num_threads=args.threads,
                                 max_batch_size=EMBEDDINGS_BATCH_SIZE, encoding=args.encoding if encoder_only else None,
                                 truncation=False, **(placement(args) if encoder_only else {"device": args.device}))
        loaded = load_pipeline(config, task=PipelineTask.EMBEDDINGS_GENERATION)
        eprint(f"[ember] embeddings: {loaded.describe()}")
        name = served_name(embeddings_source, args.served_model_name if encoder_only else None, "embeddings")
        embedder = ServedEmbedder(name, loaded.pipeline)
    settings = ServerSettings(api_key=args.api_key or os.environ.get("EMBER_API_KEY") or None,
                              **({"max_body_bytes": args.max_body_bytes} if args.max_body_bytes else {}))
    return ServedModels(generator, embedder, settings)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ember.runtime.serve import create_app

    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: not a port number")
    if args.shutdown_timeout < 0:
        raise UsageError(f"--shutdown-timeout {args.shutdown_timeout}: must be at least 0")
    models = load_models(args)
    if not models.settings.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        eprint(f"[ember] warning: --host {args.host} without --api-key: anyone who can reach this address can use "
               f"the models")
    app = create_app(models)
    names = ", ".join(m.name for m in models.cards())
    eprint(f"[ember] serving {names} on http://{args.host}:{args.port}/v1"
           + (" (API key required)" if models.settings.api_key else ""))
    config = uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=args.shutdown_timeout,
                            log_level="info" if args.verbose + args.verbose_global else "warning")
    uvicorn.Server(config).run()  # after a shutdown by SIGTERM/SIGINT, uvicorn raises the signal again: exit by it
    return 0
