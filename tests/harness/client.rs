//! A claudemesh client for tests and the load generator: the CLI's hello, DMs sealed with
//! `crypto_box` between session keys, plaintext broadcasts, `_reqId` correlation.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::crypto::{self, Keypair};

/// How long tests wait for an expected frame (override with `MESHD_TEST_PATIENCE_MS`).
pub fn patience() -> Duration {
    let ms = std::env::var("MESHD_TEST_PATIENCE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    Duration::from_millis(ms)
}

/// An enrolled member: what `claudemesh join` stores in `~/.claudemesh/config.json`.
#[derive(Clone, Debug)]
pub struct Member {
    /// Mesh id.
    pub mesh_id: String,
    /// From `/join`.
    pub member_id: String,
    /// Member key pair.
    pub keys: Keypair,
    /// Name given at join.
    pub display_name: String,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A timestamp for a new hello: the clock, but strictly increasing within this process,
/// so two hellos of one member never carry the same signature (which the broker's replay
/// cache would refuse, as it should).
pub fn unique_ts() -> i64 {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = now_ms();
    let prev = LAST.fetch_max(now, Ordering::SeqCst);
    if prev >= now {
        LAST.fetch_add(1, Ordering::SeqCst) + 1
    } else {
        now
    }
}

/// Hello options.
#[derive(Clone, Debug)]
pub struct HelloOpts {
    /// Announce a session key (the CLI and SDK do; CLI 0.1.4 and Telegram do not).
    pub session: Option<Keypair>,
    /// `displayName`.
    pub display_name: Option<String>,
    /// `cwd` (the SDK sends none).
    pub cwd: Option<String>,
    /// `groups`.
    pub groups: Vec<(String, Option<String>)>,
    /// `peerType`.
    pub peer_type: Option<String>,
    /// `channel`.
    pub channel: Option<String>,
    /// `hostname`.
    pub hostname: Option<String>,
    /// `model`.
    pub model: Option<String>,
    /// `sessionId` (default: `<pid>-<ms>` like the CLI).
    pub session_id: Option<String>,
}

impl Default for HelloOpts {
    fn default() -> Self {
        Self {
            session: Some(Keypair::generate()),
            display_name: None,
            cwd: Some("/work/project".into()),
            groups: Vec::new(),
            peer_type: Some("ai".into()),
            channel: Some("claude-code".into()),
            hostname: Some("test-host".into()),
            model: None,
            session_id: None,
        }
    }
}

/// Builds a signed `hello` exactly as the CLI does.
pub fn hello_frame(member: &Member, opts: &HelloOpts, timestamp: i64) -> Value {
    let pubkey = member.keys.public_hex();
    let canonical = format!(
        "{}|{}|{}|{}",
        member.mesh_id, member.member_id, pubkey, timestamp
    );
    let mut v = json!({
        "type": "hello",
        "meshId": member.mesh_id,
        "memberId": member.member_id,
        "pubkey": pubkey,
        "sessionId": opts.session_id.clone().unwrap_or_else(|| format!("{}-{}", std::process::id(), timestamp)),
        "pid": std::process::id(),
        "timestamp": timestamp,
        "signature": member.keys.sign_hex(&canonical),
    });
    let o = v.as_object_mut().expect("object");
    if let Some(s) = &opts.session {
        o.insert("sessionPubkey".into(), s.public_hex().into());
    }
    for (k, val) in [
        ("displayName", &opts.display_name),
        ("cwd", &opts.cwd),
        ("peerType", &opts.peer_type),
        ("channel", &opts.channel),
        ("hostname", &opts.hostname),
        ("model", &opts.model),
    ] {
        if let Some(val) = val {
            o.insert(k.into(), val.clone().into());
        }
    }
    if !opts.groups.is_empty() {
        let groups: Vec<Value> = opts
            .groups
            .iter()
            .map(|(n, r)| match r {
                Some(r) => json!({"name": n, "role": r}),
                None => json!({"name": n}),
            })
            .collect();
        o.insert("groups".into(), groups.into());
    }
    v
}

/// Builds a signed `session_hello` as the newest CLI does: `session` is the session key,
/// vouched for by the member key for an hour.
pub fn session_hello_frame(member: &Member, session: &Keypair, timestamp: i64) -> Value {
    let (mpk, spk) = (member.keys.public_hex(), session.public_hex());
    let expires_at = timestamp + 3_600_000;
    json!({
        "type": "session_hello", "protocolVersion": 1, "meshId": member.mesh_id,
        "parentMemberId": member.member_id, "parentMemberPubkey": mpk, "sessionPubkey": spk,
        "parentAttestation": {"sessionPubkey": spk, "parentMemberPubkey": mpk, "expiresAt": expires_at,
            "signature": member.keys.sign_hex(&format!("claudemesh-session-attest|{mpk}|{spk}|{expires_at}"))},
        "displayName": member.display_name, "sessionId": format!("s-{timestamp}"), "pid": std::process::id(),
        "cwd": "/work/project", "channel": "claudemesh-session", "timestamp": timestamp,
        "signature": session.sign_hex(&format!("claudemesh-session-hello|{}|{mpk}|{spk}|{timestamp}", member.mesh_id)),
    })
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket with JSON helpers and no protocol logic (for handshake tests).
#[derive(Debug)]
pub struct RawWs {
    ws: Ws,
    /// Frames read but not yet consumed.
    backlog: VecDeque<Value>,
    /// The close frame, once received.
    pub closed: Option<Option<(u16, String)>>,
    /// The text of the last [`RAW_KEPT`] frames read, as sent (key order, spacing).
    raw: VecDeque<String>,
}

/// Frames whose text [`RawWs::raw_texts`] keeps.
const RAW_KEPT: usize = 256;

impl RawWs {
    /// Opens a socket to `url` (e.g. `ws://127.0.0.1:port/ws`).
    ///
    /// # Errors
    /// Connection failure.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        Ok(Self {
            ws,
            backlog: VecDeque::new(),
            closed: None,
            raw: VecDeque::new(),
        })
    }

    /// Sends a text frame.
    ///
    /// # Errors
    /// Socket failure.
    pub async fn send_text(&mut self, text: impl Into<String>) -> anyhow::Result<()> {
        self.ws.send(Message::Text(text.into().into())).await?;
        Ok(())
    }

    /// Sends a JSON frame.
    ///
    /// # Errors
    /// Socket failure.
    pub async fn send_json(&mut self, v: &Value) -> anyhow::Result<()> {
        self.send_text(v.to_string()).await
    }

    /// Sends a binary frame.
    ///
    /// # Errors
    /// Socket failure.
    pub async fn send_binary(&mut self, data: Vec<u8>) -> anyhow::Result<()> {
        self.ws.send(Message::Binary(data.into())).await?;
        Ok(())
    }

    /// Reads the next JSON frame from the socket (not the backlog). `None` on timeout or
    /// close (see [`RawWs::closed`]).
    pub async fn read(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match msg {
                Some(Ok(Message::Text(t))) => {
                    if self.raw.len() == RAW_KEPT {
                        self.raw.pop_front();
                    }
                    self.raw.push_back(t.as_str().to_owned());
                    return Some(serde_json::from_str(t.as_str()).unwrap_or_else(|e| {
                        panic!("broker sent a frame that is not JSON ({e}): {}", t.as_str())
                    }));
                }
                Some(Ok(Message::Close(frame))) => {
                    self.closed =
                        Some(frame.map(|CloseFrame { code, reason }| {
                            (u16::from(code), reason.to_string())
                        }));
                    return None;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    self.closed.get_or_insert(None);
                    return None;
                }
            }
        }
    }

    /// Waits for the first frame matching `pred` (backlog first); others are kept.
    ///
    /// # Errors
    /// Timeout or close, with the frames seen.
    pub async fn expect(
        &mut self,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        self.expect_within(what, patience(), pred).await
    }

    /// [`RawWs::expect`] with an explicit timeout.
    ///
    /// # Errors
    /// Timeout or close.
    pub async fn expect_within(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return Ok(self.backlog.remove(i).expect("index"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read(left).await {
                Some(v) if pred(&v) => return Ok(v),
                Some(v) => self.backlog.push_back(v),
                None => bail!(
                    "waiting for {what}: {} (closed: {:?}); other frames seen: {:?}",
                    if self.closed.is_some() {
                        "socket closed"
                    } else {
                        "timed out"
                    },
                    self.closed,
                    self.backlog
                ),
            }
        }
    }

    /// Waits for the broker to close the socket; returns the close code and reason.
    pub async fn expect_close(&mut self) -> Option<(u16, String)> {
        let deadline = Instant::now() + patience();
        while self.closed.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            if let Some(v) = self.read(left).await {
                self.backlog.push_back(v);
            }
        }
        self.closed.clone().flatten()
    }

    /// Sends a Close frame (code 1000) and waits for the broker's answering Close
    /// (RFC 6455 §5.5.1): `Some(its code and reason, if any)`, or `None` if the connection
    /// just ended without one.
    pub async fn close_handshake(&mut self) -> Option<Option<(u16, String)>> {
        let _ = self
            .ws
            .send(Message::Close(Some(CloseFrame {
                code: 1000.into(),
                reason: "bye".into(),
            })))
            .await;
        let deadline = Instant::now() + patience();
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return Some(
                        frame.map(|CloseFrame { code, reason }| {
                            (u16::from(code), reason.to_string())
                        }),
                    );
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_)) | None) | Err(_) => return None,
            }
        }
    }

    /// The text of the most recent frames read, as the broker sent them.
    pub fn raw_texts(&self) -> &VecDeque<String> {
        &self.raw
    }

    /// Frames read but not consumed.
    pub fn backlog(&self) -> &VecDeque<Value> {
        &self.backlog
    }

    /// Removes and returns backlog frames matching `pred`.
    pub fn drain_backlog(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let (take, keep): (Vec<Value>, Vec<Value>) = self.backlog.drain(..).partition(pred);
        self.backlog = keep.into();
        take
    }
}

