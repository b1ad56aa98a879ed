"""When a waiting batch group goes to the provider: the flush policy and submit windows.

Pure: sizes, deadlines and ``now`` come in as arguments and a decision with its reason comes
out, so the flusher's choices can be table-tested and simulated without Redis or a clock.
``should_flush`` weighs the deadline slack against the fill; ``window_due`` is a small 5-field
cron matcher for the lanes' submit windows (``check_window`` validates one when the lanes file
is loaded).
"""

from __future__ import annotations

import calendar
import functools
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Final

from routing.errors import ConfigError

__all__ = ["FLUSH_REASONS", "batch_pays", "check_window", "should_flush", "window_due"]

FLUSH_REASONS: Final = ("deadline", "size", "lines", "window", "max_wait", "waiting", "empty")
"""The first word of every ``should_flush`` reason, for metrics and tests."""


def should_flush(
    group_size_bytes: int,
    group_lines: int,
    tightest_deadline: float | None,
    now: float,
    *,
    target_bytes: int,
    turnaround_s: float,
    margin_s: float,
    max_wait_s: float,
    windows_due: bool,
    oldest_enqueued_at: float | None = None,
    wait_step_s: float = 0.0,
    max_lines: int | None = None,
) -> tuple[bool, str]:
    """Whether a waiting group should be submitted now, and why, as ``"<reason>: <detail>"``.

    Waiting fills batches (fewer, larger files) but spends deadline slack. The group goes when
    waiting one more step (``wait_step_s``, the aggregator's period) plus the provider's expected
    turnaround and a safety margin would pass its tightest deadline; when it reached its target
    size or line cap; when a submit window is due; or when its oldest request waited
    ``max_wait_s``. The deadline is checked first, since it is the reason that must not be lost.
    """
    if group_lines <= 0:
        return False, "empty: nothing waiting"
    if tightest_deadline is not None:
        finish = now + wait_step_s + turnaround_s + margin_s
        if finish > tightest_deadline:
            return True, (
                f"deadline: waiting {wait_step_s:g}s more, turnaround {turnaround_s:g}s and "
                f"margin {margin_s:g}s would end {finish - tightest_deadline:.0f}s past the "
                "tightest deadline"
            )
    if group_size_bytes >= target_bytes:
        return True, f"size: {group_size_bytes} bytes reached the {target_bytes}-byte target"
    if max_lines is not None and group_lines >= max_lines:
        return True, f"lines: {group_lines} lines reached the cap of {max_lines}"
    if windows_due:
        return True, "window: a submit window is due"
    if oldest_enqueued_at is not None and now - oldest_enqueued_at >= max_wait_s:
        return True, (
            f"max_wait: the oldest request waited {now - oldest_enqueued_at:.0f}s "
            f"(max_wait {max_wait_s:g}s)"
        )
    slack = "" if tightest_deadline is None else f", {tightest_deadline - now:.0f}s to deadline"
    return False, f"waiting: {group_lines} lines, {group_size_bytes} of {target_bytes} bytes{slack}"


def batch_pays(
    lines: int,
    *,
    min_lines: int = 1,
    saving_usd_per_line: float | None = None,
    overhead_usd: float = 0.0,
) -> tuple[bool, str]:
    """Whether a batch of ``lines`` is worth making, and why not (size-aware batching).

    Below the account's minimum the provider refuses the job (Bedrock's record minimum); below
    the size where the lines' saving over the next-cheapest route covers the batch's fixed
    ``overhead_usd`` it costs more than it saves. Either way the group should not wait to fill:
    its requests go by the next-cheapest route. An unknown saving passes the second test.
    """
    if lines < min_lines:
        return False, f"too small: {lines} lines, below the account's minimum of {min_lines}"
    if overhead_usd > 0 and saving_usd_per_line is not None:
        saving = lines * saving_usd_per_line
        if saving < overhead_usd:
            return False, (
                f"too small: {lines} lines save ${saving:.6f}, below the batch's overhead "
                f"of ${overhead_usd:.6f}"
            )
    return True, f"{lines} lines"


# -- submit windows: 5-field cron ----------------------------------------------------------------

_CRON_FIELDS: Final = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
)
_MONTH_NAMES: Final = {n.lower(): i for i, n in enumerate(calendar.month_abbr) if n}
_DAY_NAMES: Final = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_CRON_MACROS: Final = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
_LOOKBACK_DAYS: Final = 8 * 366
"""How far back ``window_due`` looks for a missed window: long enough for a Feb 29 window."""


@dataclass(frozen=True, slots=True)
class _Cron:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    any_day: bool
    any_weekday: bool

    def day_matches(self, d: date) -> bool:
        """Vixie cron's rule: with both day fields restricted, either one may match."""
        if d.month not in self.months:
            return False
        dom = d.day in self.days
        dow = d.isoweekday() % 7 in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow


