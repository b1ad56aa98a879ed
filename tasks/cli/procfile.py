"""The processes ``mixbatch up`` runs: a ``Procfile`` in the working directory, else the default
set that ships inside the package, so a pip-installed mixbatch runs from any directory.

The default set is a table here rather than a file, because one process depends on what is
installed: ``gpu`` (the local route's worker) runs only when the ``gpu`` extra is installed,
since a worker that cannot import torch would stop every other process with it (honcho stops all
when one exits). The repository's ``Procfile`` is the same set
written out (``tests/test_up.py`` keeps the two equal).

Every check happens before anything starts, with one line naming the file and line: a line that
is not ``name: command``, a name given twice, a command whose program is not installed (the
shell would say "command not found" in the middle of the other processes' logs and stop them
all), and a process asked for on the command line that the Procfile does not name.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel

from routing.errors import ConfigError

__all__ = ["DEFAULT_PROCESSES", "ProcessSet", "default_processes", "load_processes", "parse"]

#: name -> command of the default set, in start order. ``gpu`` is dropped without torch.
DEFAULT_PROCESSES: dict[str, str] = {
    "worker": "celery -A config worker -Q mixbatch.control,mixbatch.realtime,mixbatch.deliver,"
    "mixbatch.batch -n worker@%h --loglevel INFO",
    "beat": 'celery -A config beat --schedule "${MIXBATCH_DATA_DIR:-.mixbatch}/celerybeat-schedule"'
    " --loglevel INFO",
    "flower": "mixbatch flower",
    "metrics": "mixbatch metrics",
    "gpu": "celery -A config worker -Q gpu -P solo --prefetch-multiplier 1 -n gpu@%h "
    "--loglevel INFO",
}

_LINE = re.compile(r"^(?P<name>[A-Za-z0-9_-]+):\s*(?P<command>\S.*)$")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_WRAPPERS = frozenset({"exec", "env", "nice", "nohup"})


class ProcessSet(BaseModel):
    """What ``up`` will run, and where it came from (a Procfile path, or the package)."""

    source: str
    processes: dict[str, str]


def gpu_extra_installed() -> bool:
    """The local route needs the ``gpu`` extra (torch, transformers)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def default_processes() -> ProcessSet:
    """The shipped set; ``gpu`` only when the extra to serve local models is installed."""
    procs = dict(DEFAULT_PROCESSES)
    if not gpu_extra_installed():
        del procs["gpu"]
    return ProcessSet(source="the default process set (no Procfile here)", processes=procs)


def parse(text: str, source: str) -> dict[str, str]:
    """``name: command`` lines (blank lines and ``#`` comments skipped); errors name the line."""
    procs: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise ConfigError(
                f"{source}, line {number}: {line[:60]!r} is not `name: command` "
                "(a name of letters, digits, '_' or '-', a colon, then the command)"
            )
        name = match["name"]
        if name in procs:
            raise ConfigError(f"{source}, line {number}: process {name!r} is named twice")
        procs[name] = match["command"]
    if not procs:
        raise ConfigError(f"{source}: names no process")
    return procs


def program_of(command: str) -> str | None:
    """The program a command line runs, past ``VAR=value`` and ``exec``/``env`` (None: unknown,
    e.g. a shell construct, which the shell is left to judge)."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    for word in words:
        if _ASSIGNMENT.match(word) or word in _WRAPPERS or word.startswith("-"):
            continue
        return None if "$" in word or "`" in word else word
    return None


def _missing_program(command: str, path: str) -> str | None:
    program = program_of(command)
    if program is None:
        return None
    if "/" in program:
        found = Path(program).is_file() and os.access(program, os.X_OK)
    else:
        found = shutil.which(program, path=path) is not None
    return None if found else program


def load_processes(procfile: Path | None, *, only: Sequence[str] = (), path: str) -> ProcessSet:
    """The processes to run: ``procfile`` when given (it must exist), else ``./Procfile`` when
    there is one, else the default set; ``only`` picks some of them by name.

    ``path`` is the ``PATH`` the processes will get, to check that each program is installed.
    """
    if procfile is None and Path("Procfile").is_file():
        procfile = Path("Procfile")
    if procfile is None:
        chosen = default_processes()
        lines: dict[str, int] = {}
    else:
        try:
            text = procfile.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read the Procfile {procfile} ({exc.strerror})") from None
        chosen = ProcessSet(source=str(procfile), processes=parse(text, str(procfile)))
        lines = {
            m["name"]: n
            for n, raw in enumerate(text.splitlines(), start=1)
            if (m := _LINE.match(raw.strip()))
        }
    unknown = [name for name in only if name not in chosen.processes]
    if unknown:
        raise ConfigError(
            f"{chosen.source} names no process {', '.join(map(repr, unknown))} "
            f"(it names: {', '.join(chosen.processes)})"
        )
    if only:
        chosen = chosen.model_copy(
            update={"processes": {n: c for n, c in chosen.processes.items() if n in only}}
        )
    for name, command in chosen.processes.items():
        missing = _missing_program(command, path)
        if missing is not None:
            where = f", line {lines[name]}" if name in lines else ""
            raise ConfigError(
                f"{chosen.source}{where}: process {name!r} runs {missing!r}, which is not "
                "installed (not on PATH): fix the command or install the program"
            )
    return chosen
