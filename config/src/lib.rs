//! meshd's configuration: a TOML file, `MESHD_*` environment variables and command-line
//! flags, parsed once into a typed, validated [`Config`].
//!
//! Precedence, highest first: command-line flags ([`Overrides`]), `MESHD_<SECTION>_<KEY>`
//! environment variables, the file, the defaults in [`defaults`]. Unknown keys, in the file
//! or as `MESHD_*` variables, are errors that name the key. Secrets (the database password)
//! are held in [`Secret`] and never printed.
//!
//! This crate reads no files and no environment by itself: callers pass the file text and
//! the variables in, so tests need no process state.

#![warn(missing_docs)]

pub mod defaults;
mod duration;
mod secret;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use duration::parse_duration;
pub use secret::{Secret, mask_url};

/// Why a configuration was refused. The message names the offending key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The TOML did not parse or did not match the schema (unknown key, wrong type).
    #[error("{origin}: {message}")]
    Parse {
        /// Where the text came from (a path, or "environment").
        origin: String,
        /// toml's explanation, which names the key.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("invalid `{key}`: {reason}")]
    Invalid {
        /// Dotted key path.
        key: String,
        /// Why.
        reason: String,
    },
    /// A `MESHD_*` variable that matches no key.
    #[error("unknown environment variable {0} (no such configuration key)")]
    UnknownEnv(String),
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// The file schema. Every field is optional; defaults live in [`defaults`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Where meshd keeps its database and keys.
    data_dir: Option<PathBuf>,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    schedule: RawSchedule,
    #[serde(default)]
    quotas: RawQuotas,
    #[serde(default)]
    watch: RawWatch,
    #[serde(default)]
    sandbox: RawSandbox,
    /// `None` when the file has no `[federation]` section (and no `MESHD_FEDERATION_*`).
    federation: Option<RawFederation>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    public_url: Option<String>,
    shutdown_grace: Option<String>,
    trusted_proxies: Option<Vec<String>>,
    unsigned_uploads: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    url: Option<String>,
    durability: Option<String>,
    max_batch: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_frame_bytes: Option<usize>,
    max_message_bytes: Option<usize>,
    hello_timeout: Option<String>,
    ping_interval: Option<String>,
    idle_timeout: Option<String>,
    max_connections: Option<usize>,
    max_connections_per_mesh: Option<usize>,
    outbound_queue: Option<usize>,
    outbound_queue_bytes: Option<usize>,
    ws_read_buffer: Option<usize>,
    ws_write_buffer: Option<usize>,
    sends_per_second: Option<u32>,
    send_burst: Option<u32>,
    queue_ttl: Option<String>,
    delivered_retention: Option<String>,
    ack_lease: Option<String>,
    status_ttl: Option<String>,
    session_grace: Option<String>,
    max_http_connections: Option<usize>,
    max_pending_per_address: Option<usize>,
    http_header_timeout: Option<String>,
    http_body_timeout: Option<String>,
    max_state_value_bytes: Option<usize>,
    max_state_bytes_per_mesh: Option<usize>,
    mcp_call_timeout: Option<String>,
    max_upload_bytes: Option<usize>,
    max_file_bytes_per_mesh: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    timezone: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSandbox {
    enabled: Option<bool>,
    bwrap: Option<PathBuf>,
    role: Option<String>,
    wall_time: Option<String>,
    cpu_time: Option<String>,
    memory_mb: Option<u64>,
    processes: Option<u64>,
    file_size_mb: Option<u64>,
    scratch_mb: Option<u64>,
    output_kb: Option<u64>,
    per_mesh: Option<usize>,
    runs_per_minute: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWatch {
    allow_private: Option<bool>,
    max_per_member: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuotas {
    messages_per_member: Option<usize>,
    messages_per_mesh: Option<usize>,
    queued_bytes_per_member: Option<usize>,
    queued_bytes_per_mesh: Option<usize>,
    memory_bytes_per_member: Option<usize>,
    memory_bytes_per_mesh: Option<usize>,
    task_bytes_per_member: Option<usize>,
    task_bytes_per_mesh: Option<usize>,
    skill_bytes_per_member: Option<usize>,
    skill_bytes_per_mesh: Option<usize>,
    file_bytes_per_member: Option<usize>,
    state_bytes_per_member: Option<usize>,
    audit_entries_per_mesh: Option<usize>,
    audit_retention: Option<String>,
    done_task_retention: Option<String>,
    recount_interval: Option<String>,
    purge_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFederation {
    broker: Option<String>,
    listen: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
    nameservers: Option<Vec<String>>,
    presence_grace: Option<String>,
    reconnect_min: Option<String>,
    reconnect_max: Option<String>,
    keepalive: Option<String>,
    idle_timeout: Option<String>,
    outbox_window: Option<usize>,
    max_frame_bytes: Option<usize>,
    spatial_interest: Option<bool>,
    /// `[[federation.peers]]`; file only (no `MESHD_*` variable).
    #[serde(default)]
    peers: Vec<RawPeer>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: Option<String>,
    addr: Option<String>,
    ca: Option<PathBuf>,
    pin: Option<String>,
}

/// Every key the file accepts, as `section.key` (or `key` at the top level). The
/// `MESHD_*` variable for a key is `MESHD_` + the path upper-cased with `.` → `_`.
pub const KEYS: &[&str] = &[
    "quotas.messages_per_member",
    "quotas.messages_per_mesh",
    "quotas.queued_bytes_per_member",
    "quotas.queued_bytes_per_mesh",
    "quotas.memory_bytes_per_member",
    "quotas.memory_bytes_per_mesh",
    "quotas.task_bytes_per_member",
    "quotas.task_bytes_per_mesh",
    "quotas.skill_bytes_per_member",
    "quotas.skill_bytes_per_mesh",
    "quotas.file_bytes_per_member",
    "quotas.state_bytes_per_member",
    "quotas.audit_entries_per_mesh",
    "quotas.audit_retention",
    "quotas.done_task_retention",
    "quotas.recount_interval",
    "quotas.purge_interval",
    "data_dir",
    "server.listen",
    "server.public_url",
    "server.shutdown_grace",
    "server.trusted_proxies",
    "server.unsigned_uploads",
    "storage.url",
    "storage.durability",
    "storage.max_batch",
    "limits.max_frame_bytes",
    "limits.max_message_bytes",
    "limits.hello_timeout",
    "limits.ping_interval",
    "limits.idle_timeout",
    "limits.max_connections",
    "limits.max_connections_per_mesh",
    "limits.outbound_queue",
    "limits.outbound_queue_bytes",
    "limits.ws_read_buffer",
    "limits.ws_write_buffer",
    "limits.sends_per_second",
    "limits.send_burst",
    "limits.queue_ttl",
    "limits.delivered_retention",
    "limits.ack_lease",
    "limits.status_ttl",
    "limits.session_grace",
    "limits.max_http_connections",
    "limits.max_pending_per_address",
    "limits.http_header_timeout",
    "limits.http_body_timeout",
    "limits.max_state_value_bytes",
    "limits.max_state_bytes_per_mesh",
    "limits.mcp_call_timeout",
    "limits.max_upload_bytes",
    "limits.max_file_bytes_per_mesh",
    "log.level",
    "log.format",
    "schedule.timezone",
    "watch.allow_private",
    "watch.max_per_member",
    "sandbox.enabled",
    "sandbox.bwrap",
    "sandbox.role",
    "sandbox.wall_time",
    "sandbox.cpu_time",
    "sandbox.memory_mb",
    "sandbox.processes",
    "sandbox.file_size_mb",
    "sandbox.scratch_mb",
    "sandbox.output_kb",
    "sandbox.per_mesh",
    "sandbox.runs_per_minute",
    "federation.broker",
    "federation.listen",
    "federation.cert",
    "federation.key",
    "federation.ca",
    "federation.nameservers",
    "federation.presence_grace",
    "federation.reconnect_min",
    "federation.reconnect_max",
    "federation.keepalive",
    "federation.idle_timeout",
    "federation.outbox_window",
    "federation.max_frame_bytes",
    "federation.spatial_interest",
];

/// Keys whose `MESHD_*` variable holds a comma-separated list (a TOML array also works).
const ENV_LIST_KEYS: &[&str] = &["federation.nameservers", "server.trusted_proxies"];

/// Variables with the `MESHD_` prefix that are not configuration keys.
const NON_KEY_ENV: &[&str] = &["MESHD_CONFIG"];

/// Values from command-line flags; they win over everything else.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--listen`.
    pub listen: Option<String>,
    /// `--public-url`.
    pub public_url: Option<String>,
    /// `--database-url`.
    pub database_url: Option<String>,
}

/// The process environment the defaults depend on (passed in, never read here).
#[derive(Debug, Default, Clone)]
pub struct Environment {
    /// All variables, for `MESHD_*` overrides.
    pub vars: Vec<(String, String)>,
    /// Set by systemd's `StateDirectory=`.
    pub state_directory: Option<PathBuf>,
    /// `$XDG_DATA_HOME`.
    pub xdg_data_home: Option<PathBuf>,
    /// `$HOME`.
    pub home: Option<PathBuf>,
}

impl Environment {
    /// Builds an [`Environment`] from `(name, value)` pairs such as `std::env::vars()`.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        let get = |k: &str| {
            vars.iter()
                .find(|(n, v)| n == k && !v.is_empty())
                .map(|(_, v)| PathBuf::from(v))
        };
        Self {
            state_directory: get("STATE_DIRECTORY")
                // systemd passes a colon-separated list when several are configured.
                .map(|p| PathBuf::from(p.to_string_lossy().split(':').next().unwrap_or(""))),
            xdg_data_home: get("XDG_DATA_HOME"),
            home: get("HOME"),
            vars,
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Database, keys and runtime files live here.
    pub data_dir: PathBuf,
    /// HTTP/WebSocket settings.
    pub server: Server,
    /// Persistence.
    pub storage: Storage,
    /// Limits and timers.
    pub limits: Limits,
    /// Logging.
    pub log: Log,
    /// Cron reminders.
    pub schedule: Schedule,
    /// What one member, and one mesh, may keep stored.
    pub quotas: Quotas,
    /// URL watches (`watch` frames).
    pub watch: Watch,
    /// Sandboxed code execution (`execute_code`).
    pub sandbox: Sandbox,
    /// Links to other organizations' brokers; `None` when `[federation]` is absent.
    pub federation: Option<Federation>,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct Server {
    /// Listen address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// The WebSocket URL clients use, written into invites. `None` when not
    /// configured: see [`Config::public_url`].
    pub public_url: Option<String>,
    /// Time given to connections and the store on shutdown.
    pub shutdown_grace: Duration,
    /// Reverse proxies whose `X-Forwarded-For` names the client (the address rules of
    /// status hooks and unsigned uploads then apply to the client, not the proxy).
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Whether an unsigned `POST /upload` (the 0.7.0 CLI's) is taken from the address of
    /// a connected member.
    pub unsigned_uploads: UnsignedUploads,
}

/// `server.unsigned_uploads`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnsignedUploads {
    /// Accepted when every live connection of the mesh from the request's address
    /// belongs to one member (the uploader).
    SameAddress,
    /// Refused: uploads must be signed.
    Refuse,
}

/// `[storage]`.
#[derive(Debug, Clone)]
pub struct Storage {
    /// Which database.
    pub backend: Backend,
    /// What a commit survives.
    pub durability: Durability,
    /// Most operations per transaction.
    pub max_batch: usize,
}

/// The database meshd persists to.
#[derive(Debug, Clone)]
pub enum Backend {
    /// Embedded SQLite in WAL mode.
    Sqlite {
        /// Database file.
        path: PathBuf,
    },
    /// A PostgreSQL server.
    Postgres {
        /// Connection URL (contains the password, hence the [`Secret`]).
        url: Secret<String>,
    },
}

/// What an acknowledged write survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Survives a crash or `kill -9` of meshd (SQLite `synchronous=NORMAL` in WAL mode;
    /// PostgreSQL `synchronous_commit=off` on meshd's writer connection, where the last
    /// few hundred milliseconds can be lost only if PostgreSQL or its host crashes).
    Normal,
    /// Also survives power loss (SQLite `synchronous=FULL`; PostgreSQL
    /// `synchronous_commit=on`). One fsync per group commit, not per message.
    Fsync,
}

/// `[limits]`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest inbound WebSocket message.
    pub max_frame_bytes: usize,
    /// Largest `send` payload.
    pub max_message_bytes: usize,
    /// Time to authenticate.
    pub hello_timeout: Duration,
    /// WebSocket ping interval.
    pub ping_interval: Duration,
    /// Close a connection silent for this long.
    pub idle_timeout: Duration,
    /// Simultaneous connections.
    pub max_connections: usize,
    /// Connections per mesh.
    pub max_connections_per_mesh: usize,
    /// Outbound frames buffered per connection.
    pub outbound_queue: usize,
    /// Outbound bytes buffered per connection (a draining connection's backlog may hold
    /// four times as much).
    pub outbound_queue_bytes: usize,
    /// WebSocket read buffer per connection, bytes (allocated for every connection).
    pub ws_read_buffer: usize,
    /// Bytes a connection buffers before writing to its socket (kept once grown).
    pub ws_write_buffer: usize,
    /// Sustained sends per second per connection (0 = unlimited).
    pub sends_per_second: u32,
    /// Burst above the sustained rate.
    pub send_burst: u32,
    /// Lifetime of an undelivered direct message.
    pub queue_ttl: Duration,
    /// How long delivered messages stay queryable.
    pub delivered_retention: Duration,
    /// Redelivery lease for clients that acknowledge.
    pub ack_lease: Duration,
    /// A `working` status not confirmed for this long decays to `idle`.
    pub status_ttl: Duration,
    /// How long a departed session is expected back before direct messages to its key
    /// go to its member key.
    pub session_grace: Duration,
    /// Connections of every kind open at once (kept below the descriptor limit).
    pub max_http_connections: usize,
    /// Unauthenticated connections per client address (IPv6: per /64).
    pub max_pending_per_address: usize,
    /// Request headers must arrive within this; idle keep-alive connections close then.
    pub http_header_timeout: Duration,
    /// Small request bodies (`/join`, hooks, webhooks) must arrive within this.
    pub http_body_timeout: Duration,
    /// Largest shared-state value.
    pub max_state_value_bytes: usize,
    /// Shared state (keys and values) one mesh may hold, bytes.
    pub max_state_bytes_per_mesh: usize,
    /// How long an `mcp_call` waits for its host's answer.
    pub mcp_call_timeout: Duration,
    /// Largest `POST /upload` body.
    pub max_upload_bytes: usize,
    /// Stored files (live ones, bytes) one mesh may hold.
    pub max_file_bytes_per_mesh: usize,
}

/// `[sandbox]`: code execution for members (`execute_code`), each run in its own
/// bubblewrap sandbox with these limits. Off unless enabled; when enabled and the host
/// cannot sandbox, the daemon refuses to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// Whether `execute_code` runs at all.
    pub enabled: bool,
    /// The bubblewrap binary.
    pub bwrap: PathBuf,
    /// Who may run code: `member` (every member) or `admin`.
    pub admin_only: bool,
    /// Longest a run may take, wall clock.
    pub wall_time: Duration,
    /// CPU time a run may use (RLIMIT_CPU).
    pub cpu_time: Duration,
    /// Data segment limit, MiB (RLIMIT_DATA: heap and private mappings).
    pub memory_mb: u64,
    /// Processes of the sandbox user (RLIMIT_NPROC).
    pub processes: u64,
    /// Largest file a run may write, MiB (RLIMIT_FSIZE).
    pub file_size_mb: u64,
    /// Size of the run's private scratch directory (a tmpfs), MiB.
    pub scratch_mb: u64,
    /// Most stdout and stderr kept, each, KiB (more is cut off and said so).
    pub output_kb: u64,
    /// Runs at once per mesh.
    pub per_mesh: usize,
    /// Runs one member may start per minute.
    pub runs_per_minute: u32,
}

/// `[watch]`: URLs the broker polls for members (`watch` frames).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    /// Whether watched URLs may resolve to loopback, private, link-local or other
    /// non-public addresses (off by default: the broker's own network is not for its
    /// members to probe).
    pub allow_private: bool,
    /// Most watches one member keeps per mesh.
    pub max_per_member: usize,
}

