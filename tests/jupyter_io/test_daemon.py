"""Listen addresses and signal capture shared by the coordinator and the provider host."""

from __future__ import annotations

import logging
import os
import signal

import pytest

from jupyter_io.daemon import capture_signals, is_loopback, parse_listen
from jupyter_io.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:0", ("127.0.0.1", 0)), ("9000", ("127.0.0.1", 9000)), ("[::1]:80", ("::1", 80))],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["nope", ":80", "host:99999", "[::1]", "h:x"])
def test_parse_listen_refuses_with_an_example(text: str) -> None:
    with pytest.raises(ConfigError, match="listen"):
        parse_listen(text, example_port=8700)


def test_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")


def test_signals_request_exit_and_previous_handlers_come_back() -> None:
    exits: list[str] = []

    def before(signum: int, frame: object) -> None:
        exits.append("old handler")

    old = signal.signal(signal.SIGTERM, before)
    try:
        with capture_signals(lambda: exits.append("exit"), logging.getLogger("t")):
            os.kill(os.getpid(), signal.SIGTERM)
        assert exits == ["exit"]
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, old)
