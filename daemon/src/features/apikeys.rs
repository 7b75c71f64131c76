//! API keys (HEAD §2): minted over the WebSocket (`apikey_create`, `apikey_list`,
//! `apikey_revoke`) or by an operator (`meshd apikey …`), and checked by the REST API
//! and the external WebSocket ([`authenticate`]).
//!
//! Unlike the reference, which lets any member mint `admin` keys and list or revoke
//! every key of the mesh: a member mints keys with the capabilities `send`, `read` and
//! `state_write` and sees and revokes the keys it issued; `admin` keys, and every key
//! of the mesh, are for mesh admins. Unknown capabilities and unparsable expiry times
//! are refused rather than stored or silently dropped.

pub mod store;

use meshd_protocol::apikeys::{self, Capability, CreateKey, KeyInfo, Reply, Request};
use meshd_protocol::broker::BrokerFrame;
use meshd_protocol::time::iso8601_ms;

use crate::features::apikeys::store::ApiKeyRow;
use crate::session::*;
use crate::store::{Db, StoreError};

/// Most live (unrevoked, unexpired) keys one member holds per mesh.
pub const MAX_LIVE_KEYS_PER_MEMBER: usize = 200;
/// `last_used_at` is refreshed at most this often (ms), so reads do not each write.
const TOUCH_EVERY_MS: i64 = 60_000;

/// A verified key: what a bearer may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyAuth {
    /// Key id.
    pub id: String,
    /// The only mesh it acts in.
    pub mesh_id: String,
    /// Label.
    pub label: String,
    /// Capabilities.
    pub capabilities: Vec<Capability>,
    /// Topic names it is limited to (`None`: every topic).
    pub topic_scopes: Option<Vec<String>>,
    /// The member it acts as (`None`: an operator key minted unattached).
    pub issuer: Option<String>,
}

impl ApiKeyAuth {
    /// Whether the key holds `cap` (or `admin`).
    pub fn can(&self, cap: Capability) -> bool {
        apikeys::grants(&self.capabilities, cap)
    }

    /// Whether topic `name` is within the key's scopes.
    pub fn in_scope(&self, name: &str) -> bool {
        self.topic_scopes
            .as_ref()
            .is_none_or(|s| s.iter().any(|t| t == name))
    }
}

/// Why a bearer secret was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No key was presented.
    #[error("api key missing")]
    Missing,
    /// Unknown, revoked or expired.
    #[error("api key invalid, revoked or expired")]
    Invalid,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Parses the stored capability list.
fn parse_caps(s: &str) -> Vec<Capability> {
    s.split_whitespace().filter_map(Capability::parse).collect()
}

/// Parses stored scopes.
fn parse_scopes(s: Option<&str>) -> Option<Vec<String>> {
    s.map(|j| serde_json::from_str(j).unwrap_or_default())
}

