//! The REST API, `/api/v1` (HEAD addendum §3), on meshd's own HTTP port: the routes the
//! newest CLI and the reference web app call, with the same paths, bearer auth
//! (`Authorization: Bearer cm_…`, `features::apikeys`), JSON shapes and error shapes,
//! and the topic stream as server-sent events pushed live (not polled). The route table
//! ([`ROUTES`]) mounts every route and generates the OpenAPI 3.1 document served at
//! `/api/v1/openapi.json`, so the document cannot list a route that is not served.
//!
//! Errors come in the reference's two families: authentication and validation as
//! `{code, message, status, timestamp, path}` (401, 403, 422), and route errors as
//! `{error: "<code>", …}`. A key acts in its own mesh only; the `/me/*` routes read every
//! mesh of the key's person (`me`).

// Route helpers return the response to send as their error: a handler answers with
// whichever it gets, and boxing every early answer would buy nothing.
#![allow(clippy::result_large_err)]

mod me;
mod openapi;
mod topics;
pub(crate) mod ws;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, get, on};
use meshd_protocol::apikeys::Capability;
use serde_json::{Value, json};

use crate::Ctx;
use crate::features::apikeys::{ApiKeyAuth, AuthError};
use crate::hub::MeshHub;
use crate::hub::topics::TopicInfo;

/// One route: how it is mounted and how the OpenAPI document describes it.
#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) method: &'static str,
    /// Under `/api/v1`, axum syntax (`{name}`).
    pub(crate) path: &'static str,
    pub(crate) summary: &'static str,
    /// `None`: no capability checked.
    pub(crate) capability: Option<&'static str>,
    /// Whether the key's topic scope applies.
    pub(crate) scoped: bool,
    /// Query parameters (name, description).
    pub(crate) query: &'static [(&'static str, &'static str)],
    /// Request body fields (name, JSON type, required).
    pub(crate) body: &'static [(&'static str, &'static str, bool)],
    /// Top-level fields of the 200 response.
    pub(crate) response: &'static [&'static str],
    /// `text/event-stream` rather than JSON.
    pub(crate) stream: bool,
}

