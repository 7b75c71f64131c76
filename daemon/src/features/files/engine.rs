//! Stored files: the bytes under `<data_dir>/files/<mesh_id>/<file_id>` (written to a
//! temporary name, synced, then renamed, so a crash never leaves half a file under a
//! live id), the metadata in the store (both backends).
//!
//! Uploads are authenticated (see [`upload`]); downloads go through short-lived URLs
//! signed with an HMAC key of this broker, handed out by `get_file` after the access
//! check, so a URL proves that check passed without a session on the HTTP side.
//! Encrypted files are opaque blobs: the broker stores and serves them byte for byte
//! and keeps the sealed keys it is given.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path as UrlPath, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hmac::{KeyInit as _, Mac as _};
use meshd_protocol::routing::TargetSpec;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tracing::warn;

use crate::Ctx;
use crate::features::files::store::FileRow;
use crate::time::now_ms;

type HmacSha256 = hmac::Hmac<Sha256>;

/// How long a download URL works.
pub(crate) const URL_TTL_MS: i64 = 5 * 60_000;
/// How long a non-persistent file is kept.
const EPHEMERAL_TTL_MS: i64 = 24 * 3_600_000;
/// Sealed keys one upload may carry.
const MAX_FILE_KEYS: usize = 1_024;
/// Uploads signed this far from the broker's clock are refused.
const UPLOAD_SKEW_MS: i64 = 5 * 60_000;

/// Upload bodies read at once, in all (each streams to disk, so memory stays small).
const CONCURRENT_UPLOADS: usize = 16;
/// … for one mesh (one mesh cannot take every slot of the broker) …
const UPLOADS_PER_MESH: usize = 4;
/// … and for one uploading key (one sender cannot take every slot of its mesh).
const UPLOADS_PER_SENDER: usize = 1;
/// The slowest upload rate accepted, bytes per second: a body must arrive within
/// `limits.http_body_timeout` plus its size at this rate (a dripped body is cut off).
const UPLOAD_MIN_RATE: u64 = 64 * 1024;

/// Upload slots: in all, per mesh, per uploading key (see the constants above). A body
/// is read only in a slot of all three; a request that finds none is refused at once.
#[derive(Debug, Default)]
struct UploadSlots {
    counts: std::sync::Mutex<SlotCounts>,
}

/// Uploads in progress: (in all, per mesh, per key).
type SlotCounts = (usize, HashMap<String, usize>, HashMap<String, usize>);

/// A held upload slot, released on drop.
#[derive(Debug)]
struct UploadSlot<'a> {
    slots: &'a UploadSlots,
    mesh: String,
    key: String,
}

impl UploadSlots {
    /// Uploads being received now.
    fn active(&self) -> usize {
        crate::hub::lock(&self.counts).0
    }

    fn take(&self, mesh: &str, key: &str) -> Option<UploadSlot<'_>> {
        let mut c = crate::hub::lock(&self.counts);
        let (all, meshes, keys) = &mut *c;
        if *all >= CONCURRENT_UPLOADS
            || meshes.get(mesh).copied().unwrap_or(0) >= UPLOADS_PER_MESH
            || keys.get(key).copied().unwrap_or(0) >= UPLOADS_PER_SENDER
        {
            return None;
        }
        *all += 1;
        *meshes.entry(mesh.to_owned()).or_default() += 1;
        *keys.entry(key.to_owned()).or_default() += 1;
        Some(UploadSlot {
            slots: self,
            mesh: mesh.to_owned(),
            key: key.to_owned(),
        })
    }
}

impl Drop for UploadSlot<'_> {
    fn drop(&mut self) {
        let mut c = crate::hub::lock(&self.slots.counts);
        let (all, meshes, keys) = &mut *c;
        *all = all.saturating_sub(1);
        for (map, k) in [(meshes, &self.mesh), (keys, &self.key)] {
            if let Some(n) = map.get_mut(k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(k);
                }
            }
        }
    }
}

/// Where the bytes are, the key that signs download URLs, upload slots, and the
/// upload signatures seen recently (a signed upload cannot be replayed).
#[derive(Debug)]
pub(crate) struct Files {
    dir: PathBuf,
    url_key: [u8; 32],
    uploads: UploadSlots,
    seen: std::sync::Mutex<HashMap<String, i64>>,
    /// `get_file` asks sent to the brokers holding files, by ask id.
    asks: std::sync::Mutex<HashMap<String, RemoteAsk>>,
}

/// A `get_file` waiting for the holding broker's answer.
#[derive(Debug)]
struct RemoteAsk {
    broker: Arc<str>,
    asker: Arc<crate::hub::PeerShared>,
    req_id: Option<String>,
    file_id: String,
    at: tokio::time::Instant,
}

