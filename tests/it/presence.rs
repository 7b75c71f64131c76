//! Presence: `peers_list` fields (§4.3), system events (§3.4), visibility, profiles,
//! groups, stats, and "welcome back" (§8 B1).

use meshd_tests::{Backend, Client, HelloOpts, Keypair, TestBroker};
use serde_json::{Value, json};

fn find<'a>(peers: &'a Value, key: &str) -> Option<&'a Value> {
    peers["peers"]
        .as_array()?
        .iter()
        .find(|p| p["pubkey"] == key)
}

both! {
    async fn peers_list_fields(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("peers").await?;
        let (a, c) = (broker.enroll(&mesh, "alice").await?, broker.enroll(&mesh, "carol").await?);
        let opts = HelloOpts {
            display_name: Some("Alice (laptop)".into()),
            cwd: Some("/src/app".into()),
            hostname: Some("laptop".into()),
            model: Some("claude-opus".into()),
            groups: vec![("eng".into(), Some("lead".into()))],
            session_id: Some("4242-1".into()),
            ..HelloOpts::default()
        };
        let mut a = Client::connect(&broker.ws_url(), &a, opts).await?;
        let mut c = broker.connect(&c).await?;
        a.send(json!({"type": "set_summary", "summary": "fixing the flaky test"})).await?;
        a.send(json!({"type": "set_status", "status": "working"})).await?;
        a.send(json!({"type": "join_group", "name": "ops", "role": "oncall"})).await?;
        a.send(json!({"type": "join_group", "name": "eng", "role": "member"})).await?;
        a.send(json!({"type": "leave_group", "name": "ops"})).await?;
        a.send(json!({"type": "set_stats", "stats": {"messagesIn": 3, "messagesOut": 2, "toolCalls": 7, "uptime": 60, "errors": 0}})).await?;
        let ack = a.request(json!({"type": "set_profile", "title": "Staff Eng", "bio": "rust", "capabilities": ["review"]})).await?;
        assert_eq!((ack["type"].as_str(), ack["queued"].as_bool()), (Some("ack"), Some(false)));
        assert_eq!(ack["id"], ack["_reqId"]);

        let peers = c.sync().await?;
        assert_eq!(peers["type"], "peers_list");
        assert_eq!(peers["peers"].as_array().unwrap().len(), 2, "the caller is listed too");
        let p = find(&peers, &a.key()).expect("alice listed");
        assert_eq!(p["displayName"], "Alice (laptop)");
        assert_eq!(p["status"], "working");
        assert_eq!(p["summary"], "fixing the flaky test");
        assert_eq!(p["groups"], json!([{"name": "eng", "role": "member"}]));
        assert_eq!(p["sessionId"], "4242-1");
        assert!(p["connectedAt"].as_str().unwrap().ends_with('Z'));
        assert_eq!((p["cwd"].as_str(), p["hostname"].as_str()), (Some("/src/app"), Some("laptop")));
        assert_eq!((p["peerType"].as_str(), p["channel"].as_str(), p["model"].as_str()), (Some("ai"), Some("claude-code"), Some("claude-opus")));
        assert_eq!(p["stats"], json!({"messagesIn": 3.0, "messagesOut": 2.0, "toolCalls": 7.0, "uptime": 60.0, "errors": 0.0}));
        assert_eq!(p["visible"], true);
        assert_eq!(p["profile"], json!({"title": "Staff Eng", "bio": "rust", "capabilities": ["review"]}));
        assert_eq!(p["memberPubkey"], a.member.keys.public_hex());
        assert_eq!(p["peerRole"], "control-plane");
        let cp = find(&peers, &c.key()).expect("carol");
        assert!(cp["summary"].is_null());
        assert!(cp.get("profile").is_none(), "empty profile omitted");

        // set_profile: absent fields unchanged, null assigns null.
        a.request(json!({"type": "set_profile", "bio": null})).await?;
        let peers = c.sync().await?;
        assert_eq!(find(&peers, &a.key()).unwrap()["profile"], json!({"title": "Staff Eng", "bio": null, "capabilities": ["review"]}));

        // Hidden peers disappear from others' lists, not from their own member's.
        a.request(json!({"type": "set_visible", "visible": false})).await?;
        assert!(find(&c.sync().await?, &a.key()).is_none());
        let own = a.sync().await?;
        assert_eq!(find(&own, &a.key()).unwrap()["visible"], false);
        Ok(())
    }
}

