//! Shared state: `set_state` (no reply), `state_change`, `get_state`, `list_state`, and
//! persistence across a restart.

use meshd_tests::{Backend, TestBroker};
use serde_json::json;

both! {
    async fn shared_state(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("state").await?;
        let (a, c) = (broker.enroll(&mesh, "alice").await?, broker.enroll(&mesh, "carol").await?);
        let mut a = broker.connect(&a).await?;
        let mut c = broker.connect(&c).await?;

        // A missing key: value null, empty strings (the SDK's shape).
        let r = a.request(json!({"type": "get_state", "key": "deploy"})).await?;
        assert_eq!(r["type"], "state_result");
        assert_eq!((r["key"].as_str(), r["value"].is_null()), (Some("deploy"), true));
        assert_eq!((r["updatedBy"].as_str(), r["updatedAt"].as_str()), (Some(""), Some("")));

        let value = json!({"env": "prod", "ok": true, "n": [1, 2, 3]});
        a.send(json!({"type": "set_state", "key": "deploy", "value": value, "_reqId": "never-answered"})).await?;
        a.send(json!({"type": "set_state", "key": "alpha", "value": "x"})).await?;
        let change = c.ws.expect("state_change", |v| v["type"] == "state_change" && v["key"] == "deploy").await?;
        assert_eq!((change["value"].clone(), change["updatedBy"].as_str()), (value.clone(), Some("alice")));

        // The writer reads its own write, and got no reply and no state_change itself.
        let r = a.request(json!({"type": "get_state", "key": "deploy"})).await?;
        assert_eq!(r["value"], value);
        assert_eq!(r["updatedBy"], "alice");
        assert!(r["updatedAt"].as_str().unwrap().ends_with('Z'));
        a.sync().await?;
        assert!(a.ws.backlog().iter().all(|v| v["type"] != "state_change" && v["_reqId"] != "never-answered"),
            "{:?}", a.ws.backlog());

        let list = c.request(json!({"type": "list_state"})).await?;
        let keys: Vec<&str> = list["entries"].as_array().unwrap().iter().map(|e| e["key"].as_str().unwrap()).collect();
        assert_eq!(keys, ["alpha", "deploy"], "sorted by key");

        // Durable: the values survive a restart.
        a.close().await;
        c.close().await;
        let broker = broker.restart().await?;
        let m = broker.enroll(&mesh, "dave").await?;
        let mut d = broker.connect(&m).await?;
        let r = d.request(json!({"type": "get_state", "key": "deploy"})).await?;
        assert_eq!(r["value"], value);
        Ok(())
    }
}

#[tokio::test]
async fn oversized_state_is_refused_silently() -> anyhow::Result<()> {
    let broker =
        TestBroker::start_with(Backend::Sqlite, |c| c.limits.max_state_value_bytes = 100).await?;
    let mesh = broker.create_mesh("big-state").await?;
    let a = broker.enroll(&mesh, "a").await?;
    let mut a = broker.connect(&a).await?;
    a.send(json!({"type": "set_state", "key": "k", "value": "x".repeat(500)}))
        .await?;
    let r = a.request(json!({"type": "get_state", "key": "k"})).await?;
    assert!(r["value"].is_null(), "{r}");
    let metrics = broker.metrics().await?;
    assert!(
        metrics.contains("meshd_frames_dropped_total{reason=\"state_too_large\"} 1"),
        "{metrics}"
    );
    Ok(())
}
