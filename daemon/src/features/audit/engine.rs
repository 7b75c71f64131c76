//! The audit log: per mesh, an append-only chain of entries, each hashed (SHA-256 over
//! canonical sorted-key JSON that includes the previous hash); the newest entry of every
//! written batch carries the broker's ed25519 signature of its hash, which covers every
//! earlier entry through the chain. So an edit breaks the chain, and a rebuilt chain lacks
//! valid signatures (the newest entry must be signed). Appends of one mesh are serialized; a verification names the first
//! entry that does not check out.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::features::audit::store::AuditRow;
use crate::hub::lock;
use crate::store::Db;

/// The first entry's `prevHash`.
pub const GENESIS: &str = "genesis";

/// Where the broker's audit key lives, under the data directory.
pub fn key_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("keys").join("broker-audit.key")
}

/// Why the audit key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AuditKeyError {
    /// The key file.
    #[error(transparent)]
    File(#[from] meshd_certs::SecretFileError),
    /// Not a 64-hex ed25519 seed.
    #[error("{0}: not an audit key (64 hex characters)")]
    Corrupt(String),
}

/// Loads the audit key, creating it (0600) on first use.
///
/// # Errors
/// [`AuditKeyError`].
pub fn load_or_create_key(data_dir: &Path) -> Result<SigningKey, AuditKeyError> {
    let path = key_path(data_dir);
    if !path.exists() {
        let seed = crate::ids::random_bytes::<32>();
        meshd_certs::write_secret_file(&path, hex::encode(seed).as_bytes())?;
    }
    load_key(&path)
}

/// Loads an existing audit key.
///
/// # Errors
/// [`AuditKeyError`].
pub fn load_key(path: &Path) -> Result<SigningKey, AuditKeyError> {
    let text = meshd_certs::read_secret_file(path)?;
    let seed: [u8; 32] = std::str::from_utf8(&text)
        .ok()
        .and_then(|t| hex::decode(t.trim()).ok())
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| AuditKeyError::Corrupt(path.display().to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// JSON with every object's keys sorted (the canonical form that is hashed).
pub fn canonical(v: &Value) -> String {
    let mut out = Vec::with_capacity(128);
    write_canonical(&mut out, v);
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// Writes `v` compactly with every object's keys in byte order, straight into `out`:
/// the audit writer hashes an entry per message, and building a sorted copy of the tree
/// first was a fifth of the broker's CPU per DM.
fn write_canonical(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Object(m) => {
            let mut fields: Vec<(&String, &Value)> = m.iter().collect();
            fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in fields.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_leaf(out, k);
                out.push(b':');
                write_canonical(out, v);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(out, v);
            }
            out.push(b']');
        }
        leaf => write_leaf(out, leaf),
    }
}

/// A string, number, boolean or null exactly as serde_json writes it.
fn write_leaf<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    // Writing a plain value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, v);
}

/// The hash of an entry: over the canonical JSON of every field but `hash` and `sig`.
pub fn entry_hash(r: &AuditRow) -> String {
    let payload: Value =
        serde_json::from_str(&r.payload).unwrap_or(Value::String(r.payload.clone()));
    let mut payload_json = Vec::with_capacity(r.payload.len());
    write_canonical(&mut payload_json, &payload);
    hash_with_payload(r, &payload_json)
}

/// [`entry_hash`] of a row whose `payload` the writer has just made canonical (so
/// parsing it back, which yields the same bytes, is skipped).
fn entry_hash_fresh(r: &AuditRow) -> String {
    hash_with_payload(r, r.payload.as_bytes())
}

