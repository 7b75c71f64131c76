//! meshd-bench: a claudemesh load generator for meshd, with the same patterns run
//! against `nats-server` for comparison.
//!
//! It spawns the broker under test (a release build of `meshd` by default) on loopback
//! with a throw-away data directory, enrolls members through the real `/join`, and speaks
//! the claudemesh protocol: signed hellos, `send` frames, `push` frames. DM payloads are
//! sealed with crypto_box once and reused: the broker treats them as opaque bytes, and
//! sealing each one would spend the generator's CPU, not the broker's.
//!
//! Run `ulimit -n 65536` first for the idle-connection scenario.

// Tests and benchmarks measure real time (see clippy.toml).
#![allow(clippy::disallowed_methods)]

mod abuse;
mod compare;
mod exec;
mod fed;
mod logs;
mod nats;
mod search;
mod stats;
mod web;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt as _, StreamExt as _};
use meshd_protocol::invite::InvitePayload;
use meshd_tests::{
    DaemonProcess, HelloOpts, Keypair, Member, hello_frame, http_json, run_cli, unique_ts,
};
use serde::Deserialize;
use serde_json::json;
use stats::Samples;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[derive(Parser)]
#[command(
    name = "meshd-bench",
    about = "Load generator for meshd (claudemesh protocol) with nats-server baselines"
)]
struct Args {
    /// The meshd binary to test (default: release build in $CARGO_TARGET_DIR).
    #[arg(long, global = true)]
    daemon: Option<String>,
    /// nats-server binary for the nats-* baselines.
    #[arg(long, global = true, default_value = "nats-server")]
    nats: String,
    /// Measurement time per throughput scenario.
    #[arg(long, global = true, default_value = "10s")]
    duration: String,
    /// `durability` setting of the broker under test (normal or fsync).
    #[arg(long, global = true, default_value = "normal")]
    durability: String,
    /// Store of the broker under test (default: its embedded SQLite).
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// Plaintext size of each message, bytes.
    #[arg(long, global = true, default_value_t = 128)]
    size: usize,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Clone)]