def _cron_value(text: str, names: dict[str, int], lo: int, hi: int) -> int:
    value = names.get(text.lower()) if names else None
    if value is None:
        if not text.isdigit():
            raise ValueError(f"{text!r} is not a number")
        value = int(text)
    if not lo <= value <= hi:
        raise ValueError(f"{value} is outside {lo}-{hi}")
    return value


def _cron_field(text: str, name: str, lo: int, hi: int) -> frozenset[int]:
    names = _MONTH_NAMES if name == "month" else _DAY_NAMES if name == "day of week" else {}
    values: set[int] = set()
    for part in text.split(","):
        span, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"step {step_text!r} must be a positive number")
            step = int(step_text)
        if span == "*":
            start, end = lo, hi
        elif "-" in span:
            a, _, b = span.partition("-")
            start, end = _cron_value(a, names, lo, hi), _cron_value(b, names, lo, hi)
            if start > end:
                raise ValueError(f"range {span!r} runs backwards")
        else:
            start = _cron_value(span, names, lo, hi)
            end = hi if step_text else start
        values.update(range(start, end + 1, step))
    return frozenset(values)


@functools.lru_cache(maxsize=256)
def _parse_cron(expr: str) -> _Cron:
    fields = _CRON_MACROS.get(expr.strip().lower(), expr).split()
    if len(fields) != 5:
        raise ConfigError(
            f"submit window {expr!r}: a crontab needs 5 fields "
            "(minute hour day-of-month month day-of-week), or @hourly/@daily/@weekly/..."
        )
    parsed: list[frozenset[int]] = []
    for text, (name, lo, hi) in zip(fields, _CRON_FIELDS, strict=True):
        try:
            parsed.append(_cron_field(text, name, lo, hi))
        except ValueError as exc:
            raise ConfigError(f"submit window {expr!r}: {name} {text!r}: {exc}") from None
    minutes, hours, days, months, weekdays = parsed
    weekdays = frozenset(d % 7 for d in weekdays)
    any_day, any_weekday = fields[2].startswith("*"), fields[4].startswith("*")
    longest = {m: calendar.monthrange(2024, m)[1] for m in months}
    if any_weekday and not any(d <= longest[m] for m in months for d in days):
        raise ConfigError(
            f"submit window {expr!r}: that day of month never occurs, so it never fires"
        )
    return _Cron(minutes, hours, days, months, weekdays, any_day, any_weekday)


def _latest_fire(cron: _Cron, now: datetime, earliest: date) -> datetime | None:
    """The last minute at or before ``now`` that the crontab names, searching back to ``earliest``."""
    day = now.date()
    bound = now.hour * 60 + now.minute
    hours = sorted(cron.hours, reverse=True)
    minutes = sorted(cron.minutes, reverse=True)
    while day >= earliest:
        if cron.day_matches(day):
            for hour in hours:
                if hour * 60 > bound:
                    continue
                for minute in minutes:
                    if hour * 60 + minute <= bound:
                        return datetime(
                            day.year, day.month, day.day, hour, minute, tzinfo=now.tzinfo
                        )
        day -= timedelta(days=1)
        bound = 23 * 60 + 59
    return None


def check_window(crontab_expr: str) -> None:
    """Raise ``ConfigError`` naming ``crontab_expr`` if it is not a usable submit window."""
    _parse_cron(crontab_expr)


def window_due(crontab_expr: str, last_run: float | None, now: float, *, tz: tzinfo = UTC) -> bool:
    """Whether a submit window such as ``"0 23 * * *"`` has come since ``last_run``.

    Due when a minute the crontab names lies in ``(last_run, now]``, so a window missed while
    the aggregator was down is still honoured once. With no ``last_run`` it is due only during a
    named minute itself. Times are read in ``tz`` (UTC by default). An invalid expression
    raises ``ConfigError`` naming it, so a bad lanes file fails at load, not at 23:00.
    """
    cron = _parse_cron(crontab_expr)
    now_dt = datetime.fromtimestamp(now, tz)
    if last_run is None:
        start = now_dt.replace(second=0, microsecond=0)
        return (
            cron.day_matches(start.date())
            and start.hour in cron.hours
            and start.minute in cron.minutes
        )
    if last_run >= now:
        return False
    earliest = max(
        datetime.fromtimestamp(last_run, tz).date(),
        (now_dt - timedelta(days=_LOOKBACK_DAYS)).date(),
    )
    fire = _latest_fire(cron, now_dt, earliest)
    return fire is not None and fire.timestamp() > last_run