/// Every route of `/api/v1` (the OpenAPI document itself is served beside them).
pub(crate) const ROUTES: &[Route] = &[
    Route {
        method: "POST",
        path: "/messages",
        summary: "Post to a topic as the key's member",
        capability: Some("send"),
        scoped: true,
        query: &[],
        body: &[
            ("topic", "string", true),
            ("ciphertext", "string", true),
            ("nonce", "string", true),
            ("priority", "string", false),
            ("bodyVersion", "integer", false),
            ("mentions", "array", false),
            ("replyToId", "string", false),
        ],
        response: &[
            "messageId",
            "historyId",
            "queueId",
            "topic",
            "topicId",
            "notifications",
            "bodyVersion",
            "replyToId",
        ],
        stream: false,
    },
    Route {
        method: "POST",
        path: "/me/peer-pubkey",
        summary: "Register a browser key (web members only; meshd has none)",
        capability: None,
        scoped: false,
        query: &[],
        body: &[("pubkey", "string", true)],
        response: &["memberId", "pubkey", "changed"],
        stream: false,
    },
    Route {
        method: "GET",
        path: "/me/workspace",
        summary: "Every mesh of the key's person, with counts",
        capability: Some("read"),
        scoped: false,
        query: &[],
        body: &[],
        response: &["userId", "meshes", "totals"],
        stream: false,
    },
    Route {
        method: "GET",
        path: "/me/notifications",
        summary: "Mentions of the person across meshes",
        capability: Some("read"),
        scoped: false,
        query: &[
            ("include", "`all` to include read ones"),
            ("since", "ISO time (default 7 days ago)"),
        ],
        body: &[],
        response: &["notifications", "totals"],
        stream: false,
    },
    Route {
        method: "GET",
        path: "/me/activity",
        summary: "Topic posts by others across the person's meshes",
        capability: Some("read"),
        scoped: false,
        query: &[("since", "ISO time (default 24 hours ago)")],
        body: &[],
        response: &["activity", "totals"],
        stream: false,
    },
    Route {
        method: "GET",
        path: "/me/search",
        summary: "Topics and posts matching a query",
        capability: Some("read"),
        scoped: false,
        query: &[
            ("q", "at least 2 characters"),
            ("limit", "1-200 (default 50)"),
        ],
        body: &[],
        response: &["query", "topics", "messages", "totals"],
        stream: false,
    },
    Route {
        method: "GET",
        path: "/me/tasks",
        summary: "Tasks across the person's meshes",
        capability: Some("read"),
        scoped: false,
        query: &[("status", "`active` (default), `all` or a comma list")],
        body: &[],
        response: &["tasks", "totals"],
        stream: false,
    },
    Route {
        method: "GET",
        path: "/me/state",
        summary: "Shared state across the person's meshes",
        capability: Some("read"),
        scoped: false,
        query: &[("key", "only this key")],
        body: &[],
        response: &["entries", "totals"],
        stream: false,
    },
    Route {
        method: "GET",
        path: "/me/memory",
        summary: "Mesh memory across the person's meshes",
        capability: Some("read"),
        scoped: false,
        query: &[("q", "full-text query (default: the last 30 days)")],
        body: &[],
        response: &["query", "memories", "totals"],
        stream: false,
    },
    Route {
        method: "GET",
        path: "/me/topics",
        summary: "Topics the person reads, with unread counts",
        capability: Some("read"),
        scoped: false,
        query: &[],
        body: &[],
        response: &["topics", "totals"],
        stream: false,
    },
    Route {
        method: "GET",
        path: "/topics",
        summary: "Topics of the key's mesh within its scope",
        capability: Some("read"),
        scoped: true,
        query: &[],
        body: &[],
        response: &["topics"],
        stream: false,
    },
    Route {
        method: "PATCH",
        path: "/topics/{name}/read",
        summary: "Mark a topic read (subscribes the member)",
        capability: Some("read"),
        scoped: true,
        query: &[],
        body: &[],
        response: &["topic", "topicId", "readAt"],
        stream: false,
    },
    Route {
        method: "GET",
        path: "/topics/{name}/messages",
        summary: "A page of topic history, newest first",
        capability: Some("read"),
        scoped: true,
        query: &[("limit", "1-200 (default 50)"), ("before", "a message id")],
        body: &[],
        response: &["topic", "topicId", "messages"],
        stream: false,
    },
    Route {
        method: "GET",
        path: "/topics/{name}/stream",
        summary: "Live topic posts (server-sent events: ready, message, heartbeat, error)",
        capability: Some("read"),
        scoped: true,
        query: &[],
        body: &[],
        response: &[],
        stream: true,
    },
    Route {
        method: "GET",
        path: "/logs",
        summary: "The mesh's log entries, newest first (meshd)",
        capability: Some("read"),
        scoped: false,
        query: &[
            ("q", "full text over message and data"),
            ("peer", "a peer's name or key"),
            ("level", "at least this severe: debug, info, warn, error"),
            ("last", "1-500 (default 50)"),
        ],
        body: &[],
        response: &["logs"],
        stream: false,
    },
    Route {
        method: "GET",
        path: "/report",
        summary: "A timeframe of the mesh summed up (meshd)",
        capability: Some("read"),
        scoped: false,
        query: &[("timeframe", "15m, 1h, 24h, 7d (default 24h)")],
        body: &[],
        response: &[
            "summary",
            "messages",
            "delivery",
            "errors",
            "logs",
            "peers",
            "tasks",
            "schedules",
        ],
        stream: false,
    },
    Route {
        method: "GET",
        path: "/peers/search",
        summary: "Ranked search over the mesh's peers and members (meshd)",
        capability: Some("read"),
        scoped: false,
        query: &[
            ("q", "free text"),
            ("group", "a group"),
            ("role", "a role"),
            ("status", "idle, working, dnd or offline"),
            ("broker", "a peer broker, or local"),
            ("peerType", "claude, human, connector…"),
            ("online", "true or false"),
            ("limit", "1-50 (default 10)"),
        ],
        body: &[],
        response: &["results", "searched"],
        stream: false,
    },
    Route {
        method: "GET",
        path: "/members",
        summary: "Members of the key's mesh with presence",
        capability: Some("read"),
        scoped: false,
        query: &[],
        body: &[],
        response: &["members"],
        stream: false,
    },
    Route {
        method: "GET",
        path: "/topics/{name}/key",
        summary: "The topic key sealed for the key's member",
        capability: Some("read"),
        scoped: true,
        query: &[],
        body: &[],
        response: &[
            "topic",
            "topicId",
            "encryptedKey",
            "nonce",
            "senderPubkey",
            "createdAt",
        ],
        stream: false,
    },
    Route {
        method: "POST",
        path: "/topics/{name}/claim-key",
        summary: "Give an unencrypted topic a key",
        capability: Some("send"),
        scoped: true,
        query: &[],
        body: &[
            ("encryptedKeyPubkey", "string", true),
            ("encryptedKey", "string", true),
            ("nonce", "string", true),
        ],
        response: &["topic", "topicId", "senderPubkey", "memberId", "claimed"],
        stream: false,
    },
    Route {
        method: "GET",
        path: "/topics/{name}/pending-seals",
        summary: "Members still without the topic key",
        capability: Some("read"),
        scoped: true,
        query: &[],
        body: &[],
        response: &["topic", "topicId", "senderPubkey", "pending"],
        stream: false,
    },
    Route {
        method: "POST",
        path: "/topics/{name}/seal",
        summary: "Store the topic key sealed for a member (by a member holding it)",
        capability: Some("read"),
        scoped: true,
        query: &[],
        body: &[
            ("memberId", "string", true),
            ("encryptedKey", "string", true),
            ("nonce", "string", true),
        ],
        response: &["topic", "topicId", "memberId", "sealedAt"],
        stream: false,
    },
    Route {
        method: "GET",
        path: "/notifications",
        summary: "Mentions of the key's member in its mesh",
        capability: Some("read"),
        scoped: false,
        query: &[
            ("since", "ISO time (default 24 hours ago)"),
            ("unread", "`1`: unread only"),
        ],
        body: &[],
        response: &["notifications", "since", "mentionedAs"],
        stream: false,
    },
    Route {
        method: "POST",
        path: "/notifications/read",
        summary: "Mark mentions read",
        capability: Some("read"),
        scoped: false,
        query: &[],
        body: &[
            ("ids", "array", false),
            ("all", "boolean", false),
            ("before", "string", false),
        ],
        response: &["marked"],
        stream: false,
    },
    Route {
        method: "GET",
        path: "/peers",
        summary: "Who is online in the key's mesh",
        capability: Some("read"),
        scoped: false,
        query: &[],
        body: &[],
        response: &["peers"],
        stream: false,
    },
];

