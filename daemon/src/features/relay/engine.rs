//! The peer-to-peer file relay (`peer_file_request` / `peer_dir_request` and their
//! responses): the broker passes requests to the asked peer and answers back to the
//! asker, never reading the content. In a shared mesh a request for a peer of another
//! broker goes over the link and its answer comes back the same way.
//!
//! Unlike the reference, which relayed any `*_response` to whichever key it named, an
//! answer is relayed only from the connection that was asked, to the one that asked (or
//! the broker that asked for it), for a request still open (so no peer can inject
//! content into someone else's request). Requests are forgotten after [`OPEN_FOR`] (the
//! clients give up at 15 s).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshd_protocol::broker::{
    BrokerFrame, PeerDirRequestForward, PeerDirResponseForward, PeerFileRequestForward,
    PeerFileResponseForward,
};
use tokio::time::Instant;

use crate::Ctx;
use crate::hub::{ConnId, Outbound, PeerShared, lock, offer};

/// How long an unanswered request stays open: as long as the clients wait, so a late
/// answer is not handed to a request the asker already gave up on.
const OPEN_FOR: Duration = Duration::from_secs(15);
/// Open requests one connection may have (a peer broker, relaying for many, 16×).
const MAX_OPEN_PER_ASKER: usize = 64;

/// File or directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    File,
    Dir,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    responder: ConnId,
    kind: Kind,
    requester_key: String,
    path: String,
}

/// Who asked: a connection here, or a peer broker relaying for one of its peers.
#[derive(Debug, Clone)]
pub(crate) enum Asker {
    Local(Arc<PeerShared>),
    Remote { broker: Arc<str>, relay_id: String },
}

impl Asker {
    fn is_conn(&self, conn: ConnId) -> bool {
        matches!(self, Self::Local(p) if p.conn_id == conn)
    }

    fn same(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Local(a), Self::Local(b)) => Arc::ptr_eq(a, b),
            (Self::Remote { broker: a, .. }, Self::Remote { broker: b, .. }) => a == b,
            _ => false,
        }
    }
}

#[derive(Debug)]
struct Open {
    asker: Asker,
    req_id: Option<String>,
    at: Instant,
}

/// A request this broker relayed to a peer broker, waiting for its answer.
#[derive(Debug)]
struct Outgoing {
    broker: Arc<str>,
    kind: Kind,
    path: String,
    asker: Arc<PeerShared>,
    req_id: Option<String>,
    at: Instant,
}

/// Why a request was not relayed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AskError {
    /// The asker has too many open requests.
    #[error("too many peer file requests in flight (at most {MAX_OPEN_PER_ASKER})")]
    TooMany,
}

/// Open requests.
#[derive(Debug, Default)]
pub(crate) struct Relay {
    open: Mutex<HashMap<Key, VecDeque<Open>>>,
    /// relay id → request relayed to a peer broker.
    outgoing: Mutex<HashMap<String, Outgoing>>,
}

impl Relay {
    /// Records a request to `responder` (before the forward is sent).
    pub(crate) fn ask(
        &self,
        responder: ConnId,
        kind: Kind,
        requester_key: &str,
        path: &str,
        req_id: Option<String>,
        asker: Asker,
    ) -> Result<(), AskError> {
        let now = crate::time::instant();
        let mut open = lock(&self.open);
        open.retain(|_, q| {
            q.retain(|o| now.duration_since(o.at) < OPEN_FOR);
            !q.is_empty()
        });
        let limit = match asker {
            Asker::Local(_) => MAX_OPEN_PER_ASKER,
            Asker::Remote { .. } => MAX_OPEN_PER_ASKER * 16,
        };
        let mine = open
            .values()
            .flatten()
            .filter(|o| o.asker.same(&asker))
            .count();
        if mine >= limit {
            return Err(AskError::TooMany);
        }
        open.entry(Key {
            responder,
            kind,
            requester_key: requester_key.to_owned(),
            path: path.to_owned(),
        })
        .or_default()
        .push_back(Open {
            asker,
            req_id,
            at: now,
        });
        Ok(())
    }

    /// An answer from `responder`: the asker and its correlation id, if `responder` was
    /// asked this (by `_reqId` when the answer carries one, else the oldest).
    pub(crate) fn answer(
        &self,
        responder: ConnId,
        kind: Kind,
        requester_key: &str,
        path: &str,
        req_id: Option<&str>,
    ) -> Option<(Asker, Option<String>)> {
        let key = Key {
            responder,
            kind,
            requester_key: requester_key.to_owned(),
            path: path.to_owned(),
        };
        let mut open = lock(&self.open);
        let q = open.get_mut(&key)?;
        let i = match req_id {
            Some(r) => q.iter().position(|o| o.req_id.as_deref() == Some(r))?,
            None => 0,
        };
        let o = q.remove(i)?;
        if q.is_empty() {
            open.remove(&key);
        }
        (crate::time::instant().duration_since(o.at) < OPEN_FOR).then_some((o.asker, o.req_id))
    }

    /// Records a request relayed to `broker` under a fresh relay id (returned).
    pub(crate) fn ask_remote(
        &self,
        broker: Arc<str>,
        kind: Kind,
        path: &str,
        req_id: Option<String>,
        asker: &Arc<PeerShared>,
    ) -> Result<String, AskError> {
        let now = crate::time::instant();
        let mut out = lock(&self.outgoing);
        out.retain(|_, o| now.duration_since(o.at) < OPEN_FOR);
        if out
            .values()
            .filter(|o| Arc::ptr_eq(&o.asker, asker))
            .count()
            >= MAX_OPEN_PER_ASKER
        {
            return Err(AskError::TooMany);
        }
        let id = crate::ids::random_id();
        out.insert(
            id.clone(),
            Outgoing {
                broker,
                kind,
                path: path.to_owned(),
                asker: asker.clone(),
                req_id,
                at: now,
            },
        );
        Ok(id)
    }

