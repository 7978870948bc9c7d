"""Compile a high-level graph for a target and write it as an artifact directory."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from ember.graphs.nn.kv_cache import DEFAULT_PAGE_SIZE, KVCacheStrategy
from ember.graphs.nn.transformer import ReturnLogits
from ember.graphs.options import GraphOptions

from .artifact import Artifact, write_artifact
from .compile_progress import CompileProgress
from .engine_files import engine_key_material, installed_tensorrt_version
from .graph_runner import GraphRunner
from .passes.base import name_of
from .passes.cut_at_collectives import Stage, cut_at_collectives, has_collectives
from .passes.lowering_record import summarize
from .slot_graph import attach_slot_graph, cache_renames, slot_graph_manifest
from .targets import get_target

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileOptions:
    """Everything besides the source that changes what a compile produces (part of the cache key)."""

    target: str = "ort-cpu"
    encoding: str = "float32"
    kv_cache_strategy: KVCacheStrategy = KVCacheStrategy.CONTINUOUS
    return_logits: ReturnLogits = ReturnLogits.LAST_TOKEN
    # Encoders: pool the last hidden state inside the graph ("mean", "cls", "max", "lasttoken"; None returns
    # the last hidden state) and L2-normalize the pooled vector.
    pooling: str | None = None
    normalize: bool = False
    # Decoders: 0 keeps the KV cache in float; 8 keeps it in int8 with scales calibrated at compile time
    # (where the target's attention kernel supports it: ort-cpu's GroupQueryAttention).
    kv_cache_bit_width: int = 0
    # PAGED: tokens per page (the granularity of allocation and of prefix sharing).
    kv_cache_page_size: int = DEFAULT_PAGE_SIZE
    # Decoders: split over this many ranks (one graph per rank, cut into stages at its collectives for a target
    # with none in its graphs: DESIGN.md, distribution).
    tensor_parallel: int = 1
    # PAGED decoders on onnxruntime's CPU provider: also hold the continuous graph, run instead of the paged one
    # when an input says so (the decode slots' graph: ``compiler/slot_graph.py``), its weights shared.
    slot_graph: bool = False

    def graph_options(self, rank: int = 0) -> GraphOptions:
        """What the architecture's graph builder is asked for (the rest is the compiler's own business): the graph
        of rank ``rank``."""
        return GraphOptions(return_logits=self.return_logits, kv_cache_strategy=KVCacheStrategy(self.kv_cache_strategy),
                            kv_cache_page_size=self.kv_cache_page_size, pooling=self.pooling, normalize=self.normalize,
                            tensor_parallel=self.tensor_parallel, rank=rank)

    def slot_graph_options(self) -> GraphOptions:
        """What the architecture's graph builder is asked for the decode slots' graph (:attr:`slot_graph`)."""
        return GraphOptions(return_logits=ReturnLogits.LAST_TOKEN, kv_cache_strategy=KVCacheStrategy.CONTINUOUS,
                            pooling=self.pooling, normalize=self.normalize)

    def to_json(self) -> dict[str, str]:
        return {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(self).items()}

    def validate(self) -> None:
        target = get_target(self.target)
        if self.kv_cache_page_size < 1:
            raise ValueError(f"kv_cache_page_size must be a positive number of tokens, not {self.kv_cache_page_size}")
        if self.kv_cache_strategy not in target.kv_strategies:
            raise ValueError(f"target {target.name} does not support the {self.kv_cache_strategy.value} KV cache; "
                             f"supported: {', '.join(s.value for s in target.kv_strategies)}")
        if self.encoding not in target.encodings:
            raise ValueError(f"target {target.name} does not support encoding {self.encoding!r}; "
                             f"supported: {', '.join(target.encodings)}")
        if not isinstance(self.tensor_parallel, int) or self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be a positive number of ranks, not {self.tensor_parallel!r}")
        if self.tensor_parallel > 1 and target.runtime not in TENSOR_PARALLEL_RUNTIMES:
            raise ValueError(f"tensor parallelism runs its ranks on {', '.join(TENSOR_PARALLEL_RUNTIMES)} in this "
                             f"version; target {target.name} ({target.runtime}) compiles for one device")
        if self.tensor_parallel > 1 and self.kv_cache_bit_width:
            raise ValueError("an integer KV cache is calibrated on one device; it cannot be combined with "
                             "tensor_parallel > 1")
        if self.kv_cache_bit_width:
            from .passes.lower_attention_gqa import kv_cache_bit_widths

            widths = kv_cache_bit_widths(target.passes)
            if self.kv_cache_bit_width not in widths:
                raise ValueError(f"target {target.name} does not support a {self.kv_cache_bit_width}-bit KV cache; "
                                 f"supported kv_cache_bit_width: {', '.join(map(str, (0, *widths)))} (0: float)")
            if self.kv_cache_strategy is not KVCacheStrategy.CONTINUOUS:
                raise ValueError(f"a {self.kv_cache_bit_width}-bit KV cache needs the continuous KV cache strategy, "
                                 f"not {self.kv_cache_strategy.value}")
        refusal = self.slot_graph_refusal()
        if refusal is not None:
            raise ValueError(refusal)

    def slot_graph_refusal(self) -> str | None:
        """Why the decode slots' graph cannot join this compile (None: it can, or none is asked for): it joins a
        paged graph on one onnxruntime CPU session (:attr:`slot_graph`)."""
        if not self.slot_graph:
            return None
        target = get_target(self.target)
        for clash, why in ((self.kv_cache_strategy is not KVCacheStrategy.PAGED, "a paged KV cache"),
                           (KVCacheStrategy.CONTINUOUS not in target.kv_strategies,
                            f"a target with the continuous KV cache too ({target.name} has not)"),
                           (target.runtime != "onnxruntime-cpu",
                            f"onnxruntime's CPU provider (target {target.name} runs on {target.runtime})"),
                           (not target.loads_in_branches,
                            f"a target whose graphs load as If branches ({target.name}'s do not)"),
                           (self.tensor_parallel != 1, "one rank (tensor_parallel 1)"),
                           (self.kv_cache_bit_width != 0, "a float KV cache")):
            if clash:
                return f"the decode slots' graph (slot_graph) needs {why}"
        return None


#: Runtime backends whose ranks run a stage-cut graph (they load each stage file; the communicator runs the
#: collectives between them). TensorRT (one engine per rank stage, or its NCCL plugin in one engine) is not written.
TENSOR_PARALLEL_RUNTIMES = ("onnxruntime-cpu", "onnxruntime-cuda")
#: Device kind -> the torch.distributed backend that runs a step's collectives and where their operands live: gloo
#: on host arrays; NCCL on the device buffers the rank's stages write (no copy to the host between stages).
#: onnxruntime's own NCCL ops (``com.microsoft`` AllReduce/AllGather, in the graph) exist only in builds made with
#: ``--use_nccl --use_mpi`` and take their ranks from MPI (``contrib_ops/cuda/collective/nccl_kernels``): the
#: PyPI onnxruntime-gpu has neither, so the rank graph is cut here too and NCCL runs between the stages.
COLLECTIVE_BACKENDS = {"cpu": ("gloo", "host"), "cuda": ("nccl", "device")}


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 of the graph-building and compiler source: a changed pass or layer is a different compile."""
    from ember import graphs  # its installed location, wherever the package-dir mapping put it

    digest = hashlib.sha256()
    for root in (Path(__file__).resolve().parent, Path(graphs.__file__).resolve().parent):
        for file in sorted(root.rglob("*.py")):
            digest.update(file.relative_to(root).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def toolchain_versions() -> dict[str, str]:
    """Versions that change compiled output: in the cache key and the manifest."""
    versions = {"ember-code": code_fingerprint()}
    for dist in ("ember", "onnx", "onnx-ir", "onnxruntime"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "unknown"
    return versions


def cache_key(source_sha256: str, options: CompileOptions) -> str:
    """The compile cache's key: source, options, toolchain, the device kind the target compiles for and, for a
    TensorRT target, the installed TensorRT version (the engines per GPU model are keyed inside the artifact:
    ``engine_files``)."""
    target = get_target(options.target)
    material = {"source": source_sha256, "options": options.to_json(), "versions": toolchain_versions(),
                "device_kind": target.device_kind}
    if target.runtime == "tensorrt":
        material.update(engine_key_material(installed_tensorrt_version()))
    payload = json.dumps(material, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def compile_stage_count(options: CompileOptions, before: int = 0) -> int:
    """The stages :func:`compile_graph` counts for ``options`` (lowering passes, calibration, writing), plus
    ``before`` of the caller's own."""
    target = get_target(options.target)
    passes = len(target.passes_for(options.encoding)) * (options.tensor_parallel + options.slot_graph)
    return before + passes + bool(options.kv_cache_bit_width) + 1


def describe_values(values) -> list[dict[str, Any]]:
    return [{"name": v.name, "dtype": v.dtype.name if v.dtype is not None else None,
             "shape": [d if isinstance(d, int) else str(d) for d in (v.shape or [])]} for v in values]


def describe_graph(model: ir.Model) -> dict[str, list[dict[str, Any]]]:
    """The manifest's ``"graph"``: a model's inputs and outputs (:func:`describe_values`)."""
    return {"inputs": describe_values(model.graph.inputs), "outputs": describe_values(model.graph.outputs)}


def compile_graph(graph: ir.Model | Sequence[ir.Model], output_dir: str | Path, options: CompileOptions,
                  manifest: dict[str, Any], write_extra_files: Callable[[Path], None] | None = None,
                  calibration_tokens: tuple[list[np.ndarray], str] | None = None,
                  runner: GraphRunner | None = None, progress: CompileProgress | None = None,
                  slot_graph: ir.Model | None = None) -> Artifact:
    """Lower ``graph`` for ``options.target`` and write the artifact to ``output_dir`` (atomically).

    ``graph`` is one graph, or one per rank (``options.tensor_parallel`` of them, each with its collectives: they
    are cut into stages, ``rank<N>/stage<K>/``). ``calibration_tokens`` (rows of ids, where they came from)
    calibrate an integer KV cache; without them it is calibrated on random ids of the manifest's vocabulary.
    ``runner`` runs the float model for that calibration (a runtime backend, passed down by the caller: the compiler
    does not import the runtime). ``progress`` counts the stages (:func:`compile_stage_count`); a caller that did
    work before (reading the checkpoint) passes its own, else one is made here. ``slot_graph``: the decode slots'
    continuous graph (:attr:`CompileOptions.slot_graph`, built with ``options.slot_graph_options()``)."""
    options.validate()
    if options.slot_graph != (slot_graph is not None):
        raise ValueError("options.slot_graph and the slot_graph argument go together: pass the continuous graph "
                         "built with options.slot_graph_options() exactly when options.slot_graph is set")
    if options.kv_cache_bit_width and runner is None:  # before the lowering, not after it
        raise ValueError(f"a {options.kv_cache_bit_width}-bit KV cache is calibrated by running the float model: "
                         f"pass a runtime backend to run it (runner=)")
    graphs = [graph] if isinstance(graph, ir.Model) else list(graph)
    if len(graphs) != options.tensor_parallel:
        raise ValueError(f"{len(graphs)} rank graph(s) for tensor_parallel {options.tensor_parallel}")
    target = get_target(options.target)
    start = time.perf_counter()
    if progress is None:
        with CompileProgress(compile_stage_count(options)) as own:
            return compile_graph(graphs, output_dir, options, manifest, write_extra_files, calibration_tokens,
                                 runner, own, slot_graph)
    lowered = [target.lower(rank_graph, options.encoding, progress) for rank_graph in graphs]
    if options.kv_cache_bit_width:
        with progress.stage("calibrating the KV cache"):
            lowered[0], manifest = _quantize_kv_cache(lowered[0], options, manifest, calibration_tokens, runner)
    manifest = _kv_of_graph(lowered[0], manifest)
    described = describe_graph(lowered[0])
    lowerings = [lowering.to_json() for lowering in summarize(lowered[0])]
    if slot_graph is not None:
        lowered[0], manifest = _attach_slot_graph(lowered[0], target.lower(slot_graph, options.encoding, progress),
                                                  manifest, described["inputs"])
    total_bytes = sum(v.const_value.nbytes for model in lowered for v in model.graph.initializers.values()
                      if v.const_value is not None)
    staged = options.tensor_parallel > 1 and any(has_collectives(model) for model in lowered)
    ranks: list[Any] = [cut_at_collectives(model) if staged else model for model in lowered]

    def populate(tmp: Path) -> dict[str, Any]:
        if write_extra_files is not None:
            write_extra_files(tmp)
        entries = []
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"writing {target.name} model",
                  disable=None, leave=False) as bar:
            for rank, rank_model in enumerate(ranks):
                entries.append(_write_rank(target, rank, rank_model, tmp, bar.update))
        body = {
            **manifest,
            "ember_version": toolchain_versions()["ember"],
            "toolchain": toolchain_versions(),
            "options": options.to_json(),
            "target": target.name,
            "session": dict(target.session),
            "runtime": target.runtime_block(),
            "devices": [target.device_kind] * len(ranks),
            "ranks": entries,
            "graph": described,
            "lowerings": lowerings,
        }
        if options.tensor_parallel > 1:
            backend, operands = COLLECTIVE_BACKENDS[target.device_kind]
            body["tensor_parallel"] = {"world_size": options.tensor_parallel, "communicator": "torch.distributed",
                                       "backend": backend, "collectives_on": operands}
        return body

    with progress.stage("writing"):
        artifact = write_artifact(Path(output_dir), populate)
    logger.info("compiled %s for %s in %.1f s -> %s", manifest.get("architecture"), target.name,
                time.perf_counter() - start, artifact.path)
    return artifact


def _write_rank(target: Any, rank: int, rank_model: ir.Model | list[Stage], tmp: Path,
                progress: Callable[[int], None]) -> dict[str, Any]:
    """Write one rank's model (or its stages, ``rank<N>/stage<K>/``) and give its entry of the manifest."""
    entry: dict[str, Any] = {"rank": rank, "device": target.device_kind}
    if isinstance(rank_model, ir.Model):
        target.write(rank_model, tmp / f"rank{rank}", progress)
        return {**entry, "model": f"rank{rank}/model.onnx"}
    stages = []
    for index, stage in enumerate(rank_model):
        folder = f"rank{rank}/stage{index:03d}"
        target.write(stage.model, tmp / folder, progress)
        stages.append({"model": f"{folder}/model.onnx",
                       "collectives_after": [c.to_json() for c in stage.collectives_after]})
    return {**entry, "model": stages[0]["model"], "stages": stages}


def _attach_slot_graph(paged: ir.Model, continuous: ir.Model, manifest: dict[str, Any],
                       paged_inputs: list[dict[str, Any]]) -> tuple[ir.Model, dict[str, Any]]:
    """The lowered paged graph joined with the lowered decode slots' graph, and the manifest's ``"slot_graph"``."""
    renames = cache_renames(int(manifest["kv_params"]["num_layers"]))
    block = slot_graph_manifest(paged_inputs, describe_graph(continuous), renames)
    return attach_slot_graph(paged, continuous, renames), {**manifest, "slot_graph": block}


_CACHE_INPUT_PREFIXES = ("past_key_values.", "key_cache.")


def _kv_of_graph(lowered: ir.Model, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``kv_params`` set to what the lowered graph's cache inputs are: their dtype (float16 after a
    half conversion, int8 after KV quantization) and KV heads (a tensor-parallel rank's share): the runtime
    allocates the buffers the kernel reads and writes."""
    if "kv_params" not in manifest:
        return manifest
    cache = next((v for v in lowered.graph.inputs if name_of(v).startswith(_CACHE_INPUT_PREFIXES)), None)
    if cache is None or cache.dtype is None:
        return manifest
    kv = {**manifest["kv_params"], "dtype": _numpy_name(cache.dtype)}
    # [batch, heads, length, head_dim] (continuous), [rows, heads, head_dim] or [pages, page_size, heads, head_dim]
    axis = 1 if name_of(cache).startswith("past_key_values.") or len(cache.shape or ()) == 3 else 2
    heads = cache.shape[axis] if cache.shape is not None and len(cache.shape) > axis else None
    if isinstance(heads, int):
        kv["n_kv_heads"] = heads
    return {**manifest, "kv_params": kv}


def _numpy_name(dtype: ir.DataType) -> str:
    """numpy's name of an ONNX element type ("bfloat16" from ml_dtypes, which onnx-ir uses)."""
    return "bfloat16" if dtype == ir.DataType.BFLOAT16 else np.dtype(dtype.numpy()).name


def _quantize_kv_cache(lowered: ir.Model, options: CompileOptions, manifest: dict[str, Any],
                       calibration_tokens: tuple[list[np.ndarray], str] | None,
                       runner: GraphRunner | None) -> tuple[ir.Model, dict[str, Any]]:
    """Calibrate and quantize the KV cache (the manifest's ``kv_params.dtype`` then follows the graph's cache)."""
    from .calibration.kv_cache import calibrate_kv_cache
    from .passes.lower_attention_gqa import GQA_FORM

    others = [lowering for lowering in summarize(lowered) if lowering.op == "CachedAttention"
              and lowering.form != GQA_FORM]
    if others:
        raise ValueError(f"a {options.kv_cache_bit_width}-bit KV cache needs {GQA_FORM} with its rotary in the "
                         f"kernel for every layer; {others[0].describe()}")

    tokens, source = calibration_tokens if calibration_tokens is not None else (None, "random")
    limits = manifest.get("limits", {})
    lowered, summary = calibrate_kv_cache(lowered, options.kv_cache_bit_width, tokens, runner=runner,
                                          vocab_size=limits.get("vocab_size"), token_source=source,
                                          max_tokens=limits.get("max_position_embeddings"))
    return lowered, {**manifest, "kv_cache_quantization": summary}  # kv_params.dtype: _kv_of_graph
