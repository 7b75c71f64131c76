//! Telemetry's store queries: log entries (full text: FTS5 on SQLite, a tsvector on
//! PostgreSQL, as memory does) and the report's sums over messages and logs.

use crate::store::{Db, StoreError, with_db, with_db_write};

/// A stored log entry.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LogRow {
    /// Id.
    pub id: String,
    /// Mesh.
    pub mesh_id: String,
    /// Epoch ms.
    pub at: i64,
    /// 0 debug … 3 error.
    pub level: i64,
    /// Writer's member id.
    pub member_id: String,
    /// Writer's display name.
    pub peer_name: String,
    /// Writer's session (or member) key.
    pub peer_pubkey: String,
    /// Message.
    pub message: String,
    /// JSON text.
    pub data: Option<String>,
    /// The peer broker it was written at (`None`: here).
    pub broker: Option<String>,
}

/// Entries kept per mesh (the oldest go first).
pub const MAX_PER_MESH: i64 = 100_000;
/// How long entries are kept.
pub const RETENTION_MS: i64 = 7 * 86_400_000;

impl Db {
    /// Stores an entry.
    pub async fn insert_log(&self, r: &LogRow) -> Result<(), StoreError> {
        // A replicated entry arriving twice is kept once.
        const SQL: &str = "INSERT INTO mesh_log (id, mesh_id, at, level, member_id, peer_name, peer_pubkey, message, data, broker) \
                           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING";
        Ok(
            with_db_write!(self, p => sqlx::query(SQL).bind(&r.id).bind(&r.mesh_id).bind(r.at)
            .bind(r.level).bind(&r.member_id).bind(&r.peer_name).bind(&r.peer_pubkey)
            .bind(&r.message).bind(&r.data).bind(&r.broker).execute(p).await.map(drop))?,
        )
    }