/// Remote `get_file`s one connection may have open …
const MAX_ASKS_PER_ASKER: usize = 64;
/// … and all connections together.
const MAX_ASKS: usize = 65_536;

/// How long a remote `get_file` waits (clients give up after 5 s).
const ASK_OPEN_FOR: std::time::Duration = std::time::Duration::from_secs(15);

/// An upload's bytes in their temporary file (removed on drop unless committed).
#[derive(Debug)]
struct Received {
    tmp: PathBuf,
    path: PathBuf,
    /// SHA-256 of the bytes, hex.
    sha256: String,
}

impl Drop for Received {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Why an upload body was not received.
#[derive(Debug)]
enum ReceiveError {
    /// It did not arrive in time.
    TooSlow,
    /// It was longer or shorter than its `Content-Length`.
    Length,
    /// The connection failed.
    Interrupted,
    /// The disk.
    Store(FilesError),
}

/// Why the file store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The URL key file.
    #[error(transparent)]
    Key(#[from] meshd_certs::SecretFileError),
    /// The URL key file holds something else.
    #[error("{0}: not a file URL key (64 hex characters)")]
    Corrupt(String),
    /// Disk.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FilesError + '_ {
    move |source| FilesError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Removes `.part` files a crash left behind (an upload is renamed into place only once
/// complete, so nothing refers to them).
fn remove_partial(dir: &Path) {
    let Ok(meshes) = std::fs::read_dir(dir) else {
        return;
    };
    for mesh in meshes.flatten() {
        let Ok(files) = std::fs::read_dir(mesh.path()) else {
            continue;
        };
        for f in files.flatten() {
            if f.file_name().to_string_lossy().ends_with(".part") {
                let _ = std::fs::remove_file(f.path());
            }
        }
    }
}

/// Ids that become path components: only what meshd generates (base62, `-`, `_`).
fn safe_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Files {
    /// Opens the store under `data_dir`, creating the URL key (0600) on first use.
    pub(crate) fn open(data_dir: &Path) -> Result<Self, FilesError> {
        let key_path = data_dir.join("keys").join("files-url.key");
        if !key_path.exists() {
            let key = crate::ids::random_bytes::<32>();
            meshd_certs::write_secret_file(&key_path, hex::encode(key).as_bytes())?;
        }
        let text = meshd_certs::read_secret_file(&key_path)?;
        let url_key: [u8; 32] = std::str::from_utf8(&text)
            .ok()
            .and_then(|t| hex::decode(t.trim()).ok())
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| FilesError::Corrupt(key_path.display().to_string()))?;
        let dir = data_dir.join("files");
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        remove_partial(&dir);
        Ok(Self {
            dir,
            url_key,
            uploads: UploadSlots::default(),
            seen: std::sync::Mutex::default(),
            asks: std::sync::Mutex::default(),
        })
    }

    /// Records a `get_file` sent to `broker`; returns its ask id.
    pub(crate) fn ask(
        &self,
        broker: Arc<str>,
        asker: &Arc<crate::hub::PeerShared>,
        req_id: Option<String>,
        file_id: &str,
    ) -> Option<String> {
        let now = crate::time::instant();
        let mut asks = crate::hub::lock(&self.asks);
        asks.retain(|_, a| now.duration_since(a.at) < ASK_OPEN_FOR);
        // Bounded per asking connection and in all (as the peer relay is).
        let of_asker = asks
            .values()
            .filter(|a| Arc::ptr_eq(&a.asker, asker))
            .count();
        if of_asker >= MAX_ASKS_PER_ASKER || asks.len() >= MAX_ASKS {
            return None;
        }
        let id = crate::ids::random_id();
        asks.insert(
            id.clone(),
            RemoteAsk {
                broker,
                asker: asker.clone(),
                req_id,
                file_id: file_id.to_owned(),
                at: now,
            },
        );
        Some(id)
    }

    /// Forgets an ask that could not be sent.
    pub(crate) fn unask(&self, id: &str) {
        crate::hub::lock(&self.asks).remove(id);
    }

    /// The holding broker answered: the `file_url` (or error) for the asker.
    pub(crate) fn answered(&self, broker: &str, a: meshd_protocol::fed::FileUrlAnswer) {
        let ask = {
            let mut asks = crate::hub::lock(&self.asks);
            if asks.get(&a.ask_id).is_none_or(|x| &*x.broker != broker) {
                return;
            }
            asks.remove(&a.ask_id)
        };
        let Some(ask) = ask else { return };
        let frame = match (a.url, a.error) {
            (Some(url), None) => {
                meshd_protocol::broker::BrokerFrame::FileUrl(meshd_protocol::broker::FileUrl {
                    file_id: ask.file_id,
                    url,
                    name: a.name,
                    encrypted: a.encrypted,
                    sealed_key: a.sealed_key,
                    req_id: ask.req_id,
                })
            }
            (_, error) => {
                let (code, msg) = error.unwrap_or_else(|| ("internal".into(), "no URL".into()));
                let code = match code.as_str() {
                    "not_found" => "not_found",
                    "forbidden" => "forbidden",
                    _ => "internal",
                };
                meshd_protocol::broker::BrokerFrame::Error(
                    meshd_protocol::broker::ErrorFrame::new(code, msg).with_req_id(ask.req_id),
                )
            }
        };
        crate::hub::offer(
            &ask.asker,
            crate::hub::Outbound::Frame(frame.to_json().into()),
        );
    }

    /// Uploads being received now (for `/metrics`).
    pub(crate) fn uploads_active(&self) -> usize {
        self.uploads.active()
    }

    /// Remembers an upload signature; `false` when it was already used.
    fn first_use(&self, sig: &str, now: i64) -> bool {
        let mut seen = crate::hub::lock(&self.seen);
        seen.retain(|_, at| now - *at <= 2 * UPLOAD_SKEW_MS);
        seen.insert(sig.to_owned(), now).is_none()
    }

    fn path(&self, mesh_id: &str, file_id: &str) -> Option<PathBuf> {
        (safe_component(mesh_id) && safe_component(file_id))
            .then(|| self.dir.join(mesh_id).join(file_id))
    }

    fn mac(&self, mesh_id: &str, file_id: &str, exp: i64) -> HmacSha256 {
        #[allow(clippy::expect_used)]
        let mut mac = HmacSha256::new_from_slice(&self.url_key).expect("HMAC takes any key length");
        mac.update(format!("meshd-file-url-v1\n{mesh_id}\n{file_id}\n{exp}").as_bytes());
        mac
    }

    /// A download URL valid until `exp` (ms).
    pub(crate) fn signed_url(&self, base: &str, mesh_id: &str, file_id: &str, exp: i64) -> String {
        let sig = hex::encode(self.mac(mesh_id, file_id, exp).finalize().into_bytes());
        format!("{base}/files/{mesh_id}/{file_id}?exp={exp}&sig={sig}")
    }

    fn verify(&self, mesh_id: &str, file_id: &str, exp: i64, sig: &str) -> bool {
        hex::decode(sig).is_ok_and(|s| self.mac(mesh_id, file_id, exp).verify_slice(&s).is_ok())
    }

    /// Streams a request body of exactly `len` bytes into a temporary file beside its
    /// final place, hashing it on the way, within `deadline`; the file is synced. The
    /// caller then [`Files::commit`]s it (or drops the [`Received`], which removes it).
    async fn receive(
        &self,
        mesh_id: &str,
        file_id: &str,
        body: axum::body::Body,
        len: u64,
        deadline: tokio::time::Instant,
    ) -> Result<Received, ReceiveError> {
        use futures_util::StreamExt as _;
        use tokio::io::AsyncWriteExt as _;
        let Some(path) = self.path(mesh_id, file_id) else {
            return Err(ReceiveError::Store(FilesError::Corrupt(format!(
                "{mesh_id}/{file_id}"
            ))));
        };
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| ReceiveError::Store(io_err(&dir)(e)))?;
        let tmp = dir.join(format!(".{file_id}.part"));
        let mut received = Received {
            tmp: tmp.clone(),
            path,
            sha256: String::new(),
        };
        let mut f = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| ReceiveError::Store(io_err(&tmp)(e)))?;
        let mut hash = Sha256::new();
        let mut got: u64 = 0;
        let mut stream = body.into_data_stream();
        loop {
            let chunk = match tokio::time::timeout_at(deadline, stream.next()).await {
                Err(_) => return Err(ReceiveError::TooSlow),
                Ok(None) => break,
                Ok(Some(Err(_))) => return Err(ReceiveError::Interrupted),
                Ok(Some(Ok(c))) => c,
            };
            got = got.saturating_add(chunk.len() as u64);
            if got > len {
                return Err(ReceiveError::Length);
            }
            hash.update(&chunk);
            f.write_all(&chunk)
                .await
                .map_err(|e| ReceiveError::Store(io_err(&tmp)(e)))?;
        }
        if got != len {
            return Err(ReceiveError::Length);
        }
        f.sync_all()
            .await
            .map_err(|e| ReceiveError::Store(io_err(&tmp)(e)))?;
        received.sha256 = hex::encode(hash.finalize());
        Ok(received)
    }

