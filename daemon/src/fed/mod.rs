//! Federation in the daemon: what flows over each link to a peer broker.
//!
//! `meshd-federation` keeps one authenticated QUIC link per configured peer broker; this
//! module is its [`LinkHandler`]. Per link it runs:
//! - the *control* stream: mesh consent (`MeshOffer` from a mesh's home, `MeshReady` /
//!   `MeshWithdraw` from either side). A mesh *flows* over a link only while both
//!   brokers consent: the home has shared it with the other broker (`meshd mesh share`)
//!   and that broker accepted it (`meshd mesh accept`), or — between two replicas — both appear on
//!   the home's roster.
//! - an outgoing *messages* stream: member announcements, then the durable outbox (rows
//!   of the `message` table with `forward_to` = that broker, read in `seq` order, at most
//!   `outbox_window` unacknowledged). The receiver stores each message together with its
//!   de-duplication cursor before acknowledging it, so after cuts, restarts and
//!   `kill -9` of either broker every acknowledged message is delivered exactly once, in
//!   order.
//! - a *presence* stream: a snapshot per mesh when it starts flowing, then coalesced
//!   upserts/departures (at most one pending update per session per link).
//! - a *live* stream: broadcasts, group messages and state writes, delivered by the
//!   receiver to its own (client) peers only (one hop: never re-forwarded).
//!
//! A broker speaks only for the members it hosts: a member announcement, message,
//! presence or state write naming a member hosted elsewhere is refused and counted.

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshd_config::Federation as FedConfig;
use meshd_federation::{
    Backoff, Endpoint, FrameReader, FrameWriter, Link, LinkConn, LinkCounters, LinkError,
    LinkHandler, LinkOptions, Manager, PeerTarget,
};
use meshd_protocol::fed::{
    self, CloseReason, Dm, EventPush, Frame, Hello, MemberAnn, MeshClaim, MeshOffer, Multicast,
    PresenceEntry, RejectReason, StreamClass,
};
use meshd_protocol::{Priority, TargetSpec};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, debug, info, warn};

use crate::Ctx;
use crate::delivery::{self, Author, Body, Commit, Envelope, Origin, Target};
use crate::hub::{ConnId, MeshHub, Peer, lock, member_info};
use crate::store::writer::{NewMessage, WriteOp};
use crate::store::{MeshRow, StoreError};
use crate::time::now_ms;
use policy::{Direction, Kind};
use store::{MemberUpsert, ShareRole};

mod catchup;
mod consent;
mod hold;
mod inbox;
mod live;
mod outbox;
pub(crate) mod policy;
mod presence;
mod status;
pub(crate) mod store;
mod supervisor;

// The live dispatch names each replicated feature's apply function (see `live`).
use crate::features::contexts::apply_context;
use crate::features::mcp::apply_mcp_servers;
use crate::features::memory::apply_memory;
use crate::features::skills::apply_skill;
use crate::features::tasks::apply_task;
pub(crate) use catchup::*;
pub(crate) use consent::*;
pub(crate) use hold::*;
pub(crate) use live::*;
pub(crate) use outbox::*;
pub(crate) use presence::*;
pub(crate) use supervisor::*;

