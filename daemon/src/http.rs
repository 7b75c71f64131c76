//! The HTTP side of the one port: `/ws`, `POST /join`, `/health`, `/metrics`, hooks,
//! `POST /upload` and `GET /files/…` (see `files`).
//!
//! Every response carries the reference's CORS headers; any `OPTIONS` gets 204; unknown
//! routes get `404 not found`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use meshd_protocol::Pubkey;
use meshd_protocol::invite::InvitePayload;
use serde::Deserialize;
use serde_json::json;
use tracing::{info, warn};

use crate::Ctx;
use crate::hub::MemberInfo;
use crate::ids::random_id;
use crate::store::writer::{JoinOp, JoinOutcome, WriteOp};
use crate::time::now_ms;

/// The client's address: the connection's, or, when that is a trusted reverse proxy,
/// the rightmost `X-Forwarded-For` address that is not itself a trusted proxy (proxies
/// append, so addresses left of it could be forged by the client).
pub(crate) fn client_ip(ctx: &Ctx, remote: SocketAddr, headers: &axum::http::HeaderMap) -> IpAddr {
    let trusted = &ctx.config.server.trusted_proxies;
    let ip = remote.ip();
    if !trusted.contains(&ip) {
        return ip;
    }
    let hops: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    hops.into_iter()
        .rev()
        .find(|a| !trusted.contains(a))
        .unwrap_or(ip)
}

/// Largest webhook body.
pub(crate) const WEBHOOK_BODY_LIMIT: usize = 64 * 1024;
/// Posts per second (and burst) one webhook accepts.
pub(crate) const WEBHOOK_RATE: (u32, u32) = (10, 20);

/// The HTTP base of the public URL (`ws://host/ws` → `http://host`), for webhook URLs.
pub(crate) fn hook_base(config: &meshd_config::Config) -> String {
    let (ws, _) = config.public_url();
    let http = ws
        .strip_prefix("wss://")
        .map(|r| format!("https://{r}"))
        .or_else(|| ws.strip_prefix("ws://").map(|r| format!("http://{r}")))
        .unwrap_or(ws);
    http.strip_suffix("/ws")
        .unwrap_or(&http)
        .trim_end_matches('/')
        .to_owned()
}

