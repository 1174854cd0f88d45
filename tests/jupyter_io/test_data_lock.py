"""The data directory lock (jupyter_io.data_lock) held by real processes, and a second
``jupyter io demo`` refused at once by it."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jupyter_io.data_lock import LOCK_FILE, DataDirBusy, DataDirLock

JUPYTER = str(Path(sys.executable).with_name("jupyter"))
LAB_URL = "http://127.0.0.1:8899/lab?token=held-by-the-first"

HOLDER = textwrap.dedent(
    """
    import sys
    from jupyter_io.data_lock import DataDirLock
    lock = DataDirLock(sys.argv[1])
    lock.acquire(pid=__import__("os").getpid())
    lock.update(lab_url=sys.argv[2])
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes it, or kills us
    """
)


def start_holder(directory: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory), LAB_URL],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == "locked\n"  # blocks until locked (or EOF: it died)
    return holder


def test_a_second_process_is_refused_with_the_holders_record_until_the_holder_dies(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "data"
    holder = start_holder(directory)
    try:
        mine = DataDirLock(directory)
        with pytest.raises(DataDirBusy) as busy:
            mine.acquire(pid=os.getpid())
        assert busy.value.holder == {"pid": holder.pid, "lab_url": LAB_URL}
        assert str(holder.pid) in str(busy.value)
        assert not mine.held
        assert stat.S_IMODE((directory / LOCK_FILE).stat().st_mode) == 0o600
    finally:
        holder.send_signal(signal.SIGKILL)  # no chance to release anything itself
        holder.wait(timeout=30)
    # The kernel released the dead holder's lock: no stale lock file to clean up by hand.
    mine.acquire(pid=os.getpid(), lab_url=None)
    assert mine.holder() == {"pid": os.getpid(), "lab_url": None}
    mine.release()
    assert mine.holder() == {}
    again = DataDirLock(directory)
    again.acquire()
    again.release()


def test_one_process_cannot_lock_a_directory_twice(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path)
    first.acquire(pid=1)
    try:
        with pytest.raises(DataDirBusy):
            DataDirLock(tmp_path).acquire()
    finally:
        first.release()


def test_a_second_demo_refuses_at_once_naming_the_running_ones_lab_url(
    tmp_path: Path, jupyter_env: Path
) -> None:
    data = tmp_path / "demo"
    holder = start_holder(data)
    try:
        started = time.monotonic()
        done = subprocess.run(
            [JUPYTER, "io", "demo", "--no-lab", "--data-dir", str(data),
             f"--Demo.kernelspec_prefix={jupyter_env}"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        took = time.monotonic() - started
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert done.returncode == 1, done.stderr
    assert f"another `jupyter io demo` (pid {holder.pid})" in done.stderr
    assert f"its JupyterLab is at {LAB_URL}" in done.stderr
    assert "--data-dir" in done.stderr and "Traceback" not in done.stderr
    # Refused before anything started: no coordinator, no keys of its own, no database.
    assert sorted(p.name for p in data.iterdir()) == [LOCK_FILE]
    assert "coordinator: stopping" not in done.stderr
    assert took < 30, f"refused only after {took:.1f} s"
    assert json.loads((data / LOCK_FILE).read_text())["lab_url"] == LAB_URL  # untouched
