//! People: which members of this broker's meshes are one person, for the REST API's
//! `/me/*` views (meshd has no user accounts). Members enrolled with the same key are
//! one person; an operator links others under a name with `meshd member link`.

use crate::store::{Db, MemberRow, MeshRow, StoreError, with_db, with_db_write};

impl Db {
    /// The person `member_id` was linked to, if any.
    pub async fn person_of(&self, member_id: &str) -> Result<Option<String>, StoreError> {
        const SQL: &str = "SELECT person FROM member_person WHERE member_id = $1";
        Ok(with_db!(self, p => sqlx::query_scalar(SQL).bind(member_id).fetch_optional(p).await)?)
    }

    /// Links a member to a person (replacing an earlier link).
    pub async fn link_person(&self, member_id: &str, person: &str) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO member_person (member_id, person) VALUES ($1, $2) \
                           ON CONFLICT (member_id) DO UPDATE SET person = excluded.person";
        with_db_write!(self, p => sqlx::query(SQL).bind(member_id).bind(person).execute(p).await.map(drop))?;
        Ok(())
    }

    /// The live members, in live meshes, holding `pubkey` or linked to `person`, with
    /// their meshes, oldest mesh first.
    pub async fn person_members(
        &self,
        pubkey: &str,
        person: Option<&str>,
    ) -> Result<Vec<(MeshRow, MemberRow)>, StoreError> {
        const SQL: &str = "SELECT id, mesh_id, pubkey, display_name, role, joined_at, revoked_at, home_broker FROM member \
                           WHERE revoked_at IS NULL AND home_broker IS NULL \
                             AND (pubkey = $1 OR id IN (SELECT member_id FROM member_person WHERE person = $2))";
        let members: Vec<MemberRow> =
            with_db!(self, p => sqlx::query_as(SQL).bind(pubkey).bind(person).fetch_all(p).await)?;
        let mut out = Vec::new();
        for m in members {
            if let Some(mesh) = self.mesh_by_id(&m.mesh_id).await?
                && mesh.archived_at.is_none()
            {
                out.push((mesh, m));
            }
        }
        out.sort_by(|a, b| (a.0.created_at, &a.0.id).cmp(&(b.0.created_at, &b.0.id)));
        Ok(out)
    }
}
