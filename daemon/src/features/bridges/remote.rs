//! Bridges with a mesh of a peer broker: each broker keeps its own row (its admin's
//! consent) and tells the other its claims on the control stream (`Frame::Bridges`); a
//! bridge flows while both claim it. Over the link go relayed multicasts
//! (`BridgeRelay`, live), the peers each side lists in the other (`BridgePeers`,
//! presence) and DMs to those peers (`Dm` with `bridged`, through the durable outbox:
//! exactly once through cuts and restarts). Each side checks its own row on what
//! arrives: the direction it accepts, its tags, `peers`, the path.

use meshd_protocol::broker::{Bridged, Hop};
use meshd_protocol::fed::{BridgeClaim, BridgeRelay, Frame, PresenceEntry, RejectReason};
use meshd_protocol::{Priority, TargetSpec};
use tracing::debug;

use super::{MAX_BRIDGES, MAX_HOPS, Side};
use crate::Ctx;
use crate::delivery::{self, Envelope, Origin};
use crate::fed::{Fed, LinkShared, Reset, presence_entry};
use crate::hub::{ConnId, MeshHub, RemoteCaps, lock};

/// The coalescer's mesh key for what one bridge lists on a link.
fn presence_slot(local: &str, remote: &str) -> String {
    format!("bridge:{local}:{remote}")
}

impl Fed {
    /// This broker's claims for `broker`: every bridge between one of its meshes and one
    /// of `broker`'s.
    fn bridge_claims_for(&self, ctx: &Ctx, broker: &str) -> Vec<BridgeClaim> {
        ctx.bridges
            .with_broker(broker)
            .into_iter()
            .map(|(mesh, s)| BridgeClaim {
                mesh_name: ctx.bridges.name(&mesh),
                mesh_id: mesh,
                remote_mesh_id: s.other,
                relays: s.relays,
                accepts: s.accepts,
                peers: s.peers,
            })
            .collect()
    }

    /// Tells `link`'s broker our claims (when the link comes up, or they changed).
    pub(crate) fn send_bridge_claims(&self, ctx: &Ctx, link: &LinkShared) {
        let claims = self.bridge_claims_for(ctx, &link.broker);
        if link.control.try_send(Frame::Bridges(claims)).is_err() {
            self.reset_link(link, Reset::ControlFull);
        }
    }

    /// The stored bridges changed: every link hears our claims again, and what flows
    /// is recomputed.
    pub(crate) fn bridges_changed(&self, ctx: &Ctx) {
        for link in self.all_links() {
            self.send_bridge_claims(ctx, &link);
            // Their claims are unchanged; ours changed (what "was" is judged on theirs).
            let theirs = lock(&link.bridge_claims).clone();
            self.bridge_flow_changed(ctx, &link, &theirs, true);
        }
    }

    /// The claim `broker` makes for our side `side` of mesh `local`, if the bridge flows.
    fn counterpart(&self, broker: &str, local: &str, side: &Side) -> Option<BridgeClaim> {
        let link = self.link(broker)?;
        lock(&link.bridge_claims)
            .iter()
            .find(|c| c.mesh_id == side.other && c.remote_mesh_id == local)
            .cloned()
    }

    /// `link`'s broker sent its claims.
    pub(crate) fn on_bridge_claims(
        &self,
        ctx: &Ctx,
        link: &LinkShared,
        claims: Vec<BridgeClaim>,
    ) -> Result<(), String> {
        if claims.len() > MAX_BRIDGES
            || claims.iter().any(|c| {
                !crate::ids::plausible_id(&c.mesh_id)
                    || !crate::ids::plausible_id(&c.remote_mesh_id)
                    || c.mesh_name.len() > meshd_protocol::client::MAX_NAME_LEN
            })
        {
            return Err("malformed bridge claims".into());
        }
        let before = std::mem::replace(&mut *lock(&link.bridge_claims), claims);
        self.bridge_flow_changed(ctx, link, &before, false);
        Ok(())
    }

