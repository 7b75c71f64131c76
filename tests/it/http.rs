//! The HTTP side: /health, /metrics, CORS, 404.

use meshd_tests::{Backend, TestBroker, http};
use serde_json::Value;

#[tokio::test]
async fn health_metrics_cors_404() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let (status, headers, body) = http(broker.addr, "GET", "/health", None).await?;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body)?;
    assert_eq!(
        (v["status"].as_str(), v["db"].as_str()),
        (Some("ok"), Some("up"))
    );
    assert!(v["uptime"].is_u64() && v["version"].is_string());
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("access-control-allow-origin: *")
    );

    let (status, headers, body) = http(broker.addr, "GET", "/metrics", None).await?;
    assert_eq!(status, 200);
    assert!(headers.contains("text/plain; version=0.0.4"));
    let text = String::from_utf8(body)?;
    for name in [
        "meshd_connections_active",
        "meshd_connections_rejected_total{reason=",
        "meshd_frames_received_total",
        "meshd_messages_routed_total{priority=\"now\"}",
        "meshd_messages_rejected_total{reason=",
        "meshd_queue_depth",
        "meshd_db_healthy 1",
        "meshd_store_commits_total",
    ] {
        assert!(text.contains(name), "missing {name}");
    }

    let (status, headers, _) = http(broker.addr, "OPTIONS", "/join", None).await?;
    assert_eq!(status, 204);
    assert!(headers.contains("X-Target-Spec"));
    let (status, _, body) = http(broker.addr, "GET", "/nope", None).await?;
    assert_eq!((status, body.as_slice()), (404, &b"not found"[..]));
    // An upload without its headers gets a JSON error the CLI can show.
    let (status, _, body) = http(broker.addr, "POST", "/upload", Some(b"{}")).await?;
    let v: Value = serde_json::from_slice(&body)?;
    assert_eq!((status, v["ok"].as_bool()), (400, Some(false)), "{v}");
    // Not a WebSocket upgrade.
    let (status, _, _) = http(broker.addr, "GET", "/ws", None).await?;
    assert!((400..500).contains(&status), "{status}");
    Ok(())
}

both! {
    /// The queue depth gauge counts undelivered direct messages.
    async fn queue_depth_gauge(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("depth").await?;
        let (a, r) = (broker.enroll(&mesh, "a").await?, broker.enroll(&mesh, "r").await?);
        let mut a = broker.connect(&a).await?;
        for i in 0..3 {
            let ack = a.dm(&r.keys.public_hex(), &format!("{i}"), "next").await?;
            assert_eq!(ack["queued"], true);
        }
        assert_eq!(broker.db.queue_depth().await?, 3);
        Ok(())
    }
}

/// The store going away turns /health to 503 (PostgreSQL: the database is dropped under
/// the running broker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_a_dead_store() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Postgres).await?;
    let url = match &broker.config.storage.backend {
        meshd_config::Backend::Postgres { url } => url.expose().clone(),
        meshd_config::Backend::Sqlite { .. } => unreachable!(),
    };
    let (base, db_name) = url.rsplit_once('/').unwrap();
    let mut admin =
        <sqlx::PgConnection as sqlx::Connection>::connect(&format!("{base}/postgres")).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {db_name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    let addr = broker.addr;
    meshd_tests::eventually("health 503", || async move {
        let (status, _, body) = http(addr, "GET", "/health", None).await.ok()?;
        (status == 503)
            .then(|| serde_json::from_slice::<Value>(&body).ok())
            .flatten()
    })
    .await
    .map(|v| assert_eq!(v["db"], "down"))
}

/// A TCP connection from a given loopback address (all of 127/8 is local).
async fn tcp_from(from: &str, to: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(format!("{from}:0").parse()?)?;
    Ok(sock.connect(to).await?)
}

/// A connection from `from` that has sent `head`; `None` when the server refused it
/// (with a reset, which may fail the connect or the write already).
async fn half_sent(
    from: &str,
    to: std::net::SocketAddr,
    head: &[u8],
) -> Option<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt as _;
    let mut s = tcp_from(from, to).await.ok()?;
    s.write_all(head).await.ok()?;
    Some(s)
}

