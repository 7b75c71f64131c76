//! Moderation (HEAD §4): `kick`, `disconnect`, `ban`, `unban`, `list_bans`, meshd's
//! `member_role` (admins promote and demote; the mesh always keeps one admin), and what a
//! revocation does to a live mesh (shared with `meshd member revoke`, which another
//! process writes and [`watch_revocations`] picks up).
//!
//! Unlike the reference, a kicked, disconnected or banned connection leaves through the
//! normal teardown: `peer_left` is announced, its MCP servers and subscriptions go, and
//! the mesh's connection count drops. Admins (member role `admin`; meshd has no mesh
//! owner account) may kick, disconnect, ban and unban; anyone may list bans, as in the
//! reference. Only members hosted on this broker can be banned here: a member's home
//! broker is the authority on its revocation and announces it to the others.

pub mod store;

use meshd_protocol::broker::BrokerFrame;
use meshd_protocol::moderation::{Ban, Reply, Request, Selection};
use meshd_protocol::time::iso8601_ms;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::ws::Utf8Bytes;
use tracing::info;

use crate::Ctx;
use crate::features::mcp::engine as mcp;
use crate::hub::{ConnId, Disconnect, Peer};
use crate::session::*;
use crate::store::MemberRow;

/// Shortest key prefix a target may be (a shorter one names members by accident).
const MIN_PREFIX: usize = 8;

/// Whether `target` names `pubkey`: the whole key, or a prefix of [`MIN_PREFIX`]+ hex
/// digits.
fn names_key(target: &str, pubkey: &str) -> bool {
    let t = target.to_ascii_lowercase();
    pubkey == t
        || (t.len() >= MIN_PREFIX
            && t.bytes().all(|b| b.is_ascii_hexdigit())
            && pubkey.starts_with(&t))
}

/// Whether a `kick`/`disconnect` selection picks `p` (never the caller's own connection
/// for `stale` and `all`).
fn selects(selection: &Selection, p: &Peer, caller: ConnId, now: i64) -> bool {
    match selection {
        Selection::All => p.shared.conn_id != caller,
        Selection::Stale(ms) => {
            p.shared.conn_id != caller
                && p.shared.last_active.load(Ordering::Relaxed) < now.saturating_sub(*ms)
        }
        Selection::Target(t) => {
            p.display_name == *t
                || names_key(t, &p.member_pubkey)
                || p.session_pubkey.as_deref() == Some(t.as_str())
        }
    }
}

/// Applies a revocation to the running broker: the member's MCP servers go, its live
/// connections close with 4002 (through their normal teardown), and peer brokers hear
/// of it if the member is hosted here.
pub(crate) async fn apply_revocation(ctx: &Arc<Ctx>, m: &MemberRow, now: i64) {
    apply_revocation_read_at(ctx, m, now, u64::MAX).await;
}

/// [`apply_revocation`] of a row read when the hub's member count was `seen`: nothing is
/// done (and `false` returned) if the member changed since — an unban or a refresh that
/// the stale row must not undo.
async fn apply_revocation_read_at(ctx: &Arc<Ctx>, m: &MemberRow, now: i64, seen: u64) -> bool {
    if let Some(mesh) = ctx.hub.loaded(&m.mesh_id)
        && mesh.changed_since(&m.pubkey, seen)
    {
        return false;
    }
    for (name, hosted_by, persistent, removal) in ctx.mcp.drop_member(&m.mesh_id, &m.id) {
        mcp::publish(ctx, &m.mesh_id, vec![removal]);
        if persistent {
            ctx.mcp.persist(mcp::StoreOp::Delete {
                mesh_id: m.mesh_id.clone(),
                name: name.clone(),
            });
        }
        if let Some(mesh) = ctx.hub.loaded_or_loading(&ctx.db, &m.mesh_id).await {
            let mut data = serde_json::Map::new();
            data.insert("serverName".into(), name.into());
            data.insert("hostedBy".into(), hosted_by.into());
            let frame = crate::delivery::system_push(&m.mesh_id, "mcp_unregistered", data, now);
            mesh.announce(&frame, 0, None);
        }
    }
    // Its watches go: nobody could receive what they find.
    ctx.watches.remove_member(&m.mesh_id, &m.id);
    if let Err(e) = ctx.db.delete_member_watches(&m.mesh_id, &m.id).await {
        tracing::warn!(cause = %e, "removing a revoked member's watches");
    }
    if let Some(mesh) = ctx.hub.loaded_or_loading(&ctx.db, &m.mesh_id).await {
        let Some(closed) = mesh.revoke_unless_changed(&m.pubkey, seen) else {
            return false;
        };
        if m.home_broker.is_none()
            && let Some(fed) = &ctx.fed
        {
            fed.member_changed(&mesh, &m.pubkey);
        }
        if closed > 0 {
            info!(mesh.id = %m.mesh_id, member.id = %m.id, closed, "member revoked; connections closed");
        }
    }
    true
}

