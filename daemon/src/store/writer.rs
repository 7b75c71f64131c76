//! The group-commit writer: one task, one connection, many operations per transaction.
//!
//! Sessions send [`WriteOp`]s through a bounded channel (a full channel back-pressures
//! the senders' sockets, never drops). The writer takes every operation already queued
//! (up to `max_batch`), runs them in one transaction and answers each after the commit,
//! so a `send` is acknowledged only once its row is durable, while one fsync (or, with
//! `durability = "normal"`, one WAL write) serves the whole batch.
//!
//! Operations arrive through `delivery::router`, which makes the hot-path pushes as
//! each insert passes, in channel order (so a delivery mark a recipient sends for a
//! message is executed after its insert). Within a batch, operations run by kind in a fixed order — inserts,
//! lease changes, delivery marks, the rest in arrival order, claims — which keeps
//! inserts in multi-row statements and lets every claim see every earlier insert; the
//! releases of ended connections run after the claims.
//!
//! If a batch fails, it is rolled back; if the connection is unusable (lost, or left in a
//! transaction the database rolled back by itself, as SQLite does on a full disk) the
//! writer replaces it and retries the batch once. A batch that still fails for one
//! operation's fault is split and retried piece by piece (each insert, each claim and
//! each other operation alone; lease changes together, delivery marks together), so
//! one bad operation fails alone; a batch that fails because the store is failing
//! (disk full, I/O, unreachable) fails at once, and the next batch tries again, so the
//! writer recovers by itself when the store does.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::Ordering;

use sqlx::{AssertSqlSafe, Connection as _};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, warn};

use super::{StoreError, WriterConn};
use crate::metrics::Metrics;
use meshd_config::{Backend, Durability};

/// A stored audit entry (the chain logic is in `features::audit`).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditRow {
    /// Mesh.
    pub mesh_id: String,
    /// Position in the mesh's chain, from 1.
    pub seq: i64,
    /// `peer_joined`, `state_set`, …
    pub event_type: String,
    /// Acting member, if any.
    pub actor_member_id: Option<String>,
    /// Display name of the actor, or `system`.
    pub actor: String,
    /// Event data, canonical JSON.
    pub payload: String,
    /// Hash of the previous entry (`genesis` for the first).
    pub prev_hash: String,
    /// SHA-256 (hex) of this entry's canonical form.
    pub hash: String,
    /// Ed25519 signature (hex) of the hash bytes.
    pub sig: String,
    /// When (ms).
    pub created_at: i64,
}

/// The multi-row insert of audit entries (10 columns), run in the batch transaction of
/// the messages the entries are about.
const AUDIT_INSERT_HEAD: &str = "INSERT INTO audit_log (mesh_id, seq, event_type, actor_member_id, actor, payload, prev_hash, hash, sig, created_at) VALUES ";

/// A row of the `message` table to insert.
#[derive(Debug, Clone)]
pub(crate) struct NewMessage {
    pub(crate) id: String,
    pub(crate) mesh_id: String,
    pub(crate) sender_member_id: String,
    pub(crate) sender_pubkey: String,
    pub(crate) sender_member_pubkey: String,
    pub(crate) sender_name: String,
    pub(crate) target_spec: String,
    pub(crate) target_key: Option<String>,
    pub(crate) priority: i64,
    pub(crate) nonce: String,
    pub(crate) ciphertext: String,
    pub(crate) subtype: Option<String>,
    pub(crate) client_message_id: Option<String>,
    pub(crate) created_at: i64,
    pub(crate) expires_at: i64,
    pub(crate) delivered_at: Option<i64>,
    pub(crate) lease_conn: Option<i64>,
    pub(crate) lease_until: Option<i64>,
    /// Peer broker hosting the recipient: the row is that link's outbox entry.
    pub(crate) forward_to: Option<String>,
    /// Its position in that outbox, assigned by the router (see `delivery::router::OutSeqs`).
    pub(crate) forward_seq: Option<i64>,
    /// Tags (stored space-separated, see [`super::tags_to_column`]).
    pub(crate) tags: Vec<String>,
    /// Peer brokers this broker's export policy kept a multicast from: (broker,
    /// reason), stored in `message_refusal` with the row.
    pub(crate) refusals: Vec<(String, String)>,
    /// For a DM whose sender is in another (bridged) mesh: where from, as JSON.
    pub(crate) bridged: Option<String>,
    /// Set for a message received from a peer broker: (peer, its outbox seq), recorded
    /// in `fed_inbox` in the same transaction so a resend is recognised after any crash.
    pub(crate) inbox: Option<(String, i64)>,
}

const MESSAGE_COLUMNS: usize = 22;

/// A stored message handed to a drain.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct ClaimedRow {
    pub(crate) seq: i64,
    pub(crate) id: String,
    pub(crate) sender_pubkey: String,
    pub(crate) sender_member_pubkey: String,
    pub(crate) sender_member_id: String,
    pub(crate) sender_name: String,
    pub(crate) priority: i64,
    pub(crate) nonce: String,
    pub(crate) ciphertext: String,
    pub(crate) subtype: Option<String>,
    pub(crate) client_message_id: Option<String>,
    pub(crate) created_at: i64,
    /// Space-separated tags, if any.
    pub(crate) tags: Option<String>,
    /// Where a bridged sender is from (JSON), if it is.
    pub(crate) bridged: Option<String>,
    /// What the sender addressed (`*`, `@group`, a key, …).
    pub(crate) target_spec: String,
}

/// What a claim returned.
#[derive(Debug)]
pub(crate) struct Claimed {
    /// The claimer's store count when the claim passed the router.
    pub(crate) stamp: u64,
    /// Rows now leased to the claimer, in `seq` order.
    pub(crate) rows: Vec<ClaimedRow>,
    /// When the earliest still-leased row addressed to these keys becomes claimable
    /// again (only computed when the claim came back short).
    pub(crate) next_lease_expiry: Option<i64>,
}

/// Parameters of a claim.
#[derive(Debug)]
pub(crate) struct ClaimSpec {
    /// Returned with the rows (the router's count of rows stored for the claimer).
    pub(crate) stamp: u64,
    pub(crate) mesh_id: String,
    pub(crate) member_key: String,
    pub(crate) session_key: String,
    pub(crate) max_priority: i64,
    pub(crate) conn: i64,
    pub(crate) lease_until: i64,
    pub(crate) now: i64,
    pub(crate) limit: i64,
}

/// An enrollment through `/join`, checked and applied atomically.
#[derive(Debug)]
pub(crate) struct JoinOp {
    pub(crate) mesh_id: String,
    pub(crate) token: String,
    pub(crate) pubkey: String,
    pub(crate) display_name: String,
    pub(crate) new_member_id: String,
    pub(crate) now: i64,
    pub(crate) reply: oneshot::Sender<Result<JoinOutcome, StoreError>>,
}

/// Result of a join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum JoinOutcome {
    /// Enrolled with this id and role.
    Joined { member_id: String, role: String },
    /// The key was already a live member.
    AlreadyMember { member_id: String },
    /// Refused, with the reference's error code.
    Refused(&'static str),
}

