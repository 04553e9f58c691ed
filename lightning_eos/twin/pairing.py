"""The real model and its twin side by side: matched parameters, their layers, and the twin's optimizer.

* :class:`ParameterPairing` matches the real model's floating parameters with the twin's by name
  (tied parameters once, under the name ``named_parameters()`` gives them) and assigns each to a
  layer of :mod:`lightning_eos.layers`, so ``twin/divergence/<layer>`` names the layers every other
  monitor names;
* :meth:`ParameterPairing.clone_optimizer` builds the twin's optimizer from the real one (same
  class, same groups, state cloned and re-keyed), :meth:`~ParameterPairing.add_new_groups` follows
  groups added later, and :meth:`~ParameterPairing.sync_modes` mirrors train/eval and
  ``requires_grad`` flags.

Torch only: no Lightning import.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import nn

from lightning_eos.layers import layer_of_parameters

__all__ = ["LayerMode", "ParameterPairing"]

LayerMode = Literal["parameter", "module", "none"]


class ParameterPairing:
    """The floating parameters of ``real`` matched by name with those of ``twin``.

    Args:
        real: the real model.
        twin: its copy (same parameter names).
        layers: per-layer grouping: ``"module"`` (the owning module, see :mod:`lightning_eos.layers`),
            ``"parameter"`` (each tensor) or ``"none"`` (no per-layer report).

    Attributes:
        names: the matched parameter names, in ``real.named_parameters()`` order.
        real / twin: the matched parameter tensors, in that order.
        layer_names: the layers, in order of first appearance (empty for ``"none"``).
        layer_index: per parameter, its index in ``layer_names`` (-1: no layer).
    """

    def __init__(self, real: nn.Module, twin: nn.Module, layers: LayerMode = "module") -> None:
        if layers not in ("parameter", "module", "none"):
            raise ValueError(f"layers={layers!r}; accepted: 'parameter', 'module', 'none'")
        real_named = {n: p for n, p in real.named_parameters() if p.is_floating_point()}
        twin_named = dict(twin.named_parameters())
        missing = [n for n in real_named if n not in twin_named]
        if missing:
            raise ValueError(f"the twin lacks parameters {missing}: it must be a copy of the real model")
        self.real_module, self.twin_module = real, twin
        self.names = list(real_named)
        self.real = [real_named[n] for n in self.names]
        self.twin = [twin_named[n] for n in self.names]
        self._twin_of = {id(r): t for r, t in zip(self.real, self.twin)}
        layer_of = layer_of_parameters(real, by=layers) if layers != "none" else {}
        keys: dict[str, int] = {}
        self.layer_index: list[int] = []
        for n in self.names:
            key = layer_of.get(n)
            if key is not None:
                keys.setdefault(key, len(keys))
            self.layer_index.append(keys[key] if key is not None else -1)
        self.layer_names = list(keys)

    def twin_of(self, real_param: torch.Tensor) -> torch.Tensor:
        """The twin's counterpart of a real parameter (``KeyError`` for one not matched)."""
        return self._twin_of[id(real_param)]

    @property
    def device(self) -> torch.device:
        """Where the measurements live: the real model's first parameter's device (CPU if none)."""
        return self.real[0].device if self.real else torch.device("cpu")

    def twin_params(self) -> dict[str, torch.Tensor]:
        """name → the twin's parameter."""
        return dict(zip(self.names, self.twin))

    def trainable_twin(self) -> list[torch.Tensor]:
        """The twin's parameters that require gradients, in the real model's parameter order."""
        return [p for p in self.twin if p.requires_grad]

    def clone_optimizer(self, real_optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The twin's optimizer: same class, same groups, state cloned from ``real_optimizer``.

        A deep copy whose memo maps each real parameter to its twin, so param groups keep their
        structure and per-group keys, and per-parameter state (momentum, Adam moments, step
        counters) is cloned and re-keyed to the twin's parameters. Custom optimizers work too as
        long as they deep-copy.
        """
        memo: dict[int, Any] = {}
        for group in real_optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in self._twin_of:
                    raise ValueError("the optimizer holds a parameter that is not in the real model")
                memo[id(p)] = self._twin_of[id(p)]
        return copy.deepcopy(real_optimizer, memo)

    def add_new_groups(self, real_optimizer: torch.optim.Optimizer, optimizer: torch.optim.Optimizer) -> None:
        """Give ``optimizer`` (the twin's) the param groups added to ``real_optimizer`` since it was
        cloned (``add_param_group``, e.g. by Lightning's ``BaseFinetuning`` when it unfreezes a layer)."""
        if len(real_optimizer.param_groups) <= len(optimizer.param_groups):
            return
        for group in real_optimizer.param_groups[len(optimizer.param_groups) :]:
            new = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            new["params"] = [self._twin_of[id(p)] for p in group["params"]]
            optimizer.add_param_group(new)

    def sync_modes(self) -> None:
        """Give every twin submodule the train/eval mode, and every twin parameter the
        ``requires_grad`` flag, of its real counterpart (fine-tuning callbacks unfreeze layers)."""
        for m_real, m_twin in zip(self.real_module.modules(), self.twin_module.modules()):
            m_twin.training = m_real.training
        for p_real, p_twin in zip(self.real, self.twin):
            if p_twin.requires_grad != p_real.requires_grad:
                p_twin.requires_grad_(p_real.requires_grad)
