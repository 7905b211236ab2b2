"""Bearer-token authentication (a ``grpc.aio`` server interceptor) and TLS / mTLS credentials.

Clients send ``authorization: Bearer <token>`` metadata. The interceptor compares it with every
configured token in constant time (``hmac.compare_digest``) and answers UNAUTHENTICATED for a
missing or wrong token, on unary and streaming methods alike, before the handler runs. The
standard health service is exempt (load balancers and orchestrators probe it without
credentials); reflection is not (it would reveal the API to anyone).

TLS: ``server_credentials(cert, key)``; with ``client_ca`` the server also requires a client
certificate signed by that CA (mTLS). ``channel_credentials`` builds the client side.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"
TOKEN_ENV = "WEIGHTSMITH_TOKEN"


def load_tokens(tokens: Iterable[str] = (), token_file: str | Path | None = None) -> list[str]:
    """Tokens from the command line and from a file (one per line, ``#`` comments)."""
    out = [t.strip() for t in tokens if t and t.strip()]
    if token_file:
        for line in Path(token_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(line)
    for t in out:
        if any(c.isspace() for c in t) or len(t) < 8:
            raise ValueError("a token must be at least 8 characters with no whitespace")
    return list(dict.fromkeys(out))


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, tok = value.partition(" ")
            if scheme.lower() == "bearer" and tok:
                return tok.strip()
            return None
    return None


def _deny_handler(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    async def abort(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, like a streaming handler

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(abort)
    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(abort, **kw)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects every call without a valid bearer token, except the exempt method prefixes."""

    def __init__(self, tokens: Iterable[str], exempt_prefixes: Iterable[str] = (HEALTH_PREFIX,)) -> None:
        self._tokens = [t.encode() for t in tokens]
        if not self._tokens:
            raise ValueError("BearerTokenInterceptor needs at least one token")
        self._exempt = tuple(exempt_prefixes)

    def check(self, metadata: Any) -> str | None:
        """None when the metadata carries a valid token, else the reason."""
        tok = _bearer(metadata)
        if tok is None:
            return "missing bearer token (send 'authorization: Bearer <token>' metadata)"
        given = tok.encode()
        ok = False
        for t in self._tokens:  # no early exit: time does not depend on which token matched
            ok |= hmac.compare_digest(given, t)
        return None if ok else "invalid bearer token"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        if method.startswith(self._exempt):
            return await continuation(handler_call_details)
        reason = self.check(handler_call_details.invocation_metadata)
        if reason is None:
            return await continuation(handler_call_details)
        return _deny_handler(await continuation(handler_call_details), reason)


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def server_credentials(
    cert: str | Path, key: str | Path, client_ca: str | Path | None = None
) -> grpc.ServerCredentials:
    """TLS server credentials; with ``client_ca``, clients must present a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=_read(client_ca),
        require_client_auth=client_ca is not None,
    )


def channel_credentials(
    ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None
) -> grpc.ChannelCredentials:
    """TLS client credentials (``ca`` None: the system's roots); ``cert``+``key`` for mTLS."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both --tls-cert and --tls-key")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert)
    )


def token_from_env() -> str | None:
    return os.environ.get(TOKEN_ENV) or None
