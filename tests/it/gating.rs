//! Status gating (§4.5), release on idle, offline delivery, ordering and the
//! `client_ack` lease (§3.5).

use std::time::Duration;

use meshd_tests::{Backend, Client, HelloOpts, Keypair, TestBroker};
use serde_json::json;

both! {
    /// `working` and `dnd` hold `next` and `low` but not `now`; going idle releases the
    /// held messages at once, in order (the reference waited for a hook or reconnect).
    async fn gating_and_release(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("gate").await?;
        let (a, r) = (broker.enroll(&mesh, "a").await?, broker.enroll(&mesh, "r").await?);
        let mut a = broker.connect(&a).await?;
        let mut r = broker.connect(&r).await?;
        let rk = r.key();

        for status in ["working", "dnd"] {
            r.send(json!({"type": "set_status", "status": status})).await?;
            let peers = r.sync().await?;
            assert_eq!(peers["peers"].as_array().unwrap().iter().find(|p| p["pubkey"] == rk.as_str()).unwrap()["status"], status);

            let held1 = a.dm(&rk, &format!("{status}: next 1"), "next").await?;
            a.dm(&rk, &format!("{status}: low 2"), "low").await?;
            a.dm(&rk, &format!("{status}: now 3"), "now").await?;
            assert_eq!(r.expect_message().await?.1, format!("{status}: now 3"));
            r.sync().await?;
            assert!(r.pending_messages().is_empty(), "held messages leaked while {status}");
            let st = a.request(json!({"type": "message_status", "messageId": held1["messageId"]})).await?;
            assert_eq!((st["delivered"].as_bool(), st["recipients"][0]["status"].as_str()), (Some(false), Some("held")));

            r.send(json!({"type": "set_status", "status": "idle"})).await?;
            assert_eq!(r.expect_message().await?.1, format!("{status}: next 1"));
            assert_eq!(r.expect_message().await?.1, format!("{status}: low 2"));
            // The delivery is recorded once the push is written to r's socket.
            let st = a.until_status(&held1["messageId"], |st| st["delivered"] == true).await?;
            assert_eq!(st["recipients"][0]["status"], "delivered");
        }
        Ok(())
    }
}

both! {
    /// DMs to an offline member are stored and delivered, in order and decryptable, when
    /// it reconnects with the same session key; the sender may be gone by then.
    async fn offline_delivery_in_order(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("offline").await?;
        let (a, r) = (broker.enroll(&mesh, "a").await?, broker.enroll(&mesh, "r").await?);
        let session = Keypair::generate();
        let opts = HelloOpts { session: Some(session.clone()), ..HelloOpts::default() };
        let rc = Client::connect(&broker.ws_url(), &r, opts.clone()).await?;
        let rk = rc.key();
        rc.close().await;
        let mut ac = broker.connect(&a).await?;
        // Wait until the broker has seen r leave (its peers list no longer has r).
        ac.until_peers("r gone", |v| v["peers"].as_array().is_some_and(|p| p.len() == 1)).await?;
        let n = 300;
        for i in 0..n {
            let p = ["now", "next", "low"][i % 3];
            let ack = ac.dm(&rk, &format!("m{i}"), p).await?;
            assert_eq!(ack["queued"], true);
        }
        let probe = ac.dm(&rk, "probe", "now").await?;
        let st = ac.request(json!({"type": "message_status", "messageId": probe["messageId"]})).await?;
        assert_eq!(st["recipients"][0]["status"], "disconnected");
        ac.close().await;

        let mut rc = Client::connect(&broker.ws_url(), &r, opts).await?;
        for i in 0..n {
            let (push, text) = rc.expect_message().await?;
            assert_eq!(text, format!("m{i}"), "order");
            assert!(rc.open_push(&push).is_some());
        }
        assert_eq!(rc.expect_message().await?.1, "probe");
        rc.sync().await?;
        assert!(rc.pending_messages().is_empty(), "duplicates");
        // Delivered means delivered: a reconnect brings nothing again.
        rc.close().await;
        let mut rc = broker.connect(&r).await?;
        rc.sync().await?;
        assert!(rc.pending_messages().is_empty());
        Ok(())
    }
}

/// `meshd_direct_pushes_total{path}` from /metrics.
async fn pushes(broker: &TestBroker, path: &str) -> anyhow::Result<u64> {
    let text = broker.metrics().await?;
    let needle = format!("meshd_direct_pushes_total{{path=\"{path}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no {needle} in metrics"))
}

