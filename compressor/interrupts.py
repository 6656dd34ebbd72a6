"""Ctrl-C and SIGTERM turned into an exception in the main thread, so that every ``with`` block on the way out
(staging folders, above all) cleans up, and then into one line and exit status 128 + the signal's number.

Imports only the standard library, so that the ``compress`` executable installs the handlers before it imports
anything else (``compressor/__main__.py``).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by the signal handler."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


received: list[int] = []
"""The signals received so far (an import interrupted half-way can turn ``Interrupted`` into another error)."""

RESEND_SECONDS = 0.05
"""How soon a signal that arrived during an import is delivered again."""

deferral = {"armed": False}
"""Whether the next delivery of a signal deferred by an import or a finaliser is pending."""

holding = {"depth": 0, "pending": None}
"""While ``depth`` > 0 (:func:`held`), a signal is noted in ``pending`` instead of raising."""


def install() -> None:
    """Handle SIGINT and SIGTERM with :func:`interrupt`, except a signal the parent process ignores (a background
    job of a script inherits SIGINT ignored: it stays ignored)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, interrupt)


def interrupt(signum, frame):
    """Raise ``Interrupted``. Within :func:`held`, note the signal instead (it is raised when the block ends). During
    an import or a finaliser, deliver the signal again shortly instead (an import can run Python code called from
    C++, torch's extensions, where an exception aborts the whole process, and libraries' bare ``except:`` around
    imports can swallow it; Python prints and drops an exception raised in a ``__del__``), unless a delivery is
    already pending: the user repeated the signal, which raises at once (a way out of an import that hangs)."""
    if holding["depth"]:
        holding["pending"] = holding["pending"] or signum
        return
    if cannot_raise(frame) and not deferral["armed"]:
        deferral["armed"] = True
        timer = threading.Timer(RESEND_SECONDS, deliver_again, (signum,))
        timer.daemon = True  # a command that ends meanwhile has finished its work: nothing to interrupt
        timer.start()
        return
    received.append(signum)
    raise Interrupted(signum)


@contextmanager
def held() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM wait: blocked in the main thread, and a delivery to another thread (the
    kernel may choose any thread that does not block it; Python then runs the handler in the main thread) only
    noted by :func:`interrupt`. After the block, a signal that arrived is raised as ``Interrupted``. Blocks nest."""
    signals = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    holding["depth"] += 1
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a signal blocked meanwhile is handled now: noted
        holding["depth"] -= 1
        if not holding["depth"] and holding["pending"] is not None:
            signum, holding["pending"] = holding["pending"], None
            received.append(signum)
            raise Interrupted(signum)


def deliver_again(signum: int) -> None:
    """Send ``signum`` to the main thread: it stays pending while the main thread blocks it
    (``outputs._signals_held`` around the last renames of an output folder)."""
    deferral["armed"] = False
    signal.pthread_kill(threading.main_thread().ident, signum)


def cannot_raise(frame) -> bool:
    """Whether ``frame`` or one of its callers runs Python's import machinery or a finaliser (``__del__``, whose
    exceptions Python drops), where an exception would not reach the command."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib") or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def exit_interrupted(signum: int) -> None:
    """Say that the command was interrupted, and exit with status 128 + ``signum``."""
    print(f"\ncompress: interrupted ({signal.Signals(signum).name}); nothing half-written was left.", file=sys.stderr)
    sys.exit(128 + signum)
