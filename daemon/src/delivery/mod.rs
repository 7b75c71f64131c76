//! The delivery pipeline: every message takes one path, whatever its origin.
//!
//! An origin — a client's `send`, a schedule firing, a webhook post, a message a peer
//! broker forwarded — checks what only it can (a client's rate and syntax, a peer's
//! right to speak for the sender) and builds an [`Envelope`]. [`submit`] does the rest,
//! in this order: policy (size, then quota), routing (the key a direct message is for;
//! the live peers of a multicast), live fan-out, forwarding to peer brokers, and the
//! store write. The write is handed back rather than sent ([`Accepted::write`]): a
//! session queues it behind its own writes, the other origins send it to the writer.
//!
//! A routing rule — a tag or spatial filter, a link policy — is added here, once.

mod push;
pub(crate) mod router;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use meshd_protocol::fed::RejectReason;
use meshd_protocol::{Priority, TargetSpec};
use tokio::sync::oneshot;

pub(crate) use push::{lease_until, stored as stored_push, system as system_push};

use crate::Ctx;
use crate::hub::{ConnId, DirectRoute, MeshHub};
use crate::quota::QuotaExceeded;
use crate::store::StoreError;
use crate::store::writer::NewMessage;
use router::{Delivery, DirectKey, ForwardSink, Op};

/// Where a message comes from: decides whom fan-out skips, whether it may be forwarded
/// to peer brokers (only what started here: one hop), and what is audited.
#[derive(Debug, Clone)]
pub(crate) enum Origin {
    /// A client's `send` over this connection (which its own multicast skips).
    Client { conn: ConnId },
    /// A schedule of this broker firing.
    Schedule { id: String },
    /// An inbound webhook post.
    Webhook,
    /// A peer broker forwarded it. A stored message carries its position in that
    /// broker's outbox, recorded with the row so a resend is recognised after any crash.
    Peer { broker: Arc<str>, seq: Option<i64> },
    /// The REST API (`crate::api`), for a key's member.
    Api,
    /// A bridge relayed it from another mesh of this broker (`features::bridges`):
    /// delivered live here and relayed on, never forwarded to peer brokers (its sender
    /// is no member of this mesh).
    Bridge,
}

impl Origin {
    /// The connection fan-out and routing skip (0 is nobody).
    fn conn(&self) -> ConnId {
        match self {
            Self::Client { conn } => *conn,
            _ => 0,
        }
    }

    fn is_local(&self) -> bool {
        !matches!(self, Self::Peer { .. } | Self::Bridge)
    }

    /// Whether a multicast from here is relayed over the mesh's bridges: what entered
    /// the mesh at this broker (a peer broker's copy is relayed by that broker).
    fn relays(&self) -> bool {
        !matches!(self, Self::Peer { .. })
    }
}

/// The member a message is from.
#[derive(Debug, Clone)]
pub(crate) struct Author {
    pub(crate) member_id: String,
    pub(crate) member_pubkey: String,
    pub(crate) name: String,
}

/// What is addressed.
#[derive(Debug)]
pub(crate) enum Target {
    /// As a client wrote it (direct, `*`, `@group`, or a form this broker refuses).
    Spec(TargetSpec),
    /// A direct message to this key, already resolved by the broker that forwarded it.
    Key(String),
    /// Every live connection of the mesh, hidden ones included (webhook events).
    Everyone,
}

/// What is delivered.
#[derive(Debug)]
pub(crate) enum Body {
    /// An end-to-end encrypted envelope (base64), or a reminder's plain text (empty nonce).
    Sealed { nonce: String, ciphertext: String },
    /// A named event with a JSON payload (webhooks).
    Event {
        name: String,
        data: Box<serde_json::value::RawValue>,
    },
}

