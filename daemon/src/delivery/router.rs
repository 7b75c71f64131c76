//! The router: the stage in front of the store writer that makes the hot-path pushes.
//!
//! It takes operations in channel order and, as each insert passes, pushes the message
//! to its recipient's live connection (or that connection's backlog while it drains the
//! store), so a push never waits for an earlier commit; any delivery mark a recipient
//! sends for that message enters the channel after the insert, so the writer executes
//! it after it. It also numbers rows bound for peer brokers (their outbox positions)
//! and stamps claims with the claimer's store count. Everything then goes on, in the
//! same order, to the store's writer (`store::writer`), which knows nothing of
//! connections.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::hub::{ConnId, MeshHub, Outbound, PeerShared, RouteState, Sent, lease_owner, lock};
use crate::metrics::Metrics;
use crate::store::StoreError;
use crate::store::writer::{ClaimSpec, Claimed, NewMessage, WriteOp};

/// An operation for the store, with what the router does on its way.
#[derive(Debug)]
pub(crate) enum Op {
    /// Store a message; pushed to `delivery`'s connection if set and live, and
    /// otherwise `direct`'s live connections are made to drain.
    Insert {
        row: Box<NewMessage>,
        delivery: Option<Delivery>,
        direct: Option<DirectKey>,
        /// For rows with `forward_to`: the link's sink.
        forward: Option<Arc<dyn ForwardSink>>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Lease up to `spec.limit` undelivered messages for `peer`'s connection.
    Claim {
        peer: Arc<PeerShared>,
        spec: Box<ClaimSpec>,
        reply: oneshot::Sender<Result<Claimed, StoreError>>,
    },
    /// A drain came back short: the connection's backlog is flushed unless rows for it
    /// were stored after the claim with this stamp.
    CaughtUp { peer: Arc<PeerShared>, stamp: u64 },
    /// Any other operation, passed on in order.
    Store(WriteOp),
}

impl From<WriteOp> for Op {
    fn from(op: WriteOp) -> Self {
        Self::Store(op)
    }
}

/// The mesh and recipient key of a direct message, so the router can make the key's
/// live connections drain when the row is stored undelivered (see `hub`).
#[derive(Debug)]
pub(crate) struct DirectKey {
    pub(crate) mesh: Arc<MeshHub>,
    pub(crate) key: String,
}

/// Where the router hands a row bound for a peer broker once it has its outbox position,
/// before the commit (the federation link forwards it at once when it is caught up; the
/// store remains the truth, read when it is not).
pub(crate) trait ForwardSink: Send + Sync + std::fmt::Debug {
    /// Offers a numbered row; never blocks.
    fn offer(&self, row: &NewMessage);
}

/// A hot-path push to attempt while inserting.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) target: Arc<PeerShared>,
    pub(crate) frame: Utf8Bytes,
    /// Lease end if pushed (`i64::MAX` for clients that do not acknowledge).
    pub(crate) lease_until: i64,
}

/// Gap left after the last committed outbox position when the writer starts. Rows are
/// forwarded before their commit (the hot path), so the previous run may have sent
/// positions it never committed: the peer's high-water mark may be that far ahead. The
/// hot queue and the writer channel bound those to a few thousand, far below the gap.
const OUTSEQ_RESTART_GAP: i64 = 1 << 20;

/// Per-peer outbox sequences, owned by the router: it numbers rows in channel order, so
/// every peer sees its messages in commit order with increasing numbers. The highest
/// committed number is persisted (`fed_outseq`) in the same transaction as the rows.
///
/// Every run also starts at least at the clock in microseconds: a previous run that was
/// killed before committing anything for a peer left no maximum behind, but it numbered
/// from its own (earlier) clock reading, at far less than one row per microsecond.
#[derive(Debug, Default)]
pub(crate) struct OutSeqs {
    next: std::collections::HashMap<String, i64>,
    floor: i64,
}

impl OutSeqs {
    /// From the persisted maxima (`SELECT peer, last_seq FROM fed_outseq`) and the time
    /// the writer starts (ms since the epoch).
    pub(crate) fn from_committed(rows: Vec<(String, i64)>, now_ms: i64) -> Self {
        let floor = now_ms.saturating_mul(1000);
        Self {
            next: rows
                .into_iter()
                .map(|(p, last)| (p, last.saturating_add(OUTSEQ_RESTART_GAP).max(floor)))
                .collect(),
            floor,
        }
    }

    fn assign(&mut self, peer: &str) -> i64 {
        let n = self.next.entry(peer.to_owned()).or_insert(self.floor);
        *n += 1;
        *n
    }
}