enum Scenario {
    /// DM round trip A→B→A, one at a time.
    Rtt {
        #[arg(long, default_value_t = 5000)]
        count: usize,
    },
    /// Sustained delivered DMs/s with N sender→receiver pairs.
    Throughput {
        #[arg(long, default_value_t = 10)]
        pairs: usize,
        /// Sends in flight per sender (awaiting their ack).
        #[arg(long, default_value_t = 128)]
        window: usize,
    },
    /// Broadcast (`*`) deliveries/s to N peers.
    Broadcast {
        #[arg(long, default_value_t = 16)]
        peers: usize,
        #[arg(long, default_value_t = 128)]
        window: usize,
    },
    /// Resident memory per idle authenticated connection.
    Idle {
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        conns: Vec<usize>,
    },
    /// The web app in headless Chromium: page weight, first load, and the live
    /// dashboard's frame times with `peers` peers exchanging `rate` DMs/s.
    Web {
        #[arg(long, default_value_t = 500)]
        peers: usize,
        #[arg(long, default_value_t = 100)]
        rate: u32,
        #[arg(long, default_value_t = 10)]
        secs: u64,
    },
    /// `search_peers` latency (p50/p99) and precision@5 at each mesh size (the labelled
    /// set plus distractors).
    Search {
        #[arg(long, value_delimiter = ',', default_value = "50,1000,10000")]
        peers: Vec<usize>,
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
    /// `execute_code`: start-up time per run (p50/p99, per language) and short runs per
    /// second at a concurrency.
    Exec {
        #[arg(long, default_value_t = 200)]
        runs: usize,
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
        #[arg(long, default_value_t = 10)]
        secs: u64,
    },
    /// `mesh_log` ingest rate and `mesh_logs` full-text latency.
    Logs {
        #[arg(long, default_value_t = 200)]
        clients: usize,
    },
    /// Handshake time: connect + hello → hello_ack.
    Handshake {
        #[arg(long, default_value_t = 2000)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
    },
    /// The NATS baselines: round trip, 10 pairs, 16-way fan-out, idle connections.
    Nats {
        #[arg(long, default_value_t = 10)]
        pairs: usize,
        #[arg(long, default_value_t = 16)]
        peers: usize,
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        conns: Vec<usize>,
    },
    /// Cross-broker DM round trip (client on A, client on B).
    FedRtt {
        #[arg(long, default_value_t = 5000)]
        count: usize,
    },
    /// Cross-broker delivered DMs/s: senders on A, receivers on B.
    FedThroughput {
        #[arg(long, default_value_t = 10)]
        pairs: usize,
        #[arg(long, default_value_t = 128)]
        window: usize,
    },
    /// Tagged sends (`tag:NAME`) across brokers next to plain DMs, same pair.
    FedTagged {
        #[arg(long, default_value_t = 10)]
        pairs: usize,
        #[arg(long, default_value_t = 128)]
        window: usize,
    },
    /// Presence traffic on the link for N moving peers, interest management on and off.
    FedMoving {
        #[arg(long, default_value_t = 1000)]
        peers: usize,
        /// Positioned viewers on the other broker.
        #[arg(long, default_value_t = 10)]
        viewers: usize,
        #[arg(long, default_value_t = 40.0)]
        radius: f64,
        /// Distance of one move.
        #[arg(long, default_value_t = 2.0)]
        step: f64,
        /// Moves per second of each walker.
        #[arg(long, default_value_t = 2.0)]
        rate: f64,
    },
    /// Time for presence of N peers to converge after the link comes back.
    FedPresence {
        #[arg(long, default_value_t = 1000)]
        peers: usize,
    },
    /// Outbox catch-up rate after a cut of the link.
    FedCatchup {
        #[arg(long, default_value_t = 10)]
        pairs: usize,
        #[arg(long, default_value = "60s")]
        cut: String,
    },
    /// Two nats-server clusters joined by a gateway: N pairs across it.
    NatsGateway {
        #[arg(long, default_value_t = 10)]
        pairs: usize,
    },
    /// Honest clients quiet, then while hostile clients run every attack of the
    /// hardening issue (the broker on its default limits): rates, latencies, memory, disk.
    Abuse {
        #[arg(long, default_value_t = 8)]
        pairs: usize,
        /// DMs per second per honest sender (the default send limit is 100/s).
        #[arg(long, default_value_t = 50)]
        pace: u32,
        /// Only these attacks (comma-separated: hooks, slow-http, uploads, offline-queue,
        /// notes, lists, junk); all by default.
        #[arg(long, value_delimiter = ',')]
        attacks: Vec<String>,
    },
    /// The same patterns against NATS core, JetStream (file storage) and meshd (normal
    /// and fsync durability) in one run: a table of figures and ratios to the goals.
    Compare {
        /// DM senders (each with its own receiver).
        #[arg(long, default_value_t = 4)]
        pairs: usize,
        /// Fan-out subscribers.
        #[arg(long, default_value_t = 16)]
        peers: usize,
        /// Sends in flight per sender.
        #[arg(long, default_value_t = 128)]
        window: usize,
        /// Idle connections for the memory reading.
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        /// Handshakes at once.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
    /// Everything, meshd and NATS, one after the other.
    All,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let duration = meshd_config::parse_duration(&args.duration).map_err(|e| anyhow::anyhow!(e))?;
    let daemon = args.daemon.clone().unwrap_or_else(|| {
        let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
        format!("{dir}/release/meshd")
    });
    let b = Bench {
        daemon,
        database_url: args.database_url.clone(),
        durability: args.durability.clone(),
        size: args.size,
        duration,
    };
    match args.scenario {
        Scenario::Rtt { count } => b.rtt(count).await,
        Scenario::Throughput { pairs, window } => b.throughput(pairs, window).await,
        Scenario::Broadcast { peers, window } => b.broadcast(peers, window).await,
        Scenario::Idle { conns } => b.idle(&conns).await,
        Scenario::Abuse {
            pairs,
            pace,
            attacks,
        } => b.abuse(pairs, pace, &attacks).await,
        Scenario::Handshake { count, concurrency } => b.handshake(count, concurrency).await,
        Scenario::Web { peers, rate, secs } => b.web(peers, rate, secs).await,
        Scenario::Search { peers, rounds } => b.search(&peers, rounds).await,
        Scenario::Logs { clients } => b.logs(clients).await,
        Scenario::Exec {
            runs,
            concurrency,
            secs,
        } => b.exec(runs, concurrency, secs).await,
        Scenario::FedRtt { count } => b.fed_rtt(count).await,
        Scenario::FedThroughput { pairs, window } => b.fed_throughput(pairs, window).await,
        Scenario::FedPresence { peers } => b.fed_presence(peers).await,
        Scenario::FedTagged { pairs, window } => b.fed_tagged(pairs, window).await,
        Scenario::FedMoving {
            peers,
            viewers,
            radius,
            step,
            rate,
        } => b.fed_moving(peers, viewers, radius, step, rate).await,
        Scenario::FedCatchup { pairs, cut } => {
            let cut = meshd_config::parse_duration(&cut).map_err(|e| anyhow::anyhow!(e))?;
            b.fed_catchup(pairs, cut).await
        }
        Scenario::NatsGateway { pairs } => {
            fed::nats_gateway(&args.nats, pairs, args.size, duration).await
        }
        Scenario::Nats {
            pairs,
            peers,
            conns,
        } => nats_suite(&args.nats, pairs, peers, &conns, args.size, duration).await,
        Scenario::Compare {
            pairs,
            peers,
            window,
            conns,
            concurrency,
        } => {
            let shape = compare::Shape {
                pairs,
                peers,
                window,
                conns,
                concurrency,
            };
            compare::compare(&b, &args.nats, shape).await
        }
        Scenario::All => {
            b.rtt(5000).await?;
            b.throughput(10, 128).await?;
            b.broadcast(16, 128).await?;
            b.handshake(2000, 1).await?;
            b.handshake(4000, 32).await?;
            b.idle(&[1000, 10000]).await?;
            nats_suite(&args.nats, 10, 16, &[1000, 10000], args.size, duration).await
        }
    }
}

struct Bench {
    daemon: String,
    database_url: Option<String>,
    durability: String,
    size: usize,
    duration: Duration,
}

/// A broker under test with one mesh.
struct Broker {
    proc: DaemonProcess,
    database_url: Option<String>,
    _dir: tempfile::TempDir,
    mesh_id: String,
    slug: String,
}

impl Bench {
    async fn start(&self) -> anyhow::Result<Broker> {
        self.start_with(
            // The load generator is one address with many clients.
            "[limits]\nsends_per_second = 0\nmax_connections = 60000\nmax_connections_per_mesh = 60000\n\
             max_pending_per_address = 60000\n",
        )
        .await
    }

    /// The broker on its default limits (rate limits, quotas, connection caps).
    async fn start_on_defaults(&self) -> anyhow::Result<Broker> {
        self.start_with("").await
    }

    async fn start_with(&self, extra: &str) -> anyhow::Result<Broker> {
        let dir = tempfile::tempdir()?;
        let cfg = dir.path().join("bench.toml");
        std::fs::write(
            &cfg,
            format!(
                "[storage]\ndurability = \"{}\"\n{extra}[log]\nlevel = \"{log}\"\n",
                self.durability,
                log = log_level(),
            ),
        )?;
        let d = dir.path().to_str().context("utf-8 path")?.to_owned();
        let mut db_args: Vec<&str> = Vec::new();
        if let Some(url) = &self.database_url {
            db_args.extend(["--database-url", url.as_str()]);
        }
        let mut create = vec!["--data-dir", d.as_str()];
        create.extend(&db_args);
        create.extend(["mesh", "create", "bench", "--json"]);
        let (code, out, err) = run_cli(&self.daemon, &create, &[]).await?;
        if code != 0 {
            bail!("mesh create failed: {err}");
        }
        let mesh: serde_json::Value = serde_json::from_str(out.trim())?;
        let mut global = vec!["--config", cfg.to_str().context("path")?];
        global.extend(&db_args);
        let proc = DaemonProcess::spawn(
            &self.daemon,
            dir.path(),
            &global,
            &[("MESHD_LOG_LEVEL", &log_level())],
        )
        .await?;
        Ok(Broker {
            proc,
            database_url: self.database_url.clone(),
            _dir: dir,
            mesh_id: mesh["mesh_id"].as_str().context("mesh_id")?.to_owned(),
            slug: "bench".into(),
        })
    }

    fn plaintext(&self) -> String {
        "x".repeat(self.size)
    }

    async fn rtt_samples(&self, count: usize) -> anyhow::Result<Samples> {
        let broker = self.start().await?;
        let members = broker.enroll(2).await?;
        let a = Conn::connect(&broker, &members[0]).await?;
        let b = Conn::connect(&broker, &members[1]).await?;
        round_trips(a, b, &self.plaintext(), count).await
    }

    async fn rtt(&self, count: usize) -> anyhow::Result<()> {
        let mut samples = self.rtt_samples(count).await?;
        println!(
            "meshd  rtt        DM A→B→A (two stored DMs per round trip): {}",
            samples.summary()
        );
        Ok(())
    }

    async fn throughput(&self, pairs: usize, window: usize) -> anyhow::Result<()> {
        let broker = self.start().await?;
        let members = broker.enroll(pairs * 2).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let delivered = Arc::new(AtomicU64::new(0));
        let mut receivers = Vec::new();
        let mut senders = Vec::new();
        for p in 0..pairs {
            let r = Conn::connect(&broker, &members[2 * p + 1]).await?;
            let s = Conn::connect(&broker, &members[2 * p]).await?;
            let frame = s.sealed(&r.key, &self.plaintext());
            receivers.push(count_pushes(r, stop.clone(), delivered.clone()));
            let stop_s = stop.clone();
            senders.push(tokio::spawn(async move {
                s.pump(&frame, window, &stop_s).await
            }));
        }
        let (rate, acks) = measure(&delivered, self.duration, &stop, senders).await?;
        for r in receivers {
            r.abort();
        }
        let mut acks = acks;
        println!(
            "meshd  throughput {pairs} pairs, window {window}: {rate:.0} delivered DMs/s; send→ack {}",
            acks.summary()
        );
        Ok(())
    }

    async fn broadcast(&self, peers: usize, window: usize) -> anyhow::Result<()> {
        let broker = self.start().await?;
        let members = broker.enroll(peers + 1).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let delivered = Arc::new(AtomicU64::new(0));
        let mut receivers = Vec::new();
        for m in &members[1..] {
            let r = Conn::connect(&broker, m).await?;
            receivers.push(count_pushes(r, stop.clone(), delivered.clone()));
        }
        let s = Conn::connect(&broker, &members[0]).await?;
        let text = self.plaintext();
        use base64::Engine as _;
        let body = base64::engine::general_purpose::STANDARD.encode(text.as_bytes());
        let frame = format!(
            r#"{{"type":"send","id":"b","targetSpec":"*","priority":"next","nonce":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","ciphertext":"{body}"}}"#
        );
        let stop_s = stop.clone();
        let sender = tokio::spawn(async move { s.pump(&frame, window, &stop_s).await });
        let (rate, mut acks) = measure(&delivered, self.duration, &stop, vec![sender]).await?;
        for r in receivers {
            r.abort();
        }
        println!(
            "meshd  broadcast  1 sender → {peers} peers: {rate:.0} deliveries/s ({:.0} sends/s); send→ack {}",
            rate / peers as f64,
            acks.summary()
        );
        Ok(())
    }

    async fn idle(&self, counts: &[usize]) -> anyhow::Result<()> {
        let need = counts.iter().max().copied().unwrap_or(0) as u64 + 1000;
        if stats::nofile_limit() < need {
            bail!(
                "open-file limit {} is below {need}: run `ulimit -n 65536` first",
                stats::nofile_limit()
            );
        }
        for &n in counts {
            let (before, after) = self.idle_run(n).await?;
            println!(
                "meshd  idle       {n} authenticated connections: RSS {before} KiB → {after} KiB, {:.1} KiB per connection",
                (after.saturating_sub(before)) as f64 / n as f64
            );
        }
        Ok(())
    }

    /// RSS (KiB) before and after `n` idle authenticated connections.
    async fn idle_run(&self, n: usize) -> anyhow::Result<(u64, u64)> {
        {
            let broker = self.start().await?;
            let members = broker.enroll(50).await?;
            let pid = broker.proc.pid().context("pid")?;
            // One warm connection so lazily-loaded state (mesh, caches) is in the baseline.
            let _warm = Conn::connect(&broker, &members[0]).await?;
            settle().await;
            let before = stats::rss_kib(pid)?;
            let mut conns = Vec::with_capacity(n);
            let mut pending = futures_util::stream::FuturesUnordered::new();
            let mut next = 0;
            while conns.len() < n {
                while next < n && pending.len() < 256 {
                    let m = members[next % members.len()].clone();
                    let broker = &broker;
                    pending.push(async move { Conn::connect(broker, &m).await });
                    next += 1;
                }
                if let Some(c) = pending.next().await {
                    // Like a real client, read what the broker sends (the join
                    // announcements of later connections) so nothing queues up.
                    let mut c: Conn = c?;
                    conns.push(tokio::spawn(
                        async move { while c.ws.next().await.is_some() {} },
                    ));
                }
            }
            drop(pending);
            settle().await;
            let after = stats::rss_kib(pid)?;
            for c in conns {
                c.abort();
            }
            Ok((before, after))
        }
    }

    async fn handshake(&self, count: usize, concurrency: usize) -> anyhow::Result<()> {
        let (rate, mut samples) = self.handshake_run(count, concurrency).await?;
        println!(
            "meshd  handshake  connect+hello→hello_ack, concurrency {concurrency}: {rate:.0}/s; {}",
            samples.summary()
        );
        Ok(())
    }

    /// `count` handshakes, `concurrency` at once: (per second, samples).
    async fn handshake_run(
        &self,
        count: usize,
        concurrency: usize,
    ) -> anyhow::Result<(f64, Samples)> {
        let broker = self.start().await?;
        let members = broker.enroll(20).await?;
        let started = Instant::now();
        let mut samples = Samples::with_capacity(count);
        let mut pending = futures_util::stream::FuturesUnordered::new();
        let mut next = 0;
        let mut done = 0;
        while done < count {
            while next < count && pending.len() < concurrency {
                let m = members[next % members.len()].clone();
                let broker = &broker;
                pending.push(async move {
                    let t = Instant::now();
                    let c = Conn::connect(broker, &m).await?;
                    let took = t.elapsed();
                    drop(c);
                    anyhow::Ok(took)
                });
                next += 1;
            }
            if let Some(r) = pending.next().await {
                samples.push(r?);
                done += 1;
            }
        }
        let rate = count as f64 / started.elapsed().as_secs_f64();
        Ok((rate, samples))
    }
}

/// `count` DM round trips a→b→a (after 100 warm-up ones), one at a time.
async fn round_trips(
    mut a: Conn,
    mut b: Conn,
    text: &str,
    count: usize,
) -> anyhow::Result<Samples> {
    let to_b = a.sealed(&b.key, text);
    let to_a = b.sealed(&a.key, text);
    let echo = tokio::spawn(async move {
        for _ in 0..count + 100 {
            b.next_push().await?;
            b.send_raw(&to_a).await?;
        }
        anyhow::Ok(())
    });
    let mut samples = Samples::with_capacity(count);
    for i in 0..count + 100 {
        let t = Instant::now();
        a.send_raw(&to_b).await?;
        a.next_push().await?;
        if i >= 100 {
            samples.push(t.elapsed());
        }
    }
    echo.await??;
    Ok(samples)
}

/// The brokers' log filter: `warn`, or `MESHD_BENCH_LOG` (e.g. `meshd::fed=trace` to see
/// where a cross-broker message spends its time).
fn log_level() -> String {
    std::env::var("MESHD_BENCH_LOG").unwrap_or_else(|_| "warn".into())
}

/// Lets the broker finish background work before a memory reading.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// Warm up for 2 s, then count deliveries over `duration`. Returns (per second, send→ack
/// samples taken during the measurement).
async fn measure(
    delivered: &AtomicU64,
    duration: Duration,
    stop: &AtomicBool,
    senders: Vec<tokio::task::JoinHandle<anyhow::Result<Samples>>>,
) -> anyhow::Result<(f64, Samples)> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let start = delivered.load(Ordering::Relaxed);
    let t = Instant::now();
    tokio::time::sleep(duration).await;
    let n = delivered.load(Ordering::Relaxed) - start;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut all = Samples::default();
    for s in senders {
        all.extend(s.await??);
    }
    Ok((rate, all))
}

impl Broker {
    /// `meshd invite create --json` for the bench mesh: `uses` enrollments as `role`.
    async fn invite(&self, role: &str, uses: usize) -> anyhow::Result<serde_json::Value> {
        let d = self.proc.data_dir.to_str().context("path")?;
        let url = self.proc.ws_url();
        let uses = uses.to_string();
        let mut args = vec!["--data-dir", d];
        if let Some(u) = &self.database_url {
            args.extend(["--database-url", u.as_str()]);
        }
        args.extend([
            "invite",
            "create",
            "--mesh",
            &self.slug,
            "--role",
            role,
            "--max-uses",
            &uses,
            "--public-url",
            &url,
            "--json",
        ]);
        let (code, out, err) = run_cli(&self.proc.binary, &args, &[]).await?;
        if code != 0 {
            bail!("invite create failed: {err}");
        }
        Ok(serde_json::from_str(out.trim())?)
    }

