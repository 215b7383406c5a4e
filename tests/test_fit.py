"""`fineserve fit` and `fineserve compare`: known parameters are recovered, fit → generate
reproduces the trace, and bad input gets one clear line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SHARED_DATA, invoke
from fineserve.compare import Arrivals, compare_arrivals
from fineserve.fit import fit_trace, slot_merge_scale, write_fit
from fineserve.fit.arrivals import fit_windows
from fineserve.fit.bursts import fit_bursts, slot_counts
from fineserve.fit.lengths import fit_lengths
from fineserve.fit.validate import validate_fit
from fineserve.schedule import concat
from fineserve.traces.base import Trace
from fineserve.workloads.lengths import HistogramLengths, RandomLengths
from fineserve.workloads.parametric import (
    GammaWindows,
    NegBinom,
    load_nb_json,
    parametric_chunks,
    resolve_class_files,
)

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data absent")
SHARED_TRACES = [
    "fineserve/replay/Dense_30to100B.csv",
    "mooncake/synthetic_trace.jsonl",
    "azure/AzureLLMInferenceTrace_code.csv",
]


def as_trace(t_ns, inp=None, out=None) -> Trace:
    n = len(t_ns)
    rng = np.random.default_rng(7)
    inp = rng.integers(1, 2000, n) if inp is None else inp
    out = rng.integers(1, 500, n) if out is None else out
    return Trace(Path("synthetic.csv"), "fineserve", np.asarray(t_ns, np.int64), inp, out)


def gamma_windows(shapes, scales_ms, window_s=300.0) -> GammaWindows:
    k = len(shapes)
    start = np.arange(k) * window_s * 1e3
    return GammaWindows(start, start + window_s * 1e3, np.array(shapes), np.array(scales_ms))


def generate(windows: GammaWindows, seed: int, nb: NegBinom | None = None):
    chunks = parametric_chunks(
        windows, RandomLengths(100, 50, 0.5), np.random.default_rng(seed), nb=nb
    )
    return concat(list(chunks))


def test_gamma_windows_recovered_without_bursts() -> None:
    shapes, scales = [0.5, 1.5, 3.0], [40.0, 8.0, 2.0]
    s = generate(gamma_windows(shapes, scales), seed=1)
    r = fit_trace(as_trace(s.t_ns - s.t_ns[0]), name="x", bursts="off")
    w = r.windows
    assert len(w) == 3
    assert r.bursts is None
    # ~5k to 50k gaps per window: shape within 5 %, mean gap within 3 %.
    np.testing.assert_allclose(w.gamma_shape, shapes, rtol=0.05)
    np.testing.assert_allclose(
        w.gamma_shape * w.gamma_scale_ms, np.multiply(shapes, scales), rtol=0.03
    )
    np.testing.assert_allclose(w.cv, 1 / np.sqrt(shapes), rtol=0.08)
    assert list(w.model) == ["gamma", "gamma", "gamma"]
    assert np.all(w.ks_gamma < 0.03)
    assert w.ks_all < 0.01


def test_window_model_selection_weibull_and_exponential() -> None:
    rng = np.random.default_rng(3)
    weib = np.cumsum(rng.weibull(0.6, 20_000) * 10.0)  # ms, mean ≈ 15 ms
    expo = weib[-1] + np.cumsum(rng.exponential(20.0, 10_000))
    t_ms = np.concatenate([weib, expo])
    w_s = math.ceil(weib[-1] / 1e3)  # the first window holds exactly the Weibull part
    w = fit_windows(((t_ms - t_ms[0]) * 1e6).astype(np.int64), (t_ms * 0).astype(np.int64), w_s)
    assert w.model[0] == "weibull"
    assert w.weibull_shape[0] == pytest.approx(0.6, rel=0.03)
    assert w.weibull_scale_ms[0] == pytest.approx(10.0, rel=0.05)
    assert w.model[1] == "exponential"
    assert w.gamma_shape[1] == pytest.approx(1.0, rel=0.05)


def test_idle_and_sparse_windows_follow_the_documented_rule() -> None:
    rng = np.random.default_rng(4)
    busy = np.cumsum(rng.exponential(50.0, 3000))  # ms; ~150 s
    busy = busy[busy < 299_000]
    sparse = 600_000 + np.array([1_000.0, 50_000, 120_000, 200_000, 290_000])  # 5 events
    end = np.array([900_500.0])  # one request in the 4th window keeps the span
    t_ms = np.concatenate([[0.0], busy, sparse, end])
    w = fit_windows((t_ms * 1e6).astype(np.int64), (t_ms * 1e6).astype(np.int64), 300.0)
    assert list(w.model[1:3]) == ["idle", "sparse"]
    assert w.gamma_shape[1] == 1.0 and w.gamma_scale_ms[1] == pytest.approx(1000 * 300_000)
    assert w.gamma_shape[2] == 1.0 and w.gamma_scale_ms[2] == pytest.approx(300_000 / 5)
    assert w.n_requests[2] == 5
    assert math.isnan(w.ks_gamma[2])


@pytest.mark.slow
def test_zero_truncated_nb_recovered_and_better_than_fineserve_moments() -> None:
    rng = np.random.default_rng(5)
    counts = NegBinom(2.6, 1.5).draw(200_000, rng, truncate=True)
    fit = fit_bursts(counts)
    z = fit.candidates["zt_nb"].components[0]
    assert z.mu == pytest.approx(2.6, rel=0.03)
    assert z.alpha == pytest.approx(1.5, rel=0.05)
    assert fit.chosen in ("zt_nb", "zt_nb_mixture")
    assert fit.best.ks < 0.005
    moments = fit.candidates["nb_moments"]
    assert moments.ks > 10 * fit.best.ks  # moments ignore the truncation
    d = fit.to_json()
    for key in ("num_samples", "mean", "variance", "nb_mu", "nb_alpha", "ks_stat", "ks_pvalue"):
        assert key in d
    assert d["num_samples"] == len(counts)
    assert d["mean"] == pytest.approx(counts.mean())


def test_mixture_chosen_when_counts_mix_two_processes() -> None:
    rng = np.random.default_rng(6)
    lone = NegBinom(0.05, 0.5).draw(150_000, rng, truncate=True)
    fan = NegBinom(12.0, 0.05).draw(50_000, rng, truncate=True)
    fit = fit_bursts(np.concatenate([lone, fan]))
    assert fit.chosen == "zt_nb_mixture"
    assert fit.best.ks < 0.005
    assert fit.candidates["zt_nb"].ks > 5 * fit.best.ks
    weights = sorted(c.weight for c in fit.best.components)
    assert weights == pytest.approx([0.25, 0.75], abs=0.01)


@pytest.mark.slow
def test_mixture_nb_file_drives_the_generator(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    counts = np.concatenate(
        [
            NegBinom(0.05, 0.5).draw(60_000, rng, truncate=True),
            NegBinom(12.0, 0.05).draw(20_000, rng, truncate=True),
        ]
    )
    fit = fit_bursts(counts)
    path = tmp_path / "x_nb.json"
    path.write_text(json.dumps(fit.to_json()))
    nb = load_nb_json(path)
    assert nb.components is not None and len(nb.components) == 2
    assert nb.fitted_on_slots
    drawn = nb.draw(80_000, np.random.default_rng(9), truncate=True)
    top = int(max(drawn.max(), counts.max())) + 1
    cdf = lambda v: np.cumsum(np.bincount(v, minlength=top)) / len(v)  # noqa: E731
    assert np.max(np.abs(cdf(drawn) - cdf(counts))) < 0.01


@pytest.mark.slow
def test_bursty_round_trip_recovers_rate_and_nb() -> None:
    windows = gamma_windows([1.0, 2.0], [20.0, 6.0])
    nb = NegBinom(2.6, 1.5)
    s = generate(windows, seed=10, nb=nb)
    r = fit_trace(as_trace(s.t_ns), name="x")
    assert r.bursts is not None
    z = r.bursts.candidates["zt_nb"].components[0]
    assert z.mu == pytest.approx(2.6, rel=0.08)
    assert z.alpha == pytest.approx(1.5, rel=0.1)
    # The fitted scales are corrected for slot merging: mean event gaps come back.
    w = r.windows
    np.testing.assert_allclose(w.gamma_shape * w.gamma_scale_ms, [20.0, 12.0], rtol=0.08)


@pytest.mark.parametrize("family", ["gamma", "weibull"])
def test_slot_merge_scale_restores_the_occupied_slot_rate(family: str) -> None:
    rng = np.random.default_rng(11)
    shape, scale = 0.7, 2.5  # ms: many events fall in the same 1 ms slot
    if family == "gamma":
        gaps = rng.gamma(shape, scale, 400_000)
    else:
        gaps = scale * rng.weibull(shape, 400_000)
    _, counts = slot_counts((np.cumsum(gaps) * 1e6).astype(np.int64), 1.0)
    observed_gap = np.sum(gaps) / len(counts)  # mean gap between occupied slots
    assert observed_gap > 1.2 * gaps.mean()  # the correction is needed
    theta = slot_merge_scale(
        np.array([shape]), np.array([observed_gap]), np.array([observed_gap]), 1.0, family
    )[0]
    assert theta == pytest.approx(scale, rel=0.05)


def test_weibull_windows_are_generated_as_weibull(tmp_path: Path) -> None:
    rng = np.random.default_rng(18)
    t_ms = np.cumsum(8.0 * rng.weibull(0.5, 60_000))
    trace = as_trace(((t_ms - t_ms[0]) * 1e6).astype(np.int64))
    r = fit_trace(trace, name="wb", bursts="off", window_s=600)
    assert set(r.windows.model[:-1]) == {"weibull"}
    assert r.windows.ks_all_model < 0.5 * r.windows.ks_all  # Weibull fits, Gamma does not
    write_fit(r, tmp_path)
    c = validate_fit(r, trace, tmp_path, seed=19)
    gap = next(x for x in c.rows if x.metric == "inter-arrival gap (ms)")
    assert gap.ks < 0.02
    # Forcing FineServe's Gamma columns gives visibly worse gaps.
    gamma_only = resolve_class_files("wb", tmp_path).gamma
    from fineserve.workloads.parametric import load_gamma_windows

    w = load_gamma_windows(gamma_only, arrivals="gamma")
    assert not w.weibull.any()
    assert load_gamma_windows(gamma_only).weibull[:-1].all()


def test_length_fit_and_histogram_sampler(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    n = 200_000
    inp = np.maximum(1, rng.lognormal(6.0, 1.0, n)).astype(np.int64)
    out = np.maximum(1, (0.05 * inp + rng.exponential(150, n))).astype(np.int64)
    fit = fit_lengths(inp, out)
    pl = fit.params["input_pareto_lognormal"]
    assert pl["lognorm_mu"] == pytest.approx(6.0, abs=0.05)
    assert pl["lognorm_sigma"] == pytest.approx(1.0, abs=0.05)
    assert fit.ks["input_pareto_lognormal"] < 0.01
    assert fit.params["output_exponential"]["mean"] == pytest.approx(out.mean())
    assert fit.correlation["spearman"] > 0.1
    path = tmp_path / "l.json"
    path.write_text(json.dumps(fit.to_json()))
    sampler = HistogramLengths.from_json(path)
    gi, go = sampler.sample(n, np.random.default_rng(13))
    from scipy import stats

    assert stats.ks_2samp(gi, inp).statistic < 0.01
    assert stats.ks_2samp(go, out).statistic < 0.01
    assert np.isin(gi, inp).all() and np.isin(go, out).all()  # exact marginal values
    assert stats.spearmanr(gi, go).statistic == pytest.approx(fit.correlation["spearman"], abs=0.03)


@pytest.mark.slow
def test_fit_validate_on_synthetic_bursty_trace(tmp_path: Path) -> None:
    s = generate(gamma_windows([0.8, 1.5, 2.5], [25.0, 10.0, 4.0]), seed=14, nb=NegBinom(1.5, 0.8))
    trace = as_trace(s.t_ns, s.input_len, s.output_len)
    r = fit_trace(trace, name="synth")
    write_fit(r, tmp_path)
    c = validate_fit(r, trace, tmp_path, seed=15)
    assert c.passed, [(x.metric, x.value, x.threshold) for x in c.rows if x.ok is False]
    by = {x.metric: x for x in c.rows}
    assert by["requests"].value < 0.05
    assert by["requests per occupied slot"].ks < 0.01


def test_compare_detects_a_different_workload() -> None:
    rng = np.random.default_rng(16)
    t1 = np.cumsum(rng.exponential(10e6, 20_000)).astype(np.int64)
    t2 = np.cumsum(rng.gamma(0.3, 10e6 / 0.3, 20_000)).astype(np.int64)
    a = Arrivals("a", t1, rng.integers(1, 100, 20_000), rng.integers(1, 100, 20_000))
    b = Arrivals("b", t2, rng.integers(1, 400, 20_000), rng.integers(1, 100, 20_000))
    c = compare_arrivals(
        a, b, window_s=10, thresholds={"inter-arrival gap (ms)": 0.05, "input length": 0.05}
    )
    by = {x.metric: x for x in c.rows}
    assert by["inter-arrival gap (ms)"].ks > 0.1 and by["inter-arrival gap (ms)"].ok is False
    assert by["input length"].ok is False
    assert by["output length"].ks < 0.03
    assert not c.passed


@pytest.mark.slow
def test_cli_fit_generate_compare_round_trip(tmp_path: Path) -> None:
    s = generate(gamma_windows([1.0, 2.0], [10.0, 5.0]), seed=17, nb=NegBinom(2.0, 1.0))
    trace = tmp_path / "t.csv"
    rows = ["timestamp,input_length,output_length"] + [
        f"{t / 1e3:.3f},{i},{o}" for t, i, o in zip(s.t_ns, s.input_len, s.output_len)
    ]
    trace.write_text("\n".join(rows) + "\n")
    params = tmp_path / "params"
    r = invoke("fit", str(trace), "-o", str(params), "--name", "synth", "--validate")
    assert r.exit_code == 0, r.output
    assert "bursts     modelled" in r.output and "verdict: all checks pass" in r.output
    gamma = params / "Parametric" / "gamma" / "synth_gamma_5min.csv"
    header = gamma.read_text().splitlines()[0].split(",")
    for col in (
        "gamma_shape",
        "gamma_scale",
        "window_start_ms",
        "window_end_ms",
        "n_requests",
        "cv",
        "model",
    ):
        assert col in header
    assert (params / "synth_validate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((params / "synth_validate.json").read_text())
    assert report["passed"] is True
    files = resolve_class_files("synth", params)
    assert files.nb is not None and files.lengths is not None

    sched = tmp_path / "g.parquet"
    r = invoke(
        "generate", "--mode", "parametric", "--model-class", "synth",
        "--datasets-dir", str(params), "-o", str(sched), "--seed", "3",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    png = tmp_path / "c.png"
    out_json = tmp_path / "c.json"
    r = invoke("compare", str(trace), str(sched), "--plot", str(png), "--json", str(out_json))
    assert r.exit_code == 0, r.output
    metrics = {m["metric"]: m for m in json.loads(out_json.read_text())["metrics"]}
    assert metrics["requests per occupied slot"]["ks"] < 0.03
    assert metrics["input length"]["ks"] < 0.03
    assert png.stat().st_size > 20_000

    # A schedule made at time scale 10 compares like the original once --time-scale undoes it.
    fast = tmp_path / "fast.parquet"
    r = invoke(
        "generate", "--mode", "parametric", "--model-class", "synth",
        "--datasets-dir", str(params), "-o", str(fast), "--seed", "3", "--time-scale", "10",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    for scale, close in (("10", True), ("1", False)):
        r = invoke("compare", str(trace), str(fast), "--time-scale", scale, "--json", str(out_json))
        assert r.exit_code == 0, r.output
        metrics = {m["metric"]: m for m in json.loads(out_json.read_text())["metrics"]}
        aligned = metrics["window rate, aligned"]["wasserstein"]
        assert (aligned < 0.1) if close else (aligned > 0.5)
        assert (metrics["requests per occupied slot"]["ks"] < 0.03) == close


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "no"),
        ("timestamp,input_length,output_length\n5,10,10\n", "at least 2"),
        ("timestamp,input_length\n1,2\n", "output_length"),
        ("timestamp,input_length,output_length\n5,10,10\n5,11,10\n", "same timestamp"),
    ],
)
def test_fit_bad_traces_give_one_line(tmp_path: Path, content: str, message: str) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(content)
    r = invoke("fit", str(p), "-o", str(tmp_path / "o"), "--trace-format", "fineserve")
    assert r.exit_code != 0
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert message in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) <= 2


def test_bad_parameter_files_give_one_line(tmp_path: Path) -> None:
    (tmp_path / "Parametric" / "gamma").mkdir(parents=True)
    (tmp_path / "Parametric" / "lengths").mkdir(parents=True)
    (tmp_path / "Parametric" / "gamma" / "c_gamma_5min.csv").write_text(
        "gamma_shape,gamma_scale\n1,10\n"
    )
    (tmp_path / "Parametric" / "lengths" / "c_lengths.json").write_text(
        '{"input_bin_edges": [1, 2]}'
    )
    r = invoke(
        "generate",
        "--mode",
        "parametric",
        "--model-class",
        "c",
        "--datasets-dir",
        str(tmp_path),
        "-o",
        str(tmp_path / "g.parquet"),
    )
    assert r.exit_code != 0 and "not a fineserve lengths file" in r.output
    nb = tmp_path / "nb.json"
    bad = {"weight": 1, "nb_mu": -1, "nb_alpha": 1}
    good = {"weight": 1, "nb_mu": 1, "nb_alpha": 1}
    nb.write_text(json.dumps({"nb_mu": 1, "nb_alpha": 1, "components": [bad, good]}))
    with pytest.raises(Exception, match="nb_mu must be > 0"):
        load_nb_json(nb)


def summary_seconds(by: dict[str, dict[str, float]]) -> float:
    """The seconds a validation covered, from its ACF row's threshold."""
    t = by["requests/s ACF at 1 s"]["threshold"]
    return 2 / ((t - 0.05) / 2.5) ** 2


