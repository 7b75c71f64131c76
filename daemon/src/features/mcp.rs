//! The MCP proxy, as clients use it (`engine` keeps the registry and calls).

pub mod builtin;
pub mod engine;

pub mod store;

use axum::extract::ws::Utf8Bytes;
use meshd_protocol::broker::BrokerFrame;
use meshd_protocol::client::ClientFrame;
use tokio::sync::oneshot;
use tracing::debug;

use crate::delivery;
use crate::session::*;
use crate::time::now_ms;

impl Session {
    /// A session of the member is back: its persistent MCP servers that were offline are
    /// hosted by this session again (`mcp_restored` to everyone, stored as online).
    pub(crate) fn restore_mcp(&mut self) {
        let host = crate::features::mcp::engine::Host {
            conn: self.conn,
            shared: self.shared.clone(),
        };
        let restored =
            self.ctx
                .mcp
                .member_back(self.mesh_id(), &self.member_id, &self.display_name, &host);
        if restored.is_empty() {
            return;
        }
        let now = now_ms();
        for name in &restored {
            let mut data = serde_json::Map::new();
            data.insert("serverName".into(), name.clone().into());
            data.insert("hostedBy".into(), self.display_name.clone().into());
            let frame = delivery::system_push(self.mesh_id(), "mcp_restored", data, now);
            self.mesh.announce(&frame, 0, None);
        }
        let sets = restored
            .iter()
            .filter_map(|n| self.ctx.mcp.set_of(self.mesh_id(), n))
            .collect();
        crate::features::mcp::engine::publish(&self.ctx, self.mesh_id(), sets);
        for name in restored {
            self.ctx
                .mcp
                .persist(crate::features::mcp::engine::StoreOp::Offline {
                    mesh_id: self.mesh_id().to_owned(),
                    name,
                    since: None,
                });
        }
    }

