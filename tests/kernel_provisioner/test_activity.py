"""The user's side of a class's idle timeout (kernel_provisioner.activity): an execution in
flight is activity however long it runs silently; idle time counts from the last reply;
other shell traffic is not execution; the file channel's gate and tap still run."""

from __future__ import annotations

from jupyter_client.session import Session

from jupyter_io.bridge import Bridge
from jupyter_io.protocol import Channel, Tunnel
from kernel_provisioner.activity import KernelActivity


def _parts(session: Session, msg_type: str, parent: dict[str, object] | None = None) -> list[bytes]:
    message = session.msg(msg_type, {}, parent=parent)
    return [b"client-identity", *session.serialize(message)]


def test_an_execution_in_flight_is_activity_and_idle_counts_from_the_last_reply() -> None:
    now = [1000.0]
    activity = KernelActivity(clock=lambda: now[0])
    heard: list[str] = []
    bridge = Bridge(
        Tunnel(),
        outbound={},
        inbound={},
        on_control=lambda frame: None,
        gates={Channel.SHELL: lambda parts: heard.append("gate")},
        taps={Channel.SHELL: lambda parts: heard.append("tap")},
    )
    activity.watch(bridge)
    gate, tap = bridge.gates[Channel.SHELL], bridge.taps[Channel.SHELL]
    session = Session(key=b"k")
    now[0] += 50
    assert activity.idle_seconds() == 50  # nothing ran since the start
    gate(_parts(session, "complete_request"))  # not an execution
    assert activity.idle_seconds() == 50
    request = session.msg("execute_request", {})
    gate([b"client-identity", *session.serialize(request)])
    now[0] += 3600  # a silent hour-long cell
    assert activity.idle_seconds() == 0
    tap(_parts(session, "execute_reply", parent=request))
    now[0] += 90
    assert activity.idle_seconds() == 90
    assert heard == ["gate", "gate", "tap"]  # the file channel's hooks still heard them
