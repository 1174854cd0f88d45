"""The latency ping: a fixed, tiny, unauthenticated request that any stranger may send to a
provider host's tunnel endpoint or to a coordinator's relay, answered with a smaller reply.
Sans-I/O: no sockets, no clock; the provider host, the coordinator and the client import it.

The request is one HTTP/1.1 ``GET`` of exactly :data:`PING_REQUEST_SIZE` bytes::

    GET <tunnel path>/ping?n=<32 hex digits> HTTP/1.1\\r\\n
    Host: <host[:port]>\\r\\n
    X-JIO-Pad: ------...\\r\\n      (pads the request to PING_REQUEST_SIZE bytes)
    \\r\\n

and the reply is ``200`` whose body is the same 32 hex digits (the *nonce*), at most
:data:`PING_MAX_REPLY` bytes with its headers. Why each rule:

* **No amplification.** The reply is never larger than the request (:data:`PING_MAX_REPLY` <
  :data:`PING_REQUEST_SIZE`); a request that is shorter than :data:`PING_REQUEST_SIZE`, or
  malformed, gets no answer at all (the connection is cut), and so does one over the rate
  limit (:class:`PingLimiter`). Nothing is sent that the sender did not pay for first.
* **A round trip, not a guess.** The reply carries the client's random nonce, so it cannot
  be sent before the request arrived: the time from writing the request to reading a reply
  with the right nonce is one network round trip (plus the responder's few microseconds).
* **Costs the host almost nothing.** It is answered while the HTTP request is parsed,
  before any websocket, session or signature work; on the provider host it holds the same
  pre-authentication slot as a tunnel connection (``provider_host.preauth``), so pings do
  not get around the per-address and total caps on strangers.
* **Rate-limited per address.** :class:`PingLimiter` keeps a token bucket per source address
  (IPv6 by its /64, which one machine usually holds) in a table of fixed size, so the
  limiter's memory is a few KB however many addresses ping; colliding addresses share a
  bucket, which only makes the limit stricter for them.

The provider's own figure is never asked for and never trusted: whoever wants a latency
measures it with this ping, and a figure measured through the coordinator's relay is the
relay's ping plus the coordinator's own measured hop to the provider (``via relay``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = [
    "PING_MAX_REPLY",
    "PING_NONCE_HEX",
    "PING_REQUEST_SIZE",
    "PING_SUFFIX",
    "PingLimiter",
    "PingTarget",
    "address_key",
    "build_ping_request",
    "parse_ping_path",
    "parse_ping_reply",
    "ping_target",
]

#: A ping's path is the tunnel (or relay) URL's path plus this: ``/tunnel/ping``.
PING_SUFFIX = "/ping"
#: Hex digits of the nonce (16 random bytes).
PING_NONCE_HEX = 32
#: The exact size of a ping request, bytes (padded with the ``X-JIO-Pad`` header).
PING_REQUEST_SIZE = 512
#: The largest reply a responder may send, headers included (always below the request's).
PING_MAX_REPLY = 256

_NONCE = re.compile(rb"^[0-9a-f]{32}$")
_PAD_LINE = b"X-JIO-Pad: "


@dataclass(frozen=True, slots=True)
class PingTarget:
    """Where to send a ping: a TCP address, whether it speaks TLS, and the request path."""

    host: str
    port: int
    tls: bool
    path: str

    @property
    def url(self) -> str:
        """The ``ws(s)://`` URL whose endpoint this pings (the tunnel's, or the relay's)."""
        scheme = "wss" if self.tls else "ws"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{self.path.removesuffix(PING_SUFFIX)}"


