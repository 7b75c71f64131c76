//! Mesh memory: stored notes with full-text recall, ranked (SQLite FTS5 with bm25,
//! PostgreSQL tsvector with ts_rank: the one place the two backends run different SQL).

use crate::store::{Db, StoreError, with_db, with_db_write};

/// A remembered note.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct MemoryRow {
    /// Id.
    pub id: String,
    /// Mesh.
    pub mesh_id: String,
    /// The note.
    pub content: String,
    /// Tags, space-separated (so the full-text index covers them too).
    pub tags: String,
    /// Member id of who remembered it.
    pub remembered_by: String,
    /// Their display name.
    pub remembered_by_name: String,
    /// When (ms).
    pub remembered_at: i64,
}

/// Most results one recall returns (the reference's limit).
pub const RECALL_LIMIT: i64 = 20;
/// Most memories (forgotten ones too, until purged) one mesh keeps.
pub const MAX_MEMORIES_PER_MESH: i64 = meshd_config::defaults::MEMORIES_PER_MESH as i64;

impl Db {
    /// Stores a memory (the caller checked the quotas, see `crate::quota`).
    pub async fn remember(&self, m: &MemoryRow) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO memory (id, mesh_id, content, tags, remembered_by, remembered_by_name, remembered_at) \
                           VALUES ($1, $2, $3, $4, $5, $6, $7)";
        with_db_write!(self, p => sqlx::query(SQL).bind(&m.id).bind(&m.mesh_id).bind(&m.content).bind(&m.tags)
            .bind(&m.remembered_by).bind(&m.remembered_by_name).bind(m.remembered_at)
            .execute(p).await.map(drop))?;
        Ok(())
    }

    /// The mesh's live memories matching `query`, best first (at most [`RECALL_LIMIT`]).
    pub async fn recall(&self, mesh_id: &str, query: &str) -> Result<Vec<MemoryRow>, StoreError> {
        const SQLITE: &str = "SELECT m.id, m.mesh_id, m.content, m.tags, m.remembered_by, m.remembered_by_name, m.remembered_at \
                              FROM memory_fts JOIN memory m ON m.rowid = memory_fts.rowid \
                              WHERE memory_fts MATCH $1 AND m.mesh_id = $2 AND m.forgotten_at IS NULL \
                              ORDER BY bm25(memory_fts), m.remembered_at DESC LIMIT +$3";
        const PG: &str = "SELECT id, mesh_id, content, tags, remembered_by, remembered_by_name, remembered_at \
                          FROM memory WHERE search_vector @@ plainto_tsquery('english', $1) AND mesh_id = $2 \
                            AND forgotten_at IS NULL \
                          ORDER BY ts_rank(search_vector, plainto_tsquery('english', $1)) DESC, remembered_at DESC \
                          LIMIT +$3";
        let Some(q) = fts5_query(query) else {
            return Ok(Vec::new());
        };
        Ok(match self {
            Self::Sqlite(p, _) => {
                sqlx::query_as(SQLITE)
                    .bind(q)
                    .bind(mesh_id)
                    .bind(RECALL_LIMIT)
                    .fetch_all(p)
                    .await?
            }
            Self::Postgres(p) => {
                sqlx::query_as(PG)
                    .bind(query)
                    .bind(mesh_id)
                    .bind(RECALL_LIMIT)
                    .fetch_all(p)
                    .await?
            }
        })
    }

    /// One live memory of the mesh.
    pub async fn memory(&self, mesh_id: &str, id: &str) -> Result<Option<MemoryRow>, StoreError> {
        const SQL: &str = "SELECT id, mesh_id, content, tags, remembered_by, remembered_by_name, remembered_at \
                           FROM memory WHERE mesh_id = $1 AND id = $2 AND forgotten_at IS NULL";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(id).fetch_optional(p).await)?)
    }

    /// Live memories of a mesh.
    pub async fn memory_count(&self, mesh_id: &str) -> Result<i64, StoreError> {
        const SQL: &str = "SELECT COUNT(*) FROM memory WHERE mesh_id = $1 AND forgotten_at IS NULL";
        Ok(with_db!(self, p => sqlx::query_scalar(SQL).bind(mesh_id).fetch_one(p).await)?)
    }

    /// Stores a peer broker's memory (idempotent by id; not beyond the mesh's cap), and
    /// its forgetting if it was.
    pub async fn put_remote_memory(
        &self,
        m: &MemoryRow,
        forgotten_at: Option<i64>,
    ) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO memory (id, mesh_id, content, tags, remembered_by, remembered_by_name, remembered_at) \
                           SELECT $1, $2, $3, $4, $5, $6, $7 \
                           WHERE (SELECT COUNT(*) FROM memory WHERE mesh_id = $2) < $8 \
                           ON CONFLICT (id) DO NOTHING";
        with_db_write!(self, p => sqlx::query(SQL).bind(&m.id).bind(&m.mesh_id).bind(&m.content).bind(&m.tags)
            .bind(&m.remembered_by).bind(&m.remembered_by_name).bind(m.remembered_at).bind(MAX_MEMORIES_PER_MESH)
            .execute(p).await.map(drop))?;
        if let Some(at) = forgotten_at {
            self.forget(&m.mesh_id, &m.id, at).await?;
        }
        Ok(())
    }

    /// The mesh's newest memories with their forgetting (a peer broker's catch-up
    /// after a link comes up; the caller keeps those of members it hosts).
    pub async fn memories_by(
        &self,
        mesh_id: &str,
        limit: i64,
    ) -> Result<Vec<(MemoryRow, Option<i64>)>, StoreError> {
        const SQL: &str = "SELECT id, mesh_id, content, tags, remembered_by, remembered_by_name, remembered_at, forgotten_at \
                           FROM memory WHERE mesh_id = $1 ORDER BY remembered_at DESC LIMIT +$2";
        type Row = (
            String,
            String,
            String,
            String,
            String,
            String,
            i64,
            Option<i64>,
        );
        let rows: Vec<Row> =
            with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(limit).fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(|(id, mesh_id, content, tags, by, name, at, forgotten)| {
                (
                    MemoryRow {
                        id,
                        mesh_id,
                        content,
                        tags,
                        remembered_by: by,
                        remembered_by_name: name,
                        remembered_at: at,
                    },
                    forgotten,
                )
            })
            .collect())
    }

    /// Forgets a memory of the mesh: its text goes at once; the row stays as a tombstone
    /// (so a peer broker cut off meanwhile learns of it) until it is purged after
    /// `defaults::TOMBSTONE_RETENTION`. Returns who remembered it when one was live (`""`
    /// when unknown).
    pub async fn forget(
        &self,
        mesh_id: &str,
        id: &str,
        now: i64,
    ) -> Result<Option<String>, StoreError> {
        const SQL: &str = "UPDATE memory SET forgotten_at = $1, content = '', tags = '' \
                           WHERE mesh_id = $2 AND id = $3 AND forgotten_at IS NULL \
                           RETURNING COALESCE(remembered_by, '')";
        Ok(
            with_db_write!(self, p => sqlx::query_scalar(SQL).bind(now).bind(mesh_id).bind(id)
            .fetch_optional(p).await)?,
        )
    }
}

/// The words of a free-text query as an FTS5 query: every word must match (like
/// `plainto_tsquery`), each quoted so no user text is FTS5 syntax. `None` when the
/// query has no words.
pub(crate) fn fts5_query(query: &str) -> Option<String> {
    let words: Vec<String> = query
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(32)
        .map(|w| format!("\"{w}\""))
        .collect();
    (!words.is_empty()).then(|| words.join(" AND "))
}

#[cfg(test)]
mod tests {
    use super::fts5_query;

    #[test]
    fn queries_are_quoted_words() {
        assert_eq!(
            fts5_query("deploy: the API!").as_deref(),
            Some(r#""deploy" AND "the" AND "API""#)
        );
        assert_eq!(
            fts5_query(r#"" OR 1 NEAR("#).as_deref(),
            Some(r#""OR" AND "1" AND "NEAR""#)
        );
        assert_eq!(fts5_query("  ,;  "), None);
    }
}
