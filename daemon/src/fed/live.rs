//! Live traffic: multicasts, events, state, streams and feature changes sent to every
//! link a mesh flows over, and applied when they arrive (through the hold).

use super::*;

/// Hands a peer's event push to every local connection of the mesh.
pub(crate) async fn deliver_event(
    ctx: &Ctx,
    link: &LinkShared,
    e: EventPush,
) -> Result<(), RejectReason> {
    if !link.accepts(&e.mesh_id) {
        return Err(RejectReason::NotShared);
    }
    if e.subtype != "webhook"
        || e.event.is_empty()
        || e.event.len() > meshd_protocol::client::MAX_NAME_LEN
        || e.sender.len() > 2 * meshd_protocol::client::MAX_NAME_LEN
        || e.id.len() > 64
        || e.data.len() > crate::http::WEBHOOK_BODY_LIMIT
    {
        return Err(RejectReason::Invalid);
    }
    let Ok(data) = serde_json::value::RawValue::from_string(e.data) else {
        return Err(RejectReason::Invalid);
    };
    let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &e.mesh_id).await else {
        return Err(RejectReason::NotShared);
    };
    let envelope = Envelope {
        id: e.id,
        mesh: hub,
        sender_pubkey: e.sender,
        author: None,
        target: Target::Everyone,
        target_spec: String::new(),
        priority: Priority::Next,
        body: Body::Event {
            name: e.event,
            data,
        },
        subtype: Some(e.subtype),
        client_message_id: None,
        created_at: e.created_at,
        expires_at: e.created_at,
        origin: Origin::Peer {
            broker: link.peer.clone(),
            seq: None,
        },
    };
    delivery::submit(ctx, envelope, now_ms()).map_err(|e| e.reject_reason())?;
    Ok(())
}

pub(crate) async fn live_writer(
    conn: Arc<LinkConn>,
    mut rx: mpsc::Receiver<Frame>,
    counters: Arc<LinkCounters>,
    drained: Arc<Notify>,
) -> Result<(), LinkError> {
    let (mut tx, _) = conn.open(StreamClass::Live).await?;
    let mut batch = Vec::new();
    let mut buf = Vec::new();
    while rx.recv_many(&mut batch, 256).await > 0 {
        drained.notify_waiters();
        buf.clear();
        for f in batch.drain(..) {
            match fed::encode(&f, tx.max()) {
                Ok(b) => buf.extend_from_slice(&b),
                Err(e) => warn!(cause = %e, "live frame not forwarded"),
            }
            counters.sent.fetch_add(1, Ordering::Relaxed);
        }
        tx.send_raw(&buf).await?;
    }
    Ok(())
}