    /// The MCP proxy (see `mcp`).
    pub(crate) fn on_mcp(
        &mut self,
        frame: ClientFrame,
        req_id: Option<String>,
        now: i64,
    ) -> Option<Utf8Bytes> {
        use meshd_protocol::broker::{McpCallResult, McpListResult, McpRegisterAck};
        match frame {
            ClientFrame::McpRegister(r) => {
                let r = *r;
                let who = crate::features::mcp::engine::Registrant {
                    member_id: &self.member_id,
                    member_pubkey: &self.member_pubkey,
                    display_name: &self.display_name,
                    host: crate::features::mcp::engine::Host {
                        conn: self.conn,
                        shared: self.shared.clone(),
                    },
                };
                let tool_names: Vec<serde_json::Value> =
                    r.tools.iter().map(|t| t.name.clone().into()).collect();
                let tool_count = r.tools.len();
                let (server_name, description) = (r.server_name.clone(), r.description.clone());
                let r_persistent = r.persistent;
                let row = match self.ctx.mcp.register(self.mesh_id(), r, who, now) {
                    Ok(row) => row,
                    Err(e @ crate::features::mcp::engine::RegisterError::Taken { .. }) => {
                        return error("mcp_name_taken", e.to_string(), req_id);
                    }
                    Err(e @ crate::features::mcp::engine::RegisterError::Full) => {
                        return error("mcp_full", e.to_string(), req_id);
                    }
                    Err(e @ crate::features::mcp::engine::RegisterError::TooLarge) => {
                        return error("invalid_mcp_server", e.to_string(), req_id);
                    }
                };
                let mut data = serde_json::Map::new();
                data.insert("serverName".into(), server_name.clone().into());
                data.insert("description".into(), description.into());
                data.insert("tools".into(), tool_names.into());
                data.insert("hostedBy".into(), self.display_name.clone().into());
                let frame = delivery::system_push(self.mesh_id(), "mcp_registered", data, now);
                self.mesh.announce(&frame, self.conn, None);
                let sets = self
                    .ctx
                    .mcp
                    .set_of(self.mesh_id(), &server_name)
                    .into_iter()
                    .collect();
                crate::features::mcp::engine::publish(&self.ctx, self.mesh_id(), sets);
                // The ack of a persistent registration follows its store write, so an
                // acknowledged one survives a restart.
                let name = server_name;
                let stored = match row {
                    Some(row) => {
                        let (tx, rx) = oneshot::channel();
                        self.ctx
                            .mcp
                            .persist(crate::features::mcp::engine::StoreOp::Upsert(row, Some(tx)))
                            .then_some(rx)
                    }
                    None => {
                        self.ctx
                            .mcp
                            .persist(crate::features::mcp::engine::StoreOp::Delete {
                                mesh_id: self.mesh_id().to_owned(),
                                name: name.clone(),
                            });
                        None
                    }
                };
                let persistent = r_persistent;
                self.reply_later(async move {
                    if persistent {
                        match stored {
                            Some(rx) => match rx.await {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => {
                                    return store_unavailable("storing an MCP server", req_id, &e);
                                }
                                Err(_) => {
                                    return store_unavailable(
                                        "storing an MCP server",
                                        req_id,
                                        &"shutting down",
                                    );
                                }
                            },
                            None => {
                                return store_unavailable(
                                    "storing an MCP server",
                                    req_id,
                                    &"store queue full",
                                );
                            }
                        }
                    }
                    Some(
                        BrokerFrame::McpRegisterAck(McpRegisterAck {
                            server_name: name,
                            tool_count,
                            req_id,
                        })
                        .to_json()
                        .into(),
                    )
                });
                None
            }
            ClientFrame::McpUnregister { server_name } => {
                let before = self.ctx.mcp.set_of(self.mesh_id(), &server_name);
                let Some((hosted_by, persistent)) =
                    self.ctx
                        .mcp
                        .unregister(self.mesh_id(), &server_name, &self.member_id)
                else {
                    // No reply to this frame, even a refusal (the CLI does not wait).
                    debug!(server = %server_name, "mcp_unregister of a server this member does not host");
                    return None;
                };
                let mut data = serde_json::Map::new();
                data.insert("serverName".into(), server_name.clone().into());
                data.insert("hostedBy".into(), hosted_by.into());
                let frame = delivery::system_push(self.mesh_id(), "mcp_unregistered", data, now);
                self.mesh.announce(&frame, self.conn, None);
                let removed = before
                    .map(|mut s| {
                        s.removed = true;
                        s
                    })
                    .into_iter()
                    .collect();
                crate::features::mcp::engine::publish(&self.ctx, self.mesh_id(), removed);
                if persistent {
                    self.ctx
                        .mcp
                        .persist(crate::features::mcp::engine::StoreOp::Delete {
                            mesh_id: self.mesh_id().to_owned(),
                            name: server_name,
                        });
                }
                None
            }
            ClientFrame::McpList => {
                let mut servers = vec![builtin::entry()];
                servers.extend(
                    self.ctx
                        .mcp
                        .list(self.mesh_id())
                        .into_iter()
                        .filter(|s| s.name != builtin::NAME),
                );
                Some(
                    BrokerFrame::McpListResult(McpListResult { servers, req_id })
                        .to_json()
                        .into(),
                )
            }
            ClientFrame::McpCall(c) if c.server_name == builtin::NAME => {
                let (ctx, mesh) = (self.ctx.clone(), self.mesh.clone());
                let (member, conn) = (self.member_pubkey.clone(), self.conn);
                let (member_id, admin) = (self.member_id.clone(), self.is_admin());
                let name = self.display_name.clone();
                self.reply_later(async move {
                    let args = c.args.as_ref().map_or("{}", |a| a.get());
                    let caller = builtin::Caller {
                        member_pubkey: &member,
                        conn,
                        member_id: &member_id,
                        name: &name,
                        admin,
                    };
                    let (result, error) =
                        match builtin::call(&ctx, &mesh, caller, &c.tool_name, args).await {
                            Ok(v) => (serde_json::value::to_raw_value(&v).ok(), None),
                            Err(e) => (None, Some(e)),
                        };
                    Some(
                        BrokerFrame::McpCallResult(McpCallResult {
                            result,
                            error,
                            req_id,
                        })
                        .to_json()
                        .into(),
                    )
                });
                None
            }
            ClientFrame::McpCall(c) => {
                match self.ctx.mcp.call(
                    &self.ctx,
                    self.mesh_id(),
                    *c,
                    (
                        &self.shared,
                        &self.display_name,
                        &self.member_pubkey,
                        req_id.clone(),
                    ),
                    now,
                ) {
                    Ok(()) => None,
                    Err(e) => Some(
                        BrokerFrame::McpCallResult(McpCallResult {
                            result: None,
                            error: Some(e.to_string()),
                            req_id,
                        })
                        .to_json()
                        .into(),
                    ),
                }
            }
            ClientFrame::McpCallResponse(r) => {
                let r = *r;
                if !self
                    .ctx
                    .mcp
                    .respond(&self.ctx, self.conn, &r.call_id, r.result, r.error)
                {
                    self.ctx.metrics.frames_dropped.inc("mcp_response_refused");
                    debug!(call = %r.call_id, "mcp_call_response for a call this session was not asked");
                }
                None
            }
            _ => None,
        }
    }

