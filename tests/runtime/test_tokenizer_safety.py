"""A model folder's tokenizer files are someone else's: its own Python is never run, a broken file is one error
naming it, and the chat template is compiled and rendered once, within bounds, when the tokenizer is exported or
loaded (ember issue 17). Every hostile file is crafted here."""
from __future__ import annotations

import builtins
import io
import json
import sys
from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ember.runtime.pipelines import chat_template
from ember.runtime.pipelines.chat_template import ChatTemplate, ChatTemplateError
from ember.runtime.pipelines.model_source import ModelSource
from ember.runtime.pipelines.tokenizer import TextTokenizer, check_tokenizer, export_tokenizer

from ..graphs.test_hostile_files import llama_config, write_gguf, write_tiny_llama

EVIL = '''import pathlib
pathlib.Path({marker!r}).write_text("the model folder's code ran")
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
'''


@pytest.fixture
def answer_yes(monkeypatch):
    """A user who answers 'y' to any question (transformers asks 'Do you wish to run the custom code? [y/N]' when
    trust_remote_code is not given); the questions asked are recorded. stdin itself is closed."""
    asked: list[str] = []

    def input_yes(prompt: str = "") -> str:
        asked.append(prompt)
        return "y"
    monkeypatch.setattr(builtins, "input", input_yes)
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stdin", closed)
    return asked


