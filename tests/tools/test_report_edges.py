"""Edges of two reports that mypy found reading None as a number or a port: the HTTP benchmark client refuses a base
URL it cannot speak to before connecting anywhere, and ``ember verify``'s table has no greedy line when the greedy
runs generated no token (it multiplied None before)."""
from __future__ import annotations

import pytest

from ember.tools.bench_http_client import stream_level
from ember.tools.verify_metrics import THRESHOLDS, Agreement, GreedyResult, format_table


@pytest.mark.parametrize("url", ["https://127.0.0.1:8000", "127.0.0.1:8000", "http:///v1"])
def test_the_http_benchmark_client_refuses_a_url_it_cannot_speak_to(url):
    with pytest.raises(ValueError, match="plain HTTP"):
        stream_level(url, [[1, 2, 3]], new_tokens=2, model="m")


def test_a_url_without_a_port_means_port_80():
    with pytest.raises(OSError):  # nothing listens on 127.0.0.1:80 here: the connection, not a TypeError, fails
        stream_level("http://127.0.0.1", [[1, 2, 3]], new_tokens=2, model="m")


def test_the_verify_table_leaves_out_greedy_figures_without_generated_tokens():
    agreement = Agreement(tokens=8, max_rel_error=1e-6, mean_rel_error=1e-7, top1=1.0, kl_mean=0.0, nll=2.0,
                          nll_reference=2.0, greedy=(GreedyResult(prompt_tokens=4, new_tokens=0, prefix=0, agreeing=0),))
    table = format_table(agreement, THRESHOLDS["float32"])
    assert "KL(ref || ember)" in table  # the rest of the table is there
    assert "greedy" not in table
    with_tokens = Agreement(**{**agreement.__dict__, "greedy": (GreedyResult(4, 10, 7, 9),)})
    assert "greedy: tokens before divergence" in format_table(with_tokens, THRESHOLDS["float32"])
