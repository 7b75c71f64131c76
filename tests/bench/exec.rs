//! `meshd-bench exec`: `execute_code` start-up time and throughput — `runs` short
//! programs one after another (round trip of the frame: sandbox set-up, the
//! interpreter's start, teardown), then `concurrency` clients running for `secs`.

use super::*;

impl Bench {
    pub(crate) async fn exec(
        &self,
        runs: usize,
        concurrency: usize,
        secs: u64,
    ) -> anyhow::Result<()> {
        let broker = self
            .start_with(&format!(
                "[sandbox]\nenabled = true\nper_mesh = {concurrency}\nruns_per_minute = 100000\n"
            ))
            .await?;
        let members = broker.enroll(concurrency.max(1)).await?;
        let url = broker.proc.ws_url();
        for (lang, code) in [("bash", "true"), ("python", "pass"), ("node", "0")] {
            let mut c =
                meshd_tests::Client::connect(&url, &members[0], HelloOpts::default()).await?;
            let mut samples = Samples::with_capacity(runs);
            for _ in 0..runs {
                let t = Instant::now();
                let r = c
                    .request(json!({"type": "execute_code", "lang": lang, "code": code}))
                    .await?;
                samples.push(t.elapsed());
                anyhow::ensure!(r["exitCode"] == 0, "{r}");
            }
            println!(
                "exec   {lang:<6} one at a time, {runs} runs: p50 {:.1} ms, p99 {:.1} ms",
                samples.percentile_us(50.0) / 1000.0,
                samples.percentile_us(99.0) / 1000.0,
            );
        }
        let done = Arc::new(AtomicU64::new(0));
        let end = Instant::now() + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for m in members.iter().take(concurrency) {
            let mut c = meshd_tests::Client::connect(&url, m, HelloOpts::default()).await?;
            let done = done.clone();
            tasks.push(tokio::spawn(async move {
                while Instant::now() < end {
                    let r = c
                        .request(json!({"type": "execute_code", "lang": "bash", "code": "true"}))
                        .await?;
                    anyhow::ensure!(r["exitCode"] == 0, "{r}");
                    done.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let n = done.load(Ordering::Relaxed);
        println!(
            "exec   bash `true`, {concurrency} at a time for {secs} s: {n} runs, {:.1} runs/s",
            n as f64 / secs as f64
        );
        Ok(())
    }
}
