"""Gathers the GPU run's result files into one summary JSON and a load-vs-latency figure.

python collect.py RESULTS_DIR SUMMARY.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEYS = (
    "scheduled",
    "completed",
    "failed",
    "not_sent",
    "duration",
    "request_throughput",
    "output_throughput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_itl_ms",
    "p99_itl_ms",
    "median_tpot_ms",
    "p99_e2el_ms",
    "p99_ttft_from_scheduled_ms",
    "p99_dispatch_lag_us",
    "sent_in_scheduled_ms_fraction",
    "arrival_rate_error",
    "prompt_check",
    "prefix_hit_rate_theoretical",
    "errors_by_kind",
)


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    out: dict = {"runs": {}}
    for f in sorted(src.glob("*.json")):
        d = json.loads(f.read_text())
        if f.stem.startswith("agree_"):
            out.setdefault("agreement", {})[f.stem[6:]] = d
        elif f.stem == "sweep":
            out["sweep"] = d
        elif "completed" in d:
            out["runs"][f.stem] = {k: d.get(k) for k in KEYS}
    dst.write_text(json.dumps(out, indent=1) + "\n")
    poisson = sorted(
        (int(k.split("_")[1]), v) for k, v in out["runs"].items() if k.startswith("poisson_")
    )
    if poisson:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(12, 4))
        rates = [r for r, _ in poisson]
        for key, label in (
            ("median_ttft_ms", "median TTFT"),
            ("p99_ttft_ms", "p99 TTFT"),
            ("p99_ttft_from_scheduled_ms", "p99 TTFT from scheduled"),
        ):
            ax[0].plot(rates, [v[key] for _, v in poisson], "o-", label=label)
        ax[0].set(xlabel="offered req/s", ylabel="ms", yscale="log", title="TTFT vs load")
        ax[1].plot(rates, [v["request_throughput"] for _, v in poisson], "o-", label="achieved")
        ax[1].plot(rates, rates, "--", label="offered")
        ax[1].set(xlabel="offered req/s", ylabel="req/s", title="throughput")
        for a in ax:
            a.grid(alpha=0.3)
            a.legend()
        fig.tight_layout()
        fig.savefig(dst.with_name("latency_vs_rate.png"), dpi=90)
    print(
        json.dumps(
            {
                k: {kk: v.get(kk) for kk in ("request_throughput", "p99_ttft_ms")}
                for k, v in out["runs"].items()
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
