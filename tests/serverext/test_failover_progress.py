"""A failover's progress events as the Lab extension reads them from ``GET progress``.

The events are logged exactly as the provisioner logs them (``report`` on the server's
logger, the ``done`` message from ``failover.notice_text``); the failover itself, with real
provider hosts, is tests/kernel_provisioner/test_failover.py; Lab's notice of it,
tests/browser/test_failover.py.
"""

from __future__ import annotations

import time
from typing import Any

from kernel_provisioner.failover import notice_text
from kernel_provisioner.progress import ProgressEvent, ProgressStep, report

RTX_PRICE = 120_000_000


async def test_a_failover_reaches_the_progress_endpoint_with_what_the_notice_needs(
    fetch_json: Any, jp_serverapp: Any
) -> None:
    log = jp_serverapp.log  # the logger a provisioner under this server logs to
    t0 = time.time()
    at = iter(t0 + i for i in range(20))

    def step(step: ProgressStep, message: str, **details: Any) -> None:
        report(log, ProgressEvent(step, "k-f", message, at=next(at), details=details))

    step(ProgressStep.QUEUED, "asking for RTX 4090", gpu="RTX 4090")
    step(ProgressStep.LEASED, "leased", gpu="RTX 4090", provider="OldProv", lease="L1")
    step(ProgressStep.LAUNCHING, "launching")
    step(ProgressStep.READY, "ready")
    step(ProgressStep.FAILOVER, "provider OldProv was lost", phase="lost", old_provider="OldProv")
    step(ProgressStep.LEASED, "leased again", gpu="RTX 4090", provider="NewProv", lease="L2")
    step(ProgressStep.LAUNCHING, "launching")

    # While it moves, the kernel is starting again (Lab: "moving the kernel").
    _, launch = await fetch_json("jupyter-io", "progress", "k-f")
    assert launch["state"] == "starting"
    assert [e["step"] for e in launch["events"]] == ["failover", "leased", "launching"]
    assert launch["events"][0]["phase"] == "lost"

    step(ProgressStep.READY, "ready")
    missing = [{"name": "y", "cell": 3, "source": "y = open('big').read()", "why": "too large"}]
    facts = {
        "old_provider": "OldProv",
        "old_lease": "L1",
        "new_provider": "NewProv",
        "new_lease": "L2",
        "gpu": "RTX 4090",
        "price_lamports_per_hour": RTX_PRICE,
        "restored": ["x", "model"],
        "missing": missing,
        "journal": "restored",
        "files": False,
        "seconds": 5.2,
    }
    step(ProgressStep.FAILOVER, notice_text(facts), phase="done", **facts)

    # The failover's end is a finished start of its own (state ready, not a start that
    # never ends), carrying what Lab's notice and its "Re-run missing cells" button need.
    status, launch = await fetch_json("jupyter-io", "progress", "k-f")
    assert status == 200
    assert launch["state"] == "ready" and launch["step"] == "failover"
    (done,) = launch["events"]
    assert done["phase"] == "done"
    assert (done["old_provider"], done["new_provider"]) == ("OldProv", "NewProv")
    assert done["restored"] == ["x", "model"] and done["missing"] == missing
    assert "provider OldProv was lost" in done["message"]
    assert launch["provider"] == "NewProv" and launch["lease"] == "L2"
    assert [e.get("phase") for e in launch["history"] if e["step"] == "failover"] == [
        "lost",
        "done",
    ]

    # A failover that found no provider ends as a failed start, with its reason.
    step(ProgressStep.FAILOVER, "provider NewProv was lost", phase="lost")
    step(ProgressStep.FAILOVER, "no other provider could take the kernel", phase="failed")
    _, launch = await fetch_json("jupyter-io", "progress", "k-f")
    assert launch["state"] == "failed"
    assert launch["message"] == "no other provider could take the kernel"