both! {
    /// A sender streams while the recipient connects: the backlog drain and the live
    /// pushes interleave without reordering or duplicating, and once the recipient has
    /// caught up (under continuous load, with no quiet moment) it is back on the hot path.
    async fn hot_path_and_backlog_keep_order(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("order").await?;
        let (a, r) = (broker.enroll(&mesh, "a").await?, broker.enroll(&mesh, "r").await?);
        let session = Keypair::generate();
        let opts = HelloOpts { session: Some(session.clone()), ..HelloOpts::default() };
        // Bind the session key first so DMs to it are accepted while it is offline.
        Client::connect(&broker.ws_url(), &r, opts.clone()).await?.close().await;
        let rk = session.public_hex();
        let mut ac = broker.connect(&a).await?;
        let (backlog, total) = (300, 900);
        for i in 0..backlog {
            ac.dm(&rk, &format!("{i}"), "next").await?;
        }
        let sender = tokio::spawn(async move {
            // Pipelined: many sends in flight, like a busy agent.
            for i in backlog..total {
                let (nonce, c) = meshd_tests::crypto::seal(&format!("{i}"), &rk, ac.dm_keys());
                ac.send(serde_json::json!({"type": "send", "id": format!("s{i}"), "targetSpec": rk,
                    "priority": "next", "nonce": nonce, "ciphertext": c})).await?;
            }
            for i in backlog..total {
                ac.ws.expect("ack", |v| v["type"] == "ack" && v["id"] == format!("s{i}")).await?;
            }
            anyhow::Ok(ac)
        });
        let mut rc = Client::connect(&broker.ws_url(), &r, opts).await?;
        for i in 0..total {
            let (_, text) = rc.expect_message().await?;
            assert_eq!(text, i.to_string());
        }
        let mut ac = sender.await??;
        rc.sync().await?;
        assert!(rc.pending_messages().is_empty(), "duplicates");

        // Caught up: the next messages take the hot path.
        let hot_before = pushes(&broker, "hot").await?;
        for i in 0..50 {
            ac.dm(&rc.key(), &format!("after {i}"), "next").await?;
            assert_eq!(rc.expect_message().await?.1, format!("after {i}"));
        }
        let hot = pushes(&broker, "hot").await? - hot_before;
        assert!(hot >= 45, "only {hot} of 50 messages took the hot path after catching up");
        Ok(())
    }
}

both! {
    /// Clients that acknowledge (client_message_id / client_ack) get leased delivery: an
    /// unacknowledged push comes again after the lease with the same messageId; an
    /// acknowledged one does not. Legacy clients are never re-pushed (§3.5).
    async fn client_ack_lease(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start_with(b, |c| c.limits.ack_lease = Duration::from_millis(400)).await?;
        let mesh = broker.create_mesh("lease").await?;
        let (a, r) = (broker.enroll(&mesh, "a").await?, broker.enroll(&mesh, "r").await?);
        let mut a = broker.connect(&a).await?;
        let mut r = broker.connect(&r).await?;
        let rk = r.key();
        // r declares itself an acknowledging client.
        r.send(json!({"type": "client_ack", "brokerMessageId": "none-yet"})).await?;
        r.sync().await?;

        a.dm(&rk, "unacked", "now").await?;
        let (first, _) = r.expect_message().await?;
        let (again, text) = r.expect_message().await?;
        assert_eq!(text, "unacked");
        assert_eq!(again["messageId"], first["messageId"], "redelivered with the same id");
        r.send(json!({"type": "client_ack", "brokerMessageId": again["messageId"]})).await?;

        let ack = a.dm(&rk, "acked", "now").await?;
        let want = ack["messageId"].clone();
        let p = r.ws.expect("the acked push", |v| v["type"] == "push" && v["messageId"] == want).await?;
        assert_eq!(r.read_push(&p).as_deref(), Some("acked"));
        r.send(json!({"type": "client_ack", "brokerMessageId": p["messageId"]})).await?;
        // Wait past two lease periods by watching message_status: delivered, no re-push.
        a.until_status(&ack["messageId"], |st| st["delivered"] == true).await?;
        a.until_status(&first["messageId"], |st| st["delivered"] == true).await?;
        // A legacy client (no client_ack) sees each message once.
        let l = broker.enroll(&mesh, "legacy").await?;
        let mut l = broker.connect(&l).await?;
        let lk = l.key();
        let ack = a.dm(&lk, "once", "now").await?;
        l.expect_message().await?;
        a.until_status(&ack["messageId"], |st| st["delivered"] == true).await?;
        l.sync().await?;
        assert!(l.pending_messages().is_empty());
        Ok(())
    }
}

