//! Audit log rows (the chain logic is in `super::engine`).

use crate::store::writer::{Params, values_sql};
use crate::store::{Db, StoreError, with_db, with_db_write};

/// A stored entry.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditRow {
    /// Mesh.
    pub mesh_id: String,
    /// Position in the mesh's chain, from 1.
    pub seq: i64,
    /// `peer_joined`, `state_set`, …
    pub event_type: String,
    /// Acting member, if any.
    pub actor_member_id: Option<String>,
    /// Display name of the actor, or `system`.
    pub actor: String,
    /// Event data, canonical JSON.
    pub payload: String,
    /// Hash of the previous entry (`genesis` for the first).
    pub prev_hash: String,
    /// SHA-256 (hex) of this entry's canonical form.
    pub hash: String,
    /// Ed25519 signature (hex) of the hash bytes.
    pub sig: String,
    /// When (ms).
    pub created_at: i64,
}

impl Db {
    /// A mesh's entries in chain order.
    pub async fn audit_rows(&self, mesh_id: &str) -> Result<Vec<AuditRow>, StoreError> {
        const SQL: &str = "SELECT mesh_id, seq, event_type, actor_member_id, actor, payload, prev_hash, hash, sig, created_at \
                           FROM audit_log WHERE mesh_id = $1 ORDER BY seq";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).fetch_all(p).await)?)
    }

    /// Newest entries first, optionally of one type; and the total — both read from one
    /// snapshot, so a page never contradicts its total while the log grows.
    pub async fn audit_page(
        &self,
        mesh_id: &str,
        event_type: Option<&str>,
        limit: i64,
        offset: i64,
    ) -> Result<(Vec<AuditRow>, i64), StoreError> {
        const SQL: &str = "SELECT mesh_id, seq, event_type, actor_member_id, actor, payload, prev_hash, hash, sig, created_at \
                           FROM audit_log WHERE mesh_id = $1 AND ($2 IS NULL OR event_type = $2) \
                           ORDER BY seq DESC LIMIT $3 OFFSET $4";
        const COUNT: &str =
            "SELECT COUNT(*) FROM audit_log WHERE mesh_id = $1 AND ($2 IS NULL OR event_type = $2)";
        // PostgreSQL's default (READ COMMITTED) takes a snapshot per statement; SQLite's
        // read transaction keeps the snapshot of its first read (WAL).
        let pg = matches!(self, Self::Postgres(_));
        Ok(with_db!(self, p => async {
            let mut tx = p.begin().await?;
            if pg {
                sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    .execute(&mut *tx)
                    .await?;
            }
            let rows = sqlx::query_as(SQL).bind(mesh_id).bind(event_type).bind(limit)
                .bind(offset).fetch_all(&mut *tx).await?;
            let total: i64 = sqlx::query_scalar(COUNT).bind(mesh_id).bind(event_type)
                .fetch_one(&mut *tx).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>((rows, total))
        }.await)?)
    }

    pub(crate) async fn audit_tail(
        &self,
        mesh_id: &str,
    ) -> Result<Option<(i64, String)>, StoreError> {
        const SQL: &str =
            "SELECT seq, hash FROM audit_log WHERE mesh_id = $1 ORDER BY seq DESC LIMIT 1";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).fetch_optional(p).await)?)
    }

    /// Stores entries in one transaction, in multi-row statements: the audit writer
    /// takes SQLite's write gate for the whole transaction, and one statement per entry
    /// held it long enough to halve the message writer's throughput.
    pub(crate) async fn audit_insert_all(&self, rows: &[AuditRow]) -> Result<(), StoreError> {
        const HEAD: &str = "INSERT INTO audit_log (mesh_id, seq, event_type, actor_member_id, actor, payload, prev_hash, hash, sig, created_at) VALUES ";
        /// Rows per statement (10 parameters each, far below either backend's limit).
        const CHUNK: usize = 64;
        if rows.is_empty() {
            return Ok(());
        }
        let style = match self {
            Self::Sqlite(..) => Params::Anonymous,
            Self::Postgres(_) => Params::Numbered,
        };
        with_db_write!(self, p => async {
            let mut tx = p.begin().await?;
            for chunk in rows.chunks(CHUNK) {
                let sql = values_sql(style, HEAD, 10, chunk.len());
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for r in chunk {
                    q = q.bind(&r.mesh_id).bind(r.seq).bind(&r.event_type)
                        .bind(&r.actor_member_id).bind(&r.actor).bind(&r.payload)
                        .bind(&r.prev_hash).bind(&r.hash).bind(&r.sig).bind(r.created_at);
                }
                q.execute(&mut *tx).await?;
            }
            tx.commit().await
        }.await)?;
        Ok(())
    }
}
