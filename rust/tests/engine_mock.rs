//! The engine against the embedded mock, through the crate's Rust API.

use std::time::Duration;

use bytes::Bytes;
use fineserve_engine::client::ClientConfig;
use fineserve_engine::tls::ClientTlsOptions as TlsOptions;
use fineserve_engine::{start, EngineConfig, ErrorKind, MockConfig, MockServer, Schedule};

fn config(url: String, warm: usize) -> EngineConfig {
    EngineConfig {
        endpoints: vec![url],
        client: ClientConfig {
            stream: true,
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(30),
            max_body_bytes: 1 << 20,
            ..ClientConfig::default()
        },
        max_concurrency: None,
        max_connections: 0,
        lanes: 2,
        warm_connections: warm,
        spin: Duration::from_micros(200),
        start_delay: Duration::from_millis(5),
        start_at_unix_ns: None,
        realtime_priority: false,
        route_groups: Vec::new(),
        turn_affinity: true,
        history_api: fineserve_engine::engine::HistoryApi::Off,
        reply_limit_bytes: 1 << 20,
    }
}

fn schedule(n: usize, gap_ns: i64, max_tokens: u32, chat: bool) -> Schedule {
    let body = if chat {
        format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"a b c"}}],"max_tokens":{max_tokens},"stream":true}}"#
        )
    } else {
        format!(
            r#"{{"model":"m","prompt":"a b c","max_tokens":{max_tokens},"stream":true,"stream_options":{{"include_usage":true}}}}"#
        )
    };
    Schedule {
        t_ns: (0..n as i64).map(|i| i * gap_ns).collect(),
        body_idx: vec![0; n],
        endpoint_idx: vec![0; n],
        expected_output_tokens: vec![max_tokens; n],
        bodies: vec![Bytes::from(body)],
        ..Schedule::default()
    }
}

/// Tests that check timing, and the busiest ones, take turns: on a 2-core machine the
/// others' load would show in the measured TTFT.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn completions_and_chat_streams_are_timed_per_token() {
    let _serial = serial();
    let mock = MockServer::start(
        "127.0.0.1",
        0,
        MockConfig {
            ttft: Duration::from_millis(10),
            itl: Duration::from_millis(2),
            ..MockConfig::default()
        },
    )
    .expect("mock");
    for (path, chat) in [("/v1/completions", false), ("/v1/chat/completions", true)] {
        let url = format!("http://{}{}", mock.addr(), path);
        let run = start(schedule(50, 1_000_000, 6, chat), config(url, 16)).expect("start");
        assert!(run.wait(Duration::from_secs(20)));
        let out = run.finish();
        let c = out.columns;
        assert!(c.error_kind.iter().all(|&k| k == ErrorKind::Ok as u8));
        assert!(c.n_chunks.iter().all(|&n| n == 6));
        let want_usage = if chat { -1 } else { 6 };
        assert!(c.completion_tokens.iter().all(|&t| t == want_usage));
        // The mock emits tokens at arrival + 10 ms + k × 2 ms. Timers and reads only ever
        // run late, so per request only lower bounds are firm (an upper bound on TTFT
        // failed once in CI at 20.4 ms on a loaded machine). That the first token is
        // stamped when it arrives, not with the rest, shows in the median request: its
        // stream goes on for most of the 10 ms after the first token.
        let mut after_first_ms = Vec::new();
        for i in 0..50 {
            assert!(c.sent_ns[i] >= c.scheduled_ns[i]);
            let ttft_ms = (c.first_token_ns[i] - c.sent_ns[i]) as f64 / 1e6;
            assert!(ttft_ms >= 10.0, "{path}: ttft {ttft_ms}");
            let e2e_ms = (c.done_ns[i] - c.sent_ns[i]) as f64 / 1e6;
            assert!(e2e_ms >= 20.0, "{path}: e2e {e2e_ms}");
            after_first_ms.push((c.done_ns[i] - c.first_token_ns[i]) as f64 / 1e6);
        }
        after_first_ms.sort_by(f64::total_cmp);
        let median_ms = after_first_ms[25];
        assert!(
            median_ms >= 5.0,
            "{path}: median stream after the first token {median_ms} ms"
        );
    }
}

