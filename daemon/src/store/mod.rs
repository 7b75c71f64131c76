//! Persistence: one schema on SQLite (embedded, WAL) or PostgreSQL, chosen at run time.
//!
//! Reads go through a connection pool ([`Db`]); every write the broker makes while
//! serving goes through the group-commit [`writer`], which owns one connection and
//! commits many operations per transaction. Admin commands (`meshd mesh create` …) write
//! directly through [`Db`]; SQLite's busy timeout lets them run beside a live daemon.
//!
//! The SQL text is shared by both backends (`$n` placeholders, `ON CONFLICT`,
//! `RETURNING`); [`with_db!`] expands one query body for each pool type.
//!
//! Limits are written `LIMIT +$n`, never `LIMIT $n`: SQLite reads a bare bound limit
//! while planning and marks the statement stale whenever that parameter is re-bound,
//! so every execution re-prepared it (5% of the broker's CPU in the handshake bench).
//! The unary plus keeps the value out of the plan.

pub(crate) mod writer;

use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use meshd_config::{Backend, Durability};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions as _, PgPool, SqlitePool};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database refused or failed a statement.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// Schema migration failed.
    #[error("schema migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Filesystem error around the database file.
    #[error("{path}: {source}")]
    Io {
        /// File concerned.
        path: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The writer task is gone (shutting down).
    #[error("the store is shutting down")]
    Closed,
    /// A stored value could not be decoded.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
}

/// A pool on one of the two backends.
#[derive(Debug, Clone)]
pub enum Db {
    /// Embedded SQLite, and the gate its writers take turns through.
    Sqlite(SqlitePool, WriteGate),
    /// PostgreSQL.
    Postgres(PgPool),
}

/// SQLite has one writer at a time, and a writer that finds the database locked polls
/// (its busy handler sleeps 1 ms, 2 ms, … 100 ms between tries): under a steady stream
/// of store-writer batches a write from elsewhere (an audit batch, a note, a task) could
/// find it locked at every try and fail after `busy_timeout`. Every write of this
/// process takes this gate first — the store writer per batch, the others per statement
/// or transaction — and the gate is fair (first come, first served), so each waits for
/// the writes queued before it, never indefinitely. (Another process, the admin CLI,
/// still meets the busy handler; its writes are rare.)
pub type WriteGate = std::sync::Arc<tokio::sync::Mutex<()>>;

/// Expands `$body` once per backend with `$p` bound to the pool (or connection).
macro_rules! with_db {
    ($db:expr, $p:ident => $body:expr) => {
        match $db {
            $crate::store::Db::Sqlite($p, _) => $body,
            $crate::store::Db::Postgres($p) => $body,
        }
    };
}

/// [`with_db!`] for writes: on SQLite, `$body` runs holding the [`WriteGate`]. `$body`
/// must not call another write of the store (the gate is not reentrant).
macro_rules! with_db_write {
    ($db:expr, $p:ident => $body:expr) => {
        match $db {
            $crate::store::Db::Sqlite($p, gate) => {
                let _turn = gate.lock().await;
                $body
            }
            $crate::store::Db::Postgres($p) => $body,
        }
    };
}
pub(crate) use {with_db, with_db_write};

/// The stored form of a tag list: space-separated (the tag alphabet has no space),
/// `None` when empty.
pub(crate) fn tags_to_column(tags: &[String]) -> Option<String> {
    (!tags.is_empty()).then(|| tags.join(" "))
}

/// A tag list from its stored form; anything malformed is dropped.
pub(crate) fn tags_from_column(col: Option<&str>) -> Vec<String> {
    col.map(|c| {
        c.split(' ')
            .filter(|t| meshd_protocol::tags::valid(t))
            .map(str::to_owned)
            .collect()
    })
    .unwrap_or_default()
}

