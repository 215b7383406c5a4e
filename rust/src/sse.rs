//! Incremental Server-Sent Events parsing and OpenAI stream-chunk decoding.
//!
//! Hand-written rather than taken from an SSE crate because the engine needs the *read
//! boundary* of every event: a token's timestamp is the instant the bytes that complete its
//! event arrived, and the parser must not allocate per event on the hot path. Existing crates
//! wrap a `Stream` and hide both.

use serde::Deserialize;

/// Feeds raw bytes in arbitrary splits and yields the `data` payload of each complete event.
///
/// Follows the WHATWG event-stream rules that matter for OpenAI-style servers: lines end in
/// `\n`, `\r\n` or `\r`; `data:` lines of one event are joined with `\n`; a blank line ends the
/// event; comment lines (`:`) and other fields are ignored.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    /// The previous chunk ended in `\r`: a `\n` at the start of the next one belongs to it.
    pending_cr: bool,
    bytes_seen: u64,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Total bytes fed so far.
    pub fn bytes_seen(&self) -> u64 {
        self.bytes_seen
    }

    /// Feeds `chunk`; calls `on_event` with the data of every event it completes.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(&[u8])) {
        self.bytes_seen += chunk.len() as u64;
        let mut rest = chunk;
        if self.pending_cr {
            self.pending_cr = false;
            if let Some(b'\n') = rest.first() {
                rest = &rest[1..];
            }
        }
        while let Some(pos) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            let (head, tail) = rest.split_at(pos);
            let terminator = tail[0];
            rest = &tail[1..];
            if terminator == b'\r' {
                match rest.first() {
                    Some(b'\n') => rest = &rest[1..],
                    None => self.pending_cr = true,
                    Some(_) => {}
                }
            }
            if self.line.is_empty() {
                self.process_line(head, &mut on_event);
            } else {
                self.line.extend_from_slice(head);
                let line = std::mem::take(&mut self.line);
                self.process_line(&line, &mut on_event);
                self.line = line;
                self.line.clear();
            }
        }
        self.line.extend_from_slice(rest);
    }

    /// Ends the stream: an event whose final blank line never came is still delivered, since
    /// several servers close the stream right after the last `data:` line.
    pub fn finish(&mut self, mut on_event: impl FnMut(&[u8])) {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.process_line(&line, &mut on_event);
        }
        self.dispatch(&mut on_event);
    }

    fn process_line(&mut self, line: &[u8], on_event: &mut impl FnMut(&[u8])) {
        if line.is_empty() {
            self.dispatch(on_event);
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
            self.has_data = true;
        }
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(&[u8])) {
        if self.has_data {
            on_event(&self.data);
            self.data.clear();
            self.has_data = false;
        }
    }
}

/// What one event of an OpenAI-compatible stream (or a whole non-streamed body) says.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ChunkInfo {
    /// The event carried generated content (`text`, `delta.content`, `delta.reasoning_content`
    /// or `message.content`) that is non-empty.
    pub has_content: bool,
    pub finish_reason: bool,
    pub completion_tokens: Option<i64>,
    pub prompt_tokens: Option<i64>,
    /// The server reported an error object inside the stream.
    pub error: Option<String>,
}

#[derive(Debug)]
pub enum EventKind {
    Done,
    Chunk(ChunkInfo),
}

#[derive(Deserialize)]
struct WireChunk<'a> {
    #[serde(default, borrow)]
    choices: Option<Vec<WireChoice<'a>>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct WireChoice<'a> {
    #[serde(default, borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    delta: Option<WireDelta<'a>>,
    #[serde(default, borrow)]
    message: Option<WireDelta<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct WireDelta<'a> {
    #[serde(default, borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    reasoning_content: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    completion_tokens: Option<i64>,
    #[serde(default)]
    prompt_tokens: Option<i64>,
}

fn non_empty(s: &Option<std::borrow::Cow<'_, str>>) -> bool {
    s.as_ref().is_some_and(|t| !t.is_empty())
}

