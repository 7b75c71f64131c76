//! Routing (§4): end-to-end encrypted DMs, broadcasts, groups, visibility, and sends that
//! can never be delivered.

use meshd_tests::{Backend, Client, HelloOpts, Keypair, TestBroker};
use serde_json::json;

both! {
    /// A DM sealed with crypto_box between session keys is pushed with the sender's
    /// session key, so the recipient can open it (§0.3).
    async fn e2e_direct_message(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("dm").await?;
        let (alice_m, bob_m) = (broker.enroll(&mesh, "alice").await?, broker.enroll(&mesh, "bob").await?);
        let mut alice = broker.connect(&alice_m).await?;
        let mut bob = broker.connect(&bob_m).await?;

        let ack = alice.dm(&bob.key(), "hi bob, the build is green", "now").await?;
        assert_eq!(ack["queued"], true);
        let message_id = ack["messageId"].as_str().unwrap().to_owned();
        assert_eq!(message_id.len(), 32);
        let (push, text) = bob.expect_message().await?;
        assert_eq!(text, "hi bob, the build is green");
        assert!(bob.open_push(&push).is_some(), "sealed, not base64 plaintext");
        assert_eq!(push["senderPubkey"], alice.key());
        assert_eq!(push["messageId"], message_id.as_str());
        assert_eq!(push["meshId"], mesh.mesh_id.as_str());
        assert_eq!(push["priority"], "now");
        assert_eq!(push["senderMemberPubkey"], alice_m.keys.public_hex());
        assert_eq!(push["senderName"], "alice");
        assert!(push["createdAt"].as_str().unwrap().ends_with('Z'));

        // And back, addressed to the sender's session key from the push.
        let reply_to = push["senderPubkey"].as_str().unwrap().to_owned();
        bob.dm(&reply_to, "thanks", "next").await?;
        let (_, text) = alice.expect_message().await?;
        assert_eq!(text, "thanks");

        // message_status: delivered (recorded once the push reached bob's socket).
        let st = alice.until_status(&json!(message_id), |st| st["delivered"] == true).await?;
        assert_eq!(st["type"], "message_status_result");
        assert_eq!(st["delivered"], true);
        assert_eq!(st["recipients"][0]["status"], "delivered");
        assert_eq!(st["recipients"][0]["name"], "bob");
        // Another mesh's member cannot read it.
        let other = broker.create_mesh("other").await?;
        let eve_m = broker.enroll(&other, "eve").await?;
        let mut eve = broker.connect(&eve_m).await?;
        let st = eve.request(json!({"type": "message_status", "messageId": message_id})).await?;
        assert_eq!((st["type"].as_str(), st["code"].as_str()), (Some("error"), Some("not_found")));
        Ok(())
    }
}

both! {
    /// A DM to a member key reaches a session of that member; a client without a session
    /// key (CLI 0.1.4, Telegram connector) is addressed by its member key.
    async fn member_key_and_no_session_key(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("mk").await?;
        let (a, t) = (broker.enroll(&mesh, "a").await?, broker.enroll(&mesh, "telegram").await?);
        let mut a = broker.connect(&a).await?;
        let mut tg = Client::connect(&broker.ws_url(), &t, HelloOpts { session: None, ..HelloOpts::default() }).await?;
        assert_eq!(tg.key(), t.keys.public_hex());
        a.dm(&t.keys.public_hex(), "to your member key", "now").await?;
        let (push, text) = tg.expect_message().await?;
        assert_eq!(text, "to your member key");
        assert_eq!(push["senderPubkey"], a.key());
        // Its sends carry its member key.
        tg.dm(&a.key(), "from telegram", "now").await?;
        let (push, _) = a.expect_message().await?;
        assert_eq!(push["senderPubkey"], t.keys.public_hex());
        // A DM to oneself arrives at once (the reference waited for a later drain).
        let own = a.key();
        a.dm(&own, "note to self", "now").await?;
        assert_eq!(a.expect_message().await?.1, "note to self");
        Ok(())
    }
}