/// `[schedule]`.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The IANA name of the zone cron fields are read in (`UTC` by default).
    pub timezone_name: String,
    /// That zone, loaded once (the system tz database, else the bundled copy).
    pub timezone: jiff::tz::TimeZone,
}

/// `[quotas]`: what one member, and one mesh, may keep stored (see the README's "Limits
/// and quotas"). Counts of rows per kind are fixed (`defaults`); sizes are set here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quotas {
    /// Message rows one member has stored (queued, and delivered ones kept for
    /// `message_status` until `limits.delivered_retention`).
    pub messages_per_member: usize,
    /// Message rows of one mesh.
    pub messages_per_mesh: usize,
    /// Bytes of undelivered messages one member sent.
    pub queued_bytes_per_member: usize,
    /// Bytes of undelivered messages of one mesh.
    pub queued_bytes_per_mesh: usize,
    /// Bytes of notes (`remember`) of one member.
    pub memory_bytes_per_member: usize,
    /// Bytes of notes of one mesh.
    pub memory_bytes_per_mesh: usize,
    /// Bytes of tasks (titles and results) one member created.
    pub task_bytes_per_member: usize,
    /// Bytes of tasks of one mesh.
    pub task_bytes_per_mesh: usize,
    /// Bytes of skills one member shared.
    pub skill_bytes_per_member: usize,
    /// Bytes of skills of one mesh.
    pub skill_bytes_per_mesh: usize,
    /// Bytes of files one member uploaded (the mesh's: `limits.max_file_bytes_per_mesh`).
    pub file_bytes_per_member: usize,
    /// Bytes of shared state one member last wrote (the mesh's:
    /// `limits.max_state_bytes_per_mesh`).
    pub state_bytes_per_member: usize,
    /// Audit entries one mesh keeps (the oldest go first).
    pub audit_entries_per_mesh: usize,
    /// Audit entries older than this go.
    pub audit_retention: Duration,
    /// Completed tasks older than this go.
    pub done_task_retention: Duration,
    /// How often usage is recounted from the store (quota counts, `/metrics`).
    pub recount_interval: Duration,
    /// How often what outlived its retention is purged.
    pub purge_interval: Duration,
}

