"""``ember compile -v`` reports each lowering decision; a KV cache option the chosen kernels cannot keep is refused at
compile time, naming the limit (tiny Llama checkpoints whose head sizes GroupQueryAttention rejects)."""
from __future__ import annotations

import pytest

from ember.tools.cli import main

from ..reference.test_shape_sweep import GRID, make_checkpoint

HEAD_DIM_12, HEAD_DIM_40 = (next(s for s in GRID if s.head_dim == d) for d in (12, 40))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}
    for shape in (HEAD_DIM_12, HEAD_DIM_40):
        made[shape.head_dim] = tmp_path_factory.mktemp(f"hd{shape.head_dim}")
        make_checkpoint(shape, made[shape.head_dim])
    return made


def test_compile_verbose_prints_the_forms_and_reasons(checkpoints, tmp_path, capsys):
    assert main(["compile", "-v", str(checkpoints[12]), "-o", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert ("lowering: CachedAttention -> ScatterND + explicit attention: 2 nodes, e.g. "
            "/model/layers.0/self_attn/CachedAttention; not GroupQueryAttention: head_dim must be a multiple of 8, "
            "not 12") in err
    assert main(["compile", "-v", str(checkpoints[40]), "-o", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "lowering: CachedAttention -> RotaryEmbedding + GroupQueryAttention: 2 nodes" in err
    assert "needs head_dim a multiple of 16, not 40" in err


def test_int8_kv_cache_refused_at_compile_time_naming_the_limit(checkpoints, tmp_path, capsys):
    assert main(["compile", str(checkpoints[40]), "-o", str(tmp_path / "c"), "--kv-cache-bit-width", "8"]) == 1
    err = capsys.readouterr().err
    assert "ember: error:" in err and "8-bit KV cache needs GroupQueryAttention with its rotary in the kernel" in err
    assert "not 40" in err
    assert not (tmp_path / "c").exists()