/// Outbox rows read per query.
pub(crate) const OUTBOX_PAGE: i64 = 512;
/// Live frames (broadcasts, state) waiting per link; when full, new ones are dropped
/// and counted: they are live-only by contract, like a local slow consumer's.
pub(crate) const LIVE_QUEUE: usize = 4096;
/// Live frames read ahead of the one being applied (each may be a large frame; the
/// hold bounds what waits longer).
pub(crate) const LIVE_READ_AHEAD: usize = 1;
/// Control frames waiting per link (rare: consent changes).
pub(crate) const CONTROL_QUEUE: usize = 256;
/// After a link comes up, how long the outbox waits for a consented mesh to start
/// flowing (the peer broker's `MeshReady`) before it refuses that mesh's messages: the
/// outbox is one ordered stream, so a mesh that broker no longer takes must not hold back
/// others.
pub(crate) const FLOW_SETTLE: Duration = Duration::from_secs(5);
/// How often stored consent is re-read (the admin CLI writes it beside the daemon).
pub(crate) const RECONCILE_EVERY: Duration = Duration::from_millis(500);
/// Every this many reconcile ticks (5 s), accepted offers without a replica are retried.
pub(crate) const ADOPT_RETRY_TICKS: u64 = 10;
/// Presence updates waiting for one link (one per session and mesh); beyond, the peer
/// broker is not reading and the link starts over.
pub(crate) const PRESENCE_PENDING: usize = 65_536;
/// Member announcements waiting for one link; beyond, the link starts over.
pub(crate) const MEMBERS_QUEUE: usize = 256;
/// Members one peer broker may host in one mesh, as far as this broker keeps them.
pub(crate) const MAX_REMOTE_MEMBERS: usize = 10_000;
/// Offers kept per peer broker (until accepted here or replaced).
pub(crate) const MAX_OFFERS_PER_PEER: usize = 1_024;
/// Brokers named in one offer's roster.
pub(crate) const MAX_ROSTER: usize = 64;
/// Meshes one peer broker may claim to be ready for on a link.
pub(crate) const MAX_PEER_READY: usize = 4_096;
/// How long a link may be up before its handler registers it (see `Fed::check_links`).
pub(crate) const REGISTER_BOUND: Duration = Duration::from_secs(5);
/// How often a claim the peer broker has not answered is announced again.
pub(crate) const REANNOUNCE_EVERY: Duration = Duration::from_secs(10);

