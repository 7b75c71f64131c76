//! Topics (HEAD §1): named conversations of a mesh with a durable history. The seven
//! `topic_*` frames, the topic book kept in the mesh hub (`hub::topics`), topic keys,
//! mentions, unread counts, and replication to the mesh's other brokers. A post — a
//! WebSocket `send` to `#<topic>`, a REST `POST /messages`, an external API-key client,
//! a peer broker's copy — goes through the delivery pipeline (`delivery::submit`, its
//! topic route), which pushes it live to every connected session of every subscribed
//! member and every listener, and stores it once.
//!
//! Differences from the reference, on purpose: posts are pushed live (the reference
//! never pushes them and delivers each to at most one connection); a `#` target may
//! name a topic as well as its id, and must be a topic of the sender's mesh; new topic
//! names follow the web app's rule everywhere; topic ids are derived from the mesh and
//! the name, so two brokers that create the same topic agree on its id.

pub mod store;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use meshd_protocol::broker::BrokerFrame;
use meshd_protocol::time::iso8601_ms;
use meshd_protocol::topics::{
    HistoryMessage, Reply, Request, TopicEntry, TopicMemberEntry, TopicRef, TopicRole, Visibility,
};
use sha2::{Digest as _, Sha256};
use tracing::warn;

use crate::Ctx;
use crate::features::topics::store::{SealRow, TopicMessageRow, TopicRow};
use crate::hub::MeshHub;
use crate::hub::topics::TopicInfo;
use crate::session::*;
use crate::store::StoreError;
use axum::extract::ws::Utf8Bytes;

/// Most members one post notifies.
pub const MAX_MENTIONED: usize = 32;
/// How far back a peer broker's catch-up resends posts made here (ms).
pub const POST_CATCH_UP_MS: i64 = 7 * 24 * 3_600_000;
/// Most posts one catch-up resends per mesh.
pub const POST_CATCH_UP_ROWS: i64 = 10_000;

