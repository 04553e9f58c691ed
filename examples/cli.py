"""The demo through ``LightningCLI``: every lightning-eos callback configured from YAML.

The model and data are the flagship demo's (``examples/demo.py``: ``DigitsCNN``, ``DigitsImages``);
``examples/configs/eos.yaml`` lists the callbacks under ``trainer.callbacks`` with their
``class_path`` and ``init_args``. Run from the repository root::

    python examples/cli.py fit -c examples/configs/eos.yaml
    python examples/cli.py fit -c examples/configs/eos.yaml --trainer.max_steps=20   # override anything
    python examples/cli.py fit -c examples/configs/eos.yaml --print_config           # the resolved config
    lightning-eos report runs/cli                                                    # the report

A callback can also be added on the command line without touching the YAML, e.g.
``--trainer.callbacks+=lightning_eos.callbacks.StabilityMonitor``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the demo's model and data, next to this file
from demo import DigitsCNN, DigitsImages

__all__ = ["cli_main"]


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> LightningCLI:
    """``LightningCLI`` over the demo's module and data; ``args`` as on the command line."""
    return LightningCLI(
        DigitsCNN,
        DigitsImages,
        args=list(args) if args is not None else None,
        run=run,
        save_config_kwargs={"overwrite": True},  # re-running into the same log folder is fine
    )


if __name__ == "__main__":
    # The demo's tensors are tiny: extra intra-op threads only add contention (with the default thread
    # count on a busy 2-core machine the Hessian-vector products ran 9x slower).
    torch.set_num_threads(1)
    cli_main()
