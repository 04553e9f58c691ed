"""SpaceTimeMaps: layers × steps heat maps of the other callbacks' histories, as TensorBoard images.

The callback measures nothing. Every ``every_n_steps`` optimizer steps and at the end of ``fit`` it
reads the histories the other lightning-eos callbacks in ``trainer.callbacks`` already keep, draws
the space-time maps of :func:`lightning_eos.plots.space_time_figure` and logs them with
``SummaryWriter.add_figure`` on every :class:`~lightning.pytorch.loggers.TensorBoardLogger`:

* ``<tag_prefix>/twin_gap`` and ``<tag_prefix>/growth_rate``: from ``TwinDivergence.history``
  (per-layer ``layers`` and ``layer_growth_rate``);
* ``<tag_prefix>/sharpness_ratio``: from ``SharpnessMonitor.history`` with ``per_layer=True``
  (each layer's block sharpness ÷ the critical sharpness of the record);
* ``<tag_prefix>/lr_multiplier``: from the local-LR controller's history (records with a per-layer
  ``multiplier`` mapping, e.g. ``AdaptiveLocalLR``).

Vertical marks show where the learning-rate schedule changed (read from the optimizers' param
groups at every step: a float per group, no device work). Rendering happens on rank zero only, on
matplotlib's Agg canvas (no pyplot state, no GUI), only at the interval: the training steps in
between pay nothing but that LR read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_eos import plots
from lightning_eos.callbacks._lightning import is_tensorboard_logger, logging_step
from lightning_eos.callbacks._validation import ArgCheck
from lightning_eos.callbacks.sharpness import SharpnessMonitor
from lightning_eos.callbacks.twin import TwinDivergence

__all__ = ["SpaceTimeMaps"]


def _as_dict(record: Any) -> Mapping[str, Any]:
    """A history record as a mapping: ``to_dict()`` when it has one, the dict itself otherwise."""
    to_dict = getattr(record, "to_dict", None)
    if callable(to_dict):
        out = to_dict()
        return out if isinstance(out, Mapping) else {}
    return record if isinstance(record, Mapping) else {}


def _x(record: Mapping[str, Any]) -> int | None:
    """The TensorBoard step of a record: its ``log_step``, else its ``global_step`` or ``step``."""
    for key in ("log_step", "global_step", "step"):
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return int(value)
    return None


def _per_layer(
    records: Iterable[Any], field: str, scale: str | None = None
) -> dict[str, tuple[list[int], list[float]]]:
    """``{layer: (steps, values)}`` from the ``field`` mapping of each record (÷ ``record[scale]``)."""
    points: dict[str, dict[int, float]] = {}
    for raw in records:
        r = _as_dict(raw)
        step, values = _x(r), r.get(field)
        if step is None or not isinstance(values, Mapping):
            continue
        div = 1.0
        if scale is not None:
            div = r.get(scale, math.nan)
            if not isinstance(div, (int, float)) or not math.isfinite(div) or div == 0:
                continue
        for layer, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                points.setdefault(str(layer), {})[step] = float(value) / div  # a repeated step: last wins
    return {layer: (sorted(p), [p[s] for s in sorted(p)]) for layer, p in points.items()}


class _LRTrace:
    """Per param group ``(step, lr)`` points, flat stretches kept by their two ends only."""

    def __init__(self) -> None:
        self.points: dict[str, list[tuple[int, float]]] = {}
        self._pending: dict[str, tuple[int, float]] = {}

    def add(self, key: str, step: int, lr: float) -> None:
        pts = self.points.setdefault(key, [])
        if pts and pts[-1][1] == lr:
            self._pending[key] = (step, lr)  # still flat: remember the latest point only
            return
        pending = self._pending.pop(key, None)
        if pending is not None:
            pts.append(pending)
        pts.append((step, lr))

    def series(self) -> list[tuple[list[int], list[float]]]:
        out = []
        for key, pts in self.points.items():
            full = [*pts, self._pending[key]] if key in self._pending else list(pts)
            out.append(([s for s, _ in full], [v for _, v in full]))
        return out


class SpaceTimeMaps(Callback):
    """Log layers × steps heat maps of the run as TensorBoard images (the "Images" tab).

    Args:
        every_n_steps: render every N optimizer steps (and at the end of ``fit``). Each render
            draws every available map once (a few tenths of a second on rank zero).
        maps: which maps to draw, any of ``"twin_gap"``, ``"growth_rate"``, ``"sharpness_ratio"``,
            ``"lr_multiplier"``; a map without data (e.g. no twin attached) is skipped.
        tag_prefix: the image tags are ``<tag_prefix>/<map>``.
        at_fit_end: also render once when ``fit`` ends.
        max_columns: above this many steps, columns are averaged into this many bins.

    Attributes:
        renders: how many times the maps were drawn.
        render_seconds: wall time spent drawing and logging them (rank zero).
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        maps: Sequence[str] = plots.SPACE_TIME_KINDS,
        tag_prefix: str = "eos_maps",
        at_fit_end: bool = True,
        max_columns: int = 600,
    ) -> None:
        super().__init__()
        check = ArgCheck(type(self).__name__)
        check.positive_int("every_n_steps", every_n_steps)
        if isinstance(maps, str) or not isinstance(maps, (list, tuple)) or not maps:
            raise check.fail("maps", maps, f"a non-empty list of {list(plots.SPACE_TIME_KINDS)}")
        for kind in maps:
            check.choice("maps", kind, plots.SPACE_TIME_KINDS)
        check.log_prefix("tag_prefix", tag_prefix)
        check.flag("at_fit_end", at_fit_end)
        check.int_at_least("max_columns", max_columns, 2)
        self.every_n_steps = every_n_steps
        self.maps = tuple(dict.fromkeys(maps))
        self.tag_prefix = tag_prefix
        self.at_fit_end = at_fit_end
        self.max_columns = max_columns
        self.renders = 0
        self.render_seconds = 0.0
        self._lr = _LRTrace()
        self._due: int | None = None  # log step of a render that is due
        self._rendered_at: int | None = None
        self._seen_step = -1
        self._warned_no_logger = False

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        plots.require_matplotlib(type(self).__name__)  # fail before training, not at the first render

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._lr = _LRTrace()
        self._due, self._rendered_at, self._seen_step = None, None, trainer.global_step
        if not self._tensorboards(trainer) and not self._warned_no_logger:
            self._warned_no_logger = True
            rank_zero_warn(
                "SpaceTimeMaps: no TensorBoardLogger is attached to the Trainer, so no map is logged. "
                "Add logger=TensorBoardLogger(...)."
            )

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # A render that became due at the end of the previous step runs now, once every callback's
        # on_train_batch_end of that step has appended its record (whatever the callback order).
        if self._due is not None:
            self.render(trainer, self._due)
        # The LR the coming step applies (a step scheduler moved it at the end of the previous one).
        step = logging_step(trainer)
        for i, opt in enumerate(trainer.optimizers):
            for j, group in enumerate(opt.param_groups):
                lr = group.get("lr")
                if isinstance(lr, (int, float)):
                    self._lr.add(f"{i}/{j}", step, float(lr))

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._seen_step:
            return  # an accumulation micro-batch (or a skipped step): no optimizer step happened
        self._seen_step = trainer.global_step
        if trainer.global_step % self.every_n_steps == 0:
            self._due = logging_step(trainer)  # the x-axis value of this step's scalars

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._due is not None:
            self.render(trainer, self._due)
        if self.at_fit_end:
            last = max(logging_step(trainer) - 1, 0)
            if self._rendered_at != last:
                self.render(trainer, last)

    @property
    def lr_changes(self) -> list[int]:
        """Steps (TensorBoard x-axis) where the LR schedule changed, as marked on the maps."""
        return plots.lr_changes(self._lr.series())

    # ------------------------------------------------------------------ drawing
    @staticmethod
    def _tensorboards(trainer: Trainer) -> list[TensorBoardLogger]:
        return [lg for lg in trainer.loggers if is_tensorboard_logger(lg)]  # either framework's

    def collect(self, trainer: Trainer) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
        """``{map: {layer: (steps, values)}}`` from the histories of ``trainer.callbacks``."""
        data: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if cb is self:
                continue
            history = list(getattr(cb, "history", None) or [])
            if not history:
                continue
            if isinstance(cb, TwinDivergence):
                data.setdefault("twin_gap", {}).update(_per_layer(history, "layers"))
                data.setdefault("growth_rate", {}).update(_per_layer(history, "layer_growth_rate"))
            elif isinstance(cb, SharpnessMonitor):
                data.setdefault("sharpness_ratio", {}).update(_per_layer(history, "layers", scale="critical"))
            else:
                for field in ("multiplier", "multipliers"):  # the local-LR controller's records
                    found = _per_layer(history, field)
                    if found:
                        data.setdefault("lr_multiplier", {}).update(found)
                        break
        return {kind: layers for kind, layers in data.items() if layers and kind in self.maps}

    def render(self, trainer: Trainer, step: int) -> bool:
        """Draw every available map now and log it at ``step`` on each TensorBoard logger.

        Called by the hooks at the interval and at the end of ``fit``; callable by hand too (e.g. from
        another callback). Does nothing off rank zero, without a TensorBoard logger, or twice for the
        same step. Returns True when something was logged.
        """
        self._due = None
        if not trainer.is_global_zero or self._rendered_at == step:
            return False
        loggers = self._tensorboards(trainer)
        if not loggers:
            return False
        start = time.perf_counter()
        marks = self.lr_changes
        logged = False
        for kind, layers in self.collect(trainer).items():
            fig = plots.space_time_figure(
                layers,
                kind,  # type: ignore[arg-type]
                lr_changes=marks,
                max_columns=self.max_columns,
            )
            for logger in loggers:  # drawn once, rasterized by each writer
                logger.experiment.add_figure(f"{self.tag_prefix}/{kind}", fig, global_step=step, close=False)
            logged = True
        self._rendered_at = step
        if logged:
            self.renders += 1
        self.render_seconds += time.perf_counter() - start
        return logged
