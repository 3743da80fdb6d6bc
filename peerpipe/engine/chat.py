"""Chat templates: render a conversation to a prompt string the way Hugging Face does.

Model folders carry a Jinja template in ``chat_template.jinja`` or in
``tokenizer_config.json["chat_template"]`` (a string, or a list of named templates). We render
it in the same sandbox, with the same options, filters and globals as ``transformers``, so that a
prompt built here is byte-for-byte the prompt the model was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from peerpipe.engine.errors import TokenizerError

Message = Mapping[str, Any]

TEMPLATE_FILE = "chat_template.jinja"


class _GenerationBlock(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` and render its body unchanged.

    Some templates mark the assistant's part this way for training masks; without the tag
    registered they would not even parse.
    """

    tags = {"generation"}  # noqa: RUF012 - jinja2 reads this class attribute

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"the chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationBlock]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _plain_render(messages: Sequence[Message], add_generation_prompt: bool) -> str:
    # For models without a template (base models): readable, and it ends where the model speaks.
    lines = [f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages]
    if add_generation_prompt:
        lines.append("assistant:")
    return "\n".join(lines)


class ChatTemplate:
    """A compiled chat template (or the plain fallback when ``source`` is None)."""

    def __init__(
        self,
        source: str | None,
        special_tokens: Mapping[str, str | None] | None = None,
        *,
        origin: str = "<string>",
    ) -> None:
        self.source = source
        self.origin = origin
        self._special = dict(special_tokens or {})
        self._render: Callable[..., str] | None = None
        if source is not None:
            try:
                self._render = _environment().from_string(source).render
            except jinja2.TemplateSyntaxError as e:
                raise TokenizerError(
                    f"chat template in {origin} does not parse (line {e.lineno}): {e.message}"
                ) from e

    @property
    def is_fallback(self) -> bool:
        return self.source is None

    @classmethod
    def from_dir(
        cls,
        path: Path,
        tokenizer_config: Mapping[str, Any],
        special_tokens: Mapping[str, str | None] | None = None,
    ) -> ChatTemplate:
        """Find the template the way transformers does: chat_template.jinja wins over the config."""
        file = Path(path) / TEMPLATE_FILE
        if file.is_file():
            try:
                return cls(file.read_text(encoding="utf-8"), special_tokens, origin=str(file))
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"cannot read chat template {file}: {e}") from e
        origin = str(Path(path) / "tokenizer_config.json")
        raw = tokenizer_config.get("chat_template")
        if raw is None:
            return cls(None, special_tokens, origin="<plain fallback>")
        if isinstance(raw, str):
            return cls(raw, special_tokens, origin=origin)
        if isinstance(raw, list):
            named = {t.get("name"): t.get("template") for t in raw if isinstance(t, Mapping)}
            if isinstance(named.get("default"), str):
                return cls(named["default"], special_tokens, origin=f"{origin} (template 'default')")
            raise TokenizerError(
                f"{origin} lists chat templates {sorted(map(str, named))} but none named 'default'"
            )
        raise TokenizerError(f"{origin}: chat_template must be a string or a list, not {type(raw).__name__}")

    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """Render ``messages`` (dicts with ``role`` and ``content``) to the prompt text."""
        if self._render is None:
            return _plain_render(messages, add_generation_prompt)
        variables: dict[str, Any] = {"tools": None, "documents": None, **self._special, **extra}
        try:
            return self._render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **variables
            )
        except TokenizerError:
            raise
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template in {self.origin} failed to render: {e}") from e
        except (TypeError, KeyError, ValueError, AttributeError) as e:
            raise TokenizerError(
                f"chat template in {self.origin} failed to render these messages: {type(e).__name__}: {e}"
            ) from e
