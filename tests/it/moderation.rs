//! Moderation (`kick`, `disconnect`, `ban`, `unban`, `list_bans`).

use meshd_protocol::invite::Role;
use meshd_tests::{Backend, Client, TestBroker};
use serde_json::{Value, json};

/// Names in a `list_peers` answer.
fn names(peers: &Value) -> Vec<String> {
    let mut n: Vec<String> = peers["peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["displayName"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    n.sort();
    n
}

both! {
    /// Only admins kick, disconnect, ban and unban (a member is refused, with its
    /// `_reqId`). A kick closes a session with 4001 and leaves control-plane connections
    /// be; `disconnect` closes with 1000; both go through the normal teardown, so the
    /// others hear `peer_left` and the peer list shrinks. A ban revokes the member,
    /// closes it with 4002, is listed by anyone and refuses its next hello; an unban lets
    /// it back in.
    async fn moderation(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("mod").await?;
        let root = broker.enroll_as(&mesh, "root", Role::Admin).await?;
        let bob = broker.enroll(&mesh, "bob").await?;
        let carol = broker.enroll(&mesh, "carol").await?;
        let mut r = broker.connect(&root).await?;
        let mut c = broker.connect(&carol).await?;
        let mut bob_session = Client::connect_session(&broker.ws_url(), &bob).await?;
        let mut bob_daemon = broker.connect(&bob).await?;

        for frame in [
            json!({"type": "kick", "target": "bob"}),
            json!({"type": "disconnect", "all": true}),
            json!({"type": "ban", "target": "bob"}),
            json!({"type": "unban", "target": "bob"}),
        ] {
            let no = c.request(frame.clone()).await?;
            assert_eq!((no["type"].as_str(), no["code"].as_str()), (Some("error"), Some("forbidden")), "{frame}: {no}");
        }
        let bad = r.request(json!({"type": "kick", "target": "bob", "all": true})).await?;
        assert_eq!(bad["type"], "error", "{bad}");

        // Kick bob: his session goes, his daemon (control-plane) stays.
        let kicked = r.request(json!({"type": "kick", "target": "bob"})).await?;
        assert_eq!(kicked["type"], "kick_ack", "{kicked}");
        assert_eq!(kicked["kicked"], json!(["bob"]));
        assert_eq!(kicked["affected"], json!(["bob"]));
        assert_eq!(kicked["skipped_control_plane"], json!(["bob"]));
        assert_eq!(bob_session.ws.expect_close().await, Some((4001, "kicked".into())));
        let left = c.expect_event("peer_left").await?;
        assert_eq!(left["eventData"]["name"], "bob");
        let peers = r.until_peers("bob's session gone", |p| names(p).len() == 3).await?;
        assert_eq!(names(&peers), ["bob", "carol", "root"], "{peers}");

        // Disconnect everyone else: bob's daemon and carol, not the caller.
        let gone = r.request(json!({"type": "disconnect", "all": true})).await?;
        assert_eq!(gone["type"], "disconnect_ack", "{gone}");
        let mut closed: Vec<String> = gone["kicked"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect();
        closed.sort();
        assert_eq!(closed, ["bob", "carol"]);
        assert_eq!(bob_daemon.ws.expect_close().await, Some((1000, "disconnected".into())));
        assert_eq!(c.ws.expect_close().await, Some((1000, "disconnected".into())));
        r.until_peers("only root left", |p| names(p) == ["root"]).await?;

        // Stale: carol comes back; a generous threshold spares her, none does not.
        let mut c = broker.connect(&carol).await?;
        let spared = r.request(json!({"type": "disconnect", "stale": 3_600_000})).await?;
        assert_eq!(spared["kicked"], json!([]), "{spared}");
        let deadline = tokio::time::Instant::now() + meshd_tests::patience();
        loop {
            let v = r.request(json!({"type": "kick", "stale": 0})).await?;
            if v["skipped_control_plane"] == json!(["carol"]) {
                break;
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "carol never stale: {v}");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        c.sync().await?;

        // Ban: by name; the member's connections close with 4002, the next hello fails.
        let mut bob_daemon = broker.connect(&bob).await?;
        let me = r.request(json!({"type": "ban", "target": "root"})).await?;
        assert_eq!((me["type"].as_str(), me["message"].as_str()), (Some("error"), Some("cannot ban yourself")));
        let blank = r.request(json!({"type": "ban"})).await?;
        assert_eq!((blank["code"].as_str(), blank["message"].as_str()), (Some("invalid"), Some("target required")), "{blank}");
        let nobody = r.request(json!({"type": "ban", "target": "zed"})).await?;
        assert_eq!(nobody["code"], "not_found");
        let banned = r.request(json!({"type": "ban", "target": "bob", "reason": "spam"})).await?;
        assert_eq!((banned["type"].as_str(), banned["banned"].as_str()), (Some("ban_ack"), Some("bob")), "{banned}");
        assert_eq!(bob_daemon.ws.expect_close().await, Some((4002, "banned".into())));
        assert_eq!(c.expect_event("peer_left").await?["eventData"]["name"], "bob");
        let refused = broker.connect(&bob).await;
        assert!(refused.as_ref().is_err_and(|e| e.to_string().contains("revoked")), "{:?}", refused.err());
        let bans = c.request(json!({"type": "list_bans"})).await?;
        assert_eq!(bans["type"], "list_bans_result");
        assert_eq!(bans["bans"].as_array().map(Vec::len), Some(1), "{bans}");
        assert_eq!(bans["bans"][0]["name"], "bob");
        assert_eq!(bans["bans"][0]["pubkey"], bob.keys.public_hex().as_str());
        assert!(bans["bans"][0]["revokedAt"].as_str().is_some_and(|t| t.ends_with('Z')));
        let audit = r.request(json!({"type": "audit_query", "eventType": "member_banned"})).await?;
        assert_eq!(audit["entries"][0]["payload"]["targetPubkey"], bob.keys.public_hex().as_str(), "{audit}");

        // Unban by key.
        let again = r.request(json!({"type": "ban", "target": "bob"})).await?;
        assert_eq!(again["code"], "not_found", "already banned");
        let unbanned = r.request(json!({"type": "unban", "target": bob.keys.public_hex()})).await?;
        assert_eq!((unbanned["type"].as_str(), unbanned["unbanned"].as_str()), (Some("unban_ack"), Some("bob")), "{unbanned}");
        let mut back = broker.connect(&bob).await?;
        back.sync().await?;
        let bans = c.request(json!({"type": "list_bans"})).await?;
        assert_eq!(bans["bans"], json!([]));
        Ok(())
    }
}

/// Across federated brokers: a ban on the member's home broker reaches the other
/// broker (DMs to the member are refused there), and so does the unban.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ban_and_unban_across_brokers() -> anyhow::Result<()> {
    use crate::federation::*;
    let mut p = cut_pair().await?;
    until_known(&mut p.alice, &p.bob).await?;
    let mesh_b = replica(&p.b.db, &p.mesh.mesh_id).await?;
    let admin = p.b.enroll_as(&mesh_b, "root", Role::Admin).await?;
    let mut root = p.b.connect(&admin).await?;
    let bob_key = p.bob.keys.public_hex();
    let banned = root
        .request(json!({"type": "ban", "target": "bob"}))
        .await?;
    assert_eq!(banned["type"], "ban_ack", "{banned}");
    // A's own admins cannot ban B's member: its home broker decides.
    let a_admin = p.a.enroll_as(&p.mesh, "aroot", Role::Admin).await?;
    let mut aroot = p.a.connect(&a_admin).await?;
    let deadline = tokio::time::Instant::now() + 3 * meshd_tests::patience();
    loop {
        let ack = p.alice.dm(&bob_key, "still there?", "now").await?;
        if ack["error"].as_str().is_some_and(|e| e.contains("removed")) {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the ban never reached A: {ack}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let remote = aroot
        .request(json!({"type": "unban", "target": "bob"}))
        .await?;
    assert_eq!(remote["code"], "forbidden", "{remote}");
    let unbanned = root
        .request(json!({"type": "unban", "target": "bob"}))
        .await?;
    assert_eq!(unbanned["type"], "unban_ack", "{unbanned}");
    let deadline = tokio::time::Instant::now() + 3 * meshd_tests::patience();
    loop {
        let ack = p.alice.dm(&bob_key, "welcome back", "now").await?;
        if ack["error"].is_null() {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the unban never reached A: {ack}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
    let (_, text) = bob.expect_message().await?;
    assert!(text == "probe" || text == "welcome back", "{text}");
    Ok(())
}

/// `member_role` on B's member (B on PostgreSQL): B decides, A learns the role from the
/// member announcement, and A's admins cannot change it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_change_reaches_the_peer_broker() -> anyhow::Result<()> {
    use crate::federation::*;
    let mut p = cut_pair().await?;
    until_known(&mut p.alice, &p.bob).await?;
    let mesh_b = replica(&p.b.db, &p.mesh.mesh_id).await?;
    let admin = p.b.enroll_as(&mesh_b, "root", Role::Admin).await?;
    let mut root = p.b.connect(&admin).await?;
    let bob_key = p.bob.keys.public_hex();
    let set = root
        .request(json!({"type": "member_role", "target": "bob", "role": "admin"}))
        .await?;
    assert_eq!(
        (
            set["type"].as_str(),
            set["role"].as_str(),
            set["pubkey"].as_str()
        ),
        (
            Some("member_role_set"),
            Some("admin"),
            Some(bob_key.as_str())
        ),
        "{set}"
    );
    meshd_tests::eventually("bob an admin at A", || async {
        let m =
            p.a.db
                .member_by_pubkey(&p.mesh.mesh_id, &bob_key)
                .await
                .ok()??;
        (m.role == "admin").then_some(())
    })
    .await?;
    let a_admin = p.a.enroll_as(&p.mesh, "aroot", Role::Admin).await?;
    let mut aroot = p.a.connect(&a_admin).await?;
    let remote = aroot
        .request(json!({"type": "member_role", "target": bob_key, "role": "member"}))
        .await?;
    assert_eq!(remote["code"], "forbidden", "{remote}");
    // Bob, an admin now, may demote root at B; an unknown name is not found.
    let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
    let down = bob
        .request(json!({"type": "member_role", "target": "root", "role": "member"}))
        .await?;
    assert_eq!(down["type"], "member_role_set", "{down}");
    let missing = bob
        .request(json!({"type": "member_role", "target": "nobody", "role": "admin"}))
        .await?;
    assert_eq!(missing["code"], "not_found", "{missing}");
    let refused = root
        .request(json!({"type": "member_role", "target": "bob", "role": "member"}))
        .await?;
    assert_eq!(
        refused["code"], "forbidden",
        "root is no longer an admin: {refused}"
    );
    Ok(())
}

/// Naming a member: exactly one must match, or the refusal says why — for bans, unbans
/// and role changes alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_names_exactly_one_member() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("names").await?;
    let admin = broker.enroll_as(&mesh, "root", Role::Admin).await?;
    broker.enroll(&mesh, "twin").await?;
    broker.enroll(&mesh, "twin").await?;
    let mut root = broker.connect(&admin).await?;
    for (frame, code, message) in [
        (
            json!({"type": "ban", "target": "twin"}),
            "invalid",
            "2 members match \"twin\"; give the full key",
        ),
        (
            json!({"type": "member_role", "target": "twin", "role": "admin"}),
            "invalid",
            "2 members match \"twin\"; give the key",
        ),
        (
            json!({"type": "ban", "target": "nobody"}),
            "not_found",
            "no member matches \"nobody\"",
        ),
        (
            json!({"type": "unban", "target": "twin"}),
            "not_found",
            "no banned member matches \"twin\"",
        ),
        (
            json!({"type": "member_role", "target": "nobody", "role": "member"}),
            "not_found",
            "no member matches \"nobody\"",
        ),
    ] {
        let v = root.request(frame.clone()).await?;
        assert_eq!(
            (v["code"].as_str(), v["message"].as_str()),
            (Some(code), Some(message)),
            "{frame} → {v}"
        );
    }
    Ok(())
}
