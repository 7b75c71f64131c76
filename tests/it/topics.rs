//! Topics (`topic_*` frames, `send` to `#topic`).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use meshd_tests::{Backend, Client, TestBroker};
use serde_json::{Value, json};

/// A v1 post (base64 plaintext) to `target`.
pub(crate) fn post(target: &str, text: &str) -> Value {
    json!({"type": "send", "id": format!("p-{text}"), "targetSpec": target, "priority": "next",
           "nonce": STANDARD.encode([0u8; 24]), "ciphertext": STANDARD.encode(text)})
}

/// The text of a v1 topic push.
pub(crate) fn text_of(push: &Value) -> String {
    push["ciphertext"]
        .as_str()
        .and_then(|c| STANDARD.decode(c).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_default()
}

/// Waits for the next topic push.
pub(crate) async fn expect_post(c: &mut Client) -> anyhow::Result<Value> {
    c.ws.expect("a topic post", |v| {
        v["type"] == "push" && v["topic"].is_string()
    })
    .await
}

both! {
    /// A topic is created with a key sealed for its creator, listed with its members,
    /// joined and left; every new member reads #general; a post to `#<id>` (or, unlike
    /// the reference, `#<name>`) reaches every subscribed session live — not the
    /// sender's, not a non-member's — is kept in the history (newest first, paged), and
    /// notifies who it mentions; a post to a topic of another mesh is refused.
    async fn topics_over_websocket(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("topics").await?;
        let other = broker.create_mesh("other").await?;
        let ann = broker.enroll(&mesh, "Ann").await?;
        let bo = broker.enroll(&mesh, "bo").await?;
        let cy = broker.enroll(&mesh, "cy").await?;
        let eve = broker.enroll(&other, "eve").await?;
        let mut a = broker.connect(&ann).await?;
        let mut a2 = Client::connect_session(&broker.ws_url(), &ann).await?;
        let mut o = broker.connect(&bo).await?;
        let mut c = broker.connect(&cy).await?;
        let mut e = broker.connect(&eve).await?;

        let bad = a.request(json!({"type": "topic_create", "name": "Not Valid!"})).await?;
        assert_eq!(bad["type"], "error", "{bad}");
        let made = a.request(json!({"type": "topic_create", "name": "#Deploys", "description": "release talk"})).await?;
        assert_eq!((made["type"].as_str(), made["created"].as_bool()), (Some("topic_created"), Some(true)), "{made}");
        assert_eq!(made["topic"]["name"], "deploys");
        let id = made["topic"]["id"].as_str().unwrap_or_default().to_owned();
        assert_eq!(id.len(), 32);
        let again = o.request(json!({"type": "topic_create", "name": "deploys"})).await?;
        assert_eq!((again["created"].as_bool(), again["topic"]["id"].as_str()), (Some(false), Some(id.as_str())));
        // bo became a lead by asking to create it; cy joins as an observer and leaves.
        c.send(json!({"type": "topic_join", "topic": "deploys", "role": "observer"})).await?;
        c.sync().await?;
        let members = a.request(json!({"type": "topic_members", "topic": id})).await?;
        let roles: Vec<(String, String)> = members["members"].as_array().into_iter().flatten()
            .map(|m| (m["displayName"].as_str().unwrap_or("").to_owned(), m["role"].as_str().unwrap_or("").to_owned())).collect();
        assert_eq!(roles, [("Ann".into(), "lead".into()), ("bo".into(), "lead".into()), ("cy".into(), "observer".into())], "{members}");
        c.send(json!({"type": "topic_leave", "topic": "deploys"})).await?;
        c.sync().await?;

        let list = c.request(json!({"type": "topic_list"})).await?;
        let names: Vec<(&str, u64)> = list["topics"].as_array().into_iter().flatten()
            .map(|t| (t["name"].as_str().unwrap_or(""), t["memberCount"].as_u64().unwrap_or(0))).collect();
        assert_eq!(names, [("deploys", 2), ("general", 3)], "{list}");

        // A post to #<id>: live to ann's two sessions, not to bo (the sender) or cy.
        let ack = o.request(post(&format!("#{id}"), "ship it @ann")).await?;
        assert_eq!(ack["queued"], true, "{ack}");
        let message_id = ack["messageId"].as_str().unwrap_or_default().to_owned();
        for s in [&mut a, &mut a2] {
            let p = expect_post(s).await?;
            assert_eq!((p["topic"].as_str(), p["topicId"].as_str(), p["senderName"].as_str()), (Some("deploys"), Some(id.as_str()), Some("bo")));
            assert_eq!((p["messageId"].as_str(), p["bodyVersion"].as_i64()), (Some(message_id.as_str()), Some(1)));
            assert_eq!(text_of(&p), "ship it @ann");
            assert_eq!(p["senderMemberPubkey"], bo.keys.public_hex().as_str());
        }
        // By name too (the SDK's Bridge sends names), with a reply.
        let ack = a.request(json!({"type": "send", "targetSpec": "#deploys", "nonce": STANDARD.encode([0u8; 24]),
            "ciphertext": STANDARD.encode("done"), "replyToId": message_id, "_reqId": "x"})).await?;
        assert_eq!(ack["queued"], true, "{ack}");
        let p = expect_post(&mut o).await?;
        assert_eq!((text_of(&p).as_str(), p["replyToId"].as_str()), ("done", Some(message_id.as_str())));
        // Not to the sender's own sessions.
        a2.expect_no_messages().await?;
        o.expect_no_messages().await?;
        c.expect_no_messages().await?;

        let nowhere = o.request(post("#nope", "x")).await?;
        assert_eq!((nowhere["queued"].as_bool(), nowhere["error"].as_str().map(|e| e.contains("not found"))), (Some(false), Some(true)), "{nowhere}");
        let foreign = e.request(post(&format!("#{id}"), "sneaky")).await?;
        assert_eq!(foreign["queued"], false, "a topic of another mesh: {foreign}");

        let hist = c.request(json!({"type": "topic_history", "topic": "deploys", "limit": 1})).await?;
        let msgs = hist["messages"].as_array().cloned().unwrap_or_default();
        assert_eq!(msgs.len(), 1, "{hist}");
        assert_eq!((msgs[0]["senderName"].as_str(), msgs[0]["replyToId"].as_str()), (Some("Ann"), Some(message_id.as_str())));
        let older = c.request(json!({"type": "topic_history", "topic": "deploys", "beforeId": msgs[0]["id"]})).await?;
        assert_eq!(older["messages"][0]["id"], message_id.as_str(), "{older}");
        assert_eq!(older["messages"][0]["senderPubkey"], o.key().as_str(), "the sending session's key");

        a.send(json!({"type": "topic_mark_read", "topic": id})).await?;
        a.sync().await?;
        let members = o.request(json!({"type": "topic_members", "topic": "deploys"})).await?;
        let ann_row = members["members"].as_array().into_iter().flatten().find(|m| m["displayName"] == "Ann").cloned().unwrap_or_default();
        assert!(ann_row["lastReadAt"].is_string(), "{members}");
        let join_missing = o.request(json!({"type": "topic_join", "topic": "nope"})).await?;
        assert_eq!(join_missing["code"], "topic_not_found", "a _reqId gets the refusal: {join_missing}");
        o.send(json!({"type": "topic_join", "topic": "nope"})).await?;
        o.sync().await?;
        assert!(o.ws.backlog().iter().all(|v| v["type"] != "error"), "without one, silence: {:?}", o.ws.backlog());
        let missing = o.request(json!({"type": "topic_history", "topic": "nope"})).await?;
        assert_eq!((missing["type"].as_str(), missing["code"].as_str()), (Some("error"), Some("topic_not_found")));

        // History survives a restart.
        for cl in [a, a2, o, c, e] {
            cl.close().await;
        }
        let broker = broker.restart().await?;
        let mut o = broker.connect(&bo).await?;
        let hist = o.request(json!({"type": "topic_history", "topic": "deploys"})).await?;
        assert_eq!(hist["messages"].as_array().map(Vec::len), Some(2));
        Ok(())
    }
}

/// Across federated brokers.
mod across_brokers {
    use meshd_tests::fed;
    use serde_json::json;

    use super::{expect_post, post, text_of};
    use crate::federation::*;

    /// A topic of a shared mesh spans its brokers: created on A it appears on B, a
    /// subscriber on B gets A's posts live and A gets B's, a post made during a cut
    /// arrives after the heal, and every post is delivered exactly once (another cut
    /// and heal, whose catch-up sends the posts again, delivers nothing twice); both
    /// histories hold every post.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_topic_spans_brokers() -> anyhow::Result<()> {
        let mut p = cut_pair().await?;
        until_known(&mut p.alice, &p.bob).await?;
        let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
        let made = p
            .alice
            .request(json!({"type": "topic_create", "name": "ops"}))
            .await?;
        let id = made["topic"]["id"].as_str().unwrap_or_default().to_owned();
        bob.poll("the topic on B", json!({"type": "topic_list"}), |v| {
            v["topics"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["id"] == id.as_str()))
        })
        .await?;
        bob.send(json!({"type": "topic_join", "topic": "ops"}))
            .await?;
        bob.sync().await?;
        // A learns of bob's subscription (its topic_members lists him).
        p.alice
            .poll(
                "bob subscribed, seen from A",
                json!({"type": "topic_members", "topic": "ops"}),
                |v| {
                    v["members"]
                        .as_array()
                        .is_some_and(|m| m.iter().any(|m| m["displayName"] == "bob"))
                },
            )
            .await?;

        let ack = p.alice.request(post(&format!("#{id}"), "from A")).await?;
        assert_eq!(ack["queued"], true, "{ack}");
        let got = expect_post(&mut bob).await?;
        assert_eq!(
            (
                text_of(&got).as_str(),
                got["topic"].as_str(),
                got["senderName"].as_str()
            ),
            ("from A", Some("ops"), Some("alice"))
        );
        assert_eq!(
            got["messageId"], ack["messageId"],
            "the same id on both brokers"
        );
        let ack = bob.request(post("#ops", "from B")).await?;
        assert_eq!(ack["queued"], true, "{ack}");
        assert_eq!(text_of(&expect_post(&mut p.alice).await?), "from B");

        p.to_a.cut();
        p.to_b.cut();
        fed::wait_link(p.a.addr, B, "down", |l| l["state"] != "up").await?;
        p.alice.request(post("#ops", "during the cut")).await?;
        p.to_a.heal();
        p.to_b.heal();
        assert_eq!(text_of(&expect_post(&mut bob).await?), "during the cut");

        p.to_a.cut();
        p.to_b.cut();
        fed::wait_link(p.a.addr, B, "down again", |l| l["state"] != "up").await?;
        p.to_a.heal();
        p.to_b.heal();
        fed::wait_flowing(p.a.addr, B, &p.mesh.mesh_id).await?;
        // A probe DM after the catch-up: everything resent before it was applied first.
        p.alice
            .dm(&p.bob.keys.public_hex(), "probe 2", "now")
            .await?;
        let (_, text) = bob.expect_message().await?;
        assert!(text.starts_with("probe"), "{text}");
        let (_, text) = bob.expect_message().await?;
        assert_eq!(text, "probe 2", "no topic post was delivered twice");
        bob.expect_no_messages().await?;

        for c in [&mut p.alice, &mut bob] {
            let hist = c
                .request(json!({"type": "topic_history", "topic": "ops"}))
                .await?;
            let texts: Vec<String> = hist["messages"]
                .as_array()
                .into_iter()
                .flatten()
                .map(text_of)
                .collect();
            assert_eq!(texts, ["during the cut", "from B", "from A"], "{hist}");
        }
        Ok(())
    }
}
