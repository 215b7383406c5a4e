//! The columnar schedule a run is fed, and the checks a chunk of it must pass.

use bytes::Bytes;

use crate::error::EngineError;

use super::history::TurnText;

/// A run's schedule, or one chunk of it, columnar.
#[derive(Debug, Clone, Default)]
pub struct Schedule {
    /// Send offset from the run's start instant, non-decreasing (also across chunks).
    pub t_ns: Vec<i64>,
    /// Index into `bodies` for each request.
    pub body_idx: Vec<u32>,
    pub endpoint_idx: Vec<u32>,
    /// Used to size per-request buffers; the body itself carries `max_tokens`.
    pub expected_output_tokens: Vec<u32>,
    pub bodies: Vec<Bytes>,
    /// Conversation turns (all three empty when there are none): the schedule index of the
    /// turn this request follows (-1: none); it leaves `think_ns` after that turn ends,
    /// not at `t_ns` (which then only orders the schedule).
    pub parent: Vec<i64>,
    pub think_ns: Vec<i64>,
    /// How many later requests follow this one (its end is published for them).
    pub followers: Vec<u32>,
    /// Live history (`EngineConfig::history_api`; empty, or one per request with the turn
    /// columns): the delay after a previous turn whose reply was a tool call (instead of
    /// `think_ns`), and where each body's parts are.
    pub tool_ns: Vec<i64>,
    pub turn_text: Vec<TurnText>,
    /// One column per `ClientConfig::request_headers` (all or none): each request's value
    /// of that header; negative: the request does not carry it.
    pub header_values: Vec<Vec<i64>>,
}

impl Schedule {
    pub fn len(&self) -> usize {
        self.t_ns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.t_ns.is_empty()
    }

    /// Checks the columns; `after_ns` is the last send offset of the previous chunk.
    /// `n_targets` counts endpoints plus route groups (see `EngineConfig::route_groups`);
    /// `n_headers` is the number of per-request headers.
    pub fn validate(
        &self,
        n_targets: usize,
        n_headers: usize,
        after_ns: i64,
    ) -> Result<(), EngineError> {
        let n = self.t_ns.len();
        let bad = |m: String| Err(EngineError::InvalidSchedule(m));
        if self.body_idx.len() != n
            || self.endpoint_idx.len() != n
            || self.expected_output_tokens.len() != n
        {
            return bad(format!(
                "column lengths differ: t_ns {n}, body_idx {}, endpoint_idx {}, expected_output_tokens {}",
                self.body_idx.len(),
                self.endpoint_idx.len(),
                self.expected_output_tokens.len()
            ));
        }
        if let Some(i) = self.t_ns.iter().position(|&t| t < 0) {
            return bad(format!("t_ns[{i}] is negative"));
        }
        if let Some(&first) = self.t_ns.first() {
            if first < after_ns {
                return bad(format!(
                    "t_ns[0] = {first} is before the previous chunk's last send offset {after_ns}"
                ));
            }
        }
        if let Some(i) = self.t_ns.windows(2).position(|w| w[1] < w[0]) {
            return bad(format!("t_ns is not sorted at index {}", i + 1));
        }
        if let Some(i) = self
            .body_idx
            .iter()
            .position(|&b| b as usize >= self.bodies.len())
        {
            return bad(format!("body_idx[{i}] is outside the body table"));
        }
        if let Some(i) = self
            .endpoint_idx
            .iter()
            .position(|&e| e as usize >= n_targets)
        {
            return bad(format!("endpoint_idx[{i}] has no endpoint or route group"));
        }
        let turns = [self.parent.len(), self.think_ns.len(), self.followers.len()];
        if turns.iter().any(|&l| l != 0) {
            if turns.iter().any(|&l| l != n) {
                return bad(
                    "parent, think_ns and followers must all be given, one per request".into(),
                );
            }
            if let Some(i) = self.think_ns.iter().position(|&t| t < 0) {
                return bad(format!("think_ns[{i}] is negative"));
            }
        }
        let live = [self.tool_ns.len(), self.turn_text.len()];
        if live.iter().any(|&l| l != 0) {
            if live.iter().chain(turns.iter()).any(|&l| l != n) {
                return bad(
                    "tool_ns and turn_text need the turn columns, all one per request".into(),
                );
            }
            if let Some(i) = self.tool_ns.iter().position(|&t| t < 0) {
                return bad(format!("tool_ns[{i}] is negative"));
            }
            for i in 0..n {
                if self.parent[i] < 0 && self.followers[i] == 0 {
                    continue; // not a conversation's turn: its offsets are not used
                }
                let body = &self.bodies[self.body_idx[i] as usize];
                if let Err(m) = self.turn_text[i].check(body.len()) {
                    return bad(format!("request {i}: {m}"));
                }
            }
        }
        // No columns: this chunk carries none of the per-request headers (e.g. warm-up).
        if !self.header_values.is_empty() {
            if self.header_values.len() != n_headers {
                return bad(format!(
                    "{} header columns for {n_headers} per-request headers",
                    self.header_values.len()
                ));
            }
            if let Some(c) = self.header_values.iter().position(|col| col.len() != n) {
                return bad(format!("header column {c} is not one value per request"));
            }
        }
        Ok(())
    }
}