/// SHA-256 of `{"actor",…,"seq"}` in sorted-key order with `payload` spliced in.
fn hash_with_payload(r: &AuditRow, payload: &[u8]) -> String {
    let mut out = Vec::with_capacity(256 + payload.len());
    out.extend_from_slice(b"{\"actor\":");
    write_leaf(&mut out, &r.actor);
    out.extend_from_slice(b",\"actorMemberId\":");
    write_leaf(&mut out, &r.actor_member_id);
    out.extend_from_slice(b",\"createdAt\":");
    write_leaf(&mut out, &r.created_at);
    out.extend_from_slice(b",\"eventType\":");
    write_leaf(&mut out, &r.event_type);
    out.extend_from_slice(b",\"mesh\":");
    write_leaf(&mut out, &r.mesh_id);
    out.extend_from_slice(b",\"payload\":");
    out.extend_from_slice(payload);
    out.extend_from_slice(b",\"prevHash\":");
    write_leaf(&mut out, &r.prev_hash);
    out.extend_from_slice(b",\"seq\":");
    write_leaf(&mut out, &r.seq);
    out.push(b'}');
    hex::encode(Sha256::digest(&out))
}

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verified {
    /// Every entry checks out.
    pub valid: bool,
    /// Entries read.
    pub entries: usize,
    /// The first entry that does not (its `seq`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broken_at: Option<i64>,
    /// What is wrong with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Verifies a mesh's chain: order, links, hashes and signatures.
pub fn verify_rows(rows: &[AuditRow], key: &VerifyingKey) -> Verified {
    // Entries before the first kept were pruned by retention, which the chain records
    // (`audit_pruned` with `before`): verification starts at the first entry kept. A
    // hole no such entry accounts for is a broken chain.
    let first = rows.first().map_or(1, |r| r.seq);
    if first != 1 {
        let accounted = rows.iter().any(|r| {
            r.event_type == "audit_pruned"
                && serde_json::from_str::<serde_json::Value>(&r.payload)
                    .ok()
                    .and_then(|p| p["before"].as_i64())
                    .is_some_and(|before| before >= first)
        });
        if !accounted {
            return Verified {
                valid: false,
                entries: rows.len(),
                broken_at: Some(first),
                reason: Some(format!(
                    "entries before {first} are missing (no audit_pruned entry accounts for them)"
                )),
            };
        }
    }
    let mut prev = rows
        .first()
        .filter(|_| first != 1)
        .map_or_else(|| GENESIS.to_owned(), |r| r.prev_hash.clone());
    for (i, r) in rows.iter().enumerate() {
        let expected_seq = i64::try_from(i).unwrap_or(i64::MAX) + first;
        let reason = if r.seq != expected_seq {
            Some(format!("entry {expected_seq} is missing"))
        } else if r.prev_hash != prev {
            Some("does not link to the previous entry".to_owned())
        } else if entry_hash(r) != r.hash {
            Some("its content does not match its hash".to_owned())
        } else if r.sig.is_empty() {
            // Covered by a later entry's signature, if the chain ends signed (below).
            (i + 1 == rows.len()).then(|| "the newest entry is not signed".to_owned())
        } else {
            let sig_ok = hex::decode(&r.sig)
                .ok()
                .and_then(|b| <[u8; 64]>::try_from(b).ok())
                .zip(hex::decode(&r.hash).ok())
                .is_some_and(|(sig, hash)| {
                    key.verify(&hash, &ed25519_dalek::Signature::from_bytes(&sig))
                        .is_ok()
                });
            (!sig_ok).then(|| "its signature is not the broker's".to_owned())
        };
        if let Some(reason) = reason {
            return Verified {
                valid: false,
                entries: rows.len(),
                broken_at: Some(r.seq),
                reason: Some(reason),
            };
        }
        prev.clone_from(&r.hash);
    }
    Verified {
        valid: true,
        entries: rows.len(),
        broken_at: None,
        reason: None,
    }
}

/// Entries waiting for the audit writer. When full, new entries are not queued: they
/// are counted, and the writer appends an `audit_gap` entry with the count to each
/// affected mesh's chain, so the log itself says that entries are missing (the sessions
/// producing them are never slowed down by the audit).
const QUEUE: usize = 16_384;
/// Entries appended per transaction.
const BATCH: usize = 512;

/// One entry to append.
#[derive(Debug)]
struct Pending {
    mesh_id: String,
    event_type: &'static str,
    actor_member_id: Option<String>,
    actor: String,
    payload: Value,
    at: i64,
}

/// The daemon's audit writer: a bounded queue and one task that chains, signs and
/// stores entries in batches (so appends of a mesh are serialized by construction).
#[derive(Debug)]
pub(crate) struct Audit {
    key: SigningKey,
    /// Sees each entry as it is recorded (the live dashboards' timeline).
    tap: std::sync::OnceLock<Tap>,
    tx: Mutex<Option<tokio::sync::mpsc::Sender<Pending>>>,
    /// Entries not queued, per mesh, since the writer last recorded a gap.
    dropped: Arc<Mutex<HashMap<String, u64>>>,
    tasks: TaskTracker,
}

/// What a tap is called with: mesh id, event type, actor.
type TapFn = dyn Fn(&str, &'static str, &str) + Send + Sync;

/// Sees `(mesh id, event type, actor)` of each recorded entry.
pub(crate) struct Tap(pub(crate) Box<TapFn>);

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tap")
    }
}

impl Audit {
    /// Sets what sees each entry (once).
    pub(crate) fn set_tap(&self, tap: Tap) {
        let _ = self.tap.set(tap);
    }

