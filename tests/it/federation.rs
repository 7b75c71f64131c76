//! Federation: brokers of three organizations (own CAs) on 127.0.0.1, found through a
//! DNS server the test runs, linked over real QUIC with mutual TLS.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, bail};
use meshd::admin::{self, MeshCreated};
use meshd_config::FederationPeer;
use meshd_protocol::fed::{self as wire, Frame, RejectReason, StreamClass};
use meshd_protocol::invite::Role;
use meshd_tests::dns::TestDns;
use meshd_tests::faultproxy::FaultProxy;
use meshd_tests::fed::{self, Org};
use meshd_tests::{Backend, Client, HelloOpts, Keypair, Member, TestBroker, eventually};
use serde_json::{Value, json};

const A: &str = "mesh.alpha.test";
const B: &str = "mesh.beta.test";
const C: &str = "mesh.gamma.test";

/// Starts an in-process broker of `org` named `name`.
async fn start(
    org: &Org,
    name: &str,
    dns: Option<SocketAddr>,
    peers: Vec<FederationPeer>,
) -> anyhow::Result<TestBroker> {
    start_on(Backend::Sqlite, org, name, dns, peers).await
}

/// [`start`] on a given store: some scenarios put one broker on PostgreSQL, so the
/// federation tables are exercised on both backends (and mixed backends interoperate).
async fn start_on(
    backend: Backend,
    org: &Org,
    name: &str,
    dns: Option<SocketAddr>,
    peers: Vec<FederationPeer>,
) -> anyhow::Result<TestBroker> {
    start_tweaked(backend, org, name, dns, peers, |_| {}).await
}

async fn start_tweaked(
    backend: Backend,
    org: &Org,
    name: &str,
    dns: Option<SocketAddr>,
    peers: Vec<FederationPeer>,
    tweak: impl FnOnce(&mut meshd_config::Config),
) -> anyhow::Result<TestBroker> {
    let f = org.federation(name, dns, peers)?;
    TestBroker::start_with(backend, |c| {
        c.federation = Some(f);
        tweak(c);
    })
    .await
}

/// Publishes `_meshd._udp.NAME` → 127.0.0.1:port.
fn publish(dns: &TestDns, name: &str, quic: SocketAddr) {
    let host = format!("host.{name}");
    dns.set_srv(
        &format!("_meshd._udp.{name}"),
        &[(10, 10, quic.port(), host.as_str())],
    );
    dns.set_a(&host, Ipv4Addr::LOCALHOST);
}

/// Waits for the replica of `mesh_id` on a broker and returns it as a `MeshCreated`.
async fn replica(db: &meshd::store::Db, mesh_id: &str) -> anyhow::Result<MeshCreated> {
    let row = eventually(&format!("replica of {mesh_id}"), || async {
        db.mesh_by_id(mesh_id).await.ok().flatten()
    })
    .await?;
    Ok(MeshCreated {
        mesh_id: row.id,
        slug: row.slug,
        name: row.name,
        owner_pubkey: row.owner_pubkey,
    })
}

/// A member's client without a session key: addressed (and sealed for) by its member
/// key, which stays routable across brokers even while its presence is unknown.
async fn member_client(url: &str, m: &Member, groups: &[&str]) -> anyhow::Result<Client> {
    let opts = HelloOpts {
        session: None,
        groups: groups.iter().map(|g| ((*g).to_owned(), None)).collect(),
        ..HelloOpts::default()
    };
    Client::connect(url, m, opts).await
}

fn broker_of<'a>(peers: &'a Value, key: &str) -> Option<&'a Value> {
    peers["peers"]
        .as_array()?
        .iter()
        .find(|p| p["pubkey"] == key)
        .map(|p| &p["broker"])
}

/// Three organizations, three brokers (A on PostgreSQL, B and C on SQLite), everything
/// found through DNS SRV; a mesh homed at A shared with B and C; members enrolled at each broker exchange DMs (opened by the
/// recipient), broadcasts and group messages, and see each other's presence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_organizations_share_a_mesh() -> anyhow::Result<()> {
    let dns = TestDns::start().await?;
    let (oa, ob, oc) = (
        Org::new("alpha.test")?,
        Org::new("beta.test")?,
        Org::new("gamma.test")?,
    );
    let ns = Some(dns.addr());
    let a = start_on(
        Backend::Postgres,
        &oa,
        A,
        ns,
        vec![ob.peer(B, None), oc.peer(C, None)],
    )
    .await?;
    let b = start(&ob, B, ns, vec![oa.peer(A, None), oc.peer(C, None)]).await?;
    let c = start(&oc, C, ns, vec![oa.peer(A, None), ob.peer(B, None)]).await?;
    for (name, br) in [(A, &a), (B, &b), (C, &c)] {
        publish(&dns, name, br.quic.context("quic addr")?);
    }
    for (br, peers) in [(&a, [B, C]), (&b, [A, C]), (&c, [A, B])] {
        for p in peers {
            fed::wait_link(br.addr, p, "up", |l| l["state"] == "up").await?;
        }
    }
    assert!(
        dns.queries(&format!("_meshd._udp.{C}")) > 0,
        "C was found through its SRV record"
    );

    let mesh = a.create_mesh("Joint Ops").await?;
    admin::share_mesh(&a.db, &a.config, &mesh.slug, B).await?;
    admin::share_mesh(&a.db, &a.config, &mesh.slug, C).await?;
    admin::accept_mesh(&b.db, &b.config, &mesh.mesh_id, A).await?;
    admin::accept_mesh(&c.db, &c.config, &mesh.mesh_id, A).await?;
    let mesh_b = replica(&b.db, &mesh.mesh_id).await?;
    let mesh_c = replica(&c.db, &mesh.mesh_id).await?;
    for (br, peers) in [(&a, [B, C]), (&b, [A, C]), (&c, [A, B])] {
        for p in peers {
            fed::wait_flowing(br.addr, p, &mesh.mesh_id).await?;
        }
    }

    // Each broker enrolls its own people with its own invites (pinning its own URL).
    let inv = b.invite(&mesh_b.slug, Role::Member, 1).await?;
    assert_eq!(inv.broker_url, b.ws_url());
    let alice = a.enroll(&mesh, "alice").await?;
    let bob = b.enroll(&mesh_b, "bob").await?;
    let carol = c.enroll(&mesh_c, "carol").await?;
    let mut alice_c = member_client(&a.ws_url(), &alice, &["ops"]).await?;
    let mut bob_c = member_client(&b.ws_url(), &bob, &["ops"]).await?;
    let mut carol_c = member_client(&c.ws_url(), &carol, &["design"]).await?;
    let keys = [alice_c.key(), bob_c.key(), carol_c.key()];

    // Presence: every broker lists all three; remote entries name their broker.
    for (client, home) in [(&mut alice_c, A), (&mut bob_c, B), (&mut carol_c, C)] {
        let peers = client
            .until_peers("all three peers", |v| {
                keys.iter().all(|k| broker_of(v, k).is_some())
            })
            .await?;
        for (k, at) in keys.iter().zip([A, B, C]) {
            let expected = if at == home { Value::Null } else { json!(at) };
            assert_eq!(broker_of(&peers, k), Some(&expected), "{home} lists {k}");
        }
    }
    // A remote arrival was announced like a local one.
    alice_c.expect_event("peer_joined").await?;

    // DMs across brokers, E2E sealed: each recipient opens what its sender sealed.
    alice_c.dm(&keys[1], "alice to bob", "now").await?;
    bob_c.dm(&keys[2], "bob to carol", "now").await?;
    carol_c.dm(&keys[0], "carol to alice", "now").await?;
    let (push, text) = bob_c.expect_message().await?;
    assert_eq!(text, "alice to bob");
    assert_eq!(push["senderPubkey"], keys[0]);
    assert!(
        bob_c.open_push(&push).is_some(),
        "the ciphertext crossed untouched"
    );
    assert_eq!(carol_c.expect_message().await?.1, "bob to carol");
    assert_eq!(alice_c.expect_message().await?.1, "carol to alice");

    // Broadcast from C reaches A and B once; @ops from A reaches B only.
    carol_c.multicast("*", "hello everyone").await?;
    assert_eq!(alice_c.expect_message().await?.1, "hello everyone");
    assert_eq!(bob_c.expect_message().await?.1, "hello everyone");
    alice_c.multicast("@ops", "ops only").await?;
    assert_eq!(bob_c.expect_message().await?.1, "ops only");
    for cl in [&mut alice_c, &mut bob_c, &mut carol_c] {
        cl.sync().await?;
        let extra = cl.pending_messages();
        assert!(
            extra.is_empty(),
            "{}: unexpected {extra:?}",
            cl.member.display_name
        );
    }

    // Shared state set on B reaches A's and C's peers.
    bob_c
        .send(json!({"type": "set_state", "key": "phase", "value": "launch"}))
        .await?;
    let change = carol_c
        .ws
        .expect("state_change", |v| v["type"] == "state_change")
        .await?;
    assert_eq!(
        (change["key"].as_str(), change["value"].as_str()),
        (Some("phase"), Some("launch"))
    );

    // A status change at B is seen at C; a departure from B fires peer_left at A.
    bob_c
        .send(json!({"type": "set_status", "status": "dnd"}))
        .await?;
    carol_c
        .until_peers("bob dnd", |v| {
            v["peers"].as_array().is_some_and(|ps| {
                ps.iter()
                    .any(|p| p["pubkey"] == keys[1] && p["status"] == "dnd")
            })
        })
        .await?;
    bob_c.close().await;
    let left = alice_c.expect_event("peer_left").await?;
    assert_eq!(left["eventData"]["pubkey"], keys[1]);
    Ok(())
}