/// A topic post: its history row and its mention notifications. Inserted once: a
/// post sent again (a peer broker's catch-up) changes nothing.
#[derive(Debug, Clone)]
pub(crate) struct TopicPostWrite {
    pub(crate) id: String,
    pub(crate) topic_id: String,
    pub(crate) mesh_id: String,
    pub(crate) sender_member_id: String,
    pub(crate) sender_member_pubkey: String,
    pub(crate) sender_session_pubkey: Option<String>,
    pub(crate) sender_name: String,
    pub(crate) nonce: String,
    pub(crate) ciphertext: String,
    pub(crate) body_version: i64,
    /// Kept only if it names a message of the same topic.
    pub(crate) reply_to_id: Option<String>,
    pub(crate) created_at: i64,
    /// The peer broker it came from (`None`: posted here).
    pub(crate) origin_broker: Option<String>,
    /// `(notification id, recipient member id)` of each mention.
    pub(crate) mentions: Vec<(String, String)>,
}

/// One saved "welcome back" record.
#[derive(Debug, Clone)]
pub(crate) struct PeerStateWrite {
    pub(crate) mesh_id: String,
    pub(crate) member_id: String,
    pub(crate) groups: String,
    pub(crate) profile: String,
    pub(crate) visible: bool,
    pub(crate) last_summary: Option<String>,
    pub(crate) last_display_name: String,
    pub(crate) stats: String,
    pub(crate) at: i64,
    /// Tag subscriptions, space-separated.
    pub(crate) tags: Option<String>,
}

impl PeerStateWrite {
    /// The row as the store will hold it.
    pub(crate) fn to_row(&self) -> super::PeerStateRow {
        super::PeerStateRow {
            mesh_id: self.mesh_id.clone(),
            member_id: self.member_id.clone(),
            groups: self.groups.clone(),
            profile: self.profile.clone(),
            visible: self.visible,
            last_summary: self.last_summary.clone(),
            last_display_name: Some(self.last_display_name.clone()),
            stats: self.stats.clone(),
            tags: self.tags.clone(),
            last_seen_at: self.at,
        }
    }
}