/// `[log]`.
#[derive(Debug, Clone)]
pub struct Log {
    /// Filter in `RUST_LOG` syntax.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for journald/Loki/ELK).
    Json,
}

/// `[federation]`: QUIC + mutual-TLS links to the brokers of other organizations.
/// Holds paths and public CA pins only, nothing secret.
#[derive(Debug, Clone)]
pub struct Federation {
    /// This broker's DNS name (lower-case); its certificate must be issued for it.
    pub broker: String,
    /// UDP listen address for QUIC (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Certificate chain, PEM: the leaf, then our organization's CA.
    pub cert: PathBuf,
    /// The leaf's private key, PEM (the path only; the key is read by the caller).
    pub key: PathBuf,
    /// Our organization's CA, PEM (served on `/.well-known/meshd/bundle`).
    pub ca: PathBuf,
    /// Nameservers for peer lookups (SRV `_meshd._udp.<name>`); `None` = the system
    /// resolver.
    pub nameservers: Option<Vec<SocketAddr>>,
    /// How long the remote peers of a lost link stay listed.
    pub presence_grace: Duration,
    /// Send a peer's move to a peer broker only when a viewer there could be affected
    /// (interest management, see `meshd_protocol::spatial`); `false` sends every move to
    /// every broker of the mesh (for comparison and debugging).
    pub spatial_interest: bool,
    /// First reconnect delay (doubling up to `reconnect_max`).
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// QUIC keep-alive interval.
    pub keepalive: Duration,
    /// A link silent for this long is closed (longer than `keepalive`).
    pub idle_timeout: Duration,
    /// Unacknowledged direct messages in flight per link.
    pub outbox_window: usize,
    /// Largest federation frame accepted.
    pub max_frame_bytes: usize,
    /// The brokers we link to, names unique.
    pub peers: Vec<FederationPeer>,
}

/// One `[[federation.peers]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationPeer {
    /// The peer broker's DNS name (lower-case); its certificate must be issued for it.
    pub name: String,
    /// Where to reach it, `IP:PORT` or `HOST:PORT` (host lower-cased); `None` = look up
    /// DNS SRV `_meshd._udp.<name>`.
    pub addr: Option<String>,
    /// What its certificate must chain to.
    pub anchor: PeerAnchorConfig,
}

/// The trust anchor of one peer organization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAnchorConfig {
    /// Its CA certificate, PEM (`ca = "…"`).
    CaFile(PathBuf),
    /// The SHA-256 of its CA certificate (DER) (`pin = "sha256:…"`).
    Pin([u8; 32]),
}