def folder_with_own_code(tmp_path: Path, tokenizer_class: str | None) -> tuple[Path, Path]:
    model = write_tiny_llama(tmp_path / "model")
    marker = tmp_path / "marker"
    (model / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    if tokenizer_class is None:
        config.pop("tokenizer_class")
    else:
        config["tokenizer_class"] = tokenizer_class
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return model, marker


def test_auto_map_to_the_folders_own_code_is_refused_and_never_run(tmp_path, answer_yes):
    model, marker = folder_with_own_code(tmp_path, tokenizer_class=None)
    source = ModelSource(model, "hf")
    for call in (lambda: check_tokenizer(source),
                 lambda: export_tokenizer(source, tmp_path / "out", llama_config(model))):
        with pytest.raises(ValueError, match=r"tokenizer_config\.json: auto_map points the tokenizer at the model "
                                             r"folder's own Python code .*evil\.EvilTokenizer.*; ember never runs a "
                                             r"model's code \(trust_remote_code=False\)$") as info:
            call()
        assert str(info.value).startswith(str(model / "tokenizer_config.json")) and "\n" not in str(info.value)
    assert not marker.exists(), "the model folder's Python ran"
    assert answer_yes == [], "transformers asked whether to run the folder's code"
    assert not (tmp_path / "out").exists()


def test_auto_map_next_to_a_built_in_class_uses_the_built_in(tmp_path, answer_yes):
    """With a tokenizer class transformers has, the folder loads with it: the code is still never run."""
    model, marker = folder_with_own_code(tmp_path, tokenizer_class="PreTrainedTokenizerFast")
    export_tokenizer(ModelSource(model, "hf"), tmp_path / "out", llama_config(model))
    assert TextTokenizer(tmp_path / "out").encode("w5 w6", add_special_tokens=False) == [5, 6]
    assert not marker.exists() and answer_yes == []


def test_no_tokenizer_files_named(tmp_path):
    model = write_tiny_llama(tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    with pytest.raises(ValueError, match=rf"^{model} has no tokenizer files \(one of tokenizer\.json, "
                                         r"tokenizer\.model"):
        check_tokenizer(ModelSource(model, "hf"))


def test_tokenizer_config_not_json_named(tmp_path):
    model = write_tiny_llama(tmp_path / "model")
    (model / "tokenizer_config.json").write_text("{'single': 'quotes'}")
    for load in (lambda: check_tokenizer(ModelSource(model, "hf")), lambda: TextTokenizer(model)):
        with pytest.raises(ValueError, match=rf"^{model / 'tokenizer_config.json'}: not valid JSON"):
            load()


def test_generation_config_not_json_named(tmp_path):
    model = write_tiny_llama(tmp_path / "model")
    (model / "generation_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=rf"^{model / 'generation_config.json'}: not valid JSON"):
        export_tokenizer(ModelSource(model, "hf"), tmp_path / "out", llama_config(model))
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": "two"}))
    with pytest.raises(ValueError, match=r"generation_config\.json: eos_token_id 'two' is not a token id"):
        TextTokenizer(model)


def test_tokenizer_json_garbage_named(tmp_path):
    model = write_tiny_llama(tmp_path / "model")
    (model / "tokenizer.json").write_text(json.dumps({"model": {"type": "NoSuchModel"}}))
    with pytest.raises(ValueError, match=rf"^{model / 'tokenizer.json'}: not a tokenizer"):
        TextTokenizer(model)


TEMPLATES = {
    "raise_exception": ("{{ raise_exception('Conversation roles must alternate user/assistant') }}",
                        r"chat template raised an error: Conversation roles must alternate user/assistant "
                        r"\(rendering a one-message conversation\)"),
    "syntax error": ("{% for m in messages %}{{ m['content'] }", r"chat template syntax error on line 1: "
                                                                r"unexpected '}'"),
    "100,000 x 100,000 loop": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                               r"chat template stopped while rendering: passed 5,005,000 steps"),
    "a 10 GB string": ("{{ 'x' * 10**10 }}", r"chat template stopped while rendering: str \* 10000000000 of more "
                                             r"than 16,777,216 characters"),
}


@pytest.mark.parametrize("case", list(TEMPLATES))
@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
def test_broken_chat_template_refused_at_export_naming_its_file(tmp_path, case, where):
    template, match = TEMPLATES[case]
    model = write_tiny_llama(tmp_path / "model")
    if where == "chat_template.jinja":
        (model / where).write_text(template)
    else:
        config = json.loads((model / where).read_text())
        (model / where).write_text(json.dumps({**config, "chat_template": template}))
    with pytest.raises(ChatTemplateError, match=match) as info:
        export_tokenizer(ModelSource(model, "hf"), tmp_path / "out", llama_config(model))
    assert str(info.value).startswith(f"{model / where}: ") and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_artifact_template_checked_at_load_and_bounded_at_render(tmp_path):
    model = write_tiny_llama(tmp_path / "model")
    (model / "chat_template.jinja").write_text("{% if messages|length > 1 %}{{ 'x' * 10**9 }}{% endif %}ok")
    tokenizer = TextTokenizer(model)
    assert tokenizer.render_chat([{"role": "user", "content": "w5"}]) == "ok"
    with pytest.raises(ChatTemplateError, match=rf"^{model / 'chat_template.jinja'}: chat template stopped while "
                                                r"rendering: str \* 1000000000"):
        tokenizer.render_chat([{"role": "user", "content": "w5"}] * 2)
    (model / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(ChatTemplateError, match=rf"^{model / 'chat_template.jinja'}: chat template syntax error"):
        TextTokenizer(model)


def test_gguf_tokenizer_ids_checked(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tokenizer__ggml__bos_token_id=99, tokenizer__ggml__model="gpt2")
    with pytest.raises(ValueError, match=rf"^{path}: GGUF metadata tokenizer\.ggml\.bos_token_id 99 is not a token id "
                                         r"below the 8 tokens$"):
        check_tokenizer(ModelSource(path, "gguf"))
    path = write_gguf(tmp_path / "n.gguf", drop=("tokenizer.ggml.tokens",))
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.tokens is missing or not a list of strings"):
        check_tokenizer(ModelSource(path, "gguf"))


# --- the bounded renderer itself -------------------------------------------------------------------------------

REAL_LIKE = """{%- macro render(m) -%}<|im_start|>{{ m.role }}
{{ m.content | trim }}<|im_end|>
{% endmacro -%}
{%- set ns = namespace(system='', count=0) -%}
{%- for message in messages -%}
{%- if message['role'] == 'system' %}{% set ns.system = message['content'] %}{% continue %}{% endif -%}
{%- if (message['role'] == 'user') != (ns.count % 2 == 0) -%}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{%- endif -%}
{%- set ns.count = ns.count + 1 -%}
{%- if loop.first and ns.system %}{{ render({'role': 'system', 'content': ns.system}) }}{% endif -%}
{{ render(message) }}
{%- endfor -%}
{%- if tools is defined %}{{ tools | tojson(indent=2) }}{% endif -%}
{{ '%s:%d' % ('count', ns.count) ~ ' ' ~ messages | map(attribute='role') | join(',') }}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}"""


def test_bounded_rendering_matches_plain_jinja():
    """The bounds change nothing for a real template: output identical to jinja's own sandbox, long
    conversations included."""
    messages = [{"role": "system", "content": "Be brief."}]
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": f" turn {i} " * 20} for i in range(400)]
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                          extensions=["jinja2.ext.loopcontrols"]).from_string(REAL_LIKE)
    plain.globals["raise_exception"] = lambda message: None
    ours = ChatTemplate(REAL_LIKE, "real")
    for conversation in (messages[:2], messages):
        assert ours.render(conversation, True) == plain.render(messages=conversation, add_generation_prompt=True)
    with pytest.raises(ChatTemplateError, match=r"^real: chat template raised an error: Conversation roles must "
                                                r"alternate"):
        ours.render([{"role": "assistant", "content": "first"}])


HOSTILE = {
    "doubling with ~": "{% set ns = namespace(x='ab') %}{% for i in range(80) %}{% set ns.x = ns.x ~ ns.x %}"
                       "{% endfor %}",
    "doubling with %": "{% set ns = namespace(x='ab') %}{% for i in range(80) %}{% set ns.x = '%s%s' % (ns.x, ns.x) %}"
                       "{% endfor %}",
    "doubling with format": "{% set ns = namespace(x='ab') %}{% for i in range(80) %}"
                            "{% set ns.x = '{}{}'.format(ns.x, ns.x) %}{% endfor %}",
    "doubling with set blocks": "{% set ns = namespace(x='ab') %}{% for i in range(80) %}{% set y %}{{ ns.x }}"
                                "{{ ns.x }}{% endset %}{% set ns.x = y %}{% endfor %}",
    "nested list printed": "{% set ns = namespace(y=['x']) %}{% for i in range(80) %}{% set ns.y = [ns.y, ns.y] %}"
                           "{% endfor %}{{ ns.y }}",
    "nested list as JSON": "{% set ns = namespace(y=['x']) %}{% for i in range(80) %}{% set ns.y = [ns.y, ns.y] %}"
                           "{% endfor %}{{ ns.y | tojson }}",
    "center a constant": "{{ 'x' | center(1000000000) }}",
    "ljust": "{% set w = 1000000000 %}{{ 'x'.ljust(w) }}",
    "format width": "{{ '{:>999999999}'.format(1) }}",
    "% width": "{% set f = '%999999999d' %}{{ f % 1 }}",
    "join of copies": "{% set s = 'x' * 1000000 %}{{ ([s] * 100) | join }}",
    "replace": "{% set s = 'x' * 100000 %}{{ s | replace('x', 'y' * 1000) }}",
    "indent": "{{ ('a\n' * 1000) | indent(100000) }}",
    "batch fill": "{{ [1] | batch(100000000, 'x') | list | length }}",
    "power": "{{ 7 ** 100000 }}",
    "output": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_templates_stop_quickly(case):
    import time

    start = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=r"^t/chat_template\.jinja: chat template (stopped|recursed)") as info:
        ChatTemplate(HOSTILE[case], "t/chat_template.jinja").render([{"role": "user", "content": "hi"}])
    assert "\n" not in str(info.value)
    assert time.perf_counter() - start < 5


def test_time_bound_and_trace_restored(monkeypatch):
    """A render stops at its wall-clock bound too, and leaves the thread's trace function as it found it."""
    monkeypatch.setattr(chat_template, "MAX_SECONDS", 0.2)
    before = sys.gettrace()
    with pytest.raises(ChatTemplateError, match=r"stopped while rendering: took more than 0\.2 s"):
        ChatTemplate("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     "t").render([])
    assert sys.gettrace() is before
    assert ChatTemplate("{{ messages | length }}", "t").render([{}, {}]) == "2"
