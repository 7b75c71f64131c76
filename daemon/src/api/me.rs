//! `/api/v1/me/*`: the views of one person across the meshes of this broker. The
//! person is the key's member and every live member linked to it (`features::people`:
//! the same key, or an operator's `meshd member link`). Unlike the reference, where a
//! key minted for one topic reads its user's every mesh, a key scoped to topics gets 403
//! here: the `/me` views are for unscoped keys.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{OriginalUri, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use meshd_protocol::apikeys::Capability;
use meshd_protocol::time::iso8601_ms;
use serde_json::{Value, json};

use super::{DAY, caller, mw_error, route_error, snippet, store_failed};
use crate::Ctx;
use crate::hub::MeshHub;
use crate::store::{MemberRow, MeshRow};

type Q = Query<HashMap<String, String>>;

fn ok(v: Value) -> Response {
    (StatusCode::OK, axum::Json(v)).into_response()
}

/// One mesh of the person: the mesh, the person's member there, the mesh's hub.
struct Seat {
    mesh: MeshRow,
    member: MemberRow,
    hub: Arc<MeshHub>,
}

/// The person behind the key: its id and its seats.
async fn person(
    ctx: &Ctx,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
) -> Result<(String, Vec<Seat>), Response> {
    let path = uri.path();
    let c = caller(ctx, headers, path, Some(Capability::Read)).await?;
    if c.key.topic_scopes.is_some() {
        return Err(mw_error(
            StatusCode::FORBIDDEN,
            "error.api_key_topic_out_of_scope",
            "the /me views need a key without topic scopes",
            path,
        ));
    }
    let issuer = c.issuer()?.to_owned();
    let Some((pubkey, _)) = c.mesh.members_by_id().remove(&issuer) else {
        return Err(route_error(
            StatusCode::NOT_FOUND,
            "member_not_found",
            json!({}),
        ));
    };
    let linked = ctx
        .db
        .person_of(&issuer)
        .await
        .map_err(|e| store_failed(path, &e))?;
    let rows = ctx
        .db
        .person_members(&pubkey, linked.as_deref())
        .await
        .map_err(|e| store_failed(path, &e))?;
    let mut seats = Vec::new();
    for (mesh, member) in rows {
        if let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &mesh.id).await {
            seats.push(Seat { mesh, member, hub });
        }
    }
    Ok((linked.unwrap_or(pubkey), seats))
}

