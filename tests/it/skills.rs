//! The skills catalogue (`share_skill`, `get_skill`, `list_skills`, `remove_skill`).

use meshd_tests::{Backend, TestBroker};
use serde_json::json;

both! {
    /// Skills are stored per mesh: shared, read, searched (name, description or tag,
    /// case-insensitively), replaced by name, removed; they survive a restart.
    async fn skills_catalogue(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("skills").await?;
        let ann = broker.enroll(&mesh, "ann").await?;
        let bo = broker.enroll(&mesh, "bo").await?;
        let mut a = broker.connect(&ann).await?;
        let mut c = broker.connect(&bo).await?;

        let ack = a.request(json!({"type": "share_skill", "name": "review", "description": "Code review checklist",
            "instructions": "1. read the diff", "tags": ["Quality", "git"]})).await?;
        assert_eq!((ack["type"].as_str(), ack["name"].as_str(), ack["action"].as_str()), (Some("skill_ack"), Some("review"), Some("shared")));
        a.request(json!({"type": "share_skill", "name": "deploy", "description": "Ship it",
            "instructions": "cargo build --release"})).await?;

        let got = c.request(json!({"type": "get_skill", "name": "review"})).await?;
        assert_eq!(got["type"], "skill_data");
        assert_eq!(got["skill"]["instructions"], "1. read the diff");
        assert_eq!(got["skill"]["author"], "ann");
        assert_eq!(got["skill"]["tags"], json!(["Quality", "git"]));
        let created = got["skill"]["createdAt"].clone();
        assert!(created.as_str().is_some_and(|t| t.ends_with('Z')));

        let all = c.request(json!({"type": "list_skills"})).await?;
        let names: Vec<&str> = all["skills"].as_array().unwrap().iter().filter_map(|s| s["name"].as_str()).collect();
        assert_eq!(names, ["deploy", "review"], "ordered by name");
        assert!(all["skills"][0].get("instructions").is_none(), "lists carry no instructions");
        for (q, expect) in [("QUALITY", vec!["review"]), ("ship", vec!["deploy"]), ("rev", vec!["review"]), ("nothing", vec![])] {
            let l = c.request(json!({"type": "list_skills", "query": q})).await?;
            let names: Vec<&str> = l["skills"].as_array().unwrap().iter().filter_map(|s| s["name"].as_str()).collect();
            assert_eq!(names, expect, "query {q}");
        }

        // Re-sharing replaces by name: new body and author, first-shared time kept.
        c.request(json!({"type": "share_skill", "name": "review", "description": "v2", "instructions": "2. run the tests"})).await?;
        let got = a.request(json!({"type": "get_skill", "name": "review"})).await?;
        assert_eq!((got["skill"]["instructions"].as_str(), got["skill"]["author"].as_str()), (Some("2. run the tests"), Some("bo")));
        assert_eq!(got["skill"]["createdAt"], created);

        // Bad input is an error with the request id, never silence.
        let bad = a.request(json!({"type": "share_skill", "name": "", "instructions": "x"})).await?;
        assert_eq!(bad["type"], "error", "{bad}");
        let bad = a.request(json!({"type": "share_skill", "name": "big", "instructions": "x".repeat(300 * 1024)})).await?;
        assert_eq!(bad["type"], "error", "{bad}");

        let rm = a.request(json!({"type": "remove_skill", "name": "deploy"})).await?;
        assert_eq!(rm["action"], "removed");
        let rm = a.request(json!({"type": "remove_skill", "name": "deploy"})).await?;
        assert_eq!(rm["action"], "not_found");
        let gone = a.request(json!({"type": "get_skill", "name": "deploy"})).await?;
        assert_eq!((gone["type"].as_str(), gone["skill"].is_null()), (Some("skill_data"), true));

        // Persisted: a restarted broker still has the catalogue.
        drop((a, c));
        let broker = broker.restart().await?;
        let mut a = broker.connect(&ann).await?;
        let l = a.request(json!({"type": "list_skills"})).await?;
        let names: Vec<&str> = l["skills"].as_array().unwrap().iter().filter_map(|s| s["name"].as_str()).collect();
        assert_eq!(names, ["review"]);
        Ok(())
    }
}

/// Across federated brokers.
mod across_brokers {

    use serde_json::json;

    use crate::federation::*;

    /// The skills catalogue of a shared mesh is the same on every broker: a skill shared at A
    /// is read at B, a removal at B reaches A.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn skills_replicate_across_brokers() -> anyhow::Result<()> {
        let mut p = cut_pair().await?;
        until_known(&mut p.alice, &p.bob).await?;
        let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
        let ack = p
            .alice
            .request(
                json!({"type": "share_skill", "name": "triage", "description": "Sort incidents",
                "instructions": "page the on-call", "tags": ["ops"]}),
            )
            .await?;
        assert_eq!(ack["action"], "shared");
        let got = bob
            .poll(
                "the skill at B",
                json!({"type": "get_skill", "name": "triage"}),
                |g| !g["skill"].is_null(),
            )
            .await?;
        assert_eq!(got["skill"]["instructions"], "page the on-call");
        assert_eq!(got["skill"]["author"], "alice");
        let rm = bob
            .request(json!({"type": "remove_skill", "name": "triage"}))
            .await?;
        assert_eq!(rm["action"], "removed");
        p.alice
            .poll(
                "the removal at A",
                json!({"type": "get_skill", "name": "triage"}),
                |g| g["skill"].is_null(),
            )
            .await?;
        Ok(())
    }
}
