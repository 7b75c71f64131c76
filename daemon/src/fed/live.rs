//! Live traffic: multicasts, events, state, streams and feature changes sent to every
//! link a mesh flows over, and applied when they arrive (through the hold).

use super::*;

/// Hands a peer broker's event push to every local connection of the mesh.
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
            broker: link.broker.clone(),
            seq: None,
        },
        tags: Vec::new(),
        bridged: None,
        topic: None,
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
    /// Forwards a multicast that started here to every broker hosting a peer it
    /// reaches, unless this broker's export policy for that broker refuses it. Returns
    /// how many links took it and the refusals (broker, reason), counted.
    pub(crate) fn multicast(
        &self,
        mesh: &MeshHub,
        target: &TargetSpec,
        m: Multicast,
    ) -> (usize, Vec<(String, String)>) {
        if !self.is_shared(&mesh.row.id) {
            return (0, Vec::new());
        }
        let (mut sent, mut refused) = (0, Vec::new());
        let kind = Kind::of(target);
        let frame = Frame::Multicast(Box::new(m));
        let Frame::Multicast(m) = &frame else {
            return (0, Vec::new());
        };
        for broker in mesh.remote_brokers_for(target, &m.sender_pubkey) {
            if let Some(kind) = kind
                && let Err(denied) =
                    self.policy_check(&mesh.row.id, &broker, Direction::Export, kind, &m.tags)
            {
                refused.push((broker.to_string(), denied.reason()));
                continue;
            }
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
        (sent, refused)
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

    /// Sends a mesh log entry (`features::telemetry`) to every broker the mesh flows to
    /// that understands it.
    pub(crate) fn log_send(&self, mesh_id: &str, frame: Frame) {
        if !self.is_shared(mesh_id) {
            return;
        }
        for link in self.links_for(mesh_id) {
            if link.telemetry && link.live.try_send(frame.clone()).is_err() {
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

    /// Applies a live frame, or holds it: when it names members the peer broker
    /// has not announced yet, or when earlier frames are held (it keeps its place).
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
                crate::features::state::on_peer_state(ctx, link, s).await?;
            }
            Frame::StreamData(p) => {
                crate::features::streams::on_peer_stream_data(ctx, link, p).await?;
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
            Frame::Topic(t) => {
                if let Err(reason) = crate::features::topics::apply_topic(ctx, link, *t).await {
                    count_refused(ctx, link, reason, 1);
                }
            }
            Frame::TopicMember(m) => {
                if let Err(reason) =
                    crate::features::topics::apply_topic_member(ctx, link, *m).await
                {
                    count_refused(ctx, link, reason, 1);
                }
            }
            Frame::TopicSeal(sl) => {
                if let Err(reason) = crate::features::topics::apply_topic_seal(ctx, link, *sl).await
                {
                    count_refused(ctx, link, reason, 1);
                }
            }
            Frame::TopicPost(p) => {
                if let Err(reason) = crate::features::topics::apply_topic_post(ctx, link, *p).await
                {
                    count_refused(ctx, link, reason, 1);
                }
            }
            Frame::Memory(m) => {
                if let Err(reason) = apply_memory(ctx, link, *m).await {
                    count_refused(ctx, link, reason, 1);
                }
            }
            Frame::Forget { mesh_id, id, at } => {
                crate::features::memory::on_peer_forget(ctx, link, mesh_id, id, at).await?;
            }
            Frame::Signal(s) => crate::features::signals::on_peer_signal(ctx, link, *s).await,
            Frame::Log(e) => crate::features::telemetry::on_peer_log(ctx, link, *e).await,
            Frame::RelayAsk(r) => {
                crate::features::relay::on_peer_relay_ask(self, ctx, link, r).await?;
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
                crate::features::mcp::on_peer_mcp_call(ctx, link, a).await?;
            }
            Frame::Files {
                mesh_id,
                files,
                full,
            } => {
                crate::features::files::on_peer_files(ctx, link, mesh_id, files, full).await?;
            }
            Frame::FileUrlAsk(a) => {
                crate::features::files::on_peer_file_url_ask(self, ctx, link, a).await?;
            }
            Frame::FileUrlAnswer(a) => {
                crate::features::files::on_peer_file_url_answer(ctx, link, a).await?;
            }
            Frame::Clock(c) => {
                crate::features::clock::on_peer_clock(ctx, link, c).await?;
            }
            Frame::Task(t) => {
                if let Err(reason) = apply_task(ctx, link, *t).await {
                    count_refused(ctx, link, reason, 1);
                }
            }
            Frame::McpResult(d) => {
                crate::features::mcp::on_peer_mcp_result(ctx, link, d).await?;
            }
            Frame::RelayAnswer(r) => {
                crate::features::relay::on_peer_relay_answer(ctx, link, r).await?;
            }
            Frame::Context(c) => {
                if let Err(reason) = apply_context(ctx, link, *c).await {
                    count_refused(ctx, link, reason, 1);
                }
            }
            Frame::BridgeRelay(r) => {
                if let Err(reason) = self.on_bridge_relay(ctx, link, *r).await {
                    count_refused(ctx, link, reason, 1);
                }
            }
            Frame::MulticastRefused {
                mesh_id,
                id,
                reason,
            } => {
                // A refusal of a multicast we forwarded, by that broker's import policy.
                if !link.accepts(&mesh_id) || id.len() > 64 || reason.len() > 128 {
                    count_refused(ctx, link, RejectReason::Invalid, 1);
                } else if let Err(e) = ctx
                    .db
                    .record_refusal(
                        &id,
                        &mesh_id,
                        &link.broker,
                        Direction::Import,
                        &reason,
                        now_ms(),
                    )
                    .await
                {
                    warn!(cause = %e, "recording a refusal by a peer broker's policy");
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
        mut m: Multicast,
    ) -> Result<(), RejectReason> {
        if !link.accepts(&m.mesh_id) {
            return Err(RejectReason::NotShared);
        }
        let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &m.mesh_id).await else {
            return Err(RejectReason::NotShared);
        };
        if !hub.may_speak_for(&link.broker, &m.sender_member_pubkey) {
            return Err(RejectReason::ForgedSender);
        }
        let Ok(target @ (TargetSpec::Broadcast | TargetSpec::Group(_) | TargetSpec::Tag(_))) =
            TargetSpec::parse(&m.target_spec)
        else {
            return Err(RejectReason::Invalid);
        };
        let tags = crate::features::tags::from_peer(
            std::mem::take(&mut m.tags),
            meshd_protocol::tags::MAX_TAGS,
        )
        .ok_or(RejectReason::Invalid)?;
        if let Some(kind) = Kind::of(&target)
            && let Err(denied) =
                self.policy_check(&m.mesh_id, &link.broker, Direction::Import, kind, &tags)
        {
            // Tell the sender's broker, for its message_status (live: dropped if full).
            let _ = link.live.try_send(Frame::MulticastRefused {
                mesh_id: m.mesh_id.clone(),
                id: m.id.clone(),
                reason: denied.reason(),
            });
            return Err(RejectReason::Policy);
        }
        let priority = Priority::from_rank(m.priority).ok_or(RejectReason::Invalid)?;
        let origin = Origin::Peer {
            broker: link.broker.clone(),
            seq: None,
        };
        let envelope = Envelope::from_multicast(m, hub, target, priority, tags, origin);
        delivery::submit(ctx, envelope, now_ms()).map_err(|e| e.reject_reason())?;
        Ok(())
    }
}
