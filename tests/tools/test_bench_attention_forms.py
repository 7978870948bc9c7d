"""``python -m ember.tools.bench_attention_forms``: both lowered attention forms built at a small shape, checked to
agree (the tool refuses to time graphs that disagree), timed in turns, reported with node counts and ratios."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from ember.tools import bench_attention_forms as tool

SMALL = tool.Shape(heads=4, kv_heads=2, head_dim=8, layers=2, page_size=4, batch=2, context=5)


@pytest.mark.parametrize("form,kernel", [("paged", "ScatterND"), ("continuous", "GroupQueryAttention")])
def test_each_form_is_ember_lowering(form, kernel):
    model = tool.build(SMALL, form)
    ops = {node.op_type for node in model.graph}
    assert kernel in ops and not any(node.domain == "ember" for node in model.graph)


def test_forms_agree_and_are_timed():
    results = tool.measure(SMALL, threads=1, rounds=2, steps=2)
    assert [r.form for r in results] == ["continuous", "paged"]
    assert results[0].ratio == 1.0 and all(r.ms > 0 and r.ratio > 0 for r in results)
    assert results[1].nodes > results[0].nodes


def test_a_wrong_cache_is_caught():
    """The agreement check compares real outputs: a continuous slot missing its cached keys makes them differ."""
    paged, continuous = (tool.FormRunner(SMALL, form, threads=1) for form in ("paged", "continuous"))
    np.testing.assert_allclose(paged.run(), continuous.run(), rtol=1e-4, atol=1e-4)
    continuous._arrays[0][:] = 0
    assert not np.allclose(paged.run(), continuous.run(), rtol=1e-4, atol=1e-4)


def test_main_reports_each_batch_and_context(caplog):
    with caplog.at_level(logging.INFO, logger=tool.logger.name):
        tool.main(["--batch", "1", "2", "--context", "3", "--layers", "1", "--heads", "4", "--kv-heads", "2",
                   "--head-dim", "8", "--threads", "1", "--rounds", "1", "--steps", "1"])
    rows = [record.message for record in caplog.records if "ms/step" in record.message]
    assert len(rows) == 4 and sum("paged" in row for row in rows) == 2
