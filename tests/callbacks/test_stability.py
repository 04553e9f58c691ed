"""StabilityMonitor (and SharpnessMonitor's multi-group, multi-optimizer, manual and Adam paths)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_eos import curvature
from lightning_eos.callbacks import SharpnessMonitor, StabilityMonitor
from lightning_eos.demos.digits import DigitsDataModule, DigitsMLP
from tests.callbacks._helpers import MemoryLogger, make_trainer, quiet_fit
from tests.callbacks.test_sharpness import StepScheduledMLP, digits_loss


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_steps": True}, "every_n_steps"),
        ({"per_layer": "yes"}, "per_layer"),
        ({"log_prefix": ""}, "log_prefix"),
        ({"log_prefix": "a/"}, "log_prefix"),
    ],
)
def test_every_bad_argument_raises(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=rf"{name}.*accepted values"):
        StabilityMonitor(**kwargs)


def test_argument_errors_name_the_callbacks() -> None:
    # One validator module for all three callbacks: one message format.
    with pytest.raises(
        ValueError,
        match=r"^StabilityMonitor: every_n_steps=0 is not supported; accepted values: a positive int\.$",
    ):
        StabilityMonitor(every_n_steps=0)
    with pytest.raises(
        ValueError,
        match=r"^SharpnessMonitor: every_n_steps=0 is not supported; accepted values: a positive int\.$",
    ):
        SharpnessMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match=r"^SharpnessMonitor: max_iter=2 .* an int >= k=3\.$"):
        SharpnessMonitor(k=3, max_iter=2)


def test_applied_lr_every_step_under_a_step_scheduler() -> None:
    logger = MemoryLogger()
    monitor = StabilityMonitor()
    quiet_fit(
        make_trainer(max_steps=5, callbacks=[monitor], logger=logger),
        StepScheduledMLP(),
        DigitsDataModule(200),
    )
    lrs = logger.series("eos/lr/pg0")
    assert [s for s, _ in lrs] == [0, 1, 2, 3, 4]
    assert [v for _, v in lrs] == pytest.approx([0.2 * 0.5**s for s in range(5)])
    assert [v for _, v in logger.series("eos/critical_sharpness/pg0")] == pytest.approx(
        [2 / (0.2 * 0.5**s) for s in range(5)]
    )
    assert not logger.series("eos/lr_margin/pg0")  # no SharpnessMonitor: no margin


class TwoGroupMLP(DigitsMLP):
    """Hidden layers at lr 0.1 with heavy-ball momentum 0.9, the named "head" at lr 0.5 plain."""

    def configure_optimizers(self) -> Any:
        body = [p for n, p in self.named_parameters() if not n.startswith("net.4")]
        head = list(self.net[4].parameters())
        return torch.optim.SGD(
            [{"params": body, "momentum": 0.9}, {"params": head, "lr": 0.5, "name": "head"}], lr=0.1
        )


def test_param_groups_binding_group_margin_and_local_cfl() -> None:
    logger = MemoryLogger()
    sharp = SharpnessMonitor(every_n_steps=2, probe_size=100, per_layer=True)
    stab = StabilityMonitor(per_layer=True)
    quiet_fit(
        make_trainer(max_steps=3, callbacks=[sharp, stab], logger=logger),
        TwoGroupMLP(),
        DigitsDataModule(300),
    )
    crit_body, crit_head = 3.8 / 0.1, 2 / 0.5
    last = sharp.last
    assert last is not None and last.step == 3
    assert last.binding_group == 1 and last.critical == pytest.approx(crit_head) and last.lr == 0.5
    metrics = stab.last_metrics
    assert metrics["eos/lr/pg0"] == 0.1 and metrics["eos/lr/head"] == 0.5
    assert metrics["eos/critical_sharpness/pg0"] == pytest.approx(crit_body)
    assert metrics["eos/critical_sharpness/head"] == pytest.approx(crit_head)
    # margin lr / max_stable_lr with the latest sharpness: max_stable_lr = c / λ per group
    assert metrics["eos/lr_margin/pg0"] == pytest.approx(0.1 / (3.8 / last.sharpness))
    assert metrics["eos/lr_margin/head"] == pytest.approx(last.ratio)
    for layer, crit in (("net.0", crit_body), ("net.2", crit_body), ("net.4", crit_head)):
        assert metrics[f"eos/cfl/{layer}"] == pytest.approx(last.layers[layer] / crit)
    # margins logged on every step, from the step the first measurement exists (SharpnessMonitor first)
    assert [s for s, _ in logger.series("eos/lr_margin/head")] == [0, 1, 2]


class ManualGAN(DigitsMLP):
    """Manual optimization with two optimizers: a "generator" (first layers) and a "head"."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        body_opt, head_opt = self.optimizers()
        loss = self.loss(batch)
        body_opt.zero_grad()
        self.manual_backward(loss)
        body_opt.step()
        head_loss = 2.0 * self.loss(batch)  # a different loss for the second optimizer
        head_opt.zero_grad()
        self.manual_backward(head_loss)
        head_opt.step()
        return loss

    def configure_optimizers(self) -> Any:
        body = [p for n, p in self.named_parameters() if not n.startswith("net.4")]
        return torch.optim.SGD(body, lr=0.1), torch.optim.SGD(self.net[4].parameters(), lr=0.2)


