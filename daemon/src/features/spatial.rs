//! Spatial visibility (meshd extension): `set_position {x, y, radius}` and
//! `clear_position`, answered with `position`.
//!
//! A peer standing somewhere sees only the peers standing within its radius: in
//! `list_peers`, in presence events (`peer_in_range` / `peer_out_of_range` when a move
//! changes what it sees; `peer_joined`, `peer_left`, … only about peers it sees), and in
//! the broadcasts, group and tagged messages it receives (from senders it sees). A peer
//! standing nowhere sees everyone. Positions are not kept across connections.
//!
//! The rules live in `meshd_protocol::spatial`, the live view in `hub::spatial`; here
//! are the client frames and what crosses to peer brokers: positions travel as presence
//! (versioned, coalesced per session), and a move goes to a peer broker only when a
//! viewer there could be affected or the mover drifted past its slack since that broker
//! last heard (interest management; `federation.spatial_interest = false` sends all).

use axum::extract::ws::Utf8Bytes;
use meshd_protocol::broker::{BrokerFrame, ErrorFrame, PositionFrame};
use meshd_protocol::client::ClientFrame;
use meshd_protocol::fed::Frame;
use meshd_protocol::spatial::{Position, interested};

use crate::fed::{Fed, LinkShared, Reset, presence_entry};
use crate::hub::{ConnId, MeshHub, lock};
use crate::session::*;

/// Moves one presence may make per second, sustained.
pub(crate) const MOVES_PER_SECOND: u32 = 20;
/// Moves one presence may make at once.
pub(crate) const MOVE_BURST: u32 = 40;

impl Session {
    /// `set_position` / `clear_position`.
    pub(crate) fn on_position(
        &mut self,
        frame: ClientFrame,
        req_id: Option<String>,
        now: i64,
    ) -> Option<Utf8Bytes> {
        let to = match frame {
            ClientFrame::SetPosition(p) => Some(p),
            ClientFrame::ClearPosition => None,
            _ => return None,
        };
        if !self.move_bucket.take(crate::time::instant()) {
            return Some(
                BrokerFrame::Error(
                    ErrorFrame::new(
                        "rate_limited",
                        format!(
                            "rate_limit: at most {MOVES_PER_SECOND} moves/s (burst {MOVE_BURST})"
                        ),
                    )
                    .with_req_id(req_id),
                )
                .to_json()
                .into(),
            );
        }
        let moved = self.mesh.move_to(self.conn, to, now)?;
        if moved.from != to
            && let Some(fed) = &self.ctx.fed
        {
            fed.position_moved(&self.mesh, self.conn);
        }
        Some(
            BrokerFrame::Position(PositionFrame {
                position: to,
                req_id,
            })
            .to_json()
            .into(),
        )
    }
}

impl Fed {
    /// A local presence moved: each peer broker of the mesh hears of it if a viewer
    /// there could be affected, or if it drifted past its slack since that broker
    /// last heard (or it stands nowhere now).
    pub(crate) fn position_moved(&self, mesh: &MeshHub, conn: ConnId) {
        let mesh_id = &mesh.row.id;
        if !self.is_shared(mesh_id) {
            return;
        }
        let version = self.next_version();
        let Some(entry) = mesh.local_peer(conn, |p| presence_entry(p, version)) else {
            return;
        };
        for link in self.links_for(mesh_id) {
            if let Some(to) = entry.position
                && self.spatial_interest()
                && !needs_move(&link, mesh, &entry.key, &to)
            {
                self.metrics()
                    .fed_moves_suppressed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            self.queue_upsert(&link, mesh_id, entry.clone());
        }
    }

    /// A presence of `link`'s broker that stands at `viewer` arrived or moved: the
    /// local presences it may now be affected by, and that broker has not heard of
    /// where they stand, are sent to it.
    pub(crate) fn viewer_moved(&self, link: &LinkShared, mesh: &MeshHub, viewer: Position) {
        if !self.spatial_interest() {
            return;
        }
        let mesh_id = &mesh.row.id;
        // What that broker heard of this mesh (copied: the hub's lock is taken next).
        let heard: std::collections::HashMap<String, Position> = lock(&link.sent_at)
            .iter()
            .filter(|((m, _), _)| m == mesh_id)
            .map(|((_, key), at)| (key.clone(), *at))
            .collect();
        let stale = mesh.local_peers(|p| {
            let at = p.position?;
            let before = heard.get(p.routing_key());
            (before != Some(&at) && interested([&viewer], before, &at))
                .then(|| presence_entry(p, self.next_version()))
        });
        for entry in stale.into_iter().flatten() {
            self.queue_upsert(link, mesh_id, entry);
        }
    }

    /// Queues a presence update for one link (blanked per that broker's export policy).
    fn queue_upsert(
        &self,
        link: &LinkShared,
        mesh_id: &str,
        mut entry: meshd_protocol::fed::PresenceEntry,
    ) {
        self.strip_presence(
            mesh_id,
            &link.broker,
            crate::fed::policy::Direction::Export,
            &mut entry,
        );
        let key = entry.key.clone();
        let queued = link.queue_presence(
            mesh_id,
            &key,
            Frame::PresenceUpsert {
                mesh_id: mesh_id.to_owned(),
                entry: Box::new(entry),
            },
        );
        if !queued {
            self.reset_link(link, Reset::PresenceFull);
        }
    }
}

/// Whether `link`'s broker must hear that the presence `key` now stands at `to`.
fn needs_move(link: &LinkShared, mesh: &MeshHub, key: &str, to: &Position) -> bool {
    let heard = lock(&link.sent_at)
        .get(&(mesh.row.id.clone(), key.to_owned()))
        .copied();
    let Some(heard) = heard else {
        return true;
    };
    heard.radius != to.radius
        || heard.distance(to) > to.slack()
        || interested(&mesh.remote_positions(&link.broker), Some(&heard), to)
}
