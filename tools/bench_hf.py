"""The transformers peer for ``ember bench --compare hf``: the same weights in PyTorch, eager attention.

torch and transformers' model classes are imported here only, and this module only when asked for:
deployments of ember have no torch.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ember.runtime.pipelines import ModelSource

from .bench import RunSample
from .generate import GenerationStats

logger = logging.getLogger(__name__)


def weights_source(model: str | Path | None, peer: str = "hf") -> ModelSource:
    """The checkpoint a peer loads: the model itself, or the one a compiled artifact was built from."""
    source = ModelSource.resolve(model)
    if source.kind != "artifact":
        return source
    original = json.loads((source.path / "manifest.json").read_text()).get("source", {}).get("path")
    if not original or not Path(original).exists():
        raise FileNotFoundError(f"--compare {peer} needs the source weights of {source.path}; "
                                f"they were at {original!r}, which no longer exists")
    return ModelSource.resolve(original)


class HFRunner:
    """``AutoModelForCausalLM`` in float32 with eager attention, greedy generation."""

    name = "hf"

    def __init__(self, model: str | Path | None, num_threads: int):
        try:
            import torch
            import transformers
            from transformers import AutoModelForCausalLM
        except ImportError as error:
            raise ValueError(f"--compare hf needs torch and transformers ({error})") from None
        self.torch = torch
        torch.set_num_threads(num_threads)
        source = weights_source(model)
        transformers.utils.logging.disable_progress_bar()  # the GGUF conversion bar; the CLI says what loads
        kwargs: dict[str, Any] = {"dtype": torch.float32, "attn_implementation": "eager"}
        if source.kind == "gguf":
            model_obj = AutoModelForCausalLM.from_pretrained(source.path.parent, gguf_file=source.path.name, **kwargs)
        else:
            model_obj = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
        self.model = model_obj.eval()
        config = self.model.config
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = config.eos_token_id
        self.eos_token_id = eos
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else (
            eos[0] if isinstance(eos, list) else eos)
        self.info = {"source": str(source.path), "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "attn_implementation": "eager", "dtype": "float32"}
        logger.info("loaded %s in transformers with %d threads", source.path, torch.get_num_threads())

    def _generate(self, input_ids: Any, new_tokens: int) -> Any:
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id)
        attention_mask = self.torch.ones_like(input_ids)
        return self.model.generate(input_ids, attention_mask=attention_mask, generation_config=config)

    def run(self, prompt_ids: list[int], new_tokens: int) -> RunSample:
        torch = self.torch
        input_ids = torch.tensor([prompt_ids], dtype=torch.long)
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        with torch.inference_mode():
            start = time.perf_counter()
            self._generate(input_ids, 1)
            stats.first_token_seconds = time.perf_counter() - start
            start = time.perf_counter()
            output = self._generate(input_ids, new_tokens)
            stats.total_seconds = time.perf_counter() - start
        tokens = output[0, len(prompt_ids):].tolist()
        stats.generated_tokens = len(tokens)
        stats.finish_reason = "length"
        return RunSample(stats, tokens)
