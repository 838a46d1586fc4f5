"""Writes to an MLflow tracking server that outlive the server going away for a while.

The search driver's trial logger (:class:`~matfusion.tracking.logger.MlflowTrialLogger`) sends
every write (a run, its params, config artifact, metrics, tags, its end) through an
:class:`Outbox`.  A write is sent at once, with MLflow's own retries kept short
(:func:`quick_requests`: no retry, a 10 s timeout, instead of MLflow's 7 retries with a back-off
of minutes).  A write that fails because the server does not answer (connection refused or
reset, a timeout, a 5xx answer: :func:`unreachable`) waits in memory, in order, and every later
write waits behind it; each later write first retries what waits (at most once every
``retry_every_s``), and the search's end (:meth:`Outbox.drain`) retries for ``END_GRACE_S`` more.
So a server that comes back before the search ends loses nothing.  A write the server refuses
(a bad name, a bad value) raises as before.

The queue is bounded (``max_writes``): when full, new metric writes are dropped, counted, and
named in :meth:`Outbox.unsent_line`; a run, its params, tags and end always wait.  The same line
says what was never sent when the server is still down at the end.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

REQUEST_RETRIES = 0  # MLFLOW_HTTP_REQUEST_MAX_RETRIES of the driver's writes (MLflow's default: 7)
REQUEST_TIMEOUT_S = 10  # MLFLOW_HTTP_REQUEST_TIMEOUT (MLflow's default: 120 s)
RETRY_EVERY_S = 5.0  # while the server is down, what waits is retried at most this often
END_GRACE_S = 20.0  # at the search's end, how long to keep retrying before giving up
MAX_WRITES = 20_000  # writes waiting at most (then new metric writes are dropped)
KINDS = ("runs", "params", "artifacts", "metrics", "tags", "run ends")  # the order of unsent_line

_UNREACHABLE_TEXT = (
    "connection refused",
    "connection aborted",
    "connection reset",
    "max retries exceeded",
    "failed to establish a new connection",
    "remotedisconnected",
    "timed out",
    "timeout exception",
    "too many 500",
    "too many 502",
    "too many 503",
    "too many 504",
)


@contextmanager
def quick_requests(retries: int = REQUEST_RETRIES, timeout_s: float = REQUEST_TIMEOUT_S) -> Iterator[None]:
    """MLflow's HTTP requests inside the block: ``retries`` retries, ``timeout_s`` each (MLflow
    reads both variables at every request); the process's own values come back after it."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s))}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def unreachable(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it came from) says the server did not answer, as opposed
    to an answer refusing the write."""
    seen: set = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (ConnectionError, TimeoutError)):
            return True
        name = type(err).__name__
        if name in ("ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "MaxRetryError", "ProtocolError"):
            return True
        text = str(err).lower()
        if text.startswith("api request to ") and any(m in text for m in _UNREACHABLE_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


@dataclass
class Write:
    """One write: what it carries (``counts``: runs, params, artifacts, metrics, tags, run ends),
    whose (``label``: a trial's run name) and the call that sends it."""

    label: str
    counts: dict
    send: Callable[[], None] = field(repr=False)


class Outbox:
    """Sends :class:`Write` s in order; keeps those the server did not take (see the module docstring)."""

    def __init__(
        self,
        uri: str,
        retry_every_s: float = RETRY_EVERY_S,
        max_writes: int = MAX_WRITES,
        stream=None,
    ) -> None:
        self.uri = uri
        self.retry_every_s = retry_every_s
        self.max_writes = max_writes
        self._stream = stream  # None: sys.stderr at the time of writing
        self.pending: deque = deque()
        self.dropped: Counter = Counter()
        self.sent_late = 0  # writes that waited, then were sent
        self.outages = 0
        self._dropped_said = 0  # metric values dropped that a line has named already
        self._late_said = 0  # writes sent late that a line has counted already (earlier outages)
        self._next_try = 0.0
        self._down_since: Optional[float] = None

    def _say(self, line: str) -> None:
        print(line, file=self._stream or sys.stderr, flush=True)

    @property
    def down(self) -> bool:
        return bool(self.pending)

    def put(self, write: Write) -> None:
        """Send ``write`` now, after what waits; or keep it (the server does not answer)."""
        if self.pending:
            self.flush()
        if self.pending:
            self._keep(write)
            return
        try:
            with quick_requests():
                write.send()
        except Exception as err:  # noqa: BLE001 - sorted below: unreachable waits, a refusal raises
            if not unreachable(err):
                raise
            self._went_down(err)
            self._keep(write)

    def _keep(self, write: Write) -> None:
        if len(self.pending) >= self.max_writes and set(write.counts) <= {"metrics"}:
            self.dropped.update(write.counts)
            return
        self.pending.append(write)

    def _went_down(self, err: BaseException) -> None:
        self._next_try = time.monotonic() + self.retry_every_s
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.outages += 1
            self._say(
                f"matfusion: warning: the MLflow tracking server {self.uri} does not answer ({_short(err)}); "
                "the search goes on, its MLflow writes wait in memory and are sent when it answers again"
            )

    def flush(self, force: bool = False) -> bool:
        """Send what waits, in order, until one fails (retried at most once every
        ``retry_every_s`` unless ``force``); True when nothing waits any more."""
        if not self.pending:
            return True
        if not force and time.monotonic() < self._next_try:
            return False
        n = 0
        while self.pending:
            write = self.pending[0]
            try:
                with quick_requests():
                    write.send()
            except Exception as err:  # noqa: BLE001
                if not unreachable(err):
                    raise
                self._went_down(err)
                break
            self.pending.popleft()
            n += 1
        self.sent_late += n
        if not self.pending and self._down_since is not None:
            lost = sum(self.dropped.values()) - self._dropped_said
            self._dropped_said += lost
            dropped = f"; {lost} metric values were dropped while it was away (the queue was full)" if lost else ""
            late, self._late_said = self.sent_late - self._late_said, self.sent_late
            self._say(
                f"matfusion: the MLflow tracking server {self.uri} answers again after "
                f"{time.monotonic() - self._down_since:.0f} s; the {late} writes that waited are sent{dropped}"
            )
            self._down_since = None
        return not self.pending

    def drain(self, grace_s: float = END_GRACE_S) -> bool:
        """Retry what waits for up to ``grace_s`` (the search's end); True when all is sent."""
        deadline = time.monotonic() + grace_s
        while not self.flush(force=True):
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(self.retry_every_s, max(0.0, deadline - time.monotonic())))
        return True

    def unsent(self) -> Counter:
        """What was never sent: the counts of the writes that wait, and of those dropped."""
        total = Counter(self.dropped)
        for write in self.pending:
            total.update(write.counts)
        return total

    def unsent_line(self, where: str = "") -> str:
        """One line saying exactly what the server never got (and where a copy is), or ""."""
        total = self.unsent()
        if not total:
            return ""
        labels = sorted({w.label for w in self.pending})
        what = ", ".join(f"{total[k]} {k}" for k in KINDS if total[k])
        dropped = f" ({sum(self.dropped.values())} metric values dropped: the queue was full)" if self.dropped else ""
        trials = f" of {len(labels)} trial run(s) ({', '.join(labels[:8])}{', ...' if len(labels) > 8 else ''})"
        copy = f"; Ray Tune's results of every trial are in {where}" if where else ""
        return (
            f"matfusion: warning: the MLflow tracking server {self.uri} did not answer until the search ended: "
            f"not logged: {what}{trials}{dropped}{copy}"
        )


def _short(err: BaseException) -> str:
    text = str(err).lower()
    if any(m in text for m in ("connection refused", "errno 111", "failed to establish a new connection")):
        return "connection refused"
    if any(m in text for m in ("connection aborted", "connection reset", "remotedisconnected")):
        return "the connection was dropped"
    if "timed out" in text or "timeout" in text:
        return f"no answer within {REQUEST_TIMEOUT_S} s"
    line = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {line[:200]}"
