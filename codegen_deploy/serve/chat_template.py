"""How /v1/chat/completions writes a conversation as a prompt for a base code model (CodeGen is not
instruction-tuned: it continues code, it does not follow a dialogue).

A ChatTemplate writes each message with its role's template, then `answer`, where the model's answer begins;
its `stop` sequences end the answer (added to the request's own). In a role's template, `{content}` stands for
the message's text as it is and `{comment}` for the text with every line commented out (`comment` before each
line). The default writes instructions (system and user messages) as comments and earlier answers as code:

    # Write a function that reverses a string
    <the model writes the code here>

which is how a base code model is prompted (a comment, then the code it describes). A template of one's own is
a JSON file of these keys (any left out keep the default), given with `codegen-serve --chat-template FILE`:

    {"system": "{comment}\\n", "user": "{comment}\\n", "assistant": "{content}\\n", "comment": "# ",
     "answer": "", "stop": ["\\n\\n\\n"]}

An empty role template drops that role's messages.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import InputError
from .schemas import MAX_STOP, MAX_STOP_CHARS

# A template is a few lines: a bound keeps a wrong path (a model file) from being read whole.
MAX_TEMPLATE_BYTES = 64 * 1024

_PLACEHOLDER = re.compile(r"\{(content|comment)\}")


@dataclass(frozen=True)
class ChatTemplate:
    """The prompt a conversation becomes (see the module's docstring for the keys)."""

    system: str = "{comment}\n"
    user: str = "{comment}\n"
    assistant: str = "{content}\n"
    comment: str = "# "
    answer: str = ""
    stop: tuple[str, ...] = ("\n\n\n",)

    def render(self, messages: list[tuple[str, str]]) -> str:
        """The prompt of (role, text) messages; a "developer" message is a system message (OpenAI's newer name)."""
        pieces = []
        for role, text in messages:
            template = getattr(self, "system" if role == "developer" else role)
            pieces.append(_PLACEHOLDER.sub(lambda m, text=text: self._value(m.group(1), text), template))
        return "".join(pieces) + self.answer

    def _value(self, name: str, text: str) -> str:
        return text if name == "content" else commented(text, self.comment)


def commented(text: str, prefix: str) -> str:
    """Every line of `text` after `prefix` (an empty line gets the prefix without its trailing spaces); a final
    new line ends the last line, it starts no line of its own."""
    lines = text.split("\n")
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()
    return "\n".join(prefix + line if line else prefix.rstrip() for line in lines)


DEFAULT_CHAT_TEMPLATE = ChatTemplate()

_ROLES = ("system", "user", "assistant")


def load_chat_template(path: str | Path) -> ChatTemplate:
    """The ChatTemplate in JSON file `path`; InputError (one line: what is wrong, what to do) for a file that is
    missing, too large, not UTF-8 JSON, or whose keys or values a template cannot have."""
    where = f"--chat-template {path}"
    keys = ", ".join(f.name for f in fields(ChatTemplate))
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TEMPLATE_BYTES + 1)
    except OSError as e:
        raise InputError(f"cannot read {where}: {e.strerror}: give a JSON file of the keys {keys}") from e
    if len(data) > MAX_TEMPLATE_BYTES:
        raise InputError(f"{where} is larger than {MAX_TEMPLATE_BYTES // 1024} KB: a chat template is a few lines")
    try:
        given = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{where} is not UTF-8 text (byte {e.start}): save it as UTF-8") from e
    except json.JSONDecodeError as e:
        raise InputError(f"{where} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    if not isinstance(given, dict):
        raise InputError(f"{where} must be a JSON object of the keys {keys}")
    unknown = sorted(set(given) - {f.name for f in fields(ChatTemplate)})
    if unknown:
        raise InputError(f"{where} has an unknown key {unknown[0]!r}: the keys are {keys}")
    for name, value in given.items():
        if name != "stop" and not isinstance(value, str):
            raise InputError(f"{where}: {name} must be a string, got {json.dumps(value)[:40]}")
        if name in _ROLES and value and not _PLACEHOLDER.search(value):
            raise InputError(
                f"{where}: the {name} template has neither {{content}} nor {{comment}}, so it would drop the "
                f'message\'s text: add one (or make it "" to drop {name} messages on purpose)'
            )
    stop = given.get("stop", list(ChatTemplate.stop))
    if not isinstance(stop, list) or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise InputError(f"{where}: stop must be a list of non-empty strings of at most {MAX_STOP_CHARS} characters")
    if len(stop) > MAX_STOP:
        raise InputError(f"{where}: stop has {len(stop)} sequences, more than {MAX_STOP}")
    return ChatTemplate(**{**given, "stop": tuple(stop)})
