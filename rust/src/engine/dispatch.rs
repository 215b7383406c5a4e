//! One request, from its lane's deadline to its record: waiting for its previous turn
//! and for a concurrency slot, routing, sending, and accounting for how it ended.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::client::{execute, Pool, RequestParts, RunClock};
use crate::records::{ErrorKind, RequestRecord};

use super::history::{carry_of, follower_body, HistoryApi};
use super::lanes::{push_record, Chunk, LaneState, Queued};
use super::routing::{route, Outstanding};
use super::turns::{follow_turn, TurnEnd};
use super::Shared;

/// Spawns request `j` of `chunk`; `held_ns`: how long the pacer held it for want of a
/// connection or concurrency slot (counted in its connection wait).
#[allow(clippy::too_many_arguments)]
pub(super) fn dispatch(
    shared: &Arc<Shared>,
    pool: &Rc<Pool>,
    state: &Rc<LaneState>,
    clock: RunClock,
    lane: usize,
    chunk: &Chunk,
    j: usize,
    held_ns: i64,
) {
    let sched = &chunk.schedule;
    let mut body = sched.bodies[sched.body_idx[j] as usize].clone();
    let header_values: Vec<i64> = sched.header_values.iter().map(|col| col[j]).collect();
    let endpoint = sched.endpoint_idx[j];
    let scheduled_ns = sched.t_ns[j];
    let index = chunk.base + j as u64;
    let expected = sched.expected_output_tokens[j] as usize;
    let parent = sched.parent.get(j).copied().unwrap_or(-1);
    let think_ns = sched.think_ns.get(j).copied().unwrap_or(0);
    let followers = sched.followers.get(j).copied().unwrap_or(0);
    let tool_ns = sched.tool_ns.get(j).copied().unwrap_or(think_ns);
    let api = shared.config.history_api;
    // Live history: where this turn's body parts are (None: sent as rendered).
    let mut text = sched
        .turn_text
        .get(j)
        .copied()
        .filter(|_| api != HistoryApi::Off);
    state.enter();
    // Counted as waiting to leave from now, not from the task's first poll: the pacer
    // spawns many before any runs. A later turn counts once its previous turn released it.
    let queued = (parent < 0).then(|| state.queue());
    shared.progress.dispatched.fetch_add(1, Ordering::Relaxed);
    let shared = Arc::clone(shared);
    let pool = Rc::clone(pool);
    let state = Rc::clone(state);
    tokio::task::spawn_local(async move {
        let mut rec = RequestRecord::new(index, scheduled_ns, endpoint, expected + 1);
        rec.conn_wait_ns = held_ns;
        if parent >= 0 {
            let timer = state.release.as_deref();
            // Boxed: only later turns wait, and the task's size is every request's.
            let turn = Box::pin(follow_turn(
                &shared,
                timer,
                clock,
                parent as u64,
                think_ns,
                tool_ns,
            ));
            match turn.await {
                Ok(release) => {
                    rec.scheduled_ns = release.release_ns;
                    if shared.config.turn_affinity {
                        rec.endpoint_idx = release.served_by;
                    }
                    // Built in the turn's own task as it is released, not in the pacer's
                    // loop: one copy of the history (bench_live_history measures it).
                    if let (Some(t), Some(carry)) = (text.as_ref(), release.carry.as_ref()) {
                        let (spliced, moved) = follower_body(api, &body, t, carry);
                        body = spliced;
                        text = Some(moved);
                        rec.history_kind = carry.kind as u8;
                        rec.history_bytes = carry.bytes.len() as i64;
                    }
                }
                Err(why) => {
                    rec.fail(ErrorKind::NotSent, why);
                    shared.progress.not_sent.fetch_add(1, Ordering::Relaxed);
                    if followers > 0 {
                        shared
                            .turns
                            .publish(index, followers, TurnEnd::failed(endpoint));
                    }
                    push_record(&shared, lane, rec);
                    state.leave();
                    return;
                }
            }
        }
        let capture = followers > 0 && text.is_some();
        if capture {
            rec.reply = Some(Box::new(crate::reply::Reply::with_limit(
                shared.config.reply_limit_bytes,
            )));
        }
        let request = RequestParts {
            body: body.clone(),
            header_values,
        };
        let outcome = {
            let queued = queued.unwrap_or_else(|| state.queue());
            let work = run_request(&shared, &pool, clock, request, &mut rec, queued);
            tokio::select! {
                biased;
                _ = shared.cancel.cancelled() => None,
                r = work => Some(r),
            }
        };
        let p = &shared.progress;
        match outcome {
            None => {
                if rec.sent_ns < 0 {
                    rec.fail(
                        ErrorKind::NotSent,
                        "cancelled while queued for a concurrency slot",
                    );
                } else {
                    rec.fail(ErrorKind::Cancelled, "in flight when the run was cancelled");
                }
                rec.done_ns = clock.now_ns();
            }
            Some(Err((kind, msg))) => rec.fail(kind, msg),
            Some(Ok(())) => {}
        }
        if !rec.chunk_ns.is_empty() {
            p.token_events
                .fetch_add(rec.chunk_ns.len() as u64, Ordering::Relaxed);
            p.kernel_stamped_events
                .fetch_add(u64::from(rec.kernel_stamped_events), Ordering::Relaxed);
        }
        if rec.sent_ns >= 0 {
            p.in_flight.fetch_sub(1, Ordering::Relaxed);
            if rec.error == ErrorKind::Ok {
                p.succeeded.fetch_add(1, Ordering::Relaxed);
            } else {
                p.failed.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            p.not_sent.fetch_add(1, Ordering::Relaxed);
        }
        if followers > 0 {
            let mut end = TurnEnd {
                done_ns: rec.done_ns,
                ok: rec.error == ErrorKind::Ok,
                served_by: rec.endpoint_idx,
                carry: None,
                why: None,
            };
            if let (true, Some(t), Some(reply)) = (end.ok, text.as_ref(), rec.reply.take()) {
                match carry_of(api, &body, t, &reply) {
                    Ok(c) => end.carry = Some(Arc::new(c)),
                    Err(why) => {
                        end.ok = false;
                        end.why = Some(why);
                    }
                }
            }
            shared.turns.publish(index, followers, end);
        }
        rec.reply = None;
        push_record(&shared, lane, rec);
        state.leave();
    });
}

async fn run_request(
    shared: &Shared,
    pool: &Pool,
    clock: RunClock,
    request: RequestParts,
    rec: &mut RequestRecord,
    queued: Queued,
) -> Result<(), (ErrorKind, String)> {
    let _permit = match &shared.semaphore {
        Some(sem) => Some(
            Arc::clone(sem)
                .acquire_owned()
                .await
                .map_err(|_| (ErrorKind::NotSent, "concurrency limiter closed".to_owned()))?,
        ),
        None => None,
    };
    // Routed when it can leave (after any concurrency wait), so the choice sees the
    // endpoints' load at that moment.
    let endpoint = route(shared, rec.endpoint_idx as usize);
    rec.endpoint_idx = endpoint as u32;
    let _outstanding = Outstanding::on(&shared.outstanding[endpoint]);
    let cfg = &shared.config.client;
    let progress = &shared.progress;
    let result = tokio::time::timeout(
        cfg.total_timeout,
        execute(pool, cfg, clock, endpoint, request, rec, || {
            drop(queued);
            progress.sent.fetch_add(1, Ordering::Relaxed);
            progress.in_flight.fetch_add(1, Ordering::Relaxed);
        }),
    )
    .await;
    match result {
        Err(_) => Err((
            ErrorKind::TotalTimeout,
            format!(
                "request exceeded the total timeout of {:?}",
                cfg.total_timeout
            ),
        )),
        Ok(r) => r,
    }
}