impl Fed {
    /// A local broadcast or group message: forwarded once to each broker with an
    /// eligible recipient.
    pub(crate) fn multicast(&self, mesh: &MeshHub, target: &TargetSpec, m: Multicast) -> usize {
        if !self.is_shared(&mesh.row.id) {
            return 0;
        }
        let mut sent = 0;
        let frame = Frame::Multicast(Box::new(m));
        for broker in mesh.remote_brokers_for(target) {
            if let Some(link) = self.link(&broker)
                && link.flows(&mesh.row.id)
            {
                if link.live.try_send(frame.clone()).is_ok() {
                    sent += 1;
                } else {
                    self.metrics
                        .fed_live_dropped
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        sent
    }

    /// Sends a live frame of `mesh_id` to every link the mesh flows over. A full link
    /// queue drops it (live-only traffic, counted), as a local slow consumer would.
    pub(crate) fn to_every_link(&self, mesh_id: &str, frame: Frame) {
        if !self.is_shared(mesh_id) {
            return;
        }
        for link in self.links_for(mesh_id) {
            if link.live.try_send(frame.clone()).is_err() {
                self.metrics
                    .fed_live_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// An event pushed to the mesh here (a webhook post) goes to its other brokers.
    pub(crate) fn event(&self, e: EventPush) {
        let mesh_id = e.mesh_id.clone();
        self.to_every_link(&mesh_id, Frame::Event(Box::new(e)));
    }

    pub(crate) async fn inbound_live(
        self: Arc<Self>,
        ctx: Arc<Ctx>,
        link: Arc<LinkShared>,
        mut rx: FrameReader,
    ) -> Result<(), LinkError> {
        // One reader, one applier: frames released from the hold and new frames are
        // applied by the same loop, in the stream's order. (Reading a frame cannot be
        // interrupted without losing its bytes, so it is not raced against the hold.)
        let (tx, mut frames) = mpsc::channel::<Frame>(LIVE_READ_AHEAD);
        let counters = link.counters.clone();
        let reader = async move {
            while let Some(frame) = rx.recv().await? {
                counters.received.fetch_add(1, Ordering::Relaxed);
                if tx.send(frame).await.is_err() {
                    break;
                }
            }
            Ok::<(), LinkError>(())
        };
        let applier = async {
            loop {
                let deadline = lock(&link.held).deadline();
                tokio::select! {
                    biased;
                    () = link.announced.notified() => {}
                    () = sleep_until_std(deadline), if deadline.is_some() => {}
                    frame = frames.recv() => {
                        let Some(frame) = frame else { break };
                        self.admit_live(&ctx, &link, frame).await?;
                    }
                }
                self.release_held(&ctx, &link).await?;
            }
            Ok::<(), LinkError>(())
        };
        let ended = tokio::try_join!(reader, applier).map(drop);
        // What still waits is lost with the stream (a new link catches up again).
        let dropped = lock(&link.held).clear();
        if dropped > 0 {
            count_refused(&ctx, &link, RejectReason::ForgedSender, dropped);
        }
        ended
    }

    /// Applies a live frame, or holds it: when it names members the peer has not
    /// announced yet, or when earlier frames are held (it keeps its place).
    pub(crate) async fn admit_live(
        self: &Arc<Self>,
        ctx: &Arc<Ctx>,
        link: &Arc<LinkShared>,
        frame: Frame,
    ) -> Result<(), LinkError> {
        let unknown = match unknown_members(ctx, link, &frame).await {
            Ok(u) => u,
            Err(reason) => {
                count_refused(ctx, link, reason, 1);
                return Ok(());
            }
        };
        if unknown.is_empty() && lock(&link.held).is_empty() {
            return self.live_frame(ctx, link, frame).await;
        }
        // Too large to hold at all: refused.
        let Ok(encoded) = fed::encode(&frame, HELD_BYTES - fed::LEN_PREFIX) else {
            count_refused(ctx, link, RejectReason::ForgedSender, 1);
            return Ok(());
        };
        // Full: the oldest goes; the frames that only waited behind it apply first.
        loop {
            {
                let mut held = lock(&link.held);
                if held.fits(encoded.len()) {
                    held.push(encoded, unknown, crate::time::std_instant());
                    return Ok(());
                }
                if !held.drop_front() {
                    // Empty and still no room: cannot happen (checked above).
                    count_refused(ctx, link, RejectReason::ForgedSender, 1);
                    return Ok(());
                }
            }
            count_refused(ctx, link, RejectReason::ForgedSender, 1);
            self.release_held(ctx, link).await?;
        }
    }

    /// Applies held frames from the front while they are ready; drops (and counts)
    /// those held too long.
    pub(crate) async fn release_held(
        self: &Arc<Self>,
        ctx: &Arc<Ctx>,
        link: &Arc<LinkShared>,
    ) -> Result<(), LinkError> {
        loop {
            let popped = lock(&link.held).pop(crate::time::std_instant(), |mesh, key| {
                ctx.hub.loaded(mesh).is_some_and(|hub| hub.knows(key))
            });
            match popped {
                None => return Ok(()),
                Some(Popped::Expired) => {
                    count_refused(ctx, link, RejectReason::ForgedSender, 1);
                }
                Some(Popped::Ready(bytes)) => {
                    // Encoded here with its length prefix.
                    if let Some(Ok(frame)) = bytes.get(fed::LEN_PREFIX..).map(fed::decode) {
                        self.live_frame(ctx, link, frame).await?;
                    }
                }
            }
        }
    }

    /// One frame of the live stream.
    pub(crate) async fn live_frame(
        self: &Arc<Self>,
        ctx: &Arc<Ctx>,
        link: &Arc<LinkShared>,
        frame: Frame,
    ) -> Result<(), LinkError> {
        match frame {
            Frame::Multicast(m) => {
                if let Err(reason) = self.deliver_multicast(ctx, link, *m).await {
                    count_refused(ctx, link, reason, 1);
                }
            }
            Frame::State(s) => {
                if !link.accepts(&s.mesh_id) {
                    ctx.metrics
                        .fed_refused
                        .inc(RejectReason::NotShared.as_str());
                    return Ok(());
                }
                let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &s.mesh_id).await else {
                    return Ok(());
                };
                // Writes by a peer's member must come from that member's broker; a
                // snapshot's entries (no member) are accepted as newest-wins data.
                if !s.member_pubkey.is_empty() && !hub.may_speak_for(&link.peer, &s.member_pubkey) {
                    count_refused(ctx, link, RejectReason::ForgedSender, 1);
                    return Ok(());
                }
                if s.key.len() > 1024
                    || s.value.len() > ctx.config.limits.max_state_value_bytes
                    || serde_json::from_str::<&serde_json::value::RawValue>(&s.value).is_err()
                {
                    ctx.metrics.fed_refused.inc(RejectReason::Invalid.as_str());
                    return Ok(());
                }
                let value: Arc<str> = Arc::from(s.value.as_str());
                let member_id = hub.member(&s.member_pubkey).map(|m| m.id);
                let applied = hub.state_apply_remote(
                    &s.key,
                    StateValue {
                        value: value.clone(),
                        updated_by: s.updated_by.clone(),
                        updated_at: s.updated_at,
                        member_id: member_id.clone(),
                    },
                    ctx.config.limits.max_state_bytes_per_mesh,
                    ctx.config.quotas.state_bytes_per_member,
                );
                if applied {
                    let _ = ctx
                        .writer
                        .send(WriteOp::SetState {
                            mesh_id: s.mesh_id,
                            key: s.key,
                            value,
                            updated_by: s.updated_by,
                            member_id,
                            at: s.updated_at,
                        })
                        .await;
                }
            }
            Frame::StreamData(p) => {
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
                        Ok(Some(hub)) if hub.may_speak_for(&link.peer, &p.member_pubkey) => {
                            let frame =
                                BrokerFrame::StreamData(meshd_protocol::broker::StreamData {
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
            }
            Frame::Event(e) => {
                if let Err(reason) = deliver_event(ctx, link, *e).await {
                    count_refused(ctx, link, reason, 1);
                }
            }
            Frame::Skill(s) => {
                if let Err(reason) = apply_skill(ctx, link, *s).await {
                    count_refused(ctx, link, reason, 1);
                }
            }
            Frame::Memory(m) => {
                if let Err(reason) = apply_memory(ctx, link, *m).await {
                    count_refused(ctx, link, reason, 1);
                }
            }
            Frame::Forget { mesh_id, id, at } => {
                if !link.accepts(&mesh_id) || id.len() > 64 {
                    count_refused(ctx, link, RejectReason::NotShared, 1);
                } else if let Err(e) = ctx.db.forget(&mesh_id, &id, at).await {
                    warn!(cause = %e, "storing a peer's forget");
                }
            }
            Frame::RelayAsk(r) => {
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
                                &link.peer,
                                &r.requester_key,
                                &r.requester_member_pubkey,
                            ) =>
                        {
                            Ok(crate::relay::remote_asked(ctx, &link.peer, &hub, r))
                        }
                        _ => Err(RejectReason::ForgedSender),
                    }
                };
                match refused {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        self.relay_send(
                            &link.peer,
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
            }
            Frame::McpServers {
                mesh_id,
                servers,
                all,
            } => {
                if let Err(reason) = apply_mcp_servers(ctx, link, mesh_id, servers, all).await {
                    count_refused(ctx, link, reason, 1);
                }
            }
            Frame::McpCall(a) => {
                let allowed = link.accepts(&a.mesh_id)
                    && matches!(ctx.hub.mesh(&ctx.db, &a.mesh_id).await,
                        Ok(Some(hub)) if hub.may_speak_for(&link.peer, &a.caller_member_pubkey));
                if allowed {
                    ctx.mcp.remote_call(ctx, &link.peer, *a);
                } else {
                    count_refused(ctx, link, RejectReason::ForgedSender, 1);
                }
            }
            Frame::Files {
                mesh_id,
                files,
                full,
            } => {
                let hub = if link.accepts(&mesh_id) && files.len() <= 10_000 {
                    ctx.hub.mesh(&ctx.db, &mesh_id).await.ok().flatten()
                } else {
                    None
                };
                let ok = match hub {
                    Some(hub) => {
                        match crate::files::apply_remote(ctx, &link.peer, &hub, files, full).await {
                            Ok(all_valid) => all_valid,
                            Err(e) => {
                                warn!(cause = %e, "storing a peer's files");
                                false
                            }
                        }
                    }
                    None => false,
                };
                if !ok {
                    count_refused(ctx, link, RejectReason::Invalid, 1);
                }
            }
            Frame::FileUrlAsk(a) => {
                let mut a = *a;
                // The reader must be a presence the peer hosts for that member; its
                // groups are the ones the peer announced for it, not the ask's.
                let hub = if link.accepts(&a.mesh_id) && a.reader_name.len() <= 256 {
                    ctx.hub.mesh(&ctx.db, &a.mesh_id).await.ok().flatten()
                } else {
                    None
                };
                let allowed = hub.as_ref().is_some_and(|hub| {
                    hub.remote_presence_of(&link.peer, &a.reader_key, &a.member_pubkey)
                        && hub
                            .member(&a.member_pubkey)
                            .is_some_and(|m| m.id == a.member_id)
                });
                if let (true, Some(hub)) = (allowed, &hub) {
                    a.groups = hub.remote_groups(&a.reader_key);
                    let answer = crate::files::remote_url(ctx, &a).await;
                    self.relay_send(
                        &link.peer,
                        &a.mesh_id,
                        Frame::FileUrlAnswer(Box::new(answer)),
                    );
                } else {
                    count_refused(ctx, link, RejectReason::ForgedSender, 1);
                }
            }
            Frame::FileUrlAnswer(a) => {
                if link.accepts(&a.mesh_id) {
                    ctx.files.answered(&link.peer, *a);
                }
            }
            Frame::Clock(c) => {
                // A broker speaks for its own changes (every pair of brokers of a
                // mesh is linked, so each change comes from its maker).
                let hub = if link.accepts(&c.mesh_id) && c.broker == *link.peer {
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
            }
            Frame::Task(t) => {
                if let Err(reason) = apply_task(ctx, link, *t).await {
                    count_refused(ctx, link, reason, 1);
                }
            }
            Frame::McpResult(d) => {
                if link.accepts(&d.mesh_id) {
                    ctx.mcp.remote_result(ctx, &link.peer, *d);
                }
            }
            Frame::RelayAnswer(r) => {
                if link.accepts(&r.mesh_id) {
                    crate::relay::remote_answered(ctx, &link.peer, *r);
                }
            }
            Frame::Context(c) => {
                if let Err(reason) = apply_context(ctx, link, *c).await {
                    count_refused(ctx, link, reason, 1);
                }
            }
            other => return Err(protocol_error(&other, "live")),
        }
        Ok(())
    }

    pub(crate) async fn deliver_multicast(
        &self,
        ctx: &Ctx,
        link: &LinkShared,
        m: Multicast,
    ) -> Result<(), RejectReason> {
        if !link.accepts(&m.mesh_id) {
            return Err(RejectReason::NotShared);
        }
        let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &m.mesh_id).await else {
            return Err(RejectReason::NotShared);
        };
        if !hub.may_speak_for(&link.peer, &m.sender_member_pubkey) {
            return Err(RejectReason::ForgedSender);
        }
        let Ok(target @ (TargetSpec::Broadcast | TargetSpec::Group(_))) =
            TargetSpec::parse(&m.target_spec)
        else {
            return Err(RejectReason::Invalid);
        };
        let priority = Priority::from_rank(m.priority).ok_or(RejectReason::Invalid)?;
        let envelope = Envelope {
            id: m.id,
            mesh: hub,
            sender_pubkey: m.sender_pubkey,
            author: Some(Author {
                member_id: m.sender_member_id,
                member_pubkey: m.sender_member_pubkey,
                name: m.sender_name,
            }),
            target: Target::Spec(target),
            target_spec: m.target_spec,
            priority,
            body: Body::Sealed {
                nonce: m.nonce,
                ciphertext: m.ciphertext,
            },
            subtype: m.subtype,
            client_message_id: m.client_message_id,
            created_at: m.created_at,
            expires_at: m.created_at,
            origin: Origin::Peer {
                broker: link.peer.clone(),
                seq: None,
            },
        };
        delivery::submit(ctx, envelope, now_ms()).map_err(|e| e.reject_reason())?;
        Ok(())
    }
}
