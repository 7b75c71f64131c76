//! Presence: status, summary, visibility, profile, stats, groups and `list_peers`.

pub mod hooks;

use axum::extract::ws::Utf8Bytes;
use meshd_protocol::broker::{BrokerFrame, PeersList};
use meshd_protocol::client::ClientFrame;
use meshd_protocol::status::StatusSource;

use crate::delivery;
use crate::hub::peer_data;
use crate::session::*;

impl Session {
    /// Presence: status, summary, visibility, profile, stats, groups, `list_peers`.
    pub(crate) fn on_presence(
        &mut self,
        frame: ClientFrame,
        req_id: Option<String>,
        now: i64,
    ) -> Option<Utf8Bytes> {
        match frame {
            ClientFrame::SetStatus { status } => {
                let fresh = i64::try_from(meshd_config::defaults::STATUS_FRESH_WINDOW.as_millis())
                    .unwrap_or(i64::MAX);
                // Unlike the reference, becoming more available releases held messages now.
                // (Under the mesh lock: no send may see the new status before the drain
                // that must come first is set up.)
                self.mesh.update_peer(self.conn, |p| {
                    let before = p.status.status.max_admitted();
                    p.status.write(status, StatusSource::Manual, now, fresh);
                    if p.status.status.max_admitted() > before {
                        p.shared.spill();
                    }
                });
                self.presence_changed();
                crate::features::dashboard::status_changed(
                    &self.ctx,
                    &self.mesh,
                    self.routing_key(),
                    &self.display_name,
                    status.as_str(),
                    now,
                );
                None
            }
            ClientFrame::SetSummary { summary } => {
                self.mesh
                    .update_peer(self.conn, |p| p.summary = Some(summary));
                self.presence_changed();
                None
            }
            ClientFrame::SetVisible { visible } => {
                let changed = self.mesh.update_peer(self.conn, |p| {
                    let changed = p.visible != visible;
                    p.visible = visible;
                    changed.then(|| (peer_data(p), p.position))
                });
                if let Some(Some((data, at))) = changed {
                    let event = if visible {
                        "peer_visible"
                    } else {
                        "peer_hidden"
                    };
                    let frame = delivery::system_push(self.mesh_id(), event, data, now);
                    self.mesh.announce_about(
                        &frame,
                        self.conn,
                        None,
                        &self.member_pubkey,
                        at.as_ref(),
                    );
                    self.presence_changed();
                }
                Self::small_ack(req_id)
            }
            ClientFrame::SetProfile(patch) => {
                self.mesh.update_peer(self.conn, |p| {
                    for (k, v) in patch.fields {
                        p.profile.insert(k.to_owned(), v);
                    }
                });
                self.presence_changed();
                Self::small_ack(req_id)
            }
            ClientFrame::SetStats(stats) => {
                self.mesh.update_peer(self.conn, |p| p.stats = Some(stats));
                self.presence_changed();
                None
            }
            ClientFrame::JoinGroup(group) => {
                self.mesh.update_peer(self.conn, |p| {
                    if let Some(i) = p.groups.iter().position(|g| g.name == group.name) {
                        p.groups[i].role = group.role;
                    } else if p.groups.len() < meshd_protocol::client::MAX_GROUPS {
                        p.groups.push(group);
                    }
                });
                self.presence_changed();
                None
            }
            ClientFrame::LeaveGroup { name } => {
                self.mesh
                    .update_peer(self.conn, |p| p.groups.retain(|g| g.name != name));
                self.presence_changed();
                None
            }
            ClientFrame::ListPeers => {
                let mut peers = self.mesh.peers_for(&self.member_pubkey, self.conn);
                peers.extend(crate::features::bridges::bridged_peers(
                    &self.ctx, &self.mesh,
                ));
                peers.extend(self.mesh.bridged_entries());
                Some(
                    BrokerFrame::PeersList(PeersList { peers, req_id })
                        .to_json()
                        .into(),
                )
            }
            _ => None,
        }
    }
}