/// An authenticated claudemesh client.
#[derive(Debug)]
pub struct Client {
    /// The socket.
    pub ws: RawWs,
    /// Who this is.
    pub member: Member,
    /// Session key, if announced.
    pub session: Option<Keypair>,
    /// The broker's `hello_ack`.
    pub hello_ack: Value,
    next_req: u64,
}

impl Client {
    /// Connects and authenticates like the CLI.
    ///
    /// # Errors
    /// Connection failure or a refused hello (the error frame is in the message).
    pub async fn connect(url: &str, member: &Member, opts: HelloOpts) -> anyhow::Result<Self> {
        let mut ws = RawWs::connect(url).await?;
        ws.send_json(&hello_frame(member, &opts, unique_ts()))
            .await?;
        let ack = ws
            .expect_within("hello_ack", Duration::from_secs(5).max(patience()), |v| {
                v["type"] == "hello_ack" || v["type"] == "error"
            })
            .await?;
        if ack["type"] == "error" {
            bail!("hello refused: {ack}");
        }
        Ok(Self {
            ws,
            member: member.clone(),
            session: opts.session,
            hello_ack: ack,
            next_req: 0,
        })
    }

    /// Connects and authenticates with `session_hello` (CLI 1.37 and the newest SDK).
    ///
    /// # Errors
    /// Connection failure or a refused hello.
    pub async fn connect_session(url: &str, member: &Member) -> anyhow::Result<Self> {
        let session = Keypair::generate();
        let mut ws = RawWs::connect(url).await?;
        ws.send_json(&session_hello_frame(member, &session, unique_ts()))
            .await?;
        let ack = ws
            .expect_within("hello_ack", Duration::from_secs(5).max(patience()), |v| {
                v["type"] == "hello_ack" || v["type"] == "error"
            })
            .await?;
        if ack["type"] == "error" {
            bail!("session_hello refused: {ack}");
        }
        Ok(Self {
            ws,
            member: member.clone(),
            session: Some(session),
            hello_ack: ack,
            next_req: 0,
        })
    }