/// A message on its way.
#[derive(Debug)]
pub(crate) struct Envelope {
    pub(crate) id: String,
    pub(crate) mesh: Arc<MeshHub>,
    /// The sender's session key if it announced one, else its member key; a webhook's
    /// `webhook:<name>`.
    pub(crate) sender_pubkey: String,
    /// `None` for a webhook.
    pub(crate) author: Option<Author>,
    pub(crate) target: Target,
    /// The target as sent (stored and forwarded verbatim).
    pub(crate) target_spec: String,
    pub(crate) priority: Priority,
    pub(crate) body: Body,
    pub(crate) subtype: Option<String>,
    pub(crate) client_message_id: Option<String>,
    pub(crate) created_at: i64,
    pub(crate) expires_at: i64,
    pub(crate) origin: Origin,
    /// The message's tags (a `tag:NAME` target's NAME among them), checked by the origin.
    pub(crate) tags: Vec<String>,
    /// Set when the sender is in another mesh: a DM to a bridged peer, a relayed
    /// multicast (with its path).
    pub(crate) bridged: Option<meshd_protocol::broker::Bridged>,
    /// A topic post's fields (`#` targets; `features::topics`).
    pub(crate) topic: Option<Box<crate::features::topics::PostFields>>,
}

impl Envelope {
    /// A multicast another broker sent (forwarded within its mesh, or relayed by a
    /// bridge), with its target, priority and tags already checked by the caller.
    pub(crate) fn from_multicast(
        m: meshd_protocol::fed::Multicast,
        mesh: Arc<MeshHub>,
        target: TargetSpec,
        priority: Priority,
        tags: Vec<String>,
        origin: Origin,
    ) -> Self {
        Self {
            id: m.id,
            mesh,
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
            origin,
            tags,
            bridged: None,
            topic: None,
        }
    }

    /// The federation frame of a sealed multicast with an author (`None` otherwise).
    pub(crate) fn to_multicast(&self) -> Option<meshd_protocol::fed::Multicast> {
        let (Some(author), Body::Sealed { nonce, ciphertext }) = (&self.author, &self.body) else {
            return None;
        };
        Some(meshd_protocol::fed::Multicast {
            mesh_id: self.mesh.row.id.clone(),
            id: self.id.clone(),
            sender_member_id: author.member_id.clone(),
            sender_member_pubkey: author.member_pubkey.clone(),
            sender_pubkey: self.sender_pubkey.clone(),
            sender_name: author.name.clone(),
            target_spec: self.target_spec.clone(),
            priority: self.priority.rank(),
            nonce: nonce.clone(),
            ciphertext: ciphertext.clone(),
            client_message_id: self.client_message_id.clone(),
            created_at: self.created_at,
            subtype: self.subtype.clone(),
            tags: self.tags.clone(),
        })
    }
}

/// Why a message was not accepted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    /// A target form this broker does not route.
    #[error("{0}")]
    Unroutable(String),
    #[error("message too large: {size} bytes (max {max})")]
    TooLarge { size: usize, max: usize },
    #[error("{code}: {0}", code = QuotaExceeded::CODE)]
    Quota(#[from] QuotaExceeded),
    #[error("no member or session of this mesh has the key {0}")]
    UnknownRecipient(String),
    #[error("the recipient was removed from this mesh")]
    RevokedRecipient,
    /// A `#` target that is no topic of the sender's mesh.
    #[error("topic {0:?} not found in this mesh")]
    UnknownTopic(String),
    /// The recipient lives on a broker this mesh is not shared with; for a message from
    /// a peer, any recipient not hosted here (a broker never forwards what it was
    /// forwarded).
    #[error("the recipient is hosted by broker {0}, which this mesh is not shared with")]
    NotHere(Arc<str>),
    /// This broker's export policy for the recipient's broker refuses the message.
    #[error("policy_denied: this broker's export policy for {broker} refuses it: {denied}")]
    Policy {
        broker: Arc<str>,
        denied: crate::fed::policy::Denied,
    },
}

