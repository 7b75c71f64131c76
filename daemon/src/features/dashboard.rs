//! The live dashboard's feed (meshd extension): a mesh admin's connection sends
//! `dashboard_subscribe` and from then on receives a `mesh_event` for every message the
//! mesh routes — described by its metadata only (sender → target, kind, priority, size,
//! origin; never its body, which for DMs the broker cannot read anyway) — and for every
//! status change. The delivery pipeline describes a message only while a dashboard
//! watches the mesh (one atomic load otherwise).
//!
//! `dashboard_resources` answers the resource cards (queue by priority, files, MCP
//! servers, skills, tasks, schedules) and each peer broker's link; the page asks again
//! when an event says something changed. Link changes of a federated mesh (the mesh
//! starts or stops flowing over a link) are pushed as `mesh_event` of kind `link`.
//!
//! Only admins may watch (who talks to whom is sensitive); others are told `forbidden`.
//! Events go to a watcher's outbound queue like any frame; one that is full loses the
//! event (a dashboard is a view, not a log) and the loss is counted in
//! `meshd_frames_dropped_total{reason="dashboard_full"}`.

pub mod store;

use std::sync::atomic::Ordering;

use axum::extract::ws::Utf8Bytes;
use serde::Serialize;

use crate::Ctx;
use crate::delivery::{Body, Envelope, Origin, Target};
use crate::hub::{MeshHub, Outbound};
use crate::session::*;
use meshd_protocol::routing::TargetSpec;

/// Longest target text an event carries.
const MAX_TARGET: usize = 80;

/// One `mesh_event`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "mesh_event", rename_all = "camelCase")]
pub(crate) struct Event {
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    from: String,
    from_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target_kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    origin: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    broker: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<String>,
    at: i64,
}

impl Event {
    /// An event about a peer or member that is not a message (`status` carries the new
    /// status or the audit event type).
    fn about(kind: &'static str, from: &str, from_name: &str, status: &str, at: i64) -> Self {
        Self {
            kind,
            id: None,
            from: from.to_owned(),
            from_name: from_name.to_owned(),
            to: None,
            target_kind: None,
            priority: None,
            size: None,
            origin: None,
            broker: None,
            status: Some(status.to_owned()),
            at,
        }
    }
}

/// Describes `env` for the mesh's dashboards, if any watches.
pub(crate) fn describe(env: &Envelope, now: i64) -> Option<Event> {
    if env.mesh.watchers.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let target_kind = match &env.target {
        Target::Spec(TargetSpec::Broadcast) => "broadcast",
        Target::Spec(TargetSpec::Group(_)) => "group",
        Target::Spec(TargetSpec::Direct(_)) | Target::Key(_) => "direct",
        Target::Spec(TargetSpec::Channel(_)) => "topic",
        Target::Spec(TargetSpec::Tag(_)) => "tag",
        Target::Spec(TargetSpec::Name(_)) => "name",
        Target::Everyone => "event",
    };
    let (origin, broker) = match &env.origin {
        Origin::Client { .. } => ("client", None),
        Origin::Schedule { .. } => ("schedule", None),
        Origin::Webhook => ("webhook", None),
        Origin::Peer { broker, .. } => ("peer_broker", Some(broker.to_string())),
        Origin::Api => ("api", None),
        Origin::Bridge => ("bridge", None),
    };
    let size = match &env.body {
        Body::Sealed { nonce, ciphertext } => nonce.len() + ciphertext.len(),
        Body::Event { data, .. } => data.get().len(),
    };
    let mut to = env.target_spec.clone();
    if to.len() > MAX_TARGET {
        let mut cut = MAX_TARGET;
        while !to.is_char_boundary(cut) {
            cut -= 1;
        }
        to.truncate(cut);
    }
    Some(Event {
        kind: "message",
        id: Some(env.id.clone()),
        from: env.sender_pubkey.clone(),
        from_name: env
            .author
            .as_ref()
            .map(|a| a.name.clone())
            .unwrap_or_default(),
        to: Some(to),
        target_kind: Some(target_kind),
        priority: Some(env.priority.as_str()),
        size: Some(size),
        origin: Some(origin),
        broker,
        status: None,
        at: now,
    })
}

/// The mesh started (`flowing`) or stopped (`stopped`) flowing over the link with
/// `broker`, for the mesh's dashboards.
pub(crate) fn link_changed(ctx: &Ctx, mesh_id: &str, broker: &str, state: &str) {
    let Some(mesh) = ctx.hub.loaded(mesh_id) else {
        return;
    };
    if mesh.watchers.load(Ordering::Relaxed) == 0 {
        return;
    }
    let mut e = Event::about("link", "", broker, state, crate::time::now_ms());
    e.broker = Some(broker.to_owned());
    publish(ctx, &mesh, &e);
}

/// Something the resource cards count changed (`files`, `skills`, `tasks`,
/// `schedules`, `mcp`): the dashboards ask for the counts again.
pub(crate) fn touched(ctx: &Ctx, mesh_id: &str, what: &'static str) {
    let Some(mesh) = ctx.hub.loaded(mesh_id) else {
        return;
    };
    if mesh.watchers.load(Ordering::Relaxed) == 0 {
        return;
    }
    publish(
        ctx,
        &mesh,
        &Event::about("resource", "", "", what, crate::time::now_ms()),
    );
}

