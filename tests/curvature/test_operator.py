"""HessianOperator: products against dense float64 Hessians, weighting, blocks, BatchNorm, dropout,
side-effect freedom, the distributed reduce hook and input validation."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable

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

from ._helpers import bn_net, ce, data, dense_hessian, mlp


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
