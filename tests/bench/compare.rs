//! `meshd-bench compare`: the same load patterns against nats-server (core, and
//! JetStream with file storage) and meshd, one after the other in one run on the same
//! cores, printed as a table of figures and ratios against the performance goals.
//!
//! Every message carries its send time (in the first bytes of the payload; in meshd's
//! ciphertext, which the broker treats as opaque), so receivers measure send → delivery
//! latency; broker CPU comes from `/proc/PID/stat` over the measurement window only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

use crate::stats::{self, Inflight, Samples};
use crate::{Bench, Broker, Conn, Frame, nats};

/// The shapes of the comparison (the issue's: 4 → 4 DMs, 1 → 16 fan-out, 32 concurrent
/// handshakes, 1,000 idle connections).
#[derive(Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) pairs: usize,
    pub(crate) peers: usize,
    pub(crate) window: usize,
    pub(crate) conns: usize,
    pub(crate) concurrency: usize,
}

/// One sustained flow's figures.
#[derive(Default)]
struct Flow {
    /// Delivered messages per second.
    rate: f64,
    /// Broker CPU (user + system) per delivered message, µs.
    cpu_us: f64,
    /// Send → ack (PubAck for JetStream), when the system acknowledges.
    acks: Option<Samples>,
    /// Send → delivery.
    latency: Samples,
    /// Sends still without an ack 10 s after the senders stopped.
    unacked: u64,
    /// The slowest ack that came in after the senders stopped (lag, not loss), µs.
    drain_max_us: f64,
}

fn epoch() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The send time as 16 base64 characters (12 bytes), written over the first 16
/// characters of a base64 payload.
fn stamp() -> [u8; 16] {
    use base64::Engine as _;
    let mut raw = [0u8; 12];
    raw[..8].copy_from_slice(&now_ns().to_le_bytes());
    let mut out = [0u8; 16];
    base64::engine::general_purpose::STANDARD
        .encode_slice(raw, &mut out)
        .expect("16 bytes of room");
    out
}

/// The latency since a [`stamp`] found at the start of `b64`.
fn since_stamp(b64: &[u8]) -> Option<Duration> {
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.get(..16)?)
        .ok()?;
    let sent = u64::from_le_bytes(raw.get(..8)?.try_into().ok()?);
    Some(Duration::from_nanos(now_ns().saturating_sub(sent)))
}

/// CPU time (user + system, all threads, exited ones included) of a process, µs.
fn cpu_us(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    // USER_HZ is 100 on every Linux architecture the project builds for.
    Ok(ticks as f64 * 10_000.0)
}

/// Flags shared by the tasks of one flow.
#[derive(Default)]
struct Ctl {
    delivered: AtomicU64,
    measuring: AtomicBool,
    stop: AtomicBool,
}

/// Warm up 2 s, measure `duration`, stop the senders; returns (rate, CPU µs per
/// delivery).
async fn window(ctl: &Ctl, pid: u32, duration: Duration) -> anyhow::Result<(f64, f64)> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (d0, c0, t) = (
        ctl.delivered.load(Ordering::Relaxed),
        cpu_us(pid)?,
        Instant::now(),
    );
    ctl.measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(duration).await;
    ctl.measuring.store(false, Ordering::Relaxed);
    let (d1, c1, secs) = (
        ctl.delivered.load(Ordering::Relaxed),
        cpu_us(pid)?,
        t.elapsed().as_secs_f64(),
    );
    ctl.stop.store(true, Ordering::Relaxed);
    let n = d1.saturating_sub(d0).max(1);
    Ok((n as f64 / secs, (c1 - c0) / n as f64))
}

/// Sender results: acks during the window, unacked after the drain, slowest late ack.
struct Sent {
    acks: Samples,
    unacked: u64,
    drain_max: Duration,
}

impl From<Inflight> for Sent {
    fn from(inflight: Inflight) -> Self {
        let (acks, unacked, drain_max) = inflight.finish();
        Self {
            acks,
            unacked,
            drain_max,
        }
    }
}

fn merge(sent: Vec<Sent>) -> (Samples, u64, f64) {
    let mut acks = Samples::default();
    let (mut unacked, mut late) = (0, Duration::ZERO);
    for s in sent {
        acks.extend(s.acks);
        unacked += s.unacked;
        late = late.max(s.drain_max);
    }
    (acks, unacked, late.as_secs_f64() * 1e6)
}

