//! Scheduled messages and cron reminders: one task fires what the store says is due.
//!
//! The table is the only state. `schedule` writes a row and wakes the task; the task
//! reads the due rows, delivers each as the member who created it (its session need
//! not be connected), then moves the row on (cron) or closes it (one-shot). A restart
//! loses nothing: rows that came due while the broker was down fire once at start, and
//! cron rows carry on from the next match after now (missed occurrences are not
//! replayed one by one).
//!
//! Delivery is at least once: the message is committed before the row moves on, so a
//! crash between the two repeats that one delivery.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use base64::Engine as _;
use meshd_protocol::Priority;
use meshd_protocol::broker::{BrokerFrame, Push};
use meshd_protocol::routing::TargetSpec;
use meshd_protocol::time::iso8601_ms;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::Ctx;
use crate::hub::DirectRoute;
use crate::ids::now_ms;
use crate::store::StoreError;
use crate::store::schedule::ScheduleRow;
use crate::store::writer::{Delivery, DirectKey, NewMessage, WriteOp};

/// Rows fired per store read.
const BATCH: i64 = 256;
/// Longest sleep between checks, so a wall-clock jump is noticed within a minute.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// Back-off after a store error.
const RETRY: Duration = Duration::from_secs(1);

/// Wakes the firing task when a schedule is written or cancelled.
#[derive(Debug, Default)]
pub(crate) struct Reminders {
    wake: Notify,
}

impl Reminders {
    /// A schedule changed: re-read the earliest fire time. (A `Notify` keeps one
    /// permit, so a change made while the task is busy is not missed.)
    pub(crate) fn changed(&self) {
        self.wake.notify_one();
    }
}

/// What became of one due schedule.
enum Fired {
    /// Delivered (or stored for delivery).
    Delivered,
    /// Can never be delivered (creator revoked, mesh gone, target invalid): closed.
    Dropped(&'static str),
}

/// How long a schedule whose delivery failed waits before it is tried again.
const FAILED_RETRY_MS: i64 = 30_000;

/// The firing task's memory of trouble: deliveries made but not yet recorded (they are
/// not made again while the store refuses the record) and schedules whose delivery
/// failed (tried again after [`FAILED_RETRY_MS`], not every loop).
#[derive(Debug, Default)]
struct Trouble {
    /// id → (the fire time it was due at, what to record).
    unrecorded: HashMap<String, (i64, Outcome)>,
    retry_at: HashMap<String, i64>,
}

/// What a due row became.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// Delivered; the next fire time (`None`: a one-shot, done).
    Fired(Option<i64>),
    /// Closed without delivery.
    Closed,
}

