"""``parse_lanes``: the lanes table from TOML, every error naming the file, the lane and its line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from routing.decide.lanes import parse_lanes
from routing.errors import ConfigError
from routing.models import LaneSpec, ServiceConfig

ROOT = Path(__file__).resolve().parent.parent


def toml(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def refused(text: str, source: str = "lanes.toml") -> str:
    with pytest.raises(ConfigError) as info:
        parse_lanes(toml(text), source=source)
    return str(info.value)


def test_the_shipped_lanes_file() -> None:
    lanes = parse_lanes((ROOT / "config" / "lanes.toml").read_text())
    assert [(s.name, s.deadline_s, s.priority) for s in lanes] == [
        ("urgent", 60.0, 100),
        ("standard", 3600.0, 50),
        ("bulk", 86400.0, 10),
    ]
    assert all(s.on_deadline == "run" and s.max_queued > 0 for s in lanes)
    config = ServiceConfig(lanes=lanes)
    assert [s.name for s in config.by_priority()] == ["urgent", "standard", "bulk"]


def test_a_good_file_with_every_field_and_defaults() -> None:
    lanes = parse_lanes(
        toml(
            """
            # comment
            [lanes.fast]
            deadline = "90s"
            priority = 7
            max_queued = 0
            on_deadline = "expire"
            submit_windows = ["0 22 * * *"]

            [lanes."night-bulk"]
            deadline = 3600

            [lanes.plain]
            """
        )
    )
    assert lanes == (
        LaneSpec(
            name="fast",
            deadline_s=90,
            priority=7,
            max_queued=0,
            on_deadline="expire",
            submit_windows=("0 22 * * *",),
        ),
        LaneSpec(name="night-bulk", deadline_s=3600),
        LaneSpec(name="plain", deadline_s=3600),
    )


@pytest.mark.parametrize(
    "text,line",
    [
        ("[lanes.fast]\ndeadline = \n", 2),
        ("[lanes.fast]\npriority = 1\n\n[lanes.fast\n", 4),
        ("[lanes.a]\n[lanes.b]\npriority = 1\npriority = 2\n", 4),
        ('[lanes.a]\ndeadline = "1h\n', 2),
    ],
)
def test_bad_toml_names_the_line(text: str, line: int) -> None:
    message = refused(text, source="/etc/mixbatch/lanes.toml")
    assert message.startswith("/etc/mixbatch/lanes.toml: not valid TOML")
    assert f"line {line}" in message


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# only a comment\n",
        "[lane.fast]\ndeadline = '1h'\n",
        "lanes = 5\n",
        "lanes = []\n",
        "[lanes]\n",
    ],
)
def test_missing_lanes_table(text: str) -> None:
    assert refused(text) == "lanes.toml: needs at least one [lanes.NAME] table"


@pytest.mark.parametrize(
    "text,lane,line,field",
    [
        ('[lanes.fast]\npriority = "high"\n', "fast", 1, "priority"),
        ("[lanes.fast]\nmax_queued = -1\n", "fast", 1, "max_queued"),
        ('[lanes.fast]\non_deadline = "drop"\n', "fast", 1, "on_deadline"),
        ("[lanes.fast]\ncolour = 'red'\n", "fast", 1, "colour"),
        (
            '[lanes.a]\ndeadline = "1m"\n\n[lanes.b]\npriority = 1\n\n[lanes.c]\npriority = []\n',
            "c",
            7,
            "priority",
        ),
        ('# lanes\n\n  [ lanes.slow ]\npriority = "x"\n', "slow", 3, "priority"),
        ('[lanes."quoted"]\npriority = "x"\n', "quoted", 1, "priority"),
        ("[lanes.Fast]\npriority = 1\n", "Fast", 1, "name"),
    ],
)
def test_bad_field_names_the_lane_and_its_line(text: str, lane: str, line: int, field: str) -> None:
    message = refused(text)
    assert message.startswith(f"lanes.toml, line {line} ([lanes.{lane}]): {field}"), message


@pytest.mark.parametrize(
    "text,lane,line,field",
    [
        # Other spellings TOML allows for the same table: the line must still be found.
        ("[lanes.'fast']\npriority = \"x\"\n", "fast", 1, "priority"),
        ('[ lanes . fast ]\npriority = "x"\n', "fast", 1, "priority"),
        ('[lanes]\nok = {}\nfast = { priority = "x" }\n', "fast", 3, "priority"),
        ('lanes.fast.priority = "x"\n', "fast", 1, "priority"),
        # A dotted lane name is a sub-table: say where it is.
        ("[lanes.eu.west]\npriority = 1\n", "eu", 1, "west"),
    ],
)
def test_line_is_found_for_every_toml_spelling(text: str, lane: str, line: int, field: str) -> None:
    message = refused(text)
    assert message.startswith(f"lanes.toml, line {line} ([lanes.{lane}]): {field}"), message


def test_a_lane_that_is_not_a_table() -> None:
    message = refused("[lanes]\nfast = 5\n")
    assert "[lanes.fast]" in message
    assert message.endswith("must be a table")


@pytest.mark.parametrize(
    "value,detail",
    [
        ('"soon"', "'soon' is not a duration"),
        ('"5 minutes"', "is not a duration"),
        ('"-5m"', "is not a duration"),
        ("[1]", "deadline"),
        ("true", "deadline"),
    ],
)
def test_bad_duration_names_the_lane_and_line(value: str, detail: str) -> None:
    message = refused(f"[lanes.ok]\n\n[lanes.slow]\ndeadline = {value}\n")
    assert message.startswith("lanes.toml, line 3 ([lanes.slow]): deadline"), message
    assert detail in message


@pytest.mark.parametrize("value", ['"0s"', "0", "-1"])
def test_a_deadline_must_be_positive(value: str) -> None:
    message = refused(f"[lanes.slow]\ndeadline = {value}\n")
    assert message.startswith("lanes.toml, line 1 ([lanes.slow]): deadline_s"), message
    assert "greater than 0" in message
