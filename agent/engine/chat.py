"""Chat jobs: a list of messages rendered into one prompt with a chat template.

Owns choosing the template (``engine.chat_template`` when set, else the model's own,
``tokenizer.chat_template`` in the GGUF metadata) and rendering it with llama-cpp-python's Jinja2
chat formatter, which follows the Hugging Face conventions (``messages``, ``bos_token``,
``eos_token``, ``add_generation_prompt``, ``raise_exception``) in a sandboxed environment.
Generation then ends at the model's end-of-generation tokens (``<end_of_turn>``,
``<|im_end|>``, ``<|eot_id|>`` ...), which llama.cpp marks as such and the engine stops on.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from agent.codes import ErrorCode
from agent.engine.types import ChatMessage
from agent.errors import EngineError, NoChatTemplate


class ChatTemplate:
    """A compiled template with the model's BOS and EOS texts."""

    def __init__(self, template: str, *, bos_token: str, eos_token: str, source: str) -> None:
        self.source = source  # "engine.chat_template" or "the model's tokenizer.chat_template"
        try:
            self._formatter = Jinja2ChatFormatter(template, eos_token=eos_token, bos_token=bos_token)
        except Exception as e:  # noqa: BLE001  jinja2.TemplateSyntaxError and friends
            raise NoChatTemplate(f"{source} is not a usable Jinja2 template: {e}") from None

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt for ``messages``, ending with the template's cue for the assistant's turn.
        A template that refuses the messages (``raise_exception``, e.g. roles that do not
        alternate) is an ``invalid_request`` with the template's own words."""
        try:
            out = self._formatter(messages=[_message(m) for m in messages])
        except Exception as e:  # noqa: BLE001  ValueError from raise_exception, jinja2 errors, TypeError
            raise EngineError(
                f"the chat template ({self.source}) refused the messages: {e}", code=ErrorCode.invalid_request
            ) from None
        return str(out.prompt)


@functools.lru_cache(maxsize=4)
def compile_template(template: str, bos_token: str, eos_token: str, source: str) -> ChatTemplate:
    """Compiling costs milliseconds; a daemon uses one or two templates for its whole life."""
    return ChatTemplate(template, bos_token=bos_token, eos_token=eos_token, source=source)


def template_for(llama: Any, override: str | None) -> ChatTemplate:
    """The template for chat jobs on this loaded model. Raises NoChatTemplate when there is none."""
    if override:
        template, source = override, "engine.chat_template"
    else:
        template = str((getattr(llama, "metadata", None) or {}).get("tokenizer.chat_template") or "")
        source = "the model's tokenizer.chat_template"
        if not template:
            raise NoChatTemplate(
                "this model has no chat template (no tokenizer.chat_template in its GGUF file, as with base models) "
                "and engine.chat_template is not set: send kind 'generate' with a prompt, or configure a template"
            )
    return compile_template(
        template, _token_text(llama, llama.token_bos()), _token_text(llama, llama.token_eos()), source
    )


def _token_text(llama: Any, token: int) -> str:
    if token < 0:
        return ""
    return str(llama._model.token_get_text(token))


def _message(m: ChatMessage) -> Any:  # llama-cpp-python's TypedDict for the role; the JSON is the same
    return {"role": m.role, "content": m.content}
