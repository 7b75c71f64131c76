//! Every handshake outcome of §2 (and the holes of §10.1.1 closed).

use std::time::Duration;

use meshd_tests::{
    Backend, Client, HelloOpts, Keypair, RawWs, TestBroker, hello_frame, now_ms, unique_ts,
};
use serde_json::{Value, json};

/// Sends one frame on a fresh socket; returns the error frame and the close frame.
async fn refused(url: &str, frame: &Value) -> anyhow::Result<(Value, Option<(u16, String)>)> {
    let mut ws = RawWs::connect(url).await?;
    ws.send_json(frame).await?;
    let err = ws.expect("error", |v| v["type"] == "error").await?;
    let close = ws.expect_close().await;
    Ok((err, close))
}

fn assert_refusal(got: &(Value, Option<(u16, String)>), code: &str, close_code: u16) {
    let (err, close) = got;
    assert_eq!(err["code"], code, "{err}");
    assert!(
        err.get("_reqId").is_none() && err.get("id").is_none(),
        "handshake errors are uncorrelated: {err}"
    );
    let (c, reason) = close
        .clone()
        .unwrap_or_else(|| panic!("no close frame after {code}"));
    assert_eq!(c, close_code, "close code for {code}");
    if close_code == 1008 {
        assert_eq!(reason, code);
    }
}

both! {
    async fn hello_errors(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("hs").await?;
        let alice = broker.enroll(&mesh, "alice").await?;
        let url = broker.ws_url();
        let opts = HelloOpts::default();

        // timestamp_skew: 61 s old, and in the future.
        for skew in [-61_000, 61_000] {
            let f = hello_frame(&alice, &opts, unique_ts() + skew);
            assert_refusal(&refused(&url, &f).await?, "timestamp_skew", 1008);
        }
        // bad_signature: signed by another key.
        let mut f = hello_frame(&alice, &opts, unique_ts());
        f["signature"] = Keypair::generate().sign_hex("whatever").into();
        assert_refusal(&refused(&url, &f).await?, "bad_signature", 1008);
        // bad_signature: memberId changed after signing (it is in the canonical string).
        let mut f = hello_frame(&alice, &opts, unique_ts());
        f["memberId"] = "someone-else".into();
        assert_refusal(&refused(&url, &f).await?, "bad_signature", 1008);
        // malformed: pubkey / signature not hex of the right length; missing field.
        let mut f = hello_frame(&alice, &opts, unique_ts());
        f["pubkey"] = "abc".into();
        assert_refusal(&refused(&url, &f).await?, "malformed", 1008);
        let mut f = hello_frame(&alice, &opts, unique_ts());
        f["signature"] = "00".into();
        assert_refusal(&refused(&url, &f).await?, "malformed", 1008);
        let mut ws = RawWs::connect(&url).await?;
        ws.send_json(&json!({"type": "hello", "meshId": alice.mesh_id})).await?;
        let e = ws.expect("error", |v| v["type"] == "error").await?;
        assert_eq!(e["code"], "malformed");
        // …which does not close: the client may still send a good hello.
        ws.send_json(&hello_frame(&alice, &opts, unique_ts())).await?;
        ws.expect("hello_ack", |v| v["type"] == "hello_ack").await?;

        // unauthorized: a key that is not a member; a member id that is not this key's.
        let stranger = meshd_tests::Member { keys: Keypair::generate(), ..alice.clone() };
        assert_refusal(&refused(&url, &hello_frame(&stranger, &opts, unique_ts())).await?, "unauthorized", 1008);
        let bob = broker.enroll(&mesh, "bob").await?;
        let liar = meshd_tests::Member { member_id: bob.member_id.clone(), ..alice.clone() };
        assert_refusal(&refused(&url, &hello_frame(&liar, &opts, unique_ts())).await?, "unauthorized", 1008);
        // unauthorized: an unknown mesh.
        let lost = meshd_tests::Member { mesh_id: "nope".into(), ..alice.clone() };
        assert_refusal(&refused(&url, &hello_frame(&lost, &opts, unique_ts())).await?, "unauthorized", 1008);

        // bad_session_pubkey: not hex, or another member's key.
        let mut f = hello_frame(&alice, &opts, unique_ts());
        f["sessionPubkey"] = "xyz".into();
        assert_refusal(&refused(&url, &f).await?, "bad_session_pubkey", 1008);
        let mut f = hello_frame(&alice, &opts, unique_ts());
        f["sessionPubkey"] = bob.keys.public_hex().into();
        assert_refusal(&refused(&url, &f).await?, "bad_session_pubkey", 1008);
        // …or a session key already bound to another member.
        let bob_session = Keypair::generate();
        let bob_client = Client::connect(&url, &bob, HelloOpts { session: Some(bob_session.clone()), ..HelloOpts::default() }).await?;
        let mut f = hello_frame(&alice, &opts, unique_ts());
        f["sessionPubkey"] = bob_session.public_hex().into();
        assert_refusal(&refused(&url, &f).await?, "bad_session_pubkey", 1008);
        bob_client.close().await;

        // revoked: error `revoked`, close 4002 "banned".
        meshd::admin::revoke_member(&broker.db, &mesh.slug, &bob.member_id).await?;
        let got = refused(&url, &hello_frame(&bob, &opts, unique_ts())).await?;
        assert_refusal(&got, "revoked", 4002);
        assert_eq!(got.1.unwrap().1, "banned");
        Ok(())
    }
}