// ---------------------------------------------------------------------------------
// meshd

/// `send` frames to `to` whose ciphertext starts with a fresh [`stamp`].
struct Stamped {
    template: String,
    at: usize,
}

impl Stamped {
    fn new(frame: String) -> anyhow::Result<Self> {
        let key = "\"ciphertext\":\"";
        let at = frame.find(key).context("ciphertext field")? + key.len();
        if frame.len() < at + 16 {
            bail!("payload too small to carry a timestamp");
        }
        Ok(Self {
            template: frame,
            at,
        })
    }

    fn next(&self) -> String {
        let mut f = self.template.clone().into_bytes();
        f[self.at..self.at + 16].copy_from_slice(&stamp());
        String::from_utf8(f).expect("base64 is ASCII")
    }
}

/// Sends continuously with up to `window` unacknowledged, then waits (≤ 10 s) for the
/// acks still due.
async fn meshd_sender(
    mut c: Conn,
    frames: Stamped,
    window: usize,
    ctl: Arc<Ctl>,
) -> anyhow::Result<Sent> {
    let mut inflight = Inflight::new(window);
    loop {
        let stopping = ctl.stop.load(Ordering::Relaxed);
        let Some(room) = inflight.room(stopping) else {
            break;
        };
        if !stopping {
            for _ in 0..room {
                c.ws.feed(Message::Text(frames.next().into())).await?;
                inflight.sent();
            }
            c.ws.flush().await?;
        }
        match tokio::time::timeout(Duration::from_secs(1), c.ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let f: Frame<'_> = serde_json::from_str(t.as_str())?;
                if f.kind == "ack" {
                    if t.as_str().contains("\"error\"") {
                        bail!("send refused: {}", t.as_str());
                    }
                    inflight.acked(stopping, ctl.measuring.load(Ordering::Relaxed));
                }
            }
            Ok(Some(Ok(_))) | Err(_) => {}
            Ok(_) => bail!("connection closed"),
        }
    }
    Ok(inflight.into())
}

/// Counts message pushes and their latency until the flow is over.
async fn meshd_receiver(
    mut c: Conn,
    ctl: Arc<Ctl>,
    done: Arc<AtomicBool>,
) -> anyhow::Result<Samples> {
    let mut latency = Samples::default();
    let key = "\"ciphertext\":\"";
    while !done.load(Ordering::Relaxed) {
        match tokio::time::timeout(Duration::from_millis(200), c.ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let f: Frame<'_> = serde_json::from_str(t.as_str())?;
                if f.kind == "push" && f.subtype.is_none() {
                    ctl.delivered.fetch_add(1, Ordering::Relaxed);
                    if ctl.measuring.load(Ordering::Relaxed) {
                        let s = t.as_str();
                        if let Some(d) = s
                            .find(key)
                            .and_then(|i| since_stamp(&s.as_bytes()[i + key.len()..]))
                        {
                            latency.push(d);
                        }
                    }
                }
            }
            Ok(Some(Ok(_))) | Err(_) => {}
            Ok(_) => bail!("connection closed"),
        }
    }
    Ok(latency)
}

/// Runs senders and receivers to the end: window, drain, then the receivers stop.
async fn finish(
    ctl: &Arc<Ctl>,
    pid: u32,
    duration: Duration,
    senders: Vec<tokio::task::JoinHandle<anyhow::Result<Sent>>>,
    receivers: Vec<tokio::task::JoinHandle<anyhow::Result<Samples>>>,
    done: &AtomicBool,
) -> anyhow::Result<Flow> {
    let (rate, cpu) = window(ctl, pid, duration).await?;
    let mut sent = Vec::new();
    for s in senders {
        sent.push(s.await??);
    }
    done.store(true, Ordering::Relaxed);
    let mut latency = Samples::default();
    for r in receivers {
        latency.extend(r.await??);
    }
    let (acks, unacked, drain_max_us) = merge(sent);
    Ok(Flow {
        rate,
        cpu_us: cpu,
        acks: Some(acks),
        latency,
        unacked,
        drain_max_us,
    })
}

