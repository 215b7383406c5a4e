//! Live conversation history: a later turn's body carries the replies its earlier turns
//! actually received.
//!
//! Python renders every turn's body with only its own new message, and says where its
//! parts are (`TurnText`). When a turn ends, its *carry* is built: its messages so far and
//! the reply as the assistant's message (or, with the Responses API's server-side history,
//! only `previous_response_id`). When a follower is released, the carry is spliced into its
//! body; a reply that was a tool call turns the follower's own message into the tool
//! result. The splice is byte work on JSON text already rendered: no body is parsed.

use bytes::Bytes;
use serde_json::Value;

use crate::reply::Reply;

/// Which API's messages a run's bodies carry (`Off`: no live history).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HistoryApi {
    #[default]
    Off,
    /// `/v1/completions`: the prompt text continues with the reply's text.
    Completions,
    /// `/v1/chat/completions` messages.
    Chat,
    /// `/v1/responses` with the conversation in `input` (client-side history).
    Responses,
    /// `/v1/responses` with `previous_response_id` (server-side history).
    ResponsesServer,
    /// `/v1/messages` (Anthropic).
    Anthropic,
}

impl HistoryApi {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "off" => HistoryApi::Off,
            "completions" => HistoryApi::Completions,
            "chat" => HistoryApi::Chat,
            "responses" => HistoryApi::Responses,
            "responses-server" => HistoryApi::ResponsesServer,
            "anthropic" => HistoryApi::Anthropic,
            _ => return None,
        })
    }
}

/// Byte offsets into one turn's body (as rendered, before any splice).
///
/// - `splice_at`: where the previous turn's carry goes (the start of the own message;
///   right after the body's `{` for server-side history; inside the prompt string's
///   opening quote for completions);
/// - `items_at`: where the conversation's messages start (the text inside the prompt
///   string for completions);
/// - `item_at..item_end`: the turn's own message (for completions: the prompt text);
/// - `text_at..text_end`: the own text as a JSON string literal (quotes included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TurnText {
    pub splice_at: u32,
    pub items_at: u32,
    pub item_at: u32,
    pub item_end: u32,
    pub text_at: u32,
    pub text_end: u32,
}

impl TurnText {
    pub fn from_row(r: [u32; 6]) -> Self {
        TurnText {
            splice_at: r[0],
            items_at: r[1],
            item_at: r[2],
            item_end: r[3],
            text_at: r[4],
            text_end: r[5],
        }
    }

    /// The offsets are ordered and inside a body of `len` bytes.
    pub fn check(&self, len: usize) -> Result<(), String> {
        let t = self;
        // (For completions the text literal encloses the item: only its bounds matter.)
        let ordered = t.items_at <= t.item_at
            && t.splice_at <= t.item_at
            && t.item_at <= t.item_end
            && t.text_at < t.text_end
            && t.item_end as usize <= len
            && t.text_end as usize <= len;
        if ordered {
            Ok(())
        } else {
            Err(format!(
                "turn text offsets {t:?} do not fit a body of {len} bytes"
            ))
        }
    }
}

/// What the follower of a turn was sent with (the record's `history_kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum HistoryKind {
    /// Not a follower with live history.
    #[default]
    None = 0,
    /// The previous reply's text, then the turn's own message.
    Text = 1,
    /// The previous reply was a tool call: the own message became its result.
    Tool = 2,
    /// The previous reply had no answer text (only reasoning): an empty assistant message.
    NoText = 3,
    /// A tool call without arguments: sent as `{}`.
    ToolNoArguments = 4,
    /// The previous reply's text was longer than the cap: its start was kept.
    Truncated = 5,
}

/// A finished turn's history, for the turns that follow it.
#[derive(Debug, Clone, Default)]
pub struct Carry {
    /// Inserted at the follower's `splice_at`.
    pub bytes: Bytes,
    /// The reply's tool calls' ids (empty: it was not a tool call).
    pub tool_ids: Vec<String>,
    pub kind: HistoryKind,
}

