//! Watch rows.

use crate::store::{Db, StoreError, with_db, with_db_write};

/// A stored watch.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct WatchRow {
    /// `w_` + 8 hex.
    pub id: String,
    /// Mesh.
    pub mesh_id: String,
    /// Owner.
    pub member_id: String,
    /// URL.
    pub url: String,
    /// `hash`, `json` or `status`.
    pub mode: String,
    /// Dot path (`json`).
    pub extract: Option<String>,
    /// Seconds between checks.
    pub interval_s: i64,
    /// `change`, `always`, `match:X`, `not_match:X`.
    pub notify_on: String,
    /// Request headers, a JSON object.
    pub headers: String,
    /// Label.
    pub label: Option<String>,
    /// The last value seen.
    pub last_value: Option<String>,
    /// The last check (ms).
    pub last_check: Option<i64>,
    /// Why the last check failed.
    pub last_error: Option<String>,
    /// Creation (ms).
    pub created_at: i64,
}

impl Db {
    /// Stores a new watch.
    pub async fn insert_watch(&self, w: &WatchRow) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO watch (id, mesh_id, member_id, url, mode, extract, interval_s, notify_on, headers, label, \
                           last_value, last_check, last_error, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL, NULL, NULL, $11)";
        with_db_write!(self, p => sqlx::query(SQL).bind(&w.id).bind(&w.mesh_id).bind(&w.member_id).bind(&w.url).bind(&w.mode)
            .bind(&w.extract).bind(w.interval_s).bind(&w.notify_on).bind(&w.headers).bind(&w.label).bind(w.created_at)
            .execute(p).await.map(drop))?;
        Ok(())
    }

    /// A member's watches in a mesh, oldest first.
    pub async fn member_watches(
        &self,
        mesh_id: &str,
        member_id: &str,
    ) -> Result<Vec<WatchRow>, StoreError> {
        const SQL: &str = "SELECT id, mesh_id, member_id, url, mode, extract, interval_s, notify_on, headers, label, last_value, \
                           last_check, last_error, created_at FROM watch WHERE mesh_id = $1 AND member_id = $2 ORDER BY created_at, id";
        Ok(
            with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(member_id).fetch_all(p).await)?,
        )
    }

    /// Every watch (the engine loads them at start).
    pub async fn all_watches(&self) -> Result<Vec<WatchRow>, StoreError> {
        const SQL: &str = "SELECT id, mesh_id, member_id, url, mode, extract, interval_s, notify_on, headers, label, last_value, \
                           last_check, last_error, created_at FROM watch";
        Ok(with_db!(self, p => sqlx::query_as(SQL).fetch_all(p).await)?)
    }

    /// Deletes a member's watch. Returns the deleted row.
    pub async fn delete_watch(
        &self,
        mesh_id: &str,
        member_id: &str,
        id: &str,
    ) -> Result<Option<WatchRow>, StoreError> {
        const SQL: &str = "DELETE FROM watch WHERE mesh_id = $1 AND member_id = $2 AND id = $3 \
                           RETURNING id, mesh_id, member_id, url, mode, extract, interval_s, notify_on, headers, label, last_value, \
                           last_check, last_error, created_at";
        Ok(
            with_db_write!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(member_id).bind(id).fetch_optional(p).await)?,
        )
    }

    /// Deletes every watch of a member (it was banned or revoked).
    pub async fn delete_member_watches(
        &self,
        mesh_id: &str,
        member_id: &str,
    ) -> Result<(), StoreError> {
        const SQL: &str = "DELETE FROM watch WHERE mesh_id = $1 AND member_id = $2";
        with_db_write!(self, p => sqlx::query(SQL).bind(mesh_id).bind(member_id).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Records a check.
    pub async fn watch_checked(
        &self,
        id: &str,
        value: Option<&str>,
        error: Option<&str>,
        at: i64,
    ) -> Result<(), StoreError> {
        const SQL: &str = "UPDATE watch SET last_value = COALESCE($1, last_value), last_error = $2, last_check = $3 WHERE id = $4";
        with_db_write!(self, p => sqlx::query(SQL).bind(value).bind(error).bind(at).bind(id).execute(p).await.map(drop))?;
        Ok(())
    }
}