    /// Starts the writer: chains' tails are read from `db`, entries are written through
    /// the store writer (`store`), in the batch transactions of the messages.
    pub(crate) fn new(key: SigningKey, db: Db, store: crate::delivery::router::Handle) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        let dropped: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let tasks = TaskTracker::new();
        tasks.spawn(writer(key.clone(), db, store, rx, dropped.clone()));
        Self {
            key,
            tap: std::sync::OnceLock::new(),
            tx: Mutex::new(Some(tx)),
            dropped,
            tasks,
        }
    }

    pub(crate) fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Queues an entry (never waits; see [`QUEUE`] for the policy when full).
    pub(crate) fn record(
        &self,
        mesh_id: &str,
        event_type: &'static str,
        actor_member_id: Option<String>,
        actor: &str,
        payload: Value,
    ) {
        if let Some(tap) = self.tap.get() {
            (tap.0)(mesh_id, event_type, actor);
        }
        let entry = Pending {
            mesh_id: mesh_id.to_owned(),
            event_type,
            actor_member_id,
            actor: actor.to_owned(),
            payload,
            at: crate::time::now_ms(),
        };
        let queued = lock(&self.tx)
            .as_ref()
            .is_some_and(|tx| tx.try_send(entry).is_ok());
        if !queued {
            *lock(&self.dropped).entry(mesh_id.to_owned()).or_default() += 1;
        }
    }

    /// Stops taking entries and waits until the queued ones are stored (shutdown).
    pub(crate) async fn flush(&self) {
        lock(&self.tx).take();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

async fn writer(
    key: SigningKey,
    db: Db,
    store: crate::delivery::router::Handle,
    mut rx: tokio::sync::mpsc::Receiver<Pending>,
    dropped: Arc<Mutex<HashMap<String, u64>>>,
) {
    let mut tails: HashMap<String, (i64, String)> = HashMap::new();
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        // Gaps first: they are older than what is queued now.
        let gaps: Vec<(String, u64)> = lock(&dropped).drain().collect();
        let mut entries: Vec<Pending> = gaps
            .into_iter()
            .map(|(mesh_id, n)| Pending {
                mesh_id,
                event_type: "audit_gap",
                actor_member_id: None,
                actor: "system".into(),
                payload: serde_json::json!({"dropped": n}),
                at: crate::time::now_ms(),
            })
            .collect();
        entries.append(&mut batch);
        let mut rows = Vec::with_capacity(entries.len());
        for e in entries {
            let tail = match tails.get(&e.mesh_id) {
                Some(t) => t.clone(),
                None => match db.audit_tail(&e.mesh_id).await {
                    Ok(t) => t.unwrap_or((0, GENESIS.to_owned())),
                    Err(err) => {
                        warn!(cause = %err, "audit: reading a chain's tail; entry not written");
                        *lock(&dropped).entry(e.mesh_id).or_default() += 1;
                        continue;
                    }
                },
            };
            let mut row = AuditRow {
                mesh_id: e.mesh_id,
                seq: tail.0 + 1,
                event_type: e.event_type.to_owned(),
                actor_member_id: e.actor_member_id,
                actor: e.actor,
                payload: canonical(&e.payload),
                prev_hash: tail.1,
                hash: String::new(),
                sig: String::new(),
                created_at: e.at,
            };
            row.hash = entry_hash_fresh(&row);
            tails.insert(row.mesh_id.clone(), (row.seq, row.hash.clone()));
            rows.push(row);
        }
        // Each mesh's newest entry of the batch is signed: its hash covers every earlier
        // entry through the chain, so one signature per batch authenticates them all at
        // a fraction of the cost (signing every entry could not keep up with messages).
        let mut signed: std::collections::HashSet<String> = std::collections::HashSet::new();
        for row in rows.iter_mut().rev() {
            if signed.insert(row.mesh_id.clone()) {
                let hash_bytes = hex::decode(&row.hash).unwrap_or_default();
                row.sig = hex::encode(key.sign(&hash_bytes).to_bytes());
            }
        }
        if rows.is_empty() {
            continue;
        }
        let mut per_mesh: HashMap<String, u64> = HashMap::new();
        for row in &rows {
            *per_mesh.entry(row.mesh_id.clone()).or_default() += 1;
        }
        let n = rows.len();
        // Waiting for the commit keeps one batch in flight: the next batch's tails are
        // only trusted once this one is stored.
        if let Err(e) = store
            .call(|reply| crate::store::writer::WriteOp::Audit { rows, reply })
            .await
        {
            // The chains' tails are re-read from the store for the next batch, and the
            // lost entries are counted into the next `audit_gap`, so the loss is on record.
            warn!(cause = %e, entries = n, "audit entries not written");
            tails.clear();
            let mut d = lock(&dropped);
            for (mesh, k) in per_mesh {
                *d.entry(mesh).or_default() += k;
            }
        }
    }
}