impl Config {
    /// Parses and validates. `file` is `(origin, text)` of the config file, if any.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key at fault.
    pub fn load(
        file: Option<(&str, &str)>,
        env: &Environment,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut table = match file {
            Some((origin, text)) => {
                toml::from_str::<toml::Table>(text).map_err(|e| ConfigError::Parse {
                    origin: origin.to_owned(),
                    message: e.to_string(),
                })?
            }
            None => toml::Table::new(),
        };
        overlay_env(&mut table, &env.vars)?;
        let raw: RawConfig = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                origin: file.map_or("environment", |(o, _)| o).to_owned(),
                message: e.to_string(),
            })?;
        Self::validate(raw, env, overrides)
    }

    /// Defaults only (plus overrides), for tests and `meshd serve` without a file.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn defaults(env: &Environment, overrides: &Overrides) -> Result<Self, ConfigError> {
        Self::validate(RawConfig::default(), env, overrides)
    }

    /// The WebSocket URL clients should use: the configured `server.public_url`, or one
    /// derived from the listen address. The flag says whether it was derived, so
    /// commands that embed it in invites can warn.
    pub fn public_url(&self) -> (String, bool) {
        match &self.server.public_url {
            Some(u) => (u.clone(), false),
            None => {
                let mut addr = self.server.listen;
                if addr.ip().is_unspecified() {
                    addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                (format!("ws://{addr}/ws"), true)
            }
        }
    }

    fn validate(raw: RawConfig, env: &Environment, ov: &Overrides) -> Result<Self, ConfigError> {
        let data_dir = ov
            .data_dir
            .clone()
            .or(raw.data_dir)
            .or_else(|| env.state_directory.clone())
            .or_else(|| env.xdg_data_home.as_ref().map(|p| p.join("meshd")))
            .or_else(|| env.home.as_ref().map(|p| p.join(".local/share/meshd")))
            .unwrap_or_else(|| PathBuf::from("meshd-data"));
        if data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }

        let listen_s = ov
            .listen
            .clone()
            .or(raw.server.listen)
            .unwrap_or_else(|| defaults::LISTEN.to_owned());
        let listen: SocketAddr = listen_s
            .parse()
            .map_err(|_| invalid("server.listen", format!("{listen_s:?} is not ADDRESS:PORT")))?;
        let public_url = match ov.public_url.clone().or(raw.server.public_url) {
            Some(u) => Some(validate_ws_url("server.public_url", &u)?),
            None => None,
        };
        let trusted_proxies = raw
            .server
            .trusted_proxies
            .unwrap_or_default()
            .iter()
            .map(|p| {
                p.trim().parse::<std::net::IpAddr>().map_err(|_| {
                    invalid(
                        "server.trusted_proxies",
                        format!("{p:?} is not an IP address"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let unsigned_uploads = match raw.server.unsigned_uploads.as_deref() {
            None | Some("same-address") => UnsignedUploads::SameAddress,
            Some("refuse") => UnsignedUploads::Refuse,
            Some(other) => {
                return Err(invalid(
                    "server.unsigned_uploads",
                    format!("{other:?} is not \"same-address\" or \"refuse\""),
                ));
            }
        };
        let server = Server {
            listen,
            public_url,
            trusted_proxies,
            unsigned_uploads,
            shutdown_grace: dur(
                "server.shutdown_grace",
                raw.server.shutdown_grace,
                defaults::SHUTDOWN_GRACE,
            )?,
        };

        let backend = match ov.database_url.clone().or(raw.storage.url) {
            None => Backend::Sqlite {
                path: data_dir.join(defaults::SQLITE_FILE),
            },
            Some(url) => parse_backend(&url, &data_dir)?,
        };
        let durability = match raw.storage.durability.as_deref() {
            None | Some("normal") => Durability::Normal,
            Some("fsync") => Durability::Fsync,
            Some(other) => {
                return Err(invalid(
                    "storage.durability",
                    format!("{other:?} is not \"normal\" or \"fsync\""),
                ));
            }
        };
        let max_batch = raw.storage.max_batch.unwrap_or(defaults::MAX_BATCH);
        if !(1..=65_536).contains(&max_batch) {
            return Err(invalid("storage.max_batch", "must be 1..=65536"));
        }

        let l = raw.limits;
        let max_frame_bytes = l.max_frame_bytes.unwrap_or(defaults::MAX_FRAME_BYTES);
        if !(64 * 1024..=64 * 1024 * 1024).contains(&max_frame_bytes) {
            return Err(invalid("limits.max_frame_bytes", "must be 64 KiB..=64 MiB"));
        }
        let max_message_bytes = l.max_message_bytes.unwrap_or(defaults::MAX_MESSAGE_BYTES);
        if max_message_bytes == 0 || max_message_bytes > max_frame_bytes {
            return Err(invalid(
                "limits.max_message_bytes",
                "must be between 1 and limits.max_frame_bytes",
            ));
        }
        let limits = Limits {
            max_frame_bytes,
            max_message_bytes,
            hello_timeout: dur(
                "limits.hello_timeout",
                l.hello_timeout,
                defaults::HELLO_TIMEOUT,
            )?,
            ping_interval: dur(
                "limits.ping_interval",
                l.ping_interval,
                defaults::PING_INTERVAL,
            )?,
            idle_timeout: dur(
                "limits.idle_timeout",
                l.idle_timeout,
                defaults::IDLE_TIMEOUT,
            )?,
            max_connections: positive(
                "limits.max_connections",
                l.max_connections,
                defaults::MAX_CONNECTIONS,
            )?,
            max_connections_per_mesh: positive(
                "limits.max_connections_per_mesh",
                l.max_connections_per_mesh,
                defaults::MAX_CONNECTIONS_PER_MESH,
            )?,
            outbound_queue: positive(
                "limits.outbound_queue",
                l.outbound_queue,
                defaults::OUTBOUND_QUEUE,
            )?,
            outbound_queue_bytes: positive(
                "limits.outbound_queue_bytes",
                l.outbound_queue_bytes,
                defaults::OUTBOUND_QUEUE_BYTES,
            )?,
            ws_read_buffer: positive(
                "limits.ws_read_buffer",
                l.ws_read_buffer,
                defaults::WS_READ_BUFFER,
            )?,
            ws_write_buffer: positive(
                "limits.ws_write_buffer",
                l.ws_write_buffer,
                defaults::WS_WRITE_BUFFER,
            )?,
            sends_per_second: l.sends_per_second.unwrap_or(defaults::SENDS_PER_SECOND),
            send_burst: l.send_burst.unwrap_or(defaults::SEND_BURST),
            queue_ttl: dur("limits.queue_ttl", l.queue_ttl, defaults::QUEUE_TTL)?,
            delivered_retention: dur(
                "limits.delivered_retention",
                l.delivered_retention,
                defaults::DELIVERED_RETENTION,
            )?,
            ack_lease: dur("limits.ack_lease", l.ack_lease, defaults::ACK_LEASE)?,
            status_ttl: dur("limits.status_ttl", l.status_ttl, defaults::STATUS_TTL)?,
            session_grace: dur(
                "limits.session_grace",
                l.session_grace,
                defaults::SESSION_GRACE,
            )?,
            max_http_connections: positive(
                "limits.max_http_connections",
                l.max_http_connections,
                defaults::MAX_HTTP_CONNECTIONS,
            )?,
            max_pending_per_address: positive(
                "limits.max_pending_per_address",
                l.max_pending_per_address,
                defaults::MAX_PENDING_PER_ADDRESS,
            )?,
            http_header_timeout: dur(
                "limits.http_header_timeout",
                l.http_header_timeout,
                defaults::HTTP_HEADER_TIMEOUT,
            )?,
            http_body_timeout: dur(
                "limits.http_body_timeout",
                l.http_body_timeout,
                defaults::HTTP_BODY_TIMEOUT,
            )?,
            max_state_value_bytes: positive(
                "limits.max_state_value_bytes",
                l.max_state_value_bytes,
                defaults::MAX_STATE_VALUE_BYTES,
            )?,
            max_state_bytes_per_mesh: positive(
                "limits.max_state_bytes_per_mesh",
                l.max_state_bytes_per_mesh,
                defaults::MAX_STATE_BYTES_PER_MESH,
            )?,
            mcp_call_timeout: dur(
                "limits.mcp_call_timeout",
                l.mcp_call_timeout,
                defaults::MCP_CALL_TIMEOUT,
            )?,
            max_upload_bytes: positive(
                "limits.max_upload_bytes",
                l.max_upload_bytes,
                defaults::MAX_UPLOAD_BYTES,
            )?,
            max_file_bytes_per_mesh: positive(
                "limits.max_file_bytes_per_mesh",
                l.max_file_bytes_per_mesh,
                defaults::MAX_FILE_BYTES_PER_MESH,
            )?,
        };
        let mut limits = limits;
        if l.max_http_connections.is_none() {
            // Room beyond the WebSocket cap for hooks, uploads and /health.
            limits.max_http_connections = limits.max_connections.saturating_add(1_024);
        }
        if limits.max_http_connections < limits.max_connections {
            return Err(invalid(
                "limits.max_http_connections",
                "must be at least limits.max_connections (WebSockets are HTTP connections too)",
            ));
        }
        if limits.sends_per_second > 0 && limits.send_burst == 0 {
            return Err(invalid(
                "limits.send_burst",
                "must be at least 1 when limits.sends_per_second is set",
            ));
        }
        if limits.idle_timeout <= limits.ping_interval {
            return Err(invalid(
                "limits.idle_timeout",
                "must be longer than limits.ping_interval",
            ));
        }

        let level = raw
            .log
            .level
            .unwrap_or_else(|| defaults::LOG_LEVEL.to_owned());
        if level.trim().is_empty() {
            return Err(invalid("log.level", "must not be empty"));
        }
        let format = match raw.log.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "log.format",
                    format!("{other:?} is not \"text\" or \"json\""),
                ));
            }
        };

        let timezone_name = raw
            .schedule
            .timezone
            .unwrap_or_else(|| defaults::TIMEZONE.to_owned());
        let timezone = if timezone_name == "UTC" {
            jiff::tz::TimeZone::UTC
        } else {
            jiff::tz::TimeZone::get(&timezone_name).map_err(|_| {
                invalid(
                    "schedule.timezone",
                    format!(
                        "{timezone_name:?} is not a known IANA time zone (e.g. \"Europe/Madrid\")"
                    ),
                )
            })?
        };

        let federation = match raw.federation {
            Some(f) => Some(validate_federation(f, &data_dir, &limits)?),
            None => None,
        };

        let q = raw.quotas;
        let quotas = Quotas {
            messages_per_member: positive(
                "quotas.messages_per_member",
                q.messages_per_member,
                defaults::MESSAGES_PER_MEMBER,
            )?,
            messages_per_mesh: positive(
                "quotas.messages_per_mesh",
                q.messages_per_mesh,
                defaults::MESSAGES_PER_MESH,
            )?,
            queued_bytes_per_member: positive(
                "quotas.queued_bytes_per_member",
                q.queued_bytes_per_member,
                defaults::QUEUED_BYTES_PER_MEMBER,
            )?,
            queued_bytes_per_mesh: positive(
                "quotas.queued_bytes_per_mesh",
                q.queued_bytes_per_mesh,
                defaults::QUEUED_BYTES_PER_MESH,
            )?,
            memory_bytes_per_member: positive(
                "quotas.memory_bytes_per_member",
                q.memory_bytes_per_member,
                defaults::MEMORY_BYTES_PER_MEMBER,
            )?,
            memory_bytes_per_mesh: positive(
                "quotas.memory_bytes_per_mesh",
                q.memory_bytes_per_mesh,
                defaults::MEMORY_BYTES_PER_MESH,
            )?,
            task_bytes_per_member: positive(
                "quotas.task_bytes_per_member",
                q.task_bytes_per_member,
                defaults::TASK_BYTES_PER_MEMBER,
            )?,
            task_bytes_per_mesh: positive(
                "quotas.task_bytes_per_mesh",
                q.task_bytes_per_mesh,
                defaults::TASK_BYTES_PER_MESH,
            )?,
            skill_bytes_per_member: positive(
                "quotas.skill_bytes_per_member",
                q.skill_bytes_per_member,
                defaults::SKILL_BYTES_PER_MEMBER,
            )?,
            skill_bytes_per_mesh: positive(
                "quotas.skill_bytes_per_mesh",
                q.skill_bytes_per_mesh,
                defaults::SKILL_BYTES_PER_MESH,
            )?,
            file_bytes_per_member: positive(
                "quotas.file_bytes_per_member",
                q.file_bytes_per_member,
                defaults::FILE_BYTES_PER_MEMBER,
            )?,
            state_bytes_per_member: positive(
                "quotas.state_bytes_per_member",
                q.state_bytes_per_member,
                defaults::STATE_BYTES_PER_MEMBER,
            )?,
            audit_entries_per_mesh: positive(
                "quotas.audit_entries_per_mesh",
                q.audit_entries_per_mesh,
                defaults::AUDIT_ENTRIES_PER_MESH,
            )?,
            audit_retention: dur(
                "quotas.audit_retention",
                q.audit_retention,
                defaults::AUDIT_RETENTION,
            )?,
            done_task_retention: dur(
                "quotas.done_task_retention",
                q.done_task_retention,
                defaults::DONE_TASK_RETENTION,
            )?,
            recount_interval: dur(
                "quotas.recount_interval",
                q.recount_interval,
                defaults::RECOUNT_INTERVAL,
            )?,
            purge_interval: dur(
                "quotas.purge_interval",
                q.purge_interval,
                defaults::PURGE_INTERVAL,
            )?,
        };
        Ok(Self {
            data_dir,
            server,
            storage: Storage {
                backend,
                durability,
                max_batch,
            },
            limits,
            log: Log { level, format },
            schedule: Schedule {
                timezone_name,
                timezone,
            },
            quotas,
            watch: Watch {
                allow_private: raw.watch.allow_private.unwrap_or(false),
                max_per_member: match raw.watch.max_per_member {
                    Some(0) => {
                        return Err(invalid(
                            "watch.max_per_member",
                            "must be at least 1".to_owned(),
                        ));
                    }
                    Some(n) => n,
                    None => defaults::WATCHES_PER_MEMBER,
                },
            },
            sandbox: sandbox(raw.sandbox)?,
            federation,
        })
    }
}

/// `[sandbox]`, checked.
fn sandbox(raw: RawSandbox) -> Result<Sandbox, ConfigError> {
    let positive = |key: &str, v: Option<u64>, default: u64, max: u64| match v {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(_) => Err(invalid(key, format!("must be 1 to {max}"))),
    };
    let admin_only = match raw.role.as_deref() {
        None | Some("member") => false,
        Some("admin") => true,
        Some(_) => {
            return Err(invalid(
                "sandbox.role",
                "must be member or admin".to_owned(),
            ));
        }
    };
    Ok(Sandbox {
        enabled: raw.enabled.unwrap_or(false),
        bwrap: raw.bwrap.unwrap_or_else(|| PathBuf::from("bwrap")),
        admin_only,
        wall_time: dur("sandbox.wall_time", raw.wall_time, Duration::from_secs(10))?,
        cpu_time: dur("sandbox.cpu_time", raw.cpu_time, Duration::from_secs(5))?,
        memory_mb: positive("sandbox.memory_mb", raw.memory_mb, 256, 65_536)?,
        processes: positive("sandbox.processes", raw.processes, 64, 4_096)?,
        file_size_mb: positive("sandbox.file_size_mb", raw.file_size_mb, 16, 65_536)?,
        scratch_mb: positive("sandbox.scratch_mb", raw.scratch_mb, 64, 65_536)?,
        output_kb: positive("sandbox.output_kb", raw.output_kb, 256, 65_536)?,
        per_mesh: match raw.per_mesh {
            None => 4,
            Some(n @ 1..=256) => n,
            Some(_) => return Err(invalid("sandbox.per_mesh", "must be 1 to 256".to_owned())),
        },
        runs_per_minute: match raw.runs_per_minute {
            None => 60,
            Some(n @ 1..=100_000) => n,
            Some(_) => {
                return Err(invalid(
                    "sandbox.runs_per_minute",
                    "must be 1 to 100000".to_owned(),
                ));
            }
        },
    })
}

fn validate_federation(
    raw: RawFederation,
    data_dir: &Path,
    limits: &Limits,
) -> Result<Federation, ConfigError> {
    let broker = raw.broker.ok_or_else(|| {
        invalid(
            "federation.broker",
            "is required when [federation] is present (this broker's DNS name)",
        )
    })?;
    let broker = dns_name("federation.broker", &broker, true)?;

    let listen_s = raw
        .listen
        .unwrap_or_else(|| defaults::FEDERATION_LISTEN.to_owned());
    let listen: SocketAddr = listen_s.parse().map_err(|_| {
        invalid(
            "federation.listen",
            format!("{listen_s:?} is not ADDRESS:PORT"),
        )
    })?;

    let certs = data_dir.join(defaults::FEDERATION_CERTS_DIR);
    let cert = file_path(
        "federation.cert",
        raw.cert,
        || certs.join(format!("{broker}.pem")),
        data_dir,
    )?;
    let key = file_path(
        "federation.key",
        raw.key,
        || certs.join(format!("{broker}.key")),
        data_dir,
    )?;
    let ca = file_path(
        "federation.ca",
        raw.ca,
        || certs.join(defaults::FEDERATION_CA_FILE),
        data_dir,
    )?;

    let nameservers = match raw.nameservers {
        None => None,
        Some(list) if list.is_empty() => {
            return Err(invalid(
                "federation.nameservers",
                "must list at least one IP[:PORT] (leave it out for the system resolver)",
            ));
        }
        Some(list) => Some(
            list.iter()
                .map(|s| nameserver("federation.nameservers", s))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };

    let presence_grace = dur(
        "federation.presence_grace",
        raw.presence_grace,
        defaults::FEDERATION_PRESENCE_GRACE,
    )?;
    let reconnect_min = dur(
        "federation.reconnect_min",
        raw.reconnect_min,
        defaults::FEDERATION_RECONNECT_MIN,
    )?;
    let reconnect_max = dur(
        "federation.reconnect_max",
        raw.reconnect_max,
        defaults::FEDERATION_RECONNECT_MAX,
    )?;
    if reconnect_min > reconnect_max {
        return Err(invalid(
            "federation.reconnect_min",
            "must not be longer than federation.reconnect_max",
        ));
    }
    let keepalive = dur(
        "federation.keepalive",
        raw.keepalive,
        defaults::FEDERATION_KEEPALIVE,
    )?;
    let idle_timeout = dur(
        "federation.idle_timeout",
        raw.idle_timeout,
        defaults::FEDERATION_IDLE_TIMEOUT,
    )?;
    if idle_timeout <= keepalive {
        return Err(invalid(
            "federation.idle_timeout",
            "must be longer than federation.keepalive",
        ));
    }

    let outbox_window = raw
        .outbox_window
        .unwrap_or(defaults::FEDERATION_OUTBOX_WINDOW);
    if !(1..=65_536).contains(&outbox_window) {
        return Err(invalid("federation.outbox_window", "must be 1..=65536"));
    }
    let max_frame_bytes = raw
        .max_frame_bytes
        .unwrap_or(defaults::FEDERATION_MAX_FRAME_BYTES);
    if !(64 * 1024..=64 * 1024 * 1024).contains(&max_frame_bytes) {
        return Err(invalid(
            "federation.max_frame_bytes",
            "must be 64 KiB..=64 MiB",
        ));
    }
    if max_frame_bytes < limits.max_message_bytes + defaults::FEDERATION_FRAME_OVERHEAD {
        return Err(invalid(
            "federation.max_frame_bytes",
            format!(
                "must be at least limits.max_message_bytes + {} (room to forward any message)",
                defaults::FEDERATION_FRAME_OVERHEAD
            ),
        ));
    }

    let mut peers: Vec<FederationPeer> = Vec::with_capacity(raw.peers.len());
    for (i, p) in raw.peers.into_iter().enumerate() {
        let at = format!("federation.peers[{i}]");
        let name_key = format!("{at}.name");
        let name = p
            .name
            .ok_or_else(|| invalid(&name_key, "is required (the peer broker's DNS name)"))?;
        let name = dns_name(&name_key, &name, true)?;
        if name == broker {
            return Err(invalid(&name_key, "is this broker's own name"));
        }
        if peers.iter().any(|q| q.name == name) {
            return Err(invalid(&name_key, format!("duplicate peer {name}")));
        }
        let addr = match p.addr {
            Some(a) => Some(peer_addr(&format!("{at}.addr"), &a)?),
            None => None,
        };
        let anchor = match (p.ca, p.pin) {
            (Some(ca), None) => PeerAnchorConfig::CaFile(file_path(
                &format!("{at}.ca"),
                Some(ca),
                PathBuf::new,
                data_dir,
            )?),
            (None, Some(pin)) => PeerAnchorConfig::Pin(parse_pin(&format!("{at}.pin"), &pin)?),
            (Some(_), Some(_)) => {
                return Err(invalid(&at, "give either ca or pin, not both"));
            }
            (None, None) => {
                return Err(invalid(
                    &at,
                    "needs ca (that organization's CA file) or pin (its SHA-256)",
                ));
            }
        };
        peers.push(FederationPeer { name, addr, anchor });
    }

    Ok(Federation {
        broker,
        listen,
        cert,
        key,
        ca,
        nameservers,
        presence_grace,
        spatial_interest: raw.spatial_interest.unwrap_or(true),
        reconnect_min,
        reconnect_max,
        keepalive,
        idle_timeout,
        outbox_window,
        max_frame_bytes,
        peers,
    })
}

/// A configured file path, or the default; relative paths are inside the data directory.
fn file_path(
    key: &str,
    raw: Option<PathBuf>,
    default: impl FnOnce() -> PathBuf,
    data_dir: &Path,
) -> Result<PathBuf, ConfigError> {
    match raw {
        None => Ok(default()),
        Some(p) if p.as_os_str().is_empty() => Err(invalid(key, "must not be empty")),
        Some(p) if p.is_relative() => Ok(data_dir.join(p)),
        Some(p) => Ok(p),
    }
}

/// Checks a host name and returns it lower-cased: dot-separated labels of 1–63
/// characters from `a-z0-9-`, not starting or ending with `-`, 253 characters in all.
/// `need_dot` demands a fully qualified name (as broker names are).
fn dns_name(key: &str, raw: &str, need_dot: bool) -> Result<String, ConfigError> {
    let name = raw.to_ascii_lowercase();
    let bad = |why: &str| invalid(key, format!("{raw:?} is not a DNS name: {why}"));
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > 253 {
        return Err(bad("longer than 253 characters"));
    }
    if need_dot && !name.contains('.') {
        return Err(bad("needs at least one dot (a fully qualified name)"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(bad("empty label"));
        }
        if label.len() > 63 {
            return Err(bad("label longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(bad(
                "only a-z, 0-9, '-' and '.' are allowed (use the punycode form of IDNs)",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a label starts or ends with '-'"));
        }
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad(
            "the last label is numeric (an IP address is not a name)",
        ));
    }
    Ok(name)
}

/// `IP:PORT` (IPv6 in brackets) or `HOST:PORT`; port 1–65535. Returns the normalized
/// form (host lower-cased).
fn peer_addr(key: &str, raw: &str) -> Result<String, ConfigError> {
    if let Ok(sa) = raw.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err(invalid(key, format!("{raw:?}: port must not be 0")));
        }
        return Ok(sa.to_string());
    }
    let Some((host, port)) = raw.rsplit_once(':') else {
        return Err(invalid(key, format!("{raw:?} is not HOST:PORT or IP:PORT")));
    };
    if host.contains(':') || host.starts_with('[') {
        return Err(invalid(
            key,
            format!("{raw:?} is not IP:PORT (IPv6 addresses go in brackets: [::1]:7901)"),
        ));
    }
    let port: u16 = match port.parse() {
        Ok(p) if p != 0 => p,
        _ => return Err(invalid(key, format!("{raw:?}: port must be 1..=65535"))),
    };
    let host = dns_name(key, host, false)?;
    Ok(format!("{host}:{port}"))
}

/// `IP:PORT` or `IP` (port 53).
fn nameserver(key: &str, raw: &str) -> Result<SocketAddr, ConfigError> {
    let s = raw.trim();
    if let Ok(sa) = s.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err(invalid(key, format!("{raw:?}: port must not be 0")));
        }
        return Ok(sa);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, defaults::DNS_PORT))
        .map_err(|_| invalid(key, format!("{raw:?} is not IP or IP:PORT")))
}

