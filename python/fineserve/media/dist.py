"""Per-request counts and per-item token budgets for synthetic multimodal requests.

``--mm-images-per-request`` and ``--mm-image-tokens`` (likewise audio and video) take a
number or a distribution:

- ``N``: always N;
- ``uniform:LO,HI``: integers uniform in [LO, HI];
- ``choice:A,B,C``: one of the values, equally likely;
- ``pdf:V=P,V=P`` (or ServeGen's ``{V: P, ...}``): the values with those weights;
- ``poisson:MEAN`` and ``normal:MEAN,SD`` (rounded, at least the floor).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..errors import FineserveError


@dataclass(frozen=True)
class IntDist:
    """A distribution over integers ≥ ``floor``, parsed from the option's text."""

    text: str
    kind: str
    params: tuple[float, ...]
    floor: int

    def sample(self, n: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
        p = self.params
        if self.kind == "const":
            out = np.full(n, p[0])
        elif self.kind == "uniform":
            out = rng.integers(int(p[0]), int(p[1]) + 1, size=n)
        elif self.kind == "choice":
            out = rng.choice(np.asarray(p), size=n)
        elif self.kind == "pdf":
            k = len(p) // 2
            values, weights = np.asarray(p[:k]), np.asarray(p[k:])
            out = rng.choice(values, size=n, p=weights / weights.sum())
        elif self.kind == "poisson":
            out = rng.poisson(p[0], size=n)
        else:  # normal
            out = np.rint(rng.normal(p[0], p[1], size=n))
        return np.maximum(np.asarray(out, dtype=np.int64), self.floor)

    @property
    def always_zero(self) -> bool:
        return self.kind == "const" and self.params[0] == 0


def parse_int_dist(text: str, option: str, *, floor: int) -> IntDist:
    """``text`` as an :class:`IntDist` (values below ``floor`` refused), or a one-line
    error naming ``option``."""
    raw = str(text).strip()

    def bad(why: str) -> FineserveError:
        return FineserveError(
            f"{option} {raw!r}: {why} (a number, uniform:LO,HI, choice:A,B, pdf:V=P,V=P, "
            "poisson:MEAN or normal:MEAN,SD)"
        )

    if raw.startswith("{"):  # ServeGen's PDF text
        try:
            d = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            d = None
        if not isinstance(d, dict):
            raise bad("not a {value: probability} mapping")
        pairs = ",".join(f"{k}={v}" for k, v in d.items())
        return parse_int_dist("pdf:" + pairs, option, floor=floor)
    kind, _, body = raw.partition(":")
    if not body:
        kind, body = "const", raw
    if kind not in _PARSERS:
        raise bad(f"unknown distribution {kind!r}")
    try:
        params, support = _PARSERS[kind](body)
    except ValueError as e:
        raise bad(str(e)) from None
    if any(v != int(v) for v in support):
        raise bad("values must be whole numbers")
    if support and min(support) < floor:
        raise bad(f"values must be >= {floor}")
    return IntDist(raw, kind, params, floor)


def _numbers(body: str) -> list[float]:
    try:
        return [float(x) for x in body.split(",") if x.strip()]
    except ValueError:
        raise ValueError("not numbers") from None


def _const(body: str) -> tuple[tuple[float, ...], list[float]]:
    v = _numbers(body)
    if len(v) != 1:
        raise ValueError("one number expected")
    return tuple(v), v


def _uniform(body: str) -> tuple[tuple[float, ...], list[float]]:
    v = _numbers(body)
    if len(v) != 2 or v[0] > v[1]:
        raise ValueError("uniform needs LO,HI with LO <= HI")
    return tuple(v), v


def _choice(body: str) -> tuple[tuple[float, ...], list[float]]:
    v = _numbers(body)
    if not v:
        raise ValueError("choice needs values")
    return tuple(v), v


def _pdf(body: str) -> tuple[tuple[float, ...], list[float]]:
    values, weights = [], []
    for item in body.split(","):
        v, eq, w = item.partition("=")
        if not eq:
            raise ValueError("pdf entries are VALUE=WEIGHT")
        try:
            values.append(float(v))
            weights.append(float(w))
        except ValueError:
            raise ValueError("pdf entries are numbers") from None
    if not values or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError("pdf weights must be >= 0 and not all 0")
    return tuple(values + weights), [v for v, w in zip(values, weights) if w > 0]


def _poisson(body: str) -> tuple[tuple[float, ...], list[float]]:
    v = _numbers(body)
    if len(v) != 1 or v[0] < 0:
        raise ValueError("poisson needs MEAN >= 0")
    return tuple(v), []


def _normal(body: str) -> tuple[tuple[float, ...], list[float]]:
    v = _numbers(body)
    if len(v) != 2 or v[1] < 0:
        raise ValueError("normal needs MEAN,SD with SD >= 0")
    return tuple(v), []


#: Per distribution: its parameters and the values it can take (checked against the
#: floor; empty where draws are clipped to it instead).
_PARSERS = {
    "const": _const,
    "uniform": _uniform,
    "choice": _choice,
    "pdf": _pdf,
    "poisson": _poisson,
    "normal": _normal,
}