    /// After the socket is gone: give back unwritten leases, leave the mesh, announce
    /// the departure, save the session state for "welcome back".
    /// This connection's MCP servers: non-persistent ones go (`mcp_unregistered`),
    /// persistent ones go offline (returned, to store); calls it hosted fail, calls it
    /// made end.
    pub(crate) fn mcp_gone(&self, now: i64) -> Vec<String> {
        // Relayed file requests this connection was asked fail now; its own are dropped.
        for (kind, path, asker, req_id) in self.ctx.relay.conn_gone(self.conn) {
            let answer = crate::features::relay::engine::Answer {
                kind,
                path,
                content: None,
                entries: None,
                error: Some("the asked peer disconnected".to_owned()),
            };
            crate::features::relay::engine::deliver(
                &self.ctx,
                self.mesh_id(),
                asker,
                answer,
                req_id,
            );
        }
        let successor = self
            .mesh
            .siblings(&self.member_pubkey, self.conn)
            .into_iter()
            .filter(|p| p.conn_id > self.conn && p.close_reason().is_none())
            .max_by_key(|p| p.conn_id)
            .map(|shared| crate::features::mcp::engine::Host {
                conn: shared.conn_id,
                shared,
            });
        let gone = self
            .ctx
            .mcp
            .conn_gone(&self.ctx, self.mesh_id(), self.conn, successor, now);
        crate::features::mcp::engine::publish(&self.ctx, self.mesh_id(), gone.sets);
        if !self.ctx.sessions_cancel.is_cancelled() {
            for (name, hosted_by) in gone.removed {
                let mut data = serde_json::Map::new();
                data.insert("serverName".into(), name.into());
                data.insert("hostedBy".into(), hosted_by.into());
                let frame = delivery::system_push(self.mesh_id(), "mcp_unregistered", data, now);
                self.mesh.announce(&frame, self.conn, None);
            }
        }
        gone.offline
    }
}

pub(crate) use replication::*;

/// Replication across brokers: applying a peer's change, and this broker's part of a
/// link's catch-up.
mod replication {

    use meshd_protocol::fed::RejectReason;

    use crate::Ctx;

    use crate::time::now_ms;

    use crate::fed::*;
    use meshd_protocol::fed::Frame;

