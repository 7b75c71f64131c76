//! `invite_create` (meshd extension): a mesh admin mints an invite over its own
//! connection — what `meshd invite create` does at the server's shell, for admins who
//! are not there (the web app's admin page). Answered with `invite_created`, which
//! echoes `_reqId`; refused with `forbidden` for members who are not admins.

use serde::{Deserialize, Serialize};

/// Most enrollments one invite may allow.
pub const MAX_USES: i64 = 10_000;
/// Shortest and longest validity, seconds.
pub const MIN_TTL_S: i64 = 60;
/// 30 days.
pub const MAX_TTL_S: i64 = 30 * 24 * 3600;

/// An `invite_create` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Create {
    /// `admin` or `member`.
    pub role: crate::invite::Role,
    /// Enrollments allowed.
    pub max_uses: i64,
    /// Validity, seconds.
    pub ttl_s: i64,
    /// The WebSocket URL the invite pins when the broker has no `server.public_url`
    /// (the page passes the URL it reached the broker at).
    pub broker_url: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateBody {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    max_uses: Option<i64>,
    #[serde(default)]
    expires_in_s: Option<i64>,
    #[serde(default)]
    broker_url: Option<String>,
}

/// Decodes an `invite_create` body: role `member` (default) or `admin`, `maxUses`
/// 1..=[`MAX_USES`] (default 1), `expiresInS` [`MIN_TTL_S`]..=[`MAX_TTL_S`] (default one
/// day), `brokerUrl` a `ws://` or `wss://` URL of at most 512 bytes.
///
/// # Errors
/// A field out of range or of the wrong type.
pub fn decode(text: &str) -> Result<Create, serde_json::Error> {
    use serde::de::Error as _;
    let b: CreateBody = serde_json::from_str(text)?;
    let role = match b.role.as_deref().unwrap_or("member") {
        "member" => crate::invite::Role::Member,
        "admin" => crate::invite::Role::Admin,
        _ => return Err(serde_json::Error::custom("role must be member or admin")),
    };
    let max_uses = b.max_uses.unwrap_or(1);
    if !(1..=MAX_USES).contains(&max_uses) {
        return Err(serde_json::Error::custom("maxUses must be 1 to 10000"));
    }
    let ttl_s = b.expires_in_s.unwrap_or(24 * 3600);
    if !(MIN_TTL_S..=MAX_TTL_S).contains(&ttl_s) {
        return Err(serde_json::Error::custom(
            "expiresInS must be 60 to 2592000 (30 days)",
        ));
    }
    if let Some(u) = &b.broker_url
        && (u.len() > 512
            || !(u.starts_with("ws://") || u.starts_with("wss://"))
            || u.chars().any(char::is_control))
    {
        return Err(serde_json::Error::custom(
            "brokerUrl must be a ws:// or wss:// URL",
        ));
    }
    Ok(Create {
        role,
        max_uses,
        ttl_s,
        broker_url: b.broker_url,
    })
}

/// `invite_created`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename = "invite_created", rename_all = "camelCase")]
pub struct Created {
    /// The claudemesh v1 token.
    pub token: String,
    /// `ic://join/<token>` for `claudemesh join`.
    pub url: String,
    /// The web app's link for a person.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub web_url: Option<String>,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
    /// Role granted.
    pub role: String,
    /// Enrollments allowed.
    pub max_uses: i64,
    /// The broker URL the invite pins.
    pub broker_url: String,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_ranges() {
        let c = decode("{}").expect("defaults");
        assert_eq!(
            (c.role, c.max_uses, c.ttl_s),
            (crate::invite::Role::Member, 1, 86_400)
        );
        let c = decode(
            r#"{"role":"admin","maxUses":5,"expiresInS":3600,"brokerUrl":"wss://m.example/ws"}"#,
        )
        .expect("valid");
        assert_eq!(c.role, crate::invite::Role::Admin);
        assert_eq!(c.broker_url.as_deref(), Some("wss://m.example/ws"));
        for bad in [
            r#"{"role":"owner"}"#,
            r#"{"maxUses":0}"#,
            r#"{"maxUses":10001}"#,
            r#"{"expiresInS":59}"#,
            r#"{"expiresInS":2592001}"#,
            r#"{"brokerUrl":"http://x/ws"}"#,
            r#"{"brokerUrl":"ws://x/\n"}"#,
            r#"{"maxUses":"3"}"#,
        ] {
            assert!(decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_reply_has_its_type_and_req_id() {
        let v = serde_json::to_value(Created {
            token: "t".into(),
            url: "ic://join/t".into(),
            web_url: None,
            expires_at: 1,
            role: "member".into(),
            max_uses: 1,
            broker_url: "ws://x/ws".into(),
            req_id: Some("r".into()),
        })
        .unwrap_or_default();
        assert_eq!(v["type"], "invite_created");
        assert_eq!(v["_reqId"], "r");
        assert_eq!(v["maxUses"], 1);
    }
}
