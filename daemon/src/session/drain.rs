//! Draining the store: claims of undelivered messages for this connection, leased
//! until written (or acknowledged), and the hand-over back to the hot path.

use super::*;

/// Rows fetched per drain round.
pub(crate) const CLAIM_LIMIT: i64 = 256;

impl Session {
    /// When a row pushed now is offered again (see [`delivery::lease_until`]).
    pub(crate) fn lease_until(&self, acks: bool, now: i64) -> i64 {
        delivery::lease_until(self.ctx.config.limits.ack_lease, acks, now)
    }

    pub(crate) fn start_claim(&mut self) {
        self.drain_wanted = false;
        let Some(max) = self
            .mesh
            .with_peer(self.conn, |p| p.status.status.max_admitted())
        else {
            return;
        };
        let now = now_ms();
        let lease_until = self.lease_until(self.shared.acks.load(Ordering::SeqCst), now);
        self.claim_leased = lease_until != i64::MAX;
        let (tx, rx) = oneshot::channel();
        self.queue_write(Op::Claim {
            peer: self.shared.clone(),
            spec: Box::new(ClaimSpec {
                stamp: 0,
                mesh_id: self.mesh_id().to_owned(),
                member_key: self.member_pubkey.clone(),
                session_key: self.routing_key().to_owned(),
                max_priority: max.rank(),
                conn: lease_owner(self.conn),
                lease_until,
                now,
                limit: CLAIM_LIMIT,
            }),
            reply: tx,
        });
        self.claim = Some(rx);
        debug!(max_priority = max.as_str(), lease_until, "drain: claiming");
    }

    pub(crate) async fn deliver_claimed(
        &mut self,
        socket: &mut WebSocket,
        claimed: Claimed,
        unflushed: &mut Vec<Sent>,
    ) -> bool {
        let full = claimed.rows.len() as i64 >= CLAIM_LIMIT;
        let stamp = claimed.stamp;
        let (guard, limit) = (self.io_guard.clone(), self.ctx.config.limits.idle_timeout);
        debug!(rows = claimed.rows.len(), next_lease = ?claimed.next_lease_expiry, "drain: claimed");
        // The claim used the status of when it started; the peer may have become busy
        // since. What it no longer admits goes back (it is drained again on idle).
        let max = self
            .mesh
            .with_peer(self.conn, |p| p.status.status.max_admitted().rank())
            .unwrap_or(Priority::Now.rank());
        let (rows, not_now): (Vec<_>, Vec<_>) =
            claimed.rows.into_iter().partition(|r| r.priority <= max);
        self.ctx
            .metrics
            .direct_drained
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        if !not_now.is_empty() {
            self.queue_write(WriteOp::Release {
                conn: lease_owner(self.conn),
                ids: not_now.into_iter().map(|r| r.id).collect(),
            });
        }
        for row in rows {
            let id = row.id.clone();
            let msg = Message::Text(delivery::stored_push(self.mesh_id(), row));
            if !guarded(&guard, limit, socket.feed(msg)).await {
                return false;
            }
            unflushed.push(Sent {
                id,
                finite_lease: self.claim_leased,
            });
            self.ctx.metrics.frames_sent.fetch_add(1, Ordering::Relaxed);
        }
        if !guarded(&guard, limit, socket.flush()).await {
            return false;
        }
        self.written(std::mem::take(unflushed));
        if let Some(at) = claimed.next_lease_expiry {
            let wait =
                Duration::from_millis(u64::try_from(at.saturating_sub(now_ms())).unwrap_or(0));
            let at = crate::time::instant() + wait;
            self.drain_timer = Some(self.drain_timer.map_or(at, |t| t.min(at)));
        }
        if full {
            self.drain_wanted = true;
        } else {
            // Nothing more was waiting when the claim passed the router: ask it to put
            // this connection back on the hot path (it refuses, and a spill wakes us,
            // if anything spilled since).
            self.queue_write(Op::CaughtUp {
                peer: self.shared.clone(),
                stamp,
            });
        }
        true
    }
}