    /// The key others address this client by (session key, else member key).
    pub fn key(&self) -> String {
        self.session
            .as_ref()
            .map_or_else(|| self.member.keys.public_hex(), Keypair::public_hex)
    }

    /// The key pair DMs to this client are sealed for.
    pub fn dm_keys(&self) -> &Keypair {
        self.session.as_ref().unwrap_or(&self.member.keys)
    }

    fn req_id(&mut self) -> String {
        self.next_req += 1;
        format!("r{}-{}", self.next_req, now_ms())
    }

    /// Sends a request with a fresh `_reqId` and waits for the answer carrying it.
    ///
    /// # Errors
    /// Timeout or close.
    pub async fn request(&mut self, mut frame: Value) -> anyhow::Result<Value> {
        let id = self.req_id();
        frame["_reqId"] = id.clone().into();
        self.ws.send_json(&frame).await?;
        let what = format!("reply to {} ({id})", frame["type"]);
        self.ws.expect(&what, |v| v["_reqId"] == id.as_str()).await
    }

    /// Sends a fire-and-forget frame.
    ///
    /// # Errors
    /// Socket failure.
    pub async fn send(&mut self, frame: Value) -> anyhow::Result<()> {
        self.ws.send_json(&frame).await
    }

    /// A round trip (`list_peers`): everything the broker queued for us before it is read.
    ///
    /// # Errors
    /// Timeout.
    pub async fn sync(&mut self) -> anyhow::Result<Value> {
        self.request(json!({"type": "list_peers"})).await
    }