#[test]
fn unreachable_endpoint_fails_every_request_with_connect() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let run = start(
        schedule(10, 0, 4, false),
        config(format!("http://{addr}/v1/completions"), 0),
    )
    .expect("start");
    assert!(run.wait(Duration::from_secs(20)));
    let c = run.finish().columns;
    assert!(c.error_kind.iter().all(|&k| k == ErrorKind::Connect as u8));
    assert_eq!(c.error_messages.len(), 10);
}

#[test]
fn invalid_schedules_are_rejected() {
    let mut s = schedule(3, 10, 4, false);
    s.t_ns = vec![0, 20, 10];
    let err = start(s, config("http://127.0.0.1:9/v1/completions".into(), 0))
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("not sorted at index 2"));
    let err = start(schedule(1, 0, 4, false), config("ftp://x/".into(), 0))
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("http://"));
}

#[test]
fn schedule_fed_in_chunks_runs_as_one_and_drains_incrementally() {
    let mock = MockServer::start("127.0.0.1", 0, MockConfig::default()).expect("mock");
    let url = format!("http://{}/v1/completions", mock.addr());
    let run = fineserve_engine::start_streaming(config(url, 4), 0).expect("start");
    let whole = schedule(90, 2_000_000, 2, false);
    let mut drained = Vec::new();
    for part in 0..3 {
        let r = part * 30..(part + 1) * 30;
        run.feed(Schedule {
            t_ns: whole.t_ns[r.clone()].to_vec(),
            body_idx: whole.body_idx[r.clone()].to_vec(),
            endpoint_idx: whole.endpoint_idx[r.clone()].to_vec(),
            expected_output_tokens: whole.expected_output_tokens[r].to_vec(),
            bodies: whole.bodies.clone(),
            ..Schedule::default()
        })
        .expect("feed");
        std::thread::sleep(Duration::from_millis(40));
        drained.extend(run.drain().index);
    }
    // A chunk that goes back in time is refused.
    let back = Schedule {
        t_ns: vec![0],
        ..schedule(1, 0, 2, false)
    };
    assert!(run.feed(back).is_err());
    run.close_input();
    assert!(run.wait(Duration::from_secs(20)));
    let out = run.finish();
    drained.extend(out.columns.index.iter().copied());
    drained.sort_unstable();
    assert_eq!(drained, (0..90).collect::<Vec<u64>>());
    assert!(run_progress_ok(&out.columns));
}

fn run_progress_ok(c: &fineserve_engine::RecordColumns) -> bool {
    c.error_kind.iter().all(|&k| k == ErrorKind::Ok as u8)
        && c.index.windows(2).all(|w| w[0] < w[1])
}

#[test]
fn conversation_turns_leave_after_their_previous_turn_ends() {
    let mock = MockServer::start(
        "127.0.0.1",
        0,
        MockConfig {
            ttft: Duration::from_millis(20),
            itl: Duration::from_millis(5),
            ..MockConfig::default()
        },
    )
    .expect("mock");
    let url = format!("http://{}/v1/completions", mock.addr());
    // 0 → 1 → 3 is one conversation (think 30 ms, then 10 ms); 2 is on its own. Request 3
    // is scheduled early (t = 1 ms) but must wait for turn 1.
    let mut s = schedule(4, 0, 4, false);
    s.t_ns = vec![0, 0, 1_000_000, 1_000_000];
    s.parent = vec![-1, 0, -1, 1];
    s.think_ns = vec![0, 30_000_000, 0, 10_000_000];
    s.followers = vec![1, 1, 0, 0];
    let run = start(s, config(url, 4)).expect("start");
    assert!(run.wait(Duration::from_secs(20)));
    let c = run.finish().columns;
    assert!(c.error_kind.iter().all(|&k| k == ErrorKind::Ok as u8));
    // Released exactly think_ns after the previous turn's end, and sent then.
    assert_eq!(c.scheduled_ns[1], c.done_ns[0] + 30_000_000);
    assert_eq!(c.scheduled_ns[3], c.done_ns[1] + 10_000_000);
    for i in [1, 3] {
        let lag = c.sent_ns[i] - c.scheduled_ns[i];
        assert!((0..5_000_000).contains(&lag), "turn {i} lag {lag}");
    }
    // The independent request kept its own time.
    assert_eq!(c.scheduled_ns[2], 1_000_000);
    assert!(c.sent_ns[2] < c.done_ns[0]);
}

