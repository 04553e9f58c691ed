"""Figures (lightning_eos.plots) and the SpaceTimeMaps callback that logs them to TensorBoard."""

from __future__ import annotations

import ast
import io
import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

import lightning.pytorch as pl
import matplotlib
import matplotlib.image as mpimg
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_eos import plots
from lightning_eos.callbacks import SharpnessMonitor, TwinDivergence
from lightning_eos.callbacks.heatmaps import SpaceTimeMaps
from lightning_eos.demos.digits import DigitsDataModule, DigitsMLP

ROOT = Path(__file__).resolve().parents[1]


def _pixels(fig: Any) -> np.ndarray:
    return mpimg.imread(io.BytesIO(plots.figure_to_png(fig)), format="png")[..., :3]


# ------------------------------------------------------------------------------- lazy imports
@pytest.mark.parametrize(
    "module",
    [
        "lightning_eos/plots.py",
        "lightning_eos/report/reader.py",
        "lightning_eos/report/summary.py",
        "lightning_eos/report/html.py",
        "lightning_eos/cli.py",
        "lightning_eos/callbacks/heatmaps.py",
    ],
)
def test_matplotlib_and_tensorboard_are_imported_lazily(module: str) -> None:
    tree = ast.parse((ROOT / module).read_text())
    top = []
    for node in tree.body:  # module level only (TYPE_CHECKING blocks are not executed)
        if isinstance(node, ast.Import):
            top += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.append(node.module)
    assert not [m for m in top if m.split(".")[0] in ("matplotlib", "tensorboard", "tqdm")]


# ------------------------------------------------------------------------------------ curves
def test_sharpness_figure_shades_the_region_above_the_bound() -> None:
    steps = np.arange(0, 100, 2)
    critical = np.full(steps.size, 4.0)
    below = plots.sharpness_figure((steps, 3.0 + 0.005 * steps), (steps, critical))
    above = plots.sharpness_figure((steps, 3.0 + 0.02 * steps), (steps, critical), onset_step=40)
    # One shaded region (the unstable half-plane) below the bound, a second one where it is crossed.
    assert len(below.axes[0].collections) == 1
    assert len(above.axes[0].collections) == 2
    crossing = above.axes[0].collections[1].get_paths()[0].vertices
    assert crossing[:, 0].min() >= 50 - 2  # the sharpness crosses 4.0 at step 50
    labels = [t.get_text() for t in above.axes[0].get_legend().get_texts()]
    assert "edge onset (step 40)" in labels and "sharpness above the bound" in labels
    assert _pixels(above).std() > 0.05


def test_stability_ratio_figure_marks_the_edge_band_and_lr_changes() -> None:
    steps = np.arange(50)
    fig = plots.stability_ratio_figure((steps, np.linspace(0.5, 1.2, 50)), lr_changes=[20, 35])
    ax = fig.axes[0]
    vertical = [
        line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--" and line.get_xdata()[0] != 0
    ]
    assert sorted(vertical) == [20, 35]
    assert ax.get_ylim()[1] >= 1.2
    assert "at the edge (≥ 0.9)" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_twin_gap_figure_is_log_scale_and_shades_events() -> None:
    steps = np.arange(200)
    gaps = {f"layer{i}": (steps, 1e-7 * 10 ** np.clip((steps - 50 - i) / 20, 0, 4)) for i in range(3)}
    events = [{"start_step": 70, "end_step": 130}, {"start_step": 72, "end_step": 131}]
    fig = plots.twin_gap_figure(
        gaps, total=(steps, 1e-7 * 10 ** np.clip((steps - 50) / 20, 0, 4)), events=events
    )
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    spans = [p for p in ax.patches if p.get_label() == "restrained instability"]
    assert len(spans) == 1  # the overlapping episodes of several layers: one span
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:4] == ["layer0", "layer1", "layer2", "whole model"]


def test_many_layers_get_a_color_bar_instead_of_a_legend() -> None:
    steps = np.arange(10)
    gaps = {f"block.{i}": (steps, np.full(10, 1e-7 * (i + 1))) for i in range(20)}
    fig = plots.twin_gap_figure(gaps)
    assert len(fig.axes) == 2  # the plot and its color bar
    assert fig.axes[0].get_legend() is None


@pytest.mark.parametrize(
    "call",
    [
        lambda: plots.sharpness_figure(None, None),
        lambda: plots.stability_ratio_figure(([], [])),
        lambda: plots.twin_gap_figure({"a": ([0, 1], [0.0, 0.0])}),
        lambda: plots.space_time_figure({}, "twin_gap"),
        lambda: plots.space_time_figure({"a": ([0], [math.nan])}, "growth_rate"),
    ],
)
def test_figures_without_data_say_so(call: Any) -> None:
    fig = call()
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any(t.startswith("no ") and t.endswith(" logged") for t in texts)
    plots.figure_to_png(fig)


