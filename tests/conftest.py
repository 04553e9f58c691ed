"""Test-wide settings: one torch thread (shared, loaded CI hosts) and reproducible property tests."""

from __future__ import annotations

import os

import torch
from hypothesis import settings

os.environ.setdefault("PL_DISABLE_FORK", "1")
torch.set_num_threads(1)

# The same examples on every run (a CI failure can be replayed) and no per-example deadline
# (a loaded host makes wall-clock limits flaky).
settings.register_profile("lightning-eos", derandomize=True, deadline=None, database=None)
settings.load_profile("lightning-eos")
