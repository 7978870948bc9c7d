"""The server through OpenAI's own Python client, sync and async, streamed and not: greedy text equals
``ember generate``'s code path on the same model, embeddings equal ``ember embed``'s, log probabilities equal the
engine's ``compute_log_probabilities`` and transformers' log_softmax, seeds and stop strings behave as OpenAI's."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ember.runtime.pipelines import SamplingParams

from .conftest import BERT, LLAMA

PROMPT = "the river and the town"
SENTENCES = ["the river runs through the town", "a small boat", "the town and the river"]


def expected_text(reference, prompt: str, max_tokens: int, *, chat: bool, **sampling) -> str:
    """What ``ember generate`` prints for ``prompt`` (its prompt building and streaming loop, in process)."""
    from ember.tools.generate import build_prompt, stream_text

    loaded = reference[0]
    ids = build_prompt(loaded.tokenizer, prompt, chat_template=chat)
    params = SamplingParams(max_new_tokens=max_tokens, **sampling)
    return "".join(stream_text(loaded.pipeline, loaded.tokenizer, ids, params))


def test_models_and_health(client, server):
    import httpx

    assert sorted(m.id for m in client.models.list().data) == sorted([LLAMA, BERT])
    health = httpx.get(f"{server.base_url}/health").json()
    assert health["status"] == "ok"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completion_greedy_text_equals_ember_generate(client, reference, stream):
    expected = expected_text(reference, PROMPT, 24, chat=False)
    if stream:
        chunks = list(client.completions.create(model=LLAMA, prompt=PROMPT, max_tokens=24, temperature=0,
                                                stream=True))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        response = client.completions.create(model=LLAMA, prompt=PROMPT, max_tokens=24, temperature=0)
        text, finish = response.choices[0].text, [response.choices[0].finish_reason]
        assert response.usage.completion_tokens == 24
        assert response.usage.prompt_tokens == len(reference[0].tokenizer.encode(PROMPT))
    assert text == expected and text
    assert finish == ["length"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_greedy_text_equals_ember_generate(client, reference, stream):
    expected = expected_text(reference, PROMPT, 20, chat=True)
    messages = [{"role": "user", "content": PROMPT}]
    if stream:
        chunks = list(client.chat.completions.create(model=LLAMA, messages=messages, max_tokens=20, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    else:
        response = client.chat.completions.create(model=LLAMA, messages=messages, max_tokens=20, temperature=0)
        text = response.choices[0].message.content
        assert response.choices[0].finish_reason == "length"
        assert response.usage.total_tokens == response.usage.prompt_tokens + 20
    assert text == expected and text


def test_async_client_streams_chat_and_completions(async_client, reference):
    chat_expected = expected_text(reference, PROMPT, 12, chat=True)
    plain_expected = expected_text(reference, PROMPT, 12, chat=False)

    async def chat() -> str:
        stream = await async_client.chat.completions.create(
            model=LLAMA, messages=[{"role": "user", "content": PROMPT}], max_tokens=12, temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def plain() -> str:
        response = await async_client.completions.create(model=LLAMA, prompt=PROMPT, max_tokens=12, temperature=0)
        return response.choices[0].text

    async def both():
        return await asyncio.gather(chat(), plain())

    assert asyncio.run(both()) == [chat_expected, plain_expected]


def test_embeddings_equal_ember_embed(client, async_client, reference):
    from ember.tools.embed import embed_texts

    expected = embed_texts(reference[1].pipeline, SENTENCES).embeddings
    by_default = client.embeddings.create(model=BERT, input=SENTENCES)  # the client asks for base64 and decodes it
    as_floats = client.embeddings.create(model=BERT, input=SENTENCES, encoding_format="float")
    one = asyncio.run(async_client.embeddings.create(model=BERT, input=SENTENCES[1]))
    for response in (by_default, as_floats):
        got = np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)], dtype=np.float32)
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(np.array(one.data[0].embedding, dtype=np.float32), expected[1])
    tokens = sum(len(ids) for ids in reference[1].pipeline.tokenize(SENTENCES))
    assert by_default.usage.prompt_tokens == tokens == by_default.usage.total_tokens


def _transformers_log_softmax(llama_dir, tokens: list[int]) -> np.ndarray:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def test_logprobs_equal_the_engine_and_transformers(client, reference, serve_models):
    loaded = reference[0]
    prompt_ids = loaded.tokenizer.encode(PROMPT)
    context = loaded.pipeline.new_context(prompt_ids, SamplingParams(max_new_tokens=6, top_logprobs=3))
    engine_logprobs = [r[context.request_id].log_probabilities for r in loaded.pipeline.generate([context])]
    response = client.completions.create(model=LLAMA, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = response.choices[0].logprobs
    assert lp.token_logprobs == [e["token_log_probability"] for e in engine_logprobs]
    for top, entry in zip(lp.top_logprobs, engine_logprobs):
        expected = {loaded.tokenizer.decode([t], skip_special_tokens=False): v for t, v in entry["top"].items()}
        assert {k: top[k] for k in expected} == expected
    chat = client.chat.completions.create(model=LLAMA, messages=[{"role": "user", "content": PROMPT}], max_tokens=6,
                                          temperature=0, logprobs=True, top_logprobs=2)
    assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)
    # transformers on the same weights, teacher-forced on the prompt and the generated tokens
    generated = context.generated
    reference_logp = _transformers_log_softmax(serve_models.llama, prompt_ids + generated)
    expected = [reference_logp[len(prompt_ids) - 1 + i, t] for i, t in enumerate(generated)]
    np.testing.assert_allclose(lp.token_logprobs, expected, atol=2e-5)


def test_echo_returns_the_prompt_log_probabilities(client, reference, serve_models):
    loaded = reference[0]
    prompt_ids = loaded.tokenizer.encode(PROMPT)
    expected = loaded.pipeline.prompt_log_probabilities(prompt_ids, 2)
    response = client.completions.create(model=LLAMA, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    choice = response.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert response.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == [e["token_log_probability"] for e in expected[1:]]
    reference_logp = _transformers_log_softmax(serve_models.llama, prompt_ids)
    np.testing.assert_allclose(choice.logprobs.token_logprobs[1:],
                               [reference_logp[i - 1, t] for i, t in enumerate(prompt_ids) if i], atol=2e-5)
    streamed = list(client.completions.create(model=LLAMA, prompt=PROMPT, max_tokens=3, echo=True, logprobs=1,
                                              temperature=0, stream=True))
    assert streamed[0].choices[0].text.startswith(PROMPT)
    assert streamed[0].choices[0].logprobs.token_logprobs[:len(prompt_ids)] == choice.logprobs.token_logprobs


def test_n_seeded_choices_are_reproducible_and_seeded_per_choice(client, reference):
    kwargs = {"model": LLAMA, "prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "seed": 7, "n": 3}
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1
    for i, text in enumerate(texts):  # choice i is seeded seed + i, as `ember generate --seed 7+i` would be
        assert text == expected_text(reference, PROMPT, 10, chat=False, temperature=1.0, seed=7 + i)
    assert first.usage.completion_tokens == 30


def test_stop_strings_cut_the_text_and_are_held_back_while_streaming(client, reference):
    full = expected_text(reference, PROMPT, 16, chat=False)
    words = full.split(" ")
    stop = f"{words[3][-2:]} {words[4][:2]}"  # spans two tokens
    expected = full[:full.index(stop)]
    tokens_to_stop = len(full[:full.index(stop) + len(stop)].split(" "))  # one token per word
    response = client.completions.create(model=LLAMA, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop, "zzz"])
    assert response.choices[0].text == expected
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens == tokens_to_stop
    chunks = list(client.completions.create(model=LLAMA, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop,
                                            stream=True))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
