//! A minimal NATS core client (text protocol: CONNECT, SUB, PUB, MSG, PING/PONG), enough
//! to run the same load patterns against `nats-server` for comparison.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{
    AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader, BufWriter,
};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Reading half: yields message payloads.
pub(crate) struct NatsReader {
    r: BufReader<OwnedReadHalf>,
    line: String,
}

/// Writing half.
pub(crate) struct NatsWriter {
    w: BufWriter<OwnedWriteHalf>,
}

/// Connects and completes the CONNECT/PING/PONG exchange.
pub(crate) async fn connect(addr: SocketAddr) -> anyhow::Result<(NatsReader, NatsWriter)> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (r, w) = stream.into_split();
    let mut reader = NatsReader {
        r: BufReader::with_capacity(64 * 1024, r),
        line: String::new(),
    };
    let mut writer = NatsWriter {
        w: BufWriter::with_capacity(64 * 1024, w),
    };
    reader.read_line().await?; // INFO
    writer
        .w
        .write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false}\r\nPING\r\n")
        .await?;
    writer.w.flush().await?;
    loop {
        let l = reader.read_line().await?;
        if l.starts_with("PONG") {
            break;
        }
        if l.starts_with("-ERR") {
            bail!("nats: {l}");
        }
    }
    Ok((reader, writer))
}

impl NatsReader {
    async fn read_line(&mut self) -> anyhow::Result<String> {
        self.line.clear();
        let n = self.r.read_line(&mut self.line).await?;
        if n == 0 {
            bail!("nats connection closed");
        }
        Ok(self.line.trim_end().to_owned())
    }

    /// Next message payload (answers server PINGs through `w` is not possible here, so
    /// the caller's writer must send a PING now and then; servers ping every 2 min).
    pub(crate) async fn next_msg(&mut self, payload: &mut Vec<u8>) -> anyhow::Result<()> {
        loop {
            let line = self.read_line().await?;
            if let Some(rest) = line.strip_prefix("MSG ") {
                let size: usize = rest
                    .split_whitespace()
                    .last()
                    .and_then(|s| s.parse().ok())
                    .context("MSG size")?;
                payload.resize(size + 2, 0);
                self.r.read_exact(payload).await?;
                payload.truncate(size);
                return Ok(());
            }
            if line.starts_with("-ERR") {
                bail!("nats: {line}");
            }
            // PONG / +OK / PING (PING goes unanswered; runs are shorter than the 2 min
            // server ping interval).
        }
    }
}

impl NatsReader {
    /// Reads until the server's PONG (everything published before our PING is processed).
    pub(crate) async fn wait_pong(&mut self) -> anyhow::Result<()> {
        loop {
            let line = self.read_line().await?;
            if line.starts_with("PONG") {
                return Ok(());
            }
            if line.starts_with("-ERR") {
                bail!("nats: {line}");
            }
        }
    }
}

impl NatsWriter {
    pub(crate) async fn sub(&mut self, subject: &str, sid: u32) -> anyhow::Result<()> {
        self.w
            .write_all(format!("SUB {subject} {sid}\r\n").as_bytes())
            .await?;
        self.w.flush().await?;
        Ok(())
    }

    /// Buffers a PUB (call [`NatsWriter::flush`]).
    pub(crate) async fn publish(&mut self, subject: &str, payload: &[u8]) -> anyhow::Result<()> {
        self.w
            .write_all(format!("PUB {subject} {}\r\n", payload.len()).as_bytes())
            .await?;
        self.w.write_all(payload).await?;
        self.w.write_all(b"\r\n").await?;
        Ok(())
    }

    pub(crate) async fn flush(&mut self) -> anyhow::Result<()> {
        self.w.flush().await?;
        Ok(())
    }

    /// A PING so the server's PONG proves everything before it was processed.
    pub(crate) async fn ping(&mut self) -> anyhow::Result<()> {
        self.w.write_all(b"PING\r\n").await?;
        self.w.flush().await?;
        Ok(())
    }
}

/// A `nats-server` child process on a free loopback port.
pub(crate) struct NatsServer {
    pub(crate) child: tokio::process::Child,
    pub(crate) addr: SocketAddr,
}

impl NatsServer {
    pub(crate) async fn spawn(binary: &str) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        Self::start(binary, &["-a", "127.0.0.1", "-p", &port.to_string()], port).await
    }

    /// A server with a configuration file whose client port is `port`.
    pub(crate) async fn spawn_with(
        binary: &str,
        config: &std::path::Path,
        port: u16,
    ) -> anyhow::Result<Self> {
        let c = config.to_str().context("utf-8 path")?;
        Self::start(binary, &["-c", c], port).await
    }

    async fn start(binary: &str, args: &[&str], port: u16) -> anyhow::Result<Self> {
        let child = tokio::process::Command::new(binary)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {binary} (apt-get install nats-server)"))?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect(addr).await.is_ok() {
                return Ok(Self { child, addr });
            }
            if tokio::time::Instant::now() > deadline {
                bail!("nats-server did not start");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
