"""Build a TensorRT engine from an artifact's ONNX graph for one device, and keep it in the artifact.

TensorRT is imported here only when an engine is built or its version asked for, so this module imports on a
machine without it; :class:`TensorRTUnavailable` then says why (the package is not installed, or its library,
``libnvinfer.so.10``, cannot be loaded). The engine files and the manifest's table are :mod:`.engine_files`';
the device is :mod:`.cuda_device`'s.

Shapes: an engine built from a graph with symbolic dimensions needs an optimization profile, a (min, opt, max)
shape per input. :func:`optimization_profile` derives it from the manifest's description of the graph's inputs and
the limits the runtime serves with (batch size, sequence length, KV pages); an unknown dimension name is an error,
never a guess.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ember.graphs.nn.kv_cache import KVCacheStrategy

from . import artifact_lock
from .artifact import Artifact, check_file, read_manifest
from .cuda_device import DeviceDescription, current_device
from .engine_files import Profile, record_engine, select_engine

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]


class TensorRTUnavailable(RuntimeError):
    """TensorRT cannot be imported here; the message says why, in one line."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the graph or build the engine; the message holds TensorRT's own errors."""


def _import_tensorrt() -> Any:
    try:
        import tensorrt
    except ModuleNotFoundError as error:
        if error.name in ("tensorrt", "tensorrt_bindings"):
            raise TensorRTUnavailable("TensorRT is not installed (pip install tensorrt-cu12)") from None
        raise TensorRTUnavailable(f"TensorRT cannot be imported: {error}") from None
    except (ImportError, OSError) as error:  # the bindings are there, libnvinfer / libnvonnxparser are not
        raise TensorRTUnavailable(f"TensorRT cannot be loaded: {error}") from None
    return tensorrt


def tensorrt_version() -> str:
    """The version of the TensorRT library this process loads (what an engine is built with and must be loaded
    with); TensorRTUnavailable with the reason when it cannot be loaded."""
    return str(_import_tensorrt().__version__)


def optimization_profile(graph_inputs: Sequence[Mapping[str, Any]], max_batch_size: int, max_length: int,
                         kv_strategy: KVCacheStrategy | str | None, pages: int | None = None, *,
                         page_size: int | None = None) -> dict[str, tuple[Shape, Shape, Shape]]:
    """The (min, opt, max) shape of every input in ``graph_inputs`` (the manifest's ``graph.inputs``: name, dtype,
    shape with symbolic dimensions as strings) for a runtime serving ``max_batch_size`` sequences of at most
    ``max_length`` tokens. Each symbolic dimension:

    * ``batch``: 1..max_batch_size (opt: max_batch_size, a full batch);
    * ``sequence``: 1..max_length, opt 1 for a decoder (most runs are decode steps of one token), max_length for
      an encoder (``kv_strategy`` None);
    * ``max_length`` (CONTINUOUS: the cache buffer's length): max_length, fixed, as the runtime binds the whole
      buffer;
    * ``pages`` (PAGED: the page table's width): 1..ceil(max_length / page_size);
    * ``pool_rows`` (PAGED: the pool's rows): ``pages`` * ``page_size``, fixed (the pool is allocated once).

    Integer dimensions stay as they are. A dimension name not listed, or one of the other KV strategy, is a
    ValueError naming the input."""
    if max_batch_size < 1 or max_length < 1:
        raise ValueError(f"max_batch_size and max_length must be positive, not {max_batch_size} and {max_length}")
    strategy = KVCacheStrategy(kv_strategy) if kv_strategy is not None else None
    ranges: dict[str, tuple[int, int, int]] = {
        "batch": (1, max_batch_size, max_batch_size),
        "sequence": (1, 1 if strategy is not None else max_length, max_length),
    }
    if strategy is KVCacheStrategy.CONTINUOUS:
        if pages is not None:
            raise ValueError("pages apply to the paged KV cache, not the continuous one")
        ranges["max_length"] = (max_length,) * 3
    elif strategy is KVCacheStrategy.PAGED:
        if pages is None or page_size is None or pages < 1 or page_size < 1:
            raise ValueError(f"the paged KV cache needs the pool's pages and page_size (positive), not {pages} "
                             f"and {page_size}")
        table = math.ceil(max_length / page_size)
        ranges["pages"] = (1, table, table)
        ranges["pool_rows"] = (pages * page_size,) * 3
    profile = {}
    for value in graph_inputs:
        low, opt, high = [], [], []
        for dim in value["shape"]:
            if isinstance(dim, int):
                bounds = (dim, dim, dim)
            elif dim in ranges:
                bounds = ranges[dim]
            else:
                kind = f"the {strategy.value} KV cache" if strategy is not None else "a model without KV cache"
                raise ValueError(f"input {value['name']} has the dimension {dim!r}, which has no optimization "
                                 f"profile range for {kind} (known: {', '.join(sorted(ranges))})")
            low.append(bounds[0])
            opt.append(bounds[1])
            high.append(bounds[2])
        profile[value["name"]] = (tuple(low), tuple(opt), tuple(high))
    return profile


