//! Link policies: per shared mesh and peer broker, what may leave (export) and enter
//! (import) — kinds, tags, presence fields — enforced by each side, counted, reported
//! to the sender, and changed on a running daemon.

use meshd::admin::{self, MessageKind, PolicyDirection, PolicyRules, PresenceField};
use meshd_tests::{Backend, TestBroker};
use serde_json::{Value, json};

use crate::federation::*;

fn strings(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| (*s).to_owned()).collect()
}

/// The entry of `key` in a `peers_list`.
fn entry<'a>(peers: &'a Value, key: &str) -> Option<&'a Value> {
    peers["peers"]
        .as_array()?
        .iter()
        .find(|p| p["pubkey"] == key)
}

/// `meshd_federation_policy_refused_total{reason="…"}` of a broker.
async fn policy_metric(b: &TestBroker, reason: &str) -> anyhow::Result<u64> {
    let text = b.metrics().await?;
    let needle = format!("meshd_federation_policy_refused_total{{reason=\"{reason}\"}} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(needle.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

/// Stores rules and waits until the running broker has them in force.
async fn set(
    b: &TestBroker,
    mesh: &str,
    broker: &str,
    d: PolicyDirection,
    rules: PolicyRules,
) -> anyhow::Result<()> {
    let p = admin::set_policy(&b.db, &b.config, mesh, broker, d, rules).await?;
    let want = serde_json::to_value(&p.rules)?;
    meshd_tests::eventually("the policy in force", || async {
        let st = meshd_tests::fed::status(b.addr).await.ok()?;
        st["policies"]
            .as_array()?
            .iter()
            .any(|x| {
                x["meshId"] == p.mesh_id.as_str()
                    && x["peer"] == broker
                    && x[p.direction.as_str()] == want
            })
            .then_some(())
    })
    .await
}

/// A's export policy for B denies a tag and withholds presence fields; C's import policy
/// for A refuses broadcasts and a tag, and C's import from B withholds summaries. Each
/// side enforces its own half, counts it, and the sender learns it (`ack.error` for a DM
/// its own broker refuses, `message_status` for the rest). Resetting A's policy applies
/// to the running brokers: B sees what it was denied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_are_enforced_on_each_side() -> anyhow::Result<()> {
    let t = Trio::start(Backend::Sqlite).await?;
    let [ma, mb, mc] = t.shared_mesh("policed").await?;
    let id = ma.mesh_id.clone();
    set(
        &t.a,
        &ma.slug,
        B,
        PolicyDirection::Export,
        PolicyRules {
            deny_tags: strings(&["secret"]),
            presence_fields: Some(vec![PresenceField::Status, PresenceField::Tags]),
            ..PolicyRules::default()
        },
    )
    .await?;
    set(
        &t.c,
        &id,
        A,
        PolicyDirection::Import,
        PolicyRules {
            kinds: Some(vec![MessageKind::Dm, MessageKind::Tagged]),
            deny_tags: strings(&["hr"]),
            ..PolicyRules::default()
        },
    )
    .await?;
    set(
        &t.c,
        &mc.slug,
        B,
        PolicyDirection::Import,
        PolicyRules {
            presence_fields: Some(vec![PresenceField::Status, PresenceField::Cwd]),
            ..PolicyRules::default()
        },
    )
    .await?;
    let shown = admin::show_policies(&t.c.db, &mc.slug, None).await?;
    assert_eq!(shown.len(), 2, "{shown:?}");

    let alice = t.a.enroll(&ma, "alice").await?;
    let bob = t.b.enroll(&mb, "bob").await?;
    let carol = t.c.enroll(&mc, "carol").await?;
    let mut alice = member_client(&t.a.ws_url(), &alice, &[]).await?;
    let mut bob = member_client(&t.b.ws_url(), &bob, &[]).await?;
    let mut carol = member_client(&t.c.ws_url(), &carol, &[]).await?;
    bob.subscribe_tags(&["secret"]).await?;
    carol.subscribe_tags(&["secret"]).await?;
    for c in [&mut alice, &mut bob] {
        c.send(json!({"type": "set_summary", "summary": "on call"}))
            .await?;
    }
    let (ak, bk, ck) = (alice.key(), bob.key(), carol.key());

    // Presence fields: B sees alice without cwd, hostname or summary (A's export);
    // C sees all of alice, but bob without his summary or hostname (C's import).
    let seen = bob
        .until_peers("alice at B, subscribed, withheld fields", |v| {
            entry(v, &ak).is_some_and(|e| e["status"] == "idle")
                && entry(v, &ck).is_some_and(|e| e["tags"] == json!(["secret"]))
        })
        .await?;
    let a_at_b = entry(&seen, &ak).unwrap();
    assert_eq!(
        (&a_at_b["cwd"], &a_at_b["summary"]),
        (&json!(""), &Value::Null),
        "{a_at_b}"
    );
    assert!(a_at_b.get("hostname").is_none(), "{a_at_b}");
    let seen = carol
        .until_peers("alice and bob at C", |v| {
            entry(v, &ak).is_some_and(|e| e["summary"] == "on call")
                && entry(v, &bk).is_some_and(|e| e["tags"].is_null() && e["cwd"] == "/work/project")
        })
        .await?;
    let b_at_c = entry(&seen, &bk).unwrap();
    assert_eq!(
        b_at_c["summary"],
        Value::Null,
        "C's import withholds bob's summary: {b_at_c}"
    );
    assert!(b_at_c.get("hostname").is_none(), "{b_at_c}");
    let seen = alice
        .until_peers("bob at A with his summary", |v| {
            entry(v, &bk).is_some_and(|e| e["summary"] == "on call")
        })
        .await?;
    assert_eq!(
        entry(&seen, &bk).unwrap()["hostname"],
        "test-host",
        "A imports everything"
    );
    let b_at_c_withheld = policy_metric(&t.c, "import_field").await?;
    assert!(
        b_at_c_withheld >= 2,
        "summary and hostname withheld at C, counted: {b_at_c_withheld}"
    );
    assert!(policy_metric(&t.a, "export_field").await? >= 3);

    // A DM to bob tagged `secret`: A's export refuses it in the ack.
    let ack = alice.dm_tagged(&bk, "the password", &["secret"]).await?;
    assert_eq!(ack["queued"], false, "{ack}");
    let err = ack["error"].as_str().unwrap();
    assert!(
        err.starts_with("policy_denied") && err.contains(B) && err.contains("secret"),
        "{err}"
    );
    assert_eq!(policy_metric(&t.a, "export_tag_denied").await?, 1);

    // tag:secret reaches carol, not bob; message_status says why.
    let ack = alice.send_tagged("tag:secret", "rotate keys", &[]).await?;
    assert_eq!(ack["queued"], true, "{ack}");
    assert_eq!(carol.expect_message().await?.1, "rotate keys");
    let st = alice
        .request(json!({"type": "message_status", "messageId": ack["messageId"]}))
        .await?;
    assert_eq!(
        st["refused"],
        json!([{"broker": B, "by": "export", "reason": "tag:secret"}]),
        "{st}"
    );
    let statuses: Vec<(&str, &str)> = st["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["status"].as_str().unwrap()))
        .collect();
    assert!(
        statuses.contains(&("bob", "refused")) && statuses.contains(&("carol", "delivered")),
        "{st}"
    );

    // A broadcast reaches bob; C's import refuses it, counts it and tells A.
    let ack = alice.multicast("*", "all hands").await?;
    assert_eq!(bob.expect_message().await?.1, "all hands");
    let st = alice
        .until_status(&ack["messageId"], |s| {
            s["refused"].as_array().is_some_and(|r| !r.is_empty())
        })
        .await?;
    assert_eq!(
        st["refused"],
        json!([{"broker": C, "by": "import", "reason": "kind:broadcast"}])
    );
    assert_eq!(policy_metric(&t.c, "import_kind").await?, 1);
    let fed_c = meshd_tests::fed::status(t.c.addr).await?;
    let link = meshd_tests::fed::link(&fed_c, A).unwrap();
    assert_eq!(link["policyRefused"]["import_kind"], 1, "{link}");

    // A DM to carol passes C's import; one tagged `hr` is rejected there and the
    // sender's message_status shows it refused.
    alice.dm(&ck, "hello carol", "now").await?;
    assert_eq!(carol.expect_message().await?.1, "hello carol");
    let ack = alice.dm_tagged(&ck, "salary review", &["hr/pay"]).await?;
    assert_eq!(ack["queued"], true, "A's own policy lets it leave: {ack}");
    let st = alice
        .until_status(&ack["messageId"], |s| {
            s["recipients"][0]["status"] == "refused"
        })
        .await?;
    assert_eq!(st["recipients"][0]["reason"], "policy_denied", "{st}");
    assert_eq!(policy_metric(&t.c, "import_tag_denied").await?, 1);

    for c in [&mut alice, &mut bob, &mut carol] {
        c.expect_no_messages().await?;
    }

    // Reset A's export rules: the running brokers apply it; bob sees alice's fields
    // and gets a `secret` DM.
    assert_eq!(admin::reset_policy(&t.a.db, &id, B, None).await?, 1);
    bob.until_peers("alice's fields at B again", |v| {
        entry(v, &ak).is_some_and(|e| e["cwd"] == "/work/project" && e["summary"] == "on call")
    })
    .await?;
    let ack = alice.dm_tagged(&bk, "now it may pass", &["secret"]).await?;
    assert_eq!(ack["queued"], true, "{ack}");
    let (push, text) = bob.expect_message().await?;
    assert_eq!(
        (text.as_str(), &push["tags"]),
        ("now it may pass", &json!(["secret"]))
    );
    Ok(())
}

/// Bad rules are refused before they are stored; a mesh or broker that does not exist
/// is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_policies_are_refused() -> anyhow::Result<()> {
    let t = Trio::start(Backend::Sqlite).await?;
    let [ma, ..] = t.shared_mesh("strict").await?;
    let bad = PolicyRules {
        allow_tags: Some(strings(&["ok", "not ok"])),
        ..PolicyRules::default()
    };
    let e = admin::set_policy(
        &t.a.db,
        &t.a.config,
        &ma.slug,
        B,
        PolicyDirection::Export,
        bad,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("not ok"), "{e}");
    let e = admin::set_policy(
        &t.a.db,
        &t.a.config,
        &ma.slug,
        "mesh.nobody.test",
        PolicyDirection::Export,
        PolicyRules::default(),
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string().contains("not a configured peer broker"),
        "{e}"
    );
    let e = admin::show_policies(&t.a.db, "no-such-mesh", None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no-such-mesh"), "{e}");
    assert!(
        admin::show_policies(&t.a.db, &ma.slug, None)
            .await?
            .is_empty()
    );
    Ok(())
}

/// `meshd mesh policy set|show|reset` store and print the rules; bad names and
/// prefixes are refused with a message and nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_commands() -> anyhow::Result<()> {
    let (oa, ob) = (
        meshd_tests::fed::Org::new("alpha.test")?,
        meshd_tests::fed::Org::new("beta.test")?,
    );
    let dir = tempfile::tempdir()?;
    let dns: std::net::SocketAddr = "127.0.0.1:9".parse()?;
    let (cfg, data) = process_config(&oa, A, dns, &[(B, &ob)], "1s", dir.path())?;
    let data = data.to_str().unwrap_or_default().to_owned();
    let cli = |args: Vec<&str>| {
        let mut all = vec!["--config", cfg.as_str(), "--data-dir", data.as_str()];
        all.extend(args);
        let all: Vec<String> = all.into_iter().map(str::to_owned).collect();
        async move {
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            meshd_tests::run_cli(crate::DAEMON, &refs, &[]).await
        }
    };
    let (code, _, err) = cli(vec!["mesh", "create", "Ops", "--json"]).await?;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = cli(vec![
        "mesh",
        "policy",
        "set",
        "ops",
        "--broker",
        B,
        "--direction",
        "export",
        "--kinds",
        "dm,tagged",
        "--deny-tags",
        "secret,hr/",
        "--presence-fields",
        "status,groups",
        "--json",
    ])
    .await?;
    assert_eq!(code, 0, "{err}");
    let set: Value = serde_json::from_str(out.trim())?;
    assert_eq!(
        set["rules"],
        json!({"kinds": ["dm", "tagged"], "denyTags": ["secret", "hr/"], "presenceFields": ["status", "groups"]})
    );
    let (code, _, err) = cli(vec![
        "mesh",
        "policy",
        "set",
        "ops",
        "--broker",
        B,
        "--direction",
        "import",
        "--presence-fields",
        "none",
    ])
    .await?;
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = cli(vec!["mesh", "policy", "show", "ops"]).await?;
    assert_eq!(code, 0);
    assert!(out.contains("export mesh.beta.test  kinds=dm,tagged  deny-tags=secret,hr/  presence-fields=status,groups"), "{out}");
    assert!(
        out.contains("import mesh.beta.test  presence-fields=none"),
        "{out}"
    );
    for (args, needle) in [
        (
            vec!["--kinds", "dm,carrier-pigeon"],
            "unknown message kind \"carrier-pigeon\"",
        ),
        (
            vec!["--presence-fields", "shoe_size"],
            "unknown presence field",
        ),
        (vec!["--allow-tags", "a b"], "invalid tag prefix"),
    ] {
        let mut a = vec![
            "mesh",
            "policy",
            "set",
            "ops",
            "--broker",
            B,
            "--direction",
            "export",
        ];
        a.extend(args);
        let (code, _, err) = cli(a).await?;
        assert_ne!(code, 0);
        assert!(err.contains(needle), "{err}");
    }
    let (code, out, _) = cli(vec![
        "mesh", "policy", "show", "ops", "--broker", B, "--json",
    ])
    .await?;
    assert_eq!(code, 0);
    let shown: Value = serde_json::from_str(out.trim())?;
    assert_eq!(
        shown["policies"].as_array().map(Vec::len),
        Some(2),
        "refused sets stored nothing: {shown}"
    );
    let (code, out, _) = cli(vec![
        "mesh",
        "policy",
        "reset",
        "ops",
        "--broker",
        B,
        "--direction",
        "import",
        "--json",
    ])
    .await?;
    assert_eq!((code, out.trim()), (0, r#"{"removed":1}"#));
    let (_, out, _) = cli(vec!["mesh", "policy", "show", "ops", "--json"]).await?;
    let shown: Value = serde_json::from_str(out.trim())?;
    assert_eq!(shown["policies"][0]["direction"], "export");
    assert_eq!(shown["policies"].as_array().map(Vec::len), Some(1));
    Ok(())
}
