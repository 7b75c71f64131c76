//! Messages from clients: `send` (into the delivery pipeline, `crate::delivery`),
//! `client_ack` and `message_status`.

use std::sync::atomic::Ordering;

use axum::extract::ws::Utf8Bytes;
use meshd_protocol::broker::{
    Ack, BrokerFrame, ErrorFrame, MessageStatusResult, PolicyRefusal, RecipientStatus,
};
use meshd_protocol::client::ClientFrame;
use meshd_protocol::time::iso8601_ms;
use meshd_protocol::{Priority, TargetSpec};
use tracing::warn;

use crate::delivery::{self, Author, Body, Envelope, Origin, Target};
use crate::session::*;
use crate::store::StoreError;
use crate::store::writer::WriteOp;

impl Session {
    /// `client_ack`: the client acknowledges a push (and so is leased from now on).
    pub(crate) fn on_client_ack(&mut self, frame: ClientFrame, now: i64) -> Option<Utf8Bytes> {
        match frame {
            ClientFrame::ClientAck {
                client_message_id,
                broker_message_id,
            } => {
                self.shared.acks.store(true, Ordering::SeqCst);
                self.queue_write(WriteOp::Ack {
                    mesh_id: self.mesh_id().to_owned(),
                    keys: [self.member_pubkey.clone(), self.routing_key().to_owned()],
                    message_id: broker_message_id,
                    client_message_id,
                    at: now,
                });
                None
            }
            _ => None,
        }
    }

