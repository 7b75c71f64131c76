//! Quotas: what one member, and one mesh, may keep stored — of every kind, counting what
//! is really on disk (forgotten notes, completed tasks and closed schedules count until
//! they are purged), with a clear `quota_exceeded` refusal and `/metrics` gauges.
//!
//! Usage is counted in memory ([`UsageBook`]): a write is admitted against the counts
//! (and counted) before it is stored, and the counts are recounted from the store at
//! start and every `quotas.recount_interval` (deliveries drop message bodies, purges
//! drop rows, replacements shrink what they replaced). Checking a quota therefore never
//! reads the store: an earlier design summed the stored bytes per write, which made each
//! refused write cost as much as everything its member had stored. Between recounts the
//! counts err on the safe side (a replaced value counts twice, a failed write still
//! counts), except for writes admitted while a recount is read (a few, at most).

use std::collections::HashMap;
use std::sync::Mutex;

use meshd_config::defaults;

use crate::hub::lock;
pub(crate) use crate::store::usage::{Kind, MemberUsage, Usage};
use crate::store::{Db, StoreError};

/// The caps of one kind: (per member, per mesh), rows and bytes (`i64::MAX`: none).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caps {
    pub(crate) member: Usage,
    pub(crate) mesh: Usage,
}

/// The caps of `kind` under `config`.
pub(crate) fn caps(kind: Kind, config: &meshd_config::Config) -> Caps {
    let q = &config.quotas;
    let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
    let none = i64::MAX;
    let (member, mesh) = match kind {
        Kind::Messages => (
            Usage::new(n(q.messages_per_member), n(q.queued_bytes_per_member)),
            Usage::new(n(q.messages_per_mesh), n(q.queued_bytes_per_mesh)),
        ),
        Kind::Memory => (
            Usage::new(
                n(defaults::MEMORIES_PER_MEMBER),
                n(q.memory_bytes_per_member),
            ),
            Usage::new(n(defaults::MEMORIES_PER_MESH), n(q.memory_bytes_per_mesh)),
        ),
        Kind::Tasks => (
            Usage::new(n(defaults::TASKS_PER_MEMBER), n(q.task_bytes_per_member)),
            Usage::new(n(defaults::TASKS_PER_MESH), n(q.task_bytes_per_mesh)),
        ),
        Kind::Skills => (
            Usage::new(n(defaults::SKILLS_PER_MEMBER), n(q.skill_bytes_per_member)),
            Usage::new(
                crate::features::skills::store::MAX_SKILLS_PER_MESH,
                n(q.skill_bytes_per_mesh),
            ),
        ),
        Kind::Files => (
            Usage::new(n(defaults::FILES_PER_MEMBER), n(q.file_bytes_per_member)),
            Usage::new(
                n(defaults::FILES_PER_MESH),
                n(config.limits.max_file_bytes_per_mesh),
            ),
        ),
        Kind::Schedules => (
            Usage::new(n(defaults::SCHEDULES_PER_MEMBER), none),
            Usage::new(none, none),
        ),
        Kind::Streams => (
            Usage::new(n(defaults::STREAMS_PER_MEMBER), none),
            Usage::new(crate::features::streams::store::MAX_STREAMS_PER_MESH, none),
        ),
        Kind::Webhooks => (
            Usage::new(n(defaults::WEBHOOKS_PER_MEMBER), none),
            Usage::new(
                crate::features::webhooks::store::MAX_WEBHOOKS_PER_MESH,
                none,
            ),
        ),
        Kind::State => (
            Usage::new(none, n(q.state_bytes_per_member)),
            Usage::new(none, n(config.limits.max_state_bytes_per_mesh)),
        ),
    };
    Caps { member, mesh }
}

/// A write refused by a quota (error code `quota_exceeded`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{whose} {kind} would exceed its quota of {limit} {unit}")]
pub(crate) struct QuotaExceeded {
    /// `this member's` or `this mesh's`.
    pub(crate) whose: &'static str,
    pub(crate) kind: &'static str,
    pub(crate) limit: i64,
    /// `entries` or `bytes`.
    pub(crate) unit: &'static str,
}

impl QuotaExceeded {
    /// The error code clients see.
    pub(crate) const CODE: &'static str = "quota_exceeded";
}