/// Equal without an early exit, so response time says nothing about a wrong secret.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /hook/:meshId/:secret`: pushes the JSON body to every connection of the mesh as
/// `subtype: "webhook"`, `event: <name>`.
async fn webhook(
    State(ctx): State<Arc<Ctx>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
    axum::extract::Path((mesh_id, secret)): axum::extract::Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let fail = |code: StatusCode, msg: &str| {
        (code, axum::Json(json!({"ok": false, "error": msg}))).into_response()
    };
    // Guessing secrets costs a store read each: per source address, posts are limited
    // before the lookup (well above what one honest sender's webhooks post).
    let ip = crate::ratelimit::addr_key(client_ip(&ctx, remote, &headers));
    if crate::hub::lock(&ctx.webhook_sources).take(ip, crate::time::instant())
        != crate::ratelimit::Take::Allowed
    {
        ctx.metrics.http_refused.inc("webhook_rate_limited");
        crate::ratelimit::tarpit(&ctx.sessions_cancel).await;
        return fail(StatusCode::TOO_MANY_REQUESTS, "rate limited");
    }
    if !crate::ids::plausible_id(&mesh_id) {
        return fail(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let rows = match ctx.db.webhooks(&mesh_id).await {
        Ok(r) => r,
        Err(e) => {
            warn!(cause = %e, "webhook lookup");
            return fail(StatusCode::SERVICE_UNAVAILABLE, "store unavailable");
        }
    };
    // Compare against every webhook of the mesh, without stopping at a match.
    let mut found = None;
    for w in rows {
        if constant_time_eq(w.secret.as_bytes(), secret.as_bytes()) {
            found = Some(w);
        }
    }
    // A wrong, deleted or never-created secret (or mesh) is the reference's 401.
    let Some(hook) = found else {
        return fail(StatusCode::UNAUTHORIZED, "unauthorized");
    };
    let allowed =
        crate::hub::lock(&ctx.webhook_buckets).take(hook.id.clone(), crate::time::instant());
    if allowed != crate::ratelimit::Take::Allowed {
        return fail(
            StatusCode::TOO_MANY_REQUESTS,
            "rate limited: at most 10 posts per second",
        );
    }
    let Ok(data) = serde_json::from_slice::<Box<serde_json::value::RawValue>>(&body) else {
        return fail(StatusCode::BAD_REQUEST, "the body must be JSON");
    };
    // A mesh no one is connected to has nobody to hear the event here; its peer
    // brokers still do.
    let mesh = match ctx.hub.loaded(&mesh_id) {
        Some(m) => Some(m),
        None if ctx.fed.is_some() => ctx.hub.mesh(&ctx.db, &mesh_id).await.ok().flatten(),
        None => None,
    };
    let delivered = mesh.map_or(0, |mesh| {
        let now = now_ms();
        let envelope = crate::delivery::Envelope {
            id: crate::ids::uuid_v4(),
            mesh,
            sender_pubkey: format!("webhook:{}", hook.name),
            author: None,
            target: crate::delivery::Target::Everyone,
            target_spec: String::new(),
            priority: meshd_protocol::Priority::Next,
            body: crate::delivery::Body::Event {
                name: hook.name.clone(),
                data,
            },
            subtype: Some("webhook".to_owned()),
            client_message_id: None,
            created_at: now,
            expires_at: now,
            origin: crate::delivery::Origin::Webhook,
            tags: Vec::new(),
            bridged: None,
            topic: None,
        };
        crate::delivery::submit(&ctx, envelope, now).map_or(0, |a| a.delivered)
    });
    (
        StatusCode::OK,
        axum::Json(json!({"ok": true, "delivered": delivered})),
    )
        .into_response()
}

/// Largest `/join` body (the reference used its 64 KiB message limit).
const JOIN_BODY_LIMIT: usize = 64 * 1024;

pub(crate) fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/ws", get(ws))
        // REST bodies are small JSON (a post is at most a message); they must arrive within
        // `limits.http_body_timeout` like the other small-body routes. The event stream
        // and the WebSocket answer at once, so the deadline does not cut them.
        .nest(
            "/api/v1",
            crate::api::router()
                .layer(DefaultBodyLimit::max(
                    ctx.config
                        .limits
                        .max_message_bytes
                        .saturating_add(64 * 1024),
                ))
                .layer(middleware::from_fn_with_state(ctx.clone(), body_deadline)),
        )
        .route(
            "/join",
            post(join)
                .layer(DefaultBodyLimit::max(JOIN_BODY_LIMIT))
                .layer(middleware::from_fn_with_state(ctx.clone(), body_deadline)),
        )
        .route("/app", get(crate::features::webapp::index))
        .route("/app/", get(crate::features::webapp::index))
        .route("/app/{*path}", get(crate::features::webapp::file))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/federation", get(federation))
        .route("/.well-known/meshd/bundle", get(bundle))
        // The upload reads its body itself, after checking the sender, up to
        // `limits.max_upload_bytes`.
        .route("/upload", post(crate::features::files::engine::upload))
        .route(
            "/files/{mesh_id}/{file_id}",
            get(crate::features::files::engine::download),
        )
        .route(
            "/hook/set-status",
            post(crate::features::presence::hooks::set_status)
                .layer(DefaultBodyLimit::max(
                    crate::features::presence::hooks::HOOK_BODY_LIMIT,
                ))
                .layer(middleware::from_fn_with_state(ctx.clone(), body_deadline)),
        )
        .route(
            "/hook/{mesh_id}/{secret}",
            post(webhook)
                .layer(DefaultBodyLimit::max(WEBHOOK_BODY_LIMIT))
                .layer(middleware::from_fn_with_state(ctx.clone(), body_deadline)),
        )
        .fallback(not_found)
        .layer(middleware::from_fn(cors))
        .with_state(ctx)
}

/// Small-body routes (`/join`, hooks, webhooks) answer within `limits.http_body_timeout`
/// or fail with 408: a body dripped in byte by byte must not hold the connection (and
/// its handler) for good.
async fn body_deadline(State(ctx): State<Arc<Ctx>>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(ctx.config.limits.http_body_timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            ctx.metrics.http_refused.inc("body_timeout");
            (
                StatusCode::REQUEST_TIMEOUT,
                axum::Json(
                    json!({"ok": false, "error": "the request body did not arrive in time"}),
                ),
            )
                .into_response()
        }
    }
}

async fn cors(req: Request, next: Next) -> Response {
    let mut resp = if req.method() == Method::OPTIONS {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, GET, PATCH, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(
            "Content-Type, Authorization, X-Mesh-Id, X-Member-Id, X-File-Name, X-Tags, X-Persistent, X-Target-Spec, X-Encrypted, X-Owner-Pubkey, X-File-Keys, X-Meshd-Pubkey, X-Meshd-Timestamp, X-Meshd-Signature",
        ),
    );
    resp
}

async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, "not found")
}

