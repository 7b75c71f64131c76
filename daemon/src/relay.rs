//! The peer-to-peer file relay (`peer_file_request` / `peer_dir_request` and their
//! responses): the broker passes requests to the asked peer and answers back to the
//! asker, never reading the content.
//!
//! Unlike the reference, which relayed any `*_response` to whichever key it named, an
//! answer is relayed only from the connection that was asked, to the connection that
//! asked, for a request still open (so no peer can inject content into someone else's
//! request). Requests are forgotten after [`OPEN_FOR`] (the clients give up at 15 s).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::hub::{ConnId, PeerShared, lock};

/// How long an unanswered request stays open.
const OPEN_FOR: Duration = Duration::from_secs(60);
/// Open requests one connection may have.
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

#[derive(Debug)]
struct Open {
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
        asker: &Arc<PeerShared>,
    ) -> Result<(), AskError> {
        let now = Instant::now();
        let mut open = lock(&self.open);
        open.retain(|_, q| {
            q.retain(|o| now.duration_since(o.at) < OPEN_FOR);
            !q.is_empty()
        });
        let mine: usize = open
            .values()
            .flatten()
            .filter(|o| Arc::ptr_eq(&o.asker, asker))
            .count();
        if mine >= MAX_OPEN_PER_ASKER {
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
            asker: asker.clone(),
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
    ) -> Option<(Arc<PeerShared>, Option<String>)> {
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
        (Instant::now().duration_since(o.at) < OPEN_FOR).then_some((o.asker, o.req_id))
    }

    /// A connection closed: requests it was asked are returned (to fail them at once);
    /// requests it made are dropped.
    pub(crate) fn conn_gone(
        &self,
        conn: ConnId,
    ) -> Vec<(Kind, String, Arc<PeerShared>, Option<String>)> {
        let mut open = lock(&self.open);
        let mut failed = Vec::new();
        open.retain(|k, q| {
            if k.responder == conn {
                failed.extend(
                    q.drain(..)
                        .filter(|o| o.asker.conn_id != conn)
                        .map(|o| (k.kind, k.path.clone(), o.asker, o.req_id)),
                );
                return false;
            }
            q.retain(|o| o.asker.conn_id != conn);
            !q.is_empty()
        });
        failed
    }
}
