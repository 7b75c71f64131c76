//! Cross-broker scenarios: two `meshd` processes of two organizations linked over QUIC
//! (optionally through the UDP fault proxy), members of one mesh on each side; and the
//! NATS baseline for the same shape, two `nats-server`s joined by a gateway.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use meshd_tests::faultproxy::FaultProxy;
use meshd_tests::{DaemonProcess, run_cli};
use tokio_tungstenite::tungstenite::Message;

use crate::stats::Samples;
use crate::{Bench, Broker, Conn, count_pushes, count_pushes_keep, measure, nats, rand_u32};

const A: &str = "mesh.alpha.bench";
const B: &str = "mesh.beta.bench";

/// Two federated brokers sharing one mesh (home A, replica B).
pub(crate) struct FedPair {
    pub(crate) a: Broker,
    pub(crate) b: Broker,
    proxies: Option<(FaultProxy, FaultProxy)>,
    _certs: tempfile::TempDir,
}

impl FedPair {
    fn cut(&self) {
        if let Some((x, y)) = &self.proxies {
            x.cut();
            y.cut();
        }
    }

    fn heal(&self) {
        if let Some((x, y)) = &self.proxies {
            x.heal();
            y.heal();
        }
    }
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `GET /federation` → the link entry for `peer`.
async fn link(http: SocketAddr, peer: &str) -> anyhow::Result<serde_json::Value> {
    let (code, _, body) = meshd_tests::http(http, "GET", "/federation", None).await?;
    if code != 200 {
        bail!("/federation: {code}");
    }
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    v["links"]
        .as_array()
        .and_then(|l| l.iter().find(|x| x["peer"] == peer).cloned())
        .context("no such link")
}

async fn poll<T>(
    what: &str,
    limit: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Bench {
    /// Starts A and B with their own org CAs; B accepts A's mesh.
    pub(crate) async fn start_fed(&self, via_proxy: bool, grace: &str) -> anyhow::Result<FedPair> {
        self.start_fed_with(via_proxy, grace, true).await
    }

    /// [`Bench::start_fed`] with interest management on or off.
    pub(crate) async fn start_fed_with(
        &self,
        via_proxy: bool,
        grace: &str,
        interest: bool,
    ) -> anyhow::Result<FedPair> {
        let certs = tempfile::tempdir()?;
        let ca_a = certs.path().join("alpha");
        let ca_b = certs.path().join("beta");
        let (org_a, _) = meshd_certs::OrgCa::init_or_load(&ca_a, "alpha.bench")?;
        let (org_b, _) = meshd_certs::OrgCa::init_or_load(&ca_b, "beta.bench")?;
        let leaf_a = org_a.issue_broker(A, &ca_a)?;
        let leaf_b = org_b.issue_broker(B, &ca_b)?;
        let (qa, qb) = (free_udp_port()?, free_udp_port()?);
        let direct_a: SocketAddr = format!("127.0.0.1:{qa}").parse()?;
        let direct_b: SocketAddr = format!("127.0.0.1:{qb}").parse()?;
        let proxies = if via_proxy {
            Some((
                FaultProxy::start(direct_a).await?,
                FaultProxy::start(direct_b).await?,
            ))
        } else {
            None
        };
        let (reach_a, reach_b) = match &proxies {
            Some((pa, pb)) => (pa.addr(), pb.addr()),
            None => (direct_a, direct_b),
        };
        let config = |me: &str,
                      port: u16,
                      leaf: &meshd_certs::BrokerCertPaths,
                      ca: &std::path::Path,
                      peer: &str,
                      peer_addr: SocketAddr,
                      peer_ca: &std::path::Path| {
            format!(
                "[storage]\ndurability = \"{dur}\"\n[limits]\nsends_per_second = 0\nmax_connections = 60000\n\
                 max_connections_per_mesh = 60000\nmax_pending_per_address = 60000\n[log]\nlevel = \"{log}\"\n\
                 [federation]\nbroker = \"{me}\"\nlisten = \"127.0.0.1:{port}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
                 ca = \"{ca}\"\npresence_grace = \"{grace}\"\nreconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\n\
                 keepalive = \"300ms\"\nidle_timeout = \"1500ms\"\nspatial_interest = {interest}\n\
                 [[federation.peers]]\nname = \"{peer}\"\naddr = \"{peer_addr}\"\nca = \"{peer_ca}\"\n",
                dur = self.durability,
                log = crate::log_level(),
                cert = leaf.cert.display(),
                key = leaf.key.display(),
                ca = ca.join(meshd_certs::CA_CERT_FILE).display(),
                peer_ca = peer_ca.join(meshd_certs::CA_CERT_FILE).display(),
            )
        };
        let dir_a = tempfile::tempdir()?;
        let dir_b = tempfile::tempdir()?;
        let cfg_a = dir_a.path().join("a.toml");
        let cfg_b = dir_b.path().join("b.toml");
        std::fs::write(&cfg_a, config(A, qa, &leaf_a, &ca_a, B, reach_b, &ca_b))?;
        std::fs::write(&cfg_b, config(B, qb, &leaf_b, &ca_b, A, reach_a, &ca_a))?;
        let (da, db) = (
            dir_a.path().to_str().context("path")?.to_owned(),
            dir_b.path().to_str().context("path")?.to_owned(),
        );
        let (ca_s, cb_s) = (
            cfg_a.to_str().context("path")?.to_owned(),
            cfg_b.to_str().context("path")?.to_owned(),
        );
        let cli = |d: &str, c: &str, rest: &[&str]| {
            let mut v = vec![
                "--data-dir".to_owned(),
                d.to_owned(),
                "--config".into(),
                c.to_owned(),
            ];
            v.extend(rest.iter().map(|s| (*s).to_owned()));
            v
        };
        let run = async |args: Vec<String>| -> anyhow::Result<serde_json::Value> {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, out, err) = run_cli(&self.daemon, &refs, &[]).await?;
            if code != 0 {
                bail!("{args:?}: {err}");
            }
            Ok(serde_json::from_str(out.trim()).unwrap_or_default())
        };
        let mesh = run(cli(&da, &ca_s, &["mesh", "create", "bench", "--json"])).await?;
        let mesh_id = mesh["mesh_id"].as_str().context("mesh_id")?.to_owned();
        run(cli(
            &da,
            &ca_s,
            &["mesh", "share", "bench", "--with", B, "--json"],
        ))
        .await?;
        run(cli(
            &db,
            &cb_s,
            &["mesh", "accept", &mesh_id, "--from", A, "--json"],
        ))
        .await?;
        let log = crate::log_level();
        let env = [("MESHD_LOG_LEVEL", log.as_str())];
        let pa =
            DaemonProcess::spawn(&self.daemon, dir_a.path(), &["--config", &ca_s], &env).await?;
        let pb =
            DaemonProcess::spawn(&self.daemon, dir_b.path(), &["--config", &cb_s], &env).await?;
        let a_http = pa.addr;
        poll("the mesh to flow", Duration::from_secs(30), async || {
            let l = link(a_http, B).await.ok()?;
            l["meshes"]
                .as_array()?
                .iter()
                .any(|m| m == mesh_id.as_str())
                .then_some(())
        })
        .await?;
        let list = run(cli(&db, &cb_s, &["mesh", "list", "--json"])).await?;
        let slug_b = list["meshes"]
            .as_array()
            .and_then(|m| m.iter().find(|x| x["mesh_id"] == mesh_id.as_str()))
            .and_then(|m| m["slug"].as_str())
            .context("replica on B")?
            .to_owned();
        Ok(FedPair {
            a: Broker {
                proc: pa,
                database_url: None,
                _dir: dir_a,
                mesh_id: mesh_id.clone(),
                slug: "bench".into(),
            },
            b: Broker {
                proc: pb,
                database_url: None,
                _dir: dir_b,
                mesh_id,
                slug: slug_b,
            },
            proxies,
            _certs: certs,
        })
    }

    /// Cross-broker round trip: a on A, b on B.
    pub(crate) async fn fed_rtt(&self, count: usize) -> anyhow::Result<()> {
        let mut samples = self.fed_rtt_samples(count).await?;
        println!(
            "meshd  fed-rtt    DM A→B→A across two brokers (each DM stored on both): {}",
            samples.summary()
        );
        Ok(())
    }

    pub(crate) async fn fed_rtt_samples(&self, count: usize) -> anyhow::Result<Samples> {
        let pair = self.start_fed(false, "30s").await?;
        let ma = pair.a.enroll(1).await?;
        let mb = pair.b.enroll(1).await?;
        let mut a = Conn::connect(&pair.a, &ma[0]).await?;
        let mut b = Conn::connect(&pair.b, &mb[0]).await?;
        let (a_key, b_key) = (a.key.clone(), b.key.clone());
        wait_listed(&mut a, std::slice::from_ref(&b_key)).await?;
        wait_listed(&mut b, std::slice::from_ref(&a_key)).await?;
        crate::round_trips(a, b, &self.plaintext(), count).await
    }

    /// Senders on A, receivers on B.
    pub(crate) async fn fed_throughput(&self, pairs: usize, window: usize) -> anyhow::Result<()> {
        let (rate, mut acks) = self.fed_flow(pairs, window).await?;
        println!(
            "meshd  fed-throughput {pairs} pairs A→B, window {window}: {rate:.0} delivered DMs/s; send→ack {}",
            acks.summary()
        );
        Ok(())
    }

    /// Delivered DMs/s and send→ack samples, senders on A and receivers on B.
    pub(crate) async fn fed_flow(
        &self,
        pairs: usize,
        window: usize,
    ) -> anyhow::Result<(f64, Samples)> {
        let pair = self.start_fed(false, "30s").await?;
        let (ma, receivers) = receivers_on_b(&pair, pairs).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let delivered = Arc::new(AtomicU64::new(0));
        let mut handles = Vec::new();
        let mut senders = Vec::new();
        for (p, r) in receivers.into_iter().enumerate() {
            let s = Conn::connect(&pair.a, &ma[p]).await?;
            let frame = s.sealed(&r.key, &self.plaintext());
            handles.push(count_pushes(r, stop.clone(), delivered.clone()));
            let stop_s = stop.clone();
            senders.push(tokio::spawn(async move {
                s.pump(&frame, window, &stop_s).await
            }));
        }
        let (rate, acks) = measure(&delivered, self.duration, &stop, senders).await?;
        for h in handles {
            h.abort();
        }
        Ok((rate, acks))
    }

    /// Tagged messages across brokers next to plain DMs, on the same pair: senders on
    /// A, receivers on B; first DMs, then `tag:t<p>` sends to the subscriber of `t<p>`.
    pub(crate) async fn fed_tagged(&self, pairs: usize, window: usize) -> anyhow::Result<()> {
        let pair = self.start_fed(false, "30s").await?;
        let (ma, mut receivers) = receivers_on_b(&pair, pairs).await?;
        for (p, r) in receivers.iter_mut().enumerate() {
            r.send_raw(&format!(
                r#"{{"type":"subscribe_tags","tags":["t{p}"],"_reqId":"s"}}"#
            ))
            .await?;
        }
        let mut observer = Conn::connect(&pair.a, &ma[pairs]).await?;
        poll(
            "B's subscriptions at A",
            Duration::from_secs(30),
            async || {
                let v = list_peers(&mut observer).await.ok()?;
                let subscribed = v["peers"]
                    .as_array()?
                    .iter()
                    .filter(|p| p["tags"].as_array().is_some_and(|t| !t.is_empty()))
                    .count();
                (subscribed >= pairs).then_some(())
            },
        )
        .await?;
        let text = self.plaintext();
        let mut rates = Vec::new();
        for tagged in [false, true] {
            let stop = Arc::new(AtomicBool::new(false));
            let delivered = Arc::new(AtomicU64::new(0));
            let mut handles = Vec::new();
            let mut senders = Vec::new();
            let mut back = Vec::new();
            for (p, r) in receivers.drain(..).enumerate() {
                let s = Conn::connect(&pair.a, &ma[p]).await?;
                let frame = if tagged {
                    let (nonce, c) = meshd_tests::crypto::plain(&text);
                    format!(
                        r#"{{"type":"send","id":"x","targetSpec":"tag:t{p}","priority":"next","nonce":"{nonce}","ciphertext":"{c}"}}"#
                    )
                } else {
                    s.sealed(&r.key, &text)
                };
                handles.push(count_pushes_keep(r, stop.clone(), delivered.clone()));
                let stop_s = stop.clone();
                senders.push(tokio::spawn(async move {
                    s.pump(&frame, window, &stop_s).await
                }));
            }
            let (rate, mut acks) = measure(&delivered, self.duration, &stop, senders).await?;
            for h in handles {
                back.push(h.await??);
            }
            receivers = back;
            let what = if tagged { "tag:NAME sends" } else { "DMs" };
            println!(
                "meshd  fed-tagged {pairs} pairs A→B, window {window}, {what}: {rate:.0} delivered/s; send→ack {}",
                acks.summary()
            );
            rates.push(rate);
        }
        println!(
            "meshd  fed-tagged tagged / DM throughput: {:.2}×",
            rates[1] / rates[0].max(1.0)
        );
        Ok(())
    }

    /// Presence traffic on the link while `peers` peers on A move, `viewers` positioned
    /// peers on B watch, with interest management and without.
    pub(crate) async fn fed_moving(
        &self,
        peers: usize,
        viewers: usize,
        radius: f64,
        step: f64,
        moves_per_sec: f64,
    ) -> anyhow::Result<()> {
        let mut results = Vec::new();
        for interest in [true, false] {
            let pair = self.start_fed_with(false, "30s", interest).await?;
            let ma = pair.a.enroll(50).await?;
            let mb = pair.b.enroll(viewers.max(1)).await?;
            // Viewers stand still, spread over the area; the walkers start anywhere.
            let area = 1000.0;
            let mut held = Vec::new();
            for (i, m) in mb.iter().enumerate().take(viewers) {
                let mut v = Conn::connect(&pair.b, m).await?;
                let (x, y) = spread(i, viewers, area);
                v.send_raw(&format!(
                    r#"{{"type":"set_position","x":{x},"y":{y},"radius":{radius},"_reqId":"p"}}"#
                ))
                .await?;
                held.push(tokio::spawn(
                    async move { while v.ws.next().await.is_some() {} },
                ));
            }
            let stop = Arc::new(AtomicBool::new(false));
            let moves = Arc::new(AtomicU64::new(0));
            let mut walkers = Vec::new();
            for i in 0..peers {
                let w = Conn::connect(&pair.a, &ma[i % ma.len()]).await?;
                let (stop, moves) = (stop.clone(), moves.clone());
                let (mut x, mut y) = spread(i * 7919 % peers.max(1), peers, area);
                let pause = Duration::from_secs_f64(1.0 / moves_per_sec);
                walkers.push(tokio::spawn(async move {
                    let mut heading = f64::from(rand_u32() % 360).to_radians();
                    let mut tick = tokio::time::interval(pause);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let (tx, mut rx) = futures_util::StreamExt::split(w.ws);
                    let drain = tokio::spawn(async move { while rx.next().await.is_some() {} });
                    let mut tx = tx;
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        heading += (f64::from(rand_u32() % 61) - 30.0).to_radians();
                        x = (x + step * heading.cos()).clamp(0.0, area);
                        y = (y + step * heading.sin()).clamp(0.0, area);
                        let f = format!(
                            r#"{{"type":"set_position","x":{x:.3},"y":{y:.3},"radius":{radius}}}"#
                        );
                        if tx.send(Message::Text(f.into())).await.is_err() {
                            break;
                        }
                        moves.fetch_add(1, Ordering::Relaxed);
                    }
                    drain.abort();
                }));
            }
            // Settle (every walker placed and heard once), then measure.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let m0 = metrics_of(&pair.a).await?;
            let n0 = moves.load(Ordering::Relaxed);
            let t = Instant::now();
            tokio::time::sleep(self.duration).await;
            let m1 = metrics_of(&pair.a).await?;
            let n1 = moves.load(Ordering::Relaxed);
            let secs = t.elapsed().as_secs_f64();
            stop.store(true, Ordering::Relaxed);
            for w in walkers {
                let _ = w.await;
            }
            for h in held {
                h.abort();
            }
            let rate = |k: &str| {
                (m1.get(k).copied().unwrap_or(0.0) - m0.get(k).copied().unwrap_or(0.0)) / secs
            };
            let (frames, bytes, kept) = (
                rate("meshd_federation_presence_frames_total"),
                rate("meshd_federation_presence_bytes_total"),
                rate("meshd_federation_moves_suppressed_total"),
            );
            let made = (n1 - n0) as f64 / secs;
            println!(
                "meshd  fed-moving {peers} walkers on A (step {step}, radius {radius}, {moves_per_sec}/s each), {viewers} viewers on B, interest {}: {made:.0} moves/s; link {frames:.0} presence frames/s, {:.1} KiB/s; {kept:.0} moves/s kept home",
                if interest { "on" } else { "off" },
                bytes / 1024.0
            );
            results.push((frames, bytes));
        }
        println!(
            "meshd  fed-moving interest on / off: {:.3}× frames, {:.3}× bytes",
            results[0].0 / results[1].0.max(1.0),
            results[0].1 / results[1].1.max(1.0)
        );
        Ok(())
    }

