"""Lightning plumbing shared by every lightning-eos callback.

The callbacks are thin adapters over the torch-only core; what they have in common lives here, once:

* :class:`StepReplica` — run the user's own ``training_step`` on a replica of the LightningModule
  (see :mod:`lightning_eos.isolation`) with logging, printing and optimizer access silenced, and
  return the loss it computes. Automatic and manual optimization are both handled.
* :class:`OptimizerStepTracker` — tells real optimizer steps from accumulation micro-batches and
  records the hyper-parameters each optimizer *applied* (read in ``on_before_optimizer_step``: by
  ``on_train_batch_end`` a step-interval scheduler has already moved the LR to the next step's).
* :func:`guarded` per-step hooks (an unexpected error makes the callback step aside, agreed by
  every rank under DDP on the :func:`fault_group`).
* rank-aware logging to every attached logger, the TensorBoard custom-scalars layout, the DDP
  all-reduce used by the probes, and the check for unsupported strategies.
* the places where ``lightning.pytorch`` and the standalone ``pytorch_lightning`` package differ by
  class identity (:func:`inert_optimizer`, :func:`lightning_module_class`,
  :func:`is_tensorboard_logger`): the callbacks run under either package's Trainer.
"""

from __future__ import annotations

import contextlib
import functools
import traceback
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any, TypeVar, overload

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from lightning_eos.isolation import replicate

__all__ = [
    "InertOptimizer",
    "OptimizerStepTracker",
    "SilentScheduler",
    "FAULT_TIMEOUT_S",
    "fault_group",
    "guarded",
    "StepReplica",
    "inert_optimizer",
    "is_tensorboard_logger",
    "lightning_module_class",
    "add_custom_scalars",
    "allreduce_sum",
    "any_rank",
    "check_supported_strategy",
    "extract_loss",
    "group_hparams",
    "log_metrics",
    "logging_step",
    "merge_custom_scalars",
]

# Sharded strategies keep each rank's parameters partial: a replica or an HVP over them would be a
# silent wrong number, so the callbacks refuse them at setup.
_UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def check_supported_strategy(trainer: Trainer, owner: str) -> None:
    """Raise a clear error at setup for strategies that shard parameters (FSDP, DeepSpeed, ...)."""
    names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
    bad = names.intersection(_UNSUPPORTED_STRATEGIES)
    if bad:
        raise RuntimeError(
            f"{owner} does not support the {type(trainer.strategy).__name__} strategy: it shards "
            "parameters across ranks, so curvature probes and twins would see partial weights. "
            "Supported: single device, 'ddp', 'ddp_spawn' (and other non-sharded data-parallel "
            "strategies)."
        )


HookT = TypeVar("HookT", bound=Callable[..., Any])

#: Seconds a rank whose callback failed waits, in the fault handshake, for every other rank to report
#: the same failure: the timeout of the fault group (see :func:`fault_group`), read when it is created.
FAULT_TIMEOUT_S = 60.0

# The fault group of the current default process group: (default group, fault group). A new default
# group (a new ``init_process_group`` in this process) gets a new fault group.
_fault_groups: tuple[Any, Any] | None = None


def fault_group(trainer: Trainer) -> Any:
    """The process group the callbacks' fault handshake runs on, or None in one process.

    A gloo group of all ranks, separate from the default group, with a timeout of
    :data:`FAULT_TIMEOUT_S`: its collectives never interleave with the callbacks' own (Hessian-vector
    products, flags, broadcasts) or DDP's, so a rank waiting in the handshake can never be matched with
    a rank inside one of those. Created once per default group and shared by every callback; call it
    from each callback's ``setup``: every rank runs the same callbacks' ``setup`` in the same order,
    and ``new_group`` must be called by every rank. Gloo, whatever the default backend: the handshake
    exchanges a few integers on the CPU. Nothing is created (and nothing costs) in one process.
    """
    global _fault_groups
    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.group.WORLD
    if _fault_groups is None or _fault_groups[0] is not world:
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=FAULT_TIMEOUT_S))
        _fault_groups = (world, group)
    return _fault_groups[1]


def _from_collective(err: BaseException) -> bool:
    """Whether ``err`` was raised inside a ``torch.distributed`` collective (a timeout, a peer gone).

    Gloo raises those as plain ``RuntimeError``: they are told by the traceback passing through
    ``torch.distributed.distributed_c10d``, NCCL's by their ``DistError`` type.
    """
    if isinstance(err, dist.DistError):
        return True
    c10d = dist.distributed_c10d.__file__
    return any(frame.f_code.co_filename == c10d for frame, _ in traceback.walk_tb(err.__traceback__))


