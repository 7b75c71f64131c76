//! `GET /api/v1/ws`: the external WebSocket for clients that hold only an API key (no
//! session keypair) — bots, dashboards, scripts in any language. The key comes in the
//! `Authorization: Bearer` header or, for browsers (which cannot set it), in a first
//! frame `{"type":"auth","apiKey":"cm_…"}` within `limits.hello_timeout`. Frames:
//!
//! | client → broker | needs | answer |
//! |---|---|---|
//! | `subscribe {topic}` | `read`, topic in scope | `subscribed {topic, topicId}`, then `topic_message` per post |
//! | `unsubscribe {topic}` | – | `unsubscribed {topic}` |
//! | `post {topic, text}` or `{topic, ciphertext, nonce, bodyVersion}`, `mentions?`, `replyToId?` | `send`, scope, a member | `posted {messageId, topic, topicId}` |
//! | `send {to, text, priority?}` (`to`: a key, `@group`, `*`) | `send`, a member | `sent {messageId}` |
//! | `peers` | `read` | `peers {peers}` (the `list_peers` entries) |
//!
//! Every answer echoes `_reqId`; refusals are `error {code, message, _reqId}`. A `send`
//! carries base64 plaintext, as broadcasts do: the key has no keypair to encrypt with,
//! so it is not end-to-end encrypted (the newest clients show an undecryptable push as
//! its base64 text). The connection closes (4003 `key_revoked`) as soon as its key is
//! revoked or expires.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures_util::StreamExt as _;
use futures_util::stream::SelectAll;
use meshd_protocol::apikeys::Capability;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_stream_shim::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, info_span};

use crate::Ctx;
use crate::delivery::{self, Author, Body, Envelope, Origin, Target};
use crate::features::apikeys::{ApiKeyAuth, AuthError};
use crate::features::topics::PostFields;
use crate::hub::MeshHub;
use crate::hub::lock;

/// Live external connections by key id, so a revocation closes them at once.
#[derive(Debug, Default)]
pub(crate) struct ExternalConns {
    by_key: std::sync::Mutex<HashMap<String, Vec<CancellationToken>>>,
}

impl ExternalConns {
    fn add(&self, key: &str, token: CancellationToken) {
        let mut m = lock(&self.by_key);
        let v = m.entry(key.to_owned()).or_default();
        v.retain(|t| !t.is_cancelled());
        v.push(token);
    }

    /// Closes every connection of a revoked key.
    pub(crate) fn key_revoked(&self, key: &str) {
        if let Some(v) = lock(&self.by_key).remove(key) {
            for t in v {
                t.cancel();
            }
        }
    }

    /// Key ids with live connections.
    pub(crate) fn keys(&self) -> Vec<String> {
        let mut m = lock(&self.by_key);
        m.retain(|_, v| {
            v.retain(|t| !t.is_cancelled());
            !v.is_empty()
        });
        m.keys().cloned().collect()
    }
}

/// A tiny stand-in for `tokio_stream::wrappers::ReceiverStream` (not a dependency).
mod tokio_stream_shim {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::sync::mpsc;

    /// An mpsc receiver as a stream.
    pub(crate) struct ReceiverStream<T>(pub(crate) mpsc::Receiver<T>, pub(crate) String);

    impl<T> futures_util::Stream for ReceiverStream<T> {
        type Item = (String, Option<T>);
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            match self.0.poll_recv(cx) {
                Poll::Ready(Some(v)) => Poll::Ready(Some((self.1.clone(), Some(v)))),
                // A closed channel (the listener was dropped as slow) is reported once.
                Poll::Ready(None) if !self.1.is_empty() => {
                    let topic = std::mem::take(&mut self.1);
                    Poll::Ready(Some((topic, None)))
                }
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        }
    }
}

/// `GET /api/v1/ws`.
pub(crate) async fn upgrade(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if ctx.sessions_cancel.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let Ok(permit) = ctx.connections.clone().try_acquire_owned() else {
        ctx.metrics.connections_rejected.inc("too_many_connections");
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections").into_response();
    };
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(char::is_whitespace))
        .filter(|(s, _)| s.eq_ignore_ascii_case("bearer"))
        .map(|(_, k)| k.trim().to_owned());
    let max = ctx.config.limits.max_frame_bytes;
    upgrade
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            let tracker = ctx.sessions.clone();
            let conn = ctx.next_conn_id();
            let span = info_span!("api_ws", conn, key = tracing::field::Empty);
            let _ = tracker
                .spawn(
                    async move {
                        serve(ctx, socket, bearer).await;
                        drop(permit);
                    }
                    .instrument(span),
                )
                .await;
        })
}

