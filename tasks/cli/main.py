"""The ``mixbatch`` command: the group, its exit codes, and every command group registered.

Every command answers errors in one sentence that names the bad input (no traceback) and exits
non-zero: 2 for bad input or configuration, 3 when Redis cannot be reached, 4 for backpressure,
1 otherwise. The commands live one group to a module: ``submit`` (submit, status, results),
``estimate``, ``cancel``, ``views`` (lanes, costs, top, health), ``service`` (up, demo, sandbox,
metrics, flower), ``dlq`` and ``explain``. Every command that prints a result takes ``--json``;
the long-running ones (up, sandbox, metrics, flower) print logs, and say so in their help.
"""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.markup import escape

from routing.errors import ConfigError, InvalidRequest, LaneFull, MixbatchError, StoreUnavailable
from tasks.cli.cancel import cancel
from tasks.cli.dlq import dlq
from tasks.cli.estimate import estimate
from tasks.cli.explain import explain
from tasks.cli.output import err_console
from tasks.cli.service import demo, flower, metrics, sandbox, up
from tasks.cli.submit import results, status, submit
from tasks.cli.views import costs, health, lanes, top


def _exit_code(exc: MixbatchError) -> int:
    if isinstance(exc, InvalidRequest | ConfigError):
        return 2
    if isinstance(exc, StoreUnavailable):
        return 3
    if isinstance(exc, LaneFull):
        return 4
    return 1


class Group(click.Group):
    """Turns mixbatch's own errors into one red line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MixbatchError as exc:
            err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(_exit_code(exc))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """mixbatch: mixed-priority batching of LLM and embedding requests.

    Requests wait in lanes (urgent, standard, bulk) with deadlines and run the cheapest way
    that still meets them. With MIXBATCH_REDIS_URL unset, an embedded Redis is used.
    """


for _command in (submit, estimate, status, results, cancel, lanes, costs, top, health, up, demo,
                 sandbox, metrics, flower, dlq, explain):  # fmt: skip
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="mixbatch")


if __name__ == "__main__":
    main()
