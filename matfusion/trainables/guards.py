"""A trial's guards, in its Ray worker: one clear error for what goes wrong inside a trial.

- :class:`CheckedSession`: a report with a non-finite loss or validation MAE raises
  :class:`~matfusion.trainables.loop.NonFiniteLossError` before Tune, Optuna or ASHA see it;
- :func:`checked_reader`: a checkpoint that cannot be read is a :class:`CorruptCheckpointError` naming it;
- :func:`as_memory_error`: torch's allocator failure as a :class:`TrialOutOfMemory` (a MemoryError);
- :class:`FaultySession`: the faults ``MATFUSION_INJECT_FAULTS`` injects (tests and drills only;
  the spec and its reading in the driver: :mod:`matfusion.search.faults`).

How a failed trial is then reported (one line, MLflow tag, the summary) is the search's:
:mod:`matfusion.search.faults`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Optional

from .loop import NonFiniteLossError

INJECT_ENV = "MATFUSION_INJECT_FAULTS"
FAULT_KINDS = ("error", "memory", "nan", "slow")
SLOW_REPORT_S = 1.0  # the wait of a ``slow`` fault before each report
CHECKED_METRICS = ("train_loss", "val_mae", "best_val_mae")  # must be finite in every report
OOM_MARKERS = ("can't allocate memory", "out of memory", "cannot allocate memory", "std::bad_alloc")


class CorruptCheckpointError(RuntimeError):
    """The checkpoint a trial is restored from cannot be read (truncated, overwritten, another format)."""


class TrialOutOfMemory(MemoryError):
    """A trial's allocation failed (Python's MemoryError, or torch's allocator error, as one type)."""


def first_line(text: str) -> str:
    """The first non-blank line of ``text``, stripped ("" for none)."""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


class CheckedSession:
    """The session a trainable reports through (wrapping Tune's): a report with a non-finite
    loss or validation MAE raises :class:`~matfusion.trainables.loop.NonFiniteLossError` (no such
    result reaches Tune, Optuna or ASHA), and a checkpoint that cannot be read raises
    :class:`CorruptCheckpointError` naming it."""

    def __init__(self, session, family: str) -> None:
        self.session, self.family = session, family

    def get_state(self):
        return self.session.get_state()

    def report(self, metrics: dict, state) -> None:
        for key in CHECKED_METRICS:
            value = metrics.get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise NonFiniteLossError(
                    f"{self.family} reported {key}={value} at epoch {metrics.get('epoch', '?')}; the trial is "
                    "stopped (its model diverged, or its validation rows have no finite target)"
                )
        self.session.report(metrics, state)


def checked_reader(read, family: str):
    """``read(directory)`` of a family's checkpoint, any failure of it as :class:`CorruptCheckpointError`."""

    def read_checked(directory: str) -> dict:
        try:
            return read(directory)
        except Exception as err:  # noqa: BLE001 - whatever a damaged file raises
            files = ", ".join(sorted(os.listdir(directory))) if os.path.isdir(directory) else "no files"
            raise CorruptCheckpointError(
                f"the {family} checkpoint it resumes from cannot be read ({type(err).__name__}: "
                f"{first_line(str(err)) or 'no message'}; {os.path.basename(directory)}: {files}); "
                "the trial cannot continue from it: start a new search, or delete that trial's folder"
            ) from err

    return read_checked


def as_memory_error(err: BaseException) -> Optional[TrialOutOfMemory]:
    """torch's allocator failure (a RuntimeError ``DefaultCPUAllocator: can't allocate memory``, or
    ``torch.OutOfMemoryError``) as a :class:`TrialOutOfMemory`; None for any other error."""
    text = first_line(str(err)).lower()
    if type(err).__name__ == "OutOfMemoryError" or any(m in text for m in OOM_MARKERS):
        return TrialOutOfMemory(first_line(str(err)))
    return None


# -- fault injection -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    family: str
    epoch: int
    kind: str


def parse_faults(spec: Optional[str]) -> tuple[Fault, ...]:
    """The faults of a ``MATFUSION_INJECT_FAULTS`` value (see the module docstring)."""
    faults = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            where, kind = item.split("=")
            family, epoch = where.split("@")
            fault = Fault(family.strip(), int(epoch), kind.strip())
        except ValueError:
            raise ValueError(f"{INJECT_ENV}: {item!r} is not FAMILY@EPOCH=KIND (e.g. lgbm@2=error)") from None
        if fault.kind not in FAULT_KINDS or fault.epoch < 1:
            raise ValueError(f"{INJECT_ENV}: {item!r}: KIND is one of {', '.join(FAULT_KINDS)}, EPOCH >= 1")
        faults.append(fault)
    return tuple(faults)


class FaultySession:
    """Wraps a trial's session: the faults of its family happen when it reports their epoch.

    ``slow`` is the one lasting fault: from its epoch on, every report waits ``SLOW_REPORT_S``
    first (a drill for what needs a trial caught mid-way, e.g. a node killed while it runs)."""

    def __init__(self, session, faults, sleep=time.sleep) -> None:
        self.session, self.sleep = session, sleep
        self.faults = {f.epoch: f for f in faults if f.kind != "slow"}
        self.slow_from = min((f.epoch for f in faults if f.kind == "slow"), default=None)

    def get_state(self):
        return self.session.get_state()

    def report(self, metrics: dict, state) -> None:
        epoch = int(metrics.get("epoch", 0) or 0)
        if self.slow_from is not None and epoch >= self.slow_from:
            self.sleep(SLOW_REPORT_S)
        fault = self.faults.get(epoch)
        if fault is not None:
            where = f"{fault.family} at epoch {fault.epoch}"
            if fault.kind == "error":
                raise RuntimeError(f"injected fault ({INJECT_ENV}): an error in {where}")
            if fault.kind == "memory":
                raise MemoryError(f"injected fault ({INJECT_ENV}): out of memory in {where}")
            metrics = {**metrics, "train_loss": float("nan"), "val_mae": float("nan")}
        self.session.report(metrics, state)
