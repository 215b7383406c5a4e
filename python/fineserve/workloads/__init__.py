"""Workload generators: each yields a schedule as chunks (see :mod:`fineserve.schedule`)."""

from .lengths import EmpiricalLengths, LengthSampler, RandomLengths, random_lengths
from .poisson import poisson_arrivals_ns, poisson_chunks

__all__ = [
    "EmpiricalLengths",
    "LengthSampler",
    "RandomLengths",
    "poisson_arrivals_ns",
    "poisson_chunks",
    "random_lengths",
]
