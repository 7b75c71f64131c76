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
}
