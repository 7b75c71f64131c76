//! The peer-to-peer file relay, as clients use it (`engine` keeps the asks).

pub mod engine;

use axum::extract::ws::Utf8Bytes;
use meshd_protocol::broker::BrokerFrame;
use meshd_protocol::client::ClientFrame;
use tracing::debug;

use crate::hub::{Outbound, offer};
use crate::session::*;

impl Session {
    /// The peer-to-peer file relay (see `relay`).
    pub(crate) fn on_relay(
        &mut self,
        frame: ClientFrame,
        req_id: Option<String>,
    ) -> Option<Utf8Bytes> {
        use crate::features::relay::engine::{Answer, Asker, Kind};
        use meshd_protocol::broker::{PeerDirRequestForward, PeerFileRequestForward};
        let me = self.routing_key().to_owned();
        let (kind, target_key, path, pattern) = match frame {
            ClientFrame::PeerFileRequest {
                target_pubkey,
                file_path,
            } => (Kind::File, target_pubkey, file_path, None),
            ClientFrame::PeerDirRequest {
                target_pubkey,
                dir_path,
                pattern,
            } => (Kind::Dir, target_pubkey, dir_path, pattern),
            ClientFrame::PeerFileResponse(r) => {
                let r = *r;
                let answer = Answer {
                    kind: Kind::File,
                    path: r.file_path,
                    content: r.content,
                    entries: None,
                    error: r.error,
                };
                self.relay_answer(&r.requester_pubkey, answer, req_id.as_deref());
                return None;
            }
            ClientFrame::PeerDirResponse(r) => {
                let r = *r;
                let answer = Answer {
                    kind: Kind::Dir,
                    path: r.dir_path,
                    content: None,
                    entries: r.entries,
                    error: r.error,
                };
                self.relay_answer(&r.requester_pubkey, answer, req_id.as_deref());
                return None;
            }
            _ => return None,
        };
        let target_key = target_key.to_ascii_lowercase();
        if let Some(target) = self.mesh.first_live(&target_key) {
            if let Err(e) = self.ctx.relay.ask(
                target.conn_id,
                kind,
                &me,
                &path,
                req_id.clone(),
                Asker::Local(self.shared.clone()),
            ) {
                return error("rate_limited", e.to_string(), req_id);
            }
            let fwd = match kind {
                Kind::File => BrokerFrame::PeerFileRequestForward(PeerFileRequestForward {
                    requester_pubkey: me,
                    file_path: path,
                    req_id,
                }),
                Kind::Dir => BrokerFrame::PeerDirRequestForward(PeerDirRequestForward {
                    requester_pubkey: me,
                    dir_path: path,
                    pattern,
                    req_id,
                }),
            };
            offer(&target, Outbound::Frame(fwd.to_json().into()));
            return None;
        }
        // A peer of another broker of this shared mesh: over the link.
        let remote = self.mesh.remote_broker_of(&target_key).and_then(|broker| {
            self.ctx
                .fed
                .clone()
                .filter(|f| f.will_forward(self.mesh_id(), &broker))
                .map(|f| (f, broker))
        });
        let Some((fed, broker)) = remote else {
            return error(
                "peer_not_found",
                format!("no connected peer of this mesh has the key {target_key}"),
                req_id,
            );
        };
        let relay_id = match self.ctx.relay.ask_remote(
            broker.clone(),
            kind,
            &path,
            req_id.clone(),
            &self.shared,
        ) {
            Ok(id) => id,
            Err(e) => return error("rate_limited", e.to_string(), req_id),
        };
        let ask = meshd_protocol::fed::RelayAsk {
            mesh_id: self.mesh_id().to_owned(),
            relay_id: relay_id.clone(),
            dir: kind == Kind::Dir,
            requester_key: me,
            requester_member_pubkey: self.member_pubkey.clone(),
            target_key,
            path,
            pattern,
            req_id: req_id.clone(),
        };
        if !fed.relay_send(
            &broker,
            self.mesh_id(),
            meshd_protocol::fed::Frame::RelayAsk(Box::new(ask)),
        ) {
            self.ctx.relay.answered_remote(&broker, &relay_id);
            return error(
                "peer_not_found",
                format!("the peer's broker {broker} cannot be reached now"),
                req_id,
            );
        }
        None
    }

