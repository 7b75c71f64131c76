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

use std::net::SocketAddr;
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    public_url: Option<String>,
    shutdown_grace: Option<String>,
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
    max_state_value_bytes: Option<usize>,
    max_state_bytes_per_mesh: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<String>,
}

/// Every key the file accepts, as `section.key` (or `key` at the top level). The
/// `MESHD_*` variable for a key is `MESHD_` + the path upper-cased with `.` → `_`.
pub const KEYS: &[&str] = &[
    "data_dir",
    "server.listen",
    "server.public_url",
    "server.shutdown_grace",
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
    "limits.max_state_value_bytes",
    "limits.max_state_bytes_per_mesh",
    "log.level",
    "log.format",
];

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
    /// Largest shared-state value.
    pub max_state_value_bytes: usize,
    /// Shared state (keys and values) one mesh may hold, bytes.
    pub max_state_bytes_per_mesh: usize,
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
        let server = Server {
            listen,
            public_url,
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
        };
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
        })
    }
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
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
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
                "log.level" => "debug",
                "storage.max_batch" => "1000",
                "limits.max_frame_bytes" => "4194304",
                "limits.idle_timeout" => "100s",
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
            Config::load(None, &env(&[(&var, value)]), &Overrides::default())
                .unwrap_or_else(|e| panic!("{var}={value}: {e}"));
        }
    }
}