/// An operation for the writer.
#[derive(Debug)]
pub(crate) enum WriteOp {
    /// Store a message.
    Insert {
        row: Box<NewMessage>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Messages written to their recipient's socket (clients that do not acknowledge).
    MarkDelivered { ids: Vec<String>, at: i64 },
    /// Give back these rows if `conn` still holds their lease (never written to it).
    Release { conn: i64, ids: Vec<String> },
    /// Give back every undelivered row addressed to `keys` still leased to `conn`
    /// (the connection ended). Runs after the claims of its batch, so it also covers a
    /// claim the connection sent but never received the answer to.
    ReleaseConn {
        mesh_id: String,
        keys: [String; 2],
        conn: i64,
    },
    /// Shorten leases to `until` (rows written to a client that acknowledges).
    Lease { ids: Vec<String>, until: i64 },
    /// `client_ack`.
    Ack {
        mesh_id: String,
        keys: [String; 2],
        message_id: Option<String>,
        client_message_id: Option<String>,
        at: i64,
    },
    /// Lease up to `limit` undelivered messages for a recipient.
    Claim {
        spec: Box<ClaimSpec>,
        reply: oneshot::Sender<Result<Claimed, StoreError>>,
    },
    /// Persist a session key binding the hub already made (first presenter wins).
    BindSession {
        mesh_id: String,
        pubkey: String,
        member_id: String,
        now: i64,
    },
    /// Upsert a shared-state key.
    SetState {
        mesh_id: String,
        key: String,
        value: Arc<str>,
        updated_by: String,
        /// The writer's member id (its quota holds the value).
        member_id: Option<String>,
        at: i64,
    },
    /// Save a member's session state.
    SavePeerState(Box<PeerStateWrite>),
    /// Store a topic post (`features::topics`).
    TopicPost {
        post: Box<TopicPostWrite>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Chained, signed audit entries (`features::audit`): written in the transaction of
    /// the batch they arrive in, so the audit log takes no commit, and no turn at the
    /// store's write lock, of its own.
    Audit {
        rows: Vec<AuditRow>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// `/join`.
    Join(Box<JoinOp>),
    /// Delete expired and old delivered messages.
    Sweep {
        delivered_before: i64,
        now: i64,
        reply: oneshot::Sender<Result<Swept, StoreError>>,
    },
    /// Clear every lease (at startup, when no connection can hold one).
    ClearLeases,
    /// This broker refused a peer's outbox position: remembered (and the cursor moved)
    /// so a resend is refused again.
    InboxRejected {
        peer: String,
        seq: i64,
        reason: &'static str,
        at: i64,
    },
    /// A peer broker stored every outbox row up to `upto` for it.
    Forwarded { peer: String, upto: i64, at: i64 },
    /// A peer broker refused outbox row `seq` (or, with `seq` `None`, every pending row
    /// of `mesh_id` for that peer is dropped because the mesh is no longer shared).
    ForwardRefused {
        peer: String,
        seq: Option<i64>,
        mesh_id: Option<String>,
        reason: &'static str,
        at: i64,
    },
    /// Answered once everything queued before it is committed.
    Flush(oneshot::Sender<()>),
}

/// Creates the writer's channel. Run the returned [`Writer`] on the daemon's tracker;
/// operations reach it through `delivery::router`, which owns the sending side.
pub(crate) fn channel(
    conn: WriterConn,
    reopen: (Backend, Durability),
    gate: Option<super::WriteGate>,
    capacity: usize,
    max_batch: usize,
    metrics: Arc<Metrics>,
) -> (mpsc::Sender<WriteOp>, Writer) {
    let (tx, rx) = mpsc::channel(capacity);
    (
        tx,
        Writer {
            conn,
            reopen,
            gate,
            rx,
            max_batch,
            metrics,
        },
    )
}

/// The writer, until it runs.
#[derive(Debug)]
pub(crate) struct Writer {
    conn: WriterConn,
    /// To reconnect after the database dropped the writer's connection.
    reopen: (Backend, Durability),
    /// SQLite: taken per batch (see [`super::WriteGate`]).
    gate: Option<super::WriteGate>,
    rx: mpsc::Receiver<WriteOp>,
    max_batch: usize,
    metrics: Arc<Metrics>,
}

/// Rows removed by a sweep.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Swept {
    /// Delivered messages past their retention.
    pub(crate) delivered: u64,
    /// Undelivered messages past their TTL.
    pub(crate) expired: u64,
}

/// Where an operation's answer goes.
type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// Replies to send once the transaction commits.
#[derive(Default)]
struct Done {
    unit: Vec<Reply<()>>,
    claims: Vec<(Reply<Claimed>, Claimed)>,
    joins: Vec<(
        oneshot::Sender<Result<JoinOutcome, StoreError>>,
        JoinOutcome,
    )>,
    sweeps: Vec<(Reply<Swept>, Swept)>,
    flushes: Vec<oneshot::Sender<()>>,
}

impl Done {
    fn complete(self) {
        for r in self.unit {
            let _ = r.send(Ok(()));
        }
        for (r, v) in self.claims {
            let _ = r.send(Ok(v));
        }
        for (r, v) in self.joins {
            let _ = r.send(Ok(v));
        }
        for (r, v) in self.sweeps {
            let _ = r.send(Ok(v));
        }
        for r in self.flushes {
            let _ = r.send(());
        }
    }
}

impl Writer {
    /// Runs until every sender is dropped (the router stops first, see
    /// `delivery::router`), commits what is still queued, and closes its connection.
    pub(crate) async fn run(self) {
        let Self {
            conn,
            reopen,
            gate,
            rx,
            max_batch,
            metrics,
        } = self;
        Executor {
            conn,
            reopen,
            gate,
            last_reopen: None,
            rx,
            max_batch,
            metrics,
        }
        .run()
        .await;
    }
}

/// The executor stage: batches and commits.
#[derive(Debug)]
struct Executor {
    conn: WriterConn,
    reopen: (Backend, Durability),
    gate: Option<super::WriteGate>,
    /// When the connection was last replaced (see `recover`).
    last_reopen: Option<std::time::Instant>,
    rx: mpsc::Receiver<WriteOp>,
    max_batch: usize,
    metrics: Arc<Metrics>,
}

impl Executor {
    async fn run(&mut self) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while self.rx.recv_many(&mut batch, self.max_batch).await > 0 {
            let started = crate::time::std_instant();
            let n = batch.len();
            self.run_batch(batch.drain(..)).await;
            self.metrics
                .record_commit(n, crate::time::since_std(started));
        }
        let conn = std::mem::replace(&mut self.conn, WriterConn::Closed);
        let result = match conn {
            WriterConn::Sqlite(c) => c.close().await,
            WriterConn::Postgres(c) => c.close().await,
            WriterConn::Closed => Ok(()),
        };
        if let Err(e) = result {
            warn!(cause = %e, "closing the writer connection");
        }
        debug!("store writer stopped");
    }

    async fn run_batch(&mut self, ops: impl Iterator<Item = WriteOp>) {
        let mut plan = Plan::new(ops);
        let mut done = Done::default();
        let mut attempt = self.exec(&mut plan, &mut done).await;
        // A connection the database dropped (restart, failover, idle kill), or one left
        // inside a transaction the database already rolled back (disk full), is
        // replaced, and the batch, rolled back with it, runs again.
        if attempt.is_err() && self.recover().await {
            attempt = self.exec(&mut plan, &mut done).await;
        }
        match attempt {
            Ok(()) => {
                self.metrics.writer_healthy.store(true, Ordering::Relaxed);
                done.complete();
            }
            // One operation's own fault (a constraint, a value the database refuses):
            // find it by running the operations alone, so it fails alone.
            Err(e) if plan.len() > 1 && !store_wide(&e) => {
                warn!(cause = %e, ops = plan.len(), "batch failed; retrying its operations one by one");
                for single in plan.split() {
                    let mut single = single;
                    let mut done = Done::default();
                    match self.exec(&mut single, &mut done).await {
                        Ok(()) => {
                            self.metrics.writer_healthy.store(true, Ordering::Relaxed);
                            done.complete();
                        }
                        Err(e) => {
                            if store_wide(&e) {
                                self.metrics.writer_healthy.store(false, Ordering::Relaxed);
                            }
                            self.recover().await;
                            single.fail(&e);
                        }
                    }
                }
            }
            // The store itself is failing (disk full, I/O, locked, unreachable): every
            // operation would fail alike, so the batch fails at once, without a split
            // that would multiply the failures (and their waits).
            Err(e) => {
                if store_wide(&e) {
                    self.metrics.writer_healthy.store(false, Ordering::Relaxed);
                }
                warn!(cause = %e, ops = plan.len(), "batch failed");
                plan.fail(&e);
            }
        }
    }

    /// Makes sure the writer's connection is usable after a failure: alive, and not
    /// inside a transaction (SQLite rolls a transaction back by itself on a full disk or
    /// an I/O error, which sqlx does not notice: its next `BEGIN` would be refused for
    /// good). Otherwise it is replaced by a fresh connection; dropping the old one
    /// releases whatever it held. Returns whether a fresh connection is in place.
    /// Reopening is tried at most once a second, so a store that stays down fails
    /// batches quickly instead of stalling them on connection attempts.
    async fn recover(&mut self) -> bool {
        use sqlx::Connection as _;
        // The ping queues behind the rollback a dropped transaction sent, so the
        // transaction depth read after it is final.
        let usable = match &mut self.conn {
            WriterConn::Sqlite(c) => c.ping().await.is_ok() && !c.is_in_transaction(),
            WriterConn::Postgres(c) => c.ping().await.is_ok() && !c.is_in_transaction(),
            WriterConn::Closed => false,
        };
        if usable {
            return false;
        }
        let now = crate::time::std_instant();
        if self
            .last_reopen
            .is_some_and(|at| now.duration_since(at) < REOPEN_INTERVAL)
        {
            return false;
        }
        self.last_reopen = Some(now);
        match tokio::time::timeout(
            REOPEN_TIMEOUT,
            WriterConn::open(&self.reopen.0, self.reopen.1),
        )
        .await
        {
            Ok(Ok(conn)) => {
                warn!("store writer connection was unusable; replaced it");
                // Opened before the old one closes, so SQLite's shared-memory file
                // stays in place (recreating it needs disk space).
                drop(std::mem::replace(&mut self.conn, conn));
                true
            }
            Ok(Err(e)) => {
                warn!(cause = %e, "store writer connection unusable; reopening failed");
                false
            }
            Err(_) => {
                warn!("store writer connection unusable; reopening timed out");
                false
            }
        }
    }
}

/// Most often the writer tries to replace an unusable connection.
const REOPEN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// How long one reopening may take.
const REOPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether an error concerns the store as a whole (every operation of a batch would
/// fail alike) rather than the operation that met it.
pub(crate) fn store_wide(e: &StoreError) -> bool {
    let StoreError::Db(e) = e else {
        // Closed, Io: the store; Corrupt, Migrate: not a batch's operation either way.
        return !matches!(e, StoreError::Corrupt(_));
    };
    match e {
        sqlx::Error::Database(d) => {
            let Some(code) = d.code() else { return true };
            if let Ok(n) = code.parse::<i64>() {
                // SQLite (extended) result codes: BUSY, LOCKED, NOMEM, READONLY, IOERR,
                // CORRUPT, FULL, CANTOPEN, PROTOCOL, NOTADB.
                matches!(n & 0xff, 5 | 6 | 7 | 8 | 10 | 11 | 13 | 14 | 15 | 26)
            } else {
                // PostgreSQL SQLSTATE classes: connection, insufficient resources (disk
                // full), operator intervention, system error, internal error.
                matches!(code.get(..2), Some("08" | "53" | "57" | "58" | "XX"))
            }
        }
        sqlx::Error::RowNotFound
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::Encode(_) => false,
        _ => true,
    }
}

impl Executor {
    async fn exec(&mut self, plan: &mut Plan, done: &mut Done) -> Result<(), StoreError> {
        let _turn = match &self.gate {
            Some(g) => Some(g.lock().await),
            None => None,
        };
        match &mut self.conn {
            WriterConn::Sqlite(c) => exec_sqlite(c, plan, done).await,
            WriterConn::Postgres(c) => exec_pg(c, plan, done).await,
            WriterConn::Closed => Err(StoreError::Closed),
        }
    }
}

/// An insert with its reply.
type PlannedInsert = (Box<NewMessage>, Reply<()>);

/// A batch sorted by kind (see the module docs).
#[derive(Default)]
struct Plan {
    inserts: Vec<PlannedInsert>,
    leases: Vec<(i64, Vec<String>)>,
    releases: Vec<(i64, Vec<String>)>,
    release_conns: Vec<(String, [String; 2], i64)>,
    delivered: Vec<(String, i64)>,
    misc: Vec<WriteOp>,
    claims: Vec<(Box<ClaimSpec>, Reply<Claimed>)>,
}

impl Plan {
    fn new(ops: impl Iterator<Item = WriteOp>) -> Self {
        let mut p = Self::default();
        // Under load a hot-path message is usually written to its recipient's socket
        // before its insert runs: the delivery mark then folds into the insert, and the
        // row is written once instead of twice.
        let mut pending_inserts: std::collections::HashMap<String, usize> =
            std::collections::HashMap::new();
        for op in ops {
            match op {
                WriteOp::Insert { row, reply, .. } => {
                    if row.delivered_at.is_none() {
                        pending_inserts.insert(row.id.clone(), p.inserts.len());
                    }
                    p.inserts.push((row, reply));
                }
                WriteOp::Release { conn, ids } => p.releases.push((conn, ids)),
                WriteOp::Lease { ids, until } => p.leases.push((until, ids)),
                WriteOp::ReleaseConn {
                    mesh_id,
                    keys,
                    conn,
                } => p.release_conns.push((mesh_id, keys, conn)),
                WriteOp::MarkDelivered { ids, at } => {
                    for id in ids {
                        match pending_inserts.remove(&id) {
                            Some(i) => {
                                let row = &mut p.inserts[i].0;
                                row.delivered_at = Some(at);
                                row.lease_conn = None;
                                row.lease_until = None;
                                row.nonce.clear();
                                row.ciphertext.clear();
                            }
                            None => p.delivered.push((id, at)),
                        }
                    }
                }
                WriteOp::Claim { spec, reply } => p.claims.push((spec, reply)),
                other => p.misc.push(other),
            }
        }
        p
    }

    fn len(&self) -> usize {
        self.inserts.len()
            + self.leases.len()
            + self.releases.len()
            + self.release_conns.len()
            + usize::from(!self.delivered.is_empty())
            + self.misc.len()
            + self.claims.len()
    }

    /// One plan per operation, for isolating a failure.
    fn split(self) -> Vec<Self> {
        let mut out = Vec::new();
        for i in self.inserts {
            out.push(Self {
                inserts: vec![i],
                ..Self::default()
            });
        }
        if !self.leases.is_empty() || !self.releases.is_empty() || !self.release_conns.is_empty() {
            out.push(Self {
                leases: self.leases,
                releases: self.releases,
                release_conns: self.release_conns,
                ..Self::default()
            });
        }
        if !self.delivered.is_empty() {
            out.push(Self {
                delivered: self.delivered,
                ..Self::default()
            });
        }
        for m in self.misc {
            out.push(Self {
                misc: vec![m],
                ..Self::default()
            });
        }
        for c in self.claims {
            out.push(Self {
                claims: vec![c],
                ..Self::default()
            });
        }
        out
    }

    /// Answers every operation with the failure.
    fn fail(self, e: &StoreError) {
        error!(cause = %e, "store write failed");
        let err = || StoreError::Corrupt(format!("write failed: {e}"));
        for (_, reply) in self.inserts {
            let _ = reply.send(Err(err()));
        }
        for m in self.misc {
            match m {
                WriteOp::Join(j) => {
                    let _ = j.reply.send(Err(err()));
                }
                WriteOp::Sweep { reply, .. } => {
                    let _ = reply.send(Err(err()));
                }
                WriteOp::TopicPost { reply, .. } | WriteOp::Audit { reply, .. } => {
                    let _ = reply.send(Err(err()));
                }
                _ => {}
            }
        }
        for (_, reply) in self.claims {
            let _ = reply.send(Err(err()));
        }
    }
}

/// How a backend spells bind parameters in the generated multi-row statements.
#[derive(Clone, Copy)]
pub(crate) enum Params {
    /// `?`: SQLite. Its `$N` names are looked up linearly per bind, which makes binding
    /// a statement with n parameters O(n²); anonymous parameters bind in order.
    Anonymous,
    /// `$1, $2, …`: PostgreSQL.
    Numbered,
}

impl Params {
    fn push(self, sql: &mut String, n: usize) {
        match self {
            Self::Anonymous => sql.push('?'),
            Self::Numbered => {
                sql.push('$');
                sql.push_str(&n.to_string());
            }
        }
    }
}

/// `head (p, p, …), (p, …)…` for `rows` rows of `cols` parameters.
pub(crate) fn values_sql(style: Params, head: &str, cols: usize, rows: usize) -> String {
    let mut sql = String::with_capacity(head.len() + rows * cols * 5);
    sql.push_str(head);
    let mut n = 1;
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..cols {
            if c > 0 {
                sql.push_str(", ");
            }
            style.push(&mut sql, n);
            n += 1;
        }
        sql.push(')');
    }
    sql
}

/// `head` (whose own parameters number `first - 1`) followed by `(p, …)` of `count`.
fn in_list_sql(style: Params, head: &str, first: usize, count: usize) -> String {
    let mut sql = String::from(head);
    sql.push('(');
    for i in 0..count {
        if i > 0 {
            sql.push_str(", ");
        }
        style.push(&mut sql, first + i);
    }
    sql.push(')');
    sql
}

/// Chunk sizes for multi-row statements: few distinct shapes, few round trips.
const CHUNKS: [usize; 4] = [64, 16, 4, 1];

fn chunked<T>(items: &[T]) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let size = CHUNKS.into_iter().find(|c| *c <= rest.len()).unwrap_or(1);
        let (head, tail) = rest.split_at(size);
        rest = tail;
        Some(head)
    })
}