/// A certificate from an unknown CA, and a valid certificate for another broker name,
/// are refused whichever side dials; a hello naming another broker than the
/// certificate closes the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_certificates_are_refused() -> anyhow::Result<()> {
    let (oa, ob, rogue) = (
        Org::new("alpha.test")?,
        Org::new("beta.test")?,
        Org::new("beta.test")?,
    );
    // A trusts beta.test's real CA for B.
    let a = start(&oa, A, None, vec![ob.peer(B, None)]).await?;
    let a_quic = a.quic.context("quic")?;

    // 1. An impostor with a certificate for B's name from another CA dials A.
    let impostor = start(&rogue, B, None, vec![oa.peer(A, Some(a_quic))]).await?;
    fed::wait_link(impostor.addr, A, "failing", |l| {
        l["state"] != "up" && !l["lastError"].is_null()
    })
    .await?;
    let st = eventually("A to record the refusal", || async {
        let st = fed::status(a.addr).await.ok()?;
        (!st["refusedHandshakes"].as_array()?.is_empty()).then_some(st)
    })
    .await?;
    // The refusal names the broker the stranger claimed to be.
    assert!(st["refusedHandshakes"].to_string().contains(B), "{st}");
    assert_ne!(fed::link(&st, B).context("link")?["state"], "up");

    // 2. A dials B's address and finds the impostor there: A's side refuses it.
    let a2 = start(
        &oa,
        "mesh2.alpha.test",
        None,
        vec![ob.peer(B, Some(impostor.quic.context("q")?))],
    )
    .await?;
    let l = fed::wait_link(a2.addr, B, "failing", |l| !l["lastError"].is_null()).await?;
    assert_ne!(l["state"], "up");
    assert!(
        l["lastError"]
            .to_string()
            .to_lowercase()
            .contains("certificate"),
        "{l}"
    );

    // 3. A valid certificate from B's real CA, but for a name A does not know.
    let other = start(&ob, "other.beta.test", None, vec![oa.peer(A, Some(a_quic))]).await?;
    let before = fed::status(a.addr).await?["refusedHandshakes"]
        .as_array()
        .map_or(0, Vec::len);
    fed::wait_link(other.addr, A, "failing", |l| !l["lastError"].is_null()).await?;
    let st = eventually("A to refuse the unknown name", || async {
        let st = fed::status(a.addr).await.ok()?;
        (st["refusedHandshakes"].as_array()?.len() > before).then_some(st)
    })
    .await?;
    assert!(st.to_string().contains("other.beta.test"), "{st}");
    assert_ne!(fed::link(&st, B).context("link")?["state"], "up");

    // 4. The real B's certificate, but a hello that names another broker.
    let ident_paths = ob.issue(B)?;
    let identity = meshd_certs::BrokerIdentity::load(&ident_paths.cert, &ident_paths.key, B)?;
    let trust = meshd_certs::PeerTrust::new([(
        A.to_owned(),
        meshd_certs::PeerAnchor::load_ca_file(&oa.ca_path())?,
    )])?;
    let ep =
        meshd_federation::Endpoint::bind("127.0.0.1:0".parse()?, identity, trust, link_opts())?;
    let lying = wire::Hello {
        version: wire::VERSION,
        broker: "mesh.gamma.test".into(),
        caps: vec![],
        meshes: vec![],
    };
    let err = ep
        .dial(A, a_quic, lying)
        .await
        .err()
        .context("a lying hello was accepted")?;
    assert!(
        err.to_string().contains("name_mismatch") || err.to_string().contains("closed"),
        "{err}"
    );
    // A's record of it names the broker the hello claimed.
    eventually("A to record the lying hello", || async {
        let st = fed::status(a.addr).await.ok()?;
        st["refusedHandshakes"]
            .to_string()
            .contains("mesh.gamma.test")
            .then_some(())
    })
    .await?;
    let honest = wire::Hello {
        version: wire::VERSION,
        broker: B.into(),
        caps: vec![],
        meshes: vec![],
    };
    let link = ep.dial(A, a_quic, honest).await?;
    assert_eq!(link.peer, A);
    Ok(())
}

fn link_opts() -> meshd_federation::LinkOptions {
    meshd_federation::LinkOptions {
        keepalive: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(5),
        max_frame_bytes: 4 << 20,
        handshake_timeout: Duration::from_secs(5),
    }
}

/// The test plays broker B (with B's real certificate) over a raw link to A, sharing
/// `mesh_id`; returns once the mesh flows.
async fn play_b(
    a: &TestBroker,
    oa: &Org,
    ob: &Org,
    mesh_id: &str,
) -> anyhow::Result<(meshd_federation::Endpoint, meshd_federation::Link)> {
    let paths = ob.issue(B)?;
    let identity = meshd_certs::BrokerIdentity::load(&paths.cert, &paths.key, B)?;
    let trust = meshd_certs::PeerTrust::new([(
        A.to_owned(),
        meshd_certs::PeerAnchor::load_ca_file(&oa.ca_path())?,
    )])?;
    let ep =
        meshd_federation::Endpoint::bind("127.0.0.1:0".parse()?, identity, trust, link_opts())?;
    let link = ep
        .dial(
            A,
            a.quic.context("quic")?,
            wire::Hello {
                version: wire::VERSION,
                broker: B.into(),
                caps: vec![],
                meshes: vec![wire::MeshClaim {
                    mesh_id: mesh_id.to_owned(),
                }],
            },
        )
        .await?;
    fed::wait_flowing(a.addr, B, mesh_id).await?;
    Ok((ep, link))
}

/// Live frames of a member who just joined B can overtake B's announcement of that
/// member (announcements travel on the messages stream): A holds them until the
/// announcement arrives, then applies them in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_frames_wait_for_their_members_announcement() -> anyhow::Result<()> {
    let (oa, ob) = (Org::new("alpha.test")?, Org::new("beta.test")?);
    let a = start(&oa, A, None, vec![ob.peer(B, Some("127.0.0.1:9".parse()?))]).await?;
    let mesh = a.create_mesh("joiners").await?;
    admin::share_mesh(&a.db, &a.config, &mesh.slug, B).await?;
    let alice = a.enroll(&mesh, "alice").await?;
    let mut alice_c = member_client(&a.ws_url(), &alice, &[]).await?;
    let (_ep, link) = play_b(&a, &oa, &ob, &mesh.mesh_id).await?;
    let (mut live, _) = link.conn.open(StreamClass::Live).await?;
    let (mut messages, _replies) = link.conn.open(StreamClass::Messages).await?;

    let yan = Keypair::generate().public_hex();
    let now = meshd_tests::now_ms();
    let task = |id: &str, claimed: Option<i64>| {
        Frame::Task(Box::new(wire::TaskSet {
            mesh_id: mesh.mesh_id.clone(),
            id: id.into(),
            title: format!("task {id}"),
            assignee: None,
            priority: "normal".into(),
            tags: vec![],
            created_by: Some("yan".into()),
            creator_pubkey: yan.clone(),
            creator_hosted: true,
            created_at: now,
            claimed_by: claimed.map(|_| "yan".into()),
            claimed_at: claimed,
            result: None,
            completed_at: None,
        }))
    };
    // Created, then claimed, before anyone told A who yan is.
    live.send(&task("t-yan", None)).await?;
    live.send(&task("t-yan", Some(now + 1))).await?;
    // A memory of yan's, then its forgetting (a frame of nobody in particular): the
    // forget waits behind the memory instead of overtaking it (and being lost).
    live.send(&Frame::Memory(Box::new(wire::MemorySet {
        mesh_id: mesh.mesh_id.clone(),
        id: "mem-yan-1".into(),
        content: "the staging password rotates weekly".into(),
        tags: String::new(),
        remembered_by: "yan-member-id-0001".into(),
        remembered_by_pubkey: yan.clone(),
        remembered_by_name: "yan".into(),
        remembered_at: now,
        forgotten_at: None,
    })))
    .await?;
    live.send(&Frame::Forget {
        mesh_id: mesh.mesh_id.clone(),
        id: "mem-yan-1".into(),
        at: now + 2,
    })
    .await?;
    live.send(&task("t-yan-last", None)).await?;
    // A has read all five and holds them (the first names yan; the rest wait behind it).
    fed::wait_link(a.addr, B, "five frames held", |l| l["held"] == 5).await?;
    let announced = std::time::Instant::now();
    messages
        .send(&Frame::Members {
            mesh_id: mesh.mesh_id.clone(),
            members: vec![wire::MemberAnn {
                member_id: "yan-member-id-0001".into(),
                pubkey: yan.clone(),
                display_name: "yan".into(),
                role: "member".into(),
                revoked: false,
            }],
            full: false,
        })
        .await?;
    let t = until_task(&mut alice_c, "t-yan", "yan's task never reached A", |t| {
        t["status"] == "claimed"
    })
    .await?;
    assert_eq!(
        (t["title"].as_str(), t["claimedBy"].as_str()),
        (Some("task t-yan"), Some("yan")),
        "{t}"
    );
    // Everything before the last frame was applied in order by then.
    until_task(
        &mut alice_c,
        "t-yan-last",
        "the last frame never applied",
        |t| t["status"] == "open",
    )
    .await?;
    let r = alice_c
        .request(json!({"type": "recall", "query": "staging password"}))
        .await?;
    assert_eq!(
        r["memories"],
        json!([]),
        "forgotten before it was stored? {r}"
    );
    // Released by the announcement, not by the hold's 10 s deadline (which would let
    // them through as well, yan being known by then).
    assert!(
        announced.elapsed() < Duration::from_secs(5),
        "released after {:?}",
        announced.elapsed()
    );
    let st = fed::status(a.addr).await?;
    assert_eq!(
        fed::link(&st, B).and_then(|l| l["refused"].as_u64()),
        Some(0),
        "nothing refused: {st}"
    );
    Ok(())
}

