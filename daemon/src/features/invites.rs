//! `invite_create` (meshd extension, `meshd_protocol::invites`): a mesh admin mints an
//! invite over its connection, as `meshd invite create` does at the server — the web
//! app's admin page uses it. Only members whose role is `admin` may; the invite is
//! signed with the mesh owner's key, which stays on the server, and audited.

use std::time::Duration;

use meshd_protocol::broker::BrokerFrame;
use meshd_protocol::invites::{Create, Created};

use axum::extract::ws::Utf8Bytes;

use crate::admin::{self, AdminError};
use crate::session::*;

impl Session {
    /// `invite_create`: refused with `forbidden` for members who are not admins.
    pub(crate) fn on_invite_create(
        &mut self,
        request: Create,
        req_id: Option<String>,
    ) -> Option<Utf8Bytes> {
        if !self.is_admin() {
            return error("forbidden", "only a mesh admin can create invites", req_id);
        }
        let ctx = self.ctx.clone();
        let mesh_id = self.mesh_id().to_owned();
        let slug = self.mesh.row.slug.clone();
        let (actor_id, actor_name) = (self.member_id.clone(), self.display_name.clone());
        // The operator's public URL wins; without one, the URL the admin reached the
        // broker at (what the page passes), else the listen address.
        let broker_url = ctx
            .config
            .server
            .public_url
            .clone()
            .or(request.broker_url)
            .unwrap_or_else(|| ctx.config.public_url().0);
        self.reply_later(async move {
            let ttl = Duration::from_secs(u64::try_from(request.ttl_s).unwrap_or(86_400));
            let created = match admin::create_invite(
                &ctx.db,
                &ctx.config,
                &slug,
                request.role,
                request.max_uses,
                ttl,
                &broker_url,
            )
            .await
            {
                Ok(c) => c,
                Err(AdminError::Store(e)) => return store_unavailable("invite_create", req_id, &e),
                Err(e) => {
                    tracing::warn!(cause = %e, "invite_create");
                    return error("invite_failed", e.to_string(), req_id);
                }
            };
            ctx.audit.record(
                &mesh_id,
                "invite_created",
                Some(actor_id),
                &actor_name,
                serde_json::json!({
                    "role": created.role, "maxUses": created.max_uses, "expiresAt": created.expires_at,
                }),
            );
            Some(
                BrokerFrame::InviteCreated(Created {
                    token: created.token,
                    url: created.url,
                    web_url: created.web_url,
                    expires_at: created.expires_at,
                    role: created.role,
                    max_uses: created.max_uses,
                    broker_url: created.broker_url,
                    req_id,
                })
                .to_json()
                .into(),
            )
        });
        None
    }
}