def test_figures_do_not_touch_pyplot_or_the_backend() -> None:
    import matplotlib.pyplot as plt

    backend = matplotlib.rcParams._get_backend_or_none()
    before = plt.get_fignums()
    plots.space_time_figure({"a": ([0, 1, 2], [1e-7, 1e-6, 1e-5])}, "twin_gap")
    plots.sharpness_figure(([0, 1], [1.0, 2.0]), ([0, 1], [2.0, 2.0]))
    assert plt.get_fignums() == before
    assert matplotlib.rcParams._get_backend_or_none() == backend


# ----------------------------------------------------------------------------- space-time maps
def test_space_time_grid_aligns_layers_on_the_union_of_steps() -> None:
    edges, names, m = plots.space_time_grid({"a": ([0, 2, 4], [1.0, 2.0, 3.0]), "b": ([2, 6], [5.0, 6.0])})
    assert names == ["a", "b"]
    assert edges.tolist() == [0, 2, 4, 6, 8]  # cell j holds its value until the next measurement
    np.testing.assert_array_equal(m[0], [1.0, 2.0, 3.0, np.nan])
    np.testing.assert_array_equal(m[1], [np.nan, 5.0, np.nan, 6.0])


def test_space_time_grid_bins_long_runs() -> None:
    steps = np.arange(1000)
    edges, _, m = plots.space_time_grid({"a": (steps, steps.astype(float))}, max_columns=100)
    assert m.shape == (1, 100) and edges.size == 101
    assert m[0, 0] == pytest.approx(4.5) and m[0, -1] == pytest.approx(994.5)  # means of 10 steps


def test_space_time_figure_colors_layers_by_log10_gap_with_labels_and_color_bar() -> None:
    names = [f"model.backbone.encoder.layer.{i}.attention.output.dense" for i in range(6)]
    steps = np.arange(0, 50, 5)
    layers = {n: (steps, 10.0 ** (-7 + 0.1 * steps + i)) for i, n in enumerate(names)}
    fig = plots.space_time_figure(layers, "twin_gap", lr_changes=[25])
    ax, cbar = fig.axes
    mesh = ax.collections[0]
    values = np.asarray(mesh.get_array()).reshape(6, steps.size)
    np.testing.assert_allclose(values, [[-7 + 0.1 * s + i for s in steps] for i in range(6)])
    assert "log10 twin gap" in cbar.get_ylabel()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [f"{i}.attention.output.dense" for i in range(6)]  # shared path dropped ...
    assert ax.get_ylabel() == "layer (model.backbone.encoder.layer.…)"  # ... and shown once
    assert ax.get_ylim() == (6.0, 0.0)  # the first layer at the top
    assert [line.get_xdata()[0] for line in ax.lines] == [25]
    pixels = _pixels(fig)
    assert pixels.shape[1] == 1100 and pixels.std() > 0.05


@pytest.mark.parametrize(
    ("kind", "values", "center"),
    [("growth_rate", [-0.2, 0.0, 0.5], 0.0), ("sharpness_ratio", [0.2, 0.9, 1.4], 1.0)],
)
def test_diverging_maps_are_centered(kind: Any, values: list[float], center: float) -> None:
    fig = plots.space_time_figure({"a": ([0, 1, 2], values)}, kind)
    norm = fig.axes[0].collections[0].norm
    assert norm.vcenter == center
    assert norm.vmin <= min(values) and norm.vmax >= max(values)


def test_lr_multiplier_map_is_log2() -> None:
    fig = plots.space_time_figure({"a": ([0, 1, 2], [1.0, 0.5, 2.0])}, "lr_multiplier")
    np.testing.assert_allclose(np.asarray(fig.axes[0].collections[0].get_array()).ravel(), [0.0, -1.0, 1.0])


def test_unknown_map_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="kind='bogus' is not supported"):
        plots.space_time_figure({"a": ([0], [1.0])}, "bogus")  # type: ignore[arg-type]


def test_shorten_labels() -> None:
    assert plots.shorten_labels(["net.0", "net.2"]) == (["net.0", "net.2"], "")  # short: untouched
    long = ["transformer.h.0.attn.c_attn", "transformer.h.10.mlp.c_proj_with_a_very_long_name_indeed"]
    labels, prefix = plots.shorten_labels(long, max_chars=20)
    assert prefix == "transformer.h."
    assert labels[0] == "0.attn.c_attn"
    assert len(labels[1]) == 20 and labels[1].startswith("10.mlp.…") and labels[1].endswith("_name_indeed")
    assert plots.common_layer_prefix(["a.b", "a.b.c"]) == "a."  # every name keeps a component


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.1] * 5 + [0.01] * 5, [5]),  # StepLR: the first step at the new value
        ([0.1, 0.1, 0.05, 0.05, 0.025, 0.025], [2, 4]),  # MultiStepLR
        ([0.1 * (i + 1) for i in range(5)] + [0.5] * 5, [4]),  # warm-up reaches its peak
        ([0.1 * (i + 1) for i in range(5)] + [0.5 - 0.04 * i for i in range(1, 6)], [4]),  # warm-up -> decay
        ([0.5 * (1 + math.cos(math.pi * t / 50)) for t in range(50)], []),  # cosine: no marks
        ([0.1] * 10, []),
    ],
)
def test_lr_changes(values: list[float], expected: list[int]) -> None:
    assert plots.lr_changes([(list(range(len(values))), values)]) == expected


