//! What a server actually replied, kept for a conversation's next turn (live history).
//!
//! Only requests that later turns follow are captured, so this path may allocate: each
//! event is parsed into a `serde_json::Value` (the flag decoder in `sse` stays
//! allocation-free for every other request).

use serde_json::Value;

/// One tool call of a reply: its id, function name and the arguments' JSON text.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
    /// Where the call's fragments are addressed: chat's `tool_calls[].index`, Responses'
    /// `output_index`, Anthropic's content block `index`.
    key: i64,
}

/// A reply's answer text (reasoning is not kept: chat templates drop it from history),
/// its tool calls, and the Responses API's response id.
#[derive(Debug, Default, Clone)]
pub struct Reply {
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    pub response_id: Option<String>,
    /// Text beyond `limit` bytes was dropped (`truncated`).
    pub limit: usize,
    pub truncated: bool,
}

/// A chat or completions event, read only as far as a plain text delta: the fast path of
/// `Reply::capture` (anything else, such as tool calls or content parts, goes to `Value`).
#[derive(serde::Deserialize)]
struct TextEvent<'a> {
    #[serde(borrow)]
    choices: Vec<TextChoice<'a>>,
}

#[derive(serde::Deserialize)]
struct TextChoice<'a> {
    #[serde(borrow, default)]
    text: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    delta: Option<TextDelta<'a>>,
}

#[derive(serde::Deserialize)]
struct TextDelta<'a> {
    #[serde(borrow, default)]
    content: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    tool_calls: Option<serde::de::IgnoredAny>,
}

impl<'a> TextEvent<'a> {
    /// The event's text when it is nothing but text (None: let the general path read it).
    fn text(self) -> Option<std::borrow::Cow<'a, str>> {
        let choice = self.choices.into_iter().next()?;
        match (choice.text, choice.delta) {
            (Some(t), None) => Some(t),
            (None, Some(d)) if d.tool_calls.is_none() => Some(d.content.unwrap_or_default()),
            _ => None,
        }
    }
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// The elements of `v[key]` when it is an array (none otherwise).
fn items_of<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    v.get(key).and_then(Value::as_array).into_iter().flatten()
}

impl Reply {
    pub fn with_limit(limit: usize) -> Self {
        Reply {
            limit,
            ..Reply::default()
        }
    }

    fn push_text(&mut self, s: &str) {
        let room = self.limit.saturating_sub(self.text.len());
        if s.len() <= room {
            self.text.push_str(s);
        } else {
            // Cut on a character boundary at or below the room left.
            let mut cut = room;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            self.text.push_str(&s[..cut]);
            self.truncated = true;
        }
    }

    fn call(&mut self, key: i64) -> &mut ToolCall {
        let at = match self.tool_calls.iter().position(|c| c.key == key) {
            Some(at) => at,
            None => {
                self.tool_calls.push(ToolCall {
                    key,
                    ..ToolCall::default()
                });
                self.tool_calls.len() - 1
            }
        };
        &mut self.tool_calls[at]
    }

    fn set_call(&mut self, key: i64, id: Option<&str>, name: Option<&str>) {
        let c = self.call(key);
        if let Some(id) = id.filter(|s| !s.is_empty()) {
            c.id = id.to_owned();
        }
        if let Some(name) = name.filter(|s| !s.is_empty()) {
            c.name = name.to_owned();
        }
    }