/// A mesh.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MeshRow {
    /// 32-character id.
    pub id: String,
    /// Human name.
    pub name: String,
    /// Unique short name.
    pub slug: String,
    /// Owner key (signs invites).
    pub owner_pubkey: String,
    /// Root key, base64url (carried in v1 invites).
    pub root_key: String,
    /// Creation time (ms).
    pub created_at: i64,
    /// Archive time (ms); archived meshes accept no hellos or joins.
    pub archived_at: Option<i64>,
}

/// A member of a mesh.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MemberRow {
    /// 32-character id.
    pub id: String,
    /// Mesh.
    pub mesh_id: String,
    /// Member key, lowercase hex.
    pub pubkey: String,
    /// Display name given at join.
    pub display_name: String,
    /// `admin` or `member`.
    pub role: String,
    /// Join time (ms).
    pub joined_at: i64,
    /// Revocation time (ms).
    pub revoked_at: Option<i64>,
    /// The peer broker hosting this member (`None`: hosted here).
    pub home_broker: Option<String>,
}

/// A session key bound to a member.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SessionKeyRow {
    /// Session key, lowercase hex.
    pub pubkey: String,
    /// Owning member.
    pub member_id: String,
}

/// A shared-state entry.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StateRow {
    /// Key.
    pub key: String,
    /// JSON text.
    pub value: String,
    /// Display name of the last writer.
    pub updated_by: String,
    /// Last write (ms).
    pub updated_at: i64,
    /// Member id of the last writer (quotas); `None` for values written before.
    pub updated_by_member: Option<String>,
}

/// What a member's last session left behind ("welcome back").
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PeerStateRow {
    /// Mesh.
    pub mesh_id: String,
    /// Member.
    pub member_id: String,
    /// Groups, JSON array of `{name, role?}`.
    pub groups: String,
    /// Profile, JSON object.
    pub profile: String,
    /// Visibility.
    pub visible: bool,
    /// Summary at disconnect.
    pub last_summary: Option<String>,
    /// Display name at disconnect.
    pub last_display_name: Option<String>,
    /// Cumulative counters, JSON.
    pub stats: String,
    /// Tag subscriptions, space-separated.
    pub tags: Option<String>,
    /// Disconnect time (ms).
    pub last_seen_at: i64,
}

/// A message's delivery record, for `message_status`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MessageStatusRow {
    /// Message id.
    pub id: String,
    /// Mesh.
    pub mesh_id: String,
    /// Target as sent.
    pub target_spec: String,
    /// Lowercase key for direct messages.
    pub target_key: Option<String>,
    /// Sender member.
    pub sender_member_id: String,
    /// Delivery time (ms).
    pub delivered_at: Option<i64>,
    /// Expiry (ms).
    pub expires_at: i64,
    /// Peer broker the message was forwarded to, if its recipient lives there.
    pub forward_to: Option<String>,
    /// When that broker stored it (or refused it).
    pub forwarded_at: Option<i64>,
    /// Why that broker refused it.
    pub forward_error: Option<String>,
    /// Tags, space-separated.
    pub tags: Option<String>,
}

/// An invite as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InviteRow {
    /// Id.
    pub id: String,
    /// Mesh.
    pub mesh_id: String,
    /// The token clients present.
    pub token: String,
    /// Role granted (authoritative, not the payload's).
    pub role: String,
    /// Maximum enrollments.
    pub max_uses: i64,
    /// Enrollments so far.
    pub used_count: i64,
    /// Expiry (ms).
    pub expires_at: i64,
    /// Creation (ms).
    pub created_at: i64,
    /// Revocation (ms).
    pub revoked_at: Option<i64>,
}

/// Longest wait for a pool connection: a request fails with "store unavailable" rather
/// than hang on a store that is down.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a connection coming back to the pool may be reused. One still inside a
/// transaction (SQLite rolls back by itself on a full disk or an I/O error, and sqlx's
/// own rollback of it then fails, leaving its transaction count behind) is closed
/// instead: reused, it would run later statements inside a savepoint that may hold the
/// write lock for good. The ping runs after any rollback a dropped transaction queued.
async fn usable_after_release<C: sqlx::Connection>(c: &mut C) -> Result<bool, sqlx::Error> {
    c.ping().await?;
    Ok(!c.is_in_transaction())
}

const SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
const POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

impl Db {
    /// Opens the database, creating it (and, for SQLite, its directory) if needed, and
    /// applies pending migrations.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn open(backend: &Backend, durability: Durability) -> Result<Self, StoreError> {
        match backend {
            Backend::Sqlite { path } => {
                prepare_sqlite_file(path)?;
                let pool = SqlitePoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .after_release(|c, _| Box::pin(usable_after_release(c)))
                    .connect_with(sqlite_options(path, durability))
                    .await?;
                SQLITE_MIGRATOR.run(&pool).await?;
                Ok(Self::Sqlite(pool, WriteGate::default()))
            }
            Backend::Postgres { url } => {
                let pool = PgPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .after_release(|c, _| Box::pin(usable_after_release(c)))
                    .connect_with(pg_options(url.expose())?)
                    .await?;
                POSTGRES_MIGRATOR.run(&pool).await?;
                Ok(Self::Postgres(pool))
            }
        }
    }

    /// Closes the pool (and, for SQLite, folds the WAL back into the database file).
    pub async fn close(&self) {
        if let Self::Sqlite(pool, _) = self {
            let _ = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(pool)
                .await;
        }
        with_db!(self, p => p.close().await);
    }

    /// Copies committed WAL frames into the SQLite database file without blocking the
    /// writer (a no-op on PostgreSQL).
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        if let Self::Sqlite(pool, _) = self {
            sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(pool)
                .await?;
        }
        Ok(())
    }

    /// A cheap round trip, for health checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        with_db!(self, p => sqlx::query("SELECT 1").execute(p).await.map(drop))?;
        Ok(())
    }

    /// SQLite's [`WriteGate`] (`None` on PostgreSQL, which has row locks).
    pub fn write_gate(&self) -> Option<WriteGate> {
        match self {
            Self::Sqlite(_, gate) => Some(gate.clone()),
            Self::Postgres(_) => None,
        }
    }

    /// Which backend, for logs and `/health`.
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::Sqlite(..) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    // ---- meshes ----------------------------------------------------------------------

    /// Inserts a mesh.
    pub async fn insert_mesh(&self, m: &MeshRow) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO mesh (id, name, slug, owner_pubkey, root_key, created_at, archived_at) \
                           VALUES ($1, $2, $3, $4, $5, $6, $7)";
        with_db_write!(self, p => sqlx::query(SQL)
            .bind(&m.id).bind(&m.name).bind(&m.slug).bind(&m.owner_pubkey)
            .bind(&m.root_key).bind(m.created_at).bind(m.archived_at)
            .execute(p).await.map(drop))?;
        Ok(())
    }

    /// Records a mesh's template and writes its initial state keys (in one transaction).
    pub async fn apply_template(
        &self,
        mesh_id: &str,
        template: &str,
        definition: &str,
        state: &[(&str, &str)],
        now: i64,
    ) -> Result<(), StoreError> {
        const TEMPLATE_SQL: &str =
            "INSERT INTO mesh_template (mesh_id, template, definition) VALUES ($1, $2, $3)";
        const STATE_SQL: &str = "INSERT INTO state (mesh_id, key, value, updated_by, updated_at) \
                                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (mesh_id, key) DO NOTHING";
        with_db_write!(self, p => async {
            let mut tx = p.begin().await?;
            sqlx::query(TEMPLATE_SQL).bind(mesh_id).bind(template).bind(definition)
                .execute(&mut *tx).await?;
            for (k, v) in state {
                sqlx::query(STATE_SQL).bind(mesh_id).bind(*k).bind(*v).bind("template")
                    .bind(now).execute(&mut *tx).await?;
            }
            tx.commit().await
        }.await)?;
        Ok(())
    }

    /// A mesh by id.
    pub async fn mesh_by_id(&self, id: &str) -> Result<Option<MeshRow>, StoreError> {
        const SQL: &str = "SELECT id, name, slug, owner_pubkey, root_key, created_at, archived_at FROM mesh WHERE id = $1";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(id).fetch_optional(p).await)?)
    }

    /// A mesh by slug.
    pub async fn mesh_by_slug(&self, slug: &str) -> Result<Option<MeshRow>, StoreError> {
        const SQL: &str = "SELECT id, name, slug, owner_pubkey, root_key, created_at, archived_at FROM mesh WHERE slug = $1";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(slug).fetch_optional(p).await)?)
    }

    /// All meshes, oldest first.
    pub async fn meshes(&self) -> Result<Vec<MeshRow>, StoreError> {
        const SQL: &str = "SELECT id, name, slug, owner_pubkey, root_key, created_at, archived_at FROM mesh ORDER BY created_at, id";
        Ok(with_db!(self, p => sqlx::query_as(SQL).fetch_all(p).await)?)
    }

    /// Live (non-revoked) member count per mesh.
    pub async fn member_count(&self, mesh_id: &str) -> Result<i64, StoreError> {
        const SQL: &str = "SELECT COUNT(*) FROM member WHERE mesh_id = $1 AND revoked_at IS NULL";
        Ok(with_db!(self, p => sqlx::query_scalar(SQL).bind(mesh_id).fetch_one(p).await)?)
    }

    // ---- members ---------------------------------------------------------------------

    /// Every member of a mesh, revoked ones included, in join order.
    pub async fn members(&self, mesh_id: &str) -> Result<Vec<MemberRow>, StoreError> {
        const SQL: &str = "SELECT id, mesh_id, pubkey, display_name, role, joined_at, revoked_at, home_broker \
                           FROM member WHERE mesh_id = $1 ORDER BY joined_at, id";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).fetch_all(p).await)?)
    }

    /// The member holding `pubkey` in a mesh (revoked or not).
    pub async fn member_by_pubkey(
        &self,
        mesh_id: &str,
        pubkey: &str,
    ) -> Result<Option<MemberRow>, StoreError> {
        const SQL: &str = "SELECT id, mesh_id, pubkey, display_name, role, joined_at, revoked_at, home_broker \
                           FROM member WHERE mesh_id = $1 AND pubkey = $2";
        Ok(
            with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(pubkey).fetch_optional(p).await)?,
        )
    }

    /// Revokes a member by id or public key. Returns the member if it was live.
    pub async fn revoke_member(
        &self,
        mesh_id: &str,
        id_or_pubkey: &str,
        now: i64,
    ) -> Result<Option<MemberRow>, StoreError> {
        const SQL: &str = "UPDATE member SET revoked_at = $1 \
                           WHERE mesh_id = $2 AND (id = $3 OR pubkey = $4) AND revoked_at IS NULL \
                           RETURNING id, mesh_id, pubkey, display_name, role, joined_at, revoked_at, home_broker";
        Ok(with_db_write!(self, p => sqlx::query_as(SQL)
            .bind(now).bind(mesh_id).bind(id_or_pubkey).bind(id_or_pubkey.to_ascii_lowercase())
            .fetch_optional(p).await)?)
    }

    /// Members revoked at or after `since` (ms), for the daemon's revocation watch.
    pub async fn revoked_since(&self, since: i64) -> Result<Vec<MemberRow>, StoreError> {
        const SQL: &str = "SELECT id, mesh_id, pubkey, display_name, role, joined_at, revoked_at, home_broker \
                           FROM member WHERE revoked_at IS NOT NULL AND revoked_at >= $1";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(since).fetch_all(p).await)?)
    }

    /// Records that the daemon named `broker` has applied every revocation committed
    /// before `applied_through` (ms), as of `now`.
    pub async fn revocations_applied(
        &self,
        broker: &str,
        applied_through: i64,
        now: i64,
    ) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO revocation_watch (broker, applied_through, beat_at) VALUES ($1, $2, $3) \
                           ON CONFLICT (broker) DO UPDATE SET applied_through = excluded.applied_through, beat_at = excluded.beat_at";
        with_db_write!(self, p => sqlx::query(SQL).bind(broker).bind(applied_through).bind(now).execute(p).await.map(drop))?;
        Ok(())
    }

    /// The oldest `applied_through` among daemons whose watch beat at or after `since`
    /// (ms); `None` when no daemon is watching.
    pub async fn revocations_applied_through(&self, since: i64) -> Result<Option<i64>, StoreError> {
        const SQL: &str = "SELECT MIN(applied_through) FROM revocation_watch WHERE beat_at >= $1";
        Ok(with_db!(self, p => sqlx::query_scalar(SQL).bind(since).fetch_one(p).await)?)
    }

    /// Session keys of a mesh.
    pub async fn session_keys(&self, mesh_id: &str) -> Result<Vec<SessionKeyRow>, StoreError> {
        const SQL: &str = "SELECT pubkey, member_id FROM session_key WHERE mesh_id = $1";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).fetch_all(p).await)?)
    }

    // ---- invites ---------------------------------------------------------------------

    /// Inserts an invite.
    pub async fn insert_invite(&self, i: &InviteRow) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO invite (id, mesh_id, token, role, max_uses, used_count, expires_at, created_at, revoked_at) \
                           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
        with_db_write!(self, p => sqlx::query(SQL)
            .bind(&i.id).bind(&i.mesh_id).bind(&i.token).bind(&i.role).bind(i.max_uses)
            .bind(i.used_count).bind(i.expires_at).bind(i.created_at).bind(i.revoked_at)
            .execute(p).await.map(drop))?;
        Ok(())
    }

    /// An invite by token.
    pub async fn invite_by_token(&self, token: &str) -> Result<Option<InviteRow>, StoreError> {
        const SQL: &str = "SELECT id, mesh_id, token, role, max_uses, used_count, expires_at, created_at, revoked_at \
                           FROM invite WHERE token = $1";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(token).fetch_optional(p).await)?)
    }

    // ---- state, peer state, messages -------------------------------------------------

    /// Every shared-state entry of a mesh.
    pub async fn state(&self, mesh_id: &str) -> Result<Vec<StateRow>, StoreError> {
        const SQL: &str = "SELECT key, value, updated_by, updated_at, updated_by_member FROM state WHERE mesh_id = $1";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).fetch_all(p).await)?)
    }

    /// The saved session state of a member.
    pub async fn peer_state(
        &self,
        mesh_id: &str,
        member_id: &str,
    ) -> Result<Option<PeerStateRow>, StoreError> {
        const SQL: &str = "SELECT mesh_id, member_id, groups, profile, visible, last_summary, last_display_name, stats, last_seen_at, tags \
                           FROM peer_state WHERE mesh_id = $1 AND member_id = $2";
        Ok(
            with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(member_id).fetch_optional(p).await)?,
        )
    }

    /// A message's delivery record.
    pub async fn message_status(&self, id: &str) -> Result<Option<MessageStatusRow>, StoreError> {
        const SQL: &str = "SELECT id, mesh_id, target_spec, target_key, sender_member_id, delivered_at, expires_at, \
                           forward_to, forwarded_at, forward_error, tags \
                           FROM message WHERE id = $1";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(id).fetch_optional(p).await)?)
    }

    /// Undelivered direct messages (the `queue_depth` gauge).
    pub async fn queue_depth(&self) -> Result<i64, StoreError> {
        const SQL: &str = "SELECT COUNT(*) FROM message WHERE delivered_at IS NULL";
        Ok(with_db!(self, p => sqlx::query_scalar(SQL).fetch_one(p).await)?)
    }
}