impl Bench {
    /// `pairs` senders each sending DMs to its own receiver.
    async fn meshd_dms(
        &self,
        broker: &Broker,
        pairs: usize,
        window: usize,
    ) -> anyhow::Result<Flow> {
        let members = broker.enroll(pairs * 2).await?;
        let ctl = Arc::new(Ctl::default());
        let done = Arc::new(AtomicBool::new(false));
        let (mut senders, mut receivers) = (Vec::new(), Vec::new());
        for p in 0..pairs {
            let r = Conn::connect(broker, &members[2 * p + 1]).await?;
            let s = Conn::connect(broker, &members[2 * p]).await?;
            let frames = Stamped::new(s.sealed(&r.key, &self.plaintext()))?;
            receivers.push(tokio::spawn(meshd_receiver(r, ctl.clone(), done.clone())));
            senders.push(tokio::spawn(meshd_sender(s, frames, window, ctl.clone())));
        }
        finish(
            &ctl,
            broker.proc.pid().context("pid")?,
            self.duration,
            senders,
            receivers,
            &done,
        )
        .await
    }

    /// One sender broadcasting (`*`) to `peers`.
    async fn meshd_fanout(
        &self,
        broker: &Broker,
        peers: usize,
        window: usize,
    ) -> anyhow::Result<Flow> {
        use base64::Engine as _;
        let members = broker.enroll(peers + 1).await?;
        let ctl = Arc::new(Ctl::default());
        let done = Arc::new(AtomicBool::new(false));
        let mut receivers = Vec::new();
        for m in &members[1..] {
            let r = Conn::connect(broker, m).await?;
            receivers.push(tokio::spawn(meshd_receiver(r, ctl.clone(), done.clone())));
        }
        let s = Conn::connect(broker, &members[0]).await?;
        let body = base64::engine::general_purpose::STANDARD.encode(self.plaintext().as_bytes());
        let frames = Stamped::new(format!(
            r#"{{"type":"send","id":"b","targetSpec":"*","priority":"next","nonce":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","ciphertext":"{body}"}}"#
        ))?;
        let senders = vec![tokio::spawn(meshd_sender(s, frames, window, ctl.clone()))];
        finish(
            &ctl,
            broker.proc.pid().context("pid")?,
            self.duration,
            senders,
            receivers,
            &done,
        )
        .await
    }
}

// ---------------------------------------------------------------------------------
// NATS core and JetStream

/// A payload about the size of meshd's push frame for a `size`-byte DM, starting with
/// a stamp.
fn nats_payload(size: usize) -> Vec<u8> {
    vec![b'A'; (size * 4 / 3 + 250).max(16)]
}

fn stamped(payload: &[u8]) -> Vec<u8> {
    let mut p = payload.to_vec();
    p[..16].copy_from_slice(&stamp());
    p
}

/// NATS core: `senders` publishers, each with `fanout` subscribers on its subject,
/// pausing for a PONG every `window` messages (standing in for meshd's acks).
async fn core_flow(
    server: &nats::NatsServer,
    senders: usize,
    fanout: usize,
    window: usize,
    payload: &[u8],
    duration: Duration,
) -> anyhow::Result<Flow> {
    let ctl = Arc::new(Ctl::default());
    let done = Arc::new(AtomicBool::new(false));
    let mut receivers = Vec::new();
    for s in 0..senders {
        for _ in 0..fanout {
            let (mut r, mut w) = nats::connect(server.addr).await?;
            w.sub(&format!("pair.{s}"), 1).await?;
            w.ping().await?;
            r.wait_pong().await?;
            let (ctl, done) = (ctl.clone(), done.clone());
            receivers.push(tokio::spawn(async move {
                let mut latency = Samples::default();
                while !done.load(Ordering::Relaxed) {
                    if let Ok(m) =
                        tokio::time::timeout(Duration::from_millis(200), r.next_full()).await
                    {
                        let m = m?;
                        ctl.delivered.fetch_add(1, Ordering::Relaxed);
                        if ctl.measuring.load(Ordering::Relaxed)
                            && let Some(d) = since_stamp(&m.payload)
                        {
                            latency.push(d);
                        }
                    }
                }
                drop(w);
                anyhow::Ok(latency)
            }));
        }
    }
    let mut pubs = Vec::new();
    for s in 0..senders {
        let (mut r, mut w) = nats::connect(server.addr).await?;
        let (ctl, payload) = (ctl.clone(), payload.to_vec());
        let subject = format!("pair.{s}");
        pubs.push(tokio::spawn(async move {
            while !ctl.stop.load(Ordering::Relaxed) {
                for _ in 0..window {
                    w.publish(&subject, &stamped(&payload)).await?;
                }
                w.ping().await?;
                r.wait_pong().await?;
            }
            anyhow::Ok(Sent {
                acks: Samples::default(),
                unacked: 0,
                drain_max: Duration::ZERO,
            })
        }));
    }
    let mut flow = finish(
        &ctl,
        server.child.id().context("pid")?,
        duration,
        pubs,
        receivers,
        &done,
    )
    .await?;
    flow.acks = None;
    Ok(flow)
}

