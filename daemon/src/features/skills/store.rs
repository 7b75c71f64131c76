//! The skills catalogue. Written through the pool (a handful of writes per hour, each
//! answered to the client once stored), read through the pool.

use crate::store::{Db, StoreError, with_db, with_db_write};

/// A stored skill.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SkillRow {
    /// Mesh.
    pub mesh_id: String,
    /// Name, unique per mesh.
    pub name: String,
    /// Description.
    pub description: String,
    /// Instructions.
    pub instructions: String,
    /// Tags, a JSON array of strings.
    pub tags: String,
    /// Display name of who shared it.
    pub author: String,
    /// First shared (ms).
    pub created_at: i64,
    /// Last written (ms); the newest write wins across brokers.
    pub updated_at: i64,
}

impl SkillRow {
    /// The tags as a list (a corrupt value reads as none).
    pub fn tag_list(&self) -> Vec<String> {
        serde_json::from_str(&self.tags).unwrap_or_default()
    }
}

/// Most skills one mesh keeps (the catalogue is read whole for searches).
pub const MAX_SKILLS_PER_MESH: i64 = 2_000;

impl Db {
    /// Stores a skill unless a newer write of the same name is already stored. Returns
    /// whether it was stored; refuses a new name beyond [`MAX_SKILLS_PER_MESH`].
    ///
    /// `author_member` is the sharing member's id when it is hosted here (its skills
    /// count against its quota).
    pub async fn put_skill(
        &self,
        s: &SkillRow,
        author_member: Option<&str>,
    ) -> Result<bool, SkillError> {
        const COUNT_SQL: &str = "SELECT COUNT(*) FROM skill WHERE mesh_id = $1 AND name <> $2";
        const SQL: &str = "INSERT INTO skill (mesh_id, name, description, instructions, tags, author, created_at, updated_at, author_member_id) \
                           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                           ON CONFLICT (mesh_id, name) DO UPDATE SET description = excluded.description, \
                             instructions = excluded.instructions, tags = excluded.tags, author = excluded.author, \
                             updated_at = excluded.updated_at, author_member_id = excluded.author_member_id \
                           WHERE skill.updated_at <= excluded.updated_at";
        let others: i64 =
            with_db_write!(self, p => sqlx::query_scalar(COUNT_SQL).bind(&s.mesh_id).bind(&s.name)
            .fetch_one(p).await)
            .map_err(StoreError::from)?;
        if others >= MAX_SKILLS_PER_MESH {
            return Err(SkillError::Full);
        }
        let n = with_db_write!(self, p => sqlx::query(SQL).bind(&s.mesh_id).bind(&s.name).bind(&s.description)
            .bind(&s.instructions).bind(&s.tags).bind(&s.author).bind(s.created_at).bind(s.updated_at)
            .bind(author_member).execute(p).await.map(|r| r.rows_affected())).map_err(StoreError::from)?;
        Ok(n > 0)
    }

    /// One skill.
    pub async fn skill(&self, mesh_id: &str, name: &str) -> Result<Option<SkillRow>, StoreError> {
        const SQL: &str = "SELECT mesh_id, name, description, instructions, tags, author, created_at, updated_at \
                           FROM skill WHERE mesh_id = $1 AND name = $2";
        Ok(
            with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(name).fetch_optional(p).await)?,
        )
    }

    /// Every skill of a mesh, by name.
    pub async fn skills(&self, mesh_id: &str) -> Result<Vec<SkillRow>, StoreError> {
        const SQL: &str = "SELECT mesh_id, name, description, instructions, tags, author, created_at, updated_at \
                           FROM skill WHERE mesh_id = $1 ORDER BY name";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).fetch_all(p).await)?)
    }

    /// Deletes a skill written at or before `at` (a newer write elsewhere survives a
    /// replicated removal). Returns its author's member id (`""` when unknown) when one
    /// was deleted.
    pub async fn delete_skill(
        &self,
        mesh_id: &str,
        name: &str,
        at: i64,
    ) -> Result<Option<String>, StoreError> {
        const SQL: &str = "DELETE FROM skill WHERE mesh_id = $1 AND name = $2 AND updated_at <= $3 \
                           RETURNING COALESCE(author_member_id, '')";
        Ok(
            with_db_write!(self, p => sqlx::query_scalar(SQL).bind(mesh_id).bind(name).bind(at)
            .fetch_optional(p).await)?,
        )
    }
}

/// Why a skill was not stored.
#[derive(Debug, thiserror::Error)]
pub enum SkillError {
    /// The mesh's catalogue is full.
    #[error("the mesh's skills catalogue is full ({MAX_SKILLS_PER_MESH} skills)")]
    Full,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Case-insensitive match of `query` in a skill's name, description or any tag.
pub fn matches(s: &SkillRow, query: &str) -> bool {
    let q = query.to_lowercase();
    s.name.to_lowercase().contains(&q)
        || s.description.to_lowercase().contains(&q)
        || s.tag_list().iter().any(|t| t.to_lowercase().contains(&q))
}
