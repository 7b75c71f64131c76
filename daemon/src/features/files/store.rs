//! Stored files' metadata, download log and sealed keys (rare writes, through the pool).
//! The bytes are on disk (see `super::engine`).

use crate::store::{Db, StoreError, with_db, with_db_write};

/// A stored file.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct FileRow {
    /// Id.
    pub id: String,
    /// Mesh.
    pub mesh_id: String,
    /// Name.
    pub name: String,
    /// Bytes.
    pub size_bytes: i64,
    /// Content type given at upload.
    pub mime_type: Option<String>,
    /// SHA-256 of the bytes, hex.
    pub sha256: String,
    /// Tags, JSON array.
    pub tags: String,
    /// 1: kept until deleted; 0: expires.
    pub persistent: i64,
    /// 1: E2E-encrypted blob.
    pub encrypted: i64,
    /// Key allowed to grant access (encrypted files).
    pub owner_pubkey: String,
    /// Uploading member.
    pub uploader_member_id: String,
    /// Uploader's display name.
    pub uploaded_by_name: String,
    /// Who may read it (`None`: the whole mesh).
    pub target_spec: Option<String>,
    /// Uploaded (ms).
    pub uploaded_at: i64,
    /// Expiry (ms) of a non-persistent file.
    pub expires_at: Option<i64>,
    /// The peer broker holding the bytes (`None`: this one).
    pub home_broker: Option<String>,
    /// The uploader's member key.
    pub uploader_pubkey: Option<String>,
}

/// Files held here sent to a peer broker at link-up (its list is replaced by ours, so
/// this is large: beyond it, older files would disappear from the peer's list).
const MAX_HELD_LISTED: i64 = 100_000;

/// Rows `list_files` considers before filtering (newest first).
const LIST_SCAN: i64 = 2_000;

/// The columns of [`FileRow`], in a literal (sqlx takes only literal SQL).
macro_rules! columns {
    () => {
        "id, mesh_id, name, size_bytes, mime_type, sha256, tags, persistent, encrypted, owner_pubkey, uploader_member_id, uploaded_by_name, target_spec, uploaded_at, expires_at, home_broker, uploader_pubkey"
    };
}

impl Db {
    /// Stores a file's row and its sealed keys in one transaction.
    pub async fn insert_file(
        &self,
        f: &FileRow,
        keys: &[(String, String)],
    ) -> Result<(), StoreError> {
        const SQL: &str = concat!(
            "INSERT INTO file (",
            columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
        );
        const KEY_SQL: &str = "INSERT INTO file_key (file_id, peer_pubkey, sealed_key, granted_at, granted_by) VALUES ($1, $2, $3, $4, $5) \
                               ON CONFLICT (file_id, peer_pubkey) DO UPDATE SET sealed_key = excluded.sealed_key, granted_at = excluded.granted_at, granted_by = excluded.granted_by";
        with_db_write!(self, p => async {
            let mut tx = p.begin().await?;
            sqlx::query(SQL).bind(&f.id).bind(&f.mesh_id).bind(&f.name).bind(f.size_bytes).bind(&f.mime_type)
                .bind(&f.sha256).bind(&f.tags).bind(f.persistent).bind(f.encrypted).bind(&f.owner_pubkey)
                .bind(&f.uploader_member_id).bind(&f.uploaded_by_name).bind(&f.target_spec).bind(f.uploaded_at)
                .bind(f.expires_at).bind(&f.home_broker).bind(&f.uploader_pubkey).execute(&mut *tx).await?;
            for (peer, sealed) in keys {
                sqlx::query(KEY_SQL).bind(&f.id).bind(peer).bind(sealed).bind(f.uploaded_at)
                    .bind(&f.owner_pubkey).execute(&mut *tx).await?;
            }
            tx.commit().await
        }.await)?;
        Ok(())
    }

