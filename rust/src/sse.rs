//! Incremental Server-Sent Events parsing and OpenAI stream-chunk decoding.
//!
//! Hand-written rather than taken from an SSE crate because the engine needs the *read
//! boundary* of every event: a token's timestamp is the instant the bytes that complete its
//! event arrived, and the parser must not allocate per event on the hot path. Existing crates
//! wrap a `Stream` and hide both.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
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
        // memchr: the byte-at-a-time scan was a fifth of the event's cost (SIMD here).
        while let Some(pos) = memchr::memchr2(b'\n', b'\r', rest) {
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
        let (field, value) = match memchr::memchr(b':', line) {
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
///
/// One event may carry several kinds of output (vLLM's reasoning parser can put the end of
/// the reasoning and the start of the answer in one delta); each flag says what it holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Non-empty reasoning: `delta.reasoning` / `delta.reasoning_content` (or `message.*`
    /// of a whole body), Responses' `response.reasoning_text.delta` and
    /// `response.reasoning_summary_text.delta`.
    pub reasoning: bool,
    /// Non-empty answer text: `text`, `delta.content`, `message.content`, Responses'
    /// `response.output_text.delta` (and `response.refusal.delta`).
    pub answer: bool,
    /// A tool-call fragment with a non-empty function name or arguments: `delta.tool_calls`,
    /// `message.tool_calls`, Responses' `response.function_call_arguments.delta`.
    pub tool_call: bool,
    /// The stream says it is complete: a `finish_reason`, or Responses'
    /// `response.completed` / `response.incomplete`.
    pub finish_reason: bool,
    pub completion_tokens: Option<i64>,
    pub prompt_tokens: Option<i64>,
    /// `completion_tokens_details.reasoning_tokens` (Responses:
    /// `output_tokens_details.reasoning_tokens`).
    pub reasoning_tokens: Option<i64>,
    /// `prompt_tokens_details.cached_tokens` (Responses: `input_tokens_details.cached_tokens`).
    pub cached_tokens: Option<i64>,
    /// A `usage` value of an unexpected type (a string for a count, say) was ignored.
    pub usage_ignored: bool,
    /// The server reported an error object inside the stream.
    pub error: Option<String>,
}

impl ChunkInfo {
    /// The event carried generated output of any kind (a token, for TTFT and ITL).
    pub fn has_output(&self) -> bool {
        self.reasoning || self.answer || self.tool_call
    }
}

#[derive(Debug)]
pub enum EventKind {
    Done,
    Chunk(ChunkInfo),
}

// The wire types below read only what the engine needs. None of them borrows or allocates:
// strings are only tested for being non-empty (serde_json hands them over in place, or in
// its scratch buffer when escaped), and unknown fields are skipped with `IgnoredAny`. Types
// that must never fail the event on an odd value ("lenient") take any JSON value; what they
// make of one of an unexpected type is their `unexpected()`.

/// A JSON value read without failing: null is `Default`, other types go to the `on_*`
/// hooks (by default consumed and answered with `unexpected()`).
trait Lenient: Default {
    fn unexpected() -> Self;
    fn on_str(_: &str) -> Self {
        Self::unexpected()
    }
    fn on_int(_: i64) -> Self {
        Self::unexpected()
    }
    fn on_float(_: f64) -> Self {
        Self::unexpected()
    }
    fn on_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Self::unexpected())
    }
    fn on_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Self::unexpected())
    }
}

struct LenientVisitor<T>(PhantomData<T>);

