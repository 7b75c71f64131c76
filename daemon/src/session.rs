//! One WebSocket connection: the handshake, then the request loop.
//!
//! A session is a single task that owns its socket, its outbound queue receiver and its
//! pending replies, so no lock guards per-connection state. Its `select!` loop is
//! biased in priority order: cancellation, replies, outbound pushes, store drains, wake
//! signals, inbound frames (only while the reply and store queues have room, which is the
//! back-pressure on a fast sender), pings, lease timers.
//!
//! Every write the session asks of the store goes through a local FIFO (`outbox`) fed to
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
use meshd_protocol::broker::{
    Ack, BrokerFrame, CumulativeStats, ErrorFrame, HelloAck, MemberProfile, MessageStatusResult,
    PeersList, RecipientStatus, StateEntry, StateList, StateResult,
};
use meshd_protocol::client::{ClientFrame, GroupEntry, Inbound, Stats};
use meshd_protocol::hello::{HelloError, verify_hello, verify_session_hello};
use meshd_protocol::session::{Session, Verdict};
use meshd_protocol::status::{StatusSource, StatusState};
use meshd_protocol::time::iso8601_ms;
use meshd_protocol::{Priority, TargetSpec};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, field, info, info_span, warn};

use crate::Ctx;
use crate::delivery::router::Op;
use crate::delivery::{self, Author, Body, Envelope, Origin, Target};
use crate::hub::{
    CloseReason, ConnId, DirectRoute, KeyTaken, MeshHub, Outbound, Peer, PeerShared, RegisterError,
    Registered, Sent, StateValue, lease_owner, lock, member_info, offer, peer_data, raw,
};
use crate::ids::random_id;
use crate::ratelimit::Bucket;
use crate::store::StoreError;
use crate::store::writer::{ClaimSpec, Claimed, PeerStateWrite, WriteOp};
use crate::time::now_ms;

/// Replies awaited concurrently but written in request order.
type Pending = FuturesOrdered<Pin<Box<dyn Future<Output = Option<Utf8Bytes>> + Send>>>;

/// Requests whose replies may be outstanding before the session stops reading.
const MAX_PENDING: usize = 256;
/// Store operations a session may queue locally before it stops reading.
const MAX_OUTBOX: usize = 256;
/// Rows fetched per drain round.
const CLAIM_LIMIT: i64 = 256;
/// The answer to a request whose store access failed (the cause is logged, not sent).
fn store_unavailable(
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
fn error(code: &'static str, msg: impl Into<String>, req_id: Option<String>) -> Option<Utf8Bytes> {
    Some(
        BrokerFrame::Error(ErrorFrame::new(code, msg).with_req_id(req_id))
            .to_json()
            .into(),
    )
}

/// Streams one connection may follow.
const MAX_STREAMS_PER_CONN: usize = 256;

/// Outbound frames written between flushes.
const WRITE_BATCH: usize = 64;

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
        let authenticated = handshake(&ctx, &mut socket, conn_id, remote.ip()).await;
        // Authenticated (or gone): no longer an unauthenticated connection of its address.
        drop(pending);
        if let Some(live) = authenticated {
            ctx.metrics.sessions_active.fetch_add(1, Ordering::Relaxed);
            live.serve(socket).await;
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

/// A refused handshake: the error frame, then a close.
struct Refusal {
    code: &'static str,
    message: String,
    close_code: u16,
}

impl Refusal {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            close_code: 1008,
        }
    }

    /// The member was revoked: the reference's wording, close 4002.
    fn revoked(mesh_name: &str) -> Self {
        Self {
            code: "revoked",
            message: revoked_message(mesh_name),
            close_code: 4002,
        }
    }

    fn from_hello(e: &HelloError) -> Self {
        Self::new(e.code(), format!("hello rejected: {e}"))
    }

    fn store(e: &StoreError) -> Self {
        warn!(cause = %e, "store error during handshake");
        Self {
            code: "internal",
            message: "the broker's store is unavailable; retry".into(),
            close_code: 1011,
        }
    }
}

fn revoked_message(mesh_name: &str) -> String {
    format!("You've been removed from \"{mesh_name}\".")
}

async fn send_text(socket: &mut WebSocket, ctx: &Ctx, text: String) -> bool {
    ctx.metrics.frames_sent.fetch_add(1, Ordering::Relaxed);
    socket.send(Message::Text(text.into())).await.is_ok()
}

async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        })))
        .await;
}

/// Waits for a valid handshake. Returns `None` when the connection ended instead.
async fn handshake(
    ctx: &Arc<Ctx>,
    socket: &mut WebSocket,
    conn_id: ConnId,
    remote_ip: std::net::IpAddr,
) -> Option<Live> {
    let timeout_ms = i64::try_from(ctx.config.limits.hello_timeout.as_millis()).unwrap_or(i64::MAX);
    let mut hs = Session::new(now_ms(), timeout_ms);
    let deadline = crate::time::instant() + ctx.config.limits.hello_timeout;
    loop {
        let msg = tokio::select! {
            biased;
            () = ctx.sessions_cancel.cancelled() => {
                close(socket, 1001, "shutting down").await;
                return None;
            }
            () = tokio::time::sleep_until(deadline) => {
                ctx.metrics.connections_rejected.inc("hello_timeout");
                let e = ErrorFrame::new("no_hello", "no hello within the handshake timeout");
                let _ = send_text(socket, ctx, BrokerFrame::Error(e).to_json()).await;
                close(socket, 1008, "hello timeout").await;
                return None;
            }
            msg = socket.recv() => msg,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Binary(_))) => {
                ctx.metrics.frames_dropped.inc("binary");
                continue;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_))) => {
                answer_close(socket).await;
                return None;
            }
            None => return None,
            Some(Err(e)) => {
                oversize_close(ctx, socket, &e).await;
                return None;
            }
        };
        ctx.metrics.frames_received.fetch_add(1, Ordering::Relaxed);
        match hs.on_text(&text) {
            Verdict::Handshake(inbound) => {
                match authenticate(ctx, inbound, conn_id, remote_ip).await {
                    Ok((live, ack)) => {
                        hs.accepted();
                        if !send_text(socket, ctx, ack).await {
                            live.teardown().await;
                            return None;
                        }
                        live.announce_arrival();
                        let mut live = live;
                        live.restore_mcp();
                        return Some(live);
                    }
                    Err(r) => {
                        ctx.metrics
                            .connections_rejected
                            .inc(if r.close_code == 1011 {
                                "store_error"
                            } else {
                                r.code
                            });
                        debug!(code = r.code, "handshake refused");
                        let e = ErrorFrame::new(r.code, r.message);
                        let _ = send_text(socket, ctx, BrokerFrame::Error(e).to_json()).await;
                        let reason = match r.close_code {
                            4002 => "banned",
                            1011 => "internal error",
                            _ => r.code,
                        };
                        close(socket, r.close_code, reason).await;
                        return None;
                    }
                }
            }
            Verdict::Reply(e) => {
                if !send_text(socket, ctx, BrokerFrame::Error(e).to_json()).await {
                    return None;
                }
            }
            Verdict::Request(_) | Verdict::Ignore(_) => {}
        }
    }
}

/// Sends the Close frame that answers the client's (RFC 6455 §5.5.1): the WebSocket
/// layer queued it when the client's arrived; a flush writes it. Bounded, as a client
/// that closes may also stop reading.
async fn answer_close(socket: &mut WebSocket) {
    let _ = tokio::time::timeout(Duration::from_secs(2), socket.flush()).await;
}

/// Closes a connection whose frame exceeded the size limit, with a clear reason.
async fn oversize_close(ctx: &Ctx, socket: &mut WebSocket, e: &axum::Error) {
    let text = e.to_string();
    if text.contains("too long") || text.contains("Space limit") || text.contains("capacity") {
        ctx.metrics.frames_dropped.inc("oversized");
        info!(cause = %text, "frame over the size limit; closing");
        close(socket, 1009, "frame exceeds the size limit").await;
    } else {
        debug!(cause = %text, "socket error");
    }
}

/// Checks a handshake frame and registers the presence.
async fn authenticate(
    ctx: &Arc<Ctx>,
    inbound: Inbound,
    conn_id: ConnId,
    remote_ip: std::net::IpAddr,
) -> Result<(Live, String), Refusal> {
    let now = now_ms();
    let skew = meshd_protocol::hello::DEFAULT_SKEW_MS;
    let (ident, mut fields) = match inbound.frame {
        ClientFrame::Hello(h) => {
            let v = verify_hello(&h, now, skew).map_err(|e| Refusal::from_hello(&e))?;
            (
                Ident {
                    signature: v.signature,
                    timestamp: v.timestamp,
                    mesh_id: h.mesh_id.clone(),
                    member_pubkey: v.member_pubkey.to_hex(),
                    member_id: Some(h.member_id.clone()),
                    session_pubkey: v.session_pubkey.map(|k| k.to_hex()),
                    session: false,
                },
                h.presence,
            )
        }
        ClientFrame::SessionHello(h) => {
            let v = verify_session_hello(&h, now, skew).map_err(|e| Refusal::from_hello(&e))?;
            (
                Ident {
                    signature: v.signature,
                    timestamp: v.timestamp,
                    mesh_id: h.mesh_id.clone(),
                    member_pubkey: v.member_pubkey.to_hex(),
                    member_id: h.parent_member_id.clone(),
                    session_pubkey: Some(v.session_pubkey.to_hex()),
                    session: true,
                },
                h.presence,
            )
        }
        _ => return Err(Refusal::new("no_hello", "must send hello first")),
    };

    let not_member = || Refusal::new("unauthorized", "hello rejected: pubkey not found in mesh");
    let mesh = ctx
        .hub
        .mesh(&ctx.db, &ident.mesh_id)
        .await
        .map_err(|e| Refusal::store(&e))?
        .ok_or_else(not_member)?;
    // The store is authoritative (members join and are revoked from other processes);
    // the hub's copy is refreshed on every hello.
    let member = match ctx
        .db
        .member_by_pubkey(&ident.mesh_id, &ident.member_pubkey)
        .await
        .map_err(|e| Refusal::store(&e))?
    {
        Some(row) => {
            let info = member_info(&row);
            mesh.upsert_member(&row.pubkey, info.clone());
            info
        }
        None => return Err(not_member()),
    };
    if member.revoked {
        return Err(Refusal::revoked(&mesh.row.name));
    }
    // A member of a peer broker connects to its own broker; presence there is what
    // this broker sees of it.
    if let Some(home) = &member.home {
        return Err(Refusal::new(
            "unauthorized",
            format!("hello rejected: this member is hosted by broker {home}; connect there"),
        ));
    }
    if let Some(claimed) = &ident.member_id
        && *claimed != member.id
    {
        return Err(if ident.session {
            Refusal::new(
                "parent_member_id_mismatch",
                "parentMemberId does not match the member key",
            )
        } else {
            Refusal::new(
                "unauthorized",
                "hello rejected: memberId does not match the member key",
            )
        });
    }
    // Only now, with the key known to be a member's, is the handshake remembered: a
    // stranger's self-signed hellos must not fill the cache and lock members out.
    lock(&ctx.replay)
        .check_and_insert(&ident.signature, ident.timestamp, now)
        .map_err(|e| Refusal::from_hello(&e))?;
    tracing::Span::current().record("mesh.id", field::display(&ident.mesh_id));
    tracing::Span::current().record("member.id", field::display(&member.id));

    // A session key belongs to the first member that presents it and can never be a
    // member key of someone else: otherwise one member could drain another's DMs.
    if let Some(spk) = &ident.session_pubkey {
        let taken = || {
            Refusal::new(
                "bad_session_pubkey",
                "sessionPubkey belongs to another member",
            )
        };
        match mesh.claim_session_key(spk, &ident.member_pubkey, &member.id) {
            Err(KeyTaken) => return Err(taken()),
            Ok(false) => {}
            // First sighting: persist the binding (the hub's copy, taken under its lock,
            // is what every later hello is checked against).
            Ok(true) => {
                let op = WriteOp::BindSession {
                    mesh_id: ident.mesh_id.clone(),
                    pubkey: spk.clone(),
                    member_id: member.id.clone(),
                    now,
                };
                ctx.writer.send(op).await.map_err(|e| Refusal::store(&e))?;
            }
        }
    }

    let saved = ctx
        .db
        .peer_state(&ident.mesh_id, &member.id)
        .await
        .map_err(|e| Refusal::store(&e))?;
    let saved_groups: Vec<GroupEntry> = saved
        .as_ref()
        .and_then(|s| serde_json::from_str(&s.groups).ok())
        .unwrap_or_default();
    let saved_stats: Option<CumulativeStats> = saved
        .as_ref()
        .map(|s| serde_json::from_str(&s.stats).unwrap_or_default());
    let hello_groups = fields.groups.take().filter(|g| !g.is_empty());
    let groups = hello_groups.clone().unwrap_or_else(|| saved_groups.clone());
    let display_name = fields
        .display_name
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| member.display_name.clone());

    let (tx, rx) = mpsc::channel(ctx.config.limits.outbound_queue);
    let cancel = ctx.sessions_cancel.child_token();
    let shared = Arc::new(PeerShared::new(
        conn_id,
        tx,
        cancel,
        ctx.config.limits.outbound_queue_bytes,
    ));
    shared.acks.store(ident.session, Ordering::SeqCst);
    let peer = Peer {
        shared: shared.clone(),
        presence_id: random_id(),
        member_id: member.id.clone(),
        member_pubkey: ident.member_pubkey.clone(),
        session_pubkey: ident.session_pubkey.clone(),
        display_name: display_name.clone(),
        peer_role: if ident.session {
            "session"
        } else {
            "control-plane"
        },
        session_id: fields.session_id.unwrap_or_else(random_id),
        cwd: fields.cwd.unwrap_or_default(),
        hostname: fields.hostname,
        peer_type: fields.peer_type,
        channel: fields.channel,
        model: fields.model,
        connected_at: now,
        status: StatusState::new(now),
        summary: None,
        groups: groups.clone(),
        visible: saved.as_ref().is_none_or(|s| s.visible),
        profile: saved
            .as_ref()
            .and_then(|s| serde_json::from_str(&s.profile).ok())
            .unwrap_or_default(),
        stats: None,
        restored_stats: saved_stats,
        remote_ip,
    };
    // A status hook that fired just before this session connected (same address, cwd).
    let stashed = ctx.hooks.take_pending(remote_ip, &peer.cwd, now);
    let mut peer = peer;
    if let Some(status) = stashed {
        let fresh = i64::try_from(meshd_config::defaults::STATUS_FRESH_WINDOW.as_millis())
            .unwrap_or(i64::MAX);
        peer.status.write(status, StatusSource::Hook, now, fresh);
    }
    let (registered, presence_id) = mesh
        .register(peer, ctx.config.limits.max_connections_per_mesh)
        .map_err(|e| match e {
            RegisterError::AtCapacity => Refusal::new("capacity", "mesh at connection capacity"),
            RegisterError::Revoked => Refusal::revoked(&mesh.row.name),
        })?;
    let predecessor = match registered {
        Registered::Reattached(old) => Some(old),
        Registered::New => None,
    };
    let reattached = predecessor.is_some();

    let restored = saved.is_some() && !ident.session;
    let ack = BrokerFrame::HelloAck(HelloAck {
        presence_id,
        member_display_name: display_name.clone(),
        restored: restored.then_some(true),
        last_summary: if restored {
            saved.as_ref().and_then(|s| s.last_summary.clone())
        } else {
            None
        },
        last_seen_at: if restored {
            saved.as_ref().map(|s| iso8601_ms(s.last_seen_at))
        } else {
            None
        },
        restored_groups: (restored && hello_groups.is_none() && !saved_groups.is_empty())
            .then(|| saved_groups.clone()),
        restored_stats: if restored { saved_stats } else { None },
        member_profile: Some(MemberProfile {
            role_tag: member.role.clone(),
            groups,
            message_mode: "push".into(),
        }),
    });
    info!(
        session = ident.session,
        reattached, restored, "session authenticated"
    );
    // The connection starts spilled: its first drain delivers whatever waited for it.
    let mut machine = Session::new(now, 0);
    machine.accepted();
    let io_guard = shared.cancel.clone();
    let started = crate::time::instant();
    let live = Live {
        ctx: ctx.clone(),
        machine,
        mesh,
        shared,
        rx,
        conn: conn_id,
        member_id: member.id,
        member_pubkey: ident.member_pubkey,
        session_pubkey: ident.session_pubkey,
        display_name,
        // `peer_returned` only for a plain hello with saved state, as the reference: the
        // newest CLI maps only `peer_joined`/`peer_left` for its sessions.
        announce: if reattached {
            None
        } else if saved.is_some() && !ident.session {
            Some(Arrival {
                event: "peer_returned",
                returned: saved.map(|s| (s.last_seen_at, s.last_summary)),
            })
        } else {
            Some(Arrival {
                event: "peer_joined",
                returned: None,
            })
        },
        pending: FuturesOrdered::new(),
        outbox: VecDeque::new(),
        claim: None,
        drain_wanted: true,
        drain_timer: None,
        claim_leased: false,
        bucket: Bucket::new(
            ctx.config.limits.sends_per_second,
            ctx.config.limits.send_burst,
            started,
        ),
        last_activity: started,
        io_guard,
        predecessor,
    };
    Ok((live, ack.to_json()))
}