async fn ws(
    State(ctx): State<Arc<Ctx>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    slot: Option<axum::Extension<crate::server::SlotHandle>>,
    headers: axum::http::HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    // The connection's unauthenticated slot goes with the session until its hello.
    let slot = slot.and_then(|axum::Extension(s)| s.take());
    let remote = SocketAddr::new(client_ip(&ctx, remote, &headers), remote.port());
    if ctx.sessions_cancel.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let Ok(permit) = ctx.connections.clone().try_acquire_owned() else {
        ctx.metrics.connections_rejected.inc("too_many_connections");
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections").into_response();
    };
    let max = ctx.config.limits.max_frame_bytes;
    let conn_id = ctx.next_conn_id();
    upgrade
        .max_message_size(max)
        .max_frame_size(max)
        // See `limits.ws_read_buffer`: tungstenite's defaults cost ~170 KiB per idle peer.
        .read_buffer_size(ctx.config.limits.ws_read_buffer)
        .write_buffer_size(ctx.config.limits.ws_write_buffer)
        // Room for any one frame the broker sends (replies are cut to `max`; pushes and
        // relays carry at most a client's frame plus their envelope) on top of the
        // write buffer: a frame never fails for the size of the buffer.
        .max_write_buffer_size(
            max.saturating_mul(2)
                .saturating_add(ctx.config.limits.ws_write_buffer),
        )
        .on_upgrade(move |socket| {
            // The session runs in axum's upgrade task, tracked by ours so shutdown can
            // wait for it (not spawned again: a second task per connection cost memory
            // and a wake per session end).
            let tracker = ctx.sessions.clone();
            tracker.track_future(crate::session::run(
                ctx, socket, remote, conn_id, permit, slot,
            ))
        })
}

