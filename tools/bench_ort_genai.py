"""The onnxruntime-genai peer for ``ember bench --compare ort-genai``: the same weights, built by ort-genai's
own model builder (``-p int4 -e cpu``) and run with its generator loop.

Nothing is downloaded. The builder reads a local Hugging Face folder (``-i``, with ``HF_HUB_OFFLINE=1``);
for a GGUF model that folder is made once from the GGUF by transformers (dequantized to float32 and
saved as safetensors with its config and tokenizer), because the builder reads only float GGUF files.
The folder and the built model live in the ember cache (``<cache>/peers``), keyed by the source's sha256
and size (and for the model, the builder's version and precision), so each is built once.

onnxruntime-genai is an optional dependency (``pip install 'ember[bench]'``); it, torch and transformers'
model classes are imported only here, and this module only when asked for.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ember.runtime.pipelines import ModelSource

from .bench import RunSample
from .bench_bandwidth import weight_bytes_per_step
from .generate import GenerationStats

logger = logging.getLogger(__name__)

PRECISION = "int4"
EXECUTION_PROVIDER = "cpu"
MISSING = ("--compare ort-genai needs the onnxruntime-genai package, an optional dependency of ember's "
           "benchmarks: pip install 'ember[bench]'")


class OrtGenaiBuildError(RuntimeError):
    """ort-genai's model builder (or the GGUF conversion before it) failed; the message says where its log is."""


def require_ort_genai() -> Any:
    """The ``onnxruntime_genai`` module, or a ValueError telling the user how to install it."""
    try:
        import onnxruntime_genai
    except ImportError as error:
        raise ValueError(f"{MISSING} ({error})") from None
    return onnxruntime_genai


def _ort_genai_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("onnxruntime-genai")
    except metadata.PackageNotFoundError:
        return "unknown"


def source_key(source: ModelSource, cache_dir: Path) -> str:
    """``<sha256 prefix>-<size>`` of the model's bytes (hashes remembered in the cache's memo file)."""
    from ember.compiler.hashing import HashMemo
    from ember.runtime.compile_cache import source_sha256

    if source.kind == "gguf":
        sha = HashMemo(cache_dir / "source-hashes.json").sha256(source.path)
    else:
        sha = source_sha256(source, cache_dir)
    size = sum(f.stat().st_size for f in source.files())
    return f"{sha[:20]}-{size}"


def peers_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "peers"


def _replace_into(tmp: Path, final: Path) -> Path:
    """Move a finished build into place; a concurrent build that finished first wins."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Save a GGUF model as a Hugging Face folder (float32 safetensors, config, tokenizer, generation config).

    transformers marks a GGUF-loaded model as "quantized" and refuses to save it, although its weights are
    already dequantized to float32; the marker is dropped before saving.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    kwargs = {"gguf_file": gguf_path.name}
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    model.hf_quantizer = None  # type: ignore[assignment]  # torch's Module.__setattr__ typing; a plain attribute
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs).save_pretrained(out_dir)


def hf_checkpoint(source: ModelSource, cache_dir: Path, key: str | None = None) -> Path:
    """The Hugging Face folder the builder reads: the model's own, or one converted from the GGUF (cached)."""
    if source.kind == "hf":
        return source.path
    if source.kind != "gguf":
        raise ValueError(f"--compare ort-genai needs the source weights, not the artifact {source.path}")
    final = peers_dir(cache_dir) / f"hf-from-gguf-{key or source_key(source, cache_dir)}"
    if (final / "config.json").is_file():
        return final
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    logger.info("converting %s to a Hugging Face folder for ort-genai's builder", source.path)
    try:
        gguf_to_hf(source.path, tmp)
    except Exception as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OrtGenaiBuildError(f"could not convert {source.path} to a Hugging Face folder: {error}") from error
    return _replace_into(tmp, final)


def builder_command(hf_dir: Path, out_dir: Path, work_dir: Path, precision: str = PRECISION,
                    python: str = sys.executable) -> list[str]:
    """ort-genai's model builder on a local folder (``-i``): never ``-m`` (a hub name it would download)."""
    return [python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
            "-p", precision, "-e", EXECUTION_PROVIDER, "-c", str(work_dir)]


def builder_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The builder's environment: offline, so that a missing local file fails instead of reaching a hub."""
    env = dict(os.environ if base is None else base)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


def run_builder(command: list[str], log_path: Path, progress: bool = True) -> None:
    """Run the builder, its output to ``log_path``; a tqdm bar counts its output lines meanwhile."""
    tail: deque[str] = deque(maxlen=15)
    with open(log_path, "w", encoding="utf-8") as log, \
            tqdm(desc="ort-genai model builder", unit=" lines", disable=not progress, file=sys.stderr,
                 leave=False) as bar:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=builder_env(), errors="replace")
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            tail.append(line.rstrip()[-300:])
            bar.update(1)
        code = process.wait()
    if code != 0:
        raise OrtGenaiBuildError(f"ort-genai's model builder failed (exit {code}); log: {log_path}\n"
                                 + "\n".join(tail))


