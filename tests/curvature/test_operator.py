"""HessianOperator: products against dense float64 Hessians, weighting, blocks, BatchNorm, dropout,
side-effect freedom, the distributed reduce hook and input validation; attention (SDPA) models;
missing second derivatives and the finite-difference product."""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lightning_eos.curvature import (
    Batches,
    FunctionOperator,
    HessianOperator,
    PreconditionedOperator,
    batch_sharpness,
    hessian_eigenvalues,
)
from lightning_eos.curvature.operator import (
    FD_STEP_FACTOR,
    MissingSecondDerivativeError,
    finite_difference_step,
)

from ._helpers import OnceTanh, bn_net, ce, data, dense_hessian, mlp


def _vec(n: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_hvp_matches_dense_flat_and_list() -> None:
    model, batch = mlp(), data(20)
    op = HessianOperator(model, ce, batch)
    H = dense_hessian(model, ce, [batch], [20.0])
    assert op.dim == 57 and op.dtype == torch.float64 and len(op.params) == 4
    assert op.param_names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for s in range(3):
        v = _vec(op.dim, s)
        torch.testing.assert_close(op @ v, H @ v, rtol=1e-10, atol=1e-12)
    out = op.matvec(op.unflatten(v))
    assert isinstance(out, list) and [o.shape for o in out] == [p.shape for p in model.parameters()]
    torch.testing.assert_close(torch.cat([o.reshape(-1) for o in out]), H @ v, rtol=1e-10, atol=1e-12)
    assert op.num_hvps == 4


def test_multi_batch_unequal_sizes_is_full_batch_mean() -> None:
    model = mlp()
    x, y = data(23)
    parts = [(x[:5], y[:5]), (x[5:18], y[5:18]), (x[18:], y[18:])]
    op = HessianOperator(model, ce, parts)
    assert op.weights == [5.0, 13.0, 5.0] and op.total_weight == 23.0
    H_full = dense_hessian(model, ce, [(x, y)], [1.0])
    v = _vec(op.dim)
    torch.testing.assert_close(op @ v, H_full @ v, rtol=1e-10, atol=1e-12)
    # the memory cap (rebuilding graphs) and no caching at all give the same products
    for kw in ({"max_cached_batches": 1}, {"cache_graphs": False}):
        torch.testing.assert_close(
            HessianOperator(model, ce, parts, **kw) @ v, op @ v, rtol=1e-12, atol=1e-14
        )
    # the batching rule: a list of tuples/lists is many batches; a tuple, or a collated list
    # starting with a tensor ([x, y] as a DataLoader yields it), is one batch
    one = HessianOperator(model, ce, (x, y)) @ v
    torch.testing.assert_close(HessianOperator(model, ce, [(x, y)]) @ v, one)
    torch.testing.assert_close(HessianOperator(model, ce, [x, y]) @ v, one)
    many = HessianOperator(model, ce, [[x[:5], y[:5]], [x[5:], y[5:]]])
    assert many.weights == [5.0, 18.0]
    # Batches(...) forces a sequence, e.g. of bare-tensor batches
    sq = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    op_x = HessianOperator(model, sq, Batches([x[:5], x[5:]]))
    assert op_x.weights == [5.0, 18.0]
    torch.testing.assert_close(op_x @ v, HessianOperator(model, sq, x) @ v)


def test_explicit_weights() -> None:
    model = mlp()
    b1, b2 = data(6, seed=2), data(9, seed=3)
    op = HessianOperator(model, ce, [b1, b2], weights=[1.0, 3.0])
    H = dense_hessian(model, ce, [b1, b2], [1.0, 3.0])
    v = _vec(op.dim)
    torch.testing.assert_close(op @ v, H @ v, rtol=1e-10, atol=1e-12)
    # a batch without tensors needs explicit weights
    with pytest.raises(ValueError, match="weights"):
        HessianOperator(model, lambda m, b: ce(m, data(4)), [{"a": 1}])
    with pytest.raises(ValueError, match="weights"):
        HessianOperator(model, ce, [b1, b2], weights=[1.0])


def test_block_restriction_matches_dense_sub_block() -> None:
    model, batch = mlp(), data(20)
    names = ["2.weight", "0.bias"]
    op = HessianOperator(model, ce, batch, params=names)
    H = dense_hessian(model, ce, [batch], [20.0], names=names)
    v = _vec(op.dim)
    assert op.dim == 18 + 6
    torch.testing.assert_close(op @ v, H @ v, rtol=1e-10, atol=1e-12)
    # same block through Parameter objects, and as a restriction of the full operator
    params = [model[2].weight, model[0].bias]
    torch.testing.assert_close(HessianOperator(model, ce, batch, params=params) @ v, H @ v)
    full = HessianOperator(model, ce, batch)
    blk = full.restrict(names)
    torch.testing.assert_close(blk @ v, H @ v, rtol=1e-10, atol=1e-12)
    assert blk.num_hvps == 1 and full.num_hvps == 0


def test_batchnorm_train_mode_uses_batch_stats_and_keeps_running_stats() -> None:
    model = bn_net()
    model.eval()
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(1))
    bn = model[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    op = HessianOperator(model, ce, (x, y), mode="train")
    v = _vec(op.dim)
    H_train = dense_hessian(model, ce, [(x, y)], [16.0], train=True)
    torch.testing.assert_close(op @ v, H_train @ v, rtol=1e-9, atol=1e-11)
    H_eval = dense_hessian(model, ce, [(x, y)], [16.0], train=False)
    op_eval = HessianOperator(model, ce, (x, y), mode="eval")
    torch.testing.assert_close(op_eval @ v, H_eval @ v, rtol=1e-9, atol=1e-11)
    assert not torch.allclose(H_train @ v, H_eval @ v)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert torch.equal(bn.num_batches_tracked, before[2]) and not model.training


def test_backend_func_matches_autograd() -> None:
    model = bn_net()
    x, y = data(12, d_in=4)
    v = _vec(sum(p.numel() for p in model.parameters()))
    ref = HessianOperator(model, ce, (x, y)) @ v
    torch.testing.assert_close(
        HessianOperator(model, ce, (x, y), backend="func") @ v, ref, rtol=1e-9, atol=1e-11
    )


def test_dropout_is_fixed_symmetric_and_seeded() -> None:
    model = bn_net(dropout=0.5)
    x, y = data(16, d_in=4)
    op = HessianOperator(model, ce, (x, y), seed=3)
    u, v = _vec(op.dim, 1), _vec(op.dim, 2)
    hv = op @ v
    assert torch.equal(op @ v, hv)  # same mask every product
    assert abs(float(u @ hv) - float(v @ (op @ u))) < 1e-12 * float(hv.norm() * u.norm())  # symmetric
    # same seed → same operator (also when graphs are rebuilt per product); other seed → other mask
    torch.testing.assert_close(HessianOperator(model, ce, (x, y), seed=3, cache_graphs=False) @ v, hv)
    assert not torch.allclose(HessianOperator(model, ce, (x, y), seed=4) @ v, hv)
    assert not torch.allclose(HessianOperator(model, ce, (x, y), mode="eval") @ v, hv)


def _snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "track": [getattr(m, "track_running_stats", None) for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def _assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), key
        else:
            assert isinstance(x, list) and isinstance(y, list) and len(x) == len(y), key
            for xi, yi in zip(x, y):
                if isinstance(xi, torch.Tensor):
                    assert isinstance(yi, torch.Tensor) and torch.equal(xi, yi), key
                else:
                    assert xi == yi, key


def test_side_effect_free_bitwise() -> None:
    model = bn_net(dropout=0.3)
    x, y = data(16, d_in=4)
    ce(model, (x, y)).backward()  # leaves .grad set and BN stats updated once
    model.eval()
    model[3].train()  # mixed flags must survive
    model[0].bias.requires_grad_(False)  # frozen, yet differentiated when named explicitly
    torch.manual_seed(123)
    snap = _snapshot(model)
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]
    op = HessianOperator(model, ce, batches, params=["0.bias", "4.weight", "1.weight"], max_cached_batches=1)
    op @ _vec(op.dim)
    hessian_eigenvalues(model, ce, batches, k=2, which="both", tol=1e-6)
    with pytest.warns(RuntimeWarning, match="not converged"):
        hessian_eigenvalues(model, ce, batches, mode="eval", method="power", max_iter=5)
    HessianOperator(model, ce, batches, backend="func") @ _vec(48)
    batch_sharpness(model, ce, batches[0])
    _assert_same(snap, _snapshot(model))