/// The generated statements of one backend, per chunk size, so each distinct statement
/// is prepared once.
struct SqlCache {
    insert: Vec<Arc<str>>,
    delivered: Vec<Arc<str>>,
    release: Vec<Arc<str>>,
    lease: Vec<Arc<str>>,
    audit: Vec<Arc<str>>,
}

impl SqlCache {
    fn build(style: Params) -> Self {
        let sizes = 0..=CHUNKS[0];
        let p = |n: usize| {
            let mut s = String::new();
            style.push(&mut s, n);
            s
        };
        let list = |head: String, first: usize| -> Vec<Arc<str>> {
            sizes
                .clone()
                .map(|n| Arc::from(in_list_sql(style, &head, first, n)))
                .collect()
        };
        Self {
            insert: sizes
                .clone()
                .map(|n| {
                    // A message id already stored is a message already delivered (a peer
                    // resending what this store took): skipping it keeps the rest of the
                    // batch, and the peer's de-duplication cursor with it, moving.
                    let mut sql = values_sql(
                        style,
                        "INSERT INTO message (id, mesh_id, sender_member_id, sender_pubkey, sender_member_pubkey, \
                         sender_name, target_spec, target_key, priority, nonce, ciphertext, subtype, \
                         client_message_id, created_at, expires_at, delivered_at, lease_conn, lease_until, forward_to, forward_seq, tags, bridged) VALUES ",
                        MESSAGE_COLUMNS,
                        n,
                    );
                    sql.push_str(" ON CONFLICT (id) DO NOTHING");
                    Arc::from(sql)
                })
                .collect(),
            delivered: list(
                format!(
                    "UPDATE message SET delivered_at = {}, lease_conn = NULL, lease_until = NULL, \
                     nonce = '', ciphertext = '' WHERE delivered_at IS NULL AND id IN ",
                    p(1)
                ),
                2,
            ),
            release: list(
                format!(
                    "UPDATE message SET lease_conn = NULL, lease_until = NULL \
                     WHERE delivered_at IS NULL AND lease_conn = {} AND id IN ",
                    p(1)
                ),
                2,
            ),
            lease: list(
                format!("UPDATE message SET lease_until = {} WHERE delivered_at IS NULL AND id IN ", p(1)),
                2,
            ),
            audit: sizes
                .clone()
                .map(|n| {
                    Arc::from(values_sql(
                        style,
                        AUDIT_INSERT_HEAD,
                        10,
                        n,
                    ))
                })
                .collect(),
        }
    }
}

