//! The stream registry (`create_stream`, `list_streams`); data is never stored.

use crate::store::{Db, StoreError, with_db, with_db_write};

/// A registered stream.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StreamRow {
    /// Id.
    pub id: String,
    /// Mesh.
    pub mesh_id: String,
    /// Name, unique per mesh.
    pub name: String,
    /// Display name of the creator.
    pub created_by: String,
    /// Created (ms).
    pub created_at: i64,
}

/// Most streams one mesh registers.
pub const MAX_STREAMS_PER_MESH: i64 = 1_000;

impl Db {
    /// Registers a stream unless one of that name exists; returns the stored row
    /// (`None` when the mesh has too many streams).
    /// `member` (the creator's member id) counts it against that member's quota.
    pub async fn create_stream(
        &self,
        s: &StreamRow,
        member: &str,
    ) -> Result<Option<StreamRow>, StoreError> {
        const COUNT_SQL: &str = "SELECT COUNT(*) FROM stream WHERE mesh_id = $1";
        const SQL: &str = "INSERT INTO stream (id, mesh_id, name, created_by, created_at, created_by_member) \
                           VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (mesh_id, name) DO NOTHING";
        const GET_SQL: &str = "SELECT id, mesh_id, name, created_by, created_at FROM stream \
                               WHERE mesh_id = $1 AND name = $2";
        let existing: Option<StreamRow> = with_db_write!(self, p => sqlx::query_as(GET_SQL)
            .bind(&s.mesh_id).bind(&s.name).fetch_optional(p).await)?;
        if existing.is_some() {
            return Ok(existing);
        }
        let n: i64 = with_db_write!(self, p => sqlx::query_scalar(COUNT_SQL).bind(&s.mesh_id).fetch_one(p).await)?;
        if n >= MAX_STREAMS_PER_MESH {
            return Ok(None);
        }
        with_db_write!(self, p => sqlx::query(SQL).bind(&s.id).bind(&s.mesh_id).bind(&s.name)
            .bind(&s.created_by).bind(s.created_at).bind(member).execute(p).await.map(drop))?;
        Ok(
            with_db_write!(self, p => sqlx::query_as(GET_SQL).bind(&s.mesh_id).bind(&s.name).fetch_optional(p).await)?,
        )
    }

    /// The mesh's streams, by name.
    pub async fn streams(&self, mesh_id: &str) -> Result<Vec<StreamRow>, StoreError> {
        const SQL: &str = "SELECT id, mesh_id, name, created_by, created_at FROM stream \
                           WHERE mesh_id = $1 ORDER BY name";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).fetch_all(p).await)?)
    }
}
