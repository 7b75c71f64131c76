//! Prometheus metrics, rendered by hand in the text exposition format (0.0.4).
//!
//! A fixed set of atomics: no registry, no locks, nothing on the hot path beyond a
//! relaxed increment. Label values are closed sets known at compile time.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// A counter with one label drawn from a fixed set.
#[derive(Debug)]
pub(crate) struct Labeled {
    label: &'static str,
    values: &'static [&'static str],
    counts: Vec<AtomicU64>,
}

impl Labeled {
    fn new(label: &'static str, values: &'static [&'static str]) -> Self {
        Self {
            label,
            values,
            counts: values.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Adds one for `value`; unknown values count as `other`.
    pub(crate) fn inc(&self, value: &str) {
        self.inc_by(value, 1);
    }

    /// Adds `n` for `value`.
    pub(crate) fn inc_by(&self, value: &str, n: u64) {
        let i = self
            .values
            .iter()
            .position(|v| *v == value)
            .unwrap_or(self.values.len() - 1);
        self.counts[i].fetch_add(n, Ordering::Relaxed);
    }

    /// Current count for `value`.
    #[cfg(test)]
    pub(crate) fn get(&self, value: &str) -> u64 {
        self.values
            .iter()
            .position(|v| *v == value)
            .map_or(0, |i| self.counts[i].load(Ordering::Relaxed))
    }
}

const FED_REFUSALS: &[&str] = &[
    "forged_sender",
    "presence_limit",
    "not_shared",
    "unknown_recipient",
    "revoked",
    "invalid",
    "quota_exceeded",
    "policy_denied",
    "other",
];
/// Refusals by link policy: direction and rule (see `fed::policy`).
pub(crate) const FED_POLICY_REFUSALS: &[&str] = &[
    "export_kind",
    "export_tag_denied",
    "export_tag_not_allowed",
    "export_field",
    "import_kind",
    "import_tag_denied",
    "import_tag_not_allowed",
    "import_field",
    "other",
];
const HTTP_REFUSALS: &[&str] = &[
    "http_connections",
    "address_pending",
    "body_timeout",
    "upload_busy",
    "upload_timeout",
    "hook_rate_limited",
    "webhook_rate_limited",
    "hook_table_full",
    "hook_invalid",
    "other",
];
const LINK_RESETS: &[&str] = &[
    "unregistered",
    "control_full",
    "peer_ready_full",
    "members_full",
    "presence_full",
    "other",
];
const PRIORITIES: &[&str] = &["now", "next", "low", "other"];

/// How `execute_code` runs ended (or why they did not start).
const EXEC_OUTCOMES: &[&str] = &[
    "ok",
    "wall_time",
    "cpu_time",
    "file_size",
    "not_enabled",
    "forbidden",
    "rate_limited",
    "busy",
    "sandbox_error",
    "other",
];
const CONN_REJECTS: &[&str] = &[
    "capacity",
    "too_many_connections",
    "timestamp_skew",
    "malformed",
    "bad_signature",
    "replayed",
    "unauthorized",
    "revoked",
    "bad_session_pubkey",
    "bad_parent_pubkey",
    "attestation_mismatch",
    "expired",
    "ttl_too_long",
    "parent_member_id_mismatch",
    "hello_timeout",
    "store_error",
    "other",
];
const MSG_REJECTS: &[&str] = &[
    "unknown_recipient",
    "revoked_recipient",
    "unroutable_target",
    "invalid_priority",
    "invalid_target",
    "too_large",
    "rate_limited",
    "quota_exceeded",
    "invalid_tags",
    "policy_denied",
    "store_error",
    "other",
];
const FRAME_DROPS: &[&str] = &[
    "malformed",
    "unknown",
    "invalid",
    "unsupported",
    "oversized",
    "binary",
    "state_too_large",
    "reply_trimmed",
    "signal_rate",
    "signal_refused",
    "dashboard_full",
    "other",
];
const CLOSES: &[&str] = &[
    "client",
    "slow_consumer",
    "replaced",
    "revoked",
    "shutdown",
    "kicked",
    "disconnected",
    "idle_timeout",
    "error",
    "other",
];

/// Every metric meshd exports.
#[derive(Debug)]
pub(crate) struct Metrics {
    pub(crate) connections_total: AtomicU64,
    pub(crate) connections_active: AtomicI64,
    pub(crate) sessions_active: AtomicI64,
    pub(crate) connections_rejected: Labeled,
    pub(crate) connections_closed: Labeled,
    pub(crate) frames_received: AtomicU64,
    pub(crate) frames_sent: AtomicU64,
    pub(crate) frames_dropped: Labeled,
    pub(crate) messages_routed: Labeled,
    pub(crate) exec_runs: Labeled,
    pub(crate) messages_rejected: Labeled,
    pub(crate) multicast_deliveries: AtomicU64,
    pub(crate) direct_hot: AtomicU64,
    pub(crate) direct_drained: AtomicU64,
    pub(crate) fanout_dropped: AtomicU64,
    pub(crate) queue_depth: AtomicI64,
    /// The pool answers pings (housekeeping).
    pub(crate) db_reachable: AtomicBool,
    /// The writer's last batch committed.
    pub(crate) writer_healthy: AtomicBool,
    pub(crate) joins: Labeled,
    /// HTTP requests refused by a limit, by reason.
    pub(crate) http_refused: Labeled,
    /// Federation links currently up.
    pub(crate) fed_links_up: AtomicI64,
    /// Links torn down by the liveness guard, by reason.
    pub(crate) fed_link_resets: Labeled,
    /// Frames from peer brokers refused, by reason.
    pub(crate) fed_refused: Labeled,
    /// Messages and presence fields kept from crossing by a link policy, by direction
    /// and rule.
    pub(crate) fed_policy_refused: Labeled,
    /// Direct messages received from peer brokers.
    pub(crate) fed_received: AtomicU64,
    /// Live frames (broadcasts, state) not forwarded because a link's queue was full.
    pub(crate) fed_live_dropped: AtomicU64,
    /// Presence frames and bytes written to peer brokers.
    pub(crate) fed_presence_frames: AtomicU64,
    pub(crate) fed_presence_bytes: AtomicU64,
    /// Moves not sent to a peer broker because no viewer there could be affected.
    pub(crate) fed_moves_suppressed: AtomicU64,
    /// Multicasts relayed into another mesh by a bridge.
    pub(crate) bridge_relayed: AtomicU64,
    /// Bridges in force.
    pub(crate) bridges_active: AtomicI64,
    store_commits: AtomicU64,
    store_ops: AtomicU64,
    store_commit_micros: AtomicU64,
    store_max_batch: AtomicU64,
}

const JOIN_RESULTS: &[&str] = &["joined", "already_member", "refused", "error", "other"];

impl Default for Metrics {
    fn default() -> Self {
        Self {
            connections_total: AtomicU64::new(0),
            connections_active: AtomicI64::new(0),
            sessions_active: AtomicI64::new(0),
            connections_rejected: Labeled::new("reason", CONN_REJECTS),
            connections_closed: Labeled::new("reason", CLOSES),
            frames_received: AtomicU64::new(0),
            frames_sent: AtomicU64::new(0),
            frames_dropped: Labeled::new("reason", FRAME_DROPS),
            messages_routed: Labeled::new("priority", PRIORITIES),
            exec_runs: Labeled::new("outcome", EXEC_OUTCOMES),
            messages_rejected: Labeled::new("reason", MSG_REJECTS),
            multicast_deliveries: AtomicU64::new(0),
            direct_hot: AtomicU64::new(0),
            direct_drained: AtomicU64::new(0),
            fanout_dropped: AtomicU64::new(0),
            queue_depth: AtomicI64::new(0),
            db_reachable: AtomicBool::new(true),
            writer_healthy: AtomicBool::new(true),
            joins: Labeled::new("result", JOIN_RESULTS),
            http_refused: Labeled::new("reason", HTTP_REFUSALS),
            fed_links_up: AtomicI64::new(0),
            fed_refused: Labeled::new("reason", FED_REFUSALS),
            fed_policy_refused: Labeled::new("reason", FED_POLICY_REFUSALS),
            fed_link_resets: Labeled::new("reason", LINK_RESETS),
            fed_received: AtomicU64::new(0),
            fed_live_dropped: AtomicU64::new(0),
            fed_presence_frames: AtomicU64::new(0),
            fed_presence_bytes: AtomicU64::new(0),
            fed_moves_suppressed: AtomicU64::new(0),
            bridge_relayed: AtomicU64::new(0),
            bridges_active: AtomicI64::new(0),
            store_commits: AtomicU64::new(0),
            store_ops: AtomicU64::new(0),
            store_commit_micros: AtomicU64::new(0),
            store_max_batch: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// The store is usable: reachable, and the writer commits.
    pub(crate) fn store_healthy(&self) -> bool {
        self.db_reachable.load(Ordering::Relaxed) && self.writer_healthy.load(Ordering::Relaxed)
    }

    /// Records one committed batch of `ops` operations that took `took`.
    pub(crate) fn record_commit(&self, ops: usize, took: Duration) {
        self.store_commits.fetch_add(1, Ordering::Relaxed);
        self.store_ops.fetch_add(ops as u64, Ordering::Relaxed);
        self.store_commit_micros.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.store_max_batch
            .fetch_max(ops as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self, uptime: Duration) -> String {
        let mut out = String::with_capacity(4096);
        let c = |o: &mut String, name: &str, help: &str, kind: &str, v: String| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let l = |o: &mut String, name: &str, help: &str, m: &Labeled| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            for (v, n) in m.values.iter().zip(&m.counts) {
                let _ = writeln!(
                    o,
                    "{name}{{{}=\"{v}\"}} {}",
                    m.label,
                    n.load(Ordering::Relaxed)
                );
            }
        };
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        let g = |a: &AtomicI64| a.load(Ordering::Relaxed).to_string();
        c(
            &mut out,
            "meshd_uptime_seconds",
            "Seconds since the daemon started.",
            "gauge",
            uptime.as_secs().to_string(),
        );
        c(
            &mut out,
            "meshd_connections_total",
            "WebSocket connections accepted.",
            "counter",
            r(&self.connections_total),
        );
        c(
            &mut out,
            "meshd_connections_active",
            "Open WebSocket connections.",
            "gauge",
            g(&self.connections_active),
        );
        c(
            &mut out,
            "meshd_sessions_active",
            "Authenticated connections (live presences).",
            "gauge",
            g(&self.sessions_active),
        );
        l(
            &mut out,
            "meshd_connections_rejected_total",
            "Connections refused or closed during the handshake, by reason.",
            &self.connections_rejected,
        );
        l(
            &mut out,
            "meshd_connections_closed_total",
            "Authenticated connections closed, by reason.",
            &self.connections_closed,
        );
        c(
            &mut out,
            "meshd_frames_received_total",
            "WebSocket text frames received.",
            "counter",
            r(&self.frames_received),
        );
        c(
            &mut out,
            "meshd_frames_sent_total",
            "WebSocket frames written.",
            "counter",
            r(&self.frames_sent),
        );
        l(
            &mut out,
            "meshd_frames_dropped_total",
            "Inbound frames ignored without a reply, by reason.",
            &self.frames_dropped,
        );
        l(
            &mut out,
            "meshd_messages_routed_total",
            "Messages accepted for routing, by priority.",
            &self.messages_routed,
        );
        l(
            &mut out,
            "meshd_exec_runs_total",
            "execute_code runs by outcome (a limit that ended them, or a refusal).",
            &self.exec_runs,
        );
        l(
            &mut out,
            "meshd_messages_rejected_total",
            "Sends refused with ack.error, by reason.",
            &self.messages_rejected,
        );
        c(
            &mut out,
            "meshd_multicast_deliveries_total",
            "Pushes of broadcast and group messages.",
            "counter",
            r(&self.multicast_deliveries),
        );
        let _ = writeln!(
            out,
            "# HELP meshd_direct_pushes_total Direct messages pushed, by path: hot (as stored) or drain (claimed from the store).\n\
             # TYPE meshd_direct_pushes_total counter\n\
             meshd_direct_pushes_total{{path=\"hot\"}} {}\n\
             meshd_direct_pushes_total{{path=\"drain\"}} {}",
            r(&self.direct_hot),
            r(&self.direct_drained)
        );
        c(
            &mut out,
            "meshd_fanout_dropped_total",
            "Multicast pushes dropped because a recipient's queue was full.",
            "counter",
            r(&self.fanout_dropped),
        );
        c(
            &mut out,
            "meshd_queue_depth",
            "Undelivered direct messages in the store (refreshed every 30 s).",
            "gauge",
            g(&self.queue_depth),
        );
        c(
            &mut out,
            "meshd_db_healthy",
            "1 when the last store operation succeeded.",
            "gauge",
            u8::from(self.store_healthy()).to_string(),
        );
        l(
            &mut out,
            "meshd_joins_total",
            "POST /join outcomes.",
            &self.joins,
        );
        l(
            &mut out,
            "meshd_http_refused_total",
            "HTTP requests refused by a limit (rate, table size, field size), by reason.",
            &self.http_refused,
        );
        c(
            &mut out,
            "meshd_federation_links_up",
            "Links to peer brokers currently up.",
            "gauge",
            g(&self.fed_links_up),
        );
        l(
            &mut out,
            "meshd_federation_refused_total",
            "Frames from peer brokers refused (forged sender, mesh not shared, …).",
            &self.fed_refused,
        );
        l(
            &mut out,
            "meshd_federation_policy_refused_total",
            "Messages and presence fields a link policy kept from crossing, by direction and rule.",
            &self.fed_policy_refused,
        );
        l(
            &mut out,
            "meshd_federation_link_resets_total",
            "Links torn down and redialed because they did not converge, by reason.",
            &self.fed_link_resets,
        );
        c(
            &mut out,
            "meshd_federation_received_total",
            "Direct messages received from peer brokers.",
            "counter",
            r(&self.fed_received),
        );
        c(
            &mut out,
            "meshd_federation_live_dropped_total",
            "Broadcasts and state writes not forwarded because a link's queue was full.",
            "counter",
            r(&self.fed_live_dropped),
        );
        c(
            &mut out,
            "meshd_federation_presence_frames_total",
            "Presence frames (snapshots, updates, departures) written to peer brokers.",
            "counter",
            r(&self.fed_presence_frames),
        );
        c(
            &mut out,
            "meshd_federation_presence_bytes_total",
            "Bytes of presence frames written to peer brokers.",
            "counter",
            r(&self.fed_presence_bytes),
        );
        c(
            &mut out,
            "meshd_federation_moves_suppressed_total",
            "Position updates not sent to a peer broker: no viewer there could be affected.",
            "counter",
            r(&self.fed_moves_suppressed),
        );
        c(
            &mut out,
            "meshd_bridge_relayed_total",
            "Multicasts relayed into another mesh by a bridge.",
            "counter",
            r(&self.bridge_relayed),
        );
        c(
            &mut out,
            "meshd_bridges_active",
            "Bridges between meshes in force.",
            "gauge",
            g(&self.bridges_active),
        );
        c(
            &mut out,
            "meshd_store_commits_total",
            "Transactions committed by the store writer.",
            "counter",
            r(&self.store_commits),
        );
        c(
            &mut out,
            "meshd_store_operations_total",
            "Operations committed by the store writer.",
            "counter",
            r(&self.store_ops),
        );
        c(
            &mut out,
            "meshd_store_commit_seconds_total",
            "Time spent running writer batches.",
            "counter",
            format!(
                "{:.6}",
                self.store_commit_micros.load(Ordering::Relaxed) as f64 / 1e6
            ),
        );
        c(
            &mut out,
            "meshd_store_max_batch",
            "Largest batch committed in one transaction.",
            "gauge",
            r(&self.store_max_batch),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labels_and_counts() {
        let m = Metrics::default();
        m.messages_routed.inc("now");
        m.messages_routed.inc("bogus");
        m.record_commit(5, Duration::from_millis(2));
        let text = m.render(Duration::from_secs(3));
        assert!(text.contains("meshd_messages_routed_total{priority=\"now\"} 1"));
        assert!(text.contains("meshd_messages_routed_total{priority=\"other\"} 1"));
        assert!(text.contains("meshd_store_operations_total 5"));
        assert!(text.contains("meshd_direct_pushes_total{path=\"hot\"} 0\n"));
        assert!(text.contains("# TYPE meshd_connections_active gauge"));
        assert_eq!(m.messages_routed.get("now"), 1);
    }
}
