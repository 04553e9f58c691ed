"""A Lightning ``Trainer`` for the examples and benchmarks: no logger, checkpoints, progress bar,
model summary or validation — nothing but the optimizer steps and the callbacks."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl

__all__ = ["quiet_trainer"]


def quiet_trainer(max_steps: int, callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    """A ``Trainer`` that runs ``max_steps`` optimizer steps with ``callbacks`` and writes nothing."""
    return pl.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )
