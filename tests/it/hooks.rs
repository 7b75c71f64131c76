//! `POST /hook/set-status` (Claude Code hooks).

use meshd_tests::{Backend, Client, HelloOpts, TestBroker, http};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A hook POST from a given local source address (loopback has all of 127/8).
async fn post_from(
    from: &str,
    to: std::net::SocketAddr,
    body: &Value,
) -> anyhow::Result<(u16, Value)> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(format!("{from}:0").parse()?)?;
    let mut s = sock.connect(to).await?;
    let body = body.to_string();
    s.write_all(
        format!(
            "POST /hook/set-status HTTP/1.1\r\nHost: {to}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status: u16 = text.split_whitespace().nth(1).unwrap_or("0").parse()?;
    let json = text.split("\r\n\r\n").nth(1).unwrap_or("null");
    Ok((
        status,
        serde_json::from_str(json.trim()).unwrap_or(Value::Null),
    ))
}

fn status_of(peers: &Value, key: &str) -> Option<String> {
    peers["peers"]
        .as_array()?
        .iter()
        .find(|p| p["pubkey"] == key)
        .and_then(|p| p["status"].as_str())
        .map(str::to_owned)
}

/// A hook changes the status of the presence with its cwd connected from the same
/// address (releasing held messages when it becomes idle), never one from another
/// address, never to or from dnd; a hook that finds nobody is kept for a presence that
/// connects within seconds; hooks are rate-limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_hooks() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("hooks").await?;
    let (ann, bo) = (
        broker.enroll(&mesh, "ann").await?,
        broker.enroll(&mesh, "bo").await?,
    );
    let mut a = broker.connect(&ann).await?; // cwd /work/project
    let other = HelloOpts {
        cwd: Some("/work/other".into()),
        ..HelloOpts::default()
    };
    let mut b = Client::connect(&broker.ws_url(), &bo, other).await?;
    let a_key = a.key();
    let cwd = "/work/project";

    let (code, v) = post_from(
        "127.0.0.1",
        broker.addr,
        &json!({"cwd": cwd, "status": "working", "pid": 11}),
    )
    .await?;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["presence_id"], a.hello_ack["presenceId"]);
    let peers = b
        .until_peers("ann working", |v| {
            status_of(v, &a_key).as_deref() == Some("working")
        })
        .await?;
    assert_eq!(status_of(&peers, &a_key).as_deref(), Some("working"));

    // Working holds a `next` DM; the hook back to idle releases it at once.
    b.dm(&a_key, "held", "next").await?;
    a.sync().await?;
    assert!(
        a.pending_messages().is_empty(),
        "a working peer got a `next` DM"
    );
    let (_, v) = post_from(
        "127.0.0.1",
        broker.addr,
        &json!({"cwd": cwd, "status": "idle", "pid": 11}),
    )
    .await?;
    assert_eq!(v["ok"], true);
    assert_eq!(a.expect_message().await?.1, "held");

    // Another address cannot reach it: the signal waits for a presence of its own.
    let (_, v) = post_from(
        "127.0.0.2",
        broker.addr,
        &json!({"cwd": cwd, "status": "working", "pid": 12}),
    )
    .await?;
    assert_eq!(v["pending"], true, "{v}");
    let peers = b.request(json!({"type": "list_peers"})).await?;
    assert_eq!(status_of(&peers, &a_key).as_deref(), Some("idle"));

    // Bad input.
    let (_, v) = post_from("127.0.0.1", broker.addr, &json!({"status": "idle"})).await?;
    assert_eq!(v["error"], "cwd and status required");
    let (_, v) = post_from(
        "127.0.0.1",
        broker.addr,
        &json!({"cwd": cwd, "status": "dnd"}),
    )
    .await?;
    assert_eq!(v["ok"], false);
    let (code, _, _) = http(broker.addr, "POST", "/hook/set-status", Some(b"not json")).await?;
    assert_eq!(code, 400);

    // A hook that found nobody applies to the presence that connects next with that cwd.
    let (_, v) = post_from(
        "127.0.0.1",
        broker.addr,
        &json!({"cwd": "/elsewhere", "status": "working"}),
    )
    .await?;
    assert_eq!(v["pending"], true);
    let opts = HelloOpts {
        cwd: Some("/elsewhere".into()),
        ..HelloOpts::default()
    };
    let late = Client::connect(&broker.ws_url(), &bo, opts).await?;
    let late_key = late.key();
    let peers = a
        .until_peers("the late session working", |v| {
            status_of(v, &late_key).as_deref() == Some("working")
        })
        .await?;
    assert_eq!(status_of(&peers, &late_key).as_deref(), Some("working"));

    // Rate limit: 30 per minute per pid and cwd.
    let mut limited = false;
    for _ in 0..40 {
        let (code, _) = post_from(
            "127.0.0.1",
            broker.addr,
            &json!({"cwd": cwd, "status": "idle", "pid": 99}),
        )
        .await?;
        if code == 429 {
            limited = true;
            break;
        }
    }
    assert!(limited);
    Ok(())
}

/// The `meshd_table_entries` gauge of `table`.
fn table_entries(metrics: &str, table: &str) -> usize {
    let prefix = format!("meshd_table_entries{{table=\"{table}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(usize::MAX)
}

/// A flood of hooks from one address, each with a new pid and a large cwd, is cut off
/// by the per-address limit (varying the pid buys nothing), the tables stay bounded,
/// oversized fields are refused, and other addresses are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_flood_is_bounded() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("flood").await?;
    let ann = broker.enroll(&mesh, "ann").await?;
    let mut a = broker.connect(&ann).await?; // cwd /work/project, from 127.0.0.1

    let huge = "/".repeat(5000);
    let (code, _) = post_from(
        "127.0.0.3",
        broker.addr,
        &json!({"cwd": huge, "status": "working", "pid": 1}),
    )
    .await?;
    assert_eq!(code, 400, "a cwd over 4096 bytes");

    let cwd = format!("/{}", "d".repeat(4000));
    let mut ok = 0;
    let took = loop {
        let started = std::time::Instant::now();
        let (code, _) = post_from(
            "127.0.0.3",
            broker.addr,
            &json!({"cwd": cwd, "status": "working", "pid": ok}),
        )
        .await?;
        match code {
            200 => ok += 1,
            429 => break started.elapsed(),
            other => anyhow::bail!("unexpected status {other}"),
        }
        anyhow::ensure!(ok <= 700, "never limited");
    };
    // The burst of 600, plus what refills (10/s) while the loop runs.
    assert!(ok <= 640, "{ok} hooks accepted from one address");
    // A refusal is answered slowly (a flood's sender waits for it): never before the
    // tarpit's second has passed.
    assert!(
        took >= std::time::Duration::from_millis(990),
        "refused after {took:?}"
    );
    let metrics = broker.metrics().await?;
    // Two rate keys per accepted hook at most would be 1,200: the address limit keeps
    // the table to its burst; waiting statuses stay at 16 per address.
    assert!(
        table_entries(&metrics, "hook_rate_keys") <= 642,
        "{metrics}"
    );
    assert!(table_entries(&metrics, "hook_pending") <= 16, "{metrics}");
    assert!(
        metrics.contains("meshd_http_refused_total{reason=\"hook_rate_limited\"}"),
        "{metrics}"
    );

    // Another address is not affected.
    let (code, v) = post_from(
        "127.0.0.1",
        broker.addr,
        &json!({"cwd": "/work/project", "status": "working", "pid": 5}),
    )
    .await?;
    assert_eq!((code, &v["presence_id"]), (200, &a.hello_ack["presenceId"]));
    a.sync().await?;
    Ok(())
}