/// The SHA-256 of a value, hex (state values are audited by digest, not content).
pub fn digest(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first implementation (a sorted copy of the tree, serialized): the chains
    /// already on disk were hashed with it, so the streaming writer must match it.
    fn reference_canonical(v: &Value) -> String {
        fn sort(v: &Value) -> Value {
            match v {
                Value::Object(m) => {
                    let sorted: std::collections::BTreeMap<&String, Value> =
                        m.iter().map(|(k, v)| (k, sort(v))).collect();
                    Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
                }
                Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
                other => other.clone(),
            }
        }
        sort(v).to_string()
    }

    fn reference_hash(r: &AuditRow) -> String {
        let payload: Value =
            serde_json::from_str(&r.payload).unwrap_or(Value::String(r.payload.clone()));
        let body = serde_json::json!({
            "mesh": r.mesh_id, "seq": r.seq, "eventType": r.event_type,
            "actorMemberId": r.actor_member_id, "actor": r.actor, "payload": payload,
            "prevHash": r.prev_hash, "createdAt": r.created_at,
        });
        hex::encode(Sha256::digest(reference_canonical(&body).as_bytes()))
    }

    #[test]
    fn streaming_canonical_form_matches_the_reference() {
        let values = [
            serde_json::json!({"z": [3, {"b": null, "a": "\"q\u{1}é"}], "a": -1.5e300, "M": true, "": {}}),
            serde_json::json!([]),
            serde_json::json!("plain \\ text\n"),
            serde_json::json!({"messageId": "x", "targetSpec": "*", "priority": "now", "n": u64::MAX}),
        ];
        for v in &values {
            assert_eq!(canonical(v), reference_canonical(v));
        }
        for (payload, member) in [
            (canonical(&values[0]), Some("m1".to_owned())),
            ("not json {".to_owned(), None),
            (canonical(&values[3]), Some("é\"".to_owned())),
        ] {
            let r = AuditRow {
                mesh_id: "mesh\u{7f}".into(),
                seq: 42,
                event_type: "message_sent".into(),
                actor_member_id: member,
                actor: "ann \"a\"".into(),
                payload,
                prev_hash: GENESIS.into(),
                hash: String::new(),
                sig: String::new(),
                created_at: 1_700_000_000_123,
            };
            assert_eq!(entry_hash(&r), reference_hash(&r));
            if serde_json::from_str::<Value>(&r.payload).is_ok() {
                assert_eq!(entry_hash_fresh(&r), reference_hash(&r));
            }
        }
    }

    fn chain(key: &SigningKey, n: i64, sign_every: bool) -> Vec<AuditRow> {
        let mut prev = GENESIS.to_owned();
        let mut rows = Vec::new();
        for seq in 1..=n {
            let mut r = AuditRow {
                mesh_id: "m".into(),
                seq,
                event_type: "state_set".into(),
                actor_member_id: None,
                actor: "system".into(),
                payload: canonical(&serde_json::json!({"b": 1, "a": seq})),
                prev_hash: prev.clone(),
                hash: String::new(),
                sig: String::new(),
                created_at: seq,
            };
            r.hash = entry_hash(&r);
            if sign_every || seq == n {
                r.sig = hex::encode(
                    key.sign(&hex::decode(&r.hash).unwrap_or_default())
                        .to_bytes(),
                );
            }
            prev.clone_from(&r.hash);
            rows.push(r);
        }
        rows
    }

    #[test]
    fn chains_verify_and_tampering_is_named() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let vk = key.verifying_key();
        assert!(verify_rows(&chain(&key, 5, false), &vk).valid);
        assert!(verify_rows(&chain(&key, 5, true), &vk).valid);
        // Edited content.
        let mut rows = chain(&key, 5, false);
        rows[2].payload = r#"{"a":99,"b":1}"#.into();
        assert_eq!(verify_rows(&rows, &vk).broken_at, Some(3));
        // A chain rebuilt by someone without the key.
        let forger = SigningKey::from_bytes(&[8; 32]);
        assert_eq!(
            verify_rows(&chain(&forger, 5, false), &vk).broken_at,
            Some(5)
        );
        // An unsigned newest entry (a rebuilt tail), a missing entry.
        let mut rows = chain(&key, 5, false);
        rows[4].sig.clear();
        assert_eq!(verify_rows(&rows, &vk).broken_at, Some(5));
        let mut rows = chain(&key, 5, false);
        rows.remove(1);
        assert_eq!(verify_rows(&rows, &vk).broken_at, Some(3));
        // Canonical JSON sorts keys at every depth.
        assert_eq!(
            canonical(&serde_json::json!({"b": {"d": 1, "c": 2}, "a": 0})),
            r#"{"a":0,"b":{"c":2,"d":1}}"#
        );
    }
}