/// A peer broker may speak only for members it hosts: a DM claiming a member of A is
/// refused (and counted), while a DM from a member it announced is stored and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_sender_is_refused() -> anyhow::Result<()> {
    let (oa, ob) = (Org::new("alpha.test")?, Org::new("beta.test")?);
    // B's peer entry points nowhere useful: the test itself plays broker B.
    let a = start(&oa, A, None, vec![ob.peer(B, Some("127.0.0.1:9".parse()?))]).await?;
    let mesh = a.create_mesh("guarded").await?;
    admin::share_mesh(&a.db, &a.config, &mesh.slug, B).await?;
    let alice = a.enroll(&mesh, "alice").await?;
    let mallory_target = a.enroll(&mesh, "victim").await?;
    let mut alice_c = member_client(&a.ws_url(), &alice, &[]).await?;

    let (_ep, link) = play_b(&a, &oa, &ob, &mesh.mesh_id).await?;
    let (mut tx, rx) = link.conn.open(StreamClass::Messages).await?;
    let mut rx = rx.context("reply half")?;

    let dm = |seq: u64, sender: &Member, text: &str| {
        let (nonce, ciphertext) =
            meshd_tests::crypto::seal(text, &alice.keys.public_hex(), &sender.keys);
        Frame::Dm(Box::new(wire::Dm {
            seq,
            mesh_id: mesh.mesh_id.clone(),
            id: format!("fed-{seq}-{}", meshd_tests::now_ms()),
            sender_member_id: sender.member_id.clone(),
            sender_member_pubkey: sender.keys.public_hex(),
            sender_pubkey: sender.keys.public_hex(),
            sender_name: sender.display_name.clone(),
            target_spec: alice.keys.public_hex(),
            target_key: alice.keys.public_hex(),
            priority: 0,
            nonce,
            ciphertext,
            subtype: None,
            client_message_id: None,
            created_at: meshd_tests::now_ms(),
            expires_at: meshd_tests::now_ms() + 60_000,
        }))
    };
    // Forged: B claims to send as a member A hosts.
    tx.send(&dm(1, &mallory_target, "I am the victim")).await?;
    let reply = tokio::time::timeout(meshd_tests::patience(), rx.recv()).await??;
    assert_eq!(
        reply,
        Some(Frame::Reject {
            seq: 1,
            reason: RejectReason::ForgedSender
        })
    );
    // A refusal is final: it is acknowledged like a stored message, never retried.
    let reply = tokio::time::timeout(meshd_tests::patience(), rx.recv()).await??;
    assert_eq!(reply, Some(Frame::Ack { seq: 1 }));
    // A member B really hosts: announced first, then its DM is stored and delivered.
    let zed = Member {
        mesh_id: mesh.mesh_id.clone(),
        member_id: "zed-member-id-0001".into(),
        keys: Keypair::generate(),
        display_name: "zed".into(),
    };
    tx.send(&Frame::Members {
        mesh_id: mesh.mesh_id.clone(),
        members: vec![wire::MemberAnn {
            member_id: zed.member_id.clone(),
            pubkey: zed.keys.public_hex(),
            display_name: "zed".into(),
            role: "member".into(),
            revoked: false,
        }],
        full: true,
    })
    .await?;
    tx.send(&dm(2, &zed, "hello from beta")).await?;
    let reply = tokio::time::timeout(meshd_tests::patience(), rx.recv()).await??;
    assert_eq!(reply, Some(Frame::Ack { seq: 2 }));
    let (push, text) = alice_c.expect_message().await?;
    assert_eq!(text, "hello from beta");
    assert_eq!(push["senderMemberPubkey"], zed.keys.public_hex());
    // The forgery never reached alice, and it was counted.
    alice_c.sync().await?;
    assert!(alice_c.pending_messages().is_empty());
    let metrics = a.metrics().await?;
    assert!(
        metrics.contains("meshd_federation_refused_total{reason=\"forged_sender\"} 1"),
        "{metrics}"
    );
    // A resend of the refused seq 1 is refused again (not taken for a stored duplicate).
    tx.send(&dm(1, &mallory_target, "I am the victim")).await?;
    let reply = tokio::time::timeout(meshd_tests::patience(), rx.recv()).await??;
    assert_eq!(
        reply,
        Some(Frame::Reject {
            seq: 1,
            reason: RejectReason::ForgedSender
        })
    );
    let reply = tokio::time::timeout(meshd_tests::patience(), rx.recv()).await??;
    assert_eq!(reply, Some(Frame::Ack { seq: 1 }));
    // A resend of seq 2 (as after a reconnect) is acknowledged but not delivered again.
    tx.send(&dm(2, &zed, "hello from beta")).await?;
    let reply = tokio::time::timeout(meshd_tests::patience(), rx.recv()).await??;
    assert_eq!(reply, Some(Frame::Ack { seq: 2 }));
    alice_c.sync().await?;
    assert!(alice_c.pending_messages().is_empty(), "duplicate delivered");
    // zed's key with another member's id (the id is stored and counted against): forged.
    let mut as_alice = zed.clone();
    as_alice.member_id = alice.member_id.clone();
    tx.send(&dm(3, &as_alice, "counted against alice")).await?;
    let reply = tokio::time::timeout(meshd_tests::patience(), rx.recv()).await??;
    assert_eq!(
        reply,
        Some(Frame::Reject {
            seq: 3,
            reason: RejectReason::ForgedSender
        })
    );
    alice_c.sync().await?;
    assert!(alice_c.pending_messages().is_empty(), "forged id delivered");
    // An offer whose mesh id could never be one (ids become keys and paths) is refused
    // and counted, never kept.
    let mut link = link;
    link.control
        .tx
        .send(&Frame::MeshOffer(wire::MeshOffer {
            mesh_id: "../../etc".into(),
            name: "bad".into(),
            slug: "bad".into(),
            roster: vec![B.into(), A.into()],
        }))
        .await?;
    meshd_tests::eventually("the bad offer is counted", || async {
        let m = a.metrics().await.ok()?;
        m.contains("meshd_federation_refused_total{reason=\"invalid\"} 1")
            .then_some(())
    })
    .await?;
    Ok(())
}

/// Two brokers linked through UDP fault proxies (one per dialing direction); B runs on
/// PostgreSQL.
struct CutPair {
    a: TestBroker,
    b: TestBroker,
    to_b: FaultProxy,
    to_a: FaultProxy,
    mesh: MeshCreated,
    alice: Client,
    alice_member: Member,
    bob: Member,
    /// The CAs and certificate files (a restart reads them again).
    _orgs: (Org, Org),
}

async fn cut_pair() -> anyhow::Result<CutPair> {
    linked_pair(|_| {}, Backend::Postgres).await
}

/// [`cut_pair`] with A's configuration adjusted and B on `b_backend`.
async fn linked_pair(
    a_tweak: impl FnOnce(&mut meshd_config::Config),
    b_backend: Backend,
) -> anyhow::Result<CutPair> {
    let (oa, ob) = (Org::new("alpha.test")?, Org::new("beta.test")?);
    // Placeholder upstreams until the brokers are bound.
    let to_a = FaultProxy::start("127.0.0.1:9".parse()?).await?;
    let to_b = FaultProxy::start("127.0.0.1:9".parse()?).await?;
    let a = start_tweaked(
        Backend::Sqlite,
        &oa,
        A,
        None,
        vec![ob.peer(B, Some(to_b.addr()))],
        a_tweak,
    )
    .await?;
    let b = start_on(b_backend, &ob, B, None, vec![oa.peer(A, Some(to_a.addr()))]).await?;
    to_a.set_upstream(a.quic.context("quic")?);
    to_b.set_upstream(b.quic.context("quic")?);
    let mesh = a.create_mesh("cut").await?;
    admin::share_mesh(&a.db, &a.config, &mesh.slug, B).await?;
    admin::accept_mesh(&b.db, &b.config, &mesh.mesh_id, A).await?;
    let mesh_b = replica(&b.db, &mesh.mesh_id).await?;
    fed::wait_flowing(a.addr, B, &mesh.mesh_id).await?;
    let alice = a.enroll(&mesh, "alice").await?;
    let bob = b.enroll(&mesh_b, "bob").await?;
    let alice_member = alice;
    let alice = member_client(&a.ws_url(), &alice_member, &[]).await?;
    Ok(CutPair {
        _orgs: (oa, ob),
        a,
        b,
        alice_member,
        to_b,
        to_a,
        mesh,
        alice,
        bob,
    })
}

