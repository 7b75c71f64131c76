//! The mesh's simulation clock, as clients drive it (the clocks are in `engine`).

pub mod engine;

use axum::extract::ws::Utf8Bytes;
use meshd_protocol::broker::{BrokerFrame, ErrorFrame};
use meshd_protocol::client::ClientFrame;

use crate::session::*;

impl Session {
    /// The mesh's simulation clock.
    pub(crate) fn on_clock(
        &mut self,
        frame: ClientFrame,
        req_id: Option<String>,
    ) -> Option<Utf8Bytes> {
        match frame {
            ClientFrame::SetClock { speed } => {
                let status = self.ctx.clocks.set(&self.mesh, speed, req_id);
                self.clock_changed();
                Some(BrokerFrame::ClockStatus(status).to_json().into())
            }
            ClientFrame::PauseClock | ClientFrame::ResumeClock => {
                let status = if matches!(frame, ClientFrame::PauseClock) {
                    self.ctx.clocks.pause(self.mesh_id(), req_id.clone())
                } else {
                    self.ctx.clocks.resume(&self.mesh, req_id.clone())
                };
                if status.is_some() {
                    self.clock_changed();
                }
                Some(
                    status
                        .map_or_else(
                            || {
                                BrokerFrame::Error(
                                    ErrorFrame::new(
                                        "no_clock",
                                        "this mesh has no clock: set_clock first",
                                    )
                                    .with_req_id(req_id),
                                )
                            },
                            BrokerFrame::ClockStatus,
                        )
                        .to_json()
                        .into(),
                )
            }
            ClientFrame::GetClock => Some(
                BrokerFrame::ClockStatus(self.ctx.clocks.get(self.mesh_id(), req_id))
                    .to_json()
                    .into(),
            ),
            _ => None,
        }
    }

    /// The mesh's clock changed here: its other brokers hear of it.
    pub(crate) fn clock_changed(&self) {
        if let (Some(fed), Some(set)) = (&self.ctx.fed, self.ctx.clocks.set_of(self.mesh_id())) {
            fed.clock_changed(set);
        }
    }
}

/// Catch-up: this mesh's clock, if it has one.
pub(crate) async fn catch_up(c: &crate::fed::CatchUp<'_>) -> bool {
    match c.ctx.clocks.set_of(c.mesh_id()) {
        Some(set) => {
            c.send(meshd_protocol::fed::Frame::Clock(Box::new(set)))
                .await
        }
        None => true,
    }
}

/// Telling the mesh's other brokers of a change made here.
impl crate::fed::Fed {
    /// The mesh's clock changed here.
    pub(crate) fn clock_changed(&self, c: meshd_protocol::fed::ClockSet) {
        let mesh_id = c.mesh_id.clone();
        self.to_every_link(&mesh_id, meshd_protocol::fed::Frame::Clock(Box::new(c)));
    }
}

/// Frames from peer brokers.
mod from_peers {
    use crate::fed::*;
    use meshd_protocol::fed::RejectReason;

    /// Applies a peer broker's `Clock` frame.
    pub(crate) async fn on_peer_clock(
        ctx: &std::sync::Arc<crate::Ctx>,
        link: &std::sync::Arc<crate::fed::LinkShared>,
        c: Box<meshd_protocol::fed::ClockSet>,
    ) -> Result<(), meshd_federation::LinkError> {
        // A broker speaks for its own changes (every pair of brokers of a
        // mesh is linked, so each change comes from its maker).
        let hub = if link.accepts(&c.mesh_id) && c.broker == *link.broker {
            ctx.hub.mesh(&ctx.db, &c.mesh_id).await.ok().flatten()
        } else {
            None
        };
        match hub {
            Some(hub) if ctx.clocks.apply_remote(&hub, *c) => {}
            _ => {
                count_refused(ctx, link, RejectReason::NotShared, 1);
            }
        }
        Ok(())
    }
}
pub(crate) use from_peers::*;
