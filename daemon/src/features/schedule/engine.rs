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
use std::time::Duration;

use base64::Engine as _;
use meshd_protocol::Priority;
use meshd_protocol::routing::TargetSpec;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::Ctx;
use crate::delivery::{self, Author, Body, Envelope, Origin, Refused, Target};
use crate::features::schedule::store::ScheduleRow;
use crate::store::StoreError;
use crate::time::now_ms;

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
        let next = row.cron.as_deref().and_then(|c| {
            crate::features::schedule::cron::next_fire(c, now, &ctx.config.schedule.timezone)
        });
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
    let reminder = row.subtype.as_deref() == Some("reminder");
    // Reminders are plain text, as in the reference: base64 with an empty nonce, which
    // clients decode through their plaintext fallback.
    let ciphertext = base64::engine::general_purpose::STANDARD.encode(row.message.as_bytes());
    let tags = crate::features::tags::of_message(&target, Vec::new()).unwrap_or_default();
    let envelope = Envelope {
        id: crate::ids::message_id(),
        mesh,
        sender_pubkey: row.sender_pubkey,
        author: Some(Author {
            member_id: row.member_id,
            member_pubkey: row.member_pubkey,
            name: row.sender_name,
        }),
        target: Target::Spec(target),
        target_spec: row.target_spec,
        priority: Priority::Now,
        body: Body::Sealed {
            nonce: String::new(),
            ciphertext,
        },
        subtype: reminder.then(|| "reminder".to_owned()),
        client_message_id: None,
        created_at: now,
        expires_at: delivery::expires_at(ctx, now),
        origin: Origin::Schedule { id: row.id },
        tags,
        bridged: None,
        topic: None,
    };
    let accepted = match delivery::submit(ctx, envelope, now) {
        Ok(a) => a,
        Err(e) => {
            info!(cause = %e, "reminder not delivered");
            return Ok(Fired::Dropped(match e {
                Refused::Quota(_) => "its creator's (or the mesh's) message quota is full",
                Refused::UnknownRecipient(_) => "its recipient is unknown",
                Refused::RevokedRecipient => "its recipient was removed",
                Refused::NotHere(_) => "its recipient's broker no longer shares the mesh",
                Refused::Unroutable(_) => "its target is not routable",
                Refused::TooLarge { .. } => "its text is larger than a message may be",
                Refused::Policy { .. } => "the link policy for its recipient's broker refuses it",
                Refused::UnknownTopic(_) => "its topic does not exist",
            }));
        }
    };
    let Some((op, commit)) = accepted.write else {
        return Ok(Fired::Delivered);
    };
    ctx.writer.send(op).await?;
    match commit.committed().await {
        Ok(()) => Ok(Fired::Delivered),
        // A multicast went out live before its (metadata) row: it was delivered.
        Err(e) if accepted.live => {
            warn!(cause = %e, "storing a fired multicast reminder's metadata");
            Ok(Fired::Delivered)
        }
        Err(e) => Err(e),
    }
}
