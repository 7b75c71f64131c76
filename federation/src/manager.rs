//! Keeps one link per configured peer broker: dials (with exponential backoff and jitter),
//! accepts, de-duplicates simultaneous connections and records each link's status.
//!
//! What runs *on* a link is the daemon's business ([`LinkHandler`]); the manager owns
//! the connection's life: it hands each authenticated [`Link`] to the handler and, when
//! the handler returns or the link is replaced, closes it and dials again.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use meshd_protocol::fed::{self, CloseReason, DEFAULT_PORT, Hello};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::discovery::Discovery;
use crate::link::{Endpoint, Link, LinkError, close, close_reason_of};

/// A configured peer broker.
#[derive(Debug, Clone)]
pub struct PeerTarget {
    /// Broker name.
    pub name: String,
    /// Explicit `HOST:PORT`; `None`: DNS SRV discovery.
    pub addr: Option<String>,
}

/// Reconnect timing.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First delay.
    pub min: Duration,
    /// Cap.
    pub max: Duration,
}

impl Backoff {
    /// Delay before attempt `n` (0-based): `min·2ⁿ` capped at `max`, scaled by
    /// `jitter` ∈ [0.5, 1] so brokers restarted together do not dial in lockstep.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let base = self
            .min
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
            .min(self.max);
        base.mul_f64(jitter.clamp(0.5, 1.0))
    }
}

/// Counters of one peer broker, across its successive links. The daemon's link handler
/// updates them; `queued` is a gauge.
#[derive(Debug, Default)]
pub struct LinkCounters {
    /// Frames sent.
    pub sent: AtomicU64,
    /// Durable messages sent again after a reconnect.
    pub resent: AtomicU64,
    /// Frames received.
    pub received: AtomicU64,
    /// Frames of ours the peer broker refused.
    pub rejected: AtomicU64,
    /// Frames of the peer broker we refused (forged sender, not shared, invalid).
    pub refused: AtomicU64,
    /// Durable messages waiting for this broker.
    pub queued: AtomicU64,
}

/// A link's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Dialing or resolving.
    Connecting,
    /// Authenticated and running.
    Up,
    /// Waiting before the next attempt.
    Backoff,
    /// Shut down.
    Stopped,
}

impl LinkState {
    /// Label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Up => "up",
            Self::Backoff => "backoff",
            Self::Stopped => "stopped",
        }
    }
}

/// A snapshot of one peer broker's link.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    /// Broker name.
    pub name: String,
    /// State.
    pub state: LinkState,
    /// Since when (ms since the epoch).
    pub since_ms: i64,
    /// Remote address of the current link.
    pub addr: Option<SocketAddr>,
    /// Whether we dialed the current link.
    pub dialer: bool,
    /// Round-trip estimate of the current link.
    pub rtt: Option<Duration>,
    /// Links established so far.
    pub connects: u64,
    /// Number of the current link (see [`LinkHandler::run`]).
    pub link_id: Option<u64>,
    /// Last failure.
    pub last_error: Option<String>,
    /// Counters.
    pub counters: Arc<LinkCounters>,
}

/// What the daemon runs on each link.
pub trait LinkHandler: Send + Sync + 'static {
    /// Our hello to `broker` (the meshes we are ready to exchange with it).
    fn hello(&self, broker: &str) -> Hello;

    /// Serves `link` (number `id`: ids grow with each link the manager adopts) until it
    /// fails or `stop` is cancelled. The manager closes the connection afterwards.
    ///
    /// `stop` is already cancelled when the link was replaced before its handler ran:
    /// the handler must then not announce the link as the broker's (its successor is).
    fn run(
        self: Arc<Self>,
        link: Link,
        id: u64,
        counters: Arc<LinkCounters>,
        stop: CancellationToken,
    ) -> Pin<Box<dyn Future<Output = Result<(), LinkError>> + Send>>;
}

/// Points in a link's life where a test can pause the manager, to force an order of
/// events that scheduling makes rare (a simultaneous dial's two handlers starting in
/// either order). Production runs without hooks.
pub trait LinkHooks: Send + Sync + std::fmt::Debug + 'static {
    /// Before the handler of link `id` to `broker` runs (`dialer`: we dialed it).
    fn before_run(
        &self,
        broker: &str,
        id: u64,
        dialer: bool,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;

    /// After the handler of link `id` returned.
    fn after_run(&self, broker: &str, id: u64);
}

struct Active {
    id: u64,
    conn: quinn::Connection,
    dialed_by_me: bool,
    stop: CancellationToken,
    established: std::time::Instant,
}

