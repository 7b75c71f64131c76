//! The handshake: a `hello` or `session_hello` checked, the presence registered,
//! `hello_ack` sent; refusals answered with an error and a close.

use super::*;

/// A refused handshake: the error frame, then a close.
pub(crate) struct Refusal {
    code: &'static str,
    message: String,
    close_code: u16,
}

impl Refusal {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            close_code: 1008,
        }
    }

    /// The member was revoked: the reference's wording, close 4002.
    fn revoked(mesh_name: &str) -> Self {
        Self {
            code: "revoked",
            message: revoked_message(mesh_name),
            close_code: 4002,
        }
    }

    fn from_hello(e: &HelloError) -> Self {
        Self::new(e.code(), format!("hello rejected: {e}"))
    }

    fn store(e: &StoreError) -> Self {
        warn!(cause = %e, "store error during handshake");
        Self {
            code: "internal",
            message: "the broker's store is unavailable; retry".into(),
            close_code: 1011,
        }
    }
}

pub(crate) fn revoked_message(mesh_name: &str) -> String {
    format!("You've been removed from \"{mesh_name}\".")
}

pub(crate) async fn send_text(socket: &mut WebSocket, ctx: &Ctx, text: String) -> bool {
    ctx.metrics.frames_sent.fetch_add(1, Ordering::Relaxed);
    socket.send(Message::Text(text.into())).await.is_ok()
}

pub(crate) async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        })))
        .await;
}

/// Waits for a valid handshake. Returns `None` when the connection ended instead.
pub(crate) async fn handshake(
    ctx: &Arc<Ctx>,
    socket: &mut WebSocket,
    conn_id: ConnId,
    remote_ip: std::net::IpAddr,
) -> Option<Session> {
    let timeout_ms = i64::try_from(ctx.config.limits.hello_timeout.as_millis()).unwrap_or(i64::MAX);
    let mut hs = ClientMachine::new(now_ms(), timeout_ms);
    let deadline = crate::time::instant() + ctx.config.limits.hello_timeout;
    loop {
        let msg = tokio::select! {
            biased;
            () = ctx.sessions_cancel.cancelled() => {
                close(socket, 1001, "shutting down").await;
                return None;
            }
            () = tokio::time::sleep_until(deadline) => {
                ctx.metrics.connections_rejected.inc("hello_timeout");
                let e = ErrorFrame::new("no_hello", "no hello within the handshake timeout");
                let _ = send_text(socket, ctx, BrokerFrame::Error(e).to_json()).await;
                close(socket, 1008, "hello timeout").await;
                return None;
            }
            msg = socket.recv() => msg,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Binary(_))) => {
                ctx.metrics.frames_dropped.inc("binary");
                continue;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_))) => {
                answer_close(socket).await;
                return None;
            }
            None => return None,
            Some(Err(e)) => {
                oversize_close(ctx, socket, &e).await;
                return None;
            }
        };
        ctx.metrics.frames_received.fetch_add(1, Ordering::Relaxed);
        match hs.on_text(&text) {
            Verdict::Handshake(inbound) => {
                match authenticate(ctx, inbound, conn_id, remote_ip).await {
                    Ok((live, ack)) => {
                        hs.accepted();
                        if !send_text(socket, ctx, ack).await {
                            live.teardown().await;
                            return None;
                        }
                        live.announce_arrival();
                        let mut live = live;
                        live.restore_mcp();
                        return Some(live);
                    }
                    Err(r) => {
                        ctx.metrics
                            .connections_rejected
                            .inc(if r.close_code == 1011 {
                                "store_error"
                            } else {
                                r.code
                            });
                        debug!(code = r.code, "handshake refused");
                        let e = ErrorFrame::new(r.code, r.message);
                        let _ = send_text(socket, ctx, BrokerFrame::Error(e).to_json()).await;
                        let reason = match r.close_code {
                            4002 => "banned",
                            1011 => "internal error",
                            _ => r.code,
                        };
                        close(socket, r.close_code, reason).await;
                        return None;
                    }
                }
            }
            Verdict::Reply(e) => {
                if !send_text(socket, ctx, BrokerFrame::Error(e).to_json()).await {
                    return None;
                }
            }
            Verdict::Request(_) | Verdict::Ignore(_) => {}
        }
    }
}

