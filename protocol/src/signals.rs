//! Typing indicators and read receipts (meshd extension), for people in the web app and
//! any client that wants them.
//!
//! Old clients never see them: a connection receives `typing` and `read` frames only
//! after it sent `{"type":"signals"}` (opt in). Client frames, all fire-and-forget (no
//! reply, so no claudemesh client waits on one):
//! - `signals` — opt this connection in;
//! - `typing {to}` — the sender is typing to the peer whose routing key is `to`;
//! - `read {to, messageIds}` — the sender has read these messages from `to`.
//!
//! The recipient's opted-in connections get `{type:"typing", from, fromMember,
//! fromName, at}` or `{type:"read", from, fromMember, fromName, messageIds, at}`; across
//! brokers they travel as a live federation frame ([`SignalRelay`]). Neither is stored:
//! a receipt for a peer that is offline is lost, as a typing indicator is.

use serde::{Deserialize, Serialize};

/// Most message ids in one receipt.
pub const MAX_IDS: usize = 100;
/// Longest message id.
pub const MAX_ID_LEN: usize = 64;

/// What a client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Opt this connection in.
    OptIn,
    /// Typing to `to`.
    Typing {
        /// Routing key of the peer.
        to: String,
    },
    /// Read `message_ids` from `to`.
    Read {
        /// Routing key of the peer that sent them.
        to: String,
        /// The messages read.
        message_ids: Vec<String>,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    message_ids: Option<Vec<String>>,
}

/// Decodes a `signals`, `typing` or `read` frame.
///
/// # Errors
/// A missing or over-long `to` (64 hex digits), or receipt ids out of bounds.
pub fn decode(kind: &str, text: &str) -> Result<Request, serde_json::Error> {
    use serde::de::Error as _;
    if kind == "signals" {
        return Ok(Request::OptIn);
    }
    let b: Body = serde_json::from_str(text)?;
    let to =
        b.to.filter(|t| t.len() == 64 && t.bytes().all(|c| c.is_ascii_hexdigit()))
            .map(|t| t.to_ascii_lowercase())
            .ok_or_else(|| serde_json::Error::custom("to must be a 64-hex-digit key"))?;
    if kind == "typing" {
        return Ok(Request::Typing { to });
    }
    let ids = b.message_ids.unwrap_or_default();
    if ids.is_empty()
        || ids.len() > MAX_IDS
        || ids
            .iter()
            .any(|i| i.is_empty() || i.len() > MAX_ID_LEN || i.contains('\0'))
    {
        return Err(serde_json::Error::custom(
            "messageIds: 1 to 100 ids of 1 to 64 bytes",
        ));
    }
    Ok(Request::Read {
        to,
        message_ids: ids,
    })
}

/// What an opted-in connection receives.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Push {
    /// `typing`.
    #[serde(rename_all = "camelCase")]
    Typing {
        /// The typing peer's routing key.
        from: String,
        /// Its member key.
        from_member: String,
        /// Its display name.
        from_name: String,
        /// When (ms).
        at: i64,
    },
    /// `read`.
    #[serde(rename_all = "camelCase")]
    Read {
        /// The reader's routing key.
        from: String,
        /// Its member key.
        from_member: String,
        /// Its display name.
        from_name: String,
        /// The messages read.
        message_ids: Vec<String>,
        /// When (ms).
        at: i64,
    },
}

/// A typing indicator or receipt for a peer of the receiving broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalRelay {
    /// Mesh id.
    pub mesh_id: String,
    /// The sender's routing key (a presence of the sending broker).
    pub from_key: String,
    /// Its member key (hosted by the sending broker).
    pub from_member_pubkey: String,
    /// Its display name.
    pub from_name: String,
    /// The recipient's routing key.
    pub to_key: String,
    /// `None`: typing; `Some`: a receipt for these messages.
    pub read: Option<Vec<String>>,
    /// When (ms).
    pub at: i64,
}

impl SignalRelay {
    /// Whether the fields are within the limits a client frame has.
    #[must_use]
    pub fn valid(&self) -> bool {
        self.from_name.len() <= crate::client::MAX_NAME_LEN
            && self.to_key.len() == 64
            && self.from_key.len() == 64
            && self.read.as_ref().is_none_or(|ids| {
                !ids.is_empty()
                    && ids.len() <= MAX_IDS
                    && ids.iter().all(|i| !i.is_empty() && i.len() <= MAX_ID_LEN)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_decode_within_bounds() {
        let k = "ab".repeat(32);
        assert_eq!(decode("signals", "{}").ok(), Some(Request::OptIn));
        assert_eq!(
            decode("typing", &format!(r#"{{"to":"{}"}}"#, k.to_uppercase())).ok(),
            Some(Request::Typing { to: k.clone() })
        );
        assert!(matches!(
            decode("read", &format!(r#"{{"to":"{k}","messageIds":["m1"]}}"#)),
            Ok(Request::Read { .. })
        ));
        let many: Vec<String> = (0..101).map(|i| format!("m{i}")).collect();
        for bad in [
            r#"{"to":"abc"}"#.to_owned(),
            "{}".to_owned(),
            format!(r#"{{"to":"{k}","messageIds":[]}}"#),
            format!(r#"{{"to":"{k}","messageIds":["{}"]}}"#, "x".repeat(65)),
            format!(r#"{{"to":"{k}","messageIds":{}}}"#, serde_json::json!(many)),
        ] {
            assert!(decode("read", &bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pushes_carry_their_type() {
        let v = serde_json::to_value(Push::Read {
            from: "a".into(),
            from_member: "b".into(),
            from_name: "Ada".into(),
            message_ids: vec!["m".into()],
            at: 5,
        })
        .unwrap_or_default();
        assert_eq!(v["type"], "read");
        assert_eq!(v["messageIds"][0], "m");
        assert_eq!(v["fromName"], "Ada");
    }
}
