//! Mesh telemetry (the seed's roadmap; meshd extensions): `mesh_log` writes a structured
//! log entry, `mesh_logs` searches them, `mesh_report` sums a timeframe of the mesh up
//! for a Claude peer to read. Each is answered with a frame that echoes `_reqId`.

use serde::Deserialize;

/// Longest message, bytes.
pub const MAX_MESSAGE: usize = 4096;
/// Longest `data` (as JSON text), bytes.
pub const MAX_DATA: usize = 16 * 1024;
/// Most entries one `mesh_logs` returns.
pub const MAX_LAST: i64 = 500;

/// A log level, least to most severe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Detail.
    Debug,
    /// Normal events.
    Info,
    /// Something to look at.
    Warn,
    /// A failure.
    Error,
}

impl Level {
    /// Wire spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }

    /// Stored rank (0 debug … 3 error).
    pub const fn rank(self) -> i64 {
        self as i64
    }

    /// From a rank.
    pub const fn from_rank(r: i64) -> Option<Self> {
        match r {
            0 => Some(Self::Debug),
            1 => Some(Self::Info),
            2 => Some(Self::Warn),
            3 => Some(Self::Error),
            _ => None,
        }
    }

    /// From the wire (`warning` is `warn`).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "debug" | "trace" => Some(Self::Debug),
            "info" => Some(Self::Info),
            "warn" | "warning" => Some(Self::Warn),
            "error" | "fatal" => Some(Self::Error),
            _ => None,
        }
    }
}

/// A telemetry request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `mesh_log`.
    Log {
        /// Severity.
        level: Level,
        /// The message.
        message: String,
        /// Structured data (JSON text), if any.
        data: Option<String>,
    },
    /// `mesh_logs`.
    Logs {
        /// Full-text query over message and data.
        query: Option<String>,
        /// A peer's name or key (member or session).
        peer: Option<String>,
        /// At least this severe.
        level: Option<Level>,
        /// The newest this many (default 50).
        last: i64,
    },
    /// `mesh_report`.
    Report {
        /// The timeframe, milliseconds (default one day).
        timeframe_ms: i64,
    },
}

#[derive(Deserialize)]
struct LogBody {
    level: Option<String>,
    message: String,
    #[serde(default)]
    data: Option<Box<serde_json::value::RawValue>>,
}

#[derive(Deserialize)]
struct LogsBody {
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    peer: Option<String>,
    #[serde(default)]
    level: Option<String>,
    #[serde(default)]
    last: Option<i64>,
}

#[derive(Deserialize)]
struct ReportBody {
    #[serde(default)]
    timeframe: Option<String>,
}

/// Parses `15m`, `1h`, `24h`, `7d` (at most 30 days).
pub fn timeframe_ms(s: &str) -> Option<i64> {
    let s = s.trim();
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: i64 = n.parse().ok()?;
    let ms = match unit {
        "m" | "min" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        "d" => n.checked_mul(86_400_000)?,
        _ => return None,
    };
    (ms > 0 && ms <= 30 * 86_400_000).then_some(ms)
}

/// Decodes `mesh_log`, `mesh_logs` or `mesh_report` (also the MCP tools' and REST
/// routes' arguments).
///
/// # Errors
/// An unknown level, an empty or oversized message or data, `last` outside
/// 1..=[`MAX_LAST`], a timeframe that is not `<n>m|h|d` up to 30 days.
pub fn decode(kind: &str, text: &str) -> Result<Request, serde_json::Error> {
    use serde::de::Error as _;
    match kind {
        "mesh_log" => {
            let b: LogBody = serde_json::from_str(text)?;
            let level = match b.level.as_deref() {
                None => Level::Info,
                Some(l) => Level::parse(l).ok_or_else(|| {
                    serde_json::Error::custom("level must be debug, info, warn or error")
                })?,
            };
            if b.message.trim().is_empty() || b.message.len() > MAX_MESSAGE {
                return Err(serde_json::Error::custom("message must be 1 to 4096 bytes"));
            }
            let data = b.data.map(|d| d.get().to_owned()).filter(|d| d != "null");
            if data.as_ref().is_some_and(|d| d.len() > MAX_DATA) {
                return Err(serde_json::Error::custom(
                    "data must be at most 16 KiB of JSON",
                ));
            }
            Ok(Request::Log {
                level,
                message: b.message,
                data,
            })
        }
        "mesh_logs" => {
            let b: LogsBody = serde_json::from_str(text)?;
            let level = match b.level.as_deref() {
                None => None,
                Some(l) => Some(Level::parse(l).ok_or_else(|| {
                    serde_json::Error::custom("level must be debug, info, warn or error")
                })?),
            };
            let last = b.last.unwrap_or(50);
            if !(1..=MAX_LAST).contains(&last) {
                return Err(serde_json::Error::custom("last must be 1 to 500"));
            }
            let nonempty =
                |s: Option<String>| s.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
            Ok(Request::Logs {
                query: nonempty(b.query).map(|q| q.chars().take(512).collect()),
                peer: nonempty(b.peer),
                level,
                last,
            })
        }
        _ => {
            let b: ReportBody = serde_json::from_str(text)?;
            let timeframe_ms = match b.timeframe.as_deref() {
                None => 86_400_000,
                Some(t) => timeframe_ms(t).ok_or_else(|| {
                    serde_json::Error::custom(
                        "timeframe must be like 15m, 1h, 24h or 7d (at most 30d)",
                    )
                })?,
            };
            Ok(Request::Report { timeframe_ms })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_and_reports_are_bounded() {
        let r = decode(
            "mesh_log",
            r#"{"level":"warning","message":"disk low","data":{"free":3}}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::Log {
                level: Level::Warn,
                message: "disk low".into(),
                data: Some(r#"{"free":3}"#.into())
            }
        );
        assert!(decode("mesh_log", r#"{"message":""}"#).is_err());
        assert!(decode("mesh_log", r#"{"level":"loud","message":"x"}"#).is_err());
        let r = decode(
            "mesh_logs",
            r#"{"query":" disk ","level":"error","last":5}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::Logs {
                query: Some("disk".into()),
                peer: None,
                level: Some(Level::Error),
                last: 5
            }
        );
        assert!(decode("mesh_logs", r#"{"last":0}"#).is_err());
        assert_eq!(
            decode("mesh_report", r#"{"timeframe":"7d"}"#).unwrap(),
            Request::Report {
                timeframe_ms: 7 * 86_400_000
            }
        );
        assert!(decode("mesh_report", r#"{"timeframe":"forever"}"#).is_err());
        assert!(decode("mesh_report", r#"{"timeframe":"90d"}"#).is_err());
    }
}
