//! Writing to the socket in batches: replies in request order, pushes as they come,
//! one flush per batch; then what was written is marked delivered or leased.

use super::*;

/// Outbound frames written between flushes.
pub(crate) const WRITE_BATCH: usize = 64;

impl Session {
    /// Hands queued store operations to the writer while it has room, without waiting.
    pub(crate) fn flush_writes(&mut self) {
        while !self.writes.is_empty() {
            match self.ctx.writer.try_reserve() {
                Some(permit) => {
                    if let Some(op) = self.writes.pop_front() {
                        permit.send(op);
                    }
                }
                None => break,
            }
        }
        // A burst of writes must not leave its buffer behind on an idle connection.
        if self.writes.is_empty() && self.writes.capacity() > 4 {
            self.writes = std::collections::VecDeque::new();
        }
    }

    /// Writes a reply and every other reply already available (in order), then flushes.
    /// A reply over the reply budget is cut down to fit (see `meshd_protocol::fit`).
    pub(crate) async fn write_replies(
        &mut self,
        socket: &mut WebSocket,
        first: Option<Utf8Bytes>,
    ) -> bool {
        use futures_util::FutureExt as _;
        let (guard, limit) = (self.io_guard.clone(), self.ctx.config.limits.idle_timeout);
        let budget = self.ctx.config.limits.max_frame_bytes;
        let mut next = Some(first);
        let mut n = 0;
        while let Some(reply) = next.take() {
            if let Some(mut text) = reply {
                if let Some(fitted) = meshd_protocol::fit::fit_reply(&text, budget) {
                    self.ctx.metrics.frames_dropped.inc("reply_trimmed");
                    text = fitted.into();
                }
                if !guarded(&guard, limit, socket.feed(Message::Text(text))).await {
                    return false;
                }
                n += 1;
            }
            if n < WRITE_BATCH {
                next = self.replies.next().now_or_never().flatten();
            }
        }
        self.ctx
            .metrics
            .frames_sent
            .fetch_add(n as u64, Ordering::Relaxed);
        guarded(&guard, limit, socket.flush()).await
    }

    /// Writes an outbound item and whatever else is queued (up to a batch), then flushes
    /// once and records the stored messages as delivered (or leased).
    pub(crate) async fn write_outbound(
        &mut self,
        socket: &mut WebSocket,
        first: Outbound,
        unflushed: &mut Vec<Sent>,
    ) -> bool {
        let (guard, limit) = (self.io_guard.clone(), self.ctx.config.limits.idle_timeout);
        let mut next = Some(first);
        let mut n = 0;
        while let Some(out) = next.take() {
            self.shared.dequeued(out.len());
            let (text, sent) = match out {
                Outbound::Frame(t) => (t, None),
                Outbound::Stored { frame, sent } => (frame, Some(sent)),
            };
            if !guarded(&guard, limit, socket.feed(Message::Text(text))).await {
                return false;
            }
            // Only a frame the sink took counts: a cancelled feed sent nothing.
            unflushed.extend(sent);
            n += 1;
            if n < WRITE_BATCH {
                next = self.rx.try_recv().ok();
            }
        }
        self.ctx
            .metrics
            .frames_sent
            .fetch_add(n as u64, Ordering::Relaxed);
        if !guarded(&guard, limit, socket.flush()).await {
            return false;
        }
        self.written(std::mem::take(unflushed));
        true
    }

    /// After stored messages reached the socket: a client that acknowledges keeps them
    /// leased until `client_ack` (offered again when the lease ends); for any other
    /// client they are delivered.
    pub(crate) fn written(&mut self, sent: Vec<Sent>) {
        if sent.is_empty() {
            return;
        }
        if self.shared.acks.load(Ordering::SeqCst) {
            let lease = self.ctx.config.limits.ack_lease;
            // Rows claimed before the client announced acknowledgements hold an
            // open-ended lease: bound it now.
            let open: Vec<String> = sent
                .iter()
                .filter(|s| !s.finite_lease)
                .map(|s| s.id.clone())
                .collect();
            if !open.is_empty() {
                let until = self.lease_until(true, now_ms());
                self.queue_write(WriteOp::Lease { ids: open, until });
            }
            let at = crate::time::instant() + lease;
            self.drain_timer = Some(self.drain_timer.map_or(at, |t| t.min(at)));
        } else {
            self.queue_write(WriteOp::MarkDelivered {
                ids: sent.into_iter().map(|s| s.id).collect(),
                at: now_ms(),
            });
        }
    }

    /// At shutdown: write what is queued for this client, within a short budget.
    pub(crate) async fn flush_queued(&mut self, socket: &mut WebSocket, unflushed: &mut Vec<Sent>) {
        // The connection's token is already cancelled; the 2 s budget bounds this instead.
        self.io_guard = CancellationToken::new();
        let budget = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(out) = self.rx.try_recv() {
                if !self.write_outbound(socket, out, unflushed).await {
                    break;
                }
            }
        });
        let _ = budget.await;
    }
}