#[test]
fn a_failed_turn_leaves_its_followers_unsent_with_a_reason() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let mut s = schedule(3, 0, 4, false);
    s.parent = vec![-1, 0, 1];
    s.think_ns = vec![0, 0, 0];
    s.followers = vec![1, 1, 0];
    let run = start(s, config(format!("http://{addr}/v1/completions"), 0)).expect("start");
    assert!(run.wait(Duration::from_secs(20)));
    let c = run.finish().columns;
    assert_eq!(c.error_kind[0], ErrorKind::Connect as u8);
    assert_eq!(c.error_kind[1], ErrorKind::NotSent as u8);
    assert_eq!(c.error_kind[2], ErrorKind::NotSent as u8);
    assert!(c.sent_ns[1] < 0 && c.sent_ns[2] < 0);
    let msgs: Vec<&str> = c.error_messages.iter().map(|m| m.1.as_str()).collect();
    assert!(
        msgs.iter().filter(|m| m.contains("previous turn")).count() == 2,
        "{msgs:?}"
    );
    // A turn cannot follow a later request.
    let mut bad = schedule(2, 0, 4, false);
    bad.parent = vec![1, -1];
    bad.think_ns = vec![0, 0];
    bad.followers = vec![0, 1];
    let err = start(bad, config("http://127.0.0.1:9/v1/completions".into(), 0))
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("earlier request"));
}

/// Runs `bodies` (one request each, 3 ms apart) against `url` and returns the records.
fn run_bodies(url: String, bodies: &[&str], stream: bool) -> fineserve_engine::RecordColumns {
    let n = bodies.len();
    let mut cfg = config(url, 0);
    cfg.client.stream = stream;
    let s = Schedule {
        t_ns: (0..n as i64).map(|i| i * 3_000_000).collect(),
        body_idx: (0..n as u32).collect(),
        endpoint_idx: vec![0; n],
        expected_output_tokens: vec![16; n],
        bodies: bodies.iter().map(|b| Bytes::from(b.to_string())).collect(),
        ..Schedule::default()
    };
    let run = start(s, cfg).expect("start");
    assert!(run.wait(Duration::from_secs(20)));
    run.finish().columns
}

