//! The live view of every mesh: who is connected, with what status, groups and
//! visibility; the member and session keys that may be addressed; the shared state.
//!
//! Each mesh sits behind its own `std::sync::Mutex`, held only for short, non-async
//! critical sections (routing decisions, presence changes). Fan-out never waits on a
//! peer: it uses `try_send`, and a peer whose queue is full is closed as a slow consumer.
//! Direct messages are never lost that way, because they are stored and drained again
//! when the peer reconnects.
//!
//! # Delivery order
//! Every direct message passes the *router* (`delivery::router`), one task that sees all
//! inserts and claims in order; it is the only sequencer. For a live recipient it either
//! pushes the message to the connection's queue at once (the row is committed leased to
//! that connection), or — while the connection is *draining*, i.e. older rows for it may
//! wait in the store — appends it to the connection's in-memory *backlog* (also leased).
//! The session drains the store in `seq` order; the router stamps each claim with the
//! connection's *store count* (bumped whenever rows for it enter the store without going
//! through its backlog: at connect, when its queue overflows, when a status change makes
//! held rows eligible, …). When a claim comes back short the session sends `CaughtUp` with
//! that stamp; if nothing was stored since, the router flushes the backlog into the queue,
//! in order, and the connection is live again. A backlog that grows past its bound is
//! given back to the store (the drain picks it up) rather than held in memory.
//!
//! So per-sender order holds, a recipient never sees a later message before an earlier
//! one, and a recipient that falls behind under continuous load catches up after one
//! drain: new messages wait in its backlog, not in the store.

use std::collections::VecDeque;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::Utf8Bytes;
use meshd_protocol::broker::{BrokerFrame, CumulativeStats, PeerEntry, peer_event_data};
use meshd_protocol::client::{GroupEntry, Stats};
use meshd_protocol::routing::group_reaches;
use meshd_protocol::spatial::{self as space, Position};
use meshd_protocol::status::StatusState;
use meshd_protocol::{Priority, TargetSpec};
use serde_json::value::RawValue;
use tokio::sync::{Notify, OnceCell, mpsc};
use tokio_util::sync::CancellationToken;

use crate::store::{Db, MemberRow, MeshRow, PeerStateRow, StoreError};

mod bridged;
pub(crate) mod outq;
mod spatial;
pub(crate) mod topics;

use meshd_protocol::topics::TopicRole;

/// Process-local connection number (also the lease owner in the store).
pub(crate) type ConnId = u64;

/// A connection id as the store's `lease_conn` column holds it.
pub(crate) fn lease_owner(conn: ConnId) -> i64 {
    i64::try_from(conn).unwrap_or(i64::MAX)
}

/// What a session's writer loop sends to its socket.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// A serialized frame.
    Frame(Utf8Bytes),
    /// A stored direct message leased to this connection: after it is written, the
    /// session marks it delivered, or, for a client that acknowledges, waits for
    /// `client_ack`.
    Stored { frame: Utf8Bytes, sent: Sent },
}

impl Outbound {
    /// The frame's size, for the queue's byte budget.
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::Frame(t) | Self::Stored { frame: t, .. } => t.len(),
        }
    }
}

/// A stored message pushed (or about to be) on a connection.
#[derive(Debug, Clone)]
pub(crate) struct Sent {
    /// Broker message id.
    pub(crate) id: String,
    /// Its lease in the store is finite (taken for a client that acknowledges); an
    /// infinite lease lasts until the connection writes it or closes.
    pub(crate) finite_lease: bool,
}

/// Why the broker closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disconnect {
    /// A new connection took over this session key.
    Replaced,
    /// The member was revoked.
    Revoked,
    /// The outbound queue overflowed.
    SlowConsumer,
    /// The broker is stopping.
    Shutdown,
    /// A mesh admin kicked it (`stale`: for silence). Clients do not come back on their
    /// own after a kick.
    Kicked {
        /// Selected by `stale`.
        stale: bool,
    },
    /// A mesh admin disconnected it; the client may reconnect at once.
    Disconnected {
        /// Selected by `stale`.
        stale: bool,
    },
}

impl Disconnect {
    /// WebSocket close code and reason text.
    pub(crate) const fn frame(self) -> (u16, &'static str) {
        match self {
            Self::Replaced => (1000, "session_replaced"),
            Self::Revoked => (4002, "banned"),
            Self::SlowConsumer => (1008, "slow consumer"),
            Self::Shutdown => (1001, "shutting down"),
            Self::Kicked { stale: false } => (4001, "kicked"),
            Self::Kicked { stale: true } => (4001, "kicked_stale"),
            Self::Disconnected { stale: false } => (1000, "disconnected"),
            Self::Disconnected { stale: true } => (1000, "disconnected_stale"),
        }
    }
}

/// The parts of a live peer that other tasks touch without the mesh lock.
#[derive(Debug)]
pub(crate) struct PeerShared {
    pub(crate) conn_id: ConnId,
    pub(crate) tx: outq::OutTx,
    /// Wakes the session to drain the store.
    pub(crate) wake: Notify,
    /// Routing state, owned by the router (`delivery::router`; see the module docs).
    pub(crate) route: Mutex<RouteState>,
    /// Bytes of frames queued for this connection and not yet written.
    queued_bytes: AtomicUsize,
    /// Most bytes that may be queued (frames are up to the send size limit, so a count
    /// alone would not bound memory).
    max_queued_bytes: usize,
    /// The client acknowledges pushes (`client_ack`): its pushes are leased, not marked
    /// delivered on write.
    pub(crate) acks: AtomicBool,
    /// Cancelled to close the connection.
    pub(crate) cancel: CancellationToken,
    /// When a frame (or a pong) last arrived (ms): what `kick --stale` measures.
    pub(crate) last_active: std::sync::atomic::AtomicI64,
    /// Cancelled once the session has given back everything it held (end of teardown):
    /// a connection that replaced it drains only after that, so nothing it gives back
    /// can arrive after newer messages.
    pub(crate) retired: CancellationToken,
    close: Mutex<Option<Disconnect>>,
}

impl PeerShared {
    pub(crate) fn new(
        conn_id: ConnId,
        tx: outq::OutTx,
        cancel: CancellationToken,
        max_queued_bytes: usize,
    ) -> Self {
        Self {
            conn_id,
            tx,
            wake: Notify::new(),
            route: Mutex::new(RouteState::default()),
            queued_bytes: AtomicUsize::new(0),
            max_queued_bytes,
            retired: CancellationToken::new(),
            acks: AtomicBool::new(false),
            last_active: std::sync::atomic::AtomicI64::new(i64::MAX),
            cancel,
            close: Mutex::new(None),
        }
    }

    /// Asks the session to close (the first reason wins).
    pub(crate) fn close(&self, reason: Disconnect) {
        lock(&self.close).get_or_insert(reason);
        self.cancel.cancel();
    }

    /// Why the broker closed this connection, if it did.
    pub(crate) fn close_reason(&self) -> Option<Disconnect> {
        *lock(&self.close)
    }

