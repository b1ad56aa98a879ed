"""``mixbatch costs --plot out.png``: spend and savings over time by route, as a picture.

The series is the ledger's hourly totals by route (``routing.store.ledger.series``), so the
picture needs no finished result to still be stored. matplotlib is an optional extra
(``mixbatch[plot]``), imported only here, and drawn with its file-only backend: no display.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import click

from routing.store.ledger import HourTotals

#: What to install when matplotlib is missing.
PLOT_EXTRA = "mixbatch[plot]"


def plot_costs(hours: Sequence[HourTotals], path: Path) -> None:
    """Write a PNG of spend (top) and savings (bottom) per hour, one line per route."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError as exc:
        raise click.ClickException(
            f"--plot needs matplotlib: pip install '{PLOT_EXTRA}' (or pip install matplotlib)"
        ) from exc
    routes = sorted({r for h in hours for r in h.routes if r != "all"})
    times = [datetime.fromtimestamp(h.hour_start, UTC) for h in hours]
    fig, (spend, saved) = plt.subplots(2, 1, sharex=True, figsize=(10, 6))
    try:
        for route in routes:
            for axis, measure in ((spend, "cost"), (saved, "saved")):
                values = [h.routes.get(route, {}).get(measure, 0.0) for h in hours]
                axis.plot(times, values, marker="o", label=route)
        spend.set_title("mixbatch spend and savings per hour, by route (UTC)")
        spend.set_ylabel("spend USD")
        saved.set_ylabel("saved USD vs realtime")
        for axis in (spend, saved):
            axis.grid(True, alpha=0.3)
            if routes:
                axis.legend(loc="upper left")
        if not routes:
            spend.text(0.5, 0.5, "no priced requests", ha="center", transform=spend.transAxes)
        fig.autofmt_xdate()
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)