    /// Time for A to list `peers` sessions of B again after the link comes back.
    pub(crate) async fn fed_presence(&self, peers: usize) -> anyhow::Result<()> {
        let pair = self.start_fed(true, "1s").await?;
        let ma = pair.a.enroll(1).await?;
        let mb = pair.b.enroll(50).await?;
        let mut observer = Conn::connect(&pair.a, &ma[0]).await?;
        let mut held = Vec::with_capacity(peers);
        for i in 0..peers {
            let mut c = Conn::connect(&pair.b, &mb[i % mb.len()]).await?;
            held.push(tokio::spawn(
                async move { while c.ws.next().await.is_some() {} },
            ));
        }
        let all = poll(
            "all peers listed at A",
            Duration::from_secs(60),
            async || (remote_count(&mut observer).await.ok()? >= peers).then_some(()),
        );
        all.await?;
        for round in 0..3 {
            pair.cut();
            poll("A to drop B's peers", Duration::from_secs(60), async || {
                (remote_count(&mut observer).await.ok()? == 0).then_some(())
            })
            .await?;
            let healed = Instant::now();
            pair.heal();
            let a_http = pair.a.proc.addr;
            let up = poll("the link back up", Duration::from_secs(60), async || {
                let l = link(a_http, B).await.ok()?;
                (l["state"] == "up").then(Instant::now)
            })
            .await?;
            poll(
                "presence to converge",
                Duration::from_secs(60),
                async || (remote_count(&mut observer).await.ok()? >= peers).then_some(()),
            )
            .await?;
            let done = Instant::now();
            println!(
                "meshd  fed-presence {peers} peers, round {round}: converged {:.0} ms after the heal ({:.0} ms after the link came up)",
                done.duration_since(healed).as_secs_f64() * 1000.0,
                done.duration_since(up).as_secs_f64() * 1000.0
            );
        }
        for h in held {
            h.abort();
        }
        Ok(())
    }

