//! Bridges between meshes (meshd extension): an operator joins two meshes of this
//! broker (`meshd bridge create A B --tags sales/ --direction both --peers`).
//!
//! - **Relayed messages.** A broadcast, group or tagged message carrying a tag that
//!   matches one of the bridge's prefixes is relayed, in the bridge's direction, into the
//!   other mesh with the same target form (`*`, `@group`, `tag:NAME`), live, the body
//!   untouched (no marker): the push carries `bridged: {meshId, meshName, path}` instead.
//!   Every relayed message carries its path (the meshes it was delivered in, origin
//!   first) and is never relayed into a mesh on its path, nor past [`MAX_HOPS`] meshes,
//!   so any graph of bridges is loop-free: around a triangle it stops where it started.
//! - **Bridged peers.** With `--peers`, each mesh's live peers are listed in the other
//!   (`list_peers`, with `bridged`) and can be sent DMs there: the DM is stored in the
//!   recipient's mesh for the recipient's own key, and the push carries the sender's own
//!   key and `bridged`. The sender seals to the recipient's key as listed, the recipient
//!   opens with the sender's key from the push and replies to it (a key of the bridged
//!   mesh, routed back the same way): end-to-end encryption is the same as within a
//!   mesh, and the broker never holds a key. Such DMs are stored like any other, so they
//!   are delivered exactly once through disconnects and restarts.
//!
//! Bridges are stored (`bridge`) and re-read every 500 ms by the running daemon.
//! Relaying happens where a message enters its mesh (a peer broker's copy of a
//! multicast is relayed by the broker it entered at); a bridged DM reaches a peer hosted
//! on this broker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshd_protocol::TargetSpec;
use meshd_protocol::broker::{Bridged, Hop, PeerEntry};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Ctx;
use crate::delivery::{self, Envelope, Origin, Target};
use crate::hub::{MeshHub, lock};
use crate::store::{Db, StoreError, with_db, with_db_write};

mod remote;
pub(crate) use remote::{bridge_dm_consented, bridged_meshes};

/// Meshes a relayed message may be delivered in, its origin included.
pub(crate) const MAX_HOPS: usize = 8;
/// Bridges per broker.
pub(crate) const MAX_BRIDGES: usize = 1_024;
/// How often stored bridges are re-read.
const RELOAD_EVERY: Duration = Duration::from_millis(500);

/// Which way tagged messages are relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the first mesh into the second.
    AToB,
    /// From the second mesh into the first.
    BToA,
    /// Both ways.
    Both,
}

impl Direction {
    /// Stored and command-line spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::AToB => "a-to-b",
            Self::BToA => "b-to-a",
            Self::Both => "both",
        }
    }

    /// The direction a spelling means.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::AToB, Self::BToA, Self::Both]
            .into_iter()
            .find(|d| d.as_str() == s)
    }
}

/// A stored bridge.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BridgeRow {
    /// Id.
    pub id: String,
    /// First mesh.
    pub mesh_a: String,
    /// Second mesh.
    pub mesh_b: String,
    /// The peer broker hosting `mesh_b` (`None`: this broker).
    pub broker_b: Option<String>,
    /// [`Direction`] spelling.
    pub direction: String,
    /// Tag prefixes, space-separated.
    pub tags: String,
    /// Whether each mesh's peers are listed (and reachable) in the other.
    pub peers: bool,
    /// Created (ms).
    pub created_at: i64,
}

/// A bridge as one of its meshes sees it.
#[derive(Debug, Clone)]
pub(crate) struct Side {
    /// The other mesh.
    pub(crate) other: String,
    /// The peer broker hosting it (`None`: this broker).
    pub(crate) broker: Option<Arc<str>>,
    /// Whether tagged messages of this mesh are relayed into the other.
    pub(crate) relays: bool,
    /// Whether tagged messages of the other mesh are taken into this one.
    pub(crate) accepts: bool,
    /// Tag prefixes.
    pub(crate) tags: Vec<String>,
    /// Peers listed across.
    pub(crate) peers: bool,
}

