//! `share_list` and `share_set` (meshd extension): a mesh admin sees which peer brokers
//! the mesh is exchanged with, and the state of each link, and shares or unshares it —
//! what `meshd mesh share` / `meshd mesh unshare` do at the server's shell, for admins
//! who are not there (the web app's admin page). Replies echo `_reqId`; members who
//! are not admins are told `forbidden`.

use serde::{Deserialize, Serialize};

/// A shares request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The mesh's peer brokers, with consent and link state.
    List,
    /// Offer the mesh to `broker` (`shared: true`; the mesh's home only) or withdraw
    /// this broker's consent (`shared: false`).
    Set {
        /// A configured peer broker's name.
        broker: String,
        /// Share or unshare.
        shared: bool,
    },
}

#[derive(Deserialize)]
struct SetBody {
    broker: String,
    shared: bool,
}

/// Longest broker name accepted (a DNS name).
pub const MAX_BROKER: usize = 253;

/// Decodes `share_list` / `share_set`.
///
/// # Errors
/// A `share_set` without a broker name of 1..=[`MAX_BROKER`] bytes or without `shared`.
pub fn decode(kind: &str, text: &str) -> Result<Request, serde_json::Error> {
    use serde::de::Error as _;
    if kind == "share_list" {
        return Ok(Request::List);
    }
    let b: SetBody = serde_json::from_str(text)?;
    let broker = b.broker.trim().trim_end_matches('.').to_ascii_lowercase();
    if broker.is_empty() || broker.len() > MAX_BROKER || broker.chars().any(char::is_control) {
        return Err(serde_json::Error::custom(
            "broker must be a peer broker's name",
        ));
    }
    Ok(Request::Set {
        broker,
        shared: b.shared,
    })
}

/// One peer broker in `share_list_result`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerShare {
    /// The peer broker's name.
    pub broker: String,
    /// This broker's consent: `offer` (we are home and share it), `accept` (we host a
    /// replica of its mesh), `roster` (a replica whose home lists this peer), or absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// The link's state (`up`, `connecting`, `backoff`, …).
    pub link: String,
    /// Whether the mesh flows over the link now (both sides consent, link up).
    pub flowing: bool,
    /// Last measured round trip, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
}

/// Replies.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// Answer to `share_list`.
    #[serde(rename_all = "camelCase")]
    ShareListResult {
        /// The mesh.
        mesh_id: String,
        /// This broker's name (absent without federation).
        #[serde(skip_serializing_if = "Option::is_none")]
        broker: Option<String>,
        /// Whether this broker is the mesh's home (only the home can offer it).
        home: bool,
        /// Every configured peer broker.
        peers: Vec<PeerShare>,
        /// Correlation id.
        #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
    /// Answer to `share_set`: the stored consent now (the running daemon applies it
    /// within a second).
    #[serde(rename_all = "camelCase")]
    ShareSetResult {
        /// The peer broker.
        broker: String,
        /// Whether this broker now consents.
        shared: bool,
        /// Correlation id.
        #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_names_a_broker_and_a_choice() {
        assert_eq!(decode("share_list", "{}").ok(), Some(Request::List));
        assert_eq!(
            decode("share_set", r#"{"broker":"B.Example.","shared":true}"#).ok(),
            Some(Request::Set {
                broker: "b.example".into(),
                shared: true
            })
        );
        for bad in [
            r#"{"broker":"b"}"#,
            r#"{"shared":true}"#,
            r#"{"broker":"","shared":true}"#,
            r#"{"broker":"b","shared":"yes"}"#,
        ] {
            assert!(decode("share_set", bad).is_err(), "{bad}");
        }
        let v = serde_json::to_value(Reply::ShareSetResult {
            broker: "b".into(),
            shared: false,
            req_id: Some("r".into()),
        })
        .unwrap();
        assert_eq!(v["type"], "share_set_result");
        assert_eq!(v["_reqId"], "r");
    }
}