    /// Applies a peer broker's MCP servers: only those of members it hosts, within limits;
    /// local peers hear `mcp_registered` / `mcp_unregistered` / `mcp_restored`.
    pub(crate) async fn apply_mcp_servers(
        ctx: &Ctx,
        link: &LinkShared,
        mesh_id: String,
        servers: Vec<meshd_protocol::fed::McpServerSet>,
        all: Option<Vec<String>>,
    ) -> Result<(), RejectReason> {
        use meshd_protocol::client::{MAX_NAME_LEN, MAX_SUMMARY_LEN};
        if !link.accepts(&mesh_id) {
            return Err(RejectReason::NotShared);
        }
        let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &mesh_id).await else {
            return Err(RejectReason::NotShared);
        };
        if servers.len() > crate::features::mcp::engine::MAX_SERVERS_PER_MESH
            || all
                .as_ref()
                .is_some_and(|a| a.len() > crate::features::mcp::engine::MAX_SERVERS_PER_MESH)
        {
            return Err(RejectReason::Invalid);
        }
        let mut forged = false;
        let servers: Vec<_> = servers
            .into_iter()
            .filter(|s| {
                let ok = speaks_for(&hub, &link.broker, &s.member_id, &s.member_pubkey);
                forged |= !ok;
                ok && !s.name.is_empty()
                    && s.name.len() <= MAX_NAME_LEN
                    && s.hosted_by.len() <= MAX_NAME_LEN
                    && s.description.len() <= MAX_SUMMARY_LEN
                    && s.tools_json.len() <= 256 * 1024
            })
            .collect();
        let now = now_ms();
        for (event, name, hosted_by) in ctx.mcp.apply_remote(&link.broker, &mesh_id, servers, all) {
            let mut data = serde_json::Map::new();
            data.insert("serverName".into(), name.clone().into());
            if event == "mcp_registered" {
                let (description, tools) = ctx.mcp.summary(&mesh_id, &name).unwrap_or_default();
                data.insert("description".into(), description.into());
                data.insert("tools".into(), tools.into());
            }
            data.insert("hostedBy".into(), hosted_by.into());
            hub.announce(
                &crate::delivery::system_push(&mesh_id, event, data, now),
                0,
                None,
            );
        }
        if forged {
            return Err(RejectReason::ForgedSender);
        }
        Ok(())
    }

    /// Catch-up: every name first, in a frame of its own (a part holding a large
    /// registration could exceed a small frame limit and be dropped), so the peer drops the
    /// others; then the servers, in parts.
    pub(crate) async fn catch_up(c: &CatchUp<'_>) -> bool {
        let m = c.mesh_id().to_owned();
        let sets = c.ctx.mcp.local_sets(&m);
        let names = Frame::McpServers {
            mesh_id: m.clone(),
            servers: Vec::new(),
            all: Some(sets.iter().map(|s| s.name.clone()).collect()),
        };
        if !c.send(names).await {
            return false;
        }
        let size = |s: &meshd_protocol::fed::McpServerSet| {
            s.name.len() + s.hosted_by.len() + s.description.len() + s.tools_json.len() + 256
        };
        for servers in parts(sets, c.budget, size) {
            if servers.is_empty() {
                continue;
            }
            let frame = Frame::McpServers {
                mesh_id: m.clone(),
                servers,
                all: None,
            };
            if !c.send(frame).await {
                return false;
            }
        }
        true
    }
}

/// Telling the mesh's other brokers of a change made here.
impl crate::fed::Fed {
    /// MCP servers hosted here changed.
    pub(crate) fn mcp_servers(
        &self,
        mesh_id: &str,
        servers: Vec<meshd_protocol::fed::McpServerSet>,
    ) {
        self.to_every_link(
            mesh_id,
            meshd_protocol::fed::Frame::McpServers {
                mesh_id: mesh_id.to_owned(),
                servers,
                all: None,
            },
        );
    }
}

/// Frames from peer brokers.
mod from_peers {
    use crate::fed::*;
    use meshd_protocol::fed::RejectReason;

    /// Applies a peer broker's `McpCall` frame.
    pub(crate) async fn on_peer_mcp_call(
        ctx: &std::sync::Arc<crate::Ctx>,
        link: &std::sync::Arc<crate::fed::LinkShared>,
        a: Box<meshd_protocol::fed::McpCallAsk>,
    ) -> Result<(), meshd_federation::LinkError> {
        let allowed = link.accepts(&a.mesh_id)
            && matches!(ctx.hub.mesh(&ctx.db, &a.mesh_id).await,
                    Ok(Some(hub)) if hub.may_speak_for(&link.broker, &a.caller_member_pubkey));
        if allowed {
            ctx.mcp.remote_call(ctx, &link.broker, *a);
        } else {
            count_refused(ctx, link, RejectReason::ForgedSender, 1);
        }
        Ok(())
    }

    /// Applies a peer broker's `McpResult` frame.
    pub(crate) async fn on_peer_mcp_result(
        ctx: &std::sync::Arc<crate::Ctx>,
        link: &std::sync::Arc<crate::fed::LinkShared>,
        d: Box<meshd_protocol::fed::McpCallDone>,
    ) -> Result<(), meshd_federation::LinkError> {
        if link.accepts(&d.mesh_id) {
            ctx.mcp.remote_result(ctx, &link.broker, *d);
        }
        Ok(())
    }
}
pub(crate) use from_peers::*;
