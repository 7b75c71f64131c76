//! Stored files (`POST /upload`, `get_file`, signed downloads, `list_files`,
//! `file_status`, `delete_file`, `grant_file_access`) and the peer-to-peer relay
//! (`peer_file_request` / `peer_dir_request`).

use meshd_tests::broker::http_with;
use meshd_tests::client::Client;
use meshd_tests::{Backend, Member, TestBroker, now_ms};
use serde_json::{Value, json};
use sha2::Digest as _;

/// `POST /upload` with the reference's headers plus `extra`; returns (status, JSON).
async fn upload(
    broker: &TestBroker,
    mesh_id: &str,
    name: &str,
    body: &[u8],
    extra: &[(&str, &str)],
) -> anyhow::Result<(u16, Value)> {
    let mut headers = vec![
        ("Content-Type", "text/plain"),
        ("X-Mesh-Id", mesh_id),
        // The 0.7.0 CLI sends the mesh slug here; meshd does not trust it.
        ("X-Member-Id", "whoever"),
        ("X-File-Name", name),
    ];
    headers.extend_from_slice(extra);
    let (status, _, payload) =
        http_with(broker.addr, "POST", "/upload", &headers, Some(body)).await?;
    Ok((status, serde_json::from_slice(&payload)?))
}

/// The documented signing text: every header that decides what is stored and who reads
/// it (empty when absent), the body's digest, and the digest of `X-File-Keys`.
fn signing_text(
    mesh_id: &str,
    name: &str,
    body: &[u8],
    ts: &str,
    extra: &[(&str, &str)],
) -> String {
    let h = |n: &str| {
        extra
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map_or("", |(_, v)| *v)
    };
    let digest = hex::encode(sha2::Sha256::digest(body));
    let keys_digest = match h("X-File-Keys") {
        "" => String::new(),
        k => hex::encode(sha2::Sha256::digest(k.as_bytes())),
    };
    format!(
        "meshd-upload-v1\n{mesh_id}\n{name}\n{digest}\n{ts}\n{}\n{}\n{}\n{}\n{}\n{keys_digest}",
        h("X-Target-Spec"),
        h("X-Persistent"),
        h("X-Encrypted"),
        h("X-Owner-Pubkey"),
        h("X-Tags"),
    )
}

/// A signed upload as `signer` (member or session key).
async fn signed_upload(
    broker: &TestBroker,
    signer: &meshd_tests::Keypair,
    mesh_id: &str,
    name: &str,
    body: &[u8],
    extra: &[(&str, &str)],
) -> anyhow::Result<(u16, Value)> {
    let ts = now_ms().to_string();
    let sig = signer.sign_hex(&signing_text(mesh_id, name, body, &ts, extra));
    let key = signer.public_hex();
    let mut headers = vec![
        ("X-Meshd-Pubkey", key.as_str()),
        ("X-Meshd-Timestamp", ts.as_str()),
        ("X-Meshd-Signature", sig.as_str()),
    ];
    headers.extend_from_slice(extra);
    upload(broker, mesh_id, name, body, &headers).await
}

/// Downloads a `file_url` (its path on our broker).
async fn download(broker: &TestBroker, url: &str) -> anyhow::Result<(u16, String, Vec<u8>)> {
    let path = url
        .split_once(&broker.addr.to_string())
        .map(|(_, p)| p.to_owned())
        .unwrap_or_default();
    anyhow::ensure!(path.starts_with("/files/"), "{url}");
    http_with(broker.addr, "GET", &path, &[], None).await
}