def built_model(source: ModelSource, cache_dir: Path, precision: str = PRECISION, progress: bool = True) -> Path:
    """The ort-genai model folder (``genai_config.json``, ``model.onnx``) for the source, built on first use."""
    key = source_key(source, cache_dir)
    final = peers_dir(cache_dir) / f"ort-genai-{_ort_genai_version()}-{precision}-{EXECUTION_PROVIDER}-{key}"
    if (final / "genai_config.json").is_file():
        return final
    hf_dir = hf_checkpoint(source, cache_dir, key)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    work = tmp / "builder-cache"
    log_path = peers_dir(cache_dir) / f"{final.name}.log"
    start = time.perf_counter()
    try:
        run_builder(builder_command(hf_dir, tmp, work), log_path, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    if not (tmp / "genai_config.json").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise OrtGenaiBuildError(f"ort-genai's model builder wrote no genai_config.json; log: {log_path}")
    logger.info("built the ort-genai %s model in %.1f s (log: %s)", precision, time.perf_counter() - start, log_path)
    return _replace_into(tmp, final)


class OrtGenaiRunner:
    """Greedy generation with onnxruntime-genai's ``Generator``: the batch's prompts appended at once, then
    ``generate_next_token`` / ``get_next_tokens`` per step. EOS is held off with ``min_length`` (ember's
    runs ignore EOS), so every run decodes exactly ``new_tokens`` tokens per sequence."""

    name = "ort-genai"

    def __init__(self, model: str | Path | None, num_threads: int, cache_dir: Path, progress: bool = True,
                 session_options: dict[str, Any] | None = None):
        """``session_options``: more of the decoder's onnxruntime session options (genai_config's names), e.g.
        ``enable_profiling`` (a file prefix) for ``bench_decode_profile``."""
        from .bench_hf import weights_source

        og = require_ort_genai()
        self.og = og
        source = weights_source(model, peer="ort-genai")
        start = time.perf_counter()
        self.model_dir = built_model(source, Path(cache_dir), progress=progress)
        build_seconds = time.perf_counter() - start
        config = og.Config(str(self.model_dir))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": num_threads, "inter_op_num_threads": 1, **(session_options or {})}}}}))
        self.model = og.Model(config)
        self.info = {"source": str(source.path), "model_dir": str(self.model_dir), "threads": num_threads,
                     "onnxruntime_genai": _ort_genai_version(), "precision": PRECISION,
                     "execution_provider": EXECUTION_PROVIDER, "build_or_cache_s": build_seconds,
                     "weight_bytes_per_step": weight_bytes_per_step(self.model_dir / "model.onnx")}
        logger.info("loaded the ort-genai model %s with %d threads", self.model_dir, num_threads)

    def run(self, prompt_ids: list[int], new_tokens: int, batch_size: int = 1) -> RunSample:
        """TTFT: ``append_tokens`` (the prefill) and the first ``generate_next_token``; the generator (its
        KV cache buffers) is created before the clock starts, as ember's KV cache exists before a run."""
        og = self.og
        length = len(prompt_ids) + new_tokens
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=length, min_length=length, do_sample=False, batch_size=batch_size)
        generator = og.Generator(self.model, params)
        prompts = np.array([prompt_ids] * batch_size, dtype=np.int32)
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        steps: list[np.ndarray] = []
        start = time.perf_counter()
        generator.append_tokens(prompts)
        generator.generate_next_token()
        steps.append(np.array(generator.get_next_tokens()))
        stats.first_token_seconds = time.perf_counter() - start
        while len(steps) < new_tokens and not generator.is_done():
            generator.generate_next_token()
            steps.append(np.array(generator.get_next_tokens()))
        stats.total_seconds = time.perf_counter() - start
        rows = np.stack(steps, axis=1).tolist()  # [batch, new_tokens]
        stats.generated_tokens = len(rows[0])
        stats.finish_reason = "length"
        return RunSample(stats, [int(t) for t in rows[0]], batch_size, all(r == rows[0] for r in rows))

    def forced_argmax(self, prompt_ids: list[int], tokens: list[int]) -> list[int]:
        """The argmax of the logits after the prompt and after each of ``tokens[:i]`` appended (teacher
        forcing), as ``EmberRunner.forced_argmax``."""
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt_ids) + len(tokens), do_sample=False)
        generator = og.Generator(self.model, params)
        generator.append_tokens(np.array([prompt_ids], dtype=np.int32))
        predicted: list[int] = []
        for i, token in enumerate(tokens):
            predicted.append(int(np.argmax(np.asarray(generator.get_logits()).reshape(-1))))
            if i + 1 < len(tokens):
                generator.append_tokens(np.array([[token]], dtype=np.int32))
        return predicted