/// Waits until A knows bob (announced over the link), so DMs to him are accepted.
/// Exactly one probe is accepted (and later delivered).
async fn until_known(alice: &mut Client, bob: &Member) -> anyhow::Result<()> {
    let key = bob.keys.public_hex();
    let deadline = tokio::time::Instant::now() + meshd_tests::patience();
    loop {
        let ack = alice.dm(&key, "probe", "now").await?;
        if ack["error"].is_null() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("bob was never announced to A: {ack}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Receives `n` DMs and checks they are `0..n` exactly once, in order.
async fn receive_in_order(bob: &mut Client, from: usize, n: usize) -> anyhow::Result<()> {
    for i in from..n {
        let (_, text) = bob
            .expect_message()
            .await
            .with_context(|| format!("waiting for #{i}"))?;
        assert_eq!(text, format!("#{i}"), "order or duplicate");
    }
    bob.sync().await?;
    let extra = bob.pending_messages();
    assert!(extra.is_empty(), "duplicates: {extra:?}");
    Ok(())
}

/// The A–B link is cut while A keeps sending 1,000 DMs, then healed: every message
/// arrives exactly once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cut_and_healed_delivers_exactly_once() -> anyhow::Result<()> {
    let mut p = cut_pair().await?;
    let bob_key = p.bob.keys.public_hex();
    until_known(&mut p.alice, &p.bob).await?;
    let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
    assert_eq!(bob.expect_message().await?.1, "probe");
    for i in 0..300 {
        let ack = p.alice.dm(&bob_key, &format!("#{i}"), "now").await?;
        assert!(ack["error"].is_null(), "{ack}");
    }
    p.to_a.cut();
    p.to_b.cut();
    for i in 300..1000 {
        let ack = p.alice.dm(&bob_key, &format!("#{i}"), "now").await?;
        assert!(ack["error"].is_null(), "{ack}");
        if i == 400 {
            fed::wait_link(p.a.addr, B, "down", |l| l["state"] != "up").await?;
        }
    }
    // Bob's presence at A ends after the grace period, with peer_left.
    let left = p.alice.expect_event("peer_left").await?;
    assert_eq!(left["eventData"]["pubkey"], bob_key);
    let queued = fed::status(p.a.addr).await?;
    p.to_a.heal();
    p.to_b.heal();
    receive_in_order(&mut bob, 0, 1000).await?;
    // The snapshot after the reconnect brings him back.
    p.alice
        .until_peers("bob listed again", |v| broker_of(v, &bob_key).is_some())
        .await?;
    let after = fed::wait_link(p.a.addr, B, "up again", |l| l["state"] == "up").await?;
    assert!(
        after["connects"].as_u64() >= Some(2),
        "the link was re-established: {after}"
    );
    assert!(
        p.to_b.dropped() + p.to_a.dropped() > 0,
        "the proxies really cut: {queued}"
    );
    let _ = &p.mesh;
    Ok(())
}

/// Broker B runs as its own process and is killed with SIGKILL while A's outbox streams
/// to it; after B restarts, the 1,000 DMs are delivered exactly once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_killed_and_restarted_delivers_exactly_once() -> anyhow::Result<()> {
    let (oa, ob) = (Org::new("alpha.test")?, Org::new("beta.test")?);
    let to_b = FaultProxy::start("127.0.0.1:9".parse()?).await?;
    let a = start(&oa, A, None, vec![ob.peer(B, Some(to_b.addr()))]).await?;
    let a_quic = a.quic.context("quic")?;
    let paths = ob.issue(B)?;
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("meshd.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"[federation]
broker = "{B}"
listen = "127.0.0.1:0"
cert = "{cert}"
key = "{key}"
ca = "{ca}"
presence_grace = "2s"
reconnect_min = "50ms"
reconnect_max = "500ms"
keepalive = "300ms"
idle_timeout = "1500ms"

[[federation.peers]]
name = "{A}"
addr = "{a_quic}"
ca = "{a_ca}"
"#,
            cert = paths.cert.display(),
            key = paths.key.display(),
            ca = ob.ca_path().display(),
            a_ca = oa.ca_path().display(),
        ),
    )?;
    let data = dir.path().join("data");
    let cfg_arg = config_path.display().to_string();
    let args = ["--config", cfg_arg.as_str()];
    let spawn = || meshd_tests::DaemonProcess::spawn(crate::DAEMON, &data, &args, &[]);
    let mut b = spawn().await?;
    to_b.set_upstream(b.quic.context("B's quic address")?);
    let b_config = {
        let text = std::fs::read_to_string(&config_path)?;
        let ov = meshd_config::Overrides {
            data_dir: Some(data.clone()),
            ..Default::default()
        };
        meshd_config::Config::load(
            Some(("b", &text)),
            &meshd_config::Environment::default(),
            &ov,
        )?
    };
    let b_db = admin::open(&b_config).await?;

    let mesh = a.create_mesh("crash").await?;
    admin::share_mesh(&a.db, &a.config, &mesh.slug, B).await?;
    admin::accept_mesh(&b_db, &b_config, &mesh.mesh_id, A).await?;
    let mesh_b = replica(&b_db, &mesh.mesh_id).await?;
    fed::wait_flowing(a.addr, B, &mesh.mesh_id).await?;
    let alice = a.enroll(&mesh, "alice").await?;
    let mut alice_c = member_client(&a.ws_url(), &alice, &[]).await?;
    let inv = admin::create_invite(
        &b_db,
        &b_config,
        &mesh_b.slug,
        Role::Member,
        1,
        Duration::from_secs(600),
        &b.ws_url(),
    )
    .await?;
    let bob_keys = Keypair::generate();
    let payload = meshd_protocol::invite::InvitePayload::from_token(&inv.token)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (code, body) = meshd_tests::http_json(
        b.addr,
        "POST",
        "/join",
        &json!({"invite_token": inv.token, "invite_payload": payload, "peer_pubkey": bob_keys.public_hex(), "display_name": "bob"}),
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    let bob = Member {
        mesh_id: mesh.mesh_id.clone(),
        member_id: body["memberId"].as_str().context("memberId")?.to_owned(),
        keys: bob_keys,
        display_name: "bob".into(),
    };
    until_known(&mut alice_c, &bob).await?;
    // Bob reads the probe, then goes offline: what follows waits in B's store. (His
    // session at B must be gone first: B would mark what it writes to a closing socket
    // delivered, as it does for any client that does not acknowledge.)
    {
        let mut bob_c = member_client(&b.ws_url(), &bob, &[]).await?;
        assert_eq!(bob_c.expect_message().await?.1, "probe");
        let key = bob.keys.public_hex();
        alice_c
            .until_peers("bob listed", |v| broker_of(v, &key).is_some())
            .await?;
        bob_c.close().await;
        alice_c
            .until_peers("bob's session at B gone", |v| broker_of(v, &key).is_none())
            .await?;
    }

    let bob_key = bob.keys.public_hex();
    for i in 0..1000 {
        let ack = alice_c.dm(&bob_key, &format!("#{i}"), "now").await?;
        assert!(ack["error"].is_null(), "{ack}");
        if i == 500 {
            // Mid-stream: wait until B has stored some of them, then kill it.
            fed::wait_link(a.addr, B, "forwarding", |l| l["sent"].as_u64() > Some(100)).await?;
            b.kill9().await?;
        }
    }
    b = spawn().await?;
    to_b.set_upstream(b.quic.context("B's quic address")?);
    fed::wait_link(a.addr, B, "drained", |l| {
        l["state"] == "up" && l["queued"] == 0
    })
    .await?;
    let mut bob_c = member_client(&b.ws_url(), &bob, &[]).await?;
    receive_in_order(&mut bob_c, 0, 1000).await?;
    b_db.close().await;
    b.terminate().await?;
    Ok(())
}

/// Unsharing on the home broker stops the flow: the link no longer carries the mesh, a
/// DM to the peer's member is refused, and its presence disappears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsharing_stops_the_flow() -> anyhow::Result<()> {
    let mut p = cut_pair().await?;
    until_known(&mut p.alice, &p.bob).await?;
    let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
    assert_eq!(bob.expect_message().await?.1, "probe");
    let bob_key = p.bob.keys.public_hex();
    p.alice
        .until_peers("bob listed", |v| broker_of(v, &bob_key).is_some())
        .await?;
    assert!(admin::unshare_mesh(&p.a.db, &p.mesh.slug, B).await?);
    fed::wait_link(p.a.addr, B, "without the mesh", |l| {
        l["meshes"].as_array().is_some_and(Vec::is_empty)
    })
    .await?;
    let ack = p.alice.dm(&bob_key, "after unshare", "now").await?;
    assert!(
        ack["error"]
            .as_str()
            .is_some_and(|e| e.contains("not shared")),
        "{ack}"
    );
    // The other side refuses at once too, as soon as it heard of the withdrawal (it
    // does not queue for a consent that was withdrawn, however young the link).
    fed::wait_link(p.b.addr, A, "without the mesh", |l| {
        l["meshes"].as_array().is_some_and(Vec::is_empty)
    })
    .await?;
    let ack = bob
        .dm(
            &p.alice_member.keys.public_hex(),
            "to the home after unshare",
            "now",
        )
        .await?;
    assert!(
        ack["error"]
            .as_str()
            .is_some_and(|e| e.contains("not shared")),
        "{ack}"
    );
    p.alice
        .until_peers("bob gone", |v| broker_of(v, &bob_key).is_none())
        .await?;
    // Nothing from A reaches bob any more, not even a broadcast.
    p.alice.multicast("*", "anyone?").await?;
    bob.sync().await?;
    let got = bob.pending_messages();
    assert!(got.is_empty(), "{got:?}");
    let _ = (&p.to_a, &p.to_b);
    Ok(())
}

/// `meshd certs init` makes an org CA once and reuses it; `meshd certs bundle` and
/// `GET /.well-known/meshd/bundle` serve the same CA and fingerprint; a broker whose key
/// file others can read refuses to start, naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_cli_bundle_and_key_permissions() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir()?;
    let d = dir.path().to_str().context("path")?;
    let certs = format!("{d}/certs");
    let init = |broker: &'static str| {
        let certs = certs.clone();
        async move {
            let (code, out, err) = meshd_tests::run_cli(
                crate::DAEMON,
                &[
                    "--data-dir",
                    d,
                    "certs",
                    "init",
                    "--org",
                    "alpha.test",
                    "--broker",
                    broker,
                    "--dir",
                    &certs,
                    "--json",
                ],
                &[],
            )
            .await?;
            anyhow::ensure!(code == 0, "certs init: {err}");
            anyhow::Ok(serde_json::from_str::<Value>(out.trim())?)
        }
    };
    let first = init(A).await?;
    assert_eq!(first["caCreated"], true);
    let second = init("mesh2.alpha.test").await?;
    assert_eq!(second["caCreated"], false, "the org CA is reused");
    assert_eq!(first["fingerprint"], second["fingerprint"]);
    let key_mode = std::fs::metadata(first["key"].as_str().context("key")?)?
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o077, 0, "broker key is private: {key_mode:o}");

    let ca = format!("{certs}/ca.pem");
    let (code, bundle, err) = meshd_tests::run_cli(
        crate::DAEMON,
        &["--data-dir", d, "certs", "bundle", "--ca", &ca],
        &[],
    )
    .await?;
    assert_eq!(code, 0, "{err}");
    let fp = first["fingerprint"].as_str().context("fingerprint")?;
    assert!(
        bundle.contains("-----BEGIN CERTIFICATE-----") && bundle.contains(fp),
        "{bundle}"
    );
    // The fingerprint line is what a peer's configuration takes as `pin`.
    assert!(
        bundle.contains(&format!("\n# pin = \"sha256:{fp}\"\n")),
        "{bundle}"
    );
    assert_eq!(meshd_certs::parse_pin(fp)?.len(), 32);

    // A broker using these files serves the same bundle over HTTP.
    let org = Org::new("beta.test")?;
    let mut f = org.federation(B, None, vec![])?;
    f.cert = first["cert"].as_str().context("cert")?.into();
    f.key = first["key"].as_str().context("key")?.into();
    f.ca = ca.clone().into();
    f.broker = A.into();
    let mut cfg = None;
    let broker = TestBroker::start_with(Backend::Sqlite, |c| {
        c.federation = Some(f.clone());
        cfg = Some(c.clone());
    })
    .await?;
    let (status, headers, body) =
        meshd_tests::http(broker.addr, "GET", "/.well-known/meshd/bundle", None).await?;
    assert_eq!(status, 200);
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("application/x-pem-file"),
        "{headers}"
    );
    assert_eq!(String::from_utf8(body)?, bundle);
    // `meshd federation status` reads the running daemon's /federation.
    let addr = broker.addr.to_string();
    let (code, out, err) = meshd_tests::run_cli(
        crate::DAEMON,
        &[
            "--data-dir",
            d,
            "federation",
            "status",
            "--addr",
            &addr,
            "--json",
        ],
        &[],
    )
    .await?;
    assert_eq!(code, 0, "{err}");
    let st: Value = serde_json::from_str(out.trim())?;
    assert_eq!(st["broker"], A);
    assert_eq!(st["quic"], json!(broker.quic.context("quic")?.to_string()));

    // Loosen the key's permissions: the next start is refused with a clear message.
    let key = first["key"].as_str().context("key")?;
    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o644))?;
    let mut cfg = cfg.context("config")?;
    cfg.server.listen = "127.0.0.1:0".parse()?;
    let err = meshd::Daemon::bind(cfg)
        .await
        .err()
        .context("started with a world-readable key")?;
    let msg = err.to_string();
    assert!(msg.contains(key) && msg.contains("chmod"), "{msg}");
    Ok(())
}

