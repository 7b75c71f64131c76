//! Federation in the daemon: what flows over each link to a peer broker.
//!
//! `meshd-federation` keeps one authenticated QUIC link per configured peer; this module
//! is its [`LinkHandler`]. Per link it runs:
//! - the *control* stream: mesh consent (`MeshOffer` from a mesh's home, `MeshReady` /
//!   `MeshWithdraw` from either side). A mesh *flows* over a link only while both
//!   brokers consent: the home has shared it with the peer (`meshd mesh share`) and the
//!   peer accepted it (`meshd mesh accept`), or — between two replicas — both appear on
//!   the home's roster.
//! - an outgoing *messages* stream: member announcements, then the durable outbox (rows
//!   of the `message` table with `forward_to` = peer, read in `seq` order, at most
//!   `outbox_window` unacknowledged). The peer stores each message together with its
//!   de-duplication cursor before acknowledging it, so after cuts, restarts and
//!   `kill -9` of either broker every acknowledged message is delivered exactly once, in
//!   order.
//! - a *presence* stream: a snapshot per mesh when it starts flowing, then coalesced
//!   upserts/departures (at most one pending update per session per link).
//! - a *live* stream: broadcasts, group messages and state writes, delivered by the
//!   receiver to its own peers only (one hop: never re-forwarded).
//!
//! A broker speaks only for the members it hosts: a member announcement, message,
//! presence or state write naming a member hosted elsewhere is refused and counted.

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use meshd_config::Federation as FedConfig;
use meshd_federation::{
    Backoff, Endpoint, FrameReader, FrameWriter, Link, LinkConn, LinkCounters, LinkError,
    LinkHandler, LinkOptions, Manager, PeerTarget,
};
use meshd_protocol::broker::BrokerFrame;
use meshd_protocol::fed::{
    self, CloseReason, Dm, EventPush, Frame, Hello, MemberAnn, MeshClaim, MeshOffer, Multicast,
    PresenceEntry, RejectReason, SkillSet, StateSet, StreamClass, StreamPublish,
};
use meshd_protocol::{Priority, TargetSpec};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, debug, info, warn};

use crate::Ctx;
use crate::delivery::{self, Author, Body, Commit, Envelope, Origin, Target};
use crate::hub::{ConnId, MeshHub, Peer, StateValue, lock, member_info};
use crate::store::writer::{NewMessage, WriteOp};
use crate::store::{MemberUpsert, MeshRow, ShareRole, StoreError};
use crate::time::now_ms;

/// Outbox rows read per query.
const OUTBOX_PAGE: i64 = 512;
/// Live frames (broadcasts, state) waiting per link; when full, new ones are dropped
/// and counted: they are live-only by contract, like a local slow consumer's.
const LIVE_QUEUE: usize = 4096;
/// Live frames read ahead of the one being applied (each may be a large frame; the
/// hold bounds what waits longer).
const LIVE_READ_AHEAD: usize = 1;
/// Control frames waiting per link (rare: consent changes).
const CONTROL_QUEUE: usize = 256;
/// After a link comes up, how long the outbox waits for a consented mesh to start
/// flowing (the peer's `MeshReady`) before it refuses that mesh's messages: the outbox
/// is one ordered stream, so a mesh the peer no longer takes must not hold back others.
const FLOW_SETTLE: Duration = Duration::from_secs(5);
/// How often stored consent is re-read (the admin CLI writes it beside the daemon).
const RECONCILE_EVERY: Duration = Duration::from_millis(500);
/// Every this many reconcile ticks (5 s), accepted offers without a replica are retried.
const ADOPT_RETRY_TICKS: u64 = 10;
/// Presence updates waiting for one link (one per session and mesh); beyond, the peer
/// is not reading and the link starts over.
const PRESENCE_PENDING: usize = 65_536;
/// Member announcements waiting for one link; beyond, the link starts over.
const MEMBERS_QUEUE: usize = 256;
/// Members one peer broker may host in one mesh, as far as this broker keeps them.
const MAX_REMOTE_MEMBERS: usize = 10_000;
/// Offers kept per peer broker (until accepted here or replaced).
const MAX_OFFERS_PER_PEER: usize = 1_024;
/// Brokers named in one offer's roster.
const MAX_ROSTER: usize = 64;
/// Meshes one peer may claim to be ready for on a link.
const MAX_PEER_READY: usize = 4_096;
/// How long a link may be up before its handler registers it (see `Fed::check_links`).
const REGISTER_BOUND: Duration = Duration::from_secs(5);
/// How often a claim the peer has not answered is announced again.
const REANNOUNCE_EVERY: Duration = Duration::from_secs(10);

/// Why federation could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FedStartError {
    /// Certificate, key or CA file.
    #[error("federation certificate: {0}")]
    Identity(String),
    /// A peer's CA file or pin.
    #[error("federation peer {peer}: {reason}")]
    Peer {
        /// Peer name.
        peer: String,
        /// What is wrong.
        reason: String,
    },
    /// The endpoint.
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// Stored consent, cached.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Consent {
    /// (mesh, peer) → our role.
    shares: HashMap<(String, String), ShareRole>,
    /// Replicas: mesh → (home, roster).
    replicas: HashMap<String, (String, Vec<String>)>,
}

impl Consent {
    /// Whether this broker consents to exchange `mesh` with `peer`.
    fn local_ready(&self, mesh: &str, peer: &str) -> bool {
        match self.shares.get(&(mesh.to_owned(), peer.to_owned())) {
            Some(ShareRole::Offer) => true,
            // Accepted, and the home's offer has arrived (the replica exists).
            Some(ShareRole::Accept) => self.replicas.get(mesh).is_some_and(|(h, _)| h == peer),
            None => self.replicas.get(mesh).is_some_and(|(home, roster)| {
                self.shares
                    .get(&(mesh.to_owned(), home.clone()))
                    .is_some_and(|r| *r == ShareRole::Accept)
                    && roster.iter().any(|b| b == peer)
            }),
        }
    }

    /// Meshes this broker consents to exchange with `peer`.
    fn ready_for(&self, peer: &str) -> HashSet<String> {
        let mut meshes: HashSet<String> = self.shares.keys().map(|(m, _)| m.clone()).collect();
        meshes.extend(self.replicas.keys().cloned());
        meshes.retain(|m| self.local_ready(m, peer));
        meshes
    }

    /// The roster a home announces: itself and every peer it shares the mesh with.
    fn roster(&self, me: &str, mesh: &str) -> Vec<String> {
        let mut r: Vec<String> = std::iter::once(me.to_owned())
            .chain(
                self.shares
                    .iter()
                    .filter(|((m, _), role)| m == mesh && **role == ShareRole::Offer)
                    .map(|((_, p), _)| p.clone()),
            )
            .collect();
        r.sort();
        r
    }
}

/// Presence updates waiting for one link, at most one per session.
#[derive(Debug, Default)]
struct Coalescer {
    order: VecDeque<(String, String)>,
    pending: HashMap<(String, String), Frame>,
}

impl Coalescer {
    fn put(&mut self, mesh: &str, key: &str, frame: Frame) {
        let k = (mesh.to_owned(), key.to_owned());
        if self.pending.insert(k.clone(), frame).is_none() {
            self.order.push_back(k);
        }
    }

    /// A snapshot supersedes the mesh's pending updates.
    fn snapshot(&mut self, mesh: &str, frame: Frame) {
        self.pending.retain(|(m, _), _| m != mesh);
        self.order.retain(|(m, _)| m != mesh);
        self.put(mesh, "", frame);
    }

    fn take(&mut self) -> Vec<Frame> {
        let mut out = Vec::with_capacity(self.order.len());
        while let Some(k) = self.order.pop_front() {
            if let Some(f) = self.pending.remove(&k) {
                out.push(f);
            }
        }
        out
    }
}

/// Rows the store writer's router hands over for one peer, numbered but not yet
/// committed. While the peer's link is up and its outbox caught up with the store, the
/// link forwards from here at once (no commit wait, no store read); otherwise it reads
/// the store. Bounded: on overflow the queue is dropped and the link reads the store.
#[derive(Debug, Default)]
pub(crate) struct HotSink {
    inner: Mutex<HotQueue>,
    wake: Notify,
}

#[derive(Debug, Default)]
struct HotQueue {
    /// The outbox attached now (0: none; rows offered meanwhile are read from the store).
    attached: u64,
    generation: u64,
    /// Rows were dropped since the outbox last looked: it must read the store.
    overflowed: bool,
    rows: VecDeque<Dm>,
    /// The highest position the writer numbered, queued or not: an outbox that has
    /// sent less is not caught up, whatever its queue says.
    last_offered: i64,
}

/// Rows a hot queue holds before it gives up and lets the store catch up.
const HOT_QUEUE: usize = 8192;

impl crate::delivery::router::ForwardSink for HotSink {
    fn offer(&self, row: &NewMessage) {
        let mut q = lock(&self.inner);
        if let Some(seq) = row.forward_seq {
            q.last_offered = q.last_offered.max(seq);
        }
        if q.attached == 0 {
            return;
        }
        if q.rows.len() >= HOT_QUEUE {
            q.rows.clear();
            q.overflowed = true;
        } else if let Some(seq) = row.forward_seq {
            q.rows.push_back(Dm {
                seq: u64::try_from(seq).unwrap_or(0),
                mesh_id: row.mesh_id.clone(),
                id: row.id.clone(),
                sender_member_id: row.sender_member_id.clone(),
                sender_member_pubkey: row.sender_member_pubkey.clone(),
                sender_pubkey: row.sender_pubkey.clone(),
                sender_name: row.sender_name.clone(),
                target_spec: row.target_spec.clone(),
                target_key: row.target_key.clone().unwrap_or_default(),
                priority: row.priority,
                nonce: row.nonce.clone(),
                ciphertext: row.ciphertext.clone(),
                subtype: row.subtype.clone(),
                client_message_id: row.client_message_id.clone(),
                created_at: row.created_at,
                expires_at: row.expires_at,
            });
        }
        drop(q);
        self.wake.notify_one();
    }
}

impl HotSink {
    /// A link's outbox takes over the queue; the guard gives it back when the outbox
    /// ends (unless a newer link's outbox has taken over meanwhile).
    fn attach(self: &Arc<Self>) -> HotGuard {
        let mut q = lock(&self.inner);
        q.generation += 1;
        q.attached = q.generation;
        q.overflowed = false;
        q.rows.clear();
        HotGuard {
            sink: self.clone(),
            generation: q.generation,
        }
    }

    /// The highest position numbered so far.
    fn last_offered(&self) -> i64 {
        lock(&self.inner).last_offered
    }

    /// Up to `n` rows, and whether rows may be missing before them: some were dropped,
    /// or another outbox (of a link being replaced) took the queue over meanwhile, in
    /// which case `guard` takes it back.
    fn take(&self, n: usize, guard: &mut HotGuard) -> (Vec<Dm>, bool) {
        let mut q = lock(&self.inner);
        if q.attached != guard.generation {
            q.generation += 1;
            q.attached = q.generation;
            guard.generation = q.generation;
            q.overflowed = false;
            q.rows.clear();
            return (Vec::new(), true);
        }
        let overflowed = std::mem::take(&mut q.overflowed);
        let n = n.min(q.rows.len());
        (q.rows.drain(..n).collect(), overflowed)
    }
}

/// Detaches an outbox from its hot queue when dropped.
#[derive(Debug)]
struct HotGuard {
    sink: Arc<HotSink>,
    generation: u64,
}

impl Drop for HotGuard {
    fn drop(&mut self) {
        let mut q = lock(&self.sink.inner);
        if q.attached == self.generation {
            q.attached = 0;
            q.rows.clear();
        }
        drop(q);
        // An outbox that lost the queue to this one notices on its next look.
        self.sink.wake.notify_one();
    }
}

/// One live link, as the rest of the daemon sees it.
#[derive(Debug)]
struct LinkShared {
    peer: Arc<str>,
    /// The manager's number for this link (see [`meshd_federation::LinkHandler::run`]).
    id: u64,
    /// Held for the whole of `update_flowing`, so two recomputations (a consent change
    /// and the peer's ready) never work from views of each other's half-done changes.
    flow_lock: tokio::sync::Mutex<()>,
    /// When each claimed mesh was last announced again while the peer was not ready
    /// for it (see `Fed::check_links`).
    reannounced: Mutex<HashMap<String, std::time::Instant>>,
    /// Meshes the peer said it is ready to exchange.
    peer_ready: Mutex<HashSet<String>>,
    /// Meshes we told the peer we are ready to exchange.
    claimed: Mutex<HashSet<String>>,
    /// Meshes flowing now (both ready).
    flowing: Mutex<HashSet<String>>,
    control: mpsc::Sender<Frame>,
    presence: Mutex<Coalescer>,
    presence_wake: Notify,
    live: mpsc::Sender<Frame>,
    /// Signalled each time the live writer took frames off the queue.
    live_drained: Arc<Notify>,
    members: Mutex<VecDeque<Frame>>,
    outbox_wake: Notify,
    counters: Arc<LinkCounters>,
    /// The peer opened its messages stream: a second one would run a second
    /// de-duplication cursor, so it is a protocol error.
    messages_in: std::sync::atomic::AtomicBool,
    /// The peer opened its live stream (a second one is a protocol error).
    live_in: std::sync::atomic::AtomicBool,
    /// When the link came up.
    started: std::time::Instant,
    /// Live frames waiting for members the peer has not announced yet (see [`Held`]).
    held: Mutex<Held>,
    /// Signalled when the peer announced members (held live frames may be ready).
    announced: Notify,
    /// The running catch-up of each mesh (cancelled when a new one starts).
    catch_ups: Mutex<HashMap<String, CancellationToken>>,
}

/// Live frames waiting, in arrival order, for members the peer has not announced yet:
/// announcements travel on the messages stream, so a live frame of a member who just
/// joined can arrive first. While anything waits, every later live frame queues behind
/// it, so the live stream's order is kept. Frames are kept encoded, at most
/// [`HELD_FRAMES`] and [`HELD_BYTES`]; a frame waits at most [`HELD_FOR`] for its
/// members. Beyond these the oldest is dropped and counted as refused.
#[derive(Debug, Default)]
struct Held {
    frames: VecDeque<Waiting>,
    bytes: usize,
}

#[derive(Debug)]
struct Waiting {
    /// The encoded frame.
    frame: Vec<u8>,
    /// (mesh, member key) pairs not known yet; empty: it only waits for its turn.
    unknown: Vec<(String, String)>,
    until: std::time::Instant,
}

/// What [`Held::pop`] found at the front.
#[derive(Debug, PartialEq, Eq)]
enum Popped {
    /// Its members are known (or it only waited for its turn): apply it.
    Ready(Vec<u8>),
    /// Held too long: dropped.
    Expired,
}

/// Live frames held per link.
const HELD_FRAMES: usize = 1024;
/// Encoded bytes of live frames held per link.
const HELD_BYTES: usize = 8 << 20;
/// How long a frame waits for its members' announcement (they normally follow within
/// milliseconds).
const HELD_FOR: Duration = Duration::from_secs(10);
/// Distinct unknown members one live frame may name (a catch-up part naming more is
/// refused; the next catch-up sends it again).
const HELD_UNKNOWN: usize = 64;

impl Held {
    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Whether a frame of `len` encoded bytes fits within the bounds.
    fn fits(&self, len: usize) -> bool {
        self.frames.len() < HELD_FRAMES && self.bytes + len <= HELD_BYTES
    }

    /// Queues an encoded frame (the caller made room: see [`Held::fits`]).
    fn push(&mut self, frame: Vec<u8>, unknown: Vec<(String, String)>, now: std::time::Instant) {
        self.bytes += frame.len();
        self.frames.push_back(Waiting {
            frame,
            unknown,
            until: now + HELD_FOR,
        });
    }

    /// Drops the front frame (to make room); whether there was one.
    fn drop_front(&mut self) -> bool {
        self.frames.pop_front().is_some_and(|w| {
            self.bytes -= w.frame.len();
            true
        })
    }

    /// Drops everything (the stream ended); how many frames.
    fn clear(&mut self) -> usize {
        self.bytes = 0;
        std::mem::take(&mut self.frames).len()
    }

    /// When the front frame stops waiting for its members.
    fn deadline(&self) -> Option<std::time::Instant> {
        self.frames
            .front()
            .filter(|w| !w.unknown.is_empty())
            .map(|w| w.until)
    }

    /// Takes the front frame if it is ready (its members are `known` now, or it only
    /// waited for its turn) or expired; `None` while it still waits.
    fn pop(
        &mut self,
        now: std::time::Instant,
        known: impl Fn(&str, &str) -> bool,
    ) -> Option<Popped> {
        let front = self.frames.front_mut()?;
        front.unknown.retain(|(mesh, key)| !known(mesh, key));
        if !front.unknown.is_empty() && front.until > now {
            return None;
        }
        let w = self.frames.pop_front()?;
        self.bytes -= w.frame.len();
        Some(if w.unknown.is_empty() {
            Popped::Ready(w.frame)
        } else {
            Popped::Expired
        })
    }
}

/// Whether a message of a mesh goes (or waits to go) over a link of this `age`: the
/// mesh flows, or the peer said it is ready and the link is within [`FLOW_SETTLE`] of
/// its start (our side's claim is still being made).
fn may_send(flows: bool, peer_ready: bool, age: Duration) -> bool {
    flows || (peer_ready && age < FLOW_SETTLE)
}

