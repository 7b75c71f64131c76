//! Shared contexts (`share_context`, `get_context`, `list_contexts`).

use meshd_tests::{Backend, TestBroker};
use serde_json::json;

both! {
    /// A member's context replaces its previous one, is announced to the others as a
    /// `state_change` of `_context:<name>`, and is found by text or tag.
    async fn contexts(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("ctx").await?;
        let (ann, bo) = (broker.enroll(&mesh, "ann").await?, broker.enroll(&mesh, "bo").await?);
        let mut a = broker.connect(&ann).await?;
        let mut c = broker.connect(&bo).await?;

        let shared = a.request(json!({"type": "share_context", "summary": "Refactoring the auth flow",
            "filesRead": ["src/auth.rs"], "keyFindings": ["tokens never expire"], "tags": ["security"]})).await?;
        assert_eq!(shared["type"], "context_shared");
        let change = c.ws.expect("state_change", |v| v["type"] == "state_change").await?;
        assert_eq!((change["key"].as_str(), change["value"].as_str()), (Some("_context:ann"), Some("Refactoring the auth flow")));
        c.request(json!({"type": "share_context", "summary": "Writing docs"})).await?;
        // A second share replaces the first.
        a.request(json!({"type": "share_context", "summary": "Auth flow done, reviewing", "tags": ["security"]})).await?;

        let list = c.request(json!({"type": "list_contexts"})).await?;
        let mut names: Vec<&str> = list["contexts"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|x| x["peerName"].as_str())
            .collect();
        names.sort_unstable();
        assert_eq!(names, ["ann", "bo"], "one per member");
        let by_text = c.request(json!({"type": "get_context", "query": "AUTH"})).await?;
        assert_eq!(by_text["contexts"].as_array().map(Vec::len), Some(1));
        assert_eq!(by_text["contexts"][0]["summary"], "Auth flow done, reviewing");
        let by_tag = c.request(json!({"type": "get_context", "query": "security"})).await?;
        assert_eq!(by_tag["contexts"][0]["peerName"], "ann");
        let none = c.request(json!({"type": "get_context", "query": "kubernetes"})).await?;
        assert_eq!(none["contexts"].as_array().map(Vec::len), Some(0));
        Ok(())
    }
}