fn json_str(s: &str) -> String {
    // serde_json writes any &str: this cannot fail.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// `arguments` as JSON text: a tool call without any is sent as `{}`.
fn arguments_of(args: &str) -> &str {
    if args.trim().is_empty() {
        "{}"
    } else {
        args
    }
}

/// The reply as the assistant's message(s), in the API's shape; the tool call ids used.
fn assistant_items(api: HistoryApi, reply: &Reply, ids: &[String]) -> String {
    let text = json_str(&reply.text);
    if reply.tool_calls.is_empty() {
        return format!("{{\"role\":\"assistant\",\"content\":{text}}}");
    }
    let calls = reply.tool_calls.iter().zip(ids);
    match api {
        HistoryApi::Responses | HistoryApi::ResponsesServer => {
            let mut items: Vec<String> = Vec::new();
            if !reply.text.is_empty() {
                items.push(format!("{{\"role\":\"assistant\",\"content\":{text}}}"));
            }
            items.extend(calls.map(|(c, id)| {
                format!(
                    "{{\"type\":\"function_call\",\"call_id\":{},\"name\":{},\"arguments\":{}}}",
                    json_str(id),
                    json_str(&c.name),
                    json_str(arguments_of(&c.arguments))
                )
            }));
            items.join(",")
        }
        HistoryApi::Anthropic => {
            let mut blocks: Vec<String> = Vec::new();
            if !reply.text.is_empty() {
                blocks.push(format!("{{\"type\":\"text\",\"text\":{text}}}"));
            }
            blocks.extend(calls.map(|(c, id)| {
                // `input` must be an object; arguments that are not one are sent as `{}`.
                let input = match serde_json::from_str::<Value>(&c.arguments) {
                    Ok(v @ Value::Object(_)) => v.to_string(),
                    _ => "{}".to_owned(),
                };
                format!(
                    "{{\"type\":\"tool_use\",\"id\":{},\"name\":{},\"input\":{input}}}",
                    json_str(id),
                    json_str(&c.name)
                )
            }));
            format!(
                "{{\"role\":\"assistant\",\"content\":[{}]}}",
                blocks.join(",")
            )
        }
        _ => {
            let content = if reply.text.is_empty() {
                "null".to_owned()
            } else {
                text
            };
            let calls: Vec<String> = calls
                .map(|(c, id)| {
                    format!(
                        "{{\"id\":{},\"type\":\"function\",\"function\":{{\"name\":{},\"arguments\":{}}}}}",
                        json_str(id),
                        json_str(&c.name),
                        json_str(arguments_of(&c.arguments))
                    )
                })
                .collect();
            format!(
                "{{\"role\":\"assistant\",\"content\":{content},\"tool_calls\":[{}]}}",
                calls.join(",")
            )
        }
    }
}

/// The follower's own message as the result of the tool calls: the first call gets the
/// turn's text, any others an empty result.
fn tool_result_items(api: HistoryApi, ids: &[String], literal: &str) -> String {
    // Each API's result item up to its call id, and the key its result text goes under.
    let (head, text_key) = match api {
        HistoryApi::Responses | HistoryApi::ResponsesServer => {
            ("{\"type\":\"function_call_output\",\"call_id\":", "output")
        }
        HistoryApi::Anthropic => ("{\"type\":\"tool_result\",\"tool_use_id\":", "content"),
        _ => ("{\"role\":\"tool\",\"tool_call_id\":", "content"),
    };
    let items: Vec<String> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let result = if i == 0 { literal } else { "\"\"" };
            format!("{head}{},\"{text_key}\":{result}}}", json_str(id))
        })
        .collect();
    if api == HistoryApi::Anthropic {
        // Anthropic's results are content blocks of one user message.
        format!("{{\"role\":\"user\",\"content\":[{}]}}", items.join(","))
    } else {
        items.join(",")
    }
}

/// The carry of a finished turn whose (final) body is `body` with offsets `t`.
/// Server-side history without a response id gives `Err`.
pub fn carry_of(
    api: HistoryApi,
    body: &[u8],
    t: &TurnText,
    reply: &Reply,
) -> Result<Carry, &'static str> {
    let ids: Vec<String> = reply
        .tool_calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if c.id.is_empty() {
                format!("call_fineserve_{i}")
            } else {
                c.id.clone()
            }
        })
        .collect();
    let kind = if !ids.is_empty() {
        if reply
            .tool_calls
            .iter()
            .any(|c| c.arguments.trim().is_empty())
        {
            HistoryKind::ToolNoArguments
        } else {
            HistoryKind::Tool
        }
    } else if reply.truncated {
        HistoryKind::Truncated
    } else if reply.text.is_empty() {
        HistoryKind::NoText
    } else {
        HistoryKind::Text
    };
    let so_far = body
        .get(t.items_at as usize..t.item_end as usize)
        .unwrap_or_default();
    let bytes: Vec<u8> = match api {
        HistoryApi::Off => Vec::new(),
        HistoryApi::ResponsesServer => {
            let id = reply
                .response_id
                .as_deref()
                .ok_or("its previous turn's reply carried no response id")?;
            format!("\"previous_response_id\":{},", json_str(id)).into_bytes()
        }
        HistoryApi::Completions => {
            let text = json_str(&reply.text);
            // The reply's text inside the prompt string: its literal without the quotes.
            [so_far, &text.as_bytes()[1..text.len() - 1]].concat()
        }
        _ => {
            let items = assistant_items(api, reply, &ids);
            [so_far, b",", items.as_bytes(), b","].concat()
        }
    };
    let tool_ids = if api == HistoryApi::Completions {
        Vec::new()
    } else {
        ids
    };
    Ok(Carry {
        bytes: Bytes::from(bytes),
        tool_ids,
        kind,
    })
}