/// Sleeps until `deadline` (a std instant); forever without one.
async fn sleep_until_std(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

/// Counts frames refused from a link: in its status and in the metric, by reason.
fn count_refused(ctx: &Ctx, link: &LinkShared, reason: RejectReason, n: usize) {
    link.counters.refused.fetch_add(n as u64, Ordering::Relaxed);
    ctx.metrics.fed_refused.inc_by(reason.as_str(), n as u64);
}

/// The members a live frame is attributed to that the peer has not announced here
/// yet, as (mesh, key); `Err` when it names more than [`HELD_UNKNOWN`].
async fn unknown_members(
    ctx: &Ctx,
    link: &LinkShared,
    frame: &Frame,
) -> Result<Vec<(String, String)>, RejectReason> {
    let Some((mesh, keys)) = frame.attribution() else {
        return Ok(Vec::new());
    };
    if !link.accepts(mesh) {
        return Ok(Vec::new());
    }
    let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, mesh).await else {
        return Ok(Vec::new());
    };
    let mut unknown: Vec<(String, String)> = Vec::new();
    for key in keys {
        if !hub.knows(key) && !unknown.iter().any(|(_, k)| k == key) {
            if unknown.len() == HELD_UNKNOWN {
                return Err(RejectReason::ForgedSender);
            }
            unknown.push((mesh.to_owned(), key.to_owned()));
        }
    }
    Ok(unknown)
}

impl LinkShared {
    /// Whether we send this mesh's traffic over the link (both sides consent).
    fn flows(&self, mesh: &str) -> bool {
        lock(&self.flowing).contains(mesh)
    }

    /// Whether a message of `mesh` for the peer goes (or waits to go) over this link:
    /// the mesh flows, or the peer said it is ready and the link is still settling
    /// (our side's claim is being made). A peer that said it is not ready (its hello
    /// omitted the mesh, or it withdrew) refuses at once: nothing waits for a consent
    /// that was withdrawn.
    fn settling_or_flows(&self, mesh: &str, now: std::time::Instant) -> bool {
        may_send(
            self.flows(mesh),
            lock(&self.peer_ready).contains(mesh),
            now.saturating_duration_since(self.started),
        )
    }

    /// Whether we take this mesh's traffic from the peer: we told it we consent (the
    /// peer sends only after it has heard so, which may be before our side has heard
    /// the peer's own consent and marked the mesh flowing).
    fn accepts(&self, mesh: &str) -> bool {
        lock(&self.claimed).contains(mesh)
    }

    /// Queues a presence update; `false` (nothing queued) when the coalescer holds
    /// [`PRESENCE_PENDING`] updates already: the peer stopped reading, and the link must
    /// start over (its successor sends a snapshot).
    fn queue_presence(&self, mesh: &str, key: &str, frame: Frame) -> bool {
        {
            let mut c = lock(&self.presence);
            if c.pending.len() >= PRESENCE_PENDING
                && !c.pending.contains_key(&(mesh.to_owned(), key.to_owned()))
            {
                return false;
            }
            c.put(mesh, key, frame);
        }
        self.presence_wake.notify_one();
        true
    }
}

/// The daemon's federation state.
pub(crate) struct Fed {
    me: Arc<str>,
    cfg: FedConfig,
    ctx: OnceLock<Weak<Ctx>>,
    manager: OnceLock<Arc<Manager>>,
    /// Presence versions: start above anything a previous run used (ms·1000).
    version: AtomicU64,
    consent: Mutex<Consent>,
    links: Mutex<HashMap<String, Arc<LinkShared>>>,
    /// Offers received, by (mesh, home), kept until accepted (or replaced).
    offers: Mutex<HashMap<(String, String), MeshOffer>>,
    /// Meshes that flow over at least one link (a cheap check on every presence change).
    shared: Mutex<HashSet<String>>,
    tracker: TaskTracker,
    stop: CancellationToken,
    /// The org CA bundle served on `/.well-known/meshd/bundle`.
    bundle: String,
    /// Per peer, the highest outbox seq ever sent (to count resends across links).
    resend_marks: Mutex<HashMap<String, Arc<AtomicU64>>>,
    /// Per peer, rows handed over by the store writer before their commit.
    hot: Mutex<HashMap<String, Arc<HotSink>>>,
    /// The bound QUIC address (known before the links start).
    quic: Option<std::net::SocketAddr>,
    /// Per peer, the de-duplication cursor of its messages: shared by successive links,
    /// so a replaced link's reader and its successor never admit the same position.
    /// `None` until read from the store (and again after a failed insert).
    cursors: Mutex<HashMap<String, Arc<Mutex<Option<fed::InboxCursor>>>>>,
    /// Per peer, the pending expiry of a lost link's presences (see
    /// `schedule_presence_expiry`).
    expiries: Mutex<HashMap<String, (CancellationToken, HashSet<String>)>>,
    /// Held while a replica is adopted (see `adopt_offer`).
    adopting: tokio::sync::Mutex<()>,
    /// Test hooks handed to the link manager (none in production).
    hooks: Option<Arc<dyn meshd_federation::LinkHooks>>,
    /// Per peer: since when the manager's current link has had no handler registered
    /// here (see `check_links`).
    unregistered_since: Mutex<HashMap<String, (u64, std::time::Instant)>>,
}