def _all_ranks_failed_here(callback: Any, trainer: Trainer, hook: str, err: Exception) -> bool:
    """The fault handshake: whether every rank failed in ``callback``'s ``hook`` at this step.

    Only a rank whose hook raised calls it; the others are running on, so the handshake completes
    only when every rank failed. Each rank contributes (callback position, hook, step, whether the
    error came from a collective); they must all match: two ranks failing in different callbacks,
    hooks or steps have not stopped at the same point (one may have run a collective the other never
    reaches), and a collective that raised (a peer gone, a timeout) leaves the default group in an
    unknown state (the ranks raise then, also when every rank's collective failed). False when the
    handshake timed out (some rank did not fail) or could not run.
    """
    group = fault_group(trainer)
    if group is None:
        return False
    try:
        position = trainer.callbacks.index(callback)  # type: ignore[attr-defined]
    except ValueError:
        position = -1
    mine = torch.tensor(
        [position, zlib.crc32(hook.encode()), trainer.global_step, int(_from_collective(err))],
        dtype=torch.int64,
    )
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(rows, mine, group=group)
    except Exception:
        # Gloo ends a collective that timed out itself (the group's timeout) or whose peer is gone:
        # nothing stays pending on the group to hold up this process's exit.
        return False
    return all(torch.equal(row, mine) for row in rows) and int(mine[-1]) == 0


def guarded(hook: HookT) -> HookT:
    """Make a callback's per-step hook unable to stop training.

    An unexpected exception inside the hook is reported once, with its traceback, as a rank-zero
    ``RuntimeWarning``, and the callback steps aside for the rest of the run (every guarded hook of
    it returns at once from then on): the training goes on exactly as without the callback. With
    ``callback.strict = True`` (the tests use it) the exception propagates instead. Set-up hooks are
    not guarded: an unsupported setup is a clear error at setup, never a silent no-op.

    Under DDP a rank that stepped aside alone would leave the others waiting in the callback's next
    collective, so the ranks agree first, on the :func:`fault_group`: the failing rank waits up to
    :data:`FAULT_TIMEOUT_S` for every rank to report a failure of the same callback, hook and step.
    When all do (a deterministic error, e.g. an op without a double backward or a bad ``loss_fn``,
    hits every rank at the same point), every rank steps aside and the run goes on as without the
    callback. Otherwise (the other ranks are inside a collective waiting for this one) a
    ``RuntimeError`` saying that the error occurred on some ranks only is raised from the original
    exception after that wait: a clear error, not a hang; the other ranks fail when this process
    exits. Ranks that did not fail take no part in the handshake and pay nothing for it; neither
    does single-process training.
    """

    @functools.wraps(hook)
    def run(self: Any, trainer: Trainer, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "failure", None) is not None:
            return None
        try:
            return hook(self, trainer, *args, **kwargs)
        except Exception as err:
            if getattr(self, "strict", False):
                raise
            trace = traceback.format_exc()
            step = trainer.global_step
            where = f"{type(self).__name__}: unexpected error in {hook.__name__} at step {step}"
            everywhere = ""
            if trainer.world_size > 1:
                if not _all_ranks_failed_here(self, trainer, hook.__name__, err):
                    # A new error chained to the original (``add_note`` needs Python 3.11).
                    raise RuntimeError(
                        f"{where} ({type(err).__name__}: {err}), on some ranks only (or not at the same "
                        "point on every rank): the callback cannot step aside on every rank at once, so "
                        "the error is raised instead of leaving the other ranks waiting in the "
                        "callback's next collective."
                    ) from err
                everywhere = f" on all {trainer.world_size} ranks (it failed on every rank at this point)"
            self.failure = f"{type(err).__name__}: {err}"
            rank_zero_warn(
                f"{where}; the callback disables itself{everywhere} for the rest of the run and training "
                f"goes on unchanged. Pass strict=True to raise instead.\n{trace}",
                category=RuntimeWarning,
            )
            return None

    return run  # type: ignore[return-value]


def extract_loss(output: Any) -> torch.Tensor:
    """The loss in a ``training_step`` output: the tensor itself or ``output['loss']``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    raise ValueError(
        "training_step must return a loss tensor or a dict with a 'loss' tensor for lightning-eos to "
        f"measure it; it returned {type(output).__name__}. Pass loss_fn=... to the callback instead."
    )


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


class _InertSteps:
    """The inert half of :class:`InertOptimizer`, mixed into either framework's LightningOptimizer."""

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        return closure() if closure is not None else None

    def zero_grad(self, *args: Any, **kwargs: Any) -> None:
        return None

    @contextlib.contextmanager
    def toggle_model(self, sync_grad: bool = True) -> Iterator[None]:
        yield