/// The `/api/v1` router.
pub(crate) fn router() -> Router<Arc<Ctx>> {
    let mut r = Router::new()
        .route("/openapi.json", get(openapi::document))
        .route("/ws", get(ws::upgrade));
    for route in ROUTES {
        let filter = match route.method {
            "POST" => MethodFilter::POST,
            "PATCH" => MethodFilter::PATCH,
            _ => MethodFilter::GET,
        };
        let handler = match route.path {
            "/messages" => on(filter, topics::post_message),
            "/me/peer-pubkey" => on(filter, me::peer_pubkey),
            "/me/workspace" => on(filter, me::workspace),
            "/me/notifications" => on(filter, me::notifications),
            "/me/activity" => on(filter, me::activity),
            "/me/search" => on(filter, me::search),
            "/me/tasks" => on(filter, me::tasks),
            "/me/state" => on(filter, me::state),
            "/me/memory" => on(filter, me::memory),
            "/me/topics" => on(filter, me::topics),
            "/topics" => on(filter, topics::list),
            "/topics/{name}/read" => on(filter, topics::mark_read),
            "/topics/{name}/messages" => on(filter, topics::messages),
            "/topics/{name}/stream" => on(filter, topics::stream),
            "/members" => on(filter, topics::members),
            "/peers/search" => on(filter, crate::features::search::rest),
            "/logs" | "/report" => on(filter, crate::features::telemetry::rest),
            "/topics/{name}/key" => on(filter, topics::key),
            "/topics/{name}/claim-key" => on(filter, topics::claim_key),
            "/topics/{name}/pending-seals" => on(filter, topics::pending_seals),
            "/topics/{name}/seal" => on(filter, topics::seal),
            "/notifications" => on(filter, topics::notifications),
            "/notifications/read" => on(filter, topics::read_notifications),
            _ => on(filter, topics::peers),
        };
        r = r.route(route.path, handler);
    }
    r.fallback(
        |axum::extract::OriginalUri(uri): axum::extract::OriginalUri| async move {
            route_error(
                StatusCode::NOT_FOUND,
                "not_found",
                json!({"path": uri.path()}),
            )
        },
    )
}

