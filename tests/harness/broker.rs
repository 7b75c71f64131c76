//! Brokers under test: in-process ([`TestBroker`], bound to port 0 before serving) or as
//! a separate process ([`DaemonProcess`], readiness over `NOTIFY_SOCKET`, killable with
//! SIGKILL). Plus a minimal HTTP/1.1 client and enrollment through the real `/join`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use meshd::admin::{self, InviteCreated, MeshCreated};
use meshd::store::Db;
use meshd_config::{Config, Environment, Overrides};
use meshd_protocol::invite::{InvitePayload, Role};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use crate::client::{Client, HelloOpts, Member, patience};
use crate::crypto::Keypair;

/// Which store a broker uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite in a temporary directory.
    Sqlite,
    /// A fresh database on the test PostgreSQL server.
    Postgres,
}

/// Builds a config for a test broker: loopback, port 0, the given store, and no send
/// rate limit (tests that need it set it).
///
/// # Errors
/// PostgreSQL unavailable.
pub async fn test_config(backend: Backend, data_dir: &Path) -> anyhow::Result<Config> {
    let database_url = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some(crate::postgres::fresh_database_url().await?),
    };
    let overrides = Overrides {
        data_dir: Some(data_dir.to_owned()),
        listen: Some("127.0.0.1:0".into()),
        public_url: None,
        database_url,
    };
    let mut config = Config::defaults(&Environment::default(), &overrides)?;
    config.limits.sends_per_second = 0;
    config.server.shutdown_grace = Duration::from_secs(5);
    Ok(config)
}

/// An in-process broker.
#[derive(Debug)]
pub struct TestBroker {
    /// Its configuration (with `public_url` set to the bound address).
    pub config: Config,
    /// Bound address.
    pub addr: SocketAddr,
    /// Bound federation (QUIC) address, when federation is configured.
    pub quic: Option<SocketAddr>,
    /// A pool on the same store, for admin operations and assertions.
    pub db: Db,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestBroker {
    /// Starts a broker with the default test configuration.
    ///
    /// # Errors
    /// Startup failure.
    pub async fn start(backend: Backend) -> anyhow::Result<Self> {
        Self::start_with(backend, |_| {}).await
    }

    /// Starts a broker after `tweak` adjusts its configuration.
    ///
    /// # Errors
    /// Startup failure.
    pub async fn start_with(
        backend: Backend,
        tweak: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Self> {
        crate::init_tracing();
        let dir = tempfile::tempdir()?;
        let mut config = test_config(backend, dir.path()).await?;
        tweak(&mut config);
        let mut b = Self::from_config(config).await?;
        b._dir = Some(dir);
        Ok(b)
    }

    /// Starts a broker on an existing configuration (e.g. to restart on the same store).
    ///
    /// # Errors
    /// Startup failure.
    pub async fn from_config(config: Config) -> anyhow::Result<Self> {
        Self::from_config_with(config, meshd::DaemonOptions::default()).await
    }

    /// [`TestBroker::from_config`] with daemon options (test hooks).
    ///
    /// # Errors
    /// Startup failure.
    pub async fn from_config_with(
        mut config: Config,
        options: meshd::DaemonOptions,
    ) -> anyhow::Result<Self> {
        crate::init_tracing();
        let bound = meshd::Daemon::bind_with(config.clone(), options).await?;
        let addr = bound.local_addr();
        let quic = bound.federation_addr();
        config.server.listen = addr;
        config.server.public_url = Some(format!("ws://{addr}/ws"));
        let db = Db::open(&config.storage.backend, config.storage.durability).await?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(bound.run(shutdown.clone()));
        Ok(Self {
            config,
            addr,
            quic,
            db,
            shutdown,
            task: Some(task),
            _dir: None,
        })
    }

    /// Keeps `dir` (the broker's data directory) alive as long as the broker.
    pub fn keep_dir(&mut self, dir: tempfile::TempDir) {
        self._dir = Some(dir);
    }

    /// Graceful shutdown (as on SIGTERM); waits for it to finish.
    ///
    /// # Errors
    /// The daemon's run loop failed.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await??;
        }
        self.db.close().await;
        Ok(())
    }

