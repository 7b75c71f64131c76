//! Quotas: what one member, and one mesh, may keep stored — refused with
//! `quota_exceeded` when full, freed when deleted or delivered, visible in `/metrics` and
//! `meshd usage`.

use meshd_tests::{Backend, TestBroker, run_cli};
use serde_json::{Value, json};

fn is_quota(v: &Value) -> bool {
    v["code"] == "quota_exceeded"
        || v["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("quota_exceeded"))
}

both! {
    /// One member cannot grow the disk without bound: DMs to an offline recipient stop
    /// at the sender's queued-bytes quota (others still send), notes at the memory quota
    /// (forgetting frees its bytes at once), task results at the task quota (completed
    /// tasks count); delivery frees message quota at the next recount; each mesh's usage
    /// shows in `/metrics` and each member's in `meshd usage`.
    async fn member_quotas(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start_with(b, |c| {
            c.quotas.queued_bytes_per_member = 200_000;
            c.quotas.memory_bytes_per_member = 64 * 1024;
            c.quotas.task_bytes_per_member = 64 * 1024;
            c.quotas.recount_interval = std::time::Duration::from_millis(500);
        })
        .await?;
        let mesh = broker.create_mesh("quota").await?;
        let (ann, bo, cy) = (
            broker.enroll(&mesh, "ann").await?,
            broker.enroll(&mesh, "bo").await?,
            broker.enroll(&mesh, "cy").await?,
        );
        let bo_key = bo.keys.public_hex();
        let mut a = broker.connect(&ann).await?;
        let mut c = broker.connect(&cy).await?;

        // DMs of 10 kB to bo, who is offline: 200 kB of them are stored, then refused.
        let text = "m".repeat(10_000);
        let mut stored = 0;
        let mut refused = None;
        for _ in 0..40 {
            let ack = a.dm(&bo_key, &text, "next").await?;
            if ack["queued"] == true {
                stored += 1;
            } else {
                refused = Some(ack);
                break;
            }
        }
        let refused = refused.ok_or_else(|| anyhow::anyhow!("never refused after {stored}"))?;
        assert!(is_quota(&refused), "{refused}");
        assert!((10..=20).contains(&stored), "{stored} stored");
        // Another member is not affected.
        assert_eq!(c.dm(&bo_key, "hi", "now").await?["queued"], true);

        // Notes: 8 of 8 KiB fill 64 KiB; forgetting one frees its bytes.
        let note = "n".repeat(8 * 1024 - 16);
        let mut ids = Vec::new();
        let last = loop {
            let r = a.request(json!({"type": "remember", "content": note})).await?;
            if r["type"] != "memory_stored" {
                break r;
            }
            ids.push(r["id"].as_str().unwrap_or_default().to_owned());
            anyhow::ensure!(ids.len() < 20, "memory quota never met");
        };
        assert!(is_quota(&last), "{last}");
        a.request(json!({"type": "forget", "memoryId": ids[0]})).await?;
        let again = a.request(json!({"type": "remember", "content": note})).await?;
        assert_eq!(again["type"], "memory_stored", "forgetting freed nothing: {again}");

        // Task results count against their creator (completed tasks too).
        let result = "r".repeat(20 * 1024);
        let mut completions = 0;
        let refused = loop {
            let t = a.request(json!({"type": "create_task", "title": "t"})).await?;
            let id = t["id"].as_str().unwrap_or_default().to_owned();
            a.request(json!({"type": "claim_task", "taskId": id})).await?;
            let r = a.request(json!({"type": "complete_task", "taskId": id, "result": result})).await?;
            if r["type"] != "task_list" {
                break r;
            }
            completions += 1;
            anyhow::ensure!(completions < 10, "task quota never met");
        };
        assert!(is_quota(&refused), "{refused}");
        assert_eq!(completions, 3);

        // bo comes online and takes his messages: the next recount frees ann's quota.
        // (Without a session key: the DMs were sealed for his member key.)
        let opts = meshd_tests::HelloOpts { session: None, ..meshd_tests::HelloOpts::default() };
        let mut bc = meshd_tests::Client::connect(&broker.ws_url(), &bo, opts).await?;
        for _ in 0..stored + 1 {
            bc.expect_message().await?;
        }
        let deadline = tokio::time::Instant::now() + meshd_tests::patience();
        loop {
            let ack = a.dm(&bo_key, &text, "next").await?;
            if ack["queued"] == true {
                break;
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "delivery freed nothing: {ack}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }

        // The operator sees it: /metrics per mesh and kind, `meshd usage` per member.
        let metrics = meshd_tests::eventually("usage gauges", || async {
            let m = broker.metrics().await.ok()?;
            m.contains("meshd_mesh_stored_bytes{mesh=\"quota\",kind=\"memory\"}").then_some(m)
        })
        .await?;
        assert!(metrics.contains("meshd_mesh_stored_entries{mesh=\"quota\",kind=\"tasks\"}"), "{metrics}");
        let mut args = vec!["--data-dir".to_owned(), broker.config.data_dir.display().to_string()];
        if let meshd_config::Backend::Postgres { url } = &broker.config.storage.backend {
            args.extend(["--database-url".to_owned(), url.expose().clone()]);
        }
        args.extend(["usage", "--mesh", "quota", "--json"].map(str::to_owned));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // (The same quota as the daemon's, as an operator's shell would have it.)
        let env = [("MESHD_QUOTAS_MEMORY_BYTES_PER_MEMBER", "65536")];
        let (code, out, err) = run_cli(crate::DAEMON, &args, &env).await?;
        assert_eq!(code, 0, "{out}{err}");
        let report: Value = serde_json::from_str(out.trim())?;
        let ann_usage = report["members"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == "ann"))
            .cloned()
            .unwrap_or_default();
        let memory = ann_usage["usage"]
            .as_array()
            .and_then(|u| u.iter().find(|u| u["kind"] == "memory"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(memory["quotaBytes"], 64 * 1024, "{report}");
        assert!(memory["bytes"].as_i64() > Some(50_000), "{report}");
        Ok(())
    }
}

both! {
    /// What outlived its retention goes: audit entries beyond the mesh's quota are pruned
    /// and the chain records it (`audit_pruned`), so it still verifies; forgotten notes
    /// and completed tasks are purged once old enough.
    async fn retention_purges(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start_with(b, |c| {
            c.quotas.audit_entries_per_mesh = 10;
            c.quotas.purge_interval = std::time::Duration::from_millis(500);
        })
        .await?;
        let mesh = broker.create_mesh("retained").await?;
        let ann = broker.enroll(&mesh, "ann").await?;
        let mut a = broker.connect(&ann).await?;
        for i in 0..30 {
            a.send(json!({"type": "set_state", "key": "k", "value": i})).await?;
        }
        a.sync().await?;
        let page = a
            .poll("the log pruned", json!({"type": "audit_query", "eventType": "audit_pruned"}), |v| {
                v["total"].as_i64() > Some(0)
            })
            .await?;
        assert_eq!(page["entries"][0]["eventType"], "audit_pruned");
        let all = a.request(json!({"type": "audit_query", "limit": 500})).await?;
        assert!(all["total"].as_i64() <= Some(12), "{all}");
        let ok = a.request(json!({"type": "audit_verify"})).await?;
        assert_eq!(ok["valid"], true, "{ok}");

        // Tombstones and completed tasks, once past their retention.
        let note = a.request(json!({"type": "remember", "content": "short-lived"})).await?;
        a.request(json!({"type": "forget", "memoryId": note["id"]})).await?;
        let t = a.request(json!({"type": "create_task", "title": "done soon"})).await?;
        a.request(json!({"type": "claim_task", "taskId": t["id"]})).await?;
        a.request(json!({"type": "complete_task", "taskId": t["id"], "result": "ok"})).await?;
        let later = meshd_tests::now_ms() + 1;
        assert_eq!(broker.db.purge_forgotten(later).await?, 1);
        assert_eq!(broker.db.purge_done_tasks(later).await?, 1);
        let gone = a.request(json!({"type": "get_task", "taskId": t["id"]})).await?;
        assert_eq!(gone["code"], "not_found");
        Ok(())
    }
}
