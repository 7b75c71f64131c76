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

pub(crate) const A: &str = "mesh.alpha.test";
pub(crate) const B: &str = "mesh.beta.test";
pub(crate) const C: &str = "mesh.gamma.test";

/// Starts an in-process broker of `org` named `name`.
pub(crate) async fn start(
    org: &Org,
    name: &str,
    dns: Option<SocketAddr>,
    peers: Vec<FederationPeer>,
) -> anyhow::Result<TestBroker> {
    start_on(Backend::Sqlite, org, name, dns, peers).await
}

/// [`start`] on a given store: some scenarios put one broker on PostgreSQL, so the
/// federation tables are exercised on both backends (and mixed backends interoperate).
pub(crate) async fn start_on(
    backend: Backend,
    org: &Org,
    name: &str,
    dns: Option<SocketAddr>,
    peers: Vec<FederationPeer>,
) -> anyhow::Result<TestBroker> {
    start_tweaked(backend, org, name, dns, peers, |_| {}).await
}

pub(crate) async fn start_tweaked(
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
pub(crate) fn publish(dns: &TestDns, name: &str, quic: SocketAddr) {
    let host = format!("host.{name}");
    dns.set_srv(
        &format!("_meshd._udp.{name}"),
        &[(10, 10, quic.port(), host.as_str())],
    );
    dns.set_a(&host, Ipv4Addr::LOCALHOST);
}

/// Waits for the replica of `mesh_id` on a broker and returns it as a `MeshCreated`.
pub(crate) async fn replica(db: &meshd::store::Db, mesh_id: &str) -> anyhow::Result<MeshCreated> {
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
pub(crate) async fn member_client(
    url: &str,
    m: &Member,
    groups: &[&str],
) -> anyhow::Result<Client> {
    let opts = HelloOpts {
        session: None,
        groups: groups.iter().map(|g| ((*g).to_owned(), None)).collect(),
        ..HelloOpts::default()
    };
    Client::connect(url, m, opts).await
}

pub(crate) fn broker_of<'a>(peers: &'a Value, key: &str) -> Option<&'a Value> {
    peers["peers"]
        .as_array()?
        .iter()
        .find(|p| p["pubkey"] == key)
        .map(|p| &p["broker"])
}

/// Three organizations with their own CAs and three brokers found through DNS SRV, each
/// linked to the other two.
pub(crate) struct Trio {
    pub(crate) a: TestBroker,
    pub(crate) b: TestBroker,
    pub(crate) c: TestBroker,
    pub(crate) dns: TestDns,
    /// The CAs and certificate files.
    pub(crate) _orgs: (Org, Org, Org),
}

impl Trio {
    /// Starts the three brokers (A on `a_backend`) and waits for the three links.
    pub(crate) async fn start(a_backend: Backend) -> anyhow::Result<Self> {
        let dns = TestDns::start().await?;
        let (oa, ob, oc) = (
            Org::new("alpha.test")?,
            Org::new("beta.test")?,
            Org::new("gamma.test")?,
        );
        let ns = Some(dns.addr());
        let a = start_on(
            a_backend,
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
        Ok(Self {
            a,
            b,
            c,
            dns,
            _orgs: (oa, ob, oc),
        })
    }

    /// A mesh homed at A, shared with B and C and flowing on every link: its row at A,
    /// B and C.
    pub(crate) async fn shared_mesh(&self, name: &str) -> anyhow::Result<[MeshCreated; 3]> {
        let (a, b, c) = (&self.a, &self.b, &self.c);
        let mesh = a.create_mesh(name).await?;
        admin::share_mesh(&a.db, &a.config, &mesh.slug, B).await?;
        admin::share_mesh(&a.db, &a.config, &mesh.slug, C).await?;
        admin::accept_mesh(&b.db, &b.config, &mesh.mesh_id, A).await?;
        admin::accept_mesh(&c.db, &c.config, &mesh.mesh_id, A).await?;
        let mesh_b = replica(&b.db, &mesh.mesh_id).await?;
        let mesh_c = replica(&c.db, &mesh.mesh_id).await?;
        for (br, peers) in [(a, [B, C]), (b, [A, C]), (c, [A, B])] {
            for p in peers {
                fed::wait_flowing(br.addr, p, &mesh.mesh_id).await?;
            }
        }
        Ok([mesh, mesh_b, mesh_c])
    }
}

/// Three organizations, three brokers (A on PostgreSQL, B and C on SQLite), everything
/// found through DNS SRV; a mesh homed at A shared with B and C; members enrolled at each broker exchange DMs (opened by the
/// recipient), broadcasts and group messages, and see each other's presence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_organizations_share_a_mesh() -> anyhow::Result<()> {
    let t = Trio::start(Backend::Postgres).await?;
    assert!(
        t.dns.queries(&format!("_meshd._udp.{C}")) > 0,
        "C was found through its SRV record"
    );
    let [mesh, mesh_b, mesh_c] = t.shared_mesh("Joint Ops").await?;
    let (a, b, c) = (&t.a, &t.b, &t.c);

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
        cl.expect_no_messages().await?;
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
    assert_eq!(link.broker, A);
    Ok(())
}

