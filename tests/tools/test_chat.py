"""``ember chat`` run as a real process on a pseudo-terminal (stdlib ``pty``), on a tiny random Llama with a
chat template: turns keep the conversation, ``/reset`` forgets it, Ctrl-C stops a reply and the chat goes
on, Ctrl-D and ``/exit`` leave with status 0. The history trimming is checked on the real tokenizer.
"""
from __future__ import annotations

import codecs
import fcntl
import os
import pty
import re
import select
import struct
import sys
import termios
import time
from pathlib import Path

import pytest

from ember.runtime.pipelines import SamplingParams, TextTokenizer
from ember.tools.chat import Conversation, reply_room

from ..reference.tiny_models import save_tokenizer

TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")
MAX_LENGTH = 2048


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A random 2-layer Llama whose tokenizer has a chat template; long enough for a reply worth interrupting."""
    torch = pytest.importorskip("torch")
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-chat-llama")
    save_tokenizer(directory)
    (directory / "chat_template.jinja").write_text(TEMPLATE)
    config_file = directory / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "chat_template": TEMPLATE}))
    config = LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LENGTH,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return {**os.environ, "EMBER_CACHE": str(tmp_path_factory.mktemp("ember-cache")), "TERM": "dumb"}


class Terminal:
    """A child process on a pseudo-terminal: what a person at a terminal would see and type."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: its controlling terminal is the pty, so Ctrl-C sends it SIGINT
            try:
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.output = ""
        self.position = 0  # expect() searches from here on
        self.status: int | None = None

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        self.output += self.decoder.decode(data)
        return bool(data)

    def expect(self, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            match = re.compile(pattern).search(self.output, self.position)
            if match:
                self.position = match.end()
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read(min(remaining, 1.0)):
                raise AssertionError(f"no {pattern!r} within {timeout} s; the terminal showed:\n{self.output}")

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
            self._read(0.1)
        raise AssertionError(f"still running after {timeout} s; the terminal showed:\n{self.output}")

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(self.fd)


def chat(model: Path, env: dict[str, str], *options: str) -> Terminal:
    return Terminal([sys.executable, "-m", "ember.tools", "chat", "--model", str(model), "--max-length",
                     str(MAX_LENGTH), *options], env)


STATS = r"\[ember\] prompt (\d+) tokens, generated (\d+) tokens \((\w+)\)"


def test_turns_keep_the_conversation_reset_forgets_it_and_ctrl_d_leaves(chat_model, env):
    terminal = chat(chat_model, env, "--max-new-tokens", "5", "--ignore-eos")
    try:
        terminal.expect(r"/reset forgets the conversation", timeout=180)  # the first run compiles
        terminal.expect(">>> ")
        terminal.send("w5 w6 w7\n")
        echo = terminal.expect(r"w5 w6 w7\r?\n")
        first = terminal.expect(STATS)
        assert first.group(2) == "5" and first.group(3) == "length"
        reply = terminal.output[echo.end():first.start()].split()  # the streamed reply, on its own line
        assert len(reply) <= 5 and all(re.fullmatch(r"w\d+", word) for word in reply)
        terminal.expect(r"1 turn in the conversation; stopped at --max-new-tokens 5")
        terminal.expect(">>> ")

        terminal.send("w8 w9\n")
        second = terminal.expect(STATS)
        # "user : w5 w6 w7 </s> assistant :" (8 tokens) became "user : w5 w6 w7 </s> assistant : REPLY </s>
        # user : w8 w9 </s> assistant :": the first exchange is in the second prompt
        assert int(first.group(1)) == 8 and int(second.group(1)) == 8 + len(reply) + 1 + 7
        terminal.expect(r"2 turns in the conversation")
        terminal.expect(">>> ")

        terminal.send("/reset\n")
        terminal.expect(r"conversation cleared")
        terminal.expect(">>> ")
        terminal.send("w5 w6 w7\n")
        third = terminal.expect(STATS)
        assert third.group(1) == first.group(1)  # the same message with no history: the first prompt again
        terminal.expect(">>> ")

        terminal.send("/nonsense\n")
        terminal.expect(r"unknown command /nonsense")
        terminal.expect(">>> ")
        terminal.send("\x04")  # Ctrl-D on an empty line
        assert terminal.wait() == 0
    finally:
        terminal.close()


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(chat_model, env):
    # A reply as long as the model allows takes seconds: Ctrl-C lands in it. A second Ctrl-C after the next
    # turn's reply starts shows that the first one released the KV cache slot (max_batch_size is 1).
    terminal = chat(chat_model, env, "--max-new-tokens", str(MAX_LENGTH), "--ignore-eos")
    try:
        terminal.expect(">>> ", timeout=180)
        for message in ("w5 w6", "w7"):
            terminal.send(message + "\n")
            terminal.expect(r"\n(w\d+ ){3}")  # the reply is streaming
            terminal.send("\x03")
            stats = terminal.expect(STATS)
            assert stats.group(3) == "interrupted" and 0 < int(stats.group(2)) < MAX_LENGTH // 2
            terminal.expect(">>> ")
        terminal.send("/exit\n")
        assert terminal.wait() == 0
    finally:
        terminal.close()


def test_a_chat_needs_a_chat_template(tmp_path):
    save_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="no chat template"):
        Conversation(TextTokenizer(tmp_path), 64, 8)


def test_the_oldest_turns_are_dropped_to_leave_room_for_the_reply(chat_model):
    tokenizer = TextTokenizer(chat_model)
    conversation = Conversation(tokenizer, max_length=40, reply_room=10, system="w4")
    ids, dropped = conversation.prompt("w5 w6")
    assert dropped == 0 and ids == tokenizer.apply_chat_template(conversation.messages("w5 w6"))
    for i in range(3):
        conversation.add(f"w{10 + i} w{20 + i}", f"w{30 + i} w{40 + i} w{50 + i}")  # 12 tokens a turn
    ids, dropped = conversation.prompt("w5 w6")
    # system (4 tokens) + 3 turns (11 each) + the message and the generation prompt (7) = 44 > 40 - 10: two go
    assert dropped == 2 and len(ids) == 4 + 11 + 7
    assert conversation.turns == [("w12 w22", "w32 w42 w52")]  # the newest turn stays
    assert conversation.messages("w5 w6")[0] == {"role": "system", "content": "w4"}
    with pytest.raises(ValueError, match="maximum length of 40"):
        conversation.prompt(" ".join(f"w{i}" for i in range(4, 40)))


def test_reply_room_is_max_new_tokens_up_to_half_the_length():
    assert reply_room(SamplingParams(max_new_tokens=128), 8192) == 128
    assert reply_room(SamplingParams(max_new_tokens=128), 100) == 50
    assert reply_room(SamplingParams(), 100) == 50
