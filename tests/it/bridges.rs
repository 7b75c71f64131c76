//! Bridges between meshes of one broker (meshd extension): tagged messages relayed with
//! their path and no marker in the body, loop-free graphs, bridged peers listed and
//! reachable by end-to-end encrypted DMs.

use meshd::admin::{self, BridgeDirection};
use meshd_tests::{Backend, Client, TestBroker};
use serde_json::{Value, json};

fn strings(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| (*s).to_owned()).collect()
}

/// `meshd_bridges_active` of a broker.
async fn bridges_active(b: &TestBroker) -> anyhow::Result<i64> {
    let text = b.metrics().await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("meshd_bridges_active "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1))
}

/// Waits until the running broker has `n` bridges in force.
async fn in_force(b: &TestBroker, n: i64) -> anyhow::Result<()> {
    meshd_tests::eventually("the bridges in force", || async {
        (bridges_active(b).await.ok()? == n).then_some(())
    })
    .await
}

/// Nothing more than what was expected arrived.
async fn quiet(clients: &mut [&mut Client]) -> anyhow::Result<()> {
    for c in clients {
        c.expect_no_messages().await?;
    }
    Ok(())
}

both! {
    /// A bridge from sales to support relays what carries its tags — broadcasts, group and
    /// tagged messages alike — into support, body untouched, with where it comes from; it
    /// relays nothing else, nothing the other way, and stops when deleted.
    async fn a_bridge_relays_tagged_messages(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let sales = broker.create_mesh("sales").await?;
        let support = broker.create_mesh("support").await?;
        let bridge = admin::create_bridge(&broker.db, &sales.slug, &support.slug, BridgeDirection::AToB, &strings(&["escalation/"]), false).await?;
        in_force(&broker, 1).await?;
        let seller = broker.enroll(&sales, "seller").await?;
        let agent = broker.enroll(&support, "agent").await?;
        let oncall = broker.enroll(&support, "oncall").await?;
        let mut seller = broker.connect(&seller).await?;
        let mut agent = broker.connect(&agent).await?;
        let mut oncall = broker.connect(&oncall).await?;
        oncall.subscribe_tags(&["escalation/p1"]).await?;

        seller.send_tagged("*", "customer is furious", &["escalation/p1"]).await?;
        for c in [&mut agent, &mut oncall] {
            let (push, text) = c.expect_message().await?;
            assert_eq!(text, "customer is furious", "the body is relayed as sent");
            assert_eq!(push["senderPubkey"], seller.key());
            assert_eq!(push["meshId"], support.mesh_id.as_str());
            assert_eq!(push["tags"], json!(["escalation/p1"]));
            assert_eq!(push["bridged"]["meshId"], sales.mesh_id.as_str());
            assert_eq!(push["bridged"]["meshName"], "sales");
            assert_eq!(push["bridged"]["path"], json!([{"meshId": sales.mesh_id}]));
        }
        seller.send_tagged("tag:escalation/p1", "only the on-call", &[]).await?;
        assert_eq!(oncall.expect_message().await?.1, "only the on-call");
        // Not relayed: no tag, a tag the bridge does not carry, and anything from support.
        seller.multicast("*", "untagged").await?;
        seller.send_tagged("*", "other tag", &["billing"]).await?;
        agent.send_tagged("*", "from support", &["escalation/p1"]).await?;
        assert_eq!(oncall.expect_message().await?.1, "from support");
        quiet(&mut [&mut seller, &mut agent, &mut oncall]).await?;

        assert!(admin::delete_bridge(&broker.db, &bridge.id).await?);
        in_force(&broker, 0).await?;
        seller.send_tagged("*", "after the bridge", &["escalation/p1"]).await?;
        quiet(&mut [&mut seller, &mut agent, &mut oncall]).await?;
        Ok(())
    }
}