    /// After the claims (ours or theirs) changed: a `peers` bridge that started flowing
    /// (or every flowing one, with `resend`: our side changed) sends its mesh's peers;
    /// one that stopped forgets what the other side listed.
    fn bridge_flow_changed(
        &self,
        ctx: &Ctx,
        link: &LinkShared,
        before: &[BridgeClaim],
        resend: bool,
    ) {
        let now_claims = lock(&link.bridge_claims).clone();
        let sides = ctx.bridges.with_broker(&link.broker);
        for (local, side) in &sides {
            let was = before
                .iter()
                .any(|c| c.mesh_id == side.other && c.remote_mesh_id == *local && c.peers);
            let is = side.peers
                && now_claims
                    .iter()
                    .any(|c| c.mesh_id == side.other && c.remote_mesh_id == *local && c.peers);
            if is
                && (!was || resend)
                && let Some(hub) = ctx.hub.loaded(local)
            {
                self.send_bridge_snapshot(link, &hub, &side.other);
            }
            if was
                && !is
                && let Some(hub) = ctx.hub.loaded(local)
            {
                hub.bridged_drop(&link.broker, Some(&side.other), true);
            }
        }
        // Bridges we no longer keep: forget what that broker listed through them.
        for c in before {
            let kept = sides
                .iter()
                .any(|(l, s)| *l == c.remote_mesh_id && s.other == c.mesh_id && s.peers);
            if !kept && let Some(hub) = ctx.hub.loaded(&c.remote_mesh_id) {
                hub.bridged_drop(&link.broker, Some(&c.mesh_id), true);
            }
        }
    }

    /// Queues every local peer of `hub` for the other side of a bridge.
    fn send_bridge_snapshot(&self, link: &LinkShared, hub: &MeshHub, remote: &str) {
        let entries: Vec<PresenceEntry> = hub
            .local_peers(|p| presence_entry(p, self.next_version()))
            .into_iter()
            .filter(|e| e.visible)
            .collect();
        let slot = presence_slot(&hub.row.id, remote);
        let frame = Frame::BridgePeers {
            from_mesh_id: hub.row.id.clone(),
            to_mesh_id: remote.to_owned(),
            entries,
            full: true,
        };
        if !link.queue_presence(&slot, "*", frame) {
            self.reset_link(link, Reset::PresenceFull);
        }
    }

    /// A local presence of `mesh` changed (`conn`) or left (`gone`): the brokers its
    /// mesh is bridged to with `peers` hear of it.
    pub(crate) fn bridge_presence(
        &self,
        ctx: &Ctx,
        mesh: &MeshHub,
        conn: ConnId,
        gone: Option<&str>,
    ) {
        let sides = ctx.bridges.sides(&mesh.row.id);
        for side in sides.iter().filter(|s| s.peers) {
            let Some(broker) = &side.broker else { continue };
            let Some(link) = self.link(broker) else {
                continue;
            };
            if self
                .counterpart(broker, &mesh.row.id, side)
                .is_none_or(|c| !c.peers)
            {
                continue;
            }
            let slot = presence_slot(&mesh.row.id, &side.other);
            let (key, frame) = match gone {
                Some(key) => (
                    key.to_owned(),
                    Frame::BridgePeerGone {
                        from_mesh_id: mesh.row.id.clone(),
                        to_mesh_id: side.other.clone(),
                        key: key.to_owned(),
                    },
                ),
                None => {
                    let version = self.next_version();
                    let Some(e) = mesh.local_peer(conn, |p| presence_entry(p, version)) else {
                        continue;
                    };
                    if !e.visible {
                        (
                            e.key.clone(),
                            Frame::BridgePeerGone {
                                from_mesh_id: mesh.row.id.clone(),
                                to_mesh_id: side.other.clone(),
                                key: e.key,
                            },
                        )
                    } else {
                        (
                            e.key.clone(),
                            Frame::BridgePeers {
                                from_mesh_id: mesh.row.id.clone(),
                                to_mesh_id: side.other.clone(),
                                entries: vec![e],
                                full: false,
                            },
                        )
                    }
                }
            };
            if !link.queue_presence(&slot, &key, frame) {
                self.reset_link(&link, Reset::PresenceFull);
            }
        }
    }

