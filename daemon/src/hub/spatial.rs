//! Spatial visibility in the live view (see `features::spatial` and
//! `meshd_protocol::spatial`): who sees whom as peers move, and the range events.
//!
//! A viewer standing somewhere sees another peer only if that peer stands within its
//! radius; a viewer standing nowhere sees everyone. Peers of the viewer's own member are
//! always seen. When a move changes what a viewer sees, the viewer gets
//! `peer_in_range` or `peer_out_of_range` (`{name, pubkey, position}`) — and presence
//! events about peers it does not see are not sent to it at all.

use axum::extract::ws::Utf8Bytes;
use meshd_protocol::fed::PresenceEntry;
use meshd_protocol::spatial::{self as space, Position};

use super::{ConnId, MeshHub, MeshInner, Outbound, Peer, offer, peer_event_data};

/// What a move changed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Moved {
    /// Where the peer stood before.
    pub(crate) from: Option<Position>,
}

/// A `peer_in_range` / `peer_out_of_range` system push about a peer.
fn range_event(
    mesh_id: &str,
    entered: bool,
    name: &str,
    key: &str,
    at: Option<&Position>,
    now: i64,
) -> Utf8Bytes {
    let mut data = peer_event_data(name, key);
    data.insert(
        "position".into(),
        serde_json::to_value(at).unwrap_or_default(),
    );
    let event = if entered {
        "peer_in_range"
    } else {
        "peer_out_of_range"
    };
    crate::delivery::system_push(mesh_id, event, data, now)
}

impl MeshInner {
    /// Where the sender of a message stands: its connection's position, else that of a
    /// live presence holding `key` (here, then at another broker).
    pub(super) fn position_of(&self, conn: ConnId, key: &str) -> Option<Position> {
        if let Some(p) = self.peers.get(&conn) {
            return p.position;
        }
        if let Some(p) = self.live_for(key).next() {
            return p.position;
        }
        self.remote.get(key).and_then(|r| r.entry.position)
    }
}

/// Whether `viewer` sees a presence of `member` standing at `at` (visibility aside).
fn sees(viewer: &Peer, member: &str, at: Option<&Position>) -> bool {
    viewer.member_pubkey == member || space::visible(viewer.position.as_ref(), at)
}

impl MeshHub {
    /// Sends a presence event about a peer of `member` standing at `at` to every live
    /// peer that sees it, except `except_conn` and the connections of `except_member`.
    /// Returns how many connections it was queued for.
    pub(crate) fn announce_about(
        &self,
        frame: &Utf8Bytes,
        except_conn: ConnId,
        except_member: Option<&str>,
        member: &str,
        at: Option<&Position>,
    ) -> usize {
        self.announce_to(frame, except_conn, except_member, |p| sees(p, member, at))
    }

    /// Moves a local presence (`None`: to nowhere) and tells every viewer whose view
    /// changed, the mover included. `None` when the connection is gone.
    pub(crate) fn move_to(&self, conn: ConnId, to: Option<Position>, now: i64) -> Option<Moved> {
        let mut inner = self.inner();
        let mover = inner.peers.get_mut(&conn)?;
        let from = std::mem::replace(&mut mover.position, to);
        let mover = inner.peers.get(&conn)?;
        let mesh_id = &self.row.id;
        // Those who see the mover, or no longer do.
        if mover.visible {
            for v in inner.peers.values() {
                if v.shared.conn_id == conn || v.member_pubkey == mover.member_pubkey {
                    continue;
                }
                let at = v.position.as_ref();
                let (before, after) = (
                    space::visible(at, from.as_ref()),
                    space::visible(at, to.as_ref()),
                );
                if before != after {
                    let f = range_event(
                        mesh_id,
                        after,
                        &mover.display_name,
                        mover.routing_key(),
                        to.as_ref(),
                        now,
                    );
                    offer(&v.shared, Outbound::Frame(f));
                }
            }
        }
        // What the mover sees, here and at other brokers.
        let mut changed: Vec<Utf8Bytes> = Vec::new();
        let mut consider = |name: &str, key: &str, at: Option<&Position>| {
            let (before, after) = (
                space::visible(from.as_ref(), at),
                space::visible(to.as_ref(), at),
            );
            if before != after {
                changed.push(range_event(mesh_id, after, name, key, at, now));
            }
        };
        for p in inner.peers.values() {
            if p.shared.conn_id != conn && p.visible && p.member_pubkey != mover.member_pubkey {
                consider(&p.display_name, p.routing_key(), p.position.as_ref());
            }
        }
        for r in inner.remote.values().filter(|r| r.entry.visible) {
            consider(
                &r.entry.display_name,
                &r.entry.key,
                r.entry.position.as_ref(),
            );
        }
        for f in changed {
            offer(&mover.shared, Outbound::Frame(f));
        }
        Some(Moved { from })
    }

    /// Where the presences `broker` announced stand.
    pub(crate) fn remote_positions(&self, broker: &str) -> Vec<Position> {
        self.inner()
            .remote
            .values()
            .filter(|r| &*r.broker == broker)
            .filter_map(|r| r.entry.position)
            .collect()
    }
}

/// The presence event a local viewer gets when a remote presence changes from `old`
/// (`None`: unknown until now) to `new`, if its view of it changed.
pub(super) fn remote_change_event(
    viewer: &Peer,
    old: Option<&PresenceEntry>,
    new: &PresenceEntry,
) -> Option<&'static str> {
    let at = viewer.position.as_ref();
    let seen = |e: &PresenceEntry| e.visible && space::visible(at, e.position.as_ref());
    let (before, after) = (old.is_some_and(seen), seen(new));
    match (old, before, after) {
        (None, _, true) => Some("peer_joined"),
        (Some(o), false, true) if !o.visible => Some("peer_visible"),
        (Some(o), true, false) if o.visible && !new.visible => Some("peer_hidden"),
        (Some(_), false, true) => Some("peer_in_range"),
        (Some(_), true, false) => Some("peer_out_of_range"),
        _ => None,
    }
}

/// Whether a local viewer saw a remote presence that leaves.
pub(super) fn saw(viewer: &Peer, e: &PresenceEntry) -> bool {
    e.visible && space::visible(viewer.position.as_ref(), e.position.as_ref())
}
