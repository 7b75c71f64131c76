//! Typing indicators and read receipts (meshd extension, `meshd_protocol::signals`):
//! relayed, never stored, only to connections that opted in with `signals` (so no
//! claudemesh client ever receives a frame type it does not know), and to peer brokers
//! whose hello lists the `signals` capability.
//!
//! Rate limits (per sending connection; what exceeds them is dropped and counted in
//! `meshd_frames_dropped_total{reason="signal_rate"}`): one `typing` per target every
//! [`TYPING_EVERY_MS`] (a client sends one per keystroke burst; the page shows the
//! indicator for a few seconds), and receipts at [`READS_PER_S`] per second with a burst
//! of [`READ_BURST`].

use std::collections::VecDeque;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use meshd_protocol::fed::{Frame, RejectReason};
use meshd_protocol::signals::{Push, Request, SignalRelay};

use crate::Ctx;
use crate::fed::LinkShared;
use crate::hub::{MeshHub, Outbound, offer};
use crate::session::*;

/// Shortest interval between two `typing` frames to one target (ms).
pub const TYPING_EVERY_MS: i64 = 2_000;
/// Receipts per second, sustained.
pub const READS_PER_S: f64 = 20.0;
/// Receipts in a burst.
pub const READ_BURST: f64 = 40.0;
/// Typing targets remembered per connection (the oldest is forgotten first).
const TYPING_TARGETS: usize = 16;

/// A connection's sending budget (allocated when it opts in).
#[derive(Debug)]
pub(crate) struct Limiter {
    /// The connection opted in (sending alone allocates the budget, not the opt-in).
    receives: bool,
    typing: VecDeque<(String, i64)>,
    read_tokens: f64,
    read_at: i64,
}

impl Limiter {
    fn new(now: i64) -> Self {
        Self {
            receives: false,
            typing: VecDeque::new(),
            read_tokens: READ_BURST,
            read_at: now,
        }
    }

    /// Whether a `typing` to `to` may go now (and records it).
    fn typing(&mut self, to: &str, now: i64) -> bool {
        if let Some(i) = self.typing.iter().position(|(t, _)| t == to) {
            if now - self.typing[i].1 < TYPING_EVERY_MS {
                return false;
            }
            self.typing.remove(i);
        }
        if self.typing.len() >= TYPING_TARGETS {
            self.typing.pop_front();
        }
        self.typing.push_back((to.to_owned(), now));
        true
    }

