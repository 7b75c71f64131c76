//! Tasks (`create_task`, `claim_task`, `complete_task`, `list_tasks`).

use anyhow::Context as _;
use meshd::features::tasks::store::TaskProgress;
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

both! {
    /// Large stored bodies never make a list answer too large to send: with 20 task
    /// results, 20 memories and 20 state values of 256 KiB each, `list_tasks`,
    /// `complete_task`, `recall` and `list_state` answer within one frame (long texts
    /// shortened and flagged, trailing entries left out and counted), nobody who asks is
    /// disconnected, and the whole texts are a `get_task`, `get_memory`, `get_state` away.
    async fn large_bodies_never_break_list_replies(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let max = broker.config.limits.max_frame_bytes;
        let mesh = broker.create_mesh("big").await?;
        let (ann, bo) = (broker.enroll(&mesh, "ann").await?, broker.enroll(&mesh, "bo").await?);
        let mut a = broker.connect(&ann).await?;
        let mut c = broker.connect(&bo).await?;
        let big = |tag: usize| format!("{tag:04} {}", "word ".repeat(256 * 1024 / 5 - 2));
        let mut last_task = String::new();
        for i in 0..20 {
            let t = a.request(json!({"type": "create_task", "title": format!("task {i}")})).await?;
            let id = t["id"].as_str().context("id")?.to_owned();
            a.request(json!({"type": "claim_task", "taskId": id})).await?;
            let done = a.request(json!({"type": "complete_task", "taskId": id, "result": big(i)})).await?;
            assert_eq!(done["type"], "task_list", "complete_task still answers: {}", &done.to_string()[..200.min(done.to_string().len())]);
            last_task = id;
            let m = a.request(json!({"type": "remember", "content": format!("{} memo{i}", big(i)), "tags": ["bulk"]})).await?;
            assert_eq!(m["type"], "memory_stored");
            // Two writers: one member's state is capped at 4 MiB.
            let writer = if i % 2 == 0 { &mut a } else { &mut c };
            writer.send(json!({"type": "set_state", "key": format!("k{i:02}"), "value": big(i)})).await?;
        }
        a.sync().await?;
        c.sync().await?;

        let list = c.request(json!({"type": "list_tasks"})).await?;
        assert!(list.to_string().len() <= max);
        let tasks = list["tasks"].as_array().context("tasks")?;
        assert_eq!(tasks.len(), 20, "shortening the results was enough");
        assert_eq!(tasks[0]["truncated"], json!(["result"]));
        let full = c.request(json!({"type": "get_task", "taskId": last_task})).await?;
        assert_eq!(full["type"], "task_data");
        assert_eq!(full["task"]["result"].as_str().map(str::len), Some(big(19).len()));
        assert!(full["task"].get("truncated").is_none());

        let recalled = c.request(json!({"type": "recall", "query": "word bulk"})).await?;
        assert!(recalled.to_string().len() <= max);
        let memories = recalled["memories"].as_array().context("memories")?;
        assert!(!memories.is_empty());
        let id = memories[0]["id"].as_str().context("id")?;
        let whole = c.request(json!({"type": "get_memory", "memoryId": id})).await?;
        assert_eq!(whole["type"], "memory_data");
        assert!(whole["memory"]["content"].as_str().map_or(0, str::len) > 256 * 1024 - 100);

        let state = c.request(json!({"type": "list_state"})).await?;
        assert!(state.to_string().len() <= max);
        let kept = state["entries"].as_array().context("entries")?.len();
        assert!(kept < 20, "20 values of 256 KiB cannot all fit in {max} bytes");
        assert_eq!((state["truncated"].as_bool(), state["omitted"].as_u64()), (Some(true), Some(20 - kept as u64)));
        let one = c.request(json!({"type": "get_state", "key": "k19"})).await?;
        assert_eq!(one["value"].as_str().map(str::len), Some(big(19).len()));

        // Everyone is still connected.
        c.sync().await?;
        a.sync().await?;
        let metrics = broker.metrics().await?;
        assert!(!metrics.contains("meshd_frames_dropped_total{reason=\"reply_trimmed\"} 0"), "{metrics}");
        Ok(())
    }
}

/// Across federated brokers.
mod across_brokers {

    use meshd_tests::fed::{self};

    use serde_json::json;

    use crate::federation::*;