/// The sending side: where every store operation enters, in order.
#[derive(Debug, Clone)]
pub(crate) struct Handle {
    tx: mpsc::Sender<Op>,
}

impl Handle {
    /// Queues an operation, waiting for room.
    ///
    /// # Errors
    /// [`StoreError::Closed`] once the writer has stopped.
    pub(crate) async fn send(&self, op: impl Into<Op>) -> Result<(), StoreError> {
        self.tx
            .send(op.into())
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Queues an operation and waits for its answer.
    ///
    /// # Errors
    /// [`StoreError::Closed`] or the operation's own error.
    pub(crate) async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> WriteOp,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Waits for room in the queue (cancel-safe), for callers that must not block.
    pub(crate) async fn reserve(&self) -> Result<mpsc::Permit<'_, Op>, StoreError> {
        self.tx.reserve().await.map_err(|_| StoreError::Closed)
    }

    /// Room in the queue right now, if any.
    pub(crate) fn try_reserve(&self) -> Option<mpsc::Permit<'_, Op>> {
        self.tx.try_reserve().ok()
    }

    /// Waits until everything queued so far is committed.
    ///
    /// # Errors
    /// [`StoreError::Closed`].
    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::Flush(tx)).await?;
        rx.await.map_err(|_| StoreError::Closed)
    }
}

/// Creates the router in front of the writer's channel `writer`.
pub(crate) fn channel(
    writer: mpsc::Sender<WriteOp>,
    capacity: usize,
    max_batch: usize,
    backlog_cap: usize,
    metrics: Arc<Metrics>,
    outseqs: OutSeqs,
) -> (Handle, Router) {
    let (tx, rx) = mpsc::channel(capacity);
    (
        Handle { tx },
        Router {
            rx,
            writer,
            max_batch,
            backlog_cap,
            metrics,
            outseqs,
        },
    )
}

/// The router task's state.
#[derive(Debug)]
pub(crate) struct Router {
    rx: mpsc::Receiver<Op>,
    writer: mpsc::Sender<WriteOp>,
    max_batch: usize,
    /// Most bytes kept for one draining connection.
    backlog_cap: usize,
    metrics: Arc<Metrics>,
    outseqs: OutSeqs,
}