    /// A file of the mesh that is not deleted (or expired).
    pub async fn file(
        &self,
        mesh_id: &str,
        id: &str,
        now: i64,
    ) -> Result<Option<FileRow>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            columns!(),
            " FROM file WHERE id = $1 AND mesh_id = $2 AND deleted_at IS NULL AND (expires_at IS NULL OR expires_at > $3)"
        );
        Ok(
            with_db!(self, p => sqlx::query_as(SQL).bind(id).bind(mesh_id).bind(now).fetch_optional(p).await)?,
        )
    }

    /// The mesh's newest live files (before per-reader filtering).
    pub async fn files(&self, mesh_id: &str, now: i64) -> Result<Vec<FileRow>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            columns!(),
            " FROM file WHERE mesh_id = $1 AND deleted_at IS NULL AND (expires_at IS NULL OR expires_at > $2) \
             ORDER BY uploaded_at DESC, id DESC LIMIT +$3"
        );
        Ok(
            with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(now).bind(LIST_SCAN).fetch_all(p).await)?,
        )
    }

    /// How many live files the mesh has.
    pub async fn file_count(&self, mesh_id: &str, now: i64) -> Result<i64, StoreError> {
        const SQL: &str = "SELECT COUNT(*) FROM file WHERE mesh_id = $1 AND deleted_at IS NULL AND (expires_at IS NULL OR expires_at > $2)";
        Ok(with_db!(self, p => sqlx::query_scalar(SQL).bind(mesh_id).bind(now).fetch_one(p).await)?)
    }

    /// Bytes of the mesh's live files held here.
    pub async fn file_bytes(&self, mesh_id: &str, now: i64) -> Result<i64, StoreError> {
        const SQL: &str = "SELECT CAST(COALESCE(SUM(size_bytes), 0) AS BIGINT) FROM file WHERE mesh_id = $1 AND home_broker IS NULL AND deleted_at IS NULL AND (expires_at IS NULL OR expires_at > $2)";
        Ok(with_db!(self, p => sqlx::query_scalar(SQL).bind(mesh_id).bind(now).fetch_one(p).await)?)
    }

    /// The live files held here (for a peer broker whose link came up).
    pub async fn local_files(&self, mesh_id: &str, now: i64) -> Result<Vec<FileRow>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            columns!(),
            " FROM file WHERE mesh_id = $1 AND home_broker IS NULL AND deleted_at IS NULL AND (expires_at IS NULL OR expires_at > $2) \
             ORDER BY uploaded_at DESC, id DESC LIMIT +$3"
        );
        Ok(
            with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(now).bind(MAX_HELD_LISTED).fetch_all(p).await)?,
        )
    }

    /// Stores a peer broker's file metadata (never over a file held here or by another
    /// broker), or marks it deleted.
    pub async fn put_remote_file(
        &self,
        f: &FileRow,
        deleted_at: Option<i64>,
    ) -> Result<(), StoreError> {
        const SQL: &str = concat!(
            "INSERT INTO file (",
            columns!(),
            ", deleted_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, tags = excluded.tags, target_spec = excluded.target_spec, \
               expires_at = excluded.expires_at, deleted_at = excluded.deleted_at \
             WHERE file.home_broker = excluded.home_broker AND file.mesh_id = excluded.mesh_id"
        );
        with_db_write!(self, p => sqlx::query(SQL).bind(&f.id).bind(&f.mesh_id).bind(&f.name).bind(f.size_bytes).bind(&f.mime_type)
            .bind(&f.sha256).bind(&f.tags).bind(f.persistent).bind(f.encrypted).bind(&f.owner_pubkey)
            .bind(&f.uploader_member_id).bind(&f.uploaded_by_name).bind(&f.target_spec).bind(f.uploaded_at)
            .bind(f.expires_at).bind(&f.home_broker).bind(&f.uploader_pubkey).bind(deleted_at)
            .execute(p).await.map(drop))?;
        Ok(())
    }

    /// Marks one file `broker` holds deleted (an update only: a removal never creates a
    /// row, so it cannot shadow a file another broker announces later).
    pub async fn delete_remote_file(
        &self,
        mesh_id: &str,
        id: &str,
        broker: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        const SQL: &str = "UPDATE file SET deleted_at = $1 WHERE id = $2 AND mesh_id = $3 AND home_broker = $4 AND deleted_at IS NULL";
        with_db_write!(self, p => sqlx::query(SQL).bind(now).bind(id).bind(mesh_id).bind(broker).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Marks every file of `broker` in the mesh deleted (before its full list is applied).
    pub async fn forget_remote_files(
        &self,
        mesh_id: &str,
        broker: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        const SQL: &str = "UPDATE file SET deleted_at = $1 WHERE mesh_id = $2 AND home_broker = $3 AND deleted_at IS NULL";
        with_db_write!(self, p => sqlx::query(SQL).bind(now).bind(mesh_id).bind(broker).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Records a download URL handed out.
    pub async fn record_file_access(
        &self,
        file_id: &str,
        peer_pubkey: &str,
        peer_name: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO file_access (file_id, peer_pubkey, peer_name, accessed_at) VALUES ($1, $2, $3, $4)";
        with_db_write!(self, p => sqlx::query(SQL).bind(file_id).bind(peer_pubkey).bind(peer_name).bind(at)
            .execute(p).await.map(drop))?;
        Ok(())
    }

    /// A file's downloads, newest first (at most 100).
    pub async fn file_accesses(&self, file_id: &str) -> Result<Vec<(String, i64)>, StoreError> {
        const SQL: &str = "SELECT peer_name, accessed_at FROM file_access WHERE file_id = $1 ORDER BY accessed_at DESC LIMIT 100";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(file_id).fetch_all(p).await)?)
    }

    /// The file key sealed for one of `keys`, if any.
    pub async fn sealed_file_key(
        &self,
        file_id: &str,
        keys: &[&str],
    ) -> Result<Option<String>, StoreError> {
        const SQL: &str = "SELECT sealed_key FROM file_key WHERE file_id = $1 AND peer_pubkey = $2";
        for k in keys {
            let found: Option<String> = with_db!(self, p => sqlx::query_scalar(SQL).bind(file_id).bind(*k).fetch_optional(p).await)?;
            if found.is_some() {
                return Ok(found);
            }
        }
        Ok(None)
    }

    /// Stores (or replaces) a peer's sealed key.
    pub async fn grant_file_key(
        &self,
        file_id: &str,
        peer_pubkey: &str,
        sealed_key: &str,
        by: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO file_key (file_id, peer_pubkey, sealed_key, granted_at, granted_by) VALUES ($1, $2, $3, $4, $5) \
                           ON CONFLICT (file_id, peer_pubkey) DO UPDATE SET sealed_key = excluded.sealed_key, granted_at = excluded.granted_at, granted_by = excluded.granted_by";
        with_db_write!(self, p => sqlx::query(SQL).bind(file_id).bind(peer_pubkey).bind(sealed_key).bind(at).bind(by)
            .execute(p).await.map(drop))?;
        Ok(())
    }

    /// Marks a file deleted (dropping its keys and download log). Returns whether it
    /// was live.
    pub async fn delete_file(&self, id: &str, at: i64) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE file SET deleted_at = $1 WHERE id = $2 AND deleted_at IS NULL";
        const KEYS: &str = "DELETE FROM file_key WHERE file_id = $1";
        const LOG: &str = "DELETE FROM file_access WHERE file_id = $1";
        let n = with_db_write!(self, p => sqlx::query(SQL).bind(at).bind(id).execute(p).await.map(|r| r.rows_affected()))?;
        with_db_write!(self, p => sqlx::query(KEYS).bind(id).execute(p).await.map(drop))?;
        with_db_write!(self, p => sqlx::query(LOG).bind(id).execute(p).await.map(drop))?;
        Ok(n > 0)
    }

    /// Non-persistent files past their expiry, marked deleted; returns (mesh, id) so
    /// their bytes can be removed.
    pub async fn expire_files(&self, now: i64) -> Result<Vec<(String, String)>, StoreError> {
        const FIND: &str = "SELECT mesh_id, id FROM file WHERE home_broker IS NULL AND expires_at IS NOT NULL AND expires_at <= $1 AND deleted_at IS NULL LIMIT 1000";
        const MARK: &str = "UPDATE file SET deleted_at = $1 WHERE id = $2";
        let rows: Vec<(String, String)> =
            with_db_write!(self, p => sqlx::query_as(FIND).bind(now).fetch_all(p).await)?;
        for (_, id) in &rows {
            with_db_write!(self, p => sqlx::query(MARK).bind(now).bind(id).execute(p).await.map(drop))?;
            self.delete_file(id, now).await?;
        }
        Ok(rows)
    }
}
