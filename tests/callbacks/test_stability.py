"""StabilityMonitor (and SharpnessMonitor's multi-group, multi-optimizer, manual and Adam paths)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

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
        match=r"^StabilityMonitor: every_n_steps=0 is not supported; "
        r"accepted values: a positive int or None\.$",
    ):
        StabilityMonitor(every_n_steps=0)
    with pytest.raises(
        ValueError,
        match=r"^SharpnessMonitor: every_n_steps=0 is not supported; "
        r"accepted values: a positive int or None\.$",
    ):
        SharpnessMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match=r"^SharpnessMonitor: max_iter=2 .* an int >= k=3\.$"):
        SharpnessMonitor(k=3, max_iter=2)


def test_default_logs_at_the_trainers_log_every_n_steps() -> None:
    logger = MemoryLogger()
    quiet_fit(
        make_trainer(max_steps=7, callbacks=[StabilityMonitor()], logger=logger, log_every_n_steps=3),
        StepScheduledMLP(),
        DigitsDataModule(200),
    )
    assert [s for s, _ in logger.series("eos/lr/pg0")] == [0, 3, 6]


def test_applied_lr_every_step_under_a_step_scheduler() -> None:
    logger = MemoryLogger()
    monitor = StabilityMonitor(every_n_steps=1)
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
    stab = StabilityMonitor(every_n_steps=1, per_layer=True)
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
    stab = StabilityMonitor(every_n_steps=1)
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
    stab = StabilityMonitor(every_n_steps=1)
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
    stab = StabilityMonitor(every_n_steps=1, per_layer=True)
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


# --------------------------------------------------------------------------------------- one comparison


def test_both_monitors_take_their_thresholds_from_bounds_assess(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_eos import bounds

    real = bounds.assess
    calls: list[bounds.StabilityAssessment] = []

    def spy(*args: Any, **kwargs: Any) -> bounds.StabilityAssessment:
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(bounds, "assess", spy)
    sharp = SharpnessMonitor(every_n_steps=1, probe_size=100, batch_sharpness=False)
    stab = StabilityMonitor(every_n_steps=1)
    quiet_fit(make_trainer(max_steps=2, callbacks=[sharp, stab]), TwoGroupMLP(), DigitsDataModule(300))
    assert len(calls) == 4  # per step: the SharpnessMonitor, then the StabilityMonitor
    last, mine, theirs = sharp.last, calls[-2], calls[-1]
    assert last is not None and mine.sharpness == last.sharpness == theirs.sharpness
    assert (last.critical, last.ratio, last.lr, last.max_stable_lr, last.binding_group) == (
        mine.critical,
        mine.ratio,
        mine.lr,
        mine.max_stable_lr,
        mine.binding_group,
    )
    assert stab.last_metrics["eos/lr_margin/head"] == theirs.lr_margin_per_group[1]
    assert stab.last_metrics["eos/critical_sharpness/pg0"] == theirs.critical_per_group[0]


# --------------------------------------------------------------------------------------- maximize=True


def _sym_with_spectrum(eigs: list[float], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T


EIGS = [-3.0, -1.0, 0.5, 2.0, 5.0]  # of H = A; −H has λ_max = 3 = −λ_min(H), λ_min = −5 = −λ_max(H)


class Quadratic(pl.LightningModule):
    """Loss ½wᵀAw in float64 on a dataset of ones: the Hessian is A exactly (spectrum ``EIGS``).

    ``w`` is owned by the root module (its layer is "(root)").
    """

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1, maximize: bool = True) -> None:
        super().__init__()
        self.register_buffer("A", _sym_with_spectrum(EIGS, seed=3))
        gen = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(len(EIGS), generator=gen, dtype=torch.float64))
        self.optimizer, self.lr, self.maximize = optimizer, lr, maximize

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return 0.5 * (self.w @ self.A @ self.w) * x.mean()

    def configure_optimizers(self) -> Any:
        cls = torch.optim.Adam if self.optimizer == "adam" else torch.optim.SGD
        return cls([self.w], lr=self.lr, maximize=self.maximize)


def ones_loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.ones(8, 1, dtype=torch.float64)), batch_size=8)


@pytest.mark.parametrize("maximize", [False, True])
def test_sgd_maximize_measures_the_hessian_of_the_descended_objective(maximize: bool) -> None:
    sign = -1.0 if maximize else 1.0
    sharp = SharpnessMonitor(every_n_steps=1, probe_size=None, which="both", tol=1e-10, max_iter=20)
    stab = StabilityMonitor(every_n_steps=1)
    model = Quadratic(lr=0.1, maximize=maximize)
    quiet_fit(make_trainer(max_steps=2, callbacks=[sharp, stab]), model, ones_loader())
    descended = sorted(sign * e for e in EIGS)  # spectrum of the Hessian of ±loss
    last = sharp.last
    assert last is not None and last.step == 2 and last.converged
    assert last.sharpness == pytest.approx(descended[-1], rel=1e-9)  # 3 under maximize (not 5)
    assert last.lambda_min == pytest.approx(descended[0], rel=1e-9)  # −5 under maximize (not −3)
    assert last.critical == pytest.approx(20.0) and last.ratio == pytest.approx(descended[-1] / 20.0)
    assert last.max_stable_lr == pytest.approx(2.0 / descended[-1])
    assert (last.wd_window_low, last.wd_window_high) == pytest.approx((-descended[0], 20.0 - descended[-1]))
    # batch sharpness gᵀH̃g/gᵀg of the descended objective at the final weights (g = ±Aw)
    w, a = model.w.detach(), model.A
    g = a @ w
    assert last.batch_sharpness == pytest.approx(sign * float(g @ a @ g) / float(g @ g), rel=1e-9)
    # the margin lr / max_stable_lr is that of the same (descended) sharpness: 0.15 under maximize
    assert stab.last_metrics["eos/lr_margin/pg0"] == pytest.approx(0.1 * descended[-1] / 2.0)


def test_adam_maximize_measures_the_preconditioned_descended_hessian() -> None:
    from lightning_eos import bounds

    sharp = SharpnessMonitor(every_n_steps=1, probe_size=None, tol=1e-10, max_iter=20)
    stab = StabilityMonitor(every_n_steps=1)
    model = Quadratic(optimizer="adam", lr=0.01, maximize=True)
    trainer = make_trainer(max_steps=2, callbacks=[sharp, stab])
    quiet_fit(trainer, model, ones_loader())
    P = bounds.optimizer_preconditioner(trainer.optimizers[0], [model.w])  # the state at the last step
    d = P.rsqrt()
    want = float(torch.linalg.eigvalsh(d[:, None] * (-model.A) * d[None, :])[-1])
    last = sharp.last
    assert last is not None and last.preconditioned
    assert last.sharpness == pytest.approx(want, rel=1e-9)
    assert last.ratio == pytest.approx(want / 3800.0)
    assert stab.last_metrics["eos/lr_margin/pg0"] == pytest.approx(last.ratio)


class MixedMaximize(DigitsMLP):
    def configure_optimizers(self) -> Any:
        head = list(self.net[4].parameters())
        body = [p for n, p in self.named_parameters() if not n.startswith("net.4")]
        return torch.optim.SGD([{"params": body, "maximize": True}, {"params": head}], lr=0.1)


def test_groups_that_disagree_on_maximize_are_refused_at_fit_start() -> None:
    trainer = make_trainer(max_steps=1, callbacks=[SharpnessMonitor(probe_size=50)])
    with pytest.raises(ValueError, match=r"maximize=\[True, False\].*accepted values"):
        quiet_fit(trainer, MixedMaximize(), DigitsDataModule(100))
    assert trainer.global_step == 0


# --------------------------------------------------------------------------------------- layers


class TiedWithRoot(pl.LightningModule):
    """An embedding tied to the output head, plus an offset owned by the root module.

    Layers (``lightning_eos.layers``): "(root)" = [offset], "emb" = [emb.weight] (the tied weight, its
    first owner), "head" = [head.bias]. The tied weight trains at lr 0.5 (critical 4), head.bias and the
    offset at lr 0.05 (critical 40): the head's local CFL number is that of its own bias's group.
    """

    def __init__(self) -> None:
        super().__init__()
        generator_state = torch.get_rng_state()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(6, 4)
        self.head = torch.nn.Linear(4, 6)
        self.head.weight = self.emb.weight
        self.offset = torch.nn.Parameter(torch.zeros(6))
        torch.set_rng_state(generator_state)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, target = batch
        out = self.head(torch.tanh(self.emb(tokens))) + self.offset
        return 0.5 * (out - target).pow(2).sum(dim=1).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(
            [{"params": [self.emb.weight], "lr": 0.5}, {"params": [self.head.bias, self.offset], "lr": 0.05}],
            lr=0.1,
        )


def test_cfl_for_every_measured_layer_with_root_and_tied_parameters() -> None:
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randint(0, 6, (40,), generator=gen), torch.randn(40, 6, generator=gen))
    sharp = SharpnessMonitor(every_n_steps=1, probe_size=None, per_layer=True, batch_sharpness=False)
    stab = StabilityMonitor(every_n_steps=1, per_layer=True)
    quiet_fit(
        make_trainer(max_steps=2, callbacks=[sharp, stab]), TiedWithRoot(), DataLoader(data, batch_size=40)
    )
    last = sharp.last
    assert last is not None and set(last.layers) == {"(root)", "emb", "head"}
    cfl = {k.removeprefix("eos/cfl/"): v for k, v in stab.last_metrics.items() if k.startswith("eos/cfl/")}
    assert set(cfl) == set(last.layers)
    assert cfl["emb"] == pytest.approx(last.layers["emb"] / 4.0)
    assert cfl["head"] == pytest.approx(last.layers["head"] / 40.0)
    assert cfl["(root)"] == pytest.approx(last.layers["(root)"] / 40.0)


# --------------------------------------------------------------------------------------- @override


@pytest.mark.parametrize("cls", [SharpnessMonitor, StabilityMonitor])
def test_lightning_hooks_are_marked_override(cls: type) -> None:
    hooks = [name for name in vars(cls) if not name.startswith("_") and hasattr(pl.Callback, name)]
    assert {"setup", "on_fit_start", "on_train_batch_end", "state_key"} <= set(hooks)
    for name in hooks:
        attr = vars(cls)[name]
        fn = attr.fget if isinstance(attr, property) else attr
        assert getattr(fn, "__override__", False), f"{cls.__name__}.{name} lacks @override"
