"""TensorBoard event files -> plain series, read with TensorBoard's own ``EventAccumulator``.

:func:`read_run` finds every ``events.out.tfevents.*`` file under a folder (recursively), loads
each with :class:`tensorboard.backend.event_processing.event_accumulator.EventAccumulator` (all
scalars kept: no reservoir sampling) and merges the scalars by tag into one :class:`Series` per
tag, sorted by step. When several files hold the same tag at the same step (a resumed run writing a
new version folder) the value written last wins.

The step of every series is TensorBoard's x-axis: the step the callbacks log at, the one
``self.log`` uses (Lightning's ``_batches_that_stepped``).

Nothing here imports torch or Lightning.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "LIBRARY_KEYS",
    "Prefixes",
    "ReportError",
    "RunData",
    "Series",
    "find_event_files",
    "read_run",
]

#: The keys (and key families) the report looks for; at least one must be present in a run.
LIBRARY_KEYS: tuple[str, ...] = (
    "eos/stability_ratio",
    "eos/sharpness",
    "eos/critical_sharpness",
    "eos/sharpness/<layer>",
    "eos/lr/<group>",
    "twin/divergence",
    "twin/divergence/<layer>",
    "twin/growth_rate/<layer>",
    "twin/val_disagreement",
    "local_lr/multiplier/<layer>",
)

_EVENT_FILE_MARK = "tfevents"
# Total event-file size above which the progress bar appears on its own (smaller reads are instant).
_PROGRESS_BYTES = 32 * 2**20


@dataclasses.dataclass(frozen=True)
class Prefixes:
    """The key prefixes of the library's callbacks (their ``log_prefix`` arguments)."""

    eos: str = "eos"
    twin: str = "twin"
    local_lr: str = "local_lr"

    def all(self) -> tuple[str, str, str]:
        """``(eos, twin, local_lr)``."""
        return (self.eos, self.twin, self.local_lr)

    def rewrite(self, key: str) -> str:
        """A default key (``eos/...``, ``twin/...``, ``local_lr/...``) under these prefixes."""
        head, _, rest = key.partition("/")
        mapping = {"eos": self.eos, "twin": self.twin, "local_lr": self.local_lr}
        return f"{mapping.get(head, head)}/{rest}"


class ReportError(Exception):
    """A run cannot be reported on: missing folder, no event files, none of the library's keys.

    The message says what was looked for and where; the command line turns it into exit code 2.
    """


@dataclasses.dataclass(frozen=True)
class Series:
    """One scalar tag: ``steps`` (int64, increasing, unique) and ``values`` (float64), same length."""

    steps: np.ndarray
    values: np.ndarray

    def __post_init__(self) -> None:
        if self.steps.shape != self.values.shape or self.steps.ndim != 1:
            raise ValueError(
                f"Series: steps {self.steps.shape} and values {self.values.shape} must be 1-d and match."
            )

    def __len__(self) -> int:
        return int(self.steps.size)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[int, float]]) -> Series:
        """Build from ``(step, value)`` pairs in any order; for a repeated step the last pair wins."""
        merged: dict[int, float] = {}
        for step, value in pairs:
            merged[int(step)] = float(value)
        steps = np.array(sorted(merged), dtype=np.int64)
        values = np.array([merged[s] for s in steps.tolist()], dtype=np.float64)
        return cls(steps, values)

    @property
    def last(self) -> float:
        """The value at the largest step (NaN for an empty series)."""
        return float(self.values[-1]) if len(self) else float("nan")

    def finite(self) -> Series:
        """Only the points whose value is finite."""
        keep = np.isfinite(self.values)
        return Series(self.steps[keep], self.values[keep])


@dataclasses.dataclass
class RunData:
    """The scalars of one run: ``{tag: Series}`` in the order tags first appeared.

    Attributes:
        logdir: the folder that was read.
        files: the event files read, sorted.
        scalars: every scalar tag of every file, merged by tag.
    """

    logdir: Path
    files: list[Path]
    scalars: dict[str, Series]

    @property
    def folders(self) -> list[Path]:
        """The distinct folders holding the event files (TensorBoard shows each as its own run)."""
        return sorted({p.parent for p in self.files})

    def get(self, tag: str) -> Series | None:
        """The series of ``tag``, or None when the run did not log it."""
        return self.scalars.get(tag)

    def family(self, prefix: str) -> dict[str, Series]:
        """``{suffix: Series}`` for every tag ``prefix/<suffix>``, e.g. ``family("eos/sharpness")``
        gives the per-layer block sharpness keyed by layer name (layer names may contain ``/``)."""
        head = prefix.rstrip("/") + "/"
        return {tag[len(head) :]: s for tag, s in self.scalars.items() if tag.startswith(head)}

    def has_library_keys(self, prefixes: Prefixes | None = None) -> bool:
        """True when at least one tag starts with one of the library's prefixes."""
        heads = tuple(p.rstrip("/") + "/" for p in (prefixes or Prefixes()).all())
        return any(tag.startswith(heads) for tag in self.scalars)


