//! What each member, and each mesh, keeps stored of each kind (for quotas, `/metrics`
//! and `meshd usage`). The checks themselves are in `crate::quota`.

use super::{Db, StoreError};

/// A stored kind with a quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Messages,
    Memory,
    Tasks,
    Skills,
    Files,
    Schedules,
    Streams,
    Webhooks,
    State,
}

impl Kind {
    pub const ALL: [Self; 9] = [
        Self::Messages,
        Self::Memory,
        Self::Tasks,
        Self::Skills,
        Self::Files,
        Self::Schedules,
        Self::Streams,
        Self::Webhooks,
        Self::State,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Messages => "messages",
            Self::Memory => "memory",
            Self::Tasks => "tasks",
            Self::Skills => "skills",
            Self::Files => "files",
            Self::Schedules => "schedules",
            Self::Streams => "streams",
            Self::Webhooks => "webhooks",
            Self::State => "state",
        }
    }

    /// The table, the column naming its member (the member id; for tasks the member
    /// key), what a row weighs, and which rows count.
    const fn sql_parts(
        self,
    ) -> (
        &'static str,
        &'static str,
        &'static [&'static str],
        &'static str,
    ) {
        match self {
            Self::Messages => (
                "message",
                "sender_member_id",
                &["nonce", "ciphertext"],
                "TRUE",
            ),
            Self::Memory => ("memory", "remembered_by", &["content", "tags"], "TRUE"),
            Self::Tasks => ("task", "creator_pubkey", &["title", "result"], "TRUE"),
            Self::Skills => (
                "skill",
                "author_member_id",
                &["instructions", "description", "tags"],
                "TRUE",
            ),
            // Bytes held here (a replicated row's bytes are on its holder's disk).
            Self::Files => ("file", "uploader_member_id", &[], "home_broker IS NULL"),
            Self::Schedules => ("scheduled_message", "member_id", &["message"], "TRUE"),
            Self::Streams => ("stream", "created_by_member", &["name"], "TRUE"),
            Self::Webhooks => ("webhook", "creator_member_id", &["name"], "active"),
            Self::State => ("state", "updated_by_member", &["key", "value"], "TRUE"),
        }
    }
}

/// Rows and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Usage {
    pub rows: i64,
    pub bytes: i64,
}

impl Usage {
    pub const fn new(rows: i64, bytes: i64) -> Self {
        Self { rows, bytes }
    }

    pub(crate) fn plus(self, o: Self) -> Self {
        Self {
            rows: self.rows.saturating_add(o.rows),
            bytes: self.bytes.saturating_add(o.bytes),
        }
    }
}

/// The SQL of a usage query. Bytes are `octet_length`, which reads no content on either
/// backend (SQLite ≥ 3.43 takes it from the record header, PostgreSQL from the TOAST
/// header): a recount costs a row, not the row's bytes.
fn usage_sql(kind: Kind, pg: bool, member: bool) -> String {
    let (table, member_col, weighed, filter) = kind.sql_parts();
    let len = |c: &str| format!("COALESCE(octet_length({c}), 0)");
    let bytes = if kind == Kind::Files {
        // Rows count until purged; bytes only while the file exists.
        "CASE WHEN deleted_at IS NULL THEN size_bytes ELSE 0 END".to_owned()
    } else {
        weighed
            .iter()
            .map(|c| len(c))
            .collect::<Vec<_>>()
            .join(" + ")
    };
    let filter = if pg {
        filter.to_owned()
    } else {
        filter.replace("TRUE", "1")
    };
    let of_member = if member {
        format!("AND COALESCE({member_col}, '') = $2")
    } else {
        String::new()
    };
    format!(
        "SELECT mesh_id, COALESCE({member_col}, '') AS member, CAST(COUNT(*) AS BIGINT) AS rows, \
         CAST(COALESCE(SUM({bytes}), 0) AS BIGINT) AS bytes FROM {table} \
         WHERE ({filter}) AND ($1 IS NULL OR mesh_id = $1) {of_member} GROUP BY mesh_id, {member_col}"
    )
}

/// One mesh × member usage row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MemberUsage {
    pub mesh_id: String,
    pub member: String,
    pub rows: i64,
    pub bytes: i64,
}

impl Db {
    /// Usage of `kind` by one member of a mesh (`""`: rows whose member is unknown).
    pub async fn usage_of(
        &self,
        kind: Kind,
        mesh_id: &str,
        member: &str,
    ) -> Result<Usage, StoreError> {
        let sql = usage_sql(kind, matches!(self, Self::Postgres(_)), true);
        let row: Option<MemberUsage> = with_db!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(mesh_id).bind(member)
            .fetch_optional(p).await)?;
        Ok(row.map_or_else(Usage::default, |r| Usage::new(r.rows, r.bytes)))
    }

    /// Usage of `kind` by mesh and member (every mesh, or one).
    pub async fn usage_by_member(
        &self,
        kind: Kind,
        mesh_id: Option<&str>,
    ) -> Result<Vec<MemberUsage>, StoreError> {
        let sql = usage_sql(kind, matches!(self, Self::Postgres(_)), false);
        Ok(
            with_db!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(mesh_id)
            .fetch_all(p).await)?,
        )
    }
}

/// Rows removed per purge statement (each statement is short; a purge repeats until a
/// statement comes back short).
pub const PURGE_CHUNK: i64 = 5_000;

