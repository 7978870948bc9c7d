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


def _rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:  # the embeddings report's
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


_EMBEDDINGS_METRICS = (("throughput (sentences/s)", "sentences_per_s", 1.0, 1),
                       ("latency (ms)", "latency_s", 1000.0, 2))


# text generation ----------------------------------------------------------------------------------------
def _spread(s: dict[str, Any], scale: float = 1.0) -> str:
    """``median (min-max)`` of a summary."""
    return f"{_num(s['median'], scale)} ({_num(s['min'], scale)}-{_num(s['max'], scale)})"


def _generation_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """(runner label, its data, its ratios to the peer) for each encoding, then the peer."""
    ratios = report.get("ratios", {})
    rows = [(f"ember {enc}", data, ratios.get(enc)) for enc, data in report["encodings"].items()]
    if "peer" in report:
        peer = report["peer"]
        kind = peer.get("precision") or peer.get("dtype")
        rows.append((f"{peer['name']} {kind}" if kind else peer["name"], peer, None))
    return rows


def _generation_table(report: dict[str, Any]) -> list[str]:
    """One line per runner: TTFT and decode rate (median, min-max), the weight bytes a decode step reads,
    the bytes/s its decode rate streams, the share of the measured bandwidth, and ratios to the peer."""
    peer = report.get("peer", {}).get("name")
    header = (f"{'runner':<16} {'TTFT (ms)':>23} {'decode (tok/s)':>23} {'per seq':>8} {'weights/step':>13}"
              f" {'GB/s':>6} {'of bw':>6}" + (f"  ember/{peer} decode, TTFT: of medians (paired)" if peer else ""))
    lines = [header, "-" * len(header)]
    for label, data, ratios in _generation_rows(report):
        per_step, per_seq = data.get("weight_bytes_per_step"), data["decode_tok_s_per_seq"]["median"]
        streamed = per_step * per_seq if per_step and per_seq else None
        fraction = data.get("bandwidth_fraction")
        weights = f"{_num(per_step, 1e-6)} MB" if per_step else "n/a"
        share = f"{_num(fraction, 100.0, 0)} %" if fraction is not None else "n/a"
        ratio = (f"  {_num(ratios['decode_tok_s'], digits=2)}x ({_num(ratios.get('decode_tok_s_paired'), digits=2)}x), "
                 f"{_num(ratios['ttft'], digits=2)}x ({_num(ratios.get('ttft_paired'), digits=2)}x)" if ratios else "")
        lines.append(f"{label:<16} {_spread(data['ttft_s'], 1000.0):>23} {_spread(data['decode_tok_s']):>23} "
                     f"{_num(per_seq):>8} {weights:>13} {_num(streamed, 1e-9):>6} {share:>6}{ratio}")
    return lines


def _generation_notes(report: dict[str, Any]) -> list[str]:
    """What the columns mean, the bandwidth, the greedy agreement, the peer and the batch's consistency."""
    bw = report["bandwidth"]
    lines = ["columns:  decode = tokens/s over the batch, per seq = one sequence's (= decode steps/s); "
             "weights/step = initializer bytes the matrix products of a decode step read (an embedding table "
             "only gathered is not counted); GB/s = weights/step x steps/s; of bw = GB/s over the bandwidth; "
             "paired = median over the rounds of the ratio within a round",
             f"bandwidth: {_num(bw['gb_s'])} GB/s median ({_num(bw['min'])}-{_num(bw['max'])}) of {bw['copies']} "
             f"numpy copies of {bw['source_mib']} MiB, {bw['threads']} thread(s), read + write bytes counted, "
             f"measured just before and after the runs"]
    agree = report["greedy_agreement"]
    for name, a in agree["runners"].items():
        forced = (f"; fed {agree['reference']}'s tokens, the same choice at {a['teacher_forced_equal']} of "
                  f"{a['teacher_forced_of']} steps" if "teacher_forced_equal" in a else "")
        lines.append(f"greedy:   {name} vs {agree['reference']}: the first {a['matching_prefix']} of {a['of']} "
                     f"tokens agree ({a['equal_positions']} positions equal){forced}")
    if "peer" in report:
        peer = report["peer"]
        keys = ("onnxruntime_genai", "transformers", "torch", "precision", "dtype", "attn_implementation")
        what = ", ".join(f"{k.replace('_', '-')} {peer[k]}" for k in keys if peer.get(k))
        lines.append(f"peer:     {peer['name']}: {what}, {peer.get('threads', '?')} threads, set up in "
                     f"{report['peer_setup_s']:.1f} s" + (f" ({peer['model_dir']})" if peer.get("model_dir") else ""))
    if report["batch_size"] > 1:
        diverging = [label for label, data, _ in _generation_rows(report) if not data.get("batch_rows_agree", True)]
        lines.append(f"batch:    sequences of one batch differ in {', '.join(diverging)}" if diverging else
                     "batch:    every sequence of each batch produced the same tokens")
    return lines


