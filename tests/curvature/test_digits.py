"""The accuracy/cost target on real data (scikit-learn's load_digits): the default solver finds the
top eigenvalue within 1e-6 relative error of a dense float64 eigvalsh in at most 20 products, for a
small MLP and a small CNN with train-mode BatchNorm. (Timing targets live in benchmarks/.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_eos.curvature import hessian_eigenvalues

from ._helpers import ce, dense_hessian

sklearn = pytest.importorskip("sklearn.datasets")


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = sklearn.load_digits()
    x = torch.as_tensor(d.data[:600], dtype=torch.float64)
    std = x.std(0, unbiased=False)
    x = (x - x.mean(0)) / torch.where(std > 0, std, torch.ones_like(std))
    return x, torch.as_tensor(d.target[:600], dtype=torch.int64)


def _model(kind: str) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if kind == "mlp":
            return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(64, 10),
        ).double()


@pytest.mark.parametrize("kind", ["mlp", "cnn-bn"])
def test_top_eigenvalue_target_on_digits(digits: tuple[torch.Tensor, torch.Tensor], kind: str) -> None:
    x, y = digits
    model = _model(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(0, 600, (64,), generator=g)
        opt.zero_grad()
        ce(model, (x[idx], y[idx])).backward()
        opt.step()
    probe = (x[:256], y[:256])
    lam = torch.linalg.eigvalsh(dense_hessian(model, ce, [probe], [1.0], train=True, rows=True))
    res = hessian_eigenvalues(model, ce, probe)
    assert bool(res.converged.all()) and res.num_hvps <= 20
    assert abs(res.max - float(lam[-1])) <= 1e-6 * abs(float(lam[-1]))