    /// Messages sent during a cut of `cut`, then the rate at which A's outbox drains.
    pub(crate) async fn fed_catchup(&self, pairs: usize, cut: Duration) -> anyhow::Result<()> {
        let pair = self.start_fed(true, "600s").await?;
        let (ma, receivers) = receivers_on_b(&pair, pairs).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let delivered = Arc::new(AtomicU64::new(0));
        let mut handles = Vec::new();
        let mut senders = Vec::new();
        pair.cut();
        for (p, r) in receivers.into_iter().enumerate() {
            let s = Conn::connect(&pair.a, &ma[p]).await?;
            let frame = s.sealed(&r.key, &self.plaintext());
            handles.push(count_pushes(
                r,
                Arc::new(AtomicBool::new(false)),
                delivered.clone(),
            ));
            let stop_s = stop.clone();
            senders.push(tokio::spawn(
                async move { s.pump(&frame, 128, &stop_s).await },
            ));
        }
        tokio::time::sleep(cut).await;
        stop.store(true, Ordering::Relaxed);
        let mut acked = 0usize;
        for s in senders {
            acked += s.await??.len();
        }
        let during = delivered.load(Ordering::Relaxed);
        let healed = Instant::now();
        pair.heal();
        let mut last = (during, Instant::now());
        let a_http = pair.a.proc.addr;
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let d = delivered.load(Ordering::Relaxed);
            if d != last.0 {
                last = (d, Instant::now());
            }
            let queued = link(a_http, B)
                .await
                .ok()
                .and_then(|l| l["queued"].as_u64());
            if queued == Some(0) && d as usize >= acked && last.1.elapsed() > Duration::from_secs(2)
            {
                break;
            }
            if healed.elapsed() > Duration::from_secs(600) {
                bail!("catch-up did not finish: delivered {d} of {acked}");
            }
        }
        let (d, t) = last;
        let secs = t.duration_since(healed).as_secs_f64();
        println!(
            "meshd  fed-catchup {pairs} senders, {}s cut: {acked} acknowledged during the cut ({during} crossed before it), backlog {} delivered in {secs:.1} s after the heal = {:.0} DMs/s",
            cut.as_secs(),
            d - during,
            (d - during) as f64 / secs
        );
        for h in handles {
            h.abort();
        }
        Ok(())
    }
}