both! {
    async fn system_events(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("events").await?;
        let (w, j) = (broker.enroll(&mesh, "watcher").await?, broker.enroll(&mesh, "joiner").await?);
        let mut w = broker.connect(&w).await?;

        let mut jc = Client::connect(&broker.ws_url(), &j, HelloOpts {
            groups: vec![("eng".into(), None)], ..HelloOpts::default()
        }).await?;
        let ev = w.expect_event("peer_joined").await?;
        assert_eq!((ev["senderPubkey"].as_str(), ev["priority"].as_str()), (Some("system"), Some("low")));
        assert_eq!((ev["nonce"].as_str(), ev["ciphertext"].as_str()), (Some(""), Some("")));
        assert_eq!(ev["eventData"]["name"], "joiner");
        assert_eq!(ev["eventData"]["pubkey"], jc.key());
        assert_eq!(ev["eventData"]["groups"], json!([{"name": "eng"}]));
        assert_eq!(ev["messageId"].as_str().unwrap().len(), 36, "uuid");

        jc.request(json!({"type": "set_visible", "visible": false})).await?;
        assert_eq!(w.expect_event("peer_hidden").await?["eventData"]["name"], "joiner");
        jc.request(json!({"type": "set_visible", "visible": true})).await?;
        assert_eq!(w.expect_event("peer_visible").await?["eventData"]["name"], "joiner");

        jc.close().await;
        let left = w.expect_event("peer_left").await?;
        assert_eq!(left["eventData"]["name"], "joiner");

        // A member's own sessions are not told about each other (HEAD's fix for spam).
        let mut w2 = Client::connect(&broker.ws_url(), &w.member.clone(), HelloOpts::default()).await?;
        w.sync().await?;
        assert!(w.ws.drain_backlog(|v| v["event"] == "peer_joined" || v["event"] == "peer_returned").is_empty());
        w2.sync().await?;

        // A hidden peer's coming and going is not announced (§10.1.7).
        let h = broker.enroll(&mesh, "hidden").await?;
        let mut hc = broker.connect(&h).await?;
        w.expect_event("peer_joined").await?;
        hc.request(json!({"type": "set_visible", "visible": false})).await?;
        w.expect_event("peer_hidden").await?;
        hc.close().await;
        // No peer_left for a hidden peer: wait for its saved state instead.
        let (db, mesh_id, member_id) = (broker.db.clone(), mesh.mesh_id.clone(), h.member_id.clone());
        meshd_tests::eventually("hidden state saved", || {
            let (db, mesh_id, member_id) = (db.clone(), mesh_id.clone(), member_id.clone());
            async move { db.peer_state(&mesh_id, &member_id).await.ok()?.filter(|s| !s.visible) }
        })
        .await?;
        let mut hc = broker.connect(&h).await?; // restored hidden from its saved state
        hc.sync().await?;
        w.sync().await?;
        assert!(w.ws.drain_backlog(|v| v["subtype"] == "system").is_empty(), "hidden peer announced");
        Ok(())
    }
}

