//! Per-request results: what each request did, as columns the Python side reads without
//! per-request objects.

/// Why a request did not succeed. The numeric values cross the Python boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ErrorKind {
    Ok = 0,
    /// Never sent: the run was stopped (Ctrl-C, stop()) before its scheduled time.
    NotSent = 1,
    /// TCP connect failed (refused, unreachable, port exhaustion).
    Connect = 2,
    ConnectTimeout = 3,
    /// No response headers within the first-byte timeout.
    FirstByteTimeout = 4,
    /// The stream went silent for longer than the idle timeout.
    IdleTimeout = 5,
    /// The whole request exceeded the total timeout.
    TotalTimeout = 6,
    /// Non-2xx HTTP status.
    HttpStatus = 7,
    /// Connection reset, closed mid-response, or another transport error.
    Transport = 8,
    /// The response is not what an OpenAI-compatible server sends (malformed SSE/JSON,
    /// wrong content type, error object inside the stream).
    InvalidResponse = 9,
    /// The stream ended without `[DONE]` and without a finish reason.
    Incomplete = 10,
    /// In flight when the run was stopped and the drain grace period ran out.
    Cancelled = 11,
    /// The response exceeded the body size limit.
    TooLarge = 12,
    /// TLS failed: handshake (certificate, refused), or the TLS layer broke mid-response.
    Tls = 13,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 14] = [
        ErrorKind::Ok,
        ErrorKind::NotSent,
        ErrorKind::Connect,
        ErrorKind::ConnectTimeout,
        ErrorKind::FirstByteTimeout,
        ErrorKind::IdleTimeout,
        ErrorKind::TotalTimeout,
        ErrorKind::HttpStatus,
        ErrorKind::Transport,
        ErrorKind::InvalidResponse,
        ErrorKind::Incomplete,
        ErrorKind::Cancelled,
        ErrorKind::TooLarge,
        ErrorKind::Tls,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Ok => "ok",
            ErrorKind::NotSent => "not_sent",
            ErrorKind::Connect => "connect",
            ErrorKind::ConnectTimeout => "connect_timeout",
            ErrorKind::FirstByteTimeout => "first_byte_timeout",
            ErrorKind::IdleTimeout => "idle_timeout",
            ErrorKind::TotalTimeout => "total_timeout",
            ErrorKind::HttpStatus => "http_status",
            ErrorKind::Transport => "transport",
            ErrorKind::InvalidResponse => "invalid_response",
            ErrorKind::Incomplete => "incomplete",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Tls => "tls",
        }
    }
}

/// The outcome of one request. Times are ns since the run's start instant; -1 = never happened.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// Position in the whole schedule (over all chunks fed to the run).
    pub index: u64,
    pub scheduled_ns: i64,
    pub endpoint_idx: u32,
    pub sent_ns: i64,
    pub first_byte_ns: i64,
    pub first_token_ns: i64,
    pub done_ns: i64,
    pub completion_tokens: i64,
    pub prompt_tokens: i64,
    pub http_status: u16,
    pub error: ErrorKind,
    pub error_message: String,
    /// Arrival of the first answer event (content or tool call); reasoning does not count.
    pub first_answer_ns: i64,
    /// Arrival of the last reasoning event.
    pub last_reasoning_ns: i64,
    /// Reasoning events (each is also in `chunk_ns`).
    pub reasoning_chunks: u32,
    /// Server-reported `completion_tokens_details.reasoning_tokens` (-1: not reported).
    pub reasoning_tokens: i64,
    /// Server-reported `prompt_tokens_details.cached_tokens` (-1: not reported).
    pub cached_tokens: i64,
    /// Token events whose time is the kernel's receive stamp (the rest: user space).
    pub kernel_stamped_events: u32,
    /// ns the request waited for connection budget before it was sent (part of its
    /// dispatch lag): the client's own descriptor limit, not the server.
    pub conn_wait_ns: i64,
    /// 1 if a usage value of an unexpected type was ignored.
    pub usage_ignored: u8,
    /// Live history: what this turn was sent with (`HistoryKind`; 0: not a follower
    /// with live history) and the bytes of history spliced into its body (-1: none).
    pub history_kind: u8,
    pub history_bytes: i64,
    /// The reply being kept for the turns that follow this one (live history only).
    pub reply: Option<Box<crate::reply::Reply>>,
    /// Arrival instant of every token-bearing event (reasoning, answer or tool call).
    pub chunk_ns: Vec<i64>,
}

