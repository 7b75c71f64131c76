//! Status hooks: `POST /hook/set-status`, what Claude Code hooks call.
//!
//! The route is unauthenticated (as in the reference), so everything it keeps is
//! bounded: field sizes, a rate limit per source address (IPv6 by /64) in front of the
//! reference's per `pid`+`cwd` limit (so varying the pid buys nothing), both tables
//! capped in keys, and statuses waiting for a presence capped per address and in all.
//! Keys hold a digest of the `cwd`, never the string.
//!
//! Unlike the reference, which let anyone flip any presence with that cwd in any mesh, a
//! hook only reaches presences connected from the same address, and cannot set or lift
//! `dnd`.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use meshd_protocol::Status;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

use crate::Ctx;
use crate::hub::lock;
use crate::ratelimit::{Buckets, Take, addr_key};

/// Largest status-hook body (a cwd of `PATH_MAX` and the other fields fit).
pub(crate) const HOOK_BODY_LIMIT: usize = 8 * 1024;
/// Longest `cwd` accepted (Linux `PATH_MAX`).
const MAX_CWD: usize = 4096;
/// Longest `session_id` accepted.
const MAX_SESSION_ID: usize = 256;
/// Hooks per `pid`+`cwd`: 30 a minute, burst 30 (as the reference).
const RATE_PER_KEY_PER_MIN: f64 = 30.0;
/// Hooks per source address: 600 a minute (a busy machine runs many sessions).
const RATE_PER_ADDRESS_PER_MIN: f64 = 600.0;
/// Keys each rate table holds (see `ratelimit`).
const TABLE_CAP: usize = 16_384;
/// How long a hook that found no presence waits for one to connect.
const PENDING_MS: i64 = 10_000;
/// Statuses waiting for a presence, per address (the oldest goes first) …
const PENDING_PER_ADDRESS: usize = 16;
/// … and addresses with any waiting.
const PENDING_ADDRESSES: usize = 4_096;

/// A status waiting for a presence: (cwd digest, status, expiry ms).
type Waiting = ([u8; 16], Status, i64);

/// The status-hook tables.
#[derive(Debug)]
pub(crate) struct StatusHooks {
    by_address: Mutex<Buckets<IpAddr>>,
    by_key: Mutex<Buckets<(IpAddr, u64, [u8; 16])>>,
    /// Per address: waiting statuses, oldest first.
    pending: Mutex<HashMap<IpAddr, VecDeque<Waiting>>>,
}

impl Default for StatusHooks {
    fn default() -> Self {
        Self {
            by_address: Mutex::new(Buckets::per_minute(RATE_PER_ADDRESS_PER_MIN, TABLE_CAP)),
            by_key: Mutex::new(Buckets::per_minute(RATE_PER_KEY_PER_MIN, TABLE_CAP)),
            pending: Mutex::default(),
        }
    }
}