both! {
    /// A captured hello cannot be used a second time (the reference accepted it for 60 s).
    async fn replayed_hello_is_refused(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("replay").await?;
        let alice = broker.enroll(&mesh, "alice").await?;
        let frame = hello_frame(&alice, &HelloOpts::default(), unique_ts());
        let mut first = RawWs::connect(&broker.ws_url()).await?;
        first.send_json(&frame).await?;
        first.expect("hello_ack", |v| v["type"] == "hello_ack").await?;
        // Same bytes, another socket, even with a different (unsigned) session key.
        let mut replay = frame.clone();
        replay["sessionPubkey"] = Keypair::generate().public_hex().into();
        assert_refusal(&refused(&broker.ws_url(), &replay).await?, "replayed", 1008);
        assert_refusal(&refused(&broker.ws_url(), &frame).await?, "replayed", 1008);
        Ok(())
    }
}

#[tokio::test]
async fn no_hello_and_timeout() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(Backend::Sqlite, |c| {
        c.limits.hello_timeout = Duration::from_millis(500)
    })
    .await?;
    let mut ws = RawWs::connect(&broker.ws_url()).await?;
    ws.send_json(&json!({"type": "list_peers", "_reqId": "r1"}))
        .await?;
    let e = ws.expect("no_hello", |v| v["type"] == "error").await?;
    assert_eq!(e["code"], "no_hello");
    assert!(
        e.get("_reqId").is_none(),
        "no_hello is uncorrelated, as the reference"
    );
    // The socket stays open until the handshake deadline, then closes with 1008.
    let close = ws.expect_close().await.expect("close frame");
    assert_eq!(close, (1008, "hello timeout".to_owned()));
    let text = broker.metrics().await?;
    assert!(
        text.contains("meshd_connections_rejected_total{reason=\"hello_timeout\"} 1"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn capacity_per_mesh() -> anyhow::Result<()> {
    let broker =
        TestBroker::start_with(Backend::Sqlite, |c| c.limits.max_connections_per_mesh = 1).await?;
    let mesh = broker.create_mesh("small").await?;
    let a = broker.enroll(&mesh, "a").await?;
    let b = broker.enroll(&mesh, "b").await?;
    let _a = broker.connect(&a).await?;
    let got = refused(
        &broker.ws_url(),
        &hello_frame(&b, &HelloOpts::default(), unique_ts()),
    )
    .await?;
    assert_refusal(&got, "capacity", 1008);
    Ok(())
}

both! {
    /// The SDK's hello: no cwd, hostname, model or groups; peerType connector.
    async fn sdk_hello_without_cwd(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("sdk").await?;
        let m = broker.enroll(&mesh, "sdk-user").await?;
        let opts = HelloOpts {
            cwd: None,
            hostname: None,
            peer_type: Some("connector".into()),
            channel: Some("sdk".into()),
            session_id: Some(format!("sdk-{}-{}", std::process::id(), now_ms())),
            ..HelloOpts::default()
        };
        let mut c = Client::connect(&broker.ws_url(), &m, opts).await?;
        assert_eq!(c.hello_ack["memberDisplayName"], "sdk-user");
        assert_eq!(c.hello_ack["presenceId"].as_str().map(str::len), Some(32));
        let peers = c.sync().await?;
        assert_eq!(peers["peers"][0]["cwd"], "");
        assert_eq!(peers["peers"][0]["peerType"], "connector");
        assert!(peers["peers"][0].get("hostname").is_none());
        // A second hello on the same socket is refused without closing it.
        let again = hello_frame(&m, &HelloOpts::default(), unique_ts());
        c.send(again).await?;
        let e = c.ws.expect("error", |v| v["type"] == "error").await?;
        assert_eq!(e["code"], "already_authenticated");
        c.sync().await?;
        Ok(())
    }
}

both! {
    /// HEAD's session_hello: a session key vouched for by the member key.
    async fn session_hello(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("sessions").await?;
        let m = broker.enroll(&mesh, "head-cli").await?;
        let session = Keypair::generate();
        let frame = |expires_at: i64, ts: i64, att_signer: &Keypair, parent_id: &str| {
            let (mpk, spk) = (m.keys.public_hex(), session.public_hex());
            json!({
                "type": "session_hello", "protocolVersion": 1, "meshId": m.mesh_id,
                "parentMemberId": parent_id, "parentMemberPubkey": mpk, "sessionPubkey": spk,
                "parentAttestation": {"sessionPubkey": spk, "parentMemberPubkey": mpk, "expiresAt": expires_at,
                    "signature": att_signer.sign_hex(&format!("claudemesh-session-attest|{mpk}|{spk}|{expires_at}"))},
                "displayName": "head-session", "sessionId": "s1", "pid": 1, "cwd": "/x",
                "channel": "claudemesh-session", "timestamp": ts,
                "signature": session.sign_hex(&format!("claudemesh-session-hello|{}|{mpk}|{spk}|{ts}", m.mesh_id)),
            })
        };
        let url = broker.ws_url();
        let now = now_ms();
        assert_refusal(&refused(&url, &frame(now - 1, now, &m.keys, &m.member_id)).await?, "expired", 1008);
        assert_refusal(&refused(&url, &frame(now + 25 * 3_600_000, now, &m.keys, &m.member_id)).await?, "ttl_too_long", 1008);
        assert_refusal(&refused(&url, &frame(now + 3_600_000, now, &session, &m.member_id)).await?, "bad_signature", 1008);
        assert_refusal(&refused(&url, &frame(now + 3_600_000, now, &m.keys, "wrong-id")).await?, "parent_member_id_mismatch", 1008);

        let mut ws = RawWs::connect(&url).await?;
        ws.send_json(&frame(now + 3_600_000, unique_ts(), &m.keys, &m.member_id)).await?;
        let ack = ws.expect("hello_ack", |v| v["type"] == "hello_ack").await?;
        assert_eq!(ack["memberDisplayName"], "head-session");
        assert_eq!(ack["memberProfile"]["roleTag"], "member");
        ws.send_json(&json!({"type": "list_peers", "_reqId": "p"})).await?;
        let peers = ws.expect("peers", |v| v["_reqId"] == "p").await?;
        assert_eq!(peers["peers"][0]["peerRole"], "session");
        assert_eq!(peers["peers"][0]["pubkey"], session.public_hex());
        assert_eq!(peers["peers"][0]["memberPubkey"], m.keys.public_hex());
        Ok(())
    }
}
