//! Presence across brokers: local changes coalesced per link, snapshots, remote
//! updates applied, and remote presences expired when a link stays down.

use super::*;

/// Presence updates waiting for one link, at most one per session.
#[derive(Debug, Default)]
pub(crate) struct Coalescer {
    pub(crate) order: VecDeque<(String, String)>,
    pub(crate) pending: HashMap<(String, String), Frame>,
}

impl Coalescer {
    pub(crate) fn put(&mut self, mesh: &str, key: &str, frame: Frame) {
        let k = (mesh.to_owned(), key.to_owned());
        if self.pending.insert(k.clone(), frame).is_none() {
            self.order.push_back(k);
        }
    }

    /// A snapshot supersedes the mesh's pending updates.
    pub(crate) fn snapshot(&mut self, mesh: &str, frame: Frame) {
        self.pending.retain(|(m, _), _| m != mesh);
        self.order.retain(|(m, _)| m != mesh);
        self.put(mesh, "", frame);
    }

    pub(crate) fn take(&mut self) -> Vec<Frame> {
        let mut out = Vec::with_capacity(self.order.len());
        while let Some(k) = self.order.pop_front() {
            if let Some(f) = self.pending.remove(&k) {
                out.push(f);
            }
        }
        out
    }
}

/// Bounds on a presence entry from a peer broker: keys are ed25519 hex, texts stay within
/// what a local hello may carry (so a broker cannot make `list_peers` huge).
pub(crate) fn valid_entry(e: &PresenceEntry) -> bool {
    const TEXT: usize = 1024;
    meshd_protocol::Pubkey::parse_hex(&e.key).is_ok()
        && meshd_protocol::Pubkey::parse_hex(&e.member_pubkey).is_ok()
        && meshd_protocol::Status::parse(&e.status).is_some()
        && e.display_name.len() <= TEXT
        && e.member_id.len() <= 64
        && e.session_id.len() <= TEXT
        && e.cwd.len() <= 4 * TEXT
        && e.summary.as_ref().is_none_or(|s| s.len() <= 16 * TEXT)
        && e.groups.len() <= meshd_protocol::client::MAX_GROUPS
        && e.profile.len() <= 16 * TEXT
        && e.stats.as_ref().is_none_or(|s| s.len() <= TEXT)
        && e.tags.len() <= meshd_protocol::tags::MAX_SUBSCRIPTIONS
        && e.tags.iter().all(|t| meshd_protocol::tags::valid(t))
        && [&e.hostname, &e.peer_type, &e.channel, &e.model]
            .iter()
            .all(|f| f.as_ref().is_none_or(|s| s.len() <= TEXT))
}

/// A local presence as announced to peer brokers.
pub(crate) fn presence_entry(p: &Peer, version: u64) -> PresenceEntry {
    PresenceEntry {
        key: p.routing_key().to_owned(),
        member_pubkey: p.member_pubkey.clone(),
        member_id: p.member_id.clone(),
        version,
        display_name: p.display_name.clone(),
        status: p.status.status.as_str().to_owned(),
        summary: p.summary.clone(),
        groups: p
            .groups
            .iter()
            .map(|g| fed::Group {
                name: g.name.clone(),
                role: g.role.clone(),
            })
            .collect(),
        visible: p.visible,
        session_id: p.session_id.clone(),
        connected_at: p.connected_at,
        cwd: p.cwd.clone(),
        hostname: p.hostname.clone(),
        peer_type: p.peer_type.clone(),
        channel: p.channel.clone(),
        model: p.model.clone(),
        peer_role: p.peer_role.to_owned(),
        profile: serde_json::to_string(&p.profile).unwrap_or_else(|_| "{}".into()),
        stats: p.stats.and_then(|s| serde_json::to_string(&s).ok()),
        tags: p.tags.clone(),
        position: p.position,
    }
}

