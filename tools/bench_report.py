"""The readable form of a ``run_benchmark`` report (the CLI prints it; ``--json`` writes the data)."""
from __future__ import annotations

from typing import Any


def _num(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}"


def format_report(report: dict[str, Any]) -> str:
    lines = [f"model:    {report.get('model') or report['artifact']}",
             f"artifact: {report['artifact']}",
             f"setup:    {report['setup']}",
             f"workload: batch 1, prompt {report['prompt_tokens']} tokens, {report['new_tokens']} new tokens "
             f"(greedy, EOS ignored), {report['threads']} threads, median of {report['runs']} runs after "
             f"{report['warmup']} warmup"]
    rows = [("ember", report["ember"])]
    if "peer" in report:
        rows.append((report["peer"]["name"], report["peer"]))
    header = f"{'':<8}{'metric':<16}{'median':>10}{'min':>10}{'max':>10}"
    lines += ["", header, "-" * len(header)]
    for name, data in rows:
        for label, key, scale, digits in (("TTFT (ms)", "ttft_s", 1000.0, 1), ("decode (tok/s)", "decode_tok_s", 1.0, 1)):
            s = data[key]
            lines.append(f"{name:<8}{label:<16}{_num(s['median'], scale, digits):>10}"
                         f"{_num(s['min'], scale, digits):>10}{_num(s['max'], scale, digits):>10}")
    memory = report["memory"]
    lines += ["", f"memory:   ember peak RSS {memory['ember']['peak_rss_mib']:.0f} MiB, "
                  f"current RSS {memory['ember']['rss_mib']:.0f} MiB (before any peer was loaded)"]
    if "with_peer" in memory:
        lines.append(f"          with {report['peer']['name']} loaded: peak RSS {memory['final']['peak_rss_mib']:.0f} "
                     f"MiB, current RSS {memory['final']['rss_mib']:.0f} MiB")
    if "ratios" in report:
        ratios, peer = report["ratios"], report["peer"]
        lines += [f"peer:     {peer['name']}: transformers {peer.get('transformers', '?')}, torch {peer.get('torch', '?')}, "
                  f"{peer.get('dtype', '?')}, {peer.get('attn_implementation', '?')} attention, "
                  f"{peer.get('threads', '?')} threads, loaded in {report['peer_setup_s']:.1f} s",
                  f"ratios:   decode tok/s ember/{peer['name']} = {_num(ratios['decode_tok_s'], digits=2)}x, "
                  f"TTFT ember/{peer['name']} = {_num(ratios['ttft'], digits=2)}x",
                  f"greedy:   the first {report['greedy_agreement']['matching_prefix']} of "
                  f"{report['greedy_agreement']['of']} tokens agree"]
    return "\n".join(lines)