/// A request on the control connection, answered on `_INBOX.ctl`.
async fn js_request(
    r: &mut nats::NatsReader,
    w: &mut nats::NatsWriter,
    subject: &str,
    body: &serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    w.publish_reply(subject, "_INBOX.ctl", body.to_string().as_bytes())
        .await?;
    w.flush().await?;
    let m = tokio::time::timeout(Duration::from_secs(10), r.next_full())
        .await
        .context("no JetStream API answer")??;
    let v: serde_json::Value = serde_json::from_slice(&m.payload)?;
    if v.get("error").is_some() {
        bail!("{subject}: {v}");
    }
    Ok(v)
}

/// JetStream: a file-storage stream over `dm.*`; per pair a publisher waiting for each
/// PubAck (window `window`) and a durable pull consumer with explicit acks.
async fn jetstream_flow(
    server: &nats::NatsServer,
    pairs: usize,
    window: usize,
    payload: &[u8],
    duration: Duration,
) -> anyhow::Result<Flow> {
    let (mut cr, mut cw) = nats::connect(server.addr).await?;
    cw.sub("_INBOX.ctl", 99).await?;
    js_request(
        &mut cr,
        &mut cw,
        "$JS.API.STREAM.CREATE.BENCH",
        &serde_json::json!({"name": "BENCH", "subjects": ["dm.*"], "storage": "file",
            "retention": "limits", "num_replicas": 1}),
    )
    .await?;
    for p in 0..pairs {
        js_request(
            &mut cr,
            &mut cw,
            &format!("$JS.API.CONSUMER.DURABLE.CREATE.BENCH.c{p}"),
            &serde_json::json!({"stream_name": "BENCH", "config": {
                "durable_name": format!("c{p}"), "deliver_policy": "all",
                "ack_policy": "explicit", "filter_subject": format!("dm.{p}"),
                "max_ack_pending": 100_000, "max_waiting": 512}}),
        )
        .await?;
    }
    let ctl = Arc::new(Ctl::default());
    let done = Arc::new(AtomicBool::new(false));
    let mut receivers = Vec::new();
    for p in 0..pairs {
        let (mut r, mut w) = nats::connect(server.addr).await?;
        let inbox = format!("_INBOX.pull{p}");
        w.sub(&format!("{inbox}.*"), 1).await?;
        let (ctl, done) = (ctl.clone(), done.clone());
        receivers.push(tokio::spawn(async move {
            const BATCH: u64 = 256;
            let next_subject = format!("$JS.API.CONSUMER.MSG.NEXT.BENCH.c{p}");
            let pull = format!(r#"{{"batch":{BATCH},"expires":2000000000}}"#);
            // Messages the open pull requests still owe (deliveries carry the stream
            // subject, so only the total can be tracked; an ended request reports what
            // it still owed).
            let mut owed = 0u64;
            let mut seq = 0u64;
            let mut latency = Samples::default();
            while !done.load(Ordering::Relaxed) {
                while owed < 2 * BATCH {
                    seq += 1;
                    let reply = format!("{inbox}.{seq}");
                    w.publish_reply(&next_subject, &reply, pull.as_bytes())
                        .await?;
                    owed += BATCH;
                }
                w.flush().await?;
                let Ok(m) = tokio::time::timeout(Duration::from_millis(200), r.next_full()).await
                else {
                    continue;
                };
                let m = m?;
                if m.status.is_some() {
                    // 404/408/409: the request is over.
                    owed = owed.saturating_sub(m.pending.unwrap_or(BATCH));
                    continue;
                }
                owed = owed.saturating_sub(1);
                ctl.delivered.fetch_add(1, Ordering::Relaxed);
                if ctl.measuring.load(Ordering::Relaxed)
                    && let Some(d) = since_stamp(&m.payload)
                {
                    latency.push(d);
                }
                if let Some(reply) = m.reply {
                    w.publish(&reply, b"").await?;
                }
                if !r.buffered() {
                    w.flush().await?;
                }
            }
            anyhow::Ok(latency)
        }));
    }
    let mut senders = Vec::new();
    for p in 0..pairs {
        let (mut r, mut w) = nats::connect(server.addr).await?;
        let inbox = format!("_INBOX.ack{p}");
        w.sub(&inbox, 1).await?;
        w.ping().await?;
        r.wait_pong().await?;
        let (ctl, payload) = (ctl.clone(), payload.to_vec());
        senders.push(tokio::spawn(async move {
            let subject = format!("dm.{p}");
            let mut inflight = Inflight::new(window);
            loop {
                let stopping = ctl.stop.load(Ordering::Relaxed);
                let Some(room) = inflight.room(stopping) else {
                    break;
                };
                if !stopping {
                    for _ in 0..room {
                        w.publish_reply(&subject, &inbox, &stamped(&payload))
                            .await?;
                        inflight.sent();
                    }
                    w.flush().await?;
                }
                let Ok(m) = tokio::time::timeout(Duration::from_secs(1), r.next_full()).await
                else {
                    continue;
                };
                let m = m?;
                if m.payload.windows(7).any(|x| x == b"\"error\"") {
                    bail!("publish refused: {}", String::from_utf8_lossy(&m.payload));
                }
                inflight.acked(stopping, ctl.measuring.load(Ordering::Relaxed));
            }
            anyhow::Ok(Sent::from(inflight))
        }));
    }
    finish(
        &ctl,
        server.child.id().context("pid")?,
        duration,
        senders,
        receivers,
        &done,
    )
    .await
}

/// A JetStream server with file storage in `dir`; `sync_always` makes it fsync every
/// write (nats-server 2.10+).
async fn jetstream_server(
    binary: &str,
    dir: &std::path::Path,
    sync_always: bool,
) -> anyhow::Result<nats::NatsServer> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let conf = dir.join("js.conf");
    let store = dir.join("store");
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: \"{}\"\n{}}}\n",
            store.display(),
            if sync_always {
                "  sync_interval: always\n"
            } else {
                ""
            }
        ),
    )?;
    nats::NatsServer::spawn_with(binary, &conf, port).await
}