impl std::fmt::Debug for Fed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fed")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl Fed {
    /// Loads certificates and trust and binds the QUIC endpoint. Refuses to start on a
    /// world-readable key, a certificate for another name, or an unreadable peer CA.
    ///
    /// # Errors
    /// [`FedStartError`].
    pub(crate) fn bind(
        cfg: &FedConfig,
        hooks: Option<Arc<dyn meshd_federation::LinkHooks>>,
    ) -> Result<(Arc<Self>, Endpoint), FedStartError> {
        let identity = meshd_certs::BrokerIdentity::load(&cfg.cert, &cfg.key, &cfg.broker)
            .map_err(|e| FedStartError::Identity(e.to_string()))?;
        let bundle = meshd_certs::Bundle::from_ca_pem_file(&cfg.ca)
            .map_err(|e| FedStartError::Identity(e.to_string()))?
            .to_text();
        let mut anchors = Vec::new();
        for p in &cfg.peers {
            let anchor = match &p.anchor {
                meshd_config::PeerAnchorConfig::CaFile(path) => {
                    meshd_certs::PeerAnchor::load_ca_file(path).map_err(|e| {
                        FedStartError::Peer {
                            peer: p.name.clone(),
                            reason: e.to_string(),
                        }
                    })?
                }
                meshd_config::PeerAnchorConfig::Pin(pin) => meshd_certs::PeerAnchor::Pin(*pin),
            };
            anchors.push((p.name.clone(), anchor));
        }
        let trust = meshd_certs::PeerTrust::new(anchors).map_err(|e| FedStartError::Peer {
            peer: "(trust)".into(),
            reason: e.to_string(),
        })?;
        let ep = Endpoint::bind(
            cfg.listen,
            identity,
            trust,
            LinkOptions {
                keepalive: cfg.keepalive,
                idle_timeout: cfg.idle_timeout,
                max_frame_bytes: cfg.max_frame_bytes,
                handshake_timeout: Duration::from_secs(10),
            },
        )?;
        let seed = u64::try_from(now_ms()).unwrap_or(0).saturating_mul(1000);
        let fed = Arc::new(Self {
            me: Arc::from(cfg.broker.as_str()),
            cfg: cfg.clone(),
            ctx: OnceLock::new(),
            manager: OnceLock::new(),
            version: AtomicU64::new(seed),
            consent: Mutex::default(),
            links: Mutex::default(),
            offers: Mutex::default(),
            shared: Mutex::default(),
            tracker: TaskTracker::new(),
            stop: CancellationToken::new(),
            bundle,
            resend_marks: Mutex::default(),
            hot: Mutex::default(),
            quic: ep.local_addr().ok(),
            cursors: Mutex::default(),
            hooks,
            unregistered_since: Mutex::default(),
            expiries: Mutex::default(),
            adopting: tokio::sync::Mutex::new(()),
        });
        Ok((fed, ep))
    }

    /// Starts the link manager and the consent reconciler.
    pub(crate) async fn start(self: &Arc<Self>, ep: Endpoint) {
        if let Err(e) = self.reload_consent().await {
            warn!(cause = %e, "loading federation consent");
        }
        let discovery =
            match meshd_federation::discovery::Discovery::new(self.cfg.nameservers.clone()) {
                Ok(d) => d,
                Err(e) => {
                    warn!(cause = %e, "DNS resolver; federation disabled");
                    return;
                }
            };
        let targets = self
            .cfg
            .peers
            .iter()
            .map(|p| PeerTarget {
                name: p.name.clone(),
                addr: p.addr.clone(),
            })
            .collect();
        let manager = Manager::new(
            ep,
            discovery,
            targets,
            Backoff {
                min: self.cfg.reconnect_min,
                max: self.cfg.reconnect_max,
            },
            self.clone(),
            self.stop.child_token(),
            self.hooks.clone(),
        );
        manager.start();
        let _ = self.manager.set(manager);
        let me = self.clone();
        self.tracker.spawn(async move { me.reconcile_loop().await });
    }

    /// Closes every link and stops the background tasks.
    pub(crate) async fn shutdown(&self) {
        self.stop.cancel();
        if let Some(m) = self.manager.get() {
            m.shutdown().await;
        }
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// This broker's name.
    pub(crate) fn name(&self) -> &str {
        &self.me
    }

    /// The org CA bundle text.
    pub(crate) fn bundle(&self) -> &str {
        &self.bundle
    }

    /// The UDP address the endpoint listens on.
    pub(crate) fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.quic
    }

    /// Connects the daemon's shared state (once, right after it is built).
    pub(crate) fn attach(&self, ctx: Weak<Ctx>) {
        let _ = self.ctx.set(ctx);
    }

    fn ctx(&self) -> Option<Arc<Ctx>> {
        self.ctx.get().and_then(Weak::upgrade)
    }

    /// The hot queue of `peer` (see [`HotSink`]).
    pub(crate) fn hot_sink(&self, peer: &str) -> Arc<HotSink> {
        lock(&self.hot).entry(peer.to_owned()).or_default().clone()
    }

    fn resend_mark(&self, peer: &str) -> Arc<AtomicU64> {
        lock(&self.resend_marks)
            .entry(peer.to_owned())
            .or_default()
            .clone()
    }

    fn next_version(&self) -> u64 {
        self.version.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn link(&self, peer: &str) -> Option<Arc<LinkShared>> {
        lock(&self.links).get(peer).cloned()
    }

    fn links_for(&self, mesh: &str) -> Vec<Arc<LinkShared>> {
        lock(&self.links)
            .values()
            .filter(|l| l.flows(mesh))
            .cloned()
            .collect()
    }

    fn is_shared(&self, mesh: &str) -> bool {
        lock(&self.shared).contains(mesh)
    }

    fn refresh_shared(&self) {
        let set: HashSet<String> = lock(&self.links)
            .values()
            .flat_map(|l| lock(&l.flowing).iter().cloned().collect::<Vec<_>>())
            .collect();
        *lock(&self.shared) = set;
    }

    /// Whether a message of `mesh` for `peer` is taken for forwarding: we consent, and,
    /// if the link is up and settled, the peer consents too (while the link is down the
    /// message waits in the outbox).
    pub(crate) fn will_forward(&self, mesh: &str, peer: &str) -> bool {
        self.consents(mesh, peer)
            && self
                .link(peer)
                .is_none_or(|l| l.settling_or_flows(mesh, crate::time::std_instant()))
    }

    /// Whether `mesh` is shared with `peer` (messages to its members may be queued for it,
    /// even while the link is down).
    pub(crate) fn consents(&self, mesh: &str, peer: &str) -> bool {
        lock(&self.consent).local_ready(mesh, peer)
    }

    /// `GET /federation`.
    pub(crate) fn status_json(&self) -> serde_json::Value {
        let links = self.manager.get().map(|m| m.status()).unwrap_or_default();
        let refusals = self.manager.get().map(|m| m.refusals()).unwrap_or_default();
        let live = lock(&self.links).clone();
        let consent = lock(&self.consent).clone();
        let links: Vec<serde_json::Value> = links
            .into_iter()
            .map(|st| {
                let c = &st.counters;
                let mut meshes: Vec<String> = live
                    .get(&st.name)
                    .map(|l| lock(&l.flowing).iter().cloned().collect())
                    .unwrap_or_default();
                meshes.sort();
                let held = live.get(&st.name).map_or(0, |l| lock(&l.held).frames.len());
                serde_json::json!({
                    "peer": st.name,
                    "state": st.state.as_str(),
                    "linkId": st.link_id,
                    "servedLinkId": live.get(&st.name).map(|l| l.id),
                    "since": meshd_protocol::time::iso8601_ms(st.since_ms),
                    "addr": st.addr.map(|a| a.to_string()),
                    "dialer": st.dialer,
                    "rttMs": st.rtt.map(|d| d.as_secs_f64() * 1000.0),
                    "connects": st.connects,
                    "queued": c.queued.load(Ordering::Relaxed),
                    "sent": c.sent.load(Ordering::Relaxed),
                    "resent": c.resent.load(Ordering::Relaxed),
                    "received": c.received.load(Ordering::Relaxed),
                    "rejected": c.rejected.load(Ordering::Relaxed),
                    "refused": c.refused.load(Ordering::Relaxed),
                    "held": held,
                    "lastError": st.last_error,
                    "meshes": meshes,
                })
            })
            .collect();
        let mut shares: Vec<serde_json::Value> = consent
            .shares
            .iter()
            .map(|((m, p), r)| serde_json::json!({"meshId": m, "peer": p, "role": r.as_str()}))
            .collect();
        shares.sort_by_key(|v| v.to_string());
        serde_json::json!({
            "broker": &*self.me,
            "quic": self.local_addr().map(|a| a.to_string()),
            "links": links,
            "shares": shares,
            "refusedHandshakes": refusals,
        })
    }

    // ---- hooks called by sessions and the HTTP layer --------------------------------

    /// A local presence of `mesh` appeared or changed.
    pub(crate) fn presence_changed(&self, mesh: &MeshHub, conn: ConnId) {
        if !self.is_shared(&mesh.row.id) {
            return;
        }
        let version = self.next_version();
        let Some(entry) = mesh.local_peer(conn, |p| presence_entry(p, version)) else {
            return;
        };
        let mesh_id = &mesh.row.id;
        for link in self.links_for(mesh_id) {
            let queued = link.queue_presence(
                mesh_id,
                &entry.key,
                Frame::PresenceUpsert {
                    mesh_id: mesh_id.clone(),
                    entry: Box::new(entry.clone()),
                },
            );
            if !queued {
                self.reset_link(&link, "presence_full");
            }
        }
    }

    /// A local presence left.
    pub(crate) fn presence_gone(&self, mesh_id: &str, key: &str) {
        if !self.is_shared(mesh_id) {
            return;
        }
        let version = self.next_version();
        for link in self.links_for(mesh_id) {
            let queued = link.queue_presence(
                mesh_id,
                key,
                Frame::PresenceGone {
                    mesh_id: mesh_id.to_owned(),
                    key: key.to_owned(),
                    version,
                },
            );
            if !queued {
                self.reset_link(&link, "presence_full");
            }
        }
    }

    /// A local member joined or was revoked: announce it.
    pub(crate) fn member_changed(&self, mesh: &MeshHub, pubkey: &str) {
        let Some(m) = mesh.member(pubkey) else {
            return;
        };
        if m.home.is_some() {
            return;
        }
        let ann = MemberAnn {
            member_id: m.id,
            pubkey: pubkey.to_owned(),
            display_name: m.display_name,
            role: m.role,
            revoked: m.revoked,
        };
        // Checked and queued under the link's members lock, which `update_flowing` holds
        // while it queues the full list and marks the mesh flowing: an announcement is
        // either in that list or queued after it, never lost between the two.
        let links: Vec<Arc<LinkShared>> = lock(&self.links).values().cloned().collect();
        for link in links {
            let (queued, full) = {
                let mut q = lock(&link.members);
                let flows = lock(&link.flowing).contains(&mesh.row.id);
                let full = q.len() >= MEMBERS_QUEUE;
                if flows && !full {
                    q.push_back(Frame::Members {
                        mesh_id: mesh.row.id.clone(),
                        members: vec![ann.clone()],
                        full: false,
                    });
                }
                (flows && !full, flows && full)
            };
            if queued {
                link.outbox_wake.notify_one();
            }
            if full {
                // The peer is not taking announcements: start over (the next link
                // announces every member in full).
                self.reset_link(&link, "members_full");
            }
        }
    }

    /// A local broadcast or group message: forwarded once to each broker with an
    /// eligible recipient.
    pub(crate) fn multicast(&self, mesh: &MeshHub, target: &TargetSpec, m: Multicast) -> usize {
        if !self.is_shared(&mesh.row.id) {
            return 0;
        }
        let mut sent = 0;
        let frame = Frame::Multicast(Box::new(m));
        for broker in mesh.remote_brokers_for(target) {
            if let Some(link) = self.link(&broker)
                && link.flows(&mesh.row.id)
            {
                if link.live.try_send(frame.clone()).is_ok() {
                    sent += 1;
                } else {
                    if let Some(ctx) = self.ctx() {
                        ctx.metrics.fed_live_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        sent
    }

    /// Sends a live frame of `mesh_id` to every link the mesh flows over. A full link
    /// queue drops it (live-only traffic, counted), as a local slow consumer would.
    fn to_every_link(&self, mesh_id: &str, frame: Frame) {
        if !self.is_shared(mesh_id) {
            return;
        }
        for link in self.links_for(mesh_id) {
            if link.live.try_send(frame.clone()).is_err()
                && let Some(ctx) = self.ctx()
            {
                ctx.metrics.fed_live_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A local state write.
    pub(crate) fn state_set(&self, mesh_id: &str, s: StateSet) {
        self.to_every_link(mesh_id, Frame::State(Box::new(s)));
    }

    /// An event pushed to the mesh here (a webhook post) goes to its other brokers.
    pub(crate) fn event(&self, e: EventPush) {
        let mesh_id = e.mesh_id.clone();
        self.to_every_link(&mesh_id, Frame::Event(Box::new(e)));
    }

    /// Data published to a stream here goes to the mesh's other brokers (their
    /// subscribers receive it).
    pub(crate) fn stream_data(&self, p: StreamPublish) {
        let mesh_id = p.mesh_id.clone();
        self.to_every_link(&mesh_id, Frame::StreamData(Box::new(p)));
    }

    /// A member hosted here remembered something.
    pub(crate) fn memory_remembered(&self, m: meshd_protocol::fed::MemorySet) {
        let mesh_id = m.mesh_id.clone();
        self.to_every_link(&mesh_id, Frame::Memory(Box::new(m)));
    }

    /// A member here forgot a memory.
    pub(crate) fn memory_forgotten(&self, mesh_id: &str, id: &str, at: i64) {
        self.to_every_link(
            mesh_id,
            Frame::Forget {
                mesh_id: mesh_id.to_owned(),
                id: id.to_owned(),
                at,
            },
        );
    }

    /// A relay frame for one peer broker (when the mesh flows to it). `false` when it
    /// could not be queued.
    pub(crate) fn relay_send(&self, peer: &str, mesh_id: &str, frame: Frame) -> bool {
        self.link(peer)
            .filter(|l| l.flows(mesh_id))
            .is_some_and(|l| l.live.try_send(frame).is_ok())
    }

    /// Files held here changed (`full`: all of them).
    pub(crate) fn files_changed(
        &self,
        mesh_id: &str,
        files: Vec<meshd_protocol::fed::FileSet>,
        full: bool,
    ) {
        if files.is_empty() && !full {
            return;
        }
        self.to_every_link(
            mesh_id,
            Frame::Files {
                mesh_id: mesh_id.to_owned(),
                files,
                full,
            },
        );
    }

    /// The mesh's clock changed here.
    pub(crate) fn clock_changed(&self, c: meshd_protocol::fed::ClockSet) {
        let mesh_id = c.mesh_id.clone();
        self.to_every_link(&mesh_id, Frame::Clock(Box::new(c)));
    }

    /// A task changed here.
    pub(crate) fn task_changed(&self, t: meshd_protocol::fed::TaskSet) {
        let mesh_id = t.mesh_id.clone();
        self.to_every_link(&mesh_id, Frame::Task(Box::new(t)));
    }

    /// MCP servers hosted here changed.
    pub(crate) fn mcp_servers(
        &self,
        mesh_id: &str,
        servers: Vec<meshd_protocol::fed::McpServerSet>,
    ) {
        self.to_every_link(
            mesh_id,
            Frame::McpServers {
                mesh_id: mesh_id.to_owned(),
                servers,
                all: None,
            },
        );
    }

    /// A member hosted here shared its context.
    pub(crate) fn context_shared(&self, c: meshd_protocol::fed::ContextSet) {
        let mesh_id = c.mesh_id.clone();
        self.to_every_link(&mesh_id, Frame::Context(Box::new(c)));
    }

    /// A skill was shared or removed here.
    pub(crate) fn skill_changed(&self, set: SkillSet) {
        let mesh_id = set.mesh_id.clone();
        self.to_every_link(&mesh_id, Frame::Skill(Box::new(set)));
    }

    /// New outbox rows for `peer` are committed.
    pub(crate) fn outbox_ready(&self, peer: &str) {
        tracing::trace!(peer, "outbox rows committed");
        if let Some(link) = self.link(peer) {
            link.outbox_wake.notify_one();
        }
    }

    // ---- consent ----------------------------------------------------------------------

    /// Re-reads stored consent; `true` when it changed. Also called once before the
    /// daemon serves, so the first sends already see it.
    pub(crate) async fn reload_consent(&self) -> Result<bool, StoreError> {
        let Some(ctx) = self.ctx() else {
            return Ok(false);
        };
        let mut next = Consent::default();
        for s in ctx.db.shares().await? {
            next.shares.insert((s.mesh_id, s.peer), s.role);
        }
        for r in ctx.db.replicas().await? {
            let roster: Vec<String> = serde_json::from_str(&r.roster).unwrap_or_default();
            next.replicas.insert(r.mesh_id, (r.home_broker, roster));
        }
        let changes: Vec<(&'static str, String, String, ShareRole)> = {
            let mut cur = lock(&self.consent);
            if *cur == next {
                return Ok(false);
            }
            let added = next
                .shares
                .iter()
                .filter(|(k, _)| !cur.shares.contains_key(*k))
                .map(|((m, p), r)| ("mesh_shared", m.clone(), p.clone(), *r));
            let removed = cur
                .shares
                .iter()
                .filter(|(k, _)| !next.shares.contains_key(*k))
                .map(|((m, p), r)| ("mesh_unshared", m.clone(), p.clone(), *r));
            let changes = added.chain(removed).collect();
            *cur = next;
            changes
        };
        for (event, mesh, peer, role) in changes {
            ctx.audit.record(
                &mesh,
                event,
                None,
                "system",
                serde_json::json!({"peer": peer, "role": role.as_str()}),
            );
        }
        Ok(true)
    }

    async fn reconcile_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            n += 1;
            match self.reload_consent().await {
                Ok(true) => {
                    self.apply_pending_offers().await;
                    let links: Vec<Arc<LinkShared>> = lock(&self.links).values().cloned().collect();
                    for l in links {
                        self.reconcile_link(&l).await;
                    }
                }
                // An accepted offer whose replica could not be made (a store or disk
                // error) is tried again every few seconds, not only when consent changes.
                Ok(false) if n.is_multiple_of(ADOPT_RETRY_TICKS) => {
                    self.apply_pending_offers().await;
                }
                Ok(false) => {}
                Err(e) => warn!(cause = %e, "reloading federation consent"),
            }
            self.check_links(crate::time::std_instant()).await;
        }
    }

    /// Tears a link down (both sides dial again), counted by `reason`.
    fn reset_link(&self, link: &LinkShared, reason: &'static str) {
        if let Some(m) = self.manager.get()
            && m.reset(&link.peer, link.id, CloseReason::Protocol)
            && let Some(ctx) = self.ctx()
        {
            ctx.metrics.fed_link_resets.inc(reason);
        }
    }

    /// The liveness guard, every reconcile tick: a link that is up converges to the
    /// consented meshes, or is torn down and dialed again.
    ///
    /// - The manager's current link must be the one registered here (its handler runs)
    ///   within [`REGISTER_BOUND`]; otherwise it is reset.
    /// - Our claims must match stored consent, and what flows must be what both sides
    ///   claim; otherwise they are recomputed.
    /// - A mesh we claim that the peer has not said it is ready for is announced again
    ///   every [`REANNOUNCE_EVERY`] (idempotent on the peer; it converges a lost or
    ///   crossed announcement). A control queue too full to take it resets the link.
    async fn check_links(&self, now: std::time::Instant) {
        let Some(manager) = self.manager.get() else {
            return;
        };
        for st in manager.status() {
            let Some(id) = st.link_id else {
                lock(&self.unregistered_since).remove(&st.name);
                continue;
            };
            let link = self.link(&st.name).filter(|l| l.id == id);
            let Some(link) = link else {
                let overdue = {
                    let mut since = lock(&self.unregistered_since);
                    let entry = since.entry(st.name.clone()).or_insert((id, now));
                    if entry.0 != id {
                        *entry = (id, now);
                    }
                    now.duration_since(entry.1) > REGISTER_BOUND
                };
                if overdue && manager.reset(&st.name, id, CloseReason::Protocol) {
                    warn!(peer = %st.name, id, "link up but never registered; reset");
                    lock(&self.unregistered_since).remove(&st.name);
                    if let Some(ctx) = self.ctx() {
                        ctx.metrics.fed_link_resets.inc("unregistered");
                    }
                }
                continue;
            };
            lock(&self.unregistered_since).remove(&st.name);
            let ready = lock(&self.consent).ready_for(&link.peer);
            if *lock(&link.claimed) != ready {
                self.reconcile_link(&link).await;
                continue;
            }
            let (claimed, peer_ready) =
                (lock(&link.claimed).clone(), lock(&link.peer_ready).clone());
            let want: HashSet<String> = claimed.intersection(&peer_ready).cloned().collect();
            if *lock(&link.flowing) != want {
                self.update_flowing(&link).await;
            }
            if now.duration_since(link.started) < REANNOUNCE_EVERY {
                continue;
            }
            let due: Vec<String> = {
                let mut last = lock(&link.reannounced);
                last.retain(|m, _| claimed.contains(m) && !peer_ready.contains(m));
                claimed
                    .difference(&peer_ready)
                    .filter(|m| {
                        last.get(*m)
                            .is_none_or(|at| now.duration_since(*at) >= REANNOUNCE_EVERY)
                    })
                    .cloned()
                    .collect()
            };
            for m in due {
                debug!(peer = %link.peer, mesh.id = %m, "announcing a claim again");
                let frame = Frame::MeshReady(MeshClaim { mesh_id: m.clone() });
                if link.control.try_send(frame).is_err() {
                    self.reset_link(&link, "control_full");
                    break;
                }
                lock(&link.reannounced).insert(m, now);
            }
        }
    }

    /// Offers received before the local admin accepted them.
    async fn apply_pending_offers(&self) {
        let offers: Vec<((String, String), MeshOffer)> = lock(&self.offers)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for ((_, peer), offer) in offers {
            let accepted = lock(&self.consent)
                .shares
                .get(&(offer.mesh_id.clone(), peer.clone()))
                .is_some_and(|r| *r == ShareRole::Accept);
            if accepted {
                self.adopt_offer(&peer, &offer).await;
            }
        }
    }

    /// Creates or updates the replica described by an accepted offer. One at a time:
    /// the link that receives an offer and the reconcile loop that sees its acceptance
    /// may both adopt it at once.
    async fn adopt_offer(&self, home: &str, offer: &MeshOffer) {
        let Some(ctx) = self.ctx() else {
            return;
        };
        let _one = self.adopting.lock().await;
        let roster = serde_json::to_string(&offer.roster).unwrap_or_else(|_| "[]".into());
        let known = lock(&self.consent)
            .replicas
            .get(&offer.mesh_id)
            .is_some_and(|(h, r)| h == home && *r == offer.roster);
        if known {
            return;
        }
        let row = match replica_row(&ctx, offer).await {
            Ok(r) => r,
            Err(e) => {
                warn!(mesh.id = %offer.mesh_id, cause = %e, "creating a replica");
                return;
            }
        };
        if let Err(e) = ctx.db.upsert_replica(&row, home, &roster).await {
            warn!(mesh.id = %offer.mesh_id, cause = %e, "storing a replica");
            return;
        }
        info!(mesh.id = %offer.mesh_id, slug = %row.slug, home, "replica of a shared mesh ready");
        if let Err(e) = self.reload_consent().await {
            warn!(cause = %e, "reloading federation consent");
        }
        let links: Vec<Arc<LinkShared>> = lock(&self.links).values().cloned().collect();
        for l in links {
            self.reconcile_link(&l).await;
        }
    }

    /// Brings a link's consent claims and flowing meshes in line with stored consent.
    async fn reconcile_link(&self, link: &Arc<LinkShared>) {
        let peer = &*link.peer;
        let (ready, offers) = {
            let c = lock(&self.consent);
            let ready = c.ready_for(peer);
            let offers: Vec<MeshOffer> = c
                .shares
                .iter()
                .filter(|((_, p), r)| p == peer && **r == ShareRole::Offer)
                .map(|((m, _), _)| MeshOffer {
                    mesh_id: m.clone(),
                    name: String::new(),
                    slug: String::new(),
                    roster: c.roster(&self.me, m),
                })
                .collect();
            (ready, offers)
        };
        // Homes (re)send their offers, with the mesh's name and current roster.
        if let Some(ctx) = self.ctx() {
            for mut o in offers {
                if let Ok(Some(row)) = ctx.db.mesh_by_id(&o.mesh_id).await {
                    o.name = row.name;
                    o.slug = row.slug;
                    // Never waits on one peer (the reconcile loop serves every link):
                    // a control queue this full means the peer stopped reading.
                    if link.control.try_send(Frame::MeshOffer(o)).is_err() {
                        self.reset_link(link, "control_full");
                        return;
                    }
                }
            }
        }
        {
            // Queued under the lock, so concurrent reconciliations cannot reorder a
            // ready and a withdrawal of the same mesh on the wire.
            let mut claimed = lock(&link.claimed);
            let added: Vec<String> = ready.difference(&claimed).cloned().collect();
            let removed: Vec<String> = claimed.difference(&ready).cloned().collect();
            claimed.clone_from(&ready);
            let frames = added
                .into_iter()
                .map(|mesh_id| Frame::MeshReady(MeshClaim { mesh_id }))
                .chain(
                    removed
                        .into_iter()
                        .map(|mesh_id| Frame::MeshWithdraw(MeshClaim { mesh_id })),
                );
            for f in frames {
                if link.control.try_send(f).is_err() {
                    // The peer would never learn of this change: start over (the hellos
                    // of the next link carry the whole consent).
                    warn!(peer = %link.peer, "control queue full; resetting the link");
                    self.reset_link(link, "control_full");
                    break;
                }
            }
        }
        self.update_flowing(link).await;
    }

    /// Recomputes what flows over a link; starts and stops meshes accordingly.
    async fn update_flowing(&self, link: &Arc<LinkShared>) {
        let _serial = link.flow_lock.lock().await;
        let claimed = lock(&link.claimed).clone();
        let peer_ready = lock(&link.peer_ready).clone();
        let now_flowing: HashSet<String> = claimed.intersection(&peer_ready).cloned().collect();
        debug!(peer = %link.peer, ?claimed, ?peer_ready, "consent on the link");
        let (started, stopped) = {
            let flowing = lock(&link.flowing);
            let started: Vec<String> = now_flowing.difference(&flowing).cloned().collect();
            let stopped: Vec<String> = flowing.difference(&now_flowing).cloned().collect();
            (started, stopped)
        };
        let Some(ctx) = self.ctx() else {
            return;
        };
        if !stopped.is_empty() {
            lock(&link.flowing).retain(|m| !stopped.contains(m));
            self.refresh_shared();
        }
        let now = now_ms();
        for m in stopped {
            info!(peer = %link.peer, mesh.id = %m, "mesh no longer flows over the link");
            if let Some(hub) = ctx.hub.loaded(&m) {
                hub.remote_drop(&link.peer, now);
                crate::mcp::broker_gone(&ctx, &hub, &link.peer);
            }
            // Messages for the peer in a mesh we no longer share are refused, not kept.
            if !self.consents(&m, &link.peer) {
                let _ = ctx
                    .writer
                    .send(WriteOp::ForwardRefused {
                        peer: link.peer.to_string(),
                        seq: None,
                        mesh_id: Some(m.clone()),
                        reason: RejectReason::NotShared.as_str(),
                        at: now,
                    })
                    .await;
            }
        }
        for m in started {
            let hub = match ctx.hub.mesh(&ctx.db, &m).await {
                Ok(Some(h)) => h,
                Ok(None) => continue,
                Err(e) => {
                    warn!(cause = %e, "loading a shared mesh");
                    continue;
                }
            };
            info!(peer = %link.peer, mesh.id = %m, "mesh flows over the link");
            // Members first: the mesh's messages may go out as soon as it flows, and the
            // peer refuses a message from a member it has not heard of.
            // The list is taken, queued and the mesh marked flowing under the members
            // lock (see `member_changed`).
            let overflow = {
                let mut q = lock(&link.members);
                // Earlier full lists of this mesh are superseded by this one (a peer
                // toggling its consent cannot pile them up).
                q.retain(
                    |f| !matches!(f, Frame::Members { mesh_id, full: true, .. } if *mesh_id == m),
                );
                let overflow = q.len() >= MEMBERS_QUEUE;
                let members = hub
                    .local_members()
                    .into_iter()
                    .map(|(pubkey, m)| MemberAnn {
                        member_id: m.id,
                        pubkey,
                        display_name: m.display_name,
                        role: m.role,
                        revoked: m.revoked,
                    })
                    .collect();
                q.push_back(Frame::Members {
                    mesh_id: m.clone(),
                    members,
                    full: true,
                });
                lock(&link.flowing).insert(m.clone());
                overflow
            };
            link.outbox_wake.notify_one();
            if overflow {
                self.reset_link(link, "members_full");
            }
            self.refresh_shared();
            // The snapshot is taken under the link's presence queue lock: updates queued
            // before it are older than it (it replaces them), updates after it are newer.
            {
                let mut queue = lock(&link.presence);
                let entries = hub.local_peers(|p| presence_entry(p, self.next_version()));
                queue.snapshot(
                    &m,
                    Frame::PresenceSnapshot {
                        mesh_id: m.clone(),
                        entries,
                    },
                );
            }
            link.presence_wake.notify_one();
            // What converges by merging or newest write goes over the live stream, in
            // its own task (it waits for room instead of dropping). It runs again a few
            // seconds later: what the peer could not take the first time (held too
            // long for a member announcement, changed while the lists were read) is
            // sent again. A new run for the mesh on this link replaces a running one.
            let (ctx2, link2, hub2) = (ctx.clone(), link.clone(), hub.clone());
            let cancel = self.stop.child_token();
            if let Some(old) = lock(&link.catch_ups).insert(m.clone(), cancel.clone()) {
                old.cancel();
            }
            self.tracker.spawn(async move {
                let runs = async {
                    catch_up(&ctx2, &link2, &hub2).await;
                    tokio::time::sleep(CATCH_UP_AGAIN).await;
                    if link2.flows(&hub2.row.id) {
                        catch_up(&ctx2, &link2, &hub2).await;
                    }
                };
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = runs => {}
                }
            });
        }
        link.outbox_wake.notify_one();
    }

    // ---- the link ---------------------------------------------------------------------

    async fn serve_link(
        self: Arc<Self>,
        link: Link,
        id: u64,
        counters: Arc<LinkCounters>,
        stop: CancellationToken,
    ) -> Result<(), LinkError> {
        let Some(ctx) = self.ctx() else {
            return Ok(());
        };
        let peer: Arc<str> = Arc::from(link.peer.as_str());
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (live_tx, live_rx) = mpsc::channel(LIVE_QUEUE);
        let shared = Arc::new(LinkShared {
            peer: peer.clone(),
            id,
            flow_lock: tokio::sync::Mutex::new(()),
            reannounced: Mutex::default(),
            peer_ready: Mutex::new(
                link.peer_hello
                    .meshes
                    .iter()
                    .map(|m| m.mesh_id.clone())
                    .collect(),
            ),
            // What our hello said, not what consent says now: it may have changed
            // during the handshake, and the reconcile below tells the peer the difference.
            claimed: Mutex::new(
                link.hello
                    .meshes
                    .iter()
                    .map(|m| m.mesh_id.clone())
                    .collect(),
            ),
            flowing: Mutex::default(),
            control: control_tx,
            presence: Mutex::default(),
            presence_wake: Notify::new(),
            live: live_tx,
            live_drained: Arc::new(Notify::new()),
            members: Mutex::default(),
            outbox_wake: Notify::new(),
            counters: counters.clone(),
            messages_in: std::sync::atomic::AtomicBool::new(false),
            live_in: std::sync::atomic::AtomicBool::new(false),
            started: crate::time::std_instant(),
            held: Mutex::default(),
            announced: Notify::new(),
            catch_ups: Mutex::default(),
        });
        let Link { conn, control, .. } = link;
        {
            // The manager cancels a replaced link's `stop` before it starts the link that
            // replaces it. So, checked under the table's lock: a link replaced before its
            // handler got here steps aside (registering it would shadow its successor,
            // and its removal on the way out would leave the peer with no link at all —
            // "up" and carrying nothing, for good).
            let mut links = lock(&self.links);
            if stop.is_cancelled() {
                debug!(peer = %peer, id, "link replaced before it started");
                return Ok(());
            }
            links.insert(peer.to_string(), shared.clone());
        }
        ctx.metrics.fed_links_up.fetch_add(1, Ordering::Relaxed);

        let tasks = TaskTracker::new();
        let link_stop = stop.child_token();
        let (done_tx, mut done_rx) = mpsc::channel::<Result<(), LinkError>>(8);
        let spawn =
            |fut: Pin<Box<dyn std::future::Future<Output = Result<(), LinkError>> + Send>>| {
                let done = done_tx.clone();
                let stop = link_stop.clone();
                tasks.spawn(
                    async move {
                        let r = tokio::select! {
                            r = fut => r,
                            () = stop.cancelled() => Ok(()),
                        };
                        let _ = done.try_send(r);
                    }
                    .in_current_span(),
                );
            };
        let conn = Arc::new(conn);
        spawn(Box::pin(control_writer(control.tx, control_rx)));
        spawn(Box::pin(
            self.clone().control_reader(shared.clone(), control.rx),
        ));
        spawn(Box::pin(self.clone().outbox(shared.clone(), conn.clone())));
        spawn(Box::pin(presence_writer(shared.clone(), conn.clone())));
        spawn(Box::pin(live_writer(
            conn.clone(),
            live_rx,
            counters.clone(),
            shared.live_drained.clone(),
        )));
        spawn(Box::pin(self.clone().accept_streams(
            shared.clone(),
            conn.clone(),
            tasks.clone(),
            done_tx.clone(),
            link_stop.clone(),
        )));
        drop(done_tx);
        // Start the meshes both sides are ready for (unless the link is already
        // stopping: a stop never waits on the peer).
        let result = tokio::select! {
            () = stop.cancelled() => Ok(()),
            () = self.reconcile_link(&shared) => tokio::select! {
                r = done_rx.recv() => r.unwrap_or(Ok(())),
                () = stop.cancelled() => Ok(()),
            },
        };
        link_stop.cancel();
        if stop.is_cancelled() {
            conn.close(CloseReason::Shutdown);
        }
        tasks.close();
        tasks.wait().await;
        // Unregister (unless a newer link for this peer already replaced this one).
        {
            let mut links = lock(&self.links);
            if links.get(&*peer).is_some_and(|l| Arc::ptr_eq(l, &shared)) {
                links.remove(&*peer);
            }
        }
        self.refresh_shared();
        ctx.metrics.fed_links_up.fetch_sub(1, Ordering::Relaxed);
        self.schedule_presence_expiry(peer, lock(&shared.flowing).clone());
        result
    }

    /// Peers of a lost link stay listed for `presence_grace`, then leave (unless the
    /// link came back, whose snapshot replaced them).
    fn schedule_presence_expiry(self: &Arc<Self>, peer: Arc<str>, meshes: HashSet<String>) {
        let me = self.clone();
        let grace = self.cfg.presence_grace;
        // One expiry per peer: a newer one takes over the meshes of a pending one (a
        // peer reconnecting quickly does not pile up timers).
        let cancel = self.stop.child_token();
        let mut meshes = meshes;
        if let Some((old, pending)) =
            lock(&self.expiries).insert(peer.to_string(), (cancel.clone(), HashSet::new()))
        {
            old.cancel();
            meshes.extend(pending);
        }
        if let Some(e) = lock(&self.expiries).get_mut(&*peer) {
            e.1.clone_from(&meshes);
        }
        self.tracker.spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(grace) => {}
            }
            {
                // Under the lock: a newer expiry cancels this one before it replaces the
                // entry, so an uncancelled token means the entry is this one's.
                let mut expiries = lock(&me.expiries);
                if cancel.is_cancelled() {
                    return;
                }
                expiries.remove(&*peer);
            }
            // A link that came back replaced these meshes' peers with its snapshot; the
            // ones it does not carry (unshared meanwhile, or not flowing yet) leave.
            let meshes: Vec<String> = match me.link(&peer) {
                Some(l) => meshes.into_iter().filter(|m| !l.flows(m)).collect(),
                None => meshes.into_iter().collect(),
            };
            let Some(ctx) = me.ctx() else { return };
            let now = now_ms();
            for m in meshes {
                if let Some(hub) = ctx.hub.loaded(&m) {
                    hub.remote_drop(&peer, now);
                    crate::mcp::broker_gone(&ctx, &hub, &peer);
                }
            }
            debug!(peer = %peer, "presence of a lost link expired");
        });
    }

    async fn control_reader(
        self: Arc<Self>,
        link: Arc<LinkShared>,
        mut rx: FrameReader,
    ) -> Result<(), LinkError> {
        while let Some(frame) = rx.recv().await? {
            link.counters.received.fetch_add(1, Ordering::Relaxed);
            if !frame.allowed_on(None) {
                return Err(protocol_error(&frame, "control"));
            }
            match frame {
                Frame::MeshOffer(offer) => {
                    if !offer
                        .roster
                        .iter()
                        .any(|b| b.eq_ignore_ascii_case(&link.peer))
                    {
                        warn!(mesh.id = %offer.mesh_id, "offer whose roster omits its home; ignored");
                        continue;
                    }
                    if !crate::ids::plausible_id(&offer.mesh_id)
                        || offer.name.len() > meshd_protocol::client::MAX_NAME_LEN
                        || offer.slug.len() > meshd_protocol::client::MAX_NAME_LEN
                        || offer.roster.len() > MAX_ROSTER
                        || offer.roster.iter().any(|b| b.len() > 253)
                    {
                        let ctx = ctx_of(&self)?;
                        count_refused(&ctx, &link, RejectReason::Invalid, 1);
                        continue;
                    }
                    let mut o = offer.clone();
                    o.roster.retain(|b| !b.is_empty());
                    // The home is the sender; remember it with the offer (a bounded number
                    // per peer: homes send their offers again whenever consent changes).
                    let key = (o.mesh_id.clone(), link.peer.to_string());
                    {
                        let mut offers = lock(&self.offers);
                        let of_peer = offers.keys().filter(|(_, p)| *p == *link.peer).count();
                        if !offers.contains_key(&key) && of_peer >= MAX_OFFERS_PER_PEER {
                            drop(offers);
                            let ctx = ctx_of(&self)?;
                            count_refused(&ctx, &link, RejectReason::Invalid, 1);
                            continue;
                        }
                        offers.insert(key, o.clone());
                    }
                    let accepted = lock(&self.consent)
                        .shares
                        .get(&(o.mesh_id.clone(), link.peer.to_string()))
                        .is_some_and(|r| *r == ShareRole::Accept);
                    if accepted {
                        self.adopt_offer(&link.peer, &o).await;
                    } else {
                        debug!(mesh.id = %o.mesh_id, "offer received; not accepted here (yet)");
                    }
                }
                Frame::MeshReady(c) => {
                    // The peer's claims are bounded like its offers: a peer claiming
                    // meshes without end is misbehaving, and the link starts over.
                    if !crate::ids::plausible_id(&c.mesh_id) {
                        let ctx = ctx_of(&self)?;
                        count_refused(&ctx, &link, RejectReason::Invalid, 1);
                        continue;
                    }
                    let full = {
                        let mut ready = lock(&link.peer_ready);
                        if ready.len() >= MAX_PEER_READY && !ready.contains(&c.mesh_id) {
                            true
                        } else {
                            ready.insert(c.mesh_id);
                            false
                        }
                    };
                    if full {
                        self.reset_link(&link, "peer_ready_full");
                        return Err(LinkError::Io("too many mesh claims from the peer".into()));
                    }
                    self.update_flowing(&link).await;
                }
                Frame::MeshWithdraw(c) => {
                    lock(&link.peer_ready).remove(&c.mesh_id);
                    self.update_flowing(&link).await;
                }
                Frame::Close(reason) => return Err(LinkError::Closed(reason)),
                other => return Err(protocol_error(&other, "control")),
            }
        }
        Ok(())
    }

    /// Sends member announcements and the durable outbox; reads acks on the same stream.
    async fn outbox(
        self: Arc<Self>,
        link: Arc<LinkShared>,
        conn: Arc<LinkConn>,
    ) -> Result<(), LinkError> {
        let Some(ctx) = self.ctx() else { return Ok(()) };
        let (mut tx, rx) = conn.open(StreamClass::Messages).await?;
        let Some(mut rx) = rx else {
            return Err(LinkError::Io("messages stream without a reply half".into()));
        };
        let window = self.cfg.outbox_window;
        let inflight: Arc<Mutex<VecDeque<i64>>> = Arc::default();
        let acked = Arc::new(Notify::new());
        let peer = link.peer.to_string();
        // Acks and rejects come back on the reply half.
        let ack_reader = {
            let inflight = inflight.clone();
            let acked = acked.clone();
            let ctx = ctx.clone();
            let peer = peer.clone();
            let counters = link.counters.clone();
            async move {
                while let Some(frame) = rx.recv().await? {
                    match frame {
                        Frame::Ack { seq } => {
                            let seq = i64::try_from(seq).unwrap_or(i64::MAX);
                            {
                                let mut q = lock(&inflight);
                                while q.front().is_some_and(|s| *s <= seq) {
                                    q.pop_front();
                                }
                            }
                            acked.notify_one();
                            let _ = ctx
                                .writer
                                .send(WriteOp::Forwarded {
                                    peer: peer.clone(),
                                    upto: seq,
                                    at: now_ms(),
                                })
                                .await;
                        }
                        Frame::Reject { seq, reason } => {
                            counters.rejected.fetch_add(1, Ordering::Relaxed);
                            warn!(
                                seq,
                                reason = reason.as_str(),
                                "peer refused a forwarded message"
                            );
                            let _ = ctx
                                .writer
                                .send(WriteOp::ForwardRefused {
                                    peer: peer.clone(),
                                    seq: Some(i64::try_from(seq).unwrap_or(i64::MAX)),
                                    mesh_id: None,
                                    reason: reason.as_str(),
                                    at: now_ms(),
                                })
                                .await;
                        }
                        other => return Err(protocol_error(&other, "messages reply")),
                    }
                }
                // Acks stop for good: the link cannot carry messages any more.
                Err::<(), LinkError>(LinkError::Io(
                    "the peer finished the reply half of the messages stream".into(),
                ))
            }
        };
        let sender = async {
            let max_seen = self.resend_mark(&peer);
            let hot = self.hot_sink(&peer);
            // Attach before the first store read: every row numbered from now on is
            // either in that read or offered to the hot queue.
            let mut attached = hot.attach();
            // Highest position sent on this link; rows go out strictly in order.
            let mut last: i64 = 0;
            // Whether the store has been read up to what the hot queue continues from.
            let mut caught_up = false;
            let mut recheck = Duration::from_millis(1);
            let mut buf: Vec<u8> = Vec::new();
            loop {
                let members: Vec<Frame> = lock(&link.members).drain(..).collect();
                for f in &members {
                    tx.send(f).await?;
                    link.counters.sent.fetch_add(1, Ordering::Relaxed);
                }
                let room = window.saturating_sub(lock(&inflight).len());
                if room == 0 {
                    acked.notified().await;
                    continue;
                }
                let wake = link.outbox_wake.notified();
                tokio::pin!(wake);
                wake.as_mut().enable();
                let hot_wake = hot.wake.notified();
                tokio::pin!(hot_wake);
                hot_wake.as_mut().enable();
                let limit = OUTBOX_PAGE.min(i64::try_from(room).unwrap_or(OUTBOX_PAGE));
                let (batch, from_store) = if caught_up {
                    let (rows, overflowed) =
                        hot.take(usize::try_from(limit).unwrap_or(0), &mut attached);
                    let gap = rows.first().is_some_and(|d| {
                        i64::try_from(d.seq).unwrap_or(i64::MAX) > last.saturating_add(1)
                    });
                    if overflowed || gap {
                        // Rows before these are (or will be) in the store: read it.
                        caught_up = false;
                        if gap {
                            // Not committed yet, or never will be (a failed batch):
                            // give the writer a moment rather than spin.
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        continue;
                    }
                    (rows, false)
                } else {
                    let rows = ctx
                        .db
                        .outbox_page(&peer, last, limit)
                        .await
                        .map_err(|e| LinkError::Io(format!("reading the outbox: {e}")))?;
                    if i64::try_from(rows.len()).unwrap_or(0) < limit {
                        caught_up = true;
                    }
                    (rows.into_iter().map(outbox_dm).collect(), true)
                };
                if batch.is_empty() && caught_up && hot.last_offered() > last {
                    // Numbered but neither queued nor read (offered before this outbox
                    // attached, committed after its read): read the store again once
                    // the writer has committed it. A row whose batch failed never
                    // appears, so the re-reads back off (to one a second).
                    caught_up = false;
                    tokio::time::sleep(recheck).await;
                    recheck = (recheck * 2).min(Duration::from_secs(1));
                    continue;
                }
                if batch.is_empty() {
                    if from_store {
                        let queued = ctx.db.outbox_len(&peer).await.unwrap_or(0);
                        link.counters
                            .queued
                            .store(u64::try_from(queued).unwrap_or(0), Ordering::Relaxed);
                        continue;
                    }
                    // Caught up: what waits is what the peer has not acknowledged yet.
                    link.counters
                        .queued
                        .store(lock(&inflight).len() as u64, Ordering::Relaxed);
                    // New rows wake the sender, acks refresh the gauge; a slow tick
                    // re-reads the store as a safety net (off the hot path: a store
                    // read here would delay the next hot row).
                    tokio::select! {
                        () = hot_wake => {}
                        () = wake => {}
                        () = acked.notified() => {}
                        () = tokio::time::sleep(Duration::from_secs(2)) => caught_up = false,
                    }
                    continue;
                }
                buf.clear();
                let mut sent = Vec::with_capacity(batch.len());
                let mut blocked = false;
                for dm in batch {
                    let seq = i64::try_from(dm.seq).unwrap_or(i64::MAX);
                    if seq <= last {
                        continue; // read from the store already
                    }
                    if !from_store && seq > last.saturating_add(1) {
                        // A row between was numbered but is not in this queue: the
                        // store has it (or will once committed); nothing may overtake it.
                        caught_up = false;
                        break;
                    }
                    if !link.flows(&dm.mesh_id) {
                        // Not (or no longer) shared with this peer: refuse locally. A
                        // mesh that has not started flowing yet on a new link waits a
                        // moment instead (nothing after it may overtake it: the peer
                        // de-duplicates by a high-water mark).
                        if self.consents(&dm.mesh_id, &peer)
                            && link.settling_or_flows(&dm.mesh_id, crate::time::std_instant())
                        {
                            blocked = true;
                            caught_up = false;
                            break;
                        }
                        last = seq;
                        let _ = ctx
                            .writer
                            .send(WriteOp::ForwardRefused {
                                peer: peer.clone(),
                                seq: Some(seq),
                                mesh_id: None,
                                reason: RejectReason::NotShared.as_str(),
                                at: now_ms(),
                            })
                            .await;
                        continue;
                    }
                    last = seq;
                    let frame = Frame::Dm(Box::new(dm));
                    let bytes = fed::encode(&frame, tx.max())?;
                    buf.extend_from_slice(&bytes);
                    sent.push(seq);
                }
                if blocked && sent.is_empty() {
                    // Woken when the mesh starts flowing (or new rows arrive).
                    let _ = tokio::time::timeout(Duration::from_secs(1), wake).await;
                    continue;
                }
                if sent.is_empty() {
                    continue;
                }
                recheck = Duration::from_millis(1);
                let resent = sent
                    .iter()
                    .filter(|s| u64::try_from(**s).unwrap_or(0) <= max_seen.load(Ordering::Relaxed))
                    .count();
                if let Some(l) = sent.last() {
                    max_seen.fetch_max(u64::try_from(*l).unwrap_or(0), Ordering::Relaxed);
                }
                lock(&inflight).extend(sent.iter().copied());
                // Member announcements queued while this batch was read go ahead of it.
                let late: Vec<Frame> = lock(&link.members).drain(..).collect();
                for f in &late {
                    tx.send(f).await?;
                }
                tx.send_raw(&buf).await?;
                tracing::trace!(n = sent.len(), last = ?sent.last(), from_store, "outbox sent");
                link.counters
                    .sent
                    .fetch_add(sent.len() as u64, Ordering::Relaxed);
                link.counters
                    .resent
                    .fetch_add(resent as u64, Ordering::Relaxed);
            }
            #[allow(unreachable_code)]
            Ok::<(), LinkError>(())
        };
        tokio::select! {
            r = ack_reader => r,
            r = sender => r,
        }
    }

    /// Accepts the streams the peer opens and serves each by its class.
    async fn accept_streams(
        self: Arc<Self>,
        link: Arc<LinkShared>,
        conn: Arc<LinkConn>,
        tasks: TaskTracker,
        done: mpsc::Sender<Result<(), LinkError>>,
        stop: CancellationToken,
    ) -> Result<(), LinkError> {
        loop {
            let incoming = conn.accept_stream().await?;
            let fut: Pin<Box<dyn std::future::Future<Output = Result<(), LinkError>> + Send>> =
                match incoming.class {
                    StreamClass::Messages => {
                        if link.messages_in.swap(true, Ordering::SeqCst) {
                            return Err(LinkError::Io(
                                "the peer opened a second messages stream".into(),
                            ));
                        }
                        let Some(tx) = incoming.tx else {
                            return Err(LinkError::Io(
                                "messages stream without a reply half".into(),
                            ));
                        };
                        Box::pin(self.clone().inbound_messages(link.clone(), incoming.rx, tx))
                    }
                    StreamClass::Presence => {
                        Box::pin(self.clone().inbound_presence(link.clone(), incoming.rx))
                    }
                    StreamClass::Live => {
                        // One applier keeps the live stream's order (and its hold).
                        if link.live_in.swap(true, Ordering::SeqCst) {
                            return Err(LinkError::Io(
                                "the peer opened a second live stream".into(),
                            ));
                        }
                        Box::pin(self.clone().inbound_live(link.clone(), incoming.rx))
                    }
                };
            let done = done.clone();
            let stop = stop.clone();
            tasks.spawn(
                async move {
                    let r = tokio::select! {
                        r = fut => r,
                        () = stop.cancelled() => Ok(()),
                    };
                    // Never waits: the link ends on its first error anyway.
                    if r.is_err() {
                        let _ = done.try_send(r);
                    }
                }
                .in_current_span(),
            );
        }
    }

    /// The peer's members and durable messages: stored (with the de-duplication cursor)
    /// before they are acknowledged, in order.
    async fn inbound_messages(
        self: Arc<Self>,
        link: Arc<LinkShared>,
        mut rx: FrameReader,
        mut tx: FrameWriter,
    ) -> Result<(), LinkError> {
        let Some(ctx) = self.ctx() else { return Ok(()) };
        let peer = link.peer.to_string();
        let cursor = lock(&self.cursors).entry(peer.clone()).or_default().clone();
        if lock(&cursor).is_none() {
            // Everything queued before is committed first, so the stored cursor is exact.
            let _ = ctx.writer.flush().await;
            let high = ctx
                .db
                .inbox_high(&peer)
                .await
                .map_err(|e| LinkError::Io(format!("reading the inbox cursor: {e}")))?;
            lock(&cursor).get_or_insert(fed::InboxCursor {
                high: u64::try_from(high).unwrap_or(0),
            });
        }
        let failed_cursor = cursor.clone();
        let (pending_tx, mut pending_rx) = mpsc::channel::<Fate>(self.cfg.outbox_window * 2);
        let acker = async move {
            let mut upto: Option<u64> = None;
            while let Some(p) = pending_rx.recv().await {
                let mut batch = vec![p];
                while let Ok(more) = pending_rx.try_recv() {
                    batch.push(more);
                }
                for p in batch {
                    match p {
                        Fate::Stored(seq, commit) => match commit.committed().await {
                            Ok(()) => upto = Some(seq),
                            Err(StoreError::Closed) => {
                                return Err(LinkError::Io("the store is shutting down".into()));
                            }
                            Err(e) => {
                                // The in-memory cursor is ahead of the store now: re-read it.
                                *lock(&failed_cursor) = None;
                                return Err(LinkError::Io(format!(
                                    "storing a forwarded message: {e}"
                                )));
                            }
                        },
                        Fate::Done(seq) => upto = Some(seq),
                        Fate::Rejected(seq, reason) => {
                            tx.send(&Frame::Reject { seq, reason }).await?;
                            upto = Some(seq);
                        }
                    }
                }
                if let Some(seq) = upto.take() {
                    debug!(seq, "acknowledging forwarded messages");
                    tx.send(&Frame::Ack { seq }).await?;
                }
            }
            Ok::<(), LinkError>(())
        };
        let reader = async {
            while let Some(frame) = rx.recv().await? {
                link.counters.received.fetch_add(1, Ordering::Relaxed);
                match frame {
                    Frame::Members {
                        mesh_id,
                        members,
                        full: _,
                    } => {
                        self.apply_members(&ctx, &link, &mesh_id, &members).await;
                        // Live frames that overtook these announcements may apply now.
                        link.announced.notify_one();
                    }
                    Frame::Dm(dm) => {
                        let seq = dm.seq;
                        // A cursor reset by a failed insert (on this or another link of
                        // the peer) must be re-read from the store: end this stream.
                        let Some(admitted) = lock(&cursor).as_mut().map(|c| c.admit(seq)) else {
                            return Err(LinkError::Io(
                                "the inbox cursor was reset; reconnecting".into(),
                            ));
                        };
                        tracing::trace!(seq, admitted, "forwarded message");
                        // From here until the store writer holds the message (or its
                        // refusal), the cursor is ahead of what will be stored: if this
                        // reader is cancelled in between (its link replaced), the cursor
                        // is reset, so the successor re-reads it from the store instead of
                        // taking the resend for a duplicate and losing it.
                        let mut ahead = CursorAhead::arm(&cursor, admitted);
                        let seq_i = i64::try_from(seq).unwrap_or(i64::MAX);
                        if !admitted {
                            // Seen before: stored, or refused (then refused again, so
                            // the sender does not take it for delivered).
                            let p = match ctx.db.inbox_rejection(&peer, seq_i).await {
                                Ok(Some(r)) => Fate::Rejected(
                                    seq,
                                    RejectReason::parse(&r).unwrap_or(RejectReason::Invalid),
                                ),
                                _ => Fate::Done(seq),
                            };
                            let _ = pending_tx.send(p).await;
                            continue;
                        }
                        let p = match self.accept_dm(&ctx, &link, *dm).await {
                            Ok(reply) => Fate::Stored(seq, reply),
                            Err(reason) => {
                                count_refused(&ctx, &link, reason, 1);
                                let _ = ctx
                                    .writer
                                    .send(WriteOp::InboxRejected {
                                        peer: peer.clone(),
                                        seq: seq_i,
                                        reason: reason.as_str(),
                                        at: now_ms(),
                                    })
                                    .await;
                                Fate::Rejected(seq, reason)
                            }
                        };
                        ahead.disarm();
                        if pending_tx.send(p).await.is_err() {
                            break;
                        }
                    }
                    other => return Err(protocol_error(&other, "messages")),
                }
            }
            Ok::<(), LinkError>(())
        };
        tokio::select! {
            r = reader => r,
            r = acker => r,
        }
    }

    async fn apply_members(
        &self,
        ctx: &Ctx,
        link: &LinkShared,
        mesh_id: &str,
        members: &[MemberAnn],
    ) {
        if !link.accepts(mesh_id) {
            ctx.metrics
                .fed_refused
                .inc(RejectReason::NotShared.as_str());
            return;
        }
        let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, mesh_id).await else {
            return;
        };
        let now = now_ms();
        // Members a peer hosts in this mesh are bounded (each carries rows, presence,
        // contexts and quotas here).
        let mut hosted = hub.members_hosted_by(&link.peer);
        for ann in members {
            if meshd_protocol::Pubkey::parse_hex(&ann.pubkey).is_err()
                || !crate::ids::plausible_id(&ann.member_id)
                || ann.display_name.is_empty()
                || ann.display_name.len() > meshd_protocol::client::MAX_NAME_LEN
                || !matches!(ann.role.as_str(), "admin" | "member")
            {
                ctx.metrics.fed_refused.inc(RejectReason::Invalid.as_str());
                continue;
            }
            if hub.member(&ann.pubkey).is_none() {
                if hosted >= MAX_REMOTE_MEMBERS {
                    count_refused(ctx, link, RejectReason::OverQuota, 1);
                    continue;
                }
                hosted += 1;
            }
            match ctx
                .db
                .upsert_remote_member(mesh_id, &link.peer, ann, now)
                .await
            {
                Ok(MemberUpsert::Applied { .. }) => {
                    if let Ok(Some(row)) = ctx.db.member_by_pubkey(mesh_id, &ann.pubkey).await {
                        hub.upsert_member(&ann.pubkey, member_info(&row));
                        if row.revoked_at.is_some() {
                            hub.revoke(&ann.pubkey);
                        }
                    }
                }
                Ok(MemberUpsert::Forged) => {
                    count_refused(ctx, link, RejectReason::ForgedSender, 1);
                    warn!(mesh.id = %mesh_id, member = %ann.pubkey, "peer announced a member it does not host; refused");
                }
                Err(e) => warn!(cause = %e, "storing a remote member"),
            }
        }
    }

    /// Validates a forwarded DM and queues its insert (with the inbox cursor).
    async fn accept_dm(
        &self,
        ctx: &Ctx,
        link: &LinkShared,
        dm: Dm,
    ) -> Result<Commit, RejectReason> {
        if !link.accepts(&dm.mesh_id) {
            return Err(RejectReason::NotShared);
        }
        let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &dm.mesh_id).await else {
            return Err(RejectReason::NotShared);
        };
        // The sender's member id must be the one its key belongs to: it is stored, and
        // quotas are counted by it.
        if !hub.hosted_by(&link.peer, &dm.sender_member_pubkey)
            || hub
                .member(&dm.sender_member_pubkey)
                .is_none_or(|m| m.id != dm.sender_member_id)
        {
            warn!(sender = %dm.sender_member_pubkey, "forwarded message from a member the peer does not host; refused");
            return Err(RejectReason::ForgedSender);
        }
        if dm.sender_name.len() > meshd_protocol::client::MAX_NAME_LEN
            || dm.sender_pubkey.len() > 64
            || dm.target_key.len() > 64
            || dm.client_message_id.as_ref().is_some_and(|c| c.len() > 256)
        {
            return Err(RejectReason::Invalid);
        }
        if hub.member_revoked(&dm.sender_member_pubkey) {
            return Err(RejectReason::Revoked);
        }
        let priority = Priority::from_rank(dm.priority).ok_or(RejectReason::Invalid)?;
        if dm.id.is_empty() || dm.id.len() > 64 {
            return Err(RejectReason::Invalid);
        }
        let envelope = Envelope {
            id: dm.id,
            mesh: hub,
            sender_pubkey: dm.sender_pubkey,
            author: Some(Author {
                member_id: dm.sender_member_id,
                member_pubkey: dm.sender_member_pubkey,
                name: dm.sender_name,
            }),
            target: Target::Key(dm.target_key),
            target_spec: dm.target_spec,
            priority,
            body: Body::Sealed {
                nonce: dm.nonce,
                ciphertext: dm.ciphertext,
            },
            subtype: dm.subtype,
            client_message_id: dm.client_message_id,
            created_at: dm.created_at,
            expires_at: dm.expires_at,
            origin: Origin::Peer {
                broker: link.peer.clone(),
                seq: Some(i64::try_from(dm.seq).unwrap_or(i64::MAX)),
            },
        };
        let accepted = delivery::submit(ctx, envelope, now_ms()).map_err(|e| e.reject_reason())?;
        let Some((op, commit)) = accepted.write else {
            return Err(RejectReason::Invalid);
        };
        if ctx.writer.send(op).await.is_err() {
            return Err(RejectReason::Invalid);
        }
        ctx.metrics.fed_received.fetch_add(1, Ordering::Relaxed);
        Ok(commit)
    }

    async fn inbound_presence(
        self: Arc<Self>,
        link: Arc<LinkShared>,
        mut rx: FrameReader,
    ) -> Result<(), LinkError> {
        let Some(ctx) = self.ctx() else { return Ok(()) };
        while let Some(frame) = rx.recv().await? {
            link.counters.received.fetch_add(1, Ordering::Relaxed);
            let now = now_ms();
            let mesh_id = match &frame {
                Frame::PresenceSnapshot { mesh_id, .. }
                | Frame::PresenceUpsert { mesh_id, .. }
                | Frame::PresenceGone { mesh_id, .. } => mesh_id.clone(),
                other => return Err(protocol_error(other, "presence")),
            };
            if !link.accepts(&mesh_id) {
                ctx.metrics
                    .fed_refused
                    .inc(RejectReason::NotShared.as_str());
                continue;
            }
            let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &mesh_id).await else {
                continue;
            };
            let caps = crate::hub::RemoteCaps::from_limits(&ctx.config.limits);
            let (refused, over) = match frame {
                Frame::PresenceSnapshot { entries, .. } => {
                    let (ok, bad): (Vec<_>, Vec<_>) = entries.into_iter().partition(valid_entry);
                    let (forged, over) = hub.remote_replace(&link.peer, ok, now, caps);
                    (bad.len() + forged, over)
                }
                Frame::PresenceUpsert { entry, .. } if valid_entry(&entry) => {
                    match hub.remote_upsert(&link.peer, *entry, now, caps) {
                        crate::hub::RemoteUpsert::Accepted => (0, 0),
                        crate::hub::RemoteUpsert::Forged => (1, 0),
                        crate::hub::RemoteUpsert::OverLimit => (0, 1),
                    }
                }
                Frame::PresenceUpsert { .. } => (1, 0),
                Frame::PresenceGone { key, version, .. } => {
                    hub.remote_gone(&link.peer, &key, version, now);
                    (0, 0)
                }
                _ => (0, 0),
            };
            if refused > 0 {
                count_refused(&ctx, &link, RejectReason::ForgedSender, refused);
            }
            if over > 0 {
                // Not the peer's fault as such (the cap is ours): counted apart.
                link.counters
                    .refused
                    .fetch_add(over as u64, Ordering::Relaxed);
                ctx.metrics
                    .fed_refused
                    .inc_by("presence_limit", over as u64);
            }
        }
        Ok(())
    }

    async fn inbound_live(
        self: Arc<Self>,
        link: Arc<LinkShared>,
        mut rx: FrameReader,
    ) -> Result<(), LinkError> {
        let Some(ctx) = self.ctx() else { return Ok(()) };
        // One reader, one applier: frames released from the hold and new frames are
        // applied by the same loop, in the stream's order. (Reading a frame cannot be
        // interrupted without losing its bytes, so it is not raced against the hold.)
        let (tx, mut frames) = mpsc::channel::<Frame>(LIVE_READ_AHEAD);
        let counters = link.counters.clone();
        let reader = async move {
            while let Some(frame) = rx.recv().await? {
                counters.received.fetch_add(1, Ordering::Relaxed);
                if tx.send(frame).await.is_err() {
                    break;
                }
            }
            Ok::<(), LinkError>(())
        };
        let applier = async {
            loop {
                let deadline = lock(&link.held).deadline();
                tokio::select! {
                    biased;
                    () = link.announced.notified() => {}
                    () = sleep_until_std(deadline), if deadline.is_some() => {}
                    frame = frames.recv() => {
                        let Some(frame) = frame else { break };
                        self.admit_live(&ctx, &link, frame).await?;
                    }
                }
                self.release_held(&ctx, &link).await?;
            }
            Ok::<(), LinkError>(())
        };
        let ended = tokio::try_join!(reader, applier).map(drop);
        // What still waits is lost with the stream (a new link catches up again).
        let dropped = lock(&link.held).clear();
        if dropped > 0 {
            count_refused(&ctx, &link, RejectReason::ForgedSender, dropped);
        }
        ended
    }

    /// Applies a live frame, or holds it: when it names members the peer has not
    /// announced yet, or when earlier frames are held (it keeps its place).
    async fn admit_live(
        self: &Arc<Self>,
        ctx: &Arc<Ctx>,
        link: &Arc<LinkShared>,
        frame: Frame,
    ) -> Result<(), LinkError> {
        let unknown = match unknown_members(ctx, link, &frame).await {
            Ok(u) => u,
            Err(reason) => {
                count_refused(ctx, link, reason, 1);
                return Ok(());
            }
        };
        if unknown.is_empty() && lock(&link.held).is_empty() {
            return self.live_frame(ctx, link, frame).await;
        }
        // Too large to hold at all: refused.
        let Ok(encoded) = fed::encode(&frame, HELD_BYTES - fed::LEN_PREFIX) else {
            count_refused(ctx, link, RejectReason::ForgedSender, 1);
            return Ok(());
        };
        // Full: the oldest goes; the frames that only waited behind it apply first.
        loop {
            {
                let mut held = lock(&link.held);
                if held.fits(encoded.len()) {
                    held.push(encoded, unknown, crate::time::std_instant());
                    return Ok(());
                }
                if !held.drop_front() {
                    // Empty and still no room: cannot happen (checked above).
                    count_refused(ctx, link, RejectReason::ForgedSender, 1);
                    return Ok(());
                }
            }
            count_refused(ctx, link, RejectReason::ForgedSender, 1);
            self.release_held(ctx, link).await?;
        }
    }

    /// Applies held frames from the front while they are ready; drops (and counts)
    /// those held too long.
    async fn release_held(
        self: &Arc<Self>,
        ctx: &Arc<Ctx>,
        link: &Arc<LinkShared>,
    ) -> Result<(), LinkError> {
        loop {
            let popped = lock(&link.held).pop(crate::time::std_instant(), |mesh, key| {
                ctx.hub.loaded(mesh).is_some_and(|hub| hub.knows(key))
            });
            match popped {
                None => return Ok(()),
                Some(Popped::Expired) => {
                    count_refused(ctx, link, RejectReason::ForgedSender, 1);
                }
                Some(Popped::Ready(bytes)) => {
                    // Encoded here with its length prefix.
                    if let Some(Ok(frame)) = bytes.get(fed::LEN_PREFIX..).map(fed::decode) {
                        self.live_frame(ctx, link, frame).await?;
                    }
                }
            }
        }
    }

    /// One frame of the live stream.
    async fn live_frame(
        self: &Arc<Self>,
        ctx: &Arc<Ctx>,
        link: &Arc<LinkShared>,
        frame: Frame,
    ) -> Result<(), LinkError> {
        match frame {
            Frame::Multicast(m) => {
                if let Err(reason) = self.deliver_multicast(ctx, link, *m).await {
                    count_refused(ctx, link, reason, 1);
                }
            }
            Frame::State(s) => {
                if !link.accepts(&s.mesh_id) {
                    ctx.metrics
                        .fed_refused
                        .inc(RejectReason::NotShared.as_str());
                    return Ok(());
                }
                let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &s.mesh_id).await else {
                    return Ok(());
                };
                // Writes by a peer's member must come from that member's broker; a
                // snapshot's entries (no member) are accepted as newest-wins data.
                if !s.member_pubkey.is_empty() && !hub.may_speak_for(&link.peer, &s.member_pubkey) {
                    count_refused(ctx, link, RejectReason::ForgedSender, 1);
                    return Ok(());
                }
                if s.key.len() > 1024
                    || s.value.len() > ctx.config.limits.max_state_value_bytes
                    || serde_json::from_str::<&serde_json::value::RawValue>(&s.value).is_err()
                {
                    ctx.metrics.fed_refused.inc(RejectReason::Invalid.as_str());
                    return Ok(());
                }
                let value: Arc<str> = Arc::from(s.value.as_str());
                let member_id = hub.member(&s.member_pubkey).map(|m| m.id);
                let applied = hub.state_apply_remote(
                    &s.key,
                    StateValue {
                        value: value.clone(),
                        updated_by: s.updated_by.clone(),
                        updated_at: s.updated_at,
                        member_id: member_id.clone(),
                    },
                    ctx.config.limits.max_state_bytes_per_mesh,
                    ctx.config.quotas.state_bytes_per_member,
                );
                if applied {
                    let _ = ctx
                        .writer
                        .send(WriteOp::SetState {
                            mesh_id: s.mesh_id,
                            key: s.key,
                            value,
                            updated_by: s.updated_by,
                            member_id,
                            at: s.updated_at,
                        })
                        .await;
                }
            }
            Frame::StreamData(p) => {
                let refused = if !link.accepts(&p.mesh_id) {
                    Some(RejectReason::NotShared)
                } else if p.stream.is_empty()
                    || p.stream.len() > meshd_protocol::client::MAX_NAME_LEN
                    || p.published_by.len() > meshd_protocol::client::MAX_NAME_LEN
                    || p.data.len() > ctx.config.limits.max_message_bytes
                    || serde_json::from_str::<&serde_json::value::RawValue>(&p.data).is_err()
                {
                    Some(RejectReason::Invalid)
                } else {
                    match ctx.hub.mesh(&ctx.db, &p.mesh_id).await {
                        Ok(Some(hub)) if hub.may_speak_for(&link.peer, &p.member_pubkey) => {
                            let frame =
                                BrokerFrame::StreamData(meshd_protocol::broker::StreamData {
                                    stream: p.stream.clone(),
                                    data: crate::hub::raw(&p.data),
                                    published_by: p.published_by,
                                });
                            hub.publish(&p.stream, 0, &Utf8Bytes::from(frame.to_json()));
                            None
                        }
                        Ok(Some(_)) => Some(RejectReason::ForgedSender),
                        _ => Some(RejectReason::NotShared),
                    }
                };
                if let Some(reason) = refused {
                    count_refused(ctx, link, reason, 1);
                }
            }
            Frame::Event(e) => {
                if let Err(reason) = deliver_event(ctx, link, *e).await {
                    count_refused(ctx, link, reason, 1);
                }
            }
            Frame::Skill(s) => {
                if let Err(reason) = apply_skill(ctx, link, *s).await {
                    count_refused(ctx, link, reason, 1);
                }
            }
            Frame::Memory(m) => {
                if let Err(reason) = apply_memory(ctx, link, *m).await {
                    count_refused(ctx, link, reason, 1);
                }
            }
            Frame::Forget { mesh_id, id, at } => {
                if !link.accepts(&mesh_id) || id.len() > 64 {
                    count_refused(ctx, link, RejectReason::NotShared, 1);
                } else if let Err(e) = ctx.db.forget(&mesh_id, &id, at).await {
                    warn!(cause = %e, "storing a peer's forget");
                }
            }
            Frame::RelayAsk(r) => {
                let r = *r;
                let (mesh_id, relay_id) = (r.mesh_id.clone(), r.relay_id.clone());
                let refused = if !link.accepts(&r.mesh_id) {
                    Err(RejectReason::NotShared)
                } else if r.path.len() > meshd_protocol::client::MAX_PATH_LEN
                    || r.relay_id.len() > 64
                    || r.req_id.as_ref().is_some_and(|q| q.len() > 256)
                {
                    Err(RejectReason::Invalid)
                } else {
                    match ctx.hub.mesh(&ctx.db, &r.mesh_id).await {
                        Ok(Some(hub))
                            if hub.remote_presence_of(
                                &link.peer,
                                &r.requester_key,
                                &r.requester_member_pubkey,
                            ) =>
                        {
                            Ok(crate::relay::remote_asked(ctx, &link.peer, &hub, r))
                        }
                        _ => Err(RejectReason::ForgedSender),
                    }
                };
                match refused {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        self.relay_send(
                            &link.peer,
                            &mesh_id,
                            Frame::RelayAnswer(Box::new(meshd_protocol::fed::RelayAnswer {
                                mesh_id: mesh_id.clone(),
                                relay_id,
                                content: None,
                                entries: None,
                                error: Some(error),
                            })),
                        );
                    }
                    Err(reason) => {
                        count_refused(ctx, link, reason, 1);
                    }
                }
            }
            Frame::McpServers {
                mesh_id,
                servers,
                all,
            } => {
                if let Err(reason) = apply_mcp_servers(ctx, link, mesh_id, servers, all).await {
                    count_refused(ctx, link, reason, 1);
                }
            }
            Frame::McpCall(a) => {
                let allowed = link.accepts(&a.mesh_id)
                    && matches!(ctx.hub.mesh(&ctx.db, &a.mesh_id).await,
                        Ok(Some(hub)) if hub.may_speak_for(&link.peer, &a.caller_member_pubkey));
                if allowed {
                    ctx.mcp.remote_call(ctx, &link.peer, *a);
                } else {
                    count_refused(ctx, link, RejectReason::ForgedSender, 1);
                }
            }
            Frame::Files {
                mesh_id,
                files,
                full,
            } => {
                let hub = if link.accepts(&mesh_id) && files.len() <= 10_000 {
                    ctx.hub.mesh(&ctx.db, &mesh_id).await.ok().flatten()
                } else {
                    None
                };
                let ok = match hub {
                    Some(hub) => {
                        match crate::files::apply_remote(ctx, &link.peer, &hub, files, full).await {
                            Ok(all_valid) => all_valid,
                            Err(e) => {
                                warn!(cause = %e, "storing a peer's files");
                                false
                            }
                        }
                    }
                    None => false,
                };
                if !ok {
                    count_refused(ctx, link, RejectReason::Invalid, 1);
                }
            }
            Frame::FileUrlAsk(a) => {
                let mut a = *a;
                // The reader must be a presence the peer hosts for that member; its
                // groups are the ones the peer announced for it, not the ask's.
                let hub = if link.accepts(&a.mesh_id) && a.reader_name.len() <= 256 {
                    ctx.hub.mesh(&ctx.db, &a.mesh_id).await.ok().flatten()
                } else {
                    None
                };
                let allowed = hub.as_ref().is_some_and(|hub| {
                    hub.remote_presence_of(&link.peer, &a.reader_key, &a.member_pubkey)
                        && hub
                            .member(&a.member_pubkey)
                            .is_some_and(|m| m.id == a.member_id)
                });
                if let (true, Some(hub)) = (allowed, &hub) {
                    a.groups = hub.remote_groups(&a.reader_key);
                    let answer = crate::files::remote_url(ctx, &a).await;
                    self.relay_send(
                        &link.peer,
                        &a.mesh_id,
                        Frame::FileUrlAnswer(Box::new(answer)),
                    );
                } else {
                    count_refused(ctx, link, RejectReason::ForgedSender, 1);
                }
            }
            Frame::FileUrlAnswer(a) => {
                if link.accepts(&a.mesh_id) {
                    ctx.files.answered(&link.peer, *a);
                }
            }
            Frame::Clock(c) => {
                // A broker speaks for its own changes (every pair of brokers of a
                // mesh is linked, so each change comes from its maker).
                let hub = if link.accepts(&c.mesh_id) && c.broker == *link.peer {
                    ctx.hub.mesh(&ctx.db, &c.mesh_id).await.ok().flatten()
                } else {
                    None
                };
                match hub {
                    Some(hub) if ctx.clocks.apply_remote(&hub, *c) => {}
                    _ => {
                        count_refused(ctx, link, RejectReason::NotShared, 1);
                    }
                }
            }
            Frame::Task(t) => {
                if let Err(reason) = apply_task(ctx, link, *t).await {
                    count_refused(ctx, link, reason, 1);
                }
            }
            Frame::McpResult(d) => {
                if link.accepts(&d.mesh_id) {
                    ctx.mcp.remote_result(ctx, &link.peer, *d);
                }
            }
            Frame::RelayAnswer(r) => {
                if link.accepts(&r.mesh_id) {
                    crate::relay::remote_answered(ctx, &link.peer, *r);
                }
            }
            Frame::Context(c) => {
                if let Err(reason) = apply_context(ctx, link, *c).await {
                    count_refused(ctx, link, reason, 1);
                }
            }
            other => return Err(protocol_error(&other, "live")),
        }
        Ok(())
    }

    async fn deliver_multicast(
        &self,
        ctx: &Ctx,
        link: &LinkShared,
        m: Multicast,
    ) -> Result<(), RejectReason> {
        if !link.accepts(&m.mesh_id) {
            return Err(RejectReason::NotShared);
        }
        let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &m.mesh_id).await else {
            return Err(RejectReason::NotShared);
        };
        if !hub.may_speak_for(&link.peer, &m.sender_member_pubkey) {
            return Err(RejectReason::ForgedSender);
        }
        let Ok(target @ (TargetSpec::Broadcast | TargetSpec::Group(_))) =
            TargetSpec::parse(&m.target_spec)
        else {
            return Err(RejectReason::Invalid);
        };
        let priority = Priority::from_rank(m.priority).ok_or(RejectReason::Invalid)?;
        let envelope = Envelope {
            id: m.id,
            mesh: hub,
            sender_pubkey: m.sender_pubkey,
            author: Some(Author {
                member_id: m.sender_member_id,
                member_pubkey: m.sender_member_pubkey,
                name: m.sender_name,
            }),
            target: Target::Spec(target),
            target_spec: m.target_spec,
            priority,
            body: Body::Sealed {
                nonce: m.nonce,
                ciphertext: m.ciphertext,
            },
            subtype: m.subtype,
            client_message_id: m.client_message_id,
            created_at: m.created_at,
            expires_at: m.created_at,
            origin: Origin::Peer {
                broker: link.peer.clone(),
                seq: None,
            },
        };
        delivery::submit(ctx, envelope, now_ms()).map_err(|e| e.reject_reason())?;
        Ok(())
    }
}