/// The bridges in force, by mesh.
#[derive(Debug, Default)]
pub(crate) struct Bridges {
    rows: Mutex<Vec<BridgeRow>>,
    by_mesh: Mutex<Arc<HashMap<String, Vec<Side>>>>,
    /// Names of the local meshes bridges join (told to the other broker).
    names: Mutex<HashMap<String, String>>,
}

impl Bridges {
    /// The name of a local mesh a bridge joins.
    pub(crate) fn name(&self, mesh: &str) -> String {
        lock(&self.names).get(mesh).cloned().unwrap_or_default()
    }

    pub(crate) fn sides(&self, mesh: &str) -> Vec<Side> {
        let all = lock(&self.by_mesh).clone();
        all.get(mesh).cloned().unwrap_or_default()
    }

    /// Every side of a bridge with a mesh of `broker`: (local mesh, side).
    pub(crate) fn with_broker(&self, broker: &str) -> Vec<(String, Side)> {
        let all = lock(&self.by_mesh).clone();
        let mut out: Vec<(String, Side)> = all
            .iter()
            .flat_map(|(m, sides)| sides.iter().map(move |s| (m.clone(), s.clone())))
            .filter(|(_, s)| s.broker.as_deref() == Some(broker))
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1.other).cmp(&(&b.0, &b.1.other)));
        out
    }

    /// Puts `rows` in force; whether anything changed.
    fn set(&self, rows: Vec<BridgeRow>) -> bool {
        let mut current = lock(&self.rows);
        if *current == rows {
            return false;
        }
        let mut by: HashMap<String, Vec<Side>> = HashMap::new();
        for r in &rows {
            let Some(d) = Direction::parse(&r.direction) else {
                warn!(bridge = %r.id, "a stored bridge has an unknown direction; ignored");
                continue;
            };
            let tags: Vec<String> = r
                .tags
                .split(' ')
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect();
            let broker: Option<Arc<str>> = r.broker_b.as_deref().map(Arc::from);
            by.entry(r.mesh_a.clone()).or_default().push(Side {
                other: r.mesh_b.clone(),
                broker: broker.clone(),
                relays: d != Direction::BToA,
                accepts: d != Direction::AToB,
                tags: tags.clone(),
                peers: r.peers,
            });
            // The other side of a bridge with a mesh of a peer broker is that broker's.
            if broker.is_none() {
                by.entry(r.mesh_b.clone()).or_default().push(Side {
                    other: r.mesh_a.clone(),
                    broker: None,
                    relays: d != Direction::AToB,
                    accepts: d != Direction::BToA,
                    tags,
                    peers: r.peers,
                });
            }
        }
        *lock(&self.by_mesh) = Arc::new(by);
        *current = rows;
        true
    }
}

