"""Every error the client raises, one class per cause (protocol §2, §3, §12, §13).

All derive from :class:`TickgateError`. None of them ever carries a token.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "TickgateError",
    "HttpError",
    "TokenError",
    "TicketError",
    "ConnectFailed",
    "HandshakeRefused",
    "ControlError",
    "ProtocolError",
    "DecodeError",
    "SequenceViolation",
    "StreamClosed",
    "TokenExpired",
    "TokenRevoked",
    "SlowConsumer",
    "ServerShutdown",
    "closed_error",
]


class TickgateError(Exception):
    """Base class of every error of this package."""


class HttpError(TickgateError):
    """An HTTP endpoint of the server answered with an error.

    ``status`` is the HTTP status (0 when no answer came: connection refused, timeout),
    ``error`` the body's ``error`` code and ``description`` its ``error_description``.
    """

    def __init__(self, status: int, error: str, description: str = "", retry_after: float | None = None):
        self.status = status
        self.error = error
        self.description = description
        self.retry_after = retry_after
        super().__init__(status, error, description)

    def __str__(self) -> str:
        what = f"{self.status} {self.error}" if self.status else self.error
        return f"{self._what} ({what}): {self.description}" if self.description else f"{self._what} ({what})"

    _what = "HTTP request refused"


class TokenError(HttpError):
    """The token endpoint refused (``invalid_client``, ``invalid_scope``, ...) or could not be reached."""

    _what = "token request refused"


class TicketError(HttpError):
    """``POST /v1/ticket`` refused (``invalid_token``, ``too_many_tickets``, ...) or could not be reached."""

    _what = "ticket request refused"


class ConnectFailed(TickgateError):
    """No WebSocket connection: bad URL, DNS, TCP or TLS failure, or no HTTP answer."""


class HandshakeRefused(TickgateError):
    """The server answered the upgrade with an HTTP refusal (protocol §3).

    ``status`` (401 token refused, 403 scope or origin, 429 limits, 503 draining, 400),
    ``error`` and ``description`` from the JSON body (``error_description``: "token expired",
    ...), ``body`` the body as sent, ``retry_after`` the ``Retry-After`` seconds if any.
    """

    def __init__(self, status: int, error: str, description: str = "", body: str = "", retry_after: float | None = None):
        self.status = status
        self.error = error
        self.description = description
        self.body = body
        self.retry_after = retry_after
        super().__init__(status, error, description)

    def __str__(self) -> str:
        return f"handshake refused ({self.status} {self.error}): {self.description}"


class ControlError(TickgateError):
    """An ``error`` reply to a control message (protocol §13): ``error`` is its ``code``
    (``unknown_feed``, ``unknown_symbol``, ``insufficient_scope``, ``rate_limited``, ...),
    ``description`` its ``message`` and ``id`` the echoed request id (None when absent)."""

    def __init__(self, error: str, description: str = "", id: int | None = None):
        self.error = error
        self.description = description
        self.id = id
        super().__init__(error, description, id)

    def __str__(self) -> str:
        where = f" (id {self.id})" if self.id is not None else ""
        return f"control error {self.error}{where}: {self.description}"


class ProtocolError(TickgateError):
    """A text message from the server that is not a JSON object with a string ``type``."""


class DecodeError(TickgateError, ValueError):
    """A binary message that is not a valid batch (protocol §8)."""


class SequenceViolation(TickgateError):
    """The stream broke the delivery contract (protocol §9): a repeated seq, a hole nobody
    announced, a record of an instrument not subscribed. ``violation`` says which."""

    def __init__(self, violation: Any):
        self.violation = violation
        super().__init__(str(violation))


class StreamClosed(TickgateError):
    """The connection ended: ``code`` is the close code (1006 when it dropped without one)."""

    def __init__(self, code: int, reason: str = ""):
        self.code = code
        self.reason = reason
        super().__init__(code, reason)

    def __str__(self) -> str:
        return f"stream closed ({self.code}): {self.reason}" if self.reason else f"stream closed ({self.code})"


class TokenExpired(StreamClosed):
    """Closed 4001: the token expired on the live connection (no refresh in time)."""


class TokenRevoked(StreamClosed):
    """Closed 4003: the token (or its subject) was revoked by an operator."""


class SlowConsumer(StreamClosed):
    """Closed 4008: this client did not keep up; the server dropped its backlog."""


class ServerShutdown(StreamClosed):
    """Closed 1001: the server is shutting down. ``reconnect_after_ms`` is the delay the
    server's ``shutdown`` message asked for (None when it sent none)."""

    def __init__(self, code: int = 1001, reason: str = "", reconnect_after_ms: int | None = None):
        super().__init__(code, reason)
        self.reconnect_after_ms = reconnect_after_ms


def closed_error(code: int, reason: str = "", reconnect_after_ms: int | None = None) -> StreamClosed:
    """The typed exception for a close code (protocol §12)."""
    if code == 4001:
        return TokenExpired(code, reason)
    if code == 4003:
        return TokenRevoked(code, reason)
    if code == 4008:
        return SlowConsumer(code, reason)
    if code == 1001:
        return ServerShutdown(code, reason, reconnect_after_ms)
    return StreamClosed(code, reason)