/// NATS request/reply round trips A → B → A.
pub(crate) async fn core_rtt(
    addr: SocketAddr,
    payload: &[u8],
    count: usize,
) -> anyhow::Result<Samples> {
    let (mut ar, mut aw) = nats::connect(addr).await?;
    let (mut br, mut bw) = nats::connect(addr).await?;
    aw.sub("a", 1).await?;
    bw.sub("b", 1).await?;
    aw.ping().await?;
    bw.ping().await?;
    ar.wait_pong().await?;
    br.wait_pong().await?;
    let p2 = payload.to_vec();
    let echo = tokio::spawn(async move {
        let mut buf = Vec::new();
        for _ in 0..count + 100 {
            br.next_msg(&mut buf).await?;
            bw.publish("a", &p2).await?;
            bw.flush().await?;
        }
        anyhow::Ok(())
    });
    let mut samples = Samples::with_capacity(count);
    let mut buf = Vec::new();
    for i in 0..count + 100 {
        let t = Instant::now();
        aw.publish("b", payload).await?;
        aw.flush().await?;
        ar.next_msg(&mut buf).await?;
        if i >= 100 {
            samples.push(t.elapsed());
        }
    }
    echo.await??;
    Ok(samples)
}

/// NATS connect + nkey authentication (ed25519 signature of the server's nonce) +
/// PING/PONG, `concurrency` at once; returns (per second, samples).
async fn core_handshakes(
    binary: &str,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<(f64, Samples)> {
    let users: Vec<nats::NkeyUser> = (0..20).map(|_| nats::NkeyUser::generate()).collect();
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let conf = dir.path().join("auth.conf");
    let list: Vec<String> = users
        .iter()
        .map(|u| format!("{{ nkey: {} }}", u.public()))
        .collect();
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{port}\nauthorization {{\n  users: [ {} ]\n}}\n",
            list.join(", ")
        ),
    )?;
    let server = nats::NatsServer::spawn_with(binary, &conf, port).await?;
    let started = Instant::now();
    let mut samples = Samples::with_capacity(count);
    let mut pending = futures_util::stream::FuturesUnordered::new();
    let (mut next, mut finished) = (0, 0);
    while finished < count {
        while next < count && pending.len() < concurrency {
            let user = &users[next % users.len()];
            let addr = server.addr;
            pending.push(async move {
                let t = Instant::now();
                let c = nats::connect_as(addr, Some(user)).await?;
                let took = t.elapsed();
                drop(c);
                anyhow::Ok(took)
            });
            next += 1;
        }
        if let Some(r) = pending.next().await {
            samples.push(r?);
            finished += 1;
        }
    }
    Ok((count as f64 / started.elapsed().as_secs_f64(), samples))
}

