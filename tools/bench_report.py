"""The readable forms of the benchmark reports (the CLI prints them; ``--json`` writes the data):
``format_report`` for ``run_benchmark`` (text generation), ``format_embeddings_report`` for
``run_embeddings_benchmark``."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _num(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}"


def _metric_table(rows: list[tuple[str, dict[str, Any]]],
                  metrics: tuple[tuple[str, str, float, int], ...]) -> list[str]:
    """One line per runner and metric (label, report key, scale, digits): median, min and max."""
    width = max(16, *(len(label) + 2 for label, *_ in metrics))
    header = f"{'':<8}{'metric':<{width}}{'median':>10}{'min':>10}{'max':>10}"
    lines = [header, "-" * len(header)]
    for name, data in rows:
        for label, key, scale, digits in metrics:
            s = data[key]
            lines.append(f"{name:<8}{label:<{width}}{_num(s['median'], scale, digits):>10}"
                         f"{_num(s['min'], scale, digits):>10}{_num(s['max'], scale, digits):>10}")
    return lines


def _rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    rows = [("ember", report["ember"])]
    if "peer" in report:
        rows.append((report["peer"]["name"], report["peer"]))
    return rows


def _memory_lines(report: dict[str, Any]) -> list[str]:
    memory = report["memory"]
    lines = [f"memory:   ember peak RSS {memory['ember']['peak_rss_mib']:.0f} MiB, "
             f"current RSS {memory['ember']['rss_mib']:.0f} MiB (before any peer was loaded)"]
    if "with_peer" in memory:
        lines.append(f"          with {report['peer']['name']} loaded: peak RSS {memory['final']['peak_rss_mib']:.0f} "
                     f"MiB, current RSS {memory['final']['rss_mib']:.0f} MiB")
    return lines


def _format(report: dict[str, Any], workload: str, metrics: tuple[tuple[str, str, float, int], ...],
            peer_lines: Callable[[dict[str, Any]], list[str]]) -> str:
    """The lines both reports have (model, workload, the metric table, memory) and, with a peer, its lines."""
    lines = [f"model:    {report.get('model') or report['artifact']}",
             f"artifact: {report['artifact']}",
             f"setup:    {report['setup']}",
             f"workload: {workload}",
             "", *_metric_table(_rows(report), metrics),
             "", *_memory_lines(report)]
    if "ratios" in report:
        lines += peer_lines(report)
    return "\n".join(lines)


_GENERATION_METRICS = (("TTFT (ms)", "ttft_s", 1000.0, 1), ("decode (tok/s)", "decode_tok_s", 1.0, 1))
_EMBEDDINGS_METRICS = (("throughput (sentences/s)", "sentences_per_s", 1.0, 1),
                       ("latency (ms)", "latency_s", 1000.0, 2))


def _generation_peer_lines(report: dict[str, Any]) -> list[str]:
    ratios, peer = report["ratios"], report["peer"]
    return [f"peer:     {peer['name']}: transformers {peer.get('transformers', '?')}, torch {peer.get('torch', '?')}, "
            f"{peer.get('dtype', '?')}, {peer.get('attn_implementation', '?')} attention, "
            f"{peer.get('threads', '?')} threads, loaded in {report['peer_setup_s']:.1f} s",
            f"ratios:   decode tok/s ember/{peer['name']} = {_num(ratios['decode_tok_s'], digits=2)}x, "
            f"TTFT ember/{peer['name']} = {_num(ratios['ttft'], digits=2)}x",
            f"greedy:   the first {report['greedy_agreement']['matching_prefix']} of "
            f"{report['greedy_agreement']['of']} tokens agree"]


def format_report(report: dict[str, Any]) -> str:
    workload = (f"batch 1, prompt {report['prompt_tokens']} tokens, {report['new_tokens']} new tokens (greedy, "
                f"EOS ignored), {report['threads']} threads, median of {report['runs']} runs after "
                f"{report['warmup']} warmup")
    return _format(report, workload, _GENERATION_METRICS, _generation_peer_lines)


def _embeddings_peer_lines(report: dict[str, Any]) -> list[str]:
    ratios, peer, agreement = report["ratios"], report["peer"], report["agreement"]
    name = peer["name"]
    return [f"peer:     {name}: sentence-transformers {peer.get('sentence_transformers', '?')}, "
            f"torch {peer.get('torch', '?')}, {peer.get('dtype', '?')}, {peer.get('threads', '?')} threads, "
            f"loaded in {report['peer_setup_s']:.1f} s",
            f"ratios:   throughput ember/{name} = {_num(ratios['sentences_per_s'], digits=2)}x, "
            f"latency ember/{name} = {_num(ratios['latency'], digits=2)}x",
            f"agree:    min cosine similarity ember vs {name} = {agreement['min_cosine']:.6f} over "
            f"{agreement['of']} sentences (mean {agreement['mean_cosine']:.6f}, "
            f"max |diff| {agreement['max_abs_diff']:.2e})"]


def format_embeddings_report(report: dict[str, Any]) -> str:
    tokens = report["sentence_tokens"]
    workload = (f"{report['sentences']} sentences of {tokens['min']}-{tokens['max']} tokens (mean "
                f"{tokens['mean']:.1f}) at batch {report['batch_size']}; latency: median of "
                f"{report['latency_encodes']} single-sentence encodes; {report['threads']} threads, "
                f"median of {report['runs']} runs after {report['warmup']} warmup")
    return _format(report, workload, _EMBEDDINGS_METRICS, _embeddings_peer_lines)
