"""What ``use_subgraphs`` changes: graph size, build time and compile time, with and without outlined blocks.

For each model (an HF directory or a .gguf file; by default a random Llama with SmolLM2-135M's layer count, heads
and vocabulary made in a temporary directory, and SmolLM2-135M itself where it is installed), the high-level graph
is built plain and outlined (``graphs/ir/subgraphs.py``'s ``outline_layer_groups`` after the build) and reported
with: main-graph nodes, functions (and the nodes in their bodies), the serialized high-level graph with every
initializer stored outside it (what a ``model.onnx`` beside its ``.data`` file holds), build time, ``compile_graph``
time for ort-cpu (inlining, lowering, writing the artifact) and the lowered graph's nodes. Times are medians of
``--runs`` compiles and of 5 builds per run, the two forms taking turns.

    python -m ember.tools.bench_subgraphs [MODEL ...] [--no-default-models] [--kv-cache-strategy paged] [--runs 3]

BENCHMARKS.md ("use_subgraphs") has the figures.
"""
from __future__ import annotations

import argparse
import gc
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import onnx
import onnx_ir as ir

from ember.compiler.compile import CompileOptions, compile_graph
from ember.compiler.passes.inline_functions import inline_functions
from ember.graphs.ir.subgraphs import outline_layer_groups
from ember.graphs.nn.kv_cache import KVCacheStrategy
from ember.runtime.pipelines.config import WeightsFormat
from ember.runtime.pipelines.model_source import ModelSource, default_model_path

from .compile_model import architecture_for

logger = logging.getLogger(__name__)
T = TypeVar("T")
#: Builds (and outlinings, inlinings) timed per compile run.
BUILDS_PER_RUN = 5

#: The random default model: SmolLM2-135M's shape (30 layers, 9 heads over 3 KV heads, 576 wide, 49152 words).
SMOLLM2_SHAPE: dict[str, Any] = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                     tie_word_embeddings=True, rope_theta=100000.0)


@dataclass(frozen=True)
class GraphFigures:
    """One model in one form (module docstring); ``outline_s`` / ``inline_s``: the outlining (part of ``build_s``)
    and the compiler's inlining (part of ``compile_s``)."""

    model: str
    form: str
    nodes: int
    functions: int
    function_nodes: int
    graph_bytes: int
    build_s: float
    outline_s: float
    inline_s: float
    compile_s: float
    lowered_nodes: int


class Builder:
    """Builds a model's high-level graph, as the compiler does, as often as asked (the weights opened once)."""

    def __init__(self, path: Path, strategy: KVCacheStrategy):
        source = ModelSource.resolve(path)
        self.architecture = architecture_for(source)
        self.options = CompileOptions(kv_cache_strategy=strategy)
        self.hf_config = source.hf_config()
        self.checkpoint = source.open_weights()
        self.weights_format = source.checkpoint_format().value
        self.rules = {WeightsFormat(f).value: rules for f, rules in self.architecture.weight_adapters.items()}

    def build(self) -> ir.Model:
        return self.architecture.spec.build(self.hf_config, self.checkpoint, self.weights_format,
                                            self.options.graph_options(), self.rules)


def graph_bytes(model: ir.Model) -> int:
    """Bytes of ``model``'s proto with every initializer stored outside it (nothing is loaded to measure it)."""
    with _weights_outside(model):
        return ir.to_proto(model).ByteSize()


@contextmanager
def _weights_outside(model: ir.Model) -> Iterator[None]:
    saved = {value: value.const_value for value in model.graph.initializers.values()}
    try:
        for value, tensor in saved.items():
            if tensor is not None:
                value.const_value = ir.ExternalTensor("model.onnx.data", 0, tensor.nbytes, tensor.dtype,
                                                      shape=ir.Shape(tensor.shape.numpy()), name=value.name or "")
        yield
    finally:
        for value, tensor in saved.items():
            value.const_value = tensor


def _timed(work: Callable[[], T]) -> tuple[float, T]:
    """``work``'s seconds and result, the garbage of earlier runs collected first (a collection of a previous
    graph's nodes inside the timing was a tenfold outlier for a 15 ms build)."""
    gc.collect()
    start = time.perf_counter()
    result = work()
    return time.perf_counter() - start, result


