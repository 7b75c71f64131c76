//! Tags (meshd extension): `send.tags`, `tag:NAME` targets routed by subscription,
//! tags on the push and in `message_status`, subscriptions kept for a returning member.

use meshd_tests::{Backend, TestBroker};
use serde_json::json;

both! {
    /// A `tag:NAME` send reaches every visible subscriber but the sender, nobody else;
    /// the push and `message_status` carry the tags; unsubscribing stops delivery.
    async fn tagged_sends_reach_subscribers(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("tags").await?;
        let mut c = Vec::new();
        for name in ["sender", "sub", "other", "hidden"] {
            let m = broker.enroll(&mesh, name).await?;
            c.push(broker.connect(&m).await?);
        }
        let [sender, sub, other, hidden] = &mut c[..] else { unreachable!() };
        assert_eq!(sub.subscribe_tags(&["ops", "sales/emea"]).await?, ["ops", "sales/emea"]);
        assert_eq!(hidden.subscribe_tags(&["ops"]).await?, ["ops"]);
        sender.subscribe_tags(&["ops"]).await?;
        hidden.request(json!({"type": "set_visible", "visible": false})).await?;
        assert_eq!(other.subscribe_tags(&["opsec"]).await?, ["opsec"], "no prefix routing");

        let ack = sender.send_tagged("tag:ops", "db is down", &["sev1", "ops"]).await?;
        assert_eq!(ack["queued"], true, "{ack}");
        let (push, text) = sub.expect_message().await?;
        assert_eq!(text, "db is down");
        assert_eq!(push["tags"], json!(["ops", "sev1"]), "target tag first, no duplicate");
        // Tags on a broadcast are kept on the push; a DM's too.
        sender.send_tagged("*", "fyi", &["release"]).await?;
        for cl in [&mut *sub, &mut *other] {
            let (push, text) = cl.expect_message().await?;
            assert_eq!((text.as_str(), &push["tags"]), ("fyi", &json!(["release"])));
        }
        // Nobody else got the tagged one: not the sender, not the hidden subscriber,
        // not the subscriber of a longer tag.
        for cl in [&mut *sender, &mut *sub, &mut *other, &mut *hidden] {
            cl.expect_no_messages().await?;
        }
        // message_status names the subscribers reached and the tags.
        let st = sender.request(json!({"type": "message_status", "messageId": ack["messageId"]})).await?;
        assert_eq!(st["tags"], json!(["ops", "sev1"]));
        let names: Vec<&str> = st["recipients"].as_array().unwrap().iter().filter_map(|r| r["name"].as_str()).collect();
        assert!(names.contains(&"sub") && !names.contains(&"other"), "{st}");
        // list_peers shows subscriptions.
        let peers = other.sync().await?;
        let sub_entry = peers["peers"].as_array().unwrap().iter().find(|p| p["displayName"] == "sub").unwrap();
        assert_eq!(sub_entry["tags"], json!(["ops", "sales/emea"]));

        let left = sub.request(json!({"type": "unsubscribe_tags", "tags": ["ops", "never"]})).await?;
        assert_eq!(left["tags"], json!(["sales/emea"]));
        sender.send_tagged("tag:ops", "again", &[]).await?;
        sender.send_tagged("tag:sales/emea", "emea", &[]).await?;
        assert_eq!(sub.expect_message().await?.1, "emea", "only the remaining subscription");
        sub.sync().await?;
        assert!(sub.pending_messages().is_empty());
        Ok(())
    }
}

both! {
    /// Bad tags get clear answers: an `ack` error for a send, an `error` for a subscription;
    /// nothing is delivered or changed.
    async fn bad_tags_are_refused(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("badtags").await?;
        let (a, s) = (broker.enroll(&mesh, "a").await?, broker.enroll(&mesh, "s").await?);
        let mut a = broker.connect(&a).await?;
        let mut s = broker.connect(&s).await?;
        s.subscribe_tags(&["ok"]).await?;
        let nine: Vec<String> = (0..9).map(|i| format!("t{i}")).collect();
        let nine: Vec<&str> = nine.iter().map(String::as_str).collect();
        let long = "x".repeat(65);
        for (target, tags, needle) in [
            ("*", vec!["has space"], "invalid tag"),
            ("*", vec![long.as_str()], "invalid tag"),
            ("*", nine.clone(), "too many tags"),
            ("tag:ok", nine[..8].to_vec(), "too many tags"),
            ("tag:", vec![], "invalid tag in target"),
            ("tag:a,b", vec![], "invalid tag in target"),
        ] {
            let ack = a.send_tagged(target, "x", &tags).await?;
            assert_eq!(ack["queued"], false, "{target} {tags:?}: {ack}");
            assert!(ack["error"].as_str().unwrap().contains(needle), "{target}: {ack}");
        }
        let e = s.request(json!({"type": "subscribe_tags", "tags": ["fine", "not fine"]})).await?;
        assert_eq!(e["type"], "error", "{e}");
        let many: Vec<String> = (0..64).map(|i| format!("m{i}")).collect();
        let e = s.request(json!({"type": "subscribe_tags", "tags": many})).await?;
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("too_many_tags")), "{e}");
        let now = s.request(json!({"type": "unsubscribe_tags", "tags": []})).await?;
        assert_eq!(now["tags"], json!(["ok"]), "refusals changed nothing");
        s.sync().await?;
        assert!(s.pending_messages().is_empty());
        Ok(())
    }
}