    /// Sends an envelope and waits for its `ack` (matched by `id`, as the SDK does).
    ///
    /// # Errors
    /// Timeout.
    pub async fn send_envelope(
        &mut self,
        target: &str,
        priority: &str,
        nonce: &str,
        ciphertext: &str,
    ) -> anyhow::Result<Value> {
        self.send_acked(
            json!({"type": "send", "targetSpec": target, "priority": priority,
            "nonce": nonce, "ciphertext": ciphertext}),
        )
        .await
    }

    /// Sends a `send` frame with a fresh `id` and waits for its `ack`.
    async fn send_acked(&mut self, mut frame: Value) -> anyhow::Result<Value> {
        let id = self.req_id();
        frame["id"] = id.clone().into();
        self.ws.send_json(&frame).await?;
        self.ws
            .expect("ack", |v| v["type"] == "ack" && v["id"] == id.as_str())
            .await
    }

    /// Sends a sealed DM to `to` (a session or member key) and returns the `ack`.
    ///
    /// # Errors
    /// Timeout.
    pub async fn dm(&mut self, to: &str, text: &str, priority: &str) -> anyhow::Result<Value> {
        let (nonce, c) = crypto::seal(text, to, self.dm_keys());
        self.send_envelope(to, priority, &nonce, &c).await
    }

    /// Sends a plaintext multicast (`*`, `@all`, `@group`) and returns the `ack`.
    ///
    /// # Errors
    /// Timeout.
    pub async fn multicast(&mut self, target: &str, text: &str) -> anyhow::Result<Value> {
        let (nonce, c) = crypto::plain(text);
        self.send_envelope(target, "next", &nonce, &c).await
    }

    /// Sends a plaintext message carrying `tags` (meshd extension) and returns the `ack`.
    ///
    /// # Errors
    /// Timeout.
    pub async fn send_tagged(
        &mut self,
        target: &str,
        text: &str,
        tags: &[&str],
    ) -> anyhow::Result<Value> {
        let (nonce, c) = crypto::plain(text);
        self.send_acked(
            json!({"type": "send", "targetSpec": target, "priority": "next",
            "nonce": nonce, "ciphertext": c, "tags": tags}),
        )
        .await
    }

    /// Sends a sealed DM carrying `tags` and returns the `ack`.
    ///
    /// # Errors
    /// Timeout.
    pub async fn dm_tagged(
        &mut self,
        to: &str,
        text: &str,
        tags: &[&str],
    ) -> anyhow::Result<Value> {
        let (nonce, c) = crypto::seal(text, to, self.dm_keys());
        self.send_acked(json!({"type": "send", "targetSpec": to, "priority": "now",
            "nonce": nonce, "ciphertext": c, "tags": tags}))
            .await
    }