#[test]
fn mock_reasoning_streams_are_measured_by_kind() {
    let _serial = serial();
    let mock = MockServer::start(
        "127.0.0.1",
        0,
        MockConfig {
            ttft: Duration::from_millis(5),
            itl: Duration::from_millis(2),
            reasoning_ratio: 0.75,
            ..MockConfig::default()
        },
    )
    .expect("mock");
    let chat = r#"{"model":"m","messages":[{"role":"user","content":"a b c"}],"max_tokens":16,"stream":true,"stream_options":{"include_usage":true}}"#;
    let all_reasoning = r#"{"model":"m","messages":[{"role":"user","content":"a b c"}],"max_tokens":16,"stream":true,"fineserve_reasoning_ratio":1}"#;
    let c = run_bodies(
        format!("http://{}/v1/chat/completions", mock.addr()),
        &[chat, all_reasoning],
        true,
    );
    assert!(run_progress_ok(&c), "{:?}", c.error_messages);
    assert_eq!(c.n_chunks, vec![16, 16]);
    assert_eq!(c.reasoning_chunks, vec![12, 16]);
    assert_eq!(c.reasoning_tokens[0], 12, "usage reports reasoning_tokens");
    assert_eq!(c.completion_tokens[0], 16);
    assert!(c.first_answer_ns[0] >= c.last_reasoning_ns[0] && c.last_reasoning_ns[0] > 0);
    assert!(
        c.first_token_ns[0] < c.first_answer_ns[0],
        "TTFT is the first reasoning token"
    );
    // Only reasoning: a good stream, without an answer token.
    assert_eq!(c.first_answer_ns[1], -1);
    assert!(c.first_token_ns[1] > 0);

    // The Responses API: events, then response.completed with usage (no [DONE]).
    let resp = r#"{"model":"m","input":"a b c","max_output_tokens":8,"stream":true,"fineserve_reasoning_ratio":0.5}"#;
    let c = run_bodies(
        format!("http://{}/v1/responses", mock.addr()),
        &[resp],
        true,
    );
    assert!(run_progress_ok(&c), "{:?}", c.error_messages);
    assert_eq!(
        (c.n_chunks[0], c.reasoning_chunks[0], c.reasoning_tokens[0]),
        (8, 4, 4)
    );
    assert_eq!((c.completion_tokens[0], c.prompt_tokens[0]), (8, 3));
    assert!(c.first_answer_ns[0] >= c.last_reasoning_ns[0]);

    // Whole bodies: chat message with reasoning and content, a Responses object.
    let whole = r#"{"model":"m","messages":[{"role":"user","content":"a b"}],"max_tokens":4}"#;
    let c = run_bodies(
        format!("http://{}/v1/chat/completions", mock.addr()),
        &[whole],
        false,
    );
    assert!(run_progress_ok(&c), "{:?}", c.error_messages);
    assert_eq!((c.reasoning_chunks[0], c.reasoning_tokens[0]), (1, 3));
    assert_eq!(c.first_answer_ns[0], c.first_token_ns[0]);
    let whole = r#"{"model":"m","input":[{"role":"user","content":"a b"}],"max_output_tokens":4}"#;
    let c = run_bodies(
        format!("http://{}/v1/responses", mock.addr()),
        &[whole],
        false,
    );
    assert!(run_progress_ok(&c), "{:?}", c.error_messages);
    assert_eq!((c.reasoning_chunks[0], c.reasoning_tokens[0]), (1, 3));
    assert_eq!(c.prompt_tokens[0], 2);
}

#[test]
fn mock_tool_calls_and_cached_tokens() {
    let _serial = serial();
    let mock = MockServer::start(
        "127.0.0.1",
        0,
        MockConfig {
            ttft: Duration::from_millis(2),
            itl: Duration::from_millis(1),
            tool_calls: 1.0,
            ..MockConfig::default()
        },
    )
    .expect("mock");
    let tool =
        r#"{"model":"m","messages":[{"role":"user","content":"a"}],"max_tokens":6,"stream":true}"#;
    let c = run_bodies(
        format!("http://{}/v1/chat/completions", mock.addr()),
        &[tool],
        true,
    );
    assert!(run_progress_ok(&c), "{:?}", c.error_messages);
    assert_eq!((c.n_chunks[0], c.reasoning_chunks[0]), (6, 0));
    assert_eq!(c.first_answer_ns[0], c.first_token_ns[0]);
    assert_eq!(
        c.reasoning_tokens[0], -1,
        "no reasoning ratio: not reported"
    );
    let tool = r#"{"model":"m","input":"a","max_output_tokens":5,"stream":true}"#;
    let c = run_bodies(
        format!("http://{}/v1/responses", mock.addr()),
        &[tool],
        true,
    );
    assert!(run_progress_ok(&c), "{:?}", c.error_messages);
    assert_eq!(c.n_chunks[0], 5);
    assert!(c.first_answer_ns[0] > 0);

    // Blocks of 2 words: the second request reuses all three blocks of the first, the
    // third only the first two (its third block is new).
    let url = format!("http://{}/v1/completions", mock.addr());
    let body = |ids: &str| {
        format!(
            r#"{{"model":"m","prompt":"a b c d e f","max_tokens":2,"stream":true,"stream_options":{{"include_usage":true}},"fineserve_hash_ids":[{ids}],"fineserve_block_size":2}}"#
        )
    };
    let mut cached = Vec::new();
    for ids in ["1,2,3", "1,2,3", "1,2,9", "7,2,3"] {
        let b = body(ids);
        let c = run_bodies(url.clone(), &[b.as_str()], true);
        assert!(run_progress_ok(&c), "{:?}", c.error_messages);
        cached.push(c.cached_tokens[0]);
    }
    assert_eq!(cached, vec![0, 6, 4, 0]);
    let plain = r#"{"model":"m","prompt":"a b","max_tokens":2,"stream":true,"stream_options":{"include_usage":true}}"#;
    let c = run_bodies(url, &[plain], true);
    assert_eq!(c.cached_tokens[0], -1, "no hash_ids: not reported");
}