fn names(list: &Value) -> Vec<String> {
    list["files"]
        .as_array()
        .map(|f| {
            f.iter()
                .filter_map(|x| x["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

async fn connect(broker: &TestBroker, m: &Member) -> anyhow::Result<Client> {
    broker.connect(m).await
}

both! {
    /// Uploads are authenticated (signed, or unsigned from a connected peer's address);
    /// downloads go through short-lived signed URLs; targets limit who sees a file;
    /// deletion is the uploader's or an admin's; encrypted files stay opaque and their
    /// sealed keys go only to the peers they were granted to.
    async fn stored_files(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("files").await?;
        let (ann, bo, cy) = (
            broker.enroll(&mesh, "ann").await?,
            broker.enroll(&mesh, "bo").await?,
            broker.enroll(&mesh, "cy").await?,
        );
        // The only member connected from this address: unsigned uploads from it are ann's.
        let mut a = connect(&broker, &ann).await?;
        let (st, up) = upload(&broker, &mesh.mesh_id, "notes.txt", b"hello files", &[("X-Tags", r#"["doc"]"#)]).await?;
        assert_eq!((st, up["ok"].as_bool()), (200, Some(true)), "{up}");
        let notes = up["fileId"].as_str().unwrap_or_default().to_owned();
        // With a second member connected from here, an unsigned upload is ambiguous.
        let mut c = connect(&broker, &bo).await?;
        let (st, r) = upload(&broker, &mesh.mesh_id, "x.txt", b"x", &[]).await?;
        assert_eq!(st, 401, "{r}");
        assert!(r["error"].as_str().unwrap_or_default().contains("several members"), "{r}");

        // Nobody of this mesh is connected from here: an unsigned upload is refused.
        let other = broker.create_mesh("elsewhere").await?;
        let (st, r) = upload(&broker, &other.mesh_id, "x.txt", b"x", &[]).await?;
        assert_eq!(st, 401, "{r}");
        // A signature that does not verify is refused; so is an empty body.
        let (st, _) = upload(&broker, &mesh.mesh_id, "x.txt", b"x", &[("X-Meshd-Pubkey", &bo.keys.public_hex()), ("X-Meshd-Timestamp", &now_ms().to_string()), ("X-Meshd-Signature", &"00".repeat(64))]).await?;
        assert_eq!(st, 401);
        let (st, _) = signed_upload(&broker, &bo.keys, &mesh.mesh_id, "x.txt", b"", &[]).await?;
        assert_eq!(st, 400);
        let (st, _) = signed_upload(&broker, &bo.keys, &mesh.mesh_id, "../etc/passwd", b"x", &[]).await?;
        assert_eq!(st, 400);
        // The signature covers the headers: a target changed after signing is refused,
        // and a signed request cannot be replayed.
        let ts = now_ms().to_string();
        let a_target = a.key();
        let sig = bo.keys.sign_hex(&signing_text(&mesh.mesh_id, "t.txt", b"t", &ts, &[("X-Target-Spec", &a_target)]));
        let bo_key = bo.keys.public_hex();
        let auth = [("X-Meshd-Pubkey", bo_key.as_str()), ("X-Meshd-Timestamp", ts.as_str()), ("X-Meshd-Signature", sig.as_str())];
        let (st, r) = upload(&broker, &mesh.mesh_id, "t.txt", b"t", &auth).await?;
        assert_eq!(st, 401, "target dropped after signing: {r}");
        let mut with_target = auth.to_vec();
        with_target.push(("X-Target-Spec", &a_target));
        let (st, r) = upload(&broker, &mesh.mesh_id, "t.txt", b"t", &with_target).await?;
        assert_eq!(st, 200, "{r}");
        let (st, r) = upload(&broker, &mesh.mesh_id, "t.txt", b"t", &with_target).await?;
        assert_eq!(st, 401, "replayed: {r}");
        assert!(r["fileId"].is_null(), "{r}");

        // A signed upload by bo, for ann only.
        let a_key = a.key();
        let (st, up) = signed_upload(&broker, &bo.keys, &mesh.mesh_id, "for-ann.md", b"# private", &[("X-Target-Spec", a_key.as_str())]).await?;
        assert_eq!(st, 200, "{up}");
        let private = up["fileId"].as_str().unwrap_or_default().to_owned();

        let list = c.request(json!({"type": "list_files"})).await?;
        assert_eq!(names(&list), vec!["for-ann.md", "t.txt", "notes.txt"], "{list}");
        let entry = list["files"].as_array().and_then(|f| f.iter().find(|x| x["name"] == "notes.txt").cloned()).unwrap_or_default();
        assert_eq!((entry["uploadedBy"].as_str(), entry["size"].as_i64(), entry["tags"].clone()), (Some("ann"), Some(11), json!(["doc"])));
        let mut y = connect(&broker, &cy).await?;
        let list = y.request(json!({"type": "list_files"})).await?;
        assert_eq!(names(&list), vec!["notes.txt"], "a targeted file is listed to its targets only");
        let denied = y.request(json!({"type": "get_file", "fileId": private})).await?;
        assert_eq!(denied["code"], "forbidden");
        let found = y.request(json!({"type": "list_files", "query": "NOTES", "from": "ann"})).await?;
        assert_eq!(names(&found), vec!["notes.txt"]);

        // get_file → a URL that serves the bytes; a tampered URL is refused.
        let url = a.request(json!({"type": "get_file", "fileId": private})).await?;
        assert_eq!((url["type"].as_str(), url["name"].as_str(), url["encrypted"].as_bool()), (Some("file_url"), Some("for-ann.md"), Some(false)), "{url}");
        let link = url["url"].as_str().unwrap_or_default().to_owned();
        let (st, head, bytes) = download(&broker, &link).await?;
        assert_eq!((st, bytes.as_slice()), (200, b"# private".as_slice()));
        assert!(head.to_ascii_lowercase().contains("content-disposition: attachment; filename=\"for-ann.md\""), "{head}");
        let tampered = link.replace("exp=", "exp=9");
        assert_eq!(download(&broker, &tampered).await?.0, 403);
        let forged = format!("{}{}", &link[..link.len() - 4], "0000");
        assert_eq!(download(&broker, &forged).await?.0, 403);
        let status = c.request(json!({"type": "file_status", "fileId": private})).await?;
        assert_eq!(status["accesses"][0]["peerName"], "ann", "{status}");

        // Deletion: not by another member; by the uploader, after which the link is dead.
        let refused = y.request(json!({"type": "delete_file", "fileId": notes})).await?;
        assert_eq!((refused["type"].as_str(), refused["id"].as_str()), (Some("ack"), Some(notes.as_str())));
        assert!(refused["error"].is_string(), "{refused}");
        let notes_url = c.request(json!({"type": "get_file", "fileId": notes})).await?["url"].as_str().unwrap_or_default().to_owned();
        let ok = a.request(json!({"type": "delete_file", "fileId": notes})).await?;
        assert!(ok["error"].is_null(), "{ok}");
        assert_eq!(c.request(json!({"type": "get_file", "fileId": notes})).await?["code"], "not_found");
        assert_eq!(download(&broker, &notes_url).await?.0, 404);

        // Encrypted: opaque bytes; the sealed key goes to the peers it was made for.
        let blob: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        let keys = json!([{"peerPubkey": a_key, "sealedKey": "SEALED-FOR-ANN"}]).to_string();
        // (Signed: unsigned uploads from this address are now cy's, who connected last.)
        let (st, up) = signed_upload(&broker, &ann.keys, &mesh.mesh_id, "secret.bin", &blob, &[("X-Encrypted", "true"), ("X-Owner-Pubkey", &a_key), ("X-File-Keys", &keys)]).await?;
        assert_eq!(st, 200, "{up}");
        let secret = up["fileId"].as_str().unwrap_or_default().to_owned();
        let mine = a.request(json!({"type": "get_file", "fileId": secret})).await?;
        assert_eq!((mine["encrypted"].as_bool(), mine["sealedKey"].as_str()), (Some(true), Some("SEALED-FOR-ANN")));
        let theirs = c.request(json!({"type": "get_file", "fileId": secret})).await?;
        assert!(theirs["sealedKey"].is_null(), "{theirs}");
        let (_, _, bytes) = download(&broker, theirs["url"].as_str().unwrap_or_default()).await?;
        assert_eq!(bytes, blob, "stored and served byte for byte");
        let c_key = c.key();
        let grab = c.request(json!({"type": "grant_file_access", "fileId": secret, "peerPubkey": c_key, "sealedKey": "MINE-NOW"})).await?;
        assert_eq!(grab["code"], "forbidden");
        let grant = a.request(json!({"type": "grant_file_access", "fileId": secret, "peerPubkey": c_key, "sealedKey": "SEALED-FOR-BO"})).await?;
        assert_eq!(grant["type"], "grant_file_access_ok", "{grant}");
        let theirs = c.request(json!({"type": "get_file", "fileId": secret})).await?;
        assert_eq!(theirs["sealedKey"], "SEALED-FOR-BO");

        let info = a.request(json!({"type": "mesh_info"})).await?;
        assert_eq!(info["fileCount"], 3, "{info}");
        Ok(())
    }
}

/// The relay passes a request to the asked peer and only that peer's answer back;
/// an answer injected by another peer is dropped; a peer that leaves fails the
/// requests it was asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_file_relay() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("relay").await?;
    let (ann, bo, cy) = (
        broker.enroll(&mesh, "ann").await?,
        broker.enroll(&mesh, "bo").await?,
        broker.enroll(&mesh, "cy").await?,
    );
    let (mut a, mut c, mut y) = (
        connect(&broker, &ann).await?,
        connect(&broker, &bo).await?,
        connect(&broker, &cy).await?,
    );
    let (a_key, c_key) = (a.key(), c.key());

    a.send(json!({"type": "peer_file_request", "targetPubkey": c_key, "filePath": "src/main.rs", "_reqId": "f1"})).await?;
    let fwd =
        c.ws.expect("peer_file_request_forward", |v| {
            v["type"] == "peer_file_request_forward"
        })
        .await?;
    assert_eq!(
        fwd,
        json!({"type": "peer_file_request_forward", "requesterPubkey": a_key, "filePath": "src/main.rs", "_reqId": "f1"})
    );
    // Someone else answers first: dropped.
    y.send(json!({"type": "peer_file_response", "requesterPubkey": a_key, "filePath": "src/main.rs", "content": "ZXZpbA==", "_reqId": "f1"})).await?;
    y.sync().await?;
    c.send(json!({"type": "peer_file_response", "requesterPubkey": a_key, "filePath": "src/main.rs", "content": "aGVsbG8=", "_reqId": "f1"})).await?;
    let got =
        a.ws.expect("peer_file_response_forward", |v| {
            v["type"] == "peer_file_response_forward"
        })
        .await?;
    assert_eq!(
        got,
        json!({"type": "peer_file_response_forward", "filePath": "src/main.rs", "content": "aGVsbG8=", "_reqId": "f1"})
    );
    a.sync().await?;
    assert!(
        a.ws.backlog()
            .iter()
            .all(|v| v["type"] != "peer_file_response_forward"),
        "{:?}",
        a.ws.backlog()
    );

    a.send(json!({"type": "peer_dir_request", "targetPubkey": c_key, "dirPath": "src", "pattern": "*.rs", "_reqId": "d1"})).await?;
    let fwd =
        c.ws.expect("peer_dir_request_forward", |v| {
            v["type"] == "peer_dir_request_forward"
        })
        .await?;
    assert_eq!(
        (fwd["dirPath"].as_str(), fwd["pattern"].as_str()),
        (Some("src"), Some("*.rs"))
    );
    c.send(json!({"type": "peer_dir_response", "requesterPubkey": a_key, "dirPath": "src", "entries": ["main.rs", "lib.rs"], "_reqId": "d1"})).await?;
    let got =
        a.ws.expect("peer_dir_response_forward", |v| {
            v["type"] == "peer_dir_response_forward"
        })
        .await?;
    assert_eq!(
        (got["entries"].clone(), got["_reqId"].as_str()),
        (json!(["main.rs", "lib.rs"]), Some("d1"))
    );

    let missing = a
        .request(
            json!({"type": "peer_file_request", "targetPubkey": "ab".repeat(32), "filePath": "x"}),
        )
        .await?;
    assert_eq!(missing["code"], "peer_not_found");

    // The asked peer leaves with a request open: the asker hears at once.
    a.send(json!({"type": "peer_file_request", "targetPubkey": c_key, "filePath": "big.log", "_reqId": "f2"})).await?;
    c.ws.expect("second forward", |v| v["filePath"] == "big.log")
        .await?;
    c.close().await;
    let got =
        a.ws.expect("failure", |v| {
            v["type"] == "peer_file_response_forward" && v["_reqId"] == "f2"
        })
        .await?;
    assert!(
        got["error"]
            .as_str()
            .unwrap_or_default()
            .contains("disconnected"),
        "{got}"
    );
    Ok(())
}

/// Behind a trusted proxy the client's address comes from `X-Forwarded-For` (so an
/// unsigned upload from elsewhere is not taken for a connected member's), and
/// `unsigned_uploads = "refuse"` requires signatures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_address_rules() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(Backend::Sqlite, |c| {
        c.server.trusted_proxies = vec!["127.0.0.1".parse().expect("ip")];
    })
    .await?;
    let mesh = broker.create_mesh("proxied").await?;
    let ann = broker.enroll(&mesh, "ann").await?;
    let _a = connect(&broker, &ann).await?;
    let (st, r) = upload(&broker, &mesh.mesh_id, "a.txt", b"a", &[]).await?;
    assert_eq!(
        st, 200,
        "no forwarding header: the proxy's own address is the client's: {r}"
    );
    let (st, r) = upload(
        &broker,
        &mesh.mesh_id,
        "b.txt",
        b"b",
        &[("X-Forwarded-For", "203.0.113.7")],
    )
    .await?;
    assert_eq!(st, 401, "a client elsewhere behind the proxy: {r}");

    let strict = TestBroker::start_with(Backend::Sqlite, |c| {
        c.server.unsigned_uploads = meshd_config::UnsignedUploads::Refuse;
    })
    .await?;
    let mesh = strict.create_mesh("strict").await?;
    let ann = strict.enroll(&mesh, "ann").await?;
    let _a = connect(&strict, &ann).await?;
    let (st, r) = upload(&strict, &mesh.mesh_id, "a.txt", b"a", &[]).await?;
    assert_eq!(st, 401, "{r}");
    let (st, r) = signed_upload(&strict, &ann.keys, &mesh.mesh_id, "a.txt", b"a", &[]).await?;
    assert_eq!(st, 200, "{r}");
    Ok(())
}

/// Starts an upload that sends its headers and a sliver of its body, then stalls.
async fn stalled_upload(
    broker: &TestBroker,
    mesh_id: &str,
    claimed_key: &str,
) -> anyhow::Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt as _;
    let mut s = tokio::net::TcpStream::connect(broker.addr).await?;
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nX-Mesh-Id: {mesh_id}\r\nX-File-Name: slow.bin\r\n\
         X-Meshd-Pubkey: {claimed_key}\r\nX-Meshd-Timestamp: {}\r\nX-Meshd-Signature: {}\r\n\
         Content-Length: 100000\r\n\r\nxx",
        now_ms(),
        "00".repeat(64)
    );
    s.write_all(head.as_bytes()).await?;
    Ok(s)
}

/// Reads an HTTP response's status from a raw connection (within patience).
async fn status_of(s: &mut tokio::net::TcpStream) -> anyhow::Result<u16> {
    use tokio::io::AsyncReadExt as _;
    let mut raw = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + meshd_tests::patience();
    while !raw.windows(2).any(|w| w == b"\r\n") {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf)).await??;
        anyhow::ensure!(n > 0, "closed without a response");
        raw.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&raw)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

/// Stalled uploads claiming a mesh's member keys (a forged signature cannot be caught
/// before the body) take at most one slot per claimed key and a few per mesh: the
/// next is refused at once, another mesh uploads normally meanwhile, and the stalled
/// bodies are cut off at their deadline (nothing of them stays on disk).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_do_not_block_other_meshes() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(Backend::Sqlite, |c| {
        c.limits.http_body_timeout = std::time::Duration::from_secs(1);
        c.limits.max_upload_bytes = 2_000_000;
    })
    .await?;
    let target = broker.create_mesh("target").await?;
    let mut victims = Vec::new();
    for i in 0..6 {
        victims.push(broker.enroll(&target, &format!("v{i}")).await?);
    }
    // One slot per claimed key: a second stalled upload as v0 is refused at once.
    let uploads = |n: usize| {
        let broker = &broker;
        async move {
            meshd_tests::eventually(&format!("{n} uploads in progress"), || async {
                let m = broker.metrics().await.ok()?;
                m.contains(&format!(
                    "meshd_table_entries{{table=\"uploads_in_progress\"}} {n}\n"
                ))
                .then_some(())
            })
            .await
        }
    };
    let mut first = stalled_upload(&broker, &target.mesh_id, &victims[0].keys.public_hex()).await?;
    uploads(1).await?;
    let mut second =
        stalled_upload(&broker, &target.mesh_id, &victims[0].keys.public_hex()).await?;
    assert_eq!(status_of(&mut second).await?, 503);
    // A few per mesh: with v1..v3 the mesh's four slots are taken, v4 is refused.
    let mut stalled = Vec::new();
    for (i, v) in victims[1..4].iter().enumerate() {
        stalled.push(stalled_upload(&broker, &target.mesh_id, &v.keys.public_hex()).await?);
        uploads(i + 2).await?;
    }
    let mut fifth = stalled_upload(&broker, &target.mesh_id, &victims[4].keys.public_hex()).await?;
    assert_eq!(status_of(&mut fifth).await?, 503);

    // Another mesh is not affected.
    let other = broker.create_mesh("other").await?;
    let bo = broker.enroll(&other, "bo").await?;
    let (st, v) =
        signed_upload(&broker, &bo.keys, &other.mesh_id, "fine.txt", b"fine", &[]).await?;
    assert_eq!(st, 200, "{v}");

    // The stalled bodies are cut off (1 s, plus 100 kB at 64 KiB/s: 2 s) with 408, and
    // nothing of them stays on disk.
    assert_eq!(status_of(&mut first).await?, 408);
    for s in &mut stalled {
        assert_eq!(status_of(s).await?, 408);
    }
    uploads(0).await?;
    let parts = std::fs::read_dir(broker.config.data_dir.join("files").join(&target.mesh_id))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(parts, 0, "a stalled upload left bytes on disk");
    // The mesh uploads again.
    let (st, v) = signed_upload(
        &broker,
        &victims[5].keys,
        &target.mesh_id,
        "after.txt",
        b"after",
        &[],
    )
    .await?;
    assert_eq!(st, 200, "{v}");
    Ok(())
}

