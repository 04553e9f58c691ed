"""Small, offline demo models and data used by the examples, the tests and the benchmarks."""

from lightning_eos.demos.digits import DigitsDataModule, DigitsMLP, load_digits_tensors

__all__ = ["DigitsDataModule", "DigitsMLP", "load_digits_tensors"]
