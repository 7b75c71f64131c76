//! Tasks (rare writes, through the pool; a claim is a compare-and-set in one statement).

use super::{Db, StoreError};

/// A stored task.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TaskRow {
    /// Id.
    pub id: String,
    /// Mesh.
    pub mesh_id: String,
    /// Title.
    pub title: String,
    /// Assignee.
    pub assignee: Option<String>,
    /// Claimer's display name.
    pub claimed_by: Option<String>,
    /// Priority (free text).
    pub priority: String,
    /// `open`, `claimed` or `done`.
    pub status: String,
    /// Tags, JSON array.
    pub tags: String,
    /// Outcome.
    pub result: Option<String>,
    /// Creator's display name.
    pub created_by: Option<String>,
    /// Created (ms).
    pub created_at: i64,
}

/// Most tasks `list_tasks` returns (the reference's limit).
pub const LIST_LIMIT: i64 = 100;
/// Most open or claimed tasks a mesh keeps.
pub const MAX_ACTIVE_TASKS: i64 = 10_000;

impl Db {
    /// Creates a task; `false` when the mesh has too many unfinished tasks.
    pub async fn insert_task(&self, t: &TaskRow) -> Result<bool, StoreError> {
        const COUNT_SQL: &str = "SELECT COUNT(*) FROM task WHERE mesh_id = $1 AND status <> 'done'";
        const SQL: &str = "INSERT INTO task (id, mesh_id, title, assignee, claimed_by, priority, status, tags, result, created_by, created_at, seq) \
                           SELECT $1, $2, $3, $4, NULL, $5, 'open', $6, NULL, $7, $8, COALESCE(MAX(seq), 0) + 1 \
                           FROM task WHERE mesh_id = $2";
        let n: i64 =
            with_db!(self, p => sqlx::query_scalar(COUNT_SQL).bind(&t.mesh_id).fetch_one(p).await)?;
        if n >= MAX_ACTIVE_TASKS {
            return Ok(false);
        }
        with_db!(self, p => sqlx::query(SQL).bind(&t.id).bind(&t.mesh_id).bind(&t.title).bind(&t.assignee)
            .bind(&t.priority).bind(&t.tags).bind(&t.created_by).bind(t.created_at)
            .execute(p).await.map(drop))?;
        Ok(true)
    }

    /// Claims an open task (compare-and-set). Returns whether this call claimed it.
    pub async fn claim_task(
        &self,
        mesh_id: &str,
        id: &str,
        by: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE task SET status = 'claimed', claimed_by = $1, claimed_at = $2 \
                           WHERE mesh_id = $3 AND id = $4 AND status = 'open'";
        let n = with_db!(self, p => sqlx::query(SQL).bind(by).bind(now).bind(mesh_id).bind(id)
            .execute(p).await.map(|r| r.rows_affected()))?;
        Ok(n > 0)
    }

    /// Marks a task done (from any state, as the reference). Returns whether it exists.
    pub async fn complete_task(
        &self,
        mesh_id: &str,
        id: &str,
        result: Option<&str>,
        now: i64,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE task SET status = 'done', result = $1, completed_at = $2 \
                           WHERE mesh_id = $3 AND id = $4";
        let n = with_db!(self, p => sqlx::query(SQL).bind(result).bind(now).bind(mesh_id).bind(id)
            .execute(p).await.map(|r| r.rows_affected()))?;
        Ok(n > 0)
    }

    /// Tasks of a mesh by status: (open, claimed, done).
    pub async fn task_counts(&self, mesh_id: &str) -> Result<(i64, i64, i64), StoreError> {
        const SQL: &str = "SELECT status, COUNT(*) FROM task WHERE mesh_id = $1 GROUP BY status";
        let rows: Vec<(String, i64)> =
            with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).fetch_all(p).await)?;
        let count = |s: &str| rows.iter().find(|(k, _)| k == s).map_or(0, |(_, n)| *n);
        Ok((count("open"), count("claimed"), count("done")))
    }

    /// The newest tasks of a mesh (at most [`LIST_LIMIT`]), optionally filtered.
    pub async fn tasks(
        &self,
        mesh_id: &str,
        status: Option<&str>,
        assignee: Option<&str>,
    ) -> Result<Vec<TaskRow>, StoreError> {
        const SQL: &str = "SELECT id, mesh_id, title, assignee, claimed_by, priority, status, tags, result, created_by, created_at FROM task \
                           WHERE mesh_id = $1 AND ($2 IS NULL OR status = $2) AND ($3 IS NULL OR assignee = $3) \
                           ORDER BY seq DESC LIMIT $4";
        Ok(
            with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(status).bind(assignee).bind(LIST_LIMIT)
            .fetch_all(p).await)?,
        )
    }
}
