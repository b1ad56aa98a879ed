"""The one TOML table loader, and the one translation of a pydantic error into a message. Pure.

Every table file of the service (lanes, prices, provider accounts, local models) is a set of
``[TOP.NAME]`` tables validated by a pydantic model. ``TableFile`` parses the text once and
hands out each ``Table`` with the line that defines it, found whichever spelling TOML allows
(``[lanes.fast]``, ``[ lanes . "fast" ]``, ``lanes.fast.priority = 1``, ``fast = {...}`` under
``[lanes]``, or a sub-table ``[lanes.fast.x]``), so a mistake is reported as
``FILE, line N ([TOP.NAME]): field: message`` and can be found in an editor at once.

``explain`` turns a ``ValidationError`` into ``WHERE: message``, where the caller says what
"where" is for a field: a table's line here, a ``MIXBATCH_*`` variable for settings
(``settings_error``).
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from routing.errors import ConfigError

__all__ = [
    "Table",
    "TableFile",
    "explain",
    "first_error",
    "settings_error",
    "toml_label",
]

M = TypeVar("M", bound=BaseModel)

_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')"""
_KEY = rf"{_PART}(?:\s*\.\s*{_PART})*"
_HEADER = re.compile(rf"^\s*\[\[?\s*({_KEY})\s*\]")
_ASSIGN = re.compile(rf"^\s*({_KEY})\s*=\s*(\{{)?")
_BARE = re.compile(r"^[A-Za-z0-9_-]+$")
_SECRET = re.compile(r"AUTH|SECRET|PASSWORD|TOKEN|KEY|URL|DSN", re.IGNORECASE)
"""Variables whose value is never echoed in an error: credentials, and URLs that carry them."""


def _parts(key: str) -> tuple[str, ...] | None:
    """The parts of a dotted TOML key as written (quotes and escapes resolved by tomllib); None
    for text that only looks like a key (a line inside a multi-line string)."""
    try:
        node: Any = tomllib.loads(f"{key} = 0")
    except tomllib.TOMLDecodeError:
        return None
    parts: list[str] = []
    while isinstance(node, dict):
        ((name, node),) = node.items()
        parts.append(name)
    return tuple(parts)


def toml_label(path: tuple[str, ...]) -> str:
    """``[a.b."c/d"]``: a table's header as TOML spells it, quoting what is not a bare key."""
    return (
        "["
        + ".".join(p if _BARE.match(p) else json.dumps(p, ensure_ascii=False) for p in path)
        + "]"
    )


@dataclass(frozen=True, slots=True)
class _Line:
    """A line that opens a table (``header``) or sets a key; ``section`` is the open table and
    ``inline`` says the key's value is an inline table, which may hold the one looked for."""

    number: int
    section: tuple[str, ...]
    key: tuple[str, ...]
    header: bool
    inline: bool = False


def _index(text: str) -> list[_Line]:
    lines: list[_Line] = []
    section: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        found = header or _ASSIGN.match(line)
        parts = _parts(found.group(1)) if found else None
        if found is None or parts is None:
            continue
        if header:
            section = parts
            lines.append(_Line(number, (), parts, True))
        else:
            inline = found.group(2) is not None
            lines.append(_Line(number, section, section + parts, False, inline))
    return lines


class TableFile:
    """One parsed TOML file and where each of its tables and keys is written."""

    def __init__(self, text: str, source: str) -> None:
        try:
            self.doc: dict[str, Any] = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        self.source = source
        self._lines = _index(text)

    def line(self, *path: str) -> int | None:
        """The line defining the table or key at ``path``: its header, else a key that writes
        it (dotted, or an inline table holding it), else the header of its first sub-table."""
        n = len(path)
        for found in self._lines:
            if found.header and found.key == path:
                return found.number
        for found in self._lines:
            if found.header or len(found.section) >= n:
                continue
            if found.key[:n] == path or (found.inline and path[: len(found.key)] == found.key):
                return found.number
        for found in self._lines:
            if found.header and found.key[:n] == path:
                return found.number
        return None

    def tables(self, top: str, shape: str, *, key_lines: bool = False) -> list[Table]:
        """Each ``[top.NAME]`` table, in file order; ``shape`` spells one for the message when
        there are none. ``key_lines``: a bad key is reported at its own line, not the table's."""
        found = self.doc.get(top)
        if not isinstance(found, dict) or not found:
            raise ConfigError(f"{self.source}: needs at least one [{shape}] table")
        return [Table.of(self, (top, name), raw, key_lines) for name, raw in found.items()]