/// How often the daemon looks for revocations another process wrote.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// Each look re-reads revocations this far back (ms): a row committed late (another
/// process's clock, a slow transaction) with an older `revoked_at` is still seen.
const WATCH_OVERLAP_MS: i64 = 5_000;
/// The watch's progress row is rewritten at least this often (ms), so a command can
/// tell a live daemon from a stopped one.
const BEAT_EVERY_MS: i64 = 1_000;
/// A daemon whose progress row is older than this (ms) is taken for stopped.
const BEAT_STALE_MS: i64 = 4 * BEAT_EVERY_MS;
/// Longest a command waits for the live daemon to apply its revocation.
const APPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Applies revocations that `meshd member revoke` (another process) wrote to the
/// store. Hellos are checked against the hub's member cache, not the store, so this
/// watch is what makes such a revocation bite; `revocations_applied` tells the command
/// when it has (see [`wait_applied`]).
///
/// A revocation is applied in full once; while it stays inside the overlap window the
/// hub's flag is set again on each pass, which undoes a hello that refreshed the
/// member from a read taken just before the revocation committed. Neither is done to a
/// member the hub changed after the pass's read began (an unban must not be undone by a
/// stale row): the next pass reads it again.
pub(crate) async fn watch_revocations(ctx: Arc<Ctx>, cancel: tokio_util::sync::CancellationToken) {
    let broker = ctx
        .config
        .federation
        .as_ref()
        .map_or_else(|| "local".to_owned(), |f| f.broker.clone());
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watermark = crate::time::now_ms() - 60_000;
    let mut applied: std::collections::HashMap<(String, String), i64> =
        std::collections::HashMap::new();
    let mut last_beat: Option<i64> = None;
    let mut applied_through = watermark;
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        // Taken before the read: every revocation committed before it is in the rows,
        // and a member that changes in the hub after it is left to the next pass.
        let gens: std::collections::HashMap<String, u64> = ctx
            .hub
            .all()
            .iter()
            .map(|m| (m.row.id.clone(), m.member_gen()))
            .collect();
        let now = crate::time::now_ms();
        let rows = match ctx.db.revoked_since(watermark - WATCH_OVERLAP_MS).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(cause = %e, "revocation watch");
                continue;
            }
        };
        let mut fresh = false;
        let mut skipped = false;
        for m in rows {
            let at = m.revoked_at.unwrap_or(now);
            let key = (m.mesh_id.clone(), m.id.clone());
            let seen = gens.get(&m.mesh_id).copied().unwrap_or(0);
            if applied.get(&key) == Some(&at) {
                if let Some(mesh) = ctx.hub.loaded(&m.mesh_id) {
                    mesh.revoke_unless_changed(&m.pubkey, seen);
                }
                continue;
            }
            if !apply_revocation_read_at(&ctx, &m, now, seen).await {
                skipped = true;
                continue;
            }
            applied.insert(key, at);
            fresh = true;
            // Revocations of members hosted here are audited here (peer brokers audit
            // their own).
            if m.home_broker.is_none() {
                ctx.audit.record(
                    &m.mesh_id,
                    "member_revoked",
                    None,
                    "system",
                    serde_json::json!({"memberId": m.id, "pubkey": m.pubkey}),
                );
            }
        }
        watermark = now;
        applied.retain(|_, at| *at >= watermark - 60_000);
        // A skipped row is read again next pass; until then, nothing after it counts
        // as applied.
        if !skipped {
            applied_through = now;
        }
        if fresh || last_beat.is_none_or(|b| now.saturating_sub(b) >= BEAT_EVERY_MS) {
            match ctx
                .db
                .revocations_applied(&broker, applied_through, now)
                .await
            {
                Ok(()) => last_beat = Some(now),
                Err(e) => tracing::warn!(cause = %e, "recording the revocation watch"),
            }
        }
    }
}

