"""Faults inside a callback never stop training: reported once, the callback steps aside, the run is
bitwise the run without it; ``strict=True`` re-raises."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_eos.callbacks import SharpnessMonitor, StabilityMonitor, TwinDivergence
from lightning_eos.demos.digits import DigitsDataModule, DigitsMLP
from tests.callbacks._helpers import make_trainer, quiet_fit


def _plain_weights() -> list[torch.Tensor]:
    model = DigitsMLP(lr=0.1, hidden=16)
    quiet_fit(make_trainer(max_steps=6, deterministic=True), model, DigitsDataModule(128, batch_size=32))
    return [p.detach().clone() for p in model.parameters()]


def _broken_sharpness(strict: bool) -> SharpnessMonitor:
    def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        raise RuntimeError("a bug inside the probe")

    return SharpnessMonitor(every_n_steps=2, loss_fn=loss_fn, strict=strict)


def _broken_stability(strict: bool) -> StabilityMonitor:
    monitor = StabilityMonitor(every_n_steps=1, strict=strict)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug inside the metrics")

    monitor._metrics = boom  # type: ignore[method-assign]
    return monitor


def _broken_twin(strict: bool) -> TwinDivergence:
    twin = TwinDivergence(every_n_steps=1, validation=False, strict=strict)
    real_fit_start = twin.on_fit_start

    def fit_start(trainer: Any, pl_module: Any) -> None:
        real_fit_start(trainer, pl_module)
        assert twin.engine is not None

        def boom(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("a bug inside the twin step")

        twin.engine.step = boom  # type: ignore[method-assign]

    twin.on_fit_start = fit_start  # type: ignore[method-assign]
    return twin


BROKEN = {"sharpness": _broken_sharpness, "stability": _broken_stability, "twin": _broken_twin}


@pytest.mark.parametrize("name", list(BROKEN))
def test_an_error_inside_a_callback_is_reported_once_and_training_goes_on(name: str) -> None:
    plain = _plain_weights()
    callback = BROKEN[name](strict=False)
    model = DigitsMLP(lr=0.1, hidden=16)
    trainer = make_trainer(max_steps=6, callbacks=[callback], deterministic=True)
    with pytest.warns(RuntimeWarning, match="disables itself") as record:
        trainer.fit(model, DigitsDataModule(128, batch_size=32))
    assert trainer.global_step == 6
    assert callback.failure is not None and "a bug inside" in callback.failure
    reports = [w for w in record if "disables itself" in str(w.message)]
    assert len(reports) == 1 and "Traceback" in str(reports[0].message)
    for a, b in zip(plain, model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(BROKEN))
def test_strict_re_raises(name: str) -> None:
    callback = BROKEN[name](strict=True)
    trainer = make_trainer(max_steps=6, callbacks=[callback])
    with pytest.raises(RuntimeError, match="a bug inside"):
        quiet_fit(trainer, DigitsMLP(lr=0.1, hidden=16), DigitsDataModule(128, batch_size=32))
