//! Typing indicators and read receipts (`features::signals`): only opted-in connections
//! receive them, typing is rate-limited per target, and both cross brokers.

use meshd_tests::{Backend, TestBroker};
use serde_json::json;

use crate::federation::pair_with_bob_online;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_and_receipts_reach_only_opted_in_connections() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("signals").await?;
    let (a, b, old) = (
        broker.enroll(&mesh, "ada").await?,
        broker.enroll(&mesh, "bob").await?,
        broker.enroll(&mesh, "old-cli").await?,
    );
    let mut ada = broker.connect(&a).await?;
    let mut bob = broker.connect(&b).await?;
    let mut old = broker.connect(&old).await?;
    bob.send(json!({"type": "signals"})).await?;
    bob.sync().await?;

    // Ada types to bob (twice within 2 s: the second is dropped) and to the old client.
    ada.send(json!({"type": "typing", "to": bob.key()})).await?;
    ada.send(json!({"type": "typing", "to": bob.key()})).await?;
    ada.send(json!({"type": "typing", "to": old.key()})).await?;
    let t = bob
        .ws
        .expect_within("typing", meshd_tests::patience(), |v| v["type"] == "typing")
        .await?;
    assert_eq!(t["from"], json!(ada.key()));
    assert_eq!(t["fromMember"], json!(a.keys.public_hex()));
    assert_eq!(t["fromName"], "ada");

    // A DM, then bob's receipt for it.
    let ack = ada.dm(&bob.key(), "hello", "now").await?;
    let (push, _) = bob.expect_message().await?;
    assert_eq!(push["messageId"], ack["messageId"]);
    bob.send(json!({"type": "read", "to": ada.key(), "messageIds": [push["messageId"]]}))
        .await?;
    bob.sync().await?; // the receipt is handled before Ada opts in
    // Ada did not opt in: nothing reaches her. She opts in; the next receipt does.
    ada.send(json!({"type": "signals"})).await?;
    ada.sync().await?;
    bob.send(json!({"type": "read", "to": ada.key(), "messageIds": ["m2"]}))
        .await?;
    let r = ada
        .ws
        .expect_within("read", meshd_tests::patience(), |v| v["type"] == "read")
        .await?;
    assert_eq!(
        r["messageIds"],
        json!(["m2"]),
        "only the receipt after the opt-in"
    );
    assert_eq!(r["from"], json!(bob.key()));

    // The old client and bob saw nothing else: a sync round-trip flushes what is due.
    bob.sync().await?;
    old.sync().await?;
    for (who, c) in [("bob", &mut bob), ("old", &mut old)] {
        let extra =
            c.ws.drain_backlog(|v| v["type"] == "typing" || v["type"] == "read");
        assert!(extra.is_empty(), "{who} got {extra:?}");
    }
    let metrics = broker.metrics().await?;
    assert!(
        metrics.contains("reason=\"signal_rate\"} 1"),
        "the second typing was dropped: {}",
        metrics
            .lines()
            .filter(|l| l.contains("frames_dropped"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // A malformed signal is fire-and-forget like the others: no reply (a claudemesh
    // client would hand it to an unrelated waiter), counted as invalid.
    let invalid = |m: &str| {
        m.lines()
            .find(|l| l.starts_with("meshd_frames_dropped_total{reason=\"invalid\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = invalid(&broker.metrics().await?);
    ada.send(json!({"type": "read", "to": "nope", "messageIds": ["x"]}))
        .await?;
    ada.sync().await?;
    assert_eq!(invalid(&broker.metrics().await?), before + 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_and_typing_cross_brokers() -> anyhow::Result<()> {
    let (mut p, mut bob, bob_key) = pair_with_bob_online().await?;
    let alice_key = p.alice_member.keys.public_hex();
    p.alice.send(json!({"type": "signals"})).await?;
    bob.send(json!({"type": "signals"})).await?;
    p.alice.sync().await?;
    bob.sync().await?;

    bob.send(json!({"type": "typing", "to": alice_key})).await?;
    let t = p
        .alice
        .ws
        .expect_within("typing from B", meshd_tests::patience(), |v| {
            v["type"] == "typing"
        })
        .await?;
    assert_eq!(t["from"], json!(bob_key));
    assert_eq!(t["fromName"], "bob");

    let ack = p.alice.dm(&bob_key, "across", "now").await?;
    // (The pair's set-up left a probe DM for bob first.)
    let (mut push, mut text) = bob.expect_message().await?;
    if text == "probe" {
        (push, text) = bob.expect_message().await?;
    }
    assert_eq!(text, "across");
    bob.send(json!({"type": "read", "to": alice_key, "messageIds": [push["messageId"]]}))
        .await?;
    let r = p
        .alice
        .ws
        .expect_within("a receipt from B", meshd_tests::patience(), |v| {
            v["type"] == "read"
        })
        .await?;
    assert_eq!(r["messageIds"], json!([ack["messageId"]]));
    Ok(())
}
