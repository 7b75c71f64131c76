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
    connect_as(addr, None).await
}

/// [`connect`], authenticating with an nkey (the server's nonce signed with ed25519)
/// when `user` is given.
pub(crate) async fn connect_as(
    addr: SocketAddr,
    user: Option<&NkeyUser>,
) -> anyhow::Result<(NatsReader, NatsWriter)> {
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
    let info = reader.read_line().await?;
    let mut connect = serde_json::json!({
        "verbose": false, "pedantic": false, "echo": false,
        "headers": true, "no_responders": true,
    });
    if let Some(user) = user {
        let info: serde_json::Value = serde_json::from_str(
            info.strip_prefix("INFO ")
                .context("INFO line from the server")?,
        )?;
        let nonce = info["nonce"]
            .as_str()
            .context("no nonce: nkey auth is off")?;
        connect["nkey"] = user.public().into();
        connect["sig"] = user.sign(nonce).into();
    }
    writer
        .w
        .write_all(format!("CONNECT {connect}\r\nPING\r\n").as_bytes())
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

/// A message with its reply subject and, for a header-only status message
/// (JetStream's 404/408 on a pull request), the status code.
pub(crate) struct Msg {
    pub(crate) reply: Option<String>,
    pub(crate) status: Option<u16>,
    /// `Nats-Pending-Messages` of a status message: what the ended pull request still owed.
    pub(crate) pending: Option<u64>,
    pub(crate) payload: Vec<u8>,
}

impl NatsReader {
    /// Whether bytes are already buffered (so a batch of replies can be flushed once).
    pub(crate) fn buffered(&self) -> bool {
        !self.r.buffer().is_empty()
    }

    /// The next MSG or HMSG, with its subjects.
    pub(crate) async fn next_full(&mut self) -> anyhow::Result<Msg> {
        loop {
            let line = self.read_line().await?;
            let (headers, rest) = if let Some(rest) = line.strip_prefix("HMSG ") {
                (true, rest)
            } else if let Some(rest) = line.strip_prefix("MSG ") {
                (false, rest)
            } else if line.starts_with("-ERR") {
                bail!("nats: {line}");
            } else {
                continue;
            };
            let parts: Vec<&str> = rest.split_whitespace().collect();
            let sizes = if headers { 2 } else { 1 };
            if parts.len() < 2 + sizes || parts.len() > 3 + sizes {
                bail!("nats: bad message line {line}");
            }
            let total: usize = parts[parts.len() - 1].parse().context("MSG size")?;
            let header_len: usize = if headers {
                parts[parts.len() - 2].parse().context("HMSG header size")?
            } else {
                0
            };
            let reply = (parts.len() == 3 + sizes).then(|| parts[2].to_owned());
            let mut buf = vec![0; total + 2];
            self.r.read_exact(&mut buf).await?;
            buf.truncate(total);
            // "NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 255\r\n…": a status
            // line carries a code.
            let head = std::str::from_utf8(&buf[..header_len.min(buf.len())]).unwrap_or("");
            let status = head
                .lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|c| c.parse().ok());
            let pending = head
                .lines()
                .find_map(|l| l.strip_prefix("Nats-Pending-Messages:"))
                .and_then(|v| v.trim().parse().ok());
            let payload = buf.split_off(header_len.min(buf.len()));
            return Ok(Msg {
                reply,
                status,
                pending,
                payload,
            });
        }
    }

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

    /// Buffers a PUB with a reply subject.
    pub(crate) async fn publish_reply(
        &mut self,
        subject: &str,
        reply: &str,
        payload: &[u8],
    ) -> anyhow::Result<()> {
        self.w
            .write_all(format!("PUB {subject} {reply} {}\r\n", payload.len()).as_bytes())
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

/// A NATS user authenticated by an nkey: an ed25519 key, shown to the server as the
/// base32 public key with the user prefix and a CRC-16 (the `nkeys` encoding).
pub(crate) struct NkeyUser(ed25519_dalek::SigningKey);

impl NkeyUser {
    pub(crate) fn generate() -> Self {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).expect("randomness");
        Self(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// `U…`: prefix byte 20 << 3, the key, CRC-16/XMODEM little-endian, base32 unpadded.
    pub(crate) fn public(&self) -> String {
        let mut raw = vec![20u8 << 3];
        raw.extend_from_slice(self.0.verifying_key().as_bytes());
        let crc = crc16(&raw);
        raw.extend_from_slice(&crc.to_le_bytes());
        base32(&raw)
    }

    /// The server's nonce signed, base64url without padding.
    fn sign(&self, nonce: &str) -> String {
        use base64::Engine as _;
        use ed25519_dalek::Signer as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(self.0.sign(nonce.as_bytes()).to_bytes())
    }
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc = 0u16;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in data {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// The installed server's version, e.g. (2, 9, 10).
pub(crate) fn server_version(binary: &str) -> anyhow::Result<(u32, u32, u32)> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .with_context(|| format!("running {binary} --version"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix('v'))
        .context("no version in `nats-server --version`")?;
    let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    Ok((
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn crc16_is_xmodem() {
        // The check value of CRC-16/XMODEM.
        assert_eq!(super::crc16(b"123456789"), 0x31c3);
    }

    #[test]
    fn base32_matches_rfc4648() {
        assert_eq!(super::base32(b"foobar"), "MZXW6YTBOI");
    }
}
