//! Vault entries: one row per (mesh, member, key), opaque to the broker.

use crate::store::{Db, StoreError, with_db, with_db_write};

/// Most entries one member keeps in one mesh.
pub const MAX_ENTRIES_PER_MEMBER: i64 = 500;

/// A stored entry.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct VaultRow {
    /// Key.
    pub key: String,
    /// Encrypted value, base64.
    pub ciphertext: String,
    /// Nonce, base64.
    pub nonce: String,
    /// Sealed value key, base64.
    pub sealed_key: String,
    /// `env` or `file`.
    pub entry_type: String,
    /// Mount path.
    pub mount_path: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// Last write (ms).
    pub updated_at: i64,
}

/// Why a `vault_set` was not stored.
#[derive(Debug, thiserror::Error)]
pub enum VaultSetError {
    /// The member holds [`MAX_ENTRIES_PER_MEMBER`] entries already.
    #[error("the vault holds {MAX_ENTRIES_PER_MEMBER} entries already; delete some first")]
    Full,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Db {
    /// Stores or replaces `row` for `member_id` in `mesh_id`.
    pub async fn vault_set(
        &self,
        mesh_id: &str,
        member_id: &str,
        row: &VaultRow,
    ) -> Result<(), VaultSetError> {
        const COUNT: &str =
            "SELECT COUNT(*) FROM vault_entry WHERE mesh_id = $1 AND member_id = $2 AND key <> $3";
        const UPSERT: &str = "INSERT INTO vault_entry (id, mesh_id, member_id, key, ciphertext, nonce, sealed_key, entry_type, mount_path, description, created_at, updated_at) \
                              VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11) \
                              ON CONFLICT (mesh_id, member_id, key) DO UPDATE SET ciphertext = excluded.ciphertext, \
                                nonce = excluded.nonce, sealed_key = excluded.sealed_key, entry_type = excluded.entry_type, \
                                mount_path = excluded.mount_path, description = excluded.description, updated_at = excluded.updated_at";
        // One member writes its own vault from a handful of sessions: the count and the
        // upsert need not be atomic (a race overshoots the cap by a few rows at most).
        let held: i64 = with_db!(self, p => sqlx::query_scalar(COUNT).bind(mesh_id).bind(member_id).bind(&row.key)
            .fetch_one(p).await).map_err(StoreError::from)?;
        if held >= MAX_ENTRIES_PER_MEMBER {
            return Err(VaultSetError::Full);
        }
        with_db_write!(self, p => sqlx::query(UPSERT).bind(crate::ids::random_id()).bind(mesh_id).bind(member_id)
            .bind(&row.key).bind(&row.ciphertext).bind(&row.nonce).bind(&row.sealed_key).bind(&row.entry_type)
            .bind(&row.mount_path).bind(&row.description).bind(row.updated_at)
            .execute(p).await.map(drop)).map_err(StoreError::from)?;
        Ok(())
    }

    /// The member's entries, by key.
    pub async fn vault_list(
        &self,
        mesh_id: &str,
        member_id: &str,
    ) -> Result<Vec<VaultRow>, StoreError> {
        const SQL: &str = "SELECT key, ciphertext, nonce, sealed_key, entry_type, mount_path, description, updated_at \
                           FROM vault_entry WHERE mesh_id = $1 AND member_id = $2 ORDER BY key";
        Ok(
            with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(member_id).fetch_all(p).await)?,
        )
    }

    /// Deletes one entry. Returns whether it existed.
    pub async fn vault_delete(
        &self,
        mesh_id: &str,
        member_id: &str,
        key: &str,
    ) -> Result<bool, StoreError> {
        const SQL: &str =
            "DELETE FROM vault_entry WHERE mesh_id = $1 AND member_id = $2 AND key = $3";
        let n = with_db_write!(self, p => sqlx::query(SQL).bind(mesh_id).bind(member_id).bind(key)
            .execute(p).await.map(|r| r.rows_affected()))?;
        Ok(n > 0)
    }
}