    /// Enrolls `n` members through one multi-use invite and `/join`.
    async fn enroll(&self, n: usize) -> anyhow::Result<Vec<Member>> {
        let inv = self.invite("member", n).await?;
        let token = inv["token"].as_str().context("token")?;
        let payload = InvitePayload::from_token(token).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let keys = Keypair::generate();
            let (status, v) = http_json(
                self.proc.addr,
                "POST",
                "/join",
                &json!({
                    "invite_token": token, "invite_payload": payload,
                    "peer_pubkey": keys.public_hex(), "display_name": format!("bench-{i}"),
                }),
            )
            .await?;
            if status != 200 {
                bail!("join: {v}");
            }
            out.push(Member {
                mesh_id: self.mesh_id.clone(),
                member_id: v["memberId"].as_str().context("memberId")?.to_owned(),
                keys,
                display_name: format!("bench-{i}"),
            });
        }
        Ok(out)
    }
}

/// The fields of a broker frame the generator looks at.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default, borrow)]
    subtype: Option<&'a str>,
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A lean authenticated connection (no JSON trees, no backlog).
struct Conn {
    ws: Ws,
    key: String,
    session: Keypair,
}

impl Conn {
    async fn connect(broker: &Broker, m: &Member) -> anyhow::Result<Self> {
        Self::connect_with(broker, m, HelloOpts::default()).await
    }

