//! Mesh telemetry (meshd extension; the seed's "structured logging … aggregated
//! reports"): `mesh_log` stores an entry (level, message, structured data), `mesh_logs`
//! searches them (full text over message and data on both backends; by peer, level, the
//! newest `last`), `mesh_report` sums a timeframe up — messages and their delivery
//! times, errors, the busiest peers, tasks and schedules, log volume — as numbers and as
//! a few plain sentences a Claude peer can act on. The same three are REST routes and
//! tools of the broker's built-in MCP server.
//!
//! Entries are kept a week and at most 100,000 per mesh (housekeeping trims the oldest);
//! a member writes at most 20 a second (bursting to 100), more are refused
//! `rate_limited`. In a shared mesh each entry also goes to the mesh's other brokers
//! (`Frame::Log`, to brokers whose hello lists the `telemetry` capability), which keep it
//! with the broker it came from, so `mesh_logs` and `mesh_report` on any broker see the
//! whole mesh's log. A peer broker may only send entries of members it hosts.

pub mod store;

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use axum::extract::{OriginalUri, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use meshd_protocol::telemetry::{Level, Request};
use serde_json::{Value, json};

use crate::Ctx;
use crate::ratelimit::{Buckets, Take};
use crate::session::*;
use store::LogRow;

/// Per-member write rate.
const LOGS_PER_SECOND: (u32, u32) = (20, 100);

/// The feature's state: the write rate per member.
#[derive(Debug)]
pub(crate) struct Telemetry {
    rate: std::sync::Mutex<Buckets<String>>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self {
            rate: std::sync::Mutex::new(Buckets::per_second(
                LOGS_PER_SECOND.0,
                LOGS_PER_SECOND.1,
                65_536,
            )),
        }
    }
}

/// Who writes an entry.
pub(crate) struct Writer<'a> {
    pub(crate) member_id: &'a str,
    pub(crate) member_pubkey: &'a str,
    pub(crate) name: &'a str,
    pub(crate) pubkey: &'a str,
}

/// Why a telemetry call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TelemetryError {
    #[error("at most 20 log entries a second per member")]
    RateLimited,
    #[error("the broker's store is unavailable: {0}")]
    Store(#[from] crate::store::StoreError),
}

impl TelemetryError {
    const fn code(&self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::Store(_) => "store_unavailable",
        }
    }
}

fn entry_json(r: &LogRow) -> Value {
    let data = r
        .data
        .as_deref()
        .and_then(|d| serde_json::from_str::<Value>(d).ok());
    json!({
        "id": r.id,
        "at": meshd_protocol::time::iso8601_ms(r.at),
        "level": Level::from_rank(r.level).map_or("info", Level::as_str),
        "peer": r.peer_name,
        "peerPubkey": r.peer_pubkey,
        "broker": r.broker,
        "message": r.message,
        "data": data,
    })
}

/// Runs a telemetry request for `who` in `mesh_id`; the answer's fields.
pub(crate) async fn handle(
    ctx: &Ctx,
    mesh_id: &str,
    who: &Writer<'_>,
    req: Request,
    now: i64,
) -> Result<Value, TelemetryError> {
    match req {
        Request::Log {
            level,
            message,
            data,
        } => {
            let key = format!("{mesh_id}/{}", who.member_id);
            if !matches!(
                crate::hub::lock(&ctx.telemetry.rate).take(key, crate::time::std_instant().into()),
                Take::Allowed
            ) {
                return Err(TelemetryError::RateLimited);
            }
            let row = LogRow {
                id: entry_id(now),
                mesh_id: mesh_id.to_owned(),
                at: now,
                level: level.rank(),
                member_id: who.member_id.to_owned(),
                peer_name: who.name.to_owned(),
                peer_pubkey: who.pubkey.to_owned(),
                message,
                data,
                broker: None,
            };
            ctx.db.insert_log(&row).await?;
            if let Some(fed) = &ctx.fed {
                fed.log_send(
                    mesh_id,
                    meshd_protocol::fed::Frame::Log(Box::new(meshd_protocol::fed::LogEntry {
                        mesh_id: mesh_id.to_owned(),
                        id: row.id.clone(),
                        at: row.at,
                        level: row.level,
                        member_id: row.member_id.clone(),
                        member_pubkey: who.member_pubkey.to_owned(),
                        peer_name: row.peer_name.clone(),
                        peer_pubkey: row.peer_pubkey.clone(),
                        message: row.message.clone(),
                        data: row.data.clone(),
                    })),
                );
            }
            Ok(json!({"id": row.id, "at": meshd_protocol::time::iso8601_ms(now)}))
        }
        Request::Logs {
            query,
            peer,
            level,
            last,
        } => {
            let rows = ctx
                .db
                .logs(
                    mesh_id,
                    query.as_deref(),
                    peer.as_deref(),
                    level.map_or(0, Level::rank),
                    last,
                )
                .await?;
            Ok(json!({"logs": rows.iter().map(entry_json).collect::<Vec<_>>()}))
        }
        Request::Report { timeframe_ms } => report(ctx, mesh_id, timeframe_ms, now).await,
    }
}