impl RequestRecord {
    pub fn new(index: u64, scheduled_ns: i64, endpoint_idx: u32, expected_chunks: usize) -> Self {
        Self {
            index,
            scheduled_ns,
            endpoint_idx,
            sent_ns: -1,
            first_byte_ns: -1,
            first_token_ns: -1,
            done_ns: -1,
            completion_tokens: -1,
            prompt_tokens: -1,
            http_status: 0,
            error: ErrorKind::Ok,
            error_message: String::new(),
            first_answer_ns: -1,
            last_reasoning_ns: -1,
            reasoning_chunks: 0,
            reasoning_tokens: -1,
            cached_tokens: -1,
            kernel_stamped_events: 0,
            conn_wait_ns: 0,
            usage_ignored: 0,
            history_kind: 0,
            history_bytes: -1,
            reply: None,
            chunk_ns: Vec::with_capacity(expected_chunks),
        }
    }

    pub fn fail(&mut self, kind: ErrorKind, message: impl Into<String>) {
        self.error = kind;
        self.error_message = message.into();
    }
}

/// Records as columns. `index` says which scheduled request each row is.
#[derive(Debug, Default)]
pub struct RecordColumns {
    pub index: Vec<u64>,
    pub scheduled_ns: Vec<i64>,
    pub sent_ns: Vec<i64>,
    pub first_byte_ns: Vec<i64>,
    pub first_token_ns: Vec<i64>,
    pub done_ns: Vec<i64>,
    pub n_chunks: Vec<u32>,
    pub completion_tokens: Vec<i64>,
    pub prompt_tokens: Vec<i64>,
    pub http_status: Vec<u16>,
    pub error_kind: Vec<u8>,
    pub endpoint_idx: Vec<u32>,
    pub first_answer_ns: Vec<i64>,
    pub last_reasoning_ns: Vec<i64>,
    pub reasoning_chunks: Vec<u32>,
    pub reasoning_tokens: Vec<i64>,
    pub cached_tokens: Vec<i64>,
    pub conn_wait_ns: Vec<i64>,
    pub usage_ignored: Vec<u8>,
    pub history_kind: Vec<u8>,
    pub history_bytes: Vec<i64>,
    /// (row, message) for every row with a non-empty error message.
    pub error_messages: Vec<(usize, String)>,
    pub chunk_ns: Vec<i64>,
    /// `chunk_ns[chunk_offsets[r]..chunk_offsets[r+1]]` belongs to row r.
    pub chunk_offsets: Vec<u64>,
}

