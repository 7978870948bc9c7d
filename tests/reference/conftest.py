"""SmolLM2 fixtures shared by the reference tests: transformers loading the GGUF (it dequantizes it to
float32; loading takes seconds, so once per session) and ember pipelines per encoding."""
from __future__ import annotations

import pytest

from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig, ReturnLogits, default_model_path


@pytest.fixture(scope="session")
def smollm2_path():
    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"the default model is neither installed nor fetchable: {e}")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name,
                                                dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("smollm2-cache")


def smollm2_pipeline(path, cache, encoding: str):
    """``(tokenizer, pipeline)`` for SmolLM2 in ``encoding``, returning logits at every position."""
    config = PipelineConfig(model_path=path, cache_dir=cache, max_batch_size=1, max_length=512, encoding=encoding,
                            return_logits=ReturnLogits.ALL)
    return PIPELINE_REGISTRY.retrieve(config)


@pytest.fixture(scope="session")
def smollm2_float32(smollm2_path, smollm2_cache):
    return smollm2_pipeline(smollm2_path, smollm2_cache, "float32")