/// Waits until every live daemon on this store has applied revocations committed up
/// to `committed` (ms, read after the commit), for at most [`APPLY_WAIT`]. Returns
/// whether they have (`true` too when no daemon is running).
///
/// # Errors
/// [`StoreError`](crate::store::StoreError).
pub(crate) async fn wait_applied(
    db: &crate::store::Db,
    committed: i64,
) -> Result<bool, crate::store::StoreError> {
    let deadline = crate::time::instant() + APPLY_WAIT;
    loop {
        let since = crate::time::now_ms() - BEAT_STALE_MS;
        match db.revocations_applied_through(since).await? {
            None => return Ok(true),
            Some(through) if through > committed => return Ok(true),
            Some(_) if crate::time::instant() >= deadline => return Ok(false),
            Some(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
}

/// Members named exactly (display name or key) by `target`, banned or live.
fn named<'a>(members: &'a [MemberRow], target: &str, banned: bool) -> Vec<&'a MemberRow> {
    let key = target.to_ascii_lowercase();
    members
        .iter()
        .filter(|m| {
            m.revoked_at.is_some() == banned && (m.display_name == target || m.pubkey == key)
        })
        .collect()
}

/// The one member of `hits` (`kind`: "member" or "banned member"), or the refusal: none
/// (`not_found`) or several (`invalid`, `hint` says what to give instead).
fn only<'a>(
    hits: &[&'a MemberRow],
    target: &str,
    kind: &str,
    hint: &str,
    req_id: &Option<String>,
) -> Result<&'a MemberRow, Option<Utf8Bytes>> {
    match hits {
        [m] => Ok(*m),
        [] => Err(error(
            "not_found",
            format!("no {kind} matches {target:?}"),
            req_id.clone(),
        )),
        many => Err(error(
            "invalid",
            format!("{} {kind}s match {target:?}; {hint}", many.len()),
            req_id.clone(),
        )),
    }
}

/// A member hosted by another broker is managed there (it announces the member): the
/// refusal saying where to `act`.
fn hosted_elsewhere(
    m: &MemberRow,
    act: &str,
    req_id: &Option<String>,
) -> Option<Option<Utf8Bytes>> {
    m.home_broker.as_ref().map(|home| {
        error(
            "forbidden",
            format!("{} is hosted by broker {home}; {act} there", m.display_name),
            req_id.clone(),
        )
    })
}

impl Session {
    /// `kick` / `disconnect` close connections at once (answered here); `ban`, `unban`
    /// and `list_bans` touch the store.
    pub(crate) fn on_moderation(
        &mut self,
        request: Request,
        req_id: Option<String>,
        now: i64,
    ) -> Option<Utf8Bytes> {
        let verb = match &request {
            Request::ListBans => return self.queue_list_bans(req_id),
            Request::Kick(_) => "kick",
            Request::Disconnect(_) => "disconnect",
            Request::Ban { .. } => "ban",
            Request::Unban { .. } => "unban",
            Request::SetRole { .. } => "change roles",
        };
        if !self.is_admin() {
            return error(
                "forbidden",
                format!("only owner or admin can {verb}"),
                req_id,
            );
        }
        let reply = match request {
            Request::Kick(selection) | Request::Disconnect(selection) => {
                let kick = verb == "kick";
                let stale = matches!(selection, Selection::Stale(_));
                let picked = self
                    .mesh
                    .select_local(|p| selects(&selection, p, self.conn, now));
                let (mut closed, mut skipped) = (Vec::new(), Vec::new());
                for (name, role, shared) in picked {
                    // A daemon would reconnect at once: a kick leaves it be.
                    if kick && role == "control-plane" {
                        skipped.push(name);
                        continue;
                    }
                    shared.close(if kick {
                        Disconnect::Kicked { stale }
                    } else {
                        Disconnect::Disconnected { stale }
                    });
                    closed.push(name);
                }
                self.ctx.audit.record(
                    self.mesh_id(),
                    if kick {
                        "peers_kicked"
                    } else {
                        "peers_disconnected"
                    },
                    Some(self.member_id.clone()),
                    &self.display_name,
                    serde_json::json!({"peers": closed}),
                );
                if kick {
                    Reply::KickAck {
                        kicked: closed.clone(),
                        affected: closed,
                        skipped_control_plane: (!skipped.is_empty()).then_some(skipped),
                        req_id,
                    }
                } else {
                    Reply::DisconnectAck {
                        kicked: closed.clone(),
                        affected: closed,
                        req_id,
                    }
                }
            }
            Request::Ban { target } => {
                self.queue_ban(target, req_id, now);
                return None;
            }
            Request::Unban { target } => {
                self.queue_unban(target, req_id, now);
                return None;
            }
            Request::SetRole { target, role } => {
                self.queue_set_role(target, role.as_str(), req_id);
                return None;
            }
            Request::ListBans => return None,
        };
        Some(BrokerFrame::Moderation(reply).to_json().into())
    }