    /// Tasks are the mesh's on every broker: created on A, claimed on B, completed on A,
    /// completed again on B (the new result wins everywhere); a state write made during a
    /// cut arrives with the catch-up; two claims made on both sides of a cut converge,
    /// after the heal, on the earlier one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tasks_cross_brokers() -> anyhow::Result<()> {
        let mut p = cut_pair().await?;
        until_known(&mut p.alice, &p.bob).await?;
        let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
        let t = p
            .alice
            .request(json!({"type": "create_task", "title": "rotate the keys"}))
            .await?;
        let id = t["id"].as_str().unwrap_or_default().to_owned();
        until_task(&mut bob, &id, "the task never reached B", |t| {
            t["status"] == "open"
        })
        .await?;
        let claimed = bob
            .request(json!({"type": "claim_task", "taskId": id}))
            .await?;
        assert_eq!(claimed["type"], "task_list", "{claimed}");
        until_task(&mut p.alice, &id, "bob's claim never reached A", |t| {
            t["claimedBy"] == "bob"
        })
        .await?;
        p.alice
            .request(json!({"type": "complete_task", "taskId": id, "result": "done"}))
            .await?;
        let done = until_task(&mut bob, &id, "the completion never reached B", |t| {
            t["status"] == "done"
        })
        .await?;
        assert_eq!(done["result"], "done");
        // Completing again replaces the result on every broker (the later completion wins).
        bob.request(json!({"type": "complete_task", "taskId": id, "result": "redone"}))
            .await?;
        until_task(
            &mut p.alice,
            &id,
            "the second completion never won at A",
            |t| t["result"] == "redone",
        )
        .await?;
        until_task(&mut bob, &id, "B lost its second completion", |t| {
            t["result"] == "redone"
        })
        .await?;

        let t2 = p
            .alice
            .request(json!({"type": "create_task", "title": "contested"}))
            .await?;
        let id2 = t2["id"].as_str().unwrap_or_default().to_owned();
        until_task(&mut bob, &id2, "the second task never reached B", |t| {
            t["status"] == "open"
        })
        .await?;
        p.to_a.cut();
        p.to_b.cut();
        fed::wait_link(p.a.addr, B, "down", |l| l["state"] != "up").await?;
        p.alice
            .request(json!({"type": "claim_task", "taskId": id2}))
            .await?;
        bob.request(json!({"type": "claim_task", "taskId": id2}))
            .await?;
        // A state write made during the cut reaches B with the catch-up after the heal.
        p.alice
            .send(json!({"type": "set_state", "key": "phase", "value": "cut"}))
            .await?;
        p.alice.sync().await?;
        p.to_a.heal();
        p.to_b.heal();
        bob.poll(
            "the state written during the cut, at B",
            json!({"type": "get_state", "key": "phase"}),
            |r| r["value"] == "cut",
        )
        .await?;
        until_task(
            &mut bob,
            &id2,
            "B never converged on the earlier claim",
            |t| t["claimedBy"] == "alice",
        )
        .await?;
        until_task(&mut p.alice, &id2, "A lost its earlier claim", |t| {
            t["claimedBy"] == "alice"
        })
        .await?;
        Ok(())
    }
}

both! {
    /// A client that sends store requests and hangs up at once (as the CLI does after
    /// `claim_task`) leaves nothing behind that blocks the store: every other member's
    /// writes are answered, and the broker still stops within its budget. (Its pending
    /// requests once kept SQLite's write gate while the ended session waited on the
    /// writer: every later write of the process hung.)
    async fn a_client_that_hangs_up_mid_request_blocks_no_one(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("hangups").await?;
        let (ann, bo) = (broker.enroll(&mesh, "ann").await?, broker.enroll(&mesh, "bo").await?);
        let mut c = broker.connect(&bo).await?;
        let created = c.request(json!({"type": "create_task", "title": "shared"})).await?;
        let id = created["id"].as_str().context("task id")?.to_owned();
        for round in 0..5 {
            let mut a = broker.connect(&ann).await?;
            for n in 0..10 {
                a.send(json!({"type": "create_task", "title": format!("r{round} n{n}")})).await?;
                a.send(json!({"type": "claim_task", "taskId": id})).await?;
                a.send(json!({"type": "remember", "content": format!("note {round} {n}")})).await?;
            }
            a.close().await;
            // The other member's writes are still answered.
            let t = c.request(json!({"type": "create_task", "title": format!("after {round}")})).await?;
            assert_eq!(t["type"], "task_created", "{t}");
            let m = c.request(json!({"type": "remember", "content": format!("after {round}")})).await?;
            assert_eq!(m["type"], "memory_stored", "{m}");
        }
        Ok(())
    }
}
