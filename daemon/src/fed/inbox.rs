//! The inbox from each peer broker: forwarded messages stored exactly once (the
//! sender's outbox position recorded with each row), member announcements applied.

use super::*;

/// Resets a peer broker's inbox cursor when dropped armed: see `inbound_messages`.
pub(crate) struct CursorAhead<'a> {
    pub(crate) cursor: &'a Mutex<Option<fed::InboxCursor>>,
    pub(crate) armed: bool,
}

impl<'a> CursorAhead<'a> {
    pub(crate) fn arm(cursor: &'a Mutex<Option<fed::InboxCursor>>, admitted: bool) -> Self {
        Self {
            cursor,
            armed: admitted,
        }
    }

    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for CursorAhead<'_> {
    fn drop(&mut self) {
        if self.armed {
            *lock(self.cursor) = None;
        }
    }
}

/// An inbound message's fate, in arrival order.
pub(crate) enum Fate {
    Stored(u64, Commit),
    Done(u64),
    Rejected(u64, RejectReason),
}

impl Fed {
    /// The peer broker's members and durable messages: stored (with the de-duplication cursor)
    /// before they are acknowledged, in order.
    pub(crate) async fn inbound_messages(
        self: Arc<Self>,
        ctx: Arc<Ctx>,
        link: Arc<LinkShared>,
        mut rx: FrameReader,
        mut tx: FrameWriter,
    ) -> Result<(), LinkError> {
        let broker = link.broker.to_string();
        let cursor = lock(&self.cursors)
            .entry(broker.clone())
            .or_default()
            .clone();
        if lock(&cursor).is_none() {
            // Everything queued before is committed first, so the stored cursor is exact.
            let _ = ctx.writer.flush().await;
            let high = ctx
                .db
                .inbox_high(&broker)
                .await
                .map_err(|e| store_error("reading the inbox cursor", e))?;
            lock(&cursor).get_or_insert(fed::InboxCursor {
                high: u64::try_from(high).unwrap_or(0),
            });
        }
        let failed_cursor = cursor.clone();
        let (pending_tx, mut pending_rx) = mpsc::channel::<Fate>(self.cfg.outbox_window * 2);
        let acker = async move {
            let mut upto: Option<u64> = None;
            while let Some(p) = pending_rx.recv().await {
                let mut batch = vec![p];
                while let Ok(more) = pending_rx.try_recv() {
                    batch.push(more);
                }
                for p in batch {
                    match p {
                        Fate::Stored(seq, commit) => match commit.committed().await {
                            Ok(()) => upto = Some(seq),
                            Err(StoreError::Closed) => {
                                return Err(store_error(
                                    "storing a forwarded message",
                                    StoreError::Closed,
                                ));
                            }
                            Err(e) => {
                                // The in-memory cursor is ahead of the store now: re-read it.
                                *lock(&failed_cursor) = None;
                                return Err(store_error("storing a forwarded message", e));
                            }
                        },
                        Fate::Done(seq) => upto = Some(seq),
                        Fate::Rejected(seq, reason) => {
                            tx.send(&Frame::Reject { seq, reason }).await?;
                            upto = Some(seq);
                        }
                    }
                }
                if let Some(seq) = upto.take() {
                    debug!(seq, "acknowledging forwarded messages");
                    tx.send(&Frame::Ack { seq }).await?;
                }
            }
            Ok::<(), LinkError>(())
        };
        let reader = async {
            while let Some(frame) = rx.recv().await? {
                link.counters.received.fetch_add(1, Ordering::Relaxed);
                match frame {
                    Frame::Members {
                        mesh_id,
                        members,
                        full: _,
                    } => {
                        self.apply_members(&ctx, &link, &mesh_id, &members).await;
                        // Live frames that overtook these announcements may apply now.
                        link.announced.notify_one();
                    }
                    Frame::Dm(dm) => {
                        let seq = dm.seq;
                        // A cursor reset by a failed insert (on this or another link of
                        // the same broker) must be re-read from the store: end this stream.
                        let Some(admitted) = lock(&cursor).as_mut().map(|c| c.admit(seq)) else {
                            return Err(LinkError::Restart("the inbox cursor was reset"));
                        };
                        tracing::trace!(seq, admitted, "forwarded message");
                        // From here until the store writer holds the message (or its
                        // refusal), the cursor is ahead of what will be stored: if this
                        // reader is cancelled in between (its link replaced), the cursor
                        // is reset, so the successor re-reads it from the store instead of
                        // taking the resend for a duplicate and losing it.
                        let mut ahead = CursorAhead::arm(&cursor, admitted);
                        let seq_i = i64::try_from(seq).unwrap_or(i64::MAX);
                        if !admitted {
                            // Seen before: stored, or refused (then refused again, so
                            // the sender does not take it for delivered).
                            let p = match ctx.db.inbox_rejection(&broker, seq_i).await {
                                Ok(Some(r)) => Fate::Rejected(
                                    seq,
                                    RejectReason::parse(&r).unwrap_or(RejectReason::Invalid),
                                ),
                                _ => Fate::Done(seq),
                            };
                            let _ = pending_tx.send(p).await;
                            continue;
                        }
                        let p = match self.accept_dm(&ctx, &link, *dm).await {
                            Ok(reply) => Fate::Stored(seq, reply),
                            Err(reason) => {
                                count_refused(&ctx, &link, reason, 1);
                                let _ = ctx
                                    .writer
                                    .send(WriteOp::InboxRejected {
                                        peer: broker.clone(),
                                        seq: seq_i,
                                        reason: reason.as_str(),
                                        at: now_ms(),
                                    })
                                    .await;
                                Fate::Rejected(seq, reason)
                            }
                        };
                        ahead.disarm();
                        if pending_tx.send(p).await.is_err() {
                            break;
                        }
                    }
                    other => return Err(protocol_error(&other, "messages")),
                }
            }
            Ok::<(), LinkError>(())
        };
        tokio::select! {
            r = reader => r,
            r = acker => r,
        }
    }