/// A triangle of bridges (A→B, B→C, C→A) on one broker: a message from A reaches B and
/// C once each, with its path, and is not relayed back into A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_triangle_of_bridges_stops_where_it_started() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mut meshes = Vec::new();
    for n in ["north", "east", "west"] {
        meshes.push(broker.create_mesh(n).await?);
    }
    for (a, b) in [(0, 1), (1, 2), (2, 0)] {
        admin::create_bridge(
            &broker.db,
            &meshes[a].slug,
            &meshes[b].slug,
            BridgeDirection::AToB,
            &strings(&["news"]),
            false,
        )
        .await?;
    }
    in_force(&broker, 3).await?;
    let mut c = Vec::new();
    for m in &meshes {
        for k in 0..2 {
            let member = broker.enroll(m, &format!("{}-{k}", m.slug)).await?;
            c.push(broker.connect(&member).await?);
        }
    }
    let relayed_before = relayed(&broker).await?;
    c[0].send_tagged("*", "round the world", &["news"]).await?;
    // north-1 (same mesh), east-*, west-* each get it once.
    let mut paths = Vec::new();
    for cl in &mut c[1..6] {
        let (push, text) = cl.expect_message().await?;
        assert_eq!(text, "round the world");
        paths.push(push["bridged"]["path"].clone());
    }
    assert_eq!(paths[0], Value::Null, "north-1 is in the origin mesh");
    let (n, e) = (&meshes[0].mesh_id, &meshes[1].mesh_id);
    assert_eq!(paths[1], json!([{"meshId": n}]));
    assert_eq!(paths[3], json!([{"meshId": n}, {"meshId": e}]));
    let mut all: Vec<&mut Client> = c.iter_mut().collect();
    quiet(&mut all).await?;
    assert_eq!(
        relayed(&broker).await? - relayed_before,
        2,
        "relayed into east and west, not back"
    );
    Ok(())
}

