"""Multi-endpoint deployments: which endpoint each request goes to.

A multi-GPU deployment is often N independent server instances. Requests are spread by
``round-robin`` (request i of a class to that class's endpoint i mod n, decided when the
schedule is built) or ``least-outstanding`` (decided by the engine when the request leaves:
the endpoint with the fewest requests in flight). ``--route CLASS=URL[,URL…]`` pins a
class to some endpoints; other classes use all of them. A conversation's later turns go
to the endpoint that served its previous turn (the engine's ``turn_affinity``).
``--class-model CLASS=MODEL`` names the model a class's requests ask for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import FineserveError

ROUTES = ("round-robin", "least-outstanding")


def parse_route(values: tuple[str, ...] | list[str] | str | None) -> tuple[str, list[str]]:
    """``--route`` values: at most one policy, plus CLASS=URL[,URL…] pins."""
    if isinstance(values, str):
        values = [values]
    policies = [v for v in values or () if "=" not in v]
    pins = [v for v in values or () if "=" in v]
    if len(set(policies)) > 1:
        raise FineserveError(f"--route: one policy at most, got {', '.join(policies)}")
    policy = policies[0] if policies else "round-robin"
    if policy not in ROUTES:
        raise FineserveError(
            f"--route {policy!r}: expected {' or '.join(ROUTES)}, or CLASS=URL[,URL...]"
        )
    return policy, pins


def parse_pairs(items: tuple[str, ...] | list[str], option: str) -> dict[str, str]:
    """``("a=x", "b=y")`` → {"a": "x", "b": "y"}, with one-line errors."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise FineserveError(f"{option} {item!r}: expected NAME=VALUE")
        out[key.strip()] = value.strip()
    return out


@dataclass
class Deployment:
    """The endpoints (full request URLs) and how requests are assigned to them."""

    urls: list[str]
    route: str = "round-robin"
    #: Class → endpoint indices it may use.
    class_endpoints: dict[str, list[int]] = field(default_factory=dict)
    _counters: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.route not in ROUTES:
            raise FineserveError(f"--route must be one of {', '.join(ROUTES)}")
        if not self.urls:
            raise FineserveError("no endpoint to send to")

    @classmethod
    def from_options(
        cls, urls: list[str], route: str, route_class: dict[str, str], base_of: Any
    ) -> Deployment:
        """``route_class`` values are comma-separated base URLs, each one of ``urls``'
        bases (``base_of(url)`` gives a request URL's base)."""
        bases = [base_of(u) for u in urls]
        class_endpoints: dict[str, list[int]] = {}
        for name, value in route_class.items():
            idx = []
            for b in value.split(","):
                b = b.strip().rstrip("/")
                if b not in bases:
                    raise FineserveError(
                        f"--route {name}={value}: {b} is not one of the --base-url values"
                    )
                idx.append(bases.index(b))
            class_endpoints[name] = idx
        return cls(urls, route, class_endpoints)

    @property
    def route_groups(self) -> list[list[int]]:
        """Engine route groups for least-outstanding: all endpoints, then one per class."""
        if self.route != "least-outstanding":
            return []
        return [list(range(len(self.urls))), *self.class_endpoints.values()]

    def assign(self, classes: npt.NDArray[Any] | None, n: int) -> npt.NDArray[np.uint32]:
        """Endpoint (or route-group) index of the next ``n`` requests, in order."""
        out = np.empty(n, dtype=np.uint32)
        groups = list(self.class_endpoints)
        if classes is None:
            keys = np.full(n, "", dtype=object)
        else:
            keys = np.asarray(classes, dtype=object)
        for key in np.unique(keys) if n else []:
            rows = np.flatnonzero(keys == key)
            members = self.class_endpoints.get(key)
            if self.route == "least-outstanding":
                group = 0 if members is None else 1 + groups.index(key)
                out[rows] = len(self.urls) + group
                continue
            members = members if members is not None else list(range(len(self.urls)))
            start = self._counters.get(key, 0)
            out[rows] = np.asarray(members, dtype=np.uint32)[
                (start + np.arange(len(rows))) % len(members)
            ]
            self._counters[key] = start + len(rows)
        return out
