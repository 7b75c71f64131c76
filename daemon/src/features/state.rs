//! Shared state: `set_state`, `get_state`, `list_state`.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use meshd_protocol::broker::{BrokerFrame, StateEntry, StateList, StateResult};
use meshd_protocol::client::ClientFrame;
use meshd_protocol::time::iso8601_ms;
use tracing::warn;

use crate::hub::{StateValue, raw};
use crate::session::*;
use crate::store::writer::WriteOp;

impl Session {
    /// Shared state: `set_state` (never answered), `get_state`, `list_state`.
    pub(crate) fn on_state(
        &mut self,
        frame: ClientFrame,
        req_id: Option<String>,
        now: i64,
    ) -> Option<Utf8Bytes> {
        match frame {
            ClientFrame::SetState { key, value } => {
                let json: Arc<str> =
                    value.map_or_else(|| Arc::from("null"), |v| Arc::from(v.get()));
                let limits = &self.ctx.config.limits;
                let ok = json.len() <= limits.max_state_value_bytes
                    && self
                        .mesh
                        .state_set(
                            &key,
                            StateValue {
                                value: json.clone(),
                                updated_by: self.display_name.clone(),
                                updated_at: now,
                                member_id: Some(self.member_id.clone()),
                            },
                            self.conn,
                            limits.max_state_bytes_per_mesh,
                            self.ctx.config.quotas.state_bytes_per_member,
                        )
                        .is_ok();
                if ok {
                    // The value's digest, not the value: the log must not copy state.
                    self.ctx.audit.record(
                        self.mesh_id(),
                        "state_set",
                        Some(self.member_id.clone()),
                        &self.display_name,
                        serde_json::json!({"key": key, "valueSha256": crate::features::audit::engine::digest(&json)}),
                    );
                    if let Some(fed) = &self.ctx.fed {
                        fed.state_set(
                            self.mesh_id(),
                            meshd_protocol::fed::StateSet {
                                mesh_id: self.mesh_id().to_owned(),
                                key: key.clone(),
                                value: json.to_string(),
                                updated_by: self.display_name.clone(),
                                updated_at: now,
                                member_pubkey: self.member_pubkey.clone(),
                            },
                        );
                    }
                    self.queue_write(WriteOp::SetState {
                        mesh_id: self.mesh_id().to_owned(),
                        key,
                        value: json,
                        updated_by: self.display_name.clone(),
                        member_id: Some(self.member_id.clone()),
                        at: now,
                    });
                } else {
                    // set_state never gets a reply (§0.6); the refusal is logged and counted.
                    warn!(key = %key, bytes = json.len(), "set_state refused: over a state size limit or quota");
                    self.ctx.metrics.frames_dropped.inc("state_too_large");
                }
                None
            }
            ClientFrame::GetState { key } => {
                let frame = match self.mesh.state_get(&key) {
                    Some(v) => StateResult {
                        key,
                        value: raw(&v.value),
                        updated_at: iso8601_ms(v.updated_at),
                        updated_by: v.updated_by,
                        req_id,
                    },
                    None => StateResult {
                        key,
                        value: raw("null"),
                        updated_at: String::new(),
                        updated_by: String::new(),
                        req_id,
                    },
                };
                Some(BrokerFrame::StateResult(frame).to_json().into())
            }
            ClientFrame::ListState => {
                let entries = self
                    .mesh
                    .state_list()
                    .into_iter()
                    .map(|(key, v)| StateEntry {
                        key,
                        value: raw(&v.value),
                        updated_by: v.updated_by,
                        updated_at: iso8601_ms(v.updated_at),
                    })
                    .collect();
                Some(
                    BrokerFrame::StateList(StateList { entries, req_id })
                        .to_json()
                        .into(),
                )
            }
            _ => None,
        }
    }
}

/// Catch-up: every key of the mesh's shared state.
pub(crate) async fn catch_up(c: &crate::fed::CatchUp<'_>) -> bool {
    use meshd_protocol::fed::{Frame, StateSet};
    for (key, v) in c.hub.state_list() {
        let frame = Frame::State(Box::new(StateSet {
            mesh_id: c.mesh_id().to_owned(),
            key,
            value: v.value.to_string(),
            updated_by: v.updated_by,
            updated_at: v.updated_at,
            member_pubkey: String::new(),
        }));
        if !c.send(frame).await {
            return false;
        }
    }
    true
}

/// Telling the mesh's other brokers of a change made here.
impl crate::fed::Fed {
    /// A local state write.
    pub(crate) fn state_set(&self, mesh_id: &str, s: meshd_protocol::fed::StateSet) {
        self.to_every_link(mesh_id, meshd_protocol::fed::Frame::State(Box::new(s)));
    }
}

/// Frames from peer brokers.
mod from_peers {
    use super::*;
    use crate::fed::*;
    use meshd_protocol::fed::RejectReason;

    /// Applies a peer broker's `State` frame.
    pub(crate) async fn on_peer_state(
        ctx: &std::sync::Arc<crate::Ctx>,
        link: &std::sync::Arc<crate::fed::LinkShared>,
        s: Box<meshd_protocol::fed::StateSet>,
    ) -> Result<(), meshd_federation::LinkError> {
        if !link.accepts(&s.mesh_id) {
            ctx.metrics
                .fed_refused
                .inc(RejectReason::NotShared.as_str());
            return Ok(());
        }
        let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &s.mesh_id).await else {
            return Ok(());
        };
        // Writes by a peer's member must come from that member's broker; a
        // snapshot's entries (no member) are accepted as newest-wins data.
        if !s.member_pubkey.is_empty() && !hub.may_speak_for(&link.broker, &s.member_pubkey) {
            count_refused(ctx, link, RejectReason::ForgedSender, 1);
            return Ok(());
        }
        if s.key.len() > 1024
            || s.value.len() > ctx.config.limits.max_state_value_bytes
            || serde_json::from_str::<&serde_json::value::RawValue>(&s.value).is_err()
        {
            ctx.metrics.fed_refused.inc(RejectReason::Invalid.as_str());
            return Ok(());
        }
        let value: Arc<str> = Arc::from(s.value.as_str());
        let member_id = hub.member(&s.member_pubkey).map(|m| m.id);
        let applied = hub.state_apply_remote(
            &s.key,
            StateValue {
                value: value.clone(),
                updated_by: s.updated_by.clone(),
                updated_at: s.updated_at,
                member_id: member_id.clone(),
            },
            ctx.config.limits.max_state_bytes_per_mesh,
            ctx.config.quotas.state_bytes_per_member,
        );
        if applied {
            let _ = ctx
                .writer
                .send(WriteOp::SetState {
                    mesh_id: s.mesh_id,
                    key: s.key,
                    value,
                    updated_by: s.updated_by,
                    member_id,
                    at: s.updated_at,
                })
                .await;
        }
        Ok(())
    }
}
pub(crate) use from_peers::*;