impl LinkHandler for Fed {
    fn hello(&self, peer: &str) -> Hello {
        let meshes = lock(&self.consent)
            .ready_for(peer)
            .into_iter()
            .map(|mesh_id| MeshClaim { mesh_id })
            .collect();
        Hello {
            version: fed::VERSION,
            broker: self.me.to_string(),
            caps: vec![
                "dm".into(),
                "multicast".into(),
                "presence".into(),
                "state".into(),
            ],
            meshes,
        }
    }

    fn run(
        self: Arc<Self>,
        link: Link,
        id: u64,
        counters: Arc<LinkCounters>,
        stop: CancellationToken,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<(), LinkError>> + Send>> {
        Box::pin(self.serve_link(link, id, counters, stop))
    }
}

/// The daemon's context, or the end of a link task when the daemon is gone.
fn ctx_of(fed: &Fed) -> Result<Arc<Ctx>, LinkError> {
    fed.ctx()
        .ok_or_else(|| LinkError::Io("the daemon is shutting down".into()))
}

/// Resets a peer's inbox cursor when dropped armed: see `inbound_messages`.
struct CursorAhead<'a> {
    cursor: &'a Mutex<Option<fed::InboxCursor>>,
    armed: bool,
}

impl<'a> CursorAhead<'a> {
    fn arm(cursor: &'a Mutex<Option<fed::InboxCursor>>, admitted: bool) -> Self {
        Self {
            cursor,
            armed: admitted,
        }
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for CursorAhead<'_> {
    fn drop(&mut self) {
        if self.armed {
            *lock(self.cursor) = None;
        }
    }
}

/// Hands a peer's event push to every local connection of the mesh.
async fn deliver_event(ctx: &Ctx, link: &LinkShared, e: EventPush) -> Result<(), RejectReason> {
    if !link.accepts(&e.mesh_id) {
        return Err(RejectReason::NotShared);
    }
    if e.subtype != "webhook"
        || e.event.is_empty()
        || e.event.len() > meshd_protocol::client::MAX_NAME_LEN
        || e.sender.len() > 2 * meshd_protocol::client::MAX_NAME_LEN
        || e.id.len() > 64
        || e.data.len() > crate::http::WEBHOOK_BODY_LIMIT
    {
        return Err(RejectReason::Invalid);
    }
    let Ok(data) = serde_json::value::RawValue::from_string(e.data) else {
        return Err(RejectReason::Invalid);
    };
    let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &e.mesh_id).await else {
        return Err(RejectReason::NotShared);
    };
    let envelope = Envelope {
        id: e.id,
        mesh: hub,
        sender_pubkey: e.sender,
        author: None,
        target: Target::Everyone,
        target_spec: String::new(),
        priority: Priority::Next,
        body: Body::Event {
            name: e.event,
            data,
        },
        subtype: Some(e.subtype),
        client_message_id: None,
        created_at: e.created_at,
        expires_at: e.created_at,
        origin: Origin::Peer {
            broker: link.peer.clone(),
            seq: None,
        },
    };
    delivery::submit(ctx, envelope, now_ms()).map_err(|e| e.reject_reason())?;
    Ok(())
}

