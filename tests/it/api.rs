//! API keys (`apikey_*`, `meshd apikey`) and the REST API (`/api/v1`).

use std::net::SocketAddr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use dryoc::classic::crypto_box::{crypto_box_easy, crypto_box_open_easy};
use meshd_protocol::invite::Role;
use meshd_tests::{Backend, Client, Keypair, TestBroker, http_with};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

/// A REST call with an optional bearer key; the answer as JSON.
pub(crate) async fn rest(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let body = body.map(|b| b.to_string());
    let (status, _, payload) = http_with(
        addr,
        method,
        path,
        &headers,
        body.as_deref().map(str::as_bytes),
    )
    .await?;
    let v = serde_json::from_slice(&payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&payload).into()));
    Ok((status, v))
}

/// Mints a key over the WebSocket.
pub(crate) async fn mint(
    c: &mut Client,
    caps: &[&str],
    scopes: Option<&[&str]>,
) -> anyhow::Result<Value> {
    let mut f = json!({"type": "apikey_create", "label": "test", "capabilities": caps});
    if let Some(s) = scopes {
        f["topicScopes"] = json!(s);
    }
    c.request(f).await
}

/// Reads server-sent events from an open stream until one named `event` arrives.
async fn next_event(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::net::TcpStream>>,
    event: &str,
) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + meshd_tests::patience();
    let mut current = String::new();
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await??
            .ok_or_else(|| anyhow::anyhow!("stream ended"))?;
        if let Some(e) = line.strip_prefix("event: ") {
            current = e.to_owned();
        } else if let Some(d) = line.strip_prefix("data: ")
            && current == event
        {
            return Ok(serde_json::from_str(d).unwrap_or(Value::String(d.into())));
        }
    }
}

/// Opens a topic's event stream.
async fn open_stream(
    addr: SocketAddr,
    topic: &str,
    key: &str,
) -> anyhow::Result<tokio::io::Lines<tokio::io::BufReader<tokio::net::TcpStream>>> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "GET /api/v1/topics/{topic}/stream HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    Ok(tokio::io::BufReader::new(s).lines())
}

