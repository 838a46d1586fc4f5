"""SIGINT and SIGTERM during a search: the search stops as a resumable, interrupted one.

Ray Tune stops its loop on SIGINT (and SIGUSR1) by itself: it snapshots the experiment one
last time with the running trials still RUNNING (what ``Tuner.restore`` continues), then stops
them.  It says nothing to its caller, and SIGTERM (what ``kill``, systemd, docker and batch
schedulers send) it does not catch at all.  :class:`SearchSignals` takes both signals for the
time of a search, remembers the first one, and:

- before the trials run (loading, featurizing, starting Ray): raises :class:`SearchInterrupted`;
- while they run (``during_fit``): hands the signal to Tune's own stop handler, so the
  search ends as Tune ends an interrupted one; the caller then reports it interrupted;
- after (the leaderboard, the report): lets the search finish its bookkeeping;
- a second signal, at any time: raises :class:`SearchInterrupted` at once.

:class:`SearchInterrupted` is a ``KeyboardInterrupt`` (what code that cleans up on Ctrl-C
catches) carrying the signal; the CLI exits with 128 + its number (130 SIGINT, 143 SIGTERM).

Outside a search (``matfusion ensemble``, a benchmark's stacking), :func:`command_signals` makes
SIGTERM what Ctrl-C already is there: :class:`SearchInterrupted` raised where the command is, so
its clean-up runs and the CLI says ``interrupted (SIGTERM)`` and exits 143 (Python's default for
SIGTERM is to die at once: no clean-up, no line).
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_last: Optional[int] = None  # the signal that interrupted the latest search of this process


class SearchInterrupted(KeyboardInterrupt):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_status(signum: Optional[int]) -> int:
    """The shell's status for a process ended by ``signum`` (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum or signal.SIGINT)


def signal_name(signum: Optional[int]) -> str:
    return signal.Signals(int(signum or signal.SIGINT)).name


def last_signal() -> Optional[int]:
    """The signal that interrupted the latest search of this process, or None."""
    return _last


def _ended_in_forked_child(pid: int, signum: int) -> bool:
    """In a forked child of process ``pid`` (e.g. a featurization pool worker, which its pool ends
    with SIGTERM), which inherited a handler: end as the signal's default would, without a
    traceback.  False in ``pid`` itself."""
    if os.getpid() == pid:
        return False
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return True


class SearchSignals:
    """Context manager: SIGINT and SIGTERM handled as described in the module docstring
    (in the main thread only; elsewhere it does nothing).  ``signum``: the first signal seen."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.phase = "before"
        self._pid = os.getpid()
        self._saved: dict = {}
        self._saved_env: Optional[str] = None

    def __enter__(self) -> "SearchSignals":
        global _last
        _last = None
        self._pid = os.getpid()
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in SIGNALS:
            self._saved[sig] = signal.getsignal(sig)
        self._install()
        # Tune would replace our SIGINT handler for the time of fit(); its SIGUSR1 one stays ours to call
        self._saved_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved = {}
        if self._saved_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._saved_env

    def _install(self) -> None:
        if self._saved:  # only where __enter__ could (the main thread)
            for sig in SIGNALS:
                signal.signal(sig, self._handle)

    @contextmanager
    def during_fit(self):
        """Mark the time of ``Tuner.fit()``: a first signal then stops Tune's loop."""
        self.phase = "fit"
        self._install()  # again: ray.init() puts its own SIGTERM handler (a stack dump, then abort) in place
        try:
            yield
        finally:
            self.phase = "after"

    @property
    def interrupted(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        global _last
        if _ended_in_forked_child(self._pid, signum):
            return
        first = self.signum is None
        if first:
            self.signum = _last = signum
        name = signal.Signals(signum).name
        tune_stop = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
        if first and self.phase == "fit" and callable(tune_stop):
            print(
                f"\nmatfusion: {name}: stopping the search (resumable with --resume); send it again to stop at once",
                flush=True,
            )
            tune_stop(signum, frame)
            return
        if first and self.phase == "after":
            print(f"\nmatfusion: {name}: finishing the search's report; send it again to stop at once", flush=True)
            return
        raise SearchInterrupted(signum)


@contextmanager
def command_signals():
    """For the time of one command (:func:`matfusion.cli.main`): SIGTERM raises
    :class:`SearchInterrupted` in this process (main thread only; a forked child that inherits the
    handler ends as SIGTERM's default would).  A search inside puts its own handlers in place
    (:class:`SearchSignals`) and this one back when it ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pid = os.getpid()

    def handle(signum, frame) -> None:
        if not _ended_in_forked_child(pid, signum):
            raise SearchInterrupted(signum)

    saved = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, saved)
