"""Run a module's own code without touching the real run: the one isolation mechanism.

Both the curvature probe and the twin evaluate the user's loss (for Lightning: its ``training_step``)
while the real run must not notice: no BatchNorm statistics updated, no carried state (RNN hidden
state, counters, caches) advanced, no random numbers consumed from the real stream, no ``.grad`` or
``requires_grad`` flag changed. Everything that does this lives here, once:

* :func:`replicate` -- a copy of a module that either *shares* the original's parameter objects (a
  probe: derivatives with respect to the real weights, private buffers and attributes) or owns
  copies of them (a twin that trains on its own). It never fails on a copy: tensors that carry grad
  history are detached, objects that refuse to be copied are shared (and reported), and
  ``torch.compile``'d submodules are rebuilt around the copy (or, for curvature, replaced by their
  original eager module, which has a double backward).
* :func:`capture_rng` / :func:`replay_rng` / :func:`isolated_rng` / :func:`seeded_rng` -- snapshot
  the generator state a real step will use and replay it for a replica (same dropout masks), or run
  on private seeded generators; the real stream is never advanced. One CUDA-device policy for all:
  the generators of the devices the module's tensors live on (:func:`rng_devices`).
* :func:`isolated_forward` -- put a module in train/eval mode for a pass whose every state change
  (training flags, BatchNorm statistics, other buffers, ``requires_grad`` flags) is undone after.

Torch only: no Lightning import.
"""

from __future__ import annotations

import contextlib
import copy
import random
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

ModuleT = TypeVar("ModuleT", bound=nn.Module)

__all__ = [
    "RngState",
    "capture_rng",
    "isolated_forward",
    "isolated_rng",
    "replay_rng",
    "replicate",
    "requires_grad",
    "rng_devices",
    "seeded_rng",
    "shared_attributes",
]

_SHARED_ATTR = "_lightning_eos_shared_attributes"
_WARNED_SHARED: set[tuple[type, tuple[str, ...]]] = set()  # warn once per module class and attribute set


def _compiled_module_type() -> type | None:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # pragma: no cover - torch without dynamo
        return None
    return OptimizedModule


