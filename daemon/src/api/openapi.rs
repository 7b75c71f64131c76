//! The OpenAPI 3.1 document of `/api/v1`, generated from [`super::ROUTES`] (the table
//! that also mounts the routes).

use axum::response::IntoResponse;
use serde_json::{Map, Value, json};

use super::ROUTES;

/// `GET /api/v1/openapi.json` (no key needed).
pub(crate) async fn document() -> impl IntoResponse {
    axum::Json(build())
}

fn error_responses(r: &super::Route) -> Map<String, Value> {
    let mut m = Map::new();
    let err = |d: &str, schema: &str| json!({"description": d, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
    m.insert(
        "401".into(),
        err("missing, unknown, revoked or expired key", "AuthError"),
    );
    if r.capability.is_some() || r.scoped {
        m.insert(
            "403".into(),
            err(
                "the key lacks the capability or the topic scope",
                "AuthError",
            ),
        );
    }
    if !r.body.is_empty() || !r.query.is_empty() {
        m.insert(
            "422".into(),
            err("the request does not validate", "AuthError"),
        );
    }
    m.insert(
        "400".into(),
        err("a route error (e.g. api_key_has_no_issuer)", "RouteError"),
    );
    m.insert(
        "404".into(),
        err("a route error (e.g. topic_not_found)", "RouteError"),
    );
    m
}

/// The document.
pub(crate) fn build() -> Value {
    let mut paths = Map::new();
    for r in ROUTES {
        let mut params: Vec<Value> = Vec::new();
        if r.path.contains("{name}") {
            params.push(
                json!({"name": "name", "in": "path", "required": true, "schema": {"type": "string"},
                "description": "topic name"}),
            );
        }
        for (name, d) in r.query {
            params.push(json!({"name": name, "in": "query", "required": false, "schema": {"type": "string"}, "description": d}));
        }
        let mut responses = error_responses(r);
        let ok = if r.stream {
            json!({"description": "server-sent events: ready, message, heartbeat, error",
                   "content": {"text/event-stream": {"schema": {"type": "string"}}}})
        } else {
            let props: Map<String, Value> = r
                .response
                .iter()
                .map(|f| ((*f).to_owned(), json!({})))
                .collect();
            json!({"description": "OK", "content": {"application/json": {"schema": {"type": "object", "properties": props}}}})
        };
        responses.insert("200".into(), ok);
        let mut op = json!({
            "operationId": format!("{}{}", r.method.to_ascii_lowercase(), r.path.replace(['/', '{', '}', '-'], "_")),
            "summary": r.summary,
            "parameters": params,
            "responses": responses,
            "x-meshd-capability": r.capability,
            "x-meshd-topic-scoped": r.scoped,
        });
        if r.capability.is_none() {
            op["description"] = "Any valid key (no capability checked).".into();
        }
        if !r.body.is_empty() {
            let props: Map<String, Value> = r
                .body
                .iter()
                .map(|(n, t, _)| ((*n).to_owned(), json!({"type": t})))
                .collect();
            let required: Vec<&str> = r
                .body
                .iter()
                .filter(|(_, _, req)| *req)
                .map(|(n, _, _)| *n)
                .collect();
            op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema":
                {"type": "object", "properties": props, "required": required}}}});
        }
        let entry = paths
            .entry(format!("/api/v1{}", r.path))
            .or_insert_with(|| json!({}));
        entry[r.method.to_ascii_lowercase()] = op;
    }
    paths.insert("/api/v1/ws".into(), json!({"get": {"operationId": "get_ws", "summary":
        "The external WebSocket for API-key clients (see the README: auth, subscribe, unsubscribe, post, send, peers)",
        "parameters": [{"name": "Upgrade", "in": "header", "required": true, "schema": {"type": "string", "const": "websocket"}}],
        "responses": {"101": {"description": "switching protocols"}}}}));
    paths.insert("/api/v1/openapi.json".into(), json!({"get": {"operationId": "get_openapi", "summary": "This document",
        "security": [], "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}}}}));
    json!({
        "openapi": "3.1.0",
        "info": {"title": "meshd REST API", "version": env!("CARGO_PKG_VERSION"),
                 "description": "The claudemesh /api/v1 surface served by meshd: topics, members, notifications and the /me views. Authenticate with `Authorization: Bearer cm_…` (an API key: `apikey_create` over the WebSocket, or `meshd apikey create`)."},
        "servers": [{"url": "/"}],
        "security": [{"apiKey": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer", "bearerFormat": "cm_…"}},
            "schemas": {
                "AuthError": {"type": "object", "required": ["code", "message", "status", "timestamp", "path"], "properties": {
                    "code": {"type": "string"}, "message": {"type": "string"}, "status": {"type": "integer"},
                    "timestamp": {"type": "string", "format": "date-time"}, "path": {"type": "string"}}},
                "RouteError": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}, "additionalProperties": true},
            },
        },
    })
}