both! {
    /// Welcome back: the saved summary, groups, visibility, profile and cumulative stats
    /// come back on the next hello, and `peer_returned` replaces `peer_joined`.
    async fn welcome_back(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("wb").await?;
        let (w, r) = (broker.enroll(&mesh, "watcher").await?, broker.enroll(&mesh, "returner").await?);
        let mut w = broker.connect(&w).await?;

        let mut rc = broker.connect(&r).await?;
        assert!(rc.hello_ack.get("restored").is_none(), "first session: nothing to restore");
        rc.send(json!({"type": "set_summary", "summary": "halfway through the migration"})).await?;
        rc.send(json!({"type": "join_group", "name": "db", "role": "owner"})).await?;
        rc.request(json!({"type": "set_profile", "title": "DBA"})).await?;
        rc.send(json!({"type": "set_stats", "stats": {"messagesIn": 10, "messagesOut": 4, "toolCalls": 2, "errors": 1}})).await?;
        rc.sync().await?;
        rc.close().await;
        w.expect_event("peer_left").await?;

        let mut rc = broker.connect(&r).await?;
        let ack = rc.hello_ack.clone();
        assert_eq!(ack["restored"], true);
        assert_eq!(ack["lastSummary"], "halfway through the migration");
        assert!(ack["lastSeenAt"].as_str().unwrap().ends_with('Z'));
        assert_eq!(ack["restoredGroups"], json!([{"name": "db", "role": "owner"}]));
        assert_eq!(ack["restoredStats"], json!({"messagesIn": 10, "messagesOut": 4, "toolCalls": 2, "errors": 1}));
        let ev = w.expect_event("peer_returned").await?;
        assert_eq!(ev["eventData"]["summary"], "halfway through the migration");
        assert!(ev["eventData"]["lastSeenAt"].is_string());
        let peers = w.sync().await?;
        let p = find(&peers, &rc.key()).unwrap();
        assert_eq!(p["groups"], json!([{"name": "db", "role": "owner"}]));
        assert_eq!(p["profile"], json!({"title": "DBA"}));

        // The CLI seeds its counters from restoredStats and reports running totals:
        // they must not be added twice (the reference's bug).
        rc.send(json!({"type": "set_stats", "stats": {"messagesIn": 15, "messagesOut": 4, "toolCalls": 2, "errors": 1}})).await?;
        rc.sync().await?;
        rc.close().await;
        w.expect_event("peer_left").await?;
        let rc = broker.connect(&r).await?;
        assert_eq!(rc.hello_ack["restoredStats"]["messagesIn"], 15);
        Ok(())
    }
}

#[tokio::test]
async fn reattach_same_session_key_is_silent() -> anyhow::Result<()> {
    // A client reconnecting before the broker noticed its old socket die takes over the
    // presence (HEAD's reattach): no ghost duplicate, no join/leave noise.
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("reattach").await?;
    let (w, r) = (
        broker.enroll(&mesh, "w").await?,
        broker.enroll(&mesh, "r").await?,
    );
    let mut w = broker.connect(&w).await?;
    let session = Keypair::generate();
    let opts = HelloOpts {
        session: Some(session.clone()),
        ..HelloOpts::default()
    };
    let mut old = Client::connect(&broker.ws_url(), &r, opts.clone()).await?;
    w.expect_event("peer_joined").await?;
    let new = Client::connect(&broker.ws_url(), &r, opts).await?;
    assert_eq!(new.hello_ack["presenceId"], old.hello_ack["presenceId"]);
    assert_eq!(
        old.ws.expect_close().await,
        Some((1000, "session_replaced".into()))
    );
    let peers = w.sync().await?;
    assert_eq!(peers["peers"].as_array().unwrap().len(), 2);
    assert!(w.ws.drain_backlog(|v| v["subtype"] == "system").is_empty());
    Ok(())
}

both! {
    /// A `session_hello` always announces `peer_joined`, even for a member with saved
    /// state (CLI 1.37 maps only peer_joined/peer_left; a `peer_returned` would reach
    /// Claude as a raw `[system]` line). A plain hello with saved state still returns.
    async fn session_hello_announces_peer_joined(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("sh-joined").await?;
        let (w, r) = (broker.enroll(&mesh, "watcher").await?, broker.enroll(&mesh, "newcli").await?);
        let mut w = broker.connect(&w).await?;
        // A first session leaves saved state behind.
        let mut first = broker.connect(&r).await?;
        w.expect_event("peer_joined").await?;
        first.send(json!({"type": "set_summary", "summary": "earlier work"})).await?;
        first.sync().await?;
        first.close().await;
        w.expect_event("peer_left").await?;

        let s = Client::connect_session(&broker.ws_url(), &r).await?;
        let ev = w.expect_event("peer_joined").await?;
        assert_eq!(ev["eventData"]["pubkey"], s.key());
        w.sync().await?;
        assert!(
            w.ws.drain_backlog(|v| v["event"] == "peer_returned").is_empty(),
            "a session_hello announced peer_returned"
        );
        assert!(s.hello_ack.get("restored").is_none(), "{}", s.hello_ack);
        s.close().await;
        w.expect_event("peer_left").await?;
        // A plain hello with saved state is still welcomed back.
        let _again = broker.connect(&r).await?;
        w.expect_event("peer_returned").await?;
        Ok(())
    }
}
