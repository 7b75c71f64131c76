//! Every default and limit in one place, each with the reason for its size.

use std::time::Duration;

/// HTTP + WebSocket listen address. Loopback: TLS is terminated by a reverse proxy
/// (Caddy, Traefik, nginx) in front of meshd, as for the reference broker.
pub const LISTEN: &str = "127.0.0.1:7900";

/// Largest WebSocket message accepted. The reference's 64 KiB killed peer-file relays
/// above ~48 KiB; 2 MiB fits a 1 MiB file in base64 with room to spare (Appendix A).
pub const MAX_FRAME_BYTES: usize = 2 * 1024 * 1024;

/// Largest `nonce + ciphertext + targetSpec` of one `send`; refused with `ack.error`
/// beyond it. Half the frame size leaves room for JSON overhead.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Time a new connection has to authenticate. The reference had no limit (§10.1.2);
/// clients send hello immediately and wait 5 s for the ack, so 10 s is generous.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// WebSocket ping interval, as the reference (clients rely on library auto-pong).
pub const PING_INTERVAL: Duration = Duration::from_secs(30);

/// A connection that has not answered pings for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Simultaneous connections, authenticated or not. Each idle connection costs tens of
/// KiB; 20 000 stays well under a GiB and under systemd's `LimitNOFILE=65536`.
pub const MAX_CONNECTIONS: usize = 20_000;

/// Connections per mesh. The reference allowed 100; meshes of agents grow past that.
pub const MAX_CONNECTIONS_PER_MESH: usize = 1_000;

/// Frames buffered for one slow client before live fan-out to it is dropped. Direct
/// messages are never dropped: they stay in the store and are drained later.
pub const OUTBOUND_QUEUE: usize = 1_024;

/// Outbound bytes buffered for one client (frames can be up to a MiB, so the frame
/// count alone does not bound memory). A draining connection's in-memory backlog may
/// hold four times as much before it is given back to the store.
pub const OUTBOUND_QUEUE_BYTES: usize = 8 * 1024 * 1024;

/// WebSocket read buffer per connection. tungstenite allocates it for every connection
/// (128 KiB by default, which made an idle connection cost ~170 KiB); claudemesh frames
/// are small, and large ones just take more reads.
pub const WS_READ_BUFFER: usize = 4 * 1024;

/// Bytes a connection buffers before writing to its socket. The buffer keeps its
/// capacity once grown, so this bounds per-connection memory after a burst; 16 KiB
/// bought ~15 % more DM throughput in the benchmark for ~18 KiB more per connection.
pub const WS_WRITE_BUFFER: usize = 4 * 1024;

/// Sustained `send`s per second per connection. Agents send a few per minute; this
/// stops a runaway loop from flooding a mesh while leaving headroom for tools.
pub const SENDS_PER_SECOND: u32 = 100;

/// Burst allowance above [`SENDS_PER_SECOND`].
pub const SEND_BURST: u32 = 200;

/// How long an undelivered direct message waits for its recipient (HEAD uses 7 days).
pub const QUEUE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long delivered messages stay queryable through `message_status`.
pub const DELIVERED_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// How long a push to a client that acknowledges (`client_ack`) waits for the ack
/// before it is offered again (HEAD's lease).
pub const ACK_LEASE: Duration = Duration::from_secs(30);

/// Largest value of one shared-state key.
pub const MAX_STATE_VALUE_BYTES: usize = 256 * 1024;

/// Shared state one mesh may hold (keys and values): it is kept in memory for fast
/// reads, so it is bounded.
pub const MAX_STATE_BYTES_PER_MESH: usize = 16 * 1024 * 1024;

/// Time given to connections and the store to finish on SIGTERM. The systemd unit's
/// `TimeoutStopSec` (30 s) must stay above it.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Most operations the store commits in one transaction (group commit).
pub const MAX_BATCH: usize = 1_024;

/// Status-source freshness window (§4.5).
pub const STATUS_FRESH_WINDOW: Duration = Duration::from_secs(30);