#: What fit must find of each shared trace's clock: Azure's µs stamps are below a slot,
#: FineServe's replay arrives just after each second's tick, Mooncake's are whole ms.
EXPECTED_CLOCK = {
    "azure/AzureLLMInferenceTrace_code.csv": ("quantised", 0.001),
    "fineserve/replay/Dense_30to100B.csv": ("lattice", 1000.0),
    "mooncake/synthetic_trace.jsonl": ("quantised", 1.0),
}


@pytest.mark.slow
@needs_shared
@pytest.mark.parametrize("rel", SHARED_TRACES)
def test_fit_validate_passes_on_shared_traces(tmp_path: Path, rel: str) -> None:
    r = invoke("fit", str(SHARED_DATA / rel), "-o", str(tmp_path), "--name", "t", "--validate")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "t_validate.json").read_text())
    assert report["passed"]
    by = {m["metric"]: m for m in report["metrics"]}
    checked = {name for name, m in by.items() if m["threshold"] is not None}
    assert checked == {
        "requests",
        "window rate error, median",
        "window CV error, median",
        "requests per occupied slot",
        "inter-arrival gap (ms)",
        "requests/s ACF at 1 s",
        "requests/s ACF at 10 s",
        "requests/s ACF at 60 s",
        "input length",
        "output length",
    } | ({"prefix hit rate, theoretical"} if "mooncake" in rel else set())
    # The targets themselves, without the sampling allowance (seed 0).
    assert by["window rate error, median"]["check_value"] <= 0.03
    assert by["window CV error, median"]["check_value"] <= 0.05
    assert by["requests per occupied slot"]["ks"] <= 0.02
    assert by["inter-arrival gap (ms)"]["ks"] <= 0.05
    # An autocorrelation over N seconds has sampling noise ~√(1/N) on each side: the
    # target plus that allowance (validate's own threshold) — a perfect generator of a
    # 17-minute trace misses a bare 0.05 one time in six.
    seconds = summary_seconds(by)
    assert by["requests/s ACF at 1 s"]["check_value"] <= 0.05 + 2.5 * math.sqrt(2 / seconds)
    summary = json.loads((tmp_path / "t_fit.json").read_text())
    assert summary["n_requests"] > 1000
    assert summary["resolution"]["kind"] == EXPECTED_CLOCK[rel][0]
    assert summary["resolution"]["period_ms"] == EXPECTED_CLOCK[rel][1]