impl Router {
    /// Runs until `stop` is cancelled (then refuses new operations and passes on those
    /// already queued) or every [`Handle`] is dropped. Dropping the writer's sender at
    /// the end lets the writer commit the rest and stop.
    pub(crate) async fn run(mut self, stop: CancellationToken) {
        let mut ops = Vec::with_capacity(self.max_batch);
        let mut stopping = false;
        loop {
            let n = if stopping {
                self.rx.recv_many(&mut ops, self.max_batch).await
            } else {
                tokio::select! {
                    biased;
                    n = self.rx.recv_many(&mut ops, self.max_batch) => n,
                    () = stop.cancelled() => {
                        // Refuse new operations; the loop drains those already queued.
                        self.rx.close();
                        stopping = true;
                        continue;
                    }
                }
            };
            if n == 0 {
                break;
            }
            for op in ops.drain(..) {
                let mut release = None;
                let op = match op {
                    Op::Insert {
                        mut row,
                        delivery,
                        direct,
                        forward,
                        reply,
                    } => {
                        if let Some(peer) = &row.forward_to {
                            row.forward_seq = Some(self.outseqs.assign(peer));
                            if let Some(sink) = forward {
                                sink.offer(&row);
                            }
                        }
                        let routed = delivery.is_some_and(|d| {
                            route_live(&mut row, d, self.backlog_cap, &mut release)
                        });
                        if routed {
                            self.metrics.direct_hot.fetch_add(1, Ordering::Relaxed);
                        } else if let Some(d) = direct {
                            d.mesh.spill_key(&d.key);
                        }
                        WriteOp::Insert { row, reply }
                    }
                    Op::Claim {
                        peer,
                        mut spec,
                        reply,
                    } => {
                        spec.stamp = lock(&peer.route).stored;
                        WriteOp::Claim { spec, reply }
                    }
                    Op::CaughtUp { peer, stamp } => {
                        caught_up(&peer, stamp, &mut release);
                        match release.take() {
                            Some(op) => op,
                            None => continue,
                        }
                    }
                    Op::Store(op) => op,
                };
                if self.writer.send(op).await.is_err() {
                    return;
                }
                // Leases the router gave back run after the inserts they concern.
                if let Some(release) = release
                    && self.writer.send(release).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

/// Routes a direct message to a live connection (see `hub`): pushed at once, or kept in
/// the connection's backlog while it drains the store. Either way the row is leased to
/// the connection and `true` is returned. `false` leaves the row for a drain: the
/// connection is closing, its queue is full, or its backlog outgrew `backlog_cap` bytes
/// (then the backlog goes back to the store too, through `release`).
fn route_live(
    row: &mut NewMessage,
    d: Delivery,
    backlog_cap: usize,
    release: &mut Option<WriteOp>,
) -> bool {
    let target = d.target;
    let mut st = lock(&target.route);
    if st.closed {
        return false;
    }
    let sent = Sent {
        id: row.id.clone(),
        finite_lease: d.lease_until != i64::MAX,
    };
    let accepted = if st.draining {
        if st.backlog_bytes + d.frame.len() <= backlog_cap {
            st.backlog_bytes += d.frame.len();
            st.backlog.push_back((d.frame, sent));
            true
        } else {
            *release = Some(give_back(&mut st, target.conn_id));
            false
        }
    } else {
        match target.try_queue(Outbound::Stored {
            frame: d.frame,
            sent,
        }) {
            Ok(()) => true,
            // A full queue is no slow-consumer offence for a durable message: it waits
            // in the store for the drain.
            Err(mpsc::error::TrySendError::Full(_)) => {
                st.stored();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    };
    drop(st);
    tracing::trace!(id = %row.id, conn = target.conn_id, accepted, "direct message routed");
    if accepted {
        row.lease_conn = Some(lease_owner(target.conn_id));
        row.lease_until = Some(d.lease_until);
    } else {
        target.wake.notify_one();
    }
    accepted
}

/// Hands a connection's backlog back to the store; it drains again before going live.
fn give_back(st: &mut RouteState, conn: ConnId) -> WriteOp {
    let ids = st.take_backlog();
    st.stored();
    WriteOp::Release {
        conn: lease_owner(conn),
        ids,
    }
}

/// A drain came back short at `stamp`: if nothing entered the store for the connection
/// since, flush its backlog into its queue and take it live again. If the queue fills
/// up on the way, the rest goes back to the store (through `release`) and it drains again.
fn caught_up(peer: &PeerShared, stamp: u64, release: &mut Option<WriteOp>) {
    let mut st = lock(&peer.route);
    if st.closed || !st.draining || st.stored != stamp {
        return;
    }
    while let Some((frame, sent)) = st.backlog.pop_front() {
        let len = frame.len();
        match peer.try_queue(Outbound::Stored { frame, sent }) {
            Ok(()) => st.backlog_bytes = st.backlog_bytes.saturating_sub(len),
            Err(mpsc::error::TrySendError::Full(Outbound::Stored { frame, sent })) => {
                st.backlog.push_front((frame, sent));
                *release = Some(give_back(&mut st, peer.conn_id));
                drop(st);
                peer.wake.notify_one();
                return;
            }
            // Closing: the session's teardown gives back whatever stays in the backlog.
            Err(
                mpsc::error::TrySendError::Full(other) | mpsc::error::TrySendError::Closed(other),
            ) => {
                if let Outbound::Stored { frame, sent } = other {
                    st.backlog.push_front((frame, sent));
                }
                return;
            }
        }
    }
    st.draining = false;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_positions_only_go_up() {
        // A peer never numbered: from the clock (µs), even with nothing committed.
        let mut fresh = OutSeqs::from_committed(Vec::new(), 1_000);
        assert_eq!(fresh.assign("b"), 1_000_001);
        assert_eq!(fresh.assign("b"), 1_000_002);
        // A peer with a committed maximum: past it by the gap, or the clock if later.
        let mut known = OutSeqs::from_committed(vec![("b".into(), 5)], 0);
        assert_eq!(known.assign("b"), 5 + OUTSEQ_RESTART_GAP + 1);
        let mut clock = OutSeqs::from_committed(vec![("b".into(), 5)], 10_000);
        assert_eq!(clock.assign("b"), 10_000_001);
    }

    fn row(id: &str) -> NewMessage {
        NewMessage {
            id: id.into(),
            mesh_id: "mesh".into(),
            sender_member_id: "m".into(),
            sender_pubkey: "a".into(),
            sender_member_pubkey: "a".into(),
            sender_name: "alice".into(),
            target_spec: "b".into(),
            target_key: Some("b".into()),
            priority: 1,
            nonce: String::new(),
            ciphertext: String::new(),
            subtype: None,
            client_message_id: None,
            created_at: 0,
            expires_at: i64::MAX,
            delivered_at: None,
            lease_conn: None,
            lease_until: None,
            forward_to: None,
            forward_seq: None,
            tags: Vec::new(),
            refusals: Vec::new(),
            bridged: None,
            inbox: None,
        }
    }

    /// A connection with a queue of `frames`, and the receiving end of that queue.
    fn connection(frames: usize) -> (Arc<PeerShared>, crate::hub::outq::OutRx) {
        let (tx, rx) = crate::hub::outq::channel(frames);
        let peer = PeerShared::new(7, tx, CancellationToken::new(), 1 << 20);
        (Arc::new(peer), rx)
    }

    fn deliver(peer: &Arc<PeerShared>, bytes: usize) -> Delivery {
        Delivery {
            target: peer.clone(),
            frame: Utf8Bytes::from("x".repeat(bytes)),
            lease_until: 1_000,
        }
    }

    fn ids(rx: &mut crate::hub::outq::OutRx) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(o) = rx.try_recv() {
            if let Outbound::Stored { sent, .. } = o {
                out.push(sent.id);
            }
        }
        out
    }

    #[test]
    fn a_draining_connection_backlogs_then_goes_live_in_order() {
        let (peer, mut rx) = connection(16);
        let mut release = None;
        // New connections drain first: pushes wait in the backlog, leased to it.
        for id in ["m1", "m2"] {
            let mut r = row(id);
            assert!(route_live(
                &mut r,
                deliver(&peer, 10),
                1 << 20,
                &mut release
            ));
            assert_eq!(r.lease_conn, Some(lease_owner(7)));
            assert_eq!(r.lease_until, Some(1_000));
        }
        assert!(ids(&mut rx).is_empty(), "nothing is pushed while draining");
        // The drain came back short with the current stamp: the backlog goes out, in
        // order, and the connection is live.
        let stamp = lock(&peer.route).stored;
        caught_up(&peer, stamp, &mut release);
        assert!(release.is_none());
        assert_eq!(ids(&mut rx), ["m1", "m2"]);
        assert!(!lock(&peer.route).draining);
        let mut r = row("m3");
        assert!(route_live(
            &mut r,
            deliver(&peer, 10),
            1 << 20,
            &mut release
        ));
        assert_eq!(ids(&mut rx), ["m3"]);
    }

    #[test]
    fn a_claim_older_than_the_last_stored_row_keeps_draining() {
        let (peer, mut rx) = connection(16);
        let mut release = None;
        let stamp = lock(&peer.route).stored;
        let mut r = row("m1");
        assert!(route_live(
            &mut r,
            deliver(&peer, 10),
            1 << 20,
            &mut release
        ));
        // A row entered the store after the claim was stamped: it may be older than the
        // backlog, so the connection must drain again before going live.
        peer.spill();
        caught_up(&peer, stamp, &mut release);
        assert!(lock(&peer.route).draining);
        assert!(ids(&mut rx).is_empty());
        assert_eq!(lock(&peer.route).backlog.len(), 1);
    }

    #[test]
    fn a_backlog_over_its_cap_goes_back_to_the_store() {
        let (peer, mut rx) = connection(16);
        let mut release = None;
        let before = lock(&peer.route).stored;
        let mut r = row("m1");
        assert!(route_live(&mut r, deliver(&peer, 60), 100, &mut release));
        let mut r = row("m2");
        assert!(!route_live(&mut r, deliver(&peer, 60), 100, &mut release));
        assert_eq!(
            r.lease_conn, None,
            "the row that did not fit is stored unleased"
        );
        match release {
            Some(WriteOp::Release { conn, ids }) => {
                assert_eq!(conn, lease_owner(7));
                assert_eq!(ids, ["m1"]);
            }
            other => panic!("expected the backlog's release, got {other:?}"),
        }
        let st = lock(&peer.route);
        assert!(st.backlog.is_empty() && st.backlog_bytes == 0);
        assert!(
            st.stored > before,
            "the next caught-up with the old stamp must fail"
        );
        drop(st);
        assert!(ids(&mut rx).is_empty());
    }

    #[test]
    fn a_full_queue_leaves_the_row_for_the_drain() {
        let (peer, mut rx) = connection(1);
        let mut release = None;
        let stamp = lock(&peer.route).stored;
        caught_up(&peer, stamp, &mut release);
        let mut r = row("m1");
        assert!(route_live(
            &mut r,
            deliver(&peer, 10),
            1 << 20,
            &mut release
        ));
        let before = lock(&peer.route).stored;
        let mut r = row("m2");
        assert!(!route_live(
            &mut r,
            deliver(&peer, 10),
            1 << 20,
            &mut release
        ));
        assert!(release.is_none());
        assert!(lock(&peer.route).stored > before);
        assert_eq!(ids(&mut rx), ["m1"]);
        // A closed connection takes nothing.
        lock(&peer.route).close();
        let mut r = row("m3");
        assert!(!route_live(
            &mut r,
            deliver(&peer, 10),
            1 << 20,
            &mut release
        ));
    }
}