    /// Queues a frame without waiting, within the connection's byte budget. A frame that
    /// does not fit is refused as `Full`, like one over the frame count.
    ///
    /// # Errors
    /// The frame back, as `Full` or `Closed`.
    pub(crate) fn try_queue(
        &self,
        out: Outbound,
    ) -> Result<(), mpsc::error::TrySendError<Outbound>> {
        let len = out.len();
        let queued = self.queued_bytes.load(Ordering::Relaxed);
        if queued > 0 && queued + len > self.max_queued_bytes {
            return Err(mpsc::error::TrySendError::Full(out));
        }
        self.tx.try_send(out)?;
        self.queued_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// `bytes` of queued frames were written (or dropped).
    pub(crate) fn dequeued(&self, bytes: usize) {
        self.queued_bytes.fetch_sub(
            bytes.min(self.queued_bytes.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
    }

    /// Rows for this peer entered the store outside its backlog: drain before taking
    /// pushes again.
    pub(crate) fn spill(&self) {
        lock(&self.route).stored();
        self.wake.notify_one();
    }
}

/// How the router delivers to one connection.
#[derive(Debug)]
pub(crate) struct RouteState {
    /// Bumped whenever rows for this connection enter the store outside its backlog.
    pub(crate) stored: u64,
    /// The store may hold rows older than anything pushed next: push to `backlog`.
    pub(crate) draining: bool,
    /// Messages the router accepted while draining, in order (rows leased to us).
    pub(crate) backlog: VecDeque<(Utf8Bytes, Sent)>,
    /// Bytes of frames in `backlog`.
    pub(crate) backlog_bytes: usize,
    /// The session ended: nothing more is accepted.
    pub(crate) closed: bool,
}

impl Default for RouteState {
    fn default() -> Self {
        // A new connection drains first: whatever waited while it was away.
        Self {
            stored: 0,
            draining: true,
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            closed: false,
        }
    }
}

impl RouteState {
    /// The session ended: refuse new messages and drop the backlog (its rows are leased
    /// to the connection and given back by the session's teardown).
    pub(crate) fn close(&mut self) {
        self.closed = true;
        self.backlog.clear();
        self.backlog_bytes = 0;
    }

    /// Empties the backlog, returning the ids of its messages.
    pub(crate) fn take_backlog(&mut self) -> Vec<String> {
        self.backlog_bytes = 0;
        self.backlog.drain(..).map(|(_, s)| s.id).collect()
    }

    /// Rows went to the store without the backlog: a drain must come first.
    pub(crate) fn stored(&mut self) {
        self.stored += 1;
        self.draining = true;
    }
}

/// Locks a std mutex, ignoring poisoning: every critical section here leaves the data
/// consistent even if it panicked half-way (they only push/remove whole entries).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A live presence.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) shared: Arc<PeerShared>,
    pub(crate) presence_id: String,
    pub(crate) member_id: String,
    pub(crate) member_pubkey: String,
    pub(crate) session_pubkey: Option<String>,
    pub(crate) display_name: String,
    /// `control-plane` (hello) or `session` (session_hello), as HEAD reports it.
    pub(crate) peer_role: &'static str,
    pub(crate) session_id: String,
    pub(crate) cwd: String,
    pub(crate) hostname: Option<String>,
    pub(crate) peer_type: Option<String>,
    pub(crate) channel: Option<String>,
    pub(crate) model: Option<String>,
    pub(crate) connected_at: i64,
    pub(crate) status: StatusState,
    pub(crate) summary: Option<String>,
    pub(crate) groups: Vec<GroupEntry>,
    /// Tag subscriptions (`features::tags`).
    pub(crate) tags: Vec<String>,
    /// Where the peer stands (`features::spatial`); `None`: it sees everyone.
    pub(crate) position: Option<Position>,
    pub(crate) visible: bool,
    pub(crate) profile: serde_json::Map<String, serde_json::Value>,
    pub(crate) stats: Option<Stats>,
    /// Counters restored at hello (baseline for the cumulative total at disconnect).
    pub(crate) restored_stats: Option<CumulativeStats>,
    /// Where the connection comes from (a status hook may only change presences of
    /// its own address).
    pub(crate) remote_ip: std::net::IpAddr,
    /// Opted in to typing indicators and read receipts, with the rate limiter of those
    /// it sends (`features::signals`); `None` for every client that did not ask.
    pub(crate) signals: Option<Box<crate::features::signals::Limiter>>,
    /// Watches the mesh's live dashboard (`features::dashboard`).
    pub(crate) dashboard: bool,
}

impl Peer {
    /// The key others address this peer by and see as its `pubkey`.
    pub(crate) fn routing_key(&self) -> &str {
        self.session_pubkey
            .as_deref()
            .unwrap_or(&self.member_pubkey)
    }

    fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| group_reaches(group, &g.name))
    }

    /// Whether a multicast to `target` reaches this presence (visibility aside).
    fn reached_by(&self, target: &TargetSpec) -> bool {
        match target {
            TargetSpec::Group(g) => self.in_group(g),
            TargetSpec::Tag(t) => self.tags.contains(t),
            _ => true,
        }
    }

    fn entry(&self) -> PeerEntry {
        PeerEntry {
            pubkey: self.routing_key().to_owned(),
            display_name: self.display_name.clone(),
            status: self.status.status.as_str(),
            summary: self.summary.clone(),
            groups: self.groups.clone(),
            session_id: self.session_id.clone(),
            connected_at: meshd_protocol::time::iso8601_ms(self.connected_at),
            cwd: self.cwd.clone(),
            hostname: self.hostname.clone(),
            peer_type: self.peer_type.clone(),
            channel: self.channel.clone(),
            model: self.model.clone(),
            stats: self.stats,
            visible: self.visible,
            profile: (!self.profile.is_empty()).then(|| self.profile.clone()),
            member_pubkey: self.member_pubkey.clone(),
            peer_role: self.peer_role,
            broker: None,
            tags: self.tags.clone(),
            position: self.position,
            bridged: None,
        }
    }
}

/// A live presence found by its address.
#[derive(Debug, Clone)]
pub(crate) struct AddressPeer {
    pub(crate) member_id: String,
    pub(crate) member_pubkey: String,
    pub(crate) display_name: String,
    pub(crate) routing_key: String,
}

/// What the hub knows about a member key.
#[derive(Debug, Clone)]
pub(crate) struct MemberInfo {
    pub(crate) id: String,
    pub(crate) display_name: String,
    pub(crate) role: String,
    pub(crate) revoked: bool,
    /// The peer broker hosting the member (`None`: hosted here).
    pub(crate) home: Option<Arc<str>>,
}

/// A session hosted by a peer broker, as it last announced it.
#[derive(Debug, Clone)]
pub(crate) struct RemotePeer {
    pub(crate) broker: Arc<str>,
    pub(crate) entry: meshd_protocol::fed::PresenceEntry,
}

impl RemotePeer {
    /// Whether a multicast to `target` reaches this presence (visibility aside).
    fn reached_by(&self, target: &TargetSpec) -> bool {
        match target {
            TargetSpec::Group(g) => self.entry.groups.iter().any(|e| group_reaches(g, &e.name)),
            TargetSpec::Tag(t) => self.entry.tags.contains(t),
            _ => true,
        }
    }

    fn peer_entry(&self) -> PeerEntry {
        let e = &self.entry;
        PeerEntry {
            pubkey: e.key.clone(),
            display_name: e.display_name.clone(),
            status: meshd_protocol::Status::parse(&e.status)
                .unwrap_or(meshd_protocol::Status::Idle)
                .as_str(),
            summary: e.summary.clone(),
            groups: e
                .groups
                .iter()
                .map(|g| GroupEntry {
                    name: g.name.clone(),
                    role: g.role.clone(),
                })
                .collect(),
            session_id: e.session_id.clone(),
            connected_at: meshd_protocol::time::iso8601_ms(e.connected_at),
            cwd: e.cwd.clone(),
            hostname: e.hostname.clone(),
            peer_type: e.peer_type.clone(),
            channel: e.channel.clone(),
            model: e.model.clone(),
            stats: e
                .stats
                .as_deref()
                .and_then(|s| serde_json::from_str(s).ok()),
            visible: e.visible,
            profile: serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&e.profile)
                .ok()
                .filter(|m| !m.is_empty()),
            member_pubkey: e.member_pubkey.clone(),
            peer_role: if e.peer_role == "session" {
                "session"
            } else {
                "control-plane"
            },
            broker: Some(self.broker.to_string()),
            tags: e.tags.clone(),
            position: e.position,
            bridged: None,
        }
    }
}

/// One shared-state value.
#[derive(Debug, Clone)]
pub(crate) struct StateValue {
    pub(crate) value: Arc<str>,
    pub(crate) updated_by: String,
    pub(crate) updated_at: i64,
    /// The writer's member id (its quota holds the value); `None` for values written
    /// before quotas were kept.
    pub(crate) member_id: Option<String>,
}

/// Why a state write was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StateRefused {
    /// The mesh's state would exceed `limits.max_state_bytes_per_mesh`.
    MeshFull,
    /// The writer's values would exceed `quotas.state_bytes_per_member`.
    MemberFull,
}

