"""A JSON-over-HTTP client for one endpoint that cannot hold a run or leak a key.

Every attempt has a deadline for the whole exchange (connect, headers, body), enforced by
shutting the socket down, so a server that stalls or dribbles cannot hold a run; the retries
of one request share a budget. The key is sent only to the configured URL (redirects are
refused), never over plain http to a host other than loopback unless the caller opts in, and
never appears in a message, log or repr. `backends/api.py` speaks the completions protocol
over it.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from sway_engine.backends.api_shapes import AnswerError, parse_body
from sway_engine.errors import BackendError

log = logging.getLogger(__name__)

KEY_ENV = ("SWAY_API_KEY", "OPENAI_API_KEY")
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
RETRY_BUDGET = 2.0  # one request, retries and backoff included, ends within this many timeouts


class Secret:
    """Holds the API key; prints as a placeholder so it cannot leak through repr or logs."""

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__


class HTTPStatusError(BackendError):
    """A non-retried HTTP error answer (4xx); `status` lets discovery tell 'unsupported'."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class JsonClient:
    """POSTs JSON to one URL and parses the answer; counts requests, retries and wall time.

    `bad_answer` turns an unreadable answer into an error naming the URL (key scrubbed).
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None,
        timeout_s: float,
        max_retries: int,
        backoff_s: float,
        max_backoff_s: float,
        allow_insecure_http: bool,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        key, source = (api_key, "api_key") if api_key is not None else _key_from_env()
        self._key = Secret(key)
        if self._key:
            _check_key_transport(url, source, allow_insecure_http)
            log.info("api backend %s: sending the key from %s", url, source)
        self._opener = urllib.request.build_opener(_RefuseRedirects, _HTTPHandler, _HTTPSHandler)
        self._lock = threading.Lock()
        self._counters: dict[str, float] = {
            "http_requests": 0,
            "http_retries": 0,
            "http_wall_s": 0.0,
        }

    def post(self, payload: dict[str, Any]) -> dict[str, Any]:
        """POST JSON and parse the answer, retrying 5xx / 429 / transport faults / deadlines.

        Each attempt must finish (connect, headers, body) within `timeout_s`. The retry
        budget is RETRY_BUDGET * timeout_s: all attempts and the backoff between them end
        within it, whatever `max_retries` allows, so one request holds a run at most that long.
        """
        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = "Bearer " + self._key.reveal()
        started = time.monotonic()
        give_up = started + RETRY_BUDGET * self.timeout_s
        faults: list[str] = []
        for attempt in range(self.max_retries + 1):
            if attempt:
                pause = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                if time.monotonic() + pause >= give_up:
                    break
                self._count("http_retries", 1)
                time.sleep(pause)
            outcome = self._attempt(data, headers, min(self.timeout_s, give_up - time.monotonic()))
            if isinstance(outcome, bytes):
                try:
                    return parse_body(outcome)
                except AnswerError as exc:
                    raise self.bad_answer(exc) from None
            faults.append(outcome)
        raise BackendError(self._gave_up(faults, time.monotonic() - started))

    def _attempt(self, data: bytes, headers: dict[str, str], seconds: float) -> bytes | str:
        """One POST that must finish within `seconds`: the answer's bytes, or why it failed in
        a way worth retrying. A redirect or a 4xx raises: asking again would not help."""
        start = time.perf_counter()
        deadline = _Deadline(seconds)
        request = _TimedRequest(self.url, data, headers, deadline)
        with deadline:
            try:
                with self._opener.open(request, timeout=seconds) as resp:
                    raw, fault = resp.read(), ""
            except urllib.error.HTTPError as exc:
                raw, fault = b"", self._http_fault(exc)
            except (OSError, http.client.HTTPException) as exc:
                raw, fault = b"", self.scrub(_transport_reason(exc))
            finally:
                self._count("http_requests", 1)
                self._count("http_wall_s", time.perf_counter() - start)
        if deadline.fired or (fault and deadline.passed()):
            return f"{_LATE} within the {seconds:.3g} s deadline"
        return fault or raw

    def _http_fault(self, exc: urllib.error.HTTPError) -> str:
        """A retried status as a fault; a redirect or any other status raises."""
        if 300 <= exc.code < 400:
            raise BackendError(self._redirect_message(exc)) from None
        body = self.scrub(_read_error(exc))
        if exc.code not in RETRY_STATUS:
            raise HTTPStatusError(self._status_message(exc.code, body), exc.code) from None
        return f"HTTP {exc.code}: {body}"

    def _gave_up(self, faults: list[str], elapsed: float) -> str:
        message = (
            f"{self.url}: no answer after {len(faults)} attempt(s) in {elapsed:.1f} s: {faults[-1]}"
        )
        if any(f.startswith(_LATE) for f in faults):
            message += (
                f". Each attempt may take timeout_s = {self.timeout_s:g} s and all of them "
                f"{RETRY_BUDGET * self.timeout_s:g} s; raise timeout_s in the model settings if "
                "the server is only slow, or check the server (overloaded, or stalling)."
            )
        return message

    def bad_answer(self, exc: AnswerError, asked: str = "") -> BackendError:
        about = f", in reply to {asked}" if asked else ""
        return BackendError(
            self.scrub(
                f"answer from {self.url}: {exc}{about}. sway reads OpenAI-style completions "
                "answers: check the server, or the proxy in front of it."
            )
        )

    def _status_message(self, status: int, body: str) -> str:
        if status in (401, 403):
            where = " or ".join(KEY_ENV)
            sent = "a key was sent" if self._key else "no key was sent"
            return (
                f"{self.url}: HTTP {status} (authentication refused; {sent}): set a valid key "
                f"in {where}. Server said: {body}"
            )
        return f"{self.url}: HTTP {status}: {body}"

    def _redirect_message(self, exc: urllib.error.HTTPError) -> str:
        target = self.scrub(" ".join(str(exc.headers.get("Location", "(no Location)")).split()))
        return (
            f"{self.url}: HTTP {exc.code} redirect to {target[:200]}; sway does not follow "
            "redirects, so a key never reaches a host it was not configured for. "
            "Set the model's endpoint to the final URL."
        )

    def scrub(self, text: str) -> str:
        key = self._key.reveal()
        return text.replace(key, "<redacted>") if key else text

    def _count(self, name: str, value: float) -> None:
        with self._lock:
            self._counters[name] += value

    def counters(self) -> dict[str, float]:
        with self._lock:
            return dict(self._counters)


def _read_error(exc: urllib.error.HTTPError) -> str:
    try:
        raw = exc.read(65536).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        raw = ""
    try:
        parsed = json.loads(raw)
        if isinstance(parsed, dict):
            err = parsed.get("error", parsed)
            raw = str(err.get("message", err) if isinstance(err, dict) else err)
    except (ValueError, RecursionError):  # not JSON, or JSON that json cannot hold
        pass
    return " ".join(raw.split())[:200] or exc.reason or "(no body)"


def _transport_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return f"{type(exc).__name__}: {reason if reason is not None else exc}"


_LATE = "no complete answer"


class _Deadline:
    """A wall-clock limit on one HTTP exchange. When it passes, the exchange's socket is shut
    down, so a read blocked on a server that stalls or dribbles returns at once, in the headers
    or the body (a socket timeout only bounds each single read)."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._open = True
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            self._open = False
            socks, self._socks = self._socks, []
        for sock in socks:
            sock.close()

    def passed(self) -> bool:
        return time.monotonic() >= self._end

    def connect(
        self, address: tuple[str, int], timeout: Any = None, source_address: Any = None
    ) -> socket.socket:
        """`socket.create_connection`, keeping a duplicate to shut down at the deadline: the
        duplicate reaches the connection even after TLS wraps (and detaches) the original."""
        sock = socket.create_connection(address, timeout, source_address)
        with self._lock:
            if self._open and not self.fired:
                self._socks.append(sock.dup())
                return sock
        sock.close()
        raise TimeoutError("the deadline passed while connecting")

    def _fire(self) -> None:
        with self._lock:
            if not self._open:
                return
            self.fired = True
            for sock in self._socks:
                with contextlib.suppress(OSError):  # the other side closed it already
                    sock.shutdown(socket.SHUT_RDWR)


