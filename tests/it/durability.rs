//! An acknowledged DM survives `kill -9` of the daemon and a restart; SIGTERM drains
//! connections and saves state.

use meshd_tests::{Backend, Client, DaemonProcess, HelloOpts, Keypair, Member, RawWs};
use serde_json::json;

use crate::DAEMON;

/// Spawns the daemon binary on `dir` with the given store.
async fn spawn(dir: &std::path::Path, db_url: &Option<String>) -> anyhow::Result<DaemonProcess> {
    let mut args = vec![];
    if let Some(url) = db_url {
        args.extend(["--database-url", url.as_str()]);
    }
    // No send rate limit: the test sends a burst.
    DaemonProcess::spawn(
        DAEMON,
        dir,
        &args,
        &[("MESHD_LIMITS_SENDS_PER_SECOND", "0")],
    )
    .await
}

async fn setup(
    backend: Backend,
    dir: &std::path::Path,
) -> anyhow::Result<(Option<String>, meshd::store::Db, meshd_config::Config)> {
    let config = meshd_tests::broker::test_config(backend, dir).await?;
    let db_url = match &config.storage.backend {
        meshd_config::Backend::Postgres { url } => Some(url.expose().clone()),
        meshd_config::Backend::Sqlite { .. } => None,
    };
    let db = meshd::admin::open(&config).await?;
    Ok((db_url, db, config))
}

async fn enroll(
    addr: std::net::SocketAddr,
    db: &meshd::store::Db,
    config: &meshd_config::Config,
    slug: &str,
    mesh_id: &str,
    name: &str,
) -> anyhow::Result<Member> {
    let inv = meshd::admin::create_invite(
        db,
        config,
        slug,
        meshd_protocol::invite::Role::Member,
        1,
        std::time::Duration::from_secs(600),
        &format!("ws://{addr}/ws"),
    )
    .await?;
    let keys = Keypair::generate();
    let payload = meshd_protocol::invite::InvitePayload::from_token(&inv.token).unwrap();
    let (status, v) = meshd_tests::http_json(addr, "POST", "/join", &json!({
        "invite_token": inv.token, "invite_payload": payload, "peer_pubkey": keys.public_hex(), "display_name": name,
    })).await?;
    anyhow::ensure!(status == 200, "join: {v}");
    Ok(Member {
        mesh_id: mesh_id.into(),
        member_id: v["memberId"].as_str().unwrap().into(),
        keys,
        display_name: name.into(),
    })
}

both! {
    async fn acknowledged_dm_survives_kill_9(b: Backend) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (db_url, db, config) = setup(b, dir.path()).await?;
        let mesh = meshd::admin::create_mesh(&db, &config, "durable", None).await?;
        let mut daemon = spawn(dir.path(), &db_url).await?;
        let alice = enroll(daemon.addr, &db, &config, &mesh.slug, &mesh.mesh_id, "alice").await?;
        let bob = enroll(daemon.addr, &db, &config, &mesh.slug, &mesh.mesh_id, "bob").await?;
        let bob_session = Keypair::generate();
        let bob_opts = HelloOpts { session: Some(bob_session.clone()), ..HelloOpts::default() };
        // Bob's session key becomes known, then bob goes offline.
        Client::connect(&daemon.ws_url(), &bob, bob_opts.clone()).await?.close().await;

        let mut a = Client::connect(&daemon.ws_url(), &alice, HelloOpts::default()).await?;
        let n = 200;
        let mut ids = Vec::new();
        for i in 0..n {
            let ack = a.dm(&bob_session.public_hex(), &format!("durable {i}"), "next").await?;
            assert_eq!(ack["queued"], true, "{ack}");
            ids.push(ack["messageId"].as_str().unwrap().to_owned());
        }
        // Every ack above was sent after its commit: kill without any chance to flush.
        daemon.kill9().await?;
        drop(a);

        let daemon = spawn(dir.path(), &db_url).await?;
        let mut bc = Client::connect(&daemon.ws_url(), &bob, bob_opts).await?;
        for (i, id) in ids.iter().enumerate() {
            let (push, text) = bc.expect_message().await?;
            assert_eq!(text, format!("durable {i}"));
            assert_eq!(push["messageId"], id.as_str());
        }
        bc.sync().await?;
        assert!(bc.pending_messages().is_empty());
        drop(daemon);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_gracefully() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (db_url, db, config) = setup(Backend::Sqlite, dir.path()).await?;
    let mesh = meshd::admin::create_mesh(&db, &config, "term", None).await?;
    let mut daemon = spawn(dir.path(), &db_url).await?;
    let m = enroll(daemon.addr, &db, &config, &mesh.slug, &mesh.mesh_id, "m").await?;
    let mut c = Client::connect(&daemon.ws_url(), &m, HelloOpts::default()).await?;
    c.send(json!({"type": "set_summary", "summary": "saved on shutdown"}))
        .await?;
    c.sync().await?;
    let mut idle = RawWs::connect(&daemon.ws_url()).await?;
    let (status, stopping) = daemon.terminate().await?;
    assert!(status.success(), "exit status {status}");
    assert!(stopping, "STOPPING=1 sent to the service manager");
    assert_eq!(
        c.ws.expect_close().await,
        Some((1001, "shutting down".into()))
    );
    assert_eq!(idle.expect_close().await.map(|c| c.0), Some(1001));
    // The session state was saved: the next hello is a welcome back.
    let daemon = spawn(dir.path(), &db_url).await?;
    let c = Client::connect(&daemon.ws_url(), &m, HelloOpts::default()).await?;
    assert_eq!(c.hello_ack["restored"], true);
    assert_eq!(c.hello_ack["lastSummary"], "saved on shutdown");
    Ok(())
}

