//! `abuse`: honest clients measured quiet, then while hostile clients run every attack
//! of the hardening issue at full speed — status-hook floods, slow and half-sent HTTP
//! requests, stalled uploads, a member filling an offline peer's queue, note churn, huge
//! list answers, U+0000 injection and garbage frames. The broker runs on its default
//! limits (rate limits and quotas included), as an operator would run it.
//!
//! Reported: the honest DM rate and send→ack latency quiet and under attack (and their
//! ratios), the broker's resident memory (before, peak) and its data directory's size.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message;

use crate::stats::{self, Samples};
use crate::{Bench, Broker, Conn, Frame};

/// What the hostile clients did (counts of attempts and of refusals seen).
#[derive(Default)]
struct Tally {
    attempts: AtomicU64,
    refused: AtomicU64,
}

impl Bench {
    pub(crate) async fn abuse(
        &self,
        pairs: usize,
        pace: u32,
        only: &[String],
    ) -> anyhow::Result<()> {
        const ATTACKS: &[&str] = &[
            "hooks",
            "slow-http",
            "uploads",
            "offline-queue",
            "notes",
            "lists",
            "junk",
        ];
        if let Some(bad) = only.iter().find(|a| !ATTACKS.contains(&a.as_str())) {
            anyhow::bail!("unknown attack {bad:?}; known: {}", ATTACKS.join(", "));
        }
        let runs = |a: &str| only.is_empty() || only.iter().any(|o| o == a);
        let broker = self.start_on_defaults().await?;
        let members = broker.enroll(pairs * 2 + 12).await?;
        let pid = broker.proc.pid().context("pid")?;
        let rss_before = stats::rss_kib(pid)?;

        let quiet = self.honest_apart(&broker, &members[..pairs * 2], pace)?;
        println!(
            "abuse  quiet      {pairs} pairs at {pace}/s each: {:.0} delivered DMs/s; send→ack {}",
            quiet.0,
            quiet.1.clone().summary()
        );

        // The attacks, all at once, for as long as the honest clients are measured.
        let stop = Arc::new(AtomicBool::new(false));
        let hostile = &members[pairs * 2..];
        let mut tasks = Vec::new();
        let mut tallies = Vec::new();
        let mut spawn = |name: &'static str,
                         fut: std::pin::Pin<
            Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>,
        >,
                         tally: Arc<Tally>| {
            tallies.push((name, tally));
            tasks.push(tokio::spawn(fut));
        };
        let addr = broker.proc.addr;
        if runs("hooks") {
            for i in 0..4 {
                let t = Arc::new(Tally::default());
                spawn(
                    "status-hook flood (16 at once, new pid, 4 KB cwd)",
                    Box::pin(hook_flood(addr, i, stop.clone(), t.clone())),
                    t,
                );
            }
        }
        if runs("slow-http") {
            let t = Arc::new(Tally::default());
            spawn(
                "half-sent requests (20 addresses)",
                Box::pin(slowloris(addr, stop.clone(), t.clone())),
                t,
            );
        }
        if runs("uploads") {
            let t = Arc::new(Tally::default());
            let keys: Vec<String> = hostile.iter().map(|m| m.keys.public_hex()).collect();
            spawn(
                "stalled uploads (forged signatures)",
                Box::pin(stalled_uploads(
                    addr,
                    broker.mesh_id.clone(),
                    keys,
                    stop.clone(),
                    t.clone(),
                )),
                t,
            );
        }
        if runs("offline-queue") {
            let offline = hostile[0].keys.public_hex();
            let t = Arc::new(Tally::default());
            let c = Conn::connect(&broker, &hostile[1]).await?;
            spawn(
                "64 KB DMs to an offline member",
                Box::pin(offline_flood(c, offline, stop.clone(), t.clone())),
                t,
            );
        }
        if runs("notes") {
            let t = Arc::new(Tally::default());
            let c = Conn::connect(&broker, &hostile[2]).await?;
            spawn(
                "remember/forget churn (200 KB notes)",
                Box::pin(memory_churn(c, stop.clone(), t.clone())),
                t,
            );
        }
        if runs("lists") {
            let t = Arc::new(Tally::default());
            let c = Conn::connect(&broker, &hostile[3]).await?;
            let d = Conn::connect(&broker, &hostile[4]).await?;
            spawn(
                "200 KB task results + list_tasks",
                Box::pin(big_lists(c, d, stop.clone(), t.clone())),
                t,
            );
        }
        if runs("junk") {
            let t = Arc::new(Tally::default());
            let c = Conn::connect(&broker, &hostile[5]).await?;
            let target = hostile[6].keys.public_hex();
            spawn(
                "U+0000 in client ids, garbage frames",
                Box::pin(junk(c, target, stop.clone(), t.clone())),
                t,
            );
        }

        let peak = Arc::new(AtomicU64::new(rss_before));
        let sampler = {
            let (peak, stop) = (peak.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(r) = stats::rss_kib(pid) {
                        peak.fetch_max(r, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
        };
        // Let the attacks ramp up, then measure.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let attacked = self.honest_apart(&broker, &members[..pairs * 2], pace)?;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        let _ = sampler.await;
        let (mut q, mut a) = (quiet.1, attacked.1);
        println!(
            "abuse  attacked   {pairs} pairs at {pace}/s each: {:.0} delivered DMs/s; send→ack {}",
            attacked.0,
            a.summary()
        );
        println!(
            "abuse  ratio      rate {:.2}× quiet; send→ack p50 {:.2}×, p99 {:.2}× quiet",
            attacked.0 / quiet.0.max(1.0),
            a.percentile_us(50.0) / q.percentile_us(50.0).max(1.0),
            a.percentile_us(99.0) / q.percentile_us(99.0).max(1.0),
        );
        for (name, t) in &tallies {
            println!(
                "abuse  hostile    {name}: {} attempts, {} refused",
                t.attempts.load(Ordering::Relaxed),
                t.refused.load(Ordering::Relaxed)
            );
        }
        let disk = dir_bytes(&broker.proc.data_dir);
        println!(
            "abuse  resources  RSS {rss_before} KiB before, {} KiB peak; data directory {:.1} MiB",
            peak.load(Ordering::Relaxed),
            disk as f64 / (1 << 20) as f64
        );
        Ok(())
    }

    /// [`Self::honest`] on a runtime and thread of its own, as separate clients would be:
    /// the hostile tasks' scheduling never delays the honest clients' own I/O (what is
    /// measured is the broker's, and the machine's, share for them).
    fn honest_apart(
        &self,
        broker: &Broker,
        members: &[meshd_tests::Member],
        pace: u32,
    ) -> anyhow::Result<(f64, Samples)> {
        tokio::task::block_in_place(|| {
            std::thread::scope(|s| {
                s.spawn(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?
                        .block_on(self.honest(broker, members, pace))
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the honest clients' thread panicked"))?
            })
        })
    }

    /// `pairs` honest senders at `pace` DMs/s each, for the bench duration: (delivered
    /// per second, send→ack latencies).
    async fn honest(
        &self,
        broker: &Broker,
        members: &[meshd_tests::Member],
        pace: u32,
    ) -> anyhow::Result<(f64, Samples)> {
        let stop = Arc::new(AtomicBool::new(false));
        let delivered = Arc::new(AtomicU64::new(0));
        let mut receivers = Vec::new();
        let mut senders = Vec::new();
        for p in 0..members.len() / 2 {
            let r = Conn::connect(broker, &members[2 * p + 1]).await?;
            let s = Conn::connect(broker, &members[2 * p]).await?;
            let frame = s.sealed(&r.key, &self.plaintext());
            receivers.push(crate::count_pushes(r, stop.clone(), delivered.clone()));
            let stop_s = stop.clone();
            senders.push(tokio::spawn(async move {
                paced(s, &frame, pace, &stop_s).await
            }));
        }
        let r = crate::measure(&delivered, self.duration, &stop, senders).await;
        for r in receivers {
            r.abort();
        }
        r
    }
}

/// Sends one DM at a time, `pace` a second, each waiting for its ack.
async fn paced(mut c: Conn, frame: &str, pace: u32, stop: &AtomicBool) -> anyhow::Result<Samples> {
    let every = Duration::from_secs(1) / pace.max(1);
    let mut samples = Samples::default();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        c.send_raw(frame).await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), c.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let f: Frame<'_> = serde_json::from_str(t.as_str())?;
                    if f.kind == "ack" {
                        anyhow::ensure!(
                            !t.as_str().contains("\"error\""),
                            "honest send refused: {}",
                            t.as_str()
                        );
                        break;
                    }
                }
                Ok(Some(Ok(_))) => {}
                Ok(_) => anyhow::bail!("honest connection closed"),
                Err(_) => anyhow::bail!("no ack for 10 s"),
            }
        }
        samples.push(t.elapsed());
        next += every;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
    Ok(samples)
}