def _generation_memory(report: dict[str, Any]) -> list[str]:
    memory = report["memory"]
    lines = [f"memory:   peak RSS {memory['ember']['peak_rss_mib']:.0f} MiB, current RSS "
             f"{memory['ember']['rss_mib']:.0f} MiB with every encoding loaded (before any peer)"]
    after = [f"{enc} {data['memory_after_load']['rss_mib']:.0f}" for enc, data in report["encodings"].items()
             if "memory_after_load" in data]
    if len(after) > 1:
        lines.append(f"          current RSS after loading each encoding, MiB: {', '.join(after)}")
    if "with_peer" in memory:
        lines.append(f"          with {report['peer']['name']} loaded: peak RSS {memory['with_peer']['peak_rss_mib']:.0f}"
                     f" MiB, current RSS {memory['with_peer']['rss_mib']:.0f} MiB")
    lines.append(f"          at the end: peak RSS {memory['final']['peak_rss_mib']:.0f} MiB (including the bandwidth "
                 f"copy's {2 * report['bandwidth']['source_mib']} MiB)")
    return lines


_SINGLE_RUNNER_METRICS = (("TTFT (ms)", "ttft_s", 1000.0, 1), ("decode (tok/s)", "decode_tok_s", 1.0, 1))


def _single_runner_peer_lines(report: dict[str, Any]) -> list[str]:
    ratios, peer, agree = report["ratios"], report["peer"], report["greedy_agreement"]
    return [f"peer:     {peer['name']}, {peer.get('threads', '?')} threads, loaded in {report['peer_setup_s']:.1f} s",
            f"ratios:   decode tok/s ember/{peer['name']} = {_num(ratios['decode_tok_s'], digits=2)}x, "
            f"TTFT ember/{peer['name']} = {_num(ratios['ttft'], digits=2)}x",
            f"greedy:   the first {agree['matching_prefix']} of {agree['of']} tokens agree"]


def _format_single_runner(report: dict[str, Any]) -> str:
    """A report of the shape ``run_benchmark`` wrote before encodings could be compared (batch 1, one
    ember runner, no bandwidth): JSON saved then still prints, in the table the embeddings report shares."""
    workload = (f"batch 1, prompt {report['prompt_tokens']} tokens, {report['new_tokens']} new tokens (greedy, "
                f"EOS ignored), {report['threads']} threads, median of {report['runs']} runs after "
                f"{report['warmup']} warmup")
    return _format(report, workload, _SINGLE_RUNNER_METRICS, _single_runner_peer_lines)


def format_report(report: dict[str, Any]) -> str:
    if "encodings" not in report:
        return _format_single_runner(report)
    batch = report["batch_size"]
    workload = (f"batch {batch}{' (the same prompt in every sequence)' if batch > 1 else ''}, prompt "
                f"{report['prompt_tokens']} tokens, {report['new_tokens']} new tokens (greedy, EOS ignored), "
                f"{report['threads']} threads, median of {report['runs']} runs after {report['warmup']} warmup, "
                f"runners alternating")
    lines = [f"model:    {report.get('model') or report['artifact']}"]
    lines += [f"setup:    {enc}: {data['setup']}, {data['artifact']}" for enc, data in report["encodings"].items()]
    lines += [f"workload: {workload}", "", *_generation_table(report), "", *_generation_notes(report),
              *_generation_memory(report)]
    return "\n".join(lines)