/// The id of topic `name` of `mesh_id`: the same on every broker of the mesh.
pub fn topic_id(mesh_id: &str, name: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"meshd-topic\0");
    h.update(mesh_id.as_bytes());
    h.update(b"\0");
    h.update(name.as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// What the origin of a topic post adds to its envelope; the pipeline fills in the
/// topic it resolved.
#[derive(Debug, Clone, Default)]
pub(crate) struct PostFields {
    pub(crate) reply_to_id: Option<String>,
    pub(crate) body_version: Option<i64>,
    /// Explicit mention tokens (a peer broker's copy carries the resolved tokens).
    pub(crate) mentions: Option<Vec<String>>,
    /// Set by the pipeline.
    pub(crate) topic_id: String,
    /// Set by the pipeline.
    pub(crate) topic_name: String,
}

/// Members of `mesh` whose display name, lowercased, is one of `tokens` (not
/// `sender`, not revoked), at most [`MAX_MENTIONED`].
pub(crate) fn mentioned(mesh: &MeshHub, tokens: &[String], sender: &str) -> Vec<String> {
    if tokens.is_empty() {
        return Vec::new();
    }
    let mut ids: Vec<String> = mesh
        .all_members()
        .into_iter()
        .filter(|(_, m)| {
            !m.revoked && m.id != sender && tokens.contains(&m.display_name.to_lowercase())
        })
        .map(|(_, m)| m.id)
        .collect();
    ids.sort();
    ids.dedup();
    ids.truncate(MAX_MENTIONED);
    ids
}

/// A new topic key sealed for `member_pubkey` the way the newest clients open it:
/// `base64(ephemeral x25519 pub ‖ crypto_box_easy(key))` and a random nonce. Returns
/// (encrypted key, nonce, ephemeral public key hex), or `None` for a key that is no
/// ed25519 point.
fn seal_new_key(member_pubkey: &str) -> Option<(String, String, String)> {
    use dryoc::classic::crypto_box::{crypto_box_easy, crypto_box_seed_keypair};
    use dryoc::classic::crypto_sign_ed25519::crypto_sign_ed25519_pk_to_curve25519;
    let ed: [u8; 32] = hex::decode(member_pubkey).ok()?.try_into().ok()?;
    let mut recipient = [0u8; 32];
    crypto_sign_ed25519_pk_to_curve25519(&mut recipient, &ed).ok()?;
    let (eph_pub, eph_sec) = crypto_box_seed_keypair(&crate::ids::random_bytes::<32>());
    let key = crate::ids::random_bytes::<32>();
    let nonce = crate::ids::random_bytes::<24>();
    let mut boxed = vec![0u8; 32 + 16];
    crypto_box_easy(&mut boxed, &key, &nonce, &recipient, &eph_sec).ok()?;
    let mut blob = eph_pub.to_vec();
    blob.extend_from_slice(&boxed);
    Some((
        STANDARD.encode(blob),
        STANDARD.encode(nonce),
        hex::encode(eph_pub),
    ))
}

/// Why a topic was not created.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CreateError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Creates topic `name` (or finds it) and subscribes `creator` as lead if it is not
/// subscribed yet. A new topic gets a key sealed for its creator when `encrypt` (the
/// reference's WebSocket path; the broker forgets the key at once). Returns the topic
/// and whether it was new.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn create(
    ctx: &Ctx,
    mesh: &MeshHub,
    name: &str,
    description: Option<String>,
    visibility: Visibility,
    creator: Option<(&str, &str)>,
    encrypt: bool,
    now: i64,
) -> Result<(TopicInfo, bool), CreateError> {
    let name = meshd_protocol::topics::normalize_name(name).map_err(CreateError::Invalid)?;
    let mesh_id = &mesh.row.id;
    let mut created = false;
    let topic = match mesh.topic(&name) {
        Some(t) => t,
        None => {
            let id = topic_id(mesh_id, &name);
            let seal = encrypt
                .then(|| creator.and_then(|(_, pk)| seal_new_key(pk)))
                .flatten();
            let row = TopicRow {
                id: id.clone(),
                mesh_id: mesh_id.clone(),
                name: name.clone(),
                description,
                visibility: visibility.as_str().to_owned(),
                created_by_member_id: creator.map(|(id, _)| id.to_owned()),
                encrypted_key_pubkey: seal.as_ref().map(|s| s.2.clone()),
                created_at: now,
            };
            created = ctx.db.put_topic(&row).await?;
            if created {
                if let (Some((member_id, pk)), Some((key, nonce, _))) = (creator, &seal) {
                    let s = SealRow {
                        topic_id: id.clone(),
                        member_id: member_id.to_owned(),
                        encrypted_key: key.clone(),
                        nonce: nonce.clone(),
                        sealed_for: pk.to_owned(),
                        created_at: now,
                        rotated_at: None,
                    };
                    ctx.db.put_seal(&s).await?;
                    if let Some(fed) = &ctx.fed {
                        fed.topic_sealed(mesh_id, &s);
                    }
                }
                if let Some(fed) = &ctx.fed {
                    fed.topic_changed(&row);
                }
            }
            // What is stored: ours, or the copy a peer broker (or a race) stored first.
            let stored = ctx
                .db
                .topic_row(&id)
                .await?
                .ok_or_else(|| CreateError::Invalid("the topic vanished".into()))?;
            mesh.topic_put(stored.into());
            mesh.topic(&id)
                .ok_or_else(|| CreateError::Invalid("the topic vanished".into()))?
        }
    };
    if let Some((member_id, pk)) = creator {
        subscribe(
            ctx,
            mesh,
            &topic.id,
            member_id,
            pk,
            TopicRole::Lead,
            false,
            now,
        )
        .await?;
    }
    Ok((topic, created))
}