/// Members for `pairs` senders on A, and `pairs` receivers connected on B that A lists.
async fn receivers_on_b(
    pair: &FedPair,
    pairs: usize,
) -> anyhow::Result<(Vec<meshd_tests::Member>, Vec<Conn>)> {
    let ma = pair.a.enroll(pairs + 1).await?;
    let mb = pair.b.enroll(pairs).await?;
    let mut observer = Conn::connect(&pair.a, &ma[pairs]).await?;
    let mut receivers = Vec::new();
    for m in &mb {
        receivers.push(Conn::connect(&pair.b, m).await?);
    }
    let keys: Vec<String> = receivers.iter().map(|r| r.key.clone()).collect();
    wait_listed(&mut observer, &keys).await?;
    Ok((ma, receivers))
}

/// Point `i` of `n` on a grid over `[0, area]²`.
fn spread(i: usize, n: usize, area: f64) -> (f64, f64) {
    let side = (n as f64).sqrt().ceil().max(1.0);
    let cell = area / side;
    let (col, row) = (i as f64 % side, (i as f64 / side).floor());
    (cell * (col + 0.5), cell * (row + 0.5))
}

/// The counters of a broker's `/metrics` (unlabelled lines).
async fn metrics_of(b: &Broker) -> anyhow::Result<std::collections::HashMap<String, f64>> {
    let (_, _, body) = meshd_tests::http(b.proc.addr, "GET", "/metrics", None).await?;
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect())
}