# embeddings ---------------------------------------------------------------------------------------------
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
    workload = (f"encoding {report['encoding']}; {report['sentences']} sentences of {tokens['min']}-{tokens['max']} "
                f"tokens (mean {tokens['mean']:.1f}) at batch {report['batch_size']}; latency: median of "
                f"{report['latency_encodes']} single-sentence encodes; {report['threads']} threads, "
                f"median of {report['runs']} runs after {report['warmup']} warmup")
    return _format(report, workload, _EMBEDDINGS_METRICS, _embeddings_peer_lines)


def format_serving_report(report: dict[str, Any]) -> str:
    """``ember bench --concurrency`` / ``--prefix-cache``: one row per concurrency level, the prefix-cache line."""
    slots = report.get("decode_slots", 0)
    lines = [f"model: {report['model']}, encoding {report['encoding']}, {report['kv_cache_strategy']} KV cache"
             + (f" with {slots} decode slot{'s' * (slots > 1)}" if slots else "") + f", {report['threads']} threads"]
    concurrency = report.get("concurrency")
    if concurrency:
        rate = concurrency.get("request_rate")
        arrivals = "all at once" if rate is None else f"arriving at {rate:g} requests/s (Poisson, seeded)"
        lines.append(f"{concurrency['prompt_tokens']}-token prompts, {concurrency['new_tokens']} new tokens each, "
                     f"{arrivals}, medians of {concurrency['runs']} runs")
        lines.append(f"{'concurrency':>11}  {'output tok/s':>12}  {'x lowest':>8}  {'TTFT med ms':>11}  "
                     f"{'TTFT p90 ms':>11}  {'ITL med ms':>10}  {'ITL p90 ms':>10}  {'preempt':>7}")
        for level, row in concurrency["levels"].items():
            lines.append(f"{level:>11}  {row['output_tok_s']:>12.1f}  {row['speedup_vs_lowest']:>8.2f}  "
                         f"{_num(row['ttft_median_s'], 1e3):>11}  {_num(row['ttft_p90_s'], 1e3):>11}  "
                         f"{_num(row['itl_median_s'], 1e3):>10}  {_num(row['itl_p90_s'], 1e3):>10}  "
                         f"{row['scheduler']['preemptions']:>7}")
        peer = concurrency.get("peer")
        if peer:
            lines.append(f"{peer['name']} static batch {peer['batch_size']}: {peer['output_tok_s']:.1f} output tok/s "
                         f"({peer['output_tok_s_min']:.1f}-{peer['output_tok_s_max']:.1f}); each level against it: "
                         + ", ".join(f"{level}: {row['ratio_to_peer']:.2f}x"
                                     for level, row in concurrency["levels"].items()))
    if report.get("http"):
        lines += _http_lines(report["http"])
    prefix = report.get("prefix_cache")
    if prefix:
        lines.append(f"prefix cache: {prefix['prompt_tokens']}-token prompt sharing {prefix['shared_tokens']} tokens: "
                     f"TTFT miss {prefix['ttft_miss_s'] * 1e3:.1f} ms, hit {prefix['ttft_hit_s'] * 1e3:.1f} ms "
                     f"({prefix['speedup']:.2f}x faster; medians of {prefix['runs']})")
    return "\n".join(lines)


def _http_lines(http: dict[str, Any]) -> list[str]:
    """``ember bench --concurrency ... --http``: per level, through HTTP and through the engine, and their ratio."""
    lines = [f"{http['prompt_tokens']}-token prompts, {http['new_tokens']} new tokens each, medians of "
             f"{http['runs']} runs; HTTP: streaming /v1/completions on 127.0.0.1, engine: driven directly",
             f"{'concurrency':>11}  {'via':>6}  {'output tok/s':>12}  {'TTFT p50 ms':>11}  {'TTFT p90 ms':>11}  "
             f"{'ITL p50 ms':>10}  {'ITL p90 ms':>10}  {'HTTP/engine':>11}"]
    for level, row in http["levels"].items():
        for via in ("engine", "http"):
            data = row[via]
            ratio = f"{row['http_over_engine_tok_s']:>11.3f}" if via == "http" else f"{'':>11}"
            lines.append(f"{level:>11}  {via:>6}  {data['output_tok_s']:>12.1f}  {_num(data['ttft_median_s'], 1e3):>11}  "
                         f"{_num(data['ttft_p90_s'], 1e3):>11}  {_num(data['itl_median_s'], 1e3):>10}  "
                         f"{_num(data['itl_p90_s'], 1e3):>10}  {ratio}")
    return lines
