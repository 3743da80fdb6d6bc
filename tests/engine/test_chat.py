"""Chat templates render byte-for-byte like transformers' apply_chat_template."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from peerpipe.devtools.tiny_model import ARCHITECTURES, BOS_ID, IM_START_ID, write_tiny_model
from peerpipe.engine.chat import ChatTemplate
from peerpipe.engine.errors import TokenizerError
from peerpipe.engine.tokenizer import Tokenizer

MakeTiny = Callable[..., Path]

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are a tiny model."},
        {"role": "user", "content": "  What is 2+2?  "},
        {"role": "assistant", "content": "Four. 😀"},
        {"role": "user", "content": "Grüße aus Zürich\nand a second line"},
    ],
]

# Our own template that touches every feature transformers' renderer offers.
RICH_TEMPLATE = """\
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system = 'You are tiny.' %}
    {%- set loop_messages = messages %}
{%- endif %}
{{ bos_token }}[SYS] {{ system }} ({{ strftime_now('%Y') }})
{% if tools %}
[TOOLS] {{ tools | tojson(indent=2) }}
{% endif %}
{% for m in loop_messages %}
    {% if m['role'] not in ['user', 'assistant'] %}
        {{ raise_exception('roles must alternate user/assistant, got ' + m['role']) }}
    {% endif %}
    {% if loop.index0 >= 6 %}{% break %}{% endif %}
    {% if m['role'] == 'user' %}
[U] {{ m['content'] | trim }}
    {% else %}
[A] {% generation %}{{ m['content'] }}{% endgeneration %}{{ eos_token }}
    {% endif %}
{% endfor %}
{{ {"z": "é<&>'", "a": [1, 2]} | tojson(sort_keys=True) }}
{% if add_generation_prompt %}[A] {% endif %}"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city, e.g. Zürich",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def _hf_render(path: Path, messages: list[dict[str, Any]], gen: bool, **kw: Any) -> str:
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kw)


def _hf_ids(path: Path, messages: list[dict[str, Any]]) -> list[int]:
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("in_file", [False, True], ids=["tokenizer_config", "chat_template.jinja"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_default_template_matches_transformers(tiny_model_dir: MakeTiny, arch: str, in_file: bool) -> None:
    d = tiny_model_dir(arch, chat_template_file=in_file)
    tok = Tokenizer.from_dir(d)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == _hf_render(
                d, messages, gen
            )
    ids = tok.apply_chat_template_ids(CONVERSATIONS[1])
    assert ids == _hf_ids(d, CONVERSATIONS[1])
    assert ids.count(BOS_ID) == (0 if arch.startswith("qwen") else 1)
    assert ids[-3:] == tok.encode("<|im_start|>assistant\n", add_special_tokens=False)[-3:]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_rich_template_matches_transformers(tmp_path: Path, arch: str) -> None:
    d = write_tiny_model(tmp_path / "m", arch, chat_template=RICH_TEMPLATE)
    tok = Tokenizer.from_dir(d)
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(9)]
    for messages in [*CONVERSATIONS, many]:
        for gen in (True, False):
            ours = tok.apply_chat_template(messages, add_generation_prompt=gen, tools=TOOLS)
            assert ours == _hf_render(d, messages, gen, tools=TOOLS)
            assert tok.apply_chat_template(messages, gen) == _hf_render(d, messages, gen)
    assert "turn 6" not in tok.apply_chat_template(many)  # {% break %} worked
    assert '"z": "é<&>\'"' in tok.apply_chat_template(many)  # tojson without HTML escaping


def test_raise_exception_becomes_tokenizer_error(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(write_tiny_model(tmp_path / "m", chat_template=RICH_TEMPLATE))
    bad = [{"role": "system", "content": "s"}, {"role": "tool", "content": "x"}]
    with pytest.raises(TokenizerError, match="got tool"):
        tok.apply_chat_template(bad)


def test_list_of_named_templates(tiny_model_dir: MakeTiny, tmp_path: Path) -> None:
    d = shutil.copytree(tiny_model_dir("qwen2"), tmp_path / "m")
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = [
        {"name": "tool_use", "template": "TOOLS {{ messages | length }}"},
        {"name": "default", "template": "DEFAULT {{ messages[0]['content'] }}"},
    ]
    cfg_path.write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(d)
    assert tok.apply_chat_template(CONVERSATIONS[0]) == "DEFAULT Hello!"
    assert tok.apply_chat_template(CONVERSATIONS[0]) == _hf_render(d, CONVERSATIONS[0], True)
    cfg["chat_template"] = cfg["chat_template"][:1]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="none named 'default'"):
        Tokenizer.from_dir(d)


def test_jinja_file_wins_over_config(tiny_model_dir: MakeTiny, tmp_path: Path) -> None:
    d = shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    (d / "chat_template.jinja").write_text("FILE{% for m in messages %} {{ m.content }}{% endfor %}")
    assert Tokenizer.from_dir(d).apply_chat_template(CONVERSATIONS[0]) == "FILE Hello!"
    assert _hf_render(d, CONVERSATIONS[0], True) == "FILE Hello!"


def test_plain_fallback_without_template(tiny_model_dir: MakeTiny) -> None:
    tok = Tokenizer.from_dir(tiny_model_dir("llama", chat_template=None))
    assert tok.chat_template.is_fallback
    text = tok.apply_chat_template(CONVERSATIONS[1])
    assert text.splitlines()[0] == "system: You are a tiny model."
    assert text.endswith("\nassistant:")
    assert not tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=False).endswith("assistant:")
    ids = tok.apply_chat_template_ids(CONVERSATIONS[0])
    assert ids[0] == BOS_ID and IM_START_ID not in ids  # a plain prompt gets the tokenizer's BOS


@pytest.mark.parametrize(
    ("source", "messages", "match"),
    [
        ("{% for m in messages %}", CONVERSATIONS[0], "does not parse"),
        ("{{ messages[0]['content'].nope() }}", CONVERSATIONS[0], "failed to render"),
        ("{{ messages[5]['content'] + 1 }}", CONVERSATIONS[0], "failed to render"),
        ("{{ messages.append(1) }}", CONVERSATIONS[0], "failed to render"),  # sandbox: immutable
    ],
)
def test_template_errors(source: str, messages: list[dict[str, Any]], match: str) -> None:
    with pytest.raises(TokenizerError, match=match):
        ChatTemplate(source, {"bos_token": "<s>"}).render(messages)


def test_special_tokens_are_variables() -> None:
    t = ChatTemplate("{{ bos_token }}|{{ eos_token }}|{{ pad_token }}", {"bos_token": "B", "eos_token": "E"})
    assert t.render([], add_generation_prompt=False) == "B|E|"
