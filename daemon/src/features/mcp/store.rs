//! Persistent MCP server registrations (rare writes, through the pool).

use crate::store::{Db, StoreError, with_db, with_db_write};

/// A stored (persistent) registration.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct McpServerRow {
    /// Mesh.
    pub mesh_id: String,
    /// Server name.
    pub name: String,
    /// Hosting member.
    pub member_id: String,
    /// Its key.
    pub member_pubkey: String,
    /// Its display name when it registered.
    pub hosted_by: String,
    /// Description.
    pub description: String,
    /// Tools, JSON array.
    pub tools: String,
    /// Registered (ms).
    pub registered_at: i64,
    /// When its host left (ms); `None` while connected.
    pub offline_since: Option<i64>,
}

impl Db {
    /// Stores or replaces a persistent registration.
    pub async fn upsert_mcp_server(&self, r: &McpServerRow) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO mcp_server (mesh_id, name, member_id, member_pubkey, hosted_by, description, tools, registered_at, offline_since) \
                           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL) \
                           ON CONFLICT (mesh_id, name) DO UPDATE SET member_id = excluded.member_id, member_pubkey = excluded.member_pubkey, \
                           hosted_by = excluded.hosted_by, description = excluded.description, tools = excluded.tools, registered_at = excluded.registered_at, offline_since = NULL";
        with_db_write!(self, p => sqlx::query(SQL).bind(&r.mesh_id).bind(&r.name).bind(&r.member_id).bind(&r.member_pubkey)
            .bind(&r.hosted_by).bind(&r.description).bind(&r.tools).bind(r.registered_at)
            .execute(p).await.map(drop))?;
        Ok(())
    }

    /// Deletes a registration (a no-op when it was not persistent).
    pub async fn delete_mcp_server(&self, mesh_id: &str, name: &str) -> Result<(), StoreError> {
        const SQL: &str = "DELETE FROM mcp_server WHERE mesh_id = $1 AND name = $2";
        with_db_write!(self, p => sqlx::query(SQL).bind(mesh_id).bind(name).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Marks a registration's host gone (`Some(ms)`) or back (`None`).
    pub async fn mcp_server_offline(
        &self,
        mesh_id: &str,
        name: &str,
        since: Option<i64>,
    ) -> Result<(), StoreError> {
        const SQL: &str =
            "UPDATE mcp_server SET offline_since = $1 WHERE mesh_id = $2 AND name = $3";
        with_db_write!(self, p => sqlx::query(SQL).bind(since).bind(mesh_id).bind(name).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Every persistent registration (loaded once at start, offline).
    pub async fn mcp_servers(&self) -> Result<Vec<McpServerRow>, StoreError> {
        const SQL: &str = "SELECT mesh_id, name, member_id, member_pubkey, hosted_by, description, tools, registered_at, offline_since \
                           FROM mcp_server ORDER BY mesh_id, name";
        Ok(with_db!(self, p => sqlx::query_as(SQL).fetch_all(p).await)?)
    }
}
