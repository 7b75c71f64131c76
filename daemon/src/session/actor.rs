//! The session's task: one `select!` loop over cancellation, replies, outbound
//! pushes, store drains, wake signals, inbound frames, pings and timers; then teardown.

use super::*;

/// Why a session ended (the `reason` label of `meshd_connections_closed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The broker closed it.
    Broker(Disconnect),
    /// The client closed it (or the socket ended).
    Client,
    /// Nothing arrived within `limits.idle_timeout`.
    IdleTimeout,
    /// A socket error.
    Error,
}

impl Ended {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Broker(Disconnect::Replaced) => "replaced",
            Self::Broker(Disconnect::Revoked) => "revoked",
            Self::Broker(Disconnect::SlowConsumer) => "slow_consumer",
            Self::Broker(Disconnect::Shutdown) => "shutdown",
            Self::Broker(Disconnect::Kicked { .. }) => "kicked",
            Self::Broker(Disconnect::Disconnected { .. }) => "disconnected",
            Self::Client => "client",
            Self::IdleTimeout => "idle_timeout",
            Self::Error => "error",
        }
    }
}

pub(crate) async fn wait_retired(retired: Option<&CancellationToken>, deadline: Instant) {
    if let Some(r) = retired {
        let _ = tokio::time::timeout_at(deadline, r.cancelled()).await;
    }
}

