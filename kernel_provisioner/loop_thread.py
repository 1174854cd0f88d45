"""An asyncio event loop on a thread of its own, for a tunnel whose caller runs no loop.

The tunnel pumps frames in tasks of an event loop, between the kernel manager's calls as
much as during them. Jupyter Server and every :class:`~jupyter_client.manager.AsyncKernelManager`
keep their loop running, so the tunnel shares it; the blocking
:class:`~jupyter_client.manager.KernelManager` (``jupyter console``, qtconsole, ``jupyter run``,
jupyter_kernel_test, scripts) runs a loop only inside each of its calls, so the tunnel gets a
:class:`LoopThread` instead, as jupyter_client's threaded channels get an ``IOLoopThread``::

    thread = LoopThread("io-remote kernel 1234")
    result = await thread.run(coro())   # from any other loop: runs coro there, awaits it here
    thread.stop()                       # from any thread, the loop's own included

Cancelling the caller's ``await thread.run(...)`` cancels the coroutine on the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["LoopThread"]

_T = TypeVar("_T")

#: Seconds :meth:`LoopThread.stop` waits for the thread to finish its loop's last tasks.
STOP_TIMEOUT = 10.0


class _ExitSafeExecutor(ThreadPoolExecutor):
    """The loop's default executor (``asyncio.to_thread``), still working at interpreter
    exit: by the time ``atexit`` handlers run (ending a session the application never shut
    down, :mod:`kernel_provisioner.provisioner`), ``concurrent.futures`` refuses new work
    ("cannot schedule new futures after shutdown"), so a cleanup that reads or removes files
    in a thread would fail and leave the session to the provider's grace period. Then each
    call runs on a daemon thread of its own."""

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        try:
            return super().submit(fn, *args, **kwargs)
        except RuntimeError:  # the executor or the interpreter is shutting down
            future: Future[_T] = Future()

            def work() -> None:
                if not future.set_running_or_notify_cancel():
                    return
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    future.set_exception(exc)

            threading.Thread(target=work, name="io-remote exit work", daemon=True).start()
            return future


class LoopThread:
    """A daemon thread running one event loop until :meth:`stop`.

    The thread starts with the object. A daemon thread, so it never holds up the exit of a
    process that forgot its kernel. ``on_stop`` runs on the loop once it has stopped, before
    what is left on it is cancelled (to close clients bound to the loop, say).
    """

    def __init__(
        self, name: str, on_stop: Callable[[], Coroutine[Any, Any, None]] | None = None
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(_ExitSafeExecutor(thread_name_prefix=f"{name} io"))
        self._on_stop = on_stop
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        """The thread's name."""
        return self._thread.name

    @property
    def alive(self) -> bool:
        """True until the thread has finished (some time after :meth:`stop`)."""
        return self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stopping

    def is_current(self) -> bool:
        """True when called from a coroutine running on this thread's loop."""
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    async def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on this thread's loop and return (or raise) what it does, awaited
        from the caller's loop. Raises :class:`RuntimeError` once the thread is stopping."""
        if self._stopping:
            coro.close()
            raise RuntimeError(f"{self.name} is stopped")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return await asyncio.wrap_future(future)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the loop: what still runs on it is cancelled, then the loop is closed.

        From another thread, waits (at most ``timeout`` seconds) for the thread to finish;
        from the loop's own thread, only asks, and the thread finishes once the current
        callback returns. Idempotent.
        """
        if not self._stopping:
            self._stopping = True
            with contextlib.suppress(RuntimeError):  # closed already
                self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _main(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                if self._on_stop is not None:
                    loop.run_until_complete(self._on_stop())
                # As asyncio.run() ends: cancel what is left and let it unwind.
                tasks = asyncio.all_tasks(loop)
                for task in tasks:
                    task.cancel()
                if tasks:
                    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()