    /// Whether a receipt may go now (token bucket).
    fn read(&mut self, now: i64) -> bool {
        #[allow(clippy::cast_precision_loss)]
        let elapsed = (now - self.read_at).max(0) as f64 / 1000.0;
        self.read_at = now;
        self.read_tokens = (self.read_tokens + elapsed * READS_PER_S).min(READ_BURST);
        if self.read_tokens >= 1.0 {
            self.read_tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Session {
    /// `signals`, `typing`, `read`: never answered (fire-and-forget frames).
    pub(crate) fn on_signal(&mut self, request: Request, now: i64) -> Option<Utf8Bytes> {
        let (to, read) = match request {
            Request::OptIn => {
                self.mesh.with_peer(self.conn, |p| {
                    p.signals
                        .get_or_insert_with(|| Box::new(Limiter::new(now)))
                        .receives = true;
                });
                return None;
            }
            Request::Typing { to } => (to, None),
            Request::Read { to, message_ids } => (to, Some(message_ids)),
        };
        // Sending needs no opt-in, but the budget lives with it.
        let allowed = self
            .mesh
            .with_peer(self.conn, |p| {
                let l = p.signals.get_or_insert_with(|| Box::new(Limiter::new(now)));
                if read.is_some() {
                    l.read(now)
                } else {
                    l.typing(&to, now)
                }
            })
            .unwrap_or(false);
        if !allowed {
            self.ctx.metrics.frames_dropped.inc("signal_rate");
            return None;
        }
        let relay = SignalRelay {
            mesh_id: self.mesh_id().to_owned(),
            from_key: self.routing_key().to_owned(),
            from_member_pubkey: self.member_pubkey.clone(),
            from_name: self.display_name.clone(),
            to_key: to,
            read,
            at: now,
        };
        if deliver(&self.mesh, &relay) > 0 {
            return None;
        }
        if let (Some(fed), Some(broker)) =
            (&self.ctx.fed, self.mesh.remote_broker_of(&relay.to_key))
        {
            fed.signal_send(
                &broker,
                &relay.mesh_id.clone(),
                Frame::Signal(Box::new(relay)),
            );
        }
        None
    }
}

/// Queues the signal for the recipient's opted-in connections here; how many.
fn deliver(mesh: &MeshHub, s: &SignalRelay) -> usize {
    let push = match &s.read {
        None => Push::Typing {
            from: s.from_key.clone(),
            from_member: s.from_member_pubkey.clone(),
            from_name: s.from_name.clone(),
            at: s.at,
        },
        Some(ids) => Push::Read {
            from: s.from_key.clone(),
            from_member: s.from_member_pubkey.clone(),
            from_name: s.from_name.clone(),
            message_ids: ids.clone(),
            at: s.at,
        },
    };
    let frame: Utf8Bytes = serde_json::to_string(&push).unwrap_or_default().into();
    mesh.local_peers(|p| {
        (p.signals.as_ref().is_some_and(|l| l.receives) && p.routing_key() == s.to_key)
            .then(|| p.shared.clone())
    })
    .into_iter()
    .flatten()
    .filter(|shared| offer(shared, Outbound::Frame(frame.clone())))
    .count()
}

impl crate::fed::Fed {
    /// Sends a signal to `broker` if it understands signals and the mesh flows there;
    /// a full live queue drops it (a typing indicator or receipt is not worth waiting
    /// for).
    pub(crate) fn signal_send(&self, broker: &str, mesh_id: &str, frame: Frame) -> bool {
        self.link(broker)
            .filter(|l| l.signals && l.flows(mesh_id))
            .is_some_and(|l| l.live.try_send(frame).is_ok())
    }
}

/// Applies a peer broker's signal: the sender must be a presence that broker hosts.
pub(crate) async fn on_peer_signal(ctx: &Arc<Ctx>, link: &Arc<LinkShared>, s: SignalRelay) {
    let refused = if !link.accepts(&s.mesh_id) {
        Some(RejectReason::NotShared)
    } else if !s.valid() {
        Some(RejectReason::Invalid)
    } else {
        match ctx.hub.mesh(&ctx.db, &s.mesh_id).await {
            Ok(Some(hub))
                if hub.remote_presence_of(&link.broker, &s.from_key, &s.from_member_pubkey) =>
            {
                deliver(&hub, &s);
                None
            }
            _ => Some(RejectReason::ForgedSender),
        }
    };
    if let Some(reason) = refused {
        tracing::debug!(broker = %link.broker, ?reason, "signal refused");
        ctx.metrics.frames_dropped.inc("signal_refused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typing_is_limited_per_target_and_receipts_by_a_bucket() {
        let mut l = Limiter::new(0);
        assert!(l.typing("a", 0));
        assert!(!l.typing("a", 1_999));
        assert!(l.typing("b", 10));
        assert!(l.typing("a", 2_000));
        let sent = (0..100).filter(|_| l.read(5_000)).count();
        assert_eq!(sent, READ_BURST as usize);
        // Half a second later, ten more.
        let sent = (0..100).filter(|_| l.read(5_500)).count();
        assert_eq!(sent, 10);
        // The typing memory stays bounded.
        for i in 0..100 {
            l.typing(&format!("t{i}"), 10_000);
        }
        assert_eq!(l.typing.len(), TYPING_TARGETS);
    }
}
