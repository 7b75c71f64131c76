//! `/api/v1` routes of one mesh: topics (posts, history, the live stream, keys and
//! seals), members, peers, notifications.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{OriginalUri, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use meshd_protocol::apikeys::Capability;
use meshd_protocol::time::iso8601_ms;
use meshd_protocol::topics::TopicRole;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    Caller, DAY, caller, invalid, parse_iso, route_error, store_failed, topic_caller, topic_issuer,
};
use crate::Ctx;
use crate::delivery::{self, Author, Body as MsgBody, Envelope, Origin, Target};
use crate::features::topics::store::SealRow;
use crate::features::topics::{self as feature, PostFields};

type Q = Query<HashMap<String, String>>;

fn ok(v: Value) -> Response {
    (StatusCode::OK, axum::Json(v)).into_response()
}

/// The message row shape of `/messages` and the stream.
fn message_json(m: &crate::features::topics::store::TopicMessageRow) -> Value {
    json!({
        "id": m.id, "senderMemberId": m.sender_member_id, "senderPubkey": m.sender_member_pubkey,
        "senderName": m.sender_name, "nonce": m.nonce, "ciphertext": m.ciphertext,
        "bodyVersion": m.body_version, "replyToId": m.reply_to_id, "createdAt": iso8601_ms(m.created_at),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PostBody {
    topic: String,
    ciphertext: String,
    nonce: String,
    #[serde(default)]
    priority: Option<String>,
    #[serde(default)]
    body_version: Option<i64>,
    #[serde(default)]
    mentions: Option<Vec<String>>,
    #[serde(default)]
    reply_to_id: Option<String>,
}

/// `POST /messages`: a topic post through the delivery pipeline, answered after it is
/// stored.
pub(crate) async fn post_message(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    body: Bytes,
) -> Response {
    let path = uri.path();
    let b: PostBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return invalid(path, &e.to_string()),
    };
    if b.topic.is_empty() || b.ciphertext.is_empty() || b.nonce.is_empty() {
        return invalid(path, "topic, ciphertext and nonce are required");
    }
    if b.mentions
        .as_ref()
        .is_some_and(|m| m.len() > 16 || m.iter().any(|t| t.is_empty() || t.len() > 64))
    {
        return invalid(path, "mentions: at most 16 names of 1-64 characters");
    }
    if b.reply_to_id
        .as_ref()
        .is_some_and(|r| r.is_empty() || r.len() > 128)
    {
        return invalid(path, "replyToId: 1-128 characters");
    }
    let body_version = b.body_version.unwrap_or(1);
    if !(1..=2).contains(&body_version) {
        return invalid(path, "bodyVersion must be 1 or 2");
    }
    let priority = match b.priority.as_deref().map(meshd_protocol::Priority::parse) {
        None => meshd_protocol::Priority::Next,
        Some(Some(p)) => p,
        Some(None) => return invalid(path, "priority must be now, next or low"),
    };
    let c = match caller(&ctx, &headers, path, Some(Capability::Send)).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let topic = match c.topic(&b.topic) {
        Ok(t) => t,
        Err(r) => return r,
    };
    // The sender: the key's member, else the mesh's oldest live member (as the reference).
    let members = c.mesh.members_by_id();
    let sender = match c.key.issuer.as_ref().and_then(|i| members.get(i)) {
        Some(m) => Some(m.clone()),
        None => match ctx.db.members(&c.mesh.row.id).await {
            Ok(rows) => rows
                .into_iter()
                .find(|m| m.revoked_at.is_none() && m.home_broker.is_none())
                .and_then(|m| members.get(&m.id).cloned()),
            Err(e) => return store_failed(path, &e),
        },
    };
    let Some((sender_pubkey, sender)) = sender else {
        return route_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no_mesh_member",
            json!({}),
        );
    };
    let reply_to = match &b.reply_to_id {
        Some(r) => match ctx.db.topic_message_exists(&topic.id, r).await {
            Ok(true) => Some(r.clone()),
            Ok(false) => None,
            Err(e) => return store_failed(path, &e),
        },
        None => None,
    };
    let tokens =
        meshd_protocol::topics::mention_tokens(b.mentions.as_deref(), body_version, &b.ciphertext);
    let notified = feature::mentioned(&c.mesh, &tokens, &sender.id).len();
    let now = crate::time::now_ms();
    let env = Envelope {
        id: crate::ids::message_id(),
        mesh: c.mesh.clone(),
        sender_pubkey: sender_pubkey.clone(),
        author: Some(Author {
            member_id: sender.id.clone(),
            member_pubkey: sender_pubkey,
            name: sender.display_name.clone(),
        }),
        target: Target::Spec(meshd_protocol::TargetSpec::Channel(topic.id.clone())),
        target_spec: format!("#{}", topic.id),
        priority,
        body: MsgBody::Sealed {
            nonce: b.nonce,
            ciphertext: b.ciphertext,
        },
        subtype: None,
        client_message_id: None,
        created_at: now,
        expires_at: delivery::expires_at(&ctx, now),
        origin: Origin::Api,
        tags: Vec::new(),
        bridged: None,
        topic: Some(Box::new(PostFields {
            reply_to_id: reply_to.clone(),
            body_version: Some(body_version),
            mentions: b.mentions,
            ..PostFields::default()
        })),
    };
    let accepted = match delivery::submit(&ctx, env, now) {
        Ok(a) => a,
        Err(e) => {
            return route_error(
                StatusCode::BAD_REQUEST,
                e.code(),
                json!({"message": e.to_string()}),
            );
        }
    };
    if let Some((op, commit)) = accepted.write {
        if ctx.writer.send(op).await.is_err() {
            return store_failed(path, &"the store writer stopped");
        }
        if let Err(e) = commit.committed().await {
            return store_failed(path, &e);
        }
    }
    let mut out = json!({
        "messageId": accepted.message_id, "historyId": accepted.message_id, "queueId": accepted.message_id,
        "topic": topic.name, "topicId": topic.id, "notifications": notified, "bodyVersion": body_version,
    });
    if let Some(r) = reply_to {
        out["replyToId"] = r.into();
    }
    ok(out)
}

/// `GET /topics`: the key's topics with the issuer's unread counts.
pub(crate) async fn list(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
) -> Response {
    let c = match caller(&ctx, &headers, uri.path(), Some(Capability::Read)).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let unread: HashMap<String, i64> = match &c.key.issuer {
        Some(i) => match ctx.db.topic_activity(&c.mesh.row.id, i).await {
            Ok(rows) => rows.into_iter().map(|(t, n, _)| (t, n)).collect(),
            Err(e) => return store_failed(uri.path(), &e),
        },
        None => HashMap::new(),
    };
    let topics: Vec<Value> = c
        .mesh
        .topics()
        .into_iter()
        .filter(|t| c.key.in_scope(&t.name))
        .map(|t| {
            // Unread counts only for topics the member reads (the reference counts every
            // message of a topic it never joined).
            let n = c.key.issuer.as_ref().filter(|i| t.members.contains_key(*i)).and_then(|_| unread.get(&t.id)).copied().unwrap_or(0);
            json!({"id": t.id, "name": t.name, "description": t.description, "visibility": t.visibility,
                   "createdAt": iso8601_ms(t.created_at), "unread": n})
        })
        .collect();
    ok(json!({"topics": topics}))
}

/// `PATCH /topics/{name}/read`: moves the issuer's read cursor (subscribing it).
pub(crate) async fn mark_read(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    Path(name): Path<String>,
) -> Response {
    let (c, topic, issuer) =
        match topic_issuer(&ctx, &headers, uri.path(), Capability::Read, &name).await {
            Ok(x) => x,
            Err(r) => return r,
        };
    let now = crate::time::now_ms();
    if !topic.members.contains_key(&issuer) {
        let pk = c.issuer_member().map(|(pk, _)| pk).unwrap_or_default();
        if let Err(e) = feature::subscribe(
            &ctx,
            &c.mesh,
            &topic.id,
            &issuer,
            &pk,
            TopicRole::Member,
            false,
            now,
        )
        .await
        {
            return store_failed(uri.path(), &e);
        }
    }
    if let Err(e) = ctx.db.mark_topic_read(&topic.id, &issuer, now, true).await {
        return store_failed(uri.path(), &e);
    }
    ok(json!({"topic": topic.name, "topicId": topic.id, "readAt": iso8601_ms(now)}))
}

/// `GET /topics/{name}/messages?limit=&before=`.
pub(crate) async fn messages(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    Path(name): Path<String>,
    Query(q): Q,
) -> Response {
    let path = uri.path();
    let limit = match q.get("limit").map(|l| l.parse::<i64>()) {
        None => meshd_protocol::topics::DEFAULT_PAGE,
        Some(Ok(l)) if (1..=meshd_protocol::topics::MAX_PAGE).contains(&l) => l,
        Some(_) => return invalid(path, "limit must be an integer from 1 to 200"),
    };
    let (_, topic) = match topic_caller(&ctx, &headers, path, Capability::Read, &name).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    // An unknown `before` is ignored (the latest page), as the reference does.
    let before = match q.get("before").filter(|b| !b.is_empty()) {
        Some(b) => match ctx.db.topic_message_exists(&topic.id, b).await {
            Ok(true) => Some(b.clone()),
            Ok(false) => None,
            Err(e) => return store_failed(path, &e),
        },
        None => None,
    };
    match ctx
        .db
        .topic_history(&topic.id, limit, before.as_deref())
        .await
    {
        Ok(rows) => ok(json!({"topic": topic.name, "topicId": topic.id,
            "messages": rows.iter().map(message_json).collect::<Vec<_>>()})),
        Err(e) => store_failed(path, &e),
    }
}

/// Heartbeats on an idle stream.
const HEARTBEAT: Duration = Duration::from_secs(30);

/// `GET /topics/{name}/stream`: server-sent events, pushed as posts are made. `ready`
/// first (no replay: clients backfill with `/messages`); `message` per post (its id as
/// the event id); `heartbeat` after 30 s of silence; `error` and the end of the stream
/// when the client fell [`crate::hub::topics::LISTENER_QUEUE`] posts behind.
pub(crate) async fn stream(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    Path(name): Path<String>,
) -> Response {
    let (c, topic) = match topic_caller(&ctx, &headers, uri.path(), Capability::Read, &name).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let (listener, rx) = c.mesh.topic_listen(&topic.id);
    let ready = format!(
        "event: ready\ndata: {}\n\n",
        json!({"topic": topic.name, "topicId": topic.id, "connectedAt": iso8601_ms(crate::time::now_ms())})
    );
    /// Unregisters the listener when the stream is dropped (the client went away).
    struct Guard(Arc<crate::hub::MeshHub>, String, u64);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.topic_unlisten(&self.1, self.2);
        }
    }
    let guard = Guard(c.mesh.clone(), topic.id.clone(), listener);
    let cancel = ctx.sessions_cancel.clone();
    let state = (Some(ready), rx, guard, false);
    let events = futures_util::stream::unfold(state, move |(first, mut rx, guard, done)| {
        let cancel = cancel.clone();
        async move {
            if let Some(r) = first {
                return Some((
                    Ok::<_, std::convert::Infallible>(Bytes::from(r)),
                    (None, rx, guard, false),
                ));
            }
            if done {
                return None;
            }
            tokio::select! {
                () = cancel.cancelled() => None,
                post = rx.recv() => match post {
                    Some(p) => {
                        let data = serde_json::to_string(&*p).unwrap_or_default();
                        let ev = format!("event: message\nid: {}\ndata: {data}\n\n", p.id);
                        Some((Ok(Bytes::from(ev)), (None, rx, guard, false)))
                    }
                    None => {
                        let ev = "event: error\ndata: {\"error\":\"slow consumer: reconnect and backfill\"}\n\n";
                        Some((Ok(Bytes::from(ev)), (None, rx, guard, true)))
                    }
                },
                () = tokio::time::sleep(HEARTBEAT) => {
                    let ev = format!("event: heartbeat\ndata: {}\n\n", crate::time::now_ms());
                    Some((Ok(Bytes::from(ev)), (None, rx, guard, false)))
                }
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(events));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// `GET /members`: every live member with its presence.
pub(crate) async fn members(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
) -> Response {
    let c = match caller(&ctx, &headers, uri.path(), Some(Capability::Read)).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let rows = match ctx.db.members(&c.mesh.row.id).await {
        Ok(r) => r,
        Err(e) => return store_failed(uri.path(), &e),
    };
    let presence = presence_by_member(&c);
    let members: Vec<Value> = rows
        .into_iter()
        .filter(|m| m.revoked_at.is_none())
        .map(|m| {
            let p = presence.get(&m.pubkey);
            json!({
                "memberId": m.id, "pubkey": m.pubkey, "displayName": m.display_name, "role": m.role,
                "isHuman": p.is_some_and(|p| p.peer_type.as_deref() == Some("human")),
                "joinedAt": iso8601_ms(m.joined_at), "online": p.is_some(),
                "status": p.map_or("offline", |p| p.status), "summary": p.and_then(|p| p.summary.clone()),
                // meshd: the peer broker that hosts the member (null when this one does).
                "broker": m.home_broker,
            })
        })
        .collect();
    ok(json!({"members": members}))
}

/// The newest live presence of each member key (here or on a peer broker).
fn presence_by_member(c: &Caller) -> HashMap<String, meshd_protocol::broker::PeerEntry> {
    let mut out: HashMap<String, meshd_protocol::broker::PeerEntry> = HashMap::new();
    for p in c.mesh.peers_for("", 0) {
        let key = p.member_pubkey.clone();
        match out.get(&key) {
            Some(old) if old.connected_at >= p.connected_at => {}
            _ => {
                out.insert(key, p);
            }
        }
    }
    out
}

/// `GET /topics/{name}/key`: the issuer's sealed copy (sealed to its current key).
pub(crate) async fn key(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    Path(name): Path<String>,
) -> Response {
    let (c, topic, issuer) =
        match topic_issuer(&ctx, &headers, uri.path(), Capability::Read, &name).await {
            Ok(x) => x,
            Err(r) => return r,
        };
    let Some(sender) = topic.encrypted_key_pubkey.clone() else {
        return route_error(
            StatusCode::CONFLICT,
            "topic_unencrypted",
            json!({"topic": topic.name, "hint": "post with bodyVersion 1, or claim a key"}),
        );
    };
    let current = c.issuer_member().map(|(pk, _)| pk).unwrap_or_default();
    match ctx.db.seals(&topic.id).await {
        Ok(seals) => match seals
            .into_iter()
            .find(|s| s.member_id == issuer && s.sealed_for == current)
        {
            Some(s) => ok(
                json!({"topic": topic.name, "topicId": topic.id, "encryptedKey": s.encrypted_key,
                "nonce": s.nonce, "senderPubkey": sender, "createdAt": iso8601_ms(s.rotated_at.unwrap_or(s.created_at))}),
            ),
            None => route_error(
                StatusCode::NOT_FOUND,
                "key_not_sealed_for_member",
                json!({"topic": topic.name,
                "hint": "a member holding the key seals it for you when it next runs `topic tail` or opens the topic"}),
            ),
        },
        Err(e) => store_failed(uri.path(), &e),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClaimBody {
    encrypted_key_pubkey: String,
    encrypted_key: String,
    nonce: String,
}

/// `POST /topics/{name}/claim-key`: an unencrypted topic gets a key (first claim wins).
pub(crate) async fn claim_key(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let path = uri.path();
    let b: ClaimBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return invalid(path, &e.to_string()),
    };
    if !meshd_protocol::keys::is_lower_hex64(&b.encrypted_key_pubkey.to_ascii_lowercase())
        || b.encrypted_key.is_empty()
        || b.encrypted_key.len() > 4096
        || b.nonce.is_empty()
        || b.nonce.len() > 64
    {
        return invalid(
            path,
            "encryptedKeyPubkey: 64 hex; encryptedKey: 1-4096 characters; nonce: 1-64 characters",
        );
    }
    let (c, topic, issuer) = match topic_issuer(&ctx, &headers, path, Capability::Send, &name).await
    {
        Ok(x) => x,
        Err(r) => return r,
    };
    let pubkey = b.encrypted_key_pubkey.to_ascii_lowercase();
    let already = |sender: Option<String>| {
        route_error(
            StatusCode::CONFLICT,
            "already_encrypted",
            json!({"topic": topic.name, "senderPubkey": sender}),
        )
    };
    if topic.encrypted_key_pubkey.is_some() {
        return already(topic.encrypted_key_pubkey.clone());
    }
    match ctx.db.claim_topic_key(&topic.id, &pubkey).await {
        Ok(true) => {}
        Ok(false) => return already(c.mesh.topic(&topic.id).and_then(|t| t.encrypted_key_pubkey)),
        Err(e) => return store_failed(path, &e),
    }
    c.mesh.topic_set_key(&topic.id, &pubkey);
    let now = crate::time::now_ms();
    let seal = SealRow {
        topic_id: topic.id.clone(),
        member_id: issuer.clone(),
        encrypted_key: b.encrypted_key,
        nonce: b.nonce,
        sealed_for: c.issuer_member().map(|(pk, _)| pk).unwrap_or_default(),
        created_at: now,
        rotated_at: None,
    };
    if let Err(e) = ctx.db.put_seal(&seal).await {
        return store_failed(path, &e);
    }
    if let Some(fed) = &ctx.fed {
        if let Ok(Some(row)) = ctx.db.topic_row(&topic.id).await {
            fed.topic_changed(&row);
        }
        fed.topic_sealed(&c.mesh.row.id, &seal);
    }
    ok(
        json!({"topic": topic.name, "topicId": topic.id, "senderPubkey": pubkey, "memberId": issuer, "claimed": true}),
    )
}

/// `GET /topics/{name}/pending-seals`: subscribed live members without a copy sealed to
/// their current key (unlike the reference, a member whose key changed is listed).
pub(crate) async fn pending_seals(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    Path(name): Path<String>,
) -> Response {
    let (c, topic) = match topic_caller(&ctx, &headers, uri.path(), Capability::Read, &name).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let Some(sender) = topic.encrypted_key_pubkey.clone() else {
        return ok(json!({"pending": [], "senderPubkey": null}));
    };
    let seals = match ctx.db.seals(&topic.id).await {
        Ok(s) => s,
        Err(e) => return store_failed(uri.path(), &e),
    };
    let members = c.mesh.members_by_id();
    let mut pending: Vec<Value> = topic
        .members
        .keys()
        .filter_map(|id| {
            let (pk, m) = members.get(id)?;
            let sealed = seals
                .iter()
                .any(|s| &s.member_id == id && &s.sealed_for == pk);
            (!m.revoked && !sealed)
                .then(|| json!({"memberId": id, "pubkey": pk, "displayName": m.display_name}))
        })
        .collect();
    pending.sort_by(|a, b| a["displayName"].as_str().cmp(&b["displayName"].as_str()));
    pending.truncate(50);
    ok(
        json!({"topic": topic.name, "topicId": topic.id, "senderPubkey": sender, "pending": pending}),
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SealBody {
    member_id: String,
    encrypted_key: String,
    nonce: String,
}

/// `POST /topics/{name}/seal`: a key holder seals the topic key for a member. The
/// reference asks for the `send` capability, which the CLI's `topic tail` (the client
/// that re-seals) never has, so its re-seals always failed; here a `read` key may seal
/// when its member holds a copy sealed to its current key (only a holder can seal).
pub(crate) async fn seal(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let path = uri.path();
    let b: SealBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return invalid(path, &e.to_string()),
    };
    if b.member_id.is_empty()
        || b.encrypted_key.is_empty()
        || b.encrypted_key.len() > 4096
        || b.nonce.is_empty()
        || b.nonce.len() > 64
    {
        return invalid(
            path,
            "memberId, encryptedKey (≤4096) and nonce (≤64) are required",
        );
    }
    let (c, topic, issuer) = match topic_issuer(&ctx, &headers, path, Capability::Read, &name).await
    {
        Ok(x) => x,
        Err(r) => return r,
    };
    if topic.encrypted_key_pubkey.is_none() {
        return route_error(
            StatusCode::CONFLICT,
            "topic_unencrypted",
            json!({"topic": topic.name, "hint": "nothing to seal"}),
        );
    }
    let holder_key = c.issuer_member().map(|(pk, _)| pk).unwrap_or_default();
    match ctx.db.seals(&topic.id).await {
        Ok(seals)
            if seals
                .iter()
                .any(|s| s.member_id == issuer && s.sealed_for == holder_key) => {}
        Ok(_) => {
            return route_error(
                StatusCode::FORBIDDEN,
                "not_a_key_holder",
                json!({"topic": topic.name,
                "hint": "only a member holding the topic key seals it for others"}),
            );
        }
        Err(e) => return store_failed(path, &e),
    }
    let members = c.mesh.members_by_id();
    let Some((pk, m)) = members
        .get(&b.member_id)
        .filter(|(_, m)| !m.revoked && topic.members.contains_key(&b.member_id))
    else {
        return route_error(
            StatusCode::NOT_FOUND,
            "recipient_not_in_topic",
            json!({"topic": topic.name, "memberId": b.member_id}),
        );
    };
    let _ = m;
    let now = crate::time::now_ms();
    let s = SealRow {
        topic_id: topic.id.clone(),
        member_id: b.member_id.clone(),
        encrypted_key: b.encrypted_key,
        nonce: b.nonce,
        sealed_for: pk.clone(),
        created_at: now,
        rotated_at: None,
    };
    if let Err(e) = ctx.db.put_seal(&s).await {
        return store_failed(path, &e);
    }
    if let Some(fed) = &ctx.fed {
        fed.topic_sealed(&c.mesh.row.id, &s);
    }
    ok(
        json!({"topic": topic.name, "topicId": topic.id, "memberId": b.member_id, "sealedAt": iso8601_ms(now)}),
    )
}

/// `GET /notifications?since=&unread=1`: the issuer's mentions in the key's mesh.
pub(crate) async fn notifications(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    Query(q): Q,
) -> Response {
    let path = uri.path();
    let c = match caller(&ctx, &headers, path, Some(Capability::Read)).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let since = match super::since(&q, DAY) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let Some(issuer) = c.key.issuer.clone() else {
        return ok(json!({"notifications": []}));
    };
    let unread = q.get("unread").is_some_and(|u| u == "1" || u == "true");
    match ctx
        .db
        .notifications(&c.mesh.row.id, &issuer, since, unread, 50)
        .await
    {
        Ok(rows) => {
            let list: Vec<Value> = rows.into_iter().map(|n| json!({
                "id": n.message_id, "notificationId": n.id, "topicId": n.topic_id, "topicName": n.topic_name,
                "senderName": n.sender_name, "senderPubkey": n.sender_pubkey, "ciphertext": n.ciphertext,
                "bodyVersion": n.body_version, "kind": n.kind, "readAt": n.read_at.map(iso8601_ms), "createdAt": iso8601_ms(n.created_at),
            })).collect();
            let name = c.issuer_member().map(|(_, m)| m.display_name);
            ok(json!({"notifications": list, "since": iso8601_ms(since), "mentionedAs": name}))
        }
        Err(e) => store_failed(path, &e),
    }
}

#[derive(Deserialize)]
struct ReadBody {
    #[serde(default)]
    ids: Option<Vec<String>>,
    #[serde(default)]
    all: Option<bool>,
    #[serde(default)]
    before: Option<String>,
}

/// `POST /notifications/read`: `{ids}` or `{all: true, before?}`.
pub(crate) async fn read_notifications(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    body: Bytes,
) -> Response {
    let path = uri.path();
    let b: ReadBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return invalid(path, &e.to_string()),
    };
    let c = match caller(&ctx, &headers, path, Some(Capability::Read)).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let issuer = match c.issuer() {
        Ok(i) => i.to_owned(),
        Err(r) => return r,
    };
    let now = crate::time::now_ms();
    match (b.ids, b.all) {
        (Some(ids), _) if !ids.is_empty() && ids.len() <= 200 => {
            match ctx
                .db
                .read_notifications(&c.mesh.row.id, &issuer, Some(&ids), now, now)
                .await
            {
                Ok(_) => ok(json!({"marked": ids.len(), "readAt": iso8601_ms(now)})),
                Err(e) => store_failed(path, &e),
            }
        }
        (None, Some(true)) => {
            let before = match parse_iso(b.before.as_deref()) {
                Ok(t) => t.unwrap_or(now + 1),
                Err(()) => {
                    return route_error(StatusCode::BAD_REQUEST, "invalid_before", json!({}));
                }
            };
            match ctx
                .db
                .read_notifications(&c.mesh.row.id, &issuer, None, before, now)
                .await
            {
                Ok(_) => ok(json!({"marked": "all", "before": iso8601_ms(before)})),
                Err(e) => store_failed(path, &e),
            }
        }
        _ => invalid(path, "give ids (1-200) or all: true"),
    }
}

/// `GET /peers`: live presences by member, then members whose key was used over REST
/// in the last 5 minutes.
pub(crate) async fn peers(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
) -> Response {
    let c = match caller(&ctx, &headers, uri.path(), Some(Capability::Read)).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let now = crate::time::now_ms();
    let members = c.mesh.all_members();
    let name_of = |pk: &str| {
        members
            .iter()
            .find(|(k, _)| k == pk)
            .map(|(_, m)| m.display_name.clone())
    };
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut live: Vec<_> = presence_by_member(&c).into_iter().collect();
    live.sort_by(|a, b| b.1.connected_at.cmp(&a.1.connected_at));
    for (pk, p) in live {
        seen.insert(pk.clone());
        out.push(json!({"pubkey": pk, "displayName": name_of(&pk).unwrap_or(p.display_name), "status": p.status,
            "summary": p.summary, "groups": p.groups, "via": "ws"}));
    }
    if let Ok(keys) = ctx.db.api_keys(&c.mesh.row.id, None).await {
        let by_id = c.mesh.members_by_id();
        for k in keys
            .iter()
            .filter(|k| k.revoked_at.is_none() && k.last_used_at.is_some_and(|t| now - t < 300_000))
        {
            if let Some((pk, m)) = k.issued_by_member_id.as_ref().and_then(|i| by_id.get(i))
                && !m.revoked
                && seen.insert(pk.clone())
            {
                out.push(json!({"pubkey": pk, "displayName": m.display_name, "status": "idle", "summary": null, "groups": [], "via": "rest"}));
            }
        }
    }
    ok(json!({"peers": out}))
}
