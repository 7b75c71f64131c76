//! The link supervisor: serving a link (its streams and tasks), reconciling what
//! flows over each link with consent, resetting links that never serve, and the
//! control stream.

use super::*;

/// Why this broker tore a link down (both sides then dial again): the `reason` label of
/// `meshd_federation_link_resets_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reset {
    /// The peer broker stopped reading its control stream.
    ControlFull,
    /// The peer broker stopped reading member announcements.
    MembersFull,
    /// The peer broker claimed more meshes than any broker shares.
    PeerReadyFull,
    /// The peer broker stopped reading presence updates.
    PresenceFull,
    /// The link came up but its handler never registered it.
    Unregistered,
}

impl Reset {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::ControlFull => "control_full",
            Self::MembersFull => "members_full",
            Self::PeerReadyFull => "peer_ready_full",
            Self::PresenceFull => "presence_full",
            Self::Unregistered => "unregistered",
        }
    }
}

/// Whether a message of a mesh goes (or waits to go) over a link of this `age`: the
/// mesh flows, or the peer broker said it is ready (`broker_ready`) and the link is within
/// [`FLOW_SETTLE`] of its start (our side's claim is still being made).
pub(crate) fn may_send(flows: bool, broker_ready: bool, age: Duration) -> bool {
    flows || (broker_ready && age < FLOW_SETTLE)
}

pub(crate) async fn control_writer(
    mut tx: FrameWriter,
    mut rx: mpsc::Receiver<Frame>,
) -> Result<(), LinkError> {
    while let Some(f) = rx.recv().await {
        tx.send(&f).await?;
    }
    Ok(())
}

