"""The forms :func:`lightning_eos.curvature.operator.second_order_forms` records in the cached gradient
graph — train-mode BatchNorm as a per-channel affine map, ReLU as a masked product: same loss,
gradient and Hessian as the native kernels, running statistics and the modules' ``forward``
untouched, other layers unchanged."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

import lightning_eos.curvature.operator as operator_module
from lightning_eos.curvature import HessianOperator
from lightning_eos.curvature.operator import _affine_applies, second_order_forms

Batch = tuple[torch.Tensor, torch.Tensor]

# (BatchNorm class, input shape after the first layer): every rank BatchNorm1d/2d/3d accepts
_CASES = {
    "1d-NC": (nn.BatchNorm1d, (3,)),
    "1d-NCL": (nn.BatchNorm1d, (3, 4)),
    "2d": (nn.BatchNorm2d, (3, 2, 2)),
    "3d": (nn.BatchNorm3d, (3, 2, 1, 2)),
}


class _Net(nn.Module):
    """Linear(4 → C·S) → reshape to (N, C, *S) → BatchNorm → tanh → flatten → Linear(→ 2), float64."""

    def __init__(self, bn_cls: type[nn.Module], shape: tuple[int, ...], affine: bool, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            n = 1
            for s in shape:
                n *= s
            self.shape = shape
            self.inp = nn.Linear(4, n)
            self.bn = bn_cls(shape[0], affine=affine)
            self.out = nn.Linear(n, 2)
            if affine:  # away from the (1, 0) initialization, so weight and bias matter
                nn.init.uniform_(self.bn.weight, 0.5, 1.5)
                nn.init.uniform_(self.bn.bias, -0.5, 0.5)
            # non-trivial running statistics, to see that nothing writes them
            self.bn.running_mean.uniform_(-1.0, 1.0)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.num_batches_tracked.fill_(7)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x).view(x.shape[0], *self.shape)
        return self.out(torch.tanh(self.bn(h)).flatten(1))


def _data(n: int = 6, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,), generator=g)


def _ce(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _native_loss(
    model: nn.Module, batch: Batch
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """The unpatched train-mode loss as a function of the flat parameter vector (native kernel,
    batch statistics: a copy with ``track_running_stats=False``), and the flat parameters."""
    ref = copy.deepcopy(model).train()
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
    names = [n for n, _ in ref.named_parameters()]
    shapes = [p.shape for _, p in ref.named_parameters()]
    sizes = [p.numel() for _, p in ref.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in ref.named_parameters()])

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts = {n: c.view(s) for n, c, s in zip(names, flat.split(sizes), shapes)}
        return nn.functional.cross_entropy(functional_call(ref, parts, (batch[0],)), batch[1])

    return f, flat0


def _assert_matches_native(op: HessianOperator, model: nn.Module, batch: Batch) -> float:
    """``op``'s products equal the dense float64 Hessian of the unpatched loss (to 1e-10, two random
    vectors) and its gradient the native one (to 1e-12); returns the native loss."""
    f, flat0 = _native_loss(model, batch)
    H = torch.autograd.functional.hessian(f, flat0)
    assert op.dim == flat0.numel() and float(H.abs().max()) > 0
    for s in range(2):
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(10 + s), dtype=torch.float64)
        torch.testing.assert_close(op @ v, H @ v, rtol=1e-10, atol=1e-12)
    p = flat0.clone().requires_grad_(True)
    loss = f(p)
    (g,) = torch.autograd.grad(loss, p)
    torch.testing.assert_close(op.gradient(), g, rtol=1e-12, atol=1e-13)
    return float(loss.detach())


def _graph_node_names(op: HessianOperator) -> set[str]:
    assert op._graphs and op._graphs[0].flat is not None
    stack, seen, names = [op._graphs[0].flat.grad_fn], set(), set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names.add(type(node).__name__)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return names


def _stats(bn: nn.Module) -> list[torch.Tensor]:
    return [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("case", list(_CASES))
def test_affine_batchnorm_hvp_loss_gradient_match_native(case: str, affine: bool) -> None:
    bn_cls, shape = _CASES[case]
    model, batch = _Net(bn_cls, shape, affine), _data()
    model.eval()  # the probe's own train mode must not leak out
    stats = _stats(model.bn)
    op = HessianOperator(model, _ce, batch, mode="train")
    # the cached graph holds the affine form, not the native kernel
    nodes = _graph_node_names(op)
    assert "AddcmulBackward0" in nodes and not any("BatchNorm" in n for n in nodes), nodes
    native = _assert_matches_native(op, model, batch)
    assert abs(op.loss - native) <= 1e-12 * max(1.0, abs(native))
    # nothing of the probe is left on the model
    assert all(torch.equal(a, b) for a, b in zip(stats, _stats(model.bn)))
    assert "forward" not in vars(model.bn) and not model.training and model.bn.track_running_stats


def test_rebuilt_graphs_and_eval_mode_match_native() -> None:
    model, batch = _Net(nn.BatchNorm2d, (3, 2, 2), True), _data(8)
    f, flat0 = _native_loss(model, batch)
    H = torch.autograd.functional.hessian(f, flat0)
    v = torch.randn(flat0.numel(), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # beyond the cache the graph is rebuilt per product, with the same affine form
    rebuilt = HessianOperator(model, _ce, batch, cache_graphs=False)
    torch.testing.assert_close(rebuilt @ v, H @ v, rtol=1e-10, atol=1e-12)
    # eval mode: running statistics, the native kernel (nothing to replace)
    op_eval = HessianOperator(model, _ce, batch, mode="eval")
    assert "NativeBatchNormBackward0" in _graph_node_names(op_eval)


def test_forward_and_running_stats_restored_after_an_exception_in_the_loss() -> None:
    model, batch = _Net(nn.BatchNorm2d, (3, 2, 2), True), _data()
    stats = _stats(model.bn)
    seen: list[bool] = []

    def failing(m: nn.Module, b: Batch) -> torch.Tensor:
        _ce(m, b)
        seen.append("forward" in vars(m.bn))
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        HessianOperator(model, failing, batch)
    assert seen == [True]  # the replacement was active while the graph was recorded
    assert "forward" not in vars(model.bn) and model.bn.forward.__func__ is nn.BatchNorm2d.forward
    assert all(torch.equal(a, b) for a, b in zip(stats, _stats(model.bn)))
    assert model.training and model.bn.track_running_stats
    with pytest.raises(RuntimeError, match="inside"), second_order_forms(model):
        assert "forward" in vars(model.bn)
        raise RuntimeError("inside")
    assert "forward" not in vars(model.bn)


class _Seen(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.funcs: list[object] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.funcs.append(func)
        return func(*args, **(kwargs or {}))


class _OwnForwardBN(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


class _PlainSubclassBN(nn.BatchNorm2d):
    pass


def test_only_exact_batchnorm_types_in_train_mode_without_tracking_are_replaced() -> None:
    x = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    layers = {
        "sync": nn.SyncBatchNorm(3),
        "own-forward": _OwnForwardBN(3),
        "subclass": _PlainSubclassBN(3),
        "instance-norm": nn.InstanceNorm2d(3, affine=True),
        "exact": nn.BatchNorm2d(3),
    }
    model = nn.ModuleDict(layers).double()
    custom = nn.BatchNorm2d(3).double()
    custom.forward = lambda t: t + 1.0  # a forward set on the instance is the user's: kept
    model["custom"] = custom
    with second_order_forms(model):
        assert [k for k, m in model.items() if "forward" in vars(m)] == ["exact", "custom"]
        assert model["custom"](x).equal(x + 1.0)
        bn = model["exact"]
        # train mode *with* tracking (a real training step): the native path, statistics updated
        twin = copy.deepcopy(bn)
        out = bn(x)
        assert out.equal(nn.BatchNorm2d.forward(twin, x)) and bn.num_batches_tracked.item() == 1
        assert all(torch.equal(a, b) for a, b in zip(_stats(bn), _stats(twin)))
        # eval mode: the native path, bitwise
        bn.eval()
        assert bn(x).equal(nn.BatchNorm2d.forward(bn, x))
        # train mode without tracking: the affine form, same values, statistics untouched
        bn.train()
        bn.track_running_stats = False
        before = _stats(bn)
        y = bn(x.requires_grad_(True))
        assert type(y.grad_fn).__name__ == "AddcmulBackward0"
        torch.testing.assert_close(y, nn.BatchNorm2d.forward(bn, x), rtol=1e-12, atol=1e-13)
        assert all(torch.equal(a, b) for a, b in zip(before, _stats(bn)))
        # a TorchFunctionMode is promised F.batch_norm: it gets the native kernel
        with _Seen() as mode:
            assert type(bn(x).grad_fn).__name__ == "NativeBatchNormBackward0"
        assert nn.functional.batch_norm in mode.funcs
        # the native kernel's refusals are kept
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            bn(x[:1, :, :1, :1])
        with pytest.raises(ValueError, match="expected 4D input"):
            bn(x[0])
    assert not any("forward" in vars(m) for k, m in model.items() if k != "custom")
    assert model["custom"](x).equal(x + 1.0)


def test_hooks_fire_and_mixed_dtypes_keep_the_native_kernel() -> None:
    model, batch = _Net(nn.BatchNorm1d, (3, 4), True), _data()
    calls: list[str] = []
    model.bn.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    model.bn.register_forward_hook(lambda m, args, out: calls.append("post"))
    model.bn.register_full_backward_hook(lambda m, gin, gout: calls.append("backward"))
    HessianOperator(model, _ce, batch)
    assert calls == ["pre", "post", "backward"]
    bn = nn.BatchNorm1d(3, track_running_stats=False)  # float32 parameters
    assert _affine_applies(bn, torch.randn(4, 3))
    assert not _affine_applies(bn, torch.randn(4, 3, dtype=torch.float64))
    assert not _affine_applies(bn.eval(), torch.randn(4, 3))


# ---------------------------------------------------------------------------------------------------
# ReLU as x · mask
# ---------------------------------------------------------------------------------------------------


class _ReluNet(nn.Module):
    """Linear(4 → 5) → ReLU → Linear(→ 5) → ReLU → Linear(→ 2), float64. With ``inplace`` the second
    ReLU's result is read through its *input* (the in-place semantics the masked form must keep)."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 2)
        self.relu1, self.relu2 = nn.ReLU(inplace=inplace), nn.ReLU(inplace=inplace)
        self.inplace = inplace
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.a(x))
        z = self.b(h)
        out = self.relu2(z)
        return self.c(z if self.inplace else out)