/// Re-reads the stored bridges until `cancel`; meshes joined by a `--peers` bridge are
/// kept loaded, so a DM to a bridged member who is offline is stored for it.
pub(crate) async fn run(ctx: Arc<Ctx>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(RELOAD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        match ctx.db.bridges().await {
            Ok(rows) => {
                let peers: Vec<String> = rows
                    .iter()
                    .filter(|r| r.peers)
                    .flat_map(|r| [r.mesh_a.clone(), r.mesh_b.clone()])
                    .collect();
                let n = rows.len();
                for r in &rows {
                    let local =
                        std::iter::once(&r.mesh_a).chain(r.broker_b.is_none().then_some(&r.mesh_b));
                    for m in local {
                        if lock(&ctx.bridges.names).contains_key(m) {
                            continue;
                        }
                        if let Ok(Some(row)) = ctx.db.mesh_by_id(m).await {
                            lock(&ctx.bridges.names).insert(m.clone(), row.name);
                        }
                    }
                }
                if ctx.bridges.set(rows) {
                    if let Some(fed) = &ctx.fed {
                        fed.bridges_changed(&ctx);
                    }
                    info!(bridges = n, "bridges in force");
                    ctx.metrics.bridges_active.store(
                        i64::try_from(n).unwrap_or(i64::MAX),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
                for m in peers {
                    if ctx.hub.loaded(&m).is_none()
                        && let Err(e) = ctx.hub.mesh(&ctx.db, &m).await
                    {
                        warn!(cause = %e, mesh.id = %m, "loading a bridged mesh");
                    }
                }
            }
            Err(e) => warn!(cause = %e, "reloading bridges"),
        }
    }
}

/// `bridged` for a sender or peer of `mesh` seen from another mesh of this broker.
pub(crate) fn from_mesh(mesh: &MeshHub) -> Bridged {
    Bridged {
        mesh_id: mesh.row.id.clone(),
        mesh_name: mesh.row.name.clone(),
        broker: None,
        path: Vec::new(),
    }
}

/// Relays a multicast that entered `env.mesh` here into the meshes bridged to it whose
/// bridge admits one of its tags and that are not on its path (live, best effort: a
/// relay the other mesh refuses is dropped).
pub(crate) fn relay(ctx: &Ctx, env: &Envelope, spec: &TargetSpec, now: i64) {
    if env.tags.is_empty() {
        return;
    }
    let sides = ctx.bridges.sides(&env.mesh.row.id);
    if sides.is_empty() {
        return;
    }
    let delivery::Body::Sealed { nonce, ciphertext } = &env.body else {
        return;
    };
    // Where it has been: the path it came with, then this mesh (with this broker's
    // name when it is federated: the path may cross brokers).
    let me: Option<String> = ctx.fed.as_ref().map(|f| f.name().to_owned());
    let mut path: Vec<Hop> = env
        .bridged
        .as_ref()
        .map(|b| b.path.clone())
        .unwrap_or_default();
    path.push(Hop {
        broker: me.clone(),
        mesh_id: env.mesh.row.id.clone(),
    });
    if path.len() >= MAX_HOPS {
        return;
    }
    for side in sides {
        if side.broker.is_some() {
            if let Some(fed) = &ctx.fed {
                fed.relay_to_broker(env, &side, &path);
            }
            continue;
        }
        if !side.relays
            || !meshd_protocol::tags::any_matches(&env.tags, &side.tags)
            || path
                .iter()
                .any(|h| h.broker == me && h.mesh_id == side.other)
        {
            continue;
        }
        let Some(other) = ctx.hub.loaded(&side.other) else {
            continue;
        };
        let relayed = Envelope {
            id: crate::ids::message_id(),
            mesh: other,
            sender_pubkey: env.sender_pubkey.clone(),
            author: env.author.clone(),
            target: Target::Spec(spec.clone()),
            target_spec: env.target_spec.clone(),
            priority: env.priority,
            body: delivery::Body::Sealed {
                nonce: nonce.clone(),
                ciphertext: ciphertext.clone(),
            },
            subtype: env.subtype.clone(),
            client_message_id: None,
            created_at: env.created_at,
            expires_at: env.expires_at,
            origin: Origin::Bridge,
            tags: env.tags.clone(),
            bridged: Some(Bridged {
                path: path.clone(),
                ..from_mesh(&env.mesh)
            }),
            topic: None,
        };
        match delivery::submit(ctx, relayed, now) {
            Ok(a) => {
                ctx.metrics
                    .bridge_relayed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                drop(a);
            }
            Err(e) => warn!(cause = %e, "a bridged mesh refused a relayed message"),
        }
    }
}

/// A mesh bridged to `mesh` with `--peers` in which `key` is a member or a live
/// presence hosted here: where a DM to `key` sent in `mesh` goes.
pub(crate) fn dm_target(ctx: &Ctx, mesh: &MeshHub, key: &str) -> Option<Arc<MeshHub>> {
    ctx.bridges
        .sides(&mesh.row.id)
        .into_iter()
        .filter(|s| s.peers && s.broker.is_none())
        .filter_map(|s| ctx.hub.loaded(&s.other))
        .find(|other| other.hosts_key(key))
}

/// The live peers of the meshes bridged to `mesh` with `--peers`, as `list_peers`
/// entries carrying `bridged` (visible ones, hosted here).
pub(crate) fn bridged_peers(ctx: &Ctx, mesh: &MeshHub) -> Vec<PeerEntry> {
    let mut out = Vec::new();
    for side in ctx
        .bridges
        .sides(&mesh.row.id)
        .into_iter()
        .filter(|s| s.peers && s.broker.is_none())
    {
        let Some(other) = ctx.hub.loaded(&side.other) else {
            continue;
        };
        let from = from_mesh(&other);
        out.extend(other.local_entries().into_iter().map(|mut e| {
            e.bridged = Some(from.clone());
            e
        }));
    }
    out
}

impl Db {
    /// Every stored bridge.
    pub async fn bridges(&self) -> Result<Vec<BridgeRow>, StoreError> {
        const SQL: &str = "SELECT id, mesh_a, mesh_b, broker_b, direction, tags, peers, created_at FROM bridge ORDER BY created_at, id";
        Ok(with_db!(self, p => sqlx::query_as(SQL).fetch_all(p).await)?)
    }

    /// Stores a bridge; `false` when the broker has [`MAX_BRIDGES`] already.
    pub async fn insert_bridge(&self, b: &BridgeRow) -> Result<bool, StoreError> {
        const COUNT: &str = "SELECT COUNT(*) FROM bridge";
        const SQL: &str = "INSERT INTO bridge (id, mesh_a, mesh_b, broker_b, direction, tags, peers, created_at) \
                           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
        let n: i64 = with_db!(self, p => sqlx::query_scalar(COUNT).fetch_one(p).await)?;
        if usize::try_from(n).unwrap_or(usize::MAX) >= MAX_BRIDGES {
            return Ok(false);
        }
        with_db_write!(self, p => sqlx::query(SQL).bind(&b.id).bind(&b.mesh_a).bind(&b.mesh_b).bind(&b.broker_b).bind(&b.direction).bind(&b.tags).bind(b.peers).bind(b.created_at).execute(p).await.map(drop))?;
        Ok(true)
    }

    /// Removes a bridge; whether it existed.
    pub async fn delete_bridge(&self, id: &str) -> Result<bool, StoreError> {
        const SQL: &str = "DELETE FROM bridge WHERE id = $1";
        let n = with_db_write!(self, p => sqlx::query(SQL).bind(id).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, a: &str, b: &str, d: Direction, tags: &str, peers: bool) -> BridgeRow {
        BridgeRow {
            id: id.into(),
            mesh_a: a.into(),
            mesh_b: b.into(),
            broker_b: None,
            direction: d.as_str().into(),
            tags: tags.into(),
            peers,
            created_at: 0,
        }
    }

    #[test]
    fn each_mesh_sees_its_side_of_each_bridge() {
        let b = Bridges::default();
        assert!(b.set(vec![
            row("1", "a", "b", Direction::AToB, "sales/ ops", true),
            row("2", "c", "a", Direction::Both, "x", false),
        ]));
        let a = b.sides("a");
        assert_eq!(a.len(), 2);
        assert!(a[0].relays && a[0].other == "b" && a[0].tags == ["sales/", "ops"] && a[0].peers);
        assert!(a[1].relays && a[1].other == "c" && !a[1].peers);
        let bs = b.sides("b");
        assert!(!bs[0].relays, "a-to-b does not relay from b");
        assert!(b.sides("nowhere").is_empty());
        let same = b.rows.lock().unwrap().clone();
        assert!(!b.set(same), "unchanged rows change nothing");
        assert!(b.set(vec![row("3", "a", "b", Direction::Both, "t", false)]));
        assert!(b.sides("c").is_empty());
    }

    #[test]
    fn directions_have_one_spelling() {
        for d in [Direction::AToB, Direction::BToA, Direction::Both] {
            assert_eq!(Direction::parse(d.as_str()), Some(d));
        }
        assert_eq!(Direction::parse("sideways"), None);
    }
}