# --------------------------------------------------------------------- SpaceTimeMaps callback
class _StepLRDigits(DigitsMLP):
    """The digits MLP with a StepLR halving the LR every 10 optimizer steps."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _Controller(pl.Callback):
    """Stands in for a local-LR controller: a history of records with per-layer multipliers."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        self.history.append(
            {"step": trainer.global_step, "log_step": step, "multiplier": {"net.0": 0.5, "net.4": 1.0}}
        )


def _images(logdir: str) -> dict[str, list[Any]]:
    acc = EventAccumulator(logdir, size_guidance={"images": 0})
    acc.Reload()
    return {tag: acc.Images(tag) for tag in acc.Tags()["images"]}


def test_space_time_maps_logs_images_at_the_interval_and_at_fit_end(tmp_path: Path) -> None:
    maps = SpaceTimeMaps(every_n_steps=10)
    drawn_up_to: list[int] = []  # the last twin step each render saw
    collect = maps.collect

    def spy(trainer: pl.Trainer) -> Any:
        data = collect(trainer)
        drawn_up_to.append(max(data["twin_gap"]["net.0"][0]))
        return data

    maps.collect = spy  # type: ignore[method-assign]
    sharp = SharpnessMonitor(every_n_steps=2, probe_size=64, per_layer=True)
    twin = TwinDivergence(every_n_steps=1, validation=False)
    logger = TensorBoardLogger(str(tmp_path))
    trainer = pl.Trainer(
        max_steps=25,
        logger=logger,
        # The maps come first: a render due at a step waits for the other callbacks' records.
        callbacks=[maps, sharp, twin, _Controller()],
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_StepLRDigits(lr=0.5, hidden=32), DigitsDataModule(n_samples=128))
    images = _images(logger.log_dir)
    kinds = ("twin_gap", "growth_rate", "sharpness_ratio", "lr_multiplier")
    assert sorted(images) == sorted(f"eos_maps/{k}" for k in kinds)
    for tag, events in images.items():
        # Steps 10 and 20 (logged at x = 9 and 19), then once at the end of fit (x = 24).
        assert [e.step for e in events] == [9, 19, 24], tag
        for e in events:
            pixels = mpimg.imread(io.BytesIO(e.encoded_image_string), format="png")
            assert pixels.shape[1] == e.width == 1000 and pixels[..., :3].std() > 0.05
    assert maps.renders == 3 and maps.render_seconds > 0
    assert maps.lr_changes == [10, 20]  # StepLR halved the LR for the 11th and the 21st step
    # Listed first, the maps still held each step's own measurements (the render waits a hook).
    assert drawn_up_to == [9, 19, 24]
    data = collect(trainer)
    assert set(data) == set(kinds)
    assert list(data["twin_gap"]) == ["net.0", "net.2", "net.4"]
    last = sharp.history[-1]
    ratio = data["sharpness_ratio"]["net.2"]
    assert ratio[1][-1] == pytest.approx(last.layers["net.2"] / last.critical)
    assert data["lr_multiplier"]["net.0"][1][-1] == 0.5


def test_space_time_maps_without_tensorboard_warns_and_draws_nothing(tmp_path: Path) -> None:
    maps = SpaceTimeMaps(every_n_steps=1)
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        callbacks=[maps],
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    with pytest.warns(UserWarning, match="no TensorBoardLogger"):
        trainer.fit(DigitsMLP(hidden=8), DigitsDataModule(n_samples=32))
    assert maps.renders == 0


def test_space_time_maps_render_only_on_rank_zero(tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="", version="")
    controller = _Controller()
    controller.history = [{"log_step": s, "multiplier": {"fc": 0.5 + 0.1 * s}} for s in range(5)]
    maps = SpaceTimeMaps(every_n_steps=1, maps=["lr_multiplier"])
    trainer = SimpleNamespace(callbacks=[maps, controller], loggers=[logger], is_global_zero=False)
    assert maps.render(trainer, 4) is False  # type: ignore[arg-type]
    trainer.is_global_zero = True
    assert maps.render(trainer, 4) is True  # type: ignore[arg-type]
    assert maps.render(trainer, 4) is False  # type: ignore[arg-type]  # once per step
    logger.experiment.flush()
    assert [e.step for e in _images(str(tmp_path))["eos_maps/lr_multiplier"]] == [4]
    assert maps.renders == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps=0"),
        ({"maps": "twin_gap"}, "maps='twin_gap'"),
        ({"maps": ["twin_gap", "bogus"]}, "maps='bogus'"),
        ({"tag_prefix": "maps/"}, "tag_prefix"),
        ({"max_columns": 1}, "max_columns=1"),
    ],
)
def test_space_time_maps_validates_its_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=f"SpaceTimeMaps: {match}"):
        SpaceTimeMaps(**kwargs)