both! {
    /// `*` and `@all` reach every visible peer but the sender; `@group` reaches the group
    /// and its sub-groups; hidden peers get no multicast but still get DMs.
    async fn broadcast_groups_and_visibility(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("fan").await?;
        let mut clients = Vec::new();
        for (name, groups) in [
            ("lead", vec![("eng", Some("lead"))]),
            ("backend", vec![("eng/backend", None)]),
            ("ops", vec![("ops", None)]),
            ("shy", vec![("eng", None)]),
        ] {
            let m = broker.enroll(&mesh, name).await?;
            let opts = HelloOpts {
                groups: groups.into_iter().map(|(g, r)| (g.to_owned(), r.map(str::to_owned))).collect(),
                ..HelloOpts::default()
            };
            clients.push(Client::connect(&broker.ws_url(), &m, opts).await?);
        }
        let [lead, backend, ops, shy] = &mut clients[..] else { unreachable!() };
        let ack = shy.request(json!({"type": "set_visible", "visible": false})).await?;
        assert_eq!((ack["type"].as_str(), ack["queued"].as_bool()), (Some("ack"), Some(false)));

        lead.multicast("*", "all hands").await?;
        for c in [&mut *backend, &mut *ops] {
            assert_eq!(c.expect_message().await?.1, "all hands");
        }
        lead.multicast("@eng", "eng only").await?;
        assert_eq!(backend.expect_message().await?.1, "eng only", "sub-group reached");
        ops.multicast("@all", "from ops").await?;
        assert_eq!(lead.expect_message().await?.1, "from ops");
        assert_eq!(backend.expect_message().await?.1, "from ops");

        // Nothing else arrived: not the sender's own, not @eng at ops, nothing for the hidden.
        for c in [&mut *lead, &mut *backend, &mut *ops, &mut *shy] {
            c.sync().await?;
            let extra = c.pending_messages();
            assert!(extra.is_empty(), "{}: unexpected {extra:?}", c.member.display_name);
        }
        // The hidden peer still gets DMs.
        let shy_key = shy.key();
        lead.dm(&shy_key, "psst", "now").await?;
        assert_eq!(shy.expect_message().await?.1, "psst");
        // message_status of a broadcast lists the current recipients, delivered.
        let ack = lead.multicast("@ops", "ops ping").await?;
        assert_eq!(ops.expect_message().await?.1, "ops ping");
        let st = lead.request(json!({"type": "message_status", "messageId": ack["messageId"]})).await?;
        assert_eq!(st["delivered"], true);
        assert_eq!(st["recipients"].as_array().unwrap().len(), 1);
        assert_eq!(st["recipients"][0]["name"], "ops");
        Ok(())
    }
}

both! {
    /// Sends that can never be delivered are refused in the ack, not queued forever.
    async fn undeliverable_targets_are_refused(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("nowhere").await?;
        let a = broker.enroll(&mesh, "a").await?;
        let mut a = broker.connect(&a).await?;
        let stranger = Keypair::generate().public_hex();
        for (target, needle) in [
            (stranger.as_str(), "no member or session"),
            ("#nope", "topic \"nope\" not found"),
            ("tag:", "invalid tag"),
            ("bob", "resolve names"),
        ] {
            let ack = a.send_envelope(target, "next", "bm9uY2U=", "aGk=").await?;
            assert_eq!(ack["queued"], false, "{target}: {ack}");
            assert_eq!(ack["messageId"], "");
            assert!(ack["error"].as_str().unwrap().contains(needle), "{target}: {ack}");
        }
        let ack = a.send_envelope("*", "urgent", "bm9uY2U=", "aGk=").await?;
        assert!(ack["error"].as_str().unwrap().contains("priority"), "{ack}");
        // A send without priority defaults to next (the SDK always sends one; others may not).
        a.send(json!({"type": "send", "id": "np", "targetSpec": "*", "nonce": "", "ciphertext": "aGk="})).await?;
        let ack = a.ws.expect("ack np", |v| v["id"] == "np").await?;
        assert_eq!(ack["queued"], true);
        // Missing fields: an error carrying the send's id (clients fail the send by id).
        a.send(json!({"type": "send", "id": "bad", "targetSpec": "*"})).await?;
        let e = a.ws.expect("error for bad", |v| v["id"] == "bad").await?;
        assert_eq!(e["code"], "malformed");
        Ok(())
    }
}