pub(crate) async fn presence_writer(
    link: Arc<LinkShared>,
    conn: Arc<LinkConn>,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<(), LinkError> {
    let (mut tx, _) = conn.open(StreamClass::Presence).await?;
    loop {
        let wake = link.presence_wake.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        let frames = lock(&link.presence).take();
        if frames.is_empty() {
            wake.await;
            continue;
        }
        let mut buf = Vec::new();
        for f in &frames {
            buf.extend_from_slice(&fed::encode(f, tx.max())?);
        }
        tx.send_raw(&buf).await?;
        link.counters
            .sent
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        metrics
            .fed_presence_frames
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        metrics
            .fed_presence_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
    }
}

impl Fed {
    /// Queues every local presence of `hub` for `link` as a snapshot (when the mesh
    /// starts flowing, or the fields that broker may see changed).
    pub(crate) fn send_presence_snapshot(&self, link: &LinkShared, hub: &MeshHub) {
        let m = &hub.row.id;
        // Taken under the link's presence queue lock: updates queued before it are
        // older than it (it replaces them), updates after it are newer.
        {
            let mut queue = lock(&link.presence);
            let entries: Vec<PresenceEntry> = hub
                .local_peers(|p| presence_entry(p, self.next_version()))
                .into_iter()
                .map(|mut e| {
                    self.strip_presence(m, &link.broker, Direction::Export, &mut e);
                    e
                })
                .collect();
            let mut sent = lock(&link.sent_at);
            sent.retain(|(mesh, _), _| mesh != m);
            for e in &entries {
                if let Some(at) = e.position {
                    sent.insert((m.clone(), e.key.clone()), at);
                }
            }
            drop(sent);
            queue.snapshot(
                m,
                Frame::PresenceSnapshot {
                    mesh_id: m.clone(),
                    entries,
                },
            );
        }
        link.presence_wake.notify_one();
    }

    /// A local presence of `mesh` appeared or changed.
    pub(crate) fn presence_changed(&self, mesh: &MeshHub, conn: ConnId) {
        if !self.is_shared(&mesh.row.id) {
            return;
        }
        let version = self.next_version();
        let Some(entry) = mesh.local_peer(conn, |p| presence_entry(p, version)) else {
            return;
        };
        let mesh_id = &mesh.row.id;
        for link in self.links_for(mesh_id) {
            let mut entry = entry.clone();
            self.strip_presence(mesh_id, &link.broker, Direction::Export, &mut entry);
            let key = entry.key.clone();
            let queued = link.queue_presence(
                mesh_id,
                &key,
                Frame::PresenceUpsert {
                    mesh_id: mesh_id.clone(),
                    entry: Box::new(entry),
                },
            );
            if !queued {
                self.reset_link(&link, Reset::PresenceFull);
            }
        }
    }

    /// A local presence left.
    pub(crate) fn presence_gone(&self, mesh_id: &str, key: &str) {
        if !self.is_shared(mesh_id) {
            return;
        }
        let version = self.next_version();
        for link in self.links_for(mesh_id) {
            let queued = link.queue_presence(
                mesh_id,
                key,
                Frame::PresenceGone {
                    mesh_id: mesh_id.to_owned(),
                    key: key.to_owned(),
                    version,
                },
            );
            if !queued {
                self.reset_link(&link, Reset::PresenceFull);
            }
        }
    }

    /// A local member joined or was revoked: announce it.
    pub(crate) fn member_changed(&self, mesh: &MeshHub, pubkey: &str) {
        let Some(m) = mesh.member(pubkey) else {
            return;
        };
        if m.home.is_some() {
            return;
        }
        let ann = MemberAnn {
            member_id: m.id,
            pubkey: pubkey.to_owned(),
            display_name: m.display_name,
            role: m.role,
            revoked: m.revoked,
        };
        // Checked and queued under the link's members lock, which `update_flowing` holds
        // while it queues the full list and marks the mesh flowing: an announcement is
        // either in that list or queued after it, never lost between the two.
        let links: Vec<Arc<LinkShared>> = lock(&self.links).values().cloned().collect();
        for link in links {
            let (queued, full) = {
                let mut q = lock(&link.members);
                let flows = lock(&link.flowing).contains(&mesh.row.id);
                let full = q.len() >= MEMBERS_QUEUE;
                if flows && !full {
                    q.push_back(Frame::Members {
                        mesh_id: mesh.row.id.clone(),
                        members: vec![ann.clone()],
                        full: false,
                    });
                }
                (flows && !full, flows && full)
            };
            if queued {
                link.outbox_wake.notify_one();
            }
            if full {
                // The peer broker is not taking announcements: start over (the next link
                // announces every member in full).
                self.reset_link(&link, Reset::MembersFull);
            }
        }
    }

    /// Peers of a lost link stay listed for `presence_grace`, then leave (unless the
    /// link came back, whose snapshot replaced them).
    pub(crate) fn schedule_presence_expiry(
        self: &Arc<Self>,
        ctx: Arc<Ctx>,
        broker: Arc<str>,
        meshes: HashSet<String>,
    ) {
        let me = self.clone();
        let grace = self.cfg.presence_grace;
        // One expiry per peer broker: a newer one takes over the meshes of a pending one
        // (a broker reconnecting quickly does not pile up timers).
        let cancel = self.stop.child_token();
        let mut meshes = meshes;
        if let Some((old, pending)) =
            lock(&self.expiries).insert(broker.to_string(), (cancel.clone(), HashSet::new()))
        {
            old.cancel();
            meshes.extend(pending);
        }
        if let Some(e) = lock(&self.expiries).get_mut(&*broker) {
            e.1.clone_from(&meshes);
        }
        self.tracker.spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(grace) => {}
            }
            {
                // Under the lock: a newer expiry cancels this one before it replaces the
                // entry, so an uncancelled token means the entry is this one's.
                let mut expiries = lock(&me.expiries);
                if cancel.is_cancelled() {
                    return;
                }
                expiries.remove(&*broker);
            }
            // A link that came back replaced these meshes' peers with its snapshot; the
            // ones it does not carry (unshared meanwhile, or not flowing yet) leave.
            let meshes: Vec<String> = match me.link(&broker) {
                Some(l) => meshes.into_iter().filter(|m| !l.flows(m)).collect(),
                None => meshes.into_iter().collect(),
            };
            let now = now_ms();
            for m in meshes {
                if let Some(hub) = ctx.hub.loaded(&m) {
                    hub.remote_drop(&broker, now);
                    crate::features::mcp::engine::broker_gone(&ctx, &hub, &broker);
                }
            }
            debug!(peer = %broker, "presence of a lost link expired");
        });
    }

    pub(crate) async fn inbound_presence(
        self: Arc<Self>,
        ctx: Arc<Ctx>,
        link: Arc<LinkShared>,
        mut rx: FrameReader,
    ) -> Result<(), LinkError> {
        while let Some(frame) = rx.recv().await? {
            link.counters.received.fetch_add(1, Ordering::Relaxed);
            let now = now_ms();
            let mesh_id = match &frame {
                Frame::PresenceSnapshot { mesh_id, .. }
                | Frame::PresenceUpsert { mesh_id, .. }
                | Frame::PresenceGone { mesh_id, .. } => mesh_id.clone(),
                Frame::BridgePeers { .. } | Frame::BridgePeerGone { .. } => {
                    self.on_bridge_peers(&ctx, &link, frame).await;
                    continue;
                }
                other => return Err(protocol_error(other, "presence")),
            };
            if !link.accepts(&mesh_id) {
                ctx.metrics
                    .fed_refused
                    .inc(RejectReason::NotShared.as_str());
                continue;
            }
            let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &mesh_id).await else {
                continue;
            };
            let caps = crate::hub::RemoteCaps::from_limits(&ctx.config.limits);
            let (refused, over) = match frame {
                Frame::PresenceSnapshot { entries, .. } => {
                    let (mut ok, bad): (Vec<_>, Vec<_>) =
                        entries.into_iter().partition(valid_entry);
                    for e in &mut ok {
                        self.strip_presence(&mesh_id, &link.broker, Direction::Import, e);
                    }
                    let viewers: Vec<_> = ok.iter().filter_map(|e| e.position).collect();
                    let (forged, over) = hub.remote_replace(&link.broker, ok, now, caps);
                    for v in viewers {
                        self.viewer_moved(&link, &hub, v);
                    }
                    (bad.len() + forged, over)
                }
                Frame::PresenceUpsert { mut entry, .. } if valid_entry(&entry) => {
                    self.strip_presence(&mesh_id, &link.broker, Direction::Import, &mut entry);
                    let viewer = entry.position;
                    match hub.remote_upsert(&link.broker, *entry, now, caps) {
                        crate::hub::RemoteUpsert::Accepted => {
                            if let Some(v) = viewer {
                                self.viewer_moved(&link, &hub, v);
                            }
                            (0, 0)
                        }
                        crate::hub::RemoteUpsert::Forged => (1, 0),
                        crate::hub::RemoteUpsert::OverLimit => (0, 1),
                    }
                }
                Frame::PresenceUpsert { .. } => (1, 0),
                Frame::PresenceGone { key, version, .. } => {
                    hub.remote_gone(&link.broker, &key, version, now);
                    (0, 0)
                }
                _ => (0, 0),
            };
            if refused > 0 {
                count_refused(&ctx, &link, RejectReason::ForgedSender, refused);
            }
            if over > 0 {
                // Not the peer broker's fault as such (the cap is ours): counted apart.
                link.counters
                    .refused
                    .fetch_add(over as u64, Ordering::Relaxed);
                ctx.metrics
                    .fed_refused
                    .inc_by("presence_limit", over as u64);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presence(key: &str, version: u64) -> Frame {
        Frame::PresenceGone {
            mesh_id: "m".into(),
            key: key.into(),
            version,
        }
    }

    fn versions(frames: Vec<Frame>) -> Vec<(String, u64)> {
        frames
            .into_iter()
            .map(|f| match f {
                Frame::PresenceGone { key, version, .. } => (key, version),
                Frame::PresenceSnapshot { entries, .. } => {
                    ("snapshot".into(), entries.len() as u64)
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn the_coalescer_keeps_the_newest_update_per_session_in_first_arrival_order() {
        let mut c = Coalescer::default();
        c.put("m", "k1", presence("k1", 1));
        c.put("m", "k2", presence("k2", 2));
        c.put("m", "k1", presence("k1", 3));
        assert_eq!(versions(c.take()), [("k1".into(), 3), ("k2".into(), 2)]);
        assert!(c.take().is_empty(), "taken once");
        // A snapshot supersedes every pending update of its mesh, not of others.
        c.put("m", "k1", presence("k1", 4));
        c.put("other", "k9", presence("k9", 5));
        c.snapshot(
            "m",
            Frame::PresenceSnapshot {
                mesh_id: "m".into(),
                entries: Vec::new(),
            },
        );
        assert_eq!(
            versions(c.take()),
            [("k9".into(), 5), ("snapshot".into(), 0)]
        );
    }
}
