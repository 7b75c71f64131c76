//! A performance regression check that cannot flake on a noisy machine: it counts the
//! broker's read and write system calls (`/proc/PID/io`, `syscr` + `syscw`) for a fixed,
//! strictly sequential DM workload. One DM at a time, each waited for, is done in the
//! same calls however fast or slow the machine is (no batching depends on timing), so
//! the count is stable where wall-clock time is not; it fails on a large increase.

use meshd_protocol::invite::InvitePayload;
use meshd_tests::{Client, DaemonProcess, HelloOpts, Keypair, Member, run_cli};
use serde_json::{Value, json};

use crate::DAEMON;

/// DMs measured.
const DMS: u64 = 400;
/// Most read+write system calls the broker may make per DM (the sender's frame in, the
/// store write and its WAL, the push out, the ack out, the receiver's reads), measured
/// at 34–36 when this check was written (the same unloaded and under two CPU hogs);
/// the bound fails on a doubling and leaves room for honest changes.
const MAX_SYSCALLS_PER_DM: u64 = 72;

/// `syscr + syscw` of a process.
fn syscalls(pid: u32) -> anyhow::Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    let field = |name: &str| -> u64 {
        io.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(field("syscr:") + field("syscw:"))
}

/// `n` DMs a → b, one at a time: each acknowledged and received before the next.
async fn round(a: &mut Client, b: &mut Client, to: &str, n: u64) -> anyhow::Result<()> {
    for i in 0..n {
        let ack = a.dm(to, &format!("dm {i}"), "now").await?;
        anyhow::ensure!(ack["queued"] == true, "{ack}");
        b.expect_message().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_syscalls_per_dm_stay_bounded() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path().to_str().unwrap_or_default().to_owned();
    // Unlimited sends: the rate limit would otherwise stop a fast machine.
    let daemon = DaemonProcess::spawn(
        DAEMON,
        dir.path(),
        &[],
        &[("MESHD_LIMITS_SENDS_PER_SECOND", "0")],
    )
    .await?;
    let pid = daemon.pid().ok_or_else(|| anyhow::anyhow!("no pid"))?;
    let cli = |args: Vec<String>| {
        let d = d.clone();
        async move {
            let mut all = vec!["--data-dir".to_owned(), d];
            all.extend(args);
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            let (code, out, err) = run_cli(DAEMON, &refs, &[]).await?;
            anyhow::ensure!(code == 0, "{err}");
            Ok::<Value, anyhow::Error>(serde_json::from_str(out.trim())?)
        }
    };
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    let mesh = cli(s(&["mesh", "create", "perf", "--json"])).await?;
    let mut members = Vec::new();
    for name in ["a", "b"] {
        let inv = cli(s(&[
            "invite",
            "create",
            "--mesh",
            "perf",
            "--public-url",
            &daemon.ws_url(),
            "--json",
        ]))
        .await?;
        let token = inv["token"].as_str().unwrap_or_default();
        let payload = InvitePayload::from_token(token).map_err(|e| anyhow::anyhow!("{e}"))?;
        let keys = Keypair::generate();
        let (status, v) = meshd_tests::http_json(daemon.addr, "POST", "/join", &json!({
            "invite_token": token, "invite_payload": payload, "peer_pubkey": keys.public_hex(), "display_name": name})).await?;
        anyhow::ensure!(status == 200, "{v}");
        members.push(Member {
            mesh_id: mesh["mesh_id"].as_str().unwrap_or_default().into(),
            member_id: v["memberId"].as_str().unwrap_or_default().into(),
            keys,
            display_name: name.into(),
        });
    }
    let mut a = Client::connect(&daemon.ws_url(), &members[0], HelloOpts::default()).await?;
    let mut b = Client::connect(&daemon.ws_url(), &members[1], HelloOpts::default()).await?;
    let to = b.key();
    round(&mut a, &mut b, &to, 50).await?;
    let before = syscalls(pid)?;
    round(&mut a, &mut b, &to, DMS).await?;
    let per_dm = (syscalls(pid)? - before) / DMS;
    println!("broker read+write syscalls per sequential DM: {per_dm}");
    assert!(
        per_dm <= MAX_SYSCALLS_PER_DM,
        "{per_dm} read+write syscalls per DM (bound {MAX_SYSCALLS_PER_DM}): the DM path got heavier"
    );
    Ok(())
}
