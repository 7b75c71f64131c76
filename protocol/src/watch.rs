//! URL watches (HEAD addendum §6): the frames, and the pure rules — which URLs and
//! headers are accepted, what value a response yields in each mode, and when a change
//! notifies. Fetching is the daemon's.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Shortest polling interval (seconds), as the reference.
pub const MIN_INTERVAL: u64 = 5;
/// Longest polling interval (seconds): a day.
pub const MAX_INTERVAL: u64 = 86_400;
/// Longest URL accepted.
pub const MAX_URL_LEN: usize = 2048;
/// Most request headers a watch sends.
pub const MAX_HEADERS: usize = 16;

/// What is compared between checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The first 16 hex digits of the body's SHA-256.
    Hash,
    /// The value at `extract` in the JSON body.
    Json,
    /// The HTTP status code.
    Status,
}

impl Mode {
    /// Wire spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Hash => "hash",
            Self::Json => "json",
            Self::Status => "status",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Self {
        match s {
            "json" => Self::Json,
            "status" => Self::Status,
            _ => Self::Hash,
        }
    }
}

/// When a new value notifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyOn {
    /// It differs from the previous one (`change`, also spelled `changed`).
    Change,
    /// On every check (`always`, which the CLI's help offers; the reference never fires it).
    Always,
    /// It has just become this (`match:X`).
    Match(String),
    /// It has just stopped being this (`not_match:X`).
    NotMatch(String),
}

impl NotifyOn {
    /// Parses `change`, `changed`, `always`, `match:X`, `not_match:X`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "change" | "changed" => Self::Change,
            "always" => Self::Always,
            _ => {
                if let Some(v) = s.strip_prefix("match:") {
                    Self::Match(v.to_owned())
                } else if let Some(v) = s.strip_prefix("not_match:") {
                    Self::NotMatch(v.to_owned())
                } else {
                    return None;
                }
            }
        })
    }

    /// The stored spelling.
    pub fn to_wire(&self) -> String {
        match self {
            Self::Change => "change".into(),
            Self::Always => "always".into(),
            Self::Match(v) => format!("match:{v}"),
            Self::NotMatch(v) => format!("not_match:{v}"),
        }
    }

    /// Whether going from `old` to `new` notifies. The first check (`old` `None`) only
    /// records a baseline.
    pub fn fires(&self, old: Option<&str>, new: &str) -> bool {
        let Some(old) = old else { return false };
        match self {
            Self::Change => old != new,
            Self::Always => true,
            Self::Match(v) => new == v && old != v,
            Self::NotMatch(v) => old == v && new != v,
        }
    }
}

/// An `http`/`https` URL split for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// TLS.
    pub https: bool,
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Path and query, starting with `/`.
    pub target: String,
}

/// Parses a watch URL.
///
/// # Errors
/// Anything but an absolute `http`/`https` URL with a host, no credentials, no
/// whitespace or control characters, at most [`MAX_URL_LEN`] bytes.
pub fn parse_url(s: &str) -> Result<Url, String> {
    if s.len() > MAX_URL_LEN || s.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err("url must be at most 2048 bytes without spaces or control characters".into());
    }
    let (https, rest) = if let Some(r) = s.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = s.strip_prefix("http://") {
        (false, r)
    } else {
        return Err("url must start with http:// or https://".into());
    };
    let (authority, target) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err("url must not carry credentials".into());
    }
    let target = target.split('#').next().unwrap_or("/");
    let target = if target.starts_with('?') {
        format!("/{target}")
    } else if target.is_empty() {
        "/".to_owned()
    } else {
        target.to_owned()
    };
    let default_port = if https { 443 } else { 80 };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or("unclosed [ in the url's host")?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| "bad port")?,
            None if after.is_empty() => default_port,
            None => return Err("bad host".into()),
        };
        (h.to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| "bad port")?),
            None => (authority.to_owned(), default_port),
        }
    };
    if host.is_empty() || port == 0 {
        return Err("url needs a host and a port above 0".into());
    }
    Ok(Url {
        https,
        host: host.to_ascii_lowercase(),
        port,
        target,
    })
}

