//! Streams: the registry (`create_stream`, `list_streams`) and live data
//! (`publish`, `subscribe`, `unsubscribe`).

pub mod store;

use axum::extract::ws::Utf8Bytes;
use meshd_protocol::broker::{BrokerFrame, ErrorFrame};
use meshd_protocol::client::ClientFrame;
use meshd_protocol::time::iso8601_ms;
use tracing::warn;

use crate::session::*;

/// Streams one connection may follow.
pub(crate) const MAX_STREAMS_PER_CONN: usize = 256;

impl Session {
    /// Stream data: `publish`, `subscribe`, `unsubscribe` (live only, never stored).
    pub(crate) fn on_stream_data(
        &mut self,
        frame: ClientFrame,
        req_id: Option<String>,
    ) -> Option<Utf8Bytes> {
        match frame {
            ClientFrame::Publish { stream, data } => {
                if let Some(fed) = &self.ctx.fed {
                    fed.stream_data(meshd_protocol::fed::StreamPublish {
                        mesh_id: self.mesh_id().to_owned(),
                        stream: stream.clone(),
                        data: data.get().to_owned(),
                        published_by: self.display_name.clone(),
                        member_pubkey: self.member_pubkey.clone(),
                    });
                }
                let frame = BrokerFrame::StreamData(meshd_protocol::broker::StreamData {
                    stream: stream.clone(),
                    data,
                    published_by: self.display_name.clone(),
                });
                self.mesh
                    .publish(&stream, self.conn, &Utf8Bytes::from(frame.to_json()));
                None
            }
            ClientFrame::Subscribe { stream } => {
                if self
                    .mesh
                    .subscribe(self.conn, &stream, MAX_STREAMS_PER_CONN)
                {
                    Some(
                        BrokerFrame::Subscribed(meshd_protocol::broker::Subscribed {
                            stream,
                            req_id,
                        })
                        .to_json()
                        .into(),
                    )
                } else {
                    // The client does not wait for an answer: refuse by logging only.
                    warn!(stream = %stream, "subscription refused: too many streams");
                    self.ctx.metrics.frames_dropped.inc("invalid");
                    None
                }
            }
            ClientFrame::Unsubscribe { stream } => {
                self.mesh.unsubscribe(self.conn, &stream);
                None
            }
            _ => None,
        }
    }

    /// The stream registry.
    pub(crate) fn queue_stream(&mut self, frame: ClientFrame, req_id: Option<String>, now: i64) {
        use meshd_protocol::broker::{StreamCreated, StreamEntry, StreamList};
        let db = self.ctx.db.clone();
        let ctx = self.ctx.clone();
        let member_id = self.member_id.clone();
        let mesh = self.mesh.clone();
        let created_by = self.display_name.clone();
        self.reply_later(async move {
            let failed =
                |req_id, e: &dyn std::fmt::Display| store_unavailable("stream registry", req_id, e);
            let reply = match frame {
                ClientFrame::CreateStream { name } => {
                    let row = crate::features::streams::store::StreamRow {
                        id: crate::ids::random_id(),
                        mesh_id: mesh.row.id.clone(),
                        name,
                        created_by,
                        created_at: now,
                    };
                    if let Err(e) = crate::quota::check(
                        &ctx,
                        crate::quota::Kind::Streams,
                        &row.mesh_id,
                        &member_id,
                        crate::quota::Usage::new(1, 0),
                    ) {
                        return Some(
                            BrokerFrame::Error(
                                ErrorFrame::new(crate::quota::QuotaExceeded::CODE, e.to_string())
                                    .with_req_id(req_id),
                            )
                            .to_json()
                            .into(),
                        );
                    }
                    match db.create_stream(&row, &member_id).await {
                        Ok(Some(s)) => BrokerFrame::StreamCreated(StreamCreated {
                            id: s.id,
                            name: s.name,
                            req_id,
                        }),
                        Ok(None) => BrokerFrame::Error(
                            ErrorFrame::new("streams_full", "this mesh has too many streams")
                                .with_req_id(req_id),
                        ),
                        Err(e) => return failed(req_id, &e),
                    }
                }
                ClientFrame::ListStreams => match db.streams(&mesh.row.id).await {
                    Ok(rows) => BrokerFrame::StreamList(StreamList {
                        streams: rows
                            .into_iter()
                            .map(|s| StreamEntry {
                                subscriber_count: mesh.subscribers(&s.name),
                                id: s.id,
                                name: s.name,
                                created_by: s.created_by,
                                created_at: iso8601_ms(s.created_at),
                            })
                            .collect(),
                        req_id,
                    }),
                    Err(e) => return failed(req_id, &e),
                },
                _ => return None,
            };
            Some(reply.to_json().into())
        });
    }
}

/// Telling the mesh's other brokers of a change made here.
impl crate::fed::Fed {
    /// Data published to a stream here goes to the mesh's other brokers (their
    /// subscribers receive it).
    pub(crate) fn stream_data(&self, p: meshd_protocol::fed::StreamPublish) {
        let mesh_id = p.mesh_id.clone();
        self.to_every_link(
            &mesh_id,
            meshd_protocol::fed::Frame::StreamData(Box::new(p)),
        );
    }
}

/// Frames from peer brokers.
mod from_peers {
    use super::*;
    use crate::fed::*;
    use meshd_protocol::fed::RejectReason;

    /// Applies a peer broker's `StreamData` frame.
    pub(crate) async fn on_peer_stream_data(
        ctx: &std::sync::Arc<crate::Ctx>,
        link: &std::sync::Arc<crate::fed::LinkShared>,
        p: Box<meshd_protocol::fed::StreamPublish>,
    ) -> Result<(), meshd_federation::LinkError> {
        let refused = if !link.accepts(&p.mesh_id) {
            Some(RejectReason::NotShared)
        } else if p.stream.is_empty()
            || p.stream.len() > meshd_protocol::client::MAX_NAME_LEN
            || p.published_by.len() > meshd_protocol::client::MAX_NAME_LEN
            || p.data.len() > ctx.config.limits.max_message_bytes
            || serde_json::from_str::<&serde_json::value::RawValue>(&p.data).is_err()
        {
            Some(RejectReason::Invalid)
        } else {
            match ctx.hub.mesh(&ctx.db, &p.mesh_id).await {
                Ok(Some(hub)) if hub.may_speak_for(&link.broker, &p.member_pubkey) => {
                    let frame = BrokerFrame::StreamData(meshd_protocol::broker::StreamData {
                        stream: p.stream.clone(),
                        data: crate::hub::raw(&p.data),
                        published_by: p.published_by,
                    });
                    hub.publish(&p.stream, 0, &Utf8Bytes::from(frame.to_json()));
                    None
                }
                Ok(Some(_)) => Some(RejectReason::ForgedSender),
                _ => Some(RejectReason::NotShared),
            }
        };
        if let Some(reason) = refused {
            count_refused(ctx, link, reason, 1);
        }
        Ok(())
    }
}
pub(crate) use from_peers::*;
