"""Test-wide settings: one torch thread (shared, loaded CI hosts), deterministic algorithms."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("PL_DISABLE_FORK", "1")
torch.set_num_threads(1)
