//! API keys (HEAD addendum §2): the frames that mint, list and revoke them, the secret's
//! format and its hash. A key is `cm_` + base64url(32 random bytes); the broker stores
//! only the SHA-256 of the whole string and its first 11 characters (to find it).

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Every key starts with this.
pub const SECRET_PREFIX: &str = "cm_";
/// Characters of the secret kept in clear to look it up (`cm_` plus 8).
pub const PREFIX_LEN: usize = 11;
/// Longest label accepted.
pub const MAX_LABEL_LEN: usize = 128;
/// Most topic scopes one key carries.
pub const MAX_SCOPES: usize = 64;

/// What a key may do. `admin` satisfies every other capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    /// Post messages (topic posts, DMs over the external WebSocket), seal topic keys.
    Send,
    /// Read topics, members, peers, notifications, the `/me` views.
    Read,
    /// Write shared state.
    StateWrite,
    /// Everything.
    Admin,
}

impl Capability {
    /// The wire spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Send => "send",
            Self::Read => "read",
            Self::StateWrite => "state_write",
            Self::Admin => "admin",
        }
    }

    /// Parses the wire spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "send" => Self::Send,
            "read" => Self::Read,
            "state_write" => Self::StateWrite,
            "admin" => Self::Admin,
            _ => return None,
        })
    }
}

/// Whether `held` grants `wanted` (`admin` grants all).
pub fn grants(held: &[Capability], wanted: Capability) -> bool {
    held.iter().any(|c| *c == wanted || *c == Capability::Admin)
}

/// `apikey_create`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateKey {
    /// Free text (trimmed, non-empty).
    pub label: String,
    /// At least one, de-duplicated.
    pub capabilities: Vec<Capability>,
    /// Topic names (without `#`) the key is limited to; `None`: every topic.
    pub topic_scopes: Option<Vec<String>>,
    /// ISO 8601 expiry, as sent (the broker parses it).
    pub expires_at: Option<String>,
}

/// An API key request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Mint a key.
    Create(CreateKey),
    /// List keys.
    List,
    /// Revoke a key by id or id prefix.
    Revoke {
        /// Id or prefix.
        id: String,
    },
}

/// Decodes the body of an API key frame of type `kind`.
///
/// # Errors
/// A missing label or capability, an unknown capability, a label or scope list that is
/// too long, or an empty id.
pub fn decode(kind: &str, text: &str) -> Result<Request, serde_json::Error> {
    use serde::de::Error as _;
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct CreateBody {
        #[serde(default)]
        label: Option<String>,
        #[serde(default)]
        capabilities: Option<Vec<String>>,
        #[serde(default)]
        topic_scopes: Option<Vec<String>>,
        #[serde(default)]
        expires_at: Option<String>,
    }
    #[derive(Deserialize)]
    struct RevokeBody {
        #[serde(default)]
        id: Option<String>,
    }
    Ok(match kind {
        "apikey_create" => {
            let b: CreateBody = serde_json::from_str(text)?;
            let label = b.label.map(|l| l.trim().to_owned()).unwrap_or_default();
            let caps = b.capabilities.unwrap_or_default();
            if label.is_empty() || caps.is_empty() {
                return Err(serde_json::Error::custom(
                    "label and at least one capability required",
                ));
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(serde_json::Error::custom(format!(
                    "label is at most {MAX_LABEL_LEN} bytes"
                )));
            }
            let mut capabilities = Vec::new();
            for c in &caps {
                let cap = Capability::parse(c).ok_or_else(|| {
                    serde_json::Error::custom(format!(
                        "unknown capability {c:?} (send, read, state_write, admin)"
                    ))
                })?;
                if !capabilities.contains(&cap) {
                    capabilities.push(cap);
                }
            }
            let topic_scopes = match b.topic_scopes {
                None => None,
                Some(s) if s.len() > MAX_SCOPES => {
                    return Err(serde_json::Error::custom(format!(
                        "at most {MAX_SCOPES} topic scopes"
                    )));
                }
                Some(s) => Some(
                    s.into_iter()
                        .map(|t| t.trim().trim_start_matches('#').to_owned())
                        .filter(|t| !t.is_empty())
                        .collect(),
                ),
            };
            Request::Create(CreateKey {
                label,
                capabilities,
                topic_scopes,
                expires_at: b.expires_at.filter(|e| !e.trim().is_empty()),
            })
        }
        "apikey_revoke" => {
            let id = serde_json::from_str::<RevokeBody>(text)?
                .id
                .map(|i| i.trim().to_owned())
                .filter(|i| !i.is_empty())
                .ok_or_else(|| serde_json::Error::custom("id required"))?;
            Request::Revoke { id }
        }
        _ => Request::List,
    })
}