    fn queue_list_bans(&mut self, req_id: Option<String>) -> Option<Utf8Bytes> {
        let db = self.ctx.db.clone();
        let mesh_id = self.mesh_id().to_owned();
        self.reply_later(async move {
            let members = match db.members(&mesh_id).await {
                Ok(m) => m,
                Err(e) => return store_unavailable("list_bans", req_id, &e),
            };
            let mut banned: Vec<MemberRow> = members
                .into_iter()
                .filter(|m| m.revoked_at.is_some())
                .collect();
            banned.sort_by_key(|m| std::cmp::Reverse(m.revoked_at));
            let bans = banned
                .into_iter()
                .map(|m| Ban {
                    revoked_at: iso8601_ms(m.revoked_at.unwrap_or_default()),
                    name: m.display_name,
                    pubkey: m.pubkey,
                })
                .collect();
            Some(
                BrokerFrame::Moderation(Reply::ListBansResult { bans, req_id })
                    .to_json()
                    .into(),
            )
        });
        None
    }

    fn queue_ban(&mut self, target: String, req_id: Option<String>, now: i64) {
        let ctx = self.ctx.clone();
        let mesh_id = self.mesh_id().to_owned();
        let (me, my_id, my_name) = (
            self.member_pubkey.clone(),
            self.member_id.clone(),
            self.display_name.clone(),
        );
        self.reply_later(async move {
            let members = match ctx.db.members(&mesh_id).await {
                Ok(m) => m,
                Err(e) => return store_unavailable("ban", req_id, &e),
            };
            // Exact names and keys first; a key prefix only when nothing is exact.
            let mut hits = named(&members, &target, false);
            if hits.is_empty() {
                hits = members
                    .iter()
                    .filter(|m| m.revoked_at.is_none() && names_key(&target, &m.pubkey))
                    .collect();
            }
            let m = match only(&hits, &target, "member", "give the full key", &req_id) {
                Ok(m) => m,
                Err(refusal) => return refusal,
            };
            if m.pubkey == me {
                return error("invalid", "cannot ban yourself", req_id);
            }
            if let Some(refusal) = hosted_elsewhere(m, "ban them", &req_id) {
                return refusal;
            }
            let row = match ctx.db.revoke_member(&mesh_id, &m.id, now).await {
                Ok(Some(row)) => row,
                // Revoked meanwhile (by another admin or `meshd member revoke`).
                Ok(None) => {
                    return error("not_found", format!("no member matches {target:?}"), req_id);
                }
                Err(e) => return store_unavailable("ban", req_id, &e),
            };
            ctx.audit.record(
                &mesh_id,
                "member_banned",
                Some(my_id),
                &my_name,
                serde_json::json!({"target": target, "targetPubkey": row.pubkey}),
            );
            apply_revocation(&ctx, &row, now).await;
            Some(
                BrokerFrame::Moderation(Reply::BanAck {
                    banned: row.display_name,
                    req_id,
                })
                .to_json()
                .into(),
            )
        });
    }