/// The store writer survives PostgreSQL dropping its connection (a failover or an
/// operator's `pg_terminate_backend`): the next batch reconnects and is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_reconnects_after_postgres_drops_it() -> anyhow::Result<()> {
    let broker = meshd_tests::TestBroker::start(Backend::Postgres).await?;
    let mesh = broker.create_mesh("failover").await?;
    let (alice, bob) = (
        broker.enroll(&mesh, "alice").await?,
        broker.enroll(&mesh, "bob").await?,
    );
    let (mut a, mut b) = (broker.connect(&alice).await?, broker.connect(&bob).await?);
    let ack = a.dm(&b.key(), "before", "now").await?;
    assert_eq!(ack["queued"], true, "{ack}");
    assert_eq!(b.expect_message().await?.1, "before");

    let meshd::store::Db::Postgres(pool) = &broker.db else {
        unreachable!()
    };
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(pool)
    .await?;
    assert!(killed.iter().any(|k| *k), "no writer backend to terminate");

    let key = b.key();
    let ack = a.dm(&key, "after", "now").await?;
    assert_eq!(ack["queued"], true, "{ack}");
    assert_eq!(b.expect_message().await?.1, "after");
    // The stored copy is there too: a fresh session of bob's sees nothing pending,
    // because the delivery was marked through the new connection.
    b.close().await;
    let mut b2 = broker.connect(&bob).await?;
    b2.sync().await?;
    assert!(
        b2.pending_messages().is_empty(),
        "redelivered: {:?}",
        b2.pending_messages()
    );
    Ok(())
}