/// Peers of other brokers in `list_peers`.
async fn remote_count(c: &mut Conn) -> anyhow::Result<usize> {
    let v = list_peers(c).await?;
    Ok(v["peers"]
        .as_array()
        .map_or(0, |p| p.iter().filter(|x| !x["broker"].is_null()).count()))
}

async fn list_peers(c: &mut Conn) -> anyhow::Result<serde_json::Value> {
    c.ws.send(Message::Text(
        r#"{"type":"list_peers","_reqId":"lp"}"#.to_owned().into(),
    ))
    .await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), c.ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str())?;
                if v["_reqId"] == "lp" {
                    return Ok(v);
                }
            }
            Ok(Some(Ok(_))) => {}
            _ => bail!("no peers_list"),
        }
    }
}

async fn wait_listed(c: &mut Conn, keys: &[String]) -> anyhow::Result<()> {
    poll(
        "peers of the other broker",
        Duration::from_secs(30),
        async || {
            let v = list_peers(c).await.ok()?;
            let listed: Vec<&str> = v["peers"]
                .as_array()?
                .iter()
                .filter_map(|p| p["pubkey"].as_str())
                .collect();
            keys.iter()
                .all(|k| listed.contains(&k.as_str()))
                .then_some(())
        },
    )
    .await
}