/// The value a response yields: the status code, the value at a dot path of the JSON
/// body (`"null"` if absent; the first 200 characters when the body is no JSON), or the
/// first 16 hex digits of the body's SHA-256.
pub fn value_of(mode: Mode, extract: Option<&str>, status: u16, body: &[u8]) -> String {
    match (mode, extract) {
        (Mode::Status, _) => status.to_string(),
        (Mode::Json, Some(path)) => match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(v) => {
                let path = path.trim_start_matches('$').trim_start_matches('.');
                let mut cur = &v;
                for part in path.split('.').filter(|p| !p.is_empty()) {
                    cur = match cur {
                        serde_json::Value::Array(a) => {
                            part.parse::<usize>().ok().and_then(|i| a.get(i))
                        }
                        other => other.get(part),
                    }
                    .unwrap_or(&serde_json::Value::Null);
                }
                match cur {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                }
            }
            Err(_) => String::from_utf8_lossy(body).chars().take(200).collect(),
        },
        _ => hex::encode(&Sha256::digest(body)[..8]),
    }
}

/// `watch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchSpec {
    /// URL as given.
    pub url: String,
    /// Mode.
    pub mode: Mode,
    /// Dot path for `json`.
    pub extract: Option<String>,
    /// Seconds between checks.
    pub interval: u64,
    /// When to notify.
    pub notify_on: NotifyOn,
    /// Request headers.
    pub headers: Vec<(String, String)>,
    /// Label.
    pub label: Option<String>,
}

/// A watch request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Start watching.
    Watch(Box<WatchSpec>),
    /// Stop one.
    Unwatch {
        /// Watch id.
        watch_id: String,
    },
    /// List the member's watches.
    List,
}

/// Decodes a watch frame of type `kind`.
///
/// # Errors
/// A bad URL, mode, interval, notify rule or header.
pub fn decode(kind: &str, text: &str) -> Result<Request, serde_json::Error> {
    use serde::de::Error as _;
    #[derive(Deserialize)]
    struct Body {
        #[serde(default)]
        url: Option<String>,
        #[serde(default)]
        mode: Option<Mode>,
        #[serde(default)]
        extract: Option<String>,
        #[serde(default)]
        interval: Option<f64>,
        #[serde(default)]
        notify_on: Option<String>,
        #[serde(default)]
        headers: Option<std::collections::BTreeMap<String, String>>,
        #[serde(default)]
        label: Option<String>,
        #[serde(default, rename = "watchId")]
        watch_id: Option<String>,
        #[serde(default, rename = "watch_id")]
        watch_id_snake: Option<String>,
    }
    let err = |m: &str| serde_json::Error::custom(m);
    let b: Body = serde_json::from_str(text)?;
    Ok(match kind {
        "watch" => {
            let url = b.url.ok_or_else(|| err("url required"))?;
            parse_url(&url).map_err(|e| err(&e))?;
            let interval = b.interval.unwrap_or(30.0);
            if !interval.is_finite() || interval < 0.0 {
                return Err(err("interval must be seconds"));
            }
            // Finite and non-negative; clamped into range.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let interval = (interval as u64).clamp(MIN_INTERVAL, MAX_INTERVAL);
            let notify_on = match b.notify_on.as_deref() {
                None | Some("") => NotifyOn::Change,
                Some(n) => NotifyOn::parse(n).ok_or_else(|| {
                    err("notify_on must be change, always, match:<v> or not_match:<v>")
                })?,
            };
            let headers: Vec<(String, String)> =
                b.headers.unwrap_or_default().into_iter().collect();
            if headers.len() > MAX_HEADERS
                || headers.iter().any(|(k, v)| {
                    k.is_empty()
                        || !k
                            .bytes()
                            .all(|c| c.is_ascii_alphanumeric() || b"-_".contains(&c))
                        || v.len() > 1024
                        || v.bytes().any(|c| c == b'\r' || c == b'\n')
                        || matches!(
                            k.to_ascii_lowercase().as_str(),
                            "host" | "content-length" | "transfer-encoding" | "connection"
                        )
                })
            {
                return Err(err(
                    "headers: at most 16 plain name/value pairs (not Host, Content-Length, Transfer-Encoding, Connection)",
                ));
            }
            let mode = b.mode.unwrap_or(Mode::Hash);
            Request::Watch(Box::new(WatchSpec {
                url,
                mode,
                extract: b.extract.filter(|e| !e.is_empty() && e.len() <= 256),
                interval,
                notify_on,
                headers,
                label: b
                    .label
                    .filter(|l| !l.is_empty())
                    .map(|l| l.chars().take(256).collect()),
            }))
        }
        "unwatch" => Request::Unwatch {
            watch_id: b
                .watch_id
                .or(b.watch_id_snake)
                .filter(|w| !w.is_empty())
                .ok_or_else(|| err("watchId required"))?,
        },
        _ => Request::List,
    })
}