    /// The newest `last` entries of the mesh at least `min_level` severe, by `peer`
    /// (name or key) and matching `query` (every word), newest first.
    pub async fn logs(
        &self,
        mesh_id: &str,
        query: Option<&str>,
        peer: Option<&str>,
        min_level: i64,
        last: i64,
    ) -> Result<Vec<LogRow>, StoreError> {
        let peer = peer.unwrap_or("");
        match (
            self,
            query.and_then(crate::features::memory::store::fts5_query),
        ) {
            (_, None) => {
                const SQL: &str = "SELECT id, mesh_id, at, level, member_id, peer_name, peer_pubkey, message, data, broker \
                                   FROM mesh_log WHERE mesh_id = $1 AND level >= $2 \
                                   AND ($3 = '' OR peer_name = $3 OR peer_pubkey = $3) \
                                   ORDER BY at DESC, id DESC LIMIT +$4";
                Ok(
                    with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(min_level)
                    .bind(peer).bind(last).fetch_all(p).await)?,
                )
            }
            (Self::Sqlite(p, _), Some(q)) => {
                let sql = "SELECT l.id, l.mesh_id, l.at, l.level, l.member_id, l.peer_name, l.peer_pubkey, l.message, l.data, l.broker \
                           FROM mesh_log_fts JOIN mesh_log l ON l.rowid = mesh_log_fts.rowid \
                           WHERE mesh_log_fts MATCH $1 AND l.mesh_id = $2 AND l.level >= $3 \
                             AND ($4 = '' OR l.peer_name = $4 OR l.peer_pubkey = $4) \
                           ORDER BY l.at DESC, l.id DESC LIMIT +$5";
                Ok(sqlx::query_as(sql)
                    .bind(q)
                    .bind(mesh_id)
                    .bind(min_level)
                    .bind(peer)
                    .bind(last)
                    .fetch_all(p)
                    .await?)
            }
            (Self::Postgres(p), Some(_)) => {
                const SQL: &str = "SELECT id, mesh_id, at, level, member_id, peer_name, peer_pubkey, message, data, broker \
                                   FROM mesh_log \
                                   WHERE search_vector @@ plainto_tsquery('english', $1) AND mesh_id = $2 AND level >= $3 \
                                     AND ($4 = '' OR peer_name = $4 OR peer_pubkey = $4) \
                                   ORDER BY at DESC, id DESC LIMIT +$5";
                Ok(sqlx::query_as(SQL)
                    .bind(query.unwrap_or_default())
                    .bind(mesh_id)
                    .bind(min_level)
                    .bind(peer)
                    .bind(last)
                    .fetch_all(p)
                    .await?)
            }
        }
    }

    /// Log entries since `from` by level rank, and the most frequent error messages.
    pub async fn log_summary(
        &self,
        mesh_id: &str,
        from: i64,
    ) -> Result<(Vec<(i64, i64)>, Vec<(String, i64)>), StoreError> {
        const BY_LEVEL: &str =
            "SELECT level, COUNT(*) FROM mesh_log WHERE mesh_id = $1 AND at >= $2 GROUP BY level";
        const ERRORS: &str = "SELECT message, COUNT(*) FROM mesh_log WHERE mesh_id = $1 AND at >= $2 AND level = 3 \
                              GROUP BY message ORDER BY 2 DESC, 1 LIMIT 5";
        let a = with_db!(self, p => sqlx::query_as(BY_LEVEL).bind(mesh_id).bind(from).fetch_all(p).await)?;
        let b = with_db!(self, p => sqlx::query_as(ERRORS).bind(mesh_id).bind(from).fetch_all(p).await)?;
        Ok((a, b))
    }

    /// Messages sent since `from` (distinct ids) by priority rank, and how many of their
    /// deliveries (one per recipient) are done and pending.
    pub async fn message_summary(
        &self,
        mesh_id: &str,
        from: i64,
    ) -> Result<(Vec<(i64, i64)>, i64, i64), StoreError> {
        const BY_PRIO: &str = "SELECT priority, COUNT(DISTINCT id) FROM message WHERE mesh_id = $1 AND created_at >= $2 GROUP BY priority";
        const DELIVERIES: &str = "SELECT CAST(COALESCE(SUM(CASE WHEN delivered_at IS NULL THEN 0 ELSE 1 END), 0) AS BIGINT), \
                                         CAST(COALESCE(SUM(CASE WHEN delivered_at IS NULL THEN 1 ELSE 0 END), 0) AS BIGINT) \
                                  FROM message WHERE mesh_id = $1 AND created_at >= $2";
        let a = with_db!(self, p => sqlx::query_as(BY_PRIO).bind(mesh_id).bind(from).fetch_all(p).await)?;
        let (done, pending): (i64, i64) = with_db!(self, p => sqlx::query_as(DELIVERIES).bind(mesh_id).bind(from).fetch_one(p).await)?;
        Ok((a, done, pending))
    }

    /// Send → delivery times (ms) of deliveries since `from` (at most 50,000).
    pub async fn delivery_times(&self, mesh_id: &str, from: i64) -> Result<Vec<i64>, StoreError> {
        const SQL: &str = "SELECT delivered_at - created_at FROM message \
                           WHERE mesh_id = $1 AND created_at >= $2 AND delivered_at IS NOT NULL LIMIT 50000";
        Ok(
            with_db!(self, p => sqlx::query_scalar(SQL).bind(mesh_id).bind(from).fetch_all(p).await)?,
        )
    }

    /// The busiest senders since `from`: (name, messages).
    pub async fn top_senders(
        &self,
        mesh_id: &str,
        from: i64,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        const SQL: &str = "SELECT sender_name, COUNT(DISTINCT id) FROM message WHERE mesh_id = $1 AND created_at >= $2 \
                           GROUP BY sender_name ORDER BY 2 DESC, 1 LIMIT 10";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(from).fetch_all(p).await)?)
    }

    /// Drops entries past their retention, and the oldest of meshes over their cap.
    pub async fn purge_logs(&self, now: i64) -> Result<u64, StoreError> {
        const OLD: &str = "DELETE FROM mesh_log WHERE at < $1";
        const FULL: &str = "SELECT mesh_id FROM mesh_log GROUP BY mesh_id HAVING COUNT(*) > $1";
        const CUT: &str =
            "SELECT at FROM mesh_log WHERE mesh_id = $1 ORDER BY at DESC LIMIT 1 OFFSET +$2";
        const TRIM: &str = "DELETE FROM mesh_log WHERE mesh_id = $1 AND at < $2";
        let mut n = with_db_write!(self, p => sqlx::query(OLD).bind(now - RETENTION_MS)
            .execute(p).await.map(|r| r.rows_affected()))?;
        let full: Vec<String> =
            with_db!(self, p => sqlx::query_scalar(FULL).bind(MAX_PER_MESH).fetch_all(p).await)?;
        for mesh in full {
            let cut: Option<i64> = with_db!(self, p => sqlx::query_scalar(CUT).bind(&mesh)
                .bind(MAX_PER_MESH).fetch_optional(p).await)?;
            if let Some(cut) = cut {
                n += with_db_write!(self, p => sqlx::query(TRIM).bind(&mesh).bind(cut)
                    .execute(p).await.map(|r| r.rows_affected()))?;
            }
        }
        Ok(n)
    }
}