class InertOptimizer(_InertSteps, LightningOptimizer):
    """Stands in for a real optimizer inside a replica's manual-optimization ``training_step``.

    Built like Lightning's own wrapper (its class is a dynamic subclass of the real optimizer's
    class), so user code that checks ``isinstance(opt, (Optimizer, LightningOptimizer))`` accepts it.
    Reads (``param_groups``, ``state``, ``defaults``) go to the real optimizer; ``step`` only evaluates
    a closure if one is given, ``zero_grad`` and ``toggle_model`` do nothing, so a replica never
    updates, zeroes or toggles anything of the real run. Under the standalone ``pytorch_lightning``
    package use :func:`inert_optimizer`: it subclasses that package's ``LightningOptimizer``.
    """


def _standalone(obj: Any) -> bool:
    """Whether ``obj`` (a Trainer, a LightningModule) comes from the standalone ``pytorch_lightning``
    package rather than ``lightning.pytorch``: the two define distinct classes of the same names."""
    return any(cls.__module__.startswith("pytorch_lightning.") for cls in type(obj).__mro__)


@functools.cache
def _standalone_inert_class() -> type:
    from pytorch_lightning.core.optimizer import LightningOptimizer as StandaloneOptimizer

    return type(
        "InertOptimizer",
        (_InertSteps, StandaloneOptimizer),
        {"__doc__": InertOptimizer.__doc__, "__module__": __name__},
    )


def inert_optimizer(optimizer: torch.optim.Optimizer, trainer: Any) -> Any:
    """An :class:`InertOptimizer` over ``optimizer``, of the trainer's framework: user code that checks
    ``isinstance(opt, LightningOptimizer)`` with either package's class accepts it."""
    if _standalone(trainer):
        return _standalone_inert_class()(optimizer)
    return InertOptimizer(optimizer)


def lightning_module_class(module: Any) -> type:
    """The ``LightningModule`` base class of ``module``'s framework (``lightning.pytorch`` or the
    standalone ``pytorch_lightning``): the class whose hooks are the do-nothing defaults."""
    if _standalone(module):
        import pytorch_lightning

        return pytorch_lightning.LightningModule
    return LightningModule


def is_tensorboard_logger(logger: Any) -> bool:
    """Whether ``logger`` is a TensorBoardLogger of either framework (or a subclass of one)."""
    return isinstance(logger, TensorBoardLogger) or any(
        cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__
    )


