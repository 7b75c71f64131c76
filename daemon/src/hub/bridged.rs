//! Peers of a mesh of another broker, listed in a mesh here through a bridge
//! (`features::bridges`): what `list_peers` shows with `bridged`, and where a DM to
//! one of their keys goes.

use std::sync::Arc;

use meshd_protocol::broker::{Bridged, PeerEntry};
use meshd_protocol::fed::PresenceEntry;

use super::{MeshHub, RemotePeer};

/// Member keys of bridged peers remembered per mesh (a DM to a member whose session
/// left still routes to its broker, where it waits).
const MAX_BRIDGED_MEMBERS: usize = 65_536;

/// A peer of another broker's mesh, listed here.
#[derive(Debug, Clone)]
pub(crate) struct BridgedPeer {
    pub(crate) peer: RemotePeer,
    pub(crate) from: Bridged,
}

impl MeshHub {
    /// Replaces (`full`) or updates what `broker` lists of its mesh `from` here; at most
    /// `cap` peers per mesh. Returns how many entries did not fit.
    pub(crate) fn bridged_apply(
        &self,
        broker: &Arc<str>,
        from: &Bridged,
        entries: Vec<PresenceEntry>,
        full: bool,
        cap: usize,
    ) -> usize {
        let mut inner = self.inner();
        if full {
            inner
                .bridged
                .retain(|_, b| !(b.peer.broker == *broker && b.from.mesh_id == from.mesh_id));
        }
        let mut over = 0;
        for e in entries {
            let known = inner.bridged.get(&e.key);
            if known.is_some_and(|b| b.peer.broker != *broker || b.from.mesh_id != from.mesh_id) {
                over += 1;
                continue;
            }
            if known.is_some_and(|b| b.peer.entry.version > e.version) {
                continue;
            }
            if known.is_none() && inner.bridged.len() >= cap {
                over += 1;
                continue;
            }
            if inner.bridged_members.len() < MAX_BRIDGED_MEMBERS {
                inner.bridged_members.insert(
                    e.member_pubkey.clone(),
                    (broker.clone(), from.mesh_id.clone(), from.mesh_name.clone()),
                );
            }
            inner.bridged.insert(
                e.key.clone(),
                BridgedPeer {
                    peer: RemotePeer {
                        broker: broker.clone(),
                        entry: e,
                    },
                    from: from.clone(),
                },
            );
        }
        over
    }

    /// A peer `broker` listed from its mesh `from_mesh` left.
    pub(crate) fn bridged_gone(&self, broker: &str, from_mesh: &str, key: &str) {
        let mut inner = self.inner();
        if inner
            .bridged
            .get(key)
            .is_some_and(|b| &*b.peer.broker == broker && b.from.mesh_id == from_mesh)
        {
            inner.bridged.remove(key);
        }
    }

    /// Forgets what `broker` listed here (from `from_mesh`, or from every mesh); with
    /// `members`, also where its members' keys route (the bridge is gone — a lost
    /// link keeps them: DMs to them wait in the outbox).
    pub(crate) fn bridged_drop(&self, broker: &str, from_mesh: Option<&str>, members: bool) {
        let mut inner = self.inner();
        let keep = |b: &Arc<str>, m: &str| &**b != broker || from_mesh.is_some_and(|f| f != m);
        inner
            .bridged
            .retain(|_, b| keep(&b.peer.broker, &b.from.mesh_id));
        if members {
            inner.bridged_members.retain(|_, (b, m, _)| keep(b, m));
        }
    }

    /// `list_peers` entries of the visible bridged peers, with `bridged`.
    pub(crate) fn bridged_entries(&self) -> Vec<PeerEntry> {
        let inner = self.inner();
        let mut peers: Vec<&BridgedPeer> = inner
            .bridged
            .values()
            .filter(|b| b.peer.entry.visible)
            .collect();
        peers.sort_by(|a, b| {
            (a.peer.entry.connected_at, &a.peer.entry.key)
                .cmp(&(b.peer.entry.connected_at, &b.peer.entry.key))
        });
        peers
            .into_iter()
            .map(|b| {
                let mut e = b.peer.peer_entry();
                e.broker = None;
                e.bridged = Some(b.from.clone());
                e
            })
            .collect()
    }

    /// Where a DM to `key` goes when it is a bridged peer's (or its member's) key:
    /// (broker, that broker's mesh, its name).
    pub(crate) fn bridged_route(&self, key: &str) -> Option<(Arc<str>, String, String)> {
        let inner = self.inner();
        if let Some(b) = inner.bridged.get(key) {
            return Some((
                b.peer.broker.clone(),
                b.from.mesh_id.clone(),
                b.from.mesh_name.clone(),
            ));
        }
        inner.bridged_members.get(key).cloned()
    }
}
