//! URL watches (HEAD §6): the broker polls a URL for a member and pushes
//! `watch_triggered` to the member's connections when the value it watches changes.
//!
//! Unlike the reference: a watch belongs to its member (every session sees and stops
//! it, and it survives reconnects — the CLI adds watches from short-lived connections —
//! and restarts), only its owner can remove it, a member keeps at most
//! `watch.max_per_member`, `changed` and `always` (which the CLI's help offers) work,
//! and the broker refuses URLs that resolve to its own networks (SSRF) unless
//! `watch.allow_private`. Checks run in one owned task, at most [`MAX_CONCURRENT`] at
//! once; a change while no session of the member is connected is not queued.

pub(crate) mod fetch;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshd_protocol::broker::BrokerFrame;
use meshd_protocol::time::iso8601_ms;
use meshd_protocol::watch::{Mode, NotifyOn, Reply, Request, WatchEntry};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::Ctx;
use crate::features::watch::store::WatchRow;
use crate::hub::lock;
use crate::session::*;

/// Checks running at once.
pub(crate) const MAX_CONCURRENT: usize = 8;

/// A watch as the engine runs it.
#[derive(Debug, Clone)]
struct Entry {
    row: WatchRow,
    next_due: Instant,
    running: bool,
}

/// The watches in force.
#[derive(Debug, Default)]
pub(crate) struct Watches {
    entries: Mutex<HashMap<String, Entry>>,
    changed: Notify,
}

impl Watches {
    /// Starts running a watch (its first check at once).
    pub(crate) fn add(&self, row: WatchRow) {
        lock(&self.entries).insert(
            row.id.clone(),
            Entry {
                row,
                next_due: crate::time::instant(),
                running: false,
            },
        );
        self.changed.notify_one();
    }

    /// Stops a watch.
    pub(crate) fn remove(&self, id: &str) {
        lock(&self.entries).remove(id);
        self.changed.notify_one();
    }

    /// Stops every watch of a mesh's member (it was revoked).
    pub(crate) fn remove_member(&self, mesh_id: &str, member_id: &str) {
        lock(&self.entries)
            .retain(|_, e| !(e.row.mesh_id == mesh_id && e.row.member_id == member_id));
    }
}