def _detach_history(obj: Any, memo: dict[int, Any], depth: int = 0) -> None:
    """Pre-fill ``memo`` with detached clones of the tensors with grad history reachable from ``obj``.

    ``copy.deepcopy`` refuses non-leaf tensors (an RNN's hidden state kept after a step, a cached
    activation). A replica needs their values, not their graphs: a detached clone is what it gets.
    Walks plain containers (list, tuple, dict, set) only; other objects are handled by the copy.
    """
    if depth > 8 or id(obj) in memo:
        return
    if isinstance(obj, torch.Tensor):
        if not isinstance(obj, nn.Parameter) and obj.grad_fn is not None:
            memo[id(obj)] = obj.detach().clone()
        return
    if isinstance(obj, Mapping):
        for value in obj.values():
            _detach_history(value, memo, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for value in obj:
            _detach_history(value, memo, depth + 1)


def _copy_module(
    module: nn.Module, memo: dict[int, Any], path: str, shared: list[str], eager: bool
) -> nn.Module:
    """Deep-copy ``module`` attribute by attribute with ``memo``; what refuses to copy is shared."""
    if id(module) in memo:
        return memo[id(module)]
    compiled = _compiled_module_type()
    if compiled is not None and isinstance(module, compiled):
        inner = _copy_module(module._orig_mod, memo, path, shared, eager)
        # A compiled module's forward is bound to the *original* inner module: copying it would
        # run the real weights. Curvature needs the eager module (no double backward through
        # AOTAutograd); a twin gets the same compilation around its own copy.
        new_mod = inner if eager else compiled(inner, module.dynamo_ctx)
        memo[id(module)] = new_mod
        return new_mod
    if getattr(type(module), "__deepcopy__", None) is not None:
        # The class copies itself (e.g. torch.nn.utils.parametrize's injected classes): let it.
        _detach_history(vars(module), memo)
        return copy.deepcopy(module, memo)
    new = module.__class__.__new__(module.__class__)
    memo[id(module)] = new
    state = module.__getstate__() if hasattr(module, "__getstate__") else dict(module.__dict__)
    new_state: dict[str, Any] = {}
    for key, value in state.items():
        if key == "_modules":
            new_state[key] = {
                name: None
                if child is None
                else _copy_module(child, memo, f"{path}.{name}".strip("."), shared, eager)
                for name, child in value.items()
            }
            continue
        _detach_history(value, memo)
        try:
            new_state[key] = copy.deepcopy(value, memo)
        except Exception as err:  # a lock, a file handle, a C object without copy support, ...
            new_state[key] = value
            shared.append(f"{path + '.' if path else ''}{key} ({type(value).__name__}: {err})")
    if hasattr(new, "__setstate__"):
        new.__setstate__(new_state)
    else:  # pragma: no cover - every nn.Module has __setstate__
        new.__dict__.update(new_state)
    return new


def replicate(module: ModuleT, *, share_parameters: bool, eager: bool = False) -> ModuleT:
    """A private copy of ``module`` whose code runs without touching ``module``.

    Args:
        module: the module to copy (a LightningModule drops its trainer reference when copied).
        share_parameters: if True the copy holds the *same* ``nn.Parameter`` objects as the
            original (so autograd through the copy differentiates the real weights), while buffers
            and every other attribute are private copies. If False everything is copied.
        eager: replace ``torch.compile``'d submodules by their original (eager) modules and turn off
            gradient checkpointing (Hugging Face ``gradient_checkpointing``) in the copy: what a
            second-order pass needs (neither AOTAutograd nor reentrant checkpointing has a double
            backward). The loss is the same function; only how it is evaluated changes.

    Never fails on a copy: tensors with grad history (an RNN hidden state kept between steps) are
    copied detached; data loaders and datasets held as attributes are shared (copying them
    duplicates datasets and worker state for nothing); any other attribute that cannot be deep-copied
    is shared by reference, listed by :func:`shared_attributes` and reported in one warning.
    """
    memo: dict[int, object] = {}
    if share_parameters:
        for p in module.parameters():
            memo[id(p)] = p
    for sub in module.modules():
        for value in vars(sub).values():
            if isinstance(value, (DataLoader, Dataset)):
                memo[id(value)] = value
    shared: list[str] = []
    replica = _copy_module(module, memo, "", shared, eager)
    object.__setattr__(replica, _SHARED_ATTR, tuple(shared))
    if eager:
        for sub in replica.modules():
            if getattr(sub, "gradient_checkpointing", False) is True:
                sub.gradient_checkpointing = False
    if shared and (type(module), tuple(shared)) not in _WARNED_SHARED:
        _WARNED_SHARED.add((type(module), tuple(shared)))
        warnings.warn(
            f"lightning-eos: {len(shared)} attribute(s) of {type(module).__name__} cannot be copied and are "
            f"shared with the replica (its code may change them in the real module): {shared}",
            RuntimeWarning,
            stacklevel=2,
        )
    return replica  # type: ignore[return-value]


def shared_attributes(replica: nn.Module) -> tuple[str, ...]:
    """The attributes :func:`replicate` could not copy and shares with the original (``path (why)``)."""
    return tuple(getattr(replica, _SHARED_ATTR, ()))


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


def seeded_rng(seed: int, devices: Sequence[int] = ()) -> contextlib.AbstractContextManager[None]:
    """Run a block on private generators seeded with ``seed`` (torch CPU and CUDA ``devices``, Python,
    numpy); the caller's states are restored after. Replaying the same seed gives the same draws."""
    return _seeded(int(seed), list(devices))


@contextlib.contextmanager
def _seeded(seed: int, devices: list[int]) -> Iterator[None]:
    with isolated_rng(devices):
        torch.default_generator.manual_seed(seed)
        for d in devices:
            torch.cuda.default_generators[d].manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)  # noqa: NPY002 (user code draws from the global stream)
        yield


@contextlib.contextmanager
def requires_grad(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Temporarily make ``params`` require grad (a frozen parameter can still be differentiated)."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@contextlib.contextmanager
def isolated_forward(model: nn.Module, mode: str, differentiate: Sequence[torch.Tensor]) -> Iterator[None]:
    """Put ``model`` in ``mode`` (``"train"``/``"eval"``) for a pass and undo every change afterwards.

    * training flags of every submodule are restored;
    * BatchNorm-style layers get ``track_running_stats=False`` in train mode, so they normalize with
      batch statistics *without* updating ``running_*``/``num_batches_tracked`` (and without
      writing to a buffer the autograd graph might have saved);
    * any other buffer a forward pass mutates (InstanceNorm statistics, custom counters) is
      snapshot and copied back;
    * exactly the tensors in ``differentiate`` require grad during the pass (the model's other
      parameters are frozen so the backward skips their weight gradients); flags are restored.
    """
    modules = list(model.modules())
    flags = [m.training for m in modules]
    norm_layers = [m for m in modules if isinstance(m, nn.modules.batchnorm._NormBase)]
    tracking = [m.track_running_stats for m in norm_layers]
    buffers = list(model.buffers())
    saved = [b.detach().clone() for b in buffers]
    params = list(model.parameters())
    wanted = {id(p) for p in differentiate}
    in_model = {id(p) for p in params}
    params += [p for p in differentiate if id(p) not in in_model]  # e.g. a replica's own tensor
    grad_flags = [p.requires_grad for p in params]
    try:
        model.train(mode == "train")
        if mode == "train":
            for m in norm_layers:
                m.track_running_stats = False
        for p in params:
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for p, flag in zip(params, grad_flags):
            p.requires_grad_(flag)
        for m, t in zip(norm_layers, tracking):
            m.track_running_stats = t
        for m, f in zip(modules, flags):
            m.training = f
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                if b.shape != s.shape or b.dtype != s.dtype:
                    continue  # replaced by the user's code: nothing to restore in place
                if not torch.equal(b, s):
                    b.copy_(s)