class _FakeWorld:
    """An in-process all-reduce (SUM) over ``size`` threads, like a gloo process group."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size)
        self.slots: list[torch.Tensor | None] = [None] * size

    def reduce_fn(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(s for s in self.slots if s is not None)
            self.barrier.wait()
            t.copy_(total)  # in place, like torch.distributed.all_reduce
            return t

        return reduce


def test_reduce_hook_two_ranks_equals_full_batch() -> None:
    model = mlp()
    x, y = data(25)
    shards = [[(x[:4], y[:4]), (x[4:10], y[4:10])], [(x[10:], y[10:])]]  # unequal shards
    bs_shards = [(x[:10], y[:10]), (x[10:20], y[10:20])]  # one minibatch per rank, equal sizes
    v = _vec(57)
    world = _FakeWorld(2)
    out: dict[int, dict[str, object]] = {}

    def rank(r: int) -> None:
        op = HessianOperator(model, ce, shards[r], reduce=world.reduce_fn(r))
        out[r] = {
            "hv": op @ v,
            "weight": op.total_weight,
            "loss": op.loss,
            "eig": hessian_eigenvalues(model, ce, shards[r], k=2, reduce=world.reduce_fn(r), tol=1e-8),
            "bs": batch_sharpness(model, ce, bs_shards[r], reduce=world.reduce_fn(r)),
        }

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(out) == {0, 1}
    full = HessianOperator(model, ce, (x, y))
    for r in range(2):
        torch.testing.assert_close(out[r]["hv"], full @ v, rtol=1e-10, atol=1e-12)
        assert out[r]["weight"] == 25.0
        assert abs(out[r]["loss"] - full.loss) < 1e-12
    ref = hessian_eigenvalues(model, ce, (x, y), k=2, tol=1e-8).eigenvalues
    torch.testing.assert_close(out[0]["eig"].eigenvalues, ref, rtol=1e-9, atol=0)
    assert torch.equal(out[0]["eig"].eigenvalues, out[1]["eig"].eigenvalues)  # identical on all ranks
    assert out[0]["bs"] == out[1]["bs"]
    assert abs(out[0]["bs"] - batch_sharpness(model, ce, (x[:20], y[:20]))) < 1e-10


def test_bfloat16_model_accumulates_in_float32() -> None:
    model = mlp(dtype=torch.bfloat16)
    x, y = data(32)
    op = HessianOperator(model, lambda m, b: ce(m, (b[0].bfloat16(), b[1])), (x, y))
    assert op.dtype == torch.float32
    hv = op @ _vec(op.dim).float()
    assert hv.dtype == torch.float32
    H = dense_hessian(model, ce, [(x, y)], [1.0])
    ref = H @ _vec(op.dim)
    assert float((hv.double() - ref).norm() / ref.norm()) < 0.1  # bfloat16 forward: ~1e-2 accurate
    op64 = HessianOperator(mlp(), ce, (x, y), dtype=torch.float64)
    assert op64.dtype == torch.float64


def test_bad_inputs_raise_clear_errors() -> None:
    model, batch = mlp(), data(8)
    with pytest.raises(ValueError, match="empty"):
        HessianOperator(model, ce, [])
    with pytest.raises(ValueError, match="empty"):
        HessianOperator(model, ce, (torch.zeros(0, 5, dtype=torch.float64), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="not a parameter"):
        HessianOperator(model, ce, batch, params=[nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="not a parameter name"):
        HessianOperator(model, ce, batch, params=["nope.weight"])
    with pytest.raises(ValueError, match="mode"):
        HessianOperator(model, ce, batch, mode="test")
    with pytest.raises(ValueError, match="backend"):
        HessianOperator(model, ce, batch, backend="jax")
    with pytest.raises(ValueError, match="scalar"):
        HessianOperator(model, lambda m, b: m(b[0]).sum(1), batch)
    with pytest.raises(ValueError, match="does not require grad"):
        HessianOperator(model, lambda m, b: ce(m, b).detach(), batch)
    with pytest.raises(ValueError, match="non-finite"):
        HessianOperator(model, lambda m, b: ce(m, b) * float("nan"), batch)
    op = HessianOperator(model, ce, batch)
    with pytest.raises(ValueError, match="flat vector"):
        op @ torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="list of 4"):
        op @ [torch.zeros(3)]


def test_function_and_preconditioned_operators() -> None:
    a = torch.diag(torch.tensor([3.0, 2.0, -1.0], dtype=torch.float64))
    op = FunctionOperator(lambda v: a @ v, 3)
    assert op.dim == 3 and op.dtype == torch.float64 and op.device.type == "cpu"
    p = torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)
    pre = PreconditionedOperator(op, p)
    v = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(pre @ v, torch.tensor([0.75, 2.0, -4.0], dtype=torch.float64))
    assert pre.num_hvps == 1 and op.num_hvps == 1
    with pytest.raises(ValueError, match="positive"):
        PreconditionedOperator(op, torch.tensor([1.0, 0.0, 1.0]))


def test_loss_fn_may_run_a_replica_sharing_the_parameters() -> None:
    # e.g. a Lightning training_step on a copy of the module that shares the Parameter objects
    model, batch = mlp(), data(12)
    replica = copy.deepcopy(model)
    for i in (0, 2):
        replica[i].weight, replica[i].bias = model[i].weight, model[i].bias
    v = _vec(57)
    via_replica = HessianOperator(model, lambda m, b: ce(replica, b), batch) @ v
    torch.testing.assert_close(via_replica, HessianOperator(model, ce, batch) @ v, rtol=1e-12, atol=1e-14)


def test_func_backend_failure_is_explained() -> None:
    model, (x, y) = mlp(), data(8)

    def mse(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.mse_loss(m(b[0]), nn.functional.one_hot(b[1], 3).double())

    op = HessianOperator(model, mse, (x, y), backend="func")  # construction uses autograd
    try:
        hv = op @ _vec(op.dim)
    except RuntimeError as err:  # torch 2.13: "ZeroTensors are immutable"
        assert "backend='autograd'" in str(err)
    else:  # a torch release that fixed it must agree with autograd
        torch.testing.assert_close(hv, HessianOperator(model, mse, (x, y)) @ _vec(op.dim))


# --------------------------------------------------------------------------------------------------
# Attention: F.scaled_dot_product_attention runs on its math kernel for second derivatives
# --------------------------------------------------------------------------------------------------


class _Attention(nn.Module):
    """qkv projection → 2-head self-attention → mean over tokens → linear (8 → 3 classes).

    ``variant="causal"``: ``is_causal=True``; ``"mask"``: a fixed boolean mask (True = attend).
    ``manual=True`` spells softmax attention out (the dense reference, no SDPA kernel at all).
    """

    def __init__(self, variant: str, manual: bool = False, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(4)
            self.qkv = nn.Linear(8, 24).to(dtype)
            self.out = nn.Linear(8, 3).to(dtype)
            mask = torch.rand(5, 5) < 0.6
        self.variant, self.manual = variant, manual
        self.register_buffer("mask", mask | torch.eye(5, dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, 2, 4).permute(2, 0, 3, 1, 4)
        mask = torch.ones(t, t, dtype=torch.bool).tril() if self.variant == "causal" else self.mask
        if self.manual:
            scores = (q @ k.transpose(-1, -2)) / 2.0  # sqrt(head dim 4)
            o = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        elif self.variant == "causal":
            o = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(n, t, 8).mean(1))


def _tokens(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(8)
    return torch.randn(6, 5, 8, generator=g, dtype=torch.float64).to(dtype), torch.randint(
        0, 3, (6,), generator=g
    )


def _fused_kernel_lacks_double_backward(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether plain double backprop through the default SDPA kernel fails on this torch."""
    params = list(model.parameters())
    try:
        g = torch.autograd.grad(ce(model, batch), params, create_graph=True)
        torch.autograd.grad(g, params, [torch.ones_like(t) for t in g])
    except RuntimeError as err:
        return "not implemented" in str(err)
    return False


