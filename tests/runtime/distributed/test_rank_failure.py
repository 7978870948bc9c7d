"""A tensor-parallel rank that dies mid-generation: rank 0 fails within the collectives' timeout with an error naming
the rank, and no rank process is left behind; rank 0 killed: its ranks die with it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

pytest.importorskip("torch.distributed", reason="tensor parallelism runs over torch.distributed (the test extra)")

from ember.runtime.distributed import RankFailure  # noqa: E402
from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig, SamplingParams  # noqa: E402
from tests.reference.tiny_models import make_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama-gqa-llama3", directory)  # 4 heads, 2 KV heads: one each over 2 ranks
    return directory


def _children() -> list[psutil.Process]:
    """This process's live children but multiprocessing's resource tracker (one per process that ever spawned;
    it ends with its parent)."""
    return [p for p in psutil.Process().children(recursive=True) if p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline())]


def test_a_rank_killed_mid_generation_is_named_and_nothing_is_left(tiny, tmp_path):
    config = PipelineConfig(model_path=tiny, cache_dir=tmp_path, tensor_parallel=2, num_threads=1,
                            kv_cache_strategy="paged", kv_cache_bytes=32 << 20)
    pipeline = PIPELINE_REGISTRY.retrieve(config)[1]
    group = pipeline.pipeline_model.model.group
    victim = group.children.processes[1]
    context = pipeline.new_context([5, 6, 7, 8], SamplingParams(max_new_tokens=200, ignore_eos=True))
    start = None
    with pytest.raises(RankFailure, match="rank 1") as failure:
        for i, _ in enumerate(pipeline.generate([context])):
            if i == 3:
                os.kill(victim.pid, signal.SIGKILL)
                start = time.monotonic()
    assert start is not None and time.monotonic() - start < 30, str(failure.value)
    group.close()
    assert not victim.is_alive() and not _children()


def test_rank_0_killed_takes_its_ranks_with_it(tiny, tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig
        config = PipelineConfig(model_path={str(tiny)!r}, cache_dir={str(tmp_path)!r}, tensor_parallel=3,
                                num_threads=1, kv_cache_bytes=32 << 20)
        pipeline = PIPELINE_REGISTRY.retrieve(config)[1]
        print("ready", flush=True)
        time.sleep(300)
    """)
    # 4 heads over 3 ranks do not divide: the script's compile fails, so use 2 ranks
    script = script.replace("tensor_parallel=3", "tensor_parallel=2")
    rank0 = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert rank0.stdout.readline().strip() == "ready"
        ranks = psutil.Process(rank0.pid).children(recursive=True)
        followers = [p for p in ranks if "spawn_main" in " ".join(p.cmdline())]
        assert len(followers) == 1
        rank0.kill()
        rank0.wait(10)
        gone, alive = psutil.wait_procs(followers, timeout=10)
        assert not alive, [p.pid for p in alive]
    finally:
        if rank0.poll() is None:
            rank0.kill()