both! {
    /// Keys: members mint `send`/`read`/`state_write` keys and see and revoke their
    /// own; `admin` keys and the whole list are for admins; a revoked key is refused at
    /// once. REST: the reference's auth and error shapes; posts pushed live over the
    /// WebSocket and the event stream; scopes and meshes enforced; topic keys fetched,
    /// sealed for a pending member and opened by it; mentions listed and read; the
    /// OpenAPI document lists every route and every route answers.
    async fn api_keys_and_rest(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let addr = broker.addr;
        let mesh = broker.create_mesh("rest").await?;
        let other = broker.create_mesh("other").await?;
        let ann = broker.enroll_as(&mesh, "ann", Role::Admin).await?;
        let bo = broker.enroll(&mesh, "bo").await?;
        let eve = broker.enroll(&other, "eve").await?;
        let mut a = broker.connect(&ann).await?;
        let mut o = Client::connect_session(&broker.ws_url(), &bo).await?;
        let mut e = broker.connect(&eve).await?;

        // Minting and its refusals.
        let no_admin = mint(&mut o, &["admin"], None).await?;
        assert_eq!((no_admin["type"].as_str(), no_admin["code"].as_str()), (Some("error"), Some("forbidden")), "{no_admin}");
        let bad = mint(&mut o, &["root"], None).await?;
        assert_eq!((bad["type"].as_str(), bad["code"].as_str()), (Some("error"), Some("invalid_args")), "{bad}");
        let nolabel = o.request(json!({"type": "apikey_create", "capabilities": ["read"]})).await?;
        assert_eq!((nolabel["code"].as_str(), nolabel["message"].as_str()), (Some("invalid_args"), Some("label and at least one capability required")));
        let past = o.request(json!({"type": "apikey_create", "label": "x", "capabilities": ["read"], "expiresAt": "yesterday"})).await?;
        assert_eq!(past["code"], "invalid_args", "{past}");
        let ak = mint(&mut a, &["admin"], None).await?;
        assert_eq!(ak["type"], "apikey_created", "{ak}");
        let admin_key = ak["secret"].as_str().unwrap_or_default().to_owned();
        assert!(admin_key.starts_with("cm_") && admin_key.len() == 46, "{ak}");
        assert_eq!(ak["prefix"].as_str(), Some(&admin_key[..11]));
        let bk = mint(&mut o, &["read", "send"], None).await?;
        let bo_key = bk["secret"].as_str().unwrap_or_default().to_owned();
        let scoped = mint(&mut o, &["read"], Some(&["deploys"])).await?;
        let scoped_key = scoped["secret"].as_str().unwrap_or_default().to_owned();
        let ek = mint(&mut e, &["read", "send"], None).await?;
        let eve_key = ek["secret"].as_str().unwrap_or_default().to_owned();
        let mine = o.request(json!({"type": "apikey_list"})).await?;
        assert_eq!(mine["keys"].as_array().map(Vec::len), Some(2), "bo sees his own keys: {mine}");
        assert!(mine["keys"][0].get("secret").is_none());
        let all = a.request(json!({"type": "apikey_list"})).await?;
        assert_eq!(all["keys"].as_array().map(Vec::len), Some(3), "an admin sees the mesh's: {all}");

        // Auth shapes.
        let (s, v) = rest(addr, "GET", "/api/v1/topics", None, None).await?;
        assert_eq!((s, v["code"].as_str(), v["status"].as_u64()), (401, Some("error.api_key_missing"), Some(401)), "{v}");
        assert_eq!(v["path"], "/api/v1/topics");
        let (s, v) = rest(addr, "GET", "/api/v1/topics", Some("cm_notakeyatallnotakeyatallnotakeyatall1234"), None).await?;
        assert_eq!((s, v["code"].as_str()), (401, Some("error.api_key_invalid")));

        // A topic with a key sealed for its creator; bo reads it over the WebSocket.
        let made = a.request(json!({"type": "topic_create", "name": "deploys"})).await?;
        let topic_id = made["topic"]["id"].as_str().unwrap_or_default().to_owned();
        o.send(json!({"type": "topic_join", "topic": "deploys"})).await?;
        o.sync().await?;
        let (s, v) = rest(addr, "GET", "/api/v1/topics", Some(&scoped_key), None).await?;
        assert_eq!(s, 200, "{v}");
        let names: Vec<&str> = v["topics"].as_array().into_iter().flatten().filter_map(|t| t["name"].as_str()).collect();
        assert_eq!(names, ["deploys"], "the scope filters the list");
        let (s, v) = rest(addr, "GET", "/api/v1/topics/general/messages", Some(&scoped_key), None).await?;
        assert_eq!((s, v["code"].as_str()), (403, Some("error.api_key_topic_out_of_scope")), "{v}");
        let (s, v) = rest(addr, "GET", "/api/v1/topics/deploys/messages", Some(&eve_key), None).await?;
        assert_eq!((s, v["error"].as_str()), (404, Some("topic_not_found")), "another mesh's topic: {v}");
        let (s, v) = rest(addr, "POST", "/api/v1/messages", Some(&scoped_key), Some(json!({"topic": "deploys", "ciphertext": "eA==", "nonce": "bg=="}))).await?;
        assert_eq!((s, v["code"].as_str()), (403, Some("error.api_key_missing_capability")), "{v}");

        // A REST post: live to bo's session and to the event stream, in the history.
        let mut stream = open_stream(addr, "deploys", &scoped_key).await?;
        let ready = next_event(&mut stream, "ready").await?;
        assert_eq!(ready["topicId"], topic_id.as_str());
        let (s, v) = rest(addr, "POST", "/api/v1/messages", Some(&admin_key), Some(json!({"topic": "deploys",
            "ciphertext": STANDARD.encode("ship @bo"), "nonce": STANDARD.encode([0u8; 24])}))).await?;
        assert_eq!((s, v["notifications"].as_u64(), v["topic"].as_str()), (200, Some(1), Some("deploys")), "{v}");
        let message_id = v["messageId"].as_str().unwrap_or_default().to_owned();
        let push = o.ws.expect("the post", |p| p["type"] == "push" && p["topic"] == "deploys").await?;
        assert_eq!((push["messageId"].as_str(), push["senderName"].as_str()), (Some(message_id.as_str()), Some("ann")));
        let ev = next_event(&mut stream, "message").await?;
        assert_eq!((ev["id"].as_str(), ev["senderName"].as_str(), ev["bodyVersion"].as_i64()), (Some(message_id.as_str()), Some("ann"), Some(1)), "{ev}");
        let (s, v) = rest(addr, "GET", "/api/v1/topics/deploys/messages?limit=5", Some(&bo_key), None).await?;
        assert_eq!((s, v["messages"][0]["id"].as_str()), (200, Some(message_id.as_str())), "{v}");
        assert_eq!(v["messages"][0]["senderPubkey"], ann.keys.public_hex().as_str(), "REST shows member keys");
        let (s, _) = rest(addr, "GET", "/api/v1/topics/deploys/messages?limit=500", Some(&bo_key), None).await?;
        assert_eq!(s, 422);
        let huge = json!({"topic": "deploys", "ciphertext": "A".repeat(3 << 20), "nonce": "bg=="});
        let (s, _) = rest(addr, "POST", "/api/v1/messages", Some(&admin_key), Some(huge)).await?;
        assert_eq!(s, 413, "a body past the message limit is refused before it is read whole");

        // Topic keys: ann holds hers; bo is pending until ann seals it for him.
        let (s, v) = rest(addr, "GET", "/api/v1/topics/deploys/key", Some(&admin_key), None).await?;
        assert_eq!(s, 200, "{v}");
        let blob = STANDARD.decode(v["encryptedKey"].as_str().unwrap_or_default())?;
        let nonce: [u8; 24] = STANDARD.decode(v["nonce"].as_str().unwrap_or_default())?.try_into().map_err(|_| anyhow::anyhow!("nonce"))?;
        let sender: [u8; 32] = blob[..32].try_into()?;
        let mut topic_key = [0u8; 32];
        crypto_box_open_easy(&mut topic_key, &blob[32..], &nonce, &sender, &ann.keys.x25519_secret()).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let (s, v) = rest(addr, "GET", "/api/v1/topics/deploys/key", Some(&bo_key), None).await?;
        assert_eq!((s, v["error"].as_str()), (404, Some("key_not_sealed_for_member")), "{v}");
        let (_, v) = rest(addr, "GET", "/api/v1/topics/deploys/pending-seals", Some(&admin_key), None).await?;
        let pending: Vec<&str> = v["pending"].as_array().into_iter().flatten().filter_map(|p| p["displayName"].as_str()).collect();
        assert_eq!(pending, ["bo"], "{v}");
        let bo_id = v["pending"][0]["memberId"].as_str().unwrap_or_default().to_owned();
        let recipient = meshd_tests::x25519_public(&bo.keys.public_hex()).ok_or_else(|| anyhow::anyhow!("key"))?;
        let seal_nonce = [7u8; 24];
        let mut boxed = vec![0u8; 48];
        crypto_box_easy(&mut boxed, &topic_key, &seal_nonce, &recipient, &ann.keys.x25519_secret()).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let mut sealed = meshd_tests::x25519_public(&ann.keys.public_hex()).ok_or_else(|| anyhow::anyhow!("key"))?.to_vec();
        sealed.extend_from_slice(&boxed);
        let (s, v) = rest(addr, "POST", "/api/v1/topics/deploys/seal", Some(&bo_key), Some(json!({"memberId": bo_id,
            "encryptedKey": "eA==", "nonce": "eQ=="}))).await?;
        assert_eq!((s, v["error"].as_str()), (403, Some("not_a_key_holder")), "only holders seal: {v}");
        let (s, v) = rest(addr, "POST", "/api/v1/topics/deploys/seal", Some(&admin_key), Some(json!({"memberId": bo_id,
            "encryptedKey": STANDARD.encode(&sealed), "nonce": STANDARD.encode(seal_nonce)}))).await?;
        assert_eq!(s, 200, "{v}");
        let (s, v) = rest(addr, "GET", "/api/v1/topics/deploys/key", Some(&bo_key), None).await?;
        assert_eq!(s, 200, "{v}");
        let blob = STANDARD.decode(v["encryptedKey"].as_str().unwrap_or_default())?;
        let mut opened = [0u8; 32];
        crypto_box_open_easy(&mut opened, &blob[32..], &seal_nonce, &blob[..32].try_into()?, &bo.keys.x25519_secret()).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        assert_eq!(opened, topic_key, "bo opens the same topic key");
        let (_, v) = rest(addr, "GET", "/api/v1/topics/deploys/pending-seals", Some(&admin_key), None).await?;
        assert_eq!(v["pending"], json!([]));
        let (s, v) = rest(addr, "POST", "/api/v1/topics/deploys/seal", Some(&admin_key), Some(json!({"memberId": "nobody", "encryptedKey": "x", "nonce": "y"}))).await?;
        assert_eq!((s, v["error"].as_str()), (404, Some("recipient_not_in_topic")));
        let (s, v) = rest(addr, "GET", "/api/v1/topics/general/key", Some(&admin_key), None).await?;
        assert_eq!((s, v["error"].as_str()), (409, Some("topic_unencrypted")), "{v}");

        // Mentions, members, peers, /me.
        let (_, v) = rest(addr, "GET", "/api/v1/notifications?unread=1", Some(&bo_key), None).await?;
        assert_eq!((v["notifications"].as_array().map(Vec::len), v["mentionedAs"].as_str()), (Some(1), Some("bo")), "{v}");
        assert_eq!(v["notifications"][0]["id"], message_id.as_str());
        for path in ["/api/v1/notifications?since=soon", "/api/v1/me/notifications?since=soon", "/api/v1/me/activity?since=soon"] {
            let (s, v) = rest(addr, "GET", path, Some(&bo_key), None).await?;
            assert_eq!((s, v["error"].as_str()), (400, Some("invalid_since")), "{path}: {v}");
        }
        let (s, v) = rest(addr, "POST", "/api/v1/notifications/read", Some(&bo_key), Some(json!({"all": true}))).await?;
        assert_eq!((s, v["marked"].as_str()), (200, Some("all")), "{v}");
        let (_, v) = rest(addr, "GET", "/api/v1/notifications?unread=1", Some(&bo_key), None).await?;
        assert_eq!(v["notifications"], json!([]));
        let (_, v) = rest(addr, "GET", "/api/v1/members", Some(&bo_key), None).await?;
        let online: Vec<(&str, bool)> = v["members"].as_array().into_iter().flatten().map(|m| (m["displayName"].as_str().unwrap_or(""), m["online"] == true)).collect();
        assert_eq!(online, [("ann", true), ("bo", true)], "{v}");
        let (_, v) = rest(addr, "GET", "/api/v1/me/workspace", Some(&bo_key), None).await?;
        assert_eq!((v["meshes"][0]["slug"].as_str(), v["totals"]["meshes"].as_u64()), (Some(mesh.slug.as_str()), Some(1)), "{v}");
        let (_, v) = rest(addr, "GET", "/api/v1/me/topics", Some(&bo_key), None).await?;
        let mine: Vec<&str> = v["topics"].as_array().into_iter().flatten().filter_map(|t| t["name"].as_str()).collect();
        assert_eq!(mine, ["deploys", "general"], "{v}");
        let (s, _) = rest(addr, "GET", "/api/v1/me/workspace", Some(&scoped_key), None).await?;
        assert_eq!(s, 403, "a topic-scoped key reads no /me views");

        // Every route of the OpenAPI document answers (with a JSON error at worst).
        let (s, doc) = rest(addr, "GET", "/api/v1/openapi.json", None, None).await?;
        assert_eq!((s, doc["openapi"].as_str()), (200, Some("3.1.0")));
        let paths = doc["paths"].as_object().cloned().unwrap_or_default();
        assert_eq!(paths.len(), 27, "the 22 routes of the reference's table, meshd's /peers/search, /logs and /report, the WebSocket and the document");
        for (path, ops) in &paths {
            for method in ops.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()).unwrap_or_default() {
                if path.ends_with("/stream") || path.ends_with("/ws") {
                    continue;
                }
                let p = path.replace("{name}", "general");
                let body = (method != "get").then(|| json!({}));
                let (s, v) = rest(addr, &method.to_uppercase(), &p, Some(&admin_key), body).await?;
                assert!(s != 404 || v["error"] != "not_found", "{method} {p}: the route is not served");
                assert!(s != 405 && s < 500, "{method} {p}: {s} {v}");
                assert!(v.is_object(), "{method} {p}: not JSON: {v}");
            }
        }

        // Revocation by prefix: refused at once.
        let prefix = &bk["id"].as_str().unwrap_or_default()[..12];
        let r = o.request(json!({"type": "apikey_revoke", "id": prefix})).await?;
        assert_eq!((r["type"].as_str(), r["status"].as_str()), (Some("apikey_revoke_response"), Some("revoked")), "{r}");
        let (s, _) = rest(addr, "GET", "/api/v1/topics", Some(&bo_key), None).await?;
        assert_eq!(s, 401, "a revoked key is refused at once");
        let theirs = o.request(json!({"type": "apikey_revoke", "id": ak["id"]})).await?;
        assert_eq!(theirs["status"], "not_found", "a member cannot revoke another's key");
        Ok(())
    }
}