impl<'de, T: Lenient> Visitor<'de> for LenientVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<T, E> {
        Ok(T::unexpected())
    }
    fn visit_i64<E>(self, v: i64) -> Result<T, E> {
        Ok(T::on_int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<T, E> {
        Ok(i64::try_from(v).map_or_else(|_| T::unexpected(), T::on_int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<T, E> {
        Ok(T::on_float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<T, E> {
        Ok(T::on_str(v))
    }
    fn visit_unit<E>(self) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_none<E>(self) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        T::on_seq(seq)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::on_map(map)
    }
}

macro_rules! lenient_deserialize {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(LenientVisitor::<Self>(PhantomData))
            }
        }
    )*};
}

lenient_deserialize!(
    Text,
    ToolFrag,
    Num,
    Usage,
    Details,
    Tag,
    FirstChoice,
    Output,
    OutputItem,
    Delta
);

/// The object keys the lenient types look at; anything else is `Other`.
enum Key {
    Text,
    Function,
    Name,
    Arguments,
    Type,
    Content,
    Summary,
    PromptTokens,
    CompletionTokens,
    PromptDetails,
    CompletionDetails,
    ReasoningTokens,
    CachedTokens,
    /// Anthropic's usage: cache reads and writes are outside `input_tokens`.
    CacheRead,
    CacheCreation,
    Thinking,
    PartialJson,
    StopReason,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E>(self, v: &str) -> Result<Key, E> {
                // The Responses API's names for the same usage figures are aliases.
                Ok(match v {
                    "text" => Key::Text,
                    "function" => Key::Function,
                    "name" => Key::Name,
                    "arguments" => Key::Arguments,
                    "type" => Key::Type,
                    "content" => Key::Content,
                    "summary" => Key::Summary,
                    "prompt_tokens" | "input_tokens" => Key::PromptTokens,
                    "completion_tokens" | "output_tokens" => Key::CompletionTokens,
                    "prompt_tokens_details" | "input_tokens_details" => Key::PromptDetails,
                    "completion_tokens_details" | "output_tokens_details" => Key::CompletionDetails,
                    "reasoning_tokens" => Key::ReasoningTokens,
                    "cached_tokens" => Key::CachedTokens,
                    "cache_read_input_tokens" => Key::CacheRead,
                    "cache_creation_input_tokens" => Key::CacheCreation,
                    "thinking" => Key::Thinking,
                    "partial_json" => Key::PartialJson,
                    "stop_reason" => Key::StopReason,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

/// Generated text that is non-empty: a string, a list of content parts (any non-empty),
/// or a part object's `text`. Other values count as no text.
#[derive(Debug, Default, Clone, Copy)]
struct Text(bool);

impl Lenient for Text {
    fn unexpected() -> Self {
        Text(false)
    }
    fn on_str(s: &str) -> Self {
        Text(!s.is_empty())
    }
    fn on_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut any = false;
        while let Some(Text(t)) = seq.next_element()? {
            any |= t;
        }
        Ok(Text(any))
    }
    fn on_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut any = false;
        while let Some(k) = map.next_key::<Key>()? {
            match k {
                Key::Text => any |= map.next_value::<Text>()?.0,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Text(any))
    }
}

/// Tool-call deltas: true if any call has a non-empty `function.name` or
/// `function.arguments` (a fragment may carry only arguments, without name or id).
#[derive(Debug, Default, Clone, Copy)]
struct ToolFrag(bool);

impl Lenient for ToolFrag {
    fn unexpected() -> Self {
        ToolFrag(false)
    }
    fn on_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut any = false;
        while let Some(ToolFrag(t)) = seq.next_element()? {
            any |= t;
        }
        Ok(ToolFrag(any))
    }
    fn on_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut any = false;
        while let Some(k) = map.next_key::<Key>()? {
            match k {
                Key::Function => any |= map.next_value::<ToolFrag>()?.0,
                Key::Name | Key::Arguments => any |= map.next_value::<Text>()?.0,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(ToolFrag(any))
    }
}

/// A token count: absent (missing or null), a value, or of an unexpected type / negative.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum Num {
    #[default]
    Absent,
    Value(i64),
    Bad,
}

impl Lenient for Num {
    fn unexpected() -> Self {
        Num::Bad
    }
    fn on_int(v: i64) -> Self {
        if v >= 0 {
            Num::Value(v)
        } else {
            Num::Bad
        }
    }
    fn on_float(v: f64) -> Self {
        // 12.0 is a count written by a float-minded server; 12.5 is not a count.
        if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < 9.0e15 {
            Num::Value(v as i64)
        } else {
            Num::Bad
        }
    }
}

impl Num {
    /// Overrides `into` when present; flags `bad` when of the wrong type.
    fn merge(self, into: &mut Option<i64>, bad: &mut bool) {
        match self {
            Num::Absent => {}
            Num::Value(v) => *into = Some(v),
            Num::Bad => *bad = true,
        }
    }
}

/// `*_tokens_details`: the two counts read from either kind of details object.
#[derive(Debug, Default)]
struct Details {
    reasoning: Num,
    cached: Num,
    bad: bool,
}

impl Lenient for Details {
    fn unexpected() -> Self {
        Details {
            bad: true,
            ..Details::default()
        }
    }
    fn on_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut d = Details::default();
        while let Some(k) = map.next_key::<Key>()? {
            match k {
                Key::ReasoningTokens => d.reasoning = map.next_value()?,
                Key::CachedTokens => d.cached = map.next_value()?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(d)
    }
}

/// `usage` (Chat/Completions or Responses naming).
#[derive(Debug, Default)]
struct Usage {
    prompt: Num,
    completion: Num,
    reasoning: Num,
    cached: Num,
    cache_read: Num,
    cache_creation: Num,
    bad: bool,
}

impl Lenient for Usage {
    fn unexpected() -> Self {
        Usage {
            bad: true,
            ..Usage::default()
        }
    }
    fn on_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut u = Usage::default();
        while let Some(k) = map.next_key::<Key>()? {
            match k {
                Key::PromptTokens => u.prompt = map.next_value()?,
                Key::CompletionTokens => u.completion = map.next_value()?,
                Key::CompletionDetails => {
                    let d: Details = map.next_value()?;
                    u.reasoning = d.reasoning;
                    u.bad |= d.bad;
                }
                Key::PromptDetails => {
                    let d: Details = map.next_value()?;
                    u.cached = d.cached;
                    u.bad |= d.bad;
                }
                Key::CacheRead => u.cache_read = map.next_value()?,
                Key::CacheCreation => u.cache_creation = map.next_value()?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(u)
    }
}

impl Usage {
    fn merge_into(mut self, info: &mut ChunkInfo) {
        // Anthropic counts cache reads and writes outside `input_tokens`: the prompt is
        // their sum, and the cache reads are the cached tokens.
        if let Num::Value(read) = self.cache_read {
            self.cached = Num::Value(read);
        }
        if let Num::Value(input) = self.prompt {
            let extra = [self.cache_read, self.cache_creation]
                .iter()
                .map(|n| if let Num::Value(v) = n { *v } else { 0 })
                .sum::<i64>();
            self.prompt = Num::Value(input.saturating_add(extra));
        }
        for n in [self.cache_read, self.cache_creation] {
            self.bad |= n == Num::Bad;
        }
        let bad = &mut info.usage_ignored;
        *bad |= self.bad;
        self.prompt.merge(&mut info.prompt_tokens, bad);
        self.completion.merge(&mut info.completion_tokens, bad);
        self.reasoning.merge(&mut info.reasoning_tokens, bad);
        self.cached.merge(&mut info.cached_tokens, bad);
    }
}

/// A Responses event's `type`, or an output item's.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Tag {
    #[default]
    Other,
    AnswerDelta,
    ReasoningDelta,
    ToolDelta,
    /// `response.completed` / `response.incomplete` (max_output_tokens reached): the end.
    Finished,
    Failed,
    Error,
    MessageItem,
    ReasoningItem,
    ToolItem,
    // Anthropic's Messages API: events, and content block / delta types.
    MessageStart,
    BlockStart,
    BlockDelta,
    MessageDelta,
    MessageStop,
    TextItem,
}

impl Lenient for Tag {
    fn unexpected() -> Self {
        Tag::Other
    }
    fn on_str(s: &str) -> Self {
        match s {
            "response.output_text.delta" | "response.refusal.delta" => Tag::AnswerDelta,
            "response.reasoning_text.delta" | "response.reasoning_summary_text.delta" => {
                Tag::ReasoningDelta
            }
            "response.function_call_arguments.delta"
            | "response.custom_tool_call_input.delta"
            | "response.mcp_call_arguments.delta" => Tag::ToolDelta,
            "response.completed" | "response.incomplete" => Tag::Finished,
            "response.failed" => Tag::Failed,
            "error" => Tag::Error,
            "message" => Tag::MessageItem,
            "reasoning" => Tag::ReasoningItem,
            "function_call" | "custom_tool_call" | "mcp_call" | "tool_use" => Tag::ToolItem,
            "message_start" => Tag::MessageStart,
            "content_block_start" => Tag::BlockStart,
            "content_block_delta" => Tag::BlockDelta,
            "message_delta" => Tag::MessageDelta,
            "message_stop" => Tag::MessageStop,
            "text" => Tag::TextItem,
            "thinking" | "redacted_thinking" => Tag::ReasoningItem,
            "text_delta" => Tag::AnswerDelta,
            "thinking_delta" => Tag::ReasoningDelta,
            "input_json_delta" => Tag::ToolDelta,
            _ => Tag::Other,
        }
    }
}

/// The first element of `choices` (servers send one per event with n = 1); the rest are
/// skipped, so no `Vec` is built per event.
#[derive(Default)]
struct FirstChoice(Option<WireChoice>);

impl Lenient for FirstChoice {
    fn unexpected() -> Self {
        FirstChoice(None)
    }
    fn on_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let first = seq.next_element::<WireChoice>()?;
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(FirstChoice(first))
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct WireChoice {
    text: Text,
    delta: Option<WireDelta>,
    message: Option<WireDelta>,
    finish_reason: Option<IgnoredAny>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct WireDelta {
    content: Text,
    reasoning: Text,
    reasoning_content: Text,
    tool_calls: ToolFrag,
}

/// A whole Responses body's `output` items, as (reasoning, answer, tool call) flags.
#[derive(Default)]
struct Output {
    reasoning: bool,
    answer: bool,
    tool_call: bool,
}

impl Lenient for Output {
    fn unexpected() -> Self {
        Output::default()
    }
    fn on_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut out = Output::default();
        while let Some(item) = seq.next_element::<OutputItem>()? {
            match item.kind {
                Tag::MessageItem => out.answer |= item.content,
                Tag::TextItem => out.answer |= item.text,
                Tag::ReasoningItem => {
                    out.reasoning |= item.content || item.summary || item.thinking
                }
                Tag::ToolItem => out.tool_call |= item.name || item.arguments,
                _ => {}
            }
        }
        Ok(out)
    }
}

#[derive(Default)]
struct OutputItem {
    kind: Tag,
    content: bool,
    summary: bool,
    name: bool,
    arguments: bool,
    /// Anthropic content blocks: `text` and `thinking`.
    text: bool,
    thinking: bool,
}

impl Lenient for OutputItem {
    fn unexpected() -> Self {
        OutputItem::default()
    }
    fn on_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut it = OutputItem::default();
        while let Some(k) = map.next_key::<Key>()? {
            match k {
                Key::Type => it.kind = map.next_value()?,
                Key::Content => it.content = map.next_value::<Text>()?.0,
                Key::Summary => it.summary = map.next_value::<Text>()?.0,
                Key::Name => it.name = map.next_value::<Text>()?.0,
                Key::Arguments => it.arguments = map.next_value::<Text>()?.0,
                Key::Text => it.text = map.next_value::<Text>()?.0,
                Key::Thinking => it.thinking = map.next_value::<Text>()?.0,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(it)
    }
}

/// An event's `delta`: Responses' text (a string), or Anthropic's delta object: its
/// `type` and whether its `text`, `thinking` or `partial_json` is non-empty, and (in
/// `message_delta`) whether it carries a `stop_reason`.
#[derive(Default)]
struct Delta {
    kind: Tag,
    text: bool,
    thinking: bool,
    partial_json: bool,
    stop_reason: bool,
}

impl Lenient for Delta {
    fn unexpected() -> Self {
        Delta::default()
    }
    fn on_str(s: &str) -> Self {
        Delta {
            text: !s.is_empty(),
            ..Delta::default()
        }
    }
    fn on_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut d = Delta::default();
        while let Some(k) = map.next_key::<Key>()? {
            match k {
                Key::Type => d.kind = map.next_value()?,
                Key::Text => d.text = map.next_value::<Text>()?.0,
                Key::Thinking => d.thinking = map.next_value::<Text>()?.0,
                Key::PartialJson => d.partial_json = map.next_value::<Text>()?.0,
                Key::StopReason => {
                    d.stop_reason = map.next_value::<Option<IgnoredAny>>()?.is_some()
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(d)
    }
}

/// The `response` object of a Responses event (`response.completed` etc.).
#[derive(Deserialize, Default)]
#[serde(default)]
struct WireResponse {
    usage: Usage,
    error: Option<serde_json::Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct WireChunk {
    choices: FirstChoice,
    usage: Usage,
    /// Allocated only when present, which is rare.
    error: Option<serde_json::Value>,
    // The Responses API: an event's `type`, its `delta` text, an `error` event's `message`,
    // the `response` of the lifecycle events, and a whole body's `output`.
    #[serde(rename = "type")]
    kind: Tag,
    delta: Delta,
    message: Option<serde_json::Value>,
    response: Option<WireResponse>,
    output: Output,
    // Anthropic's Messages API: a `content_block_start`'s block, a whole body's `content`
    // blocks and its `stop_reason`.
    content_block: OutputItem,
    content: Output,
    stop_reason: Option<IgnoredAny>,
}

fn error_text(err: &serde_json::Value) -> String {
    match err {
        serde_json::Value::Object(m) => m
            .get("message")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| err.to_string()),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Decodes one event's data (or a non-streamed JSON body): the common chunk shape by a
/// scan of its bytes (`chunk_scan`), anything else with serde.
pub fn decode_event(data: &[u8]) -> Result<EventKind, String> {
    let trimmed = data.trim_ascii();
    if let Some(info) = crate::chunk_scan::common_chunk(trimmed) {
        return Ok(EventKind::Chunk(info));
    }
    decode_event_with_serde(trimmed)
}

/// `decode_event` without the fast path: every field of every API, and the error text.
pub(crate) fn decode_event_with_serde(data: &[u8]) -> Result<EventKind, String> {
    let trimmed = data.trim_ascii();
    if trimmed == b"[DONE]" {
        return Ok(EventKind::Done);
    }
    let wire: WireChunk = serde_json::from_slice(trimmed).map_err(|e| {
        let shown = String::from_utf8_lossy(&trimmed[..trimmed.len().min(80)]).into_owned();
        format!("malformed JSON in event ({e}): {shown:?}")
    })?;
    let mut info = ChunkInfo::default();
    if let Some(choice) = wire.choices.0 {
        info.answer = choice.text.0;
        for d in [choice.delta, choice.message].into_iter().flatten() {
            info.answer |= d.content.0;
            info.reasoning |= d.reasoning.0 || d.reasoning_content.0;
            info.tool_call |= d.tool_calls.0;
        }
        info.finish_reason = choice.finish_reason.is_some();
    }
    for out in [&wire.output, &wire.content] {
        info.answer |= out.answer;
        info.reasoning |= out.reasoning;
        info.tool_call |= out.tool_call;
    }
    info.finish_reason |= wire.stop_reason.is_some();
    wire.usage.merge_into(&mut info);
    let d = &wire.delta;
    match wire.kind {
        Tag::AnswerDelta => info.answer |= d.text,
        Tag::ReasoningDelta => info.reasoning |= d.text,
        Tag::ToolDelta => info.tool_call |= d.text,
        Tag::BlockDelta => match d.kind {
            Tag::AnswerDelta => info.answer |= d.text,
            Tag::ReasoningDelta => info.reasoning |= d.thinking,
            Tag::ToolDelta => info.tool_call |= d.partial_json,
            _ => {}
        },
        Tag::BlockStart => {
            let b = &wire.content_block;
            match b.kind {
                Tag::TextItem => info.answer |= b.text,
                Tag::ReasoningItem => info.reasoning |= b.thinking,
                Tag::ToolItem => info.tool_call |= b.name,
                _ => {}
            }
        }
        Tag::MessageStart => {
            // Once per stream: the prompt's usage is inside the message object.
            if let Some(usage) = wire.message.as_ref().and_then(|m| m.get("usage")) {
                match Usage::deserialize(usage) {
                    Ok(u) => u.merge_into(&mut info),
                    Err(_) => info.usage_ignored = true,
                }
            }
        }
        Tag::MessageDelta => info.finish_reason |= d.stop_reason,
        Tag::Finished | Tag::MessageStop => info.finish_reason = true,
        Tag::Failed => {
            let err = wire.response.as_ref().and_then(|r| r.error.as_ref());
            info.error = Some(err.map_or_else(|| "response failed".to_owned(), error_text));
        }
        Tag::Error => {
            let err = wire.message.as_ref().or(wire.error.as_ref());
            info.error = Some(err.map_or_else(|| "error event".to_owned(), error_text));
        }
        _ => {}
    }
    if let Some(r) = wire.response {
        r.usage.merge_into(&mut info);
    }
    if info.error.is_none() {
        info.error = wire.error.as_ref().map(error_text);
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

    fn chunk(data: &[u8]) -> ChunkInfo {
        match decode_event(data) {
            Ok(EventKind::Chunk(i)) => i,
            other => panic!("{other:?} for {}", String::from_utf8_lossy(data)),
        }
    }

    #[test]
    fn decode_completion_chat_usage_and_done() {
        let i = chunk(br#"{"choices":[{"index":0,"text":" hi","finish_reason":null}]}"#);
        assert!(i.answer && !i.reasoning && !i.tool_call && !i.finish_reason);
        let i = chunk(
            br#"{"choices":[{"delta":{"content":"x"},"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":7}}"#,
        );
        assert!(i.answer && i.finish_reason);
        assert_eq!(i.completion_tokens, Some(7));
        assert_eq!(i.prompt_tokens, Some(5));
        assert_eq!((i.reasoning_tokens, i.cached_tokens), (None, None));
        assert!(!i.usage_ignored);
        let i = chunk(br#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#);
        assert!(!i.has_output());
        assert!(matches!(decode_event(b" [DONE] "), Ok(EventKind::Done)));
        assert!(decode_event(b"{not json").is_err());
    }

    #[test]
    fn vllm_reasoning_parser_chunks() {
        // vLLM >= 0.16 with --reasoning-parser: the role chunk, then `delta.reasoning`.
        let role = chunk(
            br#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"tiny","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#,
        );
        assert!(!role.has_output());
        let r = chunk(
            br#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"tiny","choices":[{"index":0,"delta":{"reasoning":"hmm"},"logprobs":null,"finish_reason":null}]}"#,
        );
        assert!(r.reasoning && !r.answer && !r.tool_call && r.has_output());
        // Older servers (and DeepSeek's API) say reasoning_content.
        let r = chunk(br#"{"choices":[{"delta":{"reasoning_content":"hm\u00e9"}}]}"#);
        assert!(r.reasoning && !r.answer);
        // The turn from reasoning to answer may come in one delta: both kinds.
        let both = chunk(br#"{"choices":[{"delta":{"reasoning":"done","content":"A"}}]}"#);
        assert!(both.reasoning && both.answer);
        // Empty or null reasoning is no token.
        let none = chunk(br#"{"choices":[{"delta":{"reasoning":"","content":null}}]}"#);
        assert!(!none.has_output());
        let end = chunk(
            br#"{"choices":[{"index":0,"delta":{"reasoning":"x"},"logprobs":null,"finish_reason":"length","stop_reason":null}]}"#,
        );
        assert!(end.reasoning && end.finish_reason);
    }

    #[test]
    fn tool_call_fragments_count_with_only_arguments() {
        let first = chunk(
            br#"{"choices":[{"index":0,"delta":{"tool_calls":[{"id":"call_1","type":"function","index":0,"function":{"name":"get_weather"}}]},"finish_reason":null}]}"#,
        );
        assert!(first.tool_call && !first.answer && !first.reasoning);
        let frag = chunk(
            br#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\": "}}]},"finish_reason":null}]}"#,
        );
        assert!(frag.tool_call);
        let empty = chunk(
            br#"{"choices":[{"delta":{"content":null,"tool_calls":[{"index":0,"function":{"arguments":""}}]}}]}"#,
        );
        assert!(!empty.has_output());
        let whole = chunk(
            br#"{"choices":[{"message":{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]},"finish_reason":"tool_calls"}]}"#,
        );
        assert!(whole.tool_call && !whole.answer && whole.finish_reason);
    }

    #[test]
    fn non_streamed_messages_classify_each_part() {
        let m = chunk(
            br#"{"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","reasoning":"think","content":"answer"},"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":9,"completion_tokens_details":{"reasoning_tokens":6},"prompt_tokens_details":null}}"#,
        );
        assert!(m.reasoning && m.answer && !m.tool_call);
        assert_eq!(m.reasoning_tokens, Some(6));
        assert_eq!(m.cached_tokens, None);
        assert!(!m.usage_ignored, "null details are absent, not bad");
        let r = chunk(br#"{"choices":[{"message":{"reasoning_content":"t","content":""}}]}"#);
        assert!(r.reasoning && !r.answer);
        // Content given as a list of parts.
        let parts =
            chunk(br#"{"choices":[{"message":{"content":[{"type":"text","text":"hi"}]}}]}"#);
        assert!(parts.answer);
    }

    #[test]
    fn usage_details_are_read() {
        let u = chunk(
            br#"{"id":"x","choices":[],"usage":{"prompt_tokens":40,"total_tokens":56,"completion_tokens":16,"prompt_tokens_details":{"cached_tokens":16},"completion_tokens_details":{"reasoning_tokens":12,"accepted_prediction_tokens":0}}}"#,
        );
        assert!(!u.has_output());
        assert_eq!(u.prompt_tokens, Some(40));
        assert_eq!(u.completion_tokens, Some(16));
        assert_eq!(u.cached_tokens, Some(16));
        assert_eq!(u.reasoning_tokens, Some(12));
        assert!(!u.usage_ignored);
        // A count written as a float with no fraction is still a count.
        let f = chunk(br#"{"usage":{"completion_tokens":16.0}}"#);
        assert_eq!(f.completion_tokens, Some(16));
    }

    #[test]
    fn bad_usage_types_are_ignored_and_flagged() {
        let cases: [&[u8]; 7] = [
            br#"{"choices":[{"delta":{"content":"a"}}],"usage":{"completion_tokens":"16","prompt_tokens":4}}"#,
            br#"{"choices":[{"delta":{"content":"a"}}],"usage":{"completion_tokens":1.5,"prompt_tokens":4}}"#,
            br#"{"choices":[{"delta":{"content":"a"}}],"usage":{"completion_tokens":-3,"prompt_tokens":4}}"#,
            br#"{"choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":4,"prompt_tokens_details":"n/a"}}"#,
            br#"{"choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":4,"completion_tokens_details":{"reasoning_tokens":[1]}}}"#,
            br#"{"choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":4,"completion_tokens":{"n":1}}}"#,
            br#"{"choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":4,"completion_tokens":true}}"#,
        ];
        for c in cases {
            let i = chunk(c);
            assert!(i.answer, "{}", String::from_utf8_lossy(c));
            assert!(i.usage_ignored, "{}", String::from_utf8_lossy(c));
            assert_eq!(i.prompt_tokens, Some(4), "{}", String::from_utf8_lossy(c));
            assert_eq!(i.completion_tokens, None);
            assert_eq!(i.reasoning_tokens, None);
        }
        // A usage that is not an object at all.
        let i = chunk(br#"{"choices":[{"delta":{"content":"a"}}],"usage":"soon"}"#);
        assert!(i.answer && i.usage_ignored && i.prompt_tokens.is_none());
        let i = chunk(br#"{"choices":[{"delta":{"content":"a"}}],"usage":null}"#);
        assert!(!i.usage_ignored);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let i = chunk(
            br#"{"id":"x","novel":{"deep":[1,{"a":null}]},"choices":[{"index":0,"delta":{"content":"a","audio":{"id":"q"},"annotations":[],"refusal":null,"x_future":7},"matched_stop":null,"finish_reason":null}],"system_fingerprint":"fp"}"#,
        );
        assert!(i.answer && !i.reasoning && !i.tool_call && i.error.is_none());
        // Only the first choice is read; the rest are skipped.
        let i = chunk(
            br#"{"choices":[{"index":0,"delta":{"reasoning":"r"}},{"index":1,"delta":{"content":"c"}}]}"#,
        );
        assert!(i.reasoning && !i.answer);
    }

    #[test]
    fn error_objects_carry_their_message() {
        assert_eq!(
            chunk(br#"{"error":{"message":"overloaded","type":"server_error"}}"#)
                .error
                .as_deref(),
            Some("overloaded")
        );
        assert_eq!(
            chunk(br#"{"error":"plain text"}"#).error.as_deref(),
            Some("plain text")
        );
        let coded = chunk(br#"{"error":{"code":503}}"#);
        assert_eq!(coded.error.as_deref(), Some(r#"{"code":503}"#));
        assert_eq!(chunk(br#"{"error":null,"choices":[]}"#).error, None);
    }

    #[test]
    fn responses_api_events() {
        let created = chunk(
            br#"{"type":"response.created","sequence_number":0,"response":{"id":"resp_1","object":"response","status":"in_progress","output":[],"usage":null,"error":null}}"#,
        );
        assert!(!created.has_output() && !created.finish_reason && created.error.is_none());
        let text = chunk(
            br#"{"type":"response.output_text.delta","item_id":"msg_1","output_index":1,"content_index":0,"delta":"Hi","logprobs":[],"sequence_number":4}"#,
        );
        assert!(text.answer && !text.reasoning);
        let reason = chunk(
            br#"{"delta":"hm","type":"response.reasoning_text.delta","item_id":"rs_1","output_index":0,"content_index":0,"sequence_number":3}"#,
        );
        assert!(
            reason.reasoning && !reason.answer,
            "type after delta still counts"
        );
        let summary = chunk(
            br#"{"type":"response.reasoning_summary_text.delta","delta":"s","summary_index":0}"#,
        );
        assert!(summary.reasoning);
        let args = chunk(
            br#"{"type":"response.function_call_arguments.delta","item_id":"fc_1","output_index":0,"delta":"{\"a\""}"#,
        );
        assert!(args.tool_call && !args.answer);
        let empty = chunk(br#"{"type":"response.output_text.delta","delta":""}"#);
        assert!(!empty.has_output());
        // Events that are no token: part and item bookkeeping, the done events.
        for ev in [
            &br#"{"type":"response.output_text.done","text":"Hi there"}"#[..],
            br#"{"type":"response.content_part.added","part":{"type":"output_text","text":""}}"#,
            br#"{"type":"response.output_item.done","item":{"type":"message","content":[{"type":"output_text","text":"Hi"}]}}"#,
        ] {
            assert!(!chunk(ev).has_output(), "{}", String::from_utf8_lossy(ev));
        }
        let done = chunk(
            br#"{"type":"response.completed","sequence_number":9,"response":{"id":"resp_1","status":"completed","output":[{"type":"message","content":[{"type":"output_text","text":"Hi there"}]}],"usage":{"input_tokens":11,"input_tokens_details":{"cached_tokens":8},"output_tokens":20,"output_tokens_details":{"reasoning_tokens":15},"total_tokens":31}}}"#,
        );
        assert!(
            done.finish_reason && !done.has_output(),
            "the final output is not a new token"
        );
        assert_eq!(done.prompt_tokens, Some(11));
        assert_eq!(done.completion_tokens, Some(20));
        assert_eq!(done.reasoning_tokens, Some(15));
        assert_eq!(done.cached_tokens, Some(8));
        let incomplete = chunk(
            br#"{"type":"response.incomplete","response":{"status":"incomplete","incomplete_details":{"reason":"max_output_tokens"},"usage":{"input_tokens":1,"output_tokens":4}}}"#,
        );
        assert!(incomplete.finish_reason && incomplete.completion_tokens == Some(4));
        let failed = chunk(
            br#"{"type":"response.failed","response":{"status":"failed","error":{"code":"server_error","message":"GPU fell off"}}}"#,
        );
        assert_eq!(failed.error.as_deref(), Some("GPU fell off"));
        let failed_bare = chunk(br#"{"type":"response.failed","response":{"status":"failed"}}"#);
        assert_eq!(failed_bare.error.as_deref(), Some("response failed"));
        let err = chunk(
            br#"{"type":"error","code":"rate_limit_exceeded","message":"slow down","param":null,"sequence_number":2}"#,
        );
        assert_eq!(err.error.as_deref(), Some("slow down"));
    }

    #[test]
    fn responses_api_whole_body() {
        let body = chunk(
            br#"{"id":"resp_1","object":"response","status":"completed","output":[{"type":"reasoning","id":"rs","summary":[],"content":[{"type":"reasoning_text","text":"think"}]},{"type":"message","role":"assistant","content":[{"type":"output_text","text":"ok","annotations":[]}]}],"usage":{"input_tokens":5,"output_tokens":7,"output_tokens_details":{"reasoning_tokens":3},"input_tokens_details":{"cached_tokens":0}}}"#,
        );
        assert!(body.reasoning && body.answer && !body.tool_call);
        assert_eq!(body.prompt_tokens, Some(5));
        assert_eq!(body.reasoning_tokens, Some(3));
        assert_eq!(body.cached_tokens, Some(0));
        let call = chunk(
            br#"{"object":"response","output":[{"type":"function_call","call_id":"c","name":"f","arguments":"{}"}]}"#,
        );
        assert!(call.tool_call && !call.answer);
    }

    #[test]
    fn anthropic_messages_events() {
        let start = chunk(
            br#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"m","stop_reason":null,"usage":{"input_tokens":7,"cache_read_input_tokens":40,"cache_creation_input_tokens":3,"output_tokens":1}}}"#,
        );
        assert!(!start.has_output() && !start.finish_reason);
        assert_eq!(
            start.prompt_tokens,
            Some(50),
            "input + cache reads + cache writes"
        );
        assert_eq!(start.cached_tokens, Some(40));
        let text_block = chunk(
            br#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        );
        assert!(!text_block.has_output());
        let tool_block = chunk(
            br#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"f","input":{}}}"#,
        );
        assert!(tool_block.tool_call && !tool_block.answer);
        let text = chunk(
            br#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
        );
        assert!(text.answer && !text.reasoning);
        let thinking = chunk(
            br#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"hm"}}"#,
        );
        assert!(thinking.reasoning && !thinking.answer);
        let sig = chunk(
            br#"{"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"abc"}}"#,
        );
        assert!(!sig.has_output());
        let json = chunk(
            br#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"a\""}}"#,
        );
        assert!(json.tool_call);
        let delta = chunk(
            br#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#,
        );
        assert!(delta.finish_reason && delta.completion_tokens == Some(15));
        assert!(chunk(br#"{"type":"message_stop"}"#).finish_reason);
        assert!(!chunk(br#"{"type":"ping"}"#).has_output());
        let err = chunk(
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        );
        assert_eq!(err.error.as_deref(), Some("Overloaded"));
        let whole = chunk(
            br#"{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"thinking","thinking":"t","signature":""},{"type":"text","text":"ok"}],"stop_reason":"max_tokens","usage":{"input_tokens":3,"output_tokens":2}}"#,
        );
        assert!(whole.reasoning && whole.answer && whole.finish_reason);
        assert_eq!(
            (whole.prompt_tokens, whole.completion_tokens),
            (Some(3), Some(2))
        );
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
