//! API key rows.

use crate::store::{Db, StoreError, with_db, with_db_write};

/// A stored key (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ApiKeyRow {
    /// Id.
    pub id: String,
    /// Mesh.
    pub mesh_id: String,
    /// Label.
    pub label: String,
    /// SHA-256 of the secret, hex.
    pub secret_hash: String,
    /// First 11 characters of the secret.
    pub secret_prefix: String,
    /// Space-separated capabilities.
    pub capabilities: String,
    /// JSON array of topic names, or `None` for every topic.
    pub topic_scopes: Option<String>,
    /// The member the key acts as.
    pub issued_by_member_id: Option<String>,
    /// Creation (ms).
    pub created_at: i64,
    /// Last use (ms), refreshed at most once a minute.
    pub last_used_at: Option<i64>,
    /// Revocation (ms).
    pub revoked_at: Option<i64>,
    /// Expiry (ms).
    pub expires_at: Option<i64>,
}

impl Db {
    /// Stores a new key.
    pub async fn insert_api_key(&self, k: &ApiKeyRow) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO api_key (id, mesh_id, label, secret_hash, secret_prefix, capabilities, topic_scopes, \
                           issued_by_member_id, created_at, last_used_at, revoked_at, expires_at) \
                           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, NULL, $10)";
        with_db_write!(self, p => sqlx::query(SQL).bind(&k.id).bind(&k.mesh_id).bind(&k.label).bind(&k.secret_hash)
            .bind(&k.secret_prefix).bind(&k.capabilities).bind(&k.topic_scopes).bind(&k.issued_by_member_id)
            .bind(k.created_at).bind(k.expires_at).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Keys of a mesh (all, or those `issuer` issued), newest first.
    pub async fn api_keys(
        &self,
        mesh_id: &str,
        issuer: Option<&str>,
    ) -> Result<Vec<ApiKeyRow>, StoreError> {
        const SQL: &str = "SELECT id, mesh_id, label, secret_hash, secret_prefix, capabilities, topic_scopes, issued_by_member_id, created_at, last_used_at, revoked_at, expires_at \
                           FROM api_key WHERE mesh_id = $1 AND ($2 IS NULL OR issued_by_member_id = $2) \
                           ORDER BY created_at DESC, id";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(issuer).fetch_all(p).await)?)
    }

    /// Live keys whose secret starts with `prefix` (candidates for a presented secret).
    pub async fn api_keys_by_prefix(&self, prefix: &str) -> Result<Vec<ApiKeyRow>, StoreError> {
        const SQL: &str = "SELECT id, mesh_id, label, secret_hash, secret_prefix, capabilities, topic_scopes, issued_by_member_id, created_at, last_used_at, revoked_at, expires_at \
                           FROM api_key WHERE secret_prefix = $1 AND revoked_at IS NULL";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(prefix).fetch_all(p).await)?)
    }

    /// Marks a key revoked (keeping an earlier revocation time).
    pub async fn revoke_api_key(&self, id: &str, now: i64) -> Result<(), StoreError> {
        const SQL: &str = "UPDATE api_key SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2";
        with_db_write!(self, p => sqlx::query(SQL).bind(now).bind(id).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Records a use.
    pub async fn touch_api_key(&self, id: &str, now: i64) -> Result<(), StoreError> {
        const SQL: &str = "UPDATE api_key SET last_used_at = $1 WHERE id = $2";
        with_db_write!(self, p => sqlx::query(SQL).bind(now).bind(id).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Keys revoked at or after `since` (ms): the daemon closes their connections.
    pub async fn api_keys_revoked_since(&self, since: i64) -> Result<Vec<String>, StoreError> {
        const SQL: &str =
            "SELECT id FROM api_key WHERE revoked_at IS NOT NULL AND revoked_at >= $1";
        Ok(with_db!(self, p => sqlx::query_scalar(SQL).bind(since).fetch_all(p).await)?)
    }
}
