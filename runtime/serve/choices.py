"""From a request to the engine's work: prompt tokens checked against the model, one :class:`ChoiceSpec` per choice.

Everything a request could get wrong about the model is found here, before a response starts (a stream that has
begun can no longer change its status): token ids outside the vocabulary, an empty prompt, a prompt that leaves no
room to generate, ``max_tokens`` past the model's maximum length, a sampling value ``SamplingParams`` refuses.
Each is a 400 with OpenAI's ``param`` and, for lengths, OpenAI's ``context_length_exceeded`` code.
"""
from __future__ import annotations

from collections.abc import Sequence

from ..pipelines.context import SamplingParams
from .errors import APIError
from .generation import ChoiceSpec
from .request_schemas import SamplingRequest
from .state import ServedGenerator


def encode_prompt(model: ServedGenerator, prompt: str | list[int]) -> list[int]:
    """Token ids of a completions prompt: text encoded as ``ember generate --no-chat-template`` encodes it (with the
    tokenizer's special tokens), or ids checked against the vocabulary."""
    if isinstance(prompt, str):
        return list(model.tokenizer.encode(prompt))
    bad = next((t for t in prompt if not 0 <= t < model.vocab_size), None)
    if bad is not None:
        raise APIError(400, f"prompt: token id {bad} is not in this model's vocabulary (0 <= id < {model.vocab_size})",
                       param="prompt", code="invalid_value")
    return list(prompt)


def check_lengths(model: ServedGenerator, prompt: Sequence[int], max_tokens: int | None, param: str) -> None:
    """The prompt must leave room to generate, and ``max_tokens`` must fit after it (OpenAI's wording)."""
    limit = model.max_length
    if not prompt:
        raise APIError(400, f"{param}: the prompt is empty (no tokens)", param=param, code="invalid_value")
    if len(prompt) >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your prompt is "
                       f"{len(prompt)} tokens, which leaves no room for a completion.", param=param,
                       code="context_length_exceeded")
    if max_tokens is not None and len(prompt) + max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} in the "
                       f"completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                       code="context_length_exceeded")


def sampling_params(request: SamplingRequest, max_tokens: int | None, index: int, *, top_logprobs: int = 0,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """The engine's sampling for choice ``index``: choice ``i`` of a seeded request is seeded ``seed + i``, so the
    ``n`` choices differ and each is reproducible. ``top_logprobs``: alternatives to compute per token (at least
    one when log probabilities are asked for, so that the chosen token's own comes with them)."""
    seed = None if request.seed is None else (request.seed + index) % 2**63
    try:
        return SamplingParams(temperature=request.temperature, top_k=max(request.top_k, 0), top_p=request.top_p,
                              seed=seed, max_new_tokens=max_tokens, ignore_eos=request.ignore_eos,
                              top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs,
                              repetition_penalty=request.repetition_penalty,
                              frequency_penalty=request.frequency_penalty, presence_penalty=request.presence_penalty)
    except ValueError as error:
        raise APIError(400, str(error), code="invalid_value") from None


def choice_specs(request_id: str, prompts: Sequence[list[int]], request: SamplingRequest, max_tokens: int | None, *,
                 logprobs: int | None = None, echo_logprobs: bool = False) -> list[ChoiceSpec]:
    """``request.n`` choices per prompt, indexed prompt by prompt (OpenAI's order). ``logprobs``: alternatives to
    report per token (None: no log probabilities); ``echo_logprobs``: the prompt's too."""
    top_n = logprobs or 0
    specs = []
    for p, prompt in enumerate(prompts):
        for i in range(request.n):
            index = p * request.n + i
            sampling = sampling_params(request, max_tokens, i, top_logprobs=max(top_n, 1) if logprobs is not None else 0,
                                       prompt_logprobs=top_n if echo_logprobs else None)
            specs.append(ChoiceSpec(index, f"{request_id}-{index}", prompt, sampling, tuple(request.stop_strings),
                                    logprobs is not None, top_n))
    return specs
