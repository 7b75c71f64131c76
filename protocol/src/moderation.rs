//! Moderation frames (HEAD addendum §4): `kick`, `disconnect`, `ban`, `unban`,
//! `list_bans`, and meshd's `member_role` (an admin makes a member admin or member: the
//! web app's admin page, and `meshd member role` at the shell). Every reply echoes
//! `_reqId`: the newest CLI matches them by it alone.

use serde::{Deserialize, Serialize};

/// Which connections a `kick` or `disconnect` closes: exactly one of the three.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Connections whose display name equals it, whose member key equals it or starts
    /// with it, or whose session key equals it.
    Target(String),
    /// Every other connection silent for longer than this many milliseconds.
    Stale(i64),
    /// Every other connection of the mesh.
    All,
}

/// A moderation request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Close connections with 4001 (`kicked`); control-plane connections are skipped.
    Kick(Selection),
    /// Close connections with 1000 (`disconnected`): the client may come straight back.
    Disconnect(Selection),
    /// Revoke a member (by name, key or unique key prefix) and close it with 4002.
    Ban {
        /// Name, key or key prefix.
        target: String,
    },
    /// Lift a ban (exact name or exact key).
    Unban {
        /// Name or key.
        target: String,
    },
    /// Every revoked member of the mesh.
    ListBans,
    /// meshd extension: give a member (exact name or key) the role `admin` or `member`.
    SetRole {
        /// Name or key.
        target: String,
        /// `admin` or `member`.
        role: crate::invite::Role,
    },
}

#[derive(Deserialize)]
struct SelectionBody {
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    stale: Option<f64>,
    #[serde(default)]
    all: Option<bool>,
}

#[derive(Deserialize)]
struct TargetBody {
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    role: Option<String>,
}

/// Decodes the body of a moderation frame of type `kind`.
///
/// # Errors
/// A body of the wrong shape: a selection that is not exactly one of `target`, `stale`
/// and `all`, a negative or non-finite `stale`, or a missing `target`.
pub fn decode(kind: &str, text: &str) -> Result<Request, serde_json::Error> {
    use serde::de::Error as _;
    let target = |text: &str| -> Result<String, serde_json::Error> {
        serde_json::from_str::<TargetBody>(text)?
            .target
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| serde_json::Error::custom("target required"))
    };
    Ok(match kind {
        "kick" | "disconnect" => {
            let b: SelectionBody = serde_json::from_str(text)?;
            let target = b
                .target
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty());
            let all = b.all == Some(true);
            let selection = match (target, b.stale, all) {
                (Some(t), None, false) => Selection::Target(t),
                (None, Some(ms), false) if ms.is_finite() && ms >= 0.0 => {
                    // Finite and non-negative: `as` saturates an absurd value.
                    #[allow(clippy::cast_possible_truncation)]
                    Selection::Stale(ms as i64)
                }
                (None, Some(_), false) => {
                    return Err(serde_json::Error::custom("stale must be milliseconds ≥ 0"));
                }
                (None, None, true) => Selection::All,
                _ => {
                    return Err(serde_json::Error::custom(
                        "exactly one of target, stale and all is required",
                    ));
                }
            };
            if kind == "kick" {
                Request::Kick(selection)
            } else {
                Request::Disconnect(selection)
            }
        }
        "ban" => Request::Ban {
            target: target(text)?,
        },
        "unban" => Request::Unban {
            target: target(text)?,
        },
        "member_role" => {
            let role = match serde_json::from_str::<TargetBody>(text)?.role.as_deref() {
                Some("admin") => crate::invite::Role::Admin,
                Some("member") => crate::invite::Role::Member,
                _ => return Err(serde_json::Error::custom("role must be admin or member")),
            };
            Request::SetRole {
                target: target(text)?,
                role,
            }
        }
        _ => Request::ListBans,
    })
}

/// One banned member of `list_bans_result`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ban {
    /// Display name.
    pub name: String,
    /// Member key.
    pub pubkey: String,
    /// ISO time of the ban.
    pub revoked_at: String,
}

/// A moderation reply.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// Answer to `kick`.
    KickAck {
        /// Names of the closed connections.
        kicked: Vec<String>,
        /// The same list (the reference sends both).
        affected: Vec<String>,
        /// Control-plane connections (daemons) left open: they would reconnect at once.
        #[serde(skip_serializing_if = "Option::is_none")]
        skipped_control_plane: Option<Vec<String>>,
        /// Correlation id.
        #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
    /// Answer to `disconnect`.
    DisconnectAck {
        /// Names of the closed connections.
        kicked: Vec<String>,
        /// The same list.
        affected: Vec<String>,
        /// Correlation id.
        #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
    /// Answer to `ban`.
    BanAck {
        /// The banned member's display name.
        banned: String,
        /// Correlation id.
        #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
    /// Answer to `unban`.
    UnbanAck {
        /// The member's display name.
        unbanned: String,
        /// Correlation id.
        #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
    /// Answer to `member_role`.
    MemberRoleSet {
        /// The member's display name.
        name: String,
        /// The member's key.
        pubkey: String,
        /// The role now held.
        role: &'static str,
        /// Correlation id.
        #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
    /// Answer to `list_bans`.
    ListBansResult {
        /// Revoked members, newest ban first.
        bans: Vec<Ban>,
        /// Correlation id.
        #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_change_names_a_member_and_a_known_role() {
        assert_eq!(
            decode("member_role", r#"{"target":"bob","role":"admin"}"#).ok(),
            Some(Request::SetRole {
                target: "bob".into(),
                role: crate::invite::Role::Admin
            })
        );
        for bad in [
            r#"{"target":"bob"}"#,
            r#"{"target":"bob","role":"owner"}"#,
            r#"{"role":"member"}"#,
            r#"{"target":"","role":"member"}"#,
        ] {
            assert!(decode("member_role", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_selection_is_exactly_one_of_three() {
        assert_eq!(
            decode("kick", r#"{"target":" bob "}"#).ok(),
            Some(Request::Kick(Selection::Target("bob".into())))
        );
        assert_eq!(
            decode("disconnect", r#"{"stale":1800000}"#).ok(),
            Some(Request::Disconnect(Selection::Stale(1_800_000)))
        );
        assert_eq!(
            decode("kick", r#"{"all":true}"#).ok(),
            Some(Request::Kick(Selection::All))
        );
        for bad in [
            "{}",
            r#"{"target":""}"#,
            r#"{"target":"a","all":true}"#,
            r#"{"stale":-5}"#,
            r#"{"all":false}"#,
            r#"{"stale":"1h"}"#,
        ] {
            assert!(decode("kick", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ban_needs_a_target() {
        assert!(decode("ban", "{}").is_err());
        assert!(decode("unban", r#"{"target":"  "}"#).is_err());
        assert_eq!(
            decode("ban", r#"{"target":"eve","reason":"spam"}"#).ok(),
            Some(Request::Ban {
                target: "eve".into()
            })
        );
    }

    #[test]
    fn replies_carry_their_type_and_req_id() {
        let r = Reply::KickAck {
            kicked: vec!["bob".into()],
            affected: vec!["bob".into()],
            skipped_control_plane: Some(vec!["daemon".into()]),
            req_id: Some("r1".into()),
        };
        let v: serde_json::Value = serde_json::to_value(&r).unwrap_or_default();
        assert_eq!(v["type"], "kick_ack");
        assert_eq!(v["_reqId"], "r1");
        assert_eq!(v["skipped_control_plane"][0], "daemon");
    }
}