    /// Moves a received file into place, durably.
    async fn commit(&self, mut r: Received) -> Result<(), FilesError> {
        tokio::fs::rename(&r.tmp, &r.path)
            .await
            .map_err(io_err(&r.path))?;
        if let Some(dir) = r.path.parent()
            && let Ok(d) = tokio::fs::File::open(dir).await
        {
            let _ = d.sync_all().await;
        }
        r.tmp = PathBuf::new();
        Ok(())
    }

    /// Removes a file's bytes (deleted or expired).
    pub(crate) async fn remove(&self, mesh_id: &str, file_id: &str) {
        if let Some(path) = self.path(mesh_id, file_id)
            && let Err(e) = tokio::fs::remove_file(&path).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(cause = %e, path = %path.display(), "removing a file's bytes");
        }
    }
}

/// Whether `reader` may read `f`: the uploader always; the whole mesh when the file
/// has no target; else a target key that is the reader's member or session key,
/// `*`, or an `@group` the reader is in (sub-groups reach, as for messages).
pub(crate) fn may_read(
    f: &FileRow,
    member_id: &str,
    keys: &[&str],
    groups: &[meshd_protocol::client::GroupEntry],
) -> bool {
    if f.uploader_member_id == member_id {
        return true;
    }
    let Some(spec) = f.target_spec.as_deref() else {
        return true;
    };
    match TargetSpec::parse(spec) {
        Ok(TargetSpec::Broadcast) => true,
        Ok(TargetSpec::Direct(pk)) => keys.contains(&pk.to_hex().as_str()),
        Ok(TargetSpec::Group(g)) => groups
            .iter()
            .any(|e| meshd_protocol::routing::group_reaches(&g, &e.name)),
        _ => false,
    }
}

