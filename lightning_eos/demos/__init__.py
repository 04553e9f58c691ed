"""Small, offline demo models and data used by the examples, the tests and the benchmarks."""

from lightning_eos.demos.digits import DigitsDataModule, DigitsMLP, load_digits_tensors
from lightning_eos.demos.trainer import quiet_trainer

__all__ = ["DigitsDataModule", "DigitsMLP", "load_digits_tensors", "quiet_trainer"]