/// The firing task; ends when `cancel` fires.
pub(crate) async fn run(ctx: Arc<Ctx>, cancel: CancellationToken) {
    let mut trouble = Trouble::default();
    loop {
        let wait = match fire_due(&ctx, &mut trouble).await {
            Ok((true, _)) => continue,
            Ok((false, stuck)) => match ctx.db.next_schedule_at().await {
                Ok(Some(at)) => {
                    let wait = Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0))
                        .min(MAX_SLEEP);
                    // Rows waiting out a failure are still "due": do not spin on them.
                    if stuck { wait.max(RETRY) } else { wait }
                }
                Ok(None) => MAX_SLEEP,
                Err(e) => {
                    warn!(cause = %e, "reminders: reading the next fire time");
                    RETRY
                }
            },
            Err(e) => {
                warn!(cause = %e, "reminders: reading due schedules");
                RETRY
            }
        };
        tokio::select! {
            () = cancel.cancelled() => break,
            () = ctx.reminders.wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Records what became of a due row. `false` when the store refused.
async fn record(ctx: &Ctx, id: &str, was: i64, outcome: Outcome, now: i64) -> bool {
    let r = match outcome {
        Outcome::Fired(next) => ctx.db.schedule_fired(id, was, next, now).await,
        Outcome::Closed => ctx.db.cancel_schedule_by_id(id).await,
    };
    if let Err(e) = &r {
        warn!(schedule = %id, cause = %e, "reminders: recording a delivery; will retry");
    }
    r.is_ok()
}

/// Fires one batch of due rows, each on its own (one failing row does not hold back the
/// others). Returns (a full batch made progress: more may be due, some rows are waiting
/// out a failure).
async fn fire_due(ctx: &Ctx, trouble: &mut Trouble) -> Result<(bool, bool), StoreError> {
    let now = now_ms();
    let pending: Vec<(String, (i64, Outcome))> = trouble
        .unrecorded
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    for (id, (was, outcome)) in pending {
        if record(ctx, &id, was, outcome, now).await {
            trouble.unrecorded.remove(&id);
        }
    }
    trouble.retry_at.retain(|_, at| *at > now);
    let rows = ctx.db.due_schedules(now, BATCH).await?;
    let full = i64::try_from(rows.len()).unwrap_or(0) >= BATCH;
    let (mut progress, mut stuck) = (false, false);
    for row in rows {
        let (id, was) = (row.id.clone(), row.next_at.unwrap_or(0));
        if trouble.unrecorded.contains_key(&id) || trouble.retry_at.contains_key(&id) {
            stuck = true;
            continue;
        }
        let next = row
            .cron
            .as_deref()
            .and_then(|c| crate::cron::next_fire(c, now, &ctx.config.schedule.timezone));
        let outcome = match fire(ctx, row, now).await {
            Ok(Fired::Delivered) => {
                debug!(schedule = %id, ?next, "reminder fired");
                Outcome::Fired(next)
            }
            Ok(Fired::Dropped(why)) => {
                info!(schedule = %id, why, "reminder closed without delivery");
                Outcome::Closed
            }
            Err(e) => {
                warn!(schedule = %id, cause = %e, "reminder not delivered; retrying in 30 s");
                trouble.retry_at.insert(id, now + FAILED_RETRY_MS);
                stuck = true;
                continue;
            }
        };
        progress = true;
        if !record(ctx, &id, was, outcome, now).await {
            trouble.unrecorded.insert(id, (was, outcome));
            stuck = true;
        }
    }
    Ok((full && progress, stuck))
}

/// Delivers a schedule's text as a push from its creator (`subtype: "reminder"` when it
/// was scheduled as one).
async fn fire(ctx: &Ctx, row: ScheduleRow, now: i64) -> Result<Fired, StoreError> {
    let Some(mesh) = ctx.hub.mesh(&ctx.db, &row.mesh_id).await? else {
        return Ok(Fired::Dropped("the mesh no longer exists"));
    };
    if mesh.member(&row.member_pubkey).is_none() || mesh.member_revoked(&row.member_pubkey) {
        return Ok(Fired::Dropped("its creator is no longer a member"));
    }
    let Ok(target) = TargetSpec::parse(&row.target_spec) else {
        return Ok(Fired::Dropped("its target is not valid"));
    };
    let schedule_id = row.id.clone();
    let reminder = row.subtype.as_deref() == Some("reminder");
    let message_id = crate::ids::message_id();
    // Reminders are plain text, as in the reference: base64 with an empty nonce, which
    // clients decode through their plaintext fallback.
    let ciphertext = base64::engine::general_purpose::STANDARD.encode(row.message.as_bytes());
    let push = BrokerFrame::Push(Push {
        message_id: message_id.clone(),
        mesh_id: row.mesh_id.clone(),
        sender_pubkey: row.sender_pubkey.clone(),
        priority: Priority::Now.as_str(),
        nonce: String::new(),
        ciphertext: ciphertext.clone(),
        created_at: iso8601_ms(now),
        subtype: reminder.then_some("reminder"),
        event: None,
        event_data: None,
        sender_member_pubkey: Some(row.member_pubkey.clone()),
        sender_member_id: Some(row.member_id.clone()),
        sender_name: Some(row.sender_name.clone()),
        client_message_id: None,
    });
    let frame = Utf8Bytes::from(push.to_json());
    // A reminder is a message of its creator: it counts against the same quota.
    if let Err(e) = ctx.usage_book.admit_message(
        crate::quota::caps(crate::quota::Kind::Messages, &ctx.config),
        &row.mesh_id,
        &row.member_id,
        ciphertext.len(),
    ) {
        tracing::info!(cause = %e, "reminder not delivered");
        return Ok(Fired::Dropped(
            "its creator's (or the mesh's) message quota is full",
        ));
    }
    let ttl = i64::try_from(ctx.config.limits.queue_ttl.as_millis()).unwrap_or(i64::MAX);
    let mut msg = NewMessage {
        id: message_id,
        mesh_id: row.mesh_id,
        sender_member_id: row.member_id,
        sender_pubkey: row.sender_pubkey,
        sender_member_pubkey: row.member_pubkey,
        sender_name: row.sender_name,
        target_spec: row.target_spec,
        target_key: None,
        priority: Priority::Now.rank(),
        nonce: String::new(),
        ciphertext,
        subtype: reminder.then(|| "reminder".to_owned()),
        client_message_id: None,
        created_at: now,
        expires_at: now.saturating_add(ttl),
        delivered_at: None,
        lease_conn: None,
        lease_until: None,
        forward_to: None,
        forward_seq: None,
        inbox: None,
    };
    let mut delivery = None;
    let mut direct = None;
    let mut forward = None;
    match &target {
        TargetSpec::Direct(pk) => {
            let grace =
                i64::try_from(ctx.config.limits.session_grace.as_millis()).unwrap_or(i64::MAX);
            let key = mesh.resolve_direct_key(&pk.to_hex(), now, grace);
            msg.target_key = Some(key.clone());
            // Connection 0 is nobody: a reminder to oneself reaches one's own sessions.
            match mesh.route_direct(&key, Priority::Now, 0) {
                DirectRoute::Unknown => return Ok(Fired::Dropped("its recipient is unknown")),
                DirectRoute::Revoked => return Ok(Fired::Dropped("its recipient was removed")),
                DirectRoute::Deliver(t) => {
                    let lease_until = if t.acks.load(Ordering::SeqCst) {
                        let lease = i64::try_from(ctx.config.limits.ack_lease.as_millis())
                            .unwrap_or(i64::MAX);
                        now.saturating_add(lease)
                    } else {
                        i64::MAX
                    };
                    delivery = Some(Delivery {
                        target: t,
                        frame,
                        lease_until,
                    });
                    direct = Some(DirectKey { mesh, key });
                }
                DirectRoute::Queue => direct = Some(DirectKey { mesh, key }),
                DirectRoute::Remote(broker) => {
                    let Some(fed) = ctx
                        .fed
                        .as_ref()
                        .filter(|f| f.will_forward(&msg.mesh_id, &broker))
                    else {
                        return Ok(Fired::Dropped(
                            "its recipient's broker no longer shares the mesh",
                        ));
                    };
                    msg.forward_to = Some(broker.to_string());
                    forward = Some((fed.clone(), broker));
                }
            }
        }
        TargetSpec::Broadcast | TargetSpec::Group(_) => {
            let (delivered, dropped) = mesh.fan_out(&target, 0, &frame);
            ctx.metrics
                .multicast_deliveries
                .fetch_add(delivered as u64, Ordering::Relaxed);
            ctx.metrics
                .fanout_dropped
                .fetch_add(dropped as u64, Ordering::Relaxed);
            if let Some(fed) = &ctx.fed {
                fed.multicast(
                    &mesh,
                    &target,
                    meshd_protocol::fed::Multicast {
                        mesh_id: msg.mesh_id.clone(),
                        id: msg.id.clone(),
                        sender_member_id: msg.sender_member_id.clone(),
                        sender_member_pubkey: msg.sender_member_pubkey.clone(),
                        sender_pubkey: msg.sender_pubkey.clone(),
                        sender_name: msg.sender_name.clone(),
                        target_spec: msg.target_spec.clone(),
                        priority: msg.priority,
                        nonce: String::new(),
                        ciphertext: msg.ciphertext.clone(),
                        client_message_id: None,
                        created_at: now,
                        subtype: reminder.then(|| "reminder".to_owned()),
                    },
                );
            }
            // Live-only, like every multicast: the row keeps the metadata.
            msg.delivered_at = Some(now);
            msg.ciphertext = String::new();
        }
        TargetSpec::Channel(_) | TargetSpec::Tag(_) | TargetSpec::Name(_) => {
            return Ok(Fired::Dropped("its target is not routable"));
        }
    }
    let multicast = matches!(target, TargetSpec::Broadcast | TargetSpec::Group(_));
    ctx.metrics.messages_routed.inc(Priority::Now.as_str());
    // Metadata only, as for every send.
    ctx.audit.record(
        &msg.mesh_id,
        "message_sent",
        Some(msg.sender_member_id.clone()),
        &msg.sender_name,
        serde_json::json!({
            "messageId": msg.id,
            "targetSpec": msg.target_spec,
            "priority": Priority::Now.as_str(),
            "scheduledId": schedule_id,
        }),
    );
    let (reply, rx) = oneshot::channel();
    let sink = forward
        .as_ref()
        .map(|(fed, peer)| fed.hot_sink(peer) as Arc<dyn crate::store::writer::ForwardSink>);
    ctx.writer
        .send(WriteOp::Insert {
            row: Box::new(msg),
            delivery,
            direct,
            forward: sink,
            reply,
        })
        .await?;
    match rx.await {
        Ok(Ok(())) => {
            if let Some((fed, peer)) = forward {
                fed.outbox_ready(&peer);
            }
            Ok(Fired::Delivered)
        }
        // A multicast went out live before its (metadata) row: it was delivered.
        Ok(Err(e)) if multicast => {
            warn!(cause = %e, "storing a fired multicast reminder's metadata");
            Ok(Fired::Delivered)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(StoreError::Closed),
    }
}
