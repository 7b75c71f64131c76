//! Streams (`create_stream`, `publish`, `subscribe`, `unsubscribe`, `list_streams`).

use meshd_tests::{Backend, TestBroker};
use serde_json::json;

both! {
    /// Data published to a stream reaches its live subscribers (not the publisher, not
    /// after unsubscribing, not after the subscriber left); the registry is stored and
    /// lists live subscriber counts.
    async fn streams(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("streams").await?;
        let (ann, bo, cy) = (
            broker.enroll(&mesh, "ann").await?,
            broker.enroll(&mesh, "bo").await?,
            broker.enroll(&mesh, "cy").await?,
        );
        let mut a = broker.connect(&ann).await?;
        let mut bb = broker.connect(&bo).await?;
        let mut c = broker.connect(&cy).await?;

        let created = a.request(json!({"type": "create_stream", "name": "metrics"})).await?;
        assert_eq!((created["type"].as_str(), created["name"].as_str()), (Some("stream_created"), Some("metrics")));
        let again = bb.request(json!({"type": "create_stream", "name": "metrics"})).await?;
        assert_eq!(again["id"], created["id"], "create_stream is idempotent");

        bb.send(json!({"type": "subscribe", "stream": "metrics"})).await?;
        let sub = bb.ws.expect("subscribed", |v| v["type"] == "subscribed").await?;
        assert_eq!(sub["stream"], "metrics");
        a.send(json!({"type": "subscribe", "stream": "metrics"})).await?;
        a.ws.expect("subscribed", |v| v["type"] == "subscribed").await?;

        a.send(json!({"type": "publish", "stream": "metrics", "data": {"cpu": 0.5}})).await?;
        let d = bb.ws.expect("stream_data", |v| v["type"] == "stream_data").await?;
        assert_eq!((d["stream"].as_str(), d["publishedBy"].as_str()), (Some("metrics"), Some("ann")));
        assert_eq!(d["data"], json!({"cpu": 0.5}));

        let list = c.request(json!({"type": "list_streams"})).await?;
        assert_eq!(list["streams"][0]["name"], "metrics");
        assert_eq!(list["streams"][0]["subscriberCount"], 2);
        assert_eq!(list["streams"][0]["createdBy"], "ann");

        bb.send(json!({"type": "unsubscribe", "stream": "metrics"})).await?;
        bb.sync().await?;
        c.send(json!({"type": "publish", "stream": "metrics", "data": 2})).await?;
        let d = a.ws.expect("stream_data", |v| v["type"] == "stream_data").await?;
        assert_eq!(d["data"], 2);
        // Nothing for the publisher of the first value, nor for the unsubscribed.
        a.sync().await?;
        bb.sync().await?;
        assert!(!a.ws.backlog().iter().any(|v| v["type"] == "stream_data"));
        assert!(!bb.ws.backlog().iter().any(|v| v["type"] == "stream_data"), "{:?}", bb.ws.backlog());
        // Bad input: an empty stream name is an error (with the request id).
        let bad = a.request(json!({"type": "create_stream", "name": ""})).await?;
        assert_eq!(bad["type"], "error");
        Ok(())
    }
}

/// Across federated brokers.
mod across_brokers {

    use serde_json::json;

    use crate::federation::*;

    /// Data published to a stream reaches its subscribers on the mesh's other brokers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stream_data_crosses_brokers() -> anyhow::Result<()> {
        let mut p = cut_pair().await?;
        until_known(&mut p.alice, &p.bob).await?;
        let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
        bob.send(json!({"type": "subscribe", "stream": "builds"}))
            .await?;
        bob.ws
            .expect("subscribed", |v| v["type"] == "subscribed")
            .await?;
        let bob_key = p.bob.keys.public_hex();
        p.alice
            .until_peers("bob listed", |v| broker_of(v, &bob_key).is_some())
            .await?;
        p.alice
            .send(json!({"type": "publish", "stream": "builds", "data": {"ok": true}}))
            .await?;
        let d = bob
            .ws
            .expect("stream_data", |v| v["type"] == "stream_data")
            .await?;
        assert_eq!(
            (d["publishedBy"].as_str(), d["data"]["ok"].as_bool()),
            (Some("alice"), Some(true))
        );
        Ok(())
    }
}
