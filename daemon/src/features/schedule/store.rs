//! Scheduled messages (rare writes, through the pool). The table is the scheduler's
//! only state: the firing task reads what is due from it, so nothing is lost or
//! forgotten across a restart.

use crate::store::{Db, StoreError, with_db, with_db_write};

/// A stored schedule.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ScheduleRow {
    /// Id (UUIDv4 text).
    pub id: String,
    /// Mesh.
    pub mesh_id: String,
    /// Creator.
    pub member_id: String,
    /// Creator's member key.
    pub member_pubkey: String,
    /// The creating presence's routing key (`senderPubkey` of the pushes).
    pub sender_pubkey: String,
    /// Creator's display name.
    pub sender_name: String,
    /// Target spec.
    pub target_spec: String,
    /// Plain text.
    pub message: String,
    /// Cron expression (recurring).
    pub cron: Option<String>,
    /// `reminder` or none: what the deliveries are tagged with.
    pub subtype: Option<String>,
    /// Next fire (ms); `None` when done or cancelled.
    pub next_at: Option<i64>,
    /// Deliveries so far.
    pub fired_count: i64,
    /// Created (ms).
    pub created_at: i64,
}

/// Most pending schedules one member keeps in a mesh.
pub const MAX_PENDING_PER_MEMBER: i64 = 200;
/// Longest scheduled text (it is stored and listed in plain text).
pub const MAX_TEXT_BYTES: usize = 16 * 1024;

/// The columns of [`ScheduleRow`], in a literal (sqlx takes only literal SQL).
macro_rules! columns {
    () => {
        "id, mesh_id, member_id, member_pubkey, sender_pubkey, sender_name, target_spec, message, cron, subtype, next_at, fired_count, created_at"
    };
}

impl Db {
    /// Stores a schedule; `false` when the member already has too many pending (checked
    /// in the same statement, so concurrent requests cannot overshoot).
    pub async fn insert_schedule(&self, r: &ScheduleRow) -> Result<bool, StoreError> {
        const SQL: &str = "INSERT INTO scheduled_message (id, mesh_id, member_id, member_pubkey, sender_pubkey, sender_name, target_spec, message, cron, next_at, fired_count, created_at, subtype) \
                           SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, $11, $13 \
                           WHERE (SELECT COUNT(*) FROM scheduled_message WHERE mesh_id = $2 AND member_id = $3 AND next_at IS NOT NULL) < $12";
        let n = with_db_write!(self, p => sqlx::query(SQL).bind(&r.id).bind(&r.mesh_id).bind(&r.member_id)
            .bind(&r.member_pubkey).bind(&r.sender_pubkey).bind(&r.sender_name).bind(&r.target_spec)
            .bind(&r.message).bind(&r.cron).bind(r.next_at).bind(r.created_at).bind(MAX_PENDING_PER_MEMBER)
            .bind(&r.subtype)
            .execute(p).await.map(|r| r.rows_affected()))?;
        Ok(n > 0)
    }

    /// A member's pending schedules in a mesh, soonest first.
    pub async fn pending_schedules(
        &self,
        mesh_id: &str,
        member_id: &str,
    ) -> Result<Vec<ScheduleRow>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            columns!(),
            " FROM scheduled_message \
             WHERE mesh_id = $1 AND member_id = $2 AND next_at IS NOT NULL ORDER BY next_at, id"
        );
        Ok(
            with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(member_id)
            .fetch_all(p).await)?,
        )
    }

    /// Cancels a pending schedule of this member. Returns whether one was cancelled.
    pub async fn cancel_schedule(
        &self,
        mesh_id: &str,
        member_id: &str,
        id: &str,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE scheduled_message SET next_at = NULL, cancelled = 1 \
                           WHERE id = $1 AND mesh_id = $2 AND member_id = $3 AND next_at IS NOT NULL";
        let n = with_db_write!(self, p => sqlx::query(SQL).bind(id).bind(mesh_id).bind(member_id)
            .execute(p).await.map(|r| r.rows_affected()))?;
        Ok(n > 0)
    }

    /// Cancels one schedule (its creator was revoked, or its mesh is gone).
    pub async fn cancel_schedule_by_id(&self, id: &str) -> Result<(), StoreError> {
        const SQL: &str =
            "UPDATE scheduled_message SET next_at = NULL, cancelled = 1 WHERE id = $1";
        with_db_write!(self, p => sqlx::query(SQL).bind(id).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Schedules due at `now`, oldest first.
    pub async fn due_schedules(
        &self,
        now: i64,
        limit: i64,
    ) -> Result<Vec<ScheduleRow>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            columns!(),
            " FROM scheduled_message \
             WHERE next_at IS NOT NULL AND next_at <= $1 ORDER BY next_at, id LIMIT +$2"
        );
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(now).bind(limit).fetch_all(p).await)?)
    }

    /// The earliest pending fire time.
    pub async fn next_schedule_at(&self) -> Result<Option<i64>, StoreError> {
        const SQL: &str = "SELECT MIN(next_at) FROM scheduled_message WHERE next_at IS NOT NULL";
        Ok(with_db!(self, p => sqlx::query_scalar(SQL).fetch_one(p).await)?)
    }

    /// Records a delivery: moves the schedule to `next` (`None`: done) unless it was
    /// cancelled or changed since it was read as due at `was`.
    pub async fn schedule_fired(
        &self,
        id: &str,
        was: i64,
        next: Option<i64>,
        now: i64,
    ) -> Result<(), StoreError> {
        const SQL: &str = "UPDATE scheduled_message SET next_at = $1, fired_count = fired_count + 1, fired_at = $2 \
                           WHERE id = $3 AND next_at = $4";
        with_db_write!(self, p => sqlx::query(SQL).bind(next).bind(now).bind(id).bind(was)
            .execute(p).await.map(drop))?;
        Ok(())
    }
}