/// RSS per idle NATS connection (one SUB each), KiB.
pub(crate) async fn core_idle(binary: &str, n: usize) -> anyhow::Result<(u64, u64)> {
    let server = nats::NatsServer::spawn(binary).await?;
    let pid = server.child.id().context("pid")?;
    crate::settle().await;
    let before = stats::rss_kib(pid)?;
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let (r, mut w) = nats::connect(server.addr).await?;
        w.sub(&format!("idle.{i}"), 1).await?;
        held.push((r, w));
    }
    crate::settle().await;
    let after = stats::rss_kib(pid)?;
    Ok((before, after))
}

// ---------------------------------------------------------------------------------
// The run and the table

/// A row of the table: label, the figure of each system, the ratio and the goal.
struct Row {
    metric: String,
    core: String,
    js: String,
    meshd: String,
    fsync: String,
    ratio: String,
    goal: String,
}

fn f0(x: f64) -> String {
    if x.is_finite() {
        let s = format!("{x:.0}");
        // Thousands separators for readability.
        let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else {
        "–".into()
    }
}

fn f1(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.1}")
    } else {
        "–".into()
    }
}

fn ms(s: &mut Samples, p: f64) -> f64 {
    s.percentile_us(p) / 1000.0
}

/// "0.62× (goal ≥ 2×) no".
fn verdict(ratio: f64, goal: &str, met: bool) -> (String, String) {
    (
        format!("{ratio:.2}×"),
        format!("{goal} {}", if met { "**met**" } else { "not met" }),
    )
}