impl RecordColumns {
    /// Columns from records, in schedule order when `sort` is set, else as given.
    pub fn from_records(mut records: Vec<RequestRecord>, sort: bool) -> Self {
        if sort {
            records.sort_unstable_by_key(|r| r.index);
        }
        let n = records.len();
        let mut cols = RecordColumns {
            index: Vec::with_capacity(n),
            scheduled_ns: Vec::with_capacity(n),
            sent_ns: Vec::with_capacity(n),
            first_byte_ns: Vec::with_capacity(n),
            first_token_ns: Vec::with_capacity(n),
            done_ns: Vec::with_capacity(n),
            n_chunks: Vec::with_capacity(n),
            completion_tokens: Vec::with_capacity(n),
            prompt_tokens: Vec::with_capacity(n),
            http_status: Vec::with_capacity(n),
            error_kind: Vec::with_capacity(n),
            endpoint_idx: Vec::with_capacity(n),
            first_answer_ns: Vec::with_capacity(n),
            last_reasoning_ns: Vec::with_capacity(n),
            reasoning_chunks: Vec::with_capacity(n),
            reasoning_tokens: Vec::with_capacity(n),
            cached_tokens: Vec::with_capacity(n),
            conn_wait_ns: Vec::with_capacity(n),
            usage_ignored: Vec::with_capacity(n),
            history_kind: Vec::with_capacity(n),
            history_bytes: Vec::with_capacity(n),
            error_messages: Vec::new(),
            chunk_ns: Vec::with_capacity(records.iter().map(|r| r.chunk_ns.len()).sum()),
            chunk_offsets: Vec::with_capacity(n + 1),
        };
        cols.chunk_offsets.push(0);
        for (row, r) in records.into_iter().enumerate() {
            cols.index.push(r.index);
            cols.scheduled_ns.push(r.scheduled_ns);
            cols.sent_ns.push(r.sent_ns);
            cols.first_byte_ns.push(r.first_byte_ns);
            cols.first_token_ns.push(r.first_token_ns);
            cols.done_ns.push(r.done_ns);
            cols.n_chunks.push(r.chunk_ns.len() as u32);
            cols.completion_tokens.push(r.completion_tokens);
            cols.prompt_tokens.push(r.prompt_tokens);
            cols.http_status.push(r.http_status);
            cols.error_kind.push(r.error as u8);
            cols.endpoint_idx.push(r.endpoint_idx);
            cols.first_answer_ns.push(r.first_answer_ns);
            cols.last_reasoning_ns.push(r.last_reasoning_ns);
            cols.reasoning_chunks.push(r.reasoning_chunks);
            cols.reasoning_tokens.push(r.reasoning_tokens);
            cols.cached_tokens.push(r.cached_tokens);
            cols.conn_wait_ns.push(r.conn_wait_ns);
            cols.usage_ignored.push(r.usage_ignored);
            cols.history_kind.push(r.history_kind);
            cols.history_bytes.push(r.history_bytes);
            if !r.error_message.is_empty() {
                cols.error_messages.push((row, r.error_message));
            }
            cols.chunk_ns.extend_from_slice(&r.chunk_ns);
            cols.chunk_offsets.push(cols.chunk_ns.len() as u64);
        }
        cols
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_records_sorts_by_index_and_keeps_chunk_offsets() {
        let mut a = RequestRecord::new(2, 20, 1, 0);
        a.sent_ns = 20;
        a.chunk_ns = vec![21, 22];
        let mut b = RequestRecord::new(0, 0, 0, 0);
        b.sent_ns = 1;
        b.chunk_ns = vec![5];
        b.first_answer_ns = 5;
        b.reasoning_tokens = 0;
        b.cached_tokens = 3;
        a.reasoning_chunks = 2;
        a.last_reasoning_ns = 22;
        a.usage_ignored = 1;
        let mut c = RequestRecord::new(1, 10, 0, 0);
        c.fail(ErrorKind::NotSent, "stopped");
        let cols = RecordColumns::from_records(vec![a, b, c], true);
        assert_eq!(cols.index, vec![0, 1, 2]);
        assert_eq!(cols.sent_ns, vec![1, -1, 20]);
        assert_eq!(cols.scheduled_ns, vec![0, 10, 20]);
        assert_eq!(cols.endpoint_idx, vec![0, 0, 1]);
        assert_eq!(cols.chunk_offsets, vec![0, 1, 1, 3]);
        assert_eq!(cols.chunk_ns, vec![5, 21, 22]);
        assert_eq!(cols.error_kind[1], ErrorKind::NotSent as u8);
        assert_eq!(cols.error_messages, vec![(1, "stopped".to_owned())]);
        assert_eq!(cols.first_answer_ns, vec![5, -1, -1]);
        assert_eq!(cols.last_reasoning_ns, vec![-1, -1, 22]);
        assert_eq!(cols.reasoning_chunks, vec![0, 0, 2]);
        assert_eq!(cols.reasoning_tokens, vec![0, -1, -1]);
        assert_eq!(cols.cached_tokens, vec![3, -1, -1]);
        assert_eq!(cols.usage_ignored, vec![0, 0, 1]);
    }
}