fn mesh_fields(s: &Seat) -> Value {
    json!({"meshId": s.mesh.id, "meshSlug": s.mesh.slug, "meshName": s.mesh.name})
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// `POST /me/peer-pubkey`: browser keys belong to web members, which meshd does not
/// have (a person enrolls with its own key).
pub(crate) async fn peer_pubkey(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
) -> Response {
    let c = match caller(&ctx, &headers, uri.path(), None).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    if let Err(r) = c.issuer() {
        return r;
    }
    route_error(
        StatusCode::CONFLICT,
        "not_web_member",
        json!({"detail": "meshd members enroll with their own key; there are no web members to re-key"}),
    )
}

/// `GET /me/workspace`.
pub(crate) async fn workspace(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
) -> Response {
    let (who, seats) = match person(&ctx, &headers, &uri).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let mut meshes = Vec::new();
    let (mut peers, mut online, mut topics, mut unread) = (0usize, 0usize, 0usize, 0usize);
    for s in &seats {
        let members = s
            .hub
            .all_members()
            .into_iter()
            .filter(|(_, m)| !m.revoked)
            .count();
        let live: std::collections::HashSet<String> = s
            .hub
            .peers_for("", 0)
            .into_iter()
            .map(|p| p.member_pubkey)
            .collect();
        let n_topics = s.hub.topics().len();
        let mentions = ctx
            .db
            .notifications(&s.mesh.id, &s.member.id, 0, true, 1000)
            .await
            .map_or(0, |n| n.len());
        peers += members;
        online += live.len();
        topics += n_topics;
        unread += mentions;
        meshes.push(json!({"meshId": s.mesh.id, "slug": s.mesh.slug, "name": s.mesh.name, "memberId": s.member.id,
            "myRole": s.member.role, "joinedAt": iso8601_ms(s.member.joined_at), "peers": members, "online": live.len(),
            "topics": n_topics, "unreadMentions": mentions}));
    }
    ok(json!({"userId": who, "meshes": meshes,
        "totals": {"meshes": seats.len(), "peers": peers, "online": online, "topics": topics, "unreadMentions": unread}}))
}

/// `GET /me/topics`: the topics the person reads, newest activity first.
pub(crate) async fn topics(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
) -> Response {
    let (_, seats) = match person(&ctx, &headers, &uri).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let mut out: Vec<(Option<i64>, String, Value)> = Vec::new();
    let mut total_unread = 0;
    for s in &seats {
        let activity: HashMap<String, (i64, i64)> =
            match ctx.db.topic_activity(&s.mesh.id, &s.member.id).await {
                Ok(rows) => rows
                    .into_iter()
                    .map(|(t, n, last)| (t, (n, last)))
                    .collect(),
                Err(e) => return store_failed(uri.path(), &e),
            };
        for t in s.hub.member_topics(&s.member.id) {
            let (n, last) = activity
                .get(&t.id)
                .map_or((0, None), |(n, l)| (*n, Some(*l)));
            total_unread += n;
            out.push((last, t.name.clone(), merge(mesh_fields(s), json!({"topicId": t.id, "name": t.name,
                "description": t.description, "visibility": t.visibility, "createdAt": iso8601_ms(t.created_at),
                "memberId": s.member.id, "unread": n, "lastMessageAt": last.map(iso8601_ms)}))));
        }
    }
    out.sort_by(|a, b| match (a.0, b.0) {
        (Some(x), Some(y)) => y.cmp(&x),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.1.cmp(&b.1),
    });
    let n = out.len();
    ok(
        json!({"topics": out.into_iter().map(|x| x.2).collect::<Vec<_>>(), "totals": {"topics": n, "unread": total_unread}}),
    )
}

/// `GET /me/notifications?include=all&since=`.
pub(crate) async fn notifications(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    Query(q): Q,
) -> Response {
    let since = match super::since(&q, 7 * DAY) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let (_, seats) = match person(&ctx, &headers, &uri).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let all = q.get("include").is_some_and(|i| i == "all");
    let mut list = Vec::new();
    for s in &seats {
        match ctx.db.notifications(&s.mesh.id, &s.member.id, since, !all, 100).await {
            Ok(rows) => list.extend(rows.into_iter().map(|n| {
                (n.created_at, merge(mesh_fields(s), json!({"notificationId": n.id, "messageId": n.message_id,
                    "topicId": n.topic_id, "topicName": n.topic_name, "senderName": n.sender_name,
                    "snippet": snippet(n.body_version, &n.ciphertext),
                    "ciphertext": (n.body_version == 2).then_some(&n.ciphertext), "bodyVersion": n.body_version,
                    "read": n.read_at.is_some(), "readAt": n.read_at.map(iso8601_ms), "createdAt": iso8601_ms(n.created_at)})))
            })),
            Err(e) => return store_failed(uri.path(), &e),
        }
    }
    list.sort_by_key(|x| std::cmp::Reverse(x.0));
    list.truncate(100);
    let unread = list.iter().filter(|(_, v)| v["read"] == false).count();
    let total = list.len();
    ok(
        json!({"notifications": list.into_iter().map(|x| x.1).collect::<Vec<_>>(), "totals": {"unread": unread, "total": total}}),
    )
}

/// `GET /me/activity?since=`: posts by others in the person's meshes.
pub(crate) async fn activity(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    Query(q): Q,
) -> Response {
    let since = match super::since(&q, DAY) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let (_, seats) = match person(&ctx, &headers, &uri).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let mut list = Vec::new();
    for s in &seats {
        let names: HashMap<String, String> =
            s.hub.topics().into_iter().map(|t| (t.id, t.name)).collect();
        match ctx.db.mesh_topic_messages(&s.mesh.id, since, 200).await {
            Ok(rows) => list.extend(rows.into_iter().filter(|m| m.sender_member_id != s.member.id).map(|m| {
                (m.created_at, merge(mesh_fields(s), json!({"messageId": m.id, "topicId": m.topic_id,
                    "topicName": names.get(&m.topic_id), "senderName": m.sender_name, "senderMemberId": m.sender_member_id,
                    "snippet": snippet(m.body_version, &m.ciphertext), "ciphertext": (m.body_version == 2).then_some(&m.ciphertext),
                    "bodyVersion": m.body_version, "createdAt": iso8601_ms(m.created_at)})))
            })),
            Err(e) => return store_failed(uri.path(), &e),
        }
    }
    list.sort_by_key(|x| std::cmp::Reverse(x.0));
    list.truncate(200);
    let n = list.len();
    ok(
        json!({"activity": list.into_iter().map(|x| x.1).collect::<Vec<_>>(), "totals": {"events": n}}),
    )
}

/// `GET /me/search?q=&limit=`: topic names, and posts of the last 30 days whose text
/// (v1), sender or topic matches.
pub(crate) async fn search(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    Query(q): Q,
) -> Response {
    let query = q
        .get("q")
        .map(|s| s.trim().to_lowercase())
        .unwrap_or_default();
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(50)
        .clamp(1, 200);
    let (_, seats) = match person(&ctx, &headers, &uri).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    if query.chars().count() < 2 {
        return ok(
            json!({"query": query, "topics": [], "messages": [], "totals": {"topics": 0, "messages": 0}}),
        );
    }
    let since = crate::time::now_ms() - 30 * 24 * 3_600_000;
    let (mut topics, mut messages) = (Vec::new(), Vec::new());
    for s in &seats {
        let all = s.hub.topics();
        let names: HashMap<String, String> =
            all.iter().map(|t| (t.id.clone(), t.name.clone())).collect();
        for t in all.iter().filter(|t| t.name.contains(&query)) {
            topics.push(merge(
                mesh_fields(s),
                json!({"id": t.id, "name": t.name, "description": t.description}),
            ));
        }
        let rows = match ctx.db.mesh_topic_messages(&s.mesh.id, since, 2000).await {
            Ok(r) => r,
            Err(e) => return store_failed(uri.path(), &e),
        };
        for m in rows {
            let snip = snippet(m.body_version, &m.ciphertext);
            let topic = names.get(&m.topic_id).cloned().unwrap_or_default();
            let hit = snip
                .as_ref()
                .is_some_and(|t| t.to_lowercase().contains(&query))
                || m.sender_name.to_lowercase().contains(&query)
                || topic.contains(&query);
            if hit {
                messages.push((m.created_at, merge(mesh_fields(s), json!({"messageId": m.id, "topicId": m.topic_id,
                    "topicName": topic, "senderName": m.sender_name, "snippet": snip, "bodyVersion": m.body_version,
                    "createdAt": iso8601_ms(m.created_at)}))));
            }
        }
    }
    messages.sort_by_key(|x| std::cmp::Reverse(x.0));
    messages.truncate(limit);
    topics.truncate(limit);
    let (nt, nm) = (topics.len(), messages.len());
    ok(
        json!({"query": query, "topics": topics, "messages": messages.into_iter().map(|x| x.1).collect::<Vec<_>>(),
        "totals": {"topics": nt, "messages": nm}}),
    )
}

/// `GET /me/tasks?status=`: `active` (open and claimed, the default), `all`, or a comma
/// list (`completed` means done).
pub(crate) async fn tasks(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    Query(q): Q,
) -> Response {
    let (_, seats) = match person(&ctx, &headers, &uri).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let wanted: Option<Vec<String>> = match q.get("status").map(String::as_str).unwrap_or("active")
    {
        "all" => None,
        "active" => Some(vec!["open".into(), "claimed".into()]),
        list => Some(
            list.split(',')
                .map(|s| {
                    if s.trim() == "completed" {
                        "done".into()
                    } else {
                        s.trim().to_owned()
                    }
                })
                .collect(),
        ),
    };
    let mut list = Vec::new();
    let (mut open, mut claimed, mut done) = (0, 0, 0);
    for s in &seats {
        let rows = match ctx.db.tasks(&s.mesh.id, None, None).await {
            Ok(r) => r,
            Err(e) => return store_failed(uri.path(), &e),
        };
        for t in rows {
            match t.status.as_str() {
                "open" => open += 1,
                "claimed" => claimed += 1,
                _ => done += 1,
            }
            if wanted.as_ref().is_some_and(|w| !w.contains(&t.status)) {
                continue;
            }
            let tags: Value = serde_json::from_str(&t.tags).unwrap_or_else(|_| json!([]));
            list.push((t.created_at, json!({"id": t.id, "meshId": s.mesh.id, "meshSlug": s.mesh.slug, "title": t.title,
                "assignee": t.assignee, "claimedByName": t.claimed_by, "priority": t.priority,
                "status": if t.status == "done" { "completed" } else { t.status.as_str() }, "tags": tags, "result": t.result,
                "createdByName": t.created_by, "createdAt": iso8601_ms(t.created_at)})));
        }
    }
    list.sort_by_key(|x| std::cmp::Reverse(x.0));
    list.truncate(200);
    ok(
        json!({"tasks": list.into_iter().map(|x| x.1).collect::<Vec<_>>(), "totals": {"open": open, "claimed": claimed, "completed": done}}),
    )
}

/// `GET /me/state?key=`.
pub(crate) async fn state(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    Query(q): Q,
) -> Response {
    let (_, seats) = match person(&ctx, &headers, &uri).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let key = q.get("key").filter(|k| !k.is_empty());
    let mut entries = Vec::new();
    let mut meshes = std::collections::HashSet::new();
    for s in &seats {
        let rows = match ctx.db.state(&s.mesh.id).await {
            Ok(r) => r,
            Err(e) => return store_failed(uri.path(), &e),
        };
        for r in rows.into_iter().filter(|r| key.is_none_or(|k| *k == r.key)) {
            meshes.insert(s.mesh.id.clone());
            let value: Value =
                serde_json::from_str(&r.value).unwrap_or(Value::String(r.value.clone()));
            entries.push(
                json!({"meshId": s.mesh.id, "meshSlug": s.mesh.slug, "key": r.key, "value": value,
                "updatedByName": r.updated_by, "updatedAt": iso8601_ms(r.updated_at)}),
            );
        }
    }
    entries.truncate(500);
    let n = entries.len();
    ok(json!({"entries": entries, "totals": {"entries": n, "meshes": meshes.len()}}))
}

/// `GET /me/memory?q=`: full-text recall in each mesh, or the last 30 days.
pub(crate) async fn memory(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    Query(q): Q,
) -> Response {
    let (_, seats) = match person(&ctx, &headers, &uri).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let query = q
        .get("q")
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    let since = crate::time::now_ms() - 30 * 24 * 3_600_000;
    let mut list = Vec::new();
    for s in &seats {
        let rows = match &query {
            Some(q) => ctx.db.recall(&s.mesh.id, q).await,
            None => ctx.db.memories_by(&s.mesh.id, 200).await.map(|r| {
                r.into_iter()
                    .filter(|(m, f)| f.is_none() && m.remembered_at >= since)
                    .map(|(m, _)| m)
                    .collect()
            }),
        };
        match rows {
            Ok(rows) => list.extend(rows.into_iter().map(|m| (m.remembered_at, json!({"id": m.id, "meshId": s.mesh.id,
                "meshSlug": s.mesh.slug, "content": m.content, "tags": m.tags.split_whitespace().collect::<Vec<_>>(),
                "rememberedByName": m.remembered_by_name, "rememberedAt": iso8601_ms(m.remembered_at)})))),
            Err(e) => return store_failed(uri.path(), &e),
        }
    }
    if query.is_none() {
        list.sort_by_key(|x| std::cmp::Reverse(x.0));
    }
    list.truncate(200);
    let n = list.len();
    ok(
        json!({"query": query, "memories": list.into_iter().map(|x| x.1).collect::<Vec<_>>(), "totals": {"entries": n}}),
    )
}