/// An authentication or validation error (`{code, message, status, timestamp, path}`).
pub(crate) fn mw_error(status: StatusCode, code: &str, message: &str, path: &str) -> Response {
    (
        status,
        axum::Json(json!({
            "code": code,
            "message": message,
            "status": status.as_u16(),
            "timestamp": meshd_protocol::time::iso8601_ms(crate::time::now_ms()),
            "path": path,
        })),
    )
        .into_response()
}

/// A route error: `{error: code, …extra}`.
pub(crate) fn route_error(status: StatusCode, code: &str, extra: Value) -> Response {
    let mut body = json!({"error": code});
    if let (Some(b), Value::Object(x)) = (body.as_object_mut(), extra) {
        b.extend(x);
    }
    (status, axum::Json(body)).into_response()
}

/// A 422 for a request that does not validate.
pub(crate) fn invalid(path: &str, message: &str) -> Response {
    mw_error(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
        message,
        path,
    )
}

/// A 500 for a store failure.
pub(crate) fn store_failed(path: &str, e: &dyn std::fmt::Display) -> Response {
    tracing::warn!(cause = %e, path, "rest api");
    mw_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "common:error.general",
        "the broker's store is unavailable",
        path,
    )
}

/// What a request is allowed: its key, the key's mesh loaded, and the route's path.
pub(crate) struct Caller {
    pub(crate) key: ApiKeyAuth,
    pub(crate) mesh: Arc<MeshHub>,
    pub(crate) path: String,
}

impl Caller {
    /// The member the key acts as (`400 api_key_has_no_issuer` without one).
    pub(crate) fn issuer(&self) -> Result<&str, Response> {
        self.key
            .issuer
            .as_deref()
            .ok_or_else(|| route_error(StatusCode::BAD_REQUEST, "api_key_has_no_issuer", json!({})))
    }

    /// The issuer's member key and display name.
    pub(crate) fn issuer_member(&self) -> Option<(String, crate::hub::MemberInfo)> {
        let id = self.key.issuer.as_deref()?;
        self.mesh.members_by_id().remove(id)
    }

    /// Topic `name` of the key's mesh, within the key's scope.
    pub(crate) fn topic(&self, name: &str) -> Result<TopicInfo, Response> {
        if !self.key.in_scope(name) {
            return Err(mw_error(
                StatusCode::FORBIDDEN,
                "error.api_key_topic_out_of_scope",
                "this key is not scoped to that topic",
                &self.path,
            ));
        }
        self.mesh
            .topic(name)
            .filter(|t| t.name == name)
            .ok_or_else(|| {
                route_error(
                    StatusCode::NOT_FOUND,
                    "topic_not_found",
                    json!({"topic": name}),
                )
            })
    }
}