#[tokio::test]
async fn size_and_rate_limits() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(Backend::Sqlite, |c| {
        c.limits.max_message_bytes = 1000;
        c.limits.sends_per_second = 1;
        c.limits.send_burst = 3;
    })
    .await?;
    let mesh = broker.create_mesh("limits").await?;
    let a = broker.enroll(&mesh, "a").await?;
    let mut a = broker.connect(&a).await?;
    let big = "A".repeat(2000);
    let ack = a.send_envelope("*", "next", "", &big).await?;
    assert!(
        ack["error"].as_str().unwrap().contains("too large"),
        "{ack}"
    );
    let mut refused = 0;
    for _ in 0..5 {
        let ack = a.multicast("*", "spam").await?;
        if ack["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("rate_limit"))
        {
            refused += 1;
        }
    }
    // The oversized send used one token; two more pass, then the bucket is empty.
    assert!(refused >= 2, "{refused} refused");
    let metrics = broker.metrics().await?;
    assert!(metrics.contains("meshd_messages_rejected_total{reason=\"rate_limited\"}"));
    assert!(metrics.contains("meshd_messages_rejected_total{reason=\"too_large\"} 1"));
    Ok(())
}

both! {
    /// A DM or a reminder to a member's stale session key (its connection left, beyond
    /// `limits.session_grace`) while the member is online on another session reaches
    /// that live session, as in the reference, instead of waiting unseen for the dead
    /// key until it expires. Within the grace it waits for the session to come back.
    async fn stale_session_key_reaches_the_live_session(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start_with(b, |c| {
            c.limits.session_grace = std::time::Duration::from_millis(300);
        })
        .await?;
        let mesh = broker.create_mesh("stale").await?;
        let (m, x) = (broker.enroll(&mesh, "m").await?, broker.enroll(&mesh, "x").await?);
        let mut live = broker.connect(&m).await?; // the member's long-running session
        let mut x = broker.connect(&x).await?;

        // A short-lived CLI connection of the same member schedules a reminder to
        // itself, then leaves.
        let mut cli = broker.connect(&m).await?;
        let stale_key = cli.key();
        let at = meshd_tests::now_ms() + 1_500;
        let ack = cli
            .request(json!({"type": "schedule", "to": stale_key, "message": "stand-up", "deliverAt": at, "subtype": "reminder"}))
            .await?;
        assert_eq!(ack["type"], "scheduled_ack", "{ack}");
        cli.close().await;
        x.expect_event("peer_left").await?;

        // Within the grace, a DM to that key waits for it.
        let ack = x.dm(&stale_key, "soon back?", "now").await?;
        assert_eq!(ack["queued"], true, "{ack}");
        live.sync().await?;
        assert!(live.pending_messages().is_empty(), "re-addressed within the grace");

        // Beyond the grace: a DM to the dead key reaches the member's live session.
        let deadline = tokio::time::Instant::now() + meshd_tests::patience();
        loop {
            let ack = x.dm(&stale_key, "you there?", "now").await?;
            assert_eq!(ack["queued"], true, "{ack}");
            live.sync().await?;
            let got = live
                .ws
                .drain_backlog(|v| v["type"] == "push" && v["messageId"] == ack["messageId"]);
            if !got.is_empty() {
                break;
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "never re-addressed");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        // And so does the reminder, when it fires.
        let reminder = live
            .ws
            .expect("the reminder", |v| v["type"] == "push" && v["subtype"] == "reminder")
            .await?;
        assert_eq!(reminder["senderPubkey"], stale_key.as_str());
        Ok(())
    }
}