/// A revocation on the member's home broker reaches the other brokers: DMs to the
/// revoked member are refused there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_propagates() -> anyhow::Result<()> {
    let mut p = cut_pair().await?;
    until_known(&mut p.alice, &p.bob).await?;
    let mesh_b = replica(&p.b.db, &p.mesh.mesh_id).await?;
    admin::revoke_member(&p.b.db, &mesh_b.slug, &p.bob.member_id).await?;
    let bob_key = p.bob.keys.public_hex();
    // The home broker notices revocations made by the CLI on a 2 s watch; allow for a
    // loaded machine on top.
    let deadline = tokio::time::Instant::now() + 3 * meshd_tests::patience();
    loop {
        let ack = p.alice.dm(&bob_key, "still there?", "now").await?;
        if ack["error"].as_str().is_some_and(|e| e.contains("removed")) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the revocation never reached A: {ack}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Outbox positions never go back: after A's forwarded rows are swept and A restarts
/// (SQLite would reuse their row ids), new messages still get higher positions than B's
/// de-duplication cursor, so they are delivered rather than taken for duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_positions_survive_sweeps_and_restarts() -> anyhow::Result<()> {
    let retention = |c: &mut meshd_config::Config| {
        c.limits.delivered_retention = Duration::from_millis(1);
    };
    let p = linked_pair(retention, Backend::Sqlite).await?;
    let CutPair {
        mut a,
        b,
        to_a,
        mesh,
        alice,
        alice_member,
        bob,
        _orgs,
        ..
    } = p;
    alice.close().await;
    let alice = alice_member;
    let mut bob_c = member_client(&b.ws_url(), &bob, &[]).await?;
    let bob_key = bob.keys.public_hex();
    for round in 0..2 {
        let mut alice_c = member_client(&a.ws_url(), &alice, &[]).await?;
        until_known(&mut alice_c, &bob).await?;
        assert_eq!(bob_c.expect_message().await?.1, "probe");
        for i in 0..3 {
            alice_c
                .dm(&bob_key, &format!("round {round} #{i}"), "now")
                .await?;
        }
        for i in 0..3 {
            assert_eq!(
                bob_c.expect_message().await?.1,
                format!("round {round} #{i}")
            );
        }
        // Everything A stored is forwarded, so delivered; the sweep a restarted broker
        // runs about 2 s after start removes it (retention 1 ms), and the next start
        // begins with an empty message table.
        alice_c.close().await;
        let count = |db: meshd::store::Db, sql: &'static str| async move {
            match &db {
                meshd::store::Db::Sqlite(p, _) => {
                    sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await.ok()
                }
                meshd::store::Db::Postgres(p) => {
                    sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await.ok()
                }
            }
        };
        // Everything A stored is forwarded (so delivered) before it restarts; the sweep a
        // starting broker runs at once removes it (retention 1 ms), and the start after
        // that begins with an empty message table.
        eventually("B to acknowledge everything", || async {
            (count(
                a.db.clone(),
                "SELECT COUNT(*) FROM message WHERE forwarded_at IS NULL",
            )
            .await?
                == 0)
                .then_some(())
        })
        .await?;
        for _ in 0..2 {
            a = a.restart().await?;
            to_a.set_upstream(a.quic.context("quic")?);
            eventually("A's forwarded rows swept", || async {
                (count(a.db.clone(), "SELECT COUNT(*) FROM message").await? == 0).then_some(())
            })
            .await?;
        }
        fed::wait_flowing(a.addr, B, &mesh.mesh_id).await?;
    }
    let mut alice_c = member_client(&a.ws_url(), &alice, &[]).await?;
    alice_c.dm(&bob_key, "after two restarts", "now").await?;
    assert_eq!(bob_c.expect_message().await?.1, "after two restarts");
    Ok(())
}

/// The skills catalogue of a shared mesh is the same on every broker: a skill shared at A
/// is read at B, a removal at B reaches A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skills_replicate_across_brokers() -> anyhow::Result<()> {
    let mut p = cut_pair().await?;
    until_known(&mut p.alice, &p.bob).await?;
    let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
    let ack = p
        .alice
        .request(
            json!({"type": "share_skill", "name": "triage", "description": "Sort incidents",
            "instructions": "page the on-call", "tags": ["ops"]}),
        )
        .await?;
    assert_eq!(ack["action"], "shared");
    let got = bob
        .poll(
            "the skill at B",
            json!({"type": "get_skill", "name": "triage"}),
            |g| !g["skill"].is_null(),
        )
        .await?;
    assert_eq!(got["skill"]["instructions"], "page the on-call");
    assert_eq!(got["skill"]["author"], "alice");
    let rm = bob
        .request(json!({"type": "remove_skill", "name": "triage"}))
        .await?;
    assert_eq!(rm["action"], "removed");
    p.alice
        .poll(
            "the removal at A",
            json!({"type": "get_skill", "name": "triage"}),
            |g| g["skill"].is_null(),
        )
        .await?;
    Ok(())
}

/// A webhook of a shared mesh reaches the mesh's peers on every broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_posts_reach_every_broker() -> anyhow::Result<()> {
    let mut p = cut_pair().await?;
    until_known(&mut p.alice, &p.bob).await?;
    let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
    let bob_key = p.bob.keys.public_hex();
    p.alice
        .until_peers("bob listed", |v| broker_of(v, &bob_key).is_some())
        .await?;
    let ack = p
        .alice
        .request(json!({"type": "create_webhook", "name": "deploys"}))
        .await?;
    let secret = ack["secret"].as_str().context("secret")?;
    let path = format!("/hook/{}/{secret}", p.mesh.mesh_id);
    let (status, _, _) =
        meshd_tests::http(p.a.addr, "POST", &path, Some(br#"{"env":"prod","at":1}"#)).await?;
    assert_eq!(status, 200);
    for c in [&mut p.alice, &mut bob] {
        let push =
            c.ws.expect("webhook push", |v| {
                v["type"] == "push" && v["subtype"] == "webhook"
            })
            .await?;
        assert_eq!(
            (push["event"].as_str(), push["eventData"]["env"].as_str()),
            (Some("deploys"), Some("prod"))
        );
        // The body as posted, on every broker.
        assert!(
            c.ws.raw_texts()
                .iter()
                .any(|t| t.contains(r#""eventData":{"env":"prod","at":1}"#)),
            "{:?}",
            c.ws.raw_texts()
        );
    }
    Ok(())
}

/// Data published to a stream reaches its subscribers on the mesh's other brokers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_data_crosses_brokers() -> anyhow::Result<()> {
    let mut p = cut_pair().await?;
    until_known(&mut p.alice, &p.bob).await?;
    let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
    bob.send(json!({"type": "subscribe", "stream": "builds"}))
        .await?;
    bob.ws
        .expect("subscribed", |v| v["type"] == "subscribed")
        .await?;
    let bob_key = p.bob.keys.public_hex();
    p.alice
        .until_peers("bob listed", |v| broker_of(v, &bob_key).is_some())
        .await?;
    p.alice
        .send(json!({"type": "publish", "stream": "builds", "data": {"ok": true}}))
        .await?;
    let d = bob
        .ws
        .expect("stream_data", |v| v["type"] == "stream_data")
        .await?;
    assert_eq!(
        (d["publishedBy"].as_str(), d["data"]["ok"].as_bool()),
        (Some("alice"), Some(true))
    );
    Ok(())
}

/// The peer file relay crosses brokers: alice on A asks bob on B for a file and a
/// listing; only bob's answers come back (another peer's injection is dropped), with
/// alice's `_reqId`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_file_relay_crosses_brokers() -> anyhow::Result<()> {
    let mut p = cut_pair().await?;
    until_known(&mut p.alice, &p.bob).await?;
    let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
    let bob_key = p.bob.keys.public_hex();
    p.alice
        .until_peers("bob listed", |v| broker_of(v, &bob_key).is_some())
        .await?;
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

/// MCP servers are the mesh's on every broker: registered on A, listed and called from
/// B (the call goes over the link to the host and back), the name is refused to another
/// member at B, and the server goes away everywhere when its host leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_servers_cross_brokers() -> anyhow::Result<()> {
    let mut p = cut_pair().await?;
    until_known(&mut p.alice, &p.bob).await?;
    let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
    let ack = p
        .alice
        .request(json!({"type": "mcp_register", "serverName": "fs", "description": "files", "tools": [{"name": "read", "description": "read a file"}]}))
        .await?;
    assert_eq!(ack["type"], "mcp_register_ack", "{ack}");
    let ev = bob
        .ws
        .expect("mcp_registered at B", |v| v["event"] == "mcp_registered")
        .await?;
    assert_eq!(
        ev["eventData"],
        json!({"serverName": "fs", "description": "files", "tools": ["read"], "hostedBy": "alice"})
    );
    let list = bob.request(json!({"type": "mcp_list"})).await?;
    assert_eq!(
        (
            list["servers"][0]["name"].as_str(),
            list["servers"][0]["online"].as_bool()
        ),
        (Some("fs"), Some(true)),
        "{list}"
    );
    let taken = bob
        .request(json!({"type": "mcp_register", "serverName": "fs", "tools": []}))
        .await?;
    assert_eq!(taken["code"], "mcp_name_taken", "{taken}");

    bob.send(json!({"type": "mcp_call", "serverName": "fs", "toolName": "read", "args": {"path": "x"}, "_reqId": "m1"}))
        .await?;
    let fwd = p
        .alice
        .ws
        .expect("forward at A", |v| v["type"] == "mcp_call_forward")
        .await?;
    assert_eq!(
        (fwd["callerName"].as_str(), &fwd["args"]),
        (Some("bob"), &json!({"path": "x"}))
    );
    p.alice
        .send(
            json!({"type": "mcp_call_response", "callId": fwd["callId"], "result": {"text": "hi"}}),
        )
        .await?;
    let r = bob
        .ws
        .expect("result at B", |v| v["_reqId"] == "m1")
        .await?;
    assert_eq!(
        (r["type"].as_str(), &r["result"]),
        (Some("mcp_call_result"), &json!({"text": "hi"})),
        "{r}"
    );

    p.alice.close().await;
    let gone = bob
        .ws
        .expect("mcp_unregistered at B", |v| {
            v["event"] == "mcp_unregistered"
        })
        .await?;
    assert_eq!(gone["eventData"]["serverName"], "fs");
    let list = bob.request(json!({"type": "mcp_list"})).await?;
    assert_eq!(list["servers"], json!([]));
    Ok(())
}

/// Names of the MCP servers an `mcp_list` answer lists, sorted.
fn mcp_names(list: &Value) -> Vec<String> {
    let mut names: Vec<String> = list["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

/// Polls `client`'s `mcp_list` until it names exactly `want`.
async fn until_mcp_names(client: &mut Client, want: &[String]) -> anyhow::Result<()> {
    client
        .poll(
            &format!("MCP servers {want:?}"),
            json!({"type": "mcp_list"}),
            |l| mcp_names(l) == want,
        )
        .await
        .map(drop)
}

/// The full MCP list a broker sends when a link comes up may exceed a frame: it is sent
/// in parts (A's frames are limited to 256 KiB here, its 8 servers hold ~400 KiB), and
/// a server withdrawn while the link was down is gone from B after the reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_mcp_lists_cross_a_reconnect() -> anyhow::Result<()> {
    let mut p = linked_pair(
        |c| {
            c.limits.max_message_bytes = 64 * 1024;
            if let Some(f) = c.federation.as_mut() {
                f.max_frame_bytes = 256 * 1024;
            }
        },
        Backend::Sqlite,
    )
    .await?;
    until_known(&mut p.alice, &p.bob).await?;
    let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
    let mut names: Vec<String> = (0..8).map(|i| format!("srv{i}")).collect();
    for name in &names {
        let tools: Vec<Value> = (0..4)
            .map(|t| json!({"name": format!("t{t}"), "description": "x".repeat(12 * 1024)}))
            .collect();
        let ack = p
            .alice
            .request(json!({"type": "mcp_register", "serverName": name, "tools": tools}))
            .await?;
        assert_eq!(ack["type"], "mcp_register_ack", "{ack}");
    }
    until_mcp_names(&mut bob, &names).await?;

    p.to_a.cut();
    p.to_b.cut();
    fed::wait_link(p.a.addr, B, "down", |l| l["state"] != "up").await?;
    p.alice
        .send(json!({"type": "mcp_unregister", "serverName": "srv0"}))
        .await?;
    names.remove(0);
    assert_eq!(
        mcp_names(&p.alice.request(json!({"type": "mcp_list"})).await?),
        names
    );
    p.to_a.heal();
    p.to_b.heal();
    fed::wait_link(p.a.addr, B, "up again", |l| {
        l["state"] == "up" && l["connects"].as_u64() >= Some(2)
    })
    .await?;
    until_mcp_names(&mut bob, &names).await?;
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
    let (st, _, bytes) = meshd_tests::broker::http_with(p.a.addr, "GET", &path, &[], None).await?;
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

/// The simulation clock is one clock on every broker: set on A, it ticks for peers on B
/// too; paused on B, it is paused on A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_crosses_brokers() -> anyhow::Result<()> {
    let mut p = cut_pair().await?;
    until_known(&mut p.alice, &p.bob).await?;
    let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
    let set = p
        .alice
        .request(json!({"type": "set_clock", "speed": 100}))
        .await?;
    assert_eq!(set["speed"], 100, "{set}");
    let tick = bob.expect_event("tick").await?;
    assert_eq!(tick["eventData"]["speed"], 100, "{tick}");
    let paused = bob.request(json!({"type": "pause_clock"})).await?;
    assert_eq!(paused["paused"], true, "{paused}");
    let c = p
        .alice
        .poll("B's pause at A", json!({"type": "get_clock"}), |c| {
            c["paused"] == true
        })
        .await?;
    assert_eq!(c["speed"], 100);
    Ok(())
}

/// Polls `list_tasks` on `c` until the task `id` satisfies `pred`.
async fn until_task(
    c: &mut Client,
    id: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let task = |l: &Value| {
        l["tasks"]
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["id"] == id).cloned())
            .unwrap_or_default()
    };
    let l = c
        .poll(what, json!({"type": "list_tasks"}), |l| pred(&task(l)))
        .await?;
    Ok(task(&l))
}