@pytest.mark.slow
@needs_shared
def test_fit_takes_a_servegen_composition_as_a_schedule(tmp_path: Path) -> None:
    """A ServeGen pool holds per-client rates, not requests: it is fitted through the
    schedule `generate` draws from it, and the fit's validation passes on it."""
    sched = tmp_path / "sg.parquet"
    r = invoke(
        "generate",
        "--mode",
        "servegen",
        "--servegen-pool",
        str(SHARED_DATA / "servegen/language/m-large"),
        "--request-rate",
        "20",
        "--duration",
        "900",
        "-o",
        str(sched),
    )
    assert r.exit_code == 0, r.output
    r = invoke("fit", str(sched), "-o", str(tmp_path), "--name", "sg", "--validate")
    assert r.exit_code == 0, r.output
    from fineserve.schedule import concat, read_schedule

    summary = json.loads((tmp_path / "sg_fit.json").read_text())
    assert summary["n_requests"] == len(concat(list(read_schedule(sched)[0])))
    assert json.loads((tmp_path / "sg_validate.json").read_text())["passed"]


@pytest.mark.slow
@needs_shared
def test_azure_bursts_beat_fineserve_estimator(tmp_path: Path) -> None:
    """On the Azure code trace FineServe's moment NB is undefined (variance < mean); the
    zero-truncated NB fits the slot counts to within 0.001."""
    invoke("fit", str(SHARED_DATA / SHARED_TRACES[2]), "-o", str(tmp_path), "--name", "az")
    nb = json.loads((tmp_path / "Parametric" / "nb" / "az_nb.json").read_text())
    assert nb["variance"] < nb["mean"]
    assert "nb_moments" not in nb["candidates"]
    assert nb["ks_stat"] < 0.001