impl Db {
    /// Runs `sql` (binding `bind` then [`PURGE_CHUNK`]) until it removes fewer rows
    /// than a chunk, at most 20 times; returns the rows removed.
    async fn purge_loop(&self, sql: &str, bind: i64) -> Result<u64, StoreError> {
        let mut total = 0;
        for _ in 0..20 {
            let n = with_db_write!(self, p => sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
                .bind(bind).bind(PURGE_CHUNK).execute(p).await.map(|r| r.rows_affected()))?;
            total += n;
            if n < u64::try_from(PURGE_CHUNK).unwrap_or(u64::MAX) {
                break;
            }
        }
        Ok(total)
    }

    /// Forgotten notes forgotten before `before` (ms).
    pub async fn purge_forgotten(&self, before: i64) -> Result<u64, StoreError> {
        self.purge_loop(
            "DELETE FROM memory WHERE id IN (SELECT id FROM memory \
             WHERE forgotten_at IS NOT NULL AND forgotten_at < $1 LIMIT +$2)",
            before,
        )
        .await
    }

    /// Tasks completed before `before`.
    pub async fn purge_done_tasks(&self, before: i64) -> Result<u64, StoreError> {
        self.purge_loop(
            "DELETE FROM task WHERE id IN (SELECT id FROM task \
             WHERE completed_at IS NOT NULL AND completed_at < $1 LIMIT +$2)",
            before,
        )
        .await
    }

    /// Schedules closed (fired for good or cancelled) before `before`.
    pub async fn purge_closed_schedules(&self, before: i64) -> Result<u64, StoreError> {
        self.purge_loop(
            "DELETE FROM scheduled_message WHERE id IN (SELECT id FROM scheduled_message \
             WHERE next_at IS NULL AND COALESCE(fired_at, created_at) < $1 LIMIT +$2)",
            before,
        )
        .await
    }

    /// Rows of files deleted before `before` (their bytes went at deletion), with their
    /// keys and downloads.
    pub async fn purge_deleted_files(&self, before: i64) -> Result<u64, StoreError> {
        for table in ["file_key", "file_access"] {
            let sql = format!(
                "DELETE FROM {table} WHERE file_id IN (SELECT id FROM file \
                 WHERE deleted_at IS NOT NULL AND deleted_at < $1 LIMIT +$2)"
            );
            self.purge_loop(&sql, before).await?;
        }
        self.purge_loop(
            "DELETE FROM file WHERE id IN (SELECT id FROM file \
             WHERE deleted_at IS NOT NULL AND deleted_at < $1 LIMIT +$2)",
            before,
        )
        .await
    }

    /// Downloads beyond the newest `keep` of each file.
    pub async fn prune_file_accesses(&self, keep: i64) -> Result<u64, StoreError> {
        self.purge_loop(
            "DELETE FROM file_access WHERE (file_id, accessed_at) IN (SELECT file_id, accessed_at FROM \
             (SELECT file_id, accessed_at, ROW_NUMBER() OVER (PARTITION BY file_id ORDER BY accessed_at DESC) AS rn \
              FROM file_access) t WHERE rn > $1 LIMIT +$2)",
            keep,
        )
        .await
    }

    /// Session keys beyond the `keep` most recently seen of each member: (mesh, key).
    pub async fn prune_session_keys(&self, keep: i64) -> Result<Vec<(String, String)>, StoreError> {
        const SQL: &str = "DELETE FROM session_key WHERE (mesh_id, pubkey) IN (SELECT mesh_id, pubkey FROM \
             (SELECT mesh_id, pubkey, ROW_NUMBER() OVER (PARTITION BY mesh_id, member_id ORDER BY last_seen DESC) AS rn \
              FROM session_key) t WHERE rn > $1 LIMIT +$2) RETURNING mesh_id, pubkey";
        Ok(
            with_db_write!(self, p => sqlx::query_as(SQL).bind(keep).bind(PURGE_CHUNK).fetch_all(p).await)?,
        )
    }

    /// Audit entries older than `before`, or beyond the newest `keep` of their mesh:
    /// per mesh, the first sequence number to keep and how many would go.
    pub async fn audit_prunable(
        &self,
        before: i64,
        keep: i64,
    ) -> Result<Vec<(String, i64, i64)>, StoreError> {
        const FIND: &str = "SELECT mesh_id, CAST(MAX(seq) + 1 AS BIGINT) AS first_kept, CAST(COUNT(*) AS BIGINT) AS n FROM \
             (SELECT mesh_id, seq, created_at, ROW_NUMBER() OVER (PARTITION BY mesh_id ORDER BY seq DESC) AS rn \
              FROM audit_log) t WHERE rn > $1 OR created_at < $2 GROUP BY mesh_id";
        Ok(with_db!(self, p => sqlx::query_as(FIND).bind(keep).bind(before).fetch_all(p).await)?)
    }

    /// Removes a mesh's audit entries before `first_kept`.
    pub async fn delete_audit_before(
        &self,
        mesh_id: &str,
        first_kept: i64,
    ) -> Result<u64, StoreError> {
        const DELETE: &str = "DELETE FROM audit_log WHERE mesh_id = $1 AND seq < $2";
        Ok(
            with_db_write!(self, p => sqlx::query(DELETE).bind(mesh_id).bind(first_kept).execute(p).await
            .map(|r| r.rows_affected()))?,
        )
    }
}

impl Db {
    /// Webhooks deleted (inactive) are kept for nothing.
    pub async fn purge_inactive_webhooks(&self) -> Result<u64, StoreError> {
        self.purge_loop(
            "DELETE FROM webhook WHERE id IN (SELECT id FROM webhook WHERE NOT active AND $1 = $1 LIMIT +$2)",
            0,
        )
        .await
    }
}
