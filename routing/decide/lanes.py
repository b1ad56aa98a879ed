"""The lanes table: parsed from TOML, validated, errors naming the file and line."""

from __future__ import annotations

import re
import tomllib
from typing import Any

from pydantic import ValidationError

from routing.decide.planner import check_window
from routing.errors import ConfigError
from routing.models import LaneSpec, parse_duration_s


def _line_of(text: str, lane: str) -> int | None:
    """The line defining ``lane``, whichever TOML spelling the file uses."""
    name = re.escape(lane)
    header = re.compile(rf"^\s*\[\s*lanes\s*\.\s*([\"']?){name}\1\s*[\].]")
    dotted = re.compile(rf"^\s*lanes\s*\.\s*([\"']?){name}\1\s*[.=]")
    inline = re.compile(rf"^\s*([\"']?){name}\1\s*[.=]")
    in_lanes = False
    for number, line in enumerate(text.splitlines(), start=1):
        if header.match(line) or dotted.match(line):
            return number
        if re.match(r"^\s*\[", line):
            in_lanes = bool(re.match(r"^\s*\[\s*lanes\s*\]", line))
        elif in_lanes and inline.match(line):
            return number
    return None


def parse_lanes(text: str, source: str = "lanes.toml") -> tuple[LaneSpec, ...]:
    """Lanes from TOML of the form ``[lanes.NAME] deadline = "1h" priority = 10 ...``."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    table = doc.get("lanes")
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"{source}: needs at least one [lanes.NAME] table")
    lanes: list[LaneSpec] = []
    for name, raw in table.items():
        where = f"{source}, line {_line_of(text, name) or '?'} ([lanes.{name}])"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: must be a table")
        fields: dict[str, Any] = dict(raw)
        if "deadline" in fields:
            try:
                fields["deadline_s"] = parse_duration_s(fields.pop("deadline"))
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{where}: deadline: {exc}") from None
        fields.setdefault("deadline_s", 3600.0)
        fields["submit_windows"] = tuple(fields.get("submit_windows", ()))
        for expr in fields["submit_windows"]:
            try:
                check_window(str(expr))
            except ConfigError as exc:
                raise ConfigError(f"{where}: submit_windows: {exc}") from None
        try:
            lanes.append(LaneSpec(name=name, **fields))
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"{where}: {field}: {first['msg']}") from None
    return tuple(lanes)