pub(crate) fn link_opts() -> meshd_federation::LinkOptions {
    meshd_federation::LinkOptions {
        keepalive: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(5),
        max_frame_bytes: 4 << 20,
        handshake_timeout: Duration::from_secs(5),
    }
}

/// The test plays broker B (with B's real certificate) over a raw link to A, sharing
/// `mesh_id`; returns once the mesh flows.
pub(crate) async fn play_b(
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
            tags: Vec::new(),
            bridged: None,
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
pub(crate) struct CutPair {
    pub(crate) a: TestBroker,
    pub(crate) b: TestBroker,
    pub(crate) to_b: FaultProxy,
    pub(crate) to_a: FaultProxy,
    pub(crate) mesh: MeshCreated,
    pub(crate) alice: Client,
    pub(crate) alice_member: Member,
    pub(crate) bob: Member,
    /// The CAs and certificate files (a restart reads them again).
    pub(crate) _orgs: (Org, Org),
}

pub(crate) async fn cut_pair() -> anyhow::Result<CutPair> {
    linked_pair(|_| {}, Backend::Postgres).await
}

/// [`cut_pair`] with A's configuration adjusted and B on `b_backend`.
pub(crate) async fn linked_pair(
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
pub(crate) async fn until_known(alice: &mut Client, bob: &Member) -> anyhow::Result<()> {
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
pub(crate) async fn receive_in_order(
    bob: &mut Client,
    from: usize,
    n: usize,
) -> anyhow::Result<()> {
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
pub(crate) fn process_config(
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
pub(crate) fn fake_b(oa: &Org, ob: &Org) -> anyhow::Result<meshd_federation::Endpoint> {
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

pub(crate) fn b_hello(mesh_id: &str) -> wire::Hello {
    wire::Hello {
        version: wire::VERSION,
        broker: B.into(),
        caps: vec![],
        meshes: vec![wire::MeshClaim {
            mesh_id: mesh_id.to_owned(),
        }],
    }
}

pub(crate) async fn next_held(
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

pub(crate) async fn until_ended(
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
pub(crate) async fn simultaneous_dial_case(
    winner_first: bool,
    share_after: bool,
) -> anyhow::Result<()> {
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

pub(crate) fn fake_presence(version: u64) -> wire::PresenceEntry {
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
        tags: Vec::new(),
        position: None,
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

/// Polls `list_tasks` on `c` until the task `id` satisfies `pred`.
pub(crate) async fn until_task(
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

/// A cut pair with bob online on B (his own client) and listed on A: the start of the
/// features' cross-broker tests. Returns the pair, bob's client and his key.
pub(crate) async fn pair_with_bob_online() -> anyhow::Result<(CutPair, Client, String)> {
    let mut p = cut_pair().await?;
    until_known(&mut p.alice, &p.bob).await?;
    let bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
    let bob_key = p.bob.keys.public_hex();
    p.alice
        .until_peers("bob listed", |v| broker_of(v, &bob_key).is_some())
        .await?;
    Ok((p, bob, bob_key))
}