    pub(crate) async fn apply_members(
        &self,
        ctx: &Ctx,
        link: &LinkShared,
        mesh_id: &str,
        members: &[MemberAnn],
    ) {
        if !link.accepts(mesh_id) {
            ctx.metrics
                .fed_refused
                .inc(RejectReason::NotShared.as_str());
            return;
        }
        let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, mesh_id).await else {
            return;
        };
        let now = now_ms();
        // Members a peer broker hosts in this mesh are bounded (each carries rows, presence,
        // contexts and quotas here).
        let mut hosted = hub.members_hosted_by(&link.broker);
        for ann in members {
            if meshd_protocol::Pubkey::parse_hex(&ann.pubkey).is_err()
                || !crate::ids::plausible_id(&ann.member_id)
                || ann.display_name.is_empty()
                || ann.display_name.len() > meshd_protocol::client::MAX_NAME_LEN
                || !matches!(ann.role.as_str(), "admin" | "member")
            {
                ctx.metrics.fed_refused.inc(RejectReason::Invalid.as_str());
                continue;
            }
            if hub.member(&ann.pubkey).is_none() {
                if hosted >= MAX_REMOTE_MEMBERS {
                    count_refused(ctx, link, RejectReason::OverQuota, 1);
                    continue;
                }
                hosted += 1;
            }
            match ctx
                .db
                .upsert_remote_member(mesh_id, &link.broker, ann, now)
                .await
            {
                Ok(MemberUpsert::Applied { .. }) => {
                    if let Ok(Some(row)) = ctx.db.member_by_pubkey(mesh_id, &ann.pubkey).await {
                        hub.upsert_member(&ann.pubkey, member_info(&row));
                        if row.revoked_at.is_some() {
                            hub.revoke(&ann.pubkey);
                        }
                    }
                }
                Ok(MemberUpsert::Forged) => {
                    count_refused(ctx, link, RejectReason::ForgedSender, 1);
                    warn!(mesh.id = %mesh_id, member = %ann.pubkey, "peer announced a member it does not host; refused");
                }
                Err(e) => warn!(cause = %e, "storing a remote member"),
            }
        }
    }

    /// Validates a forwarded DM and queues its insert (with the inbox cursor).
    pub(crate) async fn accept_dm(
        &self,
        ctx: &Ctx,
        link: &LinkShared,
        mut dm: Dm,
    ) -> Result<Commit, RejectReason> {
        // A DM through a bridge: its sender is in the other broker's mesh, which this
        // broker trusts for its own members once both consented to the bridge; the
        // sender may not pose as a key of the recipient's mesh.
        let bridged = match dm.bridged.take() {
            Some((from, name)) => {
                if !self.bridge_dm_flows(ctx, &link.broker, &dm.mesh_id, &from)
                    || !crate::ids::plausible_id(&from)
                    || name.len() > meshd_protocol::client::MAX_NAME_LEN
                {
                    return Err(RejectReason::NotShared);
                }
                Some(meshd_protocol::broker::Bridged {
                    mesh_id: from,
                    mesh_name: name,
                    broker: Some(link.broker.to_string()),
                    path: Vec::new(),
                })
            }
            None => None,
        };
        if bridged.is_none() && !link.accepts(&dm.mesh_id) {
            return Err(RejectReason::NotShared);
        }
        let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &dm.mesh_id).await else {
            return Err(RejectReason::NotShared);
        };
        if bridged.is_some() {
            if hub.knows(&dm.sender_member_pubkey)
                || hub.knows(&dm.sender_pubkey)
                || meshd_protocol::Pubkey::parse_hex(&dm.sender_member_pubkey).is_err()
                || dm.sender_member_id.len() > 64
            {
                return Err(RejectReason::ForgedSender);
            }
        } else if !hub.hosted_by(&link.broker, &dm.sender_member_pubkey)
            // The sender's member id must be the one its key belongs to: it is stored,
            // and quotas are counted by it.
            || hub
                .member(&dm.sender_member_pubkey)
                .is_none_or(|m| m.id != dm.sender_member_id)
        {
            warn!(sender = %dm.sender_member_pubkey, "forwarded message from a member the peer does not host; refused");
            return Err(RejectReason::ForgedSender);
        }
        if dm.sender_name.len() > meshd_protocol::client::MAX_NAME_LEN
            || dm.sender_pubkey.len() > 64
            || dm.target_key.len() > 64
            || dm.client_message_id.as_ref().is_some_and(|c| c.len() > 256)
        {
            return Err(RejectReason::Invalid);
        }
        if hub.member_revoked(&dm.sender_member_pubkey) {
            return Err(RejectReason::Revoked);
        }
        let priority = Priority::from_rank(dm.priority).ok_or(RejectReason::Invalid)?;
        if dm.id.is_empty() || dm.id.len() > 64 {
            return Err(RejectReason::Invalid);
        }
        let tags = crate::features::tags::from_peer(dm.tags, meshd_protocol::tags::MAX_TAGS)
            .ok_or(RejectReason::Invalid)?;
        self.policy_check(
            &dm.mesh_id,
            &link.broker,
            Direction::Import,
            Kind::Dm,
            &tags,
        )
        .map_err(|_| RejectReason::Policy)?;
        let envelope = Envelope {
            id: dm.id,
            mesh: hub,
            sender_pubkey: dm.sender_pubkey,
            author: Some(Author {
                member_id: dm.sender_member_id,
                member_pubkey: dm.sender_member_pubkey,
                name: dm.sender_name,
            }),
            target: Target::Key(dm.target_key),
            target_spec: dm.target_spec,
            priority,
            body: Body::Sealed {
                nonce: dm.nonce,
                ciphertext: dm.ciphertext,
            },
            subtype: dm.subtype,
            client_message_id: dm.client_message_id,
            created_at: dm.created_at,
            expires_at: dm.expires_at,
            origin: Origin::Peer {
                broker: link.broker.clone(),
                seq: Some(i64::try_from(dm.seq).unwrap_or(i64::MAX)),
            },
            tags,
            bridged,
            topic: None,
        };
        let accepted = delivery::submit(ctx, envelope, now_ms()).map_err(|e| e.reject_reason())?;
        let Some((op, commit)) = accepted.write else {
            return Err(RejectReason::Invalid);
        };
        if ctx.writer.send(op).await.is_err() {
            return Err(RejectReason::Invalid);
        }
        ctx.metrics.fed_received.fetch_add(1, Ordering::Relaxed);
        Ok(commit)
    }
}
