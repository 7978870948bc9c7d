"""``python -m ember.tools.bench_decode_profile`` on a tiny Llama: onnxruntime's profiler through a backend given to
the pipeline registry, the decode runs' op types, run and host times read back, and the table they make."""
from __future__ import annotations

import json

from ember.tools import bench_decode_profile

from ..reference.tiny_models import make_model


def test_a_profile_of_decode_steps_names_the_op_types_and_times(tmp_path):
    make_model("llama-gqa-llama3", tmp_path / "model")
    profile, tokenizer, _ = bench_decode_profile.profile_ember(
        str(tmp_path / "model"), "float32", batch=2, prompt_tokens=8, new_tokens=6, threads=1, out=tmp_path / "out")
    assert tokenizer is not None
    # two runs of 6 tokens (a prefill of both rows, then 5 decode steps each) and the pipeline's one-token warm-up
    assert profile.steps == 2 * 5 + 1
    assert "GroupQueryAttention" in profile.ops and "MatMul" in profile.ops
    layers = json.loads((tmp_path / "model" / "config.json").read_text())["num_hidden_layers"]
    assert profile.ops["GroupQueryAttention"][1] == layers  # nodes per step
    assert 0 < profile.kernel_ms <= profile.run_ms and profile.host_ms > 0
    text = bench_decode_profile.table([profile, profile])
    assert "| GroupQueryAttention (nodes) |" in text and "| host between runs (median) |" in text
