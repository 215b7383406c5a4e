"""Workload generators: each returns a :class:`fineserve.schedule.Schedule`."""

from .poisson import poisson_arrivals_ns, random_lengths

__all__ = ["poisson_arrivals_ns", "random_lengths"]
