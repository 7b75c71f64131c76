//! Shared contexts: what each member is working on (one per member and mesh).

use crate::store::{Db, StoreError, with_db, with_db_write};

/// A member's shared context.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ContextRow {
    /// Mesh.
    pub mesh_id: String,
    /// Member.
    pub member_id: String,
    /// Display name when shared.
    pub peer_name: String,
    /// Summary.
    pub summary: String,
    /// Files read, JSON array.
    pub files_read: String,
    /// Key findings, JSON array.
    pub key_findings: String,
    /// Tags, JSON array.
    pub tags: String,
    /// Last shared (ms).
    pub updated_at: i64,
}

impl ContextRow {
    /// A JSON array column as strings (corrupt reads as empty).
    pub fn list(json: &str) -> Vec<String> {
        serde_json::from_str(json).unwrap_or_default()
    }
}

/// Most contexts a search returns (the reference's limit).
pub const SEARCH_LIMIT: usize = 20;

impl Db {
    /// Stores (replaces) a member's context.
    pub async fn put_context(&self, c: &ContextRow) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO context (mesh_id, member_id, peer_name, summary, files_read, key_findings, tags, updated_at) \
                           VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                           ON CONFLICT (mesh_id, member_id) DO UPDATE SET peer_name = excluded.peer_name, \
                             summary = excluded.summary, files_read = excluded.files_read, \
                             key_findings = excluded.key_findings, tags = excluded.tags, updated_at = excluded.updated_at";
        with_db_write!(self, p => sqlx::query(SQL).bind(&c.mesh_id).bind(&c.member_id).bind(&c.peer_name)
            .bind(&c.summary).bind(&c.files_read).bind(&c.key_findings).bind(&c.tags).bind(c.updated_at)
            .execute(p).await.map(drop))?;
        Ok(())
    }

    /// Stores a peer broker's context for a member unless a newer one is stored.
    pub async fn put_context_if_newer(&self, c: &ContextRow) -> Result<bool, StoreError> {
        const SQL: &str = "INSERT INTO context (mesh_id, member_id, peer_name, summary, files_read, key_findings, tags, updated_at) \
                           VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                           ON CONFLICT (mesh_id, member_id) DO UPDATE SET peer_name = excluded.peer_name, \
                             summary = excluded.summary, files_read = excluded.files_read, \
                             key_findings = excluded.key_findings, tags = excluded.tags, updated_at = excluded.updated_at \
                           WHERE context.updated_at < excluded.updated_at";
        let n = with_db_write!(self, p => sqlx::query(SQL).bind(&c.mesh_id).bind(&c.member_id).bind(&c.peer_name)
            .bind(&c.summary).bind(&c.files_read).bind(&c.key_findings).bind(&c.tags).bind(c.updated_at)
            .execute(p).await.map(|r| r.rows_affected()))?;
        Ok(n > 0)
    }

    /// Every context of a mesh, newest first (one per member: bounded by membership).
    pub async fn contexts(&self, mesh_id: &str) -> Result<Vec<ContextRow>, StoreError> {
        const SQL: &str = "SELECT mesh_id, member_id, peer_name, summary, files_read, key_findings, tags, updated_at \
                           FROM context WHERE mesh_id = $1 ORDER BY updated_at DESC, member_id";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).fetch_all(p).await)?)
    }
}

/// `get_context`'s match: the summary contains the query (case-insensitively) or a tag
/// equals it.
pub fn matches(c: &ContextRow, query: &str) -> bool {
    let q = query.to_lowercase();
    c.summary.to_lowercase().contains(&q)
        || ContextRow::list(&c.tags)
            .iter()
            .any(|t| t.eq_ignore_ascii_case(query))
}