    /// [`Conn::connect`] with hello options (a fresh session key and id are set).
    async fn connect_with(broker: &Broker, m: &Member, opts: HelloOpts) -> anyhow::Result<Self> {
        let session = Keypair::generate();
        let opts = HelloOpts {
            session: Some(session.clone()),
            session_id: Some(format!(
                "bench-{}",
                meshd_tests::now_ms() as u64 ^ u64::from(rand_u32())
            )),
            ..opts
        };
        let (mut ws, _) =
            tokio_tungstenite::connect_async_with_config(broker.proc.ws_url(), None, true).await?;
        ws.send(Message::Text(
            hello_frame(m, &opts, unique_ts()).to_string().into(),
        ))
        .await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let f: Frame<'_> = serde_json::from_str(t.as_str())?;
                    if f.kind == "hello_ack" {
                        break;
                    }
                    if f.kind == "error" {
                        bail!("hello refused: {}", t.as_str());
                    }
                }
                Some(Ok(_)) => {}
                _ => bail!("closed during hello"),
            }
        }
        Ok(Self {
            ws,
            key: session.public_hex(),
            session,
        })
    }

    /// A `send` frame with a DM sealed once for `to`.
    fn sealed(&self, to: &str, text: &str) -> String {
        let (nonce, c) = meshd_tests::crypto::seal(text, to, &self.session);
        format!(
            r#"{{"type":"send","id":"x","targetSpec":"{to}","priority":"now","nonce":"{nonce}","ciphertext":"{c}"}}"#
        )
    }

    async fn send_raw(&mut self, frame: &str) -> anyhow::Result<()> {
        self.ws.send(Message::Text(frame.to_owned().into())).await?;
        Ok(())
    }

    /// Waits for the next message push (acks and events are skipped).
    async fn next_push(&mut self) -> anyhow::Result<()> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let f: Frame<'_> = serde_json::from_str(t.as_str())?;
                    if f.kind == "push" && f.subtype.is_none() {
                        return Ok(());
                    }
                }
                Some(Ok(_)) => {}
                _ => bail!("connection closed"),
            }
        }
    }

    /// Sends `frame` continuously with up to `window` unacknowledged; returns the
    /// send→ack latencies.
    async fn pump(
        mut self,
        frame: &str,
        window: usize,
        stop: &AtomicBool,
    ) -> anyhow::Result<Samples> {
        let mut inflight = stats::Inflight::new(window);
        let msg = Message::Text(frame.to_owned().into());
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..inflight.room(false).unwrap_or(0) {
                self.ws.feed(msg.clone()).await?;
                inflight.sent();
            }
            self.ws.flush().await?;
            match tokio::time::timeout(Duration::from_secs(5), self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let f: Frame<'_> = serde_json::from_str(t.as_str())?;
                    if f.kind == "ack" {
                        if t.as_str().contains("\"error\"") {
                            bail!("send refused: {}", t.as_str());
                        }
                        inflight.acked(false, true);
                    }
                }
                Ok(Some(Ok(_))) => {}
                Ok(_) => bail!("connection closed"),
                Err(_) => bail!("no ack for 5 s"),
            }
        }
        Ok(inflight.finish().0)
    }
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("randomness");
    u32::from_le_bytes(b)
}

