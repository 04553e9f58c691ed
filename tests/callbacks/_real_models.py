"""Third-party models for ``test_real_models.py``: Lightning's demo modules and tiny ``transformers``
models (built from small configs: nothing is downloaded), each with random data, its training loss as
a plain ``loss(module, batch)`` function (what a direct core call measures), and the run scaffolding:
a seeded deterministic fit, the state that must come out bitwise identical, and a weight snapshot
taken from inside a run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.demos.boring_classes import BoringModel, ManualOptimBoringModel
from lightning.pytorch.demos.lstm import LightningLSTM, SequenceSampler, SimpleLSTM
from lightning.pytorch.demos.transformer import LightningTransformer, Transformer
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tests.callbacks._helpers import MemoryLogger, make_trainer

transformers = None  # imported lazily (a few seconds): only the cases that need it pay


def _hf() -> Any:
    global transformers
    if transformers is None:
        import transformers as tf

        tf.logging.set_verbosity_error()
        transformers = tf
    return transformers


# Every case: 2 epochs of 3 optimizer steps (an epoch boundary is crossed), SGD/AdamW as configured.
EPOCHS, BATCHES, BATCH = 2, 3, 4
N = BATCHES * BATCH
STEPS = EPOCHS * BATCHES


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)  # data never draws from the global stream


class DictDataset(Dataset):
    """A map-style dataset of ``{name: tensor[i]}`` samples (default_collate stacks them into a dict)."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


# ---------------------------------------------------------------------------------- Lightning demos
VOCAB = 33


class DemoTransformer(LightningTransformer):
    """Lightning's demo transformer (nn.Transformer, dropout 0.2) at a tiny width, on random tokens."""

    def __init__(self) -> None:
        super().__init__(vocab_size=VOCAB)
        self.model = Transformer(vocab_size=VOCAB, ninp=16, nhead=2, nhid=32, nlayers=1)

    def prepare_data(self) -> None:
        return None

    def train_dataloader(self) -> DataLoader:
        tokens = torch.randint(0, VOCAB, (N, 9), generator=_gen())
        return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=BATCH)


def transformer_loss(module: nn.Module, batch: Any) -> torch.Tensor:
    inputs, target = batch
    return F.nll_loss(module(inputs, target), target.view(-1))


LSTM_VOCAB = 50


class DemoLSTM(LightningLSTM):
    """Lightning's demo LSTM (carries ``self.hidden`` between steps, reset in its own
    ``on_train_epoch_end``) at a tiny size, on random tokens with its ``SequenceSampler``."""

    def __init__(self) -> None:
        super().__init__(vocab_size=LSTM_VOCAB)
        self.model = SimpleLSTM(vocab_size=LSTM_VOCAB, ninp=16, nhid=16, nlayers=2)

    def prepare_data(self) -> None:
        return None

    def train_dataloader(self) -> DataLoader:
        tokens = torch.randint(0, LSTM_VOCAB, (N, 9), generator=_gen())
        dataset = TensorDataset(tokens[:, :-1], tokens[:, 1:])
        return DataLoader(dataset, batch_sampler=SequenceSampler(dataset, batch_size=BATCH))


def lstm_loss(module: nn.Module, batch: Any) -> torch.Tensor:
    """``LightningLSTM.training_step``'s loss from the module's carried hidden state (not advanced)."""
    inputs, target = batch
    hidden = module.hidden if module.hidden is not None else module.model.init_hidden(inputs.size(0))
    output, _ = module.model(inputs, (hidden[0].detach(), hidden[1].detach()))
    return F.nll_loss(output, target.view(-1))


def lstm_carried(real: nn.Module, snapshot: nn.Module) -> None:
    snapshot.hidden = None if real.hidden is None else tuple(h.detach().clone() for h in real.hidden)


def boring_loss(module: nn.Module, batch: Any) -> torch.Tensor:
    return module.loss(module(batch))