/// Memories a peer broker is sent when its link comes up (newest first).
const MEMORY_CATCH_UP: i64 = 10_000;

/// A stored memory as a federation frame.
pub(crate) fn memory_set(
    row: crate::store::memory::MemoryRow,
    pubkey: &str,
    forgotten_at: Option<i64>,
) -> meshd_protocol::fed::MemorySet {
    meshd_protocol::fed::MemorySet {
        mesh_id: row.mesh_id,
        id: row.id,
        content: row.content,
        tags: row.tags,
        remembered_by: row.remembered_by,
        remembered_by_pubkey: pubkey.to_owned(),
        remembered_by_name: row.remembered_by_name,
        remembered_at: row.remembered_at,
        forgotten_at,
    }
}

/// A stored context as a federation frame.
pub(crate) fn context_set(
    row: crate::store::contexts::ContextRow,
    pubkey: &str,
) -> meshd_protocol::fed::ContextSet {
    use crate::store::contexts::ContextRow;
    meshd_protocol::fed::ContextSet {
        files_read: ContextRow::list(&row.files_read),
        key_findings: ContextRow::list(&row.key_findings),
        tags: ContextRow::list(&row.tags),
        mesh_id: row.mesh_id,
        member_id: row.member_id,
        member_pubkey: pubkey.to_owned(),
        peer_name: row.peer_name,
        summary: row.summary,
        updated_at: row.updated_at,
    }
}