async fn health(State(ctx): State<Arc<Ctx>>) -> Response {
    let healthy = ctx.metrics.store_healthy();
    let body = json!({
        "status": if healthy { "ok" } else { "degraded" },
        "db": if healthy { "up" } else { "down" },
        "store": ctx.db.kind(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime": ctx.uptime().as_secs(),
    });
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

async fn metrics(State(ctx): State<Arc<Ctx>>) -> Response {
    let mut out = ctx.metrics.render(ctx.uptime());
    render_tables(&ctx, &mut out);
    ctx.usage.render(&mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Gauges of the bounded in-memory tables that strangers can make grow.
fn render_tables(ctx: &Ctx, out: &mut String) {
    use std::fmt::Write as _;
    let (hook_keys, hook_pending) = ctx.hooks.sizes();
    let webhook_keys = crate::hub::lock(&ctx.webhook_buckets).len();
    let pending_addresses = ctx.pending.len();
    let uploads = ctx.files.uploads_active();
    let _ = writeln!(
        out,
        "# HELP meshd_table_entries Entries in bounded in-memory tables, by table.\n\
         # TYPE meshd_table_entries gauge\n\
         meshd_table_entries{{table=\"hook_rate_keys\"}} {hook_keys}\n\
         meshd_table_entries{{table=\"hook_pending\"}} {hook_pending}\n\
         meshd_table_entries{{table=\"webhook_rate_keys\"}} {webhook_keys}\n\
         meshd_table_entries{{table=\"pending_addresses\"}} {pending_addresses}\n\
         meshd_table_entries{{table=\"uploads_in_progress\"}} {uploads}"
    );
}

/// Each link to a peer broker: state, RTT, queued, counters, last error.
async fn federation(State(ctx): State<Arc<Ctx>>) -> Response {
    match &ctx.fed {
        Some(fed) => axum::Json(fed.status_json()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": "federation is not configured on this broker"})),
        )
            .into_response(),
    }
}

/// The org CA (PEM) with its SHA-256 fingerprint, for peers that pin it.
async fn bundle(State(ctx): State<Arc<Ctx>>) -> Response {
    match &ctx.fed {
        Some(fed) => (
            [(header::CONTENT_TYPE, "application/x-pem-file")],
            fed.bundle().to_owned(),
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": "federation is not configured on this broker"})),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
struct JoinRequest {
    invite_token: Option<String>,
    invite_payload: Option<serde_json::Value>,
    peer_pubkey: Option<String>,
    display_name: Option<String>,
}

fn join_error(code: StatusCode, error: impl Into<String>) -> Response {
    (
        code,
        axum::Json(json!({"ok": false, "error": error.into()})),
    )
        .into_response()
}

/// `POST /join` (§7.2), with the reference's holes closed: the role and expiry come
/// from the stored invite, the token must encode exactly the submitted payload, and uses
/// are counted atomically in the store writer.
async fn join(State(ctx): State<Arc<Ctx>>, body: Bytes) -> Response {
    let refused = |error: &'static str| {
        ctx.metrics.joins.inc("refused");
        join_error(StatusCode::BAD_REQUEST, error)
    };
    let Ok(req) = serde_json::from_slice::<JoinRequest>(&body) else {
        return refused("invalid JSON body");
    };
    let (Some(token), Some(payload), Some(pubkey), Some(display_name)) = (
        req.invite_token,
        req.invite_payload,
        req.peer_pubkey,
        req.display_name,
    ) else {
        return refused("invite_token, invite_payload, peer_pubkey, display_name required");
    };
    let Ok(pubkey) = Pubkey::parse_hex(&pubkey) else {
        return refused("peer_pubkey must be 64 hex chars (32 bytes)");
    };
    let display_name = display_name.trim().to_owned();
    if display_name.is_empty() || display_name.len() > meshd_protocol::client::MAX_NAME_LEN {
        return refused("display_name must be 1 to 256 bytes");
    }
    if display_name.contains('\0') {
        return refused("display_name must not contain U+0000");
    }
    let Ok(payload) = serde_json::from_value::<InvitePayload>(payload) else {
        return refused("invite_malformed");
    };
    let Ok(owner) = payload.verify() else {
        return refused("invite_bad_signature");
    };
    match InvitePayload::from_token(&token) {
        Ok(p) if p == payload => {}
        _ => return refused("invite_token_mismatch"),
    }
    let mesh = match ctx.db.mesh_by_id(&payload.mesh_id).await {
        Ok(Some(m)) if m.archived_at.is_none() => m,
        Ok(_) => return refused("mesh_not_found"),
        Err(e) => {
            warn!(cause = %e, "join: store");
            ctx.metrics.joins.inc("error");
            return join_error(StatusCode::INTERNAL_SERVER_ERROR, "store unavailable");
        }
    };
    if mesh.owner_pubkey != owner.to_hex() {
        return refused("invite_owner_mismatch");
    }
    let pubkey_hex = pubkey.to_hex();
    let outcome = ctx
        .writer
        .call(|reply| {
            WriteOp::Join(Box::new(JoinOp {
                mesh_id: mesh.id.clone(),
                token: token.clone(),
                pubkey: pubkey_hex.clone(),
                display_name: display_name.clone(),
                new_member_id: random_id(),
                now: now_ms(),
                reply,
            }))
        })
        .await;
    match outcome {
        Ok(JoinOutcome::Joined { member_id, role }) => {
            ctx.metrics.joins.inc("joined");
            ctx.audit.record(
                &mesh.id,
                "member_joined",
                Some(member_id.clone()),
                &display_name,
                json!({"memberId": member_id, "pubkey": pubkey_hex, "role": role}),
            );
            info!(mesh.id = %mesh.id, member.id = %member_id, %role, "member enrolled");
            if let Some(hub) = ctx.hub.loaded_or_loading(&ctx.db, &mesh.id).await {
                hub.upsert_member(
                    &pubkey_hex,
                    MemberInfo {
                        id: member_id.clone(),
                        display_name,
                        role,
                        revoked: false,
                        home: None,
                    },
                );
                if let Some(fed) = &ctx.fed {
                    fed.member_changed(&hub, &pubkey_hex);
                }
            }
            // Every new member reads #general, as the reference's invite claim does.
            if let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &mesh.id).await {
                let now = now_ms();
                let general = crate::features::topics::ensure_general(&ctx, &hub, now).await;
                let subscribed = match general {
                    Ok(g) => {
                        crate::features::topics::subscribe(
                            &ctx,
                            &hub,
                            &g.id,
                            &member_id,
                            &pubkey_hex,
                            meshd_protocol::topics::TopicRole::Member,
                            false,
                            now,
                        )
                        .await
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = subscribed {
                    warn!(cause = %e, "join: subscribing to #general");
                }
            }
            (
                StatusCode::OK,
                axum::Json(json!({"ok": true, "memberId": member_id})),
            )
                .into_response()
        }
        Ok(JoinOutcome::AlreadyMember { member_id }) => {
            ctx.metrics.joins.inc("already_member");
            (
                StatusCode::OK,
                axum::Json(json!({"ok": true, "memberId": member_id, "alreadyMember": true})),
            )
                .into_response()
        }
        Ok(JoinOutcome::Refused(code)) => refused(code),
        Err(e) => {
            warn!(cause = %e, "join: store");
            ctx.metrics.joins.inc("error");
            join_error(StatusCode::INTERNAL_SERVER_ERROR, "store unavailable")
        }
    }
}