def ping_target(url: str) -> PingTarget:
    """The ping of the endpoint at ``url`` (a provider's ``ws(s)://.../tunnel`` or a relay's
    ``ws(s)://.../relay``; ``http(s)`` is taken as ``ws(s)``): same host and port, the path
    plus :data:`PING_SUFFIX`. :class:`ValueError` for anything else."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss", "http", "https") or not parts.hostname:
        raise ValueError(f"cannot ping {url!r}: not a ws://, wss://, http:// or https:// URL")
    tls = scheme in ("wss", "https")
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError:
        raise ValueError(f"cannot ping {url!r}: bad port") from None
    path = parts.path.rstrip("/")
    return PingTarget(parts.hostname, port, tls, path + PING_SUFFIX)


def build_ping_request(target: PingTarget, nonce: bytes) -> bytes:
    """The request bytes for ``target`` with ``nonce`` (16 random bytes): exactly
    :data:`PING_REQUEST_SIZE` bytes. :class:`ValueError` when the path or host is too long
    to fit (they never are for a URL a coordinator hands out)."""
    if len(nonce) != PING_NONCE_HEX // 2:
        raise ValueError(f"a ping nonce is {PING_NONCE_HEX // 2} bytes, not {len(nonce)}")
    host = f"[{target.host}]" if ":" in target.host else target.host
    head = (f"GET {target.path}?n={nonce.hex()} HTTP/1.1\r\nHost: {host}:{target.port}\r\n").encode(
        "ascii"
    )
    pad = PING_REQUEST_SIZE - len(head) - len(_PAD_LINE) - 4  # the pad line's CRLF + blank line
    if pad < 1:
        raise ValueError(f"the ping path {target.path!r} is too long")
    return head + _PAD_LINE + b"-" * pad + b"\r\n\r\n"


def parse_ping_path(target: str, request_size: int) -> str | None:
    """The nonce (hex) of a ping whose request target (path and query, as received) is
    ``target`` and whose request took ``request_size`` bytes, or None when it must get no
    answer: not a well-formed ping, or smaller than :data:`PING_REQUEST_SIZE` (a reply to it
    could outweigh it)."""
    if request_size < PING_REQUEST_SIZE:
        return None
    _, sep, query = target.partition("?")
    if not sep or not query.startswith("n=") or "&" in query:
        return None
    nonce = query[2:].encode("ascii", "replace")
    return nonce.decode() if _NONCE.match(nonce) else None


def parse_ping_reply(data: bytes, nonce: bytes) -> bool | None:
    """Whether ``data`` (what arrived so far) is the reply to a ping with ``nonce``: True
    once a complete ``200`` reply carrying it is there, None while it may still come, False
    when it cannot be (another status, another body, or more than :data:`PING_MAX_REPLY`
    bytes: a responder that amplifies is not a jupyter-io responder)."""
    if len(data) > PING_MAX_REPLY:
        return False
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    status = head.split(b"\r\n", 1)[0].split(b" ")
    if len(status) < 2 or status[1] != b"200":
        return False
    want = nonce.hex().encode()
    if len(body) < len(want):
        return None if want.startswith(body) else False
    return body[: len(want)] == want


def address_key(address: str) -> bytes:
    """What an address is limited by: an IPv4 address itself, an IPv6 address by its /64
    (an IPv4-mapped one as IPv4); anything else (a Unix socket's name) as is."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address.encode(errors="replace")[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped.packed
        return ip.packed[:8]
    return ip.packed


class PingLimiter:
    """Token buckets per source address in a fixed table: ``rate`` pings per second with
    bursts of ``burst`` per address, and ``total_rate`` per second for all addresses together
    (so many addresses cannot make the host spend more either).

    ``buckets`` slots (a power of two) hold the buckets, indexed by a keyed hash of
    :func:`address_key` (the key is random per limiter, so nobody can choose addresses that
    collide with someone else's). Memory is fixed: two lists of ``buckets`` floats. Call
    :meth:`allow` with the time (seconds, monotonic) for each ping.
    """

    def __init__(
        self,
        *,
        rate: float = 2.0,
        burst: float = 10.0,
        total_rate: float = 500.0,
        buckets: int = 256,
    ) -> None:
        if rate <= 0 or burst < 1 or total_rate <= 0:
            raise ValueError("ping rates must be positive and the burst at least 1")
        if buckets < 1 or buckets & (buckets - 1):
            raise ValueError("buckets must be a power of two")
        self.rate = rate
        self.burst = burst
        self.total_rate = total_rate
        self._mask = buckets - 1
        self._key = os.urandom(16)
        self._tokens = [burst] * buckets
        self._stamps = [0.0] * buckets
        self._total_tokens = total_rate
        self._total_stamp = 0.0
        #: Pings refused so far (for counters and tests).
        self.refused = 0

    def _slot(self, address: str) -> int:
        digest = hashlib.blake2b(address_key(address), digest_size=4, key=self._key).digest()
        return int.from_bytes(digest, "little") & self._mask

    def allow(self, address: str, now: float) -> bool:
        """True when a ping from ``address`` at ``now`` may be answered (it takes a token)."""
        total = min(
            self.total_rate, self._total_tokens + (now - self._total_stamp) * self.total_rate
        )
        self._total_stamp = now
        slot = self._slot(address)
        tokens = min(self.burst, self._tokens[slot] + (now - self._stamps[slot]) * self.rate)
        self._stamps[slot] = now
        if tokens < 1.0 or total < 1.0:
            self._tokens[slot] = tokens
            self._total_tokens = total
            self.refused += 1
            return False
        self._tokens[slot] = tokens - 1.0
        self._total_tokens = total - 1.0
        return True