/// `meshd apikey create|list|revoke`: an operator's key acts as the member it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_keys() -> anyhow::Result<()> {
    use meshd_protocol::apikeys::{Capability, CreateKey};
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("ops").await?;
    let _ann = broker.enroll(&mesh, "ann").await?;
    let create = CreateKey {
        label: "ci".into(),
        capabilities: vec![Capability::Read],
        topic_scopes: None,
        expires_at: None,
    };
    let k = meshd::admin::create_api_key(&broker.db, &mesh.slug, &create, Some("ann")).await?;
    let (s, v) = rest(
        broker.addr,
        "GET",
        "/api/v1/me/workspace",
        Some(&k.secret),
        None,
    )
    .await?;
    assert_eq!(
        (s, v["meshes"][0]["myRole"].as_str()),
        (200, Some("member")),
        "{v}"
    );
    let loose = meshd::admin::create_api_key(&broker.db, &mesh.slug, &create, None).await?;
    let (s, v) = rest(
        broker.addr,
        "GET",
        "/api/v1/me/workspace",
        Some(&loose.secret),
        None,
    )
    .await?;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("api_key_has_no_issuer"))
    );
    assert_eq!(
        meshd::admin::list_api_keys(&broker.db, &mesh.slug)
            .await?
            .len(),
        2
    );
    // Linked to a person, the member's /me views span its other mesh.
    let mesh2 = broker.create_mesh("ops-two").await?;
    let _ann2 = broker.enroll(&mesh2, "ann-two").await?;
    meshd::admin::link_member(&broker.db, &mesh.slug, "ann", "Ann Example").await?;
    meshd::admin::link_member(&broker.db, &mesh2.slug, "ann-two", "Ann Example").await?;
    let (_, v) = rest(
        broker.addr,
        "GET",
        "/api/v1/me/workspace",
        Some(&k.secret),
        None,
    )
    .await?;
    assert_eq!(
        (v["userId"].as_str(), v["totals"]["meshes"].as_u64()),
        (Some("Ann Example"), Some(2)),
        "{v}"
    );
    meshd::admin::revoke_api_key(&broker.db, &mesh.slug, &k.key.id).await?;
    let (s, _) = rest(broker.addr, "GET", "/api/v1/topics", Some(&k.secret), None).await?;
    assert_eq!(s, 401);
    let _ = Keypair::generate();
    Ok(())
}

