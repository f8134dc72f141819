"""Tokens and tickets (protocol §2, §3): the client credentials grant and ``POST /v1/ticket``.

HTTP is done with the standard library (``urllib``) in a worker thread, so nothing here
blocks the event loop and no HTTP package is needed. Tokens are never logged nor put in
an exception.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Awaitable, Callable, Union

from .errors import HttpError, TicketError, TokenError

__all__ = [
    "TokenInfo",
    "TokenProvider",
    "fetch_token",
    "fetch_token_info",
    "client_credentials",
    "ClientCredentials",
    "fetch_ticket",
    "http_base",
    "call_provider",
]

#: Something that gives a fresh access token: an async (or plain) callable without arguments.
TokenProvider = Callable[[], Union[str, Awaitable[str]]]

_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


@dataclass(frozen=True)
class TokenInfo:
    """A token endpoint's answer. ``repr`` never shows the token."""

    access_token: str
    expires_in: int | None
    scope: str | None
    token_type: str | None

    def __repr__(self) -> str:
        return f"TokenInfo(access_token=<{len(self.access_token)} chars>, expires_in={self.expires_in}, scope={self.scope!r})"


def _opener(url: str) -> urllib.request.OpenerDirector:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host in _LOOPBACK or host.startswith("127."):
        # A loopback server is never behind a proxy, whatever the environment says.
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float, err: type[HttpError]) -> tuple[int, dict]:
    """POSTs and returns (status, JSON object); an HTTP error status raises ``err``."""
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _opener(url).open(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        raw = e.read() if e.fp is not None else b""
        retry_after = e.headers.get("Retry-After") if e.headers else None
        try:
            retry = float(retry_after) if retry_after is not None else None
        except ValueError:
            retry = None
        error, description = _error_fields(raw, e.code, e.reason)
        raise err(e.code, error, description, retry) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise err(0, "connection_failed", f"{url}: {reason}") from None
    try:
        obj = json.loads(raw)
    except ValueError:
        raise err(status, "invalid_response", "the answer is not JSON") from None
    if not isinstance(obj, dict):
        raise err(status, "invalid_response", "the answer is not a JSON object")
    return status, obj


def _error_fields(raw: bytes, status: int, reason: str | None) -> tuple[str, str]:
    try:
        obj = json.loads(raw)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        e = obj.get("error")
        d = obj.get("error_description")
        return (e if isinstance(e, str) else str(status)), (d if isinstance(d, str) else "")
    text = raw.decode("utf-8", "replace").strip()
    return (reason or str(status)), (text if len(text) <= 200 else "")


def _token_endpoint(token_url: str) -> str:
    parts = urllib.parse.urlsplit(token_url)
    if parts.scheme not in ("http", "https"):
        raise TokenError(0, "invalid_request", f"token URL must be http:// or https://: {token_url}")
    if parts.path in ("", "/"):
        return urllib.parse.urlunsplit(parts._replace(path="/oauth2/token"))
    return token_url


def _fetch_token_sync(token_url: str, client_id: str, client_secret: str, scope: str | None, timeout: float) -> TokenInfo:
    form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": client_secret}
    if scope:
        form["scope"] = scope
    body = urllib.parse.urlencode(form).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
    status, obj = _post(_token_endpoint(token_url), body, headers, timeout, TokenError)
    token = obj.get("access_token")
    if not isinstance(token, str) or not token:
        raise TokenError(status, "invalid_response", "no access_token in the answer")
    exp = obj.get("expires_in")
    return TokenInfo(
        token,
        exp if isinstance(exp, int) else None,
        obj.get("scope") if isinstance(obj.get("scope"), str) else None,
        obj.get("token_type") if isinstance(obj.get("token_type"), str) else None,
    )


async def fetch_token_info(
    token_url: str, client_id: str, client_secret: str, scope: str | None = None, *, timeout: float = 10.0
) -> TokenInfo:
    """The client credentials grant (RFC 6749 §4.4), credentials in the form body.

    ``token_url`` is the token endpoint (``http://host:port/oauth2/token``; a bare
    ``http://host:port`` gets that path). ``scope`` is space-separated. A refusal raises
    :class:`TokenError` with the endpoint's ``error`` / ``error_description``; no answer
    at all raises it with status 0 and error ``connection_failed``.
    """
    return await asyncio.to_thread(_fetch_token_sync, token_url, client_id, client_secret, scope, timeout)


async def fetch_token(
    token_url: str, client_id: str, client_secret: str, scope: str | None = None, *, timeout: float = 10.0
) -> str:
    """Like :func:`fetch_token_info`, returning only the access token."""
    return (await fetch_token_info(token_url, client_id, client_secret, scope, timeout=timeout)).access_token


class ClientCredentials:
    """A token provider: each call fetches a fresh token with the client credentials grant.

    ``last`` is the last :class:`TokenInfo` (its ``repr`` hides the token); ``fetches``
    counts the calls that got one."""

    def __init__(self, token_url: str, client_id: str, client_secret: str, scope: str | None = None, *,
                 timeout: float = 10.0):
        self.token_url = token_url
        self.client_id = client_id
        self._secret = client_secret
        self.scope = scope
        self.timeout = timeout
        self.last: TokenInfo | None = None
        self.fetches = 0

    async def __call__(self) -> str:
        info = await fetch_token_info(self.token_url, self.client_id, self._secret, self.scope, timeout=self.timeout)
        self.last = info
        self.fetches += 1
        return info.access_token

    def __repr__(self) -> str:
        return f"ClientCredentials({self.token_url!r}, client_id={self.client_id!r}, scope={self.scope!r})"


def client_credentials(
    token_url: str, client_id: str, client_secret: str, scope: str | None = None, *, timeout: float = 10.0
) -> ClientCredentials:
    """An async token provider (``await provider()`` → a fresh token) for :class:`~tickgate_client.Stream`."""
    return ClientCredentials(token_url, client_id, client_secret, scope, timeout=timeout)


async def call_provider(provider: TokenProvider) -> str:
    """Calls a token provider, sync or async, and checks it gave a non-empty string."""
    token = provider()
    if inspect.isawaitable(token):
        token = await token
    if not isinstance(token, str) or not token:
        raise TokenError(0, "invalid_response", "the token provider gave no token")
    return token


def http_base(url: str) -> str:
    """``scheme://host:port`` of a ``ws://``/``wss://``/``http(s)://`` URL, as http(s)."""
    parts = urllib.parse.urlsplit(url)
    scheme = {"ws": "http", "wss": "https", "http": "http", "https": "https"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"not a ws://, wss://, http:// or https:// URL: {url}")
    return f"{scheme}://{parts.netloc}"


def _fetch_ticket_sync(base_url: str, token: str, timeout: float) -> str:
    url = http_base(base_url) + "/v1/ticket"
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    status, obj = _post(url, b"", headers, timeout, TicketError)
    ticket = obj.get("ticket")
    if not isinstance(ticket, str) or not ticket:
        raise TicketError(status, "invalid_response", "no ticket in the answer")
    return ticket


async def fetch_ticket(base_url: str, token: str, *, timeout: float = 10.0) -> str:
    """A one-time stream ticket (``POST /v1/ticket``, §3), valid 30 s, for ``?ticket=``.
    ``base_url`` is the server (``http://host:port``; a ``ws://`` stream URL works too).
    A refusal raises :class:`TicketError`."""
    try:
        http_base(base_url)
    except ValueError as e:
        raise TicketError(0, "invalid_request", str(e)) from None
    return await asyncio.to_thread(_fetch_ticket_sync, base_url, token, timeout)