def artifact_profile(artifact: Artifact, max_batch_size: int, max_length: int,
                     pages: int | None = None) -> dict[str, tuple[Shape, Shape, Shape]]:
    """:func:`optimization_profile` for the artifact's graph inputs and KV cache, as its manifest describes them."""
    manifest = artifact.manifest
    kv = manifest.get("kv_params")
    strategy = manifest.get("kv_cache_strategy") if kv is not None else None
    return optimization_profile(manifest["graph"]["inputs"], max_batch_size, max_length, strategy, pages,
                                page_size=kv.get("page_size") if kv is not None else None)


def build_engine(onnx_path: str | Path, profile: Profile, *, fp16: bool, device_index: int,
                 workspace_bytes: int | None = None) -> bytes:
    """A serialized TensorRT engine (a plan) of the ONNX graph at ``onnx_path`` (its external data beside it), built
    on device ``cuda:device_index`` for the shapes of ``profile``; with ``fp16``, TensorRT may run layers in float16.
    ``workspace_bytes`` caps the builder's scratch memory (default: TensorRT's, the device's memory).

    TensorRTUnavailable without TensorRT, CudaUnavailable without the device, EngineBuildError with TensorRT's
    errors when the graph does not parse or the engine does not build."""
    trt = _import_tensorrt()
    log = _tensorrt_logger(trt)
    trt.init_libnvinfer_plugins(log, "")
    with current_device(device_index):
        builder = trt.Builder(log)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, log)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineBuildError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors or log.errors()}")
        inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
        if set(inputs) != set(profile):
            raise EngineBuildError(f"the optimization profile names the inputs {sorted(profile)}, the graph "
                                   f"{onnx_path} has {sorted(inputs)}")
        config = builder.create_builder_config()
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if workspace_bytes is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
        shapes = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.items():
            shapes.set_shape(name, low, opt, high)
        config.add_optimization_profile(shapes)
        logger.info("building a TensorRT %s engine of %s on cuda:%d", trt.__version__, onnx_path, device_index)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineBuildError(f"TensorRT {trt.__version__} could not build an engine of {onnx_path}: "
                                   f"{log.errors() or 'no error was logged'}")
        return bytes(plan)


def _tensorrt_logger(trt: Any) -> Any:
    """A TensorRT logger (an ``ILogger``) that sends TensorRT's messages to this module's logger and keeps its
    errors for the exception that follows them."""

    severity = trt.ILogger.Severity
    levels = {severity.INTERNAL_ERROR: logging.ERROR, severity.ERROR: logging.ERROR, severity.WARNING: logging.WARNING,
              severity.INFO: logging.DEBUG, severity.VERBOSE: logging.DEBUG}

    class Log(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self._errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity, logging.INFO)
            if level >= logging.ERROR:
                self._errors.append(msg)
            logger.log(level, "TensorRT: %s", msg)

        def errors(self) -> str:
            return "; ".join(self._errors[-5:])

    return Log()


def ensure_engine(artifact: Artifact, device: DeviceDescription, *, max_batch_size: int, max_length: int,
                  pages: int | None = None, fp16: bool | None = None, workspace_bytes: int | None = None) -> Path:
    """The engine of ``artifact`` for ``device`` (its kind, this TensorRT, the model now, shapes that cover the
    limits asked), built and recorded in the artifact if it has none that is current (:mod:`.engine_files`).
    ``fp16`` defaults to the artifact's encoding being float16.

    The check is repeated under the artifact's lock before building, so processes that start together on a new
    device build once: the others wait and load what the first recorded."""
    trt_version = tensorrt_version()
    profile = artifact_profile(artifact, max_batch_size, max_length, pages)
    if fp16 is None:
        fp16 = artifact.manifest.get("encoding") == "float16"
    path = select_engine(artifact, device, trt_version, profile=profile, fp16=fp16)
    if path is not None:
        return path
    with artifact_lock.holding(artifact.path):
        current = Artifact(artifact.path, read_manifest(artifact.path))
        path = select_engine(current, device, trt_version, profile=profile, fp16=fp16)
        if path is not None:
            return path
        model_dir = Path(current.manifest["ranks"][0]["model"]).parent
        for rel, entry in current.manifest["files"].items():  # the engine will say it was built from these bytes
            if Path(rel).parent == model_dir:
                check_file(current.path, rel, entry)
        plan = build_engine(current.rank_model(), profile, fp16=fp16, device_index=device.index,
                            workspace_bytes=workspace_bytes)
        recorded = record_engine(current.path, device, trt_version, plan, profile, fp16=fp16)
    path = select_engine(recorded, device, trt_version, profile=profile, fp16=fp16)
    if path is None:
        raise EngineBuildError(f"the engine just recorded in {artifact.path} for {device.kind_key} is not "
                               f"selected; see the log for why")
    return path