fn reply(code: StatusCode, v: serde_json::Value) -> Response {
    (code, axum::Json(v)).into_response()
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// Who uploads.
struct Uploader {
    member_id: String,
    member_pubkey: String,
    name: String,
    /// The key that identifies the uploader (signing key, or the presence's key).
    key: String,
}

/// The text an upload signature covers: every header that decides what is stored and
/// who may read it, and the body's digest.
pub(crate) fn upload_signing_text(
    mesh_id: &str,
    name: &str,
    body_sha256: &str,
    ts: i64,
    h: &HeaderMap,
) -> String {
    let opt = |n: &str| header_str(h, n).unwrap_or_default().to_owned();
    let keys_digest = header_str(h, "x-file-keys")
        .map(|k| hex::encode(Sha256::digest(k.as_bytes())))
        .unwrap_or_default();
    format!(
        "meshd-upload-v1\n{mesh_id}\n{name}\n{body_sha256}\n{ts}\n{}\n{}\n{}\n{}\n{}\n{keys_digest}",
        opt("x-target-spec"),
        opt("x-persistent"),
        opt("x-encrypted"),
        opt("x-owner-pubkey"),
        opt("x-tags"),
    )
}

/// `POST /upload`: the reference's headers (`X-Mesh-Id`, `X-File-Name`, `X-Tags`,
/// `X-Persistent`, `X-Target-Spec`, `X-Encrypted`, `X-Owner-Pubkey`, `X-File-Keys`),
/// raw body up to `limits.max_upload_bytes`.
///
/// The reference accepted uploads from anyone who knew a mesh id. Here an upload is
/// accepted when either
/// - it is signed: `X-Meshd-Pubkey` (a member key, or a session key of a member, of
///   the mesh), `X-Meshd-Timestamp` (ms, within 5 minutes) and `X-Meshd-Signature`,
///   the ed25519 signature of [`upload_signing_text`] (each signature once); or
/// - it is unsigned (the claudemesh 0.7.0 CLI, which cannot sign),
///   `server.unsigned_uploads = "same-address"`, and every live connection of that
///   mesh from the request's address (see `server.trusted_proxies`) belongs to one
///   member: the uploader.
///
/// The sender, the declared size, the mesh's quota and an upload slot (16 in all, 4 per
/// mesh, 1 per sending key) are checked before the body is read; the body streams to
/// disk and must arrive within `limits.http_body_timeout` plus its size at 64 KiB/s.
pub(crate) async fn upload(
    State(ctx): State<Arc<Ctx>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    request: axum::extract::Request,
) -> Response {
    let bad = |e: &str| reply(StatusCode::BAD_REQUEST, json!({"ok": false, "error": e}));
    let unauthorized = |e: &str| reply(StatusCode::UNAUTHORIZED, json!({"ok": false, "error": e}));
    let headers = request.headers().clone();
    let (Some(mesh_id), Some(name)) = (
        header_str(&headers, "x-mesh-id"),
        header_str(&headers, "x-file-name"),
    ) else {
        return bad("X-Mesh-Id, X-Member-Id and X-File-Name are required");
    };
    if name.len() > 255 || name.contains(['/', '\\', '\0']) || name == "." || name == ".." {
        return bad("X-File-Name must be a plain file name of at most 255 bytes");
    }
    let Ok(Some(mesh)) = ctx.hub.mesh(&ctx.db, mesh_id).await else {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"ok": false, "error": "no such mesh"}),
        );
    };
    let now = now_ms();
    // Who is it? (Everything but the signature itself, which covers the body.)
    let signed = match header_str(&headers, "x-meshd-pubkey") {
        Some(key) => {
            let key = key.to_ascii_lowercase();
            let ts = header_str(&headers, "x-meshd-timestamp").and_then(|t| t.parse::<i64>().ok());
            let sig = header_str(&headers, "x-meshd-signature")
                .and_then(|s| meshd_protocol::keys::Signature::parse_hex(s).ok());
            let (Some(ts), Some(sig)) = (ts, sig) else {
                return unauthorized(
                    "a signed upload needs X-Meshd-Timestamp and a 128-hex X-Meshd-Signature",
                );
            };
            if (now - ts).abs() > UPLOAD_SKEW_MS {
                return unauthorized(
                    "X-Meshd-Timestamp is more than 5 minutes from the broker's clock",
                );
            }
            let Ok(pk) = meshd_protocol::Pubkey::parse_hex(&key) else {
                return unauthorized("X-Meshd-Pubkey is not a key");
            };
            match mesh.member_for_key(&key) {
                Some((member_pubkey, m)) if !m.revoked => {
                    Some((pk, sig, ts, key, m, member_pubkey))
                }
                _ => return unauthorized("X-Meshd-Pubkey is not a key of a member of this mesh"),
            }
        }
        None => None,
    };
    let unsigned = if signed.is_none() {
        if ctx.config.server.unsigned_uploads == meshd_config::UnsignedUploads::Refuse {
            return unauthorized(
                "this broker takes signed uploads only (X-Meshd-Pubkey, X-Meshd-Timestamp, X-Meshd-Signature)",
            );
        }
        let ip = crate::http::client_ip(&ctx, remote, &headers);
        match mesh.sole_member_at(ip) {
            Ok(Some(u)) => Some(u),
            Ok(None) => {
                return unauthorized(
                    "unsigned uploads are accepted only from the address of a connected member of this mesh; sign the upload (X-Meshd-Pubkey, X-Meshd-Timestamp, X-Meshd-Signature)",
                );
            }
            Err(()) => {
                return unauthorized(
                    "several members are connected from this address, so an unsigned upload cannot be attributed; sign it",
                );
            }
        }
    } else {
        None
    };
    // The claimed sender's key (signed) or the attributed member's (unsigned): whose
    // upload slot this takes.
    let sender_key = match (&signed, &unsigned) {
        (Some((_, _, _, key, _, _)), _) => key.clone(),
        (None, Some(u)) => u.routing_key.clone(),
        (None, None) => return unauthorized("upload not authenticated"),
    };
    // Everything that can be checked before the body is: its declared size against the
    // limit and the mesh's quota, and a free slot (in all, for this mesh, for this
    // sender). Only then is the body read — streamed to disk within a deadline.
    let limit = ctx.config.limits.max_upload_bytes as u64;
    let Some(len) = header_str(&headers, "content-length").and_then(|l| l.parse::<u64>().ok())
    else {
        return reply(
            StatusCode::LENGTH_REQUIRED,
            json!({"ok": false, "error": "Content-Length is required"}),
        );
    };
    if len == 0 {
        return bad("empty body");
    }
    if len > limit {
        return reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"ok": false, "error": format!("file too large (max {limit} bytes)")}),
        );
    }
    match ctx.db.file_bytes(&mesh.row.id, now).await {
        Ok(used)
            if u64::try_from(used).unwrap_or(u64::MAX).saturating_add(len)
                > ctx.config.limits.max_file_bytes_per_mesh as u64 =>
        {
            return reply(
                StatusCode::INSUFFICIENT_STORAGE,
                json!({"ok": false, "error": "this mesh's file storage is full; delete some files"}),
            );
        }
        Ok(_) => {}
        Err(e) => {
            warn!(cause = %e, "reading a mesh's file usage");
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"ok": false, "error": "store unavailable"}),
            );
        }
    }
    // The uploading member's own quota (files and bytes), before the body too.
    let member_id = match (&signed, &unsigned) {
        (Some((_, _, _, _, m, _)), _) => m.id.clone(),
        (None, Some(u)) => u.member_id.clone(),
        (None, None) => return unauthorized("upload not authenticated"),
    };
    if let Err(e) = crate::quota::check(
        &ctx,
        crate::quota::Kind::Files,
        &mesh.row.id,
        &member_id,
        crate::quota::Usage::new(1, i64::try_from(len).unwrap_or(i64::MAX)),
    ) {
        return reply(
            StatusCode::INSUFFICIENT_STORAGE,
            json!({"ok": false, "error": format!("{}: {e}", crate::quota::QuotaExceeded::CODE)}),
        );
    }
    let Some(_slot) = ctx.files.uploads.take(&mesh.row.id, &sender_key) else {
        ctx.metrics.http_refused.inc("upload_busy");
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"ok": false, "error": "too many uploads in progress (for this mesh or sender); retry shortly"}),
        );
    };
    let id = crate::ids::random_id();
    let deadline = crate::time::instant()
        + ctx.config.limits.http_body_timeout
        + std::time::Duration::from_secs(len / UPLOAD_MIN_RATE);
    let received = match ctx
        .files
        .receive(&mesh.row.id, &id, request.into_body(), len, deadline)
        .await
    {
        Ok(r) => r,
        Err(ReceiveError::TooSlow) => {
            ctx.metrics.http_refused.inc("upload_timeout");
            return reply(
                StatusCode::REQUEST_TIMEOUT,
                json!({"ok": false, "error": "the body did not arrive in time"}),
            );
        }
        Err(ReceiveError::Length) => {
            return bad("the body does not match its Content-Length");
        }
        Err(ReceiveError::Interrupted) => return bad("the body was interrupted"),
        Err(ReceiveError::Store(e)) => {
            warn!(cause = %e, "storing an upload");
            return reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"ok": false, "error": "the broker could not store the file"}),
            );
        }
    };
    let digest = received.sha256.clone();
    let uploader = match (signed, unsigned) {
        (Some((pk, sig, ts, key, m, member_pubkey)), _) => {
            let text = upload_signing_text(mesh_id, name, &digest, ts, &headers);
            if !pk.verify(text.as_bytes(), &sig) {
                return unauthorized("the upload signature does not verify");
            }
            if !ctx.files.first_use(&sig.to_hex(), now) {
                return unauthorized("this upload signature was already used");
            }
            Uploader {
                member_id: m.id,
                member_pubkey,
                name: m.display_name,
                key,
            }
        }
        (None, Some(u)) => Uploader {
            member_id: u.member_id,
            member_pubkey: u.member_pubkey,
            name: u.display_name,
            key: u.routing_key,
        },
        (None, None) => return unauthorized("upload not authenticated"),
    };
    let tags: Vec<String> = header_str(&headers, "x-tags")
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_default();
    if tags.len() > 64 || tags.iter().any(|t| t.len() > 256 || t.contains('\0')) {
        return bad("at most 64 tags of up to 256 bytes");
    }
    let persistent = header_str(&headers, "x-persistent") != Some("false");
    let target_spec = match header_str(&headers, "x-target-spec") {
        None => None,
        Some(t) => match TargetSpec::parse(t) {
            Ok(TargetSpec::Direct(_) | TargetSpec::Broadcast | TargetSpec::Group(_)) => {
                Some(t.to_owned())
            }
            _ => return bad("X-Target-Spec must be a member or session key, @group or *"),
        },
    };
    let encrypted = header_str(&headers, "x-encrypted") == Some("true");
    // The owner may grant access: the uploader, or one of its own keys it names.
    let owner_pubkey = match header_str(&headers, "x-owner-pubkey") {
        Some(k)
            if mesh
                .member_for_key(&k.to_ascii_lowercase())
                .is_some_and(|(_, m)| m.id == uploader.member_id) =>
        {
            k.to_ascii_lowercase()
        }
        Some(_) => return bad("X-Owner-Pubkey must be a key of the uploading member"),
        None => uploader.key.clone(),
    };
    let keys: Vec<(String, String)> = if encrypted {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct FileKey {
            peer_pubkey: String,
            sealed_key: String,
        }
        match header_str(&headers, "x-file-keys").map(serde_json::from_str::<Vec<FileKey>>) {
            None => Vec::new(),
            Some(Ok(k))
                if k.len() <= MAX_FILE_KEYS
                    && k.iter().all(|k| {
                        k.peer_pubkey.len() <= 256
                            && k.sealed_key.len() <= 4096
                            && !k.peer_pubkey.contains('\0')
                            && !k.sealed_key.contains('\0')
                    }) =>
            {
                k.into_iter()
                    .map(|k| (k.peer_pubkey.to_ascii_lowercase(), k.sealed_key))
                    .collect()
            }
            Some(_) => return bad("X-File-Keys must be a JSON array of {peerPubkey, sealedKey}"),
        }
    } else {
        Vec::new()
    };
    let sha256 = digest;
    if let Err(e) = ctx.files.commit(received).await {
        warn!(cause = %e, "storing an upload");
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"ok": false, "error": "the broker could not store the file"}),
        );
    }
    let row = FileRow {
        id: id.clone(),
        mesh_id: mesh.row.id.clone(),
        name: name.to_owned(),
        size_bytes: i64::try_from(len).unwrap_or(i64::MAX),
        mime_type: header_str(&headers, "content-type").map(str::to_owned),
        sha256,
        tags: serde_json::to_string(&tags).unwrap_or_else(|_| "[]".into()),
        persistent: i64::from(persistent),
        encrypted: i64::from(encrypted),
        owner_pubkey,
        uploader_member_id: uploader.member_id,
        uploaded_by_name: uploader.name,
        target_spec,
        uploaded_at: now,
        expires_at: (!persistent).then_some(now + EPHEMERAL_TTL_MS),
        home_broker: None,
        uploader_pubkey: Some(uploader.member_pubkey),
    };
    let stored = ctx.db.insert_file(&row, &keys).await;
    if stored.is_ok() {
        crate::features::dashboard::touched(&ctx, &row.mesh_id, "files");
    }
    if let Err(e) = stored {
        warn!(cause = %e, "storing an upload's metadata");
        ctx.files.remove(&row.mesh_id, &id).await;
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"ok": false, "error": "the broker could not store the file"}),
        );
    }
    publish(&ctx, &row.mesh_id, vec![file_set(&row, false)]);
    reply(StatusCode::OK, json!({"ok": true, "fileId": id}))
}