fn sqlite_sql() -> &'static SqlCache {
    static CACHE: OnceLock<SqlCache> = OnceLock::new();
    CACHE.get_or_init(|| SqlCache::build(Params::Anonymous))
}

fn pg_sql() -> &'static SqlCache {
    static CACHE: OnceLock<SqlCache> = OnceLock::new();
    CACHE.get_or_init(|| SqlCache::build(Params::Numbered))
}

const CLAIM_SQL: &str = "UPDATE message SET lease_conn = $1, lease_until = $2 \
     WHERE seq IN (SELECT seq FROM message \
        WHERE mesh_id = $3 AND target_key IN ($4, $5) AND delivered_at IS NULL \
          AND (lease_until IS NULL OR lease_until <= $6) AND priority <= $7 AND expires_at > $6 \
        ORDER BY seq LIMIT +$8) \
     RETURNING seq, id, sender_pubkey, sender_member_pubkey, sender_member_id, sender_name, priority, \
               nonce, ciphertext, subtype, client_message_id, created_at, tags, bridged, target_spec";

const NEXT_LEASE_SQL: &str = "SELECT MIN(lease_until) FROM message \
     WHERE mesh_id = $1 AND target_key IN ($2, $3) AND delivered_at IS NULL \
       AND lease_until > $4 AND lease_until < $5 AND expires_at > $4";

const ACK_SQL: &str = "UPDATE message SET delivered_at = $1, lease_conn = NULL, lease_until = NULL, nonce = '', ciphertext = '' \
     WHERE mesh_id = $2 AND target_key IN ($3, $4) AND delivered_at IS NULL \
       AND (id = $5 OR client_message_id = $6)";

const BIND_SQL: &str = "INSERT INTO session_key (mesh_id, pubkey, member_id, first_seen, last_seen) \
     VALUES ($1, $2, $3, $4, $4) \
     ON CONFLICT (mesh_id, pubkey) DO UPDATE SET last_seen = excluded.last_seen \
       WHERE session_key.member_id = excluded.member_id \
     RETURNING member_id";

const SET_STATE_SQL: &str = "INSERT INTO state (mesh_id, key, value, updated_by, updated_at, updated_by_member) VALUES ($1, $2, $3, $4, $5, $6) \
     ON CONFLICT (mesh_id, key) DO UPDATE SET value = excluded.value, updated_by = excluded.updated_by, \
       updated_at = excluded.updated_at, updated_by_member = excluded.updated_by_member";

const TOPIC_POST_SQL: &str = "INSERT INTO topic_message (id, topic_id, mesh_id, sender_member_id, sender_member_pubkey, \
       sender_session_pubkey, sender_name, nonce, ciphertext, body_version, reply_to_id, created_at, origin_broker) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, (SELECT id FROM topic_message WHERE id = $11 AND topic_id = $2), $12, $13) \
     ON CONFLICT (id) DO NOTHING";

const NOTIFICATION_SQL: &str = "INSERT INTO notification (id, mesh_id, topic_id, message_id, recipient_member_id, \
       sender_member_id, kind, created_at, read_at) VALUES ($1, $2, $3, $4, $5, $6, 'mention', $7, NULL) \
     ON CONFLICT (message_id, recipient_member_id) DO NOTHING";

const PEER_STATE_SQL: &str = "INSERT INTO peer_state (mesh_id, member_id, groups, profile, visible, last_summary, \
       last_display_name, stats, last_seen_at, created_at, updated_at, tags) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $9, $10) \
     ON CONFLICT (mesh_id, member_id) DO UPDATE SET groups = excluded.groups, profile = excluded.profile, tags = excluded.tags, \
       visible = excluded.visible, last_summary = excluded.last_summary, \
       last_display_name = excluded.last_display_name, stats = excluded.stats, \
       last_seen_at = excluded.last_seen_at, updated_at = excluded.updated_at";

const REFUSAL_SQL: &str = "INSERT INTO message_refusal (message_id, mesh_id, broker, direction, reason, at) \
     VALUES ($1, $2, $3, 'export', $4, $5) ON CONFLICT (message_id, broker, direction) DO NOTHING";

const JOIN_INVITE_SQL: &str = "SELECT id, mesh_id, role, max_uses, used_count, expires_at, revoked_at FROM invite WHERE token = $1";
const JOIN_MEMBER_SQL: &str =
    "SELECT id, revoked_at FROM member WHERE mesh_id = $1 AND pubkey = $2";
const JOIN_SESSION_KEY_SQL: &str =
    "SELECT COUNT(*) FROM session_key WHERE mesh_id = $1 AND pubkey = $2";
const JOIN_USE_SQL: &str =
    "UPDATE invite SET used_count = used_count + 1 WHERE id = $1 AND used_count < max_uses";
const JOIN_INSERT_SQL: &str = "INSERT INTO member (id, mesh_id, pubkey, display_name, role, joined_at, revoked_at, invite_id) \
     VALUES ($1, $2, $3, $4, $5, $6, NULL, $7)";

/// Rows removed per sweep statement: a sweep shares the writer with live traffic, so
/// it works in bounded steps (old rows sit at the low end of `seq`, where the scan starts).
pub(crate) const SWEEP_CHUNK: u64 = 5_000;
const SWEEP_DELIVERED_SQL: &str = "DELETE FROM message WHERE seq IN (SELECT seq FROM message \
     WHERE delivered_at IS NOT NULL AND delivered_at < $1 ORDER BY seq LIMIT 5000)";
const SWEEP_EXPIRED_SQL: &str = "DELETE FROM message WHERE seq IN (SELECT seq FROM message \
     WHERE delivered_at IS NULL AND expires_at <= $1 ORDER BY seq LIMIT 5000)";