/// The SHA-256 of a CA: 64 hex digits, optionally as colon-separated byte pairs, with an
/// optional `sha256:` prefix.
fn parse_pin(key: &str, raw: &str) -> Result<[u8; 32], ConfigError> {
    let bad = || {
        invalid(
            key,
            "is not a SHA-256 pin: 64 hex digits (optionally as AB:CD:… pairs), optional \"sha256:\" prefix",
        )
    };
    let s = raw.trim();
    let s = match s.get(..7) {
        Some(p) if p.eq_ignore_ascii_case("sha256:") => &s[7..],
        _ => s,
    };
    let pairs: Vec<&str> = if s.contains(':') {
        s.split(':').collect()
    } else {
        if s.len() != 64 || !s.is_ascii() {
            return Err(bad());
        }
        (0..32).map(|i| &s[2 * i..2 * i + 2]).collect()
    };
    if pairs.len() != 32 {
        return Err(bad());
    }
    let mut pin = [0u8; 32];
    for (b, pair) in pin.iter_mut().zip(pairs) {
        // (from_str_radix alone would accept a sign: "+a")
        if pair.len() != 2 || !pair.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *b = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
    }
    Ok(pin)
}

/// Longest duration any setting accepts: ten years (timers beyond it would overflow).
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Largest count or size any setting accepts.
const MAX_COUNT: usize = 1 << 32;