#[derive(Debug, Default)]
struct MeshInner {
    /// Boxed: a `Peer` is large, and the table keeps room for up to twice as many
    /// entries as it holds.
    peers: HashMap<ConnId, Box<Peer>>,
    /// Member and session keys of live peers → their connections.
    by_key: HashMap<String, Vec<ConnId>>,
    /// Every member key of the mesh.
    members: HashMap<String, MemberInfo>,
    /// Session keys seen in hellos → owning member id.
    session_keys: HashMap<String, String>,
    state: BTreeMap<String, StateValue>,
    state_bytes: usize,
    /// Bytes of the values each member wrote last (see [`StateValue::member_id`]).
    state_by_member: HashMap<String, usize>,
    /// Sessions hosted by peer brokers, by routing key.
    remote: HashMap<String, RemotePeer>,
    /// Session keys seen in peer brokers' presence → their member's key: a DM to a
    /// session whose presence is gone (a cut link, a restart) still routes to the
    /// member's home broker, where the session key is bound and the message waits.
    remote_sessions: HashMap<String, String>,
    /// Stream subscriptions: stream name → connections.
    subs: HashMap<String, std::collections::HashSet<ConnId>>,
    /// Peers of other brokers' meshes listed here through bridges, by routing key.
    bridged: HashMap<String, bridged::BridgedPeer>,
    /// Member keys of those peers → (broker, its mesh, that mesh's name).
    bridged_members: HashMap<String, (Arc<str>, String, String)>,
    /// Session keys whose last connection left, and when (ms): within the session
    /// grace the session may come back (see `resolve_direct_key`). Pruned as it grows
    /// (an entry older than the grace changes nothing).
    departed: HashMap<String, i64>,
    /// Topics, their subscribers and listeners (`features::topics`).
    topics: topics::TopicBook,
    /// "Welcome back" records by member id as this process last read or saved them
    /// (`None`: the member has none), so a hello reads the store once per member: only
    /// this process writes them.
    saved: HashMap<String, Option<PeerStateRow>>,
    /// Counts changes of `members`; `member_changed` keeps each key's latest count, so
    /// the revocation watch can tell a member changed after its store read began (an
    /// unban, a hello's refresh) and not act on what it read.
    member_gen: u64,
    member_changed: HashMap<String, u64>,
    /// Counts changes of `peers` and `remote` (joins, departures, any update of a live
    /// peer): `search_peers` keeps its index while this and `member_gen` stand still.
    presence_gen: u64,
}

impl MeshInner {
    /// Records that the member holding `pubkey` changed.
    fn stamp_member(&mut self, pubkey: &str) {
        self.member_gen += 1;
        let count = self.member_gen;
        self.member_changed.insert(pubkey.to_owned(), count);
    }

    /// Accounts for `value` replacing `key`'s value within the mesh's and the writer's
    /// budgets; changes nothing when either would be exceeded.
    fn state_account(
        &mut self,
        key: &str,
        value: &StateValue,
        max_bytes: usize,
        max_member_bytes: usize,
    ) -> Result<(), StateRefused> {
        let old = self.state.get(key);
        let old_len = old.map_or(0, |v| key.len() + v.value.len());
        let old_member = old.and_then(|v| v.member_id.clone());
        let new_len = key.len() + value.value.len();
        let total = self.state_bytes - old_len + new_len;
        if total > max_bytes {
            return Err(StateRefused::MeshFull);
        }
        if let Some(m) = &value.member_id {
            let mine = self.state_by_member.get(m).copied().unwrap_or(0);
            let freed = if old_member.as_ref() == Some(m) {
                old_len
            } else {
                0
            };
            if mine - freed + new_len > max_member_bytes {
                return Err(StateRefused::MemberFull);
            }
        }
        self.state_bytes = total;
        if let Some(m) = old_member
            && let Some(b) = self.state_by_member.get_mut(&m)
        {
            *b = b.saturating_sub(old_len);
        }
        if let Some(m) = &value.member_id {
            *self.state_by_member.entry(m.clone()).or_default() += new_len;
        }
        Ok(())
    }

    /// The live peers addressed by a member or session key.
    fn live_for<'a>(&'a self, key: &str) -> impl Iterator<Item = &'a Peer> + 'a {
        self.by_key
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|c| self.peers.get(c).map(|p| &**p))
    }

    /// Live peers `viewer_member` may see (hidden ones only its own; from `viewer_at`,
    /// only those within its radius), oldest first.
    fn visible_to(&self, viewer_member: &str, viewer_at: Option<&Position>) -> Vec<&Peer> {
        let mut peers: Vec<&Peer> = self
            .peers
            .values()
            .map(|p| &**p)
            .filter(|p| {
                p.member_pubkey == viewer_member
                    || (p.visible && space::visible(viewer_at, p.position.as_ref()))
            })
            .collect();
        peers.sort_by_key(|p| (p.connected_at, p.shared.conn_id));
        peers
    }
}

/// The live state of one mesh.
#[derive(Debug)]
pub(crate) struct MeshHub {
    pub(crate) row: MeshRow,
    inner: Mutex<MeshInner>,
    /// Live dashboards watching this mesh (`features::dashboard`): the delivery
    /// pipeline describes messages only while there is one.
    pub(crate) watchers: std::sync::atomic::AtomicUsize,
}

/// Where a direct message goes.
#[derive(Debug)]
pub(crate) enum DirectRoute {
    /// Push it to this peer (or its backlog while it drains).
    Deliver(Arc<PeerShared>),
    /// Store it undelivered (recipient offline, or busy for this priority).
    Queue,
    /// No member or known session of this mesh has that key.
    Unknown,
    /// The key belongs to a revoked member.
    Revoked,
    /// The recipient is hosted by this peer broker: store and forward.
    Remote(Arc<str>),
}

/// A session key that belongs to another member.
#[derive(Debug)]
pub(crate) struct KeyTaken;

/// Why a presence could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RegisterError {
    /// The mesh is at its connection limit.
    AtCapacity,
    /// The member was revoked while the handshake ran.
    Revoked,
}

/// Result of registering a presence.
#[derive(Debug)]
pub(crate) enum Registered {
    /// A new presence.
    New,
    /// This connection took over a live connection of the same session key; it keeps
    /// that presence's id and state and nothing is announced.
    Reattached(Arc<PeerShared>),
}

