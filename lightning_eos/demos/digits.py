"""scikit-learn's ``load_digits`` (it ships inside the package: no download) as Lightning data,
and the MLP of the edge-of-stability experiments: 64-100-100-10, tanh, squared error
½‖f(x) − onehot(y)‖² averaged over samples (not ``F.mse_loss``, which also averages over the 10
outputs).
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsDataModule", "DigitsMLP", "load_digits_tensors"]


def load_digits_tensors(
    n_samples: int = 1000, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_samples`` digits, standardized per feature.

    Returns:
        ``x`` of shape ``(n, 64)`` and dtype ``dtype``; ``y`` of shape ``(n,)``, int64 labels 0..9.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - dev extra
        raise ImportError("the digits demo needs scikit-learn: pip install 'lightning-eos[dev]'") from err
    data = load_digits()
    x = torch.as_tensor(data.data[:n_samples], dtype=torch.float64)
    y = torch.as_tensor(data.target[:n_samples], dtype=torch.int64)
    # Constant pixels (always 0 at the border) have zero spread: keep them at 0 instead of 0/0.
    std = x.std(dim=0, unbiased=False)
    x = (x - x.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))
    return x.to(dtype), y


class DigitsDataModule(pl.LightningDataModule):
    """Digits as a training set; ``batch_size=None`` means full batch (gradient descent)."""

    def __init__(
        self,
        n_samples: int = 1000,
        batch_size: int | None = None,
        shuffle: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.n_samples = n_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.dtype = dtype
        self.dataset: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        if self.dataset is None:
            self.dataset = TensorDataset(*load_digits_tensors(self.n_samples, self.dtype))

    def train_dataloader(self) -> DataLoader:
        assert self.dataset is not None
        batch = self.batch_size or len(self.dataset)
        return DataLoader(self.dataset, batch_size=batch, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        assert self.dataset is not None
        return DataLoader(self.dataset, batch_size=len(self.dataset))


class DigitsMLP(pl.LightningModule):
    """MLP 64-``hidden``-``hidden``-10 with tanh, trained with squared error on one-hot targets.

    The loss is ``mean over samples of ½‖f(x) − onehot(y)‖²`` (summed over the 10 outputs): the
    scaling under which lr = 0.3 reaches the edge of stability within ~200 steps. ``F.mse_loss``
    averages over the outputs too, which makes the Hessian 5× flatter. Squared error rather than
    cross-entropy because cross-entropy fits these 1000 samples within ~50 steps, before any edge of
    stability can develop.
    """

    def __init__(
        self,
        lr: float = 0.3,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        hidden: int = 100,
        optimizer: Literal["sgd", "adam"] = "sgd",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        generator_state = torch.get_rng_state()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 10)
        )
        torch.set_rng_state(generator_state)  # building the model must not move the caller's stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        out = self(x)
        target = nn.functional.one_hot(y, 10).to(out.dtype)
        return 0.5 * (out - target).pow(2).sum(dim=1).mean()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("val_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        return torch.optim.SGD(
            self.parameters(),
            lr=hp.lr,
            momentum=hp.momentum,
            nesterov=hp.nesterov,
            weight_decay=hp.weight_decay,
        )
