"""The command line's shared pieces: exit codes, usage errors, argument types and the option groups several commands
take (model, threads, KV cache, sampling), so each command's module builds its parser from the same parts."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib import metadata

EXIT_RUNTIME_ERROR, EXIT_USAGE = 1, 2


class UsageError(Exception):
    """Options that parse but do not go together: reported like argparse's usage errors (exit 2)."""


class EmberArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage errors, in ember's format
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"ember: error: {message}\n")


def lazy_choice(kind: str):
    """An argparse ``type`` that checks a value against ember's live list, importing it only when used."""
    def check(value: str) -> str:
        if kind == "target":
            from ember.compiler import TARGETS
            known = list(TARGETS)
        elif kind == "encoding":
            from ember.runtime.pipelines import SupportedEncoding
            known = [e.value for e in SupportedEncoding]
        else:
            from ember.runtime.pipelines import KVCacheStrategy
            known = [s.value for s in KVCacheStrategy]
        if value not in known:
            raise argparse.ArgumentTypeError(f"invalid {kind} {value!r} (choose from {', '.join(known)})")
        return value
    check.__name__ = kind
    return check


def integer_at_least(minimum: int, what: str):
    def check(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = minimum - 1
        if number < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value!r}")
        return number
    return check


positive, non_negative = integer_at_least(1, "positive"), integer_at_least(0, "non-negative")


def positive_rate(value: str) -> float:
    """``--request-rate``: a finite number above 0 (requests per second)."""
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of requests per second, got {value!r}")
    return number


def positive_list(value: str) -> list[int]:
    """``--concurrency 1,4,16``: positive integers, in the order given, duplicates dropped."""
    check = positive
    parts = [part.strip() for part in value.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"empty value in {value!r}")
    return list(dict.fromkeys(check(part) for part in parts))


def encoding_list(value: str) -> list[str]:
    """``--encoding`` of ``ember bench``: one encoding or a comma-separated list, each checked like
    ``--encoding`` elsewhere, duplicates dropped (the order is kept: the first is the report's ``ember``)."""
    check = lazy_choice("encoding")
    names = [part.strip() for part in value.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty encoding in {value!r}")
    return list(dict.fromkeys(check(name) for name in names))


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoding", type=lazy_choice("encoding"), default=None,
                        help="weight encoding (default: the architecture's; `ember list` shows the supported ones)")
    parser.add_argument("--max-length", type=positive, default=None, metavar="N",
                        help="maximum sequence length (default: the model's)")


def add_kv_cache_bit_width(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-cache-bit-width", type=non_negative, default=None, metavar="BITS",
                        help="KV cache element width: 0 keeps it float (default); 8 stores it in int8 with scales "
                             "calibrated at compile time (ort-cpu, continuous KV cache)")


def byte_size(value: str) -> int:
    """``--kv-cache-bytes``: an integer with an optional K/M/G/T suffix (powers of 1024): 512M, 2G."""
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(text[-1:], 1)
    try:
        number = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a byte count such as 512M or 2G, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive byte count, got {value!r}")
    return int(number)


def add_kv_cache_options(parser: argparse.ArgumentParser, default_strategy: str = "the encoding's first") -> None:
    parser.add_argument("--kv-cache-strategy", type=lazy_choice("kv cache strategy"), default=None,
                        help=f"continuous or paged (default: {default_strategy})")
    parser.add_argument("--kv-cache-bytes", type=byte_size, default=None, metavar="BYTES",
                        help="cap on KV cache memory, e.g. 512M or 2G (default: half the available memory)")
    parser.add_argument("--kv-cache-pages", type=positive, default=None, metavar="N",
                        help="paged: cap on the number of KV cache pages")
    parser.add_argument("--kv-cache-page-size", type=positive, default=None, metavar="TOKENS",
                        help="paged: tokens per page (default: 16)")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="paged: do not share the pages of common prompt prefixes between requests")
    add_decode_slots_option(parser)


def add_decode_slots_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decode-slots", type=non_negative, default=None, metavar="N",
                        help="paged, CPU: decode up to N sequences on the continuous graph over slots mirrored from "
                             "their pages while only they are decoding (faster at low concurrency; the model is "
                             "compiled with both graphs, the weights held once; a max-length slot per sequence). "
                             "Default: 1 where they can serve (paged float KV cache on the CPU, plain decoding, one "
                             "process), else 0; 0 turns them off")


def kv_cache_config(args: argparse.Namespace) -> dict:
    """The PipelineConfig fields of the KV cache options."""
    config = {"kv_cache_strategy": args.kv_cache_strategy, "kv_cache_bytes": args.kv_cache_bytes,
              "kv_cache_pages": args.kv_cache_pages, "enable_prefix_caching": not args.no_prefix_caching,
              "kv_cache_bit_width": args.kv_cache_bit_width or 0, "decode_slots": args.decode_slots}
    if args.kv_cache_page_size is not None:
        config["kv_cache_page_size"] = args.kv_cache_page_size
    return config