/// Tasks are the mesh's on every broker: created on A, claimed on B, completed on A,
/// completed again on B (the new result wins everywhere); a state write made during a
/// cut arrives with the catch-up; two claims made on both sides of a cut converge,
/// after the heal, on the earlier one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_cross_brokers() -> anyhow::Result<()> {
    let mut p = cut_pair().await?;
    until_known(&mut p.alice, &p.bob).await?;
    let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
    let t = p
        .alice
        .request(json!({"type": "create_task", "title": "rotate the keys"}))
        .await?;
    let id = t["id"].as_str().unwrap_or_default().to_owned();
    until_task(&mut bob, &id, "the task never reached B", |t| {
        t["status"] == "open"
    })
    .await?;
    let claimed = bob
        .request(json!({"type": "claim_task", "taskId": id}))
        .await?;
    assert_eq!(claimed["type"], "task_list", "{claimed}");
    until_task(&mut p.alice, &id, "bob's claim never reached A", |t| {
        t["claimedBy"] == "bob"
    })
    .await?;
    p.alice
        .request(json!({"type": "complete_task", "taskId": id, "result": "done"}))
        .await?;
    let done = until_task(&mut bob, &id, "the completion never reached B", |t| {
        t["status"] == "done"
    })
    .await?;
    assert_eq!(done["result"], "done");
    // Completing again replaces the result on every broker (the later completion wins).
    bob.request(json!({"type": "complete_task", "taskId": id, "result": "redone"}))
        .await?;
    until_task(
        &mut p.alice,
        &id,
        "the second completion never won at A",
        |t| t["result"] == "redone",
    )
    .await?;
    until_task(&mut bob, &id, "B lost its second completion", |t| {
        t["result"] == "redone"
    })
    .await?;

    let t2 = p
        .alice
        .request(json!({"type": "create_task", "title": "contested"}))
        .await?;
    let id2 = t2["id"].as_str().unwrap_or_default().to_owned();
    until_task(&mut bob, &id2, "the second task never reached B", |t| {
        t["status"] == "open"
    })
    .await?;
    p.to_a.cut();
    p.to_b.cut();
    fed::wait_link(p.a.addr, B, "down", |l| l["state"] != "up").await?;
    p.alice
        .request(json!({"type": "claim_task", "taskId": id2}))
        .await?;
    bob.request(json!({"type": "claim_task", "taskId": id2}))
        .await?;
    // A state write made during the cut reaches B with the catch-up after the heal.
    p.alice
        .send(json!({"type": "set_state", "key": "phase", "value": "cut"}))
        .await?;
    p.alice.sync().await?;
    p.to_a.heal();
    p.to_b.heal();
    bob.poll(
        "the state written during the cut, at B",
        json!({"type": "get_state", "key": "phase"}),
        |r| r["value"] == "cut",
    )
    .await?;
    until_task(
        &mut bob,
        &id2,
        "B never converged on the earlier claim",
        |t| t["claimedBy"] == "alice",
    )
    .await?;
    until_task(&mut p.alice, &id2, "A lost its earlier claim", |t| {
        t["claimedBy"] == "alice"
    })
    .await?;
    Ok(())
}

/// Polls `recall` on `c` until `pred` holds for its results.
async fn until_recall(
    c: &mut Client,
    query: &str,
    what: &str,
    pred: impl Fn(&[Value]) -> bool,
) -> anyhow::Result<Vec<Value>> {
    let found = |r: &Value| r["memories"].as_array().cloned().unwrap_or_default();
    let r = c
        .poll(what, json!({"type": "recall", "query": query}), |r| {
            pred(&found(r))
        })
        .await?;
    Ok(found(&r))
}

/// Memory and contexts are the mesh's on every broker: a note remembered on A is
/// recalled on B, forgotten on B it is gone on A, one remembered during a cut arrives
/// after the heal; a context shared on B reaches A (with the `_context:` state change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_contexts_cross_brokers() -> anyhow::Result<()> {
    let mut p = cut_pair().await?;
    until_known(&mut p.alice, &p.bob).await?;
    let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
    let stored = p
        .alice
        .request(json!({"type": "remember", "content": "deploys use blue-green switching", "tags": ["ops"]}))
        .await?;
    let id = stored["id"].as_str().unwrap_or_default().to_owned();
    let found = until_recall(&mut bob, "deploys", "alice's memory never reached B", |m| {
        !m.is_empty()
    })
    .await?;
    assert_eq!(
        (found[0]["id"].as_str(), found[0]["rememberedBy"].as_str()),
        (Some(id.as_str()), Some("alice"))
    );
    bob.send(json!({"type": "forget", "memoryId": id})).await?;
    until_recall(
        &mut p.alice,
        "deploys",
        "bob's forget never reached A",
        <[Value]>::is_empty,
    )
    .await?;

    p.to_a.cut();
    p.to_b.cut();
    fed::wait_link(p.a.addr, B, "down", |l| l["state"] != "up").await?;
    p.alice
        .request(json!({"type": "remember", "content": "the staging database moved to pg16"}))
        .await?;
    p.to_a.heal();
    p.to_b.heal();
    until_recall(
        &mut bob,
        "staging",
        "a memory made during the cut never reached B",
        |m| m.len() == 1,
    )
    .await?;

    bob.send(
        json!({"type": "share_context", "summary": "profiling the ingest path", "tags": ["perf"]}),
    )
    .await?;
    let change = p
        .alice
        .ws
        .expect("context state change", |v| {
            v["type"] == "state_change" && v["key"] == "_context:bob"
        })
        .await?;
    assert_eq!(change["value"], "profiling the ingest path");
    let ctx = p
        .alice
        .request(json!({"type": "get_context", "query": "perf"}))
        .await?;
    assert_eq!(ctx["contexts"][0]["peerName"], "bob", "{ctx}");
    Ok(())
}

/// Reminders scheduled on A reach a member hosted by B, direct (through the durable
/// outbox) and broadcast (live), tagged `subtype: "reminder"` and sent as their creator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reminders_cross_brokers() -> anyhow::Result<()> {
    let mut p = cut_pair().await?;
    until_known(&mut p.alice, &p.bob).await?;
    let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
    let bob_key = p.bob.keys.public_hex();
    p.alice
        .until_peers("bob listed", |v| broker_of(v, &bob_key).is_some())
        .await?;
    let now = meshd_tests::client::now_ms();
    for (to, text) in [(bob_key.as_str(), "direct"), ("*", "everyone")] {
        let ack = p
            .alice
            .request(json!({"type": "schedule", "to": to, "message": text, "deliverAt": now, "subtype": "reminder"}))
            .await?;
        assert_eq!(ack["type"], "scheduled_ack", "{ack}");
        let push = bob
            .ws
            .expect("reminder from A", |v| {
                v["type"] == "push" && v["subtype"] == "reminder"
            })
            .await?;
        assert_eq!(
            (bob.read_push(&push).as_deref(), push["senderName"].as_str()),
            (Some(text), Some("alice"))
        );
    }
    Ok(())
}

/// A DM to a remote *session* key stays deliverable while its presence is gone: during a
/// cut (after the peer has left the list) it is taken and queued, and arrives after the
/// heal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_keys_route_through_a_cut() -> anyhow::Result<()> {
    let mut p = cut_pair().await?;
    until_known(&mut p.alice, &p.bob).await?;
    let mut bob = p.b.connect(&p.bob).await?; // with a session key
    let session = bob.key();
    assert_ne!(session, p.bob.keys.public_hex());
    // The probe was sealed for bob's member key, not this session's: take it unopened.
    bob.ws
        .expect("the probe", |v| {
            v["type"] == "push" && v.get("subtype").is_none()
        })
        .await?;
    p.alice
        .until_peers("bob's session listed", |v| broker_of(v, &session).is_some())
        .await?;
    p.to_a.cut();
    p.to_b.cut();
    let left = p.alice.expect_event("peer_left").await?;
    assert_eq!(left["eventData"]["pubkey"], session.as_str());
    let ack = p.alice.dm(&session, "while you were away", "now").await?;
    assert!(ack["error"].is_null(), "{ack}");
    p.to_a.heal();
    p.to_b.heal();
    let (push, text) = bob.expect_message().await?;
    assert_eq!(text, "while you were away");
    assert_eq!(push["senderPubkey"], p.alice_member.keys.public_hex());
    Ok(())
}