    /// `member_role`: the member's home broker decides (as for bans); the new role
    /// reaches peer brokers in the member's announcement, and a demoted member's open
    /// dashboards stop at once.
    fn queue_set_role(&mut self, target: String, role: &'static str, req_id: Option<String>) {
        let ctx = self.ctx.clone();
        let mesh = self.mesh.clone();
        let mesh_id = self.mesh_id().to_owned();
        let (my_id, my_name) = (self.member_id.clone(), self.display_name.clone());
        self.reply_later(async move {
            let members = match ctx.db.members(&mesh_id).await {
                Ok(m) => m,
                Err(e) => return store_unavailable("member_role", req_id, &e),
            };
            let hits = named(&members, &target, false);
            let m = match only(&hits, &target, "member", "give the key", &req_id) {
                Ok(m) => m,
                Err(refusal) => return refusal,
            };
            if let Some(refusal) = hosted_elsewhere(m, "change their role", &req_id) {
                return refusal;
            }
            let row = match ctx.db.set_member_role(&mesh_id, &m.id, role).await {
                Ok(Some(row)) => row,
                Ok(None) => {
                    return error(
                        "invalid",
                        format!("{} is the mesh's last admin", m.display_name),
                        req_id,
                    );
                }
                Err(e) => return store_unavailable("member_role", req_id, &e),
            };
            mesh.upsert_member(&row.pubkey, crate::hub::member_info(&row));
            if role != "admin" {
                crate::features::dashboard::unwatch_member(&mesh, &row.pubkey);
            }
            if let Some(fed) = &ctx.fed {
                fed.member_changed(&mesh, &row.pubkey);
            }
            ctx.audit.record(
                &mesh_id,
                "member_role_changed",
                Some(my_id),
                &my_name,
                serde_json::json!({"target": row.display_name, "targetPubkey": row.pubkey, "role": role}),
            );
            Some(
                BrokerFrame::Moderation(Reply::MemberRoleSet {
                    name: row.display_name,
                    pubkey: row.pubkey,
                    role,
                    req_id,
                })
                .to_json()
                .into(),
            )
        });
    }

    fn queue_unban(&mut self, target: String, req_id: Option<String>, _now: i64) {
        let ctx = self.ctx.clone();
        let mesh = self.mesh.clone();
        let mesh_id = self.mesh_id().to_owned();
        let (my_id, my_name) = (self.member_id.clone(), self.display_name.clone());
        self.reply_later(async move {
            let members = match ctx.db.members(&mesh_id).await {
                Ok(m) => m,
                Err(e) => return store_unavailable("unban", req_id, &e),
            };
            let hits = named(&members, &target, true);
            let m = match only(&hits, &target, "banned member", "give the key", &req_id) {
                Ok(m) => m,
                Err(refusal) => return refusal,
            };
            if let Some(refusal) = hosted_elsewhere(m, "unban them", &req_id) {
                return refusal;
            }
            let row = match ctx.db.unrevoke_member(&mesh_id, &m.id).await {
                Ok(Some(row)) => row,
                Ok(None) => {
                    return error(
                        "not_found",
                        format!("no banned member matches {target:?}"),
                        req_id,
                    );
                }
                Err(e) => return store_unavailable("unban", req_id, &e),
            };
            mesh.unrevoke(&row.pubkey);
            if let Some(fed) = &ctx.fed {
                fed.member_changed(&mesh, &row.pubkey);
            }
            ctx.audit.record(
                &mesh_id,
                "member_unbanned",
                Some(my_id),
                &my_name,
                serde_json::json!({"target": target, "targetPubkey": row.pubkey}),
            );
            Some(
                BrokerFrame::Moderation(Reply::UnbanAck {
                    unbanned: row.display_name,
                    req_id,
                })
                .to_json()
                .into(),
            )
        });
    }
}

#[cfg(test)]
mod tests {
    use super::names_key;

    #[test]
    fn keys_are_named_whole_or_by_a_long_hex_prefix() {
        let key = "abcdef0123456789".repeat(4);
        assert!(names_key(&key, &key));
        assert!(names_key(&key.to_ascii_uppercase(), &key));
        assert!(names_key("abcdef01", &key));
        assert!(
            !names_key("abcdef0", &key),
            "7 digits name members by accident"
        );
        assert!(!names_key("abcdef0z", &key));
        assert!(!names_key("bcdef012", &key));
    }
}