/// `working` decays to `idle` after this unless confirmed (the reference's
/// `STATUS_TTL_SECONDS`, §4.5).
pub const STATUS_TTL: Duration = Duration::from_secs(60);
/// Connections of every kind (HTTP, keep-alive, WebSocket) open at once, beyond
/// `MAX_CONNECTIONS` WebSockets: room for hooks, uploads and `/health` when every
/// WebSocket slot is taken. Kept below the file-descriptor limit in any case.
pub const MAX_HTTP_CONNECTIONS: usize = MAX_CONNECTIONS + 1_024;
/// Unauthenticated connections one client address (IPv6: one /64) may hold open:
/// plenty for a host running many CLI sessions and hooks, far below the server's cap.
pub const MAX_PENDING_PER_ADDRESS: usize = 64;
/// A request's headers must arrive within this; a keep-alive connection idle this long
/// is closed.
pub const HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A small request body (`/join`, hooks) must arrive within this.
pub const HTTP_BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// A session whose connection left is expected back for this long (the reference's
/// presence lease); afterwards direct messages to its key go to its member key.
pub const SESSION_GRACE: Duration = Duration::from_secs(90);
/// An `mcp_call` fails after this long without its host's answer (the clients give up
/// at 30 s too).
pub const MCP_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest upload (the reference's limit).
pub const MAX_UPLOAD_BYTES: usize = 50 * 1024 * 1024;
/// Stored files one mesh may hold.
pub const MAX_FILE_BYTES_PER_MESH: usize = 1024 * 1024 * 1024;

/// Default log filter (`RUST_LOG` syntax).
pub const LOG_LEVEL: &str = "info";
/// Cron reminders read their fields in UTC unless `schedule.timezone` says otherwise.
pub const TIMEZONE: &str = "UTC";

/// SQLite file name inside the data directory.
pub const SQLITE_FILE: &str = "meshd.db";

/// Federation (QUIC over UDP) listen address. Unlike the HTTP listener it faces the
/// internet: peers are other organizations' brokers, and mutual TLS (not a proxy)
/// authenticates them. The port is the one after [`LISTEN`]'s.
pub const FEDERATION_LISTEN: &str = "0.0.0.0:7901";

/// Directory inside the data directory holding the broker's certificate, key and CA
/// when `federation.cert`, `federation.key` and `federation.ca` are not given.
pub const FEDERATION_CERTS_DIR: &str = "certs";

/// Default file name, in [`FEDERATION_CERTS_DIR`], of our organization's CA (the one
/// served on `/.well-known/meshd/bundle`).
pub const FEDERATION_CA_FILE: &str = "ca.pem";

/// How long the remote peers of a lost link stay listed. A peer broker's restart
/// ([`SHUTDOWN_GRACE`] plus start-up) or a network blip then reconnects without their
/// members flapping offline and online across the mesh.
pub const FEDERATION_PRESENCE_GRACE: Duration = Duration::from_secs(30);

/// First reconnect delay after a link drops; it doubles up to
/// [`FEDERATION_RECONNECT_MAX`]. Short, so a restart of the peer is bridged quickly.
pub const FEDERATION_RECONNECT_MIN: Duration = Duration::from_millis(250);

/// Longest reconnect delay: a peer that comes back is noticed within this, and a peer
/// that stays down costs one handshake attempt per period.
pub const FEDERATION_RECONNECT_MAX: Duration = Duration::from_secs(30);

/// QUIC keep-alive interval, well under the 30 s UDP timeout of common NATs and
/// stateful firewalls, so an idle link stays open.
pub const FEDERATION_KEEPALIVE: Duration = Duration::from_secs(5);

/// A link that received nothing (not even keep-alives) for this long is dead: six
/// missed keep-alives, and no longer than [`FEDERATION_PRESENCE_GRACE`].
pub const FEDERATION_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Direct messages sent over one link and not yet acknowledged by the peer. Bounds the
/// memory per link and what is offered again after a reconnect; as [`OUTBOUND_QUEUE`].
pub const FEDERATION_OUTBOX_WINDOW: usize = 1_024;

/// Largest federation frame accepted: twice a client frame ([`MAX_FRAME_BYTES`]), so
/// the largest message ([`MAX_MESSAGE_BYTES`]) always fits with its envelope.
pub const FEDERATION_MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// Room `federation.max_frame_bytes` must leave above `limits.max_message_bytes` for
/// the envelope around a forwarded message (ids, mesh, sender, signature), so any
/// message a local client may send can be forwarded.
pub const FEDERATION_FRAME_OVERHEAD: usize = 64 * 1024;

/// Port of a `federation.nameservers` entry given as a bare IP address.
pub const DNS_PORT: u16 = 53;

// ---- quotas: what one member, and one mesh, may keep stored ------------------------
// Sized so an honest mesh of a few hundred members never meets them (a member sending
// at the default rate limit for a day keeps under a million message rows), while one
// member alone cannot fill a disk: every kind below is bounded per member and per mesh.

/// Message rows one member keeps (queued, and delivered ones kept for `message_status`).
pub const MESSAGES_PER_MEMBER: usize = 1_000_000;
/// Message rows one mesh keeps.
pub const MESSAGES_PER_MESH: usize = 10_000_000;
/// Bytes of undelivered messages one member sent (bodies are dropped on delivery).
pub const QUEUED_BYTES_PER_MEMBER: usize = 64 << 20;
/// Bytes of undelivered messages of one mesh.
pub const QUEUED_BYTES_PER_MESH: usize = 1 << 30;
/// Notes one member keeps (forgotten ones count until purged) …
pub const MEMORIES_PER_MEMBER: usize = 10_000;
/// … and their bytes.
pub const MEMORY_BYTES_PER_MEMBER: usize = 16 << 20;
/// Notes of one mesh …
pub const MEMORIES_PER_MESH: usize = 100_000;
/// … and their bytes.
pub const MEMORY_BYTES_PER_MESH: usize = 256 << 20;
/// Tasks one member created (done ones count until they expire) …
pub const TASKS_PER_MEMBER: usize = 10_000;
/// … and their bytes (titles and results).
pub const TASK_BYTES_PER_MEMBER: usize = 32 << 20;
/// Tasks of one mesh …
pub const TASKS_PER_MESH: usize = 100_000;
/// … and their bytes.
pub const TASK_BYTES_PER_MESH: usize = 256 << 20;
/// Skills one member shared …
pub const SKILLS_PER_MEMBER: usize = 500;
/// … and their bytes.
pub const SKILL_BYTES_PER_MEMBER: usize = 16 << 20;
/// Bytes of skills of one mesh (at most 2,000 of them).
pub const SKILL_BYTES_PER_MESH: usize = 64 << 20;
/// Files one member keeps …
pub const FILES_PER_MEMBER: usize = 10_000;
/// … and their bytes.
pub const FILE_BYTES_PER_MEMBER: usize = 256 << 20;
/// Files of one mesh (their bytes: `limits.max_file_bytes_per_mesh`).
pub const FILES_PER_MESH: usize = 100_000;
/// Bytes of shared state one member last wrote.
pub const STATE_BYTES_PER_MEMBER: usize = 4 << 20;
/// Schedules one member keeps, pending or closed (closed ones go after a week).
pub const SCHEDULES_PER_MEMBER: usize = 1_000;
/// Streams one member created.
pub const STREAMS_PER_MEMBER: usize = 100;
/// Webhooks one member created.
pub const WEBHOOKS_PER_MEMBER: usize = 20;
/// Session keys remembered per member (the least recently seen go first).
pub const SESSION_KEYS_PER_MEMBER: usize = 1_000;
/// Downloads remembered per file (for `file_status`; the oldest go first).
pub const ACCESSES_PER_FILE: usize = 100;
/// Audit entries one mesh keeps (the oldest go first).
pub const AUDIT_ENTRIES_PER_MESH: usize = 1_000_000;
/// Audit entries older than this go.
pub const AUDIT_RETENTION: Duration = Duration::from_secs(90 * 86_400);
/// Completed tasks older than this go.
pub const DONE_TASK_RETENTION: Duration = Duration::from_secs(30 * 86_400);
/// Forgotten notes, closed schedules and deleted files' rows are kept this long (a
/// peer broker that was cut off learns of the forgetting when its link comes back).
pub const TOMBSTONE_RETENTION: Duration = Duration::from_secs(7 * 86_400);
/// How often usage is recounted from the store: message quotas free up as messages are
/// delivered, and the `/metrics` usage gauges follow (each recount scans the tables).
pub const RECOUNT_INTERVAL: Duration = Duration::from_secs(30);
/// How often what outlived its retention is purged (each purge is a few short deletes).
pub const PURGE_INTERVAL: Duration = Duration::from_secs(30 * 60);

/// Watches one member keeps per mesh (`watch.max_per_member`).
pub const WATCHES_PER_MEMBER: usize = 20;