/// Sends the Close frame that answers the client's (RFC 6455 §5.5.1): the WebSocket
/// layer queued it when the client's arrived; a flush writes it. Bounded, as a client
/// that closes may also stop reading.
pub(crate) async fn answer_close(socket: &mut WebSocket) {
    let _ = tokio::time::timeout(Duration::from_secs(2), socket.flush()).await;
}

/// Closes a connection whose frame exceeded the size limit, with a clear reason.
pub(crate) async fn oversize_close(ctx: &Ctx, socket: &mut WebSocket, e: &axum::Error) {
    let text = e.to_string();
    if text.contains("too long") || text.contains("Space limit") || text.contains("capacity") {
        ctx.metrics.frames_dropped.inc("oversized");
        info!(cause = %text, "frame over the size limit; closing");
        close(socket, 1009, "frame exceeds the size limit").await;
    } else {
        debug!(cause = %text, "socket error");
    }
}

/// Checks a handshake frame and registers the presence.
pub(crate) async fn authenticate(
    ctx: &Arc<Ctx>,
    inbound: Inbound,
    conn_id: ConnId,
    remote_ip: std::net::IpAddr,
) -> Result<(Session, String), Refusal> {
    let now = now_ms();
    let skew = meshd_protocol::hello::DEFAULT_SKEW_MS;
    let (ident, mut fields) = match inbound.frame {
        ClientFrame::Hello(h) => {
            let v = verify_hello(&h, now, skew).map_err(|e| Refusal::from_hello(&e))?;
            (
                Ident {
                    signature: v.signature,
                    timestamp: v.timestamp,
                    mesh_id: h.mesh_id.clone(),
                    member_pubkey: v.member_pubkey.to_hex(),
                    member_id: Some(h.member_id.clone()),
                    session_pubkey: v.session_pubkey.map(|k| k.to_hex()),
                    session: false,
                },
                h.presence,
            )
        }
        ClientFrame::SessionHello(h) => {
            let v = verify_session_hello(&h, now, skew).map_err(|e| Refusal::from_hello(&e))?;
            (
                Ident {
                    signature: v.signature,
                    timestamp: v.timestamp,
                    mesh_id: h.mesh_id.clone(),
                    member_pubkey: v.member_pubkey.to_hex(),
                    member_id: h.parent_member_id.clone(),
                    session_pubkey: Some(v.session_pubkey.to_hex()),
                    session: true,
                },
                h.presence,
            )
        }
        _ => return Err(Refusal::new("no_hello", "must send hello first")),
    };

    let not_member = || Refusal::new("unauthorized", "hello rejected: pubkey not found in mesh");
    let mesh = ctx
        .hub
        .mesh(&ctx.db, &ident.mesh_id)
        .await
        .map_err(|e| Refusal::store(&e))?
        .ok_or_else(not_member)?;
    // The hub's member cache answers: it is loaded with the mesh, kept by this
    // process's joins and revocations, and by the watch for those of other processes
    // (`features::moderation::watch_revocations`, which `meshd member revoke` waits
    // for). A key it does not know, or knows as revoked (another process may have
    // lifted the ban), is read from the store.
    let member = match mesh.member(&ident.member_pubkey).filter(|m| !m.revoked) {
        Some(info) => info,
        None => match ctx
            .db
            .member_by_pubkey(&ident.mesh_id, &ident.member_pubkey)
            .await
            .map_err(|e| Refusal::store(&e))?
        {
            Some(row) => {
                let info = member_info(&row);
                mesh.upsert_member(&row.pubkey, info.clone());
                info
            }
            None => return Err(not_member()),
        },
    };
    if member.revoked {
        return Err(Refusal::revoked(&mesh.row.name));
    }
    // A member of a peer broker connects to its own broker; presence there is what
    // this broker sees of it.
    if let Some(home) = &member.home {
        return Err(Refusal::new(
            "unauthorized",
            format!("hello rejected: this member is hosted by broker {home}; connect there"),
        ));
    }
    if let Some(claimed) = &ident.member_id
        && *claimed != member.id
    {
        return Err(if ident.session {
            Refusal::new(
                "parent_member_id_mismatch",
                "parentMemberId does not match the member key",
            )
        } else {
            Refusal::new(
                "unauthorized",
                "hello rejected: memberId does not match the member key",
            )
        });
    }
    // Only now, with the key known to be a member's, is the handshake remembered: a
    // stranger's self-signed hellos must not fill the cache and lock members out.
    lock(&ctx.replay)
        .check_and_insert(&ident.signature, ident.timestamp, now)
        .map_err(|e| Refusal::from_hello(&e))?;
    tracing::Span::current().record("mesh.id", field::display(&ident.mesh_id));
    tracing::Span::current().record("member.id", field::display(&member.id));

    // A session key belongs to the first member that presents it and can never be a
    // member key of someone else: otherwise one member could drain another's DMs.
    if let Some(spk) = &ident.session_pubkey {
        let taken = || {
            Refusal::new(
                "bad_session_pubkey",
                "sessionPubkey belongs to another member",
            )
        };
        match mesh.claim_session_key(spk, &ident.member_pubkey, &member.id) {
            Err(KeyTaken) => return Err(taken()),
            Ok(false) => {}
            // First sighting: persist the binding (the hub's copy, taken under its lock,
            // is what every later hello is checked against).
            Ok(true) => {
                let op = WriteOp::BindSession {
                    mesh_id: ident.mesh_id.clone(),
                    pubkey: spk.clone(),
                    member_id: member.id.clone(),
                    now,
                };
                ctx.writer.send(op).await.map_err(|e| Refusal::store(&e))?;
            }
        }
    }

    let saved = match mesh.saved_state(&member.id) {
        Some(saved) => saved,
        None => {
            let read = ctx
                .db
                .peer_state(&ident.mesh_id, &member.id)
                .await
                .map_err(|e| Refusal::store(&e))?;
            mesh.read_state(&member.id, read)
        }
    };
    let saved_groups: Vec<GroupEntry> = saved
        .as_ref()
        .and_then(|s| serde_json::from_str(&s.groups).ok())
        .unwrap_or_default();
    let saved_stats: Option<CumulativeStats> = saved
        .as_ref()
        .map(|s| serde_json::from_str(&s.stats).unwrap_or_default());
    let hello_groups = fields.groups.take().filter(|g| !g.is_empty());
    let groups = hello_groups.clone().unwrap_or_else(|| saved_groups.clone());
    let display_name = fields
        .display_name
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| member.display_name.clone());

    let (tx, rx) = crate::hub::outq::channel(ctx.config.limits.outbound_queue);
    let cancel = ctx.sessions_cancel.child_token();
    let shared = Arc::new(PeerShared::new(
        conn_id,
        tx,
        cancel,
        ctx.config.limits.outbound_queue_bytes,
    ));
    shared.acks.store(ident.session, Ordering::SeqCst);
    shared.last_active.store(now, Ordering::Relaxed);
    let peer = Peer {
        shared: shared.clone(),
        presence_id: random_id(),
        member_id: member.id.clone(),
        member_pubkey: ident.member_pubkey.clone(),
        session_pubkey: ident.session_pubkey.clone(),
        display_name: display_name.clone(),
        peer_role: if ident.session {
            "session"
        } else {
            "control-plane"
        },
        session_id: fields.session_id.unwrap_or_else(random_id),
        cwd: fields.cwd.unwrap_or_default(),
        hostname: fields.hostname,
        peer_type: fields.peer_type,
        channel: fields.channel,
        model: fields.model,
        connected_at: now,
        status: StatusState::new(now),
        summary: None,
        groups: groups.clone(),
        // Subscriptions come back with the member, like its groups.
        tags: crate::features::tags::from_column(saved.as_ref().and_then(|s| s.tags.as_deref())),
        position: None,
        visible: saved.as_ref().is_none_or(|s| s.visible),
        profile: saved
            .as_ref()
            .and_then(|s| serde_json::from_str(&s.profile).ok())
            .unwrap_or_default(),
        stats: None,
        restored_stats: saved_stats,
        remote_ip,
        signals: None,
        dashboard: false,
    };
    // A status hook that fired just before this session connected (same address, cwd).
    let stashed = ctx.hooks.take_pending(remote_ip, &peer.cwd, now);
    let mut peer = peer;
    if let Some(status) = stashed {
        let fresh = i64::try_from(meshd_config::defaults::STATUS_FRESH_WINDOW.as_millis())
            .unwrap_or(i64::MAX);
        peer.status.write(status, StatusSource::Hook, now, fresh);
    }
    let (registered, presence_id) = mesh
        .register(peer, ctx.config.limits.max_connections_per_mesh)
        .map_err(|e| match e {
            RegisterError::AtCapacity => Refusal::new("capacity", "mesh at connection capacity"),
            RegisterError::Revoked => Refusal::revoked(&mesh.row.name),
        })?;
    let predecessor = match registered {
        Registered::Reattached(old) => Some(old),
        Registered::New => None,
    };
    let reattached = predecessor.is_some();

    let restored = saved.is_some() && !ident.session;
    let ack = BrokerFrame::HelloAck(HelloAck {
        presence_id,
        member_display_name: display_name.clone(),
        restored: restored.then_some(true),
        last_summary: if restored {
            saved.as_ref().and_then(|s| s.last_summary.clone())
        } else {
            None
        },
        last_seen_at: if restored {
            saved.as_ref().map(|s| iso8601_ms(s.last_seen_at))
        } else {
            None
        },
        restored_groups: (restored && hello_groups.is_none() && !saved_groups.is_empty())
            .then(|| saved_groups.clone()),
        restored_stats: if restored { saved_stats } else { None },
        member_profile: Some(MemberProfile {
            role_tag: member.role.clone(),
            groups,
            message_mode: "push".into(),
        }),
    });
    info!(
        session = ident.session,
        reattached, restored, "session authenticated"
    );
    // The connection starts spilled: its first drain delivers whatever waited for it.
    let mut machine = ClientMachine::new(now, 0);
    machine.accepted();
    let io_guard = shared.cancel.clone();
    let started = crate::time::instant();
    let live = Session {
        ctx: ctx.clone(),
        machine,
        mesh,
        shared,
        rx,
        conn: conn_id,
        member_id: member.id,
        member_pubkey: ident.member_pubkey,
        session_pubkey: ident.session_pubkey,
        display_name,
        // `peer_returned` only for a plain hello with saved state, as the reference: the
        // newest CLI maps only `peer_joined`/`peer_left` for its sessions.
        announce: if reattached {
            None
        } else if saved.is_some() && !ident.session {
            Some(Arrival {
                event: "peer_returned",
                returned: saved.map(|s| (s.last_seen_at, s.last_summary)),
            })
        } else {
            Some(Arrival {
                event: "peer_joined",
                returned: None,
            })
        },
        replies: FuturesOrdered::new(),
        writes: VecDeque::new(),
        claim: None,
        drain_wanted: true,
        drain_timer: None,
        claim_leased: false,
        bucket: Bucket::new(
            ctx.config.limits.sends_per_second,
            ctx.config.limits.send_burst,
            started,
        ),
        move_bucket: Bucket::new(
            crate::features::spatial::MOVES_PER_SECOND,
            crate::features::spatial::MOVE_BURST,
            started,
        ),
        last_activity: started,
        io_guard,
        predecessor,
    };
    Ok((live, ack.to_json()))
}