/// Subscribes a member (keeping an existing role unless `replace`) and tells the
/// mesh's other brokers.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn subscribe(
    ctx: &Ctx,
    mesh: &MeshHub,
    topic_id: &str,
    member_id: &str,
    member_pubkey: &str,
    role: TopicRole,
    replace: bool,
    now: i64,
) -> Result<(), StoreError> {
    if ctx
        .db
        .join_topic(topic_id, member_id, role.as_str(), now, replace)
        .await?
    {
        mesh.topic_join(topic_id, member_id, role, replace);
        if let Some(fed) = &ctx.fed {
            fed.topic_member_changed(mesh, topic_id, member_id, member_pubkey, role, true, now);
        }
    }
    Ok(())
}

/// Unsubscribes a member and tells the mesh's other brokers.
pub(crate) async fn unsubscribe(
    ctx: &Ctx,
    mesh: &MeshHub,
    topic_id: &str,
    member_id: &str,
    member_pubkey: &str,
    now: i64,
) -> Result<(), StoreError> {
    if ctx.db.leave_topic(topic_id, member_id).await? {
        mesh.topic_leave(topic_id, member_id);
        if let Some(fed) = &ctx.fed {
            fed.topic_member_changed(
                mesh,
                topic_id,
                member_id,
                member_pubkey,
                TopicRole::Member,
                false,
                now,
            );
        }
    }
    Ok(())
}

/// `#general` exists in every mesh (created unencrypted, like the reference's CLI path;
/// its id is the same on every broker, so replicas creating it agree).
pub(crate) async fn ensure_general(
    ctx: &Ctx,
    mesh: &MeshHub,
    now: i64,
) -> Result<TopicInfo, StoreError> {
    if let Some(t) = mesh.topic("general") {
        return Ok(t);
    }
    match create(
        ctx,
        mesh,
        "general",
        None,
        Visibility::Public,
        None,
        false,
        now,
    )
    .await
    {
        Ok((t, _)) => Ok(t),
        Err(CreateError::Store(e)) => Err(e),
        Err(CreateError::Invalid(m)) => Err(StoreError::Corrupt(m)),
    }
}

/// The history of a topic as `topic_history_response` shows it.
fn history_entry(m: TopicMessageRow) -> HistoryMessage {
    HistoryMessage {
        sender_pubkey: m.sender_session_pubkey.unwrap_or(m.sender_member_pubkey),
        id: m.id,
        sender_member_id: m.sender_member_id,
        sender_name: m.sender_name,
        nonce: m.nonce,
        ciphertext: m.ciphertext,
        body_version: m.body_version,
        reply_to_id: m.reply_to_id,
        created_at: iso8601_ms(m.created_at),
    }
}

impl Session {
    /// The topic a fire-and-forget frame names: `Err` carries the answer to send
    /// instead (`topic_not_found` to a frame with `_reqId`, else nothing).
    fn named_topic(
        &self,
        topic: &str,
        req_id: Option<&String>,
    ) -> Result<TopicInfo, Option<Utf8Bytes>> {
        self.mesh.topic(topic).ok_or_else(|| {
            req_id.and_then(|r| {
                error(
                    "topic_not_found",
                    format!("topic {topic:?} not found"),
                    Some(r.clone()),
                )
            })
        })
    }

    /// Runs a store write that gets no answer unless it fails and its frame carried
    /// `_reqId`.
    fn write_silently(
        &mut self,
        what: &'static str,
        req_id: Option<String>,
        write: impl Future<Output = Result<(), StoreError>> + Send + 'static,
    ) {
        self.reply_later(async move {
            let e = write.await.err()?;
            req_id.and_then(|r| store_unavailable(what, Some(r), &e))
        });
    }