async fn send(socket: &mut WebSocket, v: Value) -> bool {
    futures_util::SinkExt::send(socket, Message::Text(Utf8Bytes::from(v.to_string())))
        .await
        .is_ok()
}

async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let _ = futures_util::SinkExt::send(
        socket,
        Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })),
    )
    .await;
}

/// Authenticates (header or first frame), then serves frames until the client leaves,
/// the key is revoked or expires, or the broker stops.
async fn serve(ctx: Arc<Ctx>, mut socket: WebSocket, bearer: Option<String>) {
    let secret = match bearer {
        Some(b) => b,
        None => {
            #[derive(Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct AuthFrame {
                r#type: String,
                api_key: String,
            }
            let first = tokio::time::timeout(ctx.config.limits.hello_timeout, socket.recv()).await;
            match first {
                Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<AuthFrame>(&t) {
                    Ok(a) if a.r#type == "auth" => a.api_key,
                    _ => {
                        send(&mut socket, json!({"type": "error", "code": "auth_required", "message": "send {\"type\":\"auth\",\"apiKey\":\"cm_…\"} first"})).await;
                        close(&mut socket, 4001, "auth_required").await;
                        return;
                    }
                },
                _ => {
                    close(&mut socket, 4001, "auth_required").await;
                    return;
                }
            }
        }
    };
    let now = crate::time::now_ms();
    let key = match crate::features::apikeys::authenticate(&ctx.db, &secret, now).await {
        Ok(k) => k,
        Err(AuthError::Store(_)) => {
            close(&mut socket, 1011, "store unavailable").await;
            return;
        }
        Err(e) => {
            send(
                &mut socket,
                json!({"type": "error", "code": "api_key_invalid", "message": e.to_string()}),
            )
            .await;
            close(&mut socket, 4003, "api_key_invalid").await;
            return;
        }
    };
    tracing::Span::current().record("key", key.id.as_str());
    let Ok(Some(mesh)) = ctx.hub.mesh(&ctx.db, &key.mesh_id).await else {
        close(&mut socket, 4004, "mesh_not_found").await;
        return;
    };
    let expires = ctx
        .db
        .api_keys_by_prefix(&secret[..meshd_protocol::apikeys::PREFIX_LEN])
        .await
        .ok()
        .and_then(|ks| ks.into_iter().find(|k| k.id == key.id))
        .and_then(|k| k.expires_at);
    let revoked = ctx.sessions_cancel.child_token();
    ctx.external.add(&key.id, revoked.clone());
    let member = key
        .issuer
        .as_ref()
        .and_then(|i| mesh.members_by_id().remove(i));
    let hello = json!({"type": "auth_ok", "meshId": mesh.row.id, "keyId": key.id, "capabilities": key.capabilities,
        "topicScopes": key.topic_scopes, "member": member.as_ref().map(|(pk, m)| json!({"id": m.id, "name": m.display_name, "pubkey": pk}))});
    if !send(&mut socket, hello).await {
        return;
    }
    let bucket = crate::ratelimit::Bucket::new(
        ctx.config.limits.sends_per_second,
        ctx.config.limits.send_burst,
        crate::time::instant(),
    );
    let mut conn = Conn {
        ctx: ctx.clone(),
        mesh,
        key,
        member,
        subs: HashMap::new(),
        bucket,
    };
    let mut streams: SelectAll<ReceiverStream<Arc<crate::hub::topics::PostView>>> =
        SelectAll::new();
    let expiry = async {
        match expires {
            Some(at) => {
                tokio::time::sleep(Duration::from_millis(u64::try_from(at - now).unwrap_or(0)))
                    .await
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expiry);
    loop {
        tokio::select! {
            () = revoked.cancelled() => {
                if ctx.sessions_cancel.is_cancelled() {
                    close(&mut socket, 1001, "shutting down").await;
                } else {
                    send(&mut socket, json!({"type": "error", "code": "key_revoked", "message": "this API key was revoked"})).await;
                    close(&mut socket, 4003, "key_revoked").await;
                }
                break;
            }
            () = &mut expiry => {
                send(&mut socket, json!({"type": "error", "code": "key_expired", "message": "this API key expired"})).await;
                close(&mut socket, 4003, "key_expired").await;
                break;
            }
            Some((topic, post)) = streams.next(), if !streams.is_empty() => {
                let v = match post {
                    Some(p) => json!({"type": "topic_message", "topic": p.topic, "topicId": p.topic_id, "message": &*p}),
                    None => {
                        conn.subs.remove(&topic);
                        json!({"type": "error", "code": "slow_consumer", "message": format!("unsubscribed from {topic}: too far behind; subscribe again and backfill over REST")})
                    }
                };
                if !send(&mut socket, v).await {
                    break;
                }
            }
            msg = socket.recv() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let (reply, listen) = conn.on_frame(&t).await;
                    if let Some((topic, rx)) = listen {
                        streams.push(ReceiverStream(rx, topic));
                    }
                    if !send(&mut socket, reply).await {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    for (topic_id, listener) in conn.subs.drain() {
        conn.mesh.topic_unlisten(&topic_id, listener);
    }
}

/// One authenticated external connection.
struct Conn {
    ctx: Arc<Ctx>,
    mesh: Arc<MeshHub>,
    key: ApiKeyAuth,
    member: Option<(String, crate::hub::MemberInfo)>,
    /// Topic id → listener id.
    subs: HashMap<String, u64>,
    /// Posts and sends, at the WebSocket sessions' rate (`limits.sends_per_second`).
    bucket: crate::ratelimit::Bucket,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Frame {
    r#type: String,
    #[serde(default, rename = "_reqId")]
    req_id: Option<Value>,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    ciphertext: Option<String>,
    #[serde(default)]
    nonce: Option<String>,
    #[serde(default)]
    body_version: Option<i64>,
    #[serde(default)]
    mentions: Option<Vec<String>>,
    #[serde(default)]
    reply_to_id: Option<String>,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    priority: Option<String>,
}

type Listen = Option<(
    String,
    tokio::sync::mpsc::Receiver<Arc<crate::hub::topics::PostView>>,
)>;

impl Conn {
    async fn on_frame(&mut self, text: &str) -> (Value, Listen) {
        let f: Frame = match serde_json::from_str(text) {
            Ok(f) => f,
            Err(e) => {
                return (
                    json!({"type": "error", "code": "malformed", "message": e.to_string()}),
                    None,
                );
            }
        };
        let req_id = f.req_id.clone();
        let mut out = self.handle(f).await;
        if let (Some(r), Value::Object(o)) = (req_id, &mut out.0) {
            o.insert("_reqId".into(), r);
        }
        out
    }

    fn refuse(code: &str, message: impl Into<String>) -> (Value, Listen) {
        (
            json!({"type": "error", "code": code, "message": message.into()}),
            None,
        )
    }

    async fn handle(&mut self, f: Frame) -> (Value, Listen) {
        let need = |cap: Capability| {
            (!self.key.can(cap)).then(|| {
                Self::refuse(
                    "forbidden",
                    format!("this key lacks the {} capability", cap.as_str()),
                )
            })
        };
        match f.r#type.as_str() {
            "subscribe" => {
                if let Some(r) = need(Capability::Read) {
                    return r;
                }
                let Some(name) = f.topic else {
                    return Self::refuse("invalid", "topic required");
                };
                let Some(t) = self
                    .mesh
                    .topic(&name)
                    .filter(|t| self.key.in_scope(&t.name))
                else {
                    return Self::refuse(
                        "topic_not_found",
                        format!("no topic {name:?} within this key's scope"),
                    );
                };
                if self.subs.contains_key(&t.id) {
                    return (
                        json!({"type": "subscribed", "topic": t.name, "topicId": t.id}),
                        None,
                    );
                }
                let (listener, rx) = self.mesh.topic_listen(&t.id);
                self.subs.insert(t.id.clone(), listener);
                (
                    json!({"type": "subscribed", "topic": t.name, "topicId": t.id}),
                    Some((t.id, rx)),
                )
            }
            "unsubscribe" => {
                let Some(name) = f.topic else {
                    return Self::refuse("invalid", "topic required");
                };
                if let Some(t) = self.mesh.topic(&name)
                    && let Some(l) = self.subs.remove(&t.id)
                {
                    self.mesh.topic_unlisten(&t.id, l);
                }
                (json!({"type": "unsubscribed", "topic": name}), None)
            }
            "peers" => {
                if let Some(r) = need(Capability::Read) {
                    return r;
                }
                (
                    json!({"type": "peers", "peers": self.mesh.peers_for("", 0)}),
                    None,
                )
            }
            "post" | "send" => {
                if let Some(r) = need(Capability::Send) {
                    return r;
                }
                if !self.bucket.take(crate::time::instant()) {
                    let l = &self.ctx.config.limits;
                    return Self::refuse(
                        "rate_limited",
                        format!(
                            "max {}/s (burst {}) — slow down",
                            l.sends_per_second, l.send_burst
                        ),
                    );
                }
                let Some((pubkey, m)) = self.member.clone() else {
                    return Self::refuse(
                        "api_key_has_no_issuer",
                        "this key acts as no member: it cannot post",
                    );
                };
                let b64 = base64::engine::general_purpose::STANDARD;
                let (nonce, ciphertext, bv) = match (&f.text, &f.ciphertext) {
                    (Some(t), _) => (b64.encode([0u8; 24]), b64.encode(t), 1),
                    (None, Some(c)) => (
                        f.nonce.clone().unwrap_or_else(|| b64.encode([0u8; 24])),
                        c.clone(),
                        f.body_version.unwrap_or(1),
                    ),
                    (None, None) => return Self::refuse("invalid", "text or ciphertext required"),
                };
                let mut posted_to = None;
                let (target, target_spec, topic) = if f.r#type == "post" {
                    let Some(name) = f.topic else {
                        return Self::refuse("invalid", "topic required");
                    };
                    let Some(t) = self
                        .mesh
                        .topic(&name)
                        .filter(|t| self.key.in_scope(&t.name))
                    else {
                        return Self::refuse(
                            "topic_not_found",
                            format!("no topic {name:?} within this key's scope"),
                        );
                    };
                    let fields = PostFields {
                        reply_to_id: f.reply_to_id,
                        body_version: Some(bv),
                        mentions: f.mentions,
                        ..PostFields::default()
                    };
                    posted_to = Some((t.name.clone(), t.id.clone()));
                    (
                        meshd_protocol::TargetSpec::Channel(t.id.clone()),
                        format!("#{}", t.id),
                        Some(Box::new(fields)),
                    )
                } else {
                    let Some(to) = f.to else {
                        return Self::refuse("invalid", "to required");
                    };
                    match meshd_protocol::TargetSpec::parse(&to) {
                        Ok(meshd_protocol::TargetSpec::Channel(_)) | Err(_) => {
                            return Self::refuse(
                                "invalid_target",
                                "to: a member or session key, @group or * (post to topics with `post`)",
                            );
                        }
                        Ok(t) => (t, to, None),
                    }
                };
                let priority = match f.priority.as_deref().map(meshd_protocol::Priority::parse) {
                    None => meshd_protocol::Priority::Next,
                    Some(Some(p)) => p,
                    Some(None) => {
                        return Self::refuse("invalid_priority", "priority: now, next or low");
                    }
                };
                let now = crate::time::now_ms();
                let env = Envelope {
                    id: crate::ids::message_id(),
                    mesh: self.mesh.clone(),
                    sender_pubkey: pubkey.clone(),
                    author: Some(Author {
                        member_id: m.id.clone(),
                        member_pubkey: pubkey,
                        name: m.display_name.clone(),
                    }),
                    target: Target::Spec(target),
                    target_spec,
                    priority,
                    body: Body::Sealed { nonce, ciphertext },
                    subtype: None,
                    client_message_id: None,
                    created_at: now,
                    expires_at: delivery::expires_at(&self.ctx, now),
                    origin: Origin::Api,
                    tags: Vec::new(),
                    bridged: None,
                    topic,
                };
                let accepted = match delivery::submit(&self.ctx, env, now) {
                    Ok(a) => a,
                    Err(e) => return Self::refuse(e.code(), e.to_string()),
                };
                if let Some((op, commit)) = accepted.write {
                    if self.ctx.writer.send(op).await.is_err() {
                        return Self::refuse("internal", "the broker is stopping");
                    }
                    if let Err(e) = commit.committed().await {
                        return Self::refuse("internal", format!("not stored: {e}"));
                    }
                }
                match posted_to {
                    Some((name, id)) => (
                        json!({"type": "posted", "messageId": accepted.message_id, "topic": name, "topicId": id}),
                        None,
                    ),
                    None => (
                        json!({"type": "sent", "messageId": accepted.message_id}),
                        None,
                    ),
                }
            }
            other => Self::refuse(
                "unknown_message_type",
                format!("unknown message type {other:?}"),
            ),
        }
    }
}
