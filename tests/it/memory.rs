//! Mesh memory (`remember`, `recall`, `forget`).

use meshd_tests::{Backend, TestBroker};
use serde_json::json;

both! {
    /// Notes are stored per mesh and recalled by full-text search, best match first
    /// (stemmed: "deploying" finds "deploy"; tags are searched too); a forgotten note is
    /// not recalled; other meshes' notes never are.
    async fn memory(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("mem").await?;
        let other = broker.create_mesh("other").await?;
        let ann = broker.enroll(&mesh, "ann").await?;
        let eve = broker.enroll(&other, "eve").await?;
        let mut a = broker.connect(&ann).await?;
        let mut e = broker.connect(&eve).await?;

        let r1 = a.request(json!({"type": "remember", "content": "We deploy the API on Fridays after the deploy review", "tags": ["ops"]})).await?;
        assert_eq!(r1["type"], "memory_stored");
        // The newest CLI's daemon reads `memoryId`; older clients read `id`.
        assert_eq!(r1["memoryId"], r1["id"], "{r1}");
        assert!(r1["id"].as_str().is_some_and(|s| !s.is_empty()), "{r1}");
        let id1 = r1["id"].as_str().unwrap_or_default().to_owned();
        a.request(json!({"type": "remember", "content": "The database migration runs before the API deploy"})).await?;
        a.request(json!({"type": "remember", "content": "Lunch is at noon", "tags": ["social"]})).await?;
        e.request(json!({"type": "remember", "content": "deploy secrets of another mesh"})).await?;
        let bad = a.request(json!({"type": "remember", "content": "  "})).await?;
        assert_eq!(bad["type"], "error");

        let found = a.request(json!({"type": "recall", "query": "deploying"})).await?;
        assert_eq!(found["type"], "memory_results");
        let hits = found["memories"].as_array().unwrap();
        assert_eq!(hits.len(), 2, "{found}");
        assert_eq!(hits[0]["id"], id1.as_str(), "the note that says deploy twice ranks first");
        assert_eq!((hits[0]["rememberedBy"].as_str(), hits[0]["tags"][0].as_str()), (Some("ann"), Some("ops")));
        let social = a.request(json!({"type": "recall", "query": "social"})).await?;
        assert_eq!(social["memories"][0]["content"], "Lunch is at noon");
        let none = a.request(json!({"type": "recall", "query": "\" OR 1 -- NEAR("})).await?;
        assert_eq!(none["memories"].as_array().map(Vec::len), Some(0), "query syntax is just words");

        let ack = a.request(json!({"type": "forget", "memoryId": id1})).await?;
        assert_eq!((ack["type"].as_str(), ack["id"].as_str()), (Some("ack"), Some(id1.as_str())));
        let after = a.request(json!({"type": "recall", "query": "deploy"})).await?;
        let ids: Vec<&str> = after["memories"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
        assert_eq!(ids.len(), 1);
        assert!(!ids.contains(&id1.as_str()));
        Ok(())
    }
}

/// Across federated brokers.
mod across_brokers {

    use meshd_tests::Client;
    use meshd_tests::fed::{self};
    use serde_json::{Value, json};

    use crate::federation::*;

    /// Polls `recall` on `c` until `pred` holds for its results.
    async fn until_recall(
        c: &mut Client,
        query: &str,
        what: &str,
        pred: impl Fn(&[Value]) -> bool,
    ) -> anyhow::Result<Vec<Value>> {
        let found = |r: &Value| r["memories"].as_array().cloned().unwrap_or_default();
        let r = c
            .poll(what, json!({"type": "recall", "query": query}), |r| {
                pred(&found(r))
            })
            .await?;
        Ok(found(&r))
    }

    /// Memory and contexts are the mesh's on every broker: a note remembered on A is
    /// recalled on B, forgotten on B it is gone on A, one remembered during a cut arrives
    /// after the heal; a context shared on B reaches A (with the `_context:` state change).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_and_contexts_cross_brokers() -> anyhow::Result<()> {
        let mut p = cut_pair().await?;
        until_known(&mut p.alice, &p.bob).await?;
        let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
        let stored = p
            .alice
            .request(json!({"type": "remember", "content": "deploys use blue-green switching", "tags": ["ops"]}))
            .await?;
        let id = stored["id"].as_str().unwrap_or_default().to_owned();
        let found = until_recall(&mut bob, "deploys", "alice's memory never reached B", |m| {
            !m.is_empty()
        })
        .await?;
        assert_eq!(
            (found[0]["id"].as_str(), found[0]["rememberedBy"].as_str()),
            (Some(id.as_str()), Some("alice"))
        );
        bob.send(json!({"type": "forget", "memoryId": id})).await?;
        until_recall(
            &mut p.alice,
            "deploys",
            "bob's forget never reached A",
            <[Value]>::is_empty,
        )
        .await?;

        p.to_a.cut();
        p.to_b.cut();
        fed::wait_link(p.a.addr, B, "down", |l| l["state"] != "up").await?;
        p.alice
            .request(json!({"type": "remember", "content": "the staging database moved to pg16"}))
            .await?;
        p.to_a.heal();
        p.to_b.heal();
        until_recall(
            &mut bob,
            "staging",
            "a memory made during the cut never reached B",
            |m| m.len() == 1,
        )
        .await?;

        bob.send(
            json!({"type": "share_context", "summary": "profiling the ingest path", "tags": ["perf"]}),
        )
        .await?;
        let change = p
            .alice
            .ws
            .expect("context state change", |v| {
                v["type"] == "state_change" && v["key"] == "_context:bob"
            })
            .await?;
        assert_eq!(change["value"], "profiling the ingest path");
        let ctx = p
            .alice
            .request(json!({"type": "get_context", "query": "perf"}))
            .await?;
        assert_eq!(ctx["contexts"][0]["peerName"], "bob", "{ctx}");
        Ok(())
    }
}