pub(crate) async fn compare(bench: &Bench, nats_bin: &str, shape: Shape) -> anyhow::Result<()> {
    let version = nats::server_version(nats_bin)?;
    let sync_always = version >= (2, 10, 0);
    let payload = nats_payload(bench.size);
    let d = bench.duration;
    let say = |what: &str| eprintln!("compare: {what}…");

    say("NATS core, DMs");
    let server = nats::NatsServer::spawn(nats_bin).await?;
    let mut core_dm = core_flow(&server, shape.pairs, 1, shape.window, &payload, d).await?;
    drop(server);
    say("JetStream, DMs");
    let dir = tempfile::tempdir()?;
    let server = jetstream_server(nats_bin, dir.path(), false).await?;
    let mut js_dm = jetstream_flow(&server, shape.pairs, shape.window, &payload, d).await?;
    drop(server);
    drop(dir);
    let mut js_fsync = if sync_always {
        say("JetStream sync_interval always, DMs");
        let dir = tempfile::tempdir()?;
        let server = jetstream_server(nats_bin, dir.path(), true).await?;
        Some(jetstream_flow(&server, shape.pairs, shape.window, &payload, d).await?)
    } else {
        None
    };
    say("meshd, DMs");
    let broker = bench.start().await?;
    let mut m_dm = bench.meshd_dms(&broker, shape.pairs, shape.window).await?;
    drop(broker);
    say("meshd durability = fsync, DMs");
    let fsync_bench = Bench {
        durability: "fsync".into(),
        daemon: bench.daemon.clone(),
        database_url: bench.database_url.clone(),
        size: bench.size,
        duration: bench.duration,
    };
    let broker = fsync_bench.start().await?;
    let mut f_dm = fsync_bench
        .meshd_dms(&broker, shape.pairs, shape.window)
        .await?;
    drop(broker);

    say("NATS core, fan-out");
    let server = nats::NatsServer::spawn(nats_bin).await?;
    let core_fan = core_flow(&server, 1, shape.peers, shape.window, &payload, d).await?;
    drop(server);
    say("meshd, fan-out");
    let broker = bench.start().await?;
    let m_fan = bench
        .meshd_fanout(&broker, shape.peers, shape.window)
        .await?;
    drop(broker);

    say("round trips");
    let server = nats::NatsServer::spawn(nats_bin).await?;
    let mut core_rt = core_rtt(server.addr, &payload, 5000).await?;
    drop(server);
    let mut m_rt = bench.rtt_samples(5000).await?;

    say("handshakes");
    let (_, mut core_hs) = core_handshakes(nats_bin, 2000, shape.concurrency).await?;
    let (_, mut m_hs) = bench.handshake_run(2000, shape.concurrency).await?;

    say("idle connections");
    let (b0, b1) = core_idle(nats_bin, shape.conns).await?;
    let core_idle_kib = b1.saturating_sub(b0) as f64 / shape.conns as f64;
    let (m0, m1) = bench.idle_run(shape.conns).await?;
    let m_idle_kib = m1.saturating_sub(m0) as f64 / shape.conns as f64;

    say("meshd across two brokers");
    let (fed_rate, _) = bench.fed_flow(shape.pairs, shape.window).await?;
    let mut fed_rt = bench.fed_rtt_samples(5000).await?;

    // The table.
    let mut rows = Vec::new();
    let js_f = |f: &Option<Flow>, g: &dyn Fn(&Flow) -> String| f.as_ref().map_or(String::new(), g);
    let none = String::from("–");
    {
        let r = m_dm.rate / js_dm.rate;
        let (ratio, goal) = verdict(r, "≥ 2× JetStream", r >= 2.0);
        rows.push(Row {
            metric: format!("DM throughput {p} → {p}, delivered msgs/s", p = shape.pairs),
            core: f0(core_dm.rate),
            js: format!(
                "{}{}",
                f0(js_dm.rate),
                js_f(&js_fsync, &|f| format!(" (sync {})", f0(f.rate)))
            ),
            meshd: f0(m_dm.rate),
            fsync: f0(f_dm.rate),
            ratio,
            goal,
        });
        let r = m_dm.cpu_us / js_dm.cpu_us;
        let (ratio, goal) = verdict(r, "≤ 0.5× JetStream", r <= 0.5);
        rows.push(Row {
            metric: "broker CPU per delivered DM, µs".into(),
            core: f1(core_dm.cpu_us),
            js: f1(js_dm.cpu_us),
            meshd: f1(m_dm.cpu_us),
            fsync: f1(f_dm.cpu_us),
            ratio,
            goal,
        });
        let mut ja = js_dm.acks.take().unwrap_or_default();
        let mut ma = m_dm.acks.take().unwrap_or_default();
        let mut fa = f_dm.acks.take().unwrap_or_default();
        let mut jfa = js_fsync.as_mut().and_then(|f| f.acks.take());
        let p99 = |s: &mut Samples| format!("{} / {}", f1(ms(s, 50.0)), f1(ms(s, 99.0)));
        let r = ms(&mut ma, 99.0) / ms(&mut ja, 99.0);
        let (ratio, goal) = verdict(r, "p99 ≤ 2× JetStream", r <= 2.0);
        rows.push(Row {
            metric: "send → ack p50 / p99, ms".into(),
            core: none.clone(),
            js: format!(
                "{}{}",
                p99(&mut ja),
                jfa.as_mut()
                    .map_or(String::new(), |s| format!(" (sync {})", p99(s)))
            ),
            meshd: p99(&mut ma),
            fsync: p99(&mut fa),
            ratio,
            goal,
        });
        rows.push(Row {
            metric: "sends without an ack 10 s after the last send (slowest late ack, ms)".into(),
            core: none.clone(),
            js: format!("{} ({})", js_dm.unacked, f1(js_dm.drain_max_us / 1000.0)),
            meshd: format!("{} ({})", m_dm.unacked, f1(m_dm.drain_max_us / 1000.0)),
            fsync: format!("{} ({})", f_dm.unacked, f1(f_dm.drain_max_us / 1000.0)),
            ratio: none.clone(),
            goal: format!(
                "every send acked {}",
                if m_dm.unacked == 0 && f_dm.unacked == 0 {
                    "**met**"
                } else {
                    "not met"
                }
            ),
        });
        let r = ms(&mut m_dm.latency, 99.0) / ms(&mut core_dm.latency, 99.0);
        let (ratio, goal) = verdict(r, "≤ 2× NATS core", r <= 2.0);
        rows.push(Row {
            metric: "send → delivery p50 / p99 under that load, ms".into(),
            core: p99(&mut core_dm.latency),
            js: p99(&mut js_dm.latency),
            meshd: p99(&mut m_dm.latency),
            fsync: p99(&mut f_dm.latency),
            ratio,
            goal,
        });
    }
    {
        let r = m_fan.rate / core_fan.rate;
        let (ratio, goal) = verdict(r, "≥ 0.5× NATS core", r >= 0.5);
        rows.push(Row {
            metric: format!("fan-out 1 → {}, deliveries/s", shape.peers),
            core: f0(core_fan.rate),
            js: none.clone(),
            meshd: f0(m_fan.rate),
            fsync: none.clone(),
            ratio,
            goal,
        });
        let r = m_fan.cpu_us / core_fan.cpu_us;
        rows.push(Row {
            metric: "broker CPU per fan-out delivery, µs".into(),
            core: f1(core_fan.cpu_us),
            js: none.clone(),
            meshd: f1(m_fan.cpu_us),
            fsync: none.clone(),
            ratio: format!("{r:.2}×"),
            goal: none.clone(),
        });
    }
    {
        let us = |s: &mut Samples| {
            format!(
                "{} / {}",
                f0(s.percentile_us(50.0)),
                f0(s.percentile_us(99.0))
            )
        };
        let r = m_rt.percentile_us(99.0) / core_rt.percentile_us(99.0);
        let (ratio, goal) = verdict(r, "p99 ≤ 2× NATS core", r <= 2.0);
        rows.push(Row {
            metric: "round trip A → B → A p50 / p99, µs".into(),
            core: us(&mut core_rt),
            js: none.clone(),
            meshd: us(&mut m_rt),
            fsync: none.clone(),
            ratio,
            goal,
        });
        let r = m_hs.percentile_us(50.0) / core_hs.percentile_us(50.0);
        let (ratio, goal) = verdict(r, "p50 ≤ 2× NATS", r <= 2.0);
        rows.push(Row {
            metric: format!(
                "connect + authenticate, {} at once, p50 / p99 ms (NATS: nkey)",
                shape.concurrency
            ),
            core: format!(
                "{} / {}",
                f1(ms(&mut core_hs, 50.0)),
                f1(ms(&mut core_hs, 99.0))
            ),
            js: none.clone(),
            meshd: format!("{} / {}", f1(ms(&mut m_hs, 50.0)), f1(ms(&mut m_hs, 99.0))),
            fsync: none.clone(),
            ratio,
            goal,
        });
        let r = m_idle_kib / core_idle_kib;
        let (ratio, goal) = verdict(r, "≤ 1× NATS", r <= 1.0);
        rows.push(Row {
            metric: format!(
                "RSS per idle authenticated connection ({}), KiB",
                shape.conns
            ),
            core: f1(core_idle_kib),
            js: none.clone(),
            meshd: f1(m_idle_kib),
            fsync: none.clone(),
            ratio,
            goal,
        });
        let r = fed_rate / m_dm.rate;
        let (ratio, goal) = verdict(r, "≥ 0.5× meshd local", r >= 0.5);
        rows.push(Row {
            metric: format!(
                "cross-broker DM throughput {p} → {p}, msgs/s",
                p = shape.pairs
            ),
            core: none.clone(),
            js: none.clone(),
            meshd: f0(fed_rate),
            fsync: none.clone(),
            ratio,
            goal,
        });
        let r = fed_rt.percentile_us(99.0) / m_rt.percentile_us(99.0);
        let (ratio, goal) = verdict(r, "p99 ≤ 2× meshd local", r <= 2.0);
        rows.push(Row {
            metric: "cross-broker round trip p50 / p99, µs".into(),
            core: none.clone(),
            js: none.clone(),
            meshd: us(&mut fed_rt),
            fsync: none.clone(),
            ratio,
            goal,
        });
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "\nnats-server {}.{}.{}{}; {} s per flow after 2 s of warm-up; {}-byte messages; {} CPUs; load generator on the same CPUs\n",
        version.0,
        version.1,
        version.2,
        if sync_always {
            ""
        } else {
            " (no sync_interval: the JetStream fsync anchor needs 2.10+)"
        },
        d.as_secs(),
        bench.size,
        cpus
    );
    println!("| metric | NATS core | JetStream | meshd | meshd fsync | meshd ratio | goal |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.metric, r.core, r.js, r.meshd, r.fsync, r.ratio, r.goal
        );
    }
    Ok(())
}
