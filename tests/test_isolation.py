"""The replica mechanism shared by the probes and the twin."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_eos.isolation import RngState, capture_rng, isolated_rng, replay_rng, replicate


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