/// A link older than this is not half of a simultaneous dial: a new connection from the
/// same broker means that broker lost it (a restart, say), so the new one replaces it instead
/// of being refused until the old one times out.
const SIMULTANEOUS: Duration = Duration::from_secs(3);

struct Slot {
    status: PeerStatus,
    active: Option<Active>,
}

/// Federation handshakes in progress at once (the rest are refused at once).
const MAX_HANDSHAKES: usize = 256;

/// Refused handshakes kept for the status page.
const REFUSALS_KEPT: usize = 32;

/// The link manager.
pub struct Manager {
    ep: Endpoint,
    discovery: Discovery,
    handler: Arc<dyn LinkHandler>,
    backoff: Backoff,
    slots: Mutex<HashMap<String, Slot>>,
    targets: Vec<PeerTarget>,
    ended: Notify,
    next_id: AtomicU64,
    refusals: Mutex<VecDeque<String>>,
    tracker: TaskTracker,
    stop: CancellationToken,
    hooks: Option<Arc<dyn LinkHooks>>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("me", &self.ep.name())
            .field("peers", &self.targets.len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Manager {
    /// Creates the manager; [`Manager::start`] runs it.
    pub fn new(
        ep: Endpoint,
        discovery: Discovery,
        targets: Vec<PeerTarget>,
        backoff: Backoff,
        handler: Arc<dyn LinkHandler>,
        stop: CancellationToken,
        hooks: Option<Arc<dyn LinkHooks>>,
    ) -> Arc<Self> {
        let slots = targets
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    Slot {
                        status: PeerStatus {
                            name: t.name.clone(),
                            state: LinkState::Connecting,
                            since_ms: crate::time::now_ms(),
                            addr: None,
                            dialer: false,
                            rtt: None,
                            connects: 0,
                            link_id: None,
                            last_error: None,
                            counters: Arc::default(),
                        },
                        active: None,
                    },
                )
            })
            .collect();
        Arc::new(Self {
            ep,
            discovery,
            handler,
            backoff,
            slots: Mutex::new(slots),
            targets,
            ended: Notify::new(),
            next_id: AtomicU64::new(1),
            refusals: Mutex::new(VecDeque::new()),
            tracker: TaskTracker::new(),
            stop,
            hooks,
        })
    }

    /// Starts the accept loop and one dial loop per peer broker.
    pub fn start(self: &Arc<Self>) {
        let me = self.clone();
        self.tracker.spawn(async move { me.accept_loop().await });
        for t in self.targets.clone() {
            let me = self.clone();
            let span = info_span!("fed_dial", peer = %t.name);
            self.tracker
                .spawn(async move { me.dial_loop(t).await }.instrument(span));
        }
    }

    /// Stops dialing and accepting, closes every link and waits for the handlers.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.ep.close();
        self.tracker.close();
        self.tracker.wait().await;
        for slot in lock(&self.slots).values_mut() {
            slot.status.state = LinkState::Stopped;
        }
    }

    /// The endpoint.
    pub const fn endpoint(&self) -> &Endpoint {
        &self.ep
    }

    /// Every peer broker's status, sorted by name.
    pub fn status(&self) -> Vec<PeerStatus> {
        let slots = lock(&self.slots);
        let mut out: Vec<PeerStatus> = slots
            .values()
            .map(|s| {
                let mut st = s.status.clone();
                st.rtt = s.active.as_ref().map(|a| a.conn.rtt());
                st.link_id = s.active.as_ref().map(|a| a.id);
                st
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Counters of a peer broker.
    pub fn counters(&self, broker: &str) -> Option<Arc<LinkCounters>> {
        lock(&self.slots)
            .get(broker)
            .map(|s| s.status.counters.clone())
    }

    /// Whether a link to `broker` is up.
    pub fn is_up(&self, broker: &str) -> bool {
        lock(&self.slots)
            .get(broker)
            .is_some_and(|s| s.active.is_some())
    }

    /// Tears down link `id` to `broker` if it is still the current one (both sides then
    /// dial again): for a link that is up but does not converge.
    pub fn reset(&self, broker: &str, id: u64, reason: CloseReason) -> bool {
        let slots = lock(&self.slots);
        let Some(active) = slots.get(broker).and_then(|s| s.active.as_ref()) else {
            return false;
        };
        if active.id != id {
            return false;
        }
        warn!(
            peer = broker,
            id,
            reason = reason.as_str(),
            "resetting a federation link"
        );
        active.stop.cancel();
        close(&active.conn, reason);
        true
    }

    /// Recent refused handshakes (newest last).
    pub fn refusals(&self) -> Vec<String> {
        lock(&self.refusals).iter().cloned().collect()
    }

    fn set_state(&self, broker: &str, state: LinkState, error: Option<String>) {
        if let Some(slot) = lock(&self.slots).get_mut(broker) {
            if slot.status.state != state {
                slot.status.since_ms = crate::time::now_ms();
            }
            slot.status.state = state;
            if error.is_some() {
                slot.status.last_error = error;
            }
        }
    }

    fn refused(&self, what: String) {
        let mut r = lock(&self.refusals);
        if r.len() == REFUSALS_KEPT {
            r.pop_front();
        }
        r.push_back(what);
    }

    async fn accept_loop(self: Arc<Self>) {
        // Handshakes in progress are bounded: a stranger's UDP packets can start them
        // (each lives up to the handshake timeout) but not without limit.
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        loop {
            let incoming = tokio::select! {
                () = self.stop.cancelled() => return,
                i = self.ep.incoming() => match i {
                    Some(i) => i,
                    None => return,
                },
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                debug!(remote = %incoming.remote_address(), "too many federation handshakes at once; refused");
                incoming.refuse();
                continue;
            };
            let me = self.clone();
            self.tracker.spawn(async move {
                let _permit = permit;
                let remote = incoming.remote_address();
                let handler = me.handler.clone();
                // A stop never waits for a handshake (the other broker may be stopping too).
                let accepted = tokio::select! {
                    () = me.stop.cancelled() => return,
                    r = me.ep.accept(incoming, |broker| handler.hello(broker)) => r,
                };
                match accepted {
                    Ok(link) => me.register(link),
                    Err(e) => {
                        warn!(%remote, error = %e, "federation handshake refused");
                        me.refused(format!("{remote}: {e}"));
                    }
                }
            });
        }
    }

    async fn dial_loop(self: Arc<Self>, target: PeerTarget) {
        let mut attempt = 0u32;
        loop {
            // Wait while a link is up (ours or accepted).
            loop {
                let ended = self.ended.notified();
                tokio::pin!(ended);
                ended.as_mut().enable();
                if !self.is_up(&target.name) {
                    break;
                }
                tokio::select! {
                    () = self.stop.cancelled() => return,
                    () = ended => {}
                }
            }
            if self.stop.is_cancelled() {
                return;
            }
            self.set_state(&target.name, LinkState::Connecting, None);
            // A stop never waits for a lookup or a handshake: the broker may be stopping
            // too, or gone (then only the handshake timeout would end the dial).
            let dialed = tokio::select! {
                () = self.stop.cancelled() => return,
                r = self.dial_once(&target) => r,
            };
            match dialed {
                Ok(link) => {
                    attempt = 0;
                    self.register(link);
                    continue;
                }
                Err(e) => {
                    debug!(error = %e, "dial failed");
                    let delay = self.backoff.delay(attempt, rand::random_range(0.5..=1.0));
                    attempt = attempt.saturating_add(1);
                    // An accepted link may have come up meanwhile.
                    if !self.is_up(&target.name) {
                        self.set_state(&target.name, LinkState::Backoff, Some(e.to_string()));
                    }
                    tokio::select! {
                        () = self.stop.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                        () = self.ended.notified() => {}
                    }
                }
            }
        }
    }

    async fn dial_once(&self, target: &PeerTarget) -> Result<Link, LinkError> {
        let addrs = self.resolve(target).await?;
        let mut last = LinkError::Io("no address".into());
        for addr in addrs {
            if self.stop.is_cancelled() || self.is_up(&target.name) {
                return Err(LinkError::Closed(CloseReason::Duplicate));
            }
            match self
                .ep
                .dial_with(&target.name, addr, || {
                    let mut hello = self.handler.hello(&target.name);
                    if self.is_up(&target.name) {
                        hello.caps.push(fed::CAP_HAS_LINK.to_owned());
                    }
                    hello
                })
                .await
            {
                Ok(link) => return Ok(link),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn resolve(&self, target: &PeerTarget) -> Result<Vec<SocketAddr>, LinkError> {
        match &target.addr {
            Some(a) => tokio::net::lookup_host(a.as_str())
                .await
                .map(Iterator::collect)
                .map_err(|e| LinkError::Io(format!("resolving {a}: {e}"))),
            None => self
                .discovery
                .resolve(&target.name, DEFAULT_PORT)
                .await
                .map_err(|e| LinkError::Io(e.to_string())),
        }
    }

    /// Adopts an authenticated link, unless an equivalent one wins the tie-break.
    fn register(self: &Arc<Self>, link: Link) {
        let me_name = self.ep.name().to_owned();
        let broker = link.broker.clone();
        let stop = self.stop.child_token();
        let counters;
        let id;
        {
            let mut slots = lock(&self.slots);
            // Numbered under the lock: ids grow in the order links are adopted.
            id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let Some(slot) = slots.get_mut(&broker) else {
                link.close(CloseReason::NotConfigured);
                return;
            };
            // A late dial of a broker that had a link by the time it said hello: both
            // sides close it, whatever they hold themselves (so they always agree), and
            // keep the link that made it late (see `fed::CAP_HAS_LINK`).
            let dialer_hello = if link.dialer {
                &link.hello
            } else {
                &link.their_hello
            };
            if dialer_hello.caps.iter().any(|c| c == fed::CAP_HAS_LINK) {
                debug!(peer = %broker, "late dial while a link serves; closed");
                link.close(CloseReason::Duplicate);
                return;
            }
            if let Some(old) = &slot.active {
                // Of two connections made at once, keep the one dialed by the broker whose
                // name sorts first (both sides decide alike); otherwise the newer (the
                // older is one the other broker has lost, not yet noticed here).
                let new_dialer = if link.dialer {
                    me_name.as_str()
                } else {
                    broker.as_str()
                };
                let old_dialer = if old.dialed_by_me {
                    me_name.as_str()
                } else {
                    broker.as_str()
                };
                let new_wins = new_dialer == old_dialer
                    || crate::time::instant().saturating_duration_since(old.established)
                        > SIMULTANEOUS
                    || fed::keep_dialed_by(new_dialer, old_dialer);
                if !new_wins {
                    debug!(peer = %broker, "duplicate link closed");
                    link.close(CloseReason::Duplicate);
                    return;
                }
                old.stop.cancel();
                close(&old.conn, CloseReason::Duplicate);
            }
            slot.active = Some(Active {
                id,
                conn: link.conn.conn.clone(),
                dialed_by_me: link.dialer,
                stop: stop.clone(),
                established: crate::time::instant(),
            });
            slot.status.state = LinkState::Up;
            slot.status.since_ms = crate::time::now_ms();
            slot.status.addr = Some(link.remote);
            slot.status.dialer = link.dialer;
            slot.status.connects += 1;
            counters = slot.status.counters.clone();
        }
        info!(peer = %broker, remote = %link.remote, dialer = link.dialer, "federation link up");
        let me = self.clone();
        let handler = self.handler.clone();
        let span = info_span!("fed_link", peer = %broker, id);
        self.tracker.spawn(
            async move {
                let conn = link.conn.conn.clone();
                if let Some(h) = &me.hooks {
                    h.before_run(&broker, id, link.dialer).await;
                }
                let result = handler.run(link, id, counters, stop.clone()).await;
                if let Some(h) = &me.hooks {
                    h.after_run(&broker, id);
                }
                let reason = if me.stop.is_cancelled() {
                    CloseReason::Shutdown
                } else {
                    CloseReason::Protocol
                };
                let err = match result {
                    Ok(()) => close_reason_of(&conn)
                        .map(|r| format!("closed: {}", r.as_str()))
                        .or_else(|| conn.close_reason().map(|e| e.to_string())),
                    Err(e) => Some(e.to_string()),
                };
                if conn.close_reason().is_none() {
                    close(&conn, reason);
                }
                {
                    let mut slots = lock(&me.slots);
                    if let Some(slot) = slots.get_mut(&broker)
                        && slot.active.as_ref().is_some_and(|a| a.id == id)
                    {
                        slot.active = None;
                        slot.status.state = if me.stop.is_cancelled() {
                            LinkState::Stopped
                        } else {
                            LinkState::Connecting
                        };
                        slot.status.since_ms = crate::time::now_ms();
                        if err.is_some() {
                            slot.status.last_error.clone_from(&err);
                        }
                    }
                }
                info!(error = err.as_deref().unwrap_or(""), "federation link down");
                me.ended.notify_waiters();
            }
            .instrument(span),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let b = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(5),
        };
        assert_eq!(b.delay(0, 1.0), Duration::from_millis(100));
        assert_eq!(b.delay(3, 1.0), Duration::from_millis(800));
        assert_eq!(b.delay(30, 1.0), Duration::from_secs(5));
        assert_eq!(b.delay(3, 0.5), Duration::from_millis(400));
        // Jitter outside [0.5, 1] is clamped.
        assert_eq!(b.delay(0, 0.0), Duration::from_millis(50));
    }
}