impl Refused {
    /// The label counted in `meshd_messages_rejected_total`.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            Self::Unroutable(_) | Self::NotHere(_) => "unroutable_target",
            Self::TooLarge { .. } => "too_large",
            Self::Quota(_) => QuotaExceeded::CODE,
            Self::UnknownRecipient(_) => "unknown_recipient",
            Self::RevokedRecipient => "revoked_recipient",
            Self::UnknownTopic(_) => "topic_not_found",
            Self::Policy { .. } => "policy_denied",
        }
    }

    /// The answer to the peer broker that forwarded the message.
    pub(crate) fn reject_reason(&self) -> RejectReason {
        match self {
            Self::Unroutable(_) | Self::TooLarge { .. } => RejectReason::Invalid,
            Self::Quota(_) => RejectReason::OverQuota,
            Self::UnknownRecipient(_) | Self::NotHere(_) | Self::UnknownTopic(_) => {
                RejectReason::UnknownRecipient
            }
            Self::RevokedRecipient => RejectReason::Revoked,
            Self::Policy { .. } => RejectReason::Policy,
        }
    }
}

/// An accepted message.
#[derive(Debug)]
pub(crate) struct Accepted {
    pub(crate) message_id: String,
    /// The row to store (none for what is live-only: a multicast from a peer broker,
    /// a webhook event), and how to learn that it is committed.
    pub(crate) write: Option<(Op, Commit)>,
    /// Live connections the message was queued for (multicasts and events).
    pub(crate) delivered: usize,
    /// Whether it went out live already (a multicast): a store failure afterwards lost
    /// only its metadata.
    pub(crate) live: bool,
}

/// The commit of an accepted message's row.
#[derive(Debug)]
pub(crate) struct Commit {
    rx: oneshot::Receiver<Result<(), StoreError>>,
    /// The peer broker whose outbox the row joined.
    forward: Option<(Arc<crate::fed::Fed>, Arc<str>)>,
}

impl Commit {
    /// Waits for the row's commit; then a row bound for a peer broker is forwarded.
    ///
    /// # Errors
    /// The store's error, or [`StoreError::Closed`] when the writer stopped.
    pub(crate) async fn committed(self) -> Result<(), StoreError> {
        match self.rx.await {
            Ok(Ok(())) => {
                if let Some((fed, peer)) = self.forward {
                    fed.outbox_ready(&peer);
                }
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Closed),
        }
    }
}

/// Where an addressed message goes.
enum Route {
    Direct(String),
    Topic(String),
    Multicast(TargetSpec),
    Everyone,
}

impl Route {
    fn of(target: Target) -> Result<Self, Refused> {
        match target {
            Target::Key(key) => Ok(Self::Direct(key)),
            Target::Everyone => Ok(Self::Everyone),
            Target::Spec(TargetSpec::Direct(pk)) => Ok(Self::Direct(pk.to_hex())),
            Target::Spec(
                spec @ (TargetSpec::Broadcast | TargetSpec::Group(_) | TargetSpec::Tag(_)),
            ) => Ok(Self::Multicast(spec)),
            Target::Spec(TargetSpec::Channel(t)) => Ok(Self::Topic(t)),
            Target::Spec(TargetSpec::Name(n)) => Err(Refused::Unroutable(format!(
                "no peer has the key {n:?}: address a member or session key (resolve names with list_peers), @group or *"
            ))),
        }
    }
}

/// Takes a message through policy, routing, live fan-out and forwarding, and returns
/// its store write for the caller to queue.
///
/// # Errors
/// [`Refused`]: nothing was delivered, stored or forwarded.
pub(crate) fn submit(ctx: &Ctx, mut env: Envelope, now: i64) -> Result<Accepted, Refused> {
    let max = ctx.config.limits.max_message_bytes;
    if let Body::Sealed { nonce, ciphertext } = &env.body {
        let size = nonce.len() + ciphertext.len() + env.target_spec.len();
        if size > max {
            return Err(Refused::TooLarge { size, max });
        }
    }
    // The live dashboards see every message that passes here, described, never read.
    let seen = crate::features::dashboard::describe(&env, now);
    let mesh = seen.as_ref().map(|_| env.mesh.clone());
    let target = std::mem::replace(&mut env.target, Target::Everyone);
    let accepted = match Route::of(target)? {
        Route::Direct(key) => direct(ctx, env, key, now)?,
        Route::Topic(topic) => self::topic(ctx, env, &topic)?,
        Route::Multicast(spec) => multicast(ctx, env, &spec, now)?,
        Route::Everyone => everyone(ctx, env),
    };
    if let (Some(event), Some(mesh)) = (seen, mesh) {
        crate::features::dashboard::publish(ctx, &mesh, &event);
    }
    Ok(accepted)
}

