"""Speculative decoding: drafters propose tokens, the model runner verifies them in one multi-token step.

``drafters.py`` proposes (prompt lookup by n-gram, or a small draft model sharing the tokenizer);
``verification.py`` decides which drafts to keep so that the output distribution is the target model's;
``acceptance.py`` adapts how many tokens to draft from the measured acceptance rate; ``speculator.py`` ties them
to the contexts between steps. The model runner (pipelines/model_runner.py) is the one place that calls them.
"""
from .acceptance import AdaptiveDraftLength
from .drafters import DraftModelDrafter, Drafter, NgramDrafter
from .speculator import SpeculativeConfig, SpeculativeMethod, Speculator
from .verification import rejection_sample, verify_and_append

__all__ = ["AdaptiveDraftLength", "DraftModelDrafter", "Drafter", "NgramDrafter", "SpeculativeConfig",
           "SpeculativeMethod", "Speculator", "rejection_sample", "verify_and_append"]