/// The same patterns on nats-server: request/reply round trip, N pairs, fan-out, idle.
async fn nats_suite(
    binary: &str,
    pairs: usize,
    peers: usize,
    conns: &[usize],
    size: usize,
    duration: Duration,
) -> anyhow::Result<()> {
    // Payload: about the size of the claudemesh push frame carrying a `size`-byte DM.
    let payload = vec![b'x'; size * 4 / 3 + 250];

    // Round trip.
    let server = nats::NatsServer::spawn(binary).await?;
    let mut samples = compare::core_rtt(server.addr, &payload, 5000).await?;
    println!("nats   rtt        A→B→A: {}", samples.summary());
    drop(server);

    // N pairs, and fan-out: publishing as fast as TCP allows, and with a window of 128
    // like the meshd sender (a PING/PONG round trip every 128 messages stands in for
    // meshd's acks, which NATS core does not have).
    for window in [None, Some(128)] {
        let label = window.map_or("blast".to_owned(), |w| format!("window {w}"));
        let server = nats::NatsServer::spawn(binary).await?;
        let rate = nats_flow(server.addr, pairs, 1, &payload, duration, false, window).await?;
        println!("nats   throughput {pairs} pairs, {label}: {rate:.0} delivered msgs/s");
        drop(server);
        let server = nats::NatsServer::spawn(binary).await?;
        let rate = nats_flow(server.addr, 1, peers, &payload, duration, true, window).await?;
        println!(
            "nats   broadcast  1 sender → {peers} subscribers, {label}: {rate:.0} deliveries/s"
        );
        drop(server);
    }

    // Idle connections.
    for &n in conns {
        let (before, after) = compare::core_idle(binary, n).await?;
        println!(
            "nats   idle       {n} connections (one SUB each): RSS {before} KiB → {after} KiB, {:.1} KiB per connection",
            (after.saturating_sub(before)) as f64 / n as f64
        );
    }
    Ok(())
}

