//! The mock's `GET /metrics`: vLLM's metric names with the mock's true values, so that a
//! client scraping it can be checked exactly (a counter's increase against the tokens it
//! received, the running gauge against its own requests in flight).
//!
//! The page is written by hand: it is eight metrics in the Prometheus text format
//! (version 0.0.4), and a metrics registry crate would add a dependency to emit a few lines.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// vLLM's `time_to_first_token_seconds` bucket bounds (seconds).
pub const TTFT_BUCKETS_S: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// What the mock has served, as vLLM would count it.
#[derive(Debug, Default)]
pub struct ServingCounters {
    /// Requests admitted, waiting for a generation slot (`--max-concurrency`).
    pub waiting: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    /// Prompt tokens of requests that named their prefix blocks, and of those the tokens
    /// found in the prefix LRU.
    pub prefix_queries: AtomicU64,
    pub prefix_hits: AtomicU64,
    pub success: AtomicU64,
    ttft_buckets: [AtomicU64; TTFT_BUCKETS_S.len()],
    ttft_count: AtomicU64,
    ttft_sum_ns: AtomicU64,
}

/// The gauges the counters do not hold: read from the mock's state when the page is made.
#[derive(Debug, Clone, Copy)]
pub struct Gauges {
    pub running: u64,
    pub kv_cache_usage: f64,
}

impl ServingCounters {
    /// A request's first token, `ttft` after it arrived.
    pub fn observe_ttft(&self, ttft: Duration) {
        let s = ttft.as_secs_f64();
        if let Some(i) = TTFT_BUCKETS_S.iter().position(|&b| s <= b) {
            self.ttft_buckets[i].fetch_add(1, Relaxed);
        }
        self.ttft_count.fetch_add(1, Relaxed);
        self.ttft_sum_ns
            .fetch_add(ttft.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// The page, every sample labelled with `model_name` as vLLM does.
    pub fn render(&self, model: &str, g: Gauges) -> String {
        let label = format!("model_name=\"{}\"", escape_label(model));
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            let _ = writeln!(out, "{name}{{{label}}} {value}");
        };
        let n = |a: &AtomicU64| a.load(Relaxed).to_string();
        metric(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            g.running.to_string(),
        );
        metric(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            n(&self.waiting),
        );
        metric(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            format!("{}", g.kv_cache_usage),
        );
        metric(
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            n(&self.prompt_tokens),
        );
        metric(
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            n(&self.generation_tokens),
        );
        metric(
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            n(&self.prefix_queries),
        );
        metric(
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            n(&self.prefix_hits),
        );
        metric(
            "vllm:request_success_total",
            "counter",
            "Count of successfully processed requests.",
            n(&self.success),
        );
        let name = "vllm:time_to_first_token_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Histogram of time to first token in seconds.\n# TYPE {name} histogram"
        );
        let mut cumulative = 0u64;
        for (bound, count) in TTFT_BUCKETS_S.iter().zip(&self.ttft_buckets) {
            cumulative += count.load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound:?}\",{label}}} {cumulative}"
            );
        }
        let total = self.ttft_count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\",{label}}} {total}");
        let _ = writeln!(out, "{name}_count{{{label}}} {total}");
        let sum_s = self.ttft_sum_ns.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{label}}} {sum_s}");
        out
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_counts_and_buckets_what_was_observed() {
        let c = ServingCounters::default();
        c.generation_tokens.fetch_add(7, Relaxed);
        c.waiting.fetch_add(2, Relaxed);
        c.observe_ttft(Duration::from_millis(15));
        c.observe_ttft(Duration::from_millis(90));
        let page = c.render(
            "m\"x",
            Gauges {
                running: 3,
                kv_cache_usage: 0.25,
            },
        );
        assert!(page.contains("vllm:num_requests_running{model_name=\"m\\\"x\"} 3\n"));
        assert!(page.contains("vllm:num_requests_waiting{model_name=\"m\\\"x\"} 2\n"));
        assert!(page.contains("vllm:generation_tokens_total{model_name=\"m\\\"x\"} 7\n"));
        assert!(page.contains("vllm:kv_cache_usage_perc{model_name=\"m\\\"x\"} 0.25\n"));
        // Cumulative buckets: 15 ms falls under le=0.02, 90 ms under le=0.1.
        assert!(page.contains("_bucket{le=\"0.01\",model_name=\"m\\\"x\"} 0\n"));
        assert!(page.contains("_bucket{le=\"0.02\",model_name=\"m\\\"x\"} 1\n"));
        assert!(page.contains("_bucket{le=\"0.1\",model_name=\"m\\\"x\"} 2\n"));
        assert!(page.contains("_bucket{le=\"+Inf\",model_name=\"m\\\"x\"} 2\n"));
        assert!(
            page.contains("vllm:time_to_first_token_seconds_sum{model_name=\"m\\\"x\"} 0.105\n")
        );
    }
}