async fn tcp_from(from: &str, to: SocketAddr) -> anyhow::Result<tokio::net::TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(format!("{from}:0").parse()?)?;
    Ok(sock.connect(to).await?)
}

/// An HTTP/1.1 request from `from`; the status, or 0 when the connection was refused.
async fn post_from(from: &str, to: SocketAddr, path: &str, body: &str) -> u16 {
    let Ok(mut s) = tcp_from(from, to).await else {
        return 0;
    };
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return 0;
    }
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
        Ok(Ok(n)) if n > 12 => std::str::from_utf8(&buf[9..12])
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

async fn hook_flood(
    addr: SocketAddr,
    i: u32,
    stop: Arc<AtomicBool>,
    t: Arc<Tally>,
) -> anyhow::Result<()> {
    // 16 posts at a time from one address, each on a new connection.
    let cwd = Arc::new(format!("/{}", "d".repeat(4000)));
    let from = Arc::new(format!("127.0.2.{}", 10 + i));
    let mut posters = Vec::new();
    for j in 0..16u64 {
        let (cwd, from, stop, t) = (cwd.clone(), from.clone(), stop.clone(), t.clone());
        posters.push(tokio::spawn(async move {
            let mut pid = (u64::from(i) << 40) | (j << 32);
            while !stop.load(Ordering::Relaxed) {
                pid += 1;
                let body = json!({"cwd": *cwd, "status": "working", "pid": pid}).to_string();
                let code = post_from(&from, addr, "/hook/set-status", &body).await;
                t.attempts.fetch_add(1, Ordering::Relaxed);
                if code != 200 {
                    t.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for p in posters {
        let _ = p.await;
    }
    Ok(())
}

async fn slowloris(addr: SocketAddr, stop: Arc<AtomicBool>, t: Arc<Tally>) -> anyhow::Result<()> {
    let mut held: Vec<tokio::net::TcpStream> = Vec::new();
    let mut n = 0u32;
    while !stop.load(Ordering::Relaxed) {
        // Keep up to 2,000 half-sent requests open from 20 addresses; replace the ones
        // the server closed.
        held.retain_mut(still_open);
        while held.len() < 2_000 && !stop.load(Ordering::Relaxed) {
            n = n.wrapping_add(1);
            let from = format!("127.0.3.{}", 10 + n % 20);
            t.attempts.fetch_add(1, Ordering::Relaxed);
            match tcp_from(&from, addr).await {
                Ok(mut s) => {
                    if s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                        .await
                        .is_ok()
                    {
                        held.push(s);
                    } else {
                        t.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(_) => {
                    t.refused.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
            if n.is_multiple_of(100) {
                tokio::task::yield_now().await;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn stalled_uploads(
    addr: SocketAddr,
    mesh_id: String,
    keys: Vec<String>,
    stop: Arc<AtomicBool>,
    t: Arc<Tally>,
) -> anyhow::Result<()> {
    let mut held = Vec::new();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        held.retain_mut(|s: &mut tokio::net::TcpStream| still_open(s));
        if held.len() < 64 {
            i += 1;
            let key = &keys[i % keys.len()];
            let head = format!(
                "POST /upload HTTP/1.1\r\nHost: x\r\nX-Mesh-Id: {mesh_id}\r\nX-File-Name: slow.bin\r\n\
                 X-Meshd-Pubkey: {key}\r\nX-Meshd-Timestamp: {}\r\nX-Meshd-Signature: {}\r\n\
                 Content-Length: 50000000\r\n\r\nxx",
                meshd_tests::now_ms(),
                "00".repeat(64)
            );
            t.attempts.fetch_add(1, Ordering::Relaxed);
            let sent = match tcp_from(&format!("127.0.4.{}", 10 + i % 20), addr).await {
                Ok(mut s) => s.write_all(head.as_bytes()).await.is_ok().then_some(s),
                Err(_) => None,
            };
            match sent {
                Some(s) => held.push(s),
                None => {
                    t.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // Drip: one byte a second per held upload.
        for s in &mut held {
            let _ = s.try_write(b"x");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Whether the server has neither answered nor closed the connection yet.
fn still_open(s: &mut tokio::net::TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Sends requests and fire-and-forget frames without waiting for answers, reading
/// (and counting the refusals among) whatever comes back.
async fn blast(
    mut c: Conn,
    frames: impl Fn(u64) -> String,
    per_second: u64,
    stop: Arc<AtomicBool>,
    t: Arc<Tally>,
) -> anyhow::Result<()> {
    let mut n = 0u64;
    let every = Duration::from_secs(1) / u32::try_from(per_second.max(1)).unwrap_or(1);
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        if c.ws.feed(Message::Text(frames(n).into())).await.is_err() {
            break;
        }
        let _ = c.ws.flush().await;
        t.attempts.fetch_add(1, Ordering::Relaxed);
        next += every;
        loop {
            let wait = next.saturating_duration_since(Instant::now());
            match tokio::time::timeout(wait, c.ws.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => {
                    let s = text.as_str();
                    if s.contains("\"error\"") || s.contains("\"code\"") {
                        t.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Some(Ok(_))) => {}
                Ok(_) => return Ok(()),
                Err(_) => break,
            }
        }
    }
    Ok(())
}

async fn offline_flood(
    c: Conn,
    to: String,
    stop: Arc<AtomicBool>,
    t: Arc<Tally>,
) -> anyhow::Result<()> {
    let frame = c.sealed(&to, &"o".repeat(48 * 1024));
    blast(c, move |_| frame.clone(), 100, stop, t).await
}

async fn memory_churn(c: Conn, stop: Arc<AtomicBool>, t: Arc<Tally>) -> anyhow::Result<()> {
    let note = "w ".repeat(100 * 1024);
    blast(
        c,
        move |n| {
            if n % 2 == 1 {
                json!({"type": "remember", "content": note, "_reqId": format!("r{n}")}).to_string()
            } else {
                // Forgets a note that may not exist: the reference's answer either way.
                json!({"type": "forget", "memoryId": format!("m{n}"), "_reqId": format!("f{n}")})
                    .to_string()
            }
        },
        50,
        stop,
        t,
    )
    .await
}

async fn big_lists(c: Conn, d: Conn, stop: Arc<AtomicBool>, t: Arc<Tally>) -> anyhow::Result<()> {
    let result = "r".repeat(200 * 1024);
    let lister = tokio::spawn(blast(
        d,
        |n| json!({"type": "list_tasks", "_reqId": format!("l{n}")}).to_string(),
        20,
        stop.clone(),
        Arc::new(Tally::default()),
    ));
    blast(
        c,
        move |n| match n % 3 {
            1 => json!({"type": "create_task", "title": format!("t{n}"), "_reqId": format!("c{n}")}).to_string(),
            _ => json!({"type": "complete_task", "taskId": "unknown", "result": result, "_reqId": format!("d{n}")}).to_string(),
        },
        30,
        stop,
        t,
    )
    .await?;
    let _ = lister.await;
    Ok(())
}

async fn junk(c: Conn, to: String, stop: Arc<AtomicBool>, t: Arc<Tally>) -> anyhow::Result<()> {
    let sealed = c.sealed(&to, "x");
    blast(
        c,
        move |n| match n % 4 {
            0 => sealed.replacen(
                "\"id\":\"x\"",
                "\"id\":\"x\",\"clientMessageId\":\"a\\u0000b\"",
                1,
            ),
            1 => "{\"type\":\"warp\"}".to_owned(),
            2 => "{oops".to_owned(),
            _ => json!({"type": "set_state", "key": "k", "value": "v\u{0}"}).to_string(),
        },
        100,
        stop,
        t,
    )
    .await
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