/// Authenticates a request and checks the route's capability.
pub(crate) async fn caller(
    ctx: &Ctx,
    headers: &HeaderMap,
    path: &str,
    cap: Option<Capability>,
) -> Result<Caller, Response> {
    let secret = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(char::is_whitespace)?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|s| !s.is_empty());
    let unauthorized = |code: &str, msg: &str| mw_error(StatusCode::UNAUTHORIZED, code, msg, path);
    let Some(secret) = secret else {
        return Err(unauthorized(
            "error.api_key_missing",
            "send Authorization: Bearer <api key>",
        ));
    };
    let key = match crate::features::apikeys::authenticate(&ctx.db, secret, crate::time::now_ms())
        .await
    {
        Ok(k) => k,
        Err(AuthError::Store(e)) => return Err(store_failed(path, &e)),
        Err(e) => return Err(unauthorized("error.api_key_invalid", &e.to_string())),
    };
    if let Some(cap) = cap
        && !key.can(cap)
    {
        return Err(mw_error(
            StatusCode::FORBIDDEN,
            "error.api_key_missing_capability",
            &format!("this key lacks the {} capability", cap.as_str()),
            path,
        ));
    }
    let mesh = match ctx.hub.mesh(&ctx.db, &key.mesh_id).await {
        Ok(Some(m)) => m,
        Ok(None) => {
            return Err(route_error(
                StatusCode::NOT_FOUND,
                "mesh_not_found",
                json!({}),
            ));
        }
        Err(e) => return Err(store_failed(path, &e)),
    };
    Ok(Caller {
        key,
        mesh,
        path: path.to_owned(),
    })
}

/// [`caller`] for a route on topic `name`: the topic resolved within the key's scope.
pub(crate) async fn topic_caller(
    ctx: &Ctx,
    headers: &HeaderMap,
    path: &str,
    cap: Capability,
    name: &str,
) -> Result<(Caller, TopicInfo), Response> {
    let c = caller(ctx, headers, path, Some(cap)).await?;
    let t = c.topic(name)?;
    Ok((c, t))
}

/// [`topic_caller`] for a route that acts as the key's member (`400
/// api_key_has_no_issuer` without one). Returns the caller, the topic and the member id.
pub(crate) async fn topic_issuer(
    ctx: &Ctx,
    headers: &HeaderMap,
    path: &str,
    cap: Capability,
    name: &str,
) -> Result<(Caller, TopicInfo, String), Response> {
    let (c, t) = topic_caller(ctx, headers, path, cap, name).await?;
    let issuer = c.issuer()?.to_owned();
    Ok((c, t, issuer))
}

/// A day in ms.
pub(crate) const DAY: i64 = 24 * 3_600_000;

/// The `since` query parameter: an ISO time, or `ago` ms before now when absent
/// (`400 invalid_since` when it does not parse).
pub(crate) fn since(
    q: &std::collections::HashMap<String, String>,
    ago: i64,
) -> Result<i64, Response> {
    match parse_iso(q.get("since").map(String::as_str)) {
        Ok(s) => Ok(s.unwrap_or_else(|| crate::time::now_ms() - ago)),
        Err(()) => Err(route_error(
            StatusCode::BAD_REQUEST,
            "invalid_since",
            json!({}),
        )),
    }
}

/// Parses an optional ISO time query parameter.
pub(crate) fn parse_iso(s: Option<&str>) -> Result<Option<i64>, ()> {
    match s {
        None | Some("") => Ok(None),
        Some(s) => s
            .parse::<jiff::Timestamp>()
            .map(|t| Some(t.as_millisecond()))
            .map_err(|_| ()),
    }
}

/// The first 240 characters of a v1 body.
pub(crate) fn snippet(body_version: i64, ciphertext: &str) -> Option<String> {
    (body_version == 1)
        .then(|| meshd_protocol::topics::v1_text(ciphertext))
        .flatten()
        .map(|t| t.chars().take(240).collect())
}