    /// A peer broker's answer to a relayed request: (asker, kind, path, its `_reqId`)
    /// when `broker` is the one that was asked under `relay_id`.
    pub(crate) fn answered_remote(
        &self,
        broker: &str,
        relay_id: &str,
    ) -> Option<(Arc<PeerShared>, Kind, String, Option<String>)> {
        let mut out = lock(&self.outgoing);
        if out.get(relay_id).is_none_or(|o| &*o.broker != broker) {
            return None;
        }
        let o = out.remove(relay_id)?;
        Some((o.asker, o.kind, o.path, o.req_id))
    }

    /// A connection closed: requests it was asked are returned (to fail them at once);
    /// requests it made are dropped.
    pub(crate) fn conn_gone(&self, conn: ConnId) -> Vec<(Kind, String, Asker, Option<String>)> {
        let mut failed = Vec::new();
        lock(&self.open).retain(|k, q| {
            if k.responder == conn {
                failed.extend(
                    q.drain(..)
                        .filter(|o| !o.asker.is_conn(conn))
                        .map(|o| (k.kind, k.path.clone(), o.asker, o.req_id)),
                );
                return false;
            }
            q.retain(|o| !o.asker.is_conn(conn));
            !q.is_empty()
        });
        lock(&self.outgoing).retain(|_, o| o.asker.conn_id != conn);
        failed
    }
}

/// An answer to hand to whoever asked.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) kind: Kind,
    pub(crate) path: String,
    pub(crate) content: Option<String>,
    pub(crate) entries: Option<Vec<String>>,
    pub(crate) error: Option<String>,
}

/// The `*_response_forward` frame for a local asker.
fn forward_frame(a: Answer, req_id: Option<String>) -> BrokerFrame {
    match a.kind {
        Kind::File => BrokerFrame::PeerFileResponseForward(PeerFileResponseForward {
            file_path: a.path,
            content: a.content,
            error: a.error,
            req_id,
        }),
        Kind::Dir => BrokerFrame::PeerDirResponseForward(PeerDirResponseForward {
            dir_path: a.path,
            entries: a.entries,
            error: a.error,
            req_id,
        }),
    }
}

/// Hands an answer to the asker: its connection here, or the peer broker that relayed
/// the request (which hands it to its own connection).
pub(crate) fn deliver(ctx: &Ctx, mesh_id: &str, asker: Asker, a: Answer, req_id: Option<String>) {
    match asker {
        Asker::Local(p) => {
            offer(
                &p,
                Outbound::Frame(forward_frame(a, req_id).to_json().into()),
            );
        }
        Asker::Remote { broker, relay_id } => {
            if let Some(fed) = &ctx.fed {
                fed.relay_send(
                    &broker,
                    mesh_id,
                    meshd_protocol::fed::Frame::RelayAnswer(Box::new(
                        meshd_protocol::fed::RelayAnswer {
                            mesh_id: mesh_id.to_owned(),
                            relay_id,
                            content: a.content,
                            entries: a.entries,
                            error: a.error,
                        },
                    )),
                );
            }
        }
    }
}

/// A peer broker's answer arrived: to the local asker, if that broker was asked.
pub(crate) fn remote_answered(ctx: &Ctx, broker: &str, r: meshd_protocol::fed::RelayAnswer) {
    if let Some((asker, kind, path, req_id)) = ctx.relay.answered_remote(broker, &r.relay_id) {
        let a = Answer {
            kind,
            path,
            content: r.content,
            entries: r.entries,
            error: r.error,
        };
        offer(
            &asker,
            Outbound::Frame(forward_frame(a, req_id).to_json().into()),
        );
    }
}

/// A peer broker asks a peer of ours: forwarded like a local request, answered back
/// over the link. Returns the error to send back when the request cannot be relayed.
pub(crate) fn remote_asked(
    ctx: &Ctx,
    broker: &Arc<str>,
    hub: &crate::hub::MeshHub,
    r: meshd_protocol::fed::RelayAsk,
) -> Result<(), String> {
    let target = hub
        .first_live(&r.target_key)
        .ok_or_else(|| "the asked peer is not connected".to_owned())?;
    let kind = if r.dir { Kind::Dir } else { Kind::File };
    ctx.relay
        .ask(
            target.conn_id,
            kind,
            &r.requester_key,
            &r.path,
            r.req_id.clone(),
            Asker::Remote {
                broker: broker.clone(),
                relay_id: r.relay_id,
            },
        )
        .map_err(|e| e.to_string())?;
    let fwd = match kind {
        Kind::File => BrokerFrame::PeerFileRequestForward(PeerFileRequestForward {
            requester_pubkey: r.requester_key,
            file_path: r.path,
            req_id: r.req_id,
        }),
        Kind::Dir => BrokerFrame::PeerDirRequestForward(PeerDirRequestForward {
            requester_pubkey: r.requester_key,
            dir_path: r.path,
            pattern: r.pattern,
            req_id: r.req_id,
        }),
    };
    offer(&target, Outbound::Frame(fwd.to_json().into()));
    Ok(())
}
