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
