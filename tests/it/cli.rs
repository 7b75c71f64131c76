//! The `meshd` command line: help, JSON output, admin commands beside a running daemon,
//! config errors, key file permissions.

use std::os::unix::fs::PermissionsExt as _;

use meshd_protocol::invite::InvitePayload;
use meshd_tests::{Client, DaemonProcess, HelloOpts, Keypair, Member, run_cli};
use serde_json::{Value, json};

use crate::DAEMON;

#[tokio::test]
async fn help_explains_itself() -> anyhow::Result<()> {
    let (code, out, _) = run_cli(DAEMON, &["--help"], &[]).await?;
    assert_eq!(code, 0);
    for needle in [
        "serve",
        "mesh",
        "invite",
        "member",
        "--config",
        "--data-dir",
        "MESHD_CONFIG",
        "claudemesh",
    ] {
        assert!(out.contains(needle), "--help lacks {needle}:\n{out}");
    }
    let (code, out, _) = run_cli(DAEMON, &["invite", "create", "--help"], &[]).await?;
    assert_eq!(code, 0);
    for needle in [
        "--mesh",
        "--role",
        "--max-uses",
        "--ttl",
        "--public-url",
        "--json",
    ] {
        assert!(out.contains(needle), "invite create --help lacks {needle}");
    }
    let (code, _, err) = run_cli(DAEMON, &["frobnicate"], &[]).await?;
    assert_eq!(code, 2, "{err}");
    Ok(())
}

#[tokio::test]
async fn config_errors_exit_64_and_name_the_key() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("meshd.toml");
    std::fs::write(&cfg, "[limits]\nmax_conections = 5\n")?;
    let (code, _, err) = run_cli(
        DAEMON,
        &["--config", cfg.to_str().unwrap(), "mesh", "list"],
        &[],
    )
    .await?;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("max_conections"), "{err}");
    let (code, _, err) = run_cli(
        DAEMON,
        &["--data-dir", dir.path().to_str().unwrap(), "mesh", "list"],
        &[("MESHD_LIMITS_NOPE", "1")],
    )
    .await?;
    assert_eq!(code, 64);
    assert!(err.contains("MESHD_LIMITS_NOPE"), "{err}");
    // A secret in a bad config is not echoed back.
    std::fs::write(&cfg, "[storage]\nurl = \"mysql://root:hunter2@db/x\"\n")?;
    let (code, out, err) = run_cli(
        DAEMON,
        &["--config", cfg.to_str().unwrap(), "mesh", "list"],
        &[],
    )
    .await?;
    assert_eq!(code, 64);
    assert!(
        !err.contains("hunter2") && !out.contains("hunter2"),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_beside_a_running_daemon() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path().to_str().unwrap().to_owned();
    let mut daemon = DaemonProcess::spawn(DAEMON, dir.path(), &[], &[]).await?;
    let public = daemon.ws_url();

    let (code, out, err) = run_cli(
        DAEMON,
        &[
            "--data-dir",
            &d,
            "mesh",
            "create",
            "Platform Team",
            "--json",
        ],
        &[],
    )
    .await?;
    assert_eq!(code, 0, "{err}");
    let mesh: Value = serde_json::from_str(out.trim())?;
    assert_eq!(mesh["slug"], "platform-team");
    assert_eq!(mesh["mesh_id"].as_str().unwrap().len(), 32);
    assert_eq!(mesh["owner_pubkey"].as_str().unwrap().len(), 64);
    let key_file = dir
        .path()
        .join("keys")
        .join(format!("{}.key", mesh["mesh_id"].as_str().unwrap()));
    assert_eq!(
        std::fs::metadata(&key_file)?.permissions().mode() & 0o777,
        0o600,
        "owner key readable by the daemon's user only"
    );
    let (code, _, err) = run_cli(
        DAEMON,
        &[
            "--data-dir",
            &d,
            "mesh",
            "create",
            "Other",
            "--slug",
            "platform-team",
        ],
        &[],
    )
    .await?;
    assert_eq!(code, 1);
    assert!(err.contains("already taken"), "{err}");

    let (code, out, _) =
        run_cli(DAEMON, &["--data-dir", &d, "mesh", "list", "--json"], &[]).await?;
    assert_eq!(code, 0);
    let list: Value = serde_json::from_str(out.trim())?;
    assert_eq!(list["meshes"][0]["slug"], "platform-team");

    let (code, out, err) = run_cli(
        DAEMON,
        &[
            "--data-dir",
            &d,
            "invite",
            "create",
            "--mesh",
            "platform-team",
            "--role",
            "admin",
            "--max-uses",
            "2",
            "--ttl",
            "2h",
            "--public-url",
            &public,
            "--json",
        ],
        &[],
    )
    .await?;
    assert_eq!(code, 0, "{err}");
    let inv: Value = serde_json::from_str(out.trim())?;
    let token = inv["token"].as_str().unwrap();
    assert_eq!(inv["url"], format!("ic://join/{token}"));
    let expires = inv["expires_at"].as_i64().unwrap();
    let now_s = meshd_tests::now_ms() / 1000;
    assert!(
        (now_s + 7100..=now_s + 7300).contains(&expires),
        "{expires}"
    );
    let payload = InvitePayload::from_token(token).unwrap();
    assert_eq!(
        payload.verify().unwrap().to_hex(),
        mesh["owner_pubkey"].as_str().unwrap()
    );
    assert_eq!(
        (
            payload.broker_url.as_str(),
            payload.role.as_str(),
            payload.expires_at
        ),
        (public.as_str(), "admin", expires)
    );
    assert_eq!(payload.mesh_slug, "platform-team");

    // Enroll over HTTP, connect, then revoke from the CLI while connected.
    let keys = Keypair::generate();
    let (status, v) = meshd_tests::http_json(daemon.addr, "POST", "/join", &json!({
        "invite_token": token, "invite_payload": payload, "peer_pubkey": keys.public_hex(), "display_name": "ci-bot"})).await?;
    assert_eq!(status, 200, "{v}");
    let member = Member {
        mesh_id: mesh["mesh_id"].as_str().unwrap().into(),
        member_id: v["memberId"].as_str().unwrap().into(),
        keys: keys.clone(),
        display_name: "ci-bot".into(),
    };
    let mut c = Client::connect(&daemon.ws_url(), &member, HelloOpts::default()).await?;
    let (code, out, _) = run_cli(
        DAEMON,
        &[
            "--data-dir",
            &d,
            "member",
            "list",
            "--mesh",
            "platform-team",
            "--json",
        ],
        &[],
    )
    .await?;
    assert_eq!(code, 0);
    let members: Value = serde_json::from_str(out.trim())?;
    assert_eq!(members["members"][0]["role"], "admin");
    assert_eq!(members["members"][0]["display_name"], "ci-bot");

    let (code, out, err) = run_cli(
        DAEMON,
        &[
            "--data-dir",
            &d,
            "member",
            "revoke",
            "--mesh",
            "platform-team",
            &keys.public_hex(),
            "--json",
        ],
        &[],
    )
    .await?;
    assert_eq!(code, 0, "{err}");
    assert!(serde_json::from_str::<Value>(out.trim())?["revoked_at"].is_string());
    let e = c.ws.expect("revoked", |v| v["type"] == "error").await?;
    assert_eq!(e["code"], "revoked");
    assert_eq!(c.ws.expect_close().await, Some((4002, "banned".into())));
    let again = Client::connect(&daemon.ws_url(), &member, HelloOpts::default()).await;
    assert!(again.unwrap_err().to_string().contains("revoked"));

    let (code, _, err) = run_cli(
        DAEMON,
        &["--data-dir", &d, "invite", "create", "--mesh", "nope"],
        &[],
    )
    .await?;
    assert_eq!(code, 1);
    assert!(err.contains("no mesh"), "{err}");
    daemon.terminate().await?;
    Ok(())
}