mod external {
    use futures_util::{SinkExt as _, StreamExt as _};
    use meshd_tests::{Backend, TestBroker};
    use serde_json::{Value, json};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

    use super::mint;

    type Ws = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    async fn next(ws: &mut Ws) -> anyhow::Result<Value> {
        loop {
            let m = tokio::time::timeout(meshd_tests::patience(), ws.next())
                .await?
                .ok_or_else(|| anyhow::anyhow!("closed"))??;
            match m {
                Message::Text(t) => return Ok(serde_json::from_str(&t)?),
                Message::Close(c) => return Ok(json!({"closed": c.map(|c| u16::from(c.code))})),
                _ => {}
            }
        }
    }

    /// The next frame that is not a topic post (a subscriber gets every post of its
    /// topics, its own included, in any order relative to other answers).
    async fn next_not_post(ws: &mut Ws) -> anyhow::Result<Value> {
        loop {
            let v = next(ws).await?;
            if v["type"] != "topic_message" {
                return Ok(v);
            }
        }
    }

    async fn call(ws: &mut Ws, mut f: Value) -> anyhow::Result<Value> {
        f["_reqId"] = "q".into();
        ws.send(Message::Text(f.to_string().into())).await?;
        loop {
            let v = next(ws).await?;
            if v["_reqId"] == "q" || v.get("closed").is_some() {
                return Ok(v);
            }
        }
    }