    /// The seven `topic_*` frames.
    pub(crate) fn on_topic(
        &mut self,
        request: Request,
        req_id: Option<String>,
        now: i64,
    ) -> Option<Utf8Bytes> {
        let not_found = |t: &str, req_id: Option<String>| {
            error("topic_not_found", format!("topic {t:?} not found"), req_id)
        };
        let ctx = self.ctx.clone();
        let mesh = self.mesh.clone();
        let (member_id, member_pubkey) = (self.member_id.clone(), self.member_pubkey.clone());
        match request {
            Request::List => {
                let topics = mesh
                    .topics()
                    .into_iter()
                    .map(|t| TopicEntry {
                        member_count: t.members.len(),
                        id: t.id,
                        name: t.name,
                        description: t.description,
                        visibility: t.visibility,
                        created_at: iso8601_ms(t.created_at),
                    })
                    .collect();
                Some(
                    BrokerFrame::Topic(Reply::TopicListResponse { topics, req_id })
                        .to_json()
                        .into(),
                )
            }
            Request::Create {
                name,
                description,
                visibility,
            } => {
                self.reply_later(async move {
                    match create(
                        &ctx,
                        &mesh,
                        &name,
                        description,
                        visibility,
                        Some((&member_id, &member_pubkey)),
                        true,
                        now,
                    )
                    .await
                    {
                        Ok((t, created)) => Some(
                            BrokerFrame::Topic(Reply::TopicCreated {
                                topic: TopicRef {
                                    id: t.id,
                                    name: t.name,
                                    visibility,
                                },
                                created,
                                req_id,
                            })
                            .to_json()
                            .into(),
                        ),
                        Err(CreateError::Invalid(m)) => error("invalid", m, req_id),
                        Err(CreateError::Store(e)) => store_unavailable("topic_create", req_id, &e),
                    }
                });
                None
            }
            // Fire-and-forget frames (as the reference: no answer on success; a failure
            // is answered only to a frame carrying `_reqId`).
            Request::Join { topic, role } => {
                let t = match self.named_topic(&topic, req_id.as_ref()) {
                    Ok(t) => t,
                    Err(answer) => return answer,
                };
                self.write_silently("topic_join", req_id, async move {
                    subscribe(
                        &ctx,
                        &mesh,
                        &t.id,
                        &member_id,
                        &member_pubkey,
                        role,
                        false,
                        now,
                    )
                    .await
                });
                None
            }
            Request::Leave { topic } => {
                let t = match self.named_topic(&topic, req_id.as_ref()) {
                    Ok(t) => t,
                    Err(answer) => return answer,
                };
                self.write_silently("topic_leave", req_id, async move {
                    unsubscribe(&ctx, &mesh, &t.id, &member_id, &member_pubkey, now).await
                });
                None
            }
            Request::MarkRead { topic } => {
                let t = match self.named_topic(&topic, req_id.as_ref()) {
                    Ok(t) => t,
                    Err(answer) => return answer,
                };
                self.write_silently("topic_mark_read", req_id, async move {
                    ctx.db
                        .mark_topic_read(&t.id, &member_id, now, false)
                        .await
                        .map(drop)
                });
                None
            }
            Request::Members { topic } => {
                let Some(t) = mesh.topic(&topic) else {
                    return not_found(&topic, req_id);
                };
                self.reply_later(async move {
                    let rows = match ctx.db.topic_members(&t.id).await {
                        Ok(r) => r,
                        Err(e) => return store_unavailable("topic_members", req_id, &e),
                    };
                    let names = mesh.members_by_id();
                    let mut members: Vec<TopicMemberEntry> = rows
                        .into_iter()
                        .filter_map(|r| {
                            let (pubkey, m) = names.get(&r.member_id)?;
                            Some(TopicMemberEntry {
                                member_id: r.member_id,
                                pubkey: pubkey.clone(),
                                display_name: m.display_name.clone(),
                                role: TopicRole::parse(&r.role),
                                joined_at: iso8601_ms(r.joined_at),
                                last_read_at: r.last_read_at.map(iso8601_ms),
                            })
                        })
                        .collect();
                    members.sort_by(|a, b| a.display_name.cmp(&b.display_name));
                    Some(
                        BrokerFrame::Topic(Reply::TopicMembersResponse {
                            topic,
                            members,
                            req_id,
                        })
                        .to_json()
                        .into(),
                    )
                });
                None
            }
            Request::History {
                topic,
                limit,
                before_id,
            } => {
                let Some(t) = mesh.topic(&topic) else {
                    return not_found(&topic, req_id);
                };
                self.reply_later(async move {
                    match ctx
                        .db
                        .topic_history(&t.id, limit, before_id.as_deref())
                        .await
                    {
                        Ok(rows) => Some(
                            BrokerFrame::Topic(Reply::TopicHistoryResponse {
                                topic,
                                messages: rows.into_iter().map(history_entry).collect(),
                                req_id,
                            })
                            .to_json()
                            .into(),
                        ),
                        Err(e) => store_unavailable("topic_history", req_id, &e),
                    }
                });
                None
            }
        }
    }
}