/// Compares two digests without an early exit.
fn same_digest(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Checks a presented secret against the store: a live, unexpired key of that hash.
/// A revoked key is refused from the moment its revocation commits.
///
/// # Errors
/// [`AuthError`].
pub async fn authenticate(db: &Db, secret: &str, now: i64) -> Result<ApiKeyAuth, AuthError> {
    let prefix = apikeys::lookup_prefix(secret).ok_or(AuthError::Invalid)?;
    let hash = apikeys::hash_secret(secret);
    let row = db
        .api_keys_by_prefix(prefix)
        .await?
        .into_iter()
        .find(|k| same_digest(&k.secret_hash, &hash))
        .ok_or(AuthError::Invalid)?;
    if row.expires_at.is_some_and(|e| e <= now) {
        return Err(AuthError::Invalid);
    }
    if row.last_used_at.is_none_or(|t| now - t >= TOUCH_EVERY_MS)
        && let Err(e) = db.touch_api_key(&row.id, now).await
    {
        tracing::warn!(cause = %e, "recording an api key's use");
    }
    Ok(ApiKeyAuth {
        capabilities: parse_caps(&row.capabilities),
        topic_scopes: parse_scopes(row.topic_scopes.as_deref()),
        id: row.id,
        mesh_id: row.mesh_id,
        label: row.label,
        issuer: row.issued_by_member_id,
    })
}

/// Why a key was not minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// A bad argument (`invalid_args`).
    #[error("{0}")]
    Invalid(String),
    /// The issuer may not mint it (`forbidden`).
    #[error("{0}")]
    Forbidden(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Parses an ISO 8601 expiry into ms; it must lie in the future.
///
/// # Errors
/// [`MintError::Invalid`].
pub fn parse_expiry(s: &str, now: i64) -> Result<i64, MintError> {
    let t: jiff::Timestamp = s
        .trim()
        .parse()
        .map_err(|_| MintError::Invalid(format!("expiresAt {s:?} is not an ISO 8601 time")))?;
    let ms = t.as_millisecond();
    if ms <= now {
        return Err(MintError::Invalid("expiresAt is in the past".into()));
    }
    Ok(ms)
}

/// Mints a key for `issuer` (a member of `mesh_id`, admin or not) or unattached.
/// Returns the row and the secret (shown once).
///
/// # Errors
/// [`MintError`].
pub async fn mint(
    db: &Db,
    mesh_id: &str,
    issuer: Option<(&str, bool)>,
    create: &CreateKey,
    now: i64,
) -> Result<(ApiKeyRow, String), MintError> {
    let expires_at = create
        .expires_at
        .as_deref()
        .map(|e| parse_expiry(e, now))
        .transpose()?;
    if let Some((member_id, admin)) = issuer {
        if !admin && create.capabilities.contains(&Capability::Admin) {
            return Err(MintError::Forbidden(
                "only mesh admins can mint admin keys".into(),
            ));
        }
        let live = db
            .api_keys(mesh_id, Some(member_id))
            .await?
            .iter()
            .filter(|k| k.revoked_at.is_none() && k.expires_at.is_none_or(|e| e > now))
            .count();
        if live >= MAX_LIVE_KEYS_PER_MEMBER {
            return Err(MintError::Invalid(format!(
                "{MAX_LIVE_KEYS_PER_MEMBER} live keys already; revoke some first"
            )));
        }
    }
    let secret = apikeys::secret_from(&crate::ids::random_bytes::<32>());
    let row = ApiKeyRow {
        id: crate::ids::random_id(),
        mesh_id: mesh_id.to_owned(),
        label: create.label.clone(),
        secret_hash: apikeys::hash_secret(&secret),
        secret_prefix: secret[..apikeys::PREFIX_LEN].to_owned(),
        capabilities: create
            .capabilities
            .iter()
            .map(|c| c.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        topic_scopes: create
            .topic_scopes
            .as_ref()
            .map(|s| serde_json::to_string(s).unwrap_or_else(|_| "[]".into())),
        issued_by_member_id: issuer.map(|(m, _)| m.to_owned()),
        created_at: now,
        last_used_at: None,
        revoked_at: None,
        expires_at,
    };
    db.insert_api_key(&row).await?;
    Ok((row, secret))
}

/// How a key is listed.
pub fn key_info(k: ApiKeyRow) -> KeyInfo {
    KeyInfo {
        capabilities: parse_caps(&k.capabilities),
        topic_scopes: parse_scopes(k.topic_scopes.as_deref()),
        id: k.id,
        label: k.label,
        prefix: k.secret_prefix,
        created_at: iso8601_ms(k.created_at),
        last_used_at: k.last_used_at.map(iso8601_ms),
        revoked_at: k.revoked_at.map(iso8601_ms),
        expires_at: k.expires_at.map(iso8601_ms),
    }
}

/// The outcome of a revocation by id or id prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// This key (now or earlier).
    Key(String),
    /// Nothing matched.
    NotFound,
    /// The prefix matched more than one key.
    NotUnique(usize),
}

/// Revokes the key among `candidates` whose id is `id` or starts with it.
///
/// # Errors
/// The store failed.
pub async fn revoke_among(
    db: &Db,
    candidates: &[ApiKeyRow],
    id: &str,
    now: i64,
) -> Result<Revoked, StoreError> {
    let hits: Vec<&ApiKeyRow> = match candidates.iter().find(|k| k.id == id) {
        Some(k) => vec![k],
        None => candidates.iter().filter(|k| k.id.starts_with(id)).collect(),
    };
    match hits.as_slice() {
        [] => Ok(Revoked::NotFound),
        [k] => {
            db.revoke_api_key(&k.id, now).await?;
            Ok(Revoked::Key(k.id.clone()))
        }
        many => Ok(Revoked::NotUnique(many.len())),
    }
}

impl Session {
    /// `apikey_create` / `apikey_list` / `apikey_revoke`.
    pub(crate) fn queue_apikey(&mut self, request: Request, req_id: Option<String>, now: i64) {
        let ctx = self.ctx.clone();
        let mesh_id = self.mesh_id().to_owned();
        let member_id = self.member_id.clone();
        let admin = self
            .mesh
            .member(&self.member_pubkey)
            .is_some_and(|m| m.role == "admin");
        self.reply_later(async move {
            let db = &ctx.db;
            // What this member may see and revoke: its own keys, or all for admins.
            let visible = || db.api_keys(&mesh_id, (!admin).then_some(member_id.as_str()));
            let reply = match request {
                Request::Create(create) => {
                    match mint(db, &mesh_id, Some((&member_id, admin)), &create, now).await {
                        Ok((row, secret)) => Reply::ApikeyCreated {
                            capabilities: create.capabilities,
                            topic_scopes: create.topic_scopes,
                            created_at: iso8601_ms(row.created_at),
                            prefix: row.secret_prefix,
                            label: row.label,
                            id: row.id,
                            secret,
                            req_id,
                        },
                        Err(MintError::Invalid(m)) => return error("invalid_args", m, req_id),
                        Err(MintError::Forbidden(m)) => return error("forbidden", m, req_id),
                        Err(MintError::Store(e)) => return store_unavailable("apikey", req_id, &e),
                    }
                }
                Request::List => match visible().await {
                    Ok(keys) => Reply::ApikeyListResponse {
                        keys: keys.into_iter().map(key_info).collect(),
                        req_id,
                    },
                    Err(e) => return store_unavailable("apikey", req_id, &e),
                },
                Request::Revoke { id } => {
                    let keys = match visible().await {
                        Ok(k) => k,
                        Err(e) => return store_unavailable("apikey", req_id, &e),
                    };
                    match revoke_among(db, &keys, &id, now).await {
                        Ok(Revoked::Key(id)) => {
                            ctx.external.key_revoked(&id);
                            Reply::ApikeyRevokeResponse {
                                status: "revoked",
                                id: Some(id),
                                matches: None,
                                req_id,
                            }
                        }
                        Ok(Revoked::NotFound) => Reply::ApikeyRevokeResponse {
                            status: "not_found",
                            id: None,
                            matches: None,
                            req_id,
                        },
                        Ok(Revoked::NotUnique(n)) => Reply::ApikeyRevokeResponse {
                            status: "not_unique",
                            id: None,
                            matches: Some(n),
                            req_id,
                        },
                        Err(e) => return store_unavailable("apikey", req_id, &e),
                    }
                }
            };
            Some(BrokerFrame::ApiKey(reply).to_json().into())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_iso_and_in_the_future() {
        let now = 1_800_000_000_000;
        assert_eq!(
            parse_expiry("2027-01-15T09:00:00Z", now).ok(),
            Some(now + 3_600_000)
        );
        assert!(
            parse_expiry("2027-01-15T08:00:00Z", now).is_err(),
            "now is not the future"
        );
        assert!(parse_expiry("2020-01-01T00:00:00Z", now).is_err());
        assert!(parse_expiry("next week", now).is_err());
    }

    #[test]
    fn scopes_and_capabilities() {
        let k = ApiKeyAuth {
            id: "k".into(),
            mesh_id: "m".into(),
            label: "l".into(),
            capabilities: vec![Capability::Read],
            topic_scopes: Some(vec!["deploys".into()]),
            issuer: None,
        };
        assert!(k.can(Capability::Read) && !k.can(Capability::Send));
        assert!(k.in_scope("deploys") && !k.in_scope("general"));
        assert!(same_digest("ab", "ab") && !same_digest("ab", "ac") && !same_digest("a", "ab"));
    }
}
