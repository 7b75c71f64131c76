//! Audit log rows (the chain logic is in `super::engine`).

use crate::store::{Db, StoreError, with_db};

pub use crate::store::writer::AuditRow;

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
                           ORDER BY seq DESC LIMIT +$3 OFFSET $4";
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
}