/// The NATS shape of fed-throughput: publishers on cluster A, subscribers on cluster B,
/// the two joined by a gateway.
pub(crate) async fn nats_gateway(
    binary: &str,
    pairs: usize,
    size: usize,
    duration: Duration,
) -> anyhow::Result<()> {
    let payload = vec![b'x'; size * 4 / 3 + 250];
    let dir = tempfile::tempdir()?;
    let port = || -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let (ca, cb, ga, gb) = (port()?, port()?, port()?, port()?);
    let conf = |name: &str, client: u16, gw: u16, other: &str, other_gw: u16| {
        format!(
            "listen: 127.0.0.1:{client}\ngateway {{\n  name: {name}\n  listen: 127.0.0.1:{gw}\n  gateways: [ {{ name: {other}, url: \"nats://127.0.0.1:{other_gw}\" }} ]\n}}\n"
        )
    };
    let fa = dir.path().join("a.conf");
    let fb = dir.path().join("b.conf");
    std::fs::write(&fa, conf("A", ca, ga, "B", gb))?;
    std::fs::write(&fb, conf("B", cb, gb, "A", ga))?;
    let sa = nats::NatsServer::spawn_with(binary, &fa, ca).await?;
    let sb = nats::NatsServer::spawn_with(binary, &fb, cb).await?;
    // Let the gateways connect both ways.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for window in [None, Some(128)] {
        let label = window.map_or("blast".to_owned(), |w| format!("window {w}"));
        let rate =
            crate::nats_flow_between(sa.addr, sb.addr, pairs, &payload, duration, window).await?;
        println!(
            "nats   gateway    {pairs} pairs, pub on A → sub on B, {label}: {rate:.0} delivered msgs/s"
        );
    }
    Ok(())
}
