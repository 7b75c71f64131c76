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