/// Runs the watches until `cancel`.
pub(crate) async fn run(ctx: Arc<Ctx>, cancel: CancellationToken) {
    // Load what the store holds (retrying while it is unavailable).
    loop {
        match ctx.db.all_watches().await {
            Ok(rows) => {
                for r in rows {
                    ctx.watches.add(r);
                }
                break;
            }
            Err(e) => {
                warn!(cause = %e, "loading watches; retrying in 5 s");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        }
    }
    let checks = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT));
    loop {
        let now = crate::time::instant();
        let (due, next): (Vec<WatchRow>, Option<Instant>) = {
            let mut entries = lock(&ctx.watches.entries);
            let mut due = Vec::new();
            let mut next: Option<Instant> = None;
            for e in entries.values_mut() {
                if e.running {
                    continue;
                }
                if e.next_due <= now {
                    e.running = true;
                    due.push(e.row.clone());
                } else {
                    next = Some(next.map_or(e.next_due, |n| n.min(e.next_due)));
                }
            }
            (due, next)
        };
        for row in due {
            let (ctx, slots) = (ctx.clone(), slots.clone());
            checks.spawn(async move {
                let Ok(_slot) = slots.acquire_owned().await else {
                    return;
                };
                check(&ctx, row).await;
            });
        }
        let wait = next.map_or(Duration::from_secs(3600), |n| {
            n.saturating_duration_since(now)
        });
        tokio::select! {
            () = cancel.cancelled() => break,
            () = ctx.watches.changed.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
    checks.close();
    let _ = tokio::time::timeout(fetch::TIMEOUT, checks.wait()).await;
}

/// One check of one watch: fetch, compare, record, notify.
async fn check(ctx: &Ctx, row: WatchRow) {
    let outcome = match meshd_protocol::watch::parse_url(&row.url) {
        Ok(url) => {
            let headers: Vec<(String, String)> =
                serde_json::from_str::<std::collections::BTreeMap<String, String>>(&row.headers)
                    .map(|h| h.into_iter().collect())
                    .unwrap_or_default();
            fetch::get(&url, &headers, ctx.config.watch.allow_private)
                .await
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(e),
    };
    let now = crate::time::now_ms();
    let mode = Mode::parse(&row.mode);
    let (value, error) = match outcome {
        Ok((status, body)) => (
            Some(meshd_protocol::watch::value_of(
                mode,
                row.extract.as_deref(),
                status,
                &body,
            )),
            None,
        ),
        Err(e) => {
            debug!(watch = %row.id, cause = %e, "watch check failed");
            (None, Some(e))
        }
    };
    if let Err(e) = ctx
        .db
        .watch_checked(&row.id, value.as_deref(), error.as_deref(), now)
        .await
    {
        warn!(cause = %e, "recording a watch check");
    }
    let old = row.last_value.clone();
    let fires = value.as_deref().is_some_and(|v| {
        NotifyOn::parse(&row.notify_on)
            .unwrap_or(NotifyOn::Change)
            .fires(old.as_deref(), v)
    });
    if fires && let Some(mesh) = ctx.hub.loaded(&row.mesh_id) {
        let mut data = serde_json::Map::new();
        data.insert("watchId".into(), row.id.clone().into());
        data.insert("url".into(), row.url.clone().into());
        data.insert("label".into(), row.label.clone().into());
        data.insert("mode".into(), row.mode.clone().into());
        data.insert("oldValue".into(), old.into());
        data.insert("newValue".into(), value.clone().into());
        let frame = crate::delivery::system_push(&row.mesh_id, "watch_triggered", data, now);
        mesh.to_member(&row.member_id, &frame);
    }
    let mut entries = lock(&ctx.watches.entries);
    if let Some(e) = entries.get_mut(&row.id) {
        e.running = false;
        e.next_due = crate::time::instant()
            + Duration::from_secs(u64::try_from(row.interval_s).unwrap_or(30));
        if value.is_some() {
            e.row.last_value = value;
        }
        e.row.last_check = Some(now);
    }
    drop(entries);
    ctx.watches.changed.notify_one();
}

fn entry(r: WatchRow) -> WatchEntry {
    let mode = Mode::parse(&r.mode);
    WatchEntry {
        last_hash: (mode == Mode::Hash).then(|| r.last_value.clone()).flatten(),
        id: r.id,
        url: r.url,
        mode,
        label: r.label,
        interval: u64::try_from(r.interval_s).unwrap_or(0),
        last_value: r.last_value,
        last_check: r.last_check.map(iso8601_ms),
        created_at: iso8601_ms(r.created_at),
    }
}

impl Session {
    /// `watch` / `unwatch` / `watch_list`.
    pub(crate) fn queue_watch(&mut self, request: Request, req_id: Option<String>, now: i64) {
        let ctx = self.ctx.clone();
        let mesh_id = self.mesh_id().to_owned();
        let member_id = self.member_id.clone();
        self.reply_later(async move {
            let reply = match request {
                Request::Watch(spec) => {
                    let held = match ctx.db.member_watches(&mesh_id, &member_id).await {
                        Ok(w) => w.len(),
                        Err(e) => return store_unavailable("watch", req_id, &e),
                    };
                    let max = ctx.config.watch.max_per_member;
                    if held >= max {
                        return error(
                            "watch_limit",
                            format!("{max} watches already; remove one first"),
                            req_id,
                        );
                    }
                    let headers: std::collections::BTreeMap<&str, &str> = spec
                        .headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    let row = WatchRow {
                        id: format!("w_{}", hex::encode(crate::ids::random_bytes::<4>())),
                        mesh_id,
                        member_id,
                        url: spec.url.clone(),
                        mode: spec.mode.as_str().to_owned(),
                        extract: spec.extract.clone(),
                        interval_s: i64::try_from(spec.interval).unwrap_or(i64::MAX),
                        notify_on: spec.notify_on.to_wire(),
                        headers: serde_json::to_string(&headers).unwrap_or_else(|_| "{}".into()),
                        label: spec.label.clone(),
                        last_value: None,
                        last_check: None,
                        last_error: None,
                        created_at: now,
                    };
                    if let Err(e) = ctx.db.insert_watch(&row).await {
                        return store_unavailable("watch", req_id, &e);
                    }
                    ctx.watches.add(row.clone());
                    Reply::WatchAck {
                        watch_id: row.id.clone(),
                        id: row.id,
                        url: row.url,
                        mode: spec.mode.as_str(),
                        interval: spec.interval,
                        req_id,
                    }
                }
                Request::Unwatch { watch_id } => {
                    match ctx.db.delete_watch(&mesh_id, &member_id, &watch_id).await {
                        Ok(found) => {
                            if found.is_some() {
                                ctx.watches.remove(&watch_id);
                            }
                            Reply::WatchAck {
                                id: watch_id.clone(),
                                watch_id,
                                url: found.as_ref().map(|f| f.url.clone()).unwrap_or_default(),
                                mode: found.as_ref().map_or("", |f| Mode::parse(&f.mode).as_str()),
                                interval: 0,
                                req_id,
                            }
                        }
                        Err(e) => return store_unavailable("unwatch", req_id, &e),
                    }
                }
                Request::List => match ctx.db.member_watches(&mesh_id, &member_id).await {
                    Ok(rows) => Reply::WatchListResult {
                        watches: rows.into_iter().map(entry).collect(),
                        req_id,
                    },
                    Err(e) => return store_unavailable("watch_list", req_id, &e),
                },
            };
            Some(BrokerFrame::Watch(reply).to_json().into())
        });
    }
}