# ------------------------------------------------------------------------------ transformers models
class HFModule(pl.LightningModule):
    """A Hugging Face model as a LightningModule: ``loss = model(**batch).loss`` on dict batches."""

    def __init__(
        self, model: nn.Module, data: dict[str, torch.Tensor], optimizer: str, shuffle: bool = False
    ):
        super().__init__()
        self.model = model
        self.data = data
        self.optimizer_name = optimizer
        self.shuffle = shuffle

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)

    def train_dataloader(self) -> DataLoader:
        # shuffle=True draws the order from the global generator: part of the stream under test
        return DataLoader(DictDataset(**self.data), batch_size=BATCH, shuffle=self.shuffle)


def hf_loss(module: nn.Module, batch: Any) -> torch.Tensor:
    return module.model(**batch).loss


def _sdpa(model: nn.Module) -> nn.Module:
    # The default attention path: F.scaled_dot_product_attention (no double backward on CPU's fused
    # kernel, taken whenever attention dropout is 0 / off in eval mode).
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


GPT2_VOCAB = 64


def gpt2() -> HFModule:
    tf = _hf()
    config = tf.GPT2Config(
        vocab_size=GPT2_VOCAB,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    model = _sdpa(tf.GPT2LMHeadModel(config))
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: one parameter, two modules
    ids = torch.randint(0, GPT2_VOCAB, (N, 12), generator=_gen())
    return HFModule(model, {"input_ids": ids, "labels": ids}, optimizer="adamw")


def bert() -> HFModule:
    tf = _hf()
    config = tf.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
        attn_implementation="sdpa",
    )
    g = _gen()
    ids = torch.randint(1, 64, (N, 12), generator=g)
    lengths = torch.randint(6, 13, (N,), generator=g)
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()  # right padding: a real key mask
    data = {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 3, (N,), generator=g)}
    return HFModule(_sdpa(tf.BertForSequenceClassification(config)), data, optimizer="adamw")


def vit() -> HFModule:
    tf = _hf()
    config = tf.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.1,  # (attention dropout keeps ViT's default 0.0)
        num_labels=3,
        attn_implementation="sdpa",
    )
    g = _gen()
    data = {
        "pixel_values": torch.randn(N, 3, 8, 8, generator=g),
        "labels": torch.randint(0, 3, (N,), generator=g),
    }
    return HFModule(_sdpa(tf.ViTForImageClassification(config)), data, optimizer="sgd")


def resnet() -> HFModule:
    tf = _hf()
    config = tf.ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=3,
    )
    g = _gen()
    data = {
        "pixel_values": torch.randn(N, 3, 16, 16, generator=g),
        "labels": torch.randint(0, 3, (N,), generator=g),
    }
    return HFModule(tf.ResNetForImageClassification(config), data, optimizer="sgd", shuffle=True)


def gpt2_checkpointing() -> HFModule:
    """GPT-2 with Hugging Face gradient checkpointing on (the probe turns it off in its replica)."""
    module = gpt2()
    module.model.gradient_checkpointing_enable()
    assert module.model.transformer.gradient_checkpointing
    return module


class CompiledMLP(pl.LightningModule):
    """A ``torch.compile``'d submodule (AOTAutograd, which has no double backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.compile(
            nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 3)), backend="aot_eager"
        )
        g = _gen(3)
        self.data = TensorDataset(torch.randn(N, 8, generator=g), torch.randint(0, 3, (N,), generator=g))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=BATCH)


def compiled_loss(module: nn.Module, batch: Any) -> torch.Tensor:
    # The reference evaluates the eager original explicitly: the same function, twice differentiable.
    x, y = batch
    return nn.functional.cross_entropy(module.net._orig_mod(x), y)


# ------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One model: how to build it (after seeding), its loss for a direct core call, and the extras."""

    name: str
    build: Callable[[], pl.LightningModule]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    carried: Callable[[nn.Module, nn.Module], None] | None = None  # copy carried (non-state_dict) state
    trainer_kw: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


_BORING_KW = {"limit_train_batches": BATCHES}  # its RandomDataset has 64 samples, batch size 1

CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case("demo_transformer", DemoTransformer, transformer_loss),
        Case("demo_lstm", DemoLSTM, lstm_loss, carried=lstm_carried),
        Case("boring", BoringModel, boring_loss, trainer_kw=_BORING_KW),
        Case("manual_boring", ManualOptimBoringModel, boring_loss, trainer_kw=_BORING_KW),
        Case("gpt2", gpt2, hf_loss),
        Case("gpt2_checkpointing", gpt2_checkpointing, hf_loss),
        Case("compiled", CompiledMLP, compiled_loss),
        Case("bert", bert, hf_loss),
        Case("vit", vit, hf_loss),
        Case("resnet", resnet, hf_loss),
    ]
}


# ------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    model: pl.LightningModule
    trainer: pl.Trainer
    logger: MemoryLogger
    result: dict[str, Any]


def fit(case: Case, callbacks: list[pl.Callback], **kw: Any) -> Run:
    """A seeded, deterministic CPU fit of ``case`` (the module is built after seeding)."""
    pl.seed_everything(123, verbose=False)
    model = case.build()
    logger = MemoryLogger()
    trainer_kw = {"max_epochs": EPOCHS, **case.trainer_kw, **kw}
    trainer = make_trainer(
        callbacks=callbacks, logger=logger, log_every_n_steps=1, deterministic=True, **trainer_kw
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    return Run(model, trainer, logger, outcome(model, trainer, logger))


def outcome(model: pl.LightningModule, trainer: pl.Trainer, logger: MemoryLogger) -> dict[str, Any]:
    """Everything that must not change when the callbacks are attached."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},  # weights + buffers
        "optimizers": [opt.state_dict() for opt in trainer.optimizers],
        "rng": torch.get_rng_state(),
        "next_random": torch.rand(4),  # the global stream continues identically
        "metrics": [
            (s, kept)
            for s, m in logger.logged
            if (kept := {k: v for k, v in m.items() if not k.startswith(("eos/", "twin/"))})
        ],
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
    }


def assert_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert (a["global_step"], a["epoch"]) == (b["global_step"], b["epoch"])
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), f"state_dict[{key!r}] differs"
    assert len(a["optimizers"]) == len(b["optimizers"])
    for sa, sb in zip(a["optimizers"], b["optimizers"]):
        assert sa["param_groups"] == sb["param_groups"]
        assert sa["state"].keys() == sb["state"].keys()
        for idx in sa["state"]:
            for name, value in sa["state"][idx].items():
                other = sb["state"][idx][name]
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), f"optimizer {idx}.{name}"
    assert torch.equal(a["rng"], b["rng"]), "the global RNG stream moved"
    assert torch.equal(a["next_random"], b["next_random"])
    assert a["metrics"] == b["metrics"], "the module's logged training metrics differ"


@dataclass
class Snapshot:
    step: int
    module: nn.Module
    batch: Any


class SnapshotAt(pl.Callback):
    """At the end of the optimizer steps 1, 1 + n, 1 + 2n, ... (a SharpnessMonitor's schedule), keep a
    fresh copy of the module (weights, buffers, carried state) and the batch, for a direct core call.

    Attach it *before* the monitor: the copy is of the state the monitor is handed.
    """

    def __init__(self, case: Case, every_n_steps: int) -> None:
        self.case, self.every_n_steps = case, every_n_steps
        self.snapshots: list[Snapshot] = []
        self._seen = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        batch = args[1]
        if trainer.global_step == self._seen:  # no optimizer step at this batch
            return
        self._seen = trainer.global_step
        if (trainer.global_step - 1) % self.every_n_steps != 0:
            return
        with torch.random.fork_rng(devices=[]):  # building draws initial weights: keep the stream
            copy = self.case.build()
        copy.load_state_dict(pl_module.state_dict())
        if self.case.carried is not None:
            self.case.carried(pl_module, copy)
        frozen = torch.utils._pytree.tree_map(
            lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, batch
        )
        self.snapshots.append(Snapshot(trainer.global_step, copy, frozen))