def test_shipped_datasets_resolve_with_bursts_and_lengths(tmp_path: Path) -> None:
    datasets = Path(__file__).resolve().parents[1] / "datasets"
    sched = tmp_path / "a.parquet"
    summary = tmp_path / "a.json"
    r = invoke(
        "generate", "--mode", "parametric", "--model-class", "azure_code",
        "--datasets-dir", str(datasets), "--duration", "600", "-o", str(sched),
        "--summary-json", str(summary),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    info = json.loads(summary.read_text())["workload"]["classes"][0]
    assert info["arrival_model"].endswith("azure_code_arrivals.json")
    assert info["lengths"].endswith("azure_code_lengths.json")
    s = json.loads(summary.read_text())
    assert 0.05 < s["fraction_in_bursts"] < 0.4  # the model's count law
    # The renewal files: FineServe's windows with the NB layer (enabled by event_process).
    r = invoke(
        "generate", "--mode", "parametric", "--model-class", "azure_code",
        "--datasets-dir", str(datasets), "--duration", "600", "-o", str(sched),
        "--summary-json", str(summary), "--parametric-arrivals", "renewal",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    info = json.loads(summary.read_text())["workload"]["classes"][0]
    assert info["nb"] is not None and info["nb"]["source"].endswith("azure_code_nb.json")
    assert 0.05 < json.loads(summary.read_text())["fraction_in_bursts"] < 0.4
    r = invoke(
        "generate", "--mode", "parametric", "--model-class", "mooncake_synthetic",
        "--datasets-dir", str(datasets), "--duration", "300", "-o", str(sched),
        "--summary-json", str(summary),
    )  # fmt: skip
    info = json.loads(summary.read_text())["workload"]["classes"][0]
    assert info["resolution"]["kind"] == "quantised"  # ties of its 1 ms clock, not bursts
    assert info["prefix"]["block_size"] == 512


def test_model_class_resolves_the_project_datasets_from_the_repo_root(monkeypatch) -> None:
    monkeypatch.delenv("FINESERVE_DATASETS", raising=False)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    files = resolve_class_files("azure_code", None)
    assert files.gamma.name == "azure_code_gamma_5min.csv"
    assert files.nb is not None and files.lengths is not None


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(
    gaps_ms=st.lists(
        st.one_of(st.just(0.0), st.floats(0.001, 5e5, allow_nan=False)), min_size=1, max_size=400
    ),
    window_s=st.sampled_from([1.0, 60.0, 300.0]),
    bursts=st.sampled_from(["auto", "off"]),
)
def test_fit_any_arrivals_gives_usable_parameters(
    gaps_ms: list[float], window_s: float, bursts: str
) -> None:
    """Whatever the gaps (ties, long idle stretches, a handful of requests), every window
    gets finite positive parameters the generator accepts, and the windows tile the span."""
    t_ns = np.concatenate([[0], np.cumsum(np.round(np.array(gaps_ms) * 1e6))]).astype(np.int64)
    if t_ns[-1] == 0:
        return  # all tied: refused with a clear error (tested above)
    r = fit_trace(as_trace(t_ns), name="h", window_s=window_s, bursts=bursts)
    w = r.windows
    for v in (w.gamma_shape, w.gamma_scale_ms):
        assert np.all(np.isfinite(v) & (v > 0))
    fitted = w.model == "weibull"
    assert np.all(np.isfinite(w.weibull_shape[fitted]) & (w.weibull_scale_ms[fitted] > 0))
    assert w.start_ms[0] == 0 and np.all(w.start_ms[1:] == w.end_ms[:-1])
    assert w.end_ms[-1] >= t_ns[-1] / 1e6
    assert int(w.n_requests.sum()) == len(t_ns)


@pytest.mark.slow
def test_fineserve_published_ks_is_scipys_continuous_ks_on_integer_counts() -> None:
    """FineServe's Dense_lt10B NB (mean 2.6285, variance 2.9729, KS 0.276): counts with
    those moments from the zero-truncated NB that matches them reproduce its KS under
    scipy's continuous convention, while the discrete distance is ~0.08 and the
    zero-truncated fit's ~0."""
    from scipy import stats

    rng = np.random.default_rng(20)
    counts = NegBinom(2.1142, 0.30526).draw(300_000, rng, truncate=True)
    assert counts.mean() == pytest.approx(2.6285, rel=0.01)
    assert counts.var() == pytest.approx(2.9729, rel=0.02)
    fit = fit_bursts(counts)
    moments = fit.candidates["nb_moments"]
    assert moments.components[0].alpha == pytest.approx(0.037, abs=0.015)  # FineServe: 0.037
    assert moments.ks_scipy == pytest.approx(0.276, abs=0.005)
    r = 1 / moments.components[0].alpha
    p = r / (r + moments.components[0].mu)
    assert stats.kstest(counts, lambda x: stats.nbinom.cdf(x, r, p)).statistic == pytest.approx(
        moments.ks_scipy, abs=1e-6
    )
    assert moments.ks_plain == pytest.approx(0.081, abs=0.005)
    assert fit.best.ks < 0.003