/// Whether `used + add` fits `caps` (member first, then mesh).
pub(crate) fn fits(
    kind: Kind,
    caps: Caps,
    member: Usage,
    mesh: Usage,
    add: Usage,
) -> Result<(), QuotaExceeded> {
    let over = |whose, used: Usage, cap: Usage| {
        let after = used.plus(add);
        if add.rows > 0 && after.rows > cap.rows {
            Some(QuotaExceeded {
                whose,
                kind: kind.as_str(),
                limit: cap.rows,
                unit: "entries",
            })
        } else if add.bytes > 0 && after.bytes > cap.bytes {
            Some(QuotaExceeded {
                whose,
                kind: kind.as_str(),
                limit: cap.bytes,
                unit: "bytes",
            })
        } else {
            None
        }
    };
    match over("this member's", member, caps.member)
        .or_else(|| over("this mesh's", mesh, caps.mesh))
    {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Admits (and counts) `add` more of `kind` for `member`, unless it would exceed the
/// member's or the mesh's quota.
pub(crate) fn check(
    ctx: &crate::Ctx,
    kind: Kind,
    mesh_id: &str,
    member: &str,
    add: Usage,
) -> Result<(), QuotaExceeded> {
    ctx.usage_book
        .admit(kind, caps(kind, &ctx.config), mesh_id, member, add)
}

/// Recounts one member's `kind` from the store after it freed room (a deletion): what
/// it deleted is available again at once, not at the next recount. Costs one query over
/// that member's rows (sizes from headers); only deletions that removed something ask.
pub(crate) async fn recount_member(ctx: &crate::Ctx, kind: Kind, mesh_id: &str, member: &str) {
    match ctx.db.usage_of(kind, mesh_id, member).await {
        Ok(u) => ctx.usage_book.set_member(kind, mesh_id, member, u),
        Err(e) => tracing::warn!(cause = %e, "recounting a member's usage"),
    }
}

/// What each member and mesh holds, by kind (see the module docs). Keys are meshes and
/// members that wrote, so the book is as large as the membership.
#[derive(Debug, Default)]
pub(crate) struct UsageBook {
    inner: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    members: HashMap<(Kind, String, String), Usage>,
    meshes: HashMap<(Kind, String), Usage>,
}

impl UsageBook {
    /// A book counted from the store.
    pub(crate) async fn load(db: &Db) -> Result<Self, StoreError> {
        let book = Self::default();
        for kind in Kind::ALL {
            book.reload(kind, db.usage_by_member(kind, None).await?);
        }
        Ok(book)
    }

    /// Counts `add` of `kind` from `member`, unless it exceeds a quota.
    pub(crate) fn admit(
        &self,
        kind: Kind,
        caps: Caps,
        mesh_id: &str,
        member: &str,
        add: Usage,
    ) -> Result<(), QuotaExceeded> {
        let mut c = lock(&self.inner);
        let key = (kind, mesh_id.to_owned(), member.to_owned());
        let m = c.members.get(&key).copied().unwrap_or_default();
        let mesh_key = (kind, mesh_id.to_owned());
        let all = c.meshes.get(&mesh_key).copied().unwrap_or_default();
        fits(kind, caps, m, all, add)?;
        c.members.insert(key, m.plus(add));
        c.meshes.insert(mesh_key, all.plus(add));
        Ok(())
    }

    /// Counts one message of `bytes` from `member`, unless it exceeds a quota.
    pub(crate) fn admit_message(
        &self,
        caps: Caps,
        mesh_id: &str,
        member: &str,
        bytes: usize,
    ) -> Result<(), QuotaExceeded> {
        let add = Usage::new(1, i64::try_from(bytes).unwrap_or(i64::MAX));
        self.admit(Kind::Messages, caps, mesh_id, member, add)
    }

    /// Replaces one member's count of `kind` (a recount after it deleted something);
    /// the mesh's total follows.
    pub(crate) fn set_member(&self, kind: Kind, mesh_id: &str, member: &str, now: Usage) {
        let mut c = lock(&self.inner);
        let before = c
            .members
            .insert((kind, mesh_id.to_owned(), member.to_owned()), now)
            .unwrap_or_default();
        let mesh = c.meshes.entry((kind, mesh_id.to_owned())).or_default();
        *mesh = Usage::new(
            (mesh.rows - before.rows + now.rows).max(0),
            (mesh.bytes - before.bytes + now.bytes).max(0),
        );
    }

    /// Replaces the counts of `kind` with a recount from the store.
    pub(crate) fn reload(&self, kind: Kind, rows: Vec<MemberUsage>) {
        let mut members = HashMap::new();
        let mut meshes: HashMap<(Kind, String), Usage> = HashMap::new();
        for r in rows {
            let u = Usage::new(r.rows, r.bytes);
            let mesh = meshes.entry((kind, r.mesh_id.clone())).or_default();
            *mesh = mesh.plus(u);
            members.insert((kind, r.mesh_id, r.member), u);
        }
        let mut c = lock(&self.inner);
        c.members.retain(|k, _| k.0 != kind);
        c.meshes.retain(|k, _| k.0 != kind);
        c.members.extend(members);
        c.meshes.extend(meshes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(m: (i64, i64), mesh: (i64, i64)) -> Caps {
        Caps {
            member: Usage::new(m.0, m.1),
            mesh: Usage::new(mesh.0, mesh.1),
        }
    }

    #[test]
    fn member_then_mesh_rows_then_bytes() {
        let c = caps((2, 100), (3, 150));
        let one = Usage::new(1, 10);
        assert!(fits(Kind::Memory, c, Usage::new(1, 10), Usage::new(1, 10), one).is_ok());
        let e = fits(Kind::Memory, c, Usage::new(2, 10), Usage::new(2, 10), one).unwrap_err();
        assert_eq!((e.whose, e.unit, e.limit), ("this member's", "entries", 2));
        let e = fits(Kind::Memory, c, Usage::new(1, 95), Usage::new(1, 95), one).unwrap_err();
        assert_eq!((e.whose, e.unit), ("this member's", "bytes"));
        let e = fits(Kind::Memory, c, Usage::new(0, 0), Usage::new(3, 10), one).unwrap_err();
        assert_eq!((e.whose, e.unit), ("this mesh's", "entries"));
        // A write that adds no rows (an update) is checked on bytes only.
        assert!(
            fits(
                Kind::Tasks,
                c,
                Usage::new(5, 0),
                Usage::new(5, 0),
                Usage::new(0, 50)
            )
            .is_ok()
        );
        assert_eq!(
            e.to_string(),
            "this mesh's memory would exceed its quota of 3 entries"
        );
    }

    #[test]
    fn counts_admit_until_the_quota_and_reload() {
        let u = UsageBook::default();
        let c = caps((3, 1000), (5, 10_000));
        for _ in 0..3 {
            assert!(u.admit_message(c, "m", "a", 10).is_ok());
        }
        assert!(u.admit_message(c, "m", "a", 10).is_err());
        assert!(u.admit_message(c, "m", "b", 10).is_ok());
        assert!(u.admit_message(c, "m", "b", 10).is_ok());
        // The mesh is at 5.
        assert!(u.admit_message(c, "m", "c", 10).is_err());
        // Kinds are counted apart.
        let note = Usage::new(1, 999);
        assert!(u.admit(Kind::Memory, c, "m", "a", note).is_ok());
        assert!(
            u.admit(Kind::Memory, c, "m", "a", Usage::new(0, 2))
                .is_err()
        );
        // A recount (deliveries and sweeps happened) frees room, of its kind only.
        u.reload(
            Kind::Messages,
            vec![MemberUsage {
                mesh_id: "m".into(),
                member: "a".into(),
                rows: 1,
                bytes: 0,
            }],
        );
        assert!(u.admit_message(c, "m", "a", 10).is_ok());
        assert!(u.admit_message(c, "m", "c", 10).is_ok());
        assert!(
            u.admit(Kind::Memory, c, "m", "a", Usage::new(0, 2))
                .is_err()
        );
    }
}

/// Each mesh's usage by kind, refreshed by [`refresh`] for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    /// (mesh slug, kind, usage).
    rows: Mutex<Vec<(String, Kind, Usage)>>,
}

impl Snapshot {
    /// The gauges, in the Prometheus text format.
    pub(crate) fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let rows = lock(&self.rows);
        let _ = writeln!(
            out,
            "# HELP meshd_mesh_stored_entries What each mesh keeps stored, by kind (refreshed every 30 s).\n\
             # TYPE meshd_mesh_stored_entries gauge"
        );
        for (mesh, kind, u) in rows.iter() {
            let _ = writeln!(
                out,
                "meshd_mesh_stored_entries{{mesh=\"{mesh}\",kind=\"{}\"}} {}",
                kind.as_str(),
                u.rows
            );
        }
        let _ = writeln!(
            out,
            "# HELP meshd_mesh_stored_bytes Bytes each mesh keeps stored, by kind (messages: undelivered bodies).\n\
             # TYPE meshd_mesh_stored_bytes gauge"
        );
        for (mesh, kind, u) in rows.iter() {
            let _ = writeln!(
                out,
                "meshd_mesh_stored_bytes{{mesh=\"{mesh}\",kind=\"{}\"}} {}",
                kind.as_str(),
                u.bytes
            );
        }
    }
}

/// Recounts messages for the quota and every kind for the gauges.
pub(crate) async fn refresh(ctx: &crate::Ctx) -> Result<(), StoreError> {
    let slugs: HashMap<String, String> = ctx
        .db
        .meshes()
        .await?
        .into_iter()
        .map(|m| (m.id, m.slug))
        .collect();
    let mut rows = Vec::new();
    for kind in Kind::ALL {
        let by_member = ctx.db.usage_by_member(kind, None).await?;
        let mut per_mesh: HashMap<String, Usage> = HashMap::new();
        for r in &by_member {
            let u = per_mesh.entry(r.mesh_id.clone()).or_default();
            *u = u.plus(Usage::new(r.rows, r.bytes));
        }
        ctx.usage_book.reload(kind, by_member);
        for (mesh_id, u) in per_mesh {
            let slug = slugs.get(&mesh_id).cloned().unwrap_or(mesh_id);
            rows.push((slug, kind, u));
        }
    }
    rows.sort_by(|a, b| (&a.0, a.1.as_str()).cmp(&(&b.0, b.1.as_str())));
    *lock(&ctx.usage.rows) = rows;
    Ok(())
}

/// Removes what outlived its retention: forgotten notes, closed schedules and deleted
/// files' rows (after `TOMBSTONE_RETENTION`), completed tasks (after
/// `quotas.done_task_retention`), downloads beyond the newest per file, session keys
/// beyond the newest per member, inactive webhooks, and audit entries beyond
/// `quotas.audit_entries_per_mesh` or older than `quotas.audit_retention` (recorded in
/// the chain as `audit_pruned`).
pub(crate) async fn purge(ctx: &crate::Ctx, now: i64) -> Result<(), StoreError> {
    let ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let tomb = now.saturating_sub(ms(defaults::TOMBSTONE_RETENTION));
    let db = &ctx.db;
    let q = &ctx.config.quotas;
    let removed = [
        ("forgotten notes", db.purge_forgotten(tomb).await?),
        ("closed schedules", db.purge_closed_schedules(tomb).await?),
        ("deleted files", db.purge_deleted_files(tomb).await?),
        (
            "completed tasks",
            db.purge_done_tasks(now.saturating_sub(ms(q.done_task_retention)))
                .await?,
        ),
        (
            "downloads",
            db.prune_file_accesses(i64::try_from(defaults::ACCESSES_PER_FILE).unwrap_or(i64::MAX))
                .await?,
        ),
        ("inactive webhooks", db.purge_inactive_webhooks().await?),
    ];
    for (what, n) in removed {
        if n > 0 {
            tracing::info!(removed = n, "purged {what}");
        }
    }
    let keys = db
        .prune_session_keys(i64::try_from(defaults::SESSION_KEYS_PER_MEMBER).unwrap_or(i64::MAX))
        .await?;
    for (mesh_id, key) in &keys {
        if let Some(hub) = ctx.hub.loaded(mesh_id) {
            hub.forget_session_key(key);
        }
    }
    let prunable = db
        .audit_prunable(
            now.saturating_sub(ms(q.audit_retention)),
            i64::try_from(q.audit_entries_per_mesh).unwrap_or(i64::MAX),
        )
        .await?;
    if !prunable.is_empty() {
        // The chain says what goes before it goes: verification then starts at the
        // first entry kept, and finds no hole it cannot account for.
        for (mesh_id, first_kept, n) in &prunable {
            ctx.audit.record(
                mesh_id,
                "audit_pruned",
                None,
                "system",
                serde_json::json!({"before": first_kept, "removed": n}),
            );
        }
        ctx.audit.flush().await;
        for (mesh_id, first_kept, _) in &prunable {
            db.delete_audit_before(mesh_id, *first_kept).await?;
        }
    }
    Ok(())
}
