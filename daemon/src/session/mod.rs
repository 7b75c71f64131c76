//! One WebSocket connection: the handshake, then the request loop.
//!
//! A session is a single task that owns its socket, its outbound queue receiver and its
//! pending replies, so no lock guards per-connection state. Its `select!` loop is
//! biased in priority order: cancellation, replies, outbound pushes, store drains, wake
//! signals, inbound frames (only while the reply and store queues have room, which is the
//! back-pressure on a fast sender), pings, lease timers.
//!
//! Every write the session asks of the store goes through a local FIFO (`writes`) fed to
//! the writer with `reserve()`, so a congested store never stops the session from
//! writing to its socket.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::future::OptionFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::{SinkExt as _, StreamExt as _};
use meshd_protocol::Priority;
use meshd_protocol::broker::{
    Ack, BrokerFrame, CumulativeStats, ErrorFrame, HelloAck, MemberProfile,
};
use meshd_protocol::client::{ClientFrame, GroupEntry, Inbound, Stats};
use meshd_protocol::hello::{HelloError, verify_hello, verify_session_hello};
use meshd_protocol::session::{ClientMachine, Verdict};
use meshd_protocol::status::{StatusSource, StatusState};
use meshd_protocol::time::iso8601_ms;
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, field, info, info_span, warn};

use crate::Ctx;
use crate::delivery;
use crate::delivery::router::Op;
use crate::hub::{
    ConnId, Disconnect, KeyTaken, MeshHub, Outbound, Peer, PeerShared, RegisterError, Registered,
    Sent, lease_owner, lock, member_info, peer_data,
};
use crate::ids::random_id;
use crate::ratelimit::Bucket;
use crate::store::StoreError;
use crate::store::writer::{ClaimSpec, Claimed, PeerStateWrite, WriteOp};
use crate::time::now_ms;

mod actor;
mod dispatch;
mod drain;
mod handshake;
mod outbound;

pub(crate) use handshake::*;

/// Replies awaited concurrently but written in request order.
pub(crate) type Replies = FuturesOrdered<Pin<Box<dyn Future<Output = Option<Utf8Bytes>> + Send>>>;

/// Requests whose replies may be outstanding before the session stops reading.
pub(crate) const MAX_REPLIES: usize = 256;
/// Store operations a session may queue locally before it stops reading.
pub(crate) const MAX_WRITES: usize = 256;
/// The answer to a request whose store access failed (the cause is logged, not sent).
pub(crate) fn store_unavailable(
    what: &str,
    req_id: Option<String>,
    cause: &dyn std::fmt::Display,
) -> Option<Utf8Bytes> {
    warn!(cause = %cause, "{what}");
    Some(
        BrokerFrame::Error(
            ErrorFrame::new("internal", "the broker's store is unavailable").with_req_id(req_id),
        )
        .to_json()
        .into(),
    )
}

/// An `error` frame answering a request (with its `_reqId`).
pub(crate) fn error(
    code: &'static str,
    msg: impl Into<String>,
    req_id: Option<String>,
) -> Option<Utf8Bytes> {
    Some(
        BrokerFrame::Error(ErrorFrame::new(code, msg).with_req_id(req_id))
            .to_json()
            .into(),
    )
}

/// Runs one connection to completion.
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    socket: WebSocket,
    remote: SocketAddr,
    conn_id: ConnId,
    permit: OwnedSemaphorePermit,
    pending: Option<crate::server::PendingSlot>,
) {
    let span = info_span!(
        "ws.session",
        conn.id = conn_id,
        remote.addr = %remote,
        mesh.id = field::Empty,
        member.id = field::Empty
    );
    async move {
        ctx.metrics
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        ctx.metrics
            .connections_active
            .fetch_add(1, Ordering::Relaxed);
        let mut socket = socket;
        // Boxed: the handshake's state is large and short-lived; inline, every idle
        // connection's task would keep room for it after the handshake is over.
        let authenticated = Box::pin(handshake(&ctx, &mut socket, conn_id, remote.ip())).await;
        // Authenticated (or gone): no longer an unauthenticated connection of its address.
        drop(pending);
        if let Some(live) = authenticated {
            ctx.metrics.sessions_active.fetch_add(1, Ordering::Relaxed);
            // Boxed for the same reason (and so the session and socket moved into it
            // are not also kept in this frame).
            Box::pin(live.serve(socket)).await;
            ctx.metrics.sessions_active.fetch_sub(1, Ordering::Relaxed);
        }
        ctx.metrics
            .connections_active
            .fetch_sub(1, Ordering::Relaxed);
        drop(permit);
    }
    .instrument(span)
    .await;
}