impl MeshHub {
    fn inner(&self) -> MutexGuard<'_, MeshInner> {
        lock(&self.inner)
    }

    /// The member holding `pubkey`, if any.
    pub(crate) fn member(&self, pubkey: &str) -> Option<MemberInfo> {
        self.inner().members.get(pubkey).cloned()
    }

    /// Whether `pubkey` is a member of the mesh (revoked ones included).
    pub(crate) fn knows(&self, pubkey: &str) -> bool {
        self.inner().members.contains_key(pubkey)
    }

    /// The member's "welcome back" record, if this process has read or saved it
    /// (`Some(None)`: it has none).
    pub(crate) fn saved_state(&self, member_id: &str) -> Option<Option<PeerStateRow>> {
        self.inner().saved.get(member_id).cloned()
    }

    /// Remembers a record read from the store, unless one was saved meanwhile (a
    /// departure's is newer than any read). Returns the record to use.
    pub(crate) fn read_state(
        &self,
        member_id: &str,
        read: Option<PeerStateRow>,
    ) -> Option<PeerStateRow> {
        self.inner()
            .saved
            .entry(member_id.to_owned())
            .or_insert(read)
            .clone()
    }

    /// Remembers the record a departing session saves.
    pub(crate) fn save_state(&self, state: PeerStateRow) {
        self.inner()
            .saved
            .insert(state.member_id.clone(), Some(state));
    }

    /// Adds or updates a member (after `/join`).
    pub(crate) fn upsert_member(&self, pubkey: &str, info: MemberInfo) {
        let mut inner = self.inner();
        inner.members.insert(pubkey.to_owned(), info);
        inner.stamp_member(pubkey);
    }

    /// The member-change count now (see [`Self::changed_since`]).
    pub(crate) fn member_gen(&self) -> u64 {
        self.inner().member_gen
    }

    /// Whether the member holding `pubkey` changed after the count was `seen`.
    pub(crate) fn changed_since(&self, pubkey: &str, seen: u64) -> bool {
        self.inner()
            .member_changed
            .get(pubkey)
            .is_some_and(|g| *g > seen)
    }

    /// Binds a session key to a member, atomically: the first member to present a key
    /// owns it, and no member may use another member's key as a session key. Returns
    /// `Ok(true)` for a new binding (to persist), `Ok(false)` if it was already this
    /// member's.
    ///
    /// # Errors
    /// [`KeyTaken`] when the key belongs to someone else.
    pub(crate) fn claim_session_key(
        &self,
        pubkey: &str,
        member_pubkey: &str,
        member_id: &str,
    ) -> Result<bool, KeyTaken> {
        let mut inner = self.inner();
        if pubkey != member_pubkey && inner.members.contains_key(pubkey) {
            return Err(KeyTaken);
        }
        match inner.session_keys.get(pubkey) {
            Some(owner) if owner != member_id => Err(KeyTaken),
            Some(_) => Ok(false),
            None => {
                inner
                    .session_keys
                    .insert(pubkey.to_owned(), member_id.to_owned());
                Ok(true)
            }
        }
    }

    /// Marks a member revoked and closes its live connections.
    pub(crate) fn revoke(&self, pubkey: &str) -> usize {
        self.revoke_unless_changed(pubkey, u64::MAX).unwrap_or(0)
    }

    /// [`Self::revoke`], unless the member changed after the count was `seen` (then `None`:
    /// what the caller read is stale).
    pub(crate) fn revoke_unless_changed(&self, pubkey: &str, seen: u64) -> Option<usize> {
        let mut inner = self.inner();
        if inner.member_changed.get(pubkey).is_some_and(|g| *g > seen) {
            return None;
        }
        let Some(member) = inner.members.get_mut(pubkey) else {
            return Some(0);
        };
        member.revoked = true;
        inner.stamp_member(pubkey);
        let mut closed = 0;
        for p in inner.peers.values().filter(|p| p.member_pubkey == pubkey) {
            p.shared.close(Disconnect::Revoked);
            closed += 1;
        }
        Some(closed)
    }

    /// Registers a presence. Takes over a live connection with the same session key (or
    /// the same session id) of the same member, as HEAD's reattach does.
    ///
    /// # Errors
    /// [`RegisterError`]: the mesh is full, or the member was revoked meanwhile (checked
    /// under the lock the revocation watch takes, so no revoked member slips in).
    pub(crate) fn register(
        &self,
        mut peer: Peer,
        max_peers: usize,
    ) -> Result<(Registered, String), RegisterError> {
        let mut inner = self.inner();
        if inner
            .members
            .get(&peer.member_pubkey)
            .is_none_or(|m| m.revoked)
        {
            return Err(RegisterError::Revoked);
        }
        let old = inner
            .peers
            .values()
            .find(|p| {
                p.member_pubkey == peer.member_pubkey
                    && ((peer.session_pubkey.is_some() && p.session_pubkey == peer.session_pubkey)
                        || p.session_id == peer.session_id)
            })
            .map(|p| p.shared.conn_id);
        if old.is_none() && inner.peers.len() >= max_peers {
            return Err(RegisterError::AtCapacity);
        }
        let registered = match old.and_then(|id| remove_peer(&mut inner, id)) {
            Some(old) => {
                old.shared.close(Disconnect::Replaced);
                if old.dashboard {
                    self.watchers
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                }
                peer.presence_id = old.presence_id;
                peer.status = old.status;
                peer.summary = old.summary;
                peer.visible = old.visible;
                peer.profile = old.profile;
                peer.stats = old.stats;
                peer.restored_stats = old.restored_stats;
                if peer.groups.is_empty() {
                    peer.groups = old.groups;
                }
                Registered::Reattached(old.shared)
            }
            None => Registered::New,
        };
        let presence_id = peer.presence_id.clone();
        let conn = peer.shared.conn_id;
        for key in [
            Some(peer.member_pubkey.clone()),
            peer.session_pubkey.clone(),
        ]
        .into_iter()
        .flatten()
        {
            let list = inner.by_key.entry(key).or_default();
            if !list.contains(&conn) {
                list.push(conn);
            }
        }
        inner.peers.insert(conn, Box::new(peer));
        inner.presence_gen += 1;
        Ok((registered, presence_id))
    }

    /// Removes a presence (connection closed).
    pub(crate) fn unregister(&self, conn: ConnId) -> Option<Peer> {
        let mut inner = self.inner();
        let peer = remove_peer(&mut inner, conn)?;
        if peer.dashboard {
            self.watchers
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(key) = &peer.session_pubkey
            && !inner.by_key.contains_key(key)
        {
            let now = crate::time::now_ms();
            // Entries past any plausible grace (a day) go; the map stays as small as
            // the sessions that left within it.
            if inner.departed.len() >= inner.peers.len().max(1024) {
                // The grace is at most a few minutes in practice; an hour covers any.
                inner
                    .departed
                    .retain(|_, at| now.saturating_sub(*at) < 3_600_000);
            }
            inner.departed.insert(key.clone(), now);
        }
        Some(peer)
    }

    /// How many members of this mesh `broker` hosts.
    pub(crate) fn members_hosted_by(&self, broker: &str) -> usize {
        self.inner()
            .members
            .values()
            .filter(|m| m.home.as_deref() == Some(broker))
            .count()
    }

    /// Forgets a session key the store pruned (the member had too many).
    pub(crate) fn forget_session_key(&self, key: &str) {
        let mut inner = self.inner();
        if !inner.by_key.contains_key(key) {
            inner.session_keys.remove(key);
            inner.departed.remove(key);
        }
    }

    /// The key a direct message to `key` is stored and routed for. A session key of a
    /// member hosted here whose session is gone — not connected, and not within
    /// `grace_ms` of leaving — is re-addressed to its member key: the message
    /// reaches whichever session of that member is live, or comes first (the reference
    /// delivers to the member's live session; parked for the dead key, it would wait
    /// unseen until it expired). A reminder a short-lived CLI connection scheduled for
    /// itself reaches the member's running session this way.
    pub(crate) fn resolve_direct_key(&self, key: &str, now: i64, grace_ms: i64) -> String {
        let inner = self.inner();
        if inner.by_key.contains_key(key) {
            return key.to_owned();
        }
        let Some(member_id) = inner.session_keys.get(key) else {
            return key.to_owned();
        };
        if inner
            .departed
            .get(key)
            .is_some_and(|at| now.saturating_sub(*at) < grace_ms)
        {
            return key.to_owned();
        }
        inner
            .members
            .iter()
            .find(|(_, m)| &m.id == member_id && m.home.is_none() && !m.revoked)
            .map_or_else(|| key.to_owned(), |(k, _)| k.clone())
    }

    /// Runs `f` on a live peer.
    pub(crate) fn with_peer<R>(&self, conn: ConnId, f: impl FnOnce(&mut Peer) -> R) -> Option<R> {
        self.inner().peers.get_mut(&conn).map(|p| f(p))
    }

    /// [`Self::with_peer`] for a change others see — status, summary, profile, groups,
    /// tags, visibility — which is counted (`search_peers` reindexes).
    pub(crate) fn update_peer<R>(&self, conn: ConnId, f: impl FnOnce(&mut Peer) -> R) -> Option<R> {
        let mut inner = self.inner();
        inner.presence_gen += 1;
        inner.peers.get_mut(&conn).map(|p| f(p))
    }

    /// Decays every `working` older than `ttl_ms` to `idle` and lets those peers drain
    /// what they held back.
    /// Returns the connections whose status changed (peer brokers hear of them).
    pub(crate) fn expire_statuses(&self, now: i64, ttl_ms: i64) -> Vec<ConnId> {
        let mut changed = Vec::new();
        let mut inner = self.inner();
        for p in inner.peers.values_mut() {
            if p.status.expire(now, ttl_ms) {
                p.shared.spill();
                changed.push(p.shared.conn_id);
            }
        }
        if !changed.is_empty() {
            inner.presence_gen += 1;
        }
        drop(inner);
        changed
    }

    /// Live peers of the same member other than `conn` (to wake after leases are released).
    /// The connections on this broker that `pred` selects: (display name, peer role,
    /// handle), in connection order.
    pub(crate) fn select_local(
        &self,
        pred: impl Fn(&Peer) -> bool,
    ) -> Vec<(String, &'static str, Arc<PeerShared>)> {
        let inner = self.inner();
        let mut picked: Vec<_> = inner
            .peers
            .values()
            .filter(|p| pred(p))
            .map(|p| (p.display_name.clone(), p.peer_role, p.shared.clone()))
            .collect();
        picked.sort_by_key(|(_, _, s)| s.conn_id);
        picked
    }

    /// Lifts a member's revocation (after `unban`).
    pub(crate) fn unrevoke(&self, pubkey: &str) {
        let mut inner = self.inner();
        if let Some(m) = inner.members.get_mut(pubkey) {
            m.revoked = false;
            inner.stamp_member(pubkey);
        }
    }

    /// Queues a frame for every live connection of a member here. Returns how many.
    pub(crate) fn to_member(&self, member_id: &str, frame: &Utf8Bytes) -> usize {
        let inner = self.inner();
        inner
            .peers
            .values()
            .filter(|p| p.member_id == member_id)
            .map(|p| usize::from(offer(&p.shared, Outbound::Frame(frame.clone()))))
            .sum()
    }

    pub(crate) fn siblings(&self, member_pubkey: &str, conn: ConnId) -> Vec<Arc<PeerShared>> {
        self.inner()
            .peers
            .values()
            .filter(|p| p.member_pubkey == member_pubkey && p.shared.conn_id != conn)
            .map(|p| p.shared.clone())
            .collect()
    }

    /// Decides where a direct message to `key` goes (see the module docs).
    pub(crate) fn route_direct(
        &self,
        key: &str,
        priority: Priority,
        sender: ConnId,
    ) -> DirectRoute {
        let inner = self.inner();
        let mut live = inner.live_for(key).peekable();
        if live.peek().is_none() {
            // A remote session, unless the key is a member's here (checked below).
            if let Some(r) = inner.remote.get(key)
                && inner
                    .members
                    .get(key)
                    .is_none_or(|m| m.home.as_deref() == Some(&*r.broker))
            {
                return DirectRoute::Remote(r.broker.clone());
            }
            // A remote session seen before: its member's home broker.
            if let Some(m) = inner
                .remote_sessions
                .get(key)
                .and_then(|member| inner.members.get(member))
            {
                return match &m.home {
                    _ if m.revoked => DirectRoute::Revoked,
                    Some(home) => DirectRoute::Remote(home.clone()),
                    None => DirectRoute::Queue,
                };
            }
            return match (inner.members.get(key), inner.session_keys.get(key)) {
                (Some(m), _) if m.revoked => DirectRoute::Revoked,
                (Some(m), _) if m.home.is_some() => {
                    DirectRoute::Remote(m.home.clone().unwrap_or_else(|| Arc::from("")))
                }
                (None, None) => DirectRoute::Unknown,
                _ => DirectRoute::Queue,
            };
        }
        // Prefer another session over the sender (a DM to one's own member key from one
        // session is meant for a sibling), then the most recent connection.
        live.filter(|p| p.status.status.admits(priority))
            .max_by_key(|p| (p.shared.conn_id != sender, p.connected_at, p.shared.conn_id))
            .map_or(DirectRoute::Queue, |p| {
                DirectRoute::Deliver(p.shared.clone())
            })
    }

    /// A row for `key` was stored undelivered: every live connection of the key must
    /// drain before taking hot pushes again. Called by the router (`delivery::router`).
    pub(crate) fn spill_key(&self, key: &str) {
        for p in self.inner().live_for(key) {
            p.shared.spill();
        }
    }

    /// Pushes a multicast envelope to every eligible live peer: visible, not the sender,
    /// and in the group or a sub-group (`@group`) or subscribed to the tag (`tag:NAME`).
    /// Returns (delivered, dropped).
    ///
    /// A receiver standing somewhere gets it only if it sees the sender (`sender_key`).
    pub(crate) fn fan_out(
        &self,
        target: &TargetSpec,
        sender: ConnId,
        sender_key: &str,
        frame: &Utf8Bytes,
    ) -> (usize, usize) {
        let inner = self.inner();
        let from = inner.position_of(sender, sender_key);
        let (mut delivered, mut dropped) = (0, 0);
        for p in inner.peers.values() {
            if p.shared.conn_id == sender
                || !p.visible
                || !p.reached_by(target)
                || !space::visible(p.position.as_ref(), from.as_ref())
            {
                continue;
            }
            if offer(&p.shared, Outbound::Frame(frame.clone())) {
                delivered += 1;
            } else {
                dropped += 1;
            }
        }
        (delivered, dropped)
    }

    /// Sends a frame to every live peer except `except_conn` and, if given, except the
    /// connections of `except_member` (HEAD does not announce a member to itself).
    /// Returns how many connections it was queued for.
    pub(crate) fn announce(
        &self,
        frame: &Utf8Bytes,
        except_conn: ConnId,
        except_member: Option<&str>,
    ) -> usize {
        self.announce_to(frame, except_conn, except_member, |_| true)
    }

    /// [`Self::announce`] to the peers `to` admits.
    fn announce_to(
        &self,
        frame: &Utf8Bytes,
        except_conn: ConnId,
        except_member: Option<&str>,
        to: impl Fn(&Peer) -> bool,
    ) -> usize {
        let inner = self.inner();
        let mut queued = 0;
        for p in inner.peers.values() {
            if p.shared.conn_id == except_conn
                || except_member.is_some_and(|m| m == p.member_pubkey)
                || !to(p)
            {
                continue;
            }
            queued += usize::from(offer(&p.shared, Outbound::Frame(frame.clone())));
        }
        queued
    }

    /// `peers_list` for `viewer` (a connection of `viewer_member`, 0 for none): every live
    /// peer, hidden ones only for their own member, then the visible peers of other
    /// brokers (with their `broker`); a viewer standing somewhere lists only those within
    /// its radius.
    /// Every live peer, local and remote, hidden or not, with the presence and member
    /// change counts they were read at (`search_peers` indexes these once per change).
    pub(crate) fn all_entries(&self) -> ((u64, u64), Vec<PeerEntry>) {
        let inner = self.inner();
        let mut out: Vec<PeerEntry> = inner.peers.values().map(|p| p.entry()).collect();
        out.extend(inner.remote.values().map(RemotePeer::peer_entry));
        ((inner.presence_gen, inner.member_gen), out)
    }

    /// The presence and member change counts (what [`Self::all_entries`] would be read
    /// at), without copying any peer.
    pub(crate) fn change_counts(&self) -> (u64, u64) {
        let inner = self.inner();
        (inner.presence_gen, inner.member_gen)
    }

    /// The keys of the peers `viewer` sees (as [`Self::peers_for`] lists them).
    pub(crate) fn visible_keys(&self, viewer_member: &str, viewer: ConnId) -> HashSet<String> {
        let inner = self.inner();
        let at = inner.peers.get(&viewer).and_then(|p| p.position);
        let mut keys: HashSet<String> = inner
            .visible_to(viewer_member, at.as_ref())
            .into_iter()
            .map(|p| p.routing_key().to_owned())
            .collect();
        keys.extend(
            inner
                .remote
                .values()
                .filter(|r| {
                    r.entry.visible && space::visible(at.as_ref(), r.entry.position.as_ref())
                })
                .map(|r| r.entry.key.clone()),
        );
        keys
    }

    pub(crate) fn peers_for(&self, viewer_member: &str, viewer: ConnId) -> Vec<PeerEntry> {
        let inner = self.inner();
        let at = inner.peers.get(&viewer).and_then(|p| p.position);
        let mut out: Vec<PeerEntry> = inner
            .visible_to(viewer_member, at.as_ref())
            .into_iter()
            .map(Peer::entry)
            .collect();
        let mut remote: Vec<&RemotePeer> = inner
            .remote
            .values()
            .filter(|r| r.entry.visible && space::visible(at.as_ref(), r.entry.position.as_ref()))
            .collect();
        remote.sort_by(|a, b| {
            (a.entry.connected_at, &a.entry.key).cmp(&(b.entry.connected_at, &b.entry.key))
        });
        out.extend(remote.into_iter().map(RemotePeer::peer_entry));
        out
    }

    /// Display names of the live peers addressed by `key` (for `message_status`).
    pub(crate) fn live_names(&self, key: &str) -> Vec<String> {
        self.inner()
            .live_for(key)
            .map(|p| p.display_name.clone())
            .collect()
    }

    /// Live peers reached by a multicast spec, the sender included, hidden peers only for
    /// their own member (for `message_status`): (name, key, broker of a remote one).
    pub(crate) fn multicast_recipients(
        &self,
        target: &TargetSpec,
        viewer_member: &str,
        viewer: ConnId,
    ) -> Vec<(String, String, Option<Arc<str>>)> {
        let inner = self.inner();
        let from = inner.peers.get(&viewer).and_then(|p| p.position);
        inner
            .visible_to(viewer_member, None)
            .into_iter()
            .filter(|p| p.reached_by(target) && space::visible(p.position.as_ref(), from.as_ref()))
            .map(|p| (p.display_name.clone(), p.routing_key().to_owned(), None))
            .chain(
                inner
                    .remote
                    .values()
                    .filter(|r| {
                        r.entry.visible
                            && r.reached_by(target)
                            && space::visible(r.entry.position.as_ref(), from.as_ref())
                    })
                    .map(|r| {
                        (
                            r.entry.display_name.clone(),
                            r.entry.key.clone(),
                            Some(r.broker.clone()),
                        )
                    }),
            )
            .collect()
    }

    // ---- peers of other brokers --------------------------------------------------------

    /// Applies a peer broker's update of one of its sessions (an older version never
    /// wins). A key held by a member hosted elsewhere is refused (`false`).
    pub(crate) fn remote_upsert(
        &self,
        broker: &Arc<str>,
        entry: meshd_protocol::fed::PresenceEntry,
        now: i64,
        caps: RemoteCaps,
    ) -> RemoteUpsert {
        let mut inner = self.inner();
        // The session key must not be a key of anyone else: a member (or session) hosted
        // here or by another broker would otherwise be routed to this broker.
        if !owns(&inner, broker, &entry.member_pubkey)
            || (entry.key != entry.member_pubkey && !owns(&inner, broker, &entry.key))
            || inner.session_keys.contains_key(&entry.key)
            || inner.by_key.contains_key(&entry.key)
            || inner
                .remote
                .get(&entry.key)
                .is_some_and(|r| r.broker != *broker)
        {
            return RemoteUpsert::Forged;
        }
        let old = inner.remote.get(&entry.key);
        if old.is_none() {
            // A new presence: within what one broker, and all brokers together, may
            // show in this mesh (each arrival is announced to every local peer).
            let of_broker = inner
                .remote
                .values()
                .filter(|r| r.broker == *broker)
                .count();
            if of_broker >= caps.per_broker || inner.remote.len() >= caps.per_mesh {
                return RemoteUpsert::OverLimit;
            }
        }
        if !meshd_protocol::fed::newer(entry.version, old.map(|r| r.entry.version)) {
            return RemoteUpsert::Accepted;
        }
        // Each local viewer hears what changed in its own view (spatial filters apply).
        let mut heard: Vec<(Arc<PeerShared>, &'static str)> = Vec::new();
        for p in inner.peers.values() {
            if let Some(ev) = spatial::remote_change_event(p, old.map(|r| &r.entry), &entry) {
                heard.push((p.shared.clone(), ev));
            }
        }
        let mut data = peer_event_data(&entry.display_name, &entry.key);
        if entry.position.is_some() {
            data.insert(
                "position".into(),
                serde_json::to_value(entry.position).unwrap_or_default(),
            );
        }
        if entry.key != entry.member_pubkey && inner.remote_sessions.len() < MAX_REMOTE_SESSIONS {
            inner
                .remote_sessions
                .insert(entry.key.clone(), entry.member_pubkey.clone());
        }
        inner.remote.insert(
            entry.key.clone(),
            RemotePeer {
                broker: broker.clone(),
                entry,
            },
        );
        inner.presence_gen += 1;
        let mut frames: HashMap<&'static str, Utf8Bytes> = HashMap::new();
        for (shared, ev) in heard {
            let frame = frames
                .entry(ev)
                .or_insert_with(|| {
                    crate::delivery::system_push(&self.row.id, ev, data.clone(), now)
                })
                .clone();
            offer(&shared, Outbound::Frame(frame));
        }
        RemoteUpsert::Accepted
    }

    /// A peer broker's session left.
    pub(crate) fn remote_gone(&self, broker: &str, key: &str, version: u64, now: i64) {
        let mut inner = self.inner();
        let Some(r) = inner.remote.get(key) else {
            return;
        };
        if &*r.broker != broker || r.entry.version > version {
            return;
        }
        if let Some(r) = inner.remote.remove(key) {
            inner.presence_gen += 1;
            announce_left(&inner, &self.row.id, &r, now);
        }
    }

    /// Replaces everything known of `broker`'s sessions with a snapshot: departures get
    /// `peer_left`, arrivals `peer_joined`. Returns how many entries were refused as
    /// forged and as over the limits.
    pub(crate) fn remote_replace(
        &self,
        broker: &Arc<str>,
        entries: Vec<meshd_protocol::fed::PresenceEntry>,
        now: i64,
        caps: RemoteCaps,
    ) -> (usize, usize) {
        let keep: std::collections::HashSet<String> =
            entries.iter().map(|e| e.key.clone()).collect();
        self.remote_remove(now, |k, r| *r.broker == **broker && !keep.contains(k));
        let (mut forged, mut over) = (0, 0);
        for e in entries {
            match self.remote_upsert(broker, e, now, caps) {
                RemoteUpsert::Accepted => {}
                RemoteUpsert::Forged => forged += 1,
                RemoteUpsert::OverLimit => over += 1,
            }
        }
        (forged, over)
    }

    /// Applies `f` to every presence `broker` announced (a stricter import policy
    /// withholding fields from what is listed now); the sum of what `f` returns.
    pub(crate) fn remote_restrip(
        &self,
        broker: &str,
        mut f: impl FnMut(&mut meshd_protocol::fed::PresenceEntry) -> usize,
    ) -> usize {
        let mut inner = self.inner();
        inner
            .remote
            .values_mut()
            .filter(|r| &*r.broker == broker)
            .map(|r| f(&mut r.entry))
            .sum()
    }

    /// Forgets every session of `broker` (its link stayed down past the grace period,
    /// or the mesh is no longer shared with it), announcing `peer_left`.
    pub(crate) fn remote_drop(&self, broker: &str, now: i64) {
        self.remote_remove(now, |_, r| &*r.broker == broker);
        self.bridged_drop(broker, None, false);
    }

    /// Removes the remote sessions `gone` selects, announcing `peer_left`.
    fn remote_remove(&self, now: i64, gone: impl Fn(&str, &RemotePeer) -> bool) {
        let mut inner = self.inner();
        let keys: Vec<String> = inner
            .remote
            .iter()
            .filter(|(k, r)| gone(k, r))
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            if let Some(r) = inner.remote.remove(&k) {
                inner.presence_gen += 1;
                announce_left(&inner, &self.row.id, &r, now);
            }
        }
    }

    /// Peer brokers with at least one visible session a multicast from `sender_key`
    /// reaches. A session standing somewhere counts if it may see the sender: what is
    /// known of its position may be off by its slack, so the test is widened by it
    /// (that broker filters exactly).
    pub(crate) fn remote_brokers_for(
        &self,
        target: &TargetSpec,
        sender_key: &str,
    ) -> Vec<Arc<str>> {
        let inner = self.inner();
        let from = inner.position_of(0, sender_key);
        let mut out: Vec<Arc<str>> = Vec::new();
        for r in inner.remote.values() {
            if !r.entry.visible || !r.reached_by(target) {
                continue;
            }
            if let Some(v) = &r.entry.position
                && from.is_none_or(|f| v.distance(&f) > v.radius + v.slack())
            {
                continue;
            }
            if !out.contains(&r.broker) {
                out.push(r.broker.clone());
            }
        }
        out
    }

    /// Whether `broker` may speak for `pubkey` on a live stream: it is the member's home,
    /// or nobody announced the key yet (the announcement travels on another stream and
    /// may arrive second). A key announced by anyone else is refused.
    pub(crate) fn may_speak_for(&self, broker: &str, pubkey: &str) -> bool {
        owns(&self.inner(), broker, pubkey)
    }

    /// Whether `key` is a presence `broker` hosts for the member `member_pubkey` (that
    /// member's key, or a session key `broker` announced for it), the member being
    /// hosted by `broker`: what a peer broker may claim as the asker of a request.
    pub(crate) fn remote_presence_of(&self, broker: &str, key: &str, member_pubkey: &str) -> bool {
        let inner = self.inner();
        let hosted = inner
            .members
            .get(member_pubkey)
            .is_some_and(|m| m.home.as_deref() == Some(broker) && !m.revoked);
        hosted
            && (key == member_pubkey
                || inner.remote.get(key).is_some_and(|r| {
                    &*r.broker == broker && r.entry.member_pubkey == member_pubkey
                })
                || inner
                    .remote_sessions
                    .get(key)
                    .is_some_and(|m| m == member_pubkey))
    }

    /// The groups of a presence another broker announced (empty if unknown).
    pub(crate) fn remote_groups(&self, key: &str) -> Vec<String> {
        self.inner()
            .remote
            .get(key)
            .map(|r| r.entry.groups.iter().map(|g| g.name.clone()).collect())
            .unwrap_or_default()
    }

    /// Whether `broker` is the known home of the member holding `pubkey` (durable
    /// messages need an announced sender: the announcement precedes them on their stream).
    pub(crate) fn hosted_by(&self, broker: &str, pubkey: &str) -> bool {
        self.inner()
            .members
            .get(pubkey)
            .is_some_and(|m| m.home.as_deref() == Some(broker))
    }

    /// Whether the member is revoked (unknown keys count as not revoked).
    pub(crate) fn member_revoked(&self, pubkey: &str) -> bool {
        self.inner().members.get(pubkey).is_some_and(|m| m.revoked)
    }

    /// Whether `key` is a member hosted here (not revoked) or a key of a live or known
    /// session of one: a DM to it can be stored in this mesh (`features::bridges`).
    pub(crate) fn hosts_key(&self, key: &str) -> bool {
        let inner = self.inner();
        inner.by_key.contains_key(key)
            || inner.session_keys.contains_key(key)
            || inner
                .members
                .get(key)
                .is_some_and(|m| !m.revoked && m.home.is_none())
    }

    /// `list_peers` entries of the visible local presences (listed in bridged meshes).
    pub(crate) fn local_entries(&self) -> Vec<PeerEntry> {
        let inner = self.inner();
        let mut peers: Vec<&Peer> = inner
            .peers
            .values()
            .map(|p| &**p)
            .filter(|p| p.visible)
            .collect();
        peers.sort_by_key(|p| (p.connected_at, p.shared.conn_id));
        peers.into_iter().map(Peer::entry).collect()
    }

    /// Every live local presence, for a snapshot to a peer broker.
    pub(crate) fn local_peers<T>(&self, f: impl Fn(&Peer) -> T) -> Vec<T> {
        self.inner().peers.values().map(|p| f(p)).collect()
    }

    /// A local presence by connection, for an update to peer brokers.
    pub(crate) fn local_peer<T>(&self, conn: ConnId, f: impl FnOnce(&Peer) -> T) -> Option<T> {
        self.inner().peers.get(&conn).map(|p| f(p))
    }

    /// Subscribes a connection to a stream. `false` when it already follows
    /// `max_per_conn` streams.
    pub(crate) fn subscribe(&self, conn: ConnId, stream: &str, max_per_conn: usize) -> bool {
        let mut inner = self.inner();
        let following = inner.subs.values().filter(|s| s.contains(&conn)).count();
        let set = inner.subs.entry(stream.to_owned()).or_default();
        if !set.contains(&conn) && following >= max_per_conn {
            return false;
        }
        set.insert(conn);
        true
    }

    /// Unsubscribes.
    pub(crate) fn unsubscribe(&self, conn: ConnId, stream: &str) {
        let mut inner = self.inner();
        if let Some(set) = inner.subs.get_mut(stream) {
            set.remove(&conn);
            if set.is_empty() {
                inner.subs.remove(stream);
            }
        }
    }

    /// Pushes a `stream_data` frame to the stream's subscribers except `publisher`.
    pub(crate) fn publish(&self, stream: &str, publisher: ConnId, frame: &Utf8Bytes) -> usize {
        let inner = self.inner();
        let Some(set) = inner.subs.get(stream) else {
            return 0;
        };
        set.iter()
            .filter(|c| **c != publisher)
            .filter_map(|c| inner.peers.get(c))
            .filter(|p| offer(&p.shared, Outbound::Frame(frame.clone())))
            .count()
    }

    /// Live subscribers of a stream on this broker.
    pub(crate) fn subscribers(&self, stream: &str) -> usize {
        self.inner()
            .subs
            .get(stream)
            .map_or(0, std::collections::HashSet::len)
    }

    /// Groups in use by the peers `viewer_member` can see (local and remote), sorted.
    pub(crate) fn groups_in_use(&self, viewer_member: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .peers_for(viewer_member, 0)
            .into_iter()
            .flat_map(|p| p.groups.into_iter().map(|g| g.name))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// No peer here nor at any other broker of the mesh.
    pub(crate) fn no_peers_anywhere(&self) -> bool {
        let inner = self.inner();
        inner.peers.is_empty() && inner.remote.is_empty()
    }

    /// The presence a status hook from `ip` for `cwd` targets: connected from the same
    /// address with the same cwd, the one with `session_id` if given and present, else
    /// the most recent. Returns (connection, presence id, connected at).
    pub(crate) fn hook_target(
        &self,
        ip: std::net::IpAddr,
        cwd: &str,
        session_id: Option<&str>,
    ) -> Option<(ConnId, String, i64, bool)> {
        let inner = self.inner();
        inner
            .peers
            .values()
            .filter(|p| p.remote_ip == ip && p.cwd == cwd)
            .max_by_key(|p| {
                (
                    session_id.is_some_and(|s| s == p.session_id),
                    p.connected_at,
                    p.shared.conn_id,
                )
            })
            .map(|p| {
                (
                    p.shared.conn_id,
                    p.presence_id.clone(),
                    p.connected_at,
                    session_id.is_some_and(|s| s == p.session_id),
                )
            })
    }

    /// The member holding `key` as its member key or as one of its session keys:
    /// (member key, member).
    pub(crate) fn member_for_key(&self, key: &str) -> Option<(String, MemberInfo)> {
        let inner = self.inner();
        if let Some(m) = inner.members.get(key) {
            return Some((key.to_owned(), m.clone()));
        }
        let member_id = inner.session_keys.get(key)?;
        inner
            .members
            .iter()
            .find(|(_, m)| &m.id == member_id)
            .map(|(k, m)| (k.clone(), m.clone()))
    }

    /// The peer broker hosting the presence with this routing key, if any.
    pub(crate) fn remote_broker_of(&self, key: &str) -> Option<Arc<str>> {
        self.inner().remote.get(key).map(|r| r.broker.clone())
    }

    /// The first live connection addressed by a member or session key.
    pub(crate) fn first_live(&self, key: &str) -> Option<Arc<PeerShared>> {
        self.inner().live_for(key).next().map(|p| p.shared.clone())
    }

    /// The member whose live connections are all the connections from `ip` (an unsigned
    /// upload from that address is attributed to it): `Ok(None)` when none is, `Err`
    /// when several members are connected from there (ambiguous).
    pub(crate) fn sole_member_at(&self, ip: std::net::IpAddr) -> Result<Option<AddressPeer>, ()> {
        let inner = self.inner();
        let mut from_ip = inner.peers.values().filter(|p| p.remote_ip == ip);
        let Some(first) = from_ip.next() else {
            return Ok(None);
        };
        let mut newest = first;
        for p in from_ip {
            if p.member_id != first.member_id {
                return Err(());
            }
            if (p.connected_at, p.shared.conn_id) > (newest.connected_at, newest.shared.conn_id) {
                newest = p;
            }
        }
        Ok(Some(AddressPeer {
            member_id: newest.member_id.clone(),
            member_pubkey: newest.member_pubkey.clone(),
            display_name: newest.display_name.clone(),
            routing_key: newest.routing_key().to_owned(),
        }))
    }

    /// Every member (revoked ones too, wherever hosted): (key, member).
    pub(crate) fn all_members(&self) -> Vec<(String, MemberInfo)> {
        self.inner()
            .members
            .iter()
            .map(|(k, m)| (k.clone(), m.clone()))
            .collect()
    }

    /// Every member (revoked ones too) by member id: (key, member).
    pub(crate) fn members_by_id(&self) -> HashMap<String, (String, MemberInfo)> {
        self.inner()
            .members
            .iter()
            .map(|(k, m)| (m.id.clone(), (k.clone(), m.clone())))
            .collect()
    }

    /// Members hosted here, for announcements to peer brokers: (key, member).
    pub(crate) fn local_members(&self) -> Vec<(String, MemberInfo)> {
        self.inner()
            .members
            .iter()
            .filter(|(_, m)| m.home.is_none())
            .map(|(k, m)| (k.clone(), m.clone()))
            .collect()
    }

    /// Applies a remote write to the shared state if it is newer than what is held, and
    /// pushes `state_change` to every local connection. Returns whether it applied.
    pub(crate) fn state_apply_remote(
        &self,
        key: &str,
        value: StateValue,
        max_bytes: usize,
        max_member_bytes: usize,
    ) -> bool {
        let mut inner = self.inner();
        if inner
            .state
            .get(key)
            .is_some_and(|v| v.updated_at > value.updated_at)
        {
            return false;
        }
        // A peer broker's write is held to the same budgets as a local one.
        if inner
            .state_account(key, &value, max_bytes, max_member_bytes)
            .is_err()
        {
            return false;
        }
        let change = BrokerFrame::StateChange(meshd_protocol::broker::StateChange {
            key: key.to_owned(),
            value: raw(&value.value),
            updated_by: value.updated_by.clone(),
        });
        let frame = Utf8Bytes::from(change.to_json());
        inner.state.insert(key.to_owned(), value);
        for p in inner.peers.values() {
            offer(&p.shared, Outbound::Frame(frame.clone()));
        }
        true
    }

    // ---- shared state ----------------------------------------------------------------

    /// Current value of a key.
    pub(crate) fn state_get(&self, key: &str) -> Option<StateValue> {
        self.inner().state.get(key).cloned()
    }

    /// Every key, sorted.
    pub(crate) fn state_list(&self) -> Vec<(String, StateValue)> {
        self.inner()
            .state
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Sets a key and pushes `state_change` to every other connection, unless the mesh's
    /// state budget or the writer's quota would be exceeded (then nothing changes).
    pub(crate) fn state_set(
        &self,
        key: &str,
        value: StateValue,
        writer_conn: ConnId,
        max_bytes: usize,
        max_member_bytes: usize,
    ) -> Result<(), StateRefused> {
        let mut inner = self.inner();
        inner.state_account(key, &value, max_bytes, max_member_bytes)?;
        let change = BrokerFrame::StateChange(meshd_protocol::broker::StateChange {
            key: key.to_owned(),
            value: raw(&value.value),
            updated_by: value.updated_by.clone(),
        });
        let frame = Utf8Bytes::from(change.to_json());
        inner.state.insert(key.to_owned(), value);
        for p in inner.peers.values() {
            if p.shared.conn_id != writer_conn {
                offer(&p.shared, Outbound::Frame(frame.clone()));
            }
        }
        Ok(())
    }
}

/// Re-wraps stored JSON text. The text was validated when it was set, so this only
/// fails on a corrupted store, where `null` is the honest answer.
pub(crate) fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned())
        .or_else(|_| RawValue::from_string("null".to_owned()))
        .unwrap_or_else(|_| Box::<RawValue>::default())
}

