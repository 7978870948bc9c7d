"""How many tokens to draft: from the measured acceptance rate and the cost of a longer verification step.

With a per-token acceptance rate ``a``, drafting ``k`` tokens yields ``(1 - a**(k+1)) / (1 - a)`` tokens per
step (the accepted run plus the one the target adds) for a step that costs ``1 + f + c * k`` decode steps: ``c``
is what one more position costs a verification call, ``f`` what a step with drafts costs besides (verifying on
the host, proposing); both measured by ``ember bench --speculative`` (BENCHMARKS.md, speculative decoding). The
controller drafts the ``k`` that maximises their ratio; when none beats plain decoding it drafts nothing, so a
workload whose drafts are rejected runs at plain speed, and every ``probe_interval`` steps it drafts one token
to notice when acceptance comes back.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AdaptiveDraftLength:
    """``max_k``: the most tokens drafted per step; ``verify_token_cost``: ``c`` above; ``step_overhead``: ``f``
    above; ``decay``: the weight the
    acceptance estimate keeps per observation (a window of roughly ``1 / (1 - decay)`` drafted runs);
    ``probe_interval``: plain steps between probes while drafting does not pay; ``adaptive=False`` always drafts
    ``max_k``."""

    max_k: int
    verify_token_cost: float = 0.06
    step_overhead: float = 0.05
    decay: float = 0.9
    probe_interval: int = 16
    adaptive: bool = True
    accepted: float = field(default=1.0, init=False)  # decayed counts, with a prior of one accept in two trials
    trials: float = field(default=2.0, init=False)
    plain_steps: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.max_k < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.max_k}")
        if self.verify_token_cost < 0 or self.step_overhead < 0:
            raise ValueError(f"verify_token_cost and step_overhead must be >= 0, got {self.verify_token_cost}, "
                             f"{self.step_overhead}")

    @property
    def rate(self) -> float:
        """The estimated probability that a draft token is accepted (given the ones before it were)."""
        return self.accepted / self.trials

    def record(self, drafted: int, accepted: int) -> None:
        """One verified run: ``accepted`` of ``drafted`` tokens kept (a run stops at its first rejection)."""
        if drafted <= 0:
            return
        self.accepted = self.decay * self.accepted + accepted
        self.trials = self.decay * self.trials + accepted + (accepted < drafted)

    def best_k(self) -> int:
        """The draft length with the most expected tokens per unit of step cost (0: plain decoding)."""
        a = min(self.rate, 0.999)
        best, best_value = 0, 1.0
        for k in range(1, self.max_k + 1):
            value = (1 - a ** (k + 1)) / (1 - a) / (1 + self.step_overhead + self.verify_token_cost * k)
            if value > best_value * 1.0001:
                best, best_value = k, value
        return best

    def next_k(self) -> int:
        """Tokens to draft for the next step (counts plain steps to probe now and then)."""
        if not self.adaptive:
            return self.max_k
        k = self.best_k()
        if k > 0:
            self.plain_steps = 0
            return k
        self.plain_steps += 1
        if self.plain_steps >= self.probe_interval:
            self.plain_steps = 0
            return 1
        return 0