#[allow(unused_imports)]
pub(crate) use replication::*;

/// Replication across brokers: a peer's topics, subscriptions, seals and posts, and
/// this broker's part of a link's catch-up.
mod replication {
    use meshd_protocol::fed::{
        Frame, RejectReason, TopicMemberSet, TopicPostSet, TopicSealSet, TopicSet,
    };
    use meshd_protocol::topics::TopicRole;

    use super::*;
    use crate::fed::*;

    fn valid_id(s: &str) -> bool {
        !s.is_empty() && s.len() <= 64
    }

    /// Stores a peer's topic (or its key flag).
    pub(crate) async fn apply_topic(
        ctx: &Ctx,
        link: &LinkShared,
        t: TopicSet,
    ) -> Result<(), RejectReason> {
        if !link.accepts(&t.mesh_id) {
            return Err(RejectReason::NotShared);
        }
        let name_ok = meshd_protocol::topics::normalize_name(&t.name).is_ok_and(|n| n == t.name);
        if !name_ok
            || t.id != topic_id(&t.mesh_id, &t.name)
            || t.description.as_ref().is_some_and(|d| d.len() > 1024)
        {
            return Err(RejectReason::Invalid);
        }
        let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &t.mesh_id).await else {
            return Err(RejectReason::NotShared);
        };
        let row = TopicRow {
            id: t.id,
            mesh_id: t.mesh_id,
            name: t.name,
            description: t.description,
            visibility: meshd_protocol::topics::Visibility::parse(&t.visibility)
                .as_str()
                .to_owned(),
            created_by_member_id: t.created_by,
            encrypted_key_pubkey: t.encrypted_key_pubkey,
            created_at: t.created_at,
        };
        ctx.db.put_topic(&row).await.map_err(|e| {
            warn!(cause = %e, "storing a peer's topic");
            RejectReason::Invalid
        })?;
        if let Ok(Some(stored)) = ctx.db.topic_row(&row.id).await {
            hub.topic_put(stored.into());
        }
        Ok(())
    }

    /// A subscription change of a member the peer hosts.
    pub(crate) async fn apply_topic_member(
        ctx: &Ctx,
        link: &LinkShared,
        m: TopicMemberSet,
    ) -> Result<(), RejectReason> {
        if !link.accepts(&m.mesh_id) {
            return Err(RejectReason::NotShared);
        }
        let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &m.mesh_id).await else {
            return Err(RejectReason::NotShared);
        };
        if !speaks_for(&hub, &link.broker, &m.member_id, &m.member_pubkey) {
            return Err(RejectReason::ForgedSender);
        }
        if hub.topic(&m.topic_id).is_none_or(|t| t.id != m.topic_id) {
            return Err(RejectReason::Invalid);
        }
        let role = TopicRole::parse(&m.role);
        let r = if m.joined {
            ctx.db
                .join_topic(&m.topic_id, &m.member_id, role.as_str(), m.at, true)
                .await
                .map(|_| {
                    hub.topic_join(&m.topic_id, &m.member_id, role, true);
                })
        } else {
            ctx.db
                .leave_topic(&m.topic_id, &m.member_id)
                .await
                .map(|_| {
                    hub.topic_leave(&m.topic_id, &m.member_id);
                })
        };
        r.map_err(|e| {
            warn!(cause = %e, "storing a peer's topic subscription");
            RejectReason::Invalid
        })
    }

    /// A topic key sealed (anywhere) for a member of a topic.
    pub(crate) async fn apply_topic_seal(
        ctx: &Ctx,
        link: &LinkShared,
        s: TopicSealSet,
    ) -> Result<(), RejectReason> {
        if !link.accepts(&s.mesh_id) {
            return Err(RejectReason::NotShared);
        }
        if s.encrypted_key.len() > 4096 || s.nonce.len() > 64 || !valid_id(&s.member_id) {
            return Err(RejectReason::Invalid);
        }
        let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &s.mesh_id).await else {
            return Err(RejectReason::NotShared);
        };
        if hub.topic(&s.topic_id).is_none_or(|t| t.id != s.topic_id) {
            return Err(RejectReason::Invalid);
        }
        let row = SealRow {
            topic_id: s.topic_id,
            member_id: s.member_id,
            encrypted_key: s.encrypted_key,
            nonce: s.nonce,
            sealed_for: s.sealed_for,
            created_at: s.at,
            rotated_at: None,
        };
        ctx.db.put_seal(&row).await.map_err(|e| {
            warn!(cause = %e, "storing a peer's topic seal");
            RejectReason::Invalid
        })
    }

    /// A post by a member the peer hosts: delivered here once (a copy sent again, by a
    /// catch-up, is recognised by its id and ignored).
    pub(crate) async fn apply_topic_post(
        ctx: &Ctx,
        link: &LinkShared,
        p: TopicPostSet,
    ) -> Result<(), RejectReason> {
        use crate::delivery::{self, Author, Body, Envelope, Origin, Target};
        if !link.accepts(&p.mesh_id) {
            return Err(RejectReason::NotShared);
        }
        if !valid_id(&p.id) || p.mentions.len() > meshd_protocol::topics::MAX_MENTIONS {
            return Err(RejectReason::Invalid);
        }
        let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &p.mesh_id).await else {
            return Err(RejectReason::NotShared);
        };
        if !speaks_for(
            &hub,
            &link.broker,
            &p.sender_member_id,
            &p.sender_member_pubkey,
        ) {
            return Err(RejectReason::ForgedSender);
        }
        if hub.topic(&p.topic_id).is_none_or(|t| t.id != p.topic_id) {
            return Err(RejectReason::Invalid);
        }
        match ctx.db.topic_message_exists(&p.topic_id, &p.id).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => {
                warn!(cause = %e, "checking a peer's topic post");
                return Err(RejectReason::Invalid);
            }
        }
        let env = Envelope {
            id: p.id,
            mesh: hub,
            sender_pubkey: p
                .sender_session_pubkey
                .unwrap_or_else(|| p.sender_member_pubkey.clone()),
            author: Some(Author {
                member_id: p.sender_member_id,
                member_pubkey: p.sender_member_pubkey,
                name: p.sender_name,
            }),
            target: Target::Spec(meshd_protocol::TargetSpec::Channel(p.topic_id.clone())),
            target_spec: format!("#{}", p.topic_id),
            priority: meshd_protocol::Priority::Next,
            body: Body::Sealed {
                nonce: p.nonce,
                ciphertext: p.ciphertext,
            },
            subtype: None,
            client_message_id: None,
            created_at: p.created_at,
            expires_at: p.created_at,
            origin: Origin::Peer {
                broker: link.broker.clone(),
                seq: None,
            },
            tags: Vec::new(),
            bridged: None,
            topic: Some(Box::new(PostFields {
                reply_to_id: p.reply_to_id,
                body_version: Some(p.body_version),
                mentions: Some(p.mentions),
                ..PostFields::default()
            })),
        };
        let accepted = delivery::submit(ctx, env, p.created_at).map_err(|e| e.reject_reason())?;
        if let Some((op, commit)) = accepted.write {
            if ctx.writer.send(op).await.is_err() {
                return Err(RejectReason::Invalid);
            }
            if let Err(e) = commit.committed().await {
                warn!(cause = %e, "storing a peer's topic post");
                return Err(RejectReason::Invalid);
            }
        }
        Ok(())
    }

    /// Catch-up: every topic, the subscriptions of members hosted here, every seal
    /// (a seal may be made here for anyone), and the posts made here in the last
    /// [`POST_CATCH_UP_MS`] (the receiver keeps those it lacks).
    pub(crate) async fn catch_up(c: &CatchUp<'_>) -> bool {
        let mesh_id = c.mesh_id().to_owned();
        let local = c.local_members();
        let topics = c.ctx.db.topic_rows(&mesh_id).await;
        if !c
            .send_rows("topics", topics, |t| {
                Some(Frame::Topic(Box::new(topic_set(&t))))
            })
            .await
        {
            return false;
        }
        let members = c.ctx.db.topic_memberships(&mesh_id).await;
        if !c
            .send_rows("topic members", members, |m| {
                let pk = local.get(&m.member_id)?;
                Some(Frame::TopicMember(Box::new(TopicMemberSet {
                    mesh_id: mesh_id.clone(),
                    topic_id: m.topic_id,
                    member_id: m.member_id,
                    member_pubkey: pk.clone(),
                    role: m.role,
                    joined: true,
                    at: m.joined_at,
                })))
            })
            .await
        {
            return false;
        }
        let seals = c.ctx.db.mesh_seals(&mesh_id).await;
        if !c
            .send_rows("topic seals", seals, |s| {
                Some(Frame::TopicSeal(Box::new(seal_set(&mesh_id, &s))))
            })
            .await
        {
            return false;
        }
        let since = crate::time::now_ms() - POST_CATCH_UP_MS;
        let posts = c
            .ctx
            .db
            .local_topic_posts_since(&mesh_id, since, POST_CATCH_UP_ROWS)
            .await;
        c.send_rows("topic posts", posts, |m| {
            let tokens = mention_tokens_of(&m);
            Some(Frame::TopicPost(Box::new(post_set(m, tokens))))
        })
        .await
    }

    /// A stored post's mention tokens (recomputed from a v1 body; a v2 post's explicit
    /// list is not stored, its notifications are).
    fn mention_tokens_of(m: &TopicMessageRow) -> Vec<String> {
        meshd_protocol::topics::mention_tokens(None, m.body_version, &m.ciphertext)
    }

    pub(crate) fn topic_set(t: &TopicRow) -> TopicSet {
        TopicSet {
            mesh_id: t.mesh_id.clone(),
            id: t.id.clone(),
            name: t.name.clone(),
            description: t.description.clone(),
            visibility: t.visibility.clone(),
            created_by: t.created_by_member_id.clone(),
            encrypted_key_pubkey: t.encrypted_key_pubkey.clone(),
            created_at: t.created_at,
        }
    }

    pub(crate) fn seal_set(mesh_id: &str, s: &SealRow) -> TopicSealSet {
        TopicSealSet {
            mesh_id: mesh_id.to_owned(),
            topic_id: s.topic_id.clone(),
            member_id: s.member_id.clone(),
            encrypted_key: s.encrypted_key.clone(),
            nonce: s.nonce.clone(),
            sealed_for: s.sealed_for.clone(),
            at: s.rotated_at.unwrap_or(s.created_at),
        }
    }

    pub(crate) fn post_set(m: TopicMessageRow, mentions: Vec<String>) -> TopicPostSet {
        TopicPostSet {
            mesh_id: m.mesh_id,
            id: m.id,
            topic_id: m.topic_id,
            sender_member_id: m.sender_member_id,
            sender_member_pubkey: m.sender_member_pubkey,
            sender_session_pubkey: m.sender_session_pubkey,
            sender_name: m.sender_name,
            nonce: m.nonce,
            ciphertext: m.ciphertext,
            body_version: m.body_version,
            reply_to_id: m.reply_to_id,
            mentions,
            created_at: m.created_at,
        }
    }

    /// Telling the mesh's other brokers of a change made here.
    impl crate::fed::Fed {
        /// A topic was created here (or its key flag set).
        pub(crate) fn topic_changed(&self, t: &TopicRow) {
            self.to_every_link(&t.mesh_id, Frame::Topic(Box::new(topic_set(t))));
        }

        /// A member hosted here subscribed or left.
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn topic_member_changed(
            &self,
            mesh: &MeshHub,
            topic_id: &str,
            member_id: &str,
            member_pubkey: &str,
            role: TopicRole,
            joined: bool,
            at: i64,
        ) {
            if mesh.member(member_pubkey).is_none_or(|m| m.home.is_some()) {
                return;
            }
            self.to_every_link(
                &mesh.row.id,
                Frame::TopicMember(Box::new(TopicMemberSet {
                    mesh_id: mesh.row.id.clone(),
                    topic_id: topic_id.to_owned(),
                    member_id: member_id.to_owned(),
                    member_pubkey: member_pubkey.to_owned(),
                    role: role.as_str().to_owned(),
                    joined,
                    at,
                })),
            );
        }

        /// A topic key was sealed here.
        pub(crate) fn topic_sealed(&self, mesh_id: &str, s: &SealRow) {
            self.to_every_link(mesh_id, Frame::TopicSeal(Box::new(seal_set(mesh_id, s))));
        }

        /// A post was made here.
        pub(crate) fn topic_posted(&self, p: TopicPostSet) {
            let mesh_id = p.mesh_id.clone();
            self.to_every_link(&mesh_id, Frame::TopicPost(Box::new(p)));
        }
    }
}