/// Why federation could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FedStartError {
    /// This broker's certificate or key.
    #[error("federation certificate: {0}")]
    Identity(#[from] meshd_certs::IdentityError),
    /// The org CA file (served as the bundle).
    #[error("federation CA file: {0}")]
    Bundle(#[source] meshd_certs::CaFileError),
    /// A peer broker's CA file.
    #[error("federation peer {broker}: {source}")]
    Peer {
        /// The peer broker's name.
        broker: String,
        /// What is wrong with its CA file.
        #[source]
        source: meshd_certs::CaFileError,
    },
    /// The peer brokers' trust anchors as a whole (e.g. a name configured twice).
    #[error("federation peers: {0}")]
    Trust(#[from] meshd_certs::TrustError),
    /// The endpoint.
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// One live link, as the rest of the daemon sees it.
#[derive(Debug)]
pub(crate) struct LinkShared {
    /// The peer broker at the other end ("peer" alone means a client presence).
    pub(crate) broker: Arc<str>,
    /// The manager's number for this link (see [`meshd_federation::LinkHandler::run`]).
    pub(crate) id: u64,
    /// Held for the whole of `update_flowing`, so two recomputations (a consent change
    /// and the peer broker's ready) never work from views of each other's half-done changes.
    pub(crate) flow_lock: tokio::sync::Mutex<()>,
    /// When each claimed mesh was last announced again while the peer broker was not ready
    /// for it (see `Fed::check_links`).
    pub(crate) reannounced: Mutex<HashMap<String, std::time::Instant>>,
    /// Meshes the peer broker said it is ready to exchange.
    pub(crate) broker_ready: Mutex<HashSet<String>>,
    /// Meshes we told the peer broker we are ready to exchange.
    pub(crate) claimed: Mutex<HashSet<String>>,
    /// Meshes flowing now (both ready).
    pub(crate) flowing: Mutex<HashSet<String>>,
    pub(crate) control: mpsc::Sender<Frame>,
    pub(crate) presence: Mutex<Coalescer>,
    pub(crate) presence_wake: Notify,
    pub(crate) live: mpsc::Sender<Frame>,
    /// Signalled each time the live writer took frames off the queue.
    pub(crate) live_drained: Arc<Notify>,
    pub(crate) members: Mutex<VecDeque<Frame>>,
    pub(crate) outbox_wake: Notify,
    pub(crate) counters: Arc<LinkCounters>,
    /// The peer broker opened its messages stream: a second one would run a second
    /// de-duplication cursor, so it is a protocol error.
    pub(crate) messages_in: std::sync::atomic::AtomicBool,
    /// The peer broker understands `Frame::Signal` (its hello said so).
    pub(crate) signals: bool,
    /// The peer broker understands `Frame::Log`.
    pub(crate) telemetry: bool,
    /// The peer broker opened its live stream (a second one is a protocol error).
    pub(crate) live_in: std::sync::atomic::AtomicBool,
    /// When the link came up.
    pub(crate) started: std::time::Instant,
    /// Live frames waiting for members the peer broker has not announced yet (see [`Held`]).
    pub(crate) held: Mutex<Held>,
    /// Signalled when the peer broker announced members (held live frames may be ready).
    pub(crate) announced: Notify,
    /// The running catch-up of each mesh (cancelled when a new one starts).
    pub(crate) catch_ups: Mutex<HashMap<String, CancellationToken>>,
    /// The bridges the peer broker keeps with our meshes (`features::bridges`).
    pub(crate) bridge_claims: Mutex<Vec<meshd_protocol::fed::BridgeClaim>>,
    /// Where the peer broker last heard each local presence stands, by (mesh, key):
    /// what interest management compares a move with (`features::spatial`).
    pub(crate) sent_at: Mutex<HashMap<(String, String), meshd_protocol::spatial::Position>>,
}

/// Sleeps until `deadline` (a std instant); forever without one.
pub(crate) async fn sleep_until_std(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

/// Counts frames refused from a link: in its status and in the metric, by reason.
pub(crate) fn count_refused(ctx: &Ctx, link: &LinkShared, reason: RejectReason, n: usize) {
    link.counters.refused.fetch_add(n as u64, Ordering::Relaxed);
    ctx.metrics.fed_refused.inc_by(reason.as_str(), n as u64);
}

impl LinkShared {
    /// Whether we send this mesh's traffic over the link (both sides consent).
    pub(crate) fn flows(&self, mesh: &str) -> bool {
        lock(&self.flowing).contains(mesh)
    }

    /// Whether a message of `mesh` for the peer broker goes (or waits to go) over this
    /// link: the mesh flows, or that broker said it is ready and the link is still settling
    /// (our side's claim is being made). A broker that said it is not ready (its hello
    /// omitted the mesh, or it withdrew) refuses at once: nothing waits for a consent
    /// that was withdrawn.
    pub(crate) fn settling_or_flows(&self, mesh: &str, now: std::time::Instant) -> bool {
        may_send(
            self.flows(mesh),
            lock(&self.broker_ready).contains(mesh),
            now.saturating_duration_since(self.started),
        )
    }

    /// Whether we take this mesh's traffic from the peer broker: we told it we consent
    /// (it sends only after it has heard so, which may be before our side has heard its
    /// own consent and marked the mesh flowing).
    pub(crate) fn accepts(&self, mesh: &str) -> bool {
        lock(&self.claimed).contains(mesh)
    }

    /// Queues a presence update; `false` (nothing queued) when the coalescer holds
    /// [`PRESENCE_PENDING`] updates already: the peer broker stopped reading, and the link must
    /// start over (its successor sends a snapshot).
    pub(crate) fn queue_presence(&self, mesh: &str, key: &str, frame: Frame) -> bool {
        {
            let mut sent = lock(&self.sent_at);
            let at = match &frame {
                Frame::PresenceUpsert { entry, .. } => entry.position,
                _ => None,
            };
            match at {
                Some(at) => sent.insert((mesh.to_owned(), key.to_owned()), at),
                None => sent.remove(&(mesh.to_owned(), key.to_owned())),
            };
        }
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
    metrics: Arc<crate::metrics::Metrics>,
    /// The link manager, from `start` until `shutdown` (which drops it, and with it the
    /// link handler's handle on the daemon's context).
    manager: Mutex<Option<Arc<Manager>>>,
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
    /// Per peer broker, the highest outbox seq ever sent (to count resends across links).
    resend_marks: Mutex<HashMap<String, Arc<AtomicU64>>>,
    /// Per peer broker, rows handed over by the store writer before their commit.
    hot: Mutex<HashMap<String, Arc<HotSink>>>,
    /// The bound QUIC address (known before the links start).
    quic: Option<std::net::SocketAddr>,
    /// Per peer broker, the de-duplication cursor of its messages: shared by successive links,
    /// so a replaced link's reader and its successor never admit the same position.
    /// `None` until read from the store (and again after a failed insert).
    cursors: Mutex<HashMap<String, Arc<Mutex<Option<fed::InboxCursor>>>>>,
    /// Per peer broker, the pending expiry of a lost link's presences (see
    /// `schedule_presence_expiry`).
    expiries: Mutex<HashMap<String, (CancellationToken, HashSet<String>)>>,
    /// Held while a replica is adopted (see `adopt_offer`).
    adopting: tokio::sync::Mutex<()>,
    /// Test hooks handed to the link manager (none in production).
    hooks: Option<Arc<dyn meshd_federation::LinkHooks>>,
    /// Per peer broker: since when the manager's current link has had no handler registered
    /// here (see `check_links`).
    unregistered_since: Mutex<HashMap<String, (u64, std::time::Instant)>>,
    /// Link policies in force (see `policy`), replaced whole when the stored rows change.
    policies: Mutex<Arc<policy::Policies>>,
    /// The stored rows they were built from.
    policy_rows: Mutex<Vec<policy::PolicyRow>>,
    /// Per peer broker, refusals by policy, by reason (for `/federation`).
    policy_counts: Mutex<HashMap<String, std::collections::BTreeMap<&'static str, u64>>>,
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
    /// world-readable key, a certificate for another name, or an unreadable peer broker CA.
    ///
    /// # Errors
    /// [`FedStartError`].
    pub(crate) fn bind(
        cfg: &FedConfig,
        hooks: Option<Arc<dyn meshd_federation::LinkHooks>>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<(Arc<Self>, Endpoint), FedStartError> {
        let identity = meshd_certs::BrokerIdentity::load(&cfg.cert, &cfg.key, &cfg.broker)?;
        let bundle = meshd_certs::Bundle::from_ca_pem_file(&cfg.ca)
            .map_err(FedStartError::Bundle)?
            .to_text();
        let mut anchors = Vec::new();
        for p in &cfg.peers {
            let anchor = match &p.anchor {
                meshd_config::PeerAnchorConfig::CaFile(path) => {
                    meshd_certs::PeerAnchor::load_ca_file(path).map_err(|source| {
                        FedStartError::Peer {
                            broker: p.name.clone(),
                            source,
                        }
                    })?
                }
                meshd_config::PeerAnchorConfig::Pin(pin) => meshd_certs::PeerAnchor::Pin(*pin),
            };
            anchors.push((p.name.clone(), anchor));
        }
        let trust = meshd_certs::PeerTrust::new(anchors)?;
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
            metrics,
            manager: Mutex::new(None),
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
            policies: Mutex::default(),
            policy_rows: Mutex::default(),
            policy_counts: Mutex::default(),
        });
        Ok((fed, ep))
    }

    /// Starts the link manager and the consent reconciler.
    pub(crate) async fn start(self: &Arc<Self>, ctx: &Arc<Ctx>, ep: Endpoint) {
        if let Err(e) = self.reload_consent(ctx).await {
            warn!(cause = %e, "loading federation consent");
        }
        if let Err(e) = self.reload_policies(ctx).await {
            warn!(cause = %e, "loading link policies");
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
            Arc::new(Links {
                fed: self.clone(),
                ctx: ctx.clone(),
            }),
            self.stop.child_token(),
            self.hooks.clone(),
        );
        manager.start();
        *lock(&self.manager) = Some(manager);
        let (me, ctx) = (self.clone(), ctx.clone());
        self.tracker
            .spawn(async move { me.reconcile_loop(ctx).await });
    }

    /// Closes every link and stops the background tasks.
    pub(crate) async fn shutdown(&self) {
        self.stop.cancel();
        let manager = lock(&self.manager).take();
        if let Some(m) = manager {
            m.shutdown().await;
        }
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Whether moves go only to brokers with an interested viewer
    /// (`federation.spatial_interest`).
    pub(crate) fn spatial_interest(&self) -> bool {
        self.cfg.spatial_interest
    }

    /// The daemon's metrics.
    pub(crate) fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
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

    /// The link manager, while federation runs.
    pub(crate) fn manager(&self) -> Option<Arc<Manager>> {
        lock(&self.manager).clone()
    }

    /// The hot queue of `broker` (see [`HotSink`]).
    pub(crate) fn hot_sink(&self, broker: &str) -> Arc<HotSink> {
        lock(&self.hot)
            .entry(broker.to_owned())
            .or_default()
            .clone()
    }

    pub(crate) fn resend_mark(&self, broker: &str) -> Arc<AtomicU64> {
        lock(&self.resend_marks)
            .entry(broker.to_owned())
            .or_default()
            .clone()
    }

    pub(crate) fn next_version(&self) -> u64 {
        self.version.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(crate) fn link(&self, broker: &str) -> Option<Arc<LinkShared>> {
        lock(&self.links).get(broker).cloned()
    }

    /// Every live link.
    pub(crate) fn all_links(&self) -> Vec<Arc<LinkShared>> {
        lock(&self.links).values().cloned().collect()
    }

    pub(crate) fn links_for(&self, mesh: &str) -> Vec<Arc<LinkShared>> {
        lock(&self.links)
            .values()
            .filter(|l| l.flows(mesh))
            .cloned()
            .collect()
    }

    pub(crate) fn is_shared(&self, mesh: &str) -> bool {
        lock(&self.shared).contains(mesh)
    }

    pub(crate) fn refresh_shared(&self) {
        let set: HashSet<String> = lock(&self.links)
            .values()
            .flat_map(|l| lock(&l.flowing).iter().cloned().collect::<Vec<_>>())
            .collect();
        *lock(&self.shared) = set;
    }

    /// Whether a message of `mesh` for `broker` is taken for forwarding: we consent, and,
    /// if the link is up and settled, `broker` consents too (while the link is down the
    /// message waits in the outbox).
    pub(crate) fn will_forward(&self, mesh: &str, broker: &str) -> bool {
        self.consents(mesh, broker)
            && self
                .link(broker)
                .is_none_or(|l| l.settling_or_flows(mesh, crate::time::std_instant()))
    }

    /// Whether `mesh` is shared with `broker` (messages to its members may be queued for it,
    /// even while the link is down).
    pub(crate) fn consents(&self, mesh: &str, broker: &str) -> bool {
        lock(&self.consent).local_ready(mesh, broker)
    }

    // ---- hooks called by sessions and the HTTP layer --------------------------------

    /// New outbox rows for `broker` are committed.
    pub(crate) fn outbox_ready(&self, broker: &str) {
        tracing::trace!(peer = broker, "outbox rows committed");
        if let Some(link) = self.link(broker) {
            link.outbox_wake.notify_one();
        }
    }

    // ---- consent ----------------------------------------------------------------------

    // ---- the link ---------------------------------------------------------------------
}

/// The handler the link manager runs for each link: the federation state and the
/// daemon's context, held explicitly for as long as the manager runs.
struct Links {
    fed: Arc<Fed>,
    ctx: Arc<Ctx>,
}

impl LinkHandler for Links {
    fn hello(&self, broker: &str) -> Hello {
        let meshes = lock(&self.fed.consent)
            .ready_for(broker)
            .into_iter()
            .map(|mesh_id| MeshClaim { mesh_id })
            .collect();
        Hello {
            version: fed::VERSION,
            broker: self.fed.me.to_string(),
            caps: vec![
                "dm".into(),
                "multicast".into(),
                "presence".into(),
                "state".into(),
                meshd_protocol::fed::CAP_SIGNALS.into(),
                meshd_protocol::fed::CAP_TELEMETRY.into(),
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
        Box::pin(
            self.fed
                .clone()
                .serve_link(self.ctx.clone(), link, id, counters, stop),
        )
    }
}

/// Whether `broker` hosts the member `(id, pubkey)` of `hub` (it may speak for it).
pub(crate) fn speaks_for(hub: &MeshHub, broker: &str, member_id: &str, pubkey: &str) -> bool {
    hub.member(pubkey).is_some_and(|m| m.id == member_id) && hub.may_speak_for(broker, pubkey)
}

pub(crate) fn protocol_error(frame: &Frame, stream: &str) -> LinkError {
    LinkError::Protocol(format!(
        "unexpected {} frame on the {stream} stream",
        frame.kind()
    ))
}

/// A store failure inside a link task: the link ends and starts over from the store.
pub(crate) fn store_error(what: &'static str, e: StoreError) -> LinkError {
    LinkError::Store {
        what,
        source: Box::new(e),
    }
}