/// Writes a configuration file for a broker process `name` of `org`, finding its peers
/// through the DNS server at `dns`; returns (config path, data dir).
fn process_config(
    org: &Org,
    name: &str,
    dns: SocketAddr,
    peers: &[(&str, &Org)],
    grace: &str,
    dir: &std::path::Path,
) -> anyhow::Result<(String, std::path::PathBuf)> {
    let paths = org.issue(name)?;
    let mut text = format!(
        r#"[server]
shutdown_grace = "{grace}"

[federation]
broker = "{name}"
listen = "127.0.0.1:0"
cert = "{cert}"
key = "{key}"
ca = "{ca}"
nameservers = ["{dns}"]
presence_grace = "2s"
reconnect_min = "50ms"
reconnect_max = "500ms"
keepalive = "300ms"
idle_timeout = "1500ms"
"#,
        cert = paths.cert.display(),
        key = paths.key.display(),
        ca = org.ca_path().display(),
    );
    for (peer, peer_org) in peers {
        text.push_str(&format!(
            "\n[[federation.peers]]\nname = \"{peer}\"\nca = \"{}\"\n",
            peer_org.ca_path().display()
        ));
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text)?;
    Ok((path.display().to_string(), dir.join(format!("{name}.data"))))
}

/// Linked broker processes stopped together (SIGTERM to both) do not wait on each
/// other: closing a link never waits for the peer, which is itself closing (before, each
/// waited out its whole grace period).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linked_brokers_stop_together_promptly() -> anyhow::Result<()> {
    let (oa, ob) = (Org::new("alpha.test")?, Org::new("beta.test")?);
    let dns = TestDns::start().await?;
    let dir = tempfile::tempdir()?;
    let grace = Duration::from_secs(20);
    let (cfg_a, data_a) = process_config(&oa, A, dns.addr(), &[(B, &ob)], "20s", dir.path())?;
    let (cfg_b, data_b) = process_config(&ob, B, dns.addr(), &[(A, &oa)], "20s", dir.path())?;
    let mut a =
        meshd_tests::DaemonProcess::spawn(crate::DAEMON, &data_a, &["--config", &cfg_a], &[])
            .await?;
    let mut b =
        meshd_tests::DaemonProcess::spawn(crate::DAEMON, &data_b, &["--config", &cfg_b], &[])
            .await?;
    publish(&dns, A, a.quic.context("quic")?);
    publish(&dns, B, b.quic.context("quic")?);
    fed::wait_link(a.addr, B, "up", |l| l["state"] == "up").await?;
    fed::wait_link(b.addr, A, "up", |l| l["state"] == "up").await?;
    // A shared mesh with a member connected on each side: links carry traffic.
    let load = |cfg: &str, data: &std::path::Path| -> anyhow::Result<meshd_config::Config> {
        let text = std::fs::read_to_string(cfg)?;
        let ov = meshd_config::Overrides {
            data_dir: Some(data.to_owned()),
            ..Default::default()
        };
        Ok(meshd_config::Config::load(
            Some(("c", &text)),
            &meshd_config::Environment::default(),
            &ov,
        )?)
    };
    let (ca, cb) = (load(&cfg_a, &data_a)?, load(&cfg_b, &data_b)?);
    let (dba, dbb) = (admin::open(&ca).await?, admin::open(&cb).await?);
    let mesh = admin::create_mesh(&dba, &ca, "stop", None).await?;
    admin::share_mesh(&dba, &ca, &mesh.slug, B).await?;
    // `mesh accept --wait` returns once the replica exists, with its slug.
    let (code, out, err) = meshd_tests::run_cli(
        crate::DAEMON,
        &[
            "--config",
            &cfg_b,
            "--data-dir",
            data_b.to_str().unwrap_or_default(),
            "mesh",
            "accept",
            &mesh.mesh_id,
            "--from",
            A,
            "--wait",
            "20s",
            "--json",
        ],
        &[],
    )
    .await?;
    assert_eq!(code, 0, "{out}{err}");
    let accepted: Value = serde_json::from_str(out.trim())?;
    assert!(accepted["slug"].is_string(), "{accepted}");
    fed::wait_flowing(a.addr, B, &mesh.mesh_id).await?;
    fed::wait_flowing(b.addr, A, &mesh.mesh_id).await?;
    let mesh_b = replica(&dbb, &mesh.mesh_id).await?;
    let mut clients = Vec::new();
    for (db, cfg, m, d, name) in [
        (&dba, &ca, &mesh, &a, "alice"),
        (&dbb, &cb, &mesh_b, &b, "bob"),
    ] {
        let inv = admin::create_invite(
            db,
            cfg,
            &m.slug,
            Role::Member,
            1,
            Duration::from_secs(600),
            &d.ws_url(),
        )
        .await?;
        let keys = Keypair::generate();
        let payload = meshd_protocol::invite::InvitePayload::from_token(&inv.token)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (code, body) = meshd_tests::http_json(
            d.addr,
            "POST",
            "/join",
            &json!({"invite_token": inv.token,
            "invite_payload": payload, "peer_pubkey": keys.public_hex(), "display_name": name}),
        )
        .await?;
        assert_eq!(code, 200, "{body}");
        let member = Member {
            mesh_id: mesh.mesh_id.clone(),
            member_id: body["memberId"].as_str().unwrap_or("").into(),
            keys,
            display_name: name.into(),
        };
        clients.push(member_client(&d.ws_url(), &member, &[]).await?);
    }
    clients[0]
        .until_peers("bob seen from A", |v| {
            v["peers"].as_array().is_some_and(|p| p.len() == 2)
        })
        .await?;
    dba.close().await;
    dbb.close().await;

    let started = std::time::Instant::now();
    let (ra, rb) = tokio::join!(a.terminate(), b.terminate());
    let took = started.elapsed();
    assert!(ra?.0.success() && rb?.0.success());
    // Far below the grace: a stop that waited on the peer would take all of it.
    assert!(
        took < grace / 2,
        "stopping two linked brokers took {took:?}"
    );

    // One after the other: the second is redialing the first (gone, so its handshake
    // would only time out) when it is told to stop; it must not wait for the dial.
    let mut a =
        meshd_tests::DaemonProcess::spawn(crate::DAEMON, &data_a, &["--config", &cfg_a], &[])
            .await?;
    let mut b =
        meshd_tests::DaemonProcess::spawn(crate::DAEMON, &data_b, &["--config", &cfg_b], &[])
            .await?;
    publish(&dns, A, a.quic.context("quic")?);
    publish(&dns, B, b.quic.context("quic")?);
    fed::wait_link(b.addr, A, "up", |l| l["state"] == "up").await?;
    assert!(a.terminate().await?.0.success());
    fed::wait_link(b.addr, A, "redialing", |l| l["state"] != "up").await?;
    let started = std::time::Instant::now();
    assert!(b.terminate().await?.0.success());
    let took = started.elapsed();
    // The handshake timeout is 10 s.
    assert!(
        took < Duration::from_secs(5),
        "stopping while redialing took {took:?}"
    );
    Ok(())
}

/// An endpoint with B's real certificate, trusting A's CA: the test plays broker B.
fn fake_b(oa: &Org, ob: &Org) -> anyhow::Result<meshd_federation::Endpoint> {
    let paths = ob.issue(B)?;
    let identity = meshd_certs::BrokerIdentity::load(&paths.cert, &paths.key, B)?;
    let trust = meshd_certs::PeerTrust::new([(
        A.to_owned(),
        meshd_certs::PeerAnchor::load_ca_file(&oa.ca_path())?,
    )])?;
    Ok(meshd_federation::Endpoint::bind(
        "127.0.0.1:0".parse()?,
        identity,
        trust,
        link_opts(),
    )?)
}

fn b_hello(mesh_id: &str) -> wire::Hello {
    wire::Hello {
        version: wire::VERSION,
        broker: B.into(),
        caps: vec![],
        meshes: vec![wire::MeshClaim {
            mesh_id: mesh_id.to_owned(),
        }],
    }
}

async fn next_held(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<fed::LinkEvent>,
) -> anyhow::Result<fed::HeldLink> {
    loop {
        match tokio::time::timeout(meshd_tests::patience(), events.recv()).await {
            Ok(Some(fed::LinkEvent::Held(h))) => return Ok(h),
            Ok(Some(fed::LinkEvent::Ended(_))) => {}
            Ok(None) | Err(_) => bail!("no link handler started"),
        }
    }
}

async fn until_ended(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<fed::LinkEvent>,
    id: u64,
) -> anyhow::Result<()> {
    loop {
        match tokio::time::timeout(meshd_tests::patience(), events.recv()).await {
            Ok(Some(fed::LinkEvent::Ended(e))) if e == id => return Ok(()),
            Ok(Some(fed::LinkEvent::Held(h))) => bail!("unexpected link {}", h.id),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => bail!("link {id} never ended"),
        }
    }
}

