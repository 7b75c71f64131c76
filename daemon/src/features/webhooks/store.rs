//! Inbound webhooks (rare writes, through the pool).

use crate::store::{Db, StoreError, with_db, with_db_write};

/// A stored webhook.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct WebhookRow {
    /// Id.
    pub id: String,
    /// Mesh.
    pub mesh_id: String,
    /// Name, unique among the mesh's active webhooks.
    pub name: String,
    /// 64 hex characters, part of the URL.
    pub secret: String,
    /// Member that created it (may see its secret, with admins).
    pub creator_member_id: String,
    /// Accepting posts.
    pub active: bool,
    /// Created (ms).
    pub created_at: i64,
}

/// Most active webhooks one mesh keeps.
pub const MAX_WEBHOOKS_PER_MESH: i64 = 100;

/// Why a webhook was not created.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// An active webhook of that name exists.
    #[error("a webhook of that name exists")]
    Exists,
    /// Too many webhooks.
    #[error("the mesh has {MAX_WEBHOOKS_PER_MESH} webhooks already")]
    Full,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Db {
    /// Creates a webhook.
    pub async fn insert_webhook(&self, w: &WebhookRow) -> Result<(), WebhookError> {
        const COUNT_SQL: &str = "SELECT COUNT(*) FROM webhook WHERE mesh_id = $1 AND active";
        const SQL: &str = "INSERT INTO webhook (id, mesh_id, name, secret, creator_member_id, active, created_at) \
                           VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING";
        let n: i64 =
            with_db_write!(self, p => sqlx::query_scalar(COUNT_SQL).bind(&w.mesh_id).fetch_one(p).await)
                .map_err(StoreError::from)?;
        if n >= MAX_WEBHOOKS_PER_MESH {
            return Err(WebhookError::Full);
        }
        let inserted =
            with_db_write!(self, p => sqlx::query(SQL).bind(&w.id).bind(&w.mesh_id).bind(&w.name)
            .bind(&w.secret).bind(&w.creator_member_id).bind(w.active).bind(w.created_at)
            .execute(p).await.map(|r| r.rows_affected()))
            .map_err(StoreError::from)?;
        if inserted == 0 {
            return Err(WebhookError::Exists);
        }
        Ok(())
    }

    /// The mesh's active webhooks, by name.
    pub async fn webhooks(&self, mesh_id: &str) -> Result<Vec<WebhookRow>, StoreError> {
        const SQL: &str = "SELECT id, mesh_id, name, secret, creator_member_id, active, created_at \
                           FROM webhook WHERE mesh_id = $1 AND active ORDER BY name";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).fetch_all(p).await)?)
    }

    /// Deactivates a webhook. Returns whether one was active.
    pub async fn deactivate_webhook(&self, id: &str) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE webhook SET active = FALSE WHERE id = $1 AND active";
        let n = with_db_write!(self, p => sqlx::query(SQL).bind(id).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(n > 0)
    }
}