def find_event_files(logdir: str | os.PathLike[str]) -> list[Path]:
    """Every TensorBoard event file under ``logdir`` (recursively), sorted by path.

    Raises:
        ReportError: ``logdir`` does not exist or is not a folder.
    """
    root = Path(logdir)
    if not root.exists():
        raise ReportError(f"log folder {str(root)!r} does not exist.")
    if not root.is_dir():
        raise ReportError(f"{str(root)!r} is not a folder; pass the folder a TensorBoardLogger wrote to.")
    return sorted(p for p in root.rglob("*") if _EVENT_FILE_MARK in p.name and p.is_file())


class _Progress:
    """A progress display over bytes read: tqdm when installed, else a counter on stderr."""

    def __init__(self, total: int, n_files: int, enabled: bool) -> None:
        self.enabled = enabled
        self.n_files = n_files
        self.done_files = 0
        self._bar: Any = None
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            self._bar = tqdm(
                total=total, unit="B", unit_scale=True, desc="reading event files", file=sys.stderr
            )

    def update(self, nbytes: int) -> None:
        self.done_files += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(nbytes)
        else:
            sys.stderr.write(f"\rreading event files: {self.done_files}/{self.n_files}")
            sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _scalars_of(path: Path) -> Iterator[tuple[str, list[tuple[int, float, float]]]]:
    """``(tag, [(step, wall_time, value), ...])`` for each scalar tag of one event file."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    # 0 = keep every event (the default samples scalars down to 10 000); other kinds are not needed.
    guidance = {
        ea.SCALARS: 0,
        ea.IMAGES: 1,
        ea.AUDIO: 1,
        ea.HISTOGRAMS: 1,
        ea.COMPRESSED_HISTOGRAMS: 1,
        ea.TENSORS: 1,
    }
    acc = ea.EventAccumulator(str(path), size_guidance=guidance)
    acc.Reload()
    for tag in acc.Tags().get(ea.SCALARS, []):
        yield tag, [(int(e.step), float(e.wall_time), float(e.value)) for e in acc.Scalars(tag)]


def read_run(
    logdir: str | os.PathLike[str],
    *,
    progress: bool | None = None,
    prefixes: Prefixes | None = None,
) -> RunData:
    """Read every event file under ``logdir`` into one :class:`RunData`.

    Args:
        logdir: the folder a ``TensorBoardLogger`` wrote to (any level above the event files).
        progress: show a progress bar on stderr (tqdm if installed, else a file counter). Default
            (None): only for reads of more than 32 MiB.
        prefixes: the key prefixes of the library's callbacks (their ``log_prefix``); a run without
            any tag under them is refused.

    Raises:
        ReportError: the folder is missing, holds no event files, or its event files hold none of
            the library's keys (the message lists the keys looked for).
    """
    prefixes = prefixes or Prefixes()
    root = Path(logdir)
    files = find_event_files(root)
    if not files:
        raise ReportError(
            f"no TensorBoard event files (events.out.tfevents.*) under {str(root)!r}; pass the folder "
            "a TensorBoardLogger wrote to (its save_dir, or a version folder inside it)."
        )
    sizes = [p.stat().st_size for p in files]
    show = sum(sizes) > _PROGRESS_BYTES if progress is None else progress
    bar = _Progress(sum(sizes), len(files), show)
    # tag -> step -> (wall_time, value): the later write of a step wins across files.
    points: dict[str, dict[int, tuple[float, float]]] = {}
    try:
        for path, size in zip(files, sizes):
            for tag, events in _scalars_of(path):
                slot = points.setdefault(tag, {})
                for step, wall, value in events:
                    old = slot.get(step)
                    if old is None or wall >= old[0]:
                        slot[step] = (wall, value)
            bar.update(size)
    finally:
        bar.close()
    scalars = {
        tag: Series.from_pairs((step, wv[1]) for step, wv in sorted(slot.items()))
        for tag, slot in points.items()
    }
    run = RunData(logdir=root, files=files, scalars=scalars)
    if not run.has_library_keys(prefixes):
        looked = ", ".join(prefixes.rewrite(k) for k in LIBRARY_KEYS)
        found = ", ".join(list(scalars)[:8]) or "no scalars at all"
        raise ReportError(
            f"{len(files)} event file(s) under {str(root)!r} hold none of lightning-eos's keys. Looked "
            f"for: {looked} (any tag under {', '.join(p + '/' for p in prefixes.all())}). Found: {found}. "
            "Attach SharpnessMonitor / TwinDivergence with a TensorBoardLogger, or pass the prefixes "
            "your callbacks were given (log_prefix)."
        )
    return run
