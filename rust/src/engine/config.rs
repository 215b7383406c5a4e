//! What a run is told: endpoints, client settings, lanes, pacing, routing. Built by the
//! caller (the Python layer converts `EngineOptions` into it) and checked by `validate`.

use std::time::Duration;

use crate::client::ClientConfig;
use crate::error::EngineError;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub endpoints: Vec<String>,
    pub client: ClientConfig,
    pub max_concurrency: Option<usize>,
    /// Connections open at once over every lane (0: no cap); a connect past it waits for
    /// one to close.
    pub max_connections: usize,
    pub lanes: usize,
    /// Connections opened per endpoint before the start instant (split over lanes).
    pub warm_connections: usize,
    /// Yield-spin this long before each deadline instead of sleeping.
    pub spin: Duration,
    /// Gap between the end of warm-up and the start instant.
    pub start_delay: Duration,
    /// Start at this system-clock instant (ns since the Unix epoch) instead, so that runs
    /// on several machines share one start; if warm-up ends later, the run starts then.
    pub start_at_unix_ns: Option<i64>,
    /// Run lanes under SCHED_FIFO when the process may (see `timer::set_realtime_priority`).
    pub realtime_priority: bool,
    /// Dynamic routing: a request whose `endpoint_idx` is `endpoints.len() + g` goes, when
    /// it is sent, to the endpoint of group `g` with the fewest requests outstanding
    /// (least-outstanding routing across the run's lanes).
    pub route_groups: Vec<Vec<usize>>,
    /// A conversation's later turn goes to the endpoint that served its previous turn
    /// (session affinity, so the server's prefix cache can reuse the conversation).
    pub turn_affinity: bool,
    /// Live conversation history: which API's messages the bodies carry (`Off`: later
    /// turns are sent as rendered).
    pub history_api: crate::engine::HistoryApi,
    /// The most reply text kept per turn for its followers (the rest is dropped, and the
    /// follower's record says so).
    pub reply_limit_bytes: usize,
}

impl EngineConfig {
    /// Checks the settings together; each failure is one line. (Endpoint URLs are checked
    /// when they are parsed, as the run starts.)
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::InvalidConfig(m));
        if self.endpoints.is_empty() {
            return bad("no endpoint given".into());
        }
        if self.lanes == 0 {
            return bad("lanes must be >= 1".into());
        }
        if self.max_concurrency == Some(0) {
            return bad("max_concurrency must be >= 1".into());
        }
        let c = &self.client;
        for (name, d) in [
            ("connect_timeout_s", c.connect_timeout),
            ("first_byte_timeout_s", c.first_byte_timeout),
            ("idle_timeout_s", c.idle_timeout),
            ("total_timeout_s", c.total_timeout),
        ] {
            if d.is_zero() {
                return bad(not_positive_secs(name, 0.0));
            }
        }
        let n = self.endpoints.len();
        for (g, group) in self.route_groups.iter().enumerate() {
            if group.is_empty() || group.iter().any(|&e| e >= n) {
                return bad(format!("route group {g} must list endpoints 0..{n}"));
            }
        }
        Ok(())
    }
}

/// `v` seconds as a timeout (`name` says which in the error). Zero converts, and
/// `EngineConfig::validate` refuses it with the same message.
pub fn timeout_secs(name: &str, v: f64) -> Result<Duration, EngineError> {
    if v < 0.0 {
        // -0.1 would round to zero; say what was given.
        return Err(EngineError::InvalidConfig(not_positive_secs(name, v)));
    }
    Duration::try_from_secs_f64(v)
        .map_err(|_| EngineError::InvalidConfig(not_positive_secs(name, v)))
}

fn not_positive_secs(name: &str, v: f64) -> String {
    format!("{name} must be a positive number of seconds, got {v}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> EngineConfig {
        let s = Duration::from_secs(1);
        EngineConfig {
            endpoints: vec!["http://127.0.0.1:9/v1/completions".into()],
            client: ClientConfig {
                connect_timeout: s,
                first_byte_timeout: s,
                idle_timeout: s,
                total_timeout: s,
                max_body_bytes: 1 << 20,
                ..ClientConfig::default()
            },
            max_concurrency: None,
            max_connections: 0,
            lanes: 1,
            warm_connections: 0,
            spin: Duration::ZERO,
            start_delay: Duration::ZERO,
            start_at_unix_ns: None,
            realtime_priority: false,
            route_groups: Vec::new(),
            turn_affinity: true,
            history_api: crate::engine::HistoryApi::Off,
            reply_limit_bytes: 1 << 20,
        }
    }

    fn refused(c: &EngineConfig) -> String {
        match c.validate() {
            Err(e) => e.to_string(),
            Ok(()) => panic!("accepted"),
        }
    }

    #[test]
    fn each_bad_setting_is_refused_in_one_line() {
        assert!(config().validate().is_ok());
        let mut c = config();
        c.endpoints.clear();
        assert_eq!(refused(&c), "invalid configuration: no endpoint given");
        let mut c = config();
        c.lanes = 0;
        assert_eq!(refused(&c), "invalid configuration: lanes must be >= 1");
        let mut c = config();
        c.max_concurrency = Some(0);
        assert_eq!(
            refused(&c),
            "invalid configuration: max_concurrency must be >= 1"
        );
        let mut c = config();
        c.client.idle_timeout = Duration::ZERO;
        assert!(refused(&c).contains("idle_timeout_s must be a positive number of seconds"));
        let mut c = config();
        c.route_groups = vec![vec![0], vec![0, 1]];
        assert!(refused(&c).contains("route group 1 must list endpoints 0..1"));
        let mut c = config();
        c.route_groups = vec![vec![]];
        assert!(refused(&c).contains("route group 0"));
    }

    #[test]
    fn timeouts_convert_or_say_what_was_given() {
        assert_eq!(
            timeout_secs("t", 2.5).ok(),
            Some(Duration::from_millis(2500))
        );
        for v in [-1.0, -0.1, f64::NAN, f64::INFINITY, 1e30] {
            let e = timeout_secs("connect_timeout_s", v)
                .err()
                .map(|e| e.to_string());
            let want = format!("connect_timeout_s must be a positive number of seconds, got {v}");
            assert!(e.is_some_and(|e| e.ends_with(&want)), "{v}");
        }
    }
}
