//! `POST /join`: enrollment with claudemesh v1 invites, and the reference's holes closed.

use meshd_protocol::invite::{InvitePayload, Role};
use meshd_protocol::keys::SecretKey;
use meshd_tests::{Backend, Keypair, TestBroker, http, http_json};
use serde_json::json;

both! {
    /// A member invite enrolls a member, and a second use of a one-use invite fails.
    async fn join_and_exhaust(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("Team One").await?;
        let inv = broker.invite(&mesh.slug, Role::Member, 1).await?;
        let alice = Keypair::generate();
        let (status, body) = broker.join(&inv.token, &alice, "alice-1").await?;
        assert_eq!((status, body["ok"].clone()), (200, json!(true)), "{body}");
        let member_id = body["memberId"].as_str().unwrap().to_owned();
        assert_eq!(member_id.len(), 32);
        assert!(body.get("alreadyMember").is_none());

        // The same key again: already a member, the invite is not used up.
        let (status, again) = broker.join(&inv.token, &alice, "alice-1").await?;
        assert_eq!(status, 200);
        assert_eq!(again["alreadyMember"], true);
        assert_eq!(again["memberId"], member_id.as_str());

        // Another key: the one use is gone.
        let (status, body) = broker.join(&inv.token, &Keypair::generate(), "bob").await?;
        assert_eq!((status, body["error"].as_str()), (400, Some("invite_exhausted")), "{body}");

        let members = meshd::admin::list_members(&broker.db, &mesh.slug).await?;
        assert_eq!(members.len(), 1);
        assert_eq!((members[0].role.as_str(), members[0].pubkey.as_str()), ("member", alice.public_hex().as_str()));
        Ok(())
    }
}

both! {
    /// Uses are counted atomically: N concurrent joins on an invite with M < N uses
    /// enroll exactly M members.
    async fn concurrent_joins_respect_max_uses(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("race").await?;
        let inv = broker.invite(&mesh.slug, Role::Member, 3).await?;
        let joins = (0..10).map(|i| {
            let (token, keys, broker) = (inv.token.clone(), Keypair::generate(), &broker);
            async move { broker.join(&token, &keys, &format!("p{i}")).await }
        });
        let results = futures_util::future::join_all(joins).await;
        let ok = results.iter().filter(|r| matches!(r, Ok((200, _)))).count();
        let exhausted = results
            .iter()
            .filter(|r| matches!(r, Ok((400, v)) if v["error"] == "invite_exhausted"))
            .count();
        assert_eq!((ok, exhausted), (3, 7));
        assert_eq!(meshd::admin::list_members(&broker.db, &mesh.slug).await?.len(), 3);
        Ok(())
    }
}

both! {
    /// The role comes from the stored invite: editing the payload's role breaks its
    /// signature, and a validly signed admin payload does not ride on a member token.
    async fn tampered_role_is_refused(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("roles").await?;
        let member_inv = broker.invite(&mesh.slug, Role::Member, 5).await?;
        let admin_inv = broker.invite(&mesh.slug, Role::Admin, 5).await?;
        let key = Keypair::generate();

        // 1. Edit the role in the payload: signature check fails.
        let mut payload = InvitePayload::from_token(&member_inv.token).unwrap();
        payload.role = "admin".into();
        let body = json!({"invite_token": member_inv.token, "invite_payload": payload,
            "peer_pubkey": key.public_hex(), "display_name": "mallory"});
        let (status, v) = http_json(broker.addr, "POST", "/join", &body).await?;
        assert_eq!((status, v["error"].as_str()), (400, Some("invite_bad_signature")));

        // 2. The reference accepted any valid token with any signed payload: not here.
        let admin_payload = InvitePayload::from_token(&admin_inv.token).unwrap();
        let body = json!({"invite_token": member_inv.token, "invite_payload": admin_payload,
            "peer_pubkey": key.public_hex(), "display_name": "mallory"});
        let (status, v) = http_json(broker.addr, "POST", "/join", &body).await?;
        assert_eq!((status, v["error"].as_str()), (400, Some("invite_token_mismatch")));

        // 3. A payload signed by someone else's key, for this mesh.
        let forger = SecretKey::from_seed([9; 32]);
        let forged = InvitePayload::sign(&forger, &mesh.mesh_id, &mesh.slug, "ws://x/ws", 4_000_000_000, "k", Role::Admin);
        let body = json!({"invite_token": forged.to_token(), "invite_payload": forged,
            "peer_pubkey": key.public_hex(), "display_name": "mallory"});
        let (status, v) = http_json(broker.addr, "POST", "/join", &body).await?;
        assert_eq!((status, v["error"].as_str()), (400, Some("invite_owner_mismatch")));

        // Nothing was enrolled, and the member invite still works as a member invite.
        assert!(meshd::admin::list_members(&broker.db, &mesh.slug).await?.is_empty());
        let (status, _) = broker.join(&member_inv.token, &key, "honest").await?;
        assert_eq!(status, 200);
        let members = meshd::admin::list_members(&broker.db, &mesh.slug).await?;
        assert_eq!(members[0].role, "member");
        let admin_key = Keypair::generate();
        broker.join(&admin_inv.token, &admin_key, "boss").await?;
        let members = meshd::admin::list_members(&broker.db, &mesh.slug).await?;
        assert!(members.iter().any(|m| m.pubkey == admin_key.public_hex() && m.role == "admin"));
        Ok(())
    }
}