/// Counts a stored message against its author's (and the mesh's) quota.
fn admit(ctx: &Ctx, env: &Envelope, bytes: usize) -> Result<(), Refused> {
    let Some(author) = &env.author else {
        return Ok(());
    };
    ctx.usage_book.admit_message(
        crate::quota::caps(crate::quota::Kind::Messages, &ctx.config),
        &env.mesh.row.id,
        &author.member_id,
        bytes,
    )?;
    Ok(())
}

/// A direct message: pushed to the recipient's live connection on the hot path when it
/// takes one, stored for its drain otherwise, or stored in a peer broker's outbox.
fn direct(ctx: &Ctx, mut env: Envelope, key: String, now: i64) -> Result<Accepted, Refused> {
    if let Body::Sealed { nonce, ciphertext } = &env.body {
        admit(ctx, &env, nonce.len() + ciphertext.len())?;
    }
    let limits = &ctx.config.limits;
    let grace = i64::try_from(limits.session_grace.as_millis()).unwrap_or(i64::MAX);
    let mut mesh = env.mesh.clone();
    let mut key = mesh.resolve_direct_key(&key, now, grace);
    let mut route = mesh.route_direct(&key, env.priority, env.origin.conn());
    let mut forward = None;
    // A key of no one here may be a peer of a mesh bridged to this one: the DM goes
    // there, stored in that mesh for that key, its ciphertext untouched.
    if matches!(route, DirectRoute::Unknown)
        && env.origin.is_local()
        && let Some(other) = crate::features::bridges::dm_target(ctx, &mesh, &key)
    {
        env.bridged = Some(crate::features::bridges::from_mesh(&mesh));
        env.mesh = other.clone();
        mesh = other;
        key = mesh.resolve_direct_key(&key, now, grace);
        route = mesh.route_direct(&key, env.priority, env.origin.conn());
    }
    // Or a peer listed here through a bridge with a mesh of another broker: the DM is
    // forwarded to that broker for that mesh (and waits in the outbox through a cut).
    let mut remote_mesh: Option<String> = None;
    if matches!(route, DirectRoute::Unknown)
        && env.origin.is_local()
        && env.bridged.is_none()
        && let Some((broker, remote, _)) = mesh.bridged_route(&key)
        && crate::features::bridges::bridge_dm_consented(ctx, &broker, &mesh.row.id, &remote)
        && let Some(fed) = &ctx.fed
    {
        env.bridged = Some(crate::features::bridges::from_mesh(&mesh));
        remote_mesh = Some(remote);
        forward = Some((fed.clone(), broker));
        route = DirectRoute::Queue;
    }
    let mut delivery = None;
    match route {
        DirectRoute::Unknown => return Err(Refused::UnknownRecipient(key)),
        DirectRoute::Revoked => return Err(Refused::RevokedRecipient),
        DirectRoute::Remote(_) if !env.origin.is_local() || env.bridged.is_some() => {
            return Err(Refused::UnknownRecipient(key));
        }
        DirectRoute::Remote(broker) => {
            let fed = ctx
                .fed
                .as_ref()
                .filter(|f| f.will_forward(&mesh.row.id, &broker));
            let Some(fed) = fed else {
                return Err(Refused::NotHere(broker));
            };
            fed.policy_check(
                &mesh.row.id,
                &broker,
                crate::fed::policy::Direction::Export,
                crate::fed::policy::Kind::Dm,
                &env.tags,
            )
            .map_err(|denied| Refused::Policy {
                broker: broker.clone(),
                denied,
            })?;
            forward = Some((fed.clone(), broker));
        }
        DirectRoute::Deliver(target) => {
            let lease = lease_until(limits.ack_lease, target.acks.load(Ordering::SeqCst), now);
            delivery = Some(Delivery {
                frame: env.frame(),
                target,
                lease_until: lease,
            });
        }
        DirectRoute::Queue => {}
    }
    sent(ctx, &env);
    let direct = forward.is_none().then(|| DirectKey {
        mesh: mesh.clone(),
        key: key.clone(),
    });
    let message_id = env.id.clone();
    let mut row = row(env);
    row.target_key = Some(key);
    row.forward_to = forward.as_ref().map(|(_, b)| b.to_string());
    if let Some(remote) = remote_mesh {
        // Stored (and forwarded) as a message of the recipient's mesh.
        row.mesh_id = remote;
    }
    let sink = forward
        .as_ref()
        .map(|(fed, peer)| fed.hot_sink(peer) as Arc<dyn ForwardSink>);
    let (reply, rx) = oneshot::channel();
    let op = Op::Insert {
        row: Box::new(row),
        delivery,
        direct,
        forward: sink,
        reply,
    };
    Ok(Accepted {
        message_id,
        write: Some((op, Commit { rx, forward })),
        delivered: 0,
        live: false,
    })
}