    pub(crate) fn on_send(
        &mut self,
        req_id: Option<String>,
        send: meshd_protocol::client::Send,
        now: i64,
    ) -> Option<Utf8Bytes> {
        let id = send.id.unwrap_or_default();
        let metrics = self.ctx.metrics.clone();
        let refuse = |reason: &'static str, error: String| -> Option<Utf8Bytes> {
            metrics.messages_rejected.inc(reason);
            Some(
                BrokerFrame::Ack(Ack {
                    id: id.clone(),
                    message_id: String::new(),
                    queued: false,
                    error: Some(error),
                    req_id: req_id.clone(),
                })
                .to_json()
                .into(),
            )
        };
        if !self.bucket.take(crate::time::instant()) {
            let l = &self.ctx.config.limits;
            return refuse(
                "rate_limited",
                format!(
                    "rate_limit: max {}/s (burst {}) — slow down",
                    l.sends_per_second, l.send_burst
                ),
            );
        }
        let priority = match send.priority.as_deref() {
            None => Priority::Next,
            Some(p) => match Priority::parse(p) {
                Some(p) => p,
                None => {
                    return refuse(
                        "invalid_priority",
                        format!("invalid priority {p:?}: use now, next or low"),
                    );
                }
            },
        };
        let target = match TargetSpec::parse(&send.target_spec) {
            Ok(t) => t,
            Err(e) => return refuse("invalid_target", format!("invalid targetSpec: {e}")),
        };
        let tags = match crate::features::tags::of_message(&target, send.tags) {
            Ok(t) => t,
            Err(e) => return refuse("invalid_tags", e.to_string()),
        };
        if send.client_message_id.is_some() {
            self.shared.acks.store(true, Ordering::SeqCst);
        }
        let envelope = Envelope {
            id: crate::ids::message_id(),
            mesh: self.mesh.clone(),
            sender_pubkey: self.routing_key().to_owned(),
            author: Some(Author {
                member_id: self.member_id.clone(),
                member_pubkey: self.member_pubkey.clone(),
                name: self.display_name.clone(),
            }),
            target: Target::Spec(target),
            target_spec: send.target_spec,
            priority,
            body: Body::Sealed {
                nonce: send.nonce,
                ciphertext: send.ciphertext,
            },
            subtype: None,
            client_message_id: send.client_message_id,
            created_at: now,
            expires_at: delivery::expires_at(&self.ctx, now),
            origin: Origin::Client { conn: self.conn },
            tags,
            bridged: None,
            topic: Some(Box::new(crate::features::topics::PostFields {
                reply_to_id: send.reply_to_id,
                body_version: send.body_version,
                mentions: send.mentions,
                ..Default::default()
            })),
        };
        let accepted = match delivery::submit(&self.ctx, envelope, now) {
            Ok(a) => a,
            Err(e) => return refuse(e.code(), e.to_string()),
        };
        // Every message a client sends is stored (a multicast keeps its metadata).
        let (op, commit) = accepted.write?;
        self.queue_write(op);
        let message_id = accepted.message_id;
        let metrics = self.ctx.metrics.clone();
        self.replies.push_back(Box::pin(async move {
            let (queued, message_id, error) = match commit.committed().await {
                Ok(()) => (true, message_id, None),
                Err(StoreError::Closed) => (
                    false,
                    String::new(),
                    Some("the broker is shutting down; retry".to_owned()),
                ),
                Err(e) => {
                    metrics.messages_rejected.inc("store_error");
                    warn!(cause = %e, "storing a message failed");
                    (
                        false,
                        String::new(),
                        Some("the broker could not store the message; retry".to_owned()),
                    )
                }
            };
            Some(
                BrokerFrame::Ack(Ack {
                    id,
                    message_id,
                    queued,
                    error,
                    req_id,
                })
                .to_json()
                .into(),
            )
        }));
        None
    }

    pub(crate) fn queue_message_status(&mut self, message_id: String, req_id: Option<String>) {
        let db = self.ctx.db.clone();
        let mesh = self.mesh.clone();
        let mesh_id = self.mesh_id().to_owned();
        let member_pubkey = self.member_pubkey.clone();
        let member_id = self.member_id.clone();
        let conn = self.conn;
        let ctx = self.ctx.clone();
        self.reply_later(async move {
            let not_found = |req_id| {
                Some(
                    BrokerFrame::Error(
                        ErrorFrame::new("not_found", "no such message in this mesh")
                            .with_req_id(req_id),
                    )
                    .to_json()
                    .into(),
                )
            };
            let row = match db.message_status(&message_id).await {
                Ok(Some(r)) if r.mesh_id == mesh_id => r,
                // A DM sent through a bridge is stored in the recipient's mesh: its
                // sender may ask about it there.
                Ok(Some(r)) if r.sender_member_id == member_id => r,
                Ok(_) => return not_found(req_id),
                Err(e) => {
                    warn!(cause = %e, "message_status");
                    return Some(
                        BrokerFrame::Error(
                            ErrorFrame::new("internal", "the broker's store is unavailable")
                                .with_req_id(req_id),
                        )
                        .to_json()
                        .into(),
                    );
                }
            };
            // A DM through a bridge is stored in the recipient's mesh: that mesh's view
            // names its recipient (forwarded to another broker: the sender's own does).
            let mesh = match ctx.hub.loaded(&row.mesh_id) {
                Some(m) => m,
                None if row.forward_to.is_some() => mesh,
                None => return not_found(req_id),
            };
            let refusals = db
                .refusals(&row.id, &row.mesh_id)
                .await
                .unwrap_or_else(|e| {
                    warn!(cause = %e, "message_status refusals");
                    Vec::new()
                });
            let delivered = row.delivered_at.is_some();
            let recipients = match (&row.target_key, TargetSpec::parse(&row.target_spec)) {
                // Forwarded to the recipient's broker: stored there, refused, or queued.
                (Some(key), _) if row.forward_to.is_some() => {
                    let status = match (row.forwarded_at, &row.forward_error) {
                        (Some(_), None) => "forwarded",
                        (Some(_), Some(_)) => "refused",
                        (None, _) => "queued",
                    };
                    vec![RecipientStatus {
                        name: mesh
                            .member(key)
                            .map_or_else(|| "unknown".into(), |m| m.display_name),
                        pubkey: key.clone(),
                        status,
                        reason: row.forwarded_at.and(row.forward_error.clone()),
                    }]
                }
                (Some(key), _) => {
                    let live = mesh.live_names(key);
                    let name = live
                        .first()
                        .cloned()
                        .or_else(|| mesh.member(key).map(|m| m.display_name));
                    let status = if delivered {
                        "delivered"
                    } else if live.is_empty() {
                        "disconnected"
                    } else {
                        "held"
                    };
                    vec![RecipientStatus {
                        name: name.unwrap_or_else(|| "unknown".into()),
                        pubkey: key.clone(),
                        status,
                        reason: None,
                    }]
                }
                // Peers on a broker a policy kept the message from did not get it.
                (None, Ok(target)) => mesh
                    .multicast_recipients(&target, &member_pubkey, conn)
                    .into_iter()
                    .map(|(name, pubkey, broker)| {
                        let refused = broker
                            .as_deref()
                            .is_some_and(|b| refusals.iter().any(|(rb, _, _)| rb == b));
                        RecipientStatus {
                            name,
                            pubkey,
                            status: if refused {
                                "refused"
                            } else if delivered {
                                "delivered"
                            } else {
                                "held"
                            },
                            reason: refused.then(|| "policy_denied".to_owned()),
                        }
                    })
                    .collect(),
                (None, Err(_)) => Vec::new(),
            };
            Some(
                BrokerFrame::MessageStatusResult(MessageStatusResult {
                    message_id: row.id,
                    target_spec: row.target_spec,
                    delivered,
                    delivered_at: row.delivered_at.map(iso8601_ms),
                    recipients,
                    tags: crate::features::tags::from_column(row.tags.as_deref()),
                    refused: refusals
                        .into_iter()
                        .map(|(broker, by, reason)| PolicyRefusal { broker, by, reason })
                        .collect(),
                    req_id,
                })
                .to_json()
                .into(),
            )
        });
    }
}
