"""The coordinator given as several URLs: parsing the list, which ``dial`` a provider follows,
and where a relayed tunnel may resume (:mod:`jupyter_io.coordinator_urls`, no I/O)."""

from __future__ import annotations

import pytest
from traitlets import TraitError

from jupyter_io.coordinator_urls import dial_refusal, parse_coordinator_urls, relay_urls
from jupyter_io.errors import ConfigError
from jupyter_io.kernelspec import validate_coordinator_url
from provider_host.config import ProviderConfig

A = "http://a.example:8700"
B = "http://b.example:8700"
LINK_A = "ws://a.example:8700/api/v1/providers/connect"


def test_a_list_is_split_stripped_and_deduplicated_in_order() -> None:
    assert parse_coordinator_urls(f" {B}/ , {A},{B}") == (B, A)
    assert parse_coordinator_urls(A) == (A,)
    assert parse_coordinator_urls("") == ()
    assert parse_coordinator_urls([A, B]) == (A, B)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (f"{A},,{B}", "has an empty entry; separate URLs with single commas"),
        (f"{A},ftp://b:1", "coordinator_url entry 2 ('ftp://b:1') 'ftp://b:1' must look like"),
        (f"{A},http://b:99999", "entry 2 ('http://b:99999') 'http://b:99999' has no valid port"),
        ("http://a:1/?x=1", "must not carry a query or fragment"),
        ("a.example:8700", "'a.example:8700' must look like http://HOST:PORT"),
    ],
)
def test_a_bad_entry_is_named(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_coordinator_urls(value)
    assert message in str(caught.value)


def test_the_provider_and_the_server_extension_take_lists() -> None:
    config = ProviderConfig(coordinator_url=f"{A}, https://b.example")
    assert config.coordinator_url == f"{A},https://b.example"
    assert config.link_urls() == [LINK_A, "wss://b.example/api/v1/providers/connect"]
    with pytest.raises(TraitError, match=r"entry 2 \('gopher://b'\)"):
        ProviderConfig(coordinator_url=f"{A},gopher://b")
    assert validate_coordinator_url(f"{A}/, {B}") == f"{A},{B}"
    with pytest.raises(ConfigError, match="empty entry"):
        validate_coordinator_url(f"{A},")


LEASE = "lease-1"
RELAY_PATH = f"/relay/{LEASE}?side=provider&conn=3"


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        (f"ws://a.example:8700{RELAY_PATH}", True),  # the linked coordinator
        (f"ws://b.example:8700{RELAY_PATH}", True),  # another configured replica
        (f"ws://a.example:9900{RELAY_PATH}", True),  # another port of the linked host
        (f"wss://a.example:8700{RELAY_PATH}", False),  # another scheme on it: not listed
        (f"ws://b.example:9900{RELAY_PATH}", False),  # a listed host, an unlisted port
        (f"ws://evil.example:8700{RELAY_PATH}", False),  # anywhere else
        (f"ws://10.0.0.1:22{RELAY_PATH}", False),
        ("ws://a.example:8700/relay/another-lease?side=provider&conn=3", False),
        ("ws://a.example:8700/api/v1/leases", False),  # not a relay path
        (f"http://a.example:8700{RELAY_PATH}", False),  # not a websocket
    ],
)
def test_a_dial_is_followed_only_to_a_configured_or_the_linked_host(
    url: str, allowed: bool
) -> None:
    coordinators = [LINK_A, "ws://b.example:8700/api/v1/providers/connect"]
    refusal = dial_refusal(url, LEASE, coordinators=coordinators, linked=LINK_A)
    assert (refusal is None) is allowed, refusal


def test_a_relayed_tunnel_may_resume_on_every_configured_replica() -> None:
    tunnel = "ws://b.example:8700/relay/lease%201?side=client"
    coordinators = (A, B, "https://c.example/jio")
    assert relay_urls(tunnel, coordinators) == [
        tunnel,
        "wss://c.example/jio/relay/lease%201?side=client",
        "ws://a.example:8700/relay/lease%201?side=client",
    ]
    # A relay on no configured coordinator, or not a relay path: only where it is.
    assert relay_urls("ws://d.example:8700/relay/x?side=client", coordinators) == [
        "ws://d.example:8700/relay/x?side=client"
    ]
    assert relay_urls("ws://a.example:8700/tunnel", coordinators) == ["ws://a.example:8700/tunnel"]
    assert relay_urls(tunnel, (B,)) == [tunnel]