@pytest.mark.parametrize("variant", ["causal", "mask"])
def test_attention_hvp_matches_dense_and_loss_matches_default_kernel(variant: str) -> None:
    import warnings

    model, batch = _Attention(variant), _tokens()
    H = dense_hessian(_Attention(variant, manual=True), ce, [batch], [6.0])
    backends = torch.backends.cuda
    flags = (backends.flash_sdp_enabled(), backends.mem_efficient_sdp_enabled(), backends.math_sdp_enabled())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent fallback to finite differences
        op = HessianOperator(model, ce, batch, hvp="exact")
        for s in range(2):
            v = _vec(op.dim, s)
            torch.testing.assert_close(op @ v, H @ v, rtol=1e-10, atol=1e-12)
    assert op.hvp_method == "exact"
    # the kernel choice is global state: restored after construction and products
    assert flags == (
        backends.flash_sdp_enabled(),
        backends.mem_efficient_sdp_enabled(),
        backends.math_sdp_enabled(),
    )
    # the loss the operator measures is the loss of a plain call with the default (fused) kernel
    with torch.no_grad():
        plain = float(ce(model, batch))
    assert abs(op.loss - plain) <= 1e-13 * abs(plain)
    # float32: same loss to rounding, products as accurate as float32 allows
    m32, b32 = _Attention(variant, dtype=torch.float32), _tokens(torch.float32)
    op32 = HessianOperator(m32, ce, b32)
    with torch.no_grad():
        plain32 = float(ce(m32, b32))
    assert op32.hvp_method == "exact" and abs(op32.loss - plain32) <= 1e-6 * abs(plain)
    v = _vec(op.dim)
    assert float((op32 @ v.float()).double().sub(H @ v).norm() / (H @ v).norm()) < 1e-5
    if _fused_kernel_lacks_double_backward(model, batch):  # what the math kernel is needed for
        import lightning_eos.curvature.operator as operator_module

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(operator_module, "math_attention", contextlib.nullcontext)
            with pytest.raises(MissingSecondDerivativeError, match="hvp='finite_difference'"):
                HessianOperator(model, ce, batch, hvp="exact") @ v