fn dur(key: &str, raw: Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    match raw {
        None => Ok(default),
        Some(s) => {
            let d = parse_duration(&s).map_err(|e| invalid(key, e))?;
            if d.is_zero() {
                return Err(invalid(key, "must be greater than zero"));
            }
            if d > MAX_DURATION {
                return Err(invalid(key, "must be at most 3650d"));
            }
            Ok(d)
        }
    }
}

fn positive(key: &str, raw: Option<usize>, default: usize) -> Result<usize, ConfigError> {
    match raw {
        Some(0) => Err(invalid(key, "must be at least 1")),
        Some(n) if n > MAX_COUNT => Err(invalid(key, format!("must be at most {MAX_COUNT}"))),
        Some(n) => Ok(n),
        None => Ok(default),
    }
}

fn validate_ws_url(key: &str, url: &str) -> Result<String, ConfigError> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
        .ok_or_else(|| invalid(key, format!("{url:?} must start with ws:// or wss://")))?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(invalid(key, format!("{url:?} has no host")));
    }
    Ok(url.to_owned())
}

fn parse_backend(url: &str, data_dir: &Path) -> Result<Backend, ConfigError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Backend::Postgres {
            url: Secret::new(url.to_owned()),
        });
    }
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        let path = path.split('?').next().unwrap_or("");
        if path.is_empty() || path == ":memory:" {
            return Err(invalid(
                "storage.url",
                "an SQLite URL needs a file path (meshd must persist)",
            ));
        }
        let path = PathBuf::from(path);
        let path = if path.is_relative() {
            data_dir.join(path)
        } else {
            path
        };
        return Ok(Backend::Sqlite { path });
    }
    Err(invalid(
        "storage.url",
        "must start with sqlite:// or postgres:// (the password is not shown here)",
    ))
}