/// A broadcast, group or tagged message: live only, to every eligible connection here and to
/// the peer brokers hosting eligible peers. A local one keeps a row of metadata (no
/// body) for `message_status`.
fn multicast(
    ctx: &Ctx,
    mut env: Envelope,
    spec: &TargetSpec,
    now: i64,
) -> Result<Accepted, Refused> {
    let local = env.origin.is_local();
    if local {
        admit(ctx, &env, 0)?;
    }
    if env.origin.relays() {
        crate::features::bridges::relay(ctx, &env, spec, now);
    }
    let frame = env.frame();
    let (delivered, dropped) =
        env.mesh
            .fan_out(spec, env.origin.conn(), &env.sender_pubkey, &frame);
    ctx.metrics
        .multicast_deliveries
        .fetch_add(delivered as u64, Ordering::Relaxed);
    ctx.metrics
        .fanout_dropped
        .fetch_add(dropped as u64, Ordering::Relaxed);
    let message_id = env.id.clone();
    if !local {
        return Ok(Accepted {
            message_id,
            write: None,
            delivered,
            live: true,
        });
    }
    let mut refusals = Vec::new();
    if let (Some(fed), Some(m)) = (&ctx.fed, env.to_multicast()) {
        (_, refusals) = fed.multicast(&env.mesh, spec, m);
    }
    sent(ctx, &env);
    let mut row = row(env);
    row.delivered_at = Some(now);
    row.nonce = String::new();
    row.ciphertext = String::new();
    row.refusals = refusals;
    let (reply, rx) = oneshot::channel();
    let op = Op::Insert {
        row: Box::new(row),
        delivery: None,
        direct: None,
        forward: None,
        reply,
    };
    Ok(Accepted {
        message_id,
        write: Some((op, Commit { rx, forward: None })),
        delivered,
        live: true,
    })
}