    /// `BridgePeers` / `BridgePeerGone` from `link`'s broker: applied when our side of
    /// that bridge lists peers.
    pub(crate) async fn on_bridge_peers(&self, ctx: &Ctx, link: &LinkShared, frame: Frame) {
        let (from, to) = match &frame {
            Frame::BridgePeers {
                from_mesh_id,
                to_mesh_id,
                ..
            }
            | Frame::BridgePeerGone {
                from_mesh_id,
                to_mesh_id,
                ..
            } => (from_mesh_id.clone(), to_mesh_id.clone()),
            _ => return,
        };
        let Some(side) = ctx
            .bridges
            .sides(&to)
            .into_iter()
            .find(|s| s.broker.as_deref() == Some(&*link.broker) && s.other == from && s.peers)
        else {
            ctx.metrics
                .fed_refused
                .inc(RejectReason::NotShared.as_str());
            return;
        };
        let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &to).await else {
            return;
        };
        let name = self
            .counterpart(&link.broker, &to, &side)
            .map(|c| c.mesh_name)
            .unwrap_or_default();
        let bridged = Bridged {
            mesh_id: from.clone(),
            mesh_name: name,
            broker: Some(link.broker.to_string()),
            path: Vec::new(),
        };
        match frame {
            Frame::BridgePeers { entries, full, .. } => {
                let (ok, bad): (Vec<_>, Vec<_>) =
                    entries.into_iter().partition(crate::fed::valid_entry);
                let cap = RemoteCaps::from_limits(&ctx.config.limits).per_mesh;
                let over = hub.bridged_apply(&link.broker, &bridged, ok, full, cap);
                if !bad.is_empty() || over > 0 {
                    ctx.metrics
                        .fed_refused
                        .inc_by(RejectReason::Invalid.as_str(), (bad.len() + over) as u64);
                }
            }
            Frame::BridgePeerGone { key, .. } => hub.bridged_gone(&link.broker, &from, &key),
            _ => {}
        }
    }

    /// Sends a multicast that entered `env.mesh` here over a bridge to a mesh of
    /// another broker: when the bridge flows, this side relays, the other accepts, a
    /// tag matches and that mesh is not on the path (live: dropped when the link's queue
    /// is full, like any multicast).
    pub(crate) fn relay_to_broker(&self, env: &Envelope, side: &Side, path: &[Hop]) {
        let Some(broker) = &side.broker else { return };
        let local = &env.mesh.row.id;
        let Some(mut message) = env.to_multicast() else {
            return;
        };
        message.client_message_id = None;
        if !side.relays
            || !meshd_protocol::tags::any_matches(&env.tags, &side.tags)
            || path.len() >= MAX_HOPS
            || path
                .iter()
                .any(|h| h.broker.as_deref() == Some(&**broker) && h.mesh_id == side.other)
            || self
                .counterpart(broker, local, side)
                .is_none_or(|c| !c.accepts)
        {
            return;
        }
        let Some(link) = self.link(broker) else {
            return;
        };
        let frame = Frame::BridgeRelay(Box::new(BridgeRelay {
            to_mesh_id: side.other.clone(),
            from_mesh_id: local.clone(),
            path: path
                .iter()
                .map(|h| (h.broker.clone().unwrap_or_default(), h.mesh_id.clone()))
                .collect(),
            message,
        }));
        if link.live.try_send(frame).is_err() {
            self.metrics()
                .fed_live_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A multicast `link`'s broker relayed into one of our meshes: checked against our
    /// side of the bridge, then delivered there (and relayed on) like a local one.
    pub(crate) async fn on_bridge_relay(
        &self,
        ctx: &Ctx,
        link: &LinkShared,
        r: BridgeRelay,
    ) -> Result<(), RejectReason> {
        let side = ctx
            .bridges
            .sides(&r.to_mesh_id)
            .into_iter()
            .find(|s| s.broker.as_deref() == Some(&*link.broker) && s.other == r.from_mesh_id)
            .ok_or(RejectReason::NotShared)?;
        let claim = self
            .counterpart(&link.broker, &r.to_mesh_id, &side)
            .ok_or(RejectReason::NotShared)?;
        let mut m = r.message;
        let tags = crate::features::tags::from_peer(
            std::mem::take(&mut m.tags),
            meshd_protocol::tags::MAX_TAGS,
        )
        .ok_or(RejectReason::Invalid)?;
        let me = self.name();
        let well_formed = r.path.len() < MAX_HOPS
            && r.path.last() == Some(&(link.broker.to_string(), r.from_mesh_id.clone()))
            && m.mesh_id == r.from_mesh_id
            && m.sender_name.len() <= meshd_protocol::client::MAX_NAME_LEN
            && m.sender_pubkey.len() <= 64
            && m.id.len() <= 64
            && r.path
                .iter()
                .all(|(b, mesh)| b.len() <= 253 && crate::ids::plausible_id(mesh));
        if !well_formed {
            return Err(RejectReason::Invalid);
        }
        if !side.accepts
            || !claim.relays
            || !meshd_protocol::tags::any_matches(&tags, &side.tags)
            || r.path
                .iter()
                .any(|(b, mesh)| b == me && *mesh == r.to_mesh_id)
        {
            debug!(bridge.from = %r.from_mesh_id, "relay refused by this side of the bridge");
            return Err(RejectReason::Policy);
        }
        let Ok(target @ (TargetSpec::Broadcast | TargetSpec::Group(_) | TargetSpec::Tag(_))) =
            TargetSpec::parse(&m.target_spec)
        else {
            return Err(RejectReason::Invalid);
        };
        let priority = Priority::from_rank(m.priority).ok_or(RejectReason::Invalid)?;
        let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &r.to_mesh_id).await else {
            return Err(RejectReason::NotShared);
        };
        let mut envelope = Envelope::from_multicast(m, hub, target, priority, tags, Origin::Bridge);
        // A message of this mesh now: its own id, no client's idempotency id.
        envelope.id = crate::ids::message_id();
        envelope.client_message_id = None;
        envelope.bridged = Some(Bridged {
            mesh_id: r.from_mesh_id,
            mesh_name: claim.mesh_name,
            broker: Some(link.broker.to_string()),
            path: r
                .path
                .into_iter()
                .map(|(b, mesh_id)| Hop {
                    broker: (!b.is_empty()).then_some(b),
                    mesh_id,
                })
                .collect(),
        });
        delivery::submit(ctx, envelope, crate::time::now_ms()).map_err(|e| e.reject_reason())?;
        ctx.metrics
            .bridge_relayed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Whether a DM through a bridge between our mesh `local` and `broker`'s mesh
    /// `remote` may go or come over the link: the bridge flows with `peers` on both
    /// sides.
    pub(crate) fn bridge_dm_flows(
        &self,
        ctx: &Ctx,
        broker: &str,
        local: &str,
        remote: &str,
    ) -> bool {
        ctx.bridges
            .sides(local)
            .into_iter()
            .find(|s| s.peers && s.broker.as_deref() == Some(broker) && s.other == remote)
            .and_then(|s| self.counterpart(broker, local, &s))
            .is_some_and(|c| c.peers)
    }
}

/// Whether this broker keeps a `peers` bridge between `local` and `broker`'s `remote`
/// (its side of the consent, whatever the link says now).
pub(crate) fn bridge_dm_consented(ctx: &Ctx, broker: &str, local: &str, remote: &str) -> bool {
    ctx.bridges
        .sides(local)
        .iter()
        .any(|s| s.peers && s.broker.as_deref() == Some(broker) && s.other == remote)
}

/// The link of `broker`'s presences ended: what it listed through bridges leaves with
/// its other presences (see `Fed::schedule_presence_expiry`).
pub(crate) fn bridged_meshes(ctx: &Ctx, broker: &str) -> Vec<String> {
    let mut m: Vec<String> = ctx
        .bridges
        .with_broker(broker)
        .into_iter()
        .map(|(local, _)| local)
        .collect();
    m.dedup();
    m
}