def test_manual_optimization_with_two_optimizers() -> None:
    logger = MemoryLogger()
    sharp = SharpnessMonitor(every_n_steps=1, probe="current", optimizer_idx=1, tol=1e-8, max_iter=200)
    stab = StabilityMonitor()
    model = ManualGAN()
    quiet_fit(make_trainer(max_steps=4, callbacks=[sharp, stab], logger=logger), model, DigitsDataModule(300))
    assert [r.step for r in sharp.history] == [2, 4]  # global_step counts both optimizers' steps
    assert stab.last_metrics["eos/lr/opt0/pg0"] == 0.1 and stab.last_metrics["eos/lr/opt1/pg0"] == 0.2
    # the measured loss is the second manual_backward's (2× the loss) over the head's parameters only
    from tests.callbacks.test_sharpness import load_digits_tensors

    batch = list(load_digits_tensors(300))
    ref = curvature.hessian_eigenvalues(
        model, lambda m, b: 2.0 * digits_loss(m, b), batch, params=list(model.net[4].parameters()), tol=1e-9
    )
    assert sharp.last is not None and sharp.last.sharpness == pytest.approx(
        float(ref.eigenvalues[0]), rel=1e-5
    )
    assert sharp.last.critical == pytest.approx(2 / 0.2)


def test_adam_is_preconditioned_with_its_threshold() -> None:
    sharp = SharpnessMonitor(every_n_steps=1, probe_size=100)
    stab = StabilityMonitor()
    quiet_fit(
        make_trainer(max_steps=2, callbacks=[sharp, stab]),
        DigitsMLP(lr=0.01, optimizer="adam"),
        DigitsDataModule(300),
    )
    last = sharp.last
    assert last is not None and last.preconditioned and last.critical == pytest.approx(38 / 0.01)
    assert stab.last_metrics["eos/critical_sharpness/pg0"] == pytest.approx(38 / 0.01)
    assert stab.last_metrics["eos/lr_margin/pg0"] == pytest.approx(last.ratio)
    plain = SharpnessMonitor(every_n_steps=1, probe_size=100, preconditioned=False)
    with pytest.warns(RuntimeWarning, match="preconditioned"):
        make_trainer(max_steps=1, callbacks=[plain]).fit(
            DigitsMLP(lr=0.01, optimizer="adam"), DigitsDataModule(300)
        )
    assert plain.last is not None and not plain.last.preconditioned and plain.last.finite


@pytest.mark.parametrize("preconditioned", ["auto", False])
def test_adam_margin_and_cfl_never_mix_hessian_and_preconditioned_thresholds(
    preconditioned: bool | str,
) -> None:
    # Adam's threshold bounds λ(P⁻¹H). Block sharpness (per layer) is of H, and so is the sharpness
    # of a preconditioned=False monitor: dividing either by Adam's threshold is a wrong number.
    sharp = SharpnessMonitor(every_n_steps=1, probe_size=100, per_layer=True, preconditioned=preconditioned)  # type: ignore[arg-type]
    stab = StabilityMonitor(per_layer=True)
    with pytest.warns(RuntimeWarning):
        make_trainer(max_steps=2, callbacks=[sharp, stab]).fit(
            DigitsMLP(lr=0.01, optimizer="adam"), DigitsDataModule(300)
        )
    assert sharp.last is not None and sharp.last.layers  # the blocks were measured
    assert stab.last_metrics["eos/critical_sharpness/pg0"] == pytest.approx(38 / 0.01)
    assert not [k for k in stab.last_metrics if k.startswith("eos/cfl/")]
    if preconditioned == "auto":
        assert stab.last_metrics["eos/lr_margin/pg0"] == pytest.approx(sharp.last.ratio)
    else:
        assert "eos/lr_margin/pg0" not in stab.last_metrics