struct Ident {
    /// The handshake's signature and timestamp, for the replay cache.
    signature: meshd_protocol::keys::Signature,
    timestamp: i64,
    mesh_id: String,
    member_pubkey: String,
    member_id: Option<String>,
    session_pubkey: Option<String>,
    /// Authenticated with `session_hello` (HEAD): acknowledges pushes, role `session`.
    session: bool,
}

/// How a new presence is announced: `peer_joined`, or `peer_returned` with the last
/// disconnect time and summary.
struct Arrival {
    event: &'static str,
    returned: Option<(i64, Option<String>)>,
}

/// An authenticated connection.
struct Live {
    ctx: Arc<Ctx>,
    /// The connection's protocol state (authenticated).
    machine: Session,
    mesh: Arc<MeshHub>,
    shared: Arc<PeerShared>,
    rx: mpsc::Receiver<Outbound>,
    conn: ConnId,
    member_id: String,
    member_pubkey: String,
    session_pubkey: Option<String>,
    display_name: String,
    /// The system event to announce once `hello_ack` is out.
    announce: Option<Arrival>,
    pending: Pending,
    outbox: VecDeque<Op>,
    claim: Option<oneshot::Receiver<Result<Claimed, StoreError>>>,
    drain_wanted: bool,
    /// When to drain again without a wake: an acknowledging client's lease ends, or a
    /// failed drain is retried.
    drain_timer: Option<Instant>,
    /// Whether the claim in flight leases rows until acknowledged.
    claim_leased: bool,
    bucket: Bucket,
    last_activity: Instant,
    /// Aborts socket writes (the connection's cancel token; a fresh one while the
    /// shutdown path flushes what is queued).
    io_guard: CancellationToken,
    /// The connection this one replaced, until it has given back what it held.
    predecessor: Option<Arc<PeerShared>>,
}

impl Live {
    /// When a row pushed now is offered again (see [`delivery::lease_until`]).
    fn lease_until(&self, acks: bool, now: i64) -> i64 {
        delivery::lease_until(self.ctx.config.limits.ack_lease, acks, now)
    }

    /// Queues a store operation behind this session's earlier ones.
    fn queue_write(&mut self, op: impl Into<Op>) {
        self.outbox.push_back(op.into());
    }

    fn routing_key(&self) -> &str {
        self.session_pubkey
            .as_deref()
            .unwrap_or(&self.member_pubkey)
    }

    fn mesh_id(&self) -> &str {
        &self.mesh.row.id
    }

    /// Announces the arrival to the rest of the mesh (not to the member's own sessions,
    /// and not at all for a hidden peer).
    /// Tells peer brokers of a shared mesh that this presence changed.
    fn presence_changed(&self) {
        if let Some(fed) = &self.ctx.fed {
            fed.presence_changed(&self.mesh, self.conn);
        }
    }

    fn announce_arrival(&self) {
        self.presence_changed();
        self.ctx.audit.record(
            self.mesh_id(),
            "peer_joined",
            Some(self.member_id.clone()),
            &self.display_name,
            serde_json::json!({"pubkey": self.routing_key(), "memberPubkey": self.member_pubkey}),
        );
        let Some(Arrival { event, returned }) = &self.announce else {
            return;
        };
        let Some(data) = self.mesh.with_peer(self.conn, |p| {
            p.visible.then(|| {
                let mut d = peer_data(p);
                d.insert(
                    "groups".into(),
                    serde_json::to_value(&p.groups).unwrap_or_default(),
                );
                if let Some((last_seen, summary)) = returned {
                    d.insert("lastSeenAt".into(), iso8601_ms(*last_seen).into());
                    d.insert(
                        "summary".into(),
                        summary.clone().map_or(serde_json::Value::Null, Into::into),
                    );
                }
                d
            })
        }) else {
            return;
        };
        if let Some(data) = data {
            let frame = delivery::system_push(self.mesh_id(), event, data, now_ms());
            self.mesh
                .announce(&frame, self.conn, Some(&self.member_pubkey));
        }
    }