/// How many presences of peer brokers a mesh shows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RemoteCaps {
    /// Of one peer broker.
    pub(crate) per_broker: usize,
    /// Of all peer brokers together.
    pub(crate) per_mesh: usize,
}

impl RemoteCaps {
    /// One broker may show as many sessions as a mesh may have here
    /// (`limits.max_connections_per_mesh`); all of them together four times that.
    pub(crate) fn from_limits(limits: &meshd_config::Limits) -> Self {
        Self {
            per_broker: limits.max_connections_per_mesh,
            per_mesh: limits.max_connections_per_mesh.saturating_mul(4),
        }
    }
}

/// What became of a peer broker's presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RemoteUpsert {
    /// Shown (or an older version ignored).
    Accepted,
    /// It names a key the broker does not speak for.
    Forged,
    /// The mesh shows as many of the broker's (or of all brokers') presences as allowed.
    OverLimit,
}

/// Remote session keys remembered per mesh (beyond, new ones are not remembered; their
/// DMs need a live presence).
const MAX_REMOTE_SESSIONS: usize = 100_000;

/// Whether `broker` hosts the member holding `pubkey` (a key nobody announced yet may be
/// claimed by the first broker that does; its member announcement follows).
fn owns(inner: &MeshInner, broker: &str, pubkey: &str) -> bool {
    match inner.members.get(pubkey) {
        Some(m) => m.home.as_deref() == Some(broker),
        None => true,
    }
}

