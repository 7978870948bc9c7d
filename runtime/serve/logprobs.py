"""Log probabilities in OpenAI's two forms: legacy completions' parallel lists and chat's list of token objects.

The figures are the engine's own (``compute_log_probabilities`` through the model runner, or the prompt's when
``echo`` asks): this module only names tokens. A token's name is its text decoded alone with special tokens kept
(``</s>`` stays visible), and ``bytes`` are that text's UTF-8 bytes, as OpenAI gives them.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .generation import TokenLogprob
from .response_schemas import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


def token_text(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def completion_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob | None], tokens: Sequence[int],
                        offset: int = 0, into: CompletionLogprobs | None = None) -> CompletionLogprobs:
    """Append ``tokens`` (with their entries; None for a prompt's first token) to ``into``: text, log probability,
    the alternatives by text (the chosen token always among them, so up to ``logprobs + 1``), and each token's
    character offset, counting from ``offset``."""
    out = into if into is not None else CompletionLogprobs()
    for token, entry in zip(tokens, entries):
        text = token_text(tokenizer, token)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(entry.logprob)
        top = {token_text(tokenizer, t): lp for t, lp in entry.top.items()}
        top.setdefault(text, entry.logprob)
        out.top_logprobs.append(top)
    return out


def next_offset(logprobs: CompletionLogprobs) -> int:
    """Where the next token's text starts, after the tokens ``logprobs`` holds."""
    if not logprobs.tokens:
        return 0
    return logprobs.text_offset[-1] + len(logprobs.tokens[-1])


def _top(tokenizer: Any, token: int, logprob: float) -> TopLogprob:
    text = token_text(tokenizer, token)
    return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))


def chat_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    """Chat's ``logprobs.content``: per generated token, its text, log probability, bytes and ``top_logprobs``."""
    content = []
    for entry in entries:
        chosen = _top(tokenizer, entry.token, entry.logprob)
        content.append(ChatTokenLogprob(token=chosen.token, logprob=chosen.logprob, bytes=chosen.bytes,
                                        top_logprobs=[_top(tokenizer, t, lp) for t, lp in entry.top.items()]))
    return ChatLogprobs(content=content)