def add_speculative_options(parser: argparse.ArgumentParser) -> None:
    """Speculative decoding (runtime/speculative/): PipelineConfig's speculative, draft_model_path and
    num_speculative_tokens."""
    parser.add_argument("--speculative", choices=["ngram", "draft"], default=None,
                        help="speculative decoding: ngram drafts by prompt lookup (no model; pays off when the "
                             "output copies the prompt), draft by --draft-model; greedy output is unchanged "
                             "(paged KV cache)")
    parser.add_argument("--draft-model", default=None, metavar="PATH",
                        help="the draft model of --speculative draft (a smaller model with the same tokenizer)")
    parser.add_argument("--num-speculative-tokens", type=positive, default=None, metavar="K",
                        help="speculative: tokens drafted per step at most (default: 4; fewer while drafts are "
                             "rejected)")


def speculative_config(args: argparse.Namespace) -> dict:
    """The PipelineConfig fields of the speculative options (none without --speculative / --draft-model)."""
    if args.speculative is None and args.draft_model is None:
        if args.num_speculative_tokens is not None:
            raise UsageError("--num-speculative-tokens needs --speculative")
        return {}
    if getattr(args, "decode_slots", 0):
        raise UsageError("--decode-slots is for plain decoding: speculative verification runs the paged graph, "
                         "whose last bits the plain steps must share")
    config = {"speculative": args.speculative or "draft", "draft_model_path": args.draft_model}
    if args.num_speculative_tokens is not None:
        config["num_speculative_tokens"] = args.num_speculative_tokens
    return config


def add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive, default=None, metavar="N",
                        help="onnxruntime intra-op threads (default: the CPUs this process may use)")


# A chat answer of a paragraph or two; a model ends shorter answers itself (EOS), and a model stuck repeating
# is cut after one paragraph instead of running on (ember issue 16).
DEFAULT_MAX_NEW_TOKENS = 128


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """How the commands that generate pick tokens (``generate``, ``chat``): SamplingParams' fields."""
    parser.add_argument("--max-new-tokens", type=positive, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                        help=f"tokens to generate at most per answer (default: {DEFAULT_MAX_NEW_TOKENS}: a chat "
                             "answer of a paragraph or two; the model stops earlier at its end-of-sequence "
                             "token, and a model caught in a loop stops here)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="sampling temperature (default: 0 = greedy)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling threshold (default: 1.0)")
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="random seed for sampling")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                        help="divide positive logits (multiply negative ones) of every token already in the prompt "
                             "or the answer by R, as transformers does; > 0, e.g. 1.1 (default: 1.0 = off)")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, metavar="F",
                        help="subtract F times the count of each token in the answer so far (OpenAI's); "
                             "-2 to 2 (default: 0 = off)")
    parser.add_argument("--presence-penalty", type=float, default=0.0, metavar="P",
                        help="subtract P from every token already in the answer (OpenAI's); -2 to 2 (default: 0 = off)")
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")


def sampling_params(args: argparse.Namespace):
    """SamplingParams from the sampling options; an out-of-range value is a usage error (exit 2)."""
    from ember.runtime.pipelines import SamplingParams

    try:
        return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos,
                              repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                              presence_penalty=args.presence_penalty)
    except ValueError as error:
        raise UsageError(str(error)) from None


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=device_name, default=None, metavar="DEVICE",
                        help="cpu, cuda or cuda:N (default: device 0 of the kind the target compiles for)")


def device_name(value: str) -> str:
    """``--device``: checked like ``PipelineConfig.device`` (cpu, cuda, cuda:N)."""
    kind, _, index = value.strip().partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise argparse.ArgumentTypeError(f"invalid device {value!r} (cpu, cuda or cuda:N)")
    return value.strip()


def add_run_options(parser: argparse.ArgumentParser, handler: Callable[[argparse.Namespace], int],
                    target: bool = True) -> None:
    """The options of the commands that load and run a model (the model's, where it runs, the threads), then the
    handler; ``target=False`` for a command that declares ``--target`` itself."""
    add_model_options(parser)
    if target:
        parser.add_argument("--target", type=lazy_choice("target"), default=None,
                            help="compile target (default: ort-cpu; an artifact's own; `ember list` shows them)")
    add_device_option(parser)
    add_tensor_parallel(parser)
    add_threads(parser)
    parser.set_defaults(handler=handler)


def add_tensor_parallel(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tensor-parallel", "-tp", type=positive, default=1, metavar="N",
                        help="split the model over N ranks (processes on this machine joined by torch.distributed, "
                             "or the ranks torchrun started; needs torch: pip install 'ember[distributed]')")


def placement(args: argparse.Namespace) -> dict:
    """The PipelineConfig fields of ``--target`` / ``--device`` / ``--tensor-parallel`` (a target left unset asks
    nothing of an artifact)."""
    return {"target": args.target or "ort-cpu", "device": args.device,
            "tensor_parallel": getattr(args, "tensor_parallel", 1)}


def version() -> str:
    try:
        return metadata.version("ember")
    except metadata.PackageNotFoundError:
        return "unknown"


def eprint(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)
