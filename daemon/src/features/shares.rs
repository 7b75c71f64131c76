//! `share_list` / `share_set` (meshd extension, `meshd_protocol::shares`): a mesh admin
//! sees the mesh's peer brokers — this broker's consent, each link's state, whether the
//! mesh flows — and shares or unshares it, as `meshd mesh share` / `unshare` do at the
//! shell. The consent is stored like theirs and applied by the running daemon's
//! reconcile loop (every 500 ms); accepting another broker's mesh stays a shell
//! command, since it creates a new mesh here rather than changing this one.

use meshd_protocol::broker::BrokerFrame;
use meshd_protocol::shares::{Reply, Request};

use axum::extract::ws::Utf8Bytes;

use crate::admin::{self, AdminError};
use crate::session::*;

impl Session {
    /// `share_list` / `share_set`: admins only.
    pub(crate) fn on_share(
        &mut self,
        request: Request,
        req_id: Option<String>,
    ) -> Option<Utf8Bytes> {
        if !self.is_admin() {
            return error("forbidden", "only a mesh admin can manage shares", req_id);
        }
        let mesh_id = self.mesh_id().to_owned();
        match request {
            Request::List => {
                let ctx = self.ctx.clone();
                self.reply_later(async move {
                    let fed = ctx.fed.as_ref();
                    let mut peers = fed.map(|f| f.mesh_links(&mesh_id)).unwrap_or_default();
                    // The stored consent, not the daemon's copy (reloaded every 500 ms):
                    // a `share_set` just answered shows at once.
                    if fed.is_some() {
                        let stored = match ctx.db.shares().await {
                            Ok(s) => s,
                            Err(e) => return store_unavailable("share_list", req_id, &e),
                        };
                        for p in &mut peers {
                            let mine = stored
                                .iter()
                                .find(|s| s.mesh_id == mesh_id && s.broker == p.broker);
                            match (mine, p.role) {
                                (Some(s), _) => p.role = Some(s.role.as_str()),
                                (None, Some("offer" | "accept")) => p.role = None,
                                (None, _) => {}
                            }
                        }
                    }
                    let reply = Reply::ShareListResult {
                        broker: ctx.config.federation.as_ref().map(|f| f.broker.clone()),
                        home: fed.is_none_or(|f| f.is_home(&mesh_id)),
                        peers,
                        mesh_id,
                        req_id,
                    };
                    Some(BrokerFrame::Share(reply).to_json().into())
                });
                None
            }
            Request::Set { broker, shared } => {
                let ctx = self.ctx.clone();
                let slug = self.mesh.row.slug.clone();
                let (actor_id, actor_name) = (self.member_id.clone(), self.display_name.clone());
                self.reply_later(async move {
                    let done = if shared {
                        admin::share_mesh(&ctx.db, &ctx.config, &slug, &broker)
                            .await
                            .map(|_| ())
                    } else {
                        admin::unshare_mesh(&ctx.db, &mesh_id, &broker)
                            .await
                            .map(|_| ())
                    };
                    match done {
                        Ok(()) => {}
                        Err(AdminError::Store(e)) => {
                            return store_unavailable("share_set", req_id, &e);
                        }
                        Err(e) => return error("invalid", e.to_string(), req_id),
                    }
                    ctx.audit.record(
                        &mesh_id,
                        if shared {
                            "share_requested"
                        } else {
                            "unshare_requested"
                        },
                        Some(actor_id),
                        &actor_name,
                        serde_json::json!({"peer": broker}),
                    );
                    Some(
                        BrokerFrame::Share(Reply::ShareSetResult {
                            broker,
                            shared,
                            req_id,
                        })
                        .to_json()
                        .into(),
                    )
                });
                None
            }
        }
    }
}