/// One entry of `watch_list_result`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchEntry {
    /// Id.
    pub id: String,
    /// URL.
    pub url: String,
    /// Mode.
    pub mode: Mode,
    /// Label.
    pub label: Option<String>,
    /// Seconds between checks.
    pub interval: u64,
    /// Last value in `hash` mode.
    pub last_hash: Option<String>,
    /// Last value.
    pub last_value: Option<String>,
    /// ISO time of the last check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_check: Option<String>,
    /// ISO creation time.
    pub created_at: String,
}

/// A watch reply.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// Answer to `watch` and `unwatch`.
    WatchAck {
        /// Id (the reference's field).
        #[serde(rename = "watchId")]
        watch_id: String,
        /// The same id, where the CLI looks for it.
        id: String,
        /// URL (`""` when an unwatch found nothing).
        url: String,
        /// Mode (`""` when an unwatch found nothing).
        mode: &'static str,
        /// Seconds between checks (0 after an unwatch).
        interval: u64,
        /// Correlation id.
        #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
    /// Answer to `watch_list`.
    WatchListResult {
        /// The member's watches.
        watches: Vec<WatchEntry>,
        /// Correlation id.
        #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u =
            parse_url("https://Example.com:8443/a/b?x=1#frag").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (u.https, u.host.as_str(), u.port, u.target.as_str()),
            (true, "example.com", 8443, "/a/b?x=1")
        );
        let u = parse_url("http://[::1]/").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((u.host.as_str(), u.port), ("::1", 80));
        assert_eq!(
            parse_url("http://h?q").map(|u| u.target).ok().as_deref(),
            Some("/?q")
        );
        for bad in [
            "ftp://x/",
            "http://",
            "http://u:p@h/",
            "http://h:0/",
            "http://h/a b",
            "http://h:x/",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn values_and_notifications() {
        assert_eq!(value_of(Mode::Status, None, 503, b""), "503");
        let body = br#"{"a":{"b":[{"c":"up"}],"n":3}}"#;
        assert_eq!(value_of(Mode::Json, Some("$.a.b.0.c"), 200, body), "up");
        assert_eq!(value_of(Mode::Json, Some("a.n"), 200, body), "3");
        assert_eq!(value_of(Mode::Json, Some("a.zzz"), 200, body), "null");
        assert_eq!(
            value_of(Mode::Json, Some("a"), 200, b"not json"),
            "not json"
        );
        assert_eq!(value_of(Mode::Hash, None, 200, b"abc"), "ba7816bf8f01cfea");
        let m = NotifyOn::parse("match:up").unwrap_or(NotifyOn::Change);
        assert!(!m.fires(None, "up"), "the first check is a baseline");
        assert!(m.fires(Some("down"), "up") && !m.fires(Some("up"), "up"));
        let n = NotifyOn::parse("not_match:up").unwrap_or(NotifyOn::Change);
        assert!(n.fires(Some("up"), "down") && !n.fires(Some("down"), "gone"));
        assert!(NotifyOn::Change.fires(Some("a"), "b") && !NotifyOn::Change.fires(Some("a"), "a"));
        assert!(NotifyOn::parse("sometimes").is_none());
    }

    #[test]
    fn frames() {
        let Ok(Request::Watch(w)) = decode(
            "watch",
            r#"{"url":"http://h/","interval":1,"headers":{"X-Token":"t"}}"#,
        ) else {
            panic!("not decoded")
        };
        assert_eq!(
            (w.interval, w.headers.len(), w.mode),
            (MIN_INTERVAL, 1, Mode::Hash)
        );
        assert!(decode("watch", r#"{"url":"http://h/","headers":{"Host":"evil"}}"#).is_err());
        assert!(decode("watch", r#"{"url":"http://h/","headers":{"X":"a\r\nb"}}"#).is_err());
        assert!(decode("watch", r#"{"url":"file:///etc/passwd"}"#).is_err());
        assert!(decode("unwatch", "{}").is_err());
    }
}
