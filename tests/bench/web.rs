//! `meshd-bench web`: the web app's weight and speed in a real headless Chromium — the
//! bytes and time of a first load over loopback, then the live dashboard of a mesh with
//! `peers` connected peers while they exchange `rate` DMs per second, with the frame and
//! draw times the page itself records (`window.__meshdDashboard()`).

use super::*;
use meshd_tests::browser::Browser;

/// The files a first load fetches.
const ASSETS: &[&str] = &[
    "/app/",
    "/app/app.js",
    "/app/app.css",
    "/app/vendor/nacl-fast.min.js",
    "/app/vendor/ed2curve.min.js",
    "/app/vendor/qrcode.js",
];

impl Bench {
    pub(crate) async fn web(&self, peers: usize, rate: u32, secs: u64) -> anyhow::Result<()> {
        let broker = self.start().await?;
        let base = format!("http://{}", broker.proc.addr);

        // 1. Page weight (uncompressed: meshd serves the files as they are).
        let mut total = 0;
        for path in ASSETS {
            let (status, _, body) =
                meshd_tests::http_with(broker.proc.addr, "GET", path, &[], None).await?;
            anyhow::ensure!(status == 200, "{path}: {status}");
            println!("web    asset      {path}: {} bytes", body.len());
            total += body.len();
        }
        println!(
            "web    weight     first load: {total} bytes in {} requests",
            ASSETS.len()
        );

        // 2. First load in a fresh profile, five times (the first pays Chromium's warm-up).
        let mut browser = Browser::launch().await?;
        for i in 0..5 {
            browser.goto("about:blank").await?;
            browser.eval("localStorage.clear(); true").await.ok();
            browser.goto(&format!("{base}/app/?run={i}")).await?;
            let t = browser
                .eval(
                    "(() => { const n = performance.getEntriesByType('navigation')[0]; \
                     const r = performance.getEntriesByType('resource'); \
                     return {dcl: n.domContentLoadedEventEnd, load: n.loadEventEnd, \
                     resources: r.length, bytes: r.reduce((s, e) => s + e.encodedBodySize, 0) + n.encodedBodySize}; })()",
                )
                .await?;
            println!(
                "web    first load #{i}: DOMContentLoaded {:.1} ms, load {:.1} ms, {} resources, {} bytes",
                t["dcl"].as_f64().unwrap_or(0.0),
                t["load"].as_f64().unwrap_or(0.0),
                t["resources"],
                t["bytes"]
            );
        }

        // 3. The dashboard with `peers` peers and `rate` DMs/s.
        let members = broker.enroll(peers).await?;
        let admin = admin_link(&broker).await?;
        browser.goto(&admin).await?;
        browser.fill("#join-name", "dashboard").await?;
        browser.click("#join-btn").await?;
        browser
            .wait_for(
                "online",
                "document.getElementById('conn').textContent === 'online'",
            )
            .await?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut sinks = Vec::with_capacity(peers);
        let mut keys = Vec::with_capacity(peers);
        let mut sessions = Vec::with_capacity(peers);
        let mut drains = Vec::with_capacity(peers);
        let t = Instant::now();
        for m in &members {
            let c = Conn::connect(&broker, m).await?;
            keys.push(c.key.clone());
            sessions.push(c.session.clone());
            let (sink, mut stream) = c.ws.split();
            sinks.push(sink);
            let stop = stop.clone();
            drains.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if stream.next().await.is_none() {
                        break;
                    }
                }
            }));
        }
        println!(
            "web    {peers} peers connected in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        browser.click("#dash-btn").await?;
        browser
            .wait_for(
                "every peer in the graph",
                &format!("typeof window.__meshdDashboard === 'function' && window.__meshdDashboard().subscribed && window.__meshdDashboard().nodes >= {peers}"),
            )
            .await?;

        // `rate` DMs per second from random senders to random receivers.
        let text = self.plaintext();
        let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
        let mut tick = tokio::time::interval(interval);
        let end = Instant::now() + Duration::from_secs(secs);
        let mut sent = 0u64;
        let mut seed = u64::from(rand_u32()) | 1;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            usize::try_from(seed % peers as u64).unwrap_or(0)
        };
        // The page's samples cover the load only.
        browser.eval("window.__meshdResetTiming(); true").await?;
        while Instant::now() < end {
            tick.tick().await;
            let (from, to) = (next(), next());
            if from == to {
                continue;
            }
            let (nonce, c) = meshd_tests::crypto::seal(&text, &keys[to], &sessions[from]);
            let frame = format!(
                r#"{{"type":"send","id":"w{sent}","targetSpec":"{}","priority":"{}","nonce":"{nonce}","ciphertext":"{c}"}}"#,
                keys[to],
                ["now", "next", "low"][usize::try_from(sent % 3).unwrap_or(0)]
            );
            sinks[from].send(Message::Text(frame.into())).await?;
            sent += 1;
        }
        // Every event still in flight reaches the page (or the wait ends and says so).
        let all_seen = browser
            .wait_for(
                "every event",
                &format!("window.__meshdDashboard().events >= {sent}"),
            )
            .await
            .is_ok();
        let after = browser.eval("window.__meshdDashboard()").await?;
        if !all_seen {
            println!("web    not every event reached the page: {after}");
            let (_, _, m) =
                meshd_tests::http_with(broker.proc.addr, "GET", "/metrics", &[], None).await?;
            for l in String::from_utf8_lossy(&m).lines().filter(|l| {
                !l.starts_with('#')
                    && (l.contains("dashboard_full")
                        || l.contains("refused")
                        || l.contains("messages_"))
            }) {
                println!("web      {l}");
            }
        }
        println!(
            "web    dashboard under load: {peers} peers, {sent} DMs in {secs} s ({:.0}/s): frame p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms; draw p50 {:.2} ms, p95 {:.2} ms, max {:.2} ms; {} events seen",
            sent as f64 / secs as f64,
            after["frameP50"].as_f64().unwrap_or(0.0),
            after["frameP95"].as_f64().unwrap_or(0.0),
            after["frameMax"].as_f64().unwrap_or(0.0),
            after["drawP50"].as_f64().unwrap_or(0.0),
            after["drawP95"].as_f64().unwrap_or(0.0),
            after["drawMax"].as_f64().unwrap_or(0.0),
            after["events"],
        );
        stop.store(true, Ordering::Relaxed);
        for d in drains {
            d.abort();
        }
        browser.close().await;
        Ok(())
    }
}

/// A one-use admin invite's browser link.
async fn admin_link(broker: &Broker) -> anyhow::Result<String> {
    let inv = broker.invite("admin", 1).await?;
    Ok(inv["web_url"].as_str().context("web_url")?.to_owned())
}
