"""The lanes table: parsed from TOML, validated, errors naming the file and line."""

from __future__ import annotations

from typing import Any

from routing.decide.flush import check_window
from routing.decide.tables import TableFile
from routing.errors import ConfigError
from routing.models import LaneSpec, parse_duration_s


def parse_lanes(text: str, source: str = "lanes.toml") -> tuple[LaneSpec, ...]:
    """Lanes from TOML of the form ``[lanes.NAME] deadline = "1h" priority = 10 ...``."""
    lanes: list[LaneSpec] = []
    for table in TableFile(text, source).tables("lanes", "lanes.NAME"):
        fields: dict[str, Any] = {**table.fields, "name": table.name}
        if "deadline" in fields:
            try:
                fields["deadline_s"] = parse_duration_s(fields.pop("deadline"))
            except (ValueError, TypeError) as exc:
                raise table.error(str(exc), "deadline") from None
        fields.setdefault("deadline_s", 3600.0)
        fields["submit_windows"] = tuple(fields.get("submit_windows", ()))
        for expr in fields["submit_windows"]:
            try:
                check_window(str(expr))
            except ConfigError as exc:
                raise table.error(str(exc), "submit_windows") from None
        lanes.append(table.build(LaneSpec, fields))
    return tuple(lanes)