/// One simultaneous dial, forced: B's connection to A is adopted first (L), then A's
/// own connection to B (W), which wins the tie-break (A sorts first) and replaces L
/// before either handler ran. The handlers then start in the order given, and the mesh
/// is shared before or after they do. A must serve W, and the mesh must flow over it
/// with A's members announced.
async fn simultaneous_dial_case(winner_first: bool, share_after: bool) -> anyhow::Result<()> {
    let (oa, ob) = (Org::new("alpha.test")?, Org::new("beta.test")?);
    let ep_b = fake_b(&oa, &ob)?;
    let b_addr = ep_b.local_addr()?;
    let (hooks, mut events) = fed::HeldLinks::new();
    let f = oa.federation(A, None, vec![ob.peer(B, Some(b_addr))])?;
    let a = {
        let dir = tempfile::tempdir()?;
        let mut config = meshd_tests::broker::test_config(Backend::Sqlite, dir.path()).await?;
        config.federation = Some(f);
        let mut b =
            TestBroker::from_config_with(config, meshd::DaemonOptions::with_link_hooks(hooks))
                .await?;
        b.keep_dir(dir);
        b
    };
    let mesh = a.create_mesh("simultaneous").await?;
    if !share_after {
        admin::share_mesh(&a.db, &a.config, &mesh.slug, B).await?;
    }
    // A dialed B at start: B takes the handshake and A's hello (sent before A had any
    // link), but holds its own hello back. B dials A meanwhile (from a second endpoint
    // with its certificate) and A adopts that link; then B answers the first.
    let incoming = tokio::time::timeout(meshd_tests::patience(), ep_b.incoming())
        .await?
        .context("A never dialed")?;
    let (got_hello, hello_seen) = tokio::sync::oneshot::channel::<()>();
    let (answer, answered) = std::sync::mpsc::channel::<()>();
    let accepting = {
        let hello = b_hello(&mesh.mesh_id);
        tokio::spawn(async move {
            let link = ep_b
                .accept(incoming, move |_| {
                    let _ = got_hello.send(());
                    tokio::task::block_in_place(|| answered.recv().ok());
                    hello
                })
                .await;
            (ep_b, link)
        })
    };
    tokio::time::timeout(meshd_tests::patience(), hello_seen)
        .await
        .context("A never said hello")??;
    let ep_b2 = fake_b(&oa, &ob)?;
    let l_link = ep_b2
        .dial(A, a.quic.context("quic")?, b_hello(&mesh.mesh_id))
        .await?;
    let l = next_held(&mut events).await?;
    assert!(!l.dialer, "B's connection is adopted first");
    answer.send(())?;
    let (_ep_b, w_link) = accepting.await?;
    let w_link = w_link?;
    let w = next_held(&mut events).await?;
    assert!(w.dialer && w.id > l.id, "A's connection replaces it");
    if winner_first {
        let w_id = w.id;
        w.release();
        fed::wait_link(a.addr, B, "serving W", |s| s["servedLinkId"] == w_id).await?;
        let l_id = l.id;
        l.release();
        until_ended(&mut events, l_id).await?;
    } else {
        let l_id = l.id;
        l.release();
        until_ended(&mut events, l_id).await?;
        w.release();
    }
    if share_after {
        admin::share_mesh(&a.db, &a.config, &mesh.slug, B).await?;
    }
    fed::wait_flowing(a.addr, B, &mesh.mesh_id).await?;
    let st = fed::status(a.addr).await?;
    let link = fed::link(&st, B).context("link")?;
    assert_eq!(link["linkId"], link["servedLinkId"], "{st}");
    // A member enrolled now is announced over W's messages stream.
    let alice = a.enroll(&mesh, "alice").await?;
    // (The reply half is kept: a peer that finishes it ends the link.)
    let (mut messages, _reply) = loop {
        let s = tokio::time::timeout(meshd_tests::patience(), w_link.conn.accept_stream())
            .await
            .context("A never opened its messages stream")??;
        if s.class == StreamClass::Messages {
            break (s.rx, s.tx);
        }
    };
    let want = alice.keys.public_hex();
    let announced = tokio::time::timeout(meshd_tests::patience(), async {
        while let Some(frame) = messages.recv().await? {
            if let Frame::Members { members, .. } = frame
                && members.iter().any(|m| m.pubkey == want)
            {
                return anyhow::Ok(true);
            }
        }
        anyhow::Ok(false)
    })
    .await
    .context("alice never announced")??;
    assert!(announced);
    let metrics = a.metrics().await?;
    assert!(
        metrics.contains("meshd_federation_link_resets_total{reason=\"unregistered\"} 0"),
        "{metrics}"
    );
    drop(l_link);
    Ok(())
}

/// A simultaneous dial resolved with the two links' handlers starting in either order,
/// and the share made before or after: the surviving link carries the mesh (before the
/// fix, the replaced link's late start unregistered its successor: "up", carrying
/// nothing, for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_dial_in_every_order() -> anyhow::Result<()> {
    for winner_first in [true, false] {
        for share_after in [false, true] {
            simultaneous_dial_case(winner_first, share_after)
                .await
                .with_context(|| {
                    format!("winner first: {winner_first}, share after: {share_after}")
                })?;
        }
    }
    Ok(())
}

/// A dial that completes after the dialer already has a link (begun before that link
/// came up: brokers started together) says so in its hello; A closes it and keeps the
/// serving link, whose in-flight frames a replacement would have lost. Without the
/// capability, a second connection from the same peer replaces the first (the peer
/// lost it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_dial_never_replaces_a_serving_link() -> anyhow::Result<()> {
    let (oa, ob) = (Org::new("alpha.test")?, Org::new("beta.test")?);
    let a = start(&oa, A, None, vec![ob.peer(B, Some("127.0.0.1:9".parse()?))]).await?;
    let mesh = a.create_mesh("late").await?;
    admin::share_mesh(&a.db, &a.config, &mesh.slug, B).await?;
    let (ep, first) = play_b(&a, &oa, &ob, &mesh.mesh_id).await?;
    let serving = fed::wait_link(a.addr, B, "served", |l| l["servedLinkId"].is_u64()).await?;
    let first_id = serving["servedLinkId"].clone();

    let mut hello = b_hello(&mesh.mesh_id);
    hello.caps.push(wire::CAP_HAS_LINK.to_owned());
    if let Ok(late) = ep.dial(A, a.quic.context("quic")?, hello).await {
        tokio::time::timeout(meshd_tests::patience(), late.conn.conn.closed())
            .await
            .context("the late connection was kept")?;
        assert_eq!(
            meshd_federation::link::close_reason_of(&late.conn.conn),
            Some(wire::CloseReason::Duplicate)
        );
    }
    assert!(
        first.conn.conn.close_reason().is_none(),
        "the serving link was closed"
    );
    let st = fed::status(a.addr).await?;
    let link = fed::link(&st, B).context("link")?;
    assert_eq!(
        (&link["linkId"], &link["servedLinkId"]),
        (&first_id, &first_id),
        "{st}"
    );

    // A peer that lost its link dials without it: the new connection takes over.
    let again = ep
        .dial(A, a.quic.context("quic")?, b_hello(&mesh.mesh_id))
        .await?;
    fed::wait_link(a.addr, B, "replaced", |l| {
        l["servedLinkId"].is_u64() && l["servedLinkId"] != first_id
    })
    .await?;
    tokio::time::timeout(meshd_tests::patience(), first.conn.conn.closed())
        .await
        .context("the replaced link stayed open")?;
    drop(again);
    Ok(())
}

/// The liveness guard: a link that is up but whose handler never registers it (held
/// here past the bound) is torn down and dialed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_never_serves_is_reset() -> anyhow::Result<()> {
    let (oa, ob) = (Org::new("alpha.test")?, Org::new("beta.test")?);
    let ep_b = fake_b(&oa, &ob)?;
    let (hooks, mut events) = fed::HeldLinks::new();
    let f = oa.federation(A, None, vec![ob.peer(B, Some(ep_b.local_addr()?))])?;
    let dir = tempfile::tempdir()?;
    let mut config = meshd_tests::broker::test_config(Backend::Sqlite, dir.path()).await?;
    config.federation = Some(f);
    let mut a =
        TestBroker::from_config_with(config, meshd::DaemonOptions::with_link_hooks(hooks)).await?;
    a.keep_dir(dir);
    let incoming = tokio::time::timeout(meshd_tests::patience(), ep_b.incoming())
        .await?
        .context("A never dialed")?;
    let _link = ep_b.accept(incoming, |_| b_hello("none")).await?;
    let held = next_held(&mut events).await?;
    // Held: the manager says up, nothing serves it. The guard resets it.
    let reset = eventually("the guard resets the link", || async {
        let m = a.metrics().await.ok()?;
        (!m.contains("meshd_federation_link_resets_total{reason=\"unregistered\"} 0")).then_some(())
    })
    .await;
    held.release();
    reset?;
    // And A dials again.
    let again = tokio::time::timeout(meshd_tests::patience(), ep_b.incoming()).await?;
    assert!(again.is_some(), "A did not dial again");
    Ok(())
}

fn fake_presence(version: u64) -> wire::PresenceEntry {
    let key = Keypair::generate().public_hex();
    wire::PresenceEntry {
        key: key.clone(),
        member_pubkey: key,
        member_id: format!("m{version}"),
        version,
        display_name: format!("ghost {version}"),
        status: "idle".into(),
        summary: None,
        groups: vec![],
        visible: true,
        session_id: format!("s{version}"),
        connected_at: meshd_tests::now_ms(),
        cwd: "/".into(),
        hostname: None,
        peer_type: None,
        channel: None,
        model: None,
        peer_role: "control-plane".into(),
        profile: "{}".into(),
        stats: None,
    }
}

/// A peer broker cannot flood a mesh with presences: beyond what one broker may show
/// (here 5, `limits.max_connections_per_mesh`), new ones are refused and counted, and
/// local peers hear of the accepted ones only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_presences_are_capped() -> anyhow::Result<()> {
    let (oa, ob) = (Org::new("alpha.test")?, Org::new("beta.test")?);
    let a = start_tweaked(
        Backend::Sqlite,
        &oa,
        A,
        None,
        vec![ob.peer(B, Some("127.0.0.1:9".parse()?))],
        |c| c.limits.max_connections_per_mesh = 5,
    )
    .await?;
    let mesh = a.create_mesh("ghosts").await?;
    admin::share_mesh(&a.db, &a.config, &mesh.slug, B).await?;
    let alice = a.enroll(&mesh, "alice").await?;
    let mut alice_c = member_client(&a.ws_url(), &alice, &[]).await?;
    let (_ep, link) = play_b(&a, &oa, &ob, &mesh.mesh_id).await?;
    let (mut presence, _) = link.conn.open(StreamClass::Presence).await?;
    presence
        .send(&Frame::PresenceSnapshot {
            mesh_id: mesh.mesh_id.clone(),
            entries: (1..=20).map(fake_presence).collect(),
        })
        .await?;
    for v in 100..110 {
        presence
            .send(&Frame::PresenceUpsert {
                mesh_id: mesh.mesh_id.clone(),
                entry: Box::new(fake_presence(v)),
            })
            .await?;
    }
    fed::wait_link(a.addr, B, "25 presences refused", |l| l["refused"] == 25).await?;
    let peers = alice_c.sync().await?;
    let remote = peers["peers"]
        .as_array()
        .map_or(0, |p| p.iter().filter(|p| !p["broker"].is_null()).count());
    assert_eq!(remote, 5, "{peers}");
    let joined = alice_c
        .ws
        .drain_backlog(|v| v["event"] == "peer_joined")
        .len();
    assert_eq!(joined, 5);
    let metrics = a.metrics().await?;
    assert!(
        metrics.contains("meshd_federation_refused_total{reason=\"presence_limit\"} 25"),
        "{metrics}"
    );
    Ok(())
}