@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
def test_masked_relu_hvp_loss_gradient_match_native(inplace: bool) -> None:
    model, batch = _ReluNet(inplace), _data(16)
    op = HessianOperator(model, _ce, batch)
    nodes = _graph_node_names(op)
    assert "MulBackward0" in nodes and not any("Relu" in n or "Threshold" in n for n in nodes), nodes
    # the same function: the ReLU values, and so the loss, are bitwise the native ones
    assert op.loss == _assert_matches_native(op, model, batch)
    assert not any("forward" in vars(m) for m in model.modules())


class _ReluSubclass(nn.ReLU):
    pass


def test_masked_relu_values_and_where_the_native_relu_is_kept() -> None:
    model = nn.ModuleDict(
        {
            "exact": nn.ReLU(),
            "subclass": _ReluSubclass(),
            "leaky": nn.LeakyReLU(),
            "relu6": nn.ReLU6(),
        }
    )
    x = torch.tensor([[-2.0, -0.5, 0.0, 0.5, 3.0, float("nan"), float("inf")]], dtype=torch.float64)
    with second_order_forms(model):
        assert [k for k, m in model.items() if "forward" in vars(m)] == ["exact"]
        relu = model["exact"]
        y = relu(x.clone().requires_grad_(True))
        assert type(y.grad_fn).__name__ == "MulBackward0"
        torch.testing.assert_close(y, torch.relu(x), rtol=0, atol=0, equal_nan=True)
        # -inf · 0 would be NaN: the native ReLU
        ninf = torch.tensor([-float("inf"), 1.0], requires_grad=True)
        out = relu(ninf)
        assert type(out.grad_fn).__name__ == "ReluBackward0" and out.tolist() == [0.0, 1.0]
        # a TorchFunctionMode is promised F.relu; integer and empty tensors: the native ReLU
        with _Seen() as mode:
            relu(x)
        assert any(getattr(f, "__name__", "") == "relu" for f in mode.funcs), mode.funcs
        assert relu(torch.tensor([-1, 2])).tolist() == [0, 2]
        assert relu(torch.empty(0)).numel() == 0
    assert not any("forward" in vars(m) for m in model.values())


def test_a_transformers_model_with_relu_gets_bitwise_the_native_products(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model not written here: a small BERT with ``hidden_act="relu"`` (its ``nn.ReLU`` modules)."""
    transformers = pytest.importorskip("transformers")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        cfg = transformers.BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            hidden_act="relu",
            max_position_embeddings=16,
            num_labels=3,
        )
        model = transformers.BertForSequenceClassification(cfg).double()
        ids, labels = torch.randint(0, 50, (4, 8)), torch.randint(0, 3, (4,))
    assert sum(type(m) is nn.ReLU for m in model.modules()) == 2

    def loss(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return m(input_ids=b[0], labels=b[1]).loss

    op = HessianOperator(model, loss, (ids, labels))
    assert not any("Relu" in n or "Threshold" in n for n in _graph_node_names(op))
    monkeypatch.setattr(operator_module, "_SECOND_ORDER_FORMS", {})
    native = HessianOperator(model, loss, (ids, labels))
    assert any("Relu" in n or "Threshold" in n for n in _graph_node_names(native))
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(op @ v, native @ v)
