"""``ember chat``: an interactive conversation on the model's chat template.

Each turn renders the whole conversation (system message, earlier turns, the new user message) with the
model's chat template and streams the reply through :func:`~ember.tools.generate.stream_text`, the same path
as ``ember generate``, so sampling, penalties and stop rules are the pipeline's own. When the conversation
no longer leaves room for a reply within the model's maximum length, the oldest turns are dropped (and the
user is told). ``/reset`` forgets the conversation, ``/exit`` or Ctrl-D leaves, Ctrl-C during a reply stops
that reply (the pipeline frees its KV cache) and returns to the prompt.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from typing import Any, TextIO

from ember.runtime.pipelines import SamplingParams

from .generate import GenerationStats, stream_text

logger = logging.getLogger(__name__)

PROMPT = ">>> "
HELP = "/reset forgets the conversation, /exit or Ctrl-D leaves, Ctrl-C stops a reply"


class Conversation:
    """The messages of one chat and the prompt they render to, kept within the model's maximum length.

    ``reply_room`` tokens are kept free for the reply: a prompt that would leave less loses its oldest
    turns (a user message and its reply, together) until it fits; the system message always stays.
    """

    def __init__(self, tokenizer: Any, max_length: int, reply_room: int, system: str | None = None):
        if not tokenizer.has_chat_template:
            raise ValueError("the model's tokenizer has no chat template, so there is no chat format to follow; "
                             "`ember generate --no-chat-template` runs plain prompts")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.reply_room = reply_room
        self.system = system
        self.turns: list[tuple[str, str]] = []  # (user message, assistant reply)

    def messages(self, user: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        history = [{"role": role, "content": text} for turn in self.turns
                   for role, text in zip(("user", "assistant"), turn)]
        return head + history + [{"role": "user", "content": user}]

    def prompt(self, user: str) -> tuple[list[int], int]:
        """Token ids for the next reply to ``user``, and how many old turns were dropped to make them fit.

        ValueError when ``user`` alone (with the system message) leaves no room for a reply."""
        limit = self.max_length - self.reply_room
        dropped = 0
        while True:
            ids = self.tokenizer.apply_chat_template(self.messages(user))
            if len(ids) <= limit:
                return ids, dropped
            if not self.turns:
                raise ValueError(f"this message makes a prompt of {len(ids)} tokens; with {self.reply_room} "
                                 f"tokens kept for the reply, the model's maximum length of {self.max_length} "
                                 f"allows {limit}")
            self.turns.pop(0)
            dropped += 1

    def add(self, user: str, reply: str) -> None:
        self.turns.append((user, reply))

    def reset(self) -> None:
        self.turns.clear()


def reply_room(sampling: SamplingParams, max_length: int) -> int:
    """Tokens kept free for a reply: its ``max_new_tokens``, but never more than half the model's length."""
    return min(sampling.max_new_tokens or max_length, max_length // 2)


def _enable_line_editing(stdin: TextIO) -> None:
    """Arrow keys and input history for ``input()`` on a terminal (GNU readline, where Python has it)."""
    if stdin.isatty():
        try:
            import readline  # noqa: F401  (importing it is what turns line editing on)
        except ImportError:
            logger.debug("no readline module: input without line editing")


def run_chat(pipeline: Any, tokenizer: Any, sampling: SamplingParams, *, system: str | None = None,
             read_line: Callable[[str], str] = input, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The read-reply loop; returns the exit status (0 on /exit or end of input)."""
    out, err = out or sys.stdout, err or sys.stderr
    conversation = Conversation(tokenizer, pipeline.max_length, reply_room(sampling, pipeline.max_length), system)
    _enable_line_editing(sys.stdin)
    print(f"[ember] chat: {HELP}", file=err, flush=True)
    while True:
        try:
            line = read_line(PROMPT)
        except EOFError:  # Ctrl-D
            out.write("\n")
            out.flush()
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, as Python's own REPL does
            out.write("\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return 0
        if text == "/reset":
            conversation.reset()
            print("[ember] conversation cleared", file=err, flush=True)
            continue
        if text.startswith("/"):
            print(f"[ember] unknown command {text.split()[0]}: {HELP}", file=err, flush=True)
            continue
        try:
            _turn(pipeline, tokenizer, sampling, conversation, text, out, err)
        except KeyboardInterrupt:  # between the reply's tokens and its bookkeeping: the turn is dropped
            out.write("\n")
            print("[ember] interrupted", file=err, flush=True)
        except ValueError as error:
            print(f"ember: error: {error}", file=err, flush=True)


def _turn(pipeline: Any, tokenizer: Any, sampling: SamplingParams, conversation: Conversation, text: str,
          out: TextIO, err: TextIO) -> None:
    """One user message: fit the prompt, stream the reply (Ctrl-C stops it), keep it in the conversation."""
    prompt_ids, dropped = conversation.prompt(text)
    if dropped:
        print(f"[ember] dropped the oldest {dropped} turn{'s' if dropped != 1 else ''} to stay within the "
              f"model's maximum length ({conversation.max_length} tokens)", file=err, flush=True)
    stats = GenerationStats()
    parts: list[str] = []
    try:
        with contextlib.closing(stream_text(pipeline, tokenizer, prompt_ids, sampling, stats)) as deltas:
            for delta in deltas:
                parts.append(delta)
                out.write(delta)
                out.flush()
    except KeyboardInterrupt:  # the reply so far stays, as the user saw it
        stats.finish_reason = "interrupted"
    out.write("\n")
    out.flush()
    conversation.add(text, "".join(parts))
    note = ""
    if stats.finish_reason == "length" and sampling.max_new_tokens is not None \
            and stats.generated_tokens >= sampling.max_new_tokens:
        note = f"; stopped at --max-new-tokens {sampling.max_new_tokens}"
    print(f"[ember] {stats.describe()}; {len(conversation.turns)} turn{'s' if len(conversation.turns) != 1 else ''} "
          f"in the conversation{note}", file=err, flush=True)
