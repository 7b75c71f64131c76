//! `meshd-bench logs`: `mesh_log` ingest — `clients` members each send their burst of
//! 100 entries (the per-member limit's burst) as fast as the socket takes them, every
//! entry acknowledged after its store write; entries per second overall, then the
//! latency of `mesh_logs` full-text queries over what was written.

use super::*;

impl Bench {
    pub(crate) async fn logs(&self, clients: usize) -> anyhow::Result<()> {
        let broker = self.start().await?;
        let members = broker.enroll(clients).await?;
        let url = broker.proc.ws_url();
        let mut conns = Vec::with_capacity(clients);
        for m in &members {
            conns.push(meshd_tests::Client::connect(&url, m, HelloOpts::default()).await?);
        }
        let words = [
            "deploy", "timeout", "registry", "disk", "cache", "retry", "quota", "build",
        ];
        let t = Instant::now();
        let mut tasks = Vec::new();
        for (i, mut c) in conns.into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                for j in 0..100 {
                    let w = words[(i + j) % words.len()];
                    c.send(json!({"type": "mesh_log", "level": "info", "message": format!("{w} step {j} of client {i}"),
                        "data": {"client": i, "step": j}, "_reqId": format!("l{j}")}))
                        .await?;
                }
                let mut acked = 0;
                while acked < 100 {
                    let v = c
                        .ws
                        .expect_within("ack", Duration::from_secs(60), |v| v["type"] == "mesh_log_ack" || v["type"] == "error")
                        .await?;
                    anyhow::ensure!(v["type"] == "mesh_log_ack", "{v}");
                    acked += 1;
                }
                anyhow::Ok(c)
            }));
        }
        let mut conns = Vec::new();
        for task in tasks {
            conns.push(task.await??);
        }
        let n = clients * 100;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "logs   {n} entries from {clients} members, each acknowledged after its write: {secs:.2} s, {:.0} entries/s",
            n as f64 / secs
        );
        let mut samples = Samples::with_capacity(200);
        let c = &mut conns[0];
        for i in 0..200 {
            let w = words[i % words.len()];
            let t = Instant::now();
            let v = c
                .request(json!({"type": "mesh_logs", "query": w, "last": 50}))
                .await?;
            samples.push(t.elapsed());
            anyhow::ensure!(v["logs"].as_array().is_some_and(|a| !a.is_empty()), "{v}");
        }
        println!(
            "logs   mesh_logs full text over {n} entries (newest 50 of a word): p50 {:.2} ms, p99 {:.2} ms",
            samples.percentile_us(50.0) / 1000.0,
            samples.percentile_us(99.0) / 1000.0
        );
        Ok(())
    }
}