    /// Stops and starts again on the same store (a new port).
    ///
    /// # Errors
    /// Startup failure.
    pub async fn restart(mut self) -> anyhow::Result<Self> {
        self.stop().await?;
        let mut config = self.config.clone();
        config.server.listen = "127.0.0.1:0".parse()?;
        let mut b = Self::from_config(config).await?;
        b._dir = self._dir.take();
        Ok(b)
    }

    /// `ws://…/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Creates a mesh through the admin API.
    ///
    /// # Errors
    /// Admin failure.
    pub async fn create_mesh(&self, name: &str) -> anyhow::Result<MeshCreated> {
        Ok(admin::create_mesh(&self.db, &self.config, name, None).await?)
    }

    /// Creates an invite through the admin API.
    ///
    /// # Errors
    /// Admin failure.
    pub async fn invite(
        &self,
        slug: &str,
        role: Role,
        max_uses: i64,
    ) -> anyhow::Result<InviteCreated> {
        Ok(admin::create_invite(
            &self.db,
            &self.config,
            slug,
            role,
            max_uses,
            Duration::from_secs(3600),
            &self.ws_url(),
        )
        .await?)
    }

    /// Posts `/join` like `claudemesh join` (token + parsed payload + new key + name).
    ///
    /// # Errors
    /// Transport failure (HTTP errors are returned as status + body).
    pub async fn join(
        &self,
        token: &str,
        keys: &Keypair,
        name: &str,
    ) -> anyhow::Result<(u16, Value)> {
        let payload = InvitePayload::from_token(token).map_err(|e| anyhow!("{e}"))?;
        let body = json!({
            "invite_token": token,
            "invite_payload": payload,
            "peer_pubkey": keys.public_hex(),
            "display_name": name,
        });
        http_json(self.addr, "POST", "/join", &body).await
    }

    /// Creates an invite, generates a key and enrolls it.
    ///
    /// # Errors
    /// Any step failing.
    pub async fn enroll(&self, mesh: &MeshCreated, name: &str) -> anyhow::Result<Member> {
        self.enroll_as(mesh, name, Role::Member).await
    }

    /// [`Self::enroll`] with a role.
    ///
    /// # Errors
    /// Any step failing.
    pub async fn enroll_as(
        &self,
        mesh: &MeshCreated,
        name: &str,
        role: Role,
    ) -> anyhow::Result<Member> {
        let inv = self.invite(&mesh.slug, role, 1).await?;
        let keys = Keypair::generate();
        let (status, body) = self.join(&inv.token, &keys, name).await?;
        if status != 200 || body["ok"] != true {
            bail!("join failed: {status} {body}");
        }
        Ok(Member {
            mesh_id: mesh.mesh_id.clone(),
            member_id: body["memberId"].as_str().context("memberId")?.to_owned(),
            keys,
            display_name: name.to_owned(),
        })
    }

    /// Connects a member with default options (a fresh session key).
    ///
    /// # Errors
    /// Hello refused.
    pub async fn connect(&self, member: &Member) -> anyhow::Result<Client> {
        Client::connect(&self.ws_url(), member, HelloOpts::default()).await
    }

    /// The `/metrics` text.
    ///
    /// # Errors
    /// Transport failure or a body that is not UTF-8.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(String::from_utf8(
            http(self.addr, "GET", "/metrics", None).await?.2,
        )?)
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A minimal HTTP/1.1 request. Returns `(status, headers, body)`.
///
/// # Errors
/// Transport failure or an unparseable response.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> anyhow::Result<(u16, String, Vec<u8>)> {
    http_with(
        addr,
        method,
        path,
        &[("Content-Type", "application/json")],
        body,
    )
    .await
}

/// [`http`] with the given request headers (no default `Content-Type`).
///
/// # Errors
/// Transport failure or an unparseable response.
pub async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> anyhow::Result<(u16, String, Vec<u8>)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let body = body.unwrap_or_default();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(patience(), stream.read_to_end(&mut raw))
        .await
        .context("HTTP response timed out")??;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of HTTP headers")?;
    let headers = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut payload = raw[split + 4..].to_vec();
    let status: u16 = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        payload = dechunk(&payload)?;
    }
    Ok((status, headers, payload))
}

fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size")?;
        let size = usize::from_str_radix(std::str::from_utf8(&data[..line_end])?.trim(), 16)?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// An HTTP request with a JSON body and a JSON answer.
///
/// # Errors
/// Transport failure or a non-JSON answer.
pub async fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &Value,
) -> anyhow::Result<(u16, Value)> {
    let (status, _, payload) = http(addr, method, path, Some(body.to_string().as_bytes())).await?;
    let v = serde_json::from_slice(&payload).with_context(|| {
        format!(
            "non-JSON answer ({status}): {}",
            String::from_utf8_lossy(&payload)
        )
    })?;
    Ok((status, v))
}

/// The `meshd` binary running as a child process.
#[derive(Debug)]
pub struct DaemonProcess {
    child: tokio::process::Child,
    /// Bound HTTP/WebSocket address, read from its sd_notify `STATUS=`.
    pub addr: SocketAddr,
    /// Bound federation (QUIC) address, when federation is configured.
    pub quic: Option<SocketAddr>,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// The binary it runs.
    pub binary: String,
    notify: tokio::net::UnixDatagram,
    _notify_dir: tempfile::TempDir,
}

impl DaemonProcess {
    /// Runs `binary --data-dir DIR [args…] serve --listen 127.0.0.1:0` and waits for READY.
    ///
    /// # Errors
    /// The daemon did not become ready.
    pub async fn spawn(
        binary: &str,
        data_dir: &Path,
        global_args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let notify_dir = tempfile::tempdir()?;
        let sock_path = notify_dir.path().join("notify.sock");
        let notify = tokio::net::UnixDatagram::bind(&sock_path)?;
        let mut cmd = tokio::process::Command::new(binary);
        cmd.arg("--data-dir")
            .arg(data_dir)
            .args(global_args)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("NOTIFY_SOCKET", &sock_path)
            .env("MESHD_LOG_LEVEL", "info")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().with_context(|| format!("spawning {binary}"))?;
        let deadline = std::time::Instant::now() + patience() + Duration::from_secs(20);
        let mut buf = [0u8; 512];
        let mut quic = None;
        let addr = loop {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("daemon exited before READY: {status}");
            }
            if std::time::Instant::now() > deadline {
                bail!("daemon did not send READY=1");
            }
            // Bounded waits so the exit check above runs.
            let n = match tokio::time::timeout(Duration::from_millis(200), notify.recv(&mut buf))
                .await
            {
                Ok(r) => r?,
                Err(_) => continue,
            };
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            if let Some(q) = msg.split("federation quic on ").nth(1) {
                quic = q.lines().next().and_then(|l| l.trim().parse().ok());
            }
            if msg.contains("READY=1")
                && let Some(addr) = msg.split("serving http on ").nth(1)
            {
                break addr.lines().next().unwrap_or("").trim().parse()?;
            }
        };
        Ok(Self {
            child,
            addr,
            quic,
            data_dir: data_dir.to_owned(),
            binary: binary.to_owned(),
            notify,
            _notify_dir: notify_dir,
        })
    }

    /// `ws://…/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, and wait for the process to be gone.
    ///
    /// # Errors
    /// The kill failed.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// SIGTERM; returns the exit status and whether `STOPPING=1` was announced.
    ///
    /// # Errors
    /// Signal or wait failure.
    pub async fn terminate(&mut self) -> anyhow::Result<(std::process::ExitStatus, bool)> {
        let pid = self.child.id().context("no pid")?;
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?
            .success();
        if !ok {
            bail!("kill -TERM {pid} failed");
        }
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??;
        let mut stopping = false;
        let mut buf = [0u8; 512];
        while let Ok(n) = self.notify.try_recv(&mut buf) {
            stopping |= String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
        }
        Ok((status, stopping))
    }
}

/// Runs the `meshd` binary with arguments; returns `(exit code, stdout, stderr)`.
///
/// # Errors
/// The binary could not be run.
pub async fn run_cli(
    binary: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<(i32, String, String)> {
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(args).stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await??;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    ))
}