    async fn serve(mut self, mut socket: WebSocket) {
        let ping_every = self.ctx.config.limits.ping_interval;
        let idle_timeout = self.ctx.config.limits.idle_timeout;
        let mut ping = tokio::time::interval_at(crate::time::instant() + ping_every, ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let cancel = self.shared.cancel.clone();
        let writer_tx = self.ctx.writer.clone();
        let mut unflushed: Vec<Sent> = Vec::new();
        let retired = self.predecessor.as_ref().map(|p| p.retired.clone());
        let handover_deadline = crate::time::instant() + Duration::from_secs(10);
        let ended: &'static str = loop {
            if self.drain_wanted && self.claim.is_none() && self.predecessor.is_none() {
                self.start_claim();
            }
            self.flush_outbox();
            let reading = self.pending.len() < MAX_PENDING && self.outbox.len() < MAX_OUTBOX;
            tokio::select! {
                biased;
                () = cancel.cancelled() => break self.cancelled_reason(),
                Some(reply) = self.pending.next(), if !self.pending.is_empty() => {
                    if !self.write_replies(&mut socket, reply).await {
                        break self.failed_reason();
                    }
                }
                Some(out) = self.rx.recv() => {
                    if !self.write_outbound(&mut socket, out, &mut unflushed).await {
                        break self.failed_reason();
                    }
                }
                Some(result) = OptionFuture::from(self.claim.as_mut()), if self.claim.is_some() => {
                    self.claim = None;
                    match result {
                        Ok(Ok(claimed)) => {
                            if !self.deliver_claimed(&mut socket, claimed, &mut unflushed).await {
                                break self.failed_reason();
                            }
                        }
                        Ok(Err(e)) => {
                            // Retry soon: until a drain succeeds, newer messages for this
                            // connection wait in its backlog.
                            warn!(cause = %e, "drain failed; retrying in 1 s");
                            let at = crate::time::instant() + Duration::from_secs(1);
                            self.drain_timer = Some(self.drain_timer.map_or(at, |t| t.min(at)));
                        }
                        Err(_) => break "shutdown",
                    }
                }
                permit = writer_tx.reserve(), if !self.outbox.is_empty() => {
                    match permit {
                        Ok(permit) => {
                            if let Some(op) = self.outbox.pop_front() {
                                permit.send(op);
                            }
                            self.flush_outbox();
                        }
                        Err(_) => break "shutdown",
                    }
                }
                () = self.shared.wake.notified() => {
                    self.drain_wanted = true;
                }
                // Draining starts once the replaced connection gave back its messages
                // (bounded, in case its teardown is stuck).
                () = wait_retired(retired.as_ref(), handover_deadline), if self.predecessor.is_some() => {
                    self.predecessor = None;
                }
                msg = socket.recv(), if reading => {
                    self.last_activity = crate::time::instant();
                    match msg {
                        Some(Ok(Message::Text(t))) => {
                            self.ctx.metrics.frames_received.fetch_add(1, Ordering::Relaxed);
                            if let Some(text) = self.on_text(&t) {
                                if self.pending.is_empty() {
                                    if !self.write_replies(&mut socket, Some(text)).await {
                                        break self.failed_reason();
                                    }
                                } else {
                                    self.pending.push_back(Box::pin(async move { Some(text) }));
                                }
                            }
                        }
                        Some(Ok(Message::Binary(_))) => self.ctx.metrics.frames_dropped.inc("binary"),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Ok(Message::Close(_))) | None => break "client",
                        Some(Err(e)) => {
                            oversize_close(&self.ctx, &mut socket, &e).await;
                            break self.failed_reason();
                        }
                    }
                }
                _ = ping.tick() => {
                    if crate::time::since(self.last_activity) > idle_timeout {
                        break "idle_timeout";
                    }
                    let limit = self.ctx.config.limits.idle_timeout;
                    if !guarded(&self.io_guard, limit, socket.send(Message::Ping(Default::default()))).await {
                        break self.failed_reason();
                    }
                }
                () = sleep_until_opt(self.drain_timer), if self.drain_timer.is_some() => {
                    self.drain_timer = None;
                    self.drain_wanted = true;
                }
            }
        };
        self.ctx.metrics.connections_closed.inc(ended);
        let close_frame = match ended {
            "replaced" => Some(CloseReason::Replaced.frame()),
            "revoked" => Some(CloseReason::Revoked.frame()),
            "slow_consumer" => Some(CloseReason::SlowConsumer.frame()),
            "shutdown" => {
                // Flush what is already queued for this client before saying goodbye.
                self.flush_queued(&mut socket, &mut unflushed).await;
                Some(CloseReason::Shutdown.frame())
            }
            "idle_timeout" => Some((1001, "idle timeout")),
            "client" => {
                answer_close(&mut socket).await;
                None
            }
            _ => None,
        };
        if ended == "revoked" {
            let e = ErrorFrame::new("revoked", revoked_message(&self.mesh.row.name));
            let _ = send_text(&mut socket, &self.ctx, BrokerFrame::Error(e).to_json()).await;
        }
        if let Some((code, reason)) = close_frame {
            let _ = tokio::time::timeout(Duration::from_secs(2), close(&mut socket, code, reason))
                .await;
        }
        info!(reason = ended, "session closed");
        self.teardown().await;
    }

    /// Why the connection was cancelled.
    fn cancelled_reason(&self) -> &'static str {
        match self.shared.close_reason() {
            Some(CloseReason::Replaced) => "replaced",
            Some(CloseReason::Revoked) => "revoked",
            Some(CloseReason::SlowConsumer) => "slow_consumer",
            Some(CloseReason::Shutdown) | None => "shutdown",
        }
    }

    /// Why socket I/O failed: a cancellation that interrupted a write, or the socket.
    fn failed_reason(&self) -> &'static str {
        if self.shared.cancel.is_cancelled() {
            self.cancelled_reason()
        } else {
            "error"
        }
    }

    /// Hands queued store operations to the writer while it has room, without waiting.
    fn flush_outbox(&mut self) {
        while !self.outbox.is_empty() {
            match self.ctx.writer.try_reserve() {
                Some(permit) => {
                    if let Some(op) = self.outbox.pop_front() {
                        permit.send(op);
                    }
                }
                None => break,
            }
        }
    }

    /// Writes a reply and every other reply already available (in order), then flushes.
    /// A reply over the reply budget is cut down to fit (see `meshd_protocol::fit`).
    async fn write_replies(&mut self, socket: &mut WebSocket, first: Option<Utf8Bytes>) -> bool {
        use futures_util::FutureExt as _;
        let (guard, limit) = (self.io_guard.clone(), self.ctx.config.limits.idle_timeout);
        let budget = self.ctx.config.limits.max_frame_bytes;
        let mut next = Some(first);
        let mut n = 0;
        while let Some(reply) = next.take() {
            if let Some(mut text) = reply {
                if let Some(fitted) = meshd_protocol::fit::fit_reply(&text, budget) {
                    self.ctx.metrics.frames_dropped.inc("reply_trimmed");
                    text = fitted.into();
                }
                if !guarded(&guard, limit, socket.feed(Message::Text(text))).await {
                    return false;
                }
                n += 1;
            }
            if n < WRITE_BATCH {
                next = self.pending.next().now_or_never().flatten();
            }
        }
        self.ctx
            .metrics
            .frames_sent
            .fetch_add(n as u64, Ordering::Relaxed);
        guarded(&guard, limit, socket.flush()).await
    }

    /// Writes an outbound item and whatever else is queued (up to a batch), then flushes
    /// once and records the stored messages as delivered (or leased).
    async fn write_outbound(
        &mut self,
        socket: &mut WebSocket,
        first: Outbound,
        unflushed: &mut Vec<Sent>,
    ) -> bool {
        let (guard, limit) = (self.io_guard.clone(), self.ctx.config.limits.idle_timeout);
        let mut next = Some(first);
        let mut n = 0;
        while let Some(out) = next.take() {
            self.shared.dequeued(out.len());
            let (text, sent) = match out {
                Outbound::Frame(t) => (t, None),
                Outbound::Stored { frame, sent } => (frame, Some(sent)),
            };
            if !guarded(&guard, limit, socket.feed(Message::Text(text))).await {
                return false;
            }
            // Only a frame the sink took counts: a cancelled feed sent nothing.
            unflushed.extend(sent);
            n += 1;
            if n < WRITE_BATCH {
                next = self.rx.try_recv().ok();
            }
        }
        self.ctx
            .metrics
            .frames_sent
            .fetch_add(n as u64, Ordering::Relaxed);
        if !guarded(&guard, limit, socket.flush()).await {
            return false;
        }
        self.written(std::mem::take(unflushed));
        true
    }

    /// After stored messages reached the socket: a client that acknowledges keeps them
    /// leased until `client_ack` (offered again when the lease ends); for any other
    /// client they are delivered.
    fn written(&mut self, sent: Vec<Sent>) {
        if sent.is_empty() {
            return;
        }
        if self.shared.acks.load(Ordering::SeqCst) {
            let lease = self.ctx.config.limits.ack_lease;
            // Rows claimed before the client announced acknowledgements hold an
            // open-ended lease: bound it now.
            let open: Vec<String> = sent
                .iter()
                .filter(|s| !s.finite_lease)
                .map(|s| s.id.clone())
                .collect();
            if !open.is_empty() {
                let until = self.lease_until(true, now_ms());
                self.queue_write(WriteOp::Lease { ids: open, until });
            }
            let at = crate::time::instant() + lease;
            self.drain_timer = Some(self.drain_timer.map_or(at, |t| t.min(at)));
        } else {
            self.queue_write(WriteOp::MarkDelivered {
                ids: sent.into_iter().map(|s| s.id).collect(),
                at: now_ms(),
            });
        }
    }

    fn start_claim(&mut self) {
        self.drain_wanted = false;
        let Some(max) = self
            .mesh
            .with_peer(self.conn, |p| p.status.status.max_admitted())
        else {
            return;
        };
        let now = now_ms();
        let lease_until = self.lease_until(self.shared.acks.load(Ordering::SeqCst), now);
        self.claim_leased = lease_until != i64::MAX;
        let (tx, rx) = oneshot::channel();
        self.queue_write(Op::Claim {
            peer: self.shared.clone(),
            spec: Box::new(ClaimSpec {
                stamp: 0,
                mesh_id: self.mesh_id().to_owned(),
                member_key: self.member_pubkey.clone(),
                session_key: self.routing_key().to_owned(),
                max_priority: max.rank(),
                conn: lease_owner(self.conn),
                lease_until,
                now,
                limit: CLAIM_LIMIT,
            }),
            reply: tx,
        });
        self.claim = Some(rx);
        debug!(max_priority = max.as_str(), lease_until, "drain: claiming");
    }

    async fn deliver_claimed(
        &mut self,
        socket: &mut WebSocket,
        claimed: Claimed,
        unflushed: &mut Vec<Sent>,
    ) -> bool {
        let full = claimed.rows.len() as i64 >= CLAIM_LIMIT;
        let stamp = claimed.stamp;
        let (guard, limit) = (self.io_guard.clone(), self.ctx.config.limits.idle_timeout);
        debug!(rows = claimed.rows.len(), next_lease = ?claimed.next_lease_expiry, "drain: claimed");
        // The claim used the status of when it started; the peer may have become busy
        // since. What it no longer admits goes back (it is drained again on idle).
        let max = self
            .mesh
            .with_peer(self.conn, |p| p.status.status.max_admitted().rank())
            .unwrap_or(Priority::Now.rank());
        let (rows, not_now): (Vec<_>, Vec<_>) =
            claimed.rows.into_iter().partition(|r| r.priority <= max);
        self.ctx
            .metrics
            .direct_drained
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        if !not_now.is_empty() {
            self.queue_write(WriteOp::Release {
                conn: lease_owner(self.conn),
                ids: not_now.into_iter().map(|r| r.id).collect(),
            });
        }
        for row in rows {
            let id = row.id.clone();
            let msg = Message::Text(delivery::stored_push(self.mesh_id(), row));
            if !guarded(&guard, limit, socket.feed(msg)).await {
                return false;
            }
            unflushed.push(Sent {
                id,
                finite_lease: self.claim_leased,
            });
            self.ctx.metrics.frames_sent.fetch_add(1, Ordering::Relaxed);
        }
        if !guarded(&guard, limit, socket.flush()).await {
            return false;
        }
        self.written(std::mem::take(unflushed));
        if let Some(at) = claimed.next_lease_expiry {
            let wait =
                Duration::from_millis(u64::try_from(at.saturating_sub(now_ms())).unwrap_or(0));
            let at = crate::time::instant() + wait;
            self.drain_timer = Some(self.drain_timer.map_or(at, |t| t.min(at)));
        }
        if full {
            self.drain_wanted = true;
        } else {
            // Nothing more was waiting when the claim passed the router: ask it to put
            // this connection back on the hot path (it refuses, and a spill wakes us,
            // if anything spilled since).
            self.queue_write(Op::CaughtUp {
                peer: self.shared.clone(),
                stamp,
            });
        }
        true
    }

    /// At shutdown: write what is queued for this client, within a short budget.
    async fn flush_queued(&mut self, socket: &mut WebSocket, unflushed: &mut Vec<Sent>) {
        // The connection's token is already cancelled; the 2 s budget bounds this instead.
        self.io_guard = CancellationToken::new();
        let budget = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(out) = self.rx.try_recv() {
                if !self.write_outbound(socket, out, unflushed).await {
                    break;
                }
            }
        });
        let _ = budget.await;
    }

    /// Handles one text frame. Returns an immediate reply, if any; asynchronous replies
    /// are queued on `pending`.
    fn on_text(&mut self, text: &str) -> Option<Utf8Bytes> {
        let inbound = match self.machine.on_text(text) {
            Verdict::Request(inbound) => inbound,
            Verdict::Reply(e) => return Some(BrokerFrame::Error(e).to_json().into()),
            Verdict::Ignore(reason) => {
                self.ctx.metrics.frames_dropped.inc(reason);
                return None;
            }
            Verdict::Handshake(_) => return None,
        };
        let req_id = inbound.req_id;
        let now = now_ms();
        let small_ack = |req_id: Option<String>| -> Option<Utf8Bytes> {
            Some(
                BrokerFrame::Ack(Ack {
                    id: req_id.clone().unwrap_or_default(),
                    message_id: String::new(),
                    queued: false,
                    error: None,
                    req_id,
                })
                .to_json()
                .into(),
            )
        };
        match inbound.frame {
            ClientFrame::Send(send) => self.on_send(req_id, *send, now),
            ClientFrame::SetStatus { status } => {
                let fresh = i64::try_from(meshd_config::defaults::STATUS_FRESH_WINDOW.as_millis())
                    .unwrap_or(i64::MAX);
                // Unlike the reference, becoming more available releases held messages now.
                // (Under the mesh lock: no send may see the new status before the drain
                // that must come first is set up.)
                self.mesh.with_peer(self.conn, |p| {
                    let before = p.status.status.max_admitted();
                    p.status.write(status, StatusSource::Manual, now, fresh);
                    if p.status.status.max_admitted() > before {
                        p.shared.spill();
                    }
                });
                self.presence_changed();
                None
            }
            ClientFrame::SetSummary { summary } => {
                self.mesh
                    .with_peer(self.conn, |p| p.summary = Some(summary));
                self.presence_changed();
                None
            }
            ClientFrame::SetVisible { visible } => {
                let changed = self.mesh.with_peer(self.conn, |p| {
                    let changed = p.visible != visible;
                    p.visible = visible;
                    changed.then(|| peer_data(p))
                });
                if let Some(Some(data)) = changed {
                    let event = if visible {
                        "peer_visible"
                    } else {
                        "peer_hidden"
                    };
                    let frame = delivery::system_push(self.mesh_id(), event, data, now);
                    self.mesh.announce(&frame, self.conn, None);
                    self.presence_changed();
                }
                small_ack(req_id)
            }
            ClientFrame::SetProfile(patch) => {
                self.mesh.with_peer(self.conn, |p| {
                    for (k, v) in patch.fields {
                        p.profile.insert(k.to_owned(), v);
                    }
                });
                self.presence_changed();
                small_ack(req_id)
            }
            ClientFrame::SetStats(stats) => {
                self.mesh.with_peer(self.conn, |p| p.stats = Some(stats));
                self.presence_changed();
                None
            }
            ClientFrame::JoinGroup(group) => {
                self.mesh.with_peer(self.conn, |p| {
                    if let Some(i) = p.groups.iter().position(|g| g.name == group.name) {
                        p.groups[i].role = group.role;
                    } else if p.groups.len() < meshd_protocol::client::MAX_GROUPS {
                        p.groups.push(group);
                    }
                });
                self.presence_changed();
                None
            }
            ClientFrame::LeaveGroup { name } => {
                self.mesh
                    .with_peer(self.conn, |p| p.groups.retain(|g| g.name != name));
                self.presence_changed();
                None
            }
            ClientFrame::ListPeers => Some(
                BrokerFrame::PeersList(PeersList {
                    peers: self.mesh.peers_for(&self.member_pubkey),
                    req_id,
                })
                .to_json()
                .into(),
            ),
            ClientFrame::SetState { key, value } => {
                let json: Arc<str> =
                    value.map_or_else(|| Arc::from("null"), |v| Arc::from(v.get()));
                let limits = &self.ctx.config.limits;
                let ok = json.len() <= limits.max_state_value_bytes
                    && self
                        .mesh
                        .state_set(
                            &key,
                            StateValue {
                                value: json.clone(),
                                updated_by: self.display_name.clone(),
                                updated_at: now,
                                member_id: Some(self.member_id.clone()),
                            },
                            self.conn,
                            limits.max_state_bytes_per_mesh,
                            self.ctx.config.quotas.state_bytes_per_member,
                        )
                        .is_ok();
                if ok {
                    // The value's digest, not the value: the log must not copy state.
                    self.ctx.audit.record(
                        self.mesh_id(),
                        "state_set",
                        Some(self.member_id.clone()),
                        &self.display_name,
                        serde_json::json!({"key": key, "valueSha256": crate::audit::digest(&json)}),
                    );
                    if let Some(fed) = &self.ctx.fed {
                        fed.state_set(
                            self.mesh_id(),
                            meshd_protocol::fed::StateSet {
                                mesh_id: self.mesh_id().to_owned(),
                                key: key.clone(),
                                value: json.to_string(),
                                updated_by: self.display_name.clone(),
                                updated_at: now,
                                member_pubkey: self.member_pubkey.clone(),
                            },
                        );
                    }
                    self.queue_write(WriteOp::SetState {
                        mesh_id: self.mesh_id().to_owned(),
                        key,
                        value: json,
                        updated_by: self.display_name.clone(),
                        member_id: Some(self.member_id.clone()),
                        at: now,
                    });
                } else {
                    // set_state never gets a reply (§0.6); the refusal is logged and counted.
                    warn!(key = %key, bytes = json.len(), "set_state refused: over a state size limit or quota");
                    self.ctx.metrics.frames_dropped.inc("state_too_large");
                }
                None
            }
            ClientFrame::GetState { key } => {
                let frame = match self.mesh.state_get(&key) {
                    Some(v) => StateResult {
                        key,
                        value: raw(&v.value),
                        updated_at: iso8601_ms(v.updated_at),
                        updated_by: v.updated_by,
                        req_id,
                    },
                    None => StateResult {
                        key,
                        value: raw("null"),
                        updated_at: String::new(),
                        updated_by: String::new(),
                        req_id,
                    },
                };
                Some(BrokerFrame::StateResult(frame).to_json().into())
            }
            ClientFrame::ListState => {
                let entries = self
                    .mesh
                    .state_list()
                    .into_iter()
                    .map(|(key, v)| StateEntry {
                        key,
                        value: raw(&v.value),
                        updated_by: v.updated_by,
                        updated_at: iso8601_ms(v.updated_at),
                    })
                    .collect();
                Some(
                    BrokerFrame::StateList(StateList { entries, req_id })
                        .to_json()
                        .into(),
                )
            }
            ClientFrame::MessageStatus { message_id } => {
                self.queue_message_status(message_id, req_id);
                None
            }
            ClientFrame::SetClock { speed } => {
                let status = self.ctx.clocks.set(&self.mesh, speed, req_id);
                self.clock_changed();
                Some(BrokerFrame::ClockStatus(status).to_json().into())
            }
            ClientFrame::PauseClock | ClientFrame::ResumeClock => {
                let status = if matches!(inbound.frame, ClientFrame::PauseClock) {
                    self.ctx.clocks.pause(self.mesh_id(), req_id.clone())
                } else {
                    self.ctx.clocks.resume(&self.mesh, req_id.clone())
                };
                if status.is_some() {
                    self.clock_changed();
                }
                Some(
                    status
                        .map_or_else(
                            || {
                                BrokerFrame::Error(
                                    ErrorFrame::new(
                                        "no_clock",
                                        "this mesh has no clock: set_clock first",
                                    )
                                    .with_req_id(req_id),
                                )
                            },
                            BrokerFrame::ClockStatus,
                        )
                        .to_json()
                        .into(),
                )
            }
            ClientFrame::GetClock => Some(
                BrokerFrame::ClockStatus(self.ctx.clocks.get(self.mesh_id(), req_id))
                    .to_json()
                    .into(),
            ),
            ClientFrame::Publish { stream, data } => {
                if let Some(fed) = &self.ctx.fed {
                    fed.stream_data(meshd_protocol::fed::StreamPublish {
                        mesh_id: self.mesh_id().to_owned(),
                        stream: stream.clone(),
                        data: data.get().to_owned(),
                        published_by: self.display_name.clone(),
                        member_pubkey: self.member_pubkey.clone(),
                    });
                }
                let frame = BrokerFrame::StreamData(meshd_protocol::broker::StreamData {
                    stream: stream.clone(),
                    data,
                    published_by: self.display_name.clone(),
                });
                self.mesh
                    .publish(&stream, self.conn, &Utf8Bytes::from(frame.to_json()));
                None
            }
            ClientFrame::Subscribe { stream } => {
                if self
                    .mesh
                    .subscribe(self.conn, &stream, MAX_STREAMS_PER_CONN)
                {
                    Some(
                        BrokerFrame::Subscribed(meshd_protocol::broker::Subscribed {
                            stream,
                            req_id,
                        })
                        .to_json()
                        .into(),
                    )
                } else {
                    // The client does not wait for an answer: refuse by logging only.
                    warn!(stream = %stream, "subscription refused: too many streams");
                    self.ctx.metrics.frames_dropped.inc("invalid");
                    None
                }
            }
            ClientFrame::Unsubscribe { stream } => {
                self.mesh.unsubscribe(self.conn, &stream);
                None
            }
            ClientFrame::AuditQuery { .. } | ClientFrame::AuditVerify => {
                self.queue_audit(inbound.frame, req_id);
                None
            }
            ClientFrame::Schedule(_)
            | ClientFrame::ListScheduled
            | ClientFrame::CancelScheduled { .. } => self.on_schedule(inbound.frame, req_id, now),
            ClientFrame::GetFile { .. }
            | ClientFrame::ListFiles { .. }
            | ClientFrame::FileStatus { .. }
            | ClientFrame::DeleteFile { .. }
            | ClientFrame::GrantFileAccess { .. } => {
                self.queue_files(inbound.frame, req_id, now);
                None
            }
            ClientFrame::PeerFileRequest { .. }
            | ClientFrame::PeerDirRequest { .. }
            | ClientFrame::PeerFileResponse(_)
            | ClientFrame::PeerDirResponse(_) => self.on_relay(inbound.frame, req_id),
            ClientFrame::McpRegister(_)
            | ClientFrame::McpUnregister { .. }
            | ClientFrame::McpList
            | ClientFrame::McpCall(_)
            | ClientFrame::McpCallResponse(_) => self.on_mcp(inbound.frame, req_id, now),
            ClientFrame::MeshInfo => {
                self.queue_mesh_info(req_id);
                None
            }
            frame @ (ClientFrame::ShareContext(_)
            | ClientFrame::GetContext { .. }
            | ClientFrame::ListContexts) => {
                self.queue_context(frame, req_id, now);
                None
            }
            frame @ (ClientFrame::Remember { .. }
            | ClientFrame::Recall { .. }
            | ClientFrame::GetMemory { .. }
            | ClientFrame::Forget { .. }) => {
                self.queue_memory(frame, req_id, now);
                None
            }
            frame @ (ClientFrame::CreateTask(_)
            | ClientFrame::ClaimTask { .. }
            | ClientFrame::CompleteTask { .. }
            | ClientFrame::GetTask { .. }
            | ClientFrame::ListTasks { .. }) => {
                self.queue_task(frame, req_id, now);
                None
            }
            frame @ (ClientFrame::CreateStream { .. } | ClientFrame::ListStreams) => {
                self.queue_stream(frame, req_id, now);
                None
            }
            frame @ (ClientFrame::CreateWebhook { .. }
            | ClientFrame::ListWebhooks
            | ClientFrame::DeleteWebhook { .. }) => {
                self.queue_webhook(frame, req_id, now);
                None
            }
            frame @ (ClientFrame::ShareSkill(_)
            | ClientFrame::GetSkill { .. }
            | ClientFrame::ListSkills { .. }
            | ClientFrame::RemoveSkill { .. }) => {
                self.queue_skill(frame, req_id, now);
                None
            }
            ClientFrame::ClientAck {
                client_message_id,
                broker_message_id,
            } => {
                self.shared.acks.store(true, Ordering::SeqCst);
                self.queue_write(WriteOp::Ack {
                    mesh_id: self.mesh_id().to_owned(),
                    keys: [self.member_pubkey.clone(), self.routing_key().to_owned()],
                    message_id: broker_message_id,
                    client_message_id,
                    at: now,
                });
                None
            }
            // Handshakes and unsupported frames are answered by the protocol machine.
            _ => None,
        }
    }

    fn on_send(
        &mut self,
        req_id: Option<String>,
        send: meshd_protocol::client::Send,
        now: i64,
    ) -> Option<Utf8Bytes> {
        let id = send.id.unwrap_or_default();
        let metrics = self.ctx.metrics.clone();
        let refuse = |reason: &'static str, error: String| -> Option<Utf8Bytes> {
            metrics.messages_rejected.inc(reason);
            Some(
                BrokerFrame::Ack(Ack {
                    id: id.clone(),
                    message_id: String::new(),
                    queued: false,
                    error: Some(error),
                    req_id: req_id.clone(),
                })
                .to_json()
                .into(),
            )
        };
        if !self.bucket.take(crate::time::instant()) {
            let l = &self.ctx.config.limits;
            return refuse(
                "rate_limited",
                format!(
                    "rate_limit: max {}/s (burst {}) — slow down",
                    l.sends_per_second, l.send_burst
                ),
            );
        }
        let priority = match send.priority.as_deref() {
            None => Priority::Next,
            Some(p) => match Priority::parse(p) {
                Some(p) => p,
                None => {
                    return refuse(
                        "invalid_priority",
                        format!("invalid priority {p:?}: use now, next or low"),
                    );
                }
            },
        };
        let target = match TargetSpec::parse(&send.target_spec) {
            Ok(t) => t,
            Err(e) => return refuse("invalid_target", format!("invalid targetSpec: {e}")),
        };
        if send.client_message_id.is_some() {
            self.shared.acks.store(true, Ordering::SeqCst);
        }
        let envelope = Envelope {
            id: crate::ids::message_id(),
            mesh: self.mesh.clone(),
            sender_pubkey: self.routing_key().to_owned(),
            author: Some(Author {
                member_id: self.member_id.clone(),
                member_pubkey: self.member_pubkey.clone(),
                name: self.display_name.clone(),
            }),
            target: Target::Spec(target),
            target_spec: send.target_spec,
            priority,
            body: Body::Sealed {
                nonce: send.nonce,
                ciphertext: send.ciphertext,
            },
            subtype: None,
            client_message_id: send.client_message_id,
            created_at: now,
            expires_at: delivery::expires_at(&self.ctx, now),
            origin: Origin::Client { conn: self.conn },
        };
        let accepted = match delivery::submit(&self.ctx, envelope, now) {
            Ok(a) => a,
            Err(e) => return refuse(e.code(), e.to_string()),
        };
        // Every message a client sends is stored (a multicast keeps its metadata).
        let (op, commit) = accepted.write?;
        self.queue_write(op);
        let message_id = accepted.message_id;
        let metrics = self.ctx.metrics.clone();
        self.pending.push_back(Box::pin(async move {
            let (queued, message_id, error) = match commit.committed().await {
                Ok(()) => (true, message_id, None),
                Err(StoreError::Closed) => (
                    false,
                    String::new(),
                    Some("the broker is shutting down; retry".to_owned()),
                ),
                Err(e) => {
                    metrics.messages_rejected.inc("store_error");
                    warn!(cause = %e, "storing a message failed");
                    (
                        false,
                        String::new(),
                        Some("the broker could not store the message; retry".to_owned()),
                    )
                }
            };
            Some(
                BrokerFrame::Ack(Ack {
                    id,
                    message_id,
                    queued,
                    error,
                    req_id,
                })
                .to_json()
                .into(),
            )
        }));
        None
    }

    /// Tasks. `claim_task` and `complete_task` are answered with the task list; their
    /// failures are answered only to a request with a `_reqId` (the CLI sends them
    /// without one, and would hand an uncorrelated error to another waiter).
    fn queue_task(&mut self, frame: ClientFrame, req_id: Option<String>, now: i64) {
        use meshd_protocol::broker::{TaskCreated, TaskEntry, TaskList};
        let db = self.ctx.db.clone();
        let ctx = self.ctx.clone();
        let mesh_id = self.mesh_id().to_owned();
        let me = self.display_name.clone();
        let member_pubkey = self.member_pubkey.clone();
        let fed = self.ctx.fed.clone();
        let hub = self.mesh.clone();
        // A task that changed here goes to the mesh's other brokers.
        let replicate = move |db: crate::store::Db, mesh_id: String, id: String| async move {
            if let Some(fed) = fed
                && let Ok(Some(t)) = db.task_full(&mesh_id, &id).await
            {
                fed.task_changed(crate::fed::task_set(&hub, t));
            }
        };
        self.pending.push_back(Box::pin(async move {
            let error = |code: &'static str, msg: &str, req_id: Option<String>| {
                req_id.is_some().then(|| {
                    BrokerFrame::Error(ErrorFrame::new(code, msg).with_req_id(req_id))
                        .to_json()
                        .into()
                })
            };
            let list = |rows: Vec<crate::store::tasks::TaskRow>, req_id| {
                BrokerFrame::TaskList(TaskList {
                    tasks: rows
                        .into_iter()
                        .map(|t| TaskEntry {
                            tags: serde_json::from_str(&t.tags).unwrap_or_default(),
                            id: t.id,
                            title: t.title,
                            assignee: t.assignee,
                            claimed_by: t.claimed_by,
                            status: t.status,
                            priority: t.priority,
                            created_by: t.created_by,
                            created_at: iso8601_ms(t.created_at),
                            result: t.result,
                        })
                        .collect(),
                    req_id,
                })
            };
            let store_err = |e: &StoreError, req_id| {
                warn!(cause = %e, "tasks");
                error("internal", "the broker's store is unavailable", req_id)
            };
            let reply = match frame {
                ClientFrame::CreateTask(t) => {
                    let row = crate::store::tasks::TaskRow {
                        id: crate::ids::random_id(),
                        mesh_id,
                        title: t.title,
                        assignee: t.assignee,
                        claimed_by: None,
                        priority: t.priority.unwrap_or_else(|| "normal".into()),
                        status: "open".into(),
                        tags: serde_json::to_string(&t.tags).unwrap_or_else(|_| "[]".into()),
                        result: None,
                        created_by: Some(me),
                        created_at: now,
                    };
                    let weight =
                        i64::try_from(row.title.len() + row.tags.len()).unwrap_or(i64::MAX);
                    if let Err(e) = crate::quota::check(
                        &ctx,
                        crate::quota::Kind::Tasks,
                        &row.mesh_id,
                        &member_pubkey,
                        crate::quota::Usage::new(1, weight),
                    ) {
                        return error(crate::quota::QuotaExceeded::CODE, &e.to_string(), req_id);
                    }
                    match db.insert_task(&row, &member_pubkey).await {
                        Ok(true) => {
                            replicate(db.clone(), row.mesh_id.clone(), row.id.clone()).await;
                            BrokerFrame::TaskCreated(TaskCreated { id: row.id, req_id })
                        }
                        Ok(false) => {
                            return error(
                                "tasks_full",
                                "this mesh has too many open tasks",
                                req_id,
                            );
                        }
                        Err(e) => return store_err(&e, req_id),
                    }
                }
                ClientFrame::ClaimTask { task_id } => {
                    match db.claim_task(&mesh_id, &task_id, &me, now).await {
                        Ok(true) => {
                            replicate(db.clone(), mesh_id.clone(), task_id.clone()).await;
                            match db.tasks(&mesh_id, None, None).await {
                                Ok(rows) => list(rows, req_id),
                                Err(e) => return store_err(&e, req_id),
                            }
                        }
                        Ok(false) => {
                            return error(
                                "task_not_claimable",
                                "no open task with that id",
                                req_id,
                            );
                        }
                        Err(e) => return store_err(&e, req_id),
                    }
                }
                ClientFrame::CompleteTask { task_id, result } => {
                    // A result is weighed against the task's creator (and the mesh).
                    if let Some(r) = &result {
                        let creator = match db.task_full(&mesh_id, &task_id).await {
                            Ok(t) => t
                                .and_then(|t| t.creator_pubkey)
                                .unwrap_or_else(|| member_pubkey.clone()),
                            Err(e) => return store_err(&e, req_id),
                        };
                        let weight = i64::try_from(r.len()).unwrap_or(i64::MAX);
                        if let Err(e) = crate::quota::check(
                            &ctx,
                            crate::quota::Kind::Tasks,
                            &mesh_id,
                            &creator,
                            crate::quota::Usage::new(0, weight),
                        ) {
                            return error(
                                crate::quota::QuotaExceeded::CODE,
                                &e.to_string(),
                                req_id,
                            );
                        }
                    }
                    match db
                        .complete_task(&mesh_id, &task_id, result.as_deref(), now)
                        .await
                    {
                        Ok(true) => {
                            replicate(db.clone(), mesh_id.clone(), task_id.clone()).await;
                            match db.tasks(&mesh_id, None, None).await {
                                Ok(rows) => list(rows, req_id),
                                Err(e) => return store_err(&e, req_id),
                            }
                        }
                        Ok(false) => {
                            return error("task_not_found", "no task with that id", req_id);
                        }
                        Err(e) => return store_err(&e, req_id),
                    }
                }
                ClientFrame::ListTasks { status, assignee } => {
                    match db
                        .tasks(&mesh_id, status.as_deref(), assignee.as_deref())
                        .await
                    {
                        Ok(rows) => list(rows, req_id),
                        Err(e) => return store_err(&e, req_id),
                    }
                }
                ClientFrame::GetTask { task_id } => match db.task_full(&mesh_id, &task_id).await {
                    Ok(Some(t)) => {
                        let status = t.progress().status().to_owned();
                        BrokerFrame::TaskData(meshd_protocol::broker::TaskData {
                            task: TaskEntry {
                                tags: serde_json::from_str(&t.tags).unwrap_or_default(),
                                id: t.id,
                                title: t.title,
                                assignee: t.assignee,
                                claimed_by: t.claimed_by,
                                status,
                                priority: t.priority,
                                created_by: t.created_by,
                                created_at: iso8601_ms(t.created_at),
                                result: t.result,
                            },
                            req_id,
                        })
                    }
                    Ok(None) => {
                        return error("not_found", "no such task in this mesh", req_id);
                    }
                    Err(e) => return store_err(&e, req_id),
                },
                _ => return None,
            };
            Some(reply.to_json().into())
        }));
    }

    /// The mesh's clock changed here: its other brokers hear of it.
    fn clock_changed(&self) {
        if let (Some(fed), Some(set)) = (&self.ctx.fed, self.ctx.clocks.set_of(self.mesh_id())) {
            fed.clock_changed(set);
        }
    }

    /// A session of the member is back: its persistent MCP servers that were offline are
    /// hosted by this session again (`mcp_restored` to everyone, stored as online).
    fn restore_mcp(&mut self) {
        let host = crate::mcp::Host {
            conn: self.conn,
            shared: self.shared.clone(),
        };
        let restored =
            self.ctx
                .mcp
                .member_back(self.mesh_id(), &self.member_id, &self.display_name, &host);
        if restored.is_empty() {
            return;
        }
        let now = now_ms();
        for name in &restored {
            let mut data = serde_json::Map::new();
            data.insert("serverName".into(), name.clone().into());
            data.insert("hostedBy".into(), self.display_name.clone().into());
            let frame = delivery::system_push(self.mesh_id(), "mcp_restored", data, now);
            self.mesh.announce(&frame, 0, None);
        }
        let sets = restored
            .iter()
            .filter_map(|n| self.ctx.mcp.set_of(self.mesh_id(), n))
            .collect();
        crate::mcp::publish(&self.ctx, self.mesh_id(), sets);
        for name in restored {
            self.ctx.mcp.persist(crate::mcp::StoreOp::Offline {
                mesh_id: self.mesh_id().to_owned(),
                name,
                since: None,
            });
        }
    }

    /// Stored files: `get_file`, `list_files`, `file_status`, `delete_file`,
    /// `grant_file_access` (see `files`). A reader sees a file when it is the uploader,
    /// the file has no target, or the target includes it; `delete_file` is the
    /// uploader's or an admin's; `grant_file_access` the owner's.
    fn queue_files(&mut self, frame: ClientFrame, req_id: Option<String>, now: i64) {
        use meshd_protocol::broker::{
            FileAccess, FileEntry, FileList, FileStatusResult, FileUrl, GrantFileAccessOk,
        };
        let ctx = self.ctx.clone();
        let mesh_id = self.mesh_id().to_owned();
        let member_id = self.member_id.clone();
        let keys = [self.routing_key().to_owned(), self.member_pubkey.clone()];
        let me = self.display_name.clone();
        let groups = self
            .mesh
            .local_peer(self.conn, |p| p.groups.clone())
            .unwrap_or_default();
        let admin = self
            .mesh
            .member(&self.member_pubkey)
            .is_some_and(|m| m.role == "admin");
        let (shared, member_pubkey) = (self.shared.clone(), self.member_pubkey.clone());
        self.pending.push_back(Box::pin(async move {
            let key_refs = [keys[0].as_str(), keys[1].as_str()];
            // A file another broker of the mesh holds: `get_file` asks it for a URL (at
            // that broker); the owner's operations are made there.
            let held_by = match &frame {
                ClientFrame::GetFile { file_id }
                | ClientFrame::FileStatus { file_id }
                | ClientFrame::DeleteFile { file_id }
                | ClientFrame::GrantFileAccess { file_id, .. } => {
                    match ctx.db.file(&mesh_id, file_id, now).await {
                        Ok(Some(f)) => f.home_broker.clone().map(|b| (f, b)),
                        Ok(None) => None,
                        Err(e) => return store_unavailable("reading a file", req_id, &e),
                    }
                }
                _ => None,
            };
            if let Some((f, broker)) = held_by {
                if !matches!(frame, ClientFrame::GetFile { .. }) {
                    return error(
                        "held_elsewhere",
                        format!("this file is held by broker {broker}: its owner manages it there"),
                        req_id,
                    );
                }
                if !crate::files::may_read(&f, &member_id, &key_refs, &groups) {
                    return error("forbidden", "this file is not shared with you", req_id);
                }
                let broker: Arc<str> = Arc::from(broker.as_str());
                let Some(ask_id) = ctx
                    .files
                    .ask(broker.clone(), &shared, req_id.clone(), &f.id)
                else {
                    return error(
                        "rate_limited",
                        "too many file requests waiting for other brokers; retry shortly",
                        req_id,
                    );
                };
                let ask = meshd_protocol::fed::FileUrlAsk {
                    mesh_id: mesh_id.clone(),
                    ask_id: ask_id.clone(),
                    file_id: f.id.clone(),
                    member_id: member_id.clone(),
                    member_pubkey,
                    reader_key: keys[0].clone(),
                    reader_name: me,
                    groups: groups.iter().map(|g| g.name.clone()).collect(),
                };
                let sent = ctx.fed.as_ref().is_some_and(|fed| {
                    fed.relay_send(
                        &broker,
                        &mesh_id,
                        meshd_protocol::fed::Frame::FileUrlAsk(Box::new(ask)),
                    )
                });
                if !sent {
                    ctx.files.unask(&ask_id);
                    return error(
                        "unavailable",
                        format!("the broker holding this file ({broker}) cannot be reached now"),
                        req_id,
                    );
                }
                // The answer comes through the outbound queue (see `files::Files::answered`).
                return None;
            }
            let readable = |f: &crate::store::files::FileRow| {
                crate::files::may_read(f, &member_id, &key_refs, &groups)
            };
            let file_id = match &frame {
                ClientFrame::GetFile { file_id }
                | ClientFrame::FileStatus { file_id }
                | ClientFrame::DeleteFile { file_id }
                | ClientFrame::GrantFileAccess { file_id, .. } => Some(file_id.clone()),
                _ => None,
            };
            let file = match &file_id {
                Some(id) => match ctx.db.file(&mesh_id, id, now).await {
                    Ok(f) => f,
                    Err(e) => return store_unavailable("reading a file", req_id, &e),
                },
                None => None,
            };
            let reply = match frame {
                ClientFrame::GetFile { file_id } => {
                    let Some(f) = file else {
                        return error("not_found", "no such file in this mesh", req_id);
                    };
                    if !readable(&f) {
                        return error("forbidden", "this file is not shared with you", req_id);
                    }
                    let sealed_key = if f.encrypted != 0 {
                        match ctx.db.sealed_file_key(&f.id, &key_refs).await {
                            Ok(k) => k,
                            Err(e) => return store_unavailable("reading a file key", req_id, &e),
                        }
                    } else {
                        None
                    };
                    if let Err(e) = ctx.db.record_file_access(&f.id, &keys[0], &me, now).await {
                        return store_unavailable("recording a download", req_id, &e);
                    }
                    let base = crate::http::hook_base(&ctx.config);
                    BrokerFrame::FileUrl(FileUrl {
                        url: ctx.files.signed_url(
                            &base,
                            &mesh_id,
                            &f.id,
                            now + crate::files::URL_TTL_MS,
                        ),
                        file_id,
                        name: f.name,
                        encrypted: f.encrypted != 0,
                        sealed_key,
                        req_id,
                    })
                }
                ClientFrame::ListFiles { query, from } => {
                    let rows = match ctx.db.files(&mesh_id, now).await {
                        Ok(r) => r,
                        Err(e) => return store_unavailable("listing files", req_id, &e),
                    };
                    let q = query.map(|q| q.to_lowercase());
                    BrokerFrame::FileList(FileList {
                        files: rows
                            .into_iter()
                            .filter(|f| readable(f))
                            .filter(|f| {
                                q.as_ref().is_none_or(|q| f.name.to_lowercase().contains(q))
                            })
                            .filter(|f| from.as_ref().is_none_or(|w| &f.uploaded_by_name == w))
                            .take(100)
                            .map(|f| FileEntry {
                                tags: serde_json::from_str(&f.tags).unwrap_or_default(),
                                id: f.id,
                                name: f.name,
                                size: f.size_bytes,
                                uploaded_by: f.uploaded_by_name,
                                uploaded_at: iso8601_ms(f.uploaded_at),
                                persistent: f.persistent != 0,
                                encrypted: f.encrypted != 0,
                            })
                            .collect(),
                        req_id,
                    })
                }
                ClientFrame::FileStatus { file_id } => {
                    let Some(f) = file.filter(|f| readable(f)) else {
                        return error("not_found", "no such file in this mesh", req_id);
                    };
                    let accesses = match ctx.db.file_accesses(&f.id).await {
                        Ok(a) => a,
                        Err(e) => return store_unavailable("reading downloads", req_id, &e),
                    };
                    BrokerFrame::FileStatusResult(FileStatusResult {
                        file_id,
                        accesses: accesses
                            .into_iter()
                            .map(|(peer_name, at)| FileAccess {
                                peer_name,
                                accessed_at: iso8601_ms(at),
                            })
                            .collect(),
                        req_id,
                    })
                }
                ClientFrame::DeleteFile { file_id } => {
                    // Answered with an `ack` (as the reference), carrying the refusal.
                    let refusal = match &file {
                        None => Some("no such file in this mesh"),
                        Some(f) if f.uploader_member_id != member_id && !admin => {
                            Some("only the file's uploader or an admin may delete it")
                        }
                        Some(_) => None,
                    };
                    if refusal.is_none() {
                        match ctx.db.delete_file(&file_id, now).await {
                            Ok(deleted) => {
                                if deleted && let Some(f) = &file {
                                    crate::quota::recount_member(
                                        &ctx,
                                        crate::quota::Kind::Files,
                                        &mesh_id,
                                        &f.uploader_member_id,
                                    )
                                    .await;
                                }
                                ctx.files.remove(&mesh_id, &file_id).await;
                                crate::files::publish(
                                    &ctx,
                                    &mesh_id,
                                    vec![crate::files::file_removal(&file_id)],
                                );
                            }
                            Err(e) => return store_unavailable("deleting a file", req_id, &e),
                        }
                    }
                    BrokerFrame::Ack(Ack {
                        id: file_id.clone(),
                        message_id: file_id,
                        queued: false,
                        error: refusal.map(str::to_owned),
                        req_id,
                    })
                }
                ClientFrame::GrantFileAccess {
                    file_id,
                    peer_pubkey,
                    sealed_key,
                } => {
                    let Some(f) = file else {
                        return error("not_found", "no such file in this mesh", req_id);
                    };
                    if !key_refs.contains(&f.owner_pubkey.as_str())
                        && f.uploader_member_id != member_id
                    {
                        return error(
                            "forbidden",
                            "only the file's owner may grant access",
                            req_id,
                        );
                    }
                    let peer = peer_pubkey.to_ascii_lowercase();
                    if let Err(e) = ctx
                        .db
                        .grant_file_key(&f.id, &peer, &sealed_key, &keys[0], now)
                        .await
                    {
                        return store_unavailable("storing a file key", req_id, &e);
                    }
                    BrokerFrame::GrantFileAccessOk(GrantFileAccessOk {
                        file_id,
                        peer_pubkey,
                        req_id,
                    })
                }
                _ => return None,
            };
            Some(reply.to_json().into())
        }));
    }

    /// The peer-to-peer file relay (see `relay`).
    fn on_relay(&mut self, frame: ClientFrame, req_id: Option<String>) -> Option<Utf8Bytes> {
        use crate::relay::{Answer, Asker, Kind};
        use meshd_protocol::broker::{PeerDirRequestForward, PeerFileRequestForward};
        let me = self.routing_key().to_owned();
        let (kind, target_key, path, pattern) = match frame {
            ClientFrame::PeerFileRequest {
                target_pubkey,
                file_path,
            } => (Kind::File, target_pubkey, file_path, None),
            ClientFrame::PeerDirRequest {
                target_pubkey,
                dir_path,
                pattern,
            } => (Kind::Dir, target_pubkey, dir_path, pattern),
            ClientFrame::PeerFileResponse(r) => {
                let r = *r;
                let answer = Answer {
                    kind: Kind::File,
                    path: r.file_path,
                    content: r.content,
                    entries: None,
                    error: r.error,
                };
                self.relay_answer(&r.requester_pubkey, answer, req_id.as_deref());
                return None;
            }
            ClientFrame::PeerDirResponse(r) => {
                let r = *r;
                let answer = Answer {
                    kind: Kind::Dir,
                    path: r.dir_path,
                    content: None,
                    entries: r.entries,
                    error: r.error,
                };
                self.relay_answer(&r.requester_pubkey, answer, req_id.as_deref());
                return None;
            }
            _ => return None,
        };
        let target_key = target_key.to_ascii_lowercase();
        if let Some(target) = self.mesh.first_live(&target_key) {
            if let Err(e) = self.ctx.relay.ask(
                target.conn_id,
                kind,
                &me,
                &path,
                req_id.clone(),
                Asker::Local(self.shared.clone()),
            ) {
                return error("rate_limited", e.to_string(), req_id);
            }
            let fwd = match kind {
                Kind::File => BrokerFrame::PeerFileRequestForward(PeerFileRequestForward {
                    requester_pubkey: me,
                    file_path: path,
                    req_id,
                }),
                Kind::Dir => BrokerFrame::PeerDirRequestForward(PeerDirRequestForward {
                    requester_pubkey: me,
                    dir_path: path,
                    pattern,
                    req_id,
                }),
            };
            offer(&target, Outbound::Frame(fwd.to_json().into()));
            return None;
        }
        // A peer of another broker of this shared mesh: over the link.
        let remote = self.mesh.remote_broker_of(&target_key).and_then(|broker| {
            self.ctx
                .fed
                .clone()
                .filter(|f| f.will_forward(self.mesh_id(), &broker))
                .map(|f| (f, broker))
        });
        let Some((fed, broker)) = remote else {
            return error(
                "peer_not_found",
                format!("no connected peer of this mesh has the key {target_key}"),
                req_id,
            );
        };
        let relay_id = match self.ctx.relay.ask_remote(
            broker.clone(),
            kind,
            &path,
            req_id.clone(),
            &self.shared,
        ) {
            Ok(id) => id,
            Err(e) => return error("rate_limited", e.to_string(), req_id),
        };
        let ask = meshd_protocol::fed::RelayAsk {
            mesh_id: self.mesh_id().to_owned(),
            relay_id: relay_id.clone(),
            dir: kind == Kind::Dir,
            requester_key: me,
            requester_member_pubkey: self.member_pubkey.clone(),
            target_key,
            path,
            pattern,
            req_id: req_id.clone(),
        };
        if !fed.relay_send(
            &broker,
            self.mesh_id(),
            meshd_protocol::fed::Frame::RelayAsk(Box::new(ask)),
        ) {
            self.ctx.relay.answered_remote(&broker, &relay_id);
            return error(
                "peer_not_found",
                format!("the peer's broker {broker} cannot be reached now"),
                req_id,
            );
        }
        None
    }

    /// An asked peer's answer: relayed if this connection was asked (see `relay`).
    fn relay_answer(
        &self,
        requester_key: &str,
        answer: crate::relay::Answer,
        req_id: Option<&str>,
    ) {
        match self.ctx.relay.answer(
            self.conn,
            answer.kind,
            &requester_key.to_ascii_lowercase(),
            &answer.path,
            req_id,
        ) {
            Some((asker, req_id)) => {
                crate::relay::deliver(&self.ctx, self.mesh_id(), asker, answer, req_id);
            }
            None => {
                self.ctx.metrics.frames_dropped.inc("relay_unasked");
                debug!("a peer file/dir response to a request this connection was not asked");
            }
        }
    }

    /// The MCP proxy (see `mcp`).
    fn on_mcp(
        &mut self,
        frame: ClientFrame,
        req_id: Option<String>,
        now: i64,
    ) -> Option<Utf8Bytes> {
        use meshd_protocol::broker::{McpCallResult, McpListResult, McpRegisterAck};
        match frame {
            ClientFrame::McpRegister(r) => {
                let r = *r;
                let who = crate::mcp::Registrant {
                    member_id: &self.member_id,
                    member_pubkey: &self.member_pubkey,
                    display_name: &self.display_name,
                    host: crate::mcp::Host {
                        conn: self.conn,
                        shared: self.shared.clone(),
                    },
                };
                let tool_names: Vec<serde_json::Value> =
                    r.tools.iter().map(|t| t.name.clone().into()).collect();
                let tool_count = r.tools.len();
                let (server_name, description) = (r.server_name.clone(), r.description.clone());
                let r_persistent = r.persistent;
                let row = match self.ctx.mcp.register(self.mesh_id(), r, who, now) {
                    Ok(row) => row,
                    Err(e @ crate::mcp::RegisterError::Taken { .. }) => {
                        return error("mcp_name_taken", e.to_string(), req_id);
                    }
                    Err(e @ crate::mcp::RegisterError::Full) => {
                        return error("mcp_full", e.to_string(), req_id);
                    }
                    Err(e @ crate::mcp::RegisterError::TooLarge) => {
                        return error("invalid_mcp_server", e.to_string(), req_id);
                    }
                };
                let mut data = serde_json::Map::new();
                data.insert("serverName".into(), server_name.clone().into());
                data.insert("description".into(), description.into());
                data.insert("tools".into(), tool_names.into());
                data.insert("hostedBy".into(), self.display_name.clone().into());
                let frame = delivery::system_push(self.mesh_id(), "mcp_registered", data, now);
                self.mesh.announce(&frame, self.conn, None);
                let sets = self
                    .ctx
                    .mcp
                    .set_of(self.mesh_id(), &server_name)
                    .into_iter()
                    .collect();
                crate::mcp::publish(&self.ctx, self.mesh_id(), sets);
                // The ack of a persistent registration follows its store write, so an
                // acknowledged one survives a restart.
                let name = server_name;
                let stored = match row {
                    Some(row) => {
                        let (tx, rx) = oneshot::channel();
                        self.ctx
                            .mcp
                            .persist(crate::mcp::StoreOp::Upsert(row, Some(tx)))
                            .then_some(rx)
                    }
                    None => {
                        self.ctx.mcp.persist(crate::mcp::StoreOp::Delete {
                            mesh_id: self.mesh_id().to_owned(),
                            name: name.clone(),
                        });
                        None
                    }
                };
                let persistent = r_persistent;
                self.pending.push_back(Box::pin(async move {
                    if persistent {
                        match stored {
                            Some(rx) => match rx.await {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => {
                                    return store_unavailable("storing an MCP server", req_id, &e);
                                }
                                Err(_) => {
                                    return store_unavailable(
                                        "storing an MCP server",
                                        req_id,
                                        &"shutting down",
                                    );
                                }
                            },
                            None => {
                                return store_unavailable(
                                    "storing an MCP server",
                                    req_id,
                                    &"store queue full",
                                );
                            }
                        }
                    }
                    Some(
                        BrokerFrame::McpRegisterAck(McpRegisterAck {
                            server_name: name,
                            tool_count,
                            req_id,
                        })
                        .to_json()
                        .into(),
                    )
                }));
                None
            }
            ClientFrame::McpUnregister { server_name } => {
                let before = self.ctx.mcp.set_of(self.mesh_id(), &server_name);
                let Some((hosted_by, persistent)) =
                    self.ctx
                        .mcp
                        .unregister(self.mesh_id(), &server_name, &self.member_id)
                else {
                    // No reply to this frame, even a refusal (the CLI does not wait).
                    debug!(server = %server_name, "mcp_unregister of a server this member does not host");
                    return None;
                };
                let mut data = serde_json::Map::new();
                data.insert("serverName".into(), server_name.clone().into());
                data.insert("hostedBy".into(), hosted_by.into());
                let frame = delivery::system_push(self.mesh_id(), "mcp_unregistered", data, now);
                self.mesh.announce(&frame, self.conn, None);
                let removed = before
                    .map(|mut s| {
                        s.removed = true;
                        s
                    })
                    .into_iter()
                    .collect();
                crate::mcp::publish(&self.ctx, self.mesh_id(), removed);
                if persistent {
                    self.ctx.mcp.persist(crate::mcp::StoreOp::Delete {
                        mesh_id: self.mesh_id().to_owned(),
                        name: server_name,
                    });
                }
                None
            }
            ClientFrame::McpList => Some(
                BrokerFrame::McpListResult(McpListResult {
                    servers: self.ctx.mcp.list(self.mesh_id()),
                    req_id,
                })
                .to_json()
                .into(),
            ),
            ClientFrame::McpCall(c) => {
                match self.ctx.mcp.call(
                    &self.ctx,
                    self.mesh_id(),
                    *c,
                    (
                        &self.shared,
                        &self.display_name,
                        &self.member_pubkey,
                        req_id.clone(),
                    ),
                    now,
                ) {
                    Ok(()) => None,
                    Err(e) => Some(
                        BrokerFrame::McpCallResult(McpCallResult {
                            result: None,
                            error: Some(e.to_string()),
                            req_id,
                        })
                        .to_json()
                        .into(),
                    ),
                }
            }
            ClientFrame::McpCallResponse(r) => {
                let r = *r;
                if !self
                    .ctx
                    .mcp
                    .respond(&self.ctx, self.conn, &r.call_id, r.result, r.error)
                {
                    self.ctx.metrics.frames_dropped.inc("mcp_response_refused");
                    debug!(call = %r.call_id, "mcp_call_response for a call this session was not asked");
                }
                None
            }
            _ => None,
        }
    }

    /// `schedule`, `list_scheduled`, `cancel_scheduled`. A schedule belongs to the
    /// member (any of its sessions lists and cancels it) and fires as that member
    /// whether or not this session is still connected (see `reminders`).
    fn on_schedule(
        &mut self,
        frame: ClientFrame,
        req_id: Option<String>,
        now: i64,
    ) -> Option<Utf8Bytes> {
        use crate::store::schedule::ScheduleRow;
        use meshd_protocol::broker::{
            CancelScheduledAck, ScheduledAck, ScheduledEntry, ScheduledList,
        };
        /// Furthest ahead a one-shot may be set.
        const MAX_AHEAD_MS: i64 = 10 * 366 * 24 * 3_600_000;
        let db = self.ctx.db.clone();
        let mesh_id = self.mesh_id().to_owned();
        let member_id = self.member_id.clone();
        let ctx = self.ctx.clone();
        match frame {
            ClientFrame::Schedule(s) => {
                if s.message.is_empty() {
                    return error("invalid_schedule", "a schedule needs a message", req_id);
                }
                let max = crate::store::schedule::MAX_TEXT_BYTES;
                if s.message.len() > max {
                    return error(
                        "invalid_schedule",
                        format!("message too large: {} bytes (max {max})", s.message.len()),
                        req_id,
                    );
                }
                match TargetSpec::parse(&s.to) {
                    Ok(TargetSpec::Broadcast | TargetSpec::Group(_)) => {}
                    Ok(TargetSpec::Direct(pk)) => {
                        match self
                            .mesh
                            .route_direct(&pk.to_hex(), Priority::Now, self.conn)
                        {
                            DirectRoute::Unknown => {
                                return error(
                                    "invalid_schedule",
                                    format!(
                                        "no member or session of this mesh has the key {}",
                                        pk.to_hex()
                                    ),
                                    req_id,
                                );
                            }
                            DirectRoute::Revoked => {
                                return error(
                                    "invalid_schedule",
                                    "the recipient was removed from this mesh",
                                    req_id,
                                );
                            }
                            _ => {}
                        }
                    }
                    Ok(_) => {
                        return error(
                            "invalid_schedule",
                            "schedule a member or session key, @group or *",
                            req_id,
                        );
                    }
                    Err(e) => {
                        return error("invalid_schedule", format!("invalid to: {e}"), req_id);
                    }
                }
                let next_at = match &s.cron {
                    Some(c) => {
                        match crate::cron::first_fire(c, now, &self.ctx.config.schedule.timezone) {
                            Ok(t) => t,
                            Err(e) => return error("invalid_cron", e.to_string(), req_id),
                        }
                    }
                    None if s.deliver_at <= 0 => {
                        return error(
                            "invalid_schedule",
                            "a one-shot schedule needs deliverAt (epoch ms)",
                            req_id,
                        );
                    }
                    None if s.deliver_at > now.saturating_add(MAX_AHEAD_MS) => {
                        return error(
                            "invalid_schedule",
                            "deliverAt is more than 10 years ahead",
                            req_id,
                        );
                    }
                    // A time in the past fires at once.
                    None => s.deliver_at,
                };
                let row = ScheduleRow {
                    id: crate::ids::uuid_v4(),
                    mesh_id,
                    member_id,
                    member_pubkey: self.member_pubkey.clone(),
                    sender_pubkey: self.routing_key().to_owned(),
                    sender_name: self.display_name.clone(),
                    target_spec: s.to,
                    message: s.message,
                    cron: s.cron,
                    subtype: s.reminder.then(|| "reminder".to_owned()),
                    next_at: Some(next_at),
                    fired_count: 0,
                    created_at: now,
                };
                self.pending.push_back(Box::pin(async move {
                    let weight = i64::try_from(row.message.len()).unwrap_or(i64::MAX);
                    if let Err(e) = crate::quota::check(
                        &ctx,
                        crate::quota::Kind::Schedules,
                        &row.mesh_id,
                        &row.member_id,
                        crate::quota::Usage::new(1, weight),
                    ) {
                        return error(crate::quota::QuotaExceeded::CODE, e.to_string(), req_id);
                    }
                    match db.insert_schedule(&row).await {
                        Ok(true) => {
                            ctx.reminders.changed();
                            Some(
                                BrokerFrame::ScheduledAck(ScheduledAck {
                                    scheduled_id: row.id,
                                    deliver_at: next_at,
                                    cron: row.cron,
                                    req_id,
                                })
                                .to_json()
                                .into(),
                            )
                        }
                        Ok(false) => error(
                            "schedules_full",
                            format!(
                                "at most {} pending schedules per member",
                                crate::store::schedule::MAX_PENDING_PER_MEMBER
                            ),
                            req_id,
                        ),
                        Err(e) => store_unavailable("storing a schedule", req_id, &e),
                    }
                }));
            }
            ClientFrame::ListScheduled => {
                self.pending.push_back(Box::pin(async move {
                    match db.pending_schedules(&mesh_id, &member_id).await {
                        Ok(rows) => Some(
                            BrokerFrame::ScheduledList(ScheduledList {
                                messages: rows
                                    .into_iter()
                                    .map(|r| ScheduledEntry {
                                        fired_count: r.cron.is_some().then_some(r.fired_count),
                                        id: r.id,
                                        to: r.target_spec,
                                        message: r.message,
                                        deliver_at: r.next_at.unwrap_or_default(),
                                        created_at: r.created_at,
                                        cron: r.cron,
                                    })
                                    .collect(),
                                req_id,
                            })
                            .to_json()
                            .into(),
                        ),
                        Err(e) => store_unavailable("listing schedules", req_id, &e),
                    }
                }));
            }
            ClientFrame::CancelScheduled { scheduled_id } => {
                self.pending.push_back(Box::pin(async move {
                    match db
                        .cancel_schedule(&mesh_id, &member_id, &scheduled_id)
                        .await
                    {
                        Ok(ok) => {
                            if ok {
                                ctx.reminders.changed();
                            }
                            Some(
                                BrokerFrame::CancelScheduledAck(CancelScheduledAck {
                                    scheduled_id,
                                    ok,
                                    req_id,
                                })
                                .to_json()
                                .into(),
                            )
                        }
                        Err(e) => store_unavailable("cancelling a schedule", req_id, &e),
                    }
                }));
            }
            _ => {}
        }
        None
    }

    /// `audit_query` and `audit_verify`.
    fn queue_audit(&mut self, frame: ClientFrame, req_id: Option<String>) {
        use meshd_protocol::broker::{AuditEntry, AuditResult, AuditVerifyResult};
        let db = self.ctx.db.clone();
        let audit = self.ctx.audit.clone();
        let mesh_id = self.mesh_id().to_owned();
        self.pending.push_back(Box::pin(async move {
            let reply = match frame {
                ClientFrame::AuditQuery {
                    limit,
                    offset,
                    event_type,
                } => match db
                    .audit_page(&mesh_id, event_type.as_deref(), limit, offset)
                    .await
                {
                    Ok((rows, total)) => BrokerFrame::AuditResult(AuditResult {
                        entries: rows
                            .into_iter()
                            .map(|r| AuditEntry {
                                id: r.seq,
                                event_type: r.event_type,
                                actor: r.actor,
                                payload: raw(&r.payload),
                                hash: r.hash,
                                sig: r.sig,
                                created_at: iso8601_ms(r.created_at),
                            })
                            .collect(),
                        total,
                        req_id,
                    }),
                    Err(e) => return store_unavailable("audit", req_id, &e),
                },
                ClientFrame::AuditVerify => match db.audit_rows(&mesh_id).await {
                    Ok(rows) => {
                        let v = crate::audit::verify_rows(&rows, &audit.verifying_key());
                        BrokerFrame::AuditVerifyResult(AuditVerifyResult {
                            valid: v.valid,
                            entries: v.entries,
                            broken_at: v.broken_at,
                            reason: v.reason,
                            req_id,
                        })
                    }
                    Err(e) => return store_unavailable("audit", req_id, &e),
                },
                _ => return None,
            };
            Some(reply.to_json().into())
        }));
    }

    /// `mesh_info`: an overview from the hub and the stores.
    fn queue_mesh_info(&mut self, req_id: Option<String>) {
        use meshd_protocol::broker::{MeshInfoResult, TaskCounts};
        let db = self.ctx.db.clone();
        let mesh = self.mesh.clone();
        let viewer = self.member_pubkey.clone();
        let your_name = self.display_name.clone();
        let your_groups = self
            .mesh
            .local_peer(self.conn, |p| p.groups.clone())
            .unwrap_or_default();
        self.pending.push_back(Box::pin(async move {
            let id = mesh.row.id.clone();
            let (memory_count, tasks, streams, file_count) = match tokio::try_join!(
                db.memory_count(&id),
                db.task_counts(&id),
                db.streams(&id),
                db.file_count(&id, now_ms())
            ) {
                Ok(v) => v,
                Err(e) => return store_unavailable("mesh_info", req_id, &e),
            };
            let info = MeshInfoResult {
                peers: mesh.peers_for(&viewer).len(),
                groups: mesh
                    .groups_in_use(&viewer)
                    .into_iter()
                    .map(|g| format!("@{g}"))
                    .collect(),
                state_keys: mesh.state_list().into_iter().map(|(k, _)| k).collect(),
                memory_count,
                file_count,
                tasks: TaskCounts {
                    open: tasks.0,
                    claimed: tasks.1,
                    done: tasks.2,
                },
                streams: streams.into_iter().map(|s| s.name).collect(),
                tables: Vec::new(),
                collections: Vec::new(),
                your_name,
                your_groups,
                mesh: id,
                req_id,
            };
            Some(BrokerFrame::MeshInfoResult(info).to_json().into())
        }));
    }

    /// Shared contexts: one per member, announced to the others as a `state_change` of
    /// `_context:<name>` (as the reference does; it is not stored as state).
    fn queue_context(&mut self, frame: ClientFrame, req_id: Option<String>, now: i64) {
        use crate::store::contexts::{ContextRow, SEARCH_LIMIT, matches};
        use meshd_protocol::broker::{
            ContextEntry, ContextList, ContextResults, ContextShared, ContextSummary,
        };
        let db = self.ctx.db.clone();
        let fed = self.ctx.fed.clone();
        let member_pubkey = self.member_pubkey.clone();
        let mesh = self.mesh.clone();
        let conn = self.conn;
        let (member_id, name) = (self.member_id.clone(), self.display_name.clone());
        self.pending.push_back(Box::pin(async move {
            let json = |v: &Vec<String>| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
            let reply = match frame {
                ClientFrame::ShareContext(c) => {
                    let row = ContextRow {
                        mesh_id: mesh.row.id.clone(),
                        member_id: member_id.clone(),
                        peer_name: name.clone(),
                        summary: c.summary.clone(),
                        files_read: json(&c.files_read),
                        key_findings: json(&c.key_findings),
                        tags: json(&c.tags),
                        updated_at: now,
                    };
                    if let Err(e) = db.put_context(&row).await {
                        return store_unavailable("contexts", req_id, &e);
                    }
                    if let Some(fed) = &fed {
                        fed.context_shared(crate::fed::context_set(row, &member_pubkey));
                    }
                    let change = BrokerFrame::StateChange(meshd_protocol::broker::StateChange {
                        key: format!("_context:{name}"),
                        value: raw(&serde_json::Value::String(c.summary).to_string()),
                        updated_by: name,
                    });
                    mesh.announce(&Utf8Bytes::from(change.to_json()), conn, None);
                    BrokerFrame::ContextShared(ContextShared {
                        id: member_id,
                        req_id,
                    })
                }
                ClientFrame::GetContext { query } => match db.contexts(&mesh.row.id).await {
                    Ok(rows) => BrokerFrame::ContextResults(ContextResults {
                        contexts: rows
                            .into_iter()
                            .filter(|c| matches(c, &query))
                            .take(SEARCH_LIMIT)
                            .map(|c| ContextEntry {
                                files_read: ContextRow::list(&c.files_read),
                                key_findings: ContextRow::list(&c.key_findings),
                                tags: ContextRow::list(&c.tags),
                                peer_name: c.peer_name,
                                summary: c.summary,
                                updated_at: iso8601_ms(c.updated_at),
                            })
                            .collect(),
                        req_id,
                    }),
                    Err(e) => return store_unavailable("contexts", req_id, &e),
                },
                ClientFrame::ListContexts => match db.contexts(&mesh.row.id).await {
                    Ok(rows) => BrokerFrame::ContextList(ContextList {
                        contexts: rows
                            .into_iter()
                            .map(|c| ContextSummary {
                                tags: ContextRow::list(&c.tags),
                                peer_name: c.peer_name,
                                summary: c.summary,
                                updated_at: iso8601_ms(c.updated_at),
                            })
                            .collect(),
                        req_id,
                    }),
                    Err(e) => return store_unavailable("contexts", req_id, &e),
                },
                _ => return None,
            };
            Some(reply.to_json().into())
        }));
    }

    /// The mesh's memory: `remember`, ranked full-text `recall`, `forget`.
    fn queue_memory(&mut self, frame: ClientFrame, req_id: Option<String>, now: i64) {
        use meshd_protocol::broker::{Memory, MemoryResults, MemoryStored};
        let db = self.ctx.db.clone();
        let ctx = self.ctx.clone();
        let fed = self.ctx.fed.clone();
        let member_pubkey = self.member_pubkey.clone();
        let mesh_id = self.mesh_id().to_owned();
        let (member_id, name) = (self.member_id.clone(), self.display_name.clone());
        self.pending.push_back(Box::pin(async move {
            let reply = match frame {
                ClientFrame::Remember { content, tags } => {
                    let row = crate::store::memory::MemoryRow {
                        id: crate::ids::random_id(),
                        mesh_id,
                        content,
                        // Space-separated, so the full-text index covers tags too.
                        tags: tags
                            .iter()
                            .map(|t| t.replace(char::is_whitespace, "_"))
                            .collect::<Vec<_>>()
                            .join(" "),
                        remembered_by: member_id,
                        remembered_by_name: name,
                        remembered_at: now,
                    };
                    let weight =
                        i64::try_from(row.content.len() + row.tags.len()).unwrap_or(i64::MAX);
                    if let Err(e) = crate::quota::check(
                        &ctx,
                        crate::quota::Kind::Memory,
                        &row.mesh_id,
                        &row.remembered_by,
                        crate::quota::Usage::new(1, weight),
                    ) {
                        return Some(
                            BrokerFrame::Error(
                                ErrorFrame::new(crate::quota::QuotaExceeded::CODE, e.to_string())
                                    .with_req_id(req_id),
                            )
                            .to_json()
                            .into(),
                        );
                    }
                    match db.remember(&row).await {
                        Ok(()) => {
                            let id = row.id.clone();
                            if let Some(fed) = &fed {
                                fed.memory_remembered(crate::fed::memory_set(
                                    row,
                                    &member_pubkey,
                                    None,
                                ));
                            }
                            BrokerFrame::MemoryStored(MemoryStored { id, req_id })
                        }
                        Err(e) => return store_unavailable("memory", req_id, &e),
                    }
                }
                ClientFrame::Recall { query } => match db.recall(&mesh_id, &query).await {
                    Ok(rows) => BrokerFrame::MemoryResults(MemoryResults {
                        memories: rows
                            .into_iter()
                            .map(|m| Memory {
                                tags: m.tags.split_whitespace().map(str::to_owned).collect(),
                                id: m.id,
                                content: m.content,
                                remembered_by: m.remembered_by_name,
                                remembered_at: iso8601_ms(m.remembered_at),
                            })
                            .collect(),
                        req_id,
                    }),
                    Err(e) => return store_unavailable("memory", req_id, &e),
                },
                ClientFrame::GetMemory { memory_id } => {
                    match db.memory(&mesh_id, &memory_id).await {
                        Ok(Some(m)) => {
                            BrokerFrame::MemoryData(meshd_protocol::broker::MemoryData {
                                memory: Memory {
                                    tags: m.tags.split_whitespace().map(str::to_owned).collect(),
                                    id: m.id,
                                    content: m.content,
                                    remembered_by: m.remembered_by_name,
                                    remembered_at: iso8601_ms(m.remembered_at),
                                },
                                req_id,
                            })
                        }
                        Ok(None) => BrokerFrame::Error(
                            ErrorFrame::new("not_found", "no such memory in this mesh")
                                .with_req_id(req_id),
                        ),
                        Err(e) => return store_unavailable("memory", req_id, &e),
                    }
                }
                ClientFrame::Forget { memory_id } => {
                    match db.forget(&mesh_id, &memory_id, now).await {
                        Ok(Some(owner)) => {
                            crate::quota::recount_member(
                                &ctx,
                                crate::quota::Kind::Memory,
                                &mesh_id,
                                &owner,
                            )
                            .await;
                            if let Some(fed) = &fed {
                                fed.memory_forgotten(&mesh_id, &memory_id, now);
                            }
                        }
                        Ok(None) => {}
                        Err(e) => return store_unavailable("memory", req_id, &e),
                    }
                    // The reference's answer, sent whether or not something matched.
                    BrokerFrame::Ack(Ack {
                        id: memory_id.clone(),
                        message_id: memory_id,
                        queued: false,
                        error: None,
                        req_id,
                    })
                }
                _ => return None,
            };
            Some(reply.to_json().into())
        }));
    }

    /// The stream registry.
    fn queue_stream(&mut self, frame: ClientFrame, req_id: Option<String>, now: i64) {
        use meshd_protocol::broker::{StreamCreated, StreamEntry, StreamList};
        let db = self.ctx.db.clone();
        let ctx = self.ctx.clone();
        let member_id = self.member_id.clone();
        let mesh = self.mesh.clone();
        let created_by = self.display_name.clone();
        self.pending.push_back(Box::pin(async move {
            let failed =
                |req_id, e: &dyn std::fmt::Display| store_unavailable("stream registry", req_id, e);
            let reply = match frame {
                ClientFrame::CreateStream { name } => {
                    let row = crate::store::streams::StreamRow {
                        id: crate::ids::random_id(),
                        mesh_id: mesh.row.id.clone(),
                        name,
                        created_by,
                        created_at: now,
                    };
                    if let Err(e) = crate::quota::check(
                        &ctx,
                        crate::quota::Kind::Streams,
                        &row.mesh_id,
                        &member_id,
                        crate::quota::Usage::new(1, 0),
                    ) {
                        return Some(
                            BrokerFrame::Error(
                                ErrorFrame::new(crate::quota::QuotaExceeded::CODE, e.to_string())
                                    .with_req_id(req_id),
                            )
                            .to_json()
                            .into(),
                        );
                    }
                    match db.create_stream(&row, &member_id).await {
                        Ok(Some(s)) => BrokerFrame::StreamCreated(StreamCreated {
                            id: s.id,
                            name: s.name,
                            req_id,
                        }),
                        Ok(None) => BrokerFrame::Error(
                            ErrorFrame::new("streams_full", "this mesh has too many streams")
                                .with_req_id(req_id),
                        ),
                        Err(e) => return failed(req_id, &e),
                    }
                }
                ClientFrame::ListStreams => match db.streams(&mesh.row.id).await {
                    Ok(rows) => BrokerFrame::StreamList(StreamList {
                        streams: rows
                            .into_iter()
                            .map(|s| StreamEntry {
                                subscriber_count: mesh.subscribers(&s.name),
                                id: s.id,
                                name: s.name,
                                created_by: s.created_by,
                                created_at: iso8601_ms(s.created_at),
                            })
                            .collect(),
                        req_id,
                    }),
                    Err(e) => return failed(req_id, &e),
                },
                _ => return None,
            };
            Some(reply.to_json().into())
        }));
    }

    /// Inbound webhooks. Only the creator and admins see a webhook's secret (in its URL).
    fn queue_webhook(&mut self, frame: ClientFrame, req_id: Option<String>, now: i64) {
        use crate::store::webhooks::{WebhookError, WebhookRow};
        use meshd_protocol::broker::{WebhookAck, WebhookEntry, WebhookList};
        let db = self.ctx.db.clone();
        let ctx = self.ctx.clone();
        let base = crate::http::hook_base(&self.ctx.config);
        let mesh_id = self.mesh_id().to_owned();
        let member_id = self.member_id.clone();
        let admin = self
            .mesh
            .member(&self.member_pubkey)
            .is_some_and(|m| m.role == "admin");
        self.pending.push_back(Box::pin(async move {
            let url = |secret: &str| format!("{base}/hook/{mesh_id}/{secret}");
            let reply = match frame {
                ClientFrame::CreateWebhook { name: None } => {
                    return error("invalid_webhook", "a webhook needs a name", req_id);
                }
                ClientFrame::CreateWebhook { name: Some(name) } => {
                    let row = WebhookRow {
                        id: crate::ids::random_id(),
                        mesh_id: mesh_id.clone(),
                        name,
                        secret: hex::encode(crate::ids::random_bytes::<32>()),
                        creator_member_id: member_id,
                        active: true,
                        created_at: now,
                    };
                    if let Err(e) = crate::quota::check(
                        &ctx,
                        crate::quota::Kind::Webhooks,
                        &row.mesh_id,
                        &row.creator_member_id,
                        crate::quota::Usage::new(1, 0),
                    ) {
                        return error(crate::quota::QuotaExceeded::CODE, e.to_string(), req_id);
                    }
                    match db.insert_webhook(&row).await {
                        Ok(()) => BrokerFrame::WebhookAck(WebhookAck {
                            url: url(&row.secret),
                            name: row.name,
                            secret: row.secret,
                            req_id,
                        }),
                        Err(WebhookError::Exists) => {
                            return error(
                                "webhook_exists",
                                "a webhook of that name exists",
                                req_id,
                            );
                        }
                        Err(WebhookError::Full) => {
                            return error(
                                "webhooks_full",
                                "this mesh has too many webhooks",
                                req_id,
                            );
                        }
                        Err(WebhookError::Store(e)) => {
                            return store_unavailable("creating a webhook", req_id, &e);
                        }
                    }
                }
                ClientFrame::ListWebhooks => match db.webhooks(&mesh_id).await {
                    Ok(rows) => BrokerFrame::WebhookList(WebhookList {
                        webhooks: rows
                            .into_iter()
                            .map(|w| WebhookEntry {
                                url: if admin || w.creator_member_id == member_id {
                                    url(&w.secret)
                                } else {
                                    String::new()
                                },
                                name: w.name,
                                active: w.active,
                                created_at: iso8601_ms(w.created_at),
                            })
                            .collect(),
                        req_id,
                    }),
                    Err(e) => {
                        return store_unavailable("listing webhooks", req_id, &e);
                    }
                },
                ClientFrame::DeleteWebhook { name } => {
                    let rows = match db.webhooks(&mesh_id).await {
                        Ok(r) => r,
                        Err(e) => {
                            return store_unavailable("deleting a webhook", req_id, &e);
                        }
                    };
                    if let Some(w) = rows.into_iter().find(|w| w.name == name) {
                        if !admin && w.creator_member_id != member_id {
                            return error(
                                "forbidden",
                                "only the webhook's creator or an admin may delete it",
                                req_id,
                            );
                        }
                        match db.deactivate_webhook(&w.id).await {
                            Ok(true) => {
                                crate::quota::recount_member(
                                    &ctx,
                                    crate::quota::Kind::Webhooks,
                                    &mesh_id,
                                    &w.creator_member_id,
                                )
                                .await;
                            }
                            Ok(false) => {}
                            Err(e) => {
                                return store_unavailable("deleting a webhook", req_id, &e);
                            }
                        }
                    }
                    // As the reference: acknowledged even when nothing matched.
                    BrokerFrame::WebhookAck(WebhookAck {
                        name,
                        url: String::new(),
                        secret: String::new(),
                        req_id,
                    })
                }
                _ => return None,
            };
            Some(reply.to_json().into())
        }));
    }

    /// The skills catalogue: stored per mesh, replicated to the mesh's other brokers.
    fn queue_skill(&mut self, frame: ClientFrame, req_id: Option<String>, now: i64) {
        use meshd_protocol::broker::{Skill, SkillAck, SkillData, SkillList, SkillSummary};
        let db = self.ctx.db.clone();
        let ctx = self.ctx.clone();
        let member_id = self.member_id.clone();
        let fed = self.ctx.fed.clone();
        let mesh_id = self.mesh_id().to_owned();
        let author = self.display_name.clone();
        self.pending.push_back(Box::pin(async move {
            let failed = |req_id, e: &dyn std::fmt::Display| {
                store_unavailable("skills catalogue", req_id, e)
            };
            let reply = match frame {
                ClientFrame::ShareSkill(s) => {
                    let existing = match db.skill(&mesh_id, &s.name).await {
                        Ok(e) => e,
                        Err(e) => return failed(req_id, &e),
                    };
                    let replacing = existing.is_some();
                    let row = crate::store::skills::SkillRow {
                        mesh_id,
                        name: s.name.trim().to_owned(),
                        description: s.description,
                        instructions: s.instructions,
                        tags: serde_json::to_string(&s.tags).unwrap_or_else(|_| "[]".into()),
                        author,
                        created_at: existing.map_or(now, |e| e.created_at),
                        updated_at: now,
                    };
                    let weight = i64::try_from(
                        row.instructions.len() + row.description.len() + row.tags.len(),
                    )
                    .unwrap_or(i64::MAX);
                    let new_rows = i64::from(!replacing);
                    if let Err(e) = crate::quota::check(
                        &ctx,
                        crate::quota::Kind::Skills,
                        &row.mesh_id,
                        &member_id,
                        crate::quota::Usage::new(new_rows, weight),
                    ) {
                        return Some(
                            BrokerFrame::Error(
                                ErrorFrame::new(crate::quota::QuotaExceeded::CODE, e.to_string())
                                    .with_req_id(req_id),
                            )
                            .to_json()
                            .into(),
                        );
                    }
                    match db.put_skill(&row, Some(&member_id)).await {
                        Ok(_) => {}
                        Err(crate::store::skills::SkillError::Full) => {
                            return Some(
                                BrokerFrame::Error(
                                    ErrorFrame::new(
                                        "skills_full",
                                        "the mesh's skills catalogue is full; remove a skill first",
                                    )
                                    .with_req_id(req_id),
                                )
                                .to_json()
                                .into(),
                            );
                        }
                        Err(e) => return failed(req_id, &e),
                    }
                    let name = row.name.clone();
                    if let Some(fed) = &fed {
                        fed.skill_changed(crate::fed::skill_set(row, false));
                    }
                    BrokerFrame::SkillAck(SkillAck {
                        name,
                        action: "shared",
                        req_id,
                    })
                }
                ClientFrame::GetSkill { name } => match db.skill(&mesh_id, &name).await {
                    Ok(row) => BrokerFrame::SkillData(SkillData {
                        skill: row.map(|r| Skill {
                            tags: r.tag_list(),
                            name: r.name,
                            description: r.description,
                            instructions: r.instructions,
                            author: r.author,
                            created_at: iso8601_ms(r.created_at),
                        }),
                        req_id,
                    }),
                    Err(e) => return failed(req_id, &e),
                },
                ClientFrame::ListSkills { query } => match db.skills(&mesh_id).await {
                    Ok(rows) => BrokerFrame::SkillList(SkillList {
                        skills: rows
                            .into_iter()
                            .filter(|r| {
                                query
                                    .as_deref()
                                    .is_none_or(|q| crate::store::skills::matches(r, q))
                            })
                            .map(|r| SkillSummary {
                                tags: r.tag_list(),
                                name: r.name,
                                description: r.description,
                                author: r.author,
                                created_at: iso8601_ms(r.created_at),
                            })
                            .collect(),
                        req_id,
                    }),
                    Err(e) => return failed(req_id, &e),
                },
                ClientFrame::RemoveSkill { name } => {
                    match db.delete_skill(&mesh_id, &name, now).await {
                        Ok(author) => {
                            let removed = author.is_some();
                            if let Some(author) = author {
                                crate::quota::recount_member(
                                    &ctx,
                                    crate::quota::Kind::Skills,
                                    &mesh_id,
                                    &author,
                                )
                                .await;
                            }
                            if removed && let Some(fed) = &fed {
                                fed.skill_changed(crate::fed::skill_removal(&mesh_id, &name, now));
                            }
                            BrokerFrame::SkillAck(SkillAck {
                                name,
                                action: if removed { "removed" } else { "not_found" },
                                req_id,
                            })
                        }
                        Err(e) => return failed(req_id, &e),
                    }
                }
                _ => return None,
            };
            Some(reply.to_json().into())
        }));
    }

    fn queue_message_status(&mut self, message_id: String, req_id: Option<String>) {
        let db = self.ctx.db.clone();
        let mesh = self.mesh.clone();
        let mesh_id = self.mesh_id().to_owned();
        let member_pubkey = self.member_pubkey.clone();
        self.pending.push_back(Box::pin(async move {
            let not_found = |req_id| {
                Some(
                    BrokerFrame::Error(
                        ErrorFrame::new("not_found", "no such message in this mesh")
                            .with_req_id(req_id),
                    )
                    .to_json()
                    .into(),
                )
            };
            let row = match db.message_status(&message_id).await {
                Ok(Some(r)) if r.mesh_id == mesh_id => r,
                Ok(_) => return not_found(req_id),
                Err(e) => {
                    warn!(cause = %e, "message_status");
                    return Some(
                        BrokerFrame::Error(
                            ErrorFrame::new("internal", "the broker's store is unavailable")
                                .with_req_id(req_id),
                        )
                        .to_json()
                        .into(),
                    );
                }
            };
            let delivered = row.delivered_at.is_some();
            let recipients = match (&row.target_key, TargetSpec::parse(&row.target_spec)) {
                // Forwarded to the recipient's broker: stored there, refused, or queued.
                (Some(key), _) if row.forward_to.is_some() => {
                    let status = match (row.forwarded_at, &row.forward_error) {
                        (Some(_), None) => "forwarded",
                        (Some(_), Some(_)) => "refused",
                        (None, _) => "queued",
                    };
                    vec![RecipientStatus {
                        name: mesh
                            .member(key)
                            .map_or_else(|| "unknown".into(), |m| m.display_name),
                        pubkey: key.clone(),
                        status,
                    }]
                }
                (Some(key), _) => {
                    let live = mesh.live_names(key);
                    let name = live
                        .first()
                        .cloned()
                        .or_else(|| mesh.member(key).map(|m| m.display_name));
                    let status = if delivered {
                        "delivered"
                    } else if live.is_empty() {
                        "disconnected"
                    } else {
                        "held"
                    };
                    vec![RecipientStatus {
                        name: name.unwrap_or_else(|| "unknown".into()),
                        pubkey: key.clone(),
                        status,
                    }]
                }
                (None, Ok(target)) => mesh
                    .multicast_recipients(&target, &member_pubkey)
                    .into_iter()
                    .map(|(name, pubkey)| RecipientStatus {
                        name,
                        pubkey,
                        status: if delivered { "delivered" } else { "held" },
                    })
                    .collect(),
                (None, Err(_)) => Vec::new(),
            };
            Some(
                BrokerFrame::MessageStatusResult(MessageStatusResult {
                    message_id: row.id,
                    target_spec: row.target_spec,
                    delivered,
                    delivered_at: row.delivered_at.map(iso8601_ms),
                    recipients,
                    req_id,
                })
                .to_json()
                .into(),
            )
        }));
    }

    /// After the socket is gone: give back unwritten leases, leave the mesh, announce
    /// the departure, save the session state for "welcome back".
    /// This connection's MCP servers: non-persistent ones go (`mcp_unregistered`),
    /// persistent ones go offline (returned, to store); calls it hosted fail, calls it
    /// made end.
    fn mcp_gone(&self, now: i64) -> Vec<String> {
        // Relayed file requests this connection was asked fail now; its own are dropped.
        for (kind, path, asker, req_id) in self.ctx.relay.conn_gone(self.conn) {
            let answer = crate::relay::Answer {
                kind,
                path,
                content: None,
                entries: None,
                error: Some("the asked peer disconnected".to_owned()),
            };
            crate::relay::deliver(&self.ctx, self.mesh_id(), asker, answer, req_id);
        }
        let successor = self
            .mesh
            .siblings(&self.member_pubkey, self.conn)
            .into_iter()
            .filter(|p| p.conn_id > self.conn && p.close_reason().is_none())
            .max_by_key(|p| p.conn_id)
            .map(|shared| crate::mcp::Host {
                conn: shared.conn_id,
                shared,
            });
        let gone = self
            .ctx
            .mcp
            .conn_gone(&self.ctx, self.mesh_id(), self.conn, successor, now);
        crate::mcp::publish(&self.ctx, self.mesh_id(), gone.sets);
        if !self.ctx.sessions_cancel.is_cancelled() {
            for (name, hosted_by) in gone.removed {
                let mut data = serde_json::Map::new();
                data.insert("serverName".into(), name.into());
                data.insert("hostedBy".into(), hosted_by.into());
                let frame = delivery::system_push(self.mesh_id(), "mcp_unregistered", data, now);
                self.mesh.announce(&frame, self.conn, None);
            }
        }
        gone.offline
    }

    async fn teardown(mut self) {
        // Whatever this connection holds and did not deliver goes back to the store: rows
        // queued or backlogged for it, written but unacknowledged, or claimed by a claim
        // still in flight. One conn-scoped release covers them all (it runs after the
        // claims of its batch).
        self.rx.close();
        while self.rx.try_recv().is_ok() {}
        lock(&self.shared.route).close();
        self.queue_write(WriteOp::ReleaseConn {
            mesh_id: self.mesh_id().to_owned(),
            keys: [self.member_pubkey.clone(), self.routing_key().to_owned()],
            conn: lease_owner(self.conn),
        });
        // Save "welcome back" state and wait for it to commit before the presence goes,
        // so a quick reconnect restores it. (A reattached connection was already replaced
        // and has nothing to save.)
        let now = now_ms();
        let mesh_id = self.mesh.row.id.clone();
        if let Some(state) = self
            .mesh
            .with_peer(self.conn, |p| peer_state(&mesh_id, p, now))
        {
            self.queue_write(WriteOp::SavePeerState(Box::new(state)));
        }
        while let Some(op) = self.outbox.pop_front() {
            if self.ctx.writer.send(op).await.is_err() {
                break;
            }
        }
        let _ = self.ctx.writer.flush().await;
        let peer = self.mesh.unregister(self.conn);
        for name in self.mcp_gone(now) {
            self.ctx.mcp.persist(crate::mcp::StoreOp::Offline {
                mesh_id: self.mesh_id().to_owned(),
                name,
                since: Some(now),
            });
        }
        if let (Some(p), Some(fed)) = (&peer, &self.ctx.fed) {
            fed.presence_gone(self.mesh_id(), p.routing_key());
        }
        if peer.is_some() {
            self.ctx.audit.record(
                self.mesh_id(),
                "peer_left",
                Some(self.member_id.clone()),
                &self.display_name,
                serde_json::json!({"pubkey": self.routing_key()}),
            );
        }
        if peer.is_some()
            && self.mesh.no_peers_anywhere()
            && self.ctx.clocks.mesh_emptied(self.mesh_id())
        {
            self.clock_changed();
        }
        if let Some(peer) = &peer
            && !self.ctx.sessions_cancel.is_cancelled()
            && peer.visible
        {
            let frame = delivery::system_push(self.mesh_id(), "peer_left", peer_data(peer), now);
            self.mesh
                .announce(&frame, self.conn, Some(&self.member_pubkey));
        }
        // Another session of the member (or the connection that replaced this one) takes
        // over what this one gave back; its next claim runs after the release.
        for sibling in self.mesh.siblings(&self.member_pubkey, self.conn) {
            sibling.spill();
        }
        self.shared.retired.cancel();
    }
}

/// Socket I/O that gives up when the connection is cancelled (replaced, revoked, slow)
/// or the peer has not taken data for `limit`: a client that stops reading must not pin
/// its session (and the leases it holds) forever.
async fn guarded<T, E>(
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

async fn wait_retired(retired: Option<&CancellationToken>, deadline: Instant) {
    if let Some(r) = retired {
        let _ = tokio::time::timeout_at(deadline, r.cancelled()).await;
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The "welcome back" record for a departing peer. Cumulative counters add this
/// session's own activity once: the CLI seeds its counters from `restoredStats` and
/// reports running totals, so a report at or above the restored value already includes
/// it (the reference added them again on every reconnect, §8 B1).
fn peer_state(mesh_id: &str, peer: &Peer, now: i64) -> PeerStateWrite {
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
    }
}

fn cumulative(prev: CumulativeStats, reported: Stats) -> CumulativeStats {
    fn one(prev: u64, reported: Option<f64>) -> u64 {
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
    fn cumulative_stats_do_not_double_count() {
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