def test_hugging_face_gpt2_eval_mode_sdpa_equals_eager_attention() -> None:
    transformers = pytest.importorskip("transformers")

    def gpt2(attn: str) -> nn.Module:
        cfg = transformers.GPT2Config(
            vocab_size=13, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
        )
        cfg._attn_implementation = attn
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return transformers.GPT2LMHeadModel(cfg).double().eval()

    def lm_loss(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        # next-token cross-entropy in float64 (the built-in `labels=` loss casts logits to float32)
        logits = m(input_ids=ids).logits
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 13), ids[:, 1:].reshape(-1))

    ids = torch.randint(0, 13, (3, 6), generator=torch.Generator().manual_seed(2))
    sdpa, eager = gpt2("sdpa"), gpt2("eager")
    op = HessianOperator(sdpa, lm_loss, ids, mode="eval", hvp="exact")
    ref = HessianOperator(eager, lm_loss, ids, mode="eval", hvp="exact")  # softmax attention spelled out
    assert op.dim == ref.dim and op.hvp_method == "exact"
    v = _vec(op.dim)
    torch.testing.assert_close(op @ v, ref @ v, rtol=1e-9, atol=1e-11)
    with torch.no_grad():
        plain = float(lm_loss(sdpa, ids))  # the default kernel, outside the operator
    assert abs(op.loss - plain) < 1e-13 * plain


