"""Every refusal is OpenAI's error body with the right 4xx, read by OpenAI's client as its typed exception; nothing
that is refused holds KV cache afterwards."""
from __future__ import annotations

import json

import httpx
import pytest

from .conftest import BERT, BODY_LIMIT, LLAMA, MAX_LENGTH

openai = pytest.importorskip("openai")


def post(server, path: str, body: bytes | dict, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.v1}{path}", content=content, timeout=30,
                      headers={"content-type": "application/json", **headers})


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def test_malformed_json_and_missing_fields_are_400(server):
    assert_error(post(server, "/completions", b'{"model": "tiny-llama", "prompt": '), 400, code="invalid_json")
    assert_error(post(server, "/chat/completions", b"[1, 2"), 400, code="invalid_json")
    assert_error(post(server, "/completions", {"prompt": "x"}), 400, param="model")
    assert_error(post(server, "/chat/completions", {"model": LLAMA, "messages": []}), 400, param="messages")
    assert_error(post(server, "/embeddings", {"model": BERT, "input": 5}), 400, param="input")


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="no-such-model", prompt="x")
    assert error.value.body["code"] == "model_not_found" and LLAMA in error.value.body["message"]
    with pytest.raises(openai.NotFoundError):  # the encoder does not generate, the decoder does not embed
        client.chat.completions.create(model=BERT, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model=LLAMA, input="x")


def test_prompt_longer_than_the_model_allows_is_400(client, server):
    long_prompt = " ".join(["the"] * (MAX_LENGTH + 5))
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=LLAMA, prompt=long_prompt, max_tokens=4)
    assert error.value.body["code"] == "context_length_exceeded" and str(MAX_LENGTH) in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=LLAMA, messages=[{"role": "user", "content": long_prompt}])
    assert error.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as error:  # the encoder's maximum (64 positions), no truncation
        client.embeddings.create(model=BERT, input=["short", " ".join(["the"] * 100)])
    assert error.value.body["param"] == "input"
    server.wait_idle()


def test_max_tokens_over_the_limit_is_400(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=LLAMA, prompt="the river", max_tokens=MAX_LENGTH)
    assert error.value.body["param"] == "max_tokens" and error.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=LLAMA, messages=[{"role": "user", "content": "x"}],
                                       max_completion_tokens=MAX_LENGTH + 1)
    assert error.value.body["param"] == "max_tokens"


@pytest.mark.parametrize("field, value", [
    ("temperature", 2.5), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("n", 0),
    ("n", 1000), ("max_tokens", -1), ("logprobs", 21), ("presence_penalty", 2.5), ("frequency_penalty", -3),
    ("seed", -1), ("stop", ["a", "b", "c", "d", "e"]), ("stop", [""]), ("repetition_penalty", 0),
    ("logit_bias", {"5": 1.0}), ("suffix", "tail"), ("best_of", 3), ("temperature", "hot"),
])
def test_bad_completion_parameters_are_400_naming_the_field(server, field, value):
    error = assert_error(post(server, "/completions", {"model": LLAMA, "prompt": "the river", field: value}), 400)
    assert error["param"] == field, error


@pytest.mark.parametrize("body", [
    {"top_logprobs": 3},  # without logprobs
    {"logprobs": True, "top_logprobs": 21},
    {"messages": [{"role": "wizard", "content": "x"}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"tools": [{"type": "function", "function": {"name": "f"}}]},
    {"stream_options": {"include_usage": True}},  # without stream
])
def test_bad_chat_parameters_are_400(server, body):
    request = {"model": LLAMA, "messages": [{"role": "user", "content": "the river"}], **body}
    assert_error(post(server, "/chat/completions", request), 400)


def test_token_ids_outside_the_vocabulary_are_400(server):
    assert_error(post(server, "/completions", {"model": LLAMA, "prompt": [1, 10**6]}), 400, param="prompt")
    assert_error(post(server, "/completions", {"model": LLAMA, "prompt": [[1, 5], [-1]]}), 400, param="prompt")


def test_oversized_bodies_are_413_whether_declared_or_chunked(server):
    big = {"model": LLAMA, "prompt": "the " * (BODY_LIMIT // 4 + 10)}
    assert_error(post(server, "/completions", big), 413, code="request_too_large")
    payload = json.dumps(big).encode()

    def chunks():  # no Content-Length: the limit is found while reading
        for start in range(0, len(payload), 8192):
            yield payload[start:start + 8192]

    response = httpx.post(f"{server.v1}/completions", content=chunks(), timeout=30,
                          headers={"content-type": "application/json"})
    assert_error(response, 413)


def test_unknown_routes_and_methods_answer_in_the_same_shape(server):
    assert_error(httpx.get(f"{server.v1}/nothing-here"), 404)
    assert_error(httpx.get(f"{server.v1}/completions"), 405)