class SilentScheduler:
    def __init__(self, scheduler: Any) -> None:
        self._scheduler = scheduler

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scheduler, name)

    def step(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Silent:
    """Takes any attribute access, call or index and does nothing: the replica's logger."""

    def __getattr__(self, name: str) -> _Silent:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> _Silent:
        return self

    def __getitem__(self, key: Any) -> _Silent:
        return self


class _TrainerView:
    """The trainer as a replica sees it: the real one's attributes to read, a logger that swallows
    everything, and writes (``self.trainer.should_stop = True``, ...) that land on the view, never on
    the real trainer.

    A ``training_step`` that writes to ``self.logger.experiment`` (images every N batches, say) must
    not do so from a probe or a twin, nor crash there.
    """

    logger = _Silent()
    loggers: list[Any] = []  # noqa: RUF012 (read-only by intent: nothing appends to it)

    def __init__(self, trainer: Trainer) -> None:
        self.__dict__["_real"] = trainer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_real"], name)


class StepReplica:
    """The user's ``training_step`` evaluated on a replica of the LightningModule.

    Args:
        pl_module: the real (unwrapped) LightningModule.
        trainer: the running trainer; the replica may read it (``self.trainer.global_step``,
            ``self.current_epoch``) but cannot log through it.
        share_parameters: True for a probe (derivatives with respect to the real weights; private
            buffers and carried state), False for a twin (private weights too).
        eager: evaluate the step as a second-order pass needs it (``torch.compile``'d submodules
            replaced by their eager originals, gradient checkpointing off; see
            :func:`lightning_eos.isolation.replicate`). For probes; a twin keeps the real execution.
        optimizer_idx: under manual optimization, which ``manual_backward`` call of the step holds
            the loss of interest (the n-th call, n = ``optimizer_idx``).

    The replica's ``log``/``log_dict``/``print`` do nothing, and under manual optimization its
    ``optimizers()``/``lr_schedulers()``/``manual_backward``/``clip_gradients`` are inert stand-ins
    that record the loss instead of stepping, so a replica step never reaches the real run.
    """

    def __init__(
        self,
        pl_module: LightningModule,
        trainer: Trainer,
        *,
        share_parameters: bool,
        eager: bool = False,
        optimizer_idx: int = 0,
    ) -> None:
        self.module = replicate(pl_module, share_parameters=share_parameters, eager=eager)
        self.optimizer_idx = optimizer_idx
        self._captured: list[torch.Tensor] = []
        self._install(trainer)

    def _install(self, trainer: Trainer) -> None:
        module = self.module
        module._trainer = _TrainerView(trainer)  # type: ignore[assignment]  # reads only; no loggers
        for name in ("log", "log_dict", "print", "toggle_optimizer", "untoggle_optimizer"):
            setattr(module, name, _noop)
        # Whatever the replica's code (step or hooks) does to "its" optimizers and schedulers must not
        # reach the real ones: inert stand-ins by default, or what route_optimizers() says.
        self._optimizers: Callable[[], Any] = lambda: _one_or_list(
            [inert_optimizer(o, trainer) for o in trainer.optimizers]
        )
        module.optimizers = lambda use_pl_optimizer=True: self._optimizers()
        module.lr_schedulers = lambda: _one_or_list(
            [SilentScheduler(c.scheduler) for c in trainer.lr_scheduler_configs]
        )
        if not module.automatic_optimization:
            captured = self._captured

            def manual_backward(loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
                captured.append(loss)

            module.manual_backward = manual_backward
            module.clip_gradients = _noop

    def route_optimizers(self, optimizers: Callable[[], Any]) -> None:
        """Make the replica's ``self.optimizers()`` return ``optimizers()`` (e.g. a twin's own)."""
        self._optimizers = optimizers

    @overload
    def training_loss(self, batch: Any, batch_idx: int = 0) -> torch.Tensor: ...

    @overload
    def training_loss(self, batch: Any, batch_idx: int = 0, *, allow_none: bool) -> torch.Tensor | None: ...

    def training_loss(
        self, batch: Any, batch_idx: int = 0, *, allow_none: bool = False
    ) -> torch.Tensor | None:
        """Run the replica's ``training_step`` on ``batch`` and return its scalar loss.

        ``allow_none``: under automatic optimization a ``training_step`` that returns None (Lightning
        then skips the backward) gives None instead of an error.
        """
        self._captured.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            output = self.module.training_step(batch, batch_idx)
        if self.module.automatic_optimization:
            return None if output is None and allow_none else extract_loss(output)
        if len(self._captured) <= self.optimizer_idx:
            raise ValueError(
                f"training_step called manual_backward {len(self._captured)} time(s), so there is no "
                f"loss for optimizer_idx={self.optimizer_idx}. Pass loss_fn=... to the callback."
            )
        return self._captured[self.optimizer_idx]

    def call_hook(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the replica's own LightningModule hook ``name`` (``on_train_epoch_end``, ...).

        A module's hooks change the state it carries between steps (an RNN resets its hidden state
        at epoch end, a curriculum moves on): a replica that trains alongside the real module must
        receive them as the real module does. Logging inside them is silenced like in the step.
        """
        if not self.overrides(name):
            return None  # LightningModule's own hooks do nothing: skip the call and its set-up
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return getattr(self.module, name)(*args, **kwargs)

    def overrides(self, name: str) -> bool:
        """Whether the module's class (or the instance) defines hook ``name`` itself."""
        if name in vars(self.module):
            return True
        # Against the module's own framework: pytorch_lightning's defaults are other function objects.
        base = lightning_module_class(self.module)
        return getattr(type(self.module), name, None) is not getattr(base, name, None)

    def loss_fn(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """``loss_fn(model, batch)`` form for :class:`lightning_eos.curvature.HessianOperator`."""
        del model  # the replica itself is the model the operator differentiates
        return self.training_loss(batch)


def _one_or_list(items: list[Any]) -> Any:
    """Lightning's convention for ``optimizers()``/``lr_schedulers()``: None, the one, or a list."""
    if not items:
        return None
    return items[0] if len(items) == 1 else items


def group_hparams(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """A plain snapshot of every param group's hyper-parameters (no ``params``, tensors as floats)."""
    out = []
    for group in optimizer.param_groups:
        snap: dict[str, Any] = {}
        for key, value in group.items():
            if key == "params":
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = float(value)
            elif isinstance(value, tuple):
                value = tuple(float(v) if isinstance(v, torch.Tensor) else v for v in value)
            snap[key] = value
        out.append(snap)
    return out


class OptimizerStepTracker:
    """Real optimizer steps and the hyper-parameters they applied, per training batch.

    Call :meth:`on_train_batch_start` and :meth:`on_before_optimizer_step` from the callback hooks
    of the same names; then in ``on_train_batch_end`` :meth:`stepped` says whether this batch ended
    with a real optimizer step (False on accumulation micro-batches), and :attr:`applied` holds, per
    index of an optimizer that stepped during this batch, the param-group snapshot taken just before
    its update (Lightning calls ``on_before_optimizer_step`` inside ``opt.step()`` under manual
    optimization too).
    """

    def __init__(self) -> None:
        self._step_at_batch_start = -1
        self.applied: dict[int, list[dict[str, Any]]] = {}

    def on_train_batch_start(self, trainer: Trainer) -> None:
        self._step_at_batch_start = trainer.global_step
        self.applied = {}

    def on_before_optimizer_step(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        idx = optimizer_index(trainer, optimizer)
        self.applied[idx] = group_hparams(getattr(optimizer, "optimizer", optimizer))

    def stepped(self, trainer: Trainer) -> bool:
        return trainer.global_step != self._step_at_batch_start


def optimizer_index(trainer: Trainer, optimizer: Any) -> int:
    """Index of ``optimizer`` (a torch optimizer or a LightningOptimizer) in ``trainer.optimizers``."""
    target = getattr(optimizer, "optimizer", optimizer)
    for i, opt in enumerate(trainer.optimizers):
        if opt is target:
            return i
    raise ValueError("optimizer is not one of trainer.optimizers")


def logging_step(trainer: Trainer) -> int:
    """The x-axis value ``self.log`` uses for the current step (shared with Lightning's own logs)."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def log_metrics(trainer: Trainer, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Write scalars to every logger now (rank zero) and expose them in ``trainer.callback_metrics``.

    Direct ``logger.log_metrics`` (as LearningRateMonitor does) so a measurement made every N steps
    is never dropped by ``log_every_n_steps``; ``callback_metrics`` lets EarlyStopping or
    ModelCheckpoint monitor the values.
    """
    if not metrics:
        return
    step = logging_step(trainer) if step is None else step
    for key, value in metrics.items():
        trainer.callback_metrics[key] = torch.tensor(float(value))
    _log_rank_zero(trainer, dict(metrics), step)


@rank_zero_only
def _log_rank_zero(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


@rank_zero_only
def add_custom_scalars(trainer: Trainer, layout: dict[str, dict[str, list[Any]]]) -> None:
    """Register a TensorBoard custom-scalars layout on every TensorBoardLogger (rank zero)."""
    for logger in trainer.loggers:
        if is_tensorboard_logger(logger):
            logger.experiment.add_custom_scalars(layout)


_LAYOUT_ATTR = "_lightning_eos_custom_scalars"


def merge_custom_scalars(trainer: Trainer, layout: dict[str, dict[str, list[Any]]]) -> None:
    """Add charts to the trainer's TensorBoard custom-scalars layout without dropping others'.

    TensorBoard keeps only the *last* layout written to a run, so several callbacks each calling
    :func:`add_custom_scalars` would erase each other's charts. This merges ``layout`` into one
    layout kept on the trainer (categories and charts by name; later charts of the same name win)
    and writes the merged whole.
    """
    merged: dict[str, dict[str, list[Any]]] = getattr(trainer, _LAYOUT_ATTR, None) or {}
    for category, charts in layout.items():
        merged.setdefault(category, {}).update(charts)
    setattr(trainer, _LAYOUT_ATTR, merged)
    add_custom_scalars(trainer, merged)


def allreduce_sum(trainer: Trainer) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """An all-reduce SUM over the data-parallel ranks, or None when running in one process.

    Every rank must call the returned function the same number of times (it is a collective).
    """
    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return None

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    return reduce


def any_rank(trainer: Trainer, flag: bool, device: torch.device | None = None) -> bool:
    """Whether ``flag`` holds on any data-parallel rank: one all-reduce (the flag itself in one process).

    For every decision made from a rank-local value (a probe loss, the twin's loss on this rank's
    batch, a validation batch a ``predict_fn`` failed on) that decides whether a collective follows:
    a rank deciding alone would leave the others waiting in it. ``device``: where the flag tensor
    lives (the backend's device; default the strategy's root device).
    """
    reduce = allreduce_sum(trainer)
    if reduce is None:
        return bool(flag)
    where = trainer.strategy.root_device if device is None else device
    return bool(reduce(torch.tensor([float(flag)], dtype=torch.float64, device=where)).item() > 0)