pub(crate) struct Ident {
    /// The handshake's signature and timestamp, for the replay cache.
    pub(crate) signature: meshd_protocol::keys::Signature,
    pub(crate) timestamp: i64,
    pub(crate) mesh_id: String,
    pub(crate) member_pubkey: String,
    pub(crate) member_id: Option<String>,
    pub(crate) session_pubkey: Option<String>,
    /// Authenticated with `session_hello` (HEAD): acknowledges pushes, role `session`.
    pub(crate) session: bool,
}

/// How a new presence is announced: `peer_joined`, or `peer_returned` with the last
/// disconnect time and summary.
pub(crate) struct Arrival {
    pub(crate) event: &'static str,
    pub(crate) returned: Option<(i64, Option<String>)>,
}

/// An authenticated connection.
pub(crate) struct Session {
    pub(crate) ctx: Arc<Ctx>,
    /// The connection's protocol state (authenticated).
    pub(crate) machine: ClientMachine,
    pub(crate) mesh: Arc<MeshHub>,
    pub(crate) shared: Arc<PeerShared>,
    pub(crate) rx: crate::hub::outq::OutRx,
    pub(crate) conn: ConnId,
    pub(crate) member_id: String,
    pub(crate) member_pubkey: String,
    pub(crate) session_pubkey: Option<String>,
    pub(crate) display_name: String,
    /// The system event to announce once `hello_ack` is out.
    pub(crate) announce: Option<Arrival>,
    pub(crate) replies: Replies,
    pub(crate) writes: VecDeque<Op>,
    pub(crate) claim: Option<oneshot::Receiver<Result<Claimed, StoreError>>>,
    pub(crate) drain_wanted: bool,
    /// When to drain again without a wake: an acknowledging client's lease ends, or a
    /// failed drain is retried.
    pub(crate) drain_timer: Option<Instant>,
    /// Whether the claim in flight leases rows until acknowledged.
    pub(crate) claim_leased: bool,
    pub(crate) bucket: Bucket,
    /// `set_position` / `clear_position` rate (`features::spatial`).
    pub(crate) move_bucket: Bucket,
    pub(crate) last_activity: Instant,
    /// Aborts socket writes (the connection's cancel token; a fresh one while the
    /// shutdown path flushes what is queued).
    pub(crate) io_guard: CancellationToken,
    /// The connection this one replaced, until it has given back what it held.
    pub(crate) predecessor: Option<Arc<PeerShared>>,
}

impl Session {
    /// Queues a reply whose work touches the store. The work runs as a task of its own
    /// (tracked with the sessions), not inside this session's reply queue: a store write
    /// holds SQLite's write gate while it runs, and a future this session stopped
    /// polling — its client hung up, or its socket is slow — would keep the gate and stop
    /// every write of the process. The reply still goes out in request order.
    pub(crate) fn reply_later(
        &mut self,
        work: impl Future<Output = Option<Utf8Bytes>> + Send + 'static,
    ) {
        let task = self.ctx.sessions.spawn(work);
        self.replies
            .push_back(Box::pin(async move { task.await.ok().flatten() }));
    }

    /// Whether this connection's member is a mesh admin now (the hub's member table:
    /// a role change or a ban applies to the next request).
    pub(crate) fn is_admin(&self) -> bool {
        self.mesh
            .member(&self.member_pubkey)
            .is_some_and(|m| m.role == "admin" && !m.revoked)
    }