/// Whether `peer` hosts the member `(id, pubkey)` of `hub` (it may speak for it).
fn speaks_for(hub: &MeshHub, peer: &str, member_id: &str, pubkey: &str) -> bool {
    hub.member(pubkey).is_some_and(|m| m.id == member_id) && hub.may_speak_for(peer, pubkey)
}

/// Queues a catch-up frame on the live stream, leaving half of it to live traffic: a
/// sender awaiting room would be handed every freed slot, so broadcasts and calls
/// (queued without waiting) would be dropped for the whole catch-up. `false` when the
/// link ended.
async fn send_catch_up(link: &LinkShared, mut frame: Frame) -> bool {
    loop {
        let drained = link.live_drained.notified();
        tokio::pin!(drained);
        drained.as_mut().enable();
        if link.live.capacity() > LIVE_QUEUE / 2 {
            match link.live.try_send(frame) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
                Err(mpsc::error::TrySendError::Full(f)) => frame = f,
            }
        }
        tokio::select! {
            () = drained => {}
            () = link.live.closed() => return false,
        }
    }
}

/// Sends a peer what converges without the outbox: the clock, MCP servers and files
/// (full lists), shared state, skills, contexts, memories, tasks. Waits for room on
/// the live stream (see [`send_catch_up`]); stops when the link ends.
async fn catch_up(ctx: &Ctx, link: &LinkShared, hub: &MeshHub) {
    let m = hub.row.id.clone();
    let send = |frame: Frame| send_catch_up(link, frame);
    if let Some(c) = ctx.clocks.set_of(&m)
        && !send(Frame::Clock(Box::new(c))).await
    {
        return;
    }
    // Full lists replace what the peer knew from us, so withdrawals made while the
    // link was down are not missed. They go in parts that stay well below any frame
    // limit; the first names every MCP server, so the peer drops the others.
    let budget = ctx
        .config
        .federation
        .as_ref()
        .map_or(CATCH_UP_PART_BYTES, |f| {
            CATCH_UP_PART_BYTES.min(f.max_frame_bytes / 2)
        });
    // MCP servers: every name first, in a frame of its own (a part holding a large
    // registration could exceed a small frame limit and be dropped), then the servers.
    let sets = ctx.mcp.local_sets(&m);
    let names = Frame::McpServers {
        mesh_id: m.clone(),
        servers: Vec::new(),
        all: Some(sets.iter().map(|s| s.name.clone()).collect()),
    };
    if !send(names).await {
        return;
    }
    let mcp_size = |s: &meshd_protocol::fed::McpServerSet| {
        s.name.len() + s.hosted_by.len() + s.description.len() + s.tools_json.len() + 256
    };
    for servers in parts(sets, budget, mcp_size) {
        if servers.is_empty() {
            continue;
        }
        let frame = Frame::McpServers {
            mesh_id: m.clone(),
            servers,
            all: None,
        };
        if !send(frame).await {
            return;
        }
    }
    // Files: the empty full list first (the peer forgets ours), then the list read
    // after it, so a file uploaded meanwhile is in the list or arrives after it.
    let files = |files, full| Frame::Files {
        mesh_id: m.clone(),
        files,
        full,
    };
    if !send(files(Vec::new(), true)).await {
        return;
    }
    match ctx.db.local_files(&m, now_ms()).await {
        Ok(rows) => {
            let sets = rows
                .iter()
                .map(|f| crate::files::file_set(f, false))
                .collect();
            for part in parts(sets, budget, file_set_size) {
                if !part.is_empty() && !send(files(part, false)).await {
                    return;
                }
            }
        }
        Err(e) => warn!(cause = %e, "reading files for a peer"),
    }
    for (key, v) in hub.state_list() {
        let frame = Frame::State(Box::new(StateSet {
            mesh_id: m.clone(),
            key,
            value: v.value.to_string(),
            updated_by: v.updated_by,
            updated_at: v.updated_at,
            member_pubkey: String::new(),
        }));
        if !send(frame).await {
            return;
        }
    }
    match ctx.db.skills(&m).await {
        Ok(skills) => {
            for row in skills {
                if !send(Frame::Skill(Box::new(skill_set(row, false)))).await {
                    return;
                }
            }
        }
        Err(e) => warn!(cause = %e, "reading skills for a peer"),
    }
    // Memories and contexts of the members hosted here (and every forgetting: any
    // member may forget).
    let local: HashMap<String, String> = hub
        .local_members()
        .into_iter()
        .map(|(pk, m)| (m.id, pk))
        .collect();
    match ctx.db.contexts(&m).await {
        Ok(rows) => {
            for row in rows {
                if let Some(pk) = local.get(&row.member_id)
                    && !send(Frame::Context(Box::new(context_set(row, pk)))).await
                {
                    return;
                }
            }
        }
        Err(e) => warn!(cause = %e, "reading contexts for a peer"),
    }
    match ctx.db.memories_by(&m, MEMORY_CATCH_UP).await {
        Ok(rows) => {
            for (row, forgotten_at) in rows {
                let frame = match local.get(&row.remembered_by) {
                    Some(pk) => Frame::Memory(Box::new(memory_set(row, pk, forgotten_at))),
                    None => match forgotten_at {
                        Some(at) => Frame::Forget {
                            mesh_id: row.mesh_id,
                            id: row.id,
                            at,
                        },
                        None => continue,
                    },
                };
                if !send(frame).await {
                    return;
                }
            }
        }
        Err(e) => warn!(cause = %e, "reading memories for a peer"),
    }
    match ctx.db.tasks_full(&m, TASK_CATCH_UP).await {
        Ok(rows) => {
            for t in rows {
                if !send(Frame::Task(Box::new(task_set(hub, t)))).await {
                    return;
                }
            }
        }
        Err(e) => warn!(cause = %e, "reading tasks for a peer"),
    }
}