/// Whether the server closed the connection (EOF or reset) within `within`; `false` if
/// it is still open (nothing to read) by then. Reads and drops any response first.
async fn closed_within(s: &mut tokio::net::TcpStream, within: std::time::Duration) -> bool {
    use tokio::io::AsyncReadExt as _;
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// Checks connections at once: (those still open after `within`, how many were closed).
async fn split_closed(
    conns: Vec<tokio::net::TcpStream>,
    within: std::time::Duration,
) -> (Vec<tokio::net::TcpStream>, usize) {
    let checks = conns.into_iter().map(|mut s| async move {
        let closed = closed_within(&mut s, within).await;
        (s, closed)
    });
    let results = futures_util::future::join_all(checks).await;
    let closed = results.iter().filter(|(_, c)| *c).count();
    (
        results
            .into_iter()
            .filter(|(_, c)| !c)
            .map(|(s, _)| s)
            .collect(),
        closed,
    )
}

/// Slow and idle HTTP connections cannot take the server: headers must arrive in time,
/// idle keep-alive connections are closed, one address holds at most
/// `max_pending_per_address` unauthenticated connections (half-sent requests and
/// WebSockets that never say hello alike), all connections together at most
/// `max_http_connections`, and a dripped small body gets 408. `/health` stays reachable
/// from elsewhere throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http_connections_are_bounded() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    let timeout = std::time::Duration::from_secs(2);
    let broker = TestBroker::start_with(Backend::Sqlite, |c| {
        c.limits.http_header_timeout = timeout;
        c.limits.http_body_timeout = timeout;
        c.limits.max_pending_per_address = 8;
        c.limits.max_connections = 24;
        c.limits.max_http_connections = 30;
    })
    .await?;
    let short = std::time::Duration::from_millis(300);

    // Half-sent requests from one address: 8 are held, the rest closed at once.
    // (A refused connection is reset: writing to it may fail already.)
    let mut conns = Vec::new();
    let mut reset = 0;
    for _ in 0..20 {
        match half_sent(
            "127.0.0.2",
            broker.addr,
            b"GET /health HTTP/1.1\r\nHost: x\r\n",
        )
        .await
        {
            Some(s) => conns.push(s),
            None => reset += 1,
        }
    }
    let (mut held, refused) = split_closed(conns, short).await;
    assert_eq!((held.len(), refused + reset), (8, 12));
    let (status, _, _) = http(broker.addr, "GET", "/health", None).await?;
    assert_eq!(status, 200, "/health while one address is at its cap");
    // The header timeout closes the held ones.
    for s in &mut held {
        assert!(
            closed_within(s, meshd_tests::patience()).await,
            "a half-sent request was kept"
        );
    }

    // An idle keep-alive connection is closed too.
    let mut idle = tcp_from("127.0.0.3", broker.addr).await?;
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    assert!(
        closed_within(&mut idle, meshd_tests::patience()).await,
        "idle keep-alive kept"
    );

    // WebSockets that never say hello count as unauthenticated: the ninth is refused.
    let url = broker.ws_url();
    let mut silent = Vec::new();
    for _ in 0..8 {
        let s = tcp_from("127.0.0.4", broker.addr).await?;
        let (ws, _) = tokio_tungstenite::client_async(url.as_str(), s).await?;
        silent.push(ws);
    }
    // (Refused with a reset: the connect itself may fail already.)
    let ninth = match tcp_from("127.0.0.4", broker.addr).await {
        Ok(s) => tokio_tungstenite::client_async(url.as_str(), s)
            .await
            .is_err(),
        Err(_) => true,
    };
    assert!(
        ninth,
        "a ninth unauthenticated WebSocket from one address was accepted"
    );
    drop(silent);

    // All connections together: at most 30, whatever the addresses.
    let mut conns = Vec::new();
    let mut reset = 0;
    for a in 10..20 {
        for _ in 0..6 {
            let from = format!("127.0.0.{a}");
            match half_sent(&from, broker.addr, b"GET /health HTTP/1.1\r\n").await {
                Some(s) => conns.push(s),
                None => reset += 1,
            }
        }
    }
    let (all, over) = split_closed(conns, short).await;
    let over = over + reset;
    assert!(
        all.len() <= 30 && over >= 30,
        "{} held, {over} refused",
        all.len()
    );
    drop(all);
    // The server frees those slots as it sees the connections close.
    meshd_tests::eventually("room for new connections", || async {
        (http(broker.addr, "GET", "/health", None).await.ok()?.0 == 200).then_some(())
    })
    .await?;

    // A dripped body on /join: 408 after the body timeout.
    let mut s = tcp_from("127.0.0.5", broker.addr).await?;
    s.write_all(b"POST /join HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"invite")
        .await?;
    let mut raw = Vec::new();
    {
        use tokio::io::AsyncReadExt as _;
        let mut buf = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + meshd_tests::patience();
        while !String::from_utf8_lossy(&raw).contains("\r\n\r\n") {
            let n = tokio::time::timeout_at(deadline, s.read(&mut buf)).await??;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
        }
    }
    assert!(
        String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&raw)
    );

    let metrics = broker.metrics().await?;
    for reason in ["address_pending", "http_connections", "body_timeout"] {
        assert!(
            !metrics.contains(&format!(
                "meshd_http_refused_total{{reason=\"{reason}\"}} 0"
            )),
            "{reason}: {metrics}"
        );
    }
    Ok(())
}