/// Policy refusals go with the delivered messages they describe.
const SWEEP_REFUSALS_SQL: &str = "DELETE FROM message_refusal WHERE (message_id, broker, direction) IN \
     (SELECT message_id, broker, direction FROM message_refusal WHERE at < $1 ORDER BY at LIMIT 5000)";
const FED_INBOX_SQL: &str = "INSERT INTO fed_inbox (peer, high_seq) VALUES ($1, $2) \
     ON CONFLICT (peer) DO UPDATE SET high_seq = CASE WHEN excluded.high_seq > fed_inbox.high_seq \
       THEN excluded.high_seq ELSE fed_inbox.high_seq END";
const FED_OUTSEQ_SQL: &str = "INSERT INTO fed_outseq (peer, last_seq) VALUES ($1, $2) \
     ON CONFLICT (peer) DO UPDATE SET last_seq = CASE WHEN excluded.last_seq > fed_outseq.last_seq \
       THEN excluded.last_seq ELSE fed_outseq.last_seq END";
/// Read once when the writer starts (see `delivery::router::OutSeqs`).
pub(crate) const OUTSEQS_SQL: &str = "SELECT peer, last_seq FROM fed_outseq";
const INBOX_REJECT_SQL: &str = "INSERT INTO fed_inbox_reject (peer, seq, reason, at) VALUES ($1, $2, $3, $4) \
     ON CONFLICT (peer, seq) DO NOTHING";
const FORWARDED_SQL: &str = "UPDATE message SET forwarded_at = $1, delivered_at = $1, nonce = '', ciphertext = '' \
     WHERE forward_to = $2 AND forward_seq <= $3 AND forwarded_at IS NULL";
const FORWARD_REFUSED_SQL: &str = "UPDATE message SET forwarded_at = $1, forward_error = $2, nonce = '', ciphertext = '' \
     WHERE forward_to = $3 AND forward_seq = $4 AND forwarded_at IS NULL";
const FORWARD_DROP_MESH_SQL: &str = "UPDATE message SET forwarded_at = $1, forward_error = $2, nonce = '', ciphertext = '' \
     WHERE forward_to = $3 AND mesh_id = $4 AND forwarded_at IS NULL";
const RELEASE_CONN_SQL: &str = "UPDATE message SET lease_conn = NULL, lease_until = NULL \
     WHERE lease_conn = $1 AND mesh_id = $2 AND target_key IN ($3, $4) AND delivered_at IS NULL";
const CLEAR_LEASES_SQL: &str = "UPDATE message SET lease_conn = NULL, lease_until = NULL \
     WHERE delivered_at IS NULL AND lease_conn IS NOT NULL";