/// A follower's body with its previous turn's carry spliced in, and its offsets in it.
pub fn follower_body(
    api: HistoryApi,
    body: &[u8],
    t: &TurnText,
    carry: &Carry,
) -> (Bytes, TurnText) {
    let (splice, item_at, item_end) = (
        t.splice_at as usize,
        t.item_at as usize,
        t.item_end as usize,
    );
    let own_item: std::borrow::Cow<'_, [u8]> = if carry.tool_ids.is_empty() {
        body[item_at..item_end].into()
    } else {
        let literal = String::from_utf8_lossy(&body[t.text_at as usize..t.text_end as usize]);
        tool_result_items(api, &carry.tool_ids, &literal)
            .into_bytes()
            .into()
    };
    let added = carry.bytes.len();
    let mut out = Vec::with_capacity(body.len() + added + own_item.len());
    out.extend_from_slice(&body[..splice]);
    out.extend_from_slice(&carry.bytes);
    out.extend_from_slice(&body[splice..item_at]);
    out.extend_from_slice(&own_item);
    out.extend_from_slice(&body[item_end..]);
    let shift = |p: u32| (p as usize + added) as u32;
    let new_item_at = shift(t.item_at);
    let new_item_end = new_item_at + own_item.len() as u32;
    // The own text's literal moved with the item (a tool result keeps no offsets to it:
    // it is not needed again, as only the history so far is carried on).
    let text_delta = new_item_at as i64 - t.item_at as i64;
    let moved = |p: u32| (p as i64 + text_delta) as u32;
    let same_item = carry.tool_ids.is_empty();
    let new = TurnText {
        splice_at: t.splice_at,
        items_at: if t.items_at <= t.splice_at && api != HistoryApi::ResponsesServer {
            t.items_at
        } else {
            shift(t.items_at)
        },
        item_at: new_item_at,
        item_end: new_item_end,
        text_at: if same_item {
            moved(t.text_at)
        } else {
            new_item_at
        },
        text_end: if same_item {
            moved(t.text_end)
        } else {
            new_item_end
        },
    };
    (Bytes::from(out), new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::Reply;

    /// A chat body with one own message, and its offsets (as Python renders them).
    fn chat_body(text: &str) -> (Vec<u8>, TurnText) {
        let lit = json_str(text);
        let head = "{\"model\":\"m\",\"messages\":[";
        let item = format!("{{\"role\":\"user\",\"content\":{lit}}}");
        let body = format!("{head}{item}],\"max_tokens\":4}}");
        let at = head.len() as u32;
        let text_at = at + "{\"role\":\"user\",\"content\":".len() as u32;
        let t = TurnText {
            splice_at: at,
            items_at: at,
            item_at: at,
            item_end: at + item.len() as u32,
            text_at,
            text_end: text_at + lit.len() as u32,
        };
        (body.into_bytes(), t)
    }

    fn reply_text(s: &str) -> Reply {
        let mut r = Reply::with_limit(1 << 20);
        r.capture(
            format!(
                "{{\"choices\":[{{\"delta\":{{\"content\":{}}}}}]}}",
                json_str(s)
            )
            .as_bytes(),
        );
        r
    }

    fn messages(body: &[u8]) -> Vec<Value> {
        let v: Value = serde_json::from_slice(body).expect("valid JSON");
        v["messages"].as_array().expect("messages").clone()
    }

    #[test]
    fn three_chat_turns_carry_every_reply() {
        let (b1, t1) = chat_body("first \"q\"");
        t1.check(b1.len()).expect("offsets");
        let c1 = carry_of(HistoryApi::Chat, &b1, &t1, &reply_text("one")).expect("carry");
        assert_eq!(c1.kind, HistoryKind::Text);
        let (b2, t2) = chat_body("second");
        let (f2, t2f) = follower_body(HistoryApi::Chat, &b2, &t2, &c1);
        t2f.check(f2.len()).expect("offsets after the splice");
        let m = messages(&f2);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0]["content"], "first \"q\"");
        assert_eq!(
            (m[1]["role"].as_str(), m[1]["content"].as_str()),
            (Some("assistant"), Some("one"))
        );
        assert_eq!(m[2]["content"], "second");
        let c2 = carry_of(HistoryApi::Chat, &f2, &t2f, &reply_text("two\n")).expect("carry");
        let (b3, t3) = chat_body("third");
        let (f3, _) = follower_body(HistoryApi::Chat, &b3, &t3, &c2);
        let m = messages(&f3);
        let said: Vec<&str> = m
            .iter()
            .map(|x| x["content"].as_str().unwrap_or("?"))
            .collect();
        assert_eq!(said, ["first \"q\"", "one", "second", "two\n", "third"]);
    }

    #[test]
    fn a_tool_call_makes_the_next_turn_its_result() {
        let (b1, t1) = chat_body("use the tool");
        let mut r = Reply::with_limit(1 << 20);
        r.capture(br#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"call_5","function":{"name":"lookup","arguments":"{\"k\":1}"}}]}}]}"#);
        let c = carry_of(HistoryApi::Chat, &b1, &t1, &r).expect("carry");
        assert_eq!(
            (c.kind, c.tool_ids.clone()),
            (HistoryKind::Tool, vec!["call_5".to_owned()])
        );
        let (b2, t2) = chat_body("tool output");
        let (f2, t2f) = follower_body(HistoryApi::Chat, &b2, &t2, &c);
        t2f.check(f2.len()).expect("offsets");
        let m = messages(&f2);
        assert_eq!(m[1]["tool_calls"][0]["function"]["arguments"], "{\"k\":1}");
        assert_eq!(m[1]["content"], Value::Null);
        assert_eq!(m[2]["role"], "tool");
        assert_eq!(m[2]["tool_call_id"], "call_5");
        assert_eq!(m[2]["content"], "tool output");
        // Anthropic: the tool_use block and a user message of tool_result blocks.
        let c = carry_of(HistoryApi::Anthropic, &b1, &t1, &r).expect("carry");
        let (f2, _) = follower_body(HistoryApi::Anthropic, &b2, &t2, &c);
        let m = messages(&f2);
        assert_eq!(m[1]["content"][0]["type"], "tool_use");
        assert_eq!(m[1]["content"][0]["input"]["k"], 1);
        assert_eq!(m[2]["content"][0]["tool_use_id"], "call_5");
        // Without arguments: `{}` and said so.
        let mut bare = Reply::with_limit(1 << 20);
        bare.capture(
            br#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"f"}}]}}]}"#,
        );
        let c = carry_of(HistoryApi::Chat, &b1, &t1, &bare).expect("carry");
        assert_eq!(c.kind, HistoryKind::ToolNoArguments);
        let (f2, _) = follower_body(HistoryApi::Chat, &b2, &t2, &c);
        let m = messages(&f2);
        assert_eq!(m[1]["tool_calls"][0]["function"]["arguments"], "{}");
        assert_eq!(m[1]["tool_calls"][0]["id"], "call_fineserve_0");
        assert_eq!(m[2]["tool_call_id"], "call_fineserve_0");
    }

    #[test]
    fn server_side_history_sends_only_the_response_id() {
        let lit = json_str("next");
        let head = "{\"model\":\"m\",\"input\":[";
        let item = format!("{{\"role\":\"user\",\"content\":{lit}}}");
        let body = format!("{head}{item}]}}").into_bytes();
        let at = head.len() as u32;
        let text_at = at + 25;
        let t = TurnText {
            splice_at: 1,
            items_at: at,
            item_at: at,
            item_end: at + item.len() as u32,
            text_at,
            text_end: text_at + lit.len() as u32,
        };
        t.check(body.len()).expect("offsets");
        assert!(carry_of(HistoryApi::ResponsesServer, &body, &t, &reply_text("x")).is_err());
        let mut r = Reply::with_limit(100);
        r.capture(br#"{"type":"response.created","response":{"id":"resp_42"}}"#);
        let c = carry_of(HistoryApi::ResponsesServer, &body, &t, &r).expect("carry");
        let (f, tf) = follower_body(HistoryApi::ResponsesServer, &body, &t, &c);
        tf.check(f.len()).expect("offsets");
        let v: Value = serde_json::from_slice(&f).expect("JSON");
        assert_eq!(v["previous_response_id"], "resp_42");
        assert_eq!(v["input"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn completions_continue_the_prompt_text() {
        let body = br#"{"model":"m","prompt":"Hi","max_tokens":2}"#.to_vec();
        let at = body
            .windows(4)
            .position(|w| w == b"\"Hi\"")
            .expect("literal") as u32;
        let t = TurnText {
            splice_at: at + 1,
            items_at: at + 1,
            item_at: at + 1,
            item_end: at + 3,
            text_at: at,
            text_end: at + 4,
        };
        let c =
            carry_of(HistoryApi::Completions, &body, &t, &reply_text(" there\"")).expect("carry");
        let next = br#"{"model":"m","prompt":"!","max_tokens":2}"#.to_vec();
        let t2 = TurnText {
            splice_at: at + 1,
            items_at: at + 1,
            item_at: at + 1,
            item_end: at + 2,
            text_at: at,
            text_end: at + 3,
        };
        let (f, _) = follower_body(HistoryApi::Completions, &next, &t2, &c);
        let v: Value = serde_json::from_slice(&f).expect("JSON");
        assert_eq!(v["prompt"], "Hi there\"!");
    }
}
