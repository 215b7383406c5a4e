"""FineServe's parametric workload: Gamma inter-arrivals per window, plus the Negative
Binomial micro-burst layer in 1 ms slots.

Model (FineServe, two layers):

1. *When*: arrival events form a renewal process whose gaps are Gamma(shape, scale) with
   the parameters of the window the previous event lies in (``gamma_scale`` in ms). A
   file written by ``fineserve fit`` also records the best family per window; with
   ``--parametric-arrivals auto`` (default) its Weibull/Exponential windows use those.
2. *How many*: with the NB layer, events are discretised to slots of ``slot_ms`` (1 ms)
   of trace time. Each slot that holds at least one event emits NB(nb_mu, nb_alpha)
   requests (variance mu + alpha·mu²) — one draw per slot, however many events fell in it,
   because FineServe fitted the NB to requests per *occupied* slot. Stacking draws per
   event would inflate the count (Dense_lt10B: ~2.6 → ~3.9 per occupied slot).
   A zero draw is, by default, redrawn (``nb_zero="truncate"``: every occupied slot keeps
   ≥ 1 request, so the slot process of the Gamma layer is preserved and counts follow the
   zero-truncated NB, mean mu/(1−P0)); ``nb_zero="empty"`` lets it empty the slot instead
   (counts over the slots that stay occupied follow the same zero-truncated NB, and fewer
   slots are occupied). Effective rate = occupied slots/s × mean count; ``generate``
   prints it.
   Each request of a slot gets an independent uniform position inside its slot (sorted),
   so a burst of K leaves within that millisecond, not at one instant.

Without the NB layer each event is one request at its own time.

``time_scale`` > 1 compresses trace time uniformly after generation (a 1 ms slot becomes
1/time_scale ms of wall time), so the rate scales exactly and bursts stay bursts.

Windows past the end of the parameter file (``duration`` longer than the file) are
extended by ``repeat_jitter`` (the windows again, cyclically, each parameter multiplied by
1 + N(0, jitter_ratio), clipped at ±3σ) or ``model_sample`` (parameters drawn from a
Gaussian fitted to [log shape, log scale] over the file's windows).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import FineserveError
from ..schedule import Schedule
from .lengths import LengthSampler

DATASETS_ENV = "FINESERVE_DATASETS"
EXTENSION_MODES = ("repeat_jitter", "model_sample")
ARRIVAL_MODES = ("auto", "renewal", "gamma")


@dataclass
class GammaWindows:
    """Per-window inter-arrival parameters; times in ms of trace time. Gaps are
    Gamma(shape, scale), or Weibull(shape, scale) where ``weibull`` is set (a file written
    by ``fineserve fit`` records the best family per window)."""

    start_ms: npt.NDArray[np.float64]
    end_ms: npt.NDArray[np.float64]
    shape: npt.NDArray[np.float64]
    scale_ms: npt.NDArray[np.float64]
    source: str = ""
    weibull: npt.NDArray[np.bool_] | None = None

    def __post_init__(self) -> None:
        if self.weibull is None:
            self.weibull = np.zeros(len(self.shape), dtype=bool)
        # The loader names the file and line; this guards windows built in code.
        for name, v in (("gamma_shape", self.shape), ("gamma_scale", self.scale_ms)):
            bad = ~(np.isfinite(v) & (v > 0))
            if bad.any():
                i = int(np.argmax(bad))
                raise FineserveError(
                    f"{self.source or 'gamma windows'}: window {i}: {name} must be a positive "
                    f"number (got {v[i]})"
                )

    def __len__(self) -> int:
        return len(self.shape)

    @property
    def span_ms(self) -> float:
        return float(self.end_ms[-1] - self.start_ms[0])


@dataclass
class NegBinom:
    """Requests per occupied slot: NB(mu, alpha), or a mixture of NB components
    (``components``: (weight, mu, alpha) triples, as ``fineserve fit`` may choose)."""

    mu: float
    alpha: float
    source: str = ""
    components: list[tuple[float, float, float]] | None = None
    #: Set when the sibling gamma file was fitted on occupied slots (``fineserve fit``):
    #: the burst layer is then part of the class's model whatever its name.
    fitted_on_slots: bool = False

    def __post_init__(self) -> None:
        where = self.source or "NB"
        for mu, alpha in [(self.mu, self.alpha)] + [(c[1], c[2]) for c in self.components or []]:
            if not (math.isfinite(mu) and mu > 0):
                raise FineserveError(f"{where}: nb_mu must be > 0, got {mu}")
            if not (math.isfinite(alpha) and alpha > 0):
                raise FineserveError(f"{where}: nb_alpha must be > 0, got {alpha}")
        if self.components is not None:
            w = np.array([c[0] for c in self.components])
            if not len(w) or not np.all(np.isfinite(w) & (w >= 0)) or not w.sum() > 0:
                raise FineserveError(f"{where}: component weights must be >= 0 with a positive sum")

    def _parts(self) -> list[tuple[float, float, float]]:
        return self.components or [(1.0, self.mu, self.alpha)]

    @staticmethod
    def _draw_one(
        mu: float, alpha: float, n: int, rng: np.random.Generator
    ) -> npt.NDArray[np.int64]:
        r = 1.0 / alpha
        return rng.negative_binomial(r, r / (r + mu), size=n).astype(np.int64)

    def draw(
        self, n: int, rng: np.random.Generator, *, truncate: bool = False
    ) -> npt.NDArray[np.int64]:
        """``n`` counts; with ``truncate`` each component is drawn from its
        zero-truncated law (``fit.bursts.zt_mixture_cdf``: inverse CDF, no redrawing of
        zeros), so a mixture yields Σ w·ZTNB (the law ``fineserve fit`` estimates)."""
        from ..fit.bursts import Component, zt_mixture_cdf

        parts = self._parts()
        if len(parts) == 1:
            which = np.zeros(n, dtype=np.int64)
        else:
            w = np.array([c[0] for c in parts])
            which = rng.choice(len(parts), size=n, p=w / w.sum())
        out = np.zeros(n, dtype=np.int64)
        for c, (_, mu, alpha) in enumerate(parts):
            idx = np.flatnonzero(which == c)
            if truncate:
                cdf = zt_mixture_cdf([Component(1.0, mu, alpha)])
                out[idx] = np.searchsorted(cdf, rng.random(len(idx)), side="right") + 1
            else:
                out[idx] = self._draw_one(mu, alpha, len(idx), rng)
        return out

    def pmf(self, k: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """Plain (not truncated) pmf of the mixture."""
        from scipy.stats import nbinom

        parts = self._parts()
        total = sum(c[0] for c in parts)
        out = np.zeros(len(k))
        for w, mu, alpha in parts:
            r = 1.0 / alpha
            out += (w / total) * nbinom.pmf(k, r, r / (r + mu))
        return out

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mu": self.mu, "alpha": self.alpha, "source": self.source}
        if self.components:
            d["components"] = [list(c) for c in self.components]
        return d


def datasets_dirs(user_dir: Path | None) -> list[Path]:
    """Where ``--model-class`` looks: --datasets-dir, $FINESERVE_DATASETS, the project's
    ``datasets/`` next to the package (editable install), then ``./datasets`` (a
    non-editable install run from the repository root; the wheel does not carry them)."""
    dirs = []
    if user_dir is not None:
        dirs.append(Path(user_dir))
    if os.environ.get(DATASETS_ENV):
        dirs.append(Path(os.environ[DATASETS_ENV]))
    dirs.append(Path(__file__).resolve().parents[3] / "datasets")
    cwd = Path.cwd() / "datasets"
    if cwd.resolve() != dirs[-1].resolve():
        dirs.append(cwd)
    return dirs


@dataclass
class ClassFiles:
    gamma: Path
    nb: Path | None
    lengths: Path | None
    #: ``fineserve fit``'s slot-process model, when the class has one.
    arrivals: Path | None = None
    #: ``fineserve fit``'s prefix-sharing model, when its trace had hash_ids.
    prefix: Path | None = None


def resolve_class_files(model_class: str, user_dir: Path | None) -> ClassFiles:
    """``<datasets>/Parametric/gamma/<class>_gamma_5min.csv`` (or another window length,
    ``_gamma_<W>s.csv``) and, if present, the NB json and fitted lengths next to it."""
    tried = []
    for d in datasets_dirs(user_dir):
        gamma_dir = d / "Parametric" / "gamma"
        gamma = gamma_dir / f"{model_class}_gamma_5min.csv"
        tried.append(str(gamma))
        if not gamma.is_file():
            others = sorted(gamma_dir.glob(f"{model_class}_gamma_*s.csv"))
            if not others:
                continue
            gamma = others[0]
        nb = d / "Parametric" / "nb" / f"{model_class}_nb.json"
        lengths = d / "Parametric" / "lengths" / f"{model_class}_lengths.json"
        arrivals = d / "Parametric" / "arrivals" / f"{model_class}_arrivals.json"
        prefix = d / "Parametric" / "prefix" / f"{model_class}_prefix.json"
        return ClassFiles(
            gamma,
            nb if nb.is_file() else None,
            lengths if lengths.is_file() else None,
            arrivals if arrivals.is_file() else None,
            prefix if prefix.is_file() else None,
        )
    raise FineserveError(
        f"--model-class {model_class}: no parameter file; looked for {', '.join(tried)} "
        f"(pass --datasets-dir or set ${DATASETS_ENV})"
    )


def load_gamma_windows(
    path: Path,
    *,
    window_seconds: float = 300.0,
    window_start_column: str = "window_start_ms",
    window_end_column: str = "window_end_ms",
    gamma_shape_column: str = "gamma_shape",
    gamma_scale_column: str = "gamma_scale",
    arrivals: str = "auto",
) -> GammaWindows:
    """FineServe's gamma CSV. Window start/end columns are optional; without them windows
    are consecutive and ``window_seconds`` long. Rows with invalid parameters are errors
    (a window cannot be skipped without shifting everything after it).

    ``arrivals="auto"`` or ``"renewal"`` uses the family that ``fineserve fit`` chose per
    window (its ``model`` column: Weibull or Exponential windows take their own columns)
    when the file has one; ``"gamma"`` always uses the Gamma columns, as FineServe does.
    (With ``auto`` a class that has a slot-process model uses that instead of this file.)"""
    from ..traces.base import numeric, require_columns
    from ..traces.readers import read_csv_strings

    path = Path(path)
    if not path.is_file():
        raise FineserveError(f"--gamma-params-csv: file not found: {path}")
    if not (window_seconds > 0 and math.isfinite(window_seconds)):
        raise FineserveError("--parametric-window-seconds must be > 0")
    table, bad = read_csv_strings(path)
    if bad:
        raise FineserveError(f"{path}: {bad} malformed lines (wrong number of fields)")
    names = table.column_names
    require_columns(
        path,
        names,
        {"--gamma-shape-column": gamma_shape_column, "--gamma-scale-column": gamma_scale_column},
    )
    shape = numeric(table[gamma_shape_column])
    scale = numeric(table[gamma_scale_column])
    if not len(shape):
        raise FineserveError(f"{path}: no windows")
    for col, v in ((gamma_shape_column, shape), (gamma_scale_column, scale)):
        bad_rows = np.flatnonzero(~(np.isfinite(v) & (v > 0)))
        if len(bad_rows):
            r = int(bad_rows[0])
            got = table[col][r].as_py()
            raise FineserveError(
                f"{path}:{r + 2}: {col} must be a positive number (got {got!r}); "
                f"{len(bad_rows)} such rows"
            )
    if window_start_column in names and window_end_column in names:
        start = numeric(table[window_start_column])
        end = numeric(table[window_end_column])
        if not (np.all(np.isfinite(start)) and np.all(np.isfinite(end)) and np.all(end > start)):
            raise FineserveError(f"{path}: window start/end must be numbers with end > start")
        if np.any(np.diff(start) < 0):
            raise FineserveError(f"{path}: windows are not in time order")
    else:
        w = window_seconds * 1e3
        start = np.arange(len(shape), dtype=np.float64) * w
        end = start + w
    weibull = np.zeros(len(shape), dtype=bool)
    if arrivals not in ARRIVAL_MODES:
        raise FineserveError(f"--parametric-arrivals must be one of {', '.join(ARRIVAL_MODES)}")
    if arrivals != "gamma" and "model" in names:
        shape, scale = shape.copy(), scale.copy()
        _apply_fitted_families(path, table, shape, scale, weibull)
    return GammaWindows(start, end, shape, scale, source=str(path), weibull=weibull)


def _apply_fitted_families(
    path: Path,
    table: Any,  # a pyarrow Table
    shape: npt.NDArray[np.float64],
    scale: npt.NDArray[np.float64],
    weibull: npt.NDArray[np.bool_],
) -> None:
    """Windows whose ``model`` column (``fineserve fit``'s choice) names Weibull or
    Exponential take their shape and scale from that family's columns, in place."""
    from ..traces.base import numeric

    names = table.column_names
    model = np.asarray(table["model"].to_pylist(), dtype=object)
    for family, cols in (
        ("weibull", ("weibull_shape", "weibull_scale")),
        ("exponential", (None, "exponential_scale")),
    ):
        rows = np.flatnonzero(model == family)
        if not len(rows):
            continue
        missing = [c for c in cols if c is not None and c not in names]
        if missing:
            raise FineserveError(f"{path}: {family} windows but no {missing[0]} column")
        k = np.ones(len(rows)) if cols[0] is None else numeric(table[cols[0]])[rows]
        theta = numeric(table[cols[1]])[rows]
        if not np.all(np.isfinite(k) & (k > 0) & np.isfinite(theta) & (theta > 0)):
            raise FineserveError(
                f"{path}:{int(rows[0]) + 2}: {family} parameters must be positive numbers"
            )
        shape[rows], scale[rows] = k, theta
        weibull[rows] = family == "weibull"


def load_arrival_model(path: Path) -> Any:
    """``Parametric/arrivals/<class>_arrivals.json`` (``fit.process.ArrivalModel``)."""
    from ..fit.process import ArrivalModel

    return ArrivalModel.from_json(_json_object(path), str(path))


def load_prefix_model(path: Path) -> Any:
    """``Parametric/prefix/<class>_prefix.json`` (``fit.prefix.PrefixModel``)."""
    from ..fit.prefix import PrefixModel

    return PrefixModel.from_json(_json_object(path), str(path))


def read_json(path: Path, option: str = "") -> Any:
    """A JSON file's value; a missing file or bad JSON is one line (``option`` names the
    flag that gave the path)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except OSError as e:
        where = f"{option}: " if option else ""
        raise FineserveError(f"{where}cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise FineserveError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _json_object(path: Path) -> dict[str, Any]:
    d = read_json(path)
    if not isinstance(d, dict):
        raise FineserveError(f"{path}: expected a JSON object")
    return d


def load_nb_json(path: Path) -> NegBinom:
    path = Path(path)
    d = read_json(path, "--parametric-nb-json")
    if not isinstance(d, dict) or "nb_mu" not in d or "nb_alpha" not in d:
        raise FineserveError(f"{path}: expected an object with nb_mu and nb_alpha")
    try:
        components = None
        comps = d.get("components")
        if isinstance(comps, list) and len(comps) > 1:
            components = [
                (float(c["weight"]), float(c["nb_mu"]), float(c["nb_alpha"])) for c in comps
            ]
        elif isinstance(comps, list) and len(comps) == 1:
            # A single fitted component may differ from the FineServe-compatible top level
            # (e.g. zero-truncated MLE vs moments): the component is the chosen model.
            return NegBinom(
                float(comps[0]["nb_mu"]),
                float(comps[0]["nb_alpha"]),
                source=str(path),
                fitted_on_slots=d.get("event_process") == "occupied_slots",
            )
        return NegBinom(
            float(d["nb_mu"]),
            float(d["nb_alpha"]),
            source=str(path),
            components=components,
            fitted_on_slots=d.get("event_process") == "occupied_slots",
        )
    except (TypeError, ValueError, KeyError):
        raise FineserveError(
            f"{path}: nb_mu, nb_alpha and components' weight/nb_mu/nb_alpha must be numbers"
        ) from None


def window_params(
    windows: GammaWindows,
    count: int,
    mode: str,
    jitter_ratio: float,
    rng: np.random.Generator,
) -> tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.bool_],
]:
    """(start_ms, shape, scale_ms, weibull) of ``count`` consecutive windows, extending
    the file's windows by ``mode`` when ``count`` exceeds them. Window k covers
    [start_ms[k], start_ms[k+1]); an extended window keeps the family of the file window it
    repeats (``model_sample`` fits its Gaussian per family)."""
    n = len(windows)
    if mode not in EXTENSION_MODES:
        raise FineserveError(f"--parametric-extension-mode must be one of {EXTENSION_MODES}")
    if not (0 <= jitter_ratio < 1):
        raise FineserveError("--parametric-jitter-ratio must be in [0, 1)")
    assert windows.weibull is not None
    k = np.arange(count)
    cycle = windows.span_ms
    start = windows.start_ms[k % n] + (k // n) * cycle
    shape = windows.shape[k % n].copy()
    scale = windows.scale_ms[k % n].copy()
    weibull = windows.weibull[k % n].copy()
    ext = k >= n
    m = int(ext.sum())
    if m and mode == "repeat_jitter" and jitter_ratio > 0:
        noise = np.clip(rng.standard_normal((2, m)), -3, 3) * jitter_ratio
        shape[ext] *= 1 + noise[0]
        scale[ext] *= 1 + noise[1]
    elif m and mode == "model_sample":
        for fam in (False, True):
            src = windows.weibull == fam
            dst = ext & (weibull == fam)
            if not dst.any():
                continue
            logs = np.log(np.stack([windows.shape[src], windows.scale_ms[src]]))
            mean = logs.mean(axis=1)
            cov = np.cov(logs) if src.sum() > 1 else np.zeros((2, 2))
            draw = rng.multivariate_normal(mean, cov, size=int(dst.sum()), method="cholesky")
            shape[dst], scale[dst] = np.exp(draw[:, 0]), np.exp(draw[:, 1])
    return start, shape, scale, weibull


def parametric_chunks(
    windows: GammaWindows,
    lengths: LengthSampler,
    rng: np.random.Generator,
    *,
    nb: NegBinom | None = None,
    nb_zero: str = "truncate",
    slot_ms: float = 1.0,
    time_scale: float = 1.0,
    duration_s: float | None = None,
    extension_mode: str = "repeat_jitter",
    jitter_ratio: float = 0.05,
    max_requests: int | None = None,
) -> Iterator[Schedule]:
    """One chunk per window. ``duration_s`` is in trace time (default: the file's span)."""
    if not (time_scale > 0 and math.isfinite(time_scale)):
        raise FineserveError("--time-scale must be a positive number")
    if nb_zero not in ("truncate", "empty"):
        raise FineserveError("nb_zero must be 'truncate' or 'empty'")
    if not slot_ms > 0:
        raise FineserveError("the burst slot must be > 0 ms")
    span_ms = windows.span_ms if duration_s is None else duration_s * 1e3
    if not span_ms > 0:
        raise FineserveError("--duration must be > 0")
    mean_len = float(np.mean(windows.end_ms - windows.start_ms))
    count = max(1, math.ceil(span_ms / mean_len) + 1)
    starts, shapes, scales, weibull = window_params(
        windows, count, extension_mode, jitter_ratio, rng
    )
    origin = starts[0]
    end_all = origin + span_ms
    last_event = origin
    emitted = 0
    prev_slot = -1
    for w in range(count):
        w_start = starts[w]
        w_end = min(starts[w + 1] if w + 1 < count else math.inf, end_all)
        if w_start >= end_all:
            break
        events = _renewal_events(last_event, w_end, shapes[w], scales[w], weibull[w], rng)
        if len(events):
            last_event = float(events[-1])
        else:
            last_event = max(last_event, w_start)
        if nb is not None:
            t_ms = _nb_bursts(events, nb, nb_zero, slot_ms, rng, skip_slot=prev_slot)
            if len(events):
                prev_slot = int(events[-1] // slot_ms)
        else:
            t_ms = events
        if max_requests is not None and emitted + len(t_ms) > max_requests:
            t_ms = t_ms[: max_requests - emitted]
        if not len(t_ms):
            continue
        t_ns = np.rint((t_ms - origin) * (1e6 / time_scale)).astype(np.int64)
        inp, out = lengths.sample(len(t_ns), rng)
        emitted += len(t_ns)
        yield Schedule(t_ns, inp, out)
        if max_requests is not None and emitted >= max_requests:
            return


def _renewal_events(
    after_ms: float,
    end_ms: float,
    shape: float,
    scale_ms: float,
    weibull: bool,
    rng: np.random.Generator,
) -> npt.NDArray[np.float64]:
    """Renewal events in (after_ms, end_ms) with Gamma(shape, scale_ms) gaps, or Weibull."""
    mean = scale_ms * math.gamma(1 + 1 / shape) if weibull else shape * scale_ms
    expected = (end_ms - after_ms) / mean
    parts = []
    t = after_ms
    while t < end_ms:
        k = int(expected * 1.1 + 4 * math.sqrt(expected) + 16)
        gaps = (
            scale_ms * rng.weibull(shape, size=k) if weibull else rng.gamma(shape, scale_ms, size=k)
        )
        ts = t + np.cumsum(gaps)
        parts.append(ts[ts < end_ms])
        t = float(ts[-1])
        expected = (end_ms - t) / mean
    return np.concatenate(parts) if parts else np.zeros(0)


def _nb_bursts(
    events_ms: npt.NDArray[np.float64],
    nb: NegBinom,
    nb_zero: str,
    slot_ms: float,
    rng: np.random.Generator,
    skip_slot: int,
) -> npt.NDArray[np.float64]:
    """Request times: one NB draw per occupied slot, members uniform inside it."""
    slots = np.unique(np.floor(events_ms / slot_ms).astype(np.int64))
    # The previous window's last slot already had its draw.
    slots = slots[slots != skip_slot]
    counts = nb.draw(len(slots), rng, truncate=nb_zero == "truncate")
    owner = np.repeat(slots, counts)
    return np.sort(owner + rng.random(len(owner))) * slot_ms
