"""``jupyter io keygen PATH`` as a user runs it: a Solana CLI keypair file, never an overwrite."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

from solders.keypair import Keypair

from jupyter_io.identity import load_keypair

JUPYTER_IO = str(Path(sys.executable).with_name("jupyter-io"))


def keygen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [JUPYTER_IO, "keygen", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_keygen_writes_a_solana_cli_keypair_file_and_prints_its_public_key(
    tmp_path: Path,
) -> None:
    path = tmp_path / "new" / "deeper" / "id.json"
    done = keygen(str(path))
    assert done.returncode == 0, done.stderr
    # The Solana CLI's format: a JSON array of the 64 secret-key bytes, as solders reads it.
    raw = json.loads(path.read_text())
    assert isinstance(raw, list) and len(raw) == 64 and all(0 <= b < 256 for b in raw)
    keypair = Keypair.from_bytes(bytes(raw))
    assert done.stdout.strip() == str(keypair.pubkey())
    assert load_keypair(path).pubkey() == keypair.pubkey()
    # Readable by its owner only, in directories only its owner can enter.
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    assert str(path) in done.stderr

    # Never over an existing file: the keypair (an identity, maybe funds) stays as it was.
    before = path.read_bytes()
    again = keygen(str(path))
    assert again.returncode == 1 and again.stdout == ""
    assert "exists already" in again.stderr and "Traceback" not in again.stderr
    assert path.read_bytes() == before
    other = tmp_path / "other.json"
    other.write_text("my notes")
    assert keygen(str(other)).returncode == 1
    assert other.read_text() == "my notes"


def test_keygen_without_a_path_says_how_to_use_it() -> None:
    done = keygen()
    assert done.returncode == 1
    assert "usage: jupyter io keygen PATH" in done.stderr


def test_a_missing_keypair_names_the_flag_and_the_command_that_makes_one(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "id.json"
    for argv in (
        ["wallet", "address", "--keypair", str(missing)],
        ["kernelspec", "install", "--provider-url", "ws://127.0.0.1:9/tunnel",
         "--keypair", str(missing), "--prefix", str(tmp_path)],
    ):  # fmt: skip
        done = subprocess.run(
            [JUPYTER_IO, *argv], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 1, argv
        assert f"`jupyter io keygen {missing}`" in done.stderr, done.stderr
        assert "--keypair" in done.stderr and "keypair_path" not in done.stderr
