"""The ``ember`` command line: ``ember <command> [options]`` (``list``, ``compile``, ``generate``, ``chat``, ``embed``,
``bench``, ``verify``, ``pull``, ``models``, ``serve``).

Heavy imports (onnxruntime, onnx_ir, transformers) happen inside the commands, so ``ember --help`` and
``ember --version`` are quick; torch is imported only by ``ember bench --compare hf``, ``--compare st`` and
``--compare ort-genai``.
Expected errors (a bad path, an unsupported model, an invalid option) print ``ember: error: ...`` and exit
with 1 (2 for usage errors) instead of a traceback; ``-vv`` shows the traceback too.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .cli_options import (EXIT_RUNTIME_ERROR, EXIT_USAGE, EmberArgumentParser, UsageError,
                          add_decode_slots_option, add_kv_cache_bit_width, add_kv_cache_options, add_device_option, add_model_options, add_run_options,
                          add_tensor_parallel,
                          add_sampling_options, add_speculative_options, add_threads, encoding_list, eprint, kv_cache_config, lazy_choice,
                          non_negative, placement, positive, positive_list, positive_rate, sampling_params, speculative_config, version)
from .models_cli import add_commands as add_model_commands
from .serve import add_command as add_serve_command

logger = logging.getLogger("ember.tools")

def build_parser() -> argparse.ArgumentParser:
    parser = EmberArgumentParser(prog="ember", description="ember: compile transformer models to ONNX artifacts and run them.",
                     epilog="Run `ember <command> --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"ember {version()}")
    verbose = EmberArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="count", default=0,
                         help="log more (-v: info, -vv: debug and tracebacks)")
    parser.add_argument("-v", "--verbose", action="count", default=0, dest="verbose_global",
                        help="log more (-v: info, -vv: debug and tracebacks); also accepted after the command")
    commands = parser.add_subparsers(dest="command", metavar="<command>", parser_class=EmberArgumentParser)

    p = commands.add_parser("list", parents=[verbose], help="list the supported architectures and targets",
                            description="List the architectures ember compiles, with tasks, encodings "
                                        "(and their KV cache strategies) and example repositories; then the "
                                        "compile targets, with device, runtime, encodings and KV cache strategies.")
    p.add_argument("--json", action="store_true",
                   help='print JSON instead of tables: {"architectures": [...], "targets": [...]}')
    p.set_defaults(handler=cmd_list)

    p = commands.add_parser("compile", parents=[verbose], help="compile a model into an artifact",
                            description="Compile an HF model directory or a .gguf file. Without -o the artifact "
                                        "goes to the compile cache ($EMBER_CACHE or ~/.cache/ember).")
    p.add_argument("model", metavar="MODEL", help="a Hugging Face model directory or a .gguf file")
    p.add_argument("--target", type=lazy_choice("target"), default="ort-cpu",
                   help="compile target (default: ort-cpu; `ember list` shows them)")
    add_device_option(p)
    p.add_argument("-o", "--output", metavar="DIR", default=None, help="write the artifact directory here")
    add_model_options(p)
    p.add_argument("--kv-cache-strategy", type=lazy_choice("kv cache strategy"), default=None,
                   help="continuous or paged (default: the first the encoding supports)")
    add_decode_slots_option(p)
    add_kv_cache_bit_width(p)
    add_tensor_parallel(p)
    p.add_argument("--force", action="store_true", help="recompile even if cached; replace an artifact in DIR")
    p.add_argument("--no-verify", action="store_true",
                   help="do not measure a quantized artifact's accuracy against the float32 build (by default the "
                        "short form of `ember verify` runs and its figures go into the manifest)")
    p.set_defaults(handler=cmd_compile)

    p = commands.add_parser("generate", parents=[verbose], help="generate text for a prompt",
                            description="Generate text for PROMPT, streamed to stdout; statistics go to stderr.")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt (the user message when there is a chat template)")
    p.add_argument("--model", default=None, help="HF model directory, .gguf file or compiled artifact "
                                                 "(default: the embedded SmolLM2-135M-Instruct)")
    add_sampling_options(p)
    p.add_argument("--no-chat-template", action="store_true", help="encode PROMPT as is, without the chat template")
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message (with a chat template)")
    add_kv_cache_bit_width(p)
    add_kv_cache_options(p)
    add_speculative_options(p)
    add_run_options(p, cmd_generate)

    p = commands.add_parser("chat", parents=[verbose], help="chat with a model interactively",
                            description="An interactive chat on the model's chat template: the conversation is "
                                        "kept across turns (the oldest turns are dropped when it outgrows the "
                                        "model's maximum length), replies stream as they are made, statistics "
                                        "go to stderr. /reset forgets the conversation, /exit or Ctrl-D leaves, "
                                        "Ctrl-C stops a reply.")
    p.add_argument("--model", default=None, help="HF model directory, .gguf file or compiled artifact "
                                                 "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message for the whole conversation")
    add_sampling_options(p)
    add_kv_cache_bit_width(p)
    add_kv_cache_options(p)
    add_speculative_options(p)
    add_run_options(p, cmd_chat)

    p = commands.add_parser("embed", parents=[verbose], help="embed texts into vectors",
                            description="Embed each TEXT (or each line of --file) with an embeddings model. For "
                                        "TEXT arguments: one line per embedding and their cosine similarities; "
                                        "for --file: a progress bar and a summary. --output saves the [n, dim] "
                                        "float32 array with numpy.save. Setup statistics go to stderr.")
    p.add_argument("texts", metavar="TEXT", nargs="*", help="texts to embed")
    p.add_argument("--model", default=None, help="HF model directory or compiled artifact "
                                                 "(default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--file", metavar="PATH", default=None,
                   help="embed each line of PATH (UTF-8; an empty line is an empty text; - reads stdin)")
    p.add_argument("-o", "--output", metavar="OUT.npy", default=None, help="save the embeddings with numpy.save")
    p.add_argument("--batch-size", type=positive, default=32, metavar="N", help="texts per model call (default: 32)")
    p.add_argument("--no-truncation", action="store_true",
                   help="fail on a text longer than the model's maximum instead of truncating it")
    add_run_options(p, cmd_embed)

    p = commands.add_parser("bench", parents=[verbose], help="measure latency, throughput and memory",
                            description="Benchmark a text-generation model (TTFT for --batch-size prompts of "
                                        "--prompt-tokens tokens, decode tokens/s over --new-tokens greedy tokens, "
                                        "for each of the --encoding list, with the weight bytes a decode step reads "
                                        "and the share of the memory bandwidth measured in the same run) or an "
                                        "embeddings model (sentences/s for --sentences sentences of about 30 "
                                        "tokens at --batch-size, single-sentence latency); peak RSS. The model's "
                                        "architecture decides which.")
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="HF model directory, .gguf file or artifact (default: the embedded SmolLM2-135M-Instruct, "
                        "or with --embeddings the embedded all-MiniLM-L6-v2)")
    p.add_argument("--embeddings", action="store_true",
                   help="benchmark an embeddings model (without MODEL: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--prompt-tokens", type=positive, default=None, metavar="N",
                   help="text generation: prompt length in tokens (default: 64)")
    p.add_argument("--new-tokens", type=positive, default=None, metavar="N",
                   help="text generation: tokens to generate per run (default: 128)")
    p.add_argument("--sentences", type=positive, default=None, metavar="N",
                   help="embeddings: sentences per throughput run (default: 1024)")
    p.add_argument("--batch-size", type=positive, default=None, metavar="N",
                   help="text generation: sequences decoded together, same prompt (default: 1); embeddings: "
                        "sentences per model call in the throughput runs (default: 32)")
    p.add_argument("--latency-encodes", type=positive, default=None, metavar="N", help=argparse.SUPPRESS)
    p.add_argument("--bandwidth-mib", type=positive, default=None, metavar="N", help=argparse.SUPPRESS)
    p.add_argument("--runs", type=positive, default=5, metavar="N", help="measured runs (default: 5)")
    p.add_argument("--warmup", type=non_negative, default=1, metavar="N", help="unmeasured runs first (default: 1)")
    p.add_argument("--compare", choices=["hf", "st", "ort-genai", "continuous"], default=None,
                   help="also run the same weights in a peer and print ratios: hf (transformers) or ort-genai "
                        "(onnxruntime-genai, int4 model built by its builder; pip install 'ember[bench]') for "
                        "a text-generation model, st (sentence-transformers) for an embeddings model; with "
                        "--concurrency, continuous: ember's own static batch on the continuous KV cache")
    p.add_argument("--encoding", type=encoding_list, default=None, metavar="E[,E...]",
                   help="weight encoding; for text generation a comma-separated list is measured in one run, "
                        "e.g. float32,q8_0,q4_0 (default: the architecture's)")
    p.add_argument("--concurrency", type=positive_list, default=None, metavar="N[,N...]",
                   help="text generation: serve N concurrent requests through the engine (continuous batching; "
                        "--prompt-tokens / --new-tokens each) and report total output tokens/s, time to first "
                        "token and inter-token latency per level, e.g. 1,4,16 (default strategy: paged)")
    p.add_argument("--request-rate", type=positive_rate, default=None, metavar="R",
                   help="with --concurrency: each level's N requests arrive at R per second (Poisson, seeded: the "
                        "same arrivals every run), as a server sees them, instead of all at once")
    p.add_argument("--http", action="store_true",
                   help="with --concurrency: also send the requests through `ember serve`'s HTTP server (on "
                        "127.0.0.1 in this process) and compare with the engine driven directly in the same run")
    p.add_argument("--prefix-cache", action="store_true",
                   help="text generation: time to first token of a 512-token prompt sharing 448 tokens with a "
                        "finished request (prefix-cache hit) against a cold one (paged KV cache)")
    add_kv_cache_bit_width(p)
    add_kv_cache_options(p, "continuous; paged with --concurrency / --prefix-cache / --speculative")
    add_speculative_options(p)
    add_threads(p)
    p.add_argument("--json", metavar="PATH", default=None, help="also write the report as JSON to PATH")
    p.set_defaults(handler=cmd_bench)

    p = commands.add_parser("verify", parents=[verbose], help="measure a model's accuracy against float32",
                            description="Run a shipped English text (a few hundred tokens) teacher-forced through "
                                        "the compiled model and through the float32 reference (transformers where "
                                        "torch is installed, else ember's own float32 build), and greedy "
                                        "continuations of a few prompts; print relative logit error, top-1 "
                                        "agreement, KL divergence, NLL delta and greedy agreement. Exit 1 past the "
                                        "encoding's thresholds (float32: relative error 1e-4 and top-1 100 %; "
                                        "8-bit: top-1 >= 97 %; 4-bit: top-1 >= 90 % and NLL within 2 %).")
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="HF model directory, .gguf file or compiled artifact (default: the embedded "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--target", type=lazy_choice("target"), default=None,
                   help="compile target (default: ort-cpu; an artifact's own)")
    p.add_argument("--kv-cache-strategy", type=lazy_choice("kv cache strategy"), default=None,
                   help="continuous or paged (default: the first the encoding supports)")
    p.add_argument("--reference", choices=["auto", "transformers", "ember"], default="auto",
                   help="float32 reference: transformers, ember's own float32 build, or auto (transformers where "
                        "torch is installed; default)")
    p.add_argument("--text", metavar="PATH", default=None, help="verify on this UTF-8 text instead of the shipped one")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the figures as JSON to PATH")
    add_run_options(p, cmd_verify, target=False)
    add_model_commands(commands, [verbose])  # pull, models
    add_serve_command(commands, [verbose])
    return parser


# commands ---------------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    from .architectures import describe_architectures, describe_targets, format_architectures, format_targets

    rows, targets = describe_architectures(), describe_targets()
    if args.json:
        print(json.dumps({"architectures": rows, "targets": targets}, indent=2))
    else:
        print(f"{format_architectures(rows)}\n\n{format_targets(targets)}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from .compile_model import compile_model

    result = compile_model(args.model, args.output, target=args.target, device=args.device, encoding=args.encoding,
                           kv_cache_strategy=args.kv_cache_strategy, max_length=args.max_length, force=args.force,
                           kv_cache_bit_width=args.kv_cache_bit_width or 0, verify=not args.no_verify,
                           tensor_parallel=args.tensor_parallel, decode_slots=args.decode_slots)
    if result.compiled:
        eprint(f"compiled {result.architecture} for {args.target} in {result.seconds:.2f} s")
    else:
        eprint(f"already in the compile cache (verified in {result.seconds:.2f} s); --force recompiles")
    if result.verification is not None:
        from .verify_metrics import summarize
        eprint(summarize(result.verification))
    if args.verbose + args.verbose_global:
        from ember.compiler.artifact import MANIFEST

        from .lowering_report import format_lowerings
        for line in format_lowerings(json.loads((result.path / MANIFEST).read_text())):
            eprint(f"lowering: {line}")
    print(result.path)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import GenerationStats, build_prompt, stream_text
    from .loading import load_pipeline, pipeline_config

    sampling = sampling_params(args)
    loaded = load_pipeline(pipeline_config(args.model, encoding=args.encoding, max_length=args.max_length,
                                           num_threads=args.threads, **kv_cache_config(args), **speculative_config(args),
                                           **placement(args)))
    prompt_ids = build_prompt(loaded.tokenizer, args.prompt, system=args.system,
                              chat_template=not args.no_chat_template)
    stats = GenerationStats()
    for delta in stream_text(loaded.pipeline, loaded.tokenizer, prompt_ids, sampling, stats):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    cut = stats.finish_reason == "length" and stats.generated_tokens >= args.max_new_tokens
    eprint(f"[ember] {loaded.describe()}; {stats.describe()}"
            + (f"; stopped at --max-new-tokens {args.max_new_tokens}" if cut else ""))
    if args.verbose + args.verbose_global:
        eprint(f"[ember] {loaded.describe_verification()}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import run_chat
    from .loading import load_pipeline, pipeline_config

    sampling = sampling_params(args)
    loaded = load_pipeline(pipeline_config(args.model, encoding=args.encoding, max_length=args.max_length,
                                           num_threads=args.threads, **kv_cache_config(args), **speculative_config(args),
                                           **placement(args)))
    eprint(f"[ember] {loaded.describe()}")
    return run_chat(loaded.pipeline, loaded.tokenizer, sampling, system=args.system)


def cmd_embed(args: argparse.Namespace) -> int:
    from ember.runtime.pipelines import PipelineTask

    from .embed import (check_lengths, cosine_similarity, embed_texts, format_embeddings, format_similarity,
                        format_summary, output_path, read_lines, save_embeddings)
    from .loading import embeddings_model, load_pipeline, pipeline_config

    if args.file is not None and args.texts:
        raise UsageError("give TEXT arguments or --file, not both")
    if args.file is None and not args.texts:
        raise UsageError("nothing to embed: give TEXT arguments or --file PATH")
    output = output_path(args.output) if args.output else None  # a bad --output fails before any work
    texts = read_lines(args.file) if args.file is not None else list(args.texts)
    config = pipeline_config(embeddings_model(args.model), encoding=args.encoding, max_length=args.max_length,
                             num_threads=args.threads, max_batch_size=args.batch_size,
                             truncation=not args.no_truncation, **placement(args))
    loaded = load_pipeline(config, task=PipelineTask.EMBEDDINGS_GENERATION)
    check_lengths(loaded.pipeline, texts, f"line {{n}} of {args.file}" if args.file is not None else "TEXT {n}")
    result = embed_texts(loaded.pipeline, texts, batch_size=args.batch_size, progress=args.file is not None)
    if args.file is not None:
        print(format_summary(result, "stdin" if args.file == "-" else args.file), flush=True)
    else:
        print(format_embeddings(texts, result.embeddings))
        print()
        print(format_similarity(cosine_similarity(result.embeddings)), flush=True)
    n, dim = result.embeddings.shape
    eprint(f"[ember] {loaded.describe()}; embedded {n} text{'s' if n != 1 else ''} ({dim} dimensions) in "
            f"{result.seconds * 1000:.1f} ms, {loaded.num_threads} threads")
    if output is not None:
        eprint(f"wrote {save_embeddings(output, result.embeddings)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench_commands import run_bench  # the benchmarks' own imports load only for `ember bench`
    return run_bench(args)


def cmd_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .verify import VerifyOptions, verify_model

    output = Path(args.json) if args.json else None
    if output is not None and not output.parent.is_dir():
        raise UsageError(f"--json {args.json}: no directory {output.parent}")
    report = verify_model(VerifyOptions(model=args.model, encoding=args.encoding,
                                        kv_cache_strategy=args.kv_cache_strategy, target=args.target,
                                        device=args.device,
                                        reference=args.reference, text=Path(args.text) if args.text else None,
                                        max_length=args.max_length, num_threads=args.threads))
    print(report.format(), flush=True)
    if output is not None:
        output.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        eprint(f"wrote {output}")
    return 0 if report.passed else EXIT_RUNTIME_ERROR


# entry point ------------------------------------------------------------------------------------------
def _torchrun_follower(argv: list[str]) -> bool:
    """Whether this process is a rank above 0 that torchrun started for a tensor-parallel command (every rank runs
    the same command line; rank 0 runs it, the others serve rank 0's steps)."""
    asks = any(a in ("--tensor-parallel", "-tp") or a.startswith("--tensor-parallel=") for a in argv)
    return asks and os.environ.get("RANK", "0") != "0" and "WORLD_SIZE" in os.environ


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("ember").setLevel(level)
    # fetching a default model on first use says so, whatever the verbosity
    logging.getLogger("ember.runtime.pipelines.model_store").setLevel(min(level, logging.INFO))


def _expected_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ValueError, FileNotFoundError, NotADirectoryError, PermissionError]
    compiler = sys.modules.get("ember.compiler")
    if compiler is not None:
        errors.append(compiler.ArtifactError)
    # No GPU, no CUDA build of onnxruntime, no TensorRT, an engine TensorRT refused: one line each
    for module, names in (("ember.runtime.backends.cuda_memory", ("DeviceUnavailable", "CudaError")),
                          ("ember.compiler.cuda_device", ("CudaUnavailable",)),
                          ("ember.compiler.tensorrt_engine", ("TensorRTUnavailable", "EngineBuildError"))):
        loaded = sys.modules.get(module)
        errors.extend(getattr(loaded, name) for name in names if loaded is not None)
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if _torchrun_follower(argv):  # a rank above 0 under torchrun: follow rank 0, which runs the command
        from ember.runtime.distributed.group import serve_from_environment

        _configure_logging(0)
        serve_from_environment()
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    verbosity = getattr(args, "verbose", 0) + args.verbose_global
    _configure_logging(verbosity)
    # ember runs without torch by design; transformers' "PyTorch was not found" advice would only confuse
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.handler(args)
    except UsageError as error:
        eprint(f"ember: error: {error}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        eprint("ember: interrupted")
        return 130
    except BrokenPipeError:  # e.g. `ember generate ... | head`
        sys.stderr.close()
        return 0
    except Exception as error:
        if not isinstance(error, _expected_errors()):
            raise
        logger.debug("traceback", exc_info=True)
        eprint(f"ember: error: {error}")
        return EXIT_RUNTIME_ERROR


if __name__ == "__main__":
    sys.exit(main())