impl Session {
    pub(crate) fn announce_arrival(&self) {
        self.presence_changed();
        self.ctx.audit.record(
            self.mesh_id(),
            "peer_joined",
            Some(self.member_id.clone()),
            &self.display_name,
            serde_json::json!({"pubkey": self.routing_key(), "memberPubkey": self.member_pubkey}),
        );
        let Some(Arrival { event, returned }) = &self.announce else {
            return;
        };
        let Some(data) = self.mesh.with_peer(self.conn, |p| {
            p.visible.then(|| {
                let mut d = peer_data(p);
                d.insert(
                    "groups".into(),
                    serde_json::to_value(&p.groups).unwrap_or_default(),
                );
                if let Some((last_seen, summary)) = returned {
                    d.insert("lastSeenAt".into(), iso8601_ms(*last_seen).into());
                    d.insert(
                        "summary".into(),
                        summary.clone().map_or(serde_json::Value::Null, Into::into),
                    );
                }
                d
            })
        }) else {
            return;
        };
        if let Some(data) = data {
            let frame = delivery::system_push(self.mesh_id(), event, data, now_ms());
            // A new presence stands nowhere: viewers standing somewhere do not see it.
            self.mesh.announce_about(
                &frame,
                self.conn,
                Some(&self.member_pubkey),
                &self.member_pubkey,
                None,
            );
        }
    }
}