fn cwd_digest(cwd: &str) -> [u8; 16] {
    let d = Sha256::digest(cwd.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

impl StatusHooks {
    /// Keeps a status for a presence that connects from `ip` with `cwd` soon. `false`
    /// when no room is left (every address slot holds fresh statuses).
    fn stash(&self, ip: IpAddr, cwd: &str, status: Status, now: i64) -> bool {
        let mut pending = lock(&self.pending);
        let key = addr_key(ip);
        if !pending.contains_key(&key) && pending.len() >= PENDING_ADDRESSES {
            pending.retain(|_, q| {
                q.retain(|(_, _, exp)| *exp > now);
                !q.is_empty()
            });
            if pending.len() >= PENDING_ADDRESSES {
                return false;
            }
        }
        let q = pending.entry(key).or_default();
        let digest = cwd_digest(cwd);
        q.retain(|(d, _, exp)| *exp > now && *d != digest);
        if q.len() >= PENDING_PER_ADDRESS {
            q.pop_front();
        }
        q.push_back((digest, status, now + PENDING_MS));
        true
    }

    /// A stashed status for a session connecting from `ip` with `cwd`, if fresh.
    pub(crate) fn take_pending(&self, ip: IpAddr, cwd: &str, now: i64) -> Option<Status> {
        let mut pending = lock(&self.pending);
        let key = addr_key(ip);
        let q = pending.get_mut(&key)?;
        let digest = cwd_digest(cwd);
        q.retain(|(_, _, exp)| *exp > now);
        let found = q
            .iter()
            .position(|(d, _, _)| *d == digest)
            .and_then(|i| q.remove(i))
            .map(|(_, s, _)| s);
        if q.is_empty() {
            pending.remove(&key);
        }
        found
    }

    /// Periodic upkeep: forgets refilled buckets and expired statuses.
    pub(crate) fn prune(&self, now_ms: i64, now: Instant) {
        lock(&self.by_address).prune(now);
        lock(&self.by_key).prune(now);
        lock(&self.pending).retain(|_, q| {
            q.retain(|(_, _, exp)| *exp > now_ms);
            !q.is_empty()
        });
    }

    /// Entries held: (rate keys, waiting statuses), for `/metrics`.
    pub(crate) fn sizes(&self) -> (usize, usize) {
        (
            lock(&self.by_address).len() + lock(&self.by_key).len(),
            lock(&self.pending).values().map(VecDeque::len).sum(),
        )
    }
}

#[derive(Deserialize)]
struct StatusHook {
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    pid: Option<f64>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    session_id: Option<String>,
}

fn reply(code: StatusCode, v: serde_json::Value) -> Response {
    (code, axum::Json(v)).into_response()
}

/// `POST /hook/set-status`.
pub(crate) async fn set_status(
    State(ctx): State<Arc<Ctx>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let refused = |reason: &'static str, code: StatusCode, error: &str| {
        ctx.metrics.http_refused.inc(reason);
        reply(code, json!({"ok": false, "error": error}))
    };
    // The source address first: a flood is refused (slowly, see `ratelimit::TARPIT`)
    // before its body is parsed.
    let ip = crate::http::client_ip(&ctx, remote, &headers);
    let now = crate::time::instant();
    let hooks = &ctx.hooks;
    let by_address = lock(&hooks.by_address).take(addr_key(ip), now);
    match by_address {
        Take::Allowed => {}
        Take::Limited => {
            crate::ratelimit::tarpit(&ctx.sessions_cancel).await;
            return refused(
                "hook_rate_limited",
                StatusCode::TOO_MANY_REQUESTS,
                "rate limited",
            );
        }
        Take::Full => {
            return refused(
                "hook_table_full",
                StatusCode::SERVICE_UNAVAILABLE,
                "too many hook sources; retry later",
            );
        }
    }
    let Ok(hook) = serde_json::from_slice::<StatusHook>(&body) else {
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"ok": false, "error": "invalid JSON"}),
        );
    };
    if hook.cwd.as_ref().is_some_and(|c| c.len() > MAX_CWD)
        || hook
            .session_id
            .as_ref()
            .is_some_and(|s| s.len() > MAX_SESSION_ID)
    {
        return refused(
            "hook_invalid",
            StatusCode::BAD_REQUEST,
            "cwd is limited to 4096 bytes and session_id to 256",
        );
    }
    let (Some(cwd), Some(status)) = (hook.cwd.filter(|c| !c.is_empty()), hook.status) else {
        return reply(
            StatusCode::OK,
            json!({"ok": false, "error": "cwd and status required"}),
        );
    };
    let status = match Status::parse(&status) {
        Some(Status::Dnd) => {
            return reply(
                StatusCode::OK,
                json!({"ok": false, "error": "hooks cannot set dnd"}),
            );
        }
        Some(s) => s,
        None => {
            return reply(
                StatusCode::OK,
                json!({"ok": false, "error": "status must be idle or working"}),
            );
        }
    };
    // The reference's key (pid and cwd), within the address.
    let pid = hook.pid.unwrap_or(0.0).to_bits();
    match lock(&hooks.by_key).take((addr_key(ip), pid, cwd_digest(&cwd)), now) {
        Take::Allowed => {}
        Take::Limited => {
            return refused(
                "hook_rate_limited",
                StatusCode::TOO_MANY_REQUESTS,
                "rate limited",
            );
        }
        Take::Full => {
            return refused(
                "hook_table_full",
                StatusCode::SERVICE_UNAVAILABLE,
                "too many hook sources; retry later",
            );
        }
    }
    let now_ms = crate::time::now_ms();
    let best = ctx
        .hub
        .all()
        .into_iter()
        .filter_map(|m| {
            m.hook_target(ip, &cwd, hook.session_id.as_deref())
                .map(|t| (m, t))
        })
        .max_by_key(|(_, (conn, _, at, by_session))| (*by_session, *at, *conn));
    let Some((mesh, (conn, presence_id, _, _))) = best else {
        if !hooks.stash(ip, &cwd, status, now_ms) {
            return refused(
                "hook_table_full",
                StatusCode::SERVICE_UNAVAILABLE,
                "too many hooks waiting for a session; retry later",
            );
        }
        return reply(StatusCode::OK, json!({"ok": true, "pending": true}));
    };
    let fresh =
        i64::try_from(meshd_config::defaults::STATUS_FRESH_WINDOW.as_millis()).unwrap_or(i64::MAX);
    mesh.update_peer(conn, |p| {
        if p.status.status == Status::Dnd {
            return;
        }
        let before = p.status.status.max_admitted();
        p.status.write(
            status,
            meshd_protocol::status::StatusSource::Hook,
            now_ms,
            fresh,
        );
        // Becoming available releases held messages at once (the reference drained here).
        if p.status.status.max_admitted() > before {
            p.shared.spill();
        }
    });
    if let Some(fed) = &ctx.fed {
        fed.presence_changed(&mesh, conn);
    }
    reply(
        StatusCode::OK,
        json!({"ok": true, "presence_id": presence_id}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_statuses_are_bounded_per_address_and_in_all() {
        let hooks = StatusHooks::default();
        let ip: IpAddr = [10, 0, 0, 1].into();
        for i in 0..100 {
            assert!(hooks.stash(ip, &format!("/w/{i}"), Status::Working, 0));
        }
        // Only the newest 16 of one address are kept.
        assert_eq!(lock(&hooks.pending)[&ip].len(), PENDING_PER_ADDRESS);
        assert_eq!(hooks.take_pending(ip, "/w/0", 1), None);
        assert_eq!(hooks.take_pending(ip, "/w/99", 1), Some(Status::Working));
        assert_eq!(hooks.take_pending(ip, "/w/99", 1), None);
        // Expired ones are not handed out.
        assert_eq!(hooks.take_pending(ip, "/w/98", PENDING_MS + 1), None);
        for a in 0..PENDING_ADDRESSES as u32 {
            assert!(hooks.stash(IpAddr::V4(a.into()), "/x", Status::Idle, 0));
        }
        // Every address slot is fresh: refused, until they expire.
        assert!(!hooks.stash([192, 168, 0, 1].into(), "/x", Status::Idle, 1));
        assert!(hooks.stash([192, 168, 0, 1].into(), "/x", Status::Idle, PENDING_MS + 1));
        hooks.prune(PENDING_MS * 3, crate::time::instant());
        assert_eq!(hooks.sizes().1, 0);
    }
}
