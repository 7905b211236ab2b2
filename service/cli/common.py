"""Helpers shared by the ``weightsmith`` command modules (error handling, sizes, Hub options).

They live apart from :mod:`service.cli.main` so that every ``service/cli_<area>.py`` can import them without
importing the CLI itself (which imports those modules to register their commands).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from merge.errors import WeightsmithError


def _fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except WeightsmithError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted; no output was written", err=True)
            sys.exit(130)

    return wrapper


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    from merge.checkpoint import parse_size

    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def hub_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options that control how Hub references are resolved."""
    for opt in reversed([
        click.option("--token", envvar="HF_TOKEN", default=None, help="Hub token (default: $HF_TOKEN)."),
        click.option("--endpoint", default=None, help="Hub endpoint URL (default: huggingface.co or $HF_ENDPOINT)."),
        click.option("--offline", is_flag=True, envvar="HF_HUB_OFFLINE", help="Use only the local Hub cache."),
        click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Hub cache folder."),
    ]):
        fn = opt(fn)
    return fn


def _resolver(token: str | None, endpoint: str | None, offline: bool, cache_dir: str | None,
              revision: str | None = None) -> Any:
    if not any((token, endpoint, offline, cache_dir, revision)):
        from merge.plan import default_resolver

        return default_resolver  # local paths need no Hub client; Hub ids get a default one
    from merge import hub

    return hub.HubResolver(token=token, endpoint=endpoint, offline=offline, cache_dir=cache_dir,
                           revision=revision, progress=sys.stderr.isatty())


class RegistryChoice(click.Choice):
    """A choice among a registry's names (lineage methods...), read when first needed, so that the CLI
    starts without importing the library."""

    def __init__(self, names: Callable[[], list[str]]) -> None:
        self._names = names
        self.case_sensitive = True

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        return tuple(self._names())


class LogEvery:
    """Progress for a log, not a terminal: ``line(text)`` prints at most one line per ``seconds`` to stderr
    (and always when ``force``); for commands whose bar is shown only on a terminal."""

    def __init__(self, seconds: float = 10.0, *, clock: Callable[[], float] | None = None) -> None:
        import time

        self.seconds = seconds
        self.clock = clock or time.monotonic
        self.last: float | None = None

    def line(self, text: str, *, force: bool = False) -> bool:
        now = self.clock()
        if not force and self.last is not None and now - self.last < self.seconds:
            return False
        self.last = now
        click.echo(text, err=True)
        return True
