//! The signed audit log (`audit_query`, `audit_verify`, `meshd audit verify`).

use meshd_tests::{Backend, TestBroker, run_cli};
use serde_json::{Value, json};

both! {
    /// Joins, presences, state writes (by digest) and sends (without ciphertext) are
    /// logged in a per-mesh hash chain signed by the broker; the chain verifies, and an
    /// edited row is named by `audit_verify` and by `meshd audit verify`.
    async fn audit_log(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("audited").await?;
        let (ann, bo) = (broker.enroll(&mesh, "ann").await?, broker.enroll(&mesh, "bo").await?);
        let mut a = broker.connect(&ann).await?;
        let c = broker.connect(&bo).await?;
        a.send(json!({"type": "set_state", "key": "plan", "value": "secret plan"})).await?;
        a.dm(&c.key(), "hello", "now").await?;

        // The page and the total are read separately: wait for the page itself.
        let page = a
            .poll("six audit entries", json!({"type": "audit_query"}), |v| {
                v["entries"].as_array().map(Vec::len) >= Some(6) && v["total"].as_i64() >= Some(6)
            })
            .await?;
        assert_eq!(page["type"], "audit_result");
        let entries = page["entries"].as_array().unwrap();
        let kinds: Vec<&str> = entries.iter().filter_map(|e| e["eventType"].as_str()).collect();
        for k in ["member_joined", "peer_joined", "state_set", "message_sent"] {
            assert!(kinds.contains(&k), "{k} missing in {kinds:?}");
        }
        let ids: Vec<i64> = entries.iter().filter_map(|e| e["id"].as_i64()).collect();
        assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
        let state = entries.iter().find(|e| e["eventType"] == "state_set").unwrap();
        assert_eq!(state["payload"]["key"], "plan");
        assert!(!state.to_string().contains("secret plan"), "state values are not copied: {state}");
        let sent = entries.iter().find(|e| e["eventType"] == "message_sent").unwrap();
        assert!(sent["payload"].get("ciphertext").is_none());
        let only = a.request(json!({"type": "audit_query", "eventType": "peer_joined", "limit": 1})).await?;
        assert_eq!((only["entries"].as_array().map(Vec::len), only["total"].as_i64()), (Some(1), Some(2)));

        let ok = a.request(json!({"type": "audit_verify"})).await?;
        assert_eq!((ok["valid"].as_bool(), ok["entries"].as_i64()), (Some(true), page["total"].as_i64()));

        // Someone edits a stored entry: verification names it.
        let edit = "UPDATE audit_log SET payload = '{\"key\":\"innocent\"}' WHERE mesh_id = $1 AND event_type = 'state_set'";
        match &broker.db {
            meshd::store::Db::Sqlite(p, _) => sqlx::query(edit).bind(&mesh.mesh_id).execute(p).await.map(drop)?,
            meshd::store::Db::Postgres(p) => sqlx::query(edit).bind(&mesh.mesh_id).execute(p).await.map(drop)?,
        }
        let bad = a.request(json!({"type": "audit_verify"})).await?;
        assert_eq!(bad["valid"], false);
        assert_eq!(bad["brokenAt"], state["id"], "{bad}");

        if b == Backend::Sqlite {
            let d = broker.config.data_dir.to_str().unwrap_or_default();
            let (code, out, err) = run_cli(crate::DAEMON, &["--data-dir", d, "audit", "verify", "--mesh", &mesh.slug, "--json"], &[]).await?;
            assert_eq!(code, 1, "{out}{err}");
            let v: Value = serde_json::from_str(out.trim())?;
            assert_eq!((v["valid"].as_bool(), &v["brokenAt"]), (Some(false), &state["id"]));
        }
        Ok(())
    }
}

both! {
    /// `audit_query`'s page and total come from one snapshot: while another member writes
    /// state (each write is an entry), the newest entry of every unfiltered page is the
    /// total (positions count from 1 without gaps).
    async fn audit_page_matches_its_total(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("audit-snap").await?;
        let (ann, bo) = (broker.enroll(&mesh, "ann").await?, broker.enroll(&mesh, "bo").await?);
        let mut a = broker.connect(&ann).await?;
        let mut w = broker.connect(&bo).await?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    w.send(json!({"type": "set_state", "key": format!("k{}", n % 50), "value": n})).await?;
                    n += 1;
                    if n.is_multiple_of(20) {
                        w.sync().await?;
                    }
                }
                anyhow::Ok(n)
            })
        };
        // Query until the log has grown by hundreds of entries under our feet.
        let deadline = tokio::time::Instant::now() + meshd_tests::patience() * 3;
        let mut pages = 0;
        loop {
            let page = a.request(json!({"type": "audit_query", "limit": 3})).await?;
            // An empty log (the first entries not flushed yet) has no newest entry: 0.
            let newest = page["entries"][0]["id"].as_i64().or(Some(0));
            let total = page["total"].as_i64();
            assert_eq!(newest, total, "a page contradicts its total: {page}");
            pages += 1;
            if total >= Some(400) && pages >= 50 {
                break;
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "the log stayed at {total:?}");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let written = writer.await??;
        assert!(written >= 390, "{written}");
        Ok(())
    }
}
