//! Moderation's store queries (revocation itself is `Db::revoke_member`).

use crate::store::{Db, MemberRow, StoreError, with_db_write};

impl Db {
    /// Lifts the revocation of member `member_id`. Returns the member if it was revoked.
    pub async fn unrevoke_member(
        &self,
        mesh_id: &str,
        member_id: &str,
    ) -> Result<Option<MemberRow>, StoreError> {
        const SQL: &str = "UPDATE member SET revoked_at = NULL \
                           WHERE mesh_id = $1 AND id = $2 AND revoked_at IS NOT NULL \
                           RETURNING id, mesh_id, pubkey, display_name, role, joined_at, revoked_at, home_broker";
        Ok(
            with_db_write!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(member_id)
            .fetch_optional(p).await)?,
        )
    }

    /// Gives member `member_id` (live, hosted here) `role`. A demotion that would leave
    /// the mesh with no live admin changes nothing (checked in the same statement).
    /// Returns the member if the role was set.
    pub async fn set_member_role(
        &self,
        mesh_id: &str,
        member_id: &str,
        role: &str,
    ) -> Result<Option<MemberRow>, StoreError> {
        const SQL: &str = "UPDATE member SET role = $1 \
                           WHERE mesh_id = $2 AND id = $3 AND revoked_at IS NULL AND home_broker IS NULL \
                             AND ($1 = 'admin' OR EXISTS (SELECT 1 FROM member o WHERE o.mesh_id = $2 \
                                  AND o.role = 'admin' AND o.revoked_at IS NULL AND o.id <> $3)) \
                           RETURNING id, mesh_id, pubkey, display_name, role, joined_at, revoked_at, home_broker";
        Ok(
            with_db_write!(self, p => sqlx::query_as(SQL).bind(role).bind(mesh_id).bind(member_id)
            .fetch_optional(p).await)?,
        )
    }
}