/// A topic post: pushed live to every connection of every subscribed member (not the
/// sender's) and every listener, replicated to the mesh's other brokers when it was
/// posted here, and stored once in the topic's history with its mention notifications.
fn topic(ctx: &Ctx, mut env: Envelope, topic: &str) -> Result<Accepted, Refused> {
    use crate::features::topics;
    let Some(t) = env.mesh.topic(topic) else {
        return Err(Refused::UnknownTopic(topic.to_owned()));
    };
    let (Some(author), Body::Sealed { nonce, ciphertext }) = (env.author.clone(), &env.body) else {
        return Err(Refused::Unroutable("only members post in topics".into()));
    };
    let mut fields = env.topic.take().map(|f| *f).unwrap_or_default();
    let body_version = fields.body_version.unwrap_or(1);
    if !(1..=2).contains(&body_version) {
        return Err(Refused::Unroutable(format!(
            "bodyVersion {body_version} is not 1 or 2"
        )));
    }
    if env.origin.is_local() {
        admit(ctx, &env, nonce.len() + ciphertext.len())?;
    }
    let tokens = meshd_protocol::topics::mention_tokens(
        fields.mentions.as_deref(),
        body_version,
        ciphertext,
    );
    let mentioned = topics::mentioned(&env.mesh, &tokens, &author.member_id);
    fields.body_version = Some(body_version);
    fields.topic_id.clone_from(&t.id);
    fields.topic_name.clone_from(&t.name);
    fields.mentions = Some(tokens.clone());
    let post = crate::store::writer::TopicPostWrite {
        id: env.id.clone(),
        topic_id: t.id.clone(),
        mesh_id: env.mesh.row.id.clone(),
        sender_member_id: author.member_id.clone(),
        sender_member_pubkey: author.member_pubkey.clone(),
        sender_session_pubkey: (env.sender_pubkey != author.member_pubkey)
            .then(|| env.sender_pubkey.clone()),
        sender_name: author.name.clone(),
        nonce: nonce.clone(),
        ciphertext: ciphertext.clone(),
        body_version,
        reply_to_id: fields.reply_to_id.clone().filter(|r| r.len() <= 128),
        created_at: env.created_at,
        origin_broker: match &env.origin {
            Origin::Peer { broker, .. } => Some(broker.to_string()),
            _ => None,
        },
        mentions: mentioned
            .into_iter()
            .map(|m| (crate::ids::random_id(), m))
            .collect(),
    };
    env.topic = Some(Box::new(fields));
    let view = Arc::new(crate::hub::topics::PostView {
        id: post.id.clone(),
        topic: t.name.clone(),
        topic_id: t.id.clone(),
        sender_member_id: post.sender_member_id.clone(),
        sender_pubkey: post.sender_member_pubkey.clone(),
        sender_name: post.sender_name.clone(),
        nonce: post.nonce.clone(),
        ciphertext: post.ciphertext.clone(),
        body_version,
        reply_to_id: post.reply_to_id.clone(),
        created_at: meshd_protocol::time::iso8601_ms(post.created_at),
    });
    let frame = env.frame();
    let (delivered, dropped) = env
        .mesh
        .topic_fan_out(&t.id, &author.member_id, &frame, &view);
    ctx.metrics
        .multicast_deliveries
        .fetch_add(delivered as u64, Ordering::Relaxed);
    ctx.metrics
        .fanout_dropped
        .fetch_add(dropped as u64, Ordering::Relaxed);
    if env.origin.is_local()
        && let Some(fed) = &ctx.fed
    {
        fed.topic_posted(meshd_protocol::fed::TopicPostSet {
            mesh_id: post.mesh_id.clone(),
            id: post.id.clone(),
            topic_id: post.topic_id.clone(),
            sender_member_id: post.sender_member_id.clone(),
            sender_member_pubkey: post.sender_member_pubkey.clone(),
            sender_session_pubkey: post.sender_session_pubkey.clone(),
            sender_name: post.sender_name.clone(),
            nonce: post.nonce.clone(),
            ciphertext: post.ciphertext.clone(),
            body_version,
            reply_to_id: post.reply_to_id.clone(),
            mentions: tokens,
            created_at: post.created_at,
        });
    }
    sent(ctx, &env);
    let (reply, rx) = oneshot::channel();
    let op = Op::Store(crate::store::writer::WriteOp::TopicPost {
        post: Box::new(post),
        reply,
    });
    Ok(Accepted {
        message_id: env.id,
        write: Some((op, Commit { rx, forward: None })),
        delivered,
        live: true,
    })
}

