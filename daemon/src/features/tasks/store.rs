//! Tasks (rare writes, through the pool; a claim is a compare-and-set in one statement).

use crate::store::{Db, StoreError, with_db, with_db_write};

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
    pub async fn insert_task(&self, t: &TaskRow, creator_pubkey: &str) -> Result<bool, StoreError> {
        const COUNT_SQL: &str = "SELECT COUNT(*) FROM task WHERE mesh_id = $1 AND status <> 'done'";
        const SQL: &str = "INSERT INTO task (id, mesh_id, title, assignee, claimed_by, priority, status, tags, result, created_by, created_at, seq, creator_pubkey) \
                           SELECT $1, $2, $3, $4, NULL, $5, 'open', $6, NULL, $7, $8, COALESCE(MAX(seq), 0) + 1, $9 \
                           FROM task WHERE mesh_id = $2";
        let n: i64 = with_db_write!(self, p => sqlx::query_scalar(COUNT_SQL).bind(&t.mesh_id).fetch_one(p).await)?;
        if n >= MAX_ACTIVE_TASKS {
            return Ok(false);
        }
        with_db_write!(self, p => sqlx::query(SQL).bind(&t.id).bind(&t.mesh_id).bind(&t.title).bind(&t.assignee)
            .bind(&t.priority).bind(&t.tags).bind(&t.created_by).bind(t.created_at).bind(creator_pubkey)
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
        let n = with_db_write!(self, p => sqlx::query(SQL).bind(by).bind(now).bind(mesh_id).bind(id)
            .execute(p).await.map(|r| r.rows_affected()))?;
        Ok(n > 0)
    }

    /// Marks a task done (from any state, as the reference). Completing it again
    /// replaces the result, with a completion time after the previous one so the new
    /// result also wins on the mesh's other brokers (the later completion wins there).
    /// Returns whether it exists.
    pub async fn complete_task(
        &self,
        mesh_id: &str,
        id: &str,
        result: Option<&str>,
        now: i64,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE task SET status = 'done', result = $1, \
                           completed_at = CASE WHEN completed_at IS NULL OR completed_at < $2 THEN $2 ELSE completed_at + 1 END \
                           WHERE mesh_id = $3 AND id = $4";
        let n = with_db_write!(self, p => sqlx::query(SQL).bind(result).bind(now).bind(mesh_id).bind(id)
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
                           ORDER BY seq DESC LIMIT +$4";
        Ok(
            with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(status).bind(assignee).bind(LIST_LIMIT)
            .fetch_all(p).await)?,
        )
    }
}

/// A task with what replication needs.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TaskFull {
    /// Id.
    pub id: String,
    /// Mesh.
    pub mesh_id: String,
    /// Title.
    pub title: String,
    /// Assignee.
    pub assignee: Option<String>,
    /// Priority.
    pub priority: String,
    /// Tags, JSON array.
    pub tags: String,
    /// Creator's display name.
    pub created_by: Option<String>,
    /// Creator's member key (tasks created before replication have none).
    pub creator_pubkey: Option<String>,
    /// Created (ms).
    pub created_at: i64,
    /// Claim.
    pub claimed_by: Option<String>,
    /// Claimed (ms).
    pub claimed_at: Option<i64>,
    /// Outcome.
    pub result: Option<String>,
    /// Completed (ms).
    pub completed_at: Option<i64>,
}

/// The mergeable part of a task: its claim and its completion.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskProgress {
    /// (claimed at, by).
    pub claim: Option<(i64, String)>,
    /// (completed at, result).
    pub completion: Option<(i64, Option<String>)>,
}

impl TaskProgress {
    /// Merges two brokers' views: the earlier claim (then the smaller name) wins — the
    /// first claimer keeps the task — and the later completion (then the larger result)
    /// wins, as `complete_task` may be sent again to replace a result. Either way every
    /// broker ends with the same task whatever the order the updates arrive in.
    #[must_use]
    pub fn merge(&self, other: &Self) -> Self {
        fn pick<T: Clone + Ord>(a: &Option<T>, b: &Option<T>, f: fn(T, T) -> T) -> Option<T> {
            match (a, b) {
                (Some(x), Some(y)) => Some(f(x.clone(), y.clone())),
                (x, y) => x.clone().or_else(|| y.clone()),
            }
        }
        Self {
            claim: pick(&self.claim, &other.claim, std::cmp::min),
            completion: pick(&self.completion, &other.completion, std::cmp::max),
        }
    }

    /// `open`, `claimed` or `done`.
    pub const fn status(&self) -> &'static str {
        match (&self.completion, &self.claim) {
            (Some(_), _) => "done",
            (None, Some(_)) => "claimed",
            (None, None) => "open",
        }
    }
}

impl TaskFull {
    /// Its progress.
    pub fn progress(&self) -> TaskProgress {
        TaskProgress {
            claim: self.claimed_at.zip(self.claimed_by.clone()),
            completion: self.completed_at.map(|at| (at, self.result.clone())),
        }
    }
}