#[tokio::test]
async fn working_decays_to_idle_and_releases() -> anyhow::Result<()> {
    // As in the reference, `working` that is not re-confirmed decays (here after 300 ms):
    // an agent that forgot to reset it does not lose its `next` messages forever.
    let broker = TestBroker::start_with(Backend::Sqlite, |c| {
        c.limits.status_ttl = Duration::from_millis(300)
    })
    .await?;
    let mesh = broker.create_mesh("decay").await?;
    let (a, r) = (
        broker.enroll(&mesh, "a").await?,
        broker.enroll(&mesh, "r").await?,
    );
    let mut a = broker.connect(&a).await?;
    let mut r = broker.connect(&r).await?;
    let rk = r.key();
    r.send(json!({"type": "set_status", "status": "working"}))
        .await?;
    r.sync().await?;
    a.dm(&rk, "after the decay", "next").await?;
    assert_eq!(r.expect_message().await?.1, "after the decay");
    let peers = a.sync().await?;
    let me = peers["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pubkey"] == rk.as_str())
        .unwrap();
    assert_eq!(me["status"], "idle");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_stalled_connection_hands_over_its_messages() -> anyhow::Result<()> {
    // A client stops reading (its socket fills up, the broker's write stalls), then the
    // same process reconnects with the same session key. The stalled session must give
    // up its write, give back every message it had not written, and the new connection
    // must get them: nothing acknowledged is lost.
    let broker = TestBroker::start_with(Backend::Sqlite, |c| c.limits.outbound_queue = 8).await?;
    let mesh = broker.create_mesh("stall").await?;
    let (a, r) = (
        broker.enroll(&mesh, "a").await?,
        broker.enroll(&mesh, "r").await?,
    );
    let session = Keypair::generate();
    let opts = HelloOpts {
        session: Some(session.clone()),
        ..HelloOpts::default()
    };
    let mut old = Client::connect(&broker.ws_url(), &r, opts.clone()).await?;
    old.sync().await?;
    let mut a = broker.connect(&a).await?;
    let rk = session.public_hex();
    let pad = "x".repeat(40_000);
    let n = 400usize; // ~16 MB: more than loopback socket buffers hold
    for i in 0..n {
        let ack = a.dm(&rk, &format!("{i}:{pad}"), "now").await?;
        assert_eq!(ack["queued"], true);
    }
    let mut new = Client::connect(&broker.ws_url(), &r, opts).await?;

    let index = |c: &Client, push: &serde_json::Value| -> Option<usize> {
        c.read_push(push)?.split(':').next()?.parse().ok()
    };
    // What reached the old socket before the broker gave up on it.
    let mut seen = vec![0u32; n];
    let mut last = None;
    while let Some(v) = old.ws.read(meshd_tests::patience()).await {
        if v["type"] == "push" && v.get("subtype").is_none() {
            let i = index(&old, &v).expect("decodes");
            assert!(last < Some(i), "old connection out of order at {i}");
            last = Some(i);
            seen[i] += 1;
        }
    }
    let old_count = seen.iter().filter(|c| **c > 0).count();
    assert!(
        old_count < n,
        "the old socket never stalled; the test did not test anything"
    );
    // The rest arrives on the new connection, in order.
    let mut last = None;
    while seen.contains(&0) {
        let (push, _) = new.expect_message().await?;
        let i = index(&new, &push).expect("decodes");
        assert!(last < Some(i), "new connection out of order at {i}");
        last = Some(i);
        seen[i] += 1;
    }
    new.sync().await?;
    for p in new.pending_messages() {
        seen[index(&new, &p).expect("decodes")] += 1;
    }
    // A frame the old socket was in the middle of writing may arrive twice (once in part,
    // once whole); nothing may be missing.
    let dups = seen.iter().filter(|c| **c > 1).count();
    assert!(dups <= 64, "{dups} duplicates");
    Ok(())
}
