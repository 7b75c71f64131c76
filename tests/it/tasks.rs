//! Tasks (`create_task`, `claim_task`, `complete_task`, `list_tasks`).

use anyhow::Context as _;
use meshd::store::tasks::TaskProgress;
use meshd_tests::{Backend, TestBroker};
use serde_json::json;

both! {
    /// Tasks are stored per mesh; a claim is first-come (a second claim is refused);
    /// completing records the result; lists filter by status and assignee, newest first.
    async fn tasks(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("tasks").await?;
        let (ann, bo) = (broker.enroll(&mesh, "ann").await?, broker.enroll(&mesh, "bo").await?);
        let mut a = broker.connect(&ann).await?;
        let mut c = broker.connect(&bo).await?;

        let t1 = a.request(json!({"type": "create_task", "title": "fix the build", "assignee": "bo", "tags": ["ci"]})).await?;
        assert_eq!(t1["type"], "task_created");
        let id1 = t1["id"].as_str().unwrap_or_default().to_owned();
        let t2 = a.request(json!({"type": "create_task", "title": "write notes", "priority": "low"})).await?;
        let id2 = t2["id"].as_str().unwrap_or_default().to_owned();
        let bad = a.request(json!({"type": "create_task", "title": " "})).await?;
        assert_eq!(bad["type"], "error");

        let all = c.request(json!({"type": "list_tasks"})).await?;
        let tasks = all["tasks"].as_array().unwrap();
        assert_eq!(tasks.len(), 2);
        assert_eq!(tasks[0]["id"], id2.as_str(), "newest first");
        assert_eq!((tasks[1]["status"].as_str(), tasks[1]["priority"].as_str()), (Some("open"), Some("normal")));
        assert_eq!((tasks[1]["createdBy"].as_str(), tasks[1]["tags"][0].as_str()), (Some("ann"), Some("ci")));
        assert!(tasks[1]["claimedBy"].is_null());

        // First claim wins; the second is refused (to a request that carries an id).
        let claimed = c.request(json!({"type": "claim_task", "taskId": id1})).await?;
        assert_eq!(claimed["type"], "task_list");
        let again = a.request(json!({"type": "claim_task", "taskId": id1})).await?;
        assert_eq!((again["type"].as_str(), again["code"].as_str()), (Some("error"), Some("task_not_claimable")));
        // Without a request id (as the CLI sends it) a refusal gets no frame at all.
        a.send(json!({"type": "claim_task", "taskId": id1})).await?;
        a.sync().await?;
        assert!(a.ws.backlog().iter().all(|v| v["type"] != "error"), "{:?}", a.ws.backlog());

        let done = c.request(json!({"type": "complete_task", "taskId": id1, "result": "green"})).await?;
        let t = done["tasks"].as_array().unwrap().iter().find(|t| t["id"] == id1.as_str()).cloned().unwrap_or_default();
        assert_eq!((t["status"].as_str(), t["claimedBy"].as_str(), t["result"].as_str()), (Some("done"), Some("bo"), Some("green")));
        let missing = c.request(json!({"type": "complete_task", "taskId": "nope"})).await?;
        assert_eq!(missing["code"], "task_not_found");

        // Completing again replaces the result, completed strictly later (it must win
        // the merge on other brokers).
        let first = broker.db.task_full(&mesh.mesh_id, &id1).await?.context("task")?;
        c.request(json!({"type": "complete_task", "taskId": id1, "result": "greener"})).await?;
        let second = broker.db.task_full(&mesh.mesh_id, &id1).await?.context("task")?;
        assert_eq!(second.result.as_deref(), Some("greener"));
        assert!(second.completed_at > first.completed_at, "{second:?} after {first:?}");
        // A peer's merge is compare-and-set: against a stale view it writes nothing.
        let merged = TaskProgress { claim: Some((1, "zed".into())), completion: None };
        let stale = first.progress();
        assert!(!broker.db.set_task_progress(&mesh.mesh_id, &id1, &stale, &merged).await?);
        assert_eq!(broker.db.task_full(&mesh.mesh_id, &id1).await?.map(|t| t.progress()), Some(second.progress()));
        assert!(broker.db.set_task_progress(&mesh.mesh_id, &id1, &second.progress(), &merged).await?);
        let now = broker.db.task_full(&mesh.mesh_id, &id1).await?.context("task")?;
        assert_eq!((now.progress(), now.claimed_by.as_deref()), (merged.clone(), Some("zed")));
        // Back to done with the earlier state, through the same compare-and-set.
        assert!(broker.db.set_task_progress(&mesh.mesh_id, &id1, &merged, &second.progress()).await?);

        let open = a.request(json!({"type": "list_tasks", "status": "open"})).await?;
        assert_eq!(open["tasks"].as_array().map(Vec::len), Some(1));
        // mesh_info counts them (and the rest of the mesh).
        a.send(json!({"type": "join_group", "name": "ops", "role": "lead"})).await?;
        let info = a.request(json!({"type": "mesh_info"})).await?;
        assert_eq!((&info["groups"], &info["yourGroups"]), (&json!(["@ops"]), &json!([{"name": "ops", "role": "lead"}])), "{info}");
        assert_eq!(info["type"], "mesh_info_result");
        assert_eq!(info["tasks"], json!({"open": 1, "claimed": 0, "done": 1}));
        assert_eq!((info["peers"].as_u64(), info["yourName"].as_str()), (Some(2), Some("ann")));
        assert_eq!((info["memoryCount"].as_i64(), info["collections"].as_array().map(Vec::len)), (Some(0), Some(0)));
        let bos = a.request(json!({"type": "list_tasks", "assignee": "bo"})).await?;
        assert_eq!(bos["tasks"][0]["id"], id1.as_str());
        Ok(())
    }
}