    /// An asked peer's answer: relayed if this connection was asked (see `relay`).
    pub(crate) fn relay_answer(
        &self,
        requester_key: &str,
        answer: crate::features::relay::engine::Answer,
        req_id: Option<&str>,
    ) {
        match self.ctx.relay.answer(
            self.conn,
            answer.kind,
            &requester_key.to_ascii_lowercase(),
            &answer.path,
            req_id,
        ) {
            Some((asker, req_id)) => {
                crate::features::relay::engine::deliver(
                    &self.ctx,
                    self.mesh_id(),
                    asker,
                    answer,
                    req_id,
                );
            }
            None => {
                self.ctx.metrics.frames_dropped.inc("relay_unasked");
                debug!("a peer file/dir response to a request this connection was not asked");
            }
        }
    }
}

/// Telling the mesh's other brokers of a change made here.
impl crate::fed::Fed {
    /// A relay frame for one peer broker (when the mesh flows to it). `false` when it
    /// could not be queued.
    pub(crate) fn relay_send(
        &self,
        peer: &str,
        mesh_id: &str,
        frame: meshd_protocol::fed::Frame,
    ) -> bool {
        self.link(peer)
            .filter(|l| l.flows(mesh_id))
            .is_some_and(|l| l.live.try_send(frame).is_ok())
    }
}

/// Frames from peer brokers.
mod from_peers {
    use crate::fed::*;
    use meshd_protocol::fed::{Frame, RejectReason};

    /// Applies a peer broker's `RelayAsk` frame.
    pub(crate) async fn on_peer_relay_ask(
        fed: &std::sync::Arc<crate::fed::Fed>,
        ctx: &std::sync::Arc<crate::Ctx>,
        link: &std::sync::Arc<crate::fed::LinkShared>,
        r: Box<meshd_protocol::fed::RelayAsk>,
    ) -> Result<(), meshd_federation::LinkError> {
        let r = *r;
        let (mesh_id, relay_id) = (r.mesh_id.clone(), r.relay_id.clone());
        let refused = if !link.accepts(&r.mesh_id) {
            Err(RejectReason::NotShared)
        } else if r.path.len() > meshd_protocol::client::MAX_PATH_LEN
            || r.relay_id.len() > 64
            || r.req_id.as_ref().is_some_and(|q| q.len() > 256)
        {
            Err(RejectReason::Invalid)
        } else {
            match ctx.hub.mesh(&ctx.db, &r.mesh_id).await {
                Ok(Some(hub))
                    if hub.remote_presence_of(
                        &link.broker,
                        &r.requester_key,
                        &r.requester_member_pubkey,
                    ) =>
                {
                    Ok(crate::features::relay::engine::remote_asked(
                        ctx,
                        &link.broker,
                        &hub,
                        r,
                    ))
                }
                _ => Err(RejectReason::ForgedSender),
            }
        };
        match refused {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                fed.relay_send(
                    &link.broker,
                    &mesh_id,
                    Frame::RelayAnswer(Box::new(meshd_protocol::fed::RelayAnswer {
                        mesh_id: mesh_id.clone(),
                        relay_id,
                        content: None,
                        entries: None,
                        error: Some(error),
                    })),
                );
            }
            Err(reason) => {
                count_refused(ctx, link, reason, 1);
            }
        }
        Ok(())
    }

    /// Applies a peer broker's `RelayAnswer` frame.
    pub(crate) async fn on_peer_relay_answer(
        ctx: &std::sync::Arc<crate::Ctx>,
        link: &std::sync::Arc<crate::fed::LinkShared>,
        r: Box<meshd_protocol::fed::RelayAnswer>,
    ) -> Result<(), meshd_federation::LinkError> {
        if link.accepts(&r.mesh_id) {
            crate::features::relay::engine::remote_answered(ctx, &link.broker, *r);
        }
        Ok(())
    }
}
pub(crate) use from_peers::*;
