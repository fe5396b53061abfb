"""Variable interpolation with Docker Compose's semantics, and `.env` files.

Supported: `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`,
`${VAR:+replacement}`, `${VAR+replacement}`, and `$$` for a literal dollar. Defaults and replacements
may themselves contain interpolations. An unset variable without a default becomes the empty string and
a warning, as in Compose.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from stackd.spec.problems import Invalid

__all__ = ["interpolate", "parse_dotenv"]

_NAME = re.compile(r"[_a-zA-Z][_a-zA-Z0-9]*")
_OPERATORS = (":-", ":?", ":+", "-", "?", "+")


def interpolate(text: str, env: Mapping[str, str], warn: Callable[[str], None] | None = None) -> str:
    """Substitute variables in `text` from `env`; raise Invalid for a malformed template or a `?` error."""
    out, _ = _expand(text, 0, env, warn, nested=False)
    return out


def _expand(
    text: str, pos: int, env: Mapping[str, str], warn: Callable[[str], None] | None, *, nested: bool
) -> tuple[str, int]:
    """Expand from `pos`; when `nested`, stop at the `}` closing the enclosing `${`."""
    out: list[str] = []
    while pos < len(text):
        char = text[pos]
        if nested and char == "}":
            return "".join(out), pos
        if char != "$":
            out.append(char)
            pos += 1
            continue
        nxt = text[pos + 1 : pos + 2]
        if nxt == "$":
            out.append("$")
            pos += 2
        elif nxt == "{":
            value, pos = _braced(text, pos + 2, env, warn)
            out.append(value)
        else:
            match = _NAME.match(text, pos + 1)
            if not match:
                raise Invalid(
                    f'invalid interpolation at "{text[pos : pos + 10]}" (write $$ for a literal "$", '
                    "${NAME} or $NAME for a variable)"
                )
            out.append(_lookup(match.group(), env, warn))
            pos = match.end()
    if nested:
        raise Invalid(f'unclosed "${{" in "{text}"')
    return "".join(out), pos


def _braced(text: str, pos: int, env: Mapping[str, str], warn: Callable[[str], None] | None) -> tuple[str, int]:
    match = _NAME.match(text, pos)
    if not match:
        raise Invalid(f'invalid interpolation in "{text}": "${{" must be followed by a variable name')
    name, pos = match.group(), match.end()
    if text[pos : pos + 1] == "}":
        return _lookup(name, env, warn), pos + 1
    operator = next((op for op in _OPERATORS if text.startswith(op, pos)), None)
    if operator is None:
        raise Invalid(
            f'invalid interpolation in "{text}" after ${{{name}: use one of '
            "${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME:+value}"
        )
    # The argument is expanded lazily in shells, but Compose expands it eagerly; only its value matters.
    argument, pos = _expand(text, pos + len(operator), env, warn, nested=True)
    pos += 1  # the closing brace
    value = env.get(name)
    is_set, is_nonempty = value is not None, bool(value)
    if operator == ":-":
        return (value if is_nonempty else argument) or "", pos
    if operator == "-":
        return (value if is_set else argument) or "", pos
    if operator in (":?", "?"):
        if (operator == ":?" and not is_nonempty) or (operator == "?" and not is_set):
            raise Invalid(f"required variable {name} is missing a value: {argument or 'not set'}")
        return value or "", pos
    if operator == ":+":
        return argument if is_nonempty else "", pos
    return argument if is_set else "", pos  # "+"


def _lookup(name: str, env: Mapping[str, str], warn: Callable[[str], None] | None) -> str:
    value = env.get(name)
    if value is None:
        if warn is not None:
            warn(f'the "{name}" variable is not set; defaulting to a blank string')
        return ""
    return value


_DOTENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.-]*)\s*(?:=\s*(.*?))?\s*$")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$$"}


def parse_dotenv(text: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Parse a `.env` / `env_file`: `KEY=VALUE` lines, `export`, comments, quotes.

    Single-quoted values are literal; double-quoted and bare values are interpolated from `env` and the
    keys defined above them, `env` first (as in Compose: the process environment wins). A bare `KEY`
    (no `=`) takes the value from `env` if it is set. Raises Invalid with a 1-based line number in `subpath`.
    """
    known: dict[str, str] = dict(env or {})
    result: dict[str, str] = {}
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _DOTENV_LINE.match(line)
        if not match:
            raise Invalid(f'line {index}: expected KEY=VALUE, got "{stripped[:40]}"', (index,))
        key, raw = match.group(1), match.group(2)
        if raw is None:
            if key in known:
                result[key] = known[key]
            continue
        start_line = index
        if raw[:1] in ("'", '"') and not _closed(raw):
            # A quoted value may span lines.
            while index < len(lines) and not _closed(raw):
                raw += "\n" + lines[index]
                index += 1
            if not _closed(raw):
                raise Invalid(f"line {start_line}: unterminated quoted value for {key}", (start_line,))
        try:
            value = _dotenv_value(raw, known)
        except Invalid as error:
            raise Invalid(f"line {start_line}: {error.message}", (start_line,)) from None
        result[key] = value
        if env is None or key not in env:
            known[key] = value
    return result


def _closed(raw: str) -> bool:
    quote = raw[0]
    body = raw[1:]
    pos = 0
    while pos < len(body):
        if body[pos] == "\\" and quote == '"':
            pos += 2
            continue
        if body[pos] == quote:
            return True
        pos += 1
    return False


def _dotenv_value(raw: str, env: Mapping[str, str]) -> str:
    if raw.startswith("'"):
        end = raw.index("'", 1)
        return raw[1:end]
    if raw.startswith('"'):
        chars: list[str] = []
        pos = 1
        while raw[pos] != '"':
            if raw[pos] == "\\" and pos + 1 < len(raw):
                chars.append(_ESCAPES.get(raw[pos + 1], "\\" + raw[pos + 1]))
                pos += 2
            else:
                chars.append(raw[pos])
                pos += 1
        return interpolate("".join(chars), env)
    comment = re.search(r"\s#", raw)
    if comment:
        raw = raw[: comment.start()]
    return interpolate(raw.strip(), env)
