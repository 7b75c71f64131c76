//! The durable outbox to each peer broker: rows read from the store, or taken hot from the
//! router before their commit, forwarded in order and acknowledged by that broker.

use super::*;

/// Rows the router (`delivery::router`) hands over for one peer broker, numbered but not
/// yet committed. While that broker's link is up and its outbox caught up with the store, the
/// link forwards from here at once (no commit wait, no store read); otherwise it reads
/// the store. Bounded: on overflow the queue is dropped and the link reads the store.
#[derive(Debug, Default)]
pub(crate) struct HotSink {
    pub(crate) inner: Mutex<HotQueue>,
    pub(crate) wake: Notify,
}

#[derive(Debug, Default)]
pub(crate) struct HotQueue {
    /// The outbox attached now (0: none; rows offered meanwhile are read from the store).
    pub(crate) attached: u64,
    pub(crate) generation: u64,
    /// Rows were dropped since the outbox last looked: it must read the store.
    pub(crate) overflowed: bool,
    pub(crate) rows: VecDeque<Dm>,
    /// The highest position the writer numbered, queued or not: an outbox that has
    /// sent less is not caught up, whatever its queue says.
    pub(crate) last_offered: i64,
}

/// Rows a hot queue holds before it gives up and lets the store catch up.
pub(crate) const HOT_QUEUE: usize = 8192;

impl crate::delivery::router::ForwardSink for HotSink {
    fn offer(&self, row: &NewMessage) {
        let mut q = lock(&self.inner);
        if let Some(seq) = row.forward_seq {
            q.last_offered = q.last_offered.max(seq);
        }
        if q.attached == 0 {
            return;
        }
        if q.rows.len() >= HOT_QUEUE {
            q.rows.clear();
            q.overflowed = true;
        } else if let Some(seq) = row.forward_seq {
            q.rows.push_back(Dm {
                seq: u64::try_from(seq).unwrap_or(0),
                mesh_id: row.mesh_id.clone(),
                id: row.id.clone(),
                sender_member_id: row.sender_member_id.clone(),
                sender_member_pubkey: row.sender_member_pubkey.clone(),
                sender_pubkey: row.sender_pubkey.clone(),
                sender_name: row.sender_name.clone(),
                target_spec: row.target_spec.clone(),
                target_key: row.target_key.clone().unwrap_or_default(),
                priority: row.priority,
                nonce: row.nonce.clone(),
                ciphertext: row.ciphertext.clone(),
                subtype: row.subtype.clone(),
                client_message_id: row.client_message_id.clone(),
                created_at: row.created_at,
                expires_at: row.expires_at,
                tags: row.tags.clone(),
                bridged: bridged_of(row.bridged.as_deref()),
            });
        }
        drop(q);
        self.wake.notify_one();
    }
}

impl HotSink {
    /// A link's outbox takes over the queue; the guard gives it back when the outbox
    /// ends (unless a newer link's outbox has taken over meanwhile).
    pub(crate) fn attach(self: &Arc<Self>) -> HotGuard {
        let mut q = lock(&self.inner);
        q.generation += 1;
        q.attached = q.generation;
        q.overflowed = false;
        q.rows.clear();
        HotGuard {
            sink: self.clone(),
            generation: q.generation,
        }
    }

    /// The highest position numbered so far.
    pub(crate) fn last_offered(&self) -> i64 {
        lock(&self.inner).last_offered
    }

    /// Up to `n` rows, and whether rows may be missing before them: some were dropped,
    /// or another outbox (of a link being replaced) took the queue over meanwhile, in
    /// which case `guard` takes it back.
    pub(crate) fn take(&self, n: usize, guard: &mut HotGuard) -> (Vec<Dm>, bool) {
        let mut q = lock(&self.inner);
        if q.attached != guard.generation {
            q.generation += 1;
            q.attached = q.generation;
            guard.generation = q.generation;
            q.overflowed = false;
            q.rows.clear();
            return (Vec::new(), true);
        }
        let overflowed = std::mem::take(&mut q.overflowed);
        let n = n.min(q.rows.len());
        (q.rows.drain(..n).collect(), overflowed)
    }
}

/// Detaches an outbox from its hot queue when dropped.
#[derive(Debug)]
pub(crate) struct HotGuard {
    pub(crate) sink: Arc<HotSink>,
    pub(crate) generation: u64,
}

impl Drop for HotGuard {
    fn drop(&mut self) {
        let mut q = lock(&self.sink.inner);
        if q.attached == self.generation {
            q.attached = 0;
            q.rows.clear();
        }
        drop(q);
        // An outbox that lost the queue to this one notices on its next look.
        self.sink.wake.notify_one();
    }
}

pub(crate) fn outbox_dm(row: crate::fed::store::OutboxRow) -> Dm {
    Dm {
        seq: u64::try_from(row.seq).unwrap_or(0),
        mesh_id: row.mesh_id,
        id: row.id,
        sender_member_id: row.sender_member_id,
        sender_member_pubkey: row.sender_member_pubkey,
        sender_pubkey: row.sender_pubkey,
        sender_name: row.sender_name,
        target_spec: row.target_spec,
        target_key: row.target_key.unwrap_or_default(),
        priority: row.priority,
        nonce: row.nonce,
        ciphertext: row.ciphertext,
        subtype: row.subtype,
        client_message_id: row.client_message_id,
        created_at: row.created_at,
        expires_at: row.expires_at,
        tags: crate::features::tags::from_column(row.tags.as_deref()),
        bridged: bridged_of(row.bridged.as_deref()),
    }
}

