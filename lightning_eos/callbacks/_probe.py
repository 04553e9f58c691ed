"""The probe set the curvature callbacks measure on, shared by SharpnessMonitor and AdaptiveLocalLR.

* :class:`FixedProbe` -- a sample set drawn once (seeded, without replacement) from the map-style
  train dataset: global indices (sorted, part of the checkpoint, so a resumed run measures the same
  samples), this rank's disjoint shard ``indices[rank::world]`` collated in chunks with the loader's
  ``collate_fn``, prepared as the training loop prepares a batch and kept on the device.
* :func:`probe_loss_is_finite` -- the all-ranks decision whether a probe can be measured at all.
* :func:`probe_objective` -- the loss a probe differentiates: the user's step (or ``loss_fn``) on a
  parameter-sharing replica, negated when the optimizer maximizes.
* :func:`probe_precision` -- gradients on, autocast off, for the probe's passes.
* :func:`loader_batch_size` -- samples per training batch of the train loader.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import IterableDataset

from lightning_eos.callbacks._lightning import StepReplica, any_rank
from lightning_eos.isolation import isolated_rng, rng_devices

__all__ = ["FixedProbe", "loader_batch_size", "probe_loss_is_finite", "probe_objective", "probe_precision"]

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def loader_batch_size(trainer: Trainer) -> int | None:
    """Samples per training batch of the (single) train loader: its ``batch_size``, or its batch
    sampler's (a loader built with ``batch_sampler=`` has ``batch_size=None``); None if unknown."""
    loader = trainer.train_dataloader
    size = getattr(loader, "batch_size", None) or getattr(
        getattr(loader, "batch_sampler", None), "batch_size", None
    )
    return int(size) if isinstance(size, int) and size > 0 else None


class FixedProbe:
    """A fixed probe set of the train dataset (see the module docstring).

    Args:
        owner: the callback's name, for error messages.
        size: global number of samples; ``"batch"``: one training batch per rank; ``None``: the
            whole dataset.
        chunk_size: samples per collated chunk (memory); ``None``: the train loader's batch size.
        seed: seed of the draw (a private generator: the global stream is never used).
    """

    def __init__(
        self, owner: str, size: int | Literal["batch"] | None, chunk_size: int | None, seed: int
    ) -> None:
        self.owner = owner
        self.size = size
        self.chunk_size = chunk_size
        self.seed = seed
        self.indices: torch.Tensor | None = None  # global index set, int64, sorted
        self.batches: list[Any] | None = None  # this rank's collated chunks, on device
        self.weights: list[float] | None = None  # sample count of each chunk

    def build(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Draw the indices (unless restored) and collate this rank's chunks onto the device."""
        loader = trainer.train_dataloader
        if isinstance(loader, (list, tuple, dict)):
            raise ValueError(
                f"{self.owner}(probe='fixed') needs a single train DataLoader; with several, use "
                "probe='current' (or pass loss_fn and a single loader)."
            )
        dataset = getattr(loader, "dataset", None)
        if dataset is None or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError(
                f"{self.owner}(probe='fixed') draws samples by index, so it needs a map-style train "
                f"dataset; got {type(dataset).__name__}. Use probe='current' to measure on the training "
                "batches instead."
            )
        n = len(dataset)
        train_batch = loader_batch_size(trainer)
        if self.indices is None:
            if self.size == "batch":
                size = min(n, (train_batch or n) * trainer.world_size)
            else:
                size = n if self.size is None else min(self.size, n)
            generator = torch.Generator().manual_seed(self.seed)
            self.indices = torch.randperm(n, generator=generator)[:size].sort().values
        indices = self.indices
        if len(indices) and int(indices.max()) >= n:
            raise ValueError(
                f"the stored probe indices go up to {int(indices.max())} but the train dataset has {n} "
                f"samples: resume with the same dataset, or start a new {self.owner}."
            )
        world, rank = trainer.world_size, trainer.global_rank
        if len(indices) < world:
            raise ValueError(f"probe_size={len(indices)} is smaller than the {world} DDP ranks sharing it.")
        local = indices[rank::world].tolist()
        chunk = self.chunk_size or train_batch or len(local)
        collate = getattr(loader, "collate_fn", None) or torch.utils.data.default_collate
        batches, weights = [], []
        # Reading samples may run user transforms that draw random numbers: keep them off the real
        # stream. Batch transfer hooks are the user's too (normalization on device, ...).
        with isolated_rng(rng_devices(pl_module.parameters())):
            for start in range(0, len(local), chunk):
                part = local[start : start + chunk]
                batch = collate([dataset[i] for i in part])
                # As the training loop prepares a batch (e.g. float64 inputs under "64-true").
                batch = trainer.precision_plugin.convert_input(batch)
                batch = pl_module._on_before_batch_transfer(batch, 0)
                batches.append(trainer.strategy.batch_to_device(batch))
                weights.append(float(len(part)))  # sample counts; the engine normalizes globally
        self.batches, self.weights = batches, weights

    def ensure(self, trainer: Trainer, pl_module: LightningModule) -> tuple[list[Any], list[float]]:
        """This rank's chunks and their sample counts (built on first use)."""
        if self.batches is None or self.weights is None:
            self.build(trainer, pl_module)
        assert self.batches is not None and self.weights is not None
        return list(self.batches), list(self.weights)

    def state(self) -> torch.Tensor | None:
        """What a checkpoint keeps: the global indices (the chunks are rebuilt from them)."""
        return None if self.indices is None else self.indices.clone()

    def restore(self, indices: Any) -> None:
        self.indices = None if indices is None else torch.as_tensor(indices, dtype=torch.int64).clone()
        self.batches = self.weights = None


def probe_loss_is_finite(
    model: torch.nn.Module, loss_fn: LossFn, probe: list[Any], trainer: Trainer, mode: str
) -> bool:
    """Whether the probe loss is finite on every rank (one forward pass per probe chunk).

    Agreed across ranks (:func:`~lightning_eos.callbacks._lightning.any_rank`), so that every rank
    skips, or runs, the collective solver alike.
    """
    was_training = model.training
    model.train(mode == "train")
    try:
        with torch.no_grad():
            # every chunk, no early exit: each rank runs the same forwards (a SyncBatchNorm is a collective)
            finite = [bool(torch.isfinite(loss_fn(model, b).detach()).all()) for b in probe]
    finally:
        model.train(was_training)
    return not any_rank(trainer, not all(finite), device=next(model.parameters()).device)


def probe_objective(replica: StepReplica, user_fn: LossFn | None, sign: float) -> LossFn:
    """The objective the monitored optimizer descends, as ``loss_fn(model, batch)`` for the engine:
    the replica's training loss (or ``user_fn`` called with the replica, which shares the real
    parameters but not the buffers), times ``sign`` (−1 under ``maximize=True``)."""

    def objective(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        loss = replica.loss_fn(model, batch) if user_fn is None else user_fn(replica.module, batch)
        return loss if sign > 0 else -loss

    return objective


@contextlib.contextmanager
def probe_precision(device: torch.device) -> Iterator[None]:
    """Gradients on, autocast off: the probe runs in the parameters' own (float32) precision.

    Lightning leaves autocast on only around ``training_step``; turning it off here makes the probe
    independent of where a hook happens to be called under ``bf16-mixed``/``16-mixed``.
    """
    autocast_device = device.type if device.type in ("cpu", "cuda", "xpu", "mps") else "cpu"
    with torch.enable_grad(), torch.autocast(device_type=autocast_device, enabled=False):
        yield