fn announce_left(inner: &MeshInner, mesh_id: &str, r: &RemotePeer, now: i64) {
    if !r.entry.visible {
        return;
    }
    let frame = crate::delivery::system_push(
        mesh_id,
        "peer_left",
        peer_event_data(&r.entry.display_name, &r.entry.key),
        now,
    );
    for p in inner.peers.values().filter(|p| spatial::saw(p, &r.entry)) {
        offer(&p.shared, Outbound::Frame(frame.clone()));
    }
}

fn remove_peer(inner: &mut MeshInner, conn: ConnId) -> Option<Peer> {
    let peer = *inner.peers.remove(&conn)?;
    inner.presence_gen += 1;
    inner.subs.retain(|_, set| {
        set.remove(&conn);
        !set.is_empty()
    });
    for key in [Some(&peer.member_pubkey), peer.session_pubkey.as_ref()]
        .into_iter()
        .flatten()
    {
        if let Some(list) = inner.by_key.get_mut(key) {
            list.retain(|c| *c != conn);
            if list.is_empty() {
                inner.by_key.remove(key);
            }
        }
    }
    Some(peer)
}

/// Offers a frame without waiting. A full queue means the client stopped reading: it is
/// closed as a slow consumer (what it misses is either live-only by design or stored).
/// Returns whether the frame was queued.
pub(crate) fn offer(peer: &PeerShared, out: Outbound) -> bool {
    match peer.try_queue(out) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            peer.close(Disconnect::SlowConsumer);
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

/// `{name, pubkey}` event data for a peer.
pub(crate) fn peer_data(peer: &Peer) -> serde_json::Map<String, serde_json::Value> {
    peer_event_data(&peer.display_name, peer.routing_key())
}

/// A mesh being loaded or loaded (`None`: it does not exist).
type MeshSlot = Arc<OnceCell<Option<Arc<MeshHub>>>>;

/// Every loaded mesh.
#[derive(Debug, Default)]
pub(crate) struct Hub {
    meshes: Mutex<HashMap<String, MeshSlot>>,
}

impl Hub {
    /// The live state of a mesh, loading it from the store on first use. `None` when
    /// the mesh does not exist or is archived.
    ///
    /// # Errors
    /// [`StoreError`] while loading.
    pub(crate) async fn mesh(
        &self,
        db: &Db,
        mesh_id: &str,
    ) -> Result<Option<Arc<MeshHub>>, StoreError> {
        // Ids come from strangers (an upload's header, a hello): only an id meshd could
        // have generated, of a mesh that exists, ever gets a slot in the cache.
        if !crate::ids::plausible_id(mesh_id) {
            return Ok(None);
        }
        if let Some(m) = self.loaded(mesh_id) {
            return Ok(Some(m));
        }
        if !lock(&self.meshes).contains_key(mesh_id) && db.mesh_by_id(mesh_id).await?.is_none() {
            return Ok(None);
        }
        let cell = lock(&self.meshes)
            .entry(mesh_id.to_owned())
            .or_default()
            .clone();
        let loaded = cell
            .get_or_try_init(|| async { load_mesh(db, mesh_id).await })
            .await?
            .clone();
        if loaded.is_none() {
            // Do not cache absence: the mesh may be created by `meshd mesh create` later.
            lock(&self.meshes).remove(mesh_id);
        }
        Ok(loaded)
    }

    /// Every loaded mesh.
    pub(crate) fn all(&self) -> Vec<Arc<MeshHub>> {
        lock(&self.meshes)
            .values()
            .filter_map(|c| c.get().cloned().flatten())
            .collect()
    }

    /// A mesh if it is loaded, or being loaded (then once its load finishes): a change
    /// committed to the store while a load runs may have been read before the commit,
    /// so it must be applied to the loaded mesh too, not skipped as "not loaded".
    pub(crate) async fn loaded_or_loading(&self, db: &Db, mesh_id: &str) -> Option<Arc<MeshHub>> {
        let cell = lock(&self.meshes).get(mesh_id).cloned()?;
        cell.get_or_try_init(|| async { load_mesh(db, mesh_id).await })
            .await
            .ok()?
            .clone()
    }

    /// A mesh if it is already loaded.
    pub(crate) fn loaded(&self, mesh_id: &str) -> Option<Arc<MeshHub>> {
        lock(&self.meshes)
            .get(mesh_id)
            .and_then(|c| c.get().cloned().flatten())
    }
}

async fn load_mesh(db: &Db, mesh_id: &str) -> Result<Option<Arc<MeshHub>>, StoreError> {
    let Some(row) = db.mesh_by_id(mesh_id).await? else {
        return Ok(None);
    };
    if row.archived_at.is_some() {
        return Ok(None);
    }
    let mut inner = MeshInner::default();
    for m in db.members(mesh_id).await? {
        inner.members.insert(m.pubkey.clone(), member_info(&m));
    }
    for s in db.session_keys(mesh_id).await? {
        inner.session_keys.insert(s.pubkey, s.member_id);
    }
    for s in db.state(mesh_id).await? {
        let len = s.key.len() + s.value.len();
        inner.state_bytes += len;
        if let Some(m) = &s.updated_by_member {
            *inner.state_by_member.entry(m.clone()).or_default() += len;
        }
        inner.state.insert(
            s.key,
            StateValue {
                value: Arc::from(s.value),
                updated_by: s.updated_by,
                updated_at: s.updated_at,
                member_id: s.updated_by_member,
            },
        );
    }
    for t in db.topic_rows(mesh_id).await? {
        inner.topics.put(t.into());
    }
    for m in db.topic_memberships(mesh_id).await? {
        if let Some(t) = inner.topics.by_id_mut(&m.topic_id) {
            t.members.insert(m.member_id, TopicRole::parse(&m.role));
        }
    }
    Ok(Some(Arc::new(MeshHub {
        row,
        inner: Mutex::new(inner),
        watchers: std::sync::atomic::AtomicUsize::new(0),
    })))
}

/// The hub's view of a member row.
pub(crate) fn member_info(m: &MemberRow) -> MemberInfo {
    MemberInfo {
        id: m.id.clone(),
        display_name: m.display_name.clone(),
        role: m.role.clone(),
        revoked: m.revoked_at.is_some(),
        home: m.home_broker.as_deref().map(Arc::from),
    }
}