/// A small filesystem of its own (tmpfs), unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    /// Mounts a tmpfs of `mib` MiB; `None` when this process may not mount (not root).
    fn mount(mib: u32) -> anyhow::Result<Option<Self>> {
        let dir = tempfile::tempdir()?;
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        Ok(ok.then_some(Self { dir }))
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fills the filesystem; returns the filler's path.
    fn fill(&self) -> anyhow::Result<std::path::PathBuf> {
        use std::io::Write as _;
        let path = self.path().join("filler");
        let mut f = std::fs::File::create(&path)?;
        let chunk = vec![0u8; 256 * 1024];
        loop {
            match f.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => return Err(e.into()),
            }
        }
        // What is left is smaller than a chunk: take it too.
        let _ = f.write_all(&[0u8; 4096]);
        let _ = f.flush();
        Ok(path)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A full disk fails writes while it lasts, and nothing after: once space is freed the
/// store writer recovers by itself (no restart), `/health` comes back, an operator can
/// revoke a member from another process, every acknowledged DM is delivered, and a stop
/// with the disk full again stays within its budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_recovers_after_disk_full() -> anyhow::Result<()> {
    let Some(fs) = SmallFs::mount(40)? else {
        eprintln!(
            "SKIPPED writer_recovers_after_disk_full: mounting a tmpfs needs root (CAP_SYS_ADMIN)"
        );
        return Ok(());
    };
    let dir = fs.path().join("data");
    std::fs::create_dir(&dir)?;
    let (db_url, db, config) = setup(Backend::Sqlite, &dir).await?;
    let mesh = meshd::admin::create_mesh(&db, &config, "diskfull", None).await?;
    let grace = 2;
    let env = [
        ("MESHD_LIMITS_SENDS_PER_SECOND", "0"),
        ("MESHD_SERVER_SHUTDOWN_GRACE", "2s"),
    ];
    let mut daemon = DaemonProcess::spawn(DAEMON, &dir, &[], &env).await?;
    assert!(db_url.is_none());
    let alice = enroll(
        daemon.addr,
        &db,
        &config,
        &mesh.slug,
        &mesh.mesh_id,
        "alice",
    )
    .await?;
    let bob = enroll(daemon.addr, &db, &config, &mesh.slug, &mesh.mesh_id, "bob").await?;
    let mallory = enroll(
        daemon.addr,
        &db,
        &config,
        &mesh.slug,
        &mesh.mesh_id,
        "mallory",
    )
    .await?;
    let bob_session = Keypair::generate();
    let bob_opts = HelloOpts {
        session: Some(bob_session.clone()),
        ..HelloOpts::default()
    };
    // Bob's session key becomes known; bob stays offline, so DMs pile up in the store.
    Client::connect(&daemon.ws_url(), &bob, bob_opts.clone())
        .await?
        .close()
        .await;
    let mut a = Client::connect(&daemon.ws_url(), &alice, HelloOpts::default()).await?;
    let body = "x".repeat(48 * 1024);
    let mut acked = Vec::new();
    let filler = fs.fill()?;

    // The disk is full: sends fail (after whatever still fit).
    let mut failed = 0;
    for i in 0..400 {
        let ack = a
            .dm(&bob_session.public_hex(), &format!("{i} {body}"), "next")
            .await?;
        if ack["queued"] == true {
            acked.push((ack["messageId"].as_str().unwrap_or("").to_owned(), i));
        } else {
            failed += 1;
            if failed >= 20 {
                break;
            }
        }
    }
    assert!(failed >= 20, "the full disk never failed a send");
    let (status, _, _) = meshd_tests::http(daemon.addr, "GET", "/health", None).await?;
    assert_eq!(status, 503, "a failing store is reported");

    // Space returns: the writer recovers without a restart.
    std::fs::remove_file(&filler)?;
    let deadline = tokio::time::Instant::now() + meshd_tests::patience();
    let mut i = 1000;
    loop {
        let ack = a
            .dm(&bob_session.public_hex(), &format!("{i} after"), "next")
            .await?;
        if ack["queued"] == true {
            acked.push((ack["messageId"].as_str().unwrap_or("").to_owned(), i));
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "never recovered: {ack}"
        );
        i += 1;
    }
    for j in 0..50 {
        let ack = a
            .dm(
                &bob_session.public_hex(),
                &format!("{} after", 2000 + j),
                "next",
            )
            .await?;
        assert_eq!(ack["queued"], true, "{ack}");
        acked.push((ack["messageId"].as_str().unwrap_or("").to_owned(), 2000 + j));
    }
    let deadline = tokio::time::Instant::now() + meshd_tests::patience();
    loop {
        let (status, _, body) = meshd_tests::http(daemon.addr, "GET", "/health", None).await?;
        if status == 200 {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "/health stayed {status}: {}",
            String::from_utf8_lossy(&body)
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // No connection holds the database locked: an operator can revoke.
    let d = dir.to_str().unwrap_or_default();
    let (code, out, err) = meshd_tests::run_cli(
        DAEMON,
        &[
            "--data-dir",
            d,
            "member",
            "revoke",
            "--mesh",
            &mesh.slug,
            &mallory.member_id,
        ],
        &[],
    )
    .await?;
    assert_eq!(code, 0, "revoke failed: {out}{err}");

    // Every acknowledged DM is there, in order.
    let mut bc = Client::connect(&daemon.ws_url(), &bob, bob_opts).await?;
    for (id, n) in &acked {
        let (push, text) = bc.expect_message().await?;
        assert_eq!(push["messageId"], id.as_str());
        assert!(
            text.starts_with(&format!("{n} ")),
            "{n}: {}",
            &text[..20.min(text.len())]
        );
    }

    // Full again, with sends failing: a stop still keeps its budget.
    let filler = fs.fill()?;
    for i in 0..5 {
        let _ = a
            .dm(&bob_session.public_hex(), &format!("{i} {body}"), "next")
            .await?;
    }
    let started = std::time::Instant::now();
    let (status, _) = daemon.terminate().await?;
    let took = started.elapsed();
    assert!(status.success(), "exit status {status}");
    let budget = std::time::Duration::from_secs(2 * grace + 2 + 1 + 2);
    assert!(took < budget, "stopping took {took:?} (budget {budget:?})");
    std::fs::remove_file(&filler)?;
    Ok(())
}

both! {
    /// An `ack` is never sent before its message is committed: while another connection
    /// holds the store's write lock (SQLite `BEGIN IMMEDIATE`; PostgreSQL `LOCK TABLE
    /// message`), 50 DMs sent back to back — to a connected peer and to an offline one,
    /// the hot and the stored path — get no ack at all; once the lock is released every
    /// one is acknowledged, and each acknowledged message is in the store.
    async fn acks_follow_commits(b: Backend) -> anyhow::Result<()> {
        let broker = meshd_tests::TestBroker::start_with(b, |c| c.limits.sends_per_second = 0).await?;
        let mesh = broker.create_mesh("acks").await?;
        let alice = broker.enroll(&mesh, "alice").await?;
        let bob = broker.enroll(&mesh, "bob").await?;
        let carol = broker.enroll(&mesh, "carol").await?;
        let mut a = broker.connect(&alice).await?;
        let _b = broker.connect(&bob).await?;
        let (bob_key, carol_key) = (bob.keys.public_hex(), carol.keys.public_hex());
        // Hold the write lock from another connection.
        let lock = match &broker.db {
            meshd::store::Db::Sqlite(p, _) => {
                let mut c = p.acquire().await?;
                sqlx::query("BEGIN IMMEDIATE").execute(&mut *c).await?;
                Lock::Sqlite(c)
            }
            meshd::store::Db::Postgres(p) => {
                let mut c = p.acquire().await?;
                sqlx::query("BEGIN").execute(&mut *c).await?;
                sqlx::query("LOCK TABLE message IN EXCLUSIVE MODE").execute(&mut *c).await?;
                Lock::Postgres(c)
            }
        };
        const N: usize = 50;
        for i in 0..N {
            let to = if i % 2 == 0 { &bob_key } else { &carol_key };
            let (nonce, c) = meshd_tests::crypto::seal(&format!("m{i}"), to, &alice.keys);
            a.ws.send_json(&json!({"type": "send", "id": format!("s{i}"), "targetSpec": to,
                "priority": "now", "nonce": nonce, "ciphertext": c})).await?;
        }
        // Nothing can be committed now, so nothing may be acknowledged.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(500);
        while let Some(v) = a.ws.read(deadline.saturating_duration_since(tokio::time::Instant::now())).await {
            anyhow::ensure!(v["type"] != "ack", "acknowledged before its commit: {v}");
        }
        match lock {
            Lock::Sqlite(mut c) => {
                sqlx::query("ROLLBACK").execute(&mut *c).await?;
            }
            Lock::Postgres(mut c) => {
                sqlx::query("ROLLBACK").execute(&mut *c).await?;
            }
        }
        for _ in 0..N {
            let ack = a.ws.expect("an ack", |v| v["type"] == "ack").await?;
            anyhow::ensure!(ack["queued"] == true, "{ack}");
            let id = ack["messageId"].as_str().unwrap_or_default();
            anyhow::ensure!(broker.db.message_status(id).await?.is_some(), "{id} acknowledged but not stored");
        }
        Ok(())
    }
}

/// A connection holding the store's write lock.
enum Lock {
    Sqlite(sqlx::pool::PoolConnection<sqlx::Sqlite>),
    Postgres(sqlx::pool::PoolConnection<sqlx::Postgres>),
}
