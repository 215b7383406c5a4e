//! A fast path for the one event shape that makes up nearly every stream: a Completions or
//! Chat Completions chunk with text (or reasoning) in its first choice and no usage.
//!
//! Hand-written rather than left to serde_json because decoding took ~450 ns an event,
//! ~18% of a busy lane's CPU (perf, 16-token streams): the serde path spends it on key
//! dispatch, visitors and UTF-8 checks of fields it then ignores. This scan only walks the
//! bytes. It answers for a strict subset of JSON and of the chunk's fields and gives up
//! (None) on anything else — an escape it does not know, a `\u` escape, a field whose
//! value is not of the expected type, a duplicate field, `usage`, tool calls, any API but
//! these two — and the caller then decodes the event with serde as before. Where it
//! answers, its answer is the serde path's (a property test holds the two together).

use crate::sse::ChunkInfo;

/// The event's `ChunkInfo` when the event is of the common shape; None: decode it fully.
pub fn common_chunk(json: &[u8]) -> Option<ChunkInfo> {
    let mut s = Scan { b: json, i: 0 };
    let mut info = ChunkInfo::default();
    let mut seen_choices = false;
    let mut seen_usage = false;
    s.object(|s, key| match key {
        b"choices" => {
            first(&mut seen_choices)?;
            s.choices(&mut info)
        }
        // Only `null` here: a count is decoded (and checked) by the serde path.
        b"usage" => {
            first(&mut seen_usage)?;
            s.literal(b"null")
        }
        // Fields the serde path reads for other APIs: let it.
        b"error" | b"type" | b"delta" | b"message" | b"response" | b"output" | b"content_block"
        | b"content" | b"stop_reason" => None,
        _ => s.skip_value(),
    })?;
    s.ws();
    (s.i == s.b.len()).then_some(info)
}

/// None on a field's second occurrence (the serde path fails a duplicate field), and
/// marks it seen.
fn first(seen: &mut bool) -> Option<()> {
    (!std::mem::replace(seen, true)).then_some(())
}

struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scan<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        self.ws();
        (self.peek()? == c).then(|| self.i += 1)
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.ws();
        let end = self.i + word.len();
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    fn is_null(&mut self) -> bool {
        self.ws();
        self.b[self.i..].starts_with(b"null")
    }

    /// An object, calling `field` with each key (the scan then at its value), which must
    /// read the value. Keys with escapes give up.
    fn object(&mut self, mut field: impl FnMut(&mut Self, &[u8]) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            let key = self.string()?;
            // Keys with escapes, or not ASCII (the serde path checks their UTF-8).
            let (start, end) = key.span;
            if key.has_escape || !self.b[start..end].is_ascii() {
                return None;
            }
            self.eat(b':')?;
            let b = self.b;
            field(self, &b[start..end])?;
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// A string: where its contents are and whether they hold an escape. Gives up on a
    /// `\u` escape, an unknown escape or a control character, as the serde path would
    /// fail (or decode) those.
    fn string(&mut self) -> Option<Str> {
        self.eat(b'"')?;
        let start = self.i;
        let mut has_escape = false;
        loop {
            let rest = &self.b[self.i..];
            let at = memchr::memchr2(b'"', b'\\', rest)?;
            if rest[..at].iter().any(|&c| c < 0x20) {
                return None;
            }
            self.i += at;
            if self.b[self.i] == b'"' {
                self.i += 1;
                return Some(Str {
                    span: (start, self.i - 1),
                    has_escape,
                });
            }
            match self.b.get(self.i + 1)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 2,
                _ => return None,
            }
            has_escape = true;
        }
    }

    /// Generated text: a string (true when non-empty) or null. UTF-8 is checked, as the
    /// serde path reads the string.
    fn text(&mut self) -> Option<bool> {
        if self.is_null() {
            return self.literal(b"null").map(|()| false);
        }
        let s = self.string()?;
        let (start, end) = s.span;
        std::str::from_utf8(&self.b[start..end]).ok()?;
        Some(end > start)
    }

    /// A number, in JSON's grammar.
    fn number(&mut self) -> Option<()> {
        let digits = |s: &mut Self| {
            let from = s.i;
            while let Some(b'0'..=b'9') = s.peek() {
                s.i += 1;
            }
            (s.i > from).then_some(())
        };
        if self.peek()? == b'-' {
            self.i += 1;
        }
        if self.peek()? == b'0' {
            self.i += 1;
        } else {
            digits(self)?;
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            digits(self)?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            digits(self)?;
        }
        // A number ends at a delimiter, not in a letter or another digit run.
        match self.peek() {
            None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') => Some(()),
            _ => None,
        }
    }

    /// Any JSON value, read and dropped (nested ones to a depth of 32).
    fn skip_value(&mut self) -> Option<()> {
        self.skip_nested(0)
    }

    fn skip_nested(&mut self, depth: u32) -> Option<()> {
        if depth > 32 {
            return None;
        }
        self.ws();
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            b'{' => self.object(|s, _| s.skip_nested(depth + 1)),
            b'[' => self.array(|s, _| s.skip_nested(depth + 1)),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    /// An array, calling `item` with each element's position (the scan at the element).
    fn array(&mut self, mut item: impl FnMut(&mut Self, usize) -> Option<()>) -> Option<()> {
        self.eat(b'[')?;
        self.ws();
        if self.peek()? == b']' {
            self.i += 1;
            return Some(());
        }
        let mut n = 0;
        loop {
            item(self, n)?;
            n += 1;
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// `choices`: null, or an array whose first element is a choice object (the serde
    /// path reads only the first; the rest are skipped).
    fn choices(&mut self, info: &mut ChunkInfo) -> Option<()> {
        if self.is_null() {
            return self.literal(b"null");
        }
        self.array(|s, n| {
            if n > 0 {
                return s.skip_value();
            }
            s.ws();
            if s.peek()? != b'{' {
                return None;
            }
            s.choice(info)
        })
    }

    fn choice(&mut self, info: &mut ChunkInfo) -> Option<()> {
        let (mut text, mut delta, mut finish) = (false, false, false);
        self.object(|s, key| match key {
            b"text" => {
                first(&mut text)?;
                info.answer |= s.text()?;
                Some(())
            }
            b"delta" => {
                first(&mut delta)?;
                if s.is_null() {
                    return s.literal(b"null");
                }
                s.delta(info)
            }
            b"finish_reason" => {
                first(&mut finish)?;
                info.finish_reason = !s.is_null();
                s.skip_value()
            }
            b"message" => None,
            _ => s.skip_value(),
        })
    }

    fn delta(&mut self, info: &mut ChunkInfo) -> Option<()> {
        let (mut content, mut reasoning, mut reasoning_content) = (false, false, false);
        self.object(|s, key| match key {
            b"content" => {
                first(&mut content)?;
                info.answer |= s.text()?;
                Some(())
            }
            b"reasoning" => {
                first(&mut reasoning)?;
                info.reasoning |= s.text()?;
                Some(())
            }
            b"reasoning_content" => {
                first(&mut reasoning_content)?;
                info.reasoning |= s.text()?;
                Some(())
            }
            // Tool calls (even null ones): the serde path.
            b"tool_calls" => None,
            _ => s.skip_value(),
        })
    }
}

struct Str {
    span: (usize, usize),
    has_escape: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::{decode_event, EventKind};
    use proptest::prelude::*;

    fn full(json: &[u8]) -> Option<ChunkInfo> {
        match crate::sse::decode_event_with_serde(json) {
            Ok(EventKind::Chunk(info)) => Some(info),
            _ => None,
        }
    }

    #[test]
    fn the_common_shapes_take_the_fast_path_and_agree() {
        let events: [&[u8]; 8] = [
            br#"{"id":"cmpl-0","object":"text_completion","created":0,"model":"m","choices":[{"index":0,"text":" tok","finish_reason":null}]}"#,
            br#"{"id":"c","object":"text_completion","created":1764585600,"model":"Qwen/Qwen3-8B","choices":[{"index":0,"text":" the","logprobs":null,"finish_reason":null,"stop_reason":null}],"usage":null}"#,
            br#"{"id":"c","choices":[{"index":0,"text":"","finish_reason":"length","stop_reason":null}],"usage":null}"#,
            br#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#,
            br#"{"id":"c","choices":[{"index":0,"delta":{"content":"a\n\"b\""},"finish_reason":null}]}"#,
            br#"{"id":"c","choices":[{"index":0,"delta":{"reasoning":"think"},"finish_reason":null}]}"#,
            br#"{"id":"c","choices":[{"index":0,"delta":{"reasoning_content":"x","content":null}}]}"#,
            r#" { "choices" : [ { "text" : "é" , "finish_reason" : "stop" } , 7 ] , "x" : [1.5e3, -0, true, {"a": []}] } "#.as_bytes(),
        ];
        for ev in events {
            let fast = common_chunk(ev.trim_ascii());
            assert!(fast.is_some(), "{}", String::from_utf8_lossy(ev));
            assert_eq!(fast, full(ev), "{}", String::from_utf8_lossy(ev));
        }
    }

    #[test]
    fn everything_else_is_left_to_the_serde_path() {
        let events: [&[u8]; 12] = [
            br#"{"choices":[{"text":"a"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
            br#"{"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"{"}}]}}]}"#,
            br#"{"choices":[{"text":"\u00e9"}]}"#,
            br#"{"choices":[{"text":"a"}],"choices":[]}"#,
            br#"{"choices":[{"text":"a","text":"b"}]}"#,
            br#"{"choices":[{"text":["a"]}]}"#,
            br#"{"type":"response.output_text.delta","delta":"x"}"#,
            br#"{"error":{"message":"boom"}}"#,
            br#"{"choices":[{"text":"a"}]"#,
            br#"{"choices":[{"text":"a"}]} x"#,
            br#"{"id":01,"choices":[]}"#,
            br#"{"choices":["a"]}"#,
        ];
        for ev in events {
            assert_eq!(common_chunk(ev), None, "{}", String::from_utf8_lossy(ev));
        }
        // Through decode_event, the same answers as before.
        let EventKind::Chunk(info) = decode_event(events[0]).expect("usage chunk") else {
            panic!("not a chunk")
        };
        assert_eq!(info.completion_tokens, Some(1));
        assert!(decode_event(events[8]).is_err());
    }

    fn text_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[ -~]{0,8}",
            Just("a\\nb".to_owned()),
            Just("\\\"q\\\"".to_owned()),
            Just("\\u00e9".to_owned()),
            Just("\\x".to_owned()),
            Just("é✓".to_owned()),
            Just("\u{1}".to_owned()),
        ]
    }

    fn value_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("01".to_owned()),
            Just("-1.5e+3".to_owned()),
            Just("[]".to_owned()),
            Just("{\"k\":[1,{\"z\":null}]}".to_owned()),
            Just("[\"a\"]".to_owned()),
            text_strategy().prop_map(|t| format!("\"{t}\"")),
        ]
    }

    /// A chunk built from fields in any order, some of any type, some repeated.
    fn chunk_strategy() -> impl Strategy<Value = String> {
        let field = |keys: &'static [&'static str]| {
            (prop::sample::select(keys), value_strategy()).prop_map(|(k, v)| format!("\"{k}\":{v}"))
        };
        let delta = prop::collection::vec(
            field(&[
                "content",
                "reasoning",
                "reasoning_content",
                "role",
                "tool_calls",
            ]),
            0..4,
        )
        .prop_map(|f| format!("\"delta\":{{{}}}", f.join(",")));
        let choice_field = prop_oneof![
            3 => field(&["text", "finish_reason", "index", "logprobs", "stop_reason", "message"]),
            2 => delta,
        ];
        let choice =
            prop::collection::vec(choice_field, 0..5).prop_map(|f| format!("{{{}}}", f.join(",")));
        let choices = prop::collection::vec(choice, 0..3)
            .prop_map(|c| format!("\"choices\":[{}]", c.join(",")));
        let top = prop_oneof![
            3 => field(&["id", "object", "created", "model", "usage", "type", "error"]),
            3 => choices,
        ];
        (prop::collection::vec(top, 0..6), "[ \t\n]{0,2}")
            .prop_map(|(f, ws)| format!("{{{ws}{}{ws}}}", f.join(&format!("{ws},"))))
    }

    /// ns an event, fast path vs serde (a figure, not a check: `cargo test --release
    /// chunk_scan -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn time_an_event() {
        let ev: &[u8] = br#"{"id":"cmpl-5b0c1e2f8f0d4c0f","object":"text_completion","created":1764585600,"model":"Qwen/Qwen3-8B","choices":[{"index":0,"text":" the","logprobs":null,"finish_reason":null,"stop_reason":null}],"usage":null}"#;
        let n = 1_000_000;
        for (name, f) in [
            (
                "scan",
                (|e| common_chunk(e)) as fn(&[u8]) -> Option<ChunkInfo>,
            ),
            ("serde", full),
        ] {
            let t = std::time::Instant::now();
            let mut k = 0;
            for _ in 0..n {
                k += usize::from(f(std::hint::black_box(ev)).is_some_and(|i| i.answer));
            }
            let ns = t.elapsed().as_nanos() as f64 / n as f64;
            eprintln!("{name}: {ns:.0} ns/event ({k})");
        }
    }

    proptest! {
        #[test]
        fn where_the_fast_path_answers_it_agrees_with_serde(
            json in chunk_strategy(),
            cut in any::<prop::sample::Index>(),
            junk in any::<u8>(),
            mutate in 0u8..3,
        ) {
            let mut bytes = json.into_bytes();
            match mutate {
                1 => bytes.truncate(cut.index(bytes.len() + 1)),
                2 => {
                    let at = cut.index(bytes.len() + 1);
                    bytes.insert(at, junk);
                }
                _ => {}
            }
            let trimmed = bytes.trim_ascii();
            if let Some(fast) = common_chunk(trimmed) {
                prop_assert_eq!(Some(fast), full(trimmed), "{}", String::from_utf8_lossy(trimmed));
            }
        }
    }
}
