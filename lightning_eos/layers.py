"""The one definition of a *layer*, shared by curvature blocks, the monitors' keys, the twin's keys and
the learning-rate controller.

A layer is the module that owns a parameter directly (``named_parameters(recurse=False)``), named by
its path in ``named_modules()``. A parameter shared by several modules (tied weights: GPT-2's
``lm_head.weight`` *is* ``transformer.wte.weight``) belongs to its first owner in ``named_modules``
order -- the name ``named_parameters()`` gives it -- and is counted once. Parameters owned by the root
module itself belong to the layer :data:`ROOT_LAYER`. With ``by="parameter"`` every parameter tensor is
its own layer, named by its parameter name.

So ``eos/sharpness/<layer>``, ``twin/divergence/<layer>`` and ``local_lr/multiplier/<layer>`` name the
same thing for the same model.

Torch only: no Lightning import.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

__all__ = ["ROOT_LAYER", "LayerBy", "layer_of_parameters", "layer_parameters", "layers"]

#: Layer name of the parameters the root module owns directly (no module path to name them by).
ROOT_LAYER = "(root)"

LayerBy = Literal["module", "parameter"]


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ROOT_LAYER


def layer_of_parameters(model: nn.Module, by: LayerBy = "module") -> dict[str, str]:
    """``{parameter name: layer name}`` for every parameter of ``model`` (tied ones once), in order."""
    if by not in ("module", "parameter"):
        raise ValueError(f"by={by!r} is not supported; accepted values: 'module', 'parameter'.")
    # named_parameters() walks named_modules() and drops repeats: a tied parameter gets the name
    # (and so the layer) of its first owner.
    return {name: (_owner(name) if by == "module" else name) for name, _ in model.named_parameters()}


def layers(
    model: nn.Module,
    params: Iterable[torch.Tensor] | None = None,
    by: LayerBy = "module",
) -> dict[str, list[str]]:
    """``{layer name: [its parameter names]}`` in registration order.

    Args:
        model: the module whose layers are listed.
        params: keep only these parameter objects (e.g. those of one optimizer); default: every
            parameter with ``requires_grad=True``. A layer none of whose parameters are kept is absent.
        by: ``"module"`` (the owning module) or ``"parameter"`` (each tensor its own layer).
    """
    mapping = layer_of_parameters(model, by)
    if params is None:
        keep = {id(p) for p in model.parameters() if p.requires_grad}
    else:
        keep = {id(p) for p in params}
    out: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if id(p) in keep:
            out.setdefault(mapping[name], []).append(name)
    return out


def layer_parameters(model: nn.Module, layer: str, by: LayerBy = "module") -> list[nn.Parameter]:
    """The parameter objects of ``layer`` (a name from :func:`layers`), trainable or not.

    Raises:
        ValueError: ``layer`` is not a layer of ``model``; the message lists the layers.
    """
    mapping = layer_of_parameters(model, by)
    found = [p for name, p in model.named_parameters() if mapping[name] == layer]
    if not found:
        known = list(dict.fromkeys(mapping.values()))
        raise ValueError(f"layer={layer!r} is not a layer of the model; accepted values: {known}.")
    return found
