//! Inbound webhooks, as clients manage them (posts arrive over HTTP: `crate::http`).

pub mod store;

use meshd_protocol::broker::BrokerFrame;
use meshd_protocol::client::ClientFrame;
use meshd_protocol::time::iso8601_ms;

use crate::session::*;

impl Session {
    /// Inbound webhooks. Only the creator and admins see a webhook's secret (in its URL).
    pub(crate) fn queue_webhook(&mut self, frame: ClientFrame, req_id: Option<String>, now: i64) {
        use crate::features::webhooks::store::{WebhookError, WebhookRow};
        use meshd_protocol::broker::{WebhookAck, WebhookEntry, WebhookList};
        let db = self.ctx.db.clone();
        let ctx = self.ctx.clone();
        let base = crate::http::hook_base(&self.ctx.config);
        let mesh_id = self.mesh_id().to_owned();
        let member_id = self.member_id.clone();
        let admin = self
            .mesh
            .member(&self.member_pubkey)
            .is_some_and(|m| m.role == "admin");
        self.reply_later(async move {
            let url = |secret: &str| format!("{base}/hook/{mesh_id}/{secret}");
            let reply = match frame {
                ClientFrame::CreateWebhook { name: None } => {
                    return error("invalid_webhook", "a webhook needs a name", req_id);
                }
                ClientFrame::CreateWebhook { name: Some(name) } => {
                    let row = WebhookRow {
                        id: crate::ids::random_id(),
                        mesh_id: mesh_id.clone(),
                        name,
                        secret: hex::encode(crate::ids::random_bytes::<32>()),
                        creator_member_id: member_id,
                        active: true,
                        created_at: now,
                    };
                    if let Err(e) = crate::quota::check(
                        &ctx,
                        crate::quota::Kind::Webhooks,
                        &row.mesh_id,
                        &row.creator_member_id,
                        crate::quota::Usage::new(1, 0),
                    ) {
                        return error(crate::quota::QuotaExceeded::CODE, e.to_string(), req_id);
                    }
                    match db.insert_webhook(&row).await {
                        Ok(()) => BrokerFrame::WebhookAck(WebhookAck {
                            url: url(&row.secret),
                            name: row.name,
                            secret: row.secret,
                            req_id,
                        }),
                        Err(WebhookError::Exists) => {
                            return error(
                                "webhook_exists",
                                "a webhook of that name exists",
                                req_id,
                            );
                        }
                        Err(WebhookError::Full) => {
                            return error(
                                "webhooks_full",
                                "this mesh has too many webhooks",
                                req_id,
                            );
                        }
                        Err(WebhookError::Store(e)) => {
                            return store_unavailable("creating a webhook", req_id, &e);
                        }
                    }
                }
                ClientFrame::ListWebhooks => match db.webhooks(&mesh_id).await {
                    Ok(rows) => BrokerFrame::WebhookList(WebhookList {
                        webhooks: rows
                            .into_iter()
                            .map(|w| WebhookEntry {
                                url: if admin || w.creator_member_id == member_id {
                                    url(&w.secret)
                                } else {
                                    String::new()
                                },
                                name: w.name,
                                active: w.active,
                                created_at: iso8601_ms(w.created_at),
                            })
                            .collect(),
                        req_id,
                    }),
                    Err(e) => {
                        return store_unavailable("listing webhooks", req_id, &e);
                    }
                },
                ClientFrame::DeleteWebhook { name } => {
                    let rows = match db.webhooks(&mesh_id).await {
                        Ok(r) => r,
                        Err(e) => {
                            return store_unavailable("deleting a webhook", req_id, &e);
                        }
                    };
                    if let Some(w) = rows.into_iter().find(|w| w.name == name) {
                        if !admin && w.creator_member_id != member_id {
                            return error(
                                "forbidden",
                                "only the webhook's creator or an admin may delete it",
                                req_id,
                            );
                        }
                        match db.deactivate_webhook(&w.id).await {
                            Ok(true) => {
                                crate::quota::recount_member(
                                    &ctx,
                                    crate::quota::Kind::Webhooks,
                                    &mesh_id,
                                    &w.creator_member_id,
                                )
                                .await;
                            }
                            Ok(false) => {}
                            Err(e) => {
                                return store_unavailable("deleting a webhook", req_id, &e);
                            }
                        }
                    }
                    // As the reference: acknowledged even when nothing matched.
                    BrokerFrame::WebhookAck(WebhookAck {
                        name,
                        url: String::new(),
                        secret: String::new(),
                        req_id,
                    })
                }
                _ => return None,
            };
            Some(reply.to_json().into())
        });
    }
}