/// Opens nothing: the broker never holds a topic key after creation. Exposed for the
/// tests of the sealing format.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_derived_and_stable() {
        let a = topic_id("mesh-1", "general");
        assert_eq!(a, topic_id("mesh-1", "general"));
        assert_ne!(a, topic_id("mesh-2", "general"));
        assert_eq!(a.len(), 32);
        assert!(meshd_protocol::topics::looks_like_id(&a));
    }

    #[test]
    fn a_new_key_is_sealed_in_the_clients_layout() {
        use dryoc::classic::crypto_box::crypto_box_open_easy;
        use dryoc::classic::crypto_sign_ed25519::crypto_sign_ed25519_sk_to_curve25519;
        let member = meshd_protocol::keys::SecretKey::from_seed([9; 32]);
        let Some((blob, nonce, eph)) = seal_new_key(&member.public().to_hex()) else {
            panic!("not sealed")
        };
        let blob = STANDARD.decode(blob).unwrap_or_default();
        let nonce: [u8; 24] = STANDARD
            .decode(nonce)
            .unwrap_or_default()
            .try_into()
            .unwrap_or([0; 24]);
        assert_eq!(
            blob.len(),
            80,
            "32-byte sender key + 48-byte box, as the clients read it"
        );
        assert_eq!(hex::encode(&blob[..32]), eph);
        let mut x_sec = [0u8; 32];
        let sk: [u8; 64] = hex::decode(member.to_hex())
            .unwrap_or_default()
            .try_into()
            .unwrap_or([0; 64]);
        crypto_sign_ed25519_sk_to_curve25519(&mut x_sec, &sk);
        let sender: [u8; 32] = blob[..32].try_into().unwrap_or([0; 32]);
        let mut key = [0u8; 32];
        assert!(crypto_box_open_easy(&mut key, &blob[32..], &nonce, &sender, &x_sec).is_ok());
        assert!(seal_new_key("zz").is_none());
    }
}