impl Db {
    /// One task with its replication fields.
    pub async fn task_full(&self, mesh_id: &str, id: &str) -> Result<Option<TaskFull>, StoreError> {
        const SQL: &str = "SELECT id, mesh_id, title, assignee, priority, tags, created_by, creator_pubkey, created_at, claimed_by, claimed_at, result, completed_at \
                           FROM task WHERE mesh_id = $1 AND id = $2";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(id).fetch_optional(p).await)?)
    }

    /// The mesh's newest tasks with their replication fields (a peer's catch-up).
    pub async fn tasks_full(&self, mesh_id: &str, limit: i64) -> Result<Vec<TaskFull>, StoreError> {
        const SQL: &str = "SELECT id, mesh_id, title, assignee, priority, tags, created_by, creator_pubkey, created_at, claimed_by, claimed_at, result, completed_at \
                           FROM task WHERE mesh_id = $1 ORDER BY seq DESC LIMIT +$2";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(limit).fetch_all(p).await)?)
    }

    /// Stores a task first learnt from a peer broker, with its progress.
    pub async fn insert_remote_task(&self, t: &TaskFull) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO task (id, mesh_id, title, assignee, claimed_by, priority, status, tags, result, created_by, created_at, claimed_at, completed_at, seq, creator_pubkey) \
                           SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, COALESCE(MAX(seq), 0) + 1, $14 \
                           FROM task WHERE mesh_id = $2 \
                           HAVING (SELECT COUNT(*) FROM task WHERE mesh_id = $2 AND status <> 'done') < $15 \
                           ON CONFLICT (id) DO NOTHING";
        let status = t.progress().status();
        with_db_write!(self, p => sqlx::query(SQL).bind(&t.id).bind(&t.mesh_id).bind(&t.title).bind(&t.assignee)
            .bind(&t.claimed_by).bind(&t.priority).bind(status).bind(&t.tags).bind(&t.result)
            .bind(&t.created_by).bind(t.created_at).bind(t.claimed_at).bind(t.completed_at).bind(&t.creator_pubkey)
            .bind(MAX_ACTIVE_TASKS)
            .execute(p).await.map(drop))?;
        Ok(())
    }

    /// Sets a task's merged progress if its progress is still `was` (compare-and-set:
    /// a local claim or completion in between is not overwritten; the caller merges
    /// again). Returns whether it was set.
    pub async fn set_task_progress(
        &self,
        mesh_id: &str,
        id: &str,
        was: &TaskProgress,
        p: &TaskProgress,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE task SET status = $1, claimed_by = $2, claimed_at = $3, result = $4, completed_at = $5 \
                           WHERE mesh_id = $6 AND id = $7 \
                           AND claimed_by IS NOT DISTINCT FROM $8 AND claimed_at IS NOT DISTINCT FROM $9 \
                           AND result IS NOT DISTINCT FROM $10 AND completed_at IS NOT DISTINCT FROM $11";
        let (claimed_at, claimed_by) = p.claim.clone().unzip();
        let (completed_at, result) = p.completion.clone().unzip();
        let (was_claimed_at, was_claimed_by) = was.claim.clone().unzip();
        let (was_completed_at, was_result) = was.completion.clone().unzip();
        let n = with_db_write!(self, pool => sqlx::query(SQL).bind(p.status()).bind(claimed_by).bind(claimed_at)
            .bind(result.flatten()).bind(completed_at).bind(mesh_id).bind(id)
            .bind(was_claimed_by).bind(was_claimed_at).bind(was_result.flatten()).bind(was_completed_at)
            .execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::TaskProgress;

    #[test]
    fn merges_agree_whatever_the_order() {
        let a = TaskProgress {
            claim: Some((10, "ann".into())),
            completion: None,
        };
        let b = TaskProgress {
            claim: Some((10, "bo".into())),
            completion: None,
        };
        let c = TaskProgress {
            claim: Some((12, "cy".into())),
            completion: Some((20, Some("ok".into()))),
        };
        let abc = a.merge(&b).merge(&c);
        let cba = c.merge(&b).merge(&a);
        assert_eq!(abc, cba);
        assert_eq!(
            abc.claim,
            Some((10, "ann".into())),
            "earliest claim, then the smaller name"
        );
        assert_eq!(
            abc.completion,
            Some((20, Some("ok".into()))),
            "the only completion"
        );
        let redone = TaskProgress {
            claim: None,
            completion: Some((30, Some("again".into()))),
        };
        assert_eq!(
            c.merge(&redone).completion,
            redone.merge(&c).completion,
            "commutative"
        );
        assert_eq!(
            c.merge(&redone).completion,
            Some((30, Some("again".into()))),
            "the later completion replaces the result"
        );
        assert_eq!(abc.status(), "done");
        assert_eq!(TaskProgress::default().merge(&a).status(), "claimed");
        assert_eq!(a.merge(&a), a, "idempotent");
    }
}