/// `senders` publishers, each to its own subject with `fanout` subscribers (or all to one
/// shared subject when `shared`), optionally pausing for a PONG every `window` messages.
/// Returns deliveries/s.
#[allow(clippy::too_many_arguments)]
async fn nats_flow(
    addr: SocketAddr,
    senders: usize,
    fanout: usize,
    payload: &[u8],
    duration: Duration,
    shared: bool,
    window: Option<usize>,
) -> anyhow::Result<f64> {
    nats_flow_on(
        addr, addr, senders, fanout, payload, duration, shared, window,
    )
    .await
}

/// `pairs` publishers on `pub_addr`, each with one subscriber on `sub_addr`.
async fn nats_flow_between(
    pub_addr: SocketAddr,
    sub_addr: SocketAddr,
    pairs: usize,
    payload: &[u8],
    duration: Duration,
    window: Option<usize>,
) -> anyhow::Result<f64> {
    nats_flow_on(
        pub_addr, sub_addr, pairs, 1, payload, duration, false, window,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn nats_flow_on(
    pub_addr: SocketAddr,
    sub_addr: SocketAddr,
    senders: usize,
    fanout: usize,
    payload: &[u8],
    duration: Duration,
    shared: bool,
    window: Option<usize>,
) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for s in 0..senders {
        let subject = if shared {
            "all".to_owned()
        } else {
            format!("pair.{s}")
        };
        for _ in 0..fanout {
            let (mut r, mut w) = nats::connect(sub_addr).await?;
            w.sub(&subject, 1).await?;
            w.ping().await?;
            let (stop, delivered) = (stop.clone(), delivered.clone());
            tasks.push(tokio::spawn(async move {
                let mut buf = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if tokio::time::timeout(Duration::from_secs(2), r.next_msg(&mut buf))
                        .await
                        .is_ok()
                    {
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
                drop(w);
                anyhow::Ok(())
            }));
        }
    }
    // Subscriptions propagate (through a gateway, too) before anything is published.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut pubs = Vec::new();
    for s in 0..senders {
        let subject = if shared {
            "all".to_owned()
        } else {
            format!("pair.{s}")
        };
        let (mut r, mut w) = nats::connect(pub_addr).await?;
        let (stop, payload) = (stop.clone(), payload.to_vec());
        pubs.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                w.publish(&subject, &payload).await?;
                n += 1;
                match window {
                    Some(win) if n.is_multiple_of(win as u64) => {
                        w.ping().await?;
                        r.wait_pong().await?;
                    }
                    None if n.is_multiple_of(64) => w.flush().await?,
                    _ => {}
                }
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let start = delivered.load(Ordering::Relaxed);
    let t = Instant::now();
    tokio::time::sleep(duration).await;
    let rate = (delivered.load(Ordering::Relaxed) - start) as f64 / t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for p in pubs {
        p.abort();
    }
    for t in tasks {
        t.abort();
    }
    Ok(rate)
}

/// A receiver task: counts the pushes `r` gets until `stop`.
/// [`count_pushes`] that hands the connection back when stopped.
fn count_pushes_keep(
    mut r: Conn,
    stop: Arc<AtomicBool>,
    delivered: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<anyhow::Result<Conn>> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            if tokio::time::timeout(Duration::from_secs(2), r.next_push())
                .await
                .is_ok()
            {
                delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
        anyhow::Ok(r)
    })
}

fn count_pushes(
    r: Conn,
    stop: Arc<AtomicBool>,
    delivered: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let keep = count_pushes_keep(r, stop, delivered);
    tokio::spawn(async move { keep.await?.map(drop) })
}
