"""A coordinator given as several URLs (replicas on one database) or one load-balancer name.

Every client of the coordinator takes its ``coordinator_url`` as a comma-separated list,
``http://a:8700,http://b:8700``, or as one name a load balancer answers for. This module is
the contract those clients share (stdlib only; no I/O):

* :func:`parse_coordinator_urls` splits and checks such a value, naming the entry that is
  wrong and how to write it;
* :func:`dial_refusal` decides whether a ``dial`` from the coordinator (the relay URL a
  provider connects back to) may be followed: only to a relay on one of the configured
  coordinators, or on the host and scheme of the replica the provider is linked to, so a
  coordinator cannot steer providers to arbitrary hosts;
* :func:`relay_urls` lists where a relayed tunnel may resume: the same relay path on every
  configured coordinator, when its relay is one of them.

``docs/coordinator-contract.md`` section 5 describes the replicas; the reasons are in
``docs/architecture.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import quote, urlsplit, urlunsplit

from .errors import ConfigError

__all__ = [
    "RELAY_SEGMENT",
    "dial_refusal",
    "origin",
    "parse_coordinator_urls",
    "relay_urls",
]

#: The path segment of the coordinator's relay, below the coordinator's own path.
RELAY_SEGMENT = "/relay/"

_HTTP_OF = {"ws": "http", "wss": "https", "http": "http", "https": "https"}
_WS_OF = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
_DEFAULT_PORT = {"http": 80, "https": 443}


def parse_coordinator_urls(
    value: str | Iterable[str],
    *,
    what: str = "coordinator_url",
    schemes: Sequence[str] = ("http", "https"),
) -> tuple[str, ...]:
    """The URLs of ``value`` (a comma-separated text, or the URLs themselves), each stripped
    of spaces and of a trailing slash, in the order given, duplicates dropped; () for "".

    Raises :class:`ConfigError` naming ``what`` and the entry at fault when an entry is not a
    URL with one of ``schemes``, a host and a valid port, or carries a query or fragment.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    entries = [item.strip() for item in items]
    if len(entries) > 1 and not all(entries):
        raise ConfigError(
            f"{what} {_text(value)!r} has an empty entry; separate URLs with single commas, "
            f"e.g. http://a:8700,http://b:8700"
        )
    urls: list[str] = []
    for position, entry in enumerate(entries, 1):
        if not entry:
            continue
        where = what if len(entries) == 1 else f"{what} entry {position} ({entry!r})"
        example = "http://HOST:PORT (https:// with TLS)"
        if len(entries) > 1:
            example += "; a list separates URLs with commas"
        parts = urlsplit(entry)
        if parts.scheme.lower() not in schemes or not parts.hostname:
            raise ConfigError(f"{where} {entry!r} must look like {example}")
        try:
            port_ok = parts.port != 0
        except ValueError:
            port_ok = False
        if not port_ok:
            raise ConfigError(f"{where} {entry!r} has no valid port; it must look like {example}")
        if parts.query or parts.fragment:
            raise ConfigError(f"{where} {entry!r} must not carry a query or fragment")
        url = entry.rstrip("/")
        if url not in urls:
            urls.append(url)
    return tuple(urls)


def origin(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of ``url`` with ``ws``/``wss`` read as ``http``/``https``, the
    host lower-cased and the scheme's default port filled in. Raises ValueError for a URL
    without a host or with a bad port."""
    parts = urlsplit(url)
    scheme = _HTTP_OF.get(parts.scheme.lower())
    host = (parts.hostname or "").lower()
    if scheme is None or not host:
        raise ValueError(f"{url!r} is not an http(s) or ws(s) URL with a host")
    return scheme, host, parts.port or _DEFAULT_PORT[scheme]


def _origins(urls: Iterable[str]) -> set[tuple[str, str, int]]:
    found = set()
    for url in urls:
        try:
            found.add(origin(url))
        except ValueError:
            continue
    return found


def dial_refusal(url: str, lease: str, *, coordinators: Sequence[str], linked: str) -> str | None:
    """Why a provider must not follow a ``dial`` to ``url`` for ``lease``, or None to follow it.

    ``coordinators`` are the configured coordinator URLs; ``linked`` the one the provider is
    linked through now. The dial is followed only to a ``ws(s)://`` relay URL whose path ends
    in ``/relay/{lease}`` and whose origin is one of ``coordinators`` (scheme, host, port), or
    whose scheme and host are ``linked``'s (another port of the same host: the replica's own
    port behind a load balancer on that host). Anything else would let a coordinator, or
    whoever could write its messages, point the provider's signed connections at any host.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss") or not parts.hostname:
        return f"dial to {url!r}: not a ws(s):// URL"
    if not parts.path.endswith(RELAY_SEGMENT + quote(lease, safe="")):
        return f"dial to {url!r}: not the relay path of lease {lease}"
    try:
        target = origin(url)
    except ValueError:
        return f"dial to {url!r}: no valid host and port"
    if target in _origins(coordinators):
        return None
    try:
        linked_origin = origin(linked)
    except ValueError:
        linked_origin = None
    if linked_origin is not None and target[:2] == linked_origin[:2]:
        return None
    listed = ", ".join(coordinators) or "none"
    return (
        f"dial to {url!r}: {scheme}://{parts.netloc} is none of the configured coordinators "
        f"({listed}) nor on the host of the linked one; refusing to connect there (list the "
        f"replica in coordinator_url if it is yours)"
    )


def relay_urls(tunnel_url: str, coordinators: Sequence[str]) -> list[str]:
    """Where a relayed tunnel at ``tunnel_url`` may connect: ``tunnel_url`` first, then the
    same relay path and query on each other configured coordinator (in the configured order,
    after the one it names), each in ``ws``/``wss`` as its coordinator is ``http``/``https``.

    Only ``[tunnel_url]`` when its origin is none of ``coordinators``, or its path is not a
    relay path below that coordinator's own path: the lease token and the user's key are
    presented only to coordinators the user configured.
    """
    parts = urlsplit(tunnel_url)
    try:
        mine = origin(tunnel_url)
    except ValueError:
        return [tunnel_url]
    index = next(
        (i for i, url in enumerate(coordinators) if _same_origin(url, mine)),
        None,
    )
    if index is None:
        return [tunnel_url]
    base = urlsplit(coordinators[index]).path.rstrip("/")
    if not parts.path.startswith(base + RELAY_SEGMENT):
        return [tunnel_url]
    suffix = parts.path[len(base) :]
    found = [tunnel_url]
    for url in [*coordinators[index + 1 :], *coordinators[:index]]:
        other = urlsplit(url)
        scheme = _WS_OF.get(other.scheme.lower())
        if scheme is None:
            continue
        candidate = urlunsplit(
            (scheme, other.netloc, other.path.rstrip("/") + suffix, parts.query, "")
        )
        if candidate not in found:
            found.append(candidate)
    return found


def _same_origin(url: str, wanted: tuple[str, str, int]) -> bool:
    try:
        return origin(url) == wanted
    except ValueError:
        return False


def _text(value: str | Iterable[str]) -> str:
    return value if isinstance(value, str) else ",".join(value)