@dataclass(frozen=True, slots=True)
class Table:
    """One table of a ``TableFile``: its path, its raw fields, and how to say where it is."""

    file: TableFile
    path: tuple[str, ...]
    fields: dict[str, Any]
    key_lines: bool = False

    @classmethod
    def of(cls, file: TableFile, path: tuple[str, ...], raw: object, key_lines: bool) -> Table:
        """The table at ``path``, refusing a value that is not a table."""
        table = cls(file, path, raw if isinstance(raw, dict) else {}, key_lines)
        if not isinstance(raw, dict):
            raise table.error("must be a table")
        return table

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def where(self) -> str:
        """``FILE, line N ([a.b])``, ``line ?`` where no line defines it."""
        line = self.file.line(*self.path)
        return f"{self.file.source}, line {line or '?'} ({toml_label(self.path)})"

    def at(self, key: str) -> str:
        """Where ``key`` (a field path, ``windows.0``) of this table is: ``WHERE: key``, or with
        ``key_lines`` the line that writes it (``timeout_s`` is found as ``timeout`` too)."""
        if not key:
            return self.where
        if self.key_lines:
            head = key.partition(".")[0]
            line = self.file.line(*self.path, head) or self.file.line(
                *self.path, head.removesuffix("_s")
            )
            if line is not None:
                return f"{self.file.source}, line {line} ({toml_label(self.path)} {key})"
        return f"{self.where}: {key}"

    def error(self, message: str, key: str = "") -> ConfigError:
        return ConfigError(f"{self.at(key)}: {message}")

    def only(self, allowed: Collection[str]) -> None:
        """Refuse a key outside ``allowed`` (for tables not checked by a pydantic model)."""
        unknown = sorted(set(self.fields) - set(allowed))
        if unknown:
            listed = ", ".join(sorted(allowed))
            raise self.error(f"unknown key {unknown[0]!r} ({listed})")

    def tables(self, key: str) -> list[Table]:
        """The sub-tables under ``key`` (``[providers.NAME.models.MODEL]``); none if absent."""
        raw = self.fields.get(key, {})
        if not isinstance(raw, dict):
            label = toml_label((*self.path, key))
            raise self.error(f"{key} must be a table of {label[:-1]}.NAME]")
        return [
            Table.of(self.file, (*self.path, key, name), sub, self.key_lines)
            for name, sub in raw.items()
        ]

    def build(self, model: type[M], fields: Mapping[str, Any]) -> M:
        """``model`` validated from ``fields``; its first error said at this table's line."""
        try:
            return model.model_validate(fields)
        except ValidationError as exc:
            raise ConfigError(explain(exc, self.at)) from None


def first_error(exc: ValidationError) -> tuple[str, str]:
    """The first error's dotted field path (empty: the whole object) and its message, without
    pydantic's ``Value error,`` prefix (our validators' messages are already sentences)."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    return field, str(first["msg"]).removeprefix("Value error, ")


def explain(exc: ValidationError, locate: Callable[[str], str]) -> str:
    """``WHERE: message`` for the first error, ``locate`` turning its field into the WHERE."""
    field, message = first_error(exc)
    return f"{locate(field)}: {message}"


def settings_error(exc: ValidationError, prefix: str = "MIXBATCH_") -> ConfigError:
    """A settings error naming its environment variable (``MIXBATCH_LEASE_S: ...``), with the
    value it got unless the variable may hold a credential."""
    first = exc.errors()[0]
    field, _ = first_error(exc)
    variable, _, rest = field.partition(".")
    name = f"{prefix}{variable.upper()}" if variable else "settings"

    def locate(_: str) -> str:
        return f"{name} ({rest})" if rest else name

    shown = "" if _SECRET.search(name) or "input" not in first else f" (got {first['input']!r})"
    return ConfigError(explain(exc, locate) + shown)
