"""An Ollama ``Modelfile`` for an exported GGUF: FROM, the chat template as a Go template, stop tokens.

Jinja chat templates cannot be translated in general, so the template is *observed*: it is
rendered with marker messages, and the text around each marker becomes the prefix and
suffix of that role. That covers the turn-by-turn templates (ChatML, Llama 3, Zephyr...);
a template whose output around a message depends on more than the role is refused.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from adapters.core.errors import StudioError

SYS, USER, USER2, ANSWER = "\x01SYSTEM\x01", "\x01USER\x01", "\x01USER2\x01", "\x01ANSWER\x01"


@dataclass
class Turns:
    system: tuple[str, str] | None   # (prefix, suffix) around a system message, None if unsupported
    user: tuple[str, str]            # around a user message; the suffix opens the assistant's turn
    answer_end: str                  # after an assistant message
    default_system: str | None       # the system text the template adds when none is given


def _render(tokenizer, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _between(text: str, before: str, after: str) -> str:
    start = text.index(before) + len(before)
    return text[start:text.index(after, start)]


def observe_turns(tokenizer) -> Turns:
    """Prefixes and suffixes of each role, read off renderings of marker conversations."""
    one = _render(tokenizer, [{"role": "user", "content": USER}], True)
    answered = _render(tokenizer, [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}], False)
    two = _render(tokenizer, [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER},
                              {"role": "user", "content": USER2}], True)
    opens_answer = one.split(USER, 1)[1]
    answer_end = answered.split(ANSWER, 1)[1]
    gap = _between(two, ANSWER, USER2)           # answer_end + the next user prefix
    if not gap.startswith(answer_end) or not two.endswith(opens_answer):
        raise StudioError("the chat template's text around a message depends on more than its role.", "model",
                          "write the Modelfile's TEMPLATE by hand (https://ollama.com/library shows examples).")
    user_prefix = gap[len(answer_end):]
    before_first = one.split(USER, 1)[0]
    # A BOS the template writes would be doubled by llama.cpp when the tokenizer also adds one.
    bos = tokenizer.bos_token or ""
    if not bos or tokenizer("a")["input_ids"][:1] != [tokenizer.bos_token_id]:
        bos = ""
    system, default_system = None, None
    try:
        with_sys = _render(tokenizer, [{"role": "system", "content": SYS}, {"role": "user", "content": USER}], True)
        sys_prefix = with_sys.split(SYS, 1)[0]
        sys_suffix = _between(with_sys, SYS, USER)
        if sys_suffix.endswith(user_prefix):
            system = (sys_prefix.removeprefix(bos), sys_suffix[: len(sys_suffix) - len(user_prefix)])
    except Exception:  # templates may raise on a system role they do not take
        system = None
    # A template that inserts its own system prompt (SmolLM2 does) shows it before the first user turn.
    if system is not None and before_first.removeprefix(bos) != user_prefix:
        head = before_first.removeprefix(bos)
        if head.startswith(system[0]) and head.endswith(system[1] + user_prefix):
            default_system = head[len(system[0]): len(head) - len(system[1] + user_prefix)]
    return Turns(system, (user_prefix, opens_answer), answer_end, default_system)


def _go(text: str) -> str:
    """Literal text inside a Go template (braces would open an action)."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(turns: Turns) -> str:
    user_pre, user_post = turns.user
    # No "{{-" after literal text: it would trim the newlines the template ends its turns with.
    parts = ["{{ range .Messages }}"]
    if turns.system:
        parts.append(f'{{{{ if eq .Role "system" }}}}{_go(turns.system[0])}{{{{ .Content }}}}{_go(turns.system[1])}')
        parts.append(f'{{{{ else if eq .Role "user" }}}}')
    else:
        parts.append('{{ if eq .Role "user" }}')
    parts.append(f"{_go(user_pre)}{{{{ .Content }}}}{_go(user_post)}")
    parts.append(f'{{{{ else if eq .Role "assistant" }}}}{{{{ .Content }}}}{_go(turns.answer_end)}')
    parts.append("{{ end }}{{ end }}")
    return "".join(parts)


def _quoted(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile_text(gguf_name: str, tokenizer) -> str:
    turns = observe_turns(tokenizer)
    stops = [t for t in dict.fromkeys([turns.answer_end.strip(), tokenizer.eos_token]) if t]
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(go_template(turns))}"]
    if turns.default_system:
        lines.append(f"SYSTEM {_quoted(turns.default_system)}")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(path: Path, gguf_name: str, tokenizer) -> Path | None:
    """Write the Modelfile atomically; None (nothing written) when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = modelfile_text(gguf_name, tokenizer)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