    /// Subscribes to `tags` and returns the subscriptions after the change.
    ///
    /// # Errors
    /// Timeout, or an error answer.
    pub async fn subscribe_tags(&mut self, tags: &[&str]) -> anyhow::Result<Vec<String>> {
        let v = self
            .request(json!({"type": "subscribe_tags", "tags": tags}))
            .await?;
        anyhow::ensure!(v["type"] == "tag_subscriptions", "subscribe_tags: {v}");
        Ok(serde_json::from_value(v["tags"].clone())?)
    }

    /// Waits for a non-system push and returns it with its decrypted text.
    ///
    /// # Errors
    /// Timeout.
    pub async fn expect_message(&mut self) -> anyhow::Result<(Value, String)> {
        let push = self
            .ws
            .expect("a message push", |v| {
                v["type"] == "push" && v.get("subtype").is_none()
            })
            .await?;
        let text = self
            .read_push(&push)
            .ok_or_else(|| anyhow!("push does not decrypt: {push}"))?;
        Ok((push, text))
    }

    /// Decodes a push the way the CLI does: `crypto_box_open_easy` first, then base64.
    pub fn read_push(&self, push: &Value) -> Option<String> {
        let (sender, nonce, c) = (
            push["senderPubkey"].as_str()?,
            push["nonce"].as_str()?,
            push["ciphertext"].as_str()?,
        );
        crypto::open(nonce, c, sender, self.dm_keys()).or_else(|| crypto::unplain(c))
    }

    /// Only the sealed (crypto_box) reading of a push.
    pub fn open_push(&self, push: &Value) -> Option<String> {
        crypto::open(
            push["nonce"].as_str()?,
            push["ciphertext"].as_str()?,
            push["senderPubkey"].as_str()?,
            self.dm_keys(),
        )
    }

    /// Waits for a system push with `event`.
    ///
    /// # Errors
    /// Timeout.
    pub async fn expect_event(&mut self, event: &str) -> anyhow::Result<Value> {
        self.ws
            .expect(&format!("system event {event}"), |v| {
                v["type"] == "push" && v["subtype"] == "system" && v["event"] == event
            })
            .await
    }

    /// After a round trip, that no message push arrived beyond those consumed.
    ///
    /// # Errors
    /// Timeout, or the unexpected pushes.
    pub async fn expect_no_messages(&mut self) -> anyhow::Result<()> {
        self.sync().await?;
        let extra = self.pending_messages();
        anyhow::ensure!(
            extra.is_empty(),
            "{}: unexpected {extra:?}",
            self.member.display_name
        );
        Ok(())
    }

    /// Message pushes (not events) already read but not consumed.
    pub fn pending_messages(&mut self) -> Vec<Value> {
        self.ws
            .drain_backlog(|v| v["type"] == "push" && v.get("subtype").is_none())
    }

    /// Polls `list_peers` until `pred` holds (with a deadline).
    ///
    /// # Errors
    /// The deadline passed.
    pub async fn until_peers(
        &mut self,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        self.poll(what, json!({"type": "list_peers"}), pred).await
    }

    /// Polls `message_status` for `message_id` until `pred` holds (with a deadline).
    ///
    /// # Errors
    /// The deadline passed.
    pub async fn until_status(
        &mut self,
        message_id: &Value,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let what = format!("message_status of {message_id}");
        self.poll(
            &what,
            json!({"type": "message_status", "messageId": message_id}),
            pred,
        )
        .await
    }

    /// Sends `frame` as a request until its answer satisfies `pred` (backing off up to
    /// 100 ms between tries); the answer.
    ///
    /// # Errors
    /// [`patience`] passed (naming `what` and the last answer), or the socket failed.
    pub async fn poll(
        &mut self,
        what: &str,
        frame: Value,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + patience();
        let mut pause = Duration::from_millis(5);
        loop {
            let v = self.request(frame.clone()).await?;
            if pred(&v) {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                bail!("timed out waiting for {what}; last answer {v}");
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Closes the socket politely.
    pub async fn close(mut self) {
        let _ = self.ws.ws.close(None).await;
    }
}