/// An event to every live connection (webhooks): live only, forwarded to every peer
/// broker the mesh flows to when it started here.
fn everyone(ctx: &Ctx, mut env: Envelope) -> Accepted {
    if env.origin.is_local()
        && let (Some(fed), Body::Event { name, data }) = (&ctx.fed, &env.body)
    {
        fed.event(meshd_protocol::fed::EventPush {
            mesh_id: env.mesh.row.id.clone(),
            id: env.id.clone(),
            subtype: env.subtype.clone().unwrap_or_default(),
            event: name.clone(),
            data: data.get().to_owned(),
            sender: env.sender_pubkey.clone(),
            created_at: env.created_at,
        });
    }
    let frame = env.frame();
    let delivered = env.mesh.announce(&frame, 0, None);
    Accepted {
        message_id: env.id,
        write: None,
        delivered,
        live: true,
    }
}

/// Counts and audits a message that started here (metadata only: never the body).
fn sent(ctx: &Ctx, env: &Envelope) {
    if !env.origin.is_local() {
        return;
    }
    ctx.metrics.messages_routed.inc(env.priority.as_str());
    let Some(author) = &env.author else { return };
    let mut payload = serde_json::json!({
        "messageId": env.id,
        "targetSpec": env.target_spec,
        "priority": env.priority.as_str(),
    });
    if let Origin::Schedule { id } = &env.origin {
        payload["scheduledId"] = id.clone().into();
    }
    ctx.audit.record(
        &env.mesh.row.id,
        "message_sent",
        Some(author.member_id.clone()),
        &author.name,
        payload,
    );
}

/// The stored row of an envelope.
fn row(env: Envelope) -> NewMessage {
    // Only events lack an author, and they are never stored.
    let author = env.author.unwrap_or_else(|| Author {
        member_id: String::new(),
        member_pubkey: String::new(),
        name: String::new(),
    });
    let sender_pubkey = env.sender_pubkey;
    let (nonce, ciphertext) = match env.body {
        Body::Sealed { nonce, ciphertext } => (nonce, ciphertext),
        Body::Event { .. } => (String::new(), String::new()),
    };
    NewMessage {
        id: env.id,
        mesh_id: env.mesh.row.id.clone(),
        sender_member_id: author.member_id,
        sender_pubkey,
        sender_member_pubkey: author.member_pubkey,
        sender_name: author.name,
        target_spec: env.target_spec,
        target_key: None,
        priority: env.priority.rank(),
        nonce,
        ciphertext,
        subtype: env.subtype,
        client_message_id: env.client_message_id,
        created_at: env.created_at,
        expires_at: env.expires_at,
        delivered_at: None,
        lease_conn: None,
        lease_until: None,
        forward_to: None,
        forward_seq: None,
        tags: env.tags,
        refusals: Vec::new(),
        bridged: env
            .bridged
            .as_ref()
            .and_then(|b| serde_json::to_string(b).ok()),
        inbox: match env.origin {
            Origin::Peer {
                broker,
                seq: Some(seq),
            } => Some((broker.to_string(), seq)),
            _ => None,
        },
    }
}

/// The expiry of a message stored now (`limits.queue_ttl`).
pub(crate) fn expires_at(ctx: &Ctx, now: i64) -> i64 {
    now.saturating_add(i64::try_from(ctx.config.limits.queue_ttl.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_direct_multicast_and_events_are_routed() {
        let parse = |s: &str| Route::of(Target::Spec(TargetSpec::parse(s).unwrap()));
        assert!(matches!(parse("*"), Ok(Route::Multicast(_))));
        assert!(matches!(parse("@ops"), Ok(Route::Multicast(_))));
        assert!(matches!(parse("tag:ops"), Ok(Route::Multicast(_))));
        let key = "a".repeat(64);
        assert!(matches!(parse(&key), Ok(Route::Direct(k)) if k == key));
        assert!(matches!(parse("#general"), Ok(Route::Topic(t)) if t == "general"));
        let e = parse("alice").err().unwrap();
        assert_eq!(e.code(), "unroutable_target");
        assert_eq!(e.reject_reason(), RejectReason::Invalid);
        assert!(matches!(Route::of(Target::Everyone), Ok(Route::Everyone)));
    }
}