/// Decodes one event's data (or a non-streamed JSON body).
pub fn decode_event(data: &[u8]) -> Result<EventKind, String> {
    let trimmed = data.trim_ascii();
    if trimmed == b"[DONE]" {
        return Ok(EventKind::Done);
    }
    let wire: WireChunk<'_> = serde_json::from_slice(trimmed).map_err(|e| {
        let shown = String::from_utf8_lossy(&trimmed[..trimmed.len().min(80)]).into_owned();
        format!("malformed JSON in event ({e}): {shown:?}")
    })?;
    let mut info = ChunkInfo::default();
    if let Some(choice) = wire.choices.as_ref().and_then(|c| c.first()) {
        let delta_content = |d: &Option<WireDelta<'_>>| {
            d.as_ref()
                .is_some_and(|d| non_empty(&d.content) || non_empty(&d.reasoning_content))
        };
        info.has_content = non_empty(&choice.text)
            || delta_content(&choice.delta)
            || delta_content(&choice.message);
        info.finish_reason = choice.finish_reason.is_some();
    }
    if let Some(u) = wire.usage {
        info.completion_tokens = u.completion_tokens;
        info.prompt_tokens = u.prompt_tokens;
    }
    if let Some(err) = wire.error {
        let msg = match &err {
            serde_json::Value::Object(m) => m
                .get("message")
                .and_then(|v| v.as_str())
                .map(str::to_owned)
                .unwrap_or_else(|| err.to_string()),
            other => other.to_string(),
        };
        info.error = Some(msg);
    }
    Ok(EventKind::Chunk(info))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn events_of(splits: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for s in splits {
            p.feed(s, |e| out.push(e.to_vec()));
        }
        p.finish(|e| out.push(e.to_vec()));
        out
    }

    #[test]
    fn events_split_across_reads() {
        let evs = events_of(&[b"data: {\"a\"", b":1}\n", b"\ndata: [DO", b"NE]\n\n"]);
        assert_eq!(evs, vec![b"{\"a\":1}".to_vec(), b"[DONE]".to_vec()]);
    }

    #[test]
    fn crlf_split_between_cr_and_lf() {
        let evs = events_of(&[b"data: x\r", b"\n\r", b"\ndata: y\r\n\r\n"]);
        assert_eq!(evs, vec![b"x".to_vec(), b"y".to_vec()]);
    }

    #[test]
    fn multiline_data_comments_and_other_fields() {
        let evs = events_of(&[b": ping\nevent: message\ndata: a\ndata: b\nid: 3\n\n"]);
        assert_eq!(evs, vec![b"a\nb".to_vec()]);
    }

    #[test]
    fn last_event_without_blank_line_is_delivered() {
        let evs = events_of(&[b"data: tail"]);
        assert_eq!(evs, vec![b"tail".to_vec()]);
    }

    #[test]
    fn decode_completion_chat_usage_and_done() {
        let c = br#"{"choices":[{"index":0,"text":" hi","finish_reason":null}]}"#;
        match decode_event(c) {
            Ok(EventKind::Chunk(i)) => assert!(i.has_content && !i.finish_reason),
            other => panic!("{other:?}"),
        }
        let c = br#"{"choices":[{"delta":{"content":"x"},"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":7}}"#;
        match decode_event(c) {
            Ok(EventKind::Chunk(i)) => {
                assert!(i.has_content && i.finish_reason);
                assert_eq!(i.completion_tokens, Some(7));
                assert_eq!(i.prompt_tokens, Some(5));
            }
            other => panic!("{other:?}"),
        }
        let c = br#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#;
        match decode_event(c) {
            Ok(EventKind::Chunk(i)) => assert!(!i.has_content),
            other => panic!("{other:?}"),
        }
        assert!(matches!(decode_event(b" [DONE] "), Ok(EventKind::Done)));
        assert!(decode_event(b"{not json").is_err());
        match decode_event(br#"{"error":{"message":"overloaded"}}"#) {
            Ok(EventKind::Chunk(i)) => assert_eq!(i.error.as_deref(), Some("overloaded")),
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        /// However a valid stream is cut into reads, the same events come out.
        #[test]
        fn any_split_yields_same_events(
            payloads in proptest::collection::vec("[a-z0-9 {}\":,]{0,40}", 1..20),
            crlf in any::<bool>(),
            cuts in proptest::collection::vec(any::<usize>(), 0..30),
        ) {
            let nl = if crlf { "\r\n" } else { "\n" };
            let stream: String = payloads.iter().map(|p| format!("data: {p}{nl}{nl}")).collect();
            let bytes = stream.as_bytes();
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            points.sort_unstable();
            let mut pieces = Vec::new();
            let mut last = 0;
            for p in points { pieces.push(&bytes[last..p]); last = p; }
            pieces.push(&bytes[last..]);
            let got = events_of(&pieces);
            let want: Vec<Vec<u8>> = payloads.iter().map(|p| p.as_bytes().to_vec()).collect();
            prop_assert_eq!(got, want);
        }

        /// Arbitrary bytes never panic the parser or the decoder.
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut p = SseParser::new();
            p.feed(&data, |e| { let _ = decode_event(e); });
            p.finish(|e| { let _ = decode_event(e); });
        }
    }
}