both! {
    /// A returning member gets its subscriptions back (like its groups), also after a
    /// broker restart.
    async fn subscriptions_come_back_with_the_member(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("back").await?;
        let (a, s) = (broker.enroll(&mesh, "a").await?, broker.enroll(&mesh, "s").await?);
        let sub = broker.connect(&s).await?;
        let mut sub = sub;
        sub.subscribe_tags(&["ops"]).await?;
        sub.close().await;
        let broker = broker.restart().await?;
        let mut a = broker.connect(&a).await?;
        let mut sub = broker.connect(&s).await?;
        let key = sub.key();
        a.until_peers("s with its tags", |v| {
            v["peers"].as_array().is_some_and(|ps| ps.iter().any(|p| p["pubkey"] == key && p["tags"] == json!(["ops"])))
        })
        .await?;
        a.send_tagged("tag:ops", "welcome back", &[]).await?;
        assert_eq!(sub.expect_message().await?.1, "welcome back");
        Ok(())
    }
}

/// Across federated brokers.
mod across_brokers {
    use meshd_tests::Backend;
    use serde_json::json;

    use crate::federation::*;

    /// Tags are routed by subscription across three brokers: a `tag:` send at A reaches
    /// the subscribers at B and C (and only them), with its tags; subscriptions travel
    /// with presence; a DM's tags cross with it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tags_route_by_subscription_across_brokers() -> anyhow::Result<()> {
        let t = Trio::start(Backend::Sqlite).await?;
        let [ma, mb, mc] = t.shared_mesh("tagged").await?;
        let alice = t.a.enroll(&ma, "alice").await?;
        let bob = t.b.enroll(&mb, "bob").await?;
        let carol = t.c.enroll(&mc, "carol").await?;
        let dave = t.c.enroll(&mc, "dave").await?;
        let mut alice = member_client(&t.a.ws_url(), &alice, &[]).await?;
        let mut bob = member_client(&t.b.ws_url(), &bob, &[]).await?;
        let mut carol = member_client(&t.c.ws_url(), &carol, &[]).await?;
        let mut dave = member_client(&t.c.ws_url(), &dave, &[]).await?;
        bob.subscribe_tags(&["incident"]).await?;
        carol.subscribe_tags(&["incident", "design"]).await?;
        dave.subscribe_tags(&["design"]).await?;
        let (bk, ck) = (bob.key(), carol.key());
        // A learns the subscriptions through presence.
        alice
            .until_peers("remote subscriptions", |v| {
                let ps = v["peers"].as_array().cloned().unwrap_or_default();
                ps.iter()
                    .any(|p| p["pubkey"] == bk && p["tags"] == json!(["incident"]))
                    && ps
                        .iter()
                        .any(|p| p["pubkey"] == ck && p["tags"] == json!(["incident", "design"]))
            })
            .await?;

        let ack = alice
            .send_tagged("tag:incident", "api 500s", &["sev2"])
            .await?;
        assert_eq!(ack["queued"], true, "{ack}");
        for cl in [&mut bob, &mut carol] {
            let (push, text) = cl.expect_message().await?;
            assert_eq!(text, "api 500s");
            assert_eq!(push["tags"], json!(["incident", "sev2"]));
            assert_eq!(push["senderPubkey"], alice.key());
        }
        let st = alice
            .request(json!({"type": "message_status", "messageId": ack["messageId"]}))
            .await?;
        let mut names: Vec<&str> = st["recipients"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["name"].as_str())
            .collect();
        names.sort_unstable();
        assert_eq!(names, ["bob", "carol"], "{st}");
        // From C: design reaches dave (local) only; no one at A or B.
        carol.send_tagged("tag:design", "new mockups", &[]).await?;
        assert_eq!(dave.expect_message().await?.1, "new mockups");
        // A DM keeps its tags across the link.
        alice.dm_tagged(&bk, "private note", &["handover"]).await?;
        let (push, text) = bob.expect_message().await?;
        assert_eq!(
            (text.as_str(), &push["tags"]),
            ("private note", &json!(["handover"]))
        );
        for cl in [&mut alice, &mut bob, &mut carol, &mut dave] {
            cl.expect_no_messages().await?;
        }
        // An unsubscription travels too: the next incident reaches carol only.
        bob.request(json!({"type": "unsubscribe_tags", "tags": ["incident"]}))
            .await?;
        alice
            .until_peers("bob unsubscribed", |v| {
                v["peers"].as_array().is_some_and(|ps| {
                    ps.iter()
                        .any(|p| p["pubkey"] == bk && p.get("tags").is_none())
                })
            })
            .await?;
        alice.send_tagged("tag:incident", "resolved", &[]).await?;
        assert_eq!(carol.expect_message().await?.1, "resolved");
        bob.sync().await?;
        assert!(bob.pending_messages().is_empty());
        Ok(())
    }
}