both! {
    /// A corrupted signature, an expired invite, a revoked member, bad input.
    async fn refusals(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("refuse").await?;
        let inv = broker.invite(&mesh.slug, Role::Member, 10).await?;
        let key = Keypair::generate();

        let mut payload = InvitePayload::from_token(&inv.token).unwrap();
        let mut sig = payload.signature.into_bytes();
        sig[0] = if sig[0] == b'a' { b'b' } else { b'a' };
        payload.signature = String::from_utf8(sig).unwrap();
        let body = json!({"invite_token": inv.token, "invite_payload": payload,
            "peer_pubkey": key.public_hex(), "display_name": "x"});
        let (status, v) = http_json(broker.addr, "POST", "/join", &body).await?;
        assert_eq!((status, v["error"].as_str()), (400, Some("invite_bad_signature")));

        for (body, error) in [
            (json!({"invite_token": inv.token}), "invite_token, invite_payload, peer_pubkey, display_name required"),
            (json!({"invite_token": inv.token, "invite_payload": {}, "peer_pubkey": "abc", "display_name": "x"}),
             "peer_pubkey must be 64 hex chars (32 bytes)"),
            (json!({"invite_token": inv.token, "invite_payload": {"v": 1}, "peer_pubkey": key.public_hex(), "display_name": "x"}),
             "invite_malformed"),
        ] {
            let (status, v) = http_json(broker.addr, "POST", "/join", &body).await?;
            assert_eq!((status, v["error"].as_str()), (400, Some(error)), "{body}");
        }
        let (status, _, body) = http(broker.addr, "POST", "/join", Some(b"not json")).await?;
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
        let (status, _, _) = http(broker.addr, "POST", "/join", Some(&vec![b' '; 100 * 1024])).await?;
        assert_eq!(status, 413);

        // Expire the invite in the store (its stored expiry is authoritative).
        let expired = broker.invite(&mesh.slug, Role::Member, 10).await?;
        match &broker.db {
            meshd::store::Db::Sqlite(p, _) => {
                sqlx::query("UPDATE invite SET expires_at = 1 WHERE token = $1").bind(&expired.token).execute(p).await?;
            }
            meshd::store::Db::Postgres(p) => {
                sqlx::query("UPDATE invite SET expires_at = 1 WHERE token = $1").bind(&expired.token).execute(p).await?;
            }
        }
        let (status, v) = broker.join(&expired.token, &key, "late").await?;
        assert_eq!((status, v["error"].as_str()), (400, Some("invite_expired")));

        // A revoked key cannot enroll again with a fresh invite.
        let (status, _) = broker.join(&inv.token, &key, "soon-revoked").await?;
        assert_eq!(status, 200);
        meshd::admin::revoke_member(&broker.db, &mesh.slug, &key.public_hex()).await?;
        let (status, v) = broker.join(&inv.token, &key, "back-again").await?;
        assert_eq!((status, v["error"].as_str()), (400, Some("member_revoked")));
        Ok(())
    }
}

both! {
    /// A key already presented as someone's session key cannot enroll as a member:
    /// it would capture the DMs addressed to that session.
    async fn session_key_cannot_enroll(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("squat").await?;
        let alice = broker.enroll(&mesh, "alice").await?;
        let mut session = broker.connect(&alice).await?;
        // A round trip after hello: the session key binding was queued before it.
        session.sync().await?;
        let inv = broker.invite(&mesh.slug, Role::Member, 5).await?;
        let (status, v) = broker.join(&inv.token, session.dm_keys(), "mallory").await?;
        assert_eq!((status, v["error"].as_str()), (400, Some("pubkey_in_use")), "{v}");
        // The invite was not used up by the refusal; an unrelated key still enrolls.
        let (status, v) = broker.join(&inv.token, &Keypair::generate(), "bob").await?;
        assert_eq!(status, 200, "{v}");
        assert_eq!(meshd::admin::list_members(&broker.db, &mesh.slug).await?.len(), 2);
        Ok(())
    }
}