    /// Folds one event's data (or a whole non-streamed body) into the reply; events it
    /// cannot read are skipped (the flag decoder has already judged the stream).
    pub fn capture(&mut self, data: &[u8]) {
        let data = data.trim_ascii();
        // The common event, a chat or completions text delta, without building a Value
        // (a third of the client's CPU per event otherwise: bench_live_history).
        if let Ok(ev) = serde_json::from_slice::<TextEvent<'_>>(data) {
            if let Some(text) = ev.text() {
                self.push_text(&text);
                return;
            }
        }
        let Ok(v) = serde_json::from_slice::<Value>(data) else {
            return;
        };
        if let Some(choice) = v
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
        {
            self.capture_choice(choice);
            return;
        }
        match str_of(&v, "type").unwrap_or("") {
            // The Responses API.
            "response.created"
            | "response.in_progress"
            | "response.completed"
            | "response.incomplete" => {
                if let Some(id) = v.get("response").and_then(|r| str_of(r, "id")) {
                    self.response_id = Some(id.to_owned());
                }
            }
            "response.output_text.delta" | "response.refusal.delta" => {
                if let Some(t) = str_of(&v, "delta") {
                    self.push_text(t);
                }
            }
            "response.output_item.added" | "response.output_item.done" => {
                let key = v.get("output_index").and_then(Value::as_i64).unwrap_or(-1);
                if let Some(item) = v.get("item") {
                    self.capture_output_item(item, key, true);
                }
            }
            "response.function_call_arguments.delta" => {
                let key = v.get("output_index").and_then(Value::as_i64).unwrap_or(-1);
                if let Some(t) = str_of(&v, "delta") {
                    self.call(key).arguments.push_str(t);
                }
            }
            "response" => {}
            // Anthropic's Messages API.
            "content_block_start" => {
                let key = v.get("index").and_then(Value::as_i64).unwrap_or(-1);
                if let Some(b) = v.get("content_block") {
                    self.capture_block(b, key);
                }
            }
            "content_block_delta" => {
                let key = v.get("index").and_then(Value::as_i64).unwrap_or(-1);
                let Some(d) = v.get("delta") else { return };
                match str_of(d, "type").unwrap_or("") {
                    "text_delta" => {
                        if let Some(t) = str_of(d, "text") {
                            self.push_text(t);
                        }
                    }
                    "input_json_delta" => {
                        if let Some(t) = str_of(d, "partial_json") {
                            self.call(key).arguments.push_str(t);
                        }
                    }
                    _ => {}
                }
            }
            "message" => {
                // A whole Anthropic body.
                for (i, b) in items_of(&v, "content").enumerate() {
                    self.capture_block(b, i as i64);
                }
            }
            _ => {
                // A whole Responses body.
                if str_of(&v, "object") == Some("response") {
                    if let Some(id) = str_of(&v, "id") {
                        self.response_id = Some(id.to_owned());
                    }
                    for (i, item) in items_of(&v, "output").enumerate() {
                        self.capture_output_item(item, i as i64, false);
                    }
                }
            }
        }
    }

    fn capture_choice(&mut self, choice: &Value) {
        if let Some(t) = str_of(choice, "text") {
            self.push_text(t); // completions
        }
        for d in [choice.get("delta"), choice.get("message")]
            .into_iter()
            .flatten()
        {
            match d.get("content") {
                Some(Value::String(t)) => self.push_text(t),
                Some(Value::Array(parts)) => {
                    for p in parts {
                        if let Some(t) = str_of(p, "text") {
                            self.push_text(t);
                        }
                    }
                }
                _ => {}
            }
            for (i, call) in items_of(d, "tool_calls").enumerate() {
                let key = call
                    .get("index")
                    .and_then(Value::as_i64)
                    .unwrap_or(i as i64);
                let f = call.get("function");
                self.set_call(key, str_of(call, "id"), f.and_then(|f| str_of(f, "name")));
                if let Some(a) = f.and_then(|f| str_of(f, "arguments")) {
                    self.call(key).arguments.push_str(a);
                }
            }
        }
    }

    /// A Responses output item. A function call's arguments, when the item has them, are
    /// final and replace any fragments; a message's text is read only from a whole body
    /// (`streamed` false): a stream already delivered it in `output_text.delta` events.
    fn capture_output_item(&mut self, item: &Value, key: i64, streamed: bool) {
        match str_of(item, "type").unwrap_or("") {
            "function_call" => {
                self.set_call(key, str_of(item, "call_id"), str_of(item, "name"));
                if let Some(a) = str_of(item, "arguments").filter(|a| !a.is_empty()) {
                    self.call(key).arguments = a.to_owned();
                }
            }
            "message" if !streamed => {
                for part in items_of(item, "content") {
                    if let Some(t) = str_of(part, "text") {
                        self.push_text(t);
                    }
                }
            }
            _ => {}
        }
    }

    /// An Anthropic content block (a stream's `content_block_start`, or a whole body's).
    fn capture_block(&mut self, b: &Value, key: i64) {
        match str_of(b, "type").unwrap_or("") {
            "text" => {
                if let Some(t) = str_of(b, "text") {
                    self.push_text(t);
                }
            }
            "tool_use" => {
                self.set_call(key, str_of(b, "id"), str_of(b, "name"));
                // A whole body's input is complete; a stream's starts as `{}` and comes
                // in `input_json_delta` fragments.
                match b.get("input") {
                    Some(Value::Object(m)) if !m.is_empty() => {
                        self.call(key).arguments = Value::Object(m.clone()).to_string();
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply_of(events: &[&[u8]]) -> Reply {
        let mut r = Reply::with_limit(1 << 20);
        for e in events {
            r.capture(e);
        }
        r
    }

    #[test]
    fn chat_text_and_tool_calls() {
        let r = reply_of(&[
            br#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#,
            br#"{"choices":[{"delta":{"reasoning":"hmm"}}]}"#,
            br#"{"choices":[{"delta":{"content":"Hel"}}]}"#,
            br#"{"choices":[{"delta":{"content":"lo \u00e9"}}]}"#,
            br#"{"choices":[],"usage":{"prompt_tokens":3}}"#,
            b"[DONE]",
        ]);
        assert_eq!(r.text, "Hello \u{e9}");
        assert!(r.tool_calls.is_empty());
        let r = reply_of(&[
            br#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get","arguments":""}}]}}]}"#,
            br#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\":"}}]}}]}"#,
            br#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"1}"}}]}}]}"#,
        ]);
        assert_eq!(r.tool_calls.len(), 1);
        let c = &r.tool_calls[0];
        assert_eq!(
            (&*c.id, &*c.name, &*c.arguments),
            ("call_1", "get", "{\"a\":1}")
        );
        let whole = reply_of(&[
            br#"{"choices":[{"message":{"content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]}}]}"#,
        ]);
        assert_eq!(whole.tool_calls[0].arguments, "{}");
        let completion = reply_of(&[
            br#"{"choices":[{"text":" a"}]}"#,
            br#"{"choices":[{"text":"b"}]}"#,
        ]);
        assert_eq!(completion.text, " ab");
    }

    #[test]
    fn responses_text_calls_and_id() {
        let r = reply_of(&[
            br#"{"type":"response.created","response":{"id":"resp_7","output":[]}}"#,
            br#"{"type":"response.output_text.delta","delta":"Hi"}"#,
            br#"{"type":"response.output_item.added","output_index":1,"item":{"type":"function_call","call_id":"call_9","name":"f","arguments":""}}"#,
            br#"{"type":"response.function_call_arguments.delta","output_index":1,"delta":"{\"x\""}"#,
            br#"{"type":"response.function_call_arguments.delta","output_index":1,"delta":":2}"}"#,
            br#"{"type":"response.output_item.done","output_index":0,"item":{"type":"message","content":[{"type":"output_text","text":"Hi"}]}}"#,
        ]);
        assert_eq!(r.response_id.as_deref(), Some("resp_7"));
        assert_eq!(
            r.text, "Hi",
            "a finished message item does not repeat its text"
        );
        assert_eq!(r.tool_calls[0].id, "call_9");
        assert_eq!(r.tool_calls[0].arguments, "{\"x\":2}");
        let whole = reply_of(&[
            br#"{"id":"resp_1","object":"response","output":[{"type":"message","content":[{"type":"output_text","text":"ok"}]}]}"#,
        ]);
        assert_eq!(
            (whole.text.as_str(), whole.response_id.as_deref()),
            ("ok", Some("resp_1"))
        );
    }

    #[test]
    fn anthropic_text_and_tool_use() {
        let r = reply_of(&[
            br#"{"type":"message_start","message":{"id":"msg_1","usage":{"input_tokens":5}}}"#,
            br#"{"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":""}}"#,
            br#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"hm"}}"#,
            br#"{"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}"#,
            br#"{"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Yes"}}"#,
            br#"{"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_1","name":"f","input":{}}}"#,
            br#"{"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{\"q\":"}}"#,
            br#"{"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"3}"}}"#,
            br#"{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":9}}"#,
        ]);
        assert_eq!(r.text, "Yes");
        assert_eq!(r.tool_calls.len(), 1);
        assert_eq!(r.tool_calls[0].id, "toolu_1");
        assert_eq!(r.tool_calls[0].arguments, "{\"q\":3}");
        let whole = reply_of(&[
            br#"{"type":"message","content":[{"type":"text","text":"a"},{"type":"tool_use","id":"t","name":"g","input":{"k":1}}]}"#,
        ]);
        assert_eq!(whole.text, "a");
        assert_eq!(whole.tool_calls[0].arguments, "{\"k\":1}");
    }

    #[test]
    fn text_is_capped_on_a_character_boundary() {
        let mut r = Reply::with_limit(5);
        r.capture(br#"{"choices":[{"delta":{"content":"abcd\u00e9\u00e9"}}]}"#);
        assert_eq!(r.text, "abcd");
        assert!(r.truncated);
        r.capture(b"not json");
        assert_eq!(r.text, "abcd");
    }
}