    async fn open(
        addr: std::net::SocketAddr,
        key: &str,
        header: bool,
    ) -> anyhow::Result<(Ws, Value)> {
        let mut req = format!("ws://{addr}/api/v1/ws").into_client_request()?;
        if header {
            req.headers_mut()
                .insert("Authorization", format!("Bearer {key}").parse()?);
        }
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
        if !header {
            ws.send(Message::Text(
                json!({"type": "auth", "apiKey": key}).to_string().into(),
            ))
            .await?;
        }
        let hello = next(&mut ws).await?;
        Ok((ws, hello))
    }

    both! {
    /// A client holding only an API key: authenticates by header or first frame,
    /// receives the posts of the topics it subscribes to within its scope, posts and
    /// sends as its key's member within its capabilities, reaches nothing of another
    /// mesh, and is closed the moment its key is revoked.
    async fn external_websocket(backend: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(backend).await?;
        let mesh = broker.create_mesh("ext").await?;
        let other = broker.create_mesh("elsewhere").await?;
        let ann = broker.enroll(&mesh, "ann").await?;
        let bot = broker.enroll(&mesh, "bot").await?;
        let eve = broker.enroll(&other, "eve").await?;
        let mut a = broker.connect(&ann).await?;
        let mut b = broker.connect(&bot).await?;
        let mut e = broker.connect(&eve).await?;
        a.request(json!({"type": "topic_create", "name": "deploys"}))
            .await?;
        let full = mint(&mut b, &["read", "send"], Some(&["deploys"])).await?;
        let reader = mint(&mut b, &["read"], None).await?;
        let foreign = mint(&mut e, &["read", "send"], None).await?;

        let (mut x, hello) = open(
            broker.addr,
            full["secret"].as_str().unwrap_or_default(),
            false,
        )
        .await?;
        assert_eq!(
            (hello["type"].as_str(), hello["member"]["name"].as_str()),
            (Some("auth_ok"), Some("bot")),
            "{hello}"
        );
        let sub = call(&mut x, json!({"type": "subscribe", "topic": "deploys"})).await?;
        assert_eq!(sub["type"], "subscribed", "{sub}");
        let out = call(&mut x, json!({"type": "subscribe", "topic": "general"})).await?;
        assert_eq!(
            out["code"], "topic_not_found",
            "outside the key's scope: {out}"
        );

        a.request(crate::topics::post("#deploys", "from ann"))
            .await?;
        let got = next(&mut x).await?;
        assert_eq!(
            (
                got["type"].as_str(),
                got["topic"].as_str(),
                got["message"]["senderName"].as_str()
            ),
            (Some("topic_message"), Some("deploys"), Some("ann")),
            "{got}"
        );

        let posted = call(
            &mut x,
            json!({"type": "post", "topic": "deploys", "text": "from the bot @ann"}),
        )
        .await?;
        assert_eq!(posted["type"], "posted", "{posted}");
        let p = crate::topics::expect_post(&mut a).await?;
        assert_eq!(
            (
                crate::topics::text_of(&p).as_str(),
                p["senderName"].as_str()
            ),
            ("from the bot @ann", Some("bot"))
        );
        let sent = call(
            &mut x,
            json!({"type": "send", "to": "*", "text": "hello all"}),
        )
        .await?;
        assert_eq!(sent["type"], "sent", "{sent}");
        let (_, text) = a.expect_message().await?;
        assert_eq!(text, "hello all");

        let (mut r, _) = open(
            broker.addr,
            reader["secret"].as_str().unwrap_or_default(),
            true,
        )
        .await?;
        let no = call(
            &mut r,
            json!({"type": "post", "topic": "deploys", "text": "x"}),
        )
        .await?;
        assert_eq!(no["code"], "forbidden", "a read key cannot post: {no}");
        let peers = call(&mut r, json!({"type": "peers"})).await?;
        assert!(
            peers["peers"].as_array().is_some_and(|p| p.len() >= 2),
            "{peers}"
        );

        let (mut f, _) = open(
            broker.addr,
            foreign["secret"].as_str().unwrap_or_default(),
            true,
        )
        .await?;
        let no = call(&mut f, json!({"type": "subscribe", "topic": "deploys"})).await?;
        assert_eq!(no["code"], "topic_not_found", "another mesh's topic: {no}");

        let (mut bad, hello) = open(
            broker.addr,
            "cm_nothing_nothing_nothing_nothing_nothing1",
            true,
        )
        .await?;
        assert_eq!(hello["code"], "api_key_invalid");
        assert_eq!(next(&mut bad).await?["closed"], 4003);

        // An operator's revocation (another process, seen by the daemon's watch) too.
        meshd::admin::revoke_api_key(
            &broker.db,
            &mesh.slug,
            reader["id"].as_str().unwrap_or_default(),
        )
        .await?;
        let v = next(&mut r).await?;
        assert_eq!(v["code"], "key_revoked", "{v}");
        let r = b
            .request(json!({"type": "apikey_revoke", "id": full["id"]}))
            .await?;
        assert_eq!(r["status"], "revoked");
        let v = next_not_post(&mut x).await?;
        assert_eq!(v["code"], "key_revoked", "{v}");
        assert_eq!(next_not_post(&mut x).await?["closed"], 4003);
        Ok(())
    }
    }
}
