"""What every ``weightsmith remote`` command shares: the connection options, the client, the error exit."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

DEFAULT_SERVER = "127.0.0.1:50051"


def connection_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(
        [
            click.option(
                "--server",
                envvar="WEIGHTSMITH_SERVER",
                default=DEFAULT_SERVER,
                show_default=True,
                metavar="HOST:PORT",
                help="Server address (or $WEIGHTSMITH_SERVER).",
            ),
            click.option(
                "--token",
                envvar="WEIGHTSMITH_TOKEN",
                default=None,
                help="Bearer token (or $WEIGHTSMITH_TOKEN).",
            ),
            click.option("--tls", is_flag=True, help="Use TLS with the system's CA certificates."),
            click.option(
                "--tls-ca",
                type=click.Path(dir_okay=False, exists=True),
                default=None,
                help="CA certificate to verify the server with (implies --tls).",
            ),
            click.option(
                "--tls-cert",
                type=click.Path(dir_okay=False, exists=True),
                default=None,
                help="Client certificate for mTLS.",
            ),
            click.option(
                "--tls-key",
                type=click.Path(dir_okay=False, exists=True),
                default=None,
                help="Client private key for mTLS.",
            ),
            click.option(
                "--timeout", default=30.0, show_default=True, type=float, help="Deadline of each call (s)."
            ),
        ]
    ):
        fn = opt(fn)
    return fn


def _client(
    server: str,
    token: str | None,
    tls: bool,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    timeout: float,
) -> Any:
    from service.client import Client

    return Client(
        server, token=token, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, timeout=timeout
    )


def _remote_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from merge.errors import WeightsmithError
        from service.client import RemoteError

        try:
            return fn(*args, **kwargs)
        except RemoteError as e:
            click.echo(f"error: {e.code}: {e.message}", err=True)
            sys.exit(2)
        except (ValueError, OSError, WeightsmithError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


def _conn(kw: dict[str, Any]) -> Any:
    keys = ("server", "token", "tls", "tls_ca", "tls_cert", "tls_key", "timeout")
    return _client(*(kw.pop(k) for k in keys))