/// A status change, for the mesh's dashboards.
pub(crate) fn status_changed(
    ctx: &Ctx,
    mesh: &MeshHub,
    key: &str,
    name: &str,
    status: &str,
    now: i64,
) {
    if mesh.watchers.load(Ordering::Relaxed) == 0 {
        return;
    }
    publish(ctx, mesh, &Event::about("status", key, name, status, now));
}

/// Shows audit entries in the dashboards' timeline (a `mesh_event` of kind `audit`).
/// `message_sent` is left out: the message itself is already in the stream.
pub(crate) fn tap_audit(ctx: &std::sync::Arc<Ctx>) {
    let weak = std::sync::Arc::downgrade(ctx);
    ctx.audit
        .set_tap(crate::features::audit::engine::Tap(Box::new(
            move |mesh_id: &str, event_type: &'static str, actor: &str| {
                if event_type == "message_sent" {
                    return;
                }
                let Some(ctx) = weak.upgrade() else { return };
                let Some(mesh) = ctx.hub.loaded(mesh_id) else {
                    return;
                };
                if mesh.watchers.load(Ordering::Relaxed) == 0 {
                    return;
                }
                publish(
                    &ctx,
                    &mesh,
                    &Event::about("audit", "", actor, event_type, crate::time::now_ms()),
                );
            },
        )));
}

/// Stops the dashboards of `member_pubkey`'s connections (the member is no longer an
/// admin). Uncounted under the hub's lock, as `unregister` does.
pub(crate) fn unwatch_member(mesh: &MeshHub, member_pubkey: &str) {
    let conns = mesh
        .local_peers(|p| {
            (p.dashboard && p.member_pubkey == member_pubkey).then_some(p.shared.conn_id)
        })
        .into_iter()
        .flatten();
    for conn in conns {
        mesh.with_peer(conn, |p| {
            if std::mem::replace(&mut p.dashboard, false) {
                mesh.watchers.fetch_sub(1, Ordering::Relaxed);
            }
        });
    }
}

/// Queues `event` for every dashboard of the mesh.
pub(crate) fn publish(ctx: &Ctx, mesh: &MeshHub, event: &Event) {
    let frame: Utf8Bytes = serde_json::to_string(event).unwrap_or_default().into();
    let watchers = mesh
        .local_peers(|p| p.dashboard.then(|| p.shared.clone()))
        .into_iter()
        .flatten();
    for shared in watchers {
        // Not `offer`: a dashboard that falls behind loses events, not its connection.
        if shared.try_queue(Outbound::Frame(frame.clone())).is_err() {
            ctx.metrics.frames_dropped.inc("dashboard_full");
        }
    }
}

impl Session {
    /// `dashboard_subscribe`: admins only; answered `dashboard_subscribed`.
    pub(crate) fn on_dashboard_subscribe(&mut self, req_id: Option<String>) -> Option<Utf8Bytes> {
        if !self.is_admin() {
            return error(
                "forbidden",
                "only a mesh admin can watch the dashboard",
                req_id,
            );
        }
        // Counted under the hub's lock, as `unregister` uncounts it.
        let mesh = self.mesh.clone();
        mesh.with_peer(self.conn, |p| {
            if !std::mem::replace(&mut p.dashboard, true) {
                mesh.watchers.fetch_add(1, Ordering::Relaxed);
            }
        });
        let reply = serde_json::json!({
            "type": "dashboard_subscribed",
            "meshId": self.mesh_id(),
            "broker": self.ctx.config.federation.as_ref().map(|f| f.broker.clone()),
            "links": self.ctx.fed.as_ref().map(|f| f.mesh_links(self.mesh_id())).unwrap_or_default(),
            "_reqId": req_id,
        });
        Some(reply.to_string().into())
    }

    /// `dashboard_resources`: admins only; the cards' counts from the hub and the store.
    pub(crate) fn on_dashboard_resources(&mut self, req_id: Option<String>) -> Option<Utf8Bytes> {
        if !self.is_admin() {
            return error(
                "forbidden",
                "only a mesh admin can watch the dashboard",
                req_id,
            );
        }
        let ctx = self.ctx.clone();
        let mesh = self.mesh.clone();
        self.reply_later(async move {
            let id = mesh.row.id.clone();
            let now = crate::time::now_ms();
            let db = &ctx.db;
            let (queue, files, bytes, skills, tasks, schedules) = match tokio::try_join!(
                db.queue_depths(&id, now),
                db.file_count(&id, now),
                db.file_bytes(&id, now),
                db.skill_count(&id),
                db.task_counts(&id),
                db.schedule_count(&id),
            ) {
                Ok(v) => v,
                Err(e) => return store_unavailable("dashboard_resources", req_id, &e),
            };
            let servers = ctx.mcp.list(&id);
            let reply = serde_json::json!({
                "type": "dashboard_resources",
                "queue": {"now": queue[0], "next": queue[1], "low": queue[2]},
                "files": {"count": files, "bytes": bytes},
                "mcpServers": {
                    "count": servers.len(),
                    "online": servers.iter().filter(|s| s.online).count(),
                },
                "skills": skills,
                "tasks": {"open": tasks.0, "claimed": tasks.1, "done": tasks.2},
                "schedules": schedules,
                "links": ctx.fed.as_ref().map(|f| f.mesh_links(&id)).unwrap_or_default(),
                "_reqId": req_id,
            });
            Some(reply.to_string().into())
        });
        None
    }
}
