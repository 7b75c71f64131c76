//! The dashboard's store queries: counts only, on the indexes the delivery and the
//! scheduler already keep.

use crate::store::{Db, StoreError, with_db};

impl Db {
    /// Undelivered, unexpired messages of the mesh by priority rank (0 `now`, 1 `next`,
    /// 2 `low`): one row per recipient, as they are queued.
    pub async fn queue_depths(&self, mesh_id: &str, now: i64) -> Result<[i64; 3], StoreError> {
        const SQL: &str = "SELECT priority, COUNT(*) FROM message \
                           WHERE mesh_id = $1 AND delivered_at IS NULL AND expires_at > $2 \
                           GROUP BY priority";
        let rows: Vec<(i64, i64)> =
            with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(now).fetch_all(p).await)?;
        let mut out = [0; 3];
        for (rank, n) in rows {
            if let Some(slot) = usize::try_from(rank).ok().and_then(|r| out.get_mut(r)) {
                *slot = n;
            }
        }
        Ok(out)
    }

    /// Pending schedules (one-shot and cron) of the mesh, every member's.
    pub async fn schedule_count(&self, mesh_id: &str) -> Result<i64, StoreError> {
        const SQL: &str =
            "SELECT COUNT(*) FROM scheduled_message WHERE mesh_id = $1 AND next_at IS NOT NULL";
        Ok(with_db!(self, p => sqlx::query_scalar(SQL).bind(mesh_id).fetch_one(p).await)?)
    }

    /// Skills shared in the mesh.
    pub async fn skill_count(&self, mesh_id: &str) -> Result<i64, StoreError> {
        const SQL: &str = "SELECT COUNT(*) FROM skill WHERE mesh_id = $1";
        Ok(with_db!(self, p => sqlx::query_scalar(SQL).bind(mesh_id).fetch_one(p).await)?)
    }
}