/// Applies `MESHD_<PATH>` variables onto the parsed file.
fn overlay_env(table: &mut toml::Table, vars: &[(String, String)]) -> Result<(), ConfigError> {
    for (name, raw) in vars {
        let Some(suffix) = name.strip_prefix("MESHD_") else {
            continue;
        };
        if NON_KEY_ENV.contains(&name.as_str())
            || suffix.starts_with("TEST_")
            || suffix.starts_with("BENCH_")
        {
            continue;
        }
        let Some(path) = KEYS
            .iter()
            .find(|k| k.replace('.', "_").eq_ignore_ascii_case(suffix))
        else {
            return Err(ConfigError::UnknownEnv(name.clone()));
        };
        // A TOML literal (number, boolean, quoted string) keeps its type; anything else
        // (`10s`, `127.0.0.1:7900`) is a string.
        let mut value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        if ENV_LIST_KEYS.contains(path)
            && let toml::Value::String(s) = &value
        {
            value = toml::Value::Array(
                s.split(',')
                    .map(str::trim)
                    .filter(|x| !x.is_empty())
                    .map(|x| toml::Value::String(x.to_owned()))
                    .collect(),
            );
        }
        let mut parts = path.split('.').peekable();
        let mut cursor = &mut *table;
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                cursor.insert(part.to_owned(), value.clone());
                break;
            }
            let entry = cursor
                .entry(part.to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cursor = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(invalid(path, format!("{part} is not a table in the file")));
                }
            };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Environment {
        Environment::from_vars(vars.iter().map(|(a, b)| (a.to_string(), b.to_string())))
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::defaults(&env(&[("HOME", "/home/u")]), &Overrides::default()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/home/u/.local/share/meshd"));
        assert_eq!(c.server.listen.to_string(), defaults::LISTEN);
        assert!(
            matches!(&c.storage.backend, Backend::Sqlite { path } if path.ends_with("meshd.db"))
        );
        assert_eq!(c.public_url(), ("ws://127.0.0.1:7900/ws".into(), true));
        assert_eq!(c.limits.max_frame_bytes, 2 * 1024 * 1024);
    }

    #[test]
    fn systemd_state_directory_wins_over_home() {
        let c = Config::defaults(
            &env(&[("HOME", "/root"), ("STATE_DIRECTORY", "/var/lib/meshd")]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/meshd"));
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::load(
            Some(("meshd.toml", "[limits]\nmax_frames = 3\n")),
            &env(&[]),
            &Overrides::default(),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("max_frames") && msg.contains("meshd.toml"),
            "{msg}"
        );

        let err = Config::load(
            None,
            &env(&[("MESHD_LIMITS_MAX_FRAMES", "3")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::UnknownEnv(v) if v == "MESHD_LIMITS_MAX_FRAMES"));
    }

    #[test]
    fn precedence_flag_over_env_over_file() {
        let file = "[server]\nlisten = \"127.0.0.1:1000\"\npublic_url = \"wss://file.example/ws\"\n[limits]\nhello_timeout = \"5s\"\n";
        let vars = env(&[
            ("MESHD_SERVER_LISTEN", "127.0.0.1:2000"),
            ("MESHD_LIMITS_MAX_CONNECTIONS", "77"),
            ("MESHD_CONFIG", "/etc/meshd.toml"),
        ]);
        let c = Config::load(Some(("f", file)), &vars, &Overrides::default()).unwrap();
        assert_eq!(c.server.listen.port(), 2000);
        assert_eq!(c.limits.max_connections, 77);
        assert_eq!(c.limits.hello_timeout, Duration::from_secs(5));
        let ov = Overrides {
            listen: Some("127.0.0.1:3000".into()),
            ..Default::default()
        };
        let c = Config::load(Some(("f", file)), &vars, &ov).unwrap();
        assert_eq!(c.server.listen.port(), 3000);
        assert_eq!(c.public_url(), ("wss://file.example/ws".into(), false));
    }

    #[test]
    fn invalid_values_name_the_key() {
        let cases = [
            ("[server]\nlisten = \"nope\"", "server.listen"),
            (
                "[server]\npublic_url = \"http://x/ws\"",
                "server.public_url",
            ),
            (
                "[storage]\ndurability = \"sometimes\"",
                "storage.durability",
            ),
            ("[storage]\nurl = \"mysql://x\"", "storage.url"),
            ("[limits]\nhello_timeout = \"ten\"", "limits.hello_timeout"),
            (
                "[limits]\nmax_message_bytes = 99999999",
                "limits.max_message_bytes",
            ),
            ("[limits]\nmax_connections = 0", "limits.max_connections"),
            (
                "[limits]\noutbound_queue = 99999999999",
                "limits.outbound_queue",
            ),
            ("[limits]\nqueue_ttl = \"99999d\"", "limits.queue_ttl"),
            ("[log]\nformat = \"xml\"", "log.format"),
            (
                "[schedule]\ntimezone = \"Mars/Olympus\"",
                "schedule.timezone",
            ),
            (
                "[server]\nunsigned_uploads = \"maybe\"",
                "server.unsigned_uploads",
            ),
            (
                "[server]\ntrusted_proxies = [\"proxy\"]",
                "server.trusted_proxies",
            ),
        ];
        for (text, key) in cases {
            let err =
                Config::load(Some(("f", text)), &env(&[]), &Overrides::default()).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        let err = Config::load(
            Some(("f", "[limits]\nmax_connections = \"x\"")),
            &env(&[]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("max_connections"), "{err}");
    }

    #[test]
    fn postgres_password_is_masked() {
        let c = Config::load(
            None,
            &env(&[("MESHD_STORAGE_URL", "postgres://meshd:hunter2@db/meshd")]),
            &Overrides::default(),
        )
        .unwrap();
        let printed = format!("{c:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(matches!(c.storage.backend, Backend::Postgres { .. }));
    }

    #[test]
    fn relative_sqlite_paths_live_in_the_data_dir() {
        let ov = Overrides {
            data_dir: Some("/srv/m".into()),
            database_url: Some("sqlite://x.db".into()),
            ..Default::default()
        };
        let c = Config::defaults(&env(&[]), &ov).unwrap();
        assert!(
            matches!(&c.storage.backend, Backend::Sqlite { path } if path == Path::new("/srv/m/x.db"))
        );
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../meshd.example.toml");
        let c = Config::load(
            Some(("meshd.example.toml", text)),
            &env(&[]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/meshd"));
        assert!(
            c.federation.is_none(),
            "the example's [federation] is commented out"
        );
    }

    /// The example's `[federation]` block, uncommented.
    fn example_with_federation() -> String {
        let text = include_str!("../meshd.example.toml");
        let (head, block) = text.split_once("\n# [federation]\n").unwrap();
        let block: Vec<&str> = block
            .lines()
            .map(|l| l.strip_prefix("# ").or(l.strip_prefix('#')).unwrap_or(l))
            .collect();
        format!("{head}\n[federation]\n{}\n", block.join("\n"))
    }

    #[test]
    fn example_federation_section_parses_when_uncommented() {
        let text = example_with_federation();
        let c = Config::load(Some(("example", &text)), &env(&[]), &Overrides::default())
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        let f = c.federation.unwrap();
        assert_eq!(f.broker, "mesh.acme.example");
        assert_eq!(f.listen.to_string(), defaults::FEDERATION_LISTEN);
        assert_eq!(
            f.cert,
            PathBuf::from("/var/lib/meshd/certs/mesh.acme.example.pem")
        );
        assert_eq!(
            f.key,
            PathBuf::from("/var/lib/meshd/certs/mesh.acme.example.key")
        );
        assert_eq!(f.ca, PathBuf::from("/var/lib/meshd/certs/ca.pem"));
        assert_eq!(f.nameservers, Some(vec!["127.0.0.1:5353".parse().unwrap()]));
        assert_eq!(f.presence_grace, defaults::FEDERATION_PRESENCE_GRACE);
        assert!(f.spatial_interest, "interest management is on by default");
        assert_eq!(f.reconnect_min, defaults::FEDERATION_RECONNECT_MIN);
        assert_eq!(f.reconnect_max, defaults::FEDERATION_RECONNECT_MAX);
        assert_eq!(f.keepalive, defaults::FEDERATION_KEEPALIVE);
        assert_eq!(f.idle_timeout, defaults::FEDERATION_IDLE_TIMEOUT);
        assert_eq!(f.outbox_window, defaults::FEDERATION_OUTBOX_WINDOW);
        assert_eq!(f.max_frame_bytes, defaults::FEDERATION_MAX_FRAME_BYTES);
        assert_eq!(f.peers.len(), 2);
        assert_eq!(
            f.peers[0],
            FederationPeer {
                name: "mesh.globex.example".into(),
                addr: Some("203.0.113.7:7901".into()),
                anchor: PeerAnchorConfig::CaFile("/etc/meshd/peers/globex-ca.pem".into()),
            }
        );
        assert_eq!(f.peers[1].name, "mesh.initech.example");
        assert_eq!(f.peers[1].addr, None);
        let PeerAnchorConfig::Pin(pin) = f.peers[1].anchor else {
            panic!("{:?}", f.peers[1].anchor)
        };
        assert_eq!(pin[..3], [0x9f, 0x86, 0xd0]);
        assert_eq!(pin[31], 0x08);
    }

    const PIN: &str = "ab00000000000000000000000000000000000000000000000000000000000001";

    fn fed(text: &str) -> Result<Option<Federation>, ConfigError> {
        let file = format!("data_dir = \"/srv/m\"\n{text}");
        Config::load(Some(("f", &file)), &env(&[]), &Overrides::default()).map(|c| c.federation)
    }

    fn fed_err(text: &str) -> String {
        fed(text).unwrap_err().to_string()
    }

    #[test]
    fn federation_absent_is_none_and_defaults_derive_from_data_dir() {
        assert!(fed("").unwrap().is_none());
        assert!(
            Config::defaults(&env(&[]), &Overrides::default())
                .unwrap()
                .federation
                .is_none()
        );
        let f = fed("[federation]\nbroker = \"Mesh.A.Example\"\n")
            .unwrap()
            .unwrap();
        assert_eq!(f.broker, "mesh.a.example");
        assert_eq!(f.cert, PathBuf::from("/srv/m/certs/mesh.a.example.pem"));
        assert_eq!(f.key, PathBuf::from("/srv/m/certs/mesh.a.example.key"));
        assert_eq!(f.ca, PathBuf::from("/srv/m/certs/ca.pem"));
        assert_eq!(f.nameservers, None);
        assert!(f.peers.is_empty());
        // Relative paths are inside the data directory, absolute ones are kept.
        let f = fed("[federation]\nbroker = \"a.example\"\ncert = \"x/c.pem\"\nkey = \"/k\"\n")
            .unwrap()
            .unwrap();
        assert_eq!(f.cert, PathBuf::from("/srv/m/x/c.pem"));
        assert_eq!(f.key, PathBuf::from("/k"));
    }

    #[test]
    fn federation_values_are_checked() {
        let msg = fed_err("[federation]\nlisten = \"0.0.0.0:1\"\n");
        assert!(
            msg.contains("federation.broker") && msg.contains("required"),
            "{msg}"
        );
        for bad in [
            "nodot",
            "a..example",
            "-a.example",
            "a-.example",
            "a_b.example",
            "1.2.3.4",
            "bücher.example",
            "a.example.",
        ] {
            let msg = fed_err(&format!("[federation]\nbroker = \"{bad}\"\n"));
            assert!(msg.contains("federation.broker"), "{bad}: {msg}");
        }
        let long = format!("{}.example", "a".repeat(64));
        assert!(fed_err(&format!("[federation]\nbroker = \"{long}\"\n")).contains("63"));
        let long = vec!["a".repeat(63); 4].join(".");
        assert!(fed_err(&format!("[federation]\nbroker = \"{long}\"\n")).contains("253"));

        let b = "[federation]\nbroker = \"a.example\"\n";
        let cases = [
            ("listen = \"nope\"", "federation.listen"),
            ("cert = \"\"", "federation.cert"),
            ("nameservers = []", "federation.nameservers"),
            ("nameservers = [\"dns.example\"]", "federation.nameservers"),
            ("presence_grace = \"0s\"", "federation.presence_grace"),
            (
                "reconnect_min = \"1m\"\nreconnect_max = \"30s\"",
                "federation.reconnect_min",
            ),
            (
                "keepalive = \"30s\"\nidle_timeout = \"30s\"",
                "federation.idle_timeout",
            ),
            ("outbox_window = 0", "federation.outbox_window"),
            ("outbox_window = 65537", "federation.outbox_window"),
            ("max_frame_bytes = 65535", "federation.max_frame_bytes"),
            ("max_frame_bytes = 67108865", "federation.max_frame_bytes"),
            // Must hold the largest message a client may send (1 MiB by default).
            ("max_frame_bytes = 1048576", "federation.max_frame_bytes"),
        ];
        for (text, key) in cases {
            let msg = fed_err(&format!("{b}{text}\n"));
            assert!(msg.contains(key), "{text}: {msg}");
        }
        let f = fed(&format!(
            "{b}listen = \"[::]:0\"\nnameservers = [\"10.0.0.1\", \"[::1]:5353\"]\nreconnect_min = \"1s\"\nreconnect_max = \"1s\"\nmax_frame_bytes = 67108864\n"
        ))
        .unwrap()
        .unwrap();
        assert_eq!(f.listen.port(), 0);
        assert_eq!(
            f.nameservers.unwrap(),
            vec![
                "10.0.0.1:53".parse::<SocketAddr>().unwrap(),
                "[::1]:5353".parse().unwrap()
            ]
        );
    }

    #[test]
    fn federation_peers_are_checked() {
        let b = "[federation]\nbroker = \"mesh.a.example\"\n";
        let peer = |body: &str| format!("[[federation.peers]]\n{body}\n");
        let ok_b = peer(&format!("name = \"mesh.b.example\"\npin = \"{PIN}\""));

        let msg = fed_err(&format!(
            "{b}{ok_b}{}",
            peer("name = \"mesh.c.example\"\nca = \"c.pem\"\npin = \"sha256:00\"")
        ));
        assert!(
            msg.contains("federation.peers[1]`") && msg.contains("not both"),
            "{msg}"
        );
        let msg = fed_err(&format!("{b}{}", peer("name = \"mesh.c.example\"")));
        assert!(msg.contains("federation.peers[0]`"), "{msg}");

        let msg = fed_err(&format!(
            "{b}{ok_b}{}",
            peer(&format!("name = \"MESH.B.example\"\npin = \"{PIN}\""))
        ));
        assert!(
            msg.contains("federation.peers[1].name")
                && msg.contains("duplicate peer mesh.b.example"),
            "{msg}"
        );
        let msg = fed_err(&format!(
            "{b}{}",
            peer(&format!("name = \"mesh.a.example\"\npin = \"{PIN}\""))
        ));
        assert!(
            msg.contains("federation.peers[0].name") && msg.contains("own name"),
            "{msg}"
        );
        let msg = fed_err(&format!("{b}{}", peer(&format!("pin = \"{PIN}\""))));
        assert!(msg.contains("federation.peers[0].name"), "{msg}");
        let msg = fed_err(&format!(
            "{b}{}",
            peer(&format!("name = \"bad_name.example\"\npin = \"{PIN}\""))
        ));
        assert!(msg.contains("federation.peers[0].name"), "{msg}");

        for bad in [
            "sha256:00",
            &PIN[1..],
            &format!("{PIN}00"),
            &PIN.replace('a', "g"),
            &format!("+{}", &PIN[1..]),
            "ab:cd",
        ] {
            let msg = fed_err(&format!(
                "{b}{}",
                peer(&format!("name = \"mesh.b.example\"\npin = \"{bad}\""))
            ));
            assert!(msg.contains("federation.peers[0].pin"), "{bad}: {msg}");
        }
        let colons = (0..32)
            .map(|i| format!("{i:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        for good in [
            PIN.to_owned(),
            format!("SHA256:{}", PIN.to_uppercase()),
            colons,
        ] {
            let f = fed(&format!(
                "{b}{}",
                peer(&format!("name = \"mesh.b.example\"\npin = \"{good}\""))
            ))
            .unwrap_or_else(|e| panic!("{good}: {e}"))
            .unwrap();
            assert!(
                matches!(f.peers[0].anchor, PeerAnchorConfig::Pin(_)),
                "{good}"
            );
        }

        for bad in [
            "x",
            "h.example",
            "h.example:0",
            "::1:7901",
            "[::1]",
            "h_x:1",
        ] {
            let msg = fed_err(&format!(
                "{b}{}",
                peer(&format!(
                    "name = \"mesh.b.example\"\naddr = \"{bad}\"\npin = \"{PIN}\""
                ))
            ));
            assert!(msg.contains("federation.peers[0].addr"), "{bad}: {msg}");
        }
        let f = fed(&format!(
            "{b}{}",
            peer(
                "name = \"mesh.b.example\"\naddr = \"Broker.B.Example:7901\"\nca = \"peers/b.pem\""
            )
        ))
        .unwrap()
        .unwrap();
        assert_eq!(f.peers[0].addr.as_deref(), Some("broker.b.example:7901"));
        assert_eq!(
            f.peers[0].anchor,
            PeerAnchorConfig::CaFile("/srv/m/peers/b.pem".into())
        );

        let msg = fed_err(&format!(
            "{b}{}",
            peer(&format!(
                "name = \"mesh.b.example\"\npin = \"{PIN}\"\npinn = 1"
            ))
        ));
        assert!(msg.contains("pinn"), "{msg}");
        let msg = fed_err("[federation]\nbroker = \"a.example\"\nbrokr = 1\n");
        assert!(msg.contains("brokr"), "{msg}");
    }

    #[test]
    fn federation_from_the_environment() {
        let c = Config::load(
            None,
            &env(&[
                ("MESHD_FEDERATION_BROKER", "mesh.env.example"),
                ("MESHD_FEDERATION_NAMESERVERS", "127.0.0.1:5353, 10.0.0.2"),
                ("MESHD_DATA_DIR", "/d"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        let f = c.federation.unwrap();
        assert_eq!(f.broker, "mesh.env.example");
        assert_eq!(f.cert, PathBuf::from("/d/certs/mesh.env.example.pem"));
        assert_eq!(
            f.nameservers.unwrap(),
            vec![
                "127.0.0.1:5353".parse::<SocketAddr>().unwrap(),
                "10.0.0.2:53".parse().unwrap()
            ]
        );

        // The environment wins over the file, and peers from the file stay.
        let file = format!(
            "[federation]\nbroker = \"mesh.file.example\"\n[[federation.peers]]\nname = \"mesh.b.example\"\npin = \"{PIN}\"\n"
        );
        let c = Config::load(
            Some(("f", &file)),
            &env(&[("MESHD_FEDERATION_BROKER", "mesh.env.example")]),
            &Overrides::default(),
        )
        .unwrap();
        let f = c.federation.unwrap();
        assert_eq!(f.broker, "mesh.env.example");
        assert_eq!(f.peers.len(), 1);

        let err = Config::load(
            None,
            &env(&[("MESHD_FEDERATION_PEERS", "x")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::UnknownEnv(_)), "{err}");
        // Any federation variable enables the section, which then needs its broker.
        let err = Config::load(
            None,
            &env(&[("MESHD_FEDERATION_KEEPALIVE", "1s")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("federation.broker"), "{err}");
    }

    #[test]
    fn every_key_has_an_env_name_that_round_trips() {
        for key in KEYS {
            let var = format!("MESHD_{}", key.replace('.', "_").to_uppercase());
            let value = match *key {
                "data_dir" => "/tmp/x",
                "server.listen" => "127.0.0.1:1",
                "server.public_url" => "ws://h/ws",
                "storage.url" => "sqlite:///tmp/x.db",
                "storage.durability" => "fsync",
                "log.format" => "json",
                "schedule.timezone" => "Europe/Madrid",
                "server.trusted_proxies" => "127.0.0.1,::1",
                "server.unsigned_uploads" => "refuse",
                "log.level" => "debug",
                "storage.max_batch" => "1000",
                "limits.max_frame_bytes" => "4194304",
                "limits.idle_timeout" => "100s",
                "federation.broker" => "mesh.b.example",
                "federation.listen" => "0.0.0.0:0",
                "federation.nameservers" => "127.0.0.1:5353,10.0.0.1",
                "federation.reconnect_min" => "1s",
                "federation.keepalive" => "1s",
                "federation.outbox_window" => "2048",
                "federation.max_frame_bytes" => "8388608",
                "federation.reconnect_max" => "20s",
                "federation.spatial_interest" => "false",
                "watch.allow_private" => "true",
                "watch.max_per_member" => "5",
                "sandbox.enabled" => "true",
                "sandbox.bwrap" => "/usr/bin/bwrap",
                "sandbox.role" => "admin",
                "sandbox.wall_time" | "sandbox.cpu_time" => "20s",
                "sandbox.per_mesh" => "8",
                "sandbox.runs_per_minute"
                | "sandbox.memory_mb"
                | "sandbox.processes"
                | "sandbox.file_size_mb"
                | "sandbox.scratch_mb"
                | "sandbox.output_kb" => "100",
                "federation.cert" | "federation.key" | "federation.ca" => "/tmp/x.pem",
                k if k.ends_with("_timeout")
                    || k.ends_with("ttl")
                    || k.ends_with("interval")
                    || k.ends_with("retention")
                    || k.ends_with("lease")
                    || k.ends_with("grace") =>
                {
                    "20s"
                }
                _ => "70000",
            };
            let mut vars = vec![(var.as_str(), value)];
            if key.starts_with("federation.") && *key != "federation.broker" {
                vars.push(("MESHD_FEDERATION_BROKER", "mesh.a.example"));
            }
            let c = Config::load(None, &env(&vars), &Overrides::default())
                .unwrap_or_else(|e| panic!("{var}={value}: {e}"));
            assert_eq!(c.federation.is_some(), key.starts_with("federation."));
            if *key == "federation.spatial_interest" {
                assert!(c.federation.is_some_and(|f| !f.spatial_interest));
            }
        }
    }
}