#[derive(sqlx::FromRow)]
struct JoinInvite {
    id: String,
    mesh_id: String,
    role: String,
    max_uses: i64,
    used_count: i64,
    expires_at: i64,
    revoked_at: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct JoinMember {
    id: String,
    revoked_at: Option<i64>,
}

/// Expands the batch executor for one backend (the SQL is shared; the types differ).
macro_rules! executor {
    ($name:ident, $conn:ty, $begin:expr, $sql:expr) => {
        async fn $name(
            conn: &mut $conn,
            plan: &mut Plan,
            done: &mut Done,
        ) -> Result<(), StoreError> {
            let mut tx = $begin(conn).await?;
            let cache = $sql();

            // 1. inserts, multi-row
            let rows: Vec<&NewMessage> = plan.inserts.iter().map(|(r, _)| &**r).collect();
            for chunk in chunked(&rows) {
                let mut q = sqlx::query(AssertSqlSafe(cache.insert[chunk.len()].clone()));
                for r in chunk {
                    q = q
                        .bind(&r.id)
                        .bind(&r.mesh_id)
                        .bind(&r.sender_member_id)
                        .bind(&r.sender_pubkey)
                        .bind(&r.sender_member_pubkey)
                        .bind(&r.sender_name)
                        .bind(&r.target_spec)
                        .bind(&r.target_key)
                        .bind(r.priority)
                        .bind(&r.nonce)
                        .bind(&r.ciphertext)
                        .bind(&r.subtype)
                        .bind(&r.client_message_id)
                        .bind(r.created_at)
                        .bind(r.expires_at)
                        .bind(r.delivered_at)
                        .bind(r.lease_conn)
                        .bind(r.lease_until)
                        .bind(&r.forward_to)
                        .bind(r.forward_seq)
                        .bind(super::tags_to_column(&r.tags))
                        .bind(&r.bridged);
                }
                q.execute(&mut *tx).await?;
            }
            for r in rows.iter().filter(|r| !r.refusals.is_empty()) {
                for (broker, reason) in &r.refusals {
                    sqlx::query(REFUSAL_SQL)
                        .bind(&r.id)
                        .bind(&r.mesh_id)
                        .bind(broker)
                        .bind(reason)
                        .bind(r.created_at)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            // Messages from peer brokers: their de-duplication cursor moves with them.
            let mut cursors: Vec<(&str, i64)> = Vec::new();
            for (peer, seq) in rows.iter().filter_map(|r| r.inbox.as_ref()) {
                match cursors.iter_mut().find(|(p, _)| *p == peer.as_str()) {
                    Some(c) => c.1 = c.1.max(*seq),
                    None => cursors.push((peer, *seq)),
                }
            }
            for (peer, seq) in cursors {
                sqlx::query(FED_INBOX_SQL).bind(peer).bind(seq).execute(&mut *tx).await?;
            }
            // Outbox positions handed out: the highest committed one per peer.
            let mut outseqs: Vec<(&str, i64)> = Vec::new();
            for r in &rows {
                let (Some(peer), Some(seq)) = (&r.forward_to, r.forward_seq) else { continue };
                match outseqs.iter_mut().find(|(p, _)| *p == peer.as_str()) {
                    Some(c) => c.1 = c.1.max(seq),
                    None => outseqs.push((peer, seq)),
                }
            }
            for (peer, seq) in outseqs {
                sqlx::query(FED_OUTSEQ_SQL).bind(peer).bind(seq).execute(&mut *tx).await?;
            }

            // 2. lease changes: bounded leases first, so a release in the same batch wins
            for (until, ids) in &plan.leases {
                for chunk in chunked(ids) {
                    let mut q = sqlx::query(AssertSqlSafe(cache.lease[chunk.len()].clone())).bind(until);
                    for id in chunk {
                        q = q.bind(id);
                    }
                    q.execute(&mut *tx).await?;
                }
            }
            for (conn, ids) in &plan.releases {
                for chunk in chunked(ids) {
                    let mut q = sqlx::query(AssertSqlSafe(cache.release[chunk.len()].clone())).bind(conn);
                    for id in chunk {
                        q = q.bind(id);
                    }
                    q.execute(&mut *tx).await?;
                }
            }

            // 3. delivery marks (one timestamp per statement: the batch's latest)
            if let Some(at) = plan.delivered.iter().map(|(_, at)| *at).max() {
                let ids: Vec<&String> = plan.delivered.iter().map(|(id, _)| id).collect();
                for chunk in chunked(&ids) {
                    let mut q =
                        sqlx::query(AssertSqlSafe(cache.delivered[chunk.len()].clone())).bind(at);
                    for id in chunk {
                        q = q.bind(*id);
                    }
                    q.execute(&mut *tx).await?;
                }
            }

            // 4. everything else, in arrival order
            let mut joins = Vec::new();
            let mut sweeps = Vec::new();
            let mut flushes = Vec::new();
            for (i, op) in plan.misc.iter().enumerate() {
                match op {
                    WriteOp::Ack {
                        mesh_id,
                        keys,
                        message_id,
                        client_message_id,
                        at,
                    } => {
                        sqlx::query(ACK_SQL)
                            .bind(at)
                            .bind(mesh_id)
                            .bind(&keys[0])
                            .bind(&keys[1])
                            .bind(message_id)
                            .bind(client_message_id)
                            .execute(&mut *tx)
                            .await?;
                    }
                    WriteOp::BindSession {
                        mesh_id,
                        pubkey,
                        member_id,
                        now,
                        ..
                    } => {
                        let owner: Option<String> = sqlx::query_scalar(BIND_SQL)
                            .bind(mesh_id)
                            .bind(pubkey)
                            .bind(member_id)
                            .bind(now)
                            .fetch_optional(&mut *tx)
                            .await?;
                        if owner.is_none() {
                            // The hub binds keys under its lock before this runs, and it
                            // loaded every stored binding first: this means two daemons
                            // share one database, which meshd does not support.
                            warn!(session.key = %pubkey, "session key already bound to another member in the store");
                        }
                    }
                    WriteOp::InboxRejected {
                        peer,
                        seq,
                        reason,
                        at,
                    } => {
                        sqlx::query(INBOX_REJECT_SQL)
                            .bind(peer)
                            .bind(seq)
                            .bind(*reason)
                            .bind(at)
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query(FED_INBOX_SQL)
                            .bind(peer)
                            .bind(seq)
                            .execute(&mut *tx)
                            .await?;
                    }
                    WriteOp::Forwarded { peer, upto, at } => {
                        sqlx::query(FORWARDED_SQL)
                            .bind(at)
                            .bind(peer)
                            .bind(upto)
                            .execute(&mut *tx)
                            .await?;
                    }
                    WriteOp::ForwardRefused {
                        peer,
                        seq,
                        mesh_id,
                        reason,
                        at,
                    } => {
                        if let Some(seq) = seq {
                            sqlx::query(FORWARD_REFUSED_SQL)
                                .bind(at)
                                .bind(*reason)
                                .bind(peer)
                                .bind(seq)
                                .execute(&mut *tx)
                                .await?;
                        }
                        if let Some(mesh_id) = mesh_id {
                            sqlx::query(FORWARD_DROP_MESH_SQL)
                                .bind(at)
                                .bind(*reason)
                                .bind(peer)
                                .bind(mesh_id)
                                .execute(&mut *tx)
                                .await?;
                        }
                    }
                    WriteOp::Audit { rows, .. } => {
                        for chunk in chunked(rows) {
                            let mut q = sqlx::query(AssertSqlSafe(cache.audit[chunk.len()].clone()));
                            for r in chunk {
                                q = q
                                    .bind(&r.mesh_id)
                                    .bind(r.seq)
                                    .bind(&r.event_type)
                                    .bind(&r.actor_member_id)
                                    .bind(&r.actor)
                                    .bind(&r.payload)
                                    .bind(&r.prev_hash)
                                    .bind(&r.hash)
                                    .bind(&r.sig)
                                    .bind(r.created_at);
                            }
                            q.execute(&mut *tx).await?;
                        }
                    }
                    WriteOp::TopicPost { post: t, .. } => {
                        sqlx::query(TOPIC_POST_SQL)
                            .bind(&t.id)
                            .bind(&t.topic_id)
                            .bind(&t.mesh_id)
                            .bind(&t.sender_member_id)
                            .bind(&t.sender_member_pubkey)
                            .bind(&t.sender_session_pubkey)
                            .bind(&t.sender_name)
                            .bind(&t.nonce)
                            .bind(&t.ciphertext)
                            .bind(t.body_version)
                            .bind(&t.reply_to_id)
                            .bind(t.created_at)
                            .bind(&t.origin_broker)
                            .execute(&mut *tx)
                            .await?;
                        for (id, recipient) in &t.mentions {
                            sqlx::query(NOTIFICATION_SQL)
                                .bind(id)
                                .bind(&t.mesh_id)
                                .bind(&t.topic_id)
                                .bind(&t.id)
                                .bind(recipient)
                                .bind(&t.sender_member_id)
                                .bind(t.created_at)
                                .execute(&mut *tx)
                                .await?;
                        }
                    }
                    WriteOp::SetState {
                        mesh_id,
                        key,
                        value,
                        updated_by,
                        member_id,
                        at,
                    } => {
                        sqlx::query(SET_STATE_SQL)
                            .bind(mesh_id)
                            .bind(key)
                            .bind(&**value)
                            .bind(updated_by)
                            .bind(at)
                            .bind(member_id)
                            .execute(&mut *tx)
                            .await?;
                    }
                    WriteOp::SavePeerState(s) => {
                        sqlx::query(PEER_STATE_SQL)
                            .bind(&s.mesh_id)
                            .bind(&s.member_id)
                            .bind(&s.groups)
                            .bind(&s.profile)
                            .bind(s.visible)
                            .bind(&s.last_summary)
                            .bind(&s.last_display_name)
                            .bind(&s.stats)
                            .bind(s.at)
                            .bind(&s.tags)
                            .execute(&mut *tx)
                            .await?;
                    }
                    WriteOp::Join(j) => {
                        let invite: Option<JoinInvite> = sqlx::query_as(JOIN_INVITE_SQL)
                            .bind(&j.token)
                            .fetch_optional(&mut *tx)
                            .await?;
                        let outcome = match invite {
                            None => JoinOutcome::Refused("invite_not_found"),
                            Some(inv) if inv.mesh_id != j.mesh_id => {
                                JoinOutcome::Refused("invite_mesh_mismatch")
                            }
                            Some(inv) if inv.revoked_at.is_some() => {
                                JoinOutcome::Refused("invite_revoked")
                            }
                            Some(inv) if inv.expires_at <= j.now => {
                                JoinOutcome::Refused("invite_expired")
                            }
                            Some(inv) => {
                                let existing: Option<JoinMember> = sqlx::query_as(JOIN_MEMBER_SQL)
                                    .bind(&j.mesh_id)
                                    .bind(&j.pubkey)
                                    .fetch_optional(&mut *tx)
                                    .await?;
                                match existing {
                                    Some(m) if m.revoked_at.is_some() => {
                                        JoinOutcome::Refused("member_revoked")
                                    }
                                    Some(m) => JoinOutcome::AlreadyMember { member_id: m.id },
                                    None if inv.used_count >= inv.max_uses => {
                                        JoinOutcome::Refused("invite_exhausted")
                                    }
                                    // A key already used as someone's session key would
                                    // lock that session out (a member key cannot be a
                                    // session key) and capture DMs sent to it.
                                    None if sqlx::query_scalar::<_, i64>(JOIN_SESSION_KEY_SQL)
                                        .bind(&j.mesh_id)
                                        .bind(&j.pubkey)
                                        .fetch_one(&mut *tx)
                                        .await?
                                        > 0 =>
                                    {
                                        JoinOutcome::Refused("pubkey_in_use")
                                    }
                                    None => {
                                        let used = sqlx::query(JOIN_USE_SQL)
                                            .bind(&inv.id)
                                            .execute(&mut *tx)
                                            .await?
                                            .rows_affected();
                                        if used == 0 {
                                            JoinOutcome::Refused("invite_exhausted")
                                        } else {
                                            sqlx::query(JOIN_INSERT_SQL)
                                                .bind(&j.new_member_id)
                                                .bind(&j.mesh_id)
                                                .bind(&j.pubkey)
                                                .bind(&j.display_name)
                                                .bind(&inv.role)
                                                .bind(j.now)
                                                .bind(&inv.id)
                                                .execute(&mut *tx)
                                                .await?;
                                            JoinOutcome::Joined {
                                                member_id: j.new_member_id.clone(),
                                                role: inv.role,
                                            }
                                        }
                                    }
                                }
                            }
                        };
                        joins.push((i, outcome));
                    }
                    WriteOp::Sweep {
                        delivered_before,
                        now,
                        ..
                    } => {
                        let old = sqlx::query(SWEEP_DELIVERED_SQL)
                            .bind(delivered_before)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                        let expired = sqlx::query(SWEEP_EXPIRED_SQL)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                        sqlx::query(SWEEP_REFUSALS_SQL)
                            .bind(delivered_before)
                            .execute(&mut *tx)
                            .await?;
                        sweeps.push((
                            i,
                            Swept {
                                delivered: old,
                                expired,
                            },
                        ));
                    }
                    WriteOp::ClearLeases => {
                        sqlx::query(CLEAR_LEASES_SQL).execute(&mut *tx).await?;
                    }
                    WriteOp::Flush(_) => flushes.push(i),
                    WriteOp::Insert { .. }
                    | WriteOp::MarkDelivered { .. }
                    | WriteOp::Release { .. }
                    | WriteOp::Lease { .. }
                    | WriteOp::ReleaseConn { .. }
                    | WriteOp::Claim { .. } => {}
                }
            }

            // 5. claims: each sees every insert above
            let mut claims = Vec::with_capacity(plan.claims.len());
            for (spec, _) in &plan.claims {
                let mut rows: Vec<ClaimedRow> = sqlx::query_as(CLAIM_SQL)
                    .bind(spec.conn)
                    .bind(spec.lease_until)
                    .bind(&spec.mesh_id)
                    .bind(&spec.member_key)
                    .bind(&spec.session_key)
                    .bind(spec.now)
                    .bind(spec.max_priority)
                    .bind(spec.limit)
                    .fetch_all(&mut *tx)
                    .await?;
                rows.sort_by_key(|r| r.seq);
                // Only clients that acknowledge hold finite leases worth waiting for.
                let next_lease_expiry = if (rows.len() as i64) < spec.limit
                    && spec.lease_until != i64::MAX
                {
                    sqlx::query_scalar::<_, Option<i64>>(NEXT_LEASE_SQL)
                        .bind(&spec.mesh_id)
                        .bind(&spec.member_key)
                        .bind(&spec.session_key)
                        .bind(spec.now)
                        .bind(i64::MAX)
                        .fetch_one(&mut *tx)
                        .await?
                } else {
                    None
                };
                claims.push(Claimed {
                    stamp: spec.stamp,
                    rows,
                    next_lease_expiry,
                });
            }

            // 6. connections that ended: after the claims, so a claim one of them sent
            //    just before closing is given back too
            for (mesh_id, keys, conn) in &plan.release_conns {
                sqlx::query(RELEASE_CONN_SQL)
                    .bind(conn)
                    .bind(mesh_id)
                    .bind(&keys[0])
                    .bind(&keys[1])
                    .execute(&mut *tx)
                    .await?;
            }

            tx.commit().await?;

            // Success: move the replies out of the plan.
            for (_, reply) in plan.inserts.drain(..) {
                done.unit.push(reply);
            }
            for ((_, reply), claimed) in plan.claims.drain(..).zip(claims) {
                done.claims.push((reply, claimed));
            }
            let mut misc: Vec<Option<WriteOp>> = plan.misc.drain(..).map(Some).collect();
            for (i, v) in joins {
                if let Some(WriteOp::Join(j)) = misc[i].take() {
                    done.joins.push((j.reply, v));
                }
            }
            for (i, v) in sweeps {
                if let Some(WriteOp::Sweep { reply, .. }) = misc[i].take() {
                    done.sweeps.push((reply, v));
                }
            }
            for i in flushes {
                if let Some(WriteOp::Flush(reply)) = misc[i].take() {
                    done.flushes.push(reply);
                }
            }
            for op in &mut misc {
                if matches!(op, Some(WriteOp::TopicPost { .. } | WriteOp::Audit { .. }))
                    && let Some(WriteOp::TopicPost { reply, .. } | WriteOp::Audit { reply, .. }) =
                        op.take()
                {
                    done.unit.push(reply);
                }
            }
            plan.leases.clear();
            plan.releases.clear();
            plan.release_conns.clear();
            plan.delivered.clear();
            Ok(())
        }
    };
}

async fn begin_sqlite(
    c: &mut sqlx::SqliteConnection,
) -> Result<sqlx::Transaction<'_, sqlx::Sqlite>, sqlx::Error> {
    // IMMEDIATE takes the write lock up front, so a concurrent admin command makes us
    // wait (busy timeout) instead of failing a read-then-write upgrade.
    c.begin_with("BEGIN IMMEDIATE").await
}

async fn begin_pg(
    c: &mut sqlx::PgConnection,
) -> Result<sqlx::Transaction<'_, sqlx::Postgres>, sqlx::Error> {
    c.begin().await
}

executor!(
    exec_sqlite,
    sqlx::SqliteConnection,
    begin_sqlite,
    sqlite_sql
);
executor!(exec_pg, sqlx::PgConnection, begin_pg, pg_sql);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_shapes() {
        assert_eq!(
            values_sql(Params::Numbered, "V ", 2, 2),
            "V ($1, $2), ($3, $4)"
        );
        assert_eq!(
            values_sql(Params::Anonymous, "V ", 2, 2),
            "V (?, ?), (?, ?)"
        );
        assert_eq!(
            in_list_sql(Params::Numbered, "X IN ", 2, 3),
            "X IN ($2, $3, $4)"
        );
        assert_eq!(in_list_sql(Params::Anonymous, "X IN ", 2, 2), "X IN (?, ?)");
        let sqlite = SqlCache::build(Params::Anonymous);
        assert!(sqlite.delivered[2].starts_with("UPDATE message SET delivered_at = ?,"));
        assert!(!sqlite.insert[64].contains('$'));
        let sizes: Vec<usize> = chunked(&[0u8; 90]).map(<[u8]>::len).collect();
        assert_eq!(sizes, vec![64, 16, 4, 4, 1, 1]);
    }
}