class _TimedRequest(urllib.request.Request):
    """A request carrying its deadline to the connection that will serve it."""

    def __init__(self, url: str, data: bytes, headers: dict[str, str], deadline: _Deadline) -> None:
        super().__init__(url, data=data, headers=headers)
        self.deadline = deadline


class _DeadlineConnections(urllib.request.AbstractHTTPHandler):
    """Opens connections whose socket the request's `_Deadline` can shut down."""

    def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> Any:
        deadline = getattr(req, "deadline", None)

        def connection(host: str, **conn_kwargs: Any) -> http.client.HTTPConnection:
            conn = http_class(host, **conn_kwargs)
            if deadline is not None:
                # http.client opens every socket (direct, proxy, before TLS) through this hook.
                conn._create_connection = deadline.connect
            return conn

        return super().do_open(connection, req, **kwargs)


class _HTTPHandler(_DeadlineConnections, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_DeadlineConnections, urllib.request.HTTPSHandler):
    pass


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: urllib would resend Authorization to whatever host it names."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address (127.0.0.0/8, ::1, and IPv4-mapped loopback)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool(addr.is_loopback or (mapped is not None and mapped.is_loopback))


def _check_key_transport(url: str, source: str, allow_insecure_http: bool) -> None:
    """A key goes over plain http only to loopback, unless the spec opts in."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "http" and not is_loopback(host) and not allow_insecure_http:
        raise BackendError(
            f"refusing to send the API key from {source} over plain http to {host}: anyone on "
            "the network could read it. Use an https:// endpoint, or set "
            "`allow_insecure_http: true` on the model if the network is trusted."
        )


def _key_from_env() -> tuple[str, str]:
    """(key, name of the variable it came from); ("", "") when none is set."""
    for name in KEY_ENV:
        value = os.environ.get(name, "").strip()
        if value:
            return value, name
    return "", ""