# --------------------------------------------------------------------------------------------------
# Missing second derivatives and the finite-difference product
# --------------------------------------------------------------------------------------------------

#: Relative error bound of one finite-difference product on these tiny float64 tanh models (measured
#: 9e-11 to 3e-10 here; benchmarks/bench_hvp.py: <= 8.6e-10 on the digits MLP and a SiLU CNN).
FD64 = 1e-8


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


class _Opaque(torch.autograd.Function):
    """Identity without any backward: a backward that calls it has no derivative of its own."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class _OpaqueTanh(torch.autograd.Function):
    """tanh whose backward goes through :class:`_Opaque`: the double backward *raises* (at a product)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = x.tanh()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return _Opaque.apply(g * (1 - y * y))


class _Act(nn.Module):
    def __init__(self, fn: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn.apply(x)


def _custom_mlp(fn: type[torch.autograd.Function]) -> nn.Module:
    model = mlp()  # same weights as mlp(): its dense Hessian is the reference
    model[1] = _Act(fn)
    return model


@pytest.mark.parametrize("fn", [OnceTanh, _OpaqueTanh], ids=["once_differentiable", "raises"])
def test_function_without_double_backward_exact_raises_auto_falls_back_once(fn: type) -> None:
    model, batch = _custom_mlp(fn), data(20)
    H = dense_hessian(mlp(), ce, [batch], [20.0])
    vs = [_vec(57, s) for s in range(3)]
    with pytest.raises(MissingSecondDerivativeError, match="hvp='finite_difference'"):
        HessianOperator(model, ce, batch, hvp="exact") @ vs[0]  # once_differentiable: at construction
    with pytest.warns(RuntimeWarning, match="finite differences") as record:
        op = HessianOperator(model, ce, batch)  # hvp="auto"
        outs = [op @ v for v in vs]
        blk = op.restrict(["2.weight"]) @ vs[0][36:54]
    assert sum(issubclass(w.category, RuntimeWarning) for w in record) == 1  # once, not per product
    assert "1e-09" in str(record[0].message)  # the expected accuracy, for this dtype
    assert op.hvp_method == "finite_difference" and op.num_cached_batches == 0
    for v, out in zip(vs, outs):
        assert _rel(out, H @ v) < FD64
    H_blk = H[36:54, 36:54]
    assert _rel(blk, H_blk @ vs[0][36:54]) < FD64
    # without the check, torch.autograd.grad drops the once_differentiable part without a word
    if fn is OnceTanh:
        g = torch.autograd.grad(ce(model, batch), list(model.parameters()), create_graph=True)
        p = list(model.parameters())
        silent = torch.autograd.grad(
            g, p, [c.view(t.shape) for c, t in zip(vs[0].split(op._sizes), p)], allow_unused=True
        )
        flat = torch.cat(
            [(t if t is not None else torch.zeros_like(q)).reshape(-1) for t, q in zip(silent, p)]
        )
        assert _rel(flat, H @ vs[0]) > 0.1


def test_finite_difference_semantics_match_exact() -> None:
    # weights and unequal batches, a block, train-mode BatchNorm, dropout masks, frozen parameters
    model = mlp()
    b1, b2 = data(6, seed=2), data(9, seed=3)
    H = dense_hessian(model, ce, [b1, b2], [1.0, 3.0])
    fd = HessianOperator(model, ce, [b1, b2], weights=[1.0, 3.0], hvp="finite_difference")
    assert fd.hvp_method == "finite_difference" and fd.num_cached_batches == 0
    v = _vec(57)
    assert _rel(fd @ v, H @ v) < FD64
    names = ["2.weight", "0.bias"]
    sub = HessianOperator(model, ce, [b1, b2], weights=[1.0, 3.0], params=names, hvp="finite_difference")
    H_sub = dense_hessian(model, ce, [b1, b2], [1.0, 3.0], names=names)
    assert _rel(sub @ v[:24], H_sub @ v[:24]) < FD64
    assert _rel(fd.restrict(names) @ v[:24], H_sub @ v[:24]) < FD64
    assert fd.loss == HessianOperator(model, ce, [b1, b2], weights=[1.0, 3.0]).loss
    # train-mode BatchNorm (batch statistics) and a dropout mask: the same operator as the exact one
    bn = bn_net(dropout=0.4)
    x, y = data(16, d_in=4)
    u = _vec(53, 1)
    exact = HessianOperator(bn, ce, (x, y), seed=5, hvp="exact") @ u
    assert _rel(HessianOperator(bn, ce, (x, y), seed=5, hvp="finite_difference") @ u, exact) < FD64
    other_mask = HessianOperator(bn, ce, (x, y), seed=6, hvp="finite_difference") @ u
    assert _rel(other_mask, exact) > 1e-3  # the masks really are in play
    # the operator with the cached graph and the default "auto" are the same numbers when exact works
    assert torch.equal(HessianOperator(bn, ce, (x, y), seed=5) @ u, exact)


def test_finite_difference_float32_and_zero_vector() -> None:
    model, batch = mlp(dtype=torch.float32), data(20)
    fd = HessianOperator(model, lambda m, b: ce(m, (b[0].float(), b[1])), batch, hvp="finite_difference")
    H = dense_hessian(model, ce, [batch], [20.0])
    v = _vec(57)
    assert _rel(fd @ v.float(), H @ v) < 1e-3  # float32: 3e-5 here, up to 8e-4 on the digits MLP
    assert torch.equal(fd @ torch.zeros(57), torch.zeros(57))
    assert fd.num_hvps == 2


def test_finite_difference_is_side_effect_free_bitwise() -> None:
    model = bn_net(dropout=0.3)
    x, y = data(16, d_in=4)
    ce(model, (x, y)).backward()
    model.eval()
    model[0].bias.requires_grad_(False)  # frozen, differentiated when named
    torch.manual_seed(7)
    snap = _snapshot(model)
    params_before = list(model.parameters())
    op = HessianOperator(
        model, ce, [(x[:7], y[:7]), (x[7:], y[7:])], params=["0.bias", "4.weight"], hvp="finite_difference"
    )
    op @ _vec(op.dim)
    hessian_eigenvalues(model, ce, (x, y), hvp="finite_difference", max_iter=6, tol=1e-2)
    _assert_same(snap, _snapshot(model))
    assert all(p is q for p, q in zip(model.parameters(), params_before))


def test_finite_difference_reduce_two_ranks_equals_full_batch() -> None:
    model = mlp()
    x, y = data(25)
    shards = [[(x[:4], y[:4]), (x[4:10], y[4:10])], [(x[10:], y[10:])]]
    v = _vec(57)
    world = _FakeWorld(2)
    out: dict[int, torch.Tensor] = {}

    replicas = [copy.deepcopy(model) for _ in range(2)]  # one model per rank, as under DDP

    def rank(r: int) -> None:
        op = HessianOperator(replicas[r], ce, shards[r], reduce=world.reduce_fn(r), hvp="finite_difference")
        out[r] = op @ v

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    full = HessianOperator(model, ce, (x, y), hvp="exact") @ v
    assert set(out) == {0, 1} and torch.equal(out[0], out[1])
    assert _rel(out[0], full) < FD64


def test_finite_difference_needs_the_model_attributes_and_hvp_is_checked() -> None:
    model, batch = mlp(), data(12)
    replica = copy.deepcopy(model)
    for i in (0, 2):
        replica[i].weight, replica[i].bias = model[i].weight, model[i].bias
    op = HessianOperator(model, lambda m, b: ce(replica, b), batch, hvp="finite_difference")
    with pytest.raises(RuntimeError, match="functional_call"):
        op @ _vec(57)
    with pytest.raises(ValueError, match="hvp"):
        HessianOperator(model, ce, batch, hvp="fd")


def test_finite_difference_step_formula() -> None:
    # h·‖v‖ = cbrt(eps)·(1 + ‖θ‖): a relative step of cbrt(eps) (6.1e-6 in float64, 4.9e-3 in float32)
    assert finite_difference_step(0.0, 1.0, torch.float64) == pytest.approx(FD_STEP_FACTOR * 2.0 ** (-52 / 3))
    assert finite_difference_step(9.0, 2.0, torch.float32) == pytest.approx(
        FD_STEP_FACTOR * 2.0 ** (-23 / 3) * 5
    )


# --------------------------------------------------------------------------------------------------
# The cheaper product: one flat graph output; the per-tensor path for blocks and constant gradients
# --------------------------------------------------------------------------------------------------


def test_flat_and_per_tensor_products_agree_and_constant_gradients_are_zero_rows() -> None:
    model, batch = mlp(), data(20)
    op = HessianOperator(model, ce, batch)
    v = _vec(57)
    # a restriction to every parameter in another order takes the per-tensor path
    order = ["2.bias", "0.weight", "2.weight", "0.bias"]
    perm = torch.cat([torch.arange(o, o + n) for o, n in [(54, 3), (0, 30), (36, 18), (30, 6)]])
    torch.testing.assert_close(op.restrict(order) @ v[perm], (op @ v)[perm], rtol=1e-13, atol=1e-15)

    class WithConstant(nn.Module):  # c enters the loss linearly: its gradient has no graph
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()
            self.c = nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def loss(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return ce(m.net, b) + 3.0 * m.c.sum()

    wc = WithConstant()
    opc = HessianOperator(wc, loss, batch)
    assert opc.param_names[0] == "c"  # the module's own parameters come first
    assert opc._graphs[0].live == [False, True, True, True, True] and opc._graphs[0].flat is not None
    u = _vec(59, 2)
    H = dense_hessian(mlp(), ce, [batch], [20.0])
    ref = torch.cat([torch.zeros(2, dtype=torch.float64), H @ u[2:]])
    torch.testing.assert_close(opc @ u, ref, rtol=1e-10, atol=1e-12)