/// The sender's mesh of a DM through a bridge, from its stored `bridged` (id, name).
fn bridged_of(stored: Option<&str>) -> Option<(String, String)> {
    let b: meshd_protocol::broker::Bridged = serde_json::from_str(stored?).ok()?;
    Some((b.mesh_id, b.mesh_name))
}

impl Fed {
    /// Sends member announcements and the durable outbox; reads acks on the same stream.
    pub(crate) async fn outbox(
        self: Arc<Self>,
        ctx: Arc<Ctx>,
        link: Arc<LinkShared>,
        conn: Arc<LinkConn>,
    ) -> Result<(), LinkError> {
        let (mut tx, rx) = conn.open(StreamClass::Messages).await?;
        let Some(mut rx) = rx else {
            return Err(LinkError::Protocol(
                "messages stream without a reply half".into(),
            ));
        };
        let window = self.cfg.outbox_window;
        let inflight: Arc<Mutex<VecDeque<i64>>> = Arc::default();
        let acked = Arc::new(Notify::new());
        let broker = link.broker.to_string();
        // Acks and rejects come back on the reply half.
        let ack_reader = {
            let inflight = inflight.clone();
            let acked = acked.clone();
            let ctx = ctx.clone();
            let broker = broker.clone();
            let counters = link.counters.clone();
            async move {
                while let Some(frame) = rx.recv().await? {
                    match frame {
                        Frame::Ack { seq } => {
                            let seq = i64::try_from(seq).unwrap_or(i64::MAX);
                            {
                                let mut q = lock(&inflight);
                                while q.front().is_some_and(|s| *s <= seq) {
                                    q.pop_front();
                                }
                            }
                            acked.notify_one();
                            let _ = ctx
                                .writer
                                .send(WriteOp::Forwarded {
                                    peer: broker.clone(),
                                    upto: seq,
                                    at: now_ms(),
                                })
                                .await;
                        }
                        Frame::Reject { seq, reason } => {
                            counters.rejected.fetch_add(1, Ordering::Relaxed);
                            warn!(
                                seq,
                                reason = reason.as_str(),
                                "peer refused a forwarded message"
                            );
                            let _ = ctx
                                .writer
                                .send(WriteOp::ForwardRefused {
                                    peer: broker.clone(),
                                    seq: Some(i64::try_from(seq).unwrap_or(i64::MAX)),
                                    mesh_id: None,
                                    reason: reason.as_str(),
                                    at: now_ms(),
                                })
                                .await;
                        }
                        other => return Err(protocol_error(&other, "messages reply")),
                    }
                }
                // Acks stop for good: the link cannot carry messages any more.
                Err::<(), LinkError>(LinkError::Protocol(
                    "the peer finished the reply half of the messages stream".into(),
                ))
            }
        };
        let sender = async {
            let max_seen = self.resend_mark(&broker);
            let hot = self.hot_sink(&broker);
            // Attach before the first store read: every row numbered from now on is
            // either in that read or offered to the hot queue.
            let mut attached = hot.attach();
            // Highest position sent on this link; rows go out strictly in order.
            let mut last: i64 = 0;
            // Whether the store has been read up to what the hot queue continues from.
            let mut caught_up = false;
            let mut recheck = Duration::from_millis(1);
            let mut buf: Vec<u8> = Vec::new();
            loop {
                let members: Vec<Frame> = lock(&link.members).drain(..).collect();
                for f in &members {
                    tx.send(f).await?;
                    link.counters.sent.fetch_add(1, Ordering::Relaxed);
                }
                let room = window.saturating_sub(lock(&inflight).len());
                if room == 0 {
                    acked.notified().await;
                    continue;
                }
                let wake = link.outbox_wake.notified();
                tokio::pin!(wake);
                wake.as_mut().enable();
                let hot_wake = hot.wake.notified();
                tokio::pin!(hot_wake);
                hot_wake.as_mut().enable();
                let limit = OUTBOX_PAGE.min(i64::try_from(room).unwrap_or(OUTBOX_PAGE));
                let (batch, from_store) = if caught_up {
                    let (rows, overflowed) =
                        hot.take(usize::try_from(limit).unwrap_or(0), &mut attached);
                    let gap = rows.first().is_some_and(|d| {
                        i64::try_from(d.seq).unwrap_or(i64::MAX) > last.saturating_add(1)
                    });
                    if overflowed || gap {
                        // Rows before these are (or will be) in the store: read it.
                        caught_up = false;
                        if gap {
                            // Not committed yet, or never will be (a failed batch):
                            // give the writer a moment rather than spin.
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        continue;
                    }
                    (rows, false)
                } else {
                    let rows = ctx
                        .db
                        .outbox_page(&broker, last, limit)
                        .await
                        .map_err(|e| store_error("reading the outbox", e))?;
                    if i64::try_from(rows.len()).unwrap_or(0) < limit {
                        caught_up = true;
                    }
                    (rows.into_iter().map(outbox_dm).collect(), true)
                };
                if batch.is_empty() && caught_up && hot.last_offered() > last {
                    // Numbered but neither queued nor read (offered before this outbox
                    // attached, committed after its read): read the store again once
                    // the writer has committed it. A row whose batch failed never
                    // appears, so the re-reads back off (to one a second).
                    caught_up = false;
                    tokio::time::sleep(recheck).await;
                    recheck = (recheck * 2).min(Duration::from_secs(1));
                    continue;
                }
                if batch.is_empty() {
                    if from_store {
                        let queued = ctx.db.outbox_len(&broker).await.unwrap_or(0);
                        link.counters
                            .queued
                            .store(u64::try_from(queued).unwrap_or(0), Ordering::Relaxed);
                        continue;
                    }
                    // Caught up: what waits is what the broker has not acknowledged yet.
                    link.counters
                        .queued
                        .store(lock(&inflight).len() as u64, Ordering::Relaxed);
                    // New rows wake the sender, acks refresh the gauge; a slow tick
                    // re-reads the store as a safety net (off the hot path: a store
                    // read here would delay the next hot row).
                    tokio::select! {
                        () = hot_wake => {}
                        () = wake => {}
                        () = acked.notified() => {}
                        () = tokio::time::sleep(Duration::from_secs(2)) => caught_up = false,
                    }
                    continue;
                }
                buf.clear();
                let mut sent = Vec::with_capacity(batch.len());
                let mut blocked = false;
                for dm in batch {
                    let seq = i64::try_from(dm.seq).unwrap_or(i64::MAX);
                    if seq <= last {
                        continue; // read from the store already
                    }
                    if !from_store && seq > last.saturating_add(1) {
                        // A row between was numbered but is not in this queue: the
                        // store has it (or will once committed); nothing may overtake it.
                        caught_up = false;
                        break;
                    }
                    // A DM through a bridge goes while the bridge flows; any other while
                    // its mesh does.
                    let (flows, consents) = match &dm.bridged {
                        Some((from, _)) => (
                            self.bridge_dm_flows(&ctx, &broker, from, &dm.mesh_id),
                            crate::features::bridges::bridge_dm_consented(
                                &ctx,
                                &broker,
                                from,
                                &dm.mesh_id,
                            ) && crate::time::std_instant().saturating_duration_since(link.started)
                                < FLOW_SETTLE,
                        ),
                        None => (
                            link.flows(&dm.mesh_id),
                            self.consents(&dm.mesh_id, &broker)
                                && link.settling_or_flows(&dm.mesh_id, crate::time::std_instant()),
                        ),
                    };
                    if !flows {
                        // Not (or no longer) shared with this broker: refuse locally. A
                        // mesh that has not started flowing yet on a new link waits a
                        // moment instead (nothing after it may overtake it: the broker
                        // de-duplicates by a high-water mark).
                        if consents {
                            blocked = true;
                            caught_up = false;
                            break;
                        }
                        last = seq;
                        let _ = ctx
                            .writer
                            .send(WriteOp::ForwardRefused {
                                peer: broker.clone(),
                                seq: Some(seq),
                                mesh_id: None,
                                reason: RejectReason::NotShared.as_str(),
                                at: now_ms(),
                            })
                            .await;
                        continue;
                    }
                    last = seq;
                    let frame = Frame::Dm(Box::new(dm));
                    let bytes = fed::encode(&frame, tx.max())?;
                    buf.extend_from_slice(&bytes);
                    sent.push(seq);
                }
                if blocked && sent.is_empty() {
                    // Woken when the mesh starts flowing (or new rows arrive).
                    let _ = tokio::time::timeout(Duration::from_secs(1), wake).await;
                    continue;
                }
                if sent.is_empty() {
                    continue;
                }
                recheck = Duration::from_millis(1);
                let resent = sent
                    .iter()
                    .filter(|s| u64::try_from(**s).unwrap_or(0) <= max_seen.load(Ordering::Relaxed))
                    .count();
                if let Some(l) = sent.last() {
                    max_seen.fetch_max(u64::try_from(*l).unwrap_or(0), Ordering::Relaxed);
                }
                lock(&inflight).extend(sent.iter().copied());
                // Member announcements queued while this batch was read go ahead of it.
                let late: Vec<Frame> = lock(&link.members).drain(..).collect();
                for f in &late {
                    tx.send(f).await?;
                }
                tx.send_raw(&buf).await?;
                tracing::trace!(n = sent.len(), last = ?sent.last(), from_store, "outbox sent");
                link.counters
                    .sent
                    .fetch_add(sent.len() as u64, Ordering::Relaxed);
                link.counters
                    .resent
                    .fetch_add(resent as u64, Ordering::Relaxed);
            }
            #[allow(unreachable_code)]
            Ok::<(), LinkError>(())
        };
        tokio::select! {
            r = ack_reader => r,
            r = sender => r,
        }
    }
}
