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
                     "transformers": transformers.__version__, "attn_implementation": "eager", "dtype": "float32",
                     "weight_bytes_per_step": self._linear_weight_bytes()}
        logger.info("loaded %s in transformers with %d threads", source.path, torch.get_num_threads())

    def _linear_weight_bytes(self) -> int:
        """Bytes of the ``nn.Linear`` weights (a decode step reads each once; a tied output head is the
        embedding table, counted once), as ``bench_bandwidth.weight_bytes_per_step`` counts ember's."""
        seen: dict[int, int] = {}
        for module in self.model.modules():
            if isinstance(module, self.torch.nn.Linear):
                for p in module.parameters(recurse=False):
                    seen[p.data_ptr()] = p.numel() * p.element_size()
        return sum(seen.values())

    def _generate(self, input_ids: Any, new_tokens: int) -> Any:
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id)
        attention_mask = self.torch.ones_like(input_ids)
        return self.model.generate(input_ids, attention_mask=attention_mask, generation_config=config)

    def run(self, prompt_ids: list[int], new_tokens: int, batch_size: int = 1) -> RunSample:
        """TTFT is a one-token ``generate`` of the batch; the decode rate comes from a full one after it."""
        torch = self.torch
        input_ids = torch.tensor([prompt_ids] * batch_size, dtype=torch.long)
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        with torch.inference_mode():
            start = time.perf_counter()
            self._generate(input_ids, 1)
            stats.first_token_seconds = time.perf_counter() - start
            start = time.perf_counter()
            output = self._generate(input_ids, new_tokens)
            stats.total_seconds = time.perf_counter() - start
        rows = output[:, len(prompt_ids):].tolist()
        stats.generated_tokens = len(rows[0])
        stats.finish_reason = "length"
        return RunSample(stats, rows[0], batch_size, all(r == rows[0] for r in rows))

    def forced_argmax(self, prompt_ids: list[int], tokens: list[int]) -> list[int]:
        """The argmax at each step of ``prompt + tokens`` in one forward pass (teacher forcing)."""
        torch = self.torch
        ids = torch.tensor([list(prompt_ids) + list(tokens[:-1])], dtype=torch.long)
        with torch.inference_mode():
            logits = self.model(ids).logits[0, len(prompt_ids) - 1:]
        return logits.argmax(-1).tolist()
