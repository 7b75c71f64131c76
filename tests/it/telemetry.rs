//! Mesh telemetry (`features::telemetry`): `mesh_log` / `mesh_logs` with full text, peer
//! and level filters on both backends, `mesh_report` over real traffic, the REST routes,
//! the built-in MCP tools, bounds and the write rate.

use meshd_tests::{Backend, TestBroker};
use serde_json::{Value, json};

fn messages(v: &Value) -> Vec<String> {
    v["logs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l["message"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

both! {
    async fn logs_are_written_searched_and_summed_up(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("tele").await?;
        let (a, z) = (broker.enroll(&mesh, "ada").await?, broker.enroll(&mesh, "zed").await?);
        let (mut ada, mut zed) = (broker.connect(&a).await?, broker.connect(&z).await?);
        for (who, level, message, data) in [
            (0, "info", "build started", json!({"target": "linux"})),
            (0, "error", "deploy failed", json!({"reason": "connection timeouts to registry"})),
            (1, "warn", "disk almost full", json!({"free_mb": 120})),
            (1, "error", "deploy failed", json!({"reason": "quota"})),
            (1, "debug", "cache warm", Value::Null),
        ] {
            let c = if who == 0 { &mut ada } else { &mut zed };
            let r = c.request(json!({"type": "mesh_log", "level": level, "message": message, "data": data})).await?;
            assert_eq!(r["type"], "mesh_log_ack", "{r}");
            assert!(r["id"].is_string());
        }
        // Newest first; full text reaches into data (stemmed: "timeout" finds "timeouts").
        let r = ada.request(json!({"type": "mesh_logs"})).await?;
        assert_eq!(messages(&r), ["cache warm", "deploy failed", "disk almost full", "deploy failed", "build started"], "{r}");
        let r = ada.request(json!({"type": "mesh_logs", "query": "timeout registry"})).await?;
        assert_eq!(messages(&r), ["deploy failed"], "{r}");
        assert_eq!(r["logs"][0]["data"]["reason"], "connection timeouts to registry");
        assert_eq!(r["logs"][0]["peer"], "ada");
        let r = ada.request(json!({"type": "mesh_logs", "level": "warn", "peer": "zed"})).await?;
        assert_eq!(messages(&r), ["deploy failed", "disk almost full"], "{r}");
        let r = ada.request(json!({"type": "mesh_logs", "last": 1})).await?;
        assert_eq!(messages(&r), ["cache warm"], "{r}");
        // Bounds.
        for bad in [
            json!({"type": "mesh_log", "message": ""}),
            json!({"type": "mesh_log", "level": "loud", "message": "x"}),
            json!({"type": "mesh_logs", "last": 501}),
            json!({"type": "mesh_report", "timeframe": "forever"}),
        ] {
            let r = ada.request(bad.clone()).await?;
            assert_eq!(r["type"], "error", "{bad} → {r}");
        }
        // Real traffic for the report: DMs delivered.
        for i in 0..5 {
            ada.dm(&zed.key(), &format!("m{i}"), "now").await?;
            zed.expect_message().await?;
        }
        let r = ada
            .poll("the deliveries recorded", json!({"type": "mesh_report", "timeframe": "1h"}), |r| {
                r["messages"]["delivered"].as_i64() >= Some(5)
            })
            .await?;
        assert_eq!(r["type"], "mesh_report_result", "{r}");
        assert_eq!(r["timeframe"], "1h");
        assert!(r["messages"]["sent"].as_i64() >= Some(5), "{r}");
        assert!(r["delivery"]["p50Ms"].is_i64(), "{r}");
        assert_eq!(r["errors"]["count"], 2, "{r}");
        assert_eq!(r["errors"]["top"][0], json!({"message": "deploy failed", "count": 2}), "{r}");
        assert_eq!(r["logs"], json!({"debug": 1, "info": 1, "warn": 1, "error": 2}), "{r}");
        assert_eq!(r["peers"]["busiest"][0]["name"], "ada", "{r}");
        let summary = r["summary"].to_string();
        assert!(summary.contains("2 errors were logged") && summary.contains("deploy failed"), "{summary}");

        // REST, with an API key.
        let key = ada.request(json!({"type": "apikey_create", "label": "t", "capabilities": ["read"]})).await?;
        let auth = format!("Bearer {}", key["secret"].as_str().unwrap_or_default());
        let (status, _, body) = meshd_tests::http_with(broker.addr, "GET", "/api/v1/logs?q=disk&level=warn", &[("authorization", &auth)], None).await?;
        let body: Value = serde_json::from_slice(&body)?;
        assert_eq!((status, messages(&body)), (200, vec!["disk almost full".to_owned()]), "{body}");
        let (status, _, body) = meshd_tests::http_with(broker.addr, "GET", "/api/v1/report?timeframe=2h", &[("authorization", &auth)], None).await?;
        let body: Value = serde_json::from_slice(&body)?;
        assert_eq!((status, body["errors"]["count"].as_i64()), (200, Some(2)), "{body}");

        // The built-in MCP tools.
        let r = ada.request(json!({"type": "mcp_call", "serverName": "meshd", "toolName": "mesh_log",
            "args": {"level": "info", "message": "via mcp"}})).await?;
        assert!(r["result"]["id"].is_string(), "{r}");
        let r = ada.request(json!({"type": "mcp_call", "serverName": "meshd", "toolName": "mesh_logs",
            "args": {"query": "mcp"}})).await?;
        assert_eq!(messages(&r["result"]), ["via mcp"], "{r}");
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_writes_at_most_its_rate() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("rate").await?;
    let m = broker.enroll(&mesh, "chatty").await?;
    let mut c = broker.connect(&m).await?;
    let mut refused = 0;
    for i in 0..150 {
        let r = c
            .request(json!({"type": "mesh_log", "message": format!("line {i}")}))
            .await?;
        if r["code"] == "rate_limited" {
            refused += 1;
        }
    }
    assert!(refused > 0, "150 entries at once were all taken");
    let r = c.request(json!({"type": "mesh_logs", "last": 500})).await?;
    let kept = messages(&r).len();
    assert_eq!(
        kept + refused,
        150,
        "every entry was either stored or refused"
    );
    Ok(())
}

/// In a shared mesh an entry written at B is in A's log and report, named with B; an
/// entry of a member B does not host is refused by A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_cross_brokers() -> anyhow::Result<()> {
    use crate::federation::{B, linked_pair, member_client};
    let mut p = linked_pair(|_| {}, Backend::Sqlite).await?;
    let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
    let r = bob
        .request(json!({"type": "mesh_log", "level": "error", "message": "replica lagging", "data": {"lag_s": 42}}))
        .await?;
    assert_eq!(r["type"], "mesh_log_ack", "{r}");
    let v = p
        .alice
        .poll(
            "bob's entry at A",
            json!({"type": "mesh_logs", "query": "lagging"}),
            |v| !messages(v).is_empty(),
        )
        .await?;
    assert_eq!(v["logs"][0]["peer"], "bob", "{v}");
    assert_eq!(v["logs"][0]["broker"], B, "{v}");
    assert_eq!(v["logs"][0]["data"]["lag_s"], 42, "{v}");
    let r = p
        .alice
        .request(json!({"type": "mesh_report", "timeframe": "1h"}))
        .await?;
    assert_eq!(r["errors"]["top"][0]["message"], "replica lagging", "{r}");
    // A's own entries stay without a broker; B sees them the other way round.
    p.alice
        .request(json!({"type": "mesh_log", "message": "from alpha"}))
        .await?;
    let v = bob
        .poll(
            "alice's entry at B",
            json!({"type": "mesh_logs", "query": "alpha"}),
            |v| !messages(v).is_empty(),
        )
        .await?;
    assert_eq!(v["logs"][0]["broker"], crate::federation::A, "{v}");
    Ok(())
}