def measure(name: str, builder: Builder, runs: int, scratch: Path) -> list[GraphFigures]:
    """Both forms of one model; the forms take turns run by run, so that drift in the machine hits both alike."""
    builder.build()  # warm-up: imports, the checkpoint's first reads
    seconds: dict[str, list[float]] = {key: [] for key in ("build0", "build1", "outline", "inline", "compile0",
                                                           "compile1")}
    lowered_nodes: dict[bool, int] = {}
    for run in range(runs * BUILDS_PER_RUN):  # builds take milliseconds: more of them
        for outlined in (run % 2 == 1, run % 2 == 0):
            build_s, model = _timed(builder.build)
            if outlined:
                outline_s, model = _timed(lambda: outline_layer_groups(model))
                seconds["outline"].append(outline_s)
                build_s += outline_s
                seconds["inline"].append(_timed(lambda: inline_functions(model))[0])
            seconds[f"build{int(outlined)}"].append(build_s)
    for run in range(runs):
        for outlined in (run % 2 == 1, run % 2 == 0):
            form = int(outlined)
            model = builder.build()
            if outlined:
                outline_layer_groups(model)
            directory = scratch / f"{name}-{form}-{run}".replace("/", "_")
            compile_s, artifact = _timed(lambda: compile_graph(model, directory, builder.options,
                                                               {"architecture": builder.architecture.name}))
            seconds[f"compile{form}"].append(compile_s)
            written = onnx.load(str(artifact.rank_model(0)), load_external_data=False)
            lowered_nodes[outlined] = len(written.graph.node)
            shutil.rmtree(directory)  # a float32 artifact per run would fill the disk
            logger.info("%s %s run %d: compile %.2f s", name, "outlined" if outlined else "plain", run + 1, compile_s)
    median = {key: statistics.median(values) if values else 0.0 for key, values in seconds.items()}
    figures = []
    for outlined in (False, True):
        model = builder.build()
        if outlined:
            outline_layer_groups(model)
        figures.append(GraphFigures(name, "use_subgraphs" if outlined else "plain", len(model.graph),
                                    len(model.functions), sum(len(f) for f in model.functions.values()),
                                    graph_bytes(model), median[f"build{int(outlined)}"],
                                    median["outline"] if outlined else 0.0, median["inline"] if outlined else 0.0,
                                    median[f"compile{int(outlined)}"], lowered_nodes[outlined]))
    return figures


def random_llama(directory: Path) -> Path:
    """A random Llama of SmolLM2-135M's shape saved into ``directory`` (float32 safetensors; no tokenizer: a graph
    and its compile need none)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).save_pretrained(directory)
    return directory


def table(figures: list[GraphFigures]) -> str:
    lines = ["| model | graph | main-graph nodes | functions (their nodes) | graph proto without weights | "
             "build (of it outlining) | compile_graph, ort-cpu (of it inlining) | lowered nodes |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for f in figures:
        extra = f.form != "plain"
        lines.append(f"| {f.model} | {f.form} | {f.nodes} | {f.functions} ({f.function_nodes}) | "
                     f"{f.graph_bytes / 1024:.1f} KiB | {f.build_s * 1e3:.0f} ms"
                     f"{f' ({f.outline_s * 1e3:.1f} ms)' if extra else ''} | {f.compile_s:.2f} s"
                     f"{f' ({f.inline_s * 1e3:.1f} ms)' if extra else ''} | {f.lowered_nodes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path, help="HF model directories or .gguf files")
    parser.add_argument("--no-default-models", action="store_true",
                        help="only the MODELs given (not the random SmolLM2-shaped Llama and SmolLM2-135M)")
    parser.add_argument("--kv-cache-strategy", choices=[s.value for s in KVCacheStrategy],
                        default=KVCacheStrategy.PAGED.value)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    strategy = KVCacheStrategy(args.kv_cache_strategy)
    with tempfile.TemporaryDirectory(prefix="ember-bench-subgraphs-") as tmp:
        scratch = Path(tmp)
        models = [(str(path), path) for path in args.models]
        if not args.no_default_models:
            models.insert(0, ("random Llama, SmolLM2-135M's shape", random_llama(scratch / "random-llama")))
            try:
                models.append(("SmolLM2-135M-Instruct (GGUF, float32)", default_model_path()))
            except FileNotFoundError as e:
                logger.warning("SmolLM2-135M is not installed, left out: %s", e)
        figures = []
        for name, path in models:
            figures += measure(name, Builder(path, strategy), args.runs, scratch)
    print(table(figures))


if __name__ == "__main__":
    main()