/// When the live catch-up is sent a second time after a link comes up.
const CATCH_UP_AGAIN: Duration = Duration::from_secs(5);
/// Bytes of one catch-up part (a list split into frames), at most half the frame limit.
const CATCH_UP_PART_BYTES: usize = 256 * 1024;

/// Splits `items` into parts whose estimated `size` stays within `budget` (an item
/// larger than it goes alone). Always at least one part, so a full list is sent even
/// when empty.
fn parts<T>(items: Vec<T>, budget: usize, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut used = 0usize;
    for item in items {
        let n = size(&item);
        if !current.is_empty() && used.saturating_add(n) > budget {
            out.push(std::mem::take(&mut current));
            used = 0;
        }
        used = used.saturating_add(n);
        current.push(item);
    }
    out.push(current);
    out
}

/// Upper estimate of a file entry's encoded size.
fn file_set_size(f: &meshd_protocol::fed::FileSet) -> usize {
    [
        &f.id,
        &f.name,
        &f.sha256,
        &f.tags,
        &f.owner_pubkey,
        &f.uploader_member_id,
        &f.uploader_pubkey,
        &f.uploaded_by_name,
    ]
    .iter()
    .map(|s| s.len() + 5)
    .sum::<usize>()
        + f.mime_type.as_ref().map_or(0, String::len)
        + f.target_spec.as_ref().map_or(0, String::len)
        + 64
}

/// Tasks a peer broker is sent when its link comes up (newest first).
const TASK_CATCH_UP: i64 = 10_000;

/// A stored task as a federation frame (`hub`: its mesh, to tell whether this broker
/// hosts the creator).
pub(crate) fn task_set(
    hub: &MeshHub,
    t: crate::store::tasks::TaskFull,
) -> meshd_protocol::fed::TaskSet {
    let creator_hosted = t
        .creator_pubkey
        .as_deref()
        .and_then(|k| hub.member(k))
        .is_some_and(|m| m.home.is_none());
    meshd_protocol::fed::TaskSet {
        creator_hosted,
        tags: serde_json::from_str(&t.tags).unwrap_or_default(),
        mesh_id: t.mesh_id,
        id: t.id,
        title: t.title,
        assignee: t.assignee,
        priority: t.priority,
        created_by: t.created_by,
        creator_pubkey: t.creator_pubkey.unwrap_or_default(),
        created_at: t.created_at,
        claimed_by: t.claimed_by,
        claimed_at: t.claimed_at,
        result: t.result,
        completed_at: t.completed_at,
    }
}

/// Merges a peer broker's view of a task. A task new here must have been created by a
/// member the peer hosts; progress (claims, completions) merges from any sharing broker.
async fn apply_task(
    ctx: &Ctx,
    link: &LinkShared,
    t: meshd_protocol::fed::TaskSet,
) -> Result<(), RejectReason> {
    use crate::store::tasks::{TaskFull, TaskProgress};
    use meshd_protocol::client::{
        MAX_GROUPS, MAX_NAME_LEN, MAX_SKILL_INSTRUCTIONS, MAX_SUMMARY_LEN,
    };
    if !link.accepts(&t.mesh_id) {
        return Err(RejectReason::NotShared);
    }
    let name_ok = |n: &Option<String>| n.as_ref().is_none_or(|n| n.len() <= MAX_NAME_LEN);
    // Claims and completions win by being earliest: times before the task existed or
    // from the future are refused, so no broker can win every race with a zero.
    let now = now_ms();
    let plausible = |at: Option<i64>| {
        at.is_none_or(|at| at >= t.created_at && at <= now.saturating_add(5 * 60_000))
    };
    if !plausible(t.claimed_at)
        || !plausible(t.completed_at)
        || t.created_at > now.saturating_add(5 * 60_000)
        || t.id.is_empty()
        || t.id.len() > 64
        || t.title.len() > MAX_SUMMARY_LEN
        || t.priority.len() > MAX_NAME_LEN
        || !name_ok(&t.assignee)
        || !name_ok(&t.created_by)
        || !name_ok(&t.claimed_by)
        || t.tags.len() > MAX_GROUPS
        || t.tags.iter().any(|x| x.len() > MAX_NAME_LEN)
        || t.result
            .as_ref()
            .is_some_and(|r| r.len() > MAX_SKILL_INSTRUCTIONS)
    {
        return Err(RejectReason::Invalid);
    }
    let store = |e: StoreError| {
        warn!(cause = %e, "storing a peer's task");
        RejectReason::Invalid
    };
    let incoming = TaskFull {
        tags: serde_json::to_string(&t.tags).unwrap_or_else(|_| "[]".into()),
        id: t.id,
        mesh_id: t.mesh_id,
        title: t.title,
        assignee: t.assignee,
        priority: t.priority,
        created_by: t.created_by,
        creator_pubkey: Some(t.creator_pubkey),
        created_at: t.created_at,
        claimed_by: t.claimed_by,
        claimed_at: t.claimed_at,
        result: t.result,
        completed_at: t.completed_at,
    };
    // Read, merge, compare-and-set; a local claim or completion in between makes the
    // write miss, and the merge is done again over what it wrote.
    for _ in 0..TASK_MERGE_ATTEMPTS {
        match ctx
            .db
            .task_full(&incoming.mesh_id, &incoming.id)
            .await
            .map_err(store)?
        {
            None => {
                let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &incoming.mesh_id).await else {
                    return Err(RejectReason::NotShared);
                };
                let creator = incoming.creator_pubkey.as_deref().unwrap_or_default();
                if !hub.hosted_by(&link.peer, creator) {
                    return Err(RejectReason::ForgedSender);
                }
                ctx.db.insert_remote_task(&incoming).await.map_err(store)?;
                // Not stored (the mesh's open tasks are at their cap) or stored as
                // sent: done. Changed here meanwhile: merged next round.
                match ctx
                    .db
                    .task_full(&incoming.mesh_id, &incoming.id)
                    .await
                    .map_err(store)?
                {
                    Some(t) if t.progress() != incoming.progress() => {}
                    _ => return Ok(()),
                }
            }
            Some(local) => {
                let was = local.progress();
                let merged: TaskProgress = was.merge(&incoming.progress());
                if merged == was
                    || ctx
                        .db
                        .set_task_progress(&local.mesh_id, &local.id, &was, &merged)
                        .await
                        .map_err(store)?
                {
                    return Ok(());
                }
            }
        }
    }
    warn!(task = %incoming.id, "a peer's task kept changing here while merging; left for the next catch-up");
    Ok(())
}

/// Rounds of read-merge-write for one task from a peer before it is left to the next
/// catch-up (each lost round means a local change won the race).
const TASK_MERGE_ATTEMPTS: usize = 8;

/// Applies a peer broker's MCP servers: only those of members it hosts, within limits;
/// local peers hear `mcp_registered` / `mcp_unregistered` / `mcp_restored`.
async fn apply_mcp_servers(
    ctx: &Ctx,
    link: &LinkShared,
    mesh_id: String,
    servers: Vec<meshd_protocol::fed::McpServerSet>,
    all: Option<Vec<String>>,
) -> Result<(), RejectReason> {
    use meshd_protocol::client::{MAX_NAME_LEN, MAX_SUMMARY_LEN};
    if !link.accepts(&mesh_id) {
        return Err(RejectReason::NotShared);
    }
    let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &mesh_id).await else {
        return Err(RejectReason::NotShared);
    };
    if servers.len() > crate::mcp::MAX_SERVERS_PER_MESH
        || all
            .as_ref()
            .is_some_and(|a| a.len() > crate::mcp::MAX_SERVERS_PER_MESH)
    {
        return Err(RejectReason::Invalid);
    }
    let mut forged = false;
    let servers: Vec<_> = servers
        .into_iter()
        .filter(|s| {
            let ok = speaks_for(&hub, &link.peer, &s.member_id, &s.member_pubkey);
            forged |= !ok;
            ok && !s.name.is_empty()
                && s.name.len() <= MAX_NAME_LEN
                && s.hosted_by.len() <= MAX_NAME_LEN
                && s.description.len() <= MAX_SUMMARY_LEN
                && s.tools_json.len() <= 256 * 1024
        })
        .collect();
    let now = now_ms();
    for (event, name, hosted_by) in ctx.mcp.apply_remote(&link.peer, &mesh_id, servers, all) {
        let mut data = serde_json::Map::new();
        data.insert("serverName".into(), name.clone().into());
        if event == "mcp_registered" {
            let (description, tools) = ctx.mcp.summary(&mesh_id, &name).unwrap_or_default();
            data.insert("description".into(), description.into());
            data.insert("tools".into(), tools.into());
        }
        data.insert("hostedBy".into(), hosted_by.into());
        hub.announce(
            &crate::delivery::system_push(&mesh_id, event, data, now),
            0,
            None,
        );
    }
    if forged {
        return Err(RejectReason::ForgedSender);
    }
    Ok(())
}

/// Stores a memory a member of the peer remembered (idempotent).
async fn apply_memory(
    ctx: &Ctx,
    link: &LinkShared,
    m: meshd_protocol::fed::MemorySet,
) -> Result<(), RejectReason> {
    use meshd_protocol::client::{MAX_NAME_LEN, MAX_SKILL_INSTRUCTIONS, MAX_SUMMARY_LEN};
    if !link.accepts(&m.mesh_id) {
        return Err(RejectReason::NotShared);
    }
    if m.id.is_empty()
        || m.id.len() > 64
        || m.content.len() > MAX_SKILL_INSTRUCTIONS
        || m.tags.len() > MAX_SUMMARY_LEN
        || m.remembered_by_name.len() > MAX_NAME_LEN
    {
        return Err(RejectReason::Invalid);
    }
    let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &m.mesh_id).await else {
        return Err(RejectReason::NotShared);
    };
    if !speaks_for(&hub, &link.peer, &m.remembered_by, &m.remembered_by_pubkey) {
        return Err(RejectReason::ForgedSender);
    }
    let row = crate::store::memory::MemoryRow {
        id: m.id,
        mesh_id: m.mesh_id,
        content: m.content,
        tags: m.tags,
        remembered_by: m.remembered_by,
        remembered_by_name: m.remembered_by_name,
        remembered_at: m.remembered_at,
    };
    ctx.db
        .put_remote_memory(&row, m.forgotten_at)
        .await
        .map_err(|e| {
            warn!(cause = %e, "storing a peer's memory");
            RejectReason::Invalid
        })
}