#[tokio::test]
async fn world_readable_owner_key_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path().to_str().unwrap();
    let (_, out, _) = run_cli(
        DAEMON,
        &["--data-dir", d, "mesh", "create", "x", "--json"],
        &[],
    )
    .await?;
    let mesh: Value = serde_json::from_str(out.trim())?;
    let key = dir
        .path()
        .join("keys")
        .join(format!("{}.key", mesh["mesh_id"].as_str().unwrap()));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644))?;
    let (code, _, err) = run_cli(
        DAEMON,
        &["--data-dir", d, "invite", "create", "--mesh", "x"],
        &[],
    )
    .await?;
    assert_eq!(code, 1);
    assert!(err.contains("chmod 600"), "{err}");
    Ok(())
}

/// `meshd mesh create --template` creates the template's state keys (clients read them)
/// and records its groups; `meshd mesh templates` lists the five templates; an unknown
/// template is refused with the list.
#[tokio::test]
async fn mesh_templates() -> anyhow::Result<()> {
    let broker = meshd_tests::TestBroker::start(meshd_tests::Backend::Sqlite).await?;
    let d = broker
        .config
        .data_dir
        .to_str()
        .unwrap_or_default()
        .to_owned();
    let (code, out, err) = run_cli(
        DAEMON,
        &["--data-dir", &d, "mesh", "templates", "--json"],
        &[],
    )
    .await?;
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(out.trim())?;
    let names: Vec<&str> = v["templates"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "dev-team",
            "research",
            "ops-incident",
            "simulation",
            "personal"
        ]
    );

    let (code, _, err) = run_cli(
        DAEMON,
        &[
            "--data-dir",
            &d,
            "mesh",
            "create",
            "X",
            "--template",
            "party",
        ],
        &[],
    )
    .await?;
    assert_ne!(code, 0);
    assert!(err.contains("ops-incident"), "{err}");

    let (code, out, err) = run_cli(
        DAEMON,
        &[
            "--data-dir",
            &d,
            "mesh",
            "create",
            "Outage",
            "--template",
            "ops-incident",
            "--json",
        ],
        &[],
    )
    .await?;
    assert_eq!(code, 0, "{err}");
    let created: Value = serde_json::from_str(out.trim())?;
    let slug = created["slug"].as_str().unwrap_or_default().to_owned();
    let mesh = meshd::admin::MeshCreated {
        mesh_id: created["mesh_id"].as_str().unwrap_or_default().into(),
        slug,
        name: "Outage".into(),
        owner_pubkey: String::new(),
    };
    let m = broker.enroll(&mesh, "pager").await?;
    let mut c = broker.connect(&m).await?;
    let st = c.request(json!({"type": "list_state"})).await?;
    let keys: Vec<&str> = st["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["key"].as_str())
        .collect();
    assert_eq!(
        keys,
        ["commander", "incident-status", "severity", "timeline"]
    );
    let sev = c
        .request(json!({"type": "get_state", "key": "incident-status"}))
        .await?;
    assert_eq!(sev["value"], "investigating");
    let tl = c
        .request(json!({"type": "get_state", "key": "timeline"}))
        .await?;
    assert_eq!(tl["value"], json!([]));
    Ok(())
}