impl Fed {
    pub(crate) async fn reconcile_loop(self: Arc<Self>, ctx: Arc<Ctx>) {
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            n += 1;
            match self.reload_consent(&ctx).await {
                Ok(true) => {
                    self.apply_pending_offers(&ctx).await;
                    let links: Vec<Arc<LinkShared>> = lock(&self.links).values().cloned().collect();
                    for l in links {
                        self.reconcile_link(&ctx, &l).await;
                    }
                }
                // An accepted offer whose replica could not be made (a store or disk
                // error) is tried again every few seconds, not only when consent changes.
                Ok(false) if n.is_multiple_of(ADOPT_RETRY_TICKS) => {
                    self.apply_pending_offers(&ctx).await;
                }
                Ok(false) => {}
                Err(e) => warn!(cause = %e, "reloading federation consent"),
            }
            if let Err(e) = self.reload_policies(&ctx).await {
                warn!(cause = %e, "reloading link policies");
            }
            self.check_links(&ctx, crate::time::std_instant()).await;
        }
    }

    /// Tears a link down (both sides dial again), counted by `reason`.
    pub(crate) fn reset_link(&self, link: &LinkShared, reason: Reset) {
        if let Some(m) = self.manager()
            && m.reset(&link.broker, link.id, CloseReason::Protocol)
        {
            self.metrics.fed_link_resets.inc(reason.as_str());
        }
    }

    /// The liveness guard, every reconcile tick: a link that is up converges to the
    /// consented meshes, or is torn down and dialed again.
    ///
    /// - The manager's current link must be the one registered here (its handler runs)
    ///   within [`REGISTER_BOUND`]; otherwise it is reset.
    /// - Our claims must match stored consent, and what flows must be what both sides
    ///   claim; otherwise they are recomputed.
    /// - A mesh we claim that the peer broker has not said it is ready for is announced
    ///   again every [`REANNOUNCE_EVERY`] (idempotent on that broker; it converges a lost or
    ///   crossed announcement). A control queue too full to take it resets the link.
    pub(crate) async fn check_links(&self, ctx: &Arc<Ctx>, now: std::time::Instant) {
        let Some(manager) = self.manager() else {
            return;
        };
        for st in manager.status() {
            let Some(id) = st.link_id else {
                lock(&self.unregistered_since).remove(&st.name);
                continue;
            };
            let link = self.link(&st.name).filter(|l| l.id == id);
            let Some(link) = link else {
                let overdue = {
                    let mut since = lock(&self.unregistered_since);
                    let entry = since.entry(st.name.clone()).or_insert((id, now));
                    if entry.0 != id {
                        *entry = (id, now);
                    }
                    now.duration_since(entry.1) > REGISTER_BOUND
                };
                if overdue && manager.reset(&st.name, id, CloseReason::Protocol) {
                    warn!(peer = %st.name, id, "link up but never registered; reset");
                    lock(&self.unregistered_since).remove(&st.name);
                    self.metrics
                        .fed_link_resets
                        .inc(Reset::Unregistered.as_str());
                }
                continue;
            };
            lock(&self.unregistered_since).remove(&st.name);
            let ready = lock(&self.consent).ready_for(&link.broker);
            if *lock(&link.claimed) != ready {
                self.reconcile_link(ctx, &link).await;
                continue;
            }
            let (claimed, broker_ready) = (
                lock(&link.claimed).clone(),
                lock(&link.broker_ready).clone(),
            );
            let want: HashSet<String> = claimed.intersection(&broker_ready).cloned().collect();
            if *lock(&link.flowing) != want {
                self.update_flowing(ctx, &link).await;
            }
            if now.duration_since(link.started) < REANNOUNCE_EVERY {
                continue;
            }
            let due: Vec<String> = {
                let mut last = lock(&link.reannounced);
                last.retain(|m, _| claimed.contains(m) && !broker_ready.contains(m));
                claimed
                    .difference(&broker_ready)
                    .filter(|m| {
                        last.get(*m)
                            .is_none_or(|at| now.duration_since(*at) >= REANNOUNCE_EVERY)
                    })
                    .cloned()
                    .collect()
            };
            for m in due {
                debug!(peer = %link.broker, mesh.id = %m, "announcing a claim again");
                let frame = Frame::MeshReady(MeshClaim { mesh_id: m.clone() });
                if link.control.try_send(frame).is_err() {
                    self.reset_link(&link, Reset::ControlFull);
                    break;
                }
                lock(&link.reannounced).insert(m, now);
            }
        }
    }

    /// Brings a link's consent claims and flowing meshes in line with stored consent.
    pub(crate) async fn reconcile_link(&self, ctx: &Arc<Ctx>, link: &Arc<LinkShared>) {
        let broker = &*link.broker;
        let (ready, offers) = {
            let c = lock(&self.consent);
            let ready = c.ready_for(broker);
            let offers: Vec<MeshOffer> = c
                .shares
                .iter()
                .filter(|((_, p), r)| p == broker && **r == ShareRole::Offer)
                .map(|((m, _), _)| MeshOffer {
                    mesh_id: m.clone(),
                    name: String::new(),
                    slug: String::new(),
                    roster: c.roster(&self.me, m),
                })
                .collect();
            (ready, offers)
        };
        // Homes (re)send their offers, with the mesh's name and current roster.
        {
            for mut o in offers {
                if let Ok(Some(row)) = ctx.db.mesh_by_id(&o.mesh_id).await {
                    o.name = row.name;
                    o.slug = row.slug;
                    // Never waits on one broker (the reconcile loop serves every link):
                    // a control queue this full means that broker stopped reading.
                    if link.control.try_send(Frame::MeshOffer(o)).is_err() {
                        self.reset_link(link, Reset::ControlFull);
                        return;
                    }
                }
            }
        }
        {
            // Queued under the lock, so concurrent reconciliations cannot reorder a
            // ready and a withdrawal of the same mesh on the wire.
            let mut claimed = lock(&link.claimed);
            let added: Vec<String> = ready.difference(&claimed).cloned().collect();
            let removed: Vec<String> = claimed.difference(&ready).cloned().collect();
            claimed.clone_from(&ready);
            let frames = added
                .into_iter()
                .map(|mesh_id| Frame::MeshReady(MeshClaim { mesh_id }))
                .chain(
                    removed
                        .into_iter()
                        .map(|mesh_id| Frame::MeshWithdraw(MeshClaim { mesh_id })),
                );
            for f in frames {
                if link.control.try_send(f).is_err() {
                    // The peer broker would never learn of this change: start over (the hellos
                    // of the next link carry the whole consent).
                    warn!(peer = %link.broker, "control queue full; resetting the link");
                    self.reset_link(link, Reset::ControlFull);
                    break;
                }
            }
        }
        self.update_flowing(ctx, link).await;
    }

    /// Recomputes what flows over a link; starts and stops meshes accordingly.
    pub(crate) async fn update_flowing(&self, ctx: &Arc<Ctx>, link: &Arc<LinkShared>) {
        let _serial = link.flow_lock.lock().await;
        let claimed = lock(&link.claimed).clone();
        let broker_ready = lock(&link.broker_ready).clone();
        let now_flowing: HashSet<String> = claimed.intersection(&broker_ready).cloned().collect();
        debug!(peer = %link.broker, ?claimed, peer_ready = ?broker_ready, "consent on the link");
        let (started, stopped) = {
            let flowing = lock(&link.flowing);
            let started: Vec<String> = now_flowing.difference(&flowing).cloned().collect();
            let stopped: Vec<String> = flowing.difference(&now_flowing).cloned().collect();
            (started, stopped)
        };
        if !stopped.is_empty() {
            lock(&link.flowing).retain(|m| !stopped.contains(m));
            self.refresh_shared();
        }
        let now = now_ms();
        for m in stopped {
            info!(peer = %link.broker, mesh.id = %m, "mesh no longer flows over the link");
            crate::features::dashboard::link_changed(ctx, &m, &link.broker, "stopped");
            if let Some(hub) = ctx.hub.loaded(&m) {
                hub.remote_drop(&link.broker, now);
                crate::features::mcp::engine::broker_gone(ctx, &hub, &link.broker);
            }
            // Messages for the peer broker in a mesh we no longer share are refused, not kept.
            if !self.consents(&m, &link.broker) {
                let _ = ctx
                    .writer
                    .send(WriteOp::ForwardRefused {
                        peer: link.broker.to_string(),
                        seq: None,
                        mesh_id: Some(m.clone()),
                        reason: RejectReason::NotShared.as_str(),
                        at: now,
                    })
                    .await;
            }
        }
        for m in started {
            let hub = match ctx.hub.mesh(&ctx.db, &m).await {
                Ok(Some(h)) => h,
                Ok(None) => continue,
                Err(e) => {
                    warn!(cause = %e, "loading a shared mesh");
                    continue;
                }
            };
            info!(peer = %link.broker, mesh.id = %m, "mesh flows over the link");
            // Members first: the mesh's messages may go out as soon as it flows, and the
            // peer broker refuses a message from a member it has not heard of.
            // The list is taken, queued and the mesh marked flowing under the members
            // lock (see `member_changed`).
            let overflow = {
                let mut q = lock(&link.members);
                // Earlier full lists of this mesh are superseded by this one (a broker
                // toggling its consent cannot pile them up).
                q.retain(
                    |f| !matches!(f, Frame::Members { mesh_id, full: true, .. } if *mesh_id == m),
                );
                let overflow = q.len() >= MEMBERS_QUEUE;
                let members = hub
                    .local_members()
                    .into_iter()
                    .map(|(pubkey, m)| MemberAnn {
                        member_id: m.id,
                        pubkey,
                        display_name: m.display_name,
                        role: m.role,
                        revoked: m.revoked,
                    })
                    .collect();
                q.push_back(Frame::Members {
                    mesh_id: m.clone(),
                    members,
                    full: true,
                });
                lock(&link.flowing).insert(m.clone());
                overflow
            };
            link.outbox_wake.notify_one();
            if overflow {
                self.reset_link(link, Reset::MembersFull);
            }
            self.refresh_shared();
            crate::features::dashboard::link_changed(ctx, &m, &link.broker, "flowing");
            self.send_presence_snapshot(link, &hub);
            // What converges by merging or newest write goes over the live stream, in
            // its own task (it waits for room instead of dropping). It runs again a few
            // seconds later: what the broker could not take the first time (held too
            // long for a member announcement, changed while the lists were read) is
            // sent again. A new run for the mesh on this link replaces a running one.
            let (ctx2, link2, hub2) = (ctx.clone(), link.clone(), hub.clone());
            let cancel = self.stop.child_token();
            if let Some(old) = lock(&link.catch_ups).insert(m.clone(), cancel.clone()) {
                old.cancel();
            }
            self.tracker.spawn(async move {
                let runs = async {
                    catch_up(&ctx2, &link2, &hub2).await;
                    tokio::time::sleep(CATCH_UP_AGAIN).await;
                    if link2.flows(&hub2.row.id) {
                        catch_up(&ctx2, &link2, &hub2).await;
                    }
                };
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = runs => {}
                }
            });
        }
        link.outbox_wake.notify_one();
    }

    pub(crate) async fn serve_link(
        self: Arc<Self>,
        ctx: Arc<Ctx>,
        link: Link,
        id: u64,
        counters: Arc<LinkCounters>,
        stop: CancellationToken,
    ) -> Result<(), LinkError> {
        let broker: Arc<str> = Arc::from(link.broker.as_str());
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (live_tx, live_rx) = mpsc::channel(LIVE_QUEUE);
        let shared = Arc::new(LinkShared {
            broker: broker.clone(),
            id,
            flow_lock: tokio::sync::Mutex::new(()),
            reannounced: Mutex::default(),
            broker_ready: Mutex::new(
                link.their_hello
                    .meshes
                    .iter()
                    .map(|m| m.mesh_id.clone())
                    .collect(),
            ),
            // What our hello said, not what consent says now: it may have changed
            // during the handshake, and the reconcile below tells the broker the difference.
            claimed: Mutex::new(
                link.hello
                    .meshes
                    .iter()
                    .map(|m| m.mesh_id.clone())
                    .collect(),
            ),
            flowing: Mutex::default(),
            control: control_tx,
            presence: Mutex::default(),
            presence_wake: Notify::new(),
            live: live_tx,
            live_drained: Arc::new(Notify::new()),
            members: Mutex::default(),
            outbox_wake: Notify::new(),
            counters: counters.clone(),
            messages_in: std::sync::atomic::AtomicBool::new(false),
            live_in: std::sync::atomic::AtomicBool::new(false),
            signals: link
                .their_hello
                .caps
                .iter()
                .any(|c| c == meshd_protocol::fed::CAP_SIGNALS),
            telemetry: link
                .their_hello
                .caps
                .iter()
                .any(|c| c == meshd_protocol::fed::CAP_TELEMETRY),
            started: crate::time::std_instant(),
            held: Mutex::default(),
            announced: Notify::new(),
            catch_ups: Mutex::default(),
            sent_at: Mutex::default(),
            bridge_claims: Mutex::default(),
        });
        let Link { conn, control, .. } = link;
        {
            // The manager cancels a replaced link's `stop` before it starts the link that
            // replaces it. So, checked under the table's lock: a link replaced before its
            // handler got here steps aside (registering it would shadow its successor,
            // and its removal on the way out would leave the broker with no link at all —
            // "up" and carrying nothing, for good).
            let mut links = lock(&self.links);
            if stop.is_cancelled() {
                debug!(peer = %broker, id, "link replaced before it started");
                return Ok(());
            }
            links.insert(broker.to_string(), shared.clone());
        }
        ctx.metrics.fed_links_up.fetch_add(1, Ordering::Relaxed);
        // Our bridges with that broker's meshes: queued before the control writer starts.
        self.send_bridge_claims(&ctx, &shared);

        let tasks = TaskTracker::new();
        let link_stop = stop.child_token();
        let (done_tx, mut done_rx) = mpsc::channel::<Result<(), LinkError>>(8);
        let spawn =
            |fut: Pin<Box<dyn std::future::Future<Output = Result<(), LinkError>> + Send>>| {
                let done = done_tx.clone();
                let stop = link_stop.clone();
                tasks.spawn(
                    async move {
                        let r = tokio::select! {
                            r = fut => r,
                            () = stop.cancelled() => Ok(()),
                        };
                        let _ = done.try_send(r);
                    }
                    .in_current_span(),
                );
            };
        let conn = Arc::new(conn);
        spawn(Box::pin(control_writer(control.tx, control_rx)));
        spawn(Box::pin(self.clone().control_reader(
            ctx.clone(),
            shared.clone(),
            control.rx,
        )));
        spawn(Box::pin(self.clone().outbox(
            ctx.clone(),
            shared.clone(),
            conn.clone(),
        )));
        spawn(Box::pin(presence_writer(
            shared.clone(),
            conn.clone(),
            self.metrics.clone(),
        )));
        spawn(Box::pin(live_writer(
            conn.clone(),
            live_rx,
            counters.clone(),
            shared.live_drained.clone(),
        )));
        spawn(Box::pin(self.clone().accept_streams(
            ctx.clone(),
            shared.clone(),
            conn.clone(),
            tasks.clone(),
            done_tx.clone(),
            link_stop.clone(),
        )));
        drop(done_tx);
        // Start the meshes both sides are ready for (unless the link is already
        // stopping: a stop never waits on the peer broker).
        let result = tokio::select! {
            () = stop.cancelled() => Ok(()),
            () = self.reconcile_link(&ctx, &shared) => tokio::select! {
                r = done_rx.recv() => r.unwrap_or(Ok(())),
                () = stop.cancelled() => Ok(()),
            },
        };
        link_stop.cancel();
        if stop.is_cancelled() {
            conn.close(CloseReason::Shutdown);
        }
        tasks.close();
        tasks.wait().await;
        // Unregister (unless a newer link for this broker already replaced this one).
        {
            let mut links = lock(&self.links);
            if links.get(&*broker).is_some_and(|l| Arc::ptr_eq(l, &shared)) {
                links.remove(&*broker);
            }
        }
        self.refresh_shared();
        ctx.metrics.fed_links_up.fetch_sub(1, Ordering::Relaxed);
        let mut gone = lock(&shared.flowing).clone();
        for m in &gone {
            crate::features::dashboard::link_changed(&ctx, m, &broker, "down");
        }
        gone.extend(crate::features::bridges::bridged_meshes(&ctx, &broker));
        self.schedule_presence_expiry(ctx.clone(), broker, gone);
        result
    }

    pub(crate) async fn control_reader(
        self: Arc<Self>,
        ctx: Arc<Ctx>,
        link: Arc<LinkShared>,
        mut rx: FrameReader,
    ) -> Result<(), LinkError> {
        while let Some(frame) = rx.recv().await? {
            link.counters.received.fetch_add(1, Ordering::Relaxed);
            if !frame.allowed_on(None) {
                return Err(protocol_error(&frame, "control"));
            }
            match frame {
                Frame::MeshOffer(offer) => {
                    if !offer
                        .roster
                        .iter()
                        .any(|b| b.eq_ignore_ascii_case(&link.broker))
                    {
                        warn!(mesh.id = %offer.mesh_id, "offer whose roster omits its home; ignored");
                        continue;
                    }
                    if !crate::ids::plausible_id(&offer.mesh_id)
                        || offer.name.len() > meshd_protocol::client::MAX_NAME_LEN
                        || offer.slug.len() > meshd_protocol::client::MAX_NAME_LEN
                        || offer.roster.len() > MAX_ROSTER
                        || offer.roster.iter().any(|b| b.len() > 253)
                    {
                        count_refused(&ctx, &link, RejectReason::Invalid, 1);
                        continue;
                    }
                    let mut o = offer.clone();
                    o.roster.retain(|b| !b.is_empty());
                    // The home is the sender; remember it with the offer (a bounded number
                    // per broker: homes send their offers again whenever consent changes).
                    let key = (o.mesh_id.clone(), link.broker.to_string());
                    {
                        let mut offers = lock(&self.offers);
                        let of_broker = offers.keys().filter(|(_, p)| *p == *link.broker).count();
                        if !offers.contains_key(&key) && of_broker >= MAX_OFFERS_PER_PEER {
                            drop(offers);
                            count_refused(&ctx, &link, RejectReason::Invalid, 1);
                            continue;
                        }
                        offers.insert(key, o.clone());
                    }
                    let accepted = lock(&self.consent)
                        .shares
                        .get(&(o.mesh_id.clone(), link.broker.to_string()))
                        .is_some_and(|r| *r == ShareRole::Accept);
                    if accepted {
                        self.adopt_offer(&ctx, &link.broker, &o).await;
                    } else {
                        debug!(mesh.id = %o.mesh_id, "offer received; not accepted here (yet)");
                    }
                }
                Frame::MeshReady(c) => {
                    // The broker's claims are bounded like its offers: a broker claiming
                    // meshes without end is misbehaving, and the link starts over.
                    if !crate::ids::plausible_id(&c.mesh_id) {
                        count_refused(&ctx, &link, RejectReason::Invalid, 1);
                        continue;
                    }
                    let full = {
                        let mut ready = lock(&link.broker_ready);
                        if ready.len() >= MAX_PEER_READY && !ready.contains(&c.mesh_id) {
                            true
                        } else {
                            ready.insert(c.mesh_id);
                            false
                        }
                    };
                    if full {
                        self.reset_link(&link, Reset::PeerReadyFull);
                        return Err(LinkError::Protocol(
                            "too many mesh claims from the peer".into(),
                        ));
                    }
                    self.update_flowing(&ctx, &link).await;
                }
                Frame::MeshWithdraw(c) => {
                    lock(&link.broker_ready).remove(&c.mesh_id);
                    self.update_flowing(&ctx, &link).await;
                }
                Frame::Bridges(claims) => {
                    self.on_bridge_claims(&ctx, &link, claims)
                        .map_err(LinkError::Protocol)?;
                }
                Frame::Close(reason) => return Err(LinkError::Closed(reason)),
                other => return Err(protocol_error(&other, "control")),
            }
        }
        Ok(())
    }

    /// Accepts the streams the peer broker opens and serves each by its class.
    pub(crate) async fn accept_streams(
        self: Arc<Self>,
        ctx: Arc<Ctx>,
        link: Arc<LinkShared>,
        conn: Arc<LinkConn>,
        tasks: TaskTracker,
        done: mpsc::Sender<Result<(), LinkError>>,
        stop: CancellationToken,
    ) -> Result<(), LinkError> {
        loop {
            let incoming = conn.accept_stream().await?;
            let fut: Pin<Box<dyn std::future::Future<Output = Result<(), LinkError>> + Send>> =
                match incoming.class {
                    StreamClass::Messages => {
                        if link.messages_in.swap(true, Ordering::SeqCst) {
                            return Err(LinkError::Protocol(
                                "the peer opened a second messages stream".into(),
                            ));
                        }
                        let Some(tx) = incoming.tx else {
                            return Err(LinkError::Protocol(
                                "messages stream without a reply half".into(),
                            ));
                        };
                        Box::pin(self.clone().inbound_messages(
                            ctx.clone(),
                            link.clone(),
                            incoming.rx,
                            tx,
                        ))
                    }
                    StreamClass::Presence => Box::pin(self.clone().inbound_presence(
                        ctx.clone(),
                        link.clone(),
                        incoming.rx,
                    )),
                    StreamClass::Live => {
                        // One applier keeps the live stream's order (and its hold).
                        if link.live_in.swap(true, Ordering::SeqCst) {
                            return Err(LinkError::Protocol(
                                "the peer opened a second live stream".into(),
                            ));
                        }
                        Box::pin(
                            self.clone()
                                .inbound_live(ctx.clone(), link.clone(), incoming.rx),
                        )
                    }
                };
            let done = done.clone();
            let stop = stop.clone();
            tasks.spawn(
                async move {
                    let r = tokio::select! {
                        r = fut => r,
                        () = stop.cancelled() => Ok(()),
                    };
                    // Never waits: the link ends on its first error anyway.
                    if r.is_err() {
                        let _ = done.try_send(r);
                    }
                }
                .in_current_span(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_link_waits_for_flow_only_while_it_settles() {
        let fresh = Duration::ZERO;
        let settled = FLOW_SETTLE;
        assert!(
            may_send(true, false, settled),
            "a flowing mesh always sends"
        );
        assert!(
            may_send(false, true, fresh),
            "peer ready, ours being claimed"
        );
        assert!(may_send(
            false,
            true,
            FLOW_SETTLE - Duration::from_millis(1)
        ));
        assert!(
            !may_send(false, true, settled),
            "settled without flowing: refused"
        );
        assert!(
            !may_send(false, false, fresh),
            "the peer withdrew: refused at once"
        );
    }
}