/// Stores a context a member of the peer shared (newest wins) and tells local peers.
async fn apply_context(
    ctx: &Ctx,
    link: &LinkShared,
    c: meshd_protocol::fed::ContextSet,
) -> Result<(), RejectReason> {
    use meshd_protocol::client::{MAX_GROUPS, MAX_NAME_LEN, MAX_PATH_LEN, MAX_SUMMARY_LEN};
    if !link.accepts(&c.mesh_id) {
        return Err(RejectReason::NotShared);
    }
    if c.summary.len() > MAX_SUMMARY_LEN
        || c.peer_name.len() > MAX_NAME_LEN
        || [&c.files_read, &c.key_findings, &c.tags]
            .iter()
            .any(|l| l.len() > MAX_GROUPS || l.iter().any(|x| x.len() > MAX_PATH_LEN))
    {
        return Err(RejectReason::Invalid);
    }
    let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &c.mesh_id).await else {
        return Err(RejectReason::NotShared);
    };
    if !speaks_for(&hub, &link.peer, &c.member_id, &c.member_pubkey) {
        return Err(RejectReason::ForgedSender);
    }
    let json = |v: &Vec<String>| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
    let row = crate::store::contexts::ContextRow {
        mesh_id: c.mesh_id.clone(),
        member_id: c.member_id.clone(),
        peer_name: c.peer_name.clone(),
        summary: c.summary.clone(),
        files_read: json(&c.files_read),
        key_findings: json(&c.key_findings),
        tags: json(&c.tags),
        updated_at: c.updated_at,
    };
    match ctx.db.put_context_if_newer(&row).await {
        Ok(true) => {
            // As for a local share_context: a state_change of `_context:<name>`.
            let change = BrokerFrame::StateChange(meshd_protocol::broker::StateChange {
                key: format!("_context:{}", c.peer_name),
                value: crate::hub::raw(&serde_json::Value::String(c.summary).to_string()),
                updated_by: c.peer_name,
            });
            hub.announce(&Utf8Bytes::from(change.to_json()), 0, None);
            Ok(())
        }
        Ok(false) => Ok(()),
        Err(e) => {
            warn!(cause = %e, "storing a peer's context");
            Err(RejectReason::Invalid)
        }
    }
}

/// A skill removal, as a federation frame.
pub(crate) fn skill_removal(mesh_id: &str, name: &str, at: i64) -> SkillSet {
    SkillSet {
        mesh_id: mesh_id.to_owned(),
        name: name.to_owned(),
        description: String::new(),
        instructions: String::new(),
        tags: Vec::new(),
        author: String::new(),
        created_at: at,
        updated_at: at,
        removed: true,
    }
}

/// A stored skill as a federation frame.
pub(crate) fn skill_set(row: crate::store::skills::SkillRow, removed: bool) -> SkillSet {
    let tags = row.tag_list();
    SkillSet {
        mesh_id: row.mesh_id,
        name: row.name,
        description: row.description,
        instructions: row.instructions,
        tags,
        author: row.author,
        created_at: row.created_at,
        updated_at: row.updated_at,
        removed,
    }
}

/// Applies a peer's skill write or removal (newest wins), within the local limits.
async fn apply_skill(ctx: &Ctx, link: &LinkShared, s: SkillSet) -> Result<(), RejectReason> {
    use meshd_protocol::client::{
        MAX_GROUPS, MAX_NAME_LEN, MAX_SKILL_INSTRUCTIONS, MAX_SUMMARY_LEN,
    };
    if !link.accepts(&s.mesh_id) {
        return Err(RejectReason::NotShared);
    }
    if s.name.trim().is_empty()
        || s.name.len() > MAX_NAME_LEN
        || s.description.len() > MAX_SUMMARY_LEN
        || s.instructions.len() > MAX_SKILL_INSTRUCTIONS
        || s.tags.len() > MAX_GROUPS
        || s.tags.iter().any(|t| t.len() > MAX_NAME_LEN)
        || s.author.len() > MAX_NAME_LEN
    {
        return Err(RejectReason::Invalid);
    }
    let result = if s.removed {
        ctx.db
            .delete_skill(&s.mesh_id, &s.name, s.updated_at)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    } else {
        let row = crate::store::skills::SkillRow {
            mesh_id: s.mesh_id,
            name: s.name,
            description: s.description,
            instructions: s.instructions,
            tags: serde_json::to_string(&s.tags).unwrap_or_else(|_| "[]".into()),
            author: s.author,
            created_at: s.created_at,
            updated_at: s.updated_at,
        };
        ctx.db
            .put_skill(&row, None)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    };
    if let Err(e) = result {
        warn!(cause = %e, "storing a peer's skill");
        return Err(RejectReason::Invalid);
    }
    Ok(())
}

/// An inbound message's fate, in arrival order.
enum Fate {
    Stored(u64, Commit),
    Done(u64),
    Rejected(u64, RejectReason),
}

fn protocol_error(frame: &Frame, stream: &str) -> LinkError {
    LinkError::Io(format!(
        "unexpected {} frame on the {stream} stream",
        frame.kind()
    ))
}

async fn replica_row(ctx: &Ctx, offer: &MeshOffer) -> Result<MeshRow, crate::admin::AdminError> {
    if let Some(row) = ctx.db.mesh_by_id(&offer.mesh_id).await? {
        return Ok(row);
    }
    crate::admin::replica_mesh_row(ctx, &offer.mesh_id, &offer.name, &offer.slug).await
}

fn outbox_dm(row: crate::store::OutboxRow) -> Dm {
    Dm {
        seq: u64::try_from(row.seq).unwrap_or(0),
        mesh_id: row.mesh_id,
        id: row.id,
        sender_member_id: row.sender_member_id,
        sender_member_pubkey: row.sender_member_pubkey,
        sender_pubkey: row.sender_pubkey,
        sender_name: row.sender_name,
        target_spec: row.target_spec,
        target_key: row.target_key.unwrap_or_default(),
        priority: row.priority,
        nonce: row.nonce,
        ciphertext: row.ciphertext,
        subtype: row.subtype,
        client_message_id: row.client_message_id,
        created_at: row.created_at,
        expires_at: row.expires_at,
    }
}

/// Bounds on a peer's presence entry: keys are ed25519 hex, texts stay within what a
/// local hello may carry (so a peer cannot make `list_peers` huge).
fn valid_entry(e: &PresenceEntry) -> bool {
    const TEXT: usize = 1024;
    meshd_protocol::Pubkey::parse_hex(&e.key).is_ok()
        && meshd_protocol::Pubkey::parse_hex(&e.member_pubkey).is_ok()
        && meshd_protocol::Status::parse(&e.status).is_some()
        && e.display_name.len() <= TEXT
        && e.member_id.len() <= 64
        && e.session_id.len() <= TEXT
        && e.cwd.len() <= 4 * TEXT
        && e.summary.as_ref().is_none_or(|s| s.len() <= 16 * TEXT)
        && e.groups.len() <= meshd_protocol::client::MAX_GROUPS
        && e.profile.len() <= 16 * TEXT
        && e.stats.as_ref().is_none_or(|s| s.len() <= TEXT)
        && [&e.hostname, &e.peer_type, &e.channel, &e.model]
            .iter()
            .all(|f| f.as_ref().is_none_or(|s| s.len() <= TEXT))
}

/// A local presence as announced to peer brokers.
fn presence_entry(p: &Peer, version: u64) -> PresenceEntry {
    PresenceEntry {
        key: p.routing_key().to_owned(),
        member_pubkey: p.member_pubkey.clone(),
        member_id: p.member_id.clone(),
        version,
        display_name: p.display_name.clone(),
        status: p.status.status.as_str().to_owned(),
        summary: p.summary.clone(),
        groups: p
            .groups
            .iter()
            .map(|g| fed::Group {
                name: g.name.clone(),
                role: g.role.clone(),
            })
            .collect(),
        visible: p.visible,
        session_id: p.session_id.clone(),
        connected_at: p.connected_at,
        cwd: p.cwd.clone(),
        hostname: p.hostname.clone(),
        peer_type: p.peer_type.clone(),
        channel: p.channel.clone(),
        model: p.model.clone(),
        peer_role: p.peer_role.to_owned(),
        profile: serde_json::to_string(&p.profile).unwrap_or_else(|_| "{}".into()),
        stats: p.stats.and_then(|s| serde_json::to_string(&s).ok()),
    }
}

async fn control_writer(
    mut tx: FrameWriter,
    mut rx: mpsc::Receiver<Frame>,
) -> Result<(), LinkError> {
    while let Some(f) = rx.recv().await {
        tx.send(&f).await?;
    }
    Ok(())
}

async fn presence_writer(link: Arc<LinkShared>, conn: Arc<LinkConn>) -> Result<(), LinkError> {
    let (mut tx, _) = conn.open(StreamClass::Presence).await?;
    loop {
        let wake = link.presence_wake.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        let frames = lock(&link.presence).take();
        if frames.is_empty() {
            wake.await;
            continue;
        }
        let mut buf = Vec::new();
        for f in &frames {
            buf.extend_from_slice(&fed::encode(f, tx.max())?);
        }
        tx.send_raw(&buf).await?;
        link.counters
            .sent
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
    }
}

async fn live_writer(
    conn: Arc<LinkConn>,
    mut rx: mpsc::Receiver<Frame>,
    counters: Arc<LinkCounters>,
    drained: Arc<Notify>,
) -> Result<(), LinkError> {
    let (mut tx, _) = conn.open(StreamClass::Live).await?;
    let mut batch = Vec::new();
    let mut buf = Vec::new();
    while rx.recv_many(&mut batch, 256).await > 0 {
        drained.notify_waiters();
        buf.clear();
        for f in batch.drain(..) {
            match fed::encode(&f, tx.max()) {
                Ok(b) => buf.extend_from_slice(&b),
                Err(e) => warn!(cause = %e, "live frame not forwarded"),
            }
            counters.sent.fetch_add(1, Ordering::Relaxed);
        }
        tx.send_raw(&buf).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{
        Coalescer, Consent, FLOW_SETTLE, HELD_BYTES, HELD_FOR, HELD_FRAMES, Held, Popped, may_send,
    };
    use crate::store::ShareRole;
    use meshd_protocol::fed::Frame;
    use std::time::Duration;

    fn consent(shares: &[(&str, &str, ShareRole)], replicas: &[(&str, &str, &[&str])]) -> Consent {
        Consent {
            shares: shares
                .iter()
                .map(|(m, p, r)| (((*m).to_owned(), (*p).to_owned()), *r))
                .collect(),
            replicas: replicas
                .iter()
                .map(|(m, home, roster)| {
                    let roster = roster.iter().map(|b| (*b).to_owned()).collect();
                    ((*m).to_owned(), ((*home).to_owned(), roster))
                })
                .collect(),
        }
    }

    #[test]
    fn consent_follows_offer_accept_and_roster() {
        // The home offers: ready at once, for that peer only.
        let home = consent(&[("m", "b", ShareRole::Offer)], &[]);
        assert!(home.local_ready("m", "b") && !home.local_ready("m", "c"));
        assert_eq!(home.roster("a", "m"), ["a", "b"]);
        // Accepted before the home's offer arrived: not ready (no replica yet).
        let accepted = consent(&[("m", "a", ShareRole::Accept)], &[]);
        assert!(!accepted.local_ready("m", "a"));
        // The offer arrived (replica of home a): ready with a, and with a roster broker
        // only through the accepted home.
        let replica = consent(
            &[("m", "a", ShareRole::Accept)],
            &[("m", "a", &["a", "b", "c"])],
        );
        assert!(replica.local_ready("m", "a") && replica.local_ready("m", "c"));
        assert!(!replica.local_ready("m", "d"), "not on the roster");
        assert_eq!(
            replica.ready_for("c").into_iter().collect::<Vec<_>>(),
            ["m"]
        );
        // Withdrawn (the accept is gone): the replica alone consents to nothing.
        let withdrawn = consent(&[], &[("m", "a", &["a", "b", "c"])]);
        assert!(!withdrawn.local_ready("m", "a") && !withdrawn.local_ready("m", "c"));
        assert!(withdrawn.ready_for("a").is_empty());
        // An accept of a different home does not make another home's replica ready.
        let other = consent(&[("m", "x", ShareRole::Accept)], &[("m", "a", &["a", "c"])]);
        assert!(!other.local_ready("m", "x") && !other.local_ready("m", "c"));
    }

    #[test]
    fn a_new_link_waits_for_flow_only_while_it_settles() {
        let fresh = Duration::ZERO;
        let settled = FLOW_SETTLE;
        assert!(
            may_send(true, false, settled),
            "a flowing mesh always sends"
        );
        assert!(
            may_send(false, true, fresh),
            "peer ready, ours being claimed"
        );
        assert!(may_send(
            false,
            true,
            FLOW_SETTLE - Duration::from_millis(1)
        ));
        assert!(
            !may_send(false, true, settled),
            "settled without flowing: refused"
        );
        assert!(
            !may_send(false, false, fresh),
            "the peer withdrew: refused at once"
        );
    }

    fn presence(key: &str, version: u64) -> Frame {
        Frame::PresenceGone {
            mesh_id: "m".into(),
            key: key.into(),
            version,
        }
    }

    fn versions(frames: Vec<Frame>) -> Vec<(String, u64)> {
        frames
            .into_iter()
            .map(|f| match f {
                Frame::PresenceGone { key, version, .. } => (key, version),
                Frame::PresenceSnapshot { entries, .. } => {
                    ("snapshot".into(), entries.len() as u64)
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn the_coalescer_keeps_the_newest_update_per_session_in_first_arrival_order() {
        let mut c = Coalescer::default();
        c.put("m", "k1", presence("k1", 1));
        c.put("m", "k2", presence("k2", 2));
        c.put("m", "k1", presence("k1", 3));
        assert_eq!(versions(c.take()), [("k1".into(), 3), ("k2".into(), 2)]);
        assert!(c.take().is_empty(), "taken once");
        // A snapshot supersedes every pending update of its mesh, not of others.
        c.put("m", "k1", presence("k1", 4));
        c.put("other", "k9", presence("k9", 5));
        c.snapshot(
            "m",
            Frame::PresenceSnapshot {
                mesh_id: "m".into(),
                entries: Vec::new(),
            },
        );
        assert_eq!(
            versions(c.take()),
            [("k9".into(), 5), ("snapshot".into(), 0)]
        );
    }

    fn unknown(keys: &[&str]) -> Vec<(String, String)> {
        keys.iter()
            .map(|k| ("m".to_owned(), (*k).to_owned()))
            .collect()
    }

    #[test]
    fn held_frames_keep_their_order_and_wait_for_their_members() {
        let t0 = crate::time::std_instant();
        let mut held = Held::default();
        held.push(vec![1], unknown(&["yan"]), t0);
        // A frame behind it waits for its turn, even with nobody unknown.
        held.push(vec![2], vec![], t0);
        held.push(vec![3], unknown(&["zoe"]), t0);
        assert_eq!(held.deadline(), Some(t0 + HELD_FOR));
        assert_eq!(held.pop(t0, |_, _| false), None, "yan is not known yet");
        assert_eq!(
            held.pop(t0, |_, k| k == "yan"),
            Some(Popped::Ready(vec![1]))
        );
        assert_eq!(held.pop(t0, |_, _| false), Some(Popped::Ready(vec![2])));
        assert_eq!(held.pop(t0, |_, k| k == "yan"), None, "zoe still unknown");
        // Held too long: dropped, never applied.
        let late = t0 + HELD_FOR;
        assert_eq!(held.pop(late, |_, _| false), Some(Popped::Expired));
        assert!(held.is_empty());
        assert_eq!((held.bytes, held.deadline()), (0, None));
    }

    #[test]
    fn the_hold_is_bounded_in_frames_and_bytes() {
        let t0 = crate::time::std_instant();
        let mut held = Held::default();
        for n in 0..HELD_FRAMES {
            assert!(held.fits(8));
            held.push(vec![0; 8], unknown(&[&n.to_string()]), t0);
        }
        assert!(!held.fits(1), "frames");
        assert!(held.drop_front());
        assert!(held.fits(8));
        assert_eq!(held.clear(), HELD_FRAMES - 1);
        assert!(!held.drop_front());
        held.push(vec![0; HELD_BYTES - 1], vec![], t0);
        assert!(held.fits(1) && !held.fits(2), "bytes");
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            held.pop(later, |_, _| false).map(|p| p == Popped::Expired),
            Some(false)
        );
        assert_eq!(held.bytes, 0);
    }
}
