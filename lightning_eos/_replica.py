"""Run a module's own code on a replica without touching the original module.

Both the curvature probe and the twin have to evaluate the user's loss (for Lightning: its
``training_step``) while the real run must not notice: no BatchNorm statistics updated, no carried
state (RNN hidden state, counters, caches) advanced, no random numbers consumed from the real
stream. This module holds the two mechanisms they share:

* :func:`replicate` — a deep copy of a module that either *shares* the original's parameter
  objects (a probe: derivatives with respect to the real weights, but its own buffers and attributes)
  or owns copies of them (a twin that trains on its own).
* :func:`capture_rng` / :func:`replay_rng` / :func:`isolated_rng` — snapshot the generator state a
  real step will use and replay it for a replica, so the replica sees the same dropout masks,
  without consuming anything from the real stream.

Torch only: no Lightning import.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

ModuleT = TypeVar("ModuleT", bound=nn.Module)

__all__ = ["RngState", "capture_rng", "isolated_rng", "replay_rng", "replicate", "rng_devices"]


def replicate(module: ModuleT, *, share_parameters: bool) -> ModuleT:
    """Deep-copy ``module``, optionally sharing its parameter objects.

    Args:
        module: the module to copy (a LightningModule drops its trainer reference when copied).
        share_parameters: if True the copy holds the *same* ``nn.Parameter`` objects as the
            original (so autograd through the copy differentiates the real weights), while buffers
            and every other attribute are private copies. If False everything is copied.

    Data loaders and datasets held as attributes are shared rather than copied: copying them
    duplicates whole datasets and their worker state for nothing.
    """
    memo: dict[int, object] = {}
    if share_parameters:
        for p in module.parameters():
            memo[id(p)] = p
    for sub in module.modules():
        for value in vars(sub).values():
            if isinstance(value, (DataLoader, Dataset)):
                memo[id(value)] = value
    return copy.deepcopy(module, memo)


def rng_devices(tensors: Sequence[torch.Tensor] | Iterator[torch.Tensor]) -> list[int]:
    """CUDA device indices used by ``tensors`` (the generators a step on them may draw from)."""
    return sorted(
        {
            t.device.index if t.device.index is not None else torch.cuda.current_device()
            for t in tensors
            if t.device.type == "cuda"
        }
    )


@dataclass(frozen=True)
class RngState:
    """The global generator states at one instant: torch's CPU and CUDA ``devices`` generators, and
    Python's ``random`` and numpy's global generator (user code may draw from those too)."""

    cpu: torch.Tensor
    cuda: dict[int, torch.Tensor] = field(default_factory=dict)
    python: tuple[Any, ...] | None = None
    numpy: tuple[Any, ...] | None = None

    def to_state_dict(self) -> dict[str, object]:
        """Plain tensors, lists and numbers only, so checkpoints load with ``weights_only=True``."""
        out: dict[str, object] = {
            "cpu": self.cpu.clone(),
            "cuda": {int(k): v.clone() for k, v in self.cuda.items()},
        }
        if self.python is not None:
            version, internal, gauss = self.python
            out["python"] = [int(version), list(internal), gauss]
        if self.numpy is not None:
            name, keys, pos, has_gauss, cached = self.numpy
            out["numpy"] = [
                str(name),
                torch.as_tensor(keys.astype(np.int64)),
                int(pos),
                int(has_gauss),
                float(cached),
            ]
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, object]) -> RngState:
        cuda = state.get("cuda", {})
        assert isinstance(cuda, dict)
        cpu = state["cpu"]
        assert isinstance(cpu, torch.Tensor)
        python = state.get("python")
        numpy_state = state.get("numpy")
        return cls(
            cpu=cpu.clone(),
            cuda={int(k): v.clone() for k, v in cuda.items()},
            python=None if python is None else (python[0], tuple(python[1]), python[2]),  # type: ignore[index]
            numpy=None
            if numpy_state is None
            else (
                numpy_state[0],  # type: ignore[index]
                numpy_state[1].numpy().astype(np.uint32),  # type: ignore[index]
                *numpy_state[2:],  # type: ignore[index]
            ),
        )


def capture_rng(devices: Sequence[int] = ()) -> RngState:
    """Snapshot every global generator a step may draw from (see :class:`RngState`)."""
    cuda = {d: torch.cuda.get_rng_state(d) for d in devices} if devices else {}
    return RngState(
        cpu=torch.get_rng_state(),
        cuda=cuda,
        python=random.getstate(),
        numpy=tuple(np.random.get_state()),  # noqa: NPY002 (the global stream is what user code uses)
    )


@contextlib.contextmanager
def isolated_rng(devices: Sequence[int] = ()) -> Iterator[None]:
    """Run a block whose random draws leave the global generator states unchanged.

    Torch's CPU and CUDA generators, and also Python's ``random`` and numpy's global generator:
    user code run by a replica or a probe (a dataset's ``__getitem__`` with augmentations, a
    ``training_step``) may draw from those too.
    """
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002 (the global stream)
    try:
        with torch.random.fork_rng(devices=list(devices), enabled=True):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002


@contextlib.contextmanager
def replay_rng(state: RngState) -> Iterator[None]:
    """Run a block from the generator ``state`` captured earlier, then restore the present state.

    A replica stepped inside ``replay_rng(captured_before_real_step)`` draws exactly the random
    numbers (dropout masks, noise) that the real step drew, and the real stream is not advanced.
    """
    with isolated_rng(list(state.cuda)):
        torch.set_rng_state(state.cpu)
        for device, cuda_state in state.cuda.items():
            torch.cuda.set_rng_state(cuda_state, device)
        if state.python is not None:
            random.setstate(state.python)
        if state.numpy is not None:
            np.random.set_state(state.numpy)  # noqa: NPY002
        yield