#[derive(Deserialize)]
pub(crate) struct DownloadQuery {
    exp: i64,
    sig: String,
}

/// `GET /files/<meshId>/<fileId>?exp=&sig=`: a URL from `get_file`, before it expires.
pub(crate) async fn download(
    State(ctx): State<Arc<Ctx>>,
    UrlPath((mesh_id, file_id)): UrlPath<(String, String)>,
    Query(q): Query<DownloadQuery>,
) -> Response {
    let now = now_ms();
    if q.exp < now || !ctx.files.verify(&mesh_id, &file_id, q.exp, &q.sig) {
        return reply(
            StatusCode::FORBIDDEN,
            json!({"ok": false, "error": "this download link is invalid or expired; ask get_file for a new one"}),
        );
    }
    let row = match ctx.db.file(&mesh_id, &file_id, now).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            return reply(
                StatusCode::NOT_FOUND,
                json!({"ok": false, "error": "no such file"}),
            );
        }
        Err(e) => {
            warn!(cause = %e, "reading a file row");
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"ok": false, "error": "store unavailable"}),
            );
        }
    };
    let Some(path) = ctx.files.path(&mesh_id, &file_id) else {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"ok": false, "error": "no such file"}),
        );
    };
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            warn!(cause = %e, path = %path.display(), "opening a stored file");
            return reply(
                StatusCode::NOT_FOUND,
                json!({"ok": false, "error": "the file's bytes are missing"}),
            );
        }
    };
    let mut resp = Body::from_stream(tokio_util::io::ReaderStream::new(file)).into_response();
    let h = resp.headers_mut();
    let mime = row
        .mime_type
        .as_deref()
        .and_then(|m| HeaderValue::from_str(m).ok())
        .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
    h.insert(header::CONTENT_TYPE, mime);
    if let Ok(v) = HeaderValue::from_str(&row.size_bytes.to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    let safe_name: String = row
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{safe_name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", row.sha256)) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// A stored file as a federation frame.
pub(crate) fn file_set(f: &FileRow, deleted: bool) -> meshd_protocol::fed::FileSet {
    meshd_protocol::fed::FileSet {
        id: f.id.clone(),
        name: f.name.clone(),
        size: f.size_bytes,
        mime_type: f.mime_type.clone(),
        sha256: f.sha256.clone(),
        tags: f.tags.clone(),
        persistent: f.persistent != 0,
        encrypted: f.encrypted != 0,
        owner_pubkey: f.owner_pubkey.clone(),
        uploader_member_id: f.uploader_member_id.clone(),
        uploader_pubkey: f.uploader_pubkey.clone().unwrap_or_default(),
        uploaded_by_name: f.uploaded_by_name.clone(),
        target_spec: f.target_spec.clone(),
        uploaded_at: f.uploaded_at,
        expires_at: f.expires_at,
        deleted,
    }
}

/// A removal of a file held here, as a federation frame (the receiver only applies it
/// to a file it knows as held by us).
pub(crate) fn file_removal(id: &str) -> meshd_protocol::fed::FileSet {
    meshd_protocol::fed::FileSet {
        id: id.to_owned(),
        name: String::new(),
        size: 0,
        mime_type: None,
        sha256: String::new(),
        tags: "[]".into(),
        persistent: false,
        encrypted: false,
        owner_pubkey: String::new(),
        uploader_member_id: String::new(),
        uploader_pubkey: String::new(),
        uploaded_by_name: String::new(),
        target_spec: None,
        uploaded_at: 0,
        expires_at: None,
        deleted: true,
    }
}

/// Tells the mesh's other brokers about files held here that changed.
pub(crate) fn publish(ctx: &Ctx, mesh_id: &str, files: Vec<meshd_protocol::fed::FileSet>) {
    if let Some(fed) = &ctx.fed {
        fed.files_changed(mesh_id, files, false);
    }
}

/// Applies a peer broker's files (`full`: its complete list). A new or changed file must
/// have been uploaded by a member the peer hosts; a removal applies only to files known
/// as held by that peer.
pub(crate) async fn apply_remote(
    ctx: &Ctx,
    broker: &str,
    hub: &crate::hub::MeshHub,
    files: Vec<meshd_protocol::fed::FileSet>,
    full: bool,
) -> Result<bool, crate::store::StoreError> {
    let now = now_ms();
    let mesh_id = hub.row.id.clone();
    if full {
        ctx.db.forget_remote_files(&mesh_id, broker, now).await?;
    }
    let mut forged = false;
    for f in files {
        let valid = f.id.len() <= 64
            && !f.id.is_empty()
            && f.name.len() <= 255
            && f.tags.len() <= 16 * 1024
            && f.uploaded_by_name.len() <= 256
            && f.target_spec.as_ref().is_none_or(|t| t.len() <= 256)
            && f.mime_type.as_ref().is_none_or(|m| m.len() <= 256);
        if !valid {
            forged = true;
            continue;
        }
        let speaks = hub
            .member(&f.uploader_pubkey)
            .is_some_and(|m| m.id == f.uploader_member_id)
            && hub.may_speak_for(broker, &f.uploader_pubkey);
        if !f.deleted && !speaks {
            forged = true;
            continue;
        }
        let row = FileRow {
            id: f.id,
            mesh_id: mesh_id.clone(),
            name: f.name,
            size_bytes: f.size,
            mime_type: f.mime_type,
            sha256: f.sha256,
            tags: f.tags,
            persistent: i64::from(f.persistent),
            encrypted: i64::from(f.encrypted),
            owner_pubkey: f.owner_pubkey,
            uploader_member_id: f.uploader_member_id,
            uploaded_by_name: f.uploaded_by_name,
            target_spec: f.target_spec,
            uploaded_at: f.uploaded_at,
            expires_at: f.expires_at,
            home_broker: Some(broker.to_owned()),
            uploader_pubkey: Some(f.uploader_pubkey),
        };
        if f.deleted {
            ctx.db
                .delete_remote_file(&mesh_id, &row.id, broker, now)
                .await?;
        } else {
            ctx.db.put_remote_file(&row, None).await?;
        }
    }
    Ok(!forged)
}

/// `get_file` asked of this broker by a peer broker, for one of its peers: the same
/// access check as for a local reader, and a URL at this broker.
pub(crate) async fn remote_url(
    ctx: &Ctx,
    a: &meshd_protocol::fed::FileUrlAsk,
) -> meshd_protocol::fed::FileUrlAnswer {
    let now = now_ms();
    let mut answer = meshd_protocol::fed::FileUrlAnswer {
        mesh_id: a.mesh_id.clone(),
        ask_id: a.ask_id.clone(),
        url: None,
        name: String::new(),
        encrypted: false,
        sealed_key: None,
        error: None,
    };
    let refuse = |mut ans: meshd_protocol::fed::FileUrlAnswer, code: &str, msg: &str| {
        ans.error = Some((code.to_owned(), msg.to_owned()));
        ans
    };
    let f = match ctx.db.file(&a.mesh_id, &a.file_id, now).await {
        Ok(Some(f)) if f.home_broker.is_none() => f,
        Ok(_) => return refuse(answer, "not_found", "no such file in this mesh"),
        Err(e) => {
            warn!(cause = %e, "reading a file for a peer broker");
            return refuse(answer, "internal", "the broker's store is unavailable");
        }
    };
    let groups: Vec<meshd_protocol::client::GroupEntry> = a
        .groups
        .iter()
        .map(|g| meshd_protocol::client::GroupEntry {
            name: g.clone(),
            role: None,
        })
        .collect();
    let keys = [a.reader_key.as_str(), a.member_pubkey.as_str()];
    if !may_read(&f, &a.member_id, &keys, &groups) {
        return refuse(answer, "forbidden", "this file is not shared with you");
    }
    if f.encrypted != 0 {
        answer.sealed_key = ctx.db.sealed_file_key(&f.id, &keys).await.ok().flatten();
    }
    if let Err(e) = ctx
        .db
        .record_file_access(&f.id, &a.reader_key, &a.reader_name, now)
        .await
    {
        warn!(cause = %e, "recording a download");
    }
    let base = crate::http::hook_base(&ctx.config);
    answer.url = Some(
        ctx.files
            .signed_url(&base, &f.mesh_id, &f.id, now + URL_TTL_MS),
    );
    answer.name = f.name;
    answer.encrypted = f.encrypted != 0;
    answer
}