async fn relayed(b: &TestBroker) -> anyhow::Result<u64> {
    let text = b.metrics().await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("meshd_bridge_relayed_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

both! {
    /// With `--peers`, each mesh lists the other's peers (with `bridged`), and a DM to one
    /// reaches it end to end: sealed to its key, opened with the sender's key from the
    /// push, answered the same way; to a member who is offline it is stored and delivered
    /// once when it comes back, also after a restart.
    async fn bridged_peers_are_listed_and_reachable(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let shop = broker.create_mesh("shop").await?;
        let vendor = broker.create_mesh("vendor").await?;
        admin::create_bridge(&broker.db, &shop.slug, &vendor.slug, BridgeDirection::Both, &strings(&["orders"]), true).await?;
        in_force(&broker, 1).await?;
        let buyer_m = broker.enroll(&shop, "buyer").await?;
        let seller_m = broker.enroll(&vendor, "seller").await?;
        let mut buyer = broker.connect(&buyer_m).await?;
        let mut seller = broker.connect(&seller_m).await?;
        let sk = seller.key();
        let listed = buyer
            .until_peers("the seller, bridged", |v| {
                v["peers"].as_array().is_some_and(|ps| ps.iter().any(|p| p["pubkey"] == sk.as_str()))
            })
            .await?;
        let entry = listed["peers"].as_array().unwrap().iter().find(|p| p["pubkey"] == sk.as_str()).unwrap();
        assert_eq!(entry["bridged"]["meshId"], vendor.mesh_id.as_str());
        assert_eq!(entry["bridged"]["meshName"], "vendor");
        assert_eq!(entry["displayName"], "seller");

        let ack = buyer.dm(&sk, "two crates, please", "now").await?;
        assert_eq!(ack["queued"], true, "{ack}");
        let (push, text) = seller.expect_message().await?;
        assert_eq!(text, "two crates, please");
        assert!(seller.open_push(&push).is_some(), "sealed end to end, not base64");
        assert_eq!(push["senderPubkey"], buyer.key());
        assert_eq!(push["meshId"], vendor.mesh_id.as_str(), "delivered in the recipient's mesh");
        assert_eq!(push["bridged"]["meshId"], shop.mesh_id.as_str());
        let st = buyer.until_status(&ack["messageId"], |s| s["delivered"] == true).await?;
        assert_eq!(st["recipients"][0]["status"], "delivered");
        // The reply goes back the same way.
        let reply_to = push["senderPubkey"].as_str().unwrap().to_owned();
        seller.dm(&reply_to, "shipping today", "now").await?;
        let (push, text) = buyer.expect_message().await?;
        assert_eq!(text, "shipping today");
        assert_eq!(push["bridged"]["meshId"], vendor.mesh_id.as_str());

        // Offline: stored in the vendor mesh, delivered once, after a restart too.
        seller.close().await;
        let gone = sk.clone();
        buyer
            .until_peers("the seller gone", |v| {
                v["peers"].as_array().is_some_and(|ps| ps.iter().all(|p| p["pubkey"] != gone.as_str()))
            })
            .await?;
        let member_key = seller_m.keys.public_hex();
        let ack = buyer.dm(&member_key, "are you there?", "now").await?;
        assert_eq!(ack["queued"], true, "{ack}");
        let broker = broker.restart().await?;
        in_force(&broker, 1).await?;
        // Sealed to the member key: the member's own key opens it.
        let opts = meshd_tests::HelloOpts { session: None, ..meshd_tests::HelloOpts::default() };
        let mut seller = Client::connect(&broker.ws_url(), &seller_m, opts).await?;
        assert_eq!(seller.expect_message().await?.1, "are you there?");
        seller.sync().await?;
        assert!(seller.pending_messages().is_empty(), "exactly once");
        // A stranger's key is still refused.
        let mut buyer = broker.connect(&buyer_m).await?;
        let stranger = meshd_tests::Keypair::generate().public_hex();
        let ack = buyer.dm(&stranger, "hello?", "now").await?;
        assert!(ack["error"].as_str().is_some_and(|e| e.contains("no member")), "{ack}");
        Ok(())
    }
}

/// Bad bridges are refused with a message; `meshd bridge` lists and deletes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bridges_are_refused() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let a = broker.create_mesh("one").await?;
    let b = broker.create_mesh("two").await?;
    for (x, y, tags, needle) in [
        (&a.slug, &a.slug, strings(&["t"]), "two different meshes"),
        (&a.slug, &"nope".to_owned(), strings(&["t"]), "nope"),
        (&a.slug, &b.slug, vec![], "--tags"),
        (
            &a.slug,
            &b.slug,
            strings(&["bad tag"]),
            "invalid tag prefix",
        ),
    ] {
        let e = admin::create_bridge(&broker.db, x, y, BridgeDirection::Both, &tags, false)
            .await
            .unwrap_err();
        assert!(e.to_string().contains(needle), "{e}");
    }
    assert!(admin::list_bridges(&broker.db).await?.is_empty());
    Ok(())
}

/// Bridges between meshes of federated brokers: each broker's admin keeps its side.
mod across_brokers {
    use meshd::admin::{self, BridgeDirection};
    use meshd_tests::{Backend, Client, TestBroker};
    use serde_json::json;

    use super::strings;
    use crate::federation::*;

    /// This broker's side of a bridge between its mesh `local` and `remote` at `broker`.
    async fn side(
        b: &TestBroker,
        local: &str,
        remote: &str,
        broker: &str,
        d: BridgeDirection,
        peers: bool,
    ) -> anyhow::Result<()> {
        admin::create_remote_bridge(
            &b.db,
            &b.config,
            local,
            remote,
            broker,
            d,
            &strings(&["news"]),
            peers,
        )
        .await?;
        Ok(())
    }

    /// Waits until `c` lists `key` as a peer bridged from `mesh` at `broker`.
    async fn until_bridged(
        c: &mut Client,
        key: &str,
        mesh: &str,
        broker: &str,
    ) -> anyhow::Result<()> {
        c.until_peers("a bridged peer of another broker", |v| {
            v["peers"].as_array().is_some_and(|ps| {
                ps.iter().any(|p| {
                    p["pubkey"] == key
                        && p["bridged"]["meshId"] == mesh
                        && p["bridged"]["broker"] == broker
                })
            })
        })
        .await?;
        Ok(())
    }

    /// A bridge between a mesh at A and a mesh at B flows once both admins created their
    /// side: tagged messages cross with their path, each mesh lists the other's peers,
    /// and a DM to a bridged peer reaches it end to end and is answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bridge_between_meshes_of_two_brokers() -> anyhow::Result<()> {
        let t = Trio::start(Backend::Sqlite).await?;
        let north = t.a.create_mesh("north").await?;
        let east = t.b.create_mesh("east").await?;
        let alice = t.a.enroll(&north, "alice").await?;
        let bob = t.b.enroll(&east, "bob").await?;
        let mut alice = member_client(&t.a.ws_url(), &alice, &[]).await?;
        let mut bob = member_client(&t.b.ws_url(), &bob, &[]).await?;
        // Only A consents: nothing crosses, nobody is listed.
        side(
            &t.a,
            &north.slug,
            &east.mesh_id,
            B,
            BridgeDirection::Both,
            true,
        )
        .await?;
        alice.send_tagged("*", "anyone?", &["news"]).await?;
        // B consents: it flows.
        side(
            &t.b,
            &east.slug,
            &north.mesh_id,
            A,
            BridgeDirection::Both,
            true,
        )
        .await?;
        let (ak, bk) = (alice.key(), bob.key());
        until_bridged(&mut bob, &ak, &north.mesh_id, A).await?;
        until_bridged(&mut alice, &bk, &east.mesh_id, B).await?;
        bob.sync().await?;
        assert!(
            bob.pending_messages().is_empty(),
            "nothing crossed before both consented"
        );

        alice
            .send_tagged("*", "the river is rising", &["news/weather"])
            .await?;
        let (push, text) = bob.expect_message().await?;
        assert_eq!(text, "the river is rising");
        assert_eq!(push["meshId"], east.mesh_id.as_str());
        assert_eq!(push["senderPubkey"], ak.as_str());
        assert_eq!(push["bridged"]["meshId"], north.mesh_id.as_str());
        assert_eq!(push["bridged"]["meshName"], "north");
        assert_eq!(push["bridged"]["broker"], A);
        assert_eq!(
            push["bridged"]["path"],
            json!([{"broker": A, "meshId": north.mesh_id}])
        );
        alice.send_tagged("*", "not news", &["gossip"]).await?;

        let ack = bob.dm(&ak, "sandbags at the bridge?", "now").await?;
        assert_eq!(ack["queued"], true, "{ack}");
        let (push, text) = alice.expect_message().await?;
        assert_eq!(text, "sandbags at the bridge?");
        assert!(alice.open_push(&push).is_some(), "sealed end to end");
        assert_eq!(push["meshId"], north.mesh_id.as_str());
        assert_eq!(push["bridged"]["meshId"], east.mesh_id.as_str());
        assert_eq!(push["bridged"]["broker"], B);
        let st = bob
            .until_status(&ack["messageId"], |s| {
                s["recipients"][0]["status"] == "forwarded"
            })
            .await?;
        assert_eq!(st["recipients"][0]["pubkey"], ak.as_str());
        alice.dm(&bk, "on their way", "now").await?;
        let (push, text) = bob.expect_message().await?;
        assert_eq!(text, "on their way");
        assert!(bob.open_push(&push).is_some());
        for c in [&mut alice, &mut bob] {
            c.expect_no_messages().await?;
        }
        Ok(())
    }

    /// A triangle of bridges over three brokers (north@A → east@B → west@C → north@A): a
    /// message from north reaches east and west once each and stops.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_triangle_across_three_brokers_stops() -> anyhow::Result<()> {
        let t = Trio::start(Backend::Sqlite).await?;
        let north = t.a.create_mesh("north").await?;
        let east = t.b.create_mesh("east").await?;
        let west = t.c.create_mesh("west").await?;
        side(
            &t.a,
            &north.slug,
            &east.mesh_id,
            B,
            BridgeDirection::AToB,
            false,
        )
        .await?;
        side(
            &t.b,
            &east.slug,
            &north.mesh_id,
            A,
            BridgeDirection::BToA,
            false,
        )
        .await?;
        side(
            &t.b,
            &east.slug,
            &west.mesh_id,
            C,
            BridgeDirection::AToB,
            false,
        )
        .await?;
        side(
            &t.c,
            &west.slug,
            &east.mesh_id,
            B,
            BridgeDirection::BToA,
            false,
        )
        .await?;
        side(
            &t.c,
            &west.slug,
            &north.mesh_id,
            A,
            BridgeDirection::AToB,
            false,
        )
        .await?;
        side(
            &t.a,
            &north.slug,
            &west.mesh_id,
            C,
            BridgeDirection::BToA,
            false,
        )
        .await?;
        let n1 = t.a.enroll(&north, "n1").await?;
        let n2 = t.a.enroll(&north, "n2").await?;
        let e = t.b.enroll(&east, "e").await?;
        let w = t.c.enroll(&west, "w").await?;
        let mut n1 = member_client(&t.a.ws_url(), &n1, &[]).await?;
        let mut n2 = member_client(&t.a.ws_url(), &n2, &[]).await?;
        let mut e = member_client(&t.b.ws_url(), &e, &[]).await?;
        let mut w = member_client(&t.c.ws_url(), &w, &[]).await?;
        // The bridges flow once every side heard the other's claims: probe until a
        // relay reaches the end of the chain.
        let deadline = tokio::time::Instant::now() + meshd_tests::patience();
        loop {
            n1.send_tagged("*", "probe", &["news"]).await?;
            if w.ws
                .expect_within("a probe", std::time::Duration::from_millis(300), |v| {
                    v["type"] == "push" && v.get("subtype").is_none()
                })
                .await
                .is_ok()
            {
                break;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the chain never flowed"
            );
        }
        for c in [&mut n2, &mut e, &mut w] {
            c.sync().await?;
            c.pending_messages();
        }
        n1.send_tagged("*", "round the world", &["news"]).await?;
        assert_eq!(n2.expect_message().await?.1, "round the world");
        let (pe, _) = e.expect_message().await?;
        let (pw, _) = w.expect_message().await?;
        assert_eq!(
            pe["bridged"]["path"],
            json!([{"broker": A, "meshId": north.mesh_id}])
        );
        assert_eq!(
            pw["bridged"]["path"],
            json!([{"broker": A, "meshId": north.mesh_id}, {"broker": B, "meshId": east.mesh_id}])
        );
        for c in [&mut n1, &mut n2, &mut e, &mut w] {
            c.sync().await?;
            let extra = c.pending_messages();
            assert!(
                extra.is_empty(),
                "{}: once each, and not back into north: {extra:?}",
                c.member.display_name
            );
        }
        Ok(())
    }

    /// DMs to a bridged peer of another broker sent while the link is cut wait in the
    /// outbox and arrive exactly once, in order, when it heals.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bridged_dms_exactly_once_through_a_cut() -> anyhow::Result<()> {
        let p = cut_pair().await?;
        let left = p.a.create_mesh("left").await?;
        let right = p.b.create_mesh("right").await?;
        side(
            &p.a,
            &left.slug,
            &right.mesh_id,
            B,
            BridgeDirection::Both,
            true,
        )
        .await?;
        side(
            &p.b,
            &right.slug,
            &left.mesh_id,
            A,
            BridgeDirection::Both,
            true,
        )
        .await?;
        let sender = p.a.enroll(&left, "sender").await?;
        let receiver = p.b.enroll(&right, "receiver").await?;
        let mut sender = member_client(&p.a.ws_url(), &sender, &[]).await?;
        let mut receiver_c = member_client(&p.b.ws_url(), &receiver, &[]).await?;
        let rk = receiver_c.key();
        until_bridged(&mut sender, &rk, &right.mesh_id, B).await?;
        sender.dm(&rk, "#0", "now").await?;
        receive_in_order(&mut receiver_c, 0, 1).await?;
        p.to_a.cut();
        p.to_b.cut();
        for i in 1..30 {
            let ack = sender.dm(&rk, &format!("#{i}"), "now").await?;
            assert_eq!(ack["queued"], true, "{ack}");
        }
        p.to_a.heal();
        p.to_b.heal();
        receive_in_order(&mut receiver_c, 1, 30).await?;
        Ok(())
    }
}