/// Across federated brokers.
mod across_brokers {

    use anyhow::Context as _;

    use serde_json::{Value, json};

    use crate::federation::*;

    /// The peer file relay crosses brokers: alice on A asks bob on B for a file and a
    /// listing; only bob's answers come back (another peer's injection is dropped), with
    /// alice's `_reqId`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn peer_file_relay_crosses_brokers() -> anyhow::Result<()> {
        let (mut p, mut bob, bob_key) = pair_with_bob_online().await?;
        let alice_key = p.alice.key();
        p.alice
            .send(json!({"type": "peer_file_request", "targetPubkey": bob_key, "filePath": "notes.md", "_reqId": "x1"}))
            .await?;
        let fwd = bob
            .ws
            .expect("forward at B", |v| v["type"] == "peer_file_request_forward")
            .await?;
        assert_eq!(
            fwd,
            json!({"type": "peer_file_request_forward", "requesterPubkey": alice_key, "filePath": "notes.md", "_reqId": "x1"})
        );
        // Another member at B injects an answer: dropped.
        let eve =
            p.b.enroll(&replica(&p.b.db, &p.mesh.mesh_id).await?, "eve")
                .await?;
        let mut eve = member_client(&p.b.ws_url(), &eve, &[]).await?;
        eve.send(json!({"type": "peer_file_response", "requesterPubkey": alice_key, "filePath": "notes.md", "content": "ZXZl", "_reqId": "x1"}))
            .await?;
        eve.sync().await?;
        bob.send(json!({"type": "peer_file_response", "requesterPubkey": alice_key, "filePath": "notes.md", "content": "Ym9i", "_reqId": "x1"}))
            .await?;
        let got = p
            .alice
            .ws
            .expect("answer at A", |v| v["type"] == "peer_file_response_forward")
            .await?;
        assert_eq!(
            got,
            json!({"type": "peer_file_response_forward", "filePath": "notes.md", "content": "Ym9i", "_reqId": "x1"})
        );
        p.alice
            .send(json!({"type": "peer_dir_request", "targetPubkey": bob_key, "dirPath": ".", "_reqId": "x2"}))
            .await?;
        bob.ws
            .expect("dir forward at B", |v| {
                v["type"] == "peer_dir_request_forward"
            })
            .await?;
        bob.send(json!({"type": "peer_dir_response", "requesterPubkey": alice_key, "dirPath": ".", "entries": ["a", "b"], "_reqId": "x2"}))
            .await?;
        let got = p
            .alice
            .ws
            .expect("dir answer at A", |v| {
                v["type"] == "peer_dir_response_forward"
            })
            .await?;
        assert_eq!(got["entries"], json!(["a", "b"]));
        p.alice.sync().await?;
        assert!(
            p.alice
                .ws
                .backlog()
                .iter()
                .all(|v| v["type"] != "peer_file_response_forward"),
            "the injected answer was dropped"
        );
        Ok(())
    }

    /// Files held by one broker are the mesh's on every broker: uploaded on A, listed on B;
    /// `get_file` on B returns a URL at A (A checks the reader's access) that serves the
    /// bytes; only A manages the file; deleting it there removes it from B's list.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_cross_brokers() -> anyhow::Result<()> {
        let mut p = cut_pair().await?;
        until_known(&mut p.alice, &p.bob).await?;
        let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
        // Alice is the only member connected to A from this address: the unsigned upload is hers.
        let (st, _, body) = meshd_tests::broker::http_with(
            p.a.addr,
            "POST",
            "/upload",
            &[
                ("X-Mesh-Id", &p.mesh.mesh_id),
                ("X-Member-Id", "x"),
                ("X-File-Name", "plan.txt"),
            ],
            Some(b"the plan"),
        )
        .await?;
        let up: Value = serde_json::from_slice(&body)?;
        assert_eq!(st, 200, "{up}");
        let id = up["fileId"].as_str().unwrap_or_default().to_owned();
        let l = bob
            .poll("A's file in B's list", json!({"type": "list_files"}), |l| {
                l["files"][0]["id"] == id.as_str()
            })
            .await?;
        assert_eq!(l["files"][0]["uploadedBy"], "alice");
        let url = bob
            .request(json!({"type": "get_file", "fileId": id}))
            .await?;
        assert_eq!(url["type"], "file_url", "{url}");
        let link = url["url"].as_str().unwrap_or_default().to_owned();
        let path = link
            .split_once(&p.a.addr.to_string())
            .map(|(_, path)| path.to_owned())
            .with_context(|| format!("the URL is not at A: {link}"))?;
        let (st, _, bytes) =
            meshd_tests::broker::http_with(p.a.addr, "GET", &path, &[], None).await?;
        assert_eq!((st, bytes.as_slice()), (200, b"the plan".as_slice()));
        let refused = bob
            .request(json!({"type": "file_status", "fileId": id}))
            .await?;
        assert_eq!(refused["code"], "held_elsewhere", "{refused}");

        p.alice
            .request(json!({"type": "delete_file", "fileId": id}))
            .await?;
        bob.poll("the deletion at B", json!({"type": "list_files"}), |l| {
            l["files"] == json!([])
        })
        .await?;
        Ok(())
    }
}