fn sqlite_options(path: &Path, durability: Durability) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(match durability {
            // In WAL mode NORMAL fsyncs only at checkpoints: a commit survives a crash of
            // the process (the WAL write reached the kernel) but not of the machine.
            Durability::Normal => SqliteSynchronous::Normal,
            Durability::Fsync => SqliteSynchronous::Full,
        })
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true)
        .pragma("cache_size", "-32000")
        .pragma("temp_store", "memory")
        .disable_statement_logging()
}

fn pg_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    Ok(PgConnectOptions::from_str(url)?.disable_statement_logging())
}

/// Creates the SQLite file's directory (0700) and the file itself (0600) so that the
/// database, which holds member keys and message metadata, is private from the start;
/// SQLite gives its `-wal`/`-shm` files the database file's mode.
fn prepare_sqlite_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        meshd_certs::ensure_private_dir(dir).map_err(|e| StoreError::Io {
            path: dir.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(io)
}

/// The writer's dedicated connection.
#[derive(Debug)]
pub(crate) enum WriterConn {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
    /// After shutdown.
    Closed,
}

impl WriterConn {
    /// Opens the writer connection for `backend`.
    pub(crate) async fn open(
        backend: &Backend,
        durability: Durability,
    ) -> Result<Self, StoreError> {
        use sqlx::Connection as _;
        match backend {
            Backend::Sqlite { path } => {
                let mut conn =
                    sqlx::SqliteConnection::connect_with(&sqlite_options(path, durability)).await?;
                // Checkpoints (which fsync the database file) run from the housekeeping
                // task on a pool connection, never in the writer's commit path.
                sqlx::query("PRAGMA wal_autocheckpoint = 0")
                    .execute(&mut conn)
                    .await?;
                Ok(Self::Sqlite(conn))
            }
            Backend::Postgres { url } => {
                let mut conn = sqlx::PgConnection::connect_with(&pg_options(url.expose())?).await?;
                // "normal": a commit is in PostgreSQL once acknowledged, so it survives any
                // crash of meshd, without waiting for PostgreSQL's WAL fsync (which took
                // 60 ms per batch on the test machines). "fsync": wait for the flush, so it
                // also survives a crash of PostgreSQL or its host.
                let sql = match durability {
                    Durability::Normal => "SET synchronous_commit = off",
                    Durability::Fsync => "SET synchronous_commit = on",
                };
                sqlx::query(sql).execute(&mut conn).await?;
                Ok(Self::Postgres(conn))
            }
        }
    }
}

// After `with_db!`, which they use.
pub mod usage;

#[cfg(test)]
mod layering {
    /// Modules of this crate the store may use: itself and leaves that use nothing of
    /// the crate (the metrics registry, the clock).
    const BELOW: &[&str] = &["store", "metrics", "time"];

    /// The store is the bottom layer: it never names the hub, sessions, delivery or
    /// federation, so it can be read, tested and replaced on its own.
    #[test]
    fn the_store_depends_on_nothing_above_it() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut offending = Vec::new();
        let mut files: Vec<_> = std::fs::read_dir(root.join("store"))
            .expect("daemon/src/store")
            .map(|e| e.expect("entry").path())
            .collect();
        files.push(root.join("metrics.rs"));
        files.push(root.join("time.rs"));
        for path in files {
            let text = std::fs::read_to_string(&path).expect("readable source");
            let leaf = path.ends_with("metrics.rs") || path.ends_with("time.rs");
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                // Spelled in two parts so this test does not find itself.
                let needle = concat!("crate", "::");
                for (i, _) in code.match_indices(needle) {
                    let module: String = code[i + needle.len()..]
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if leaf || !BELOW.contains(&module.as_str()) {
                        offending.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                    }
                }
            }
        }
        assert!(
            offending.is_empty(),
            "layering broken:\n{}",
            offending.join("\n")
        );
    }
}