/// A new secret from 32 random bytes.
pub fn secret_from(random: &[u8; 32]) -> String {
    format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
    )
}

/// The stored hash of a secret: lowercase hex SHA-256 of the whole string.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The lookup prefix of a presented secret, if it has the key format.
pub fn lookup_prefix(secret: &str) -> Option<&str> {
    (secret.starts_with(SECRET_PREFIX) && secret.len() >= PREFIX_LEN && secret.is_ascii())
        .then(|| &secret[..PREFIX_LEN])
}

/// One key as listed (never its secret).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyInfo {
    /// Id.
    pub id: String,
    /// Label.
    pub label: String,
    /// First 11 characters of the secret.
    pub prefix: String,
    /// Capabilities.
    pub capabilities: Vec<Capability>,
    /// Topic scopes (`null`: every topic).
    pub topic_scopes: Option<Vec<String>>,
    /// ISO creation time.
    pub created_at: String,
    /// ISO time of the last use.
    pub last_used_at: Option<String>,
    /// ISO revocation time.
    pub revoked_at: Option<String>,
    /// ISO expiry.
    pub expires_at: Option<String>,
}

/// An API key reply.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// Answer to `apikey_create`: the only time the secret is shown.
    ApikeyCreated {
        /// Id.
        id: String,
        /// The secret.
        secret: String,
        /// Label.
        label: String,
        /// Lookup prefix.
        prefix: String,
        /// Capabilities.
        capabilities: Vec<Capability>,
        /// Topic scopes.
        #[serde(rename = "topicScopes")]
        topic_scopes: Option<Vec<String>>,
        /// ISO creation time.
        #[serde(rename = "createdAt")]
        created_at: String,
        /// Correlation id.
        #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
    /// Answer to `apikey_list`.
    ApikeyListResponse {
        /// Keys, newest first.
        keys: Vec<KeyInfo>,
        /// Correlation id.
        #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
    /// Answer to `apikey_revoke`.
    ApikeyRevokeResponse {
        /// `revoked`, `not_found` or `not_unique`.
        status: &'static str,
        /// The revoked key's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// How many keys the prefix matched (`not_unique`).
        #[serde(skip_serializing_if = "Option::is_none")]
        matches: Option<usize>,
        /// Correlation id.
        #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_have_the_reference_format() {
        let s = secret_from(&[7; 32]);
        assert_eq!(s.len(), 46);
        assert_eq!(lookup_prefix(&s).map(str::len), Some(PREFIX_LEN));
        assert_eq!(hash_secret(&s).len(), 64);
        assert_eq!(lookup_prefix("cm_short"), None);
        assert_eq!(lookup_prefix("xx_aaaaaaaaaaaaaaaa"), None);
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn create_validates_and_normalizes() {
        let Ok(Request::Create(c)) = decode(
            "apikey_create",
            r##"{"label":" ci ","capabilities":["read","send","read"],"topicScopes":["#deploys"," "]}"##,
        ) else {
            panic!("not decoded")
        };
        assert_eq!(c.label, "ci");
        assert_eq!(c.capabilities, [Capability::Read, Capability::Send]);
        assert_eq!(c.topic_scopes, Some(vec!["deploys".to_owned()]));
        assert!(decode("apikey_create", r#"{"label":"x","capabilities":[]}"#).is_err());
        assert!(decode("apikey_create", r#"{"capabilities":["read"]}"#).is_err());
        assert!(decode("apikey_create", r#"{"label":"x","capabilities":["root"]}"#).is_err());
        assert!(decode("apikey_revoke", r#"{"id":" "}"#).is_err());
        assert!(grants(&[Capability::Admin], Capability::Send));
        assert!(!grants(&[Capability::Read], Capability::Send));
    }
}