    /// Queues a store operation behind this session's earlier ones.
    pub(crate) fn queue_write(&mut self, op: impl Into<Op>) {
        self.writes.push_back(op.into());
    }

    pub(crate) fn routing_key(&self) -> &str {
        self.session_pubkey
            .as_deref()
            .unwrap_or(&self.member_pubkey)
    }

    pub(crate) fn mesh_id(&self) -> &str {
        &self.mesh.row.id
    }

    /// Announces the arrival to the rest of the mesh (not to the member's own sessions,
    /// and not at all for a hidden peer).
    /// Tells peer brokers of a shared mesh that this presence changed.
    pub(crate) fn presence_changed(&self) {
        if let Some(fed) = &self.ctx.fed {
            fed.presence_changed(&self.mesh, self.conn);
            fed.bridge_presence(&self.ctx, &self.mesh, self.conn, None);
        }
    }
}

/// Socket I/O that gives up when the connection is cancelled (replaced, revoked, slow)
/// or the peer has not taken data for `limit`: a client that stops reading must not pin
/// its session (and the leases it holds) forever.
pub(crate) async fn guarded<T, E>(
    cancel: &CancellationToken,
    limit: Duration,
    io: impl Future<Output = Result<T, E>>,
) -> bool {
    tokio::select! {
        biased;
        () = cancel.cancelled() => false,
        r = tokio::time::timeout(limit, io) => matches!(r, Ok(Ok(_))),
    }
}

/// The "welcome back" record for a departing peer. Cumulative counters add this
/// session's own activity once: the CLI seeds its counters from `restoredStats` and
/// reports running totals, so a report at or above the restored value already includes
/// it (the reference added them again on every reconnect, §8 B1).
pub(crate) fn peer_state(mesh_id: &str, peer: &Peer, now: i64) -> PeerStateWrite {
    let prev = peer.restored_stats.unwrap_or_default();
    let stats = peer.stats.map_or(prev, |s| cumulative(prev, s));
    PeerStateWrite {
        mesh_id: mesh_id.to_owned(),
        member_id: peer.member_id.clone(),
        groups: serde_json::to_string(&peer.groups).unwrap_or_else(|_| "[]".into()),
        profile: serde_json::to_string(&peer.profile).unwrap_or_else(|_| "{}".into()),
        visible: peer.visible,
        last_summary: peer.summary.clone(),
        last_display_name: peer.display_name.clone(),
        stats: serde_json::to_string(&stats).unwrap_or_else(|_| "{}".into()),
        at: now,
        tags: crate::features::tags::to_column(&peer.tags),
    }
}

pub(crate) fn cumulative(prev: CumulativeStats, reported: Stats) -> CumulativeStats {
    pub(crate) fn one(prev: u64, reported: Option<f64>) -> u64 {
        let Some(r) = reported.filter(|r| r.is_finite() && *r >= 0.0) else {
            return prev;
        };
        // f64 → u64 saturates; counters never approach 2^53 in practice.
        let r = r as u64;
        if r >= prev { r } else { prev.saturating_add(r) }
    }
    CumulativeStats {
        messages_in: one(prev.messages_in, reported.messages_in),
        messages_out: one(prev.messages_out, reported.messages_out),
        tool_calls: one(prev.tool_calls, reported.tool_calls),
        errors: one(prev.errors, reported.errors),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(crate) fn cumulative_stats_do_not_double_count() {
        let prev = CumulativeStats {
            messages_in: 10,
            messages_out: 4,
            tool_calls: 0,
            errors: 1,
        };
        // A CLI that seeded from restoredStats reports running totals.
        let seeded = Stats {
            messages_in: Some(15.0),
            messages_out: Some(4.0),
            ..Stats::default()
        };
        let c = cumulative(prev, seeded);
        assert_eq!((c.messages_in, c.messages_out, c.errors), (15, 4, 1));
        // A client with fresh counters reports only this session.
        let fresh = Stats {
            messages_in: Some(3.0),
            errors: Some(f64::NAN),
            ..Stats::default()
        };
        let c = cumulative(prev, fresh);
        assert_eq!((c.messages_in, c.errors), (13, 1));
    }
}