#[test]
fn https_to_the_mock_needs_its_ca_or_insecure() {
    let _serial = serial();
    let mock = MockServer::start(
        "127.0.0.1",
        0,
        MockConfig {
            ttft: Duration::from_millis(1),
            itl: Duration::from_millis(1),
            tls: true,
            ..MockConfig::default()
        },
    )
    .expect("mock");
    let ca = std::env::temp_dir().join(format!("fineserve-mock-ca-{}.pem", std::process::id()));
    std::fs::write(&ca, mock.ca_pem().expect("a TLS mock has a CA")).expect("write ca");
    let url = format!("https://{}/v1/completions", mock.addr());
    let run_with = |tls: TlsOptions, warm: usize| {
        let mut cfg = config(url.clone(), warm);
        cfg.client.tls = tls;
        let run = start(schedule(20, 100_000, 3, false), cfg).expect("start");
        assert!(run.wait(Duration::from_secs(20)));
        run.finish().columns
    };
    // Trusted through --cacert: every request completes, over warmed TLS connections.
    let trusted = TlsOptions {
        ca_file: Some(ca.clone()),
        ..TlsOptions::default()
    };
    let c = run_with(trusted, 4);
    assert!(c.error_kind.iter().all(|&k| k == ErrorKind::Ok as u8));
    assert!(c.n_chunks.iter().all(|&n| n == 3));
    // Not trusted: every request fails as `tls`, naming the cause.
    let c = run_with(TlsOptions::default(), 0);
    assert!(c.error_kind.iter().all(|&k| k == ErrorKind::Tls as u8));
    let (_, msg) = &c.error_messages[0];
    assert!(msg.contains("unknown issuer"), "{msg}");
    // --insecure: completes without the CA.
    let insecure = TlsOptions {
        insecure: true,
        ..TlsOptions::default()
    };
    let c = run_with(insecure, 2);
    assert!(c.error_kind.iter().all(|&k| k == ErrorKind::Ok as u8));
    assert!(
        mock.stats()
            .tls_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    let _ = std::fs::remove_file(ca);
}

#[test]
fn an_http_client_against_the_tls_mock_fails_in_one_line() {
    let mock = MockServer::start(
        "127.0.0.1",
        0,
        MockConfig {
            tls: true,
            ..MockConfig::default()
        },
    )
    .expect("mock");
    let run = start(
        schedule(3, 0, 2, false),
        config(format!("http://{}/v1/completions", mock.addr()), 0),
    )
    .expect("start");
    assert!(run.wait(Duration::from_secs(20)));
    let c = run.finish().columns;
    assert!(c.error_kind.iter().all(|&k| k != ErrorKind::Ok as u8));
    assert!(c.error_messages.iter().all(|(_, m)| !m.contains('\n')));
}
