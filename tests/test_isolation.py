"""The one isolation mechanism shared by the probes and the twin: replicas, RNG, forward passes."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_eos.isolation import (
    RngState,
    capture_rng,
    isolated_forward,
    isolated_rng,
    replay_rng,
    replicate,
    seeded_rng,
    shared_attributes,
)


class Carrier(nn.Module):
    """Parameters, a BatchNorm buffer, carried state and a data loader attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(3)
        self.counter = 0
        self.data = TensorDataset(torch.zeros(4, 3))
        self.loader = DataLoader(self.data, batch_size=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.counter += 1
        return self.bn(self.lin(x))


def test_shared_replica_shares_parameters_but_not_buffers_or_state() -> None:
    real = Carrier()
    before = {k: v.clone() for k, v in real.state_dict().items()}
    rep = replicate(real, share_parameters=True)
    assert all(a is b for a, b in zip(rep.parameters(), real.parameters()))
    assert rep.bn.running_mean is not real.bn.running_mean
    assert rep.loader is real.loader and rep.data is real.data  # never copied
    rep(torch.randn(5, 3)).sum().backward()
    assert real.counter == 0 and rep.counter == 1
    for key, value in real.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert real.lin.weight.grad is not None  # shared objects: autograd reaches the real weights


def test_private_replica_owns_everything() -> None:
    real = Carrier()
    rep = replicate(real, share_parameters=False)
    assert all(a is not b for a, b in zip(rep.parameters(), real.parameters()))
    with torch.no_grad():
        rep.lin.weight.add_(1.0)
    assert not torch.equal(rep.lin.weight, real.lin.weight)


def _draw() -> tuple[torch.Tensor, float, float]:
    return torch.rand(4), random.random(), float(np.random.rand())  # noqa: NPY002 (the global stream)


def test_replay_gives_the_same_draws_without_advancing_the_stream() -> None:
    torch.manual_seed(3)
    state = capture_rng()
    real_draw = _draw()
    after_real = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()  # noqa: NPY002
    with replay_rng(state):
        replica_draw = _draw()
    assert torch.equal(real_draw[0], replica_draw[0]) and real_draw[1:] == replica_draw[1:]
    assert torch.equal(torch.get_rng_state(), after_real[0]) and random.getstate() == after_real[1]
    assert (np.random.get_state()[1] == after_real[2]).all()  # noqa: NPY002


def test_isolated_rng_restores_the_stream() -> None:
    before = torch.get_rng_state()
    with isolated_rng():
        torch.rand(10)
    assert torch.equal(torch.get_rng_state(), before)


def test_rng_state_round_trips_through_plain_dicts(tmp_path) -> None:
    state = capture_rng()
    path = tmp_path / "rng.pt"
    torch.save(state.to_state_dict(), path)
    loaded = RngState.from_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(loaded.cpu, state.cpu)
    with replay_rng(state):
        want = _draw()
    with replay_rng(loaded):
        got = _draw()
    assert torch.equal(want[0], got[0]) and want[1:] == got[1:]


class StatefulRNN(nn.Module):
    """Keeps its last hidden state *with grad history*, a lock and a cache of tensors with history."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.RNNCell(3, 4)
        self.hidden: torch.Tensor | None = None
        self.cache: dict[str, list[torch.Tensor]] = {}
        self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.hidden = self.cell(x, self.hidden)
        self.cache["h"] = [self.hidden * 2]
        return self.hidden


def test_replica_of_tensors_with_grad_history_and_uncopyable_attributes() -> None:
    real = StatefulRNN()
    real(torch.randn(2, 3)).sum().backward()
    assert real.hidden is not None and real.hidden.grad_fn is not None
    with pytest.warns(RuntimeWarning, match="lock"):
        rep = replicate(real, share_parameters=True)
    assert rep.hidden is not None and rep.hidden.grad_fn is None and torch.equal(rep.hidden, real.hidden)
    assert rep.hidden.data_ptr() != real.hidden.data_ptr()  # a private value, not a view
    assert rep.cache["h"][0].grad_fn is None and rep.cache["h"][0] is not real.cache["h"][0]
    assert rep.lock is real.lock and shared_attributes(rep) and "lock" in shared_attributes(rep)[0]
    before = real.hidden.clone()
    rep(torch.randn(2, 3))  # the replica advances its own carried state only
    assert torch.equal(real.hidden, before)


class WithCompiled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.compile(nn.Linear(3, 2), backend="eager")
        self.gradient_checkpointing = True  # Hugging Face's flag on its blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_compiled_submodules_and_gradient_checkpointing() -> None:
    real = WithCompiled()
    x = torch.randn(4, 3)
    # For a second-order pass: the eager original, sharing the real weights; checkpointing off.
    probe = replicate(real, share_parameters=True, eager=True)
    assert type(probe.inner) is nn.Linear and probe.inner.weight is real.inner._orig_mod.weight
    assert probe.gradient_checkpointing is False and real.gradient_checkpointing is True
    torch.testing.assert_close(probe(x), real(x), rtol=0, atol=0)
    # A twin keeps the compilation, around its own copy (not the real module's forward).
    twin = replicate(real, share_parameters=False)
    assert type(twin.inner) is type(real.inner) and twin.inner._orig_mod is not real.inner._orig_mod
    assert torch.equal(twin(x), real(x))
    with torch.no_grad():
        twin.inner._orig_mod.weight.add_(1.0)
    assert not torch.equal(twin(x), real(x))


def test_parametrized_modules_are_copied_by_their_own_rule() -> None:
    from torch.nn.utils import parametrize

    real = nn.Sequential(nn.Linear(3, 3))
    parametrize.register_parametrization(real[0], "weight", nn.Identity())
    rep = replicate(real, share_parameters=False)
    x = torch.randn(2, 3)
    assert torch.equal(rep(x), real(x))
    with torch.no_grad():
        rep[0].parametrizations.weight.original.add_(1.0)
    assert not torch.equal(rep(x), real(x))


def test_seeded_rng_replays_and_leaves_every_stream_alone() -> None:
    torch.manual_seed(5)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()  # noqa: NPY002
    with seeded_rng(11):
        first = _draw()
    with seeded_rng(11):
        again = _draw()
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert (np.random.get_state()[1] == before[2]).all()  # noqa: NPY002


def test_isolated_forward_undoes_modes_statistics_and_flags() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).eval()
    frozen = model[0].bias
    frozen.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with isolated_forward(model, "train", [model[0].weight]):
        assert model.training and model[0].bias.requires_grad is False
        model(torch.randn(8, 3)).sum().backward()
    assert not model.training and not frozen.requires_grad and model[0].weight.requires_grad
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