/// `mesh_report`: a timeframe of the mesh summed up.
async fn report(
    ctx: &Ctx,
    mesh_id: &str,
    timeframe_ms: i64,
    now: i64,
) -> Result<Value, TelemetryError> {
    let from = now - timeframe_ms;
    let db = &ctx.db;
    let ((by_prio, delivered, pending), mut times, senders, (by_level, errors), tasks, schedules) =
        tokio::try_join!(
            db.message_summary(mesh_id, from),
            db.delivery_times(mesh_id, from),
            db.top_senders(mesh_id, from),
            db.log_summary(mesh_id, from),
            db.task_counts(mesh_id),
            db.schedule_count(mesh_id),
        )?;
    times.sort_unstable();
    let pct = |q: f64| -> Option<i64> {
        if times.is_empty() {
            return None;
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let i = ((times.len() as f64 - 1.0) * q).round() as usize;
        times.get(i).copied()
    };
    let prio_name = |r: i64| meshd_protocol::Priority::from_rank(r).map_or("other", |p| p.as_str());
    let sent: i64 = by_prio.iter().map(|(_, n)| n).sum();
    let level_count = |l: Level| {
        by_level
            .iter()
            .find(|(r, _)| *r == l.rank())
            .map_or(0, |(_, n)| *n)
    };
    let online = ctx
        .hub
        .loaded(mesh_id)
        .map_or(0, |m| m.peers_for("", 0).len());
    let (p50, p95, p99) = (pct(0.5), pct(0.95), pct(0.99));
    // Plain sentences first: what a reader should notice.
    let mut notes: Vec<String> = Vec::new();
    notes.push(format!(
        "{sent} messages sent in the last {}; {delivered} deliveries done, {pending} still pending.",
        human(timeframe_ms)
    ));
    if let (Some(p50), Some(p99)) = (p50, p99) {
        notes.push(format!(
            "Send to delivery took {p50} ms at the median and {p99} ms at p99."
        ));
    }
    let errs = level_count(Level::Error);
    if errs > 0 {
        let top = errors
            .first()
            .map(|(m, n)| format!(" The most frequent: \"{m}\" ({n}×)."))
            .unwrap_or_default();
        notes.push(format!("{errs} errors were logged.{top}"));
    } else {
        notes.push("No errors were logged.".to_owned());
    }
    if pending > 0 && delivered == 0 {
        notes.push("Nothing was delivered: recipients may be offline.".to_owned());
    }
    if tasks.0 > 0 {
        notes.push(format!("{} tasks are open and unclaimed.", tasks.0));
    }
    Ok(json!({
        "timeframe": human(timeframe_ms),
        "from": meshd_protocol::time::iso8601_ms(from),
        "to": meshd_protocol::time::iso8601_ms(now),
        "summary": notes,
        "messages": {
            "sent": sent,
            "byPriority": by_prio.iter().map(|(r, n)| (prio_name(*r).to_owned(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "delivered": delivered,
            "pending": pending,
        },
        "delivery": {"samples": times.len(), "p50Ms": p50, "p95Ms": p95, "p99Ms": p99},
        "errors": {
            "count": errs,
            "top": errors.iter().map(|(m, n)| json!({"message": m, "count": n})).collect::<Vec<_>>(),
        },
        "logs": {
            "debug": level_count(Level::Debug),
            "info": level_count(Level::Info),
            "warn": level_count(Level::Warn),
            "error": errs,
        },
        "peers": {
            "online": online,
            "busiest": senders.iter().map(|(name, n)| json!({"name": name, "messages": n})).collect::<Vec<_>>(),
        },
        "tasks": {"open": tasks.0, "claimed": tasks.1, "done": tasks.2},
        "schedules": {"pending": schedules},
    }))
}

/// An entry id that sorts by time, then by write order here (entries of one millisecond
/// are listed newest first by it), then a random part so brokers' ids never collide.
fn entry_id(now: i64) -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 1_000_000;
    let r = crate::ids::uuid_v4();
    format!("{now:013}-{n:06}-{}", &r[..8])
}

/// `3600000` → `1h`.
fn human(ms: i64) -> String {
    if ms % 86_400_000 == 0 {
        format!("{}d", ms / 86_400_000)
    } else if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else {
        format!("{}m", ms / 60_000)
    }
}

/// The reply frame's type for a request.
const fn reply_type(req: &Request) -> &'static str {
    match req {
        Request::Log { .. } => "mesh_log_ack",
        Request::Logs { .. } => "mesh_logs_result",
        Request::Report { .. } => "mesh_report_result",
    }
}

impl Session {
    /// `mesh_log`, `mesh_logs`, `mesh_report`.
    pub(crate) fn on_telemetry(&mut self, req: Request, req_id: Option<String>, now: i64) {
        let ctx = self.ctx.clone();
        let mesh_id = self.mesh_id().to_owned();
        let (member_id, member_pubkey, name, pubkey) = (
            self.member_id.clone(),
            self.member_pubkey.clone(),
            self.display_name.clone(),
            self.routing_key().to_owned(),
        );
        self.reply_later(async move {
            let kind = reply_type(&req);
            let who = Writer {
                member_id: &member_id,
                member_pubkey: &member_pubkey,
                name: &name,
                pubkey: &pubkey,
            };
            match handle(&ctx, &mesh_id, &who, req, now).await {
                Ok(mut v) => {
                    v["type"] = kind.into();
                    if let Some(r) = req_id {
                        v["_reqId"] = r.into();
                    }
                    let text: Utf8Bytes = v.to_string().into();
                    Some(text)
                }
                Err(e) => error(e.code(), e.to_string(), req_id),
            }
        });
    }
}

/// The built-in MCP tools `mesh_log`, `mesh_logs`, `mesh_report`.
pub(crate) async fn tool(
    ctx: &Ctx,
    mesh_id: &str,
    who: &Writer<'_>,
    kind: &str,
    args: &str,
) -> Result<Value, String> {
    let req = meshd_protocol::telemetry::decode(kind, args)
        .map_err(|e| format!("invalid arguments: {e}"))?;
    handle(ctx, mesh_id, who, req, crate::time::now_ms())
        .await
        .map_err(|e| e.to_string())
}

/// `GET /api/v1/logs?q=&peer=&level=&last=`, `GET /api/v1/report?timeframe=`.
pub(crate) async fn rest(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    use meshd_protocol::apikeys::Capability;
    let c = match crate::api::caller(&ctx, &headers, uri.path(), Some(Capability::Read)).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let (kind, body) = if uri.path().ends_with("/report") {
        ("mesh_report", json!({"timeframe": q.get("timeframe")}))
    } else {
        let last = match q.get("last").map(|l| l.parse::<i64>()) {
            None => None,
            Some(Ok(n)) => Some(n),
            Some(Err(_)) => return crate::api::invalid(uri.path(), "last must be a number"),
        };
        (
            "mesh_logs",
            json!({"query": q.get("q"), "peer": q.get("peer"), "level": q.get("level"), "last": last}),
        )
    };
    let req = match meshd_protocol::telemetry::decode(kind, &body.to_string()) {
        Ok(r) => r,
        Err(e) => return crate::api::invalid(uri.path(), &e.to_string()),
    };
    let who = Writer {
        member_id: "",
        member_pubkey: "",
        name: "",
        pubkey: "",
    };
    match handle(&ctx, &c.mesh.row.id, &who, req, crate::time::now_ms()).await {
        Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
        Err(e) => crate::api::store_failed(uri.path(), &e),
    }
}

/// Stores a peer broker's log entry: the mesh must be shared with it, the entry well
/// formed, and its writer a member that broker hosts.
pub(crate) async fn on_peer_log(
    ctx: &Arc<Ctx>,
    link: &Arc<crate::fed::LinkShared>,
    e: meshd_protocol::fed::LogEntry,
) {
    use meshd_protocol::fed::RejectReason;
    use meshd_protocol::telemetry::{MAX_DATA, MAX_MESSAGE};
    let valid = crate::ids::plausible_id(&e.id)
        && Level::from_rank(e.level).is_some()
        && !e.message.is_empty()
        && e.message.len() <= MAX_MESSAGE
        && e.data.as_ref().is_none_or(|d| d.len() <= MAX_DATA)
        && e.peer_name.len() <= meshd_protocol::client::MAX_NAME_LEN
        && e.peer_pubkey.len() <= 64;
    let refused = if !link.accepts(&e.mesh_id) {
        Some(RejectReason::NotShared)
    } else if !valid {
        Some(RejectReason::Invalid)
    } else {
        match ctx.hub.mesh(&ctx.db, &e.mesh_id).await {
            Ok(Some(hub))
                if hub.hosted_by(&link.broker, &e.member_pubkey)
                    && hub
                        .member(&e.member_pubkey)
                        .is_some_and(|m| m.id == e.member_id) =>
            {
                let row = LogRow {
                    id: e.id,
                    mesh_id: e.mesh_id,
                    at: e.at,
                    level: e.level,
                    member_id: e.member_id,
                    peer_name: e.peer_name,
                    peer_pubkey: e.peer_pubkey,
                    message: e.message,
                    data: e.data,
                    broker: Some(link.broker.to_string()),
                };
                if let Err(err) = ctx.db.insert_log(&row).await {
                    tracing::warn!(cause = %err, "storing a peer broker's log entry");
                }
                None
            }
            _ => Some(RejectReason::ForgedSender),
        }
    };
    if let Some(reason) = refused {
        ctx.metrics.fed_refused.inc(reason.as_str());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn entry_ids_sort_by_time_then_write_order() {
        let ids: Vec<String> = (0..5).map(|_| super::entry_id(1_700_000_000_000)).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        assert!(super::entry_id(1_000) < super::entry_id(2_000));
        assert!(ids.iter().all(|i| crate::ids::plausible_id(i)));
    }
}