pub(crate) async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Session {
    pub(crate) async fn serve(mut self, mut socket: WebSocket) {
        let ping_every = self.ctx.config.limits.ping_interval;
        let idle_timeout = self.ctx.config.limits.idle_timeout;
        let mut ping = tokio::time::interval_at(crate::time::instant() + ping_every, ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let cancel = self.shared.cancel.clone();
        let writer_tx = self.ctx.writer.clone();
        let mut unflushed: Vec<Sent> = Vec::new();
        let retired = self.predecessor.as_ref().map(|p| p.retired.clone());
        let handover_deadline = crate::time::instant() + Duration::from_secs(10);
        let ended: Ended = loop {
            if self.drain_wanted && self.claim.is_none() && self.predecessor.is_none() {
                self.start_claim();
            }
            self.flush_writes();
            let reading = self.replies.len() < MAX_REPLIES && self.writes.len() < MAX_WRITES;
            tokio::select! {
                biased;
                () = cancel.cancelled() => break self.cancelled_reason(),
                Some(reply) = self.replies.next(), if !self.replies.is_empty() => {
                    if !self.write_replies(&mut socket, reply).await {
                        break self.failed_reason();
                    }
                }
                Some(out) = self.rx.recv() => {
                    if !self.write_outbound(&mut socket, out, &mut unflushed).await {
                        break self.failed_reason();
                    }
                }
                Some(result) = OptionFuture::from(self.claim.as_mut()), if self.claim.is_some() => {
                    self.claim = None;
                    match result {
                        Ok(Ok(claimed)) => {
                            if !self.deliver_claimed(&mut socket, claimed, &mut unflushed).await {
                                break self.failed_reason();
                            }
                        }
                        Ok(Err(e)) => {
                            // Retry soon: until a drain succeeds, newer messages for this
                            // connection wait in its backlog.
                            warn!(cause = %e, "drain failed; retrying in 1 s");
                            let at = crate::time::instant() + Duration::from_secs(1);
                            self.drain_timer = Some(self.drain_timer.map_or(at, |t| t.min(at)));
                        }
                        Err(_) => break Ended::Broker(Disconnect::Shutdown),
                    }
                }
                permit = writer_tx.reserve(), if !self.writes.is_empty() => {
                    match permit {
                        Ok(permit) => {
                            if let Some(op) = self.writes.pop_front() {
                                permit.send(op);
                            }
                            self.flush_writes();
                        }
                        Err(_) => break Ended::Broker(Disconnect::Shutdown),
                    }
                }
                () = self.shared.wake.notified() => {
                    self.drain_wanted = true;
                }
                // Draining starts once the replaced connection gave back its messages
                // (bounded, in case its teardown is stuck).
                () = wait_retired(retired.as_ref(), handover_deadline), if self.predecessor.is_some() => {
                    self.predecessor = None;
                }
                msg = socket.recv(), if reading => {
                    self.last_activity = crate::time::instant();
                    self.shared.last_active.store(now_ms(), Ordering::Relaxed);
                    match msg {
                        Some(Ok(Message::Text(t))) => {
                            self.ctx.metrics.frames_received.fetch_add(1, Ordering::Relaxed);
                            if let Some(text) = self.on_text(&t) {
                                if self.replies.is_empty() {
                                    if !self.write_replies(&mut socket, Some(text)).await {
                                        break self.failed_reason();
                                    }
                                } else {
                                    self.replies.push_back(Box::pin(async move { Some(text) }));
                                }
                            }
                        }
                        Some(Ok(Message::Binary(_))) => self.ctx.metrics.frames_dropped.inc("binary"),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Ok(Message::Close(_))) | None => break Ended::Client,
                        Some(Err(e)) => {
                            oversize_close(&self.ctx, &mut socket, &e).await;
                            break self.failed_reason();
                        }
                    }
                }
                _ = ping.tick() => {
                    if crate::time::since(self.last_activity) > idle_timeout {
                        break Ended::IdleTimeout;
                    }
                    let limit = self.ctx.config.limits.idle_timeout;
                    if !guarded(&self.io_guard, limit, socket.send(Message::Ping(Default::default()))).await {
                        break self.failed_reason();
                    }
                }
                () = sleep_until_opt(self.drain_timer), if self.drain_timer.is_some() => {
                    self.drain_timer = None;
                    self.drain_wanted = true;
                }
            }
        };
        self.ctx.metrics.connections_closed.inc(ended.as_str());
        let close_frame = match ended {
            Ended::Broker(Disconnect::Shutdown) => {
                // Flush what is already queued for this client before saying goodbye.
                self.flush_queued(&mut socket, &mut unflushed).await;
                Some(Disconnect::Shutdown.frame())
            }
            Ended::Broker(d) => Some(d.frame()),
            Ended::IdleTimeout => Some((1001, "idle timeout")),
            Ended::Client => {
                answer_close(&mut socket).await;
                None
            }
            Ended::Error => None,
        };
        if ended == Ended::Broker(Disconnect::Revoked) {
            let e = ErrorFrame::new("revoked", revoked_message(&self.mesh.row.name));
            let _ = send_text(&mut socket, &self.ctx, BrokerFrame::Error(e).to_json()).await;
        }
        if let Some((code, reason)) = close_frame {
            let _ = tokio::time::timeout(Duration::from_secs(2), close(&mut socket, code, reason))
                .await;
        }
        info!(reason = ended.as_str(), "session closed");
        // Boxed: inline, every live connection's task would keep room for the teardown.
        Box::pin(self.teardown()).await;
    }

    /// Why the connection was cancelled.
    pub(crate) fn cancelled_reason(&self) -> Ended {
        Ended::Broker(self.shared.close_reason().unwrap_or(Disconnect::Shutdown))
    }

    /// Why socket I/O failed: a cancellation that interrupted a write, or the socket.
    pub(crate) fn failed_reason(&self) -> Ended {
        if self.shared.cancel.is_cancelled() {
            self.cancelled_reason()
        } else {
            Ended::Error
        }
    }

    pub(crate) async fn teardown(mut self) {
        // Whatever this connection holds and did not deliver goes back to the store: rows
        // queued or backlogged for it, written but unacknowledged, or claimed by a claim
        // still in flight. One conn-scoped release covers them all (it runs after the
        // claims of its batch).
        self.rx.close();
        while self.rx.try_recv().is_ok() {}
        lock(&self.shared.route).close();
        self.queue_write(WriteOp::ReleaseConn {
            mesh_id: self.mesh_id().to_owned(),
            keys: [self.member_pubkey.clone(), self.routing_key().to_owned()],
            conn: lease_owner(self.conn),
        });
        // Save "welcome back" state and wait for it to commit before the presence goes,
        // so a quick reconnect restores it. (A reattached connection was already replaced
        // and has nothing to save.)
        let now = now_ms();
        let mesh_id = self.mesh.row.id.clone();
        if let Some(state) = self
            .mesh
            .with_peer(self.conn, |p| peer_state(&mesh_id, p, now))
        {
            self.mesh.save_state(state.to_row());
            self.queue_write(WriteOp::SavePeerState(Box::new(state)));
        }
        while let Some(op) = self.writes.pop_front() {
            if self.ctx.writer.send(op).await.is_err() {
                break;
            }
        }
        let _ = self.ctx.writer.flush().await;
        let peer = self.mesh.unregister(self.conn);
        for name in self.mcp_gone(now) {
            self.ctx
                .mcp
                .persist(crate::features::mcp::engine::StoreOp::Offline {
                    mesh_id: self.mesh_id().to_owned(),
                    name,
                    since: Some(now),
                });
        }
        if let (Some(p), Some(fed)) = (&peer, &self.ctx.fed) {
            fed.presence_gone(self.mesh_id(), p.routing_key());
            fed.bridge_presence(&self.ctx, &self.mesh, self.conn, Some(p.routing_key()));
        }
        if peer.is_some() {
            self.ctx.audit.record(
                self.mesh_id(),
                "peer_left",
                Some(self.member_id.clone()),
                &self.display_name,
                serde_json::json!({"pubkey": self.routing_key()}),
            );
        }
        if peer.is_some()
            && self.mesh.no_peers_anywhere()
            && self.ctx.clocks.mesh_emptied(self.mesh_id())
        {
            self.clock_changed();
        }
        if let Some(peer) = &peer
            && !self.ctx.sessions_cancel.is_cancelled()
            && peer.visible
        {
            let frame = delivery::system_push(self.mesh_id(), "peer_left", peer_data(peer), now);
            self.mesh.announce_about(
                &frame,
                self.conn,
                Some(&self.member_pubkey),
                &self.member_pubkey,
                peer.position.as_ref(),
            );
        }
        // Another session of the member (or the connection that replaced this one) takes
        // over what this one gave back; its next claim runs after the release.
        for sibling in self.mesh.siblings(&self.member_pubkey, self.conn) {
            sibling.spill();
        }
        self.shared.retired.cancel();
    }
}
