//! Frame-level robustness: unknown, malformed, unsupported, binary and oversized frames.

use meshd_tests::{Backend, TestBroker};
use serde_json::json;

#[tokio::test]
async fn unknown_malformed_and_unsupported() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("frames").await?;
    let a = broker.enroll(&mesh, "a").await?;
    let mut a = broker.connect(&a).await?;

    let e = a.request(json!({"type": "teleport"})).await?;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("unknown_message_type"))
    );
    // HEAD clients probe with frames meshd does not know and expect exactly this code.
    let e = a.request(json!({"type": "mcp_catalog"})).await?;
    assert_eq!(e["code"], "unknown_message_type");

    // Malformed JSON never closes the socket and gets no (uncorrelatable) reply.
    for junk in [
        "{",
        "[]",
        "\"str\"",
        "{\"type\":7}",
        "null",
        "{\"no\":\"type\"}",
    ] {
        a.ws.send_text(junk).await?;
    }
    a.ws.send_binary(vec![0, 1, 2]).await?;
    let peers = a.sync().await?;
    assert_eq!(peers["type"], "peers_list");
    assert!(a.ws.backlog().is_empty(), "{:?}", a.ws.backlog());

    // Known claudemesh frames this build does not serve: `unsupported` when the client
    // waits for an answer, silence when it does not (a stray reply would be matched to
    // the wrong waiter by the CLI).
    let e = a
        .request(json!({"type": "vector_search", "collection": "c", "query": "x"}))
        .await?;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("unsupported"))
    );
    a.send(json!({"type": "publish", "stream": "s", "data": 1}))
        .await?;
    a.send(json!({"type": "set_status", "status": "sleeping"}))
        .await?;
    a.send(json!({"type": "join_group"})).await?;
    a.sync().await?;
    assert!(a.ws.backlog().is_empty(), "{:?}", a.ws.backlog());
    let metrics = broker.metrics().await?;
    assert!(
        metrics.contains("meshd_frames_dropped_total{reason=\"malformed\"} 6"),
        "{metrics}"
    );
    assert!(metrics.contains("meshd_frames_dropped_total{reason=\"binary\"} 1"));
    Ok(())
}

#[tokio::test]
async fn oversized_frame_closes_only_its_connection() -> anyhow::Result<()> {
    let broker =
        TestBroker::start_with(Backend::Sqlite, |c| c.limits.max_frame_bytes = 64 * 1024).await?;
    let mesh = broker.create_mesh("big").await?;
    let (a, b) = (
        broker.enroll(&mesh, "a").await?,
        broker.enroll(&mesh, "b").await?,
    );
    let mut a = broker.connect(&a).await?;
    let mut b = broker.connect(&b).await?;
    // Just under the limit is fine (a peer-file relay needs frames this large).
    let fits = "A".repeat(60 * 1024);
    let ack = a.send_envelope("*", "next", "", &fits).await?;
    assert_eq!(ack["queued"], true);
    assert_eq!(b.expect_message().await?.1.len(), 60 * 1024 * 3 / 4);
    // Over it: the offender is closed with 1009; everyone else carries on.
    let huge = format!(
        "{{\"type\":\"send\",\"targetSpec\":\"*\",\"nonce\":\"\",\"ciphertext\":\"{}\"}}",
        "A".repeat(100 * 1024)
    );
    a.ws.send_text(huge).await?;
    let close = a.ws.expect_close().await;
    assert_eq!(close.map(|c| c.0), Some(1009));
    b.sync().await?;
    let c = broker.enroll(&mesh, "c").await?;
    let mut c = broker.connect(&c).await?;
    c.multicast("*", "still here").await?;
    assert_eq!(b.expect_message().await?.1, "still here");
    Ok(())
}

#[tokio::test]
async fn unknown_frame_without_req_id_gets_silence() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("silence").await?;
    let a = broker.enroll(&mesh, "a").await?;
    let mut a = broker.connect(&a).await?;
    // claudemesh clients hand an uncorrelated error to whichever request waits first:
    // an unknown frame without `_reqId` must not be answered.
    a.send(json!({"type": "teleport"})).await?;
    a.send(json!({"type": "mcp_catalog"})).await?;
    let peers = a.sync().await?;
    assert_eq!(peers["type"], "peers_list");
    assert!(a.ws.backlog().is_empty(), "{:?}", a.ws.backlog());
    let metrics = broker.metrics().await?;
    assert!(
        metrics.contains("meshd_frames_dropped_total{reason=\"unknown\"} 2"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn close_frame_is_answered() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("closing").await?;
    let a = broker.enroll(&mesh, "a").await?;
    // RFC 6455 §5.5.1: the broker answers a client's Close with a Close (clients saw 1006).
    let mut c = broker.connect(&a).await?;
    c.sync().await?;
    let answer = c.ws.close_handshake().await;
    assert!(matches!(answer, Some(Some((1000, _)))), "{answer:?}");
    // Also before the handshake.
    let mut raw = meshd_tests::RawWs::connect(&broker.ws_url()).await?;
    assert!(
        raw.close_handshake().await.is_some(),
        "no Close before hello"
    );
    Ok(())
}

both! {
    /// U+0000 in any string of a client frame is refused at decode time, alike on both
    /// backends (PostgreSQL cannot store it): an answered request gets `malformed` with
    /// its `_reqId`, a send an `ack` with its error; nothing reaches the store, other
    /// senders are unaffected and the store stays healthy.
    async fn nul_in_text_is_refused_at_decode(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start_with(b, |c| c.limits.sends_per_second = 0).await?;
        let mesh = broker.create_mesh("nul").await?;
        let (x, y) = (broker.enroll(&mesh, "x").await?, broker.enroll(&mesh, "y").await?);
        let mut x = broker.connect(&x).await?;
        let mut y = broker.connect(&y).await?;
        let y_key = y.key();

        for frame in [
            json!({"type": "remember", "content": "bad\u{0}note"}),
            json!({"type": "create_task", "title": "t\u{0}"}),
            json!({"type": "share_skill", "name": "s", "description": "d", "instructions": "i\u{0}"}),
            json!({"type": "set_profile", "title": "\u{0}"}),
        ] {
            let e = x.request(frame.clone()).await?;
            assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("malformed")), "{frame}: {e}");
        }
        // A DM whose client id holds U+0000: refused in its ack, by id.
        let (nonce, c) = meshd_tests::crypto::seal("hi", &y_key, x.dm_keys());
        x.ws.send_json(&json!({"type": "send", "id": "bad-1", "targetSpec": y_key, "priority": "now",
            "nonce": nonce, "ciphertext": c, "clientMessageId": "cm\u{0}1"})).await?;
        let ack = x.ws.expect("ack", |v| v["id"] == "bad-1").await?;
        assert_eq!(ack["code"], "malformed", "{ack}");
        // Honest traffic around it flows, and the store stays healthy.
        for i in 0..20 {
            let ack = x.dm(&y_key, &format!("ok {i}"), "now").await?;
            assert_eq!(ack["queued"], true, "{ack}");
        }
        for i in 0..20 {
            assert_eq!(y.expect_message().await?.1, format!("ok {i}"));
        }
        let (status, _, _) = meshd_tests::http(broker.addr, "GET", "/health", None).await?;
        assert_eq!(status, 200);
        let ok = x.request(json!({"type": "remember", "content": "a fine note"})).await?;
        assert_ne!(ok["type"], "error", "{ok}");
        Ok(())
    }
}
