"""``ember serve`` as a real process on 127.0.0.1 (the tiny chat Llama), with OpenAI's client: greedy answers equal
``ember generate``'s (also a real process), the API key is required on /v1 routes, and SIGTERM either lets a running
stream finish (within ``--shutdown-timeout``) or cancels it, and exits within a bound."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from ..runtime.serve.tiny_serving_models import make_chat_llama

openai = pytest.importorskip("openai")

KEY = "test-key-123"
PROMPT = "the river and the town"
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return {**os.environ, "EMBER_CACHE": str(tmp_path_factory.mktemp("serve-cli-cache")), "PYTHONIOENCODING": "utf-8"}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    return make_chat_llama(tmp_path_factory.mktemp("serve-cli") / "llama")


class ServeProcess:
    """``ember serve MODEL ...`` on a free port, up once /health answers."""

    def __init__(self, model: Path, env: dict[str, str], *args: str):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ember.tools", "serve", str(model), "--port", str(self.port),
             "--max-batch-size", "4", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.process.poll() is None, self.process.communicate()[1]
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "ember serve did not start"
            time.sleep(0.2)

    def client(self, key: str = KEY):
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=key, max_retries=0, timeout=60)

    def terminate(self, timeout: float) -> tuple[int, float, str]:
        """SIGTERM; the exit status (minus the signal's number when it ended by it), the seconds it took to exit,
        and stderr."""
        start = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        _, stderr = self.process.communicate(timeout=timeout)
        return self.process.returncode, time.monotonic() - start, stderr

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


@pytest.fixture(scope="module")
def served(model, env):
    server = ServeProcess(model, env, "--api-key", KEY, "--shutdown-timeout", "30")
    yield server
    server.kill()


def ember_generate(model: Path, env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "ember.tools", "generate", "--model", str(model), PROMPT,
                             "--kv-cache-strategy", "paged", *args], capture_output=True, text=True, env=env,
                            timeout=180, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.removesuffix("\n")


def test_help_and_usage_errors_need_no_model():
    result = subprocess.run([sys.executable, "-m", "ember.tools", "serve", "--help"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0 and "--embeddings-model" in result.stdout and "127.0.0.1" in result.stdout
    result = subprocess.run([sys.executable, "-m", "ember.tools", "serve", "--port", "70000"], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 2 and "ember: error: --port 70000" in result.stderr


def test_the_api_key_is_required_on_v1_routes(served):
    missing = httpx.get(f"{served.base_url}/v1/models", timeout=10)
    assert missing.status_code == 401 and "missing API key" in missing.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError) as wrong:
        served.client("not-the-key").completions.create(model="llama", prompt="x")
    assert wrong.value.body["code"] == "invalid_api_key"
    response = httpx.post(f"{served.base_url}/v1/completions", content=b"{broken", timeout=10)
    assert response.status_code == 401  # before the body is even parsed
    assert httpx.get(f"{served.base_url}/health").status_code == 200  # open, for load balancers
    assert httpx.get(f"{served.base_url}/metrics").status_code == 200
    assert [m.id for m in served.client().models.list().data] == ["llama"]


def test_greedy_answers_equal_ember_generate(served, model, env):
    client = served.client()
    chat = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=16, temperature=0)
    plain = client.completions.create(model="llama", prompt=PROMPT, max_tokens=16, temperature=0)
    assert chat.choices[0].message.content == ember_generate(model, env, "--max-new-tokens", "16")
    assert plain.choices[0].text == ember_generate(model, env, "--max-new-tokens", "16", "--no-chat-template")


def _stream_in_background(server: ServeProcess, max_tokens: int) -> tuple[threading.Thread, dict, threading.Event]:
    """A long greedy stream read in a thread; ``result`` gets its events and how it ended."""
    result: dict = {"events": [], "error": None}
    started = threading.Event()

    def read() -> None:
        body = {"model": "llama", "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
                "stream": True}
        try:
            with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {KEY}"}) as response:
                for line in response.iter_lines():
                    if line:
                        result["events"].append(line)
                    if len(result["events"]) == 3:
                        started.set()
        except httpx.HTTPError as error:  # the server closed the connection mid-stream
            result["error"] = error
        started.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, result, started


def test_sigterm_lets_a_running_stream_finish(served):
    thread, result, started = _stream_in_background(served, 300)
    assert started.wait(30)
    status, _, stderr = served.terminate(timeout=60)
    thread.join(30)
    assert result["error"] is None and result["events"][-1] == "data: [DONE]"
    assert status == -signal.SIGTERM, stderr  # uvicorn ends the process by the signal after shutting down


def test_sigterm_cancels_a_stream_past_the_shutdown_timeout(model, env):
    server = ServeProcess(model, env, "--shutdown-timeout", "0.2")
    try:
        thread, result, started = _stream_in_background(server, 1000)
        assert started.wait(60)
        status, seconds, stderr = server.terminate(timeout=30)
        thread.join(30)
    finally:
        server.kill()
    assert status == -signal.SIGTERM, stderr
    assert seconds < 10, f"took {seconds:.1f} s to exit"
    assert "data: [DONE]" not in result["events"]
    assert "cancel" in stderr.lower(), stderr
