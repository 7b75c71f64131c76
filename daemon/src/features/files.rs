//! Files: get, list, status, delete, grant (uploads and downloads are HTTP: `engine`).

pub mod engine;

pub mod store;

use std::sync::Arc;

use meshd_protocol::broker::{Ack, BrokerFrame};
use meshd_protocol::client::ClientFrame;
use meshd_protocol::time::iso8601_ms;

use crate::session::*;

impl Session {
    /// Stored files: `get_file`, `list_files`, `file_status`, `delete_file`,
    /// `grant_file_access` (see `files`). A reader sees a file when it is the uploader,
    /// the file has no target, or the target includes it; `delete_file` is the
    /// uploader's or an admin's; `grant_file_access` the owner's.
    pub(crate) fn queue_files(&mut self, frame: ClientFrame, req_id: Option<String>, now: i64) {
        use meshd_protocol::broker::{
            FileAccess, FileEntry, FileList, FileStatusResult, FileUrl, GrantFileAccessOk,
        };
        let ctx = self.ctx.clone();
        let mesh_id = self.mesh_id().to_owned();
        let member_id = self.member_id.clone();
        let keys = [self.routing_key().to_owned(), self.member_pubkey.clone()];
        let me = self.display_name.clone();
        let groups = self
            .mesh
            .local_peer(self.conn, |p| p.groups.clone())
            .unwrap_or_default();
        let admin = self
            .mesh
            .member(&self.member_pubkey)
            .is_some_and(|m| m.role == "admin");
        let (shared, member_pubkey) = (self.shared.clone(), self.member_pubkey.clone());
        self.reply_later(async move {
            let key_refs = [keys[0].as_str(), keys[1].as_str()];
            // A file another broker of the mesh holds: `get_file` asks it for a URL (at
            // that broker); the owner's operations are made there.
            let held_by = match &frame {
                ClientFrame::GetFile { file_id }
                | ClientFrame::FileStatus { file_id }
                | ClientFrame::DeleteFile { file_id }
                | ClientFrame::GrantFileAccess { file_id, .. } => {
                    match ctx.db.file(&mesh_id, file_id, now).await {
                        Ok(Some(f)) => f.home_broker.clone().map(|b| (f, b)),
                        Ok(None) => None,
                        Err(e) => return store_unavailable("reading a file", req_id, &e),
                    }
                }
                _ => None,
            };
            if let Some((f, broker)) = held_by {
                if !matches!(frame, ClientFrame::GetFile { .. }) {
                    return error(
                        "held_elsewhere",
                        format!("this file is held by broker {broker}: its owner manages it there"),
                        req_id,
                    );
                }
                if !crate::features::files::engine::may_read(&f, &member_id, &key_refs, &groups) {
                    return error("forbidden", "this file is not shared with you", req_id);
                }
                let broker: Arc<str> = Arc::from(broker.as_str());
                let Some(ask_id) = ctx
                    .files
                    .ask(broker.clone(), &shared, req_id.clone(), &f.id)
                else {
                    return error(
                        "rate_limited",
                        "too many file requests waiting for other brokers; retry shortly",
                        req_id,
                    );
                };
                let ask = meshd_protocol::fed::FileUrlAsk {
                    mesh_id: mesh_id.clone(),
                    ask_id: ask_id.clone(),
                    file_id: f.id.clone(),
                    member_id: member_id.clone(),
                    member_pubkey,
                    reader_key: keys[0].clone(),
                    reader_name: me,
                    groups: groups.iter().map(|g| g.name.clone()).collect(),
                };
                let sent = ctx.fed.as_ref().is_some_and(|fed| {
                    fed.relay_send(
                        &broker,
                        &mesh_id,
                        meshd_protocol::fed::Frame::FileUrlAsk(Box::new(ask)),
                    )
                });
                if !sent {
                    ctx.files.unask(&ask_id);
                    return error(
                        "unavailable",
                        format!("the broker holding this file ({broker}) cannot be reached now"),
                        req_id,
                    );
                }
                // The answer comes through the outbound queue (see `files::Files::answered`).
                return None;
            }
            let readable = |f: &crate::features::files::store::FileRow| {
                crate::features::files::engine::may_read(f, &member_id, &key_refs, &groups)
            };
            let file_id = match &frame {
                ClientFrame::GetFile { file_id }
                | ClientFrame::FileStatus { file_id }
                | ClientFrame::DeleteFile { file_id }
                | ClientFrame::GrantFileAccess { file_id, .. } => Some(file_id.clone()),
                _ => None,
            };
            let file = match &file_id {
                Some(id) => match ctx.db.file(&mesh_id, id, now).await {
                    Ok(f) => f,
                    Err(e) => return store_unavailable("reading a file", req_id, &e),
                },
                None => None,
            };
            let reply = match frame {
                ClientFrame::GetFile { file_id } => {
                    let Some(f) = file else {
                        return error("not_found", "no such file in this mesh", req_id);
                    };
                    if !readable(&f) {
                        return error("forbidden", "this file is not shared with you", req_id);
                    }
                    let sealed_key = if f.encrypted != 0 {
                        match ctx.db.sealed_file_key(&f.id, &key_refs).await {
                            Ok(k) => k,
                            Err(e) => return store_unavailable("reading a file key", req_id, &e),
                        }
                    } else {
                        None
                    };
                    if let Err(e) = ctx.db.record_file_access(&f.id, &keys[0], &me, now).await {
                        return store_unavailable("recording a download", req_id, &e);
                    }
                    let base = crate::http::hook_base(&ctx.config);
                    BrokerFrame::FileUrl(FileUrl {
                        url: ctx.files.signed_url(
                            &base,
                            &mesh_id,
                            &f.id,
                            now + crate::features::files::engine::URL_TTL_MS,
                        ),
                        file_id,
                        name: f.name,
                        encrypted: f.encrypted != 0,
                        sealed_key,
                        req_id,
                    })
                }
                ClientFrame::ListFiles { query, from } => {
                    let rows = match ctx.db.files(&mesh_id, now).await {
                        Ok(r) => r,
                        Err(e) => return store_unavailable("listing files", req_id, &e),
                    };
                    let q = query.map(|q| q.to_lowercase());
                    BrokerFrame::FileList(FileList {
                        files: rows
                            .into_iter()
                            .filter(|f| readable(f))
                            .filter(|f| {
                                q.as_ref().is_none_or(|q| f.name.to_lowercase().contains(q))
                            })
                            .filter(|f| from.as_ref().is_none_or(|w| &f.uploaded_by_name == w))
                            .take(100)
                            .map(|f| FileEntry {
                                tags: serde_json::from_str(&f.tags).unwrap_or_default(),
                                id: f.id,
                                name: f.name,
                                size: f.size_bytes,
                                uploaded_by: f.uploaded_by_name,
                                uploaded_at: iso8601_ms(f.uploaded_at),
                                persistent: f.persistent != 0,
                                encrypted: f.encrypted != 0,
                            })
                            .collect(),
                        req_id,
                    })
                }
                ClientFrame::FileStatus { file_id } => {
                    let Some(f) = file.filter(|f| readable(f)) else {
                        return error("not_found", "no such file in this mesh", req_id);
                    };
                    let accesses = match ctx.db.file_accesses(&f.id).await {
                        Ok(a) => a,
                        Err(e) => return store_unavailable("reading downloads", req_id, &e),
                    };
                    BrokerFrame::FileStatusResult(FileStatusResult {
                        file_id,
                        accesses: accesses
                            .into_iter()
                            .map(|(peer_name, at)| FileAccess {
                                peer_name,
                                accessed_at: iso8601_ms(at),
                            })
                            .collect(),
                        req_id,
                    })
                }
                ClientFrame::DeleteFile { file_id } => {
                    // Answered with an `ack` (as the reference), carrying the refusal.
                    let refusal = match &file {
                        None => Some("no such file in this mesh"),
                        Some(f) if f.uploader_member_id != member_id && !admin => {
                            Some("only the file's uploader or an admin may delete it")
                        }
                        Some(_) => None,
                    };
                    if refusal.is_none() {
                        match ctx.db.delete_file(&file_id, now).await {
                            Ok(deleted) => {
                                crate::features::dashboard::touched(&ctx, &mesh_id, "files");
                                if deleted && let Some(f) = &file {
                                    crate::quota::recount_member(
                                        &ctx,
                                        crate::quota::Kind::Files,
                                        &mesh_id,
                                        &f.uploader_member_id,
                                    )
                                    .await;
                                }
                                ctx.files.remove(&mesh_id, &file_id).await;
                                crate::features::files::engine::publish(
                                    &ctx,
                                    &mesh_id,
                                    vec![crate::features::files::engine::file_removal(&file_id)],
                                );
                            }
                            Err(e) => return store_unavailable("deleting a file", req_id, &e),
                        }
                    }
                    BrokerFrame::Ack(Ack {
                        id: file_id.clone(),
                        message_id: file_id,
                        queued: false,
                        error: refusal.map(str::to_owned),
                        req_id,
                    })
                }
                ClientFrame::GrantFileAccess {
                    file_id,
                    peer_pubkey,
                    sealed_key,
                } => {
                    let Some(f) = file else {
                        return error("not_found", "no such file in this mesh", req_id);
                    };
                    if !key_refs.contains(&f.owner_pubkey.as_str())
                        && f.uploader_member_id != member_id
                    {
                        return error(
                            "forbidden",
                            "only the file's owner may grant access",
                            req_id,
                        );
                    }
                    let peer = peer_pubkey.to_ascii_lowercase();
                    if let Err(e) = ctx
                        .db
                        .grant_file_key(&f.id, &peer, &sealed_key, &keys[0], now)
                        .await
                    {
                        return store_unavailable("storing a file key", req_id, &e);
                    }
                    BrokerFrame::GrantFileAccessOk(GrantFileAccessOk {
                        file_id,
                        peer_pubkey,
                        req_id,
                    })
                }
                _ => return None,
            };
            Some(reply.to_json().into())
        });
    }
}

/// Catch-up: the empty full list first (the peer forgets ours), then the list read
/// after it, so a file uploaded meanwhile is in the list or arrives after it.
pub(crate) async fn catch_up(c: &crate::fed::CatchUp<'_>) -> bool {
    use meshd_protocol::fed::Frame;
    let m = c.mesh_id().to_owned();
    let files = |files, full| Frame::Files {
        mesh_id: m.clone(),
        files,
        full,
    };
    if !c.send(files(Vec::new(), true)).await {
        return false;
    }
    match c.ctx.db.local_files(&m, crate::time::now_ms()).await {
        Ok(rows) => {
            let sets = rows
                .iter()
                .map(|f| crate::features::files::engine::file_set(f, false))
                .collect();
            for part in crate::fed::parts(sets, c.budget, crate::fed::file_set_size) {
                if !part.is_empty() && !c.send(files(part, false)).await {
                    return false;
                }
            }
        }
        Err(e) => tracing::warn!(cause = %e, "reading files for a peer"),
    }
    true
}

/// Telling the mesh's other brokers of a change made here.
impl crate::fed::Fed {
    /// Files held here changed (`full`: all of them).
    pub(crate) fn files_changed(
        &self,
        mesh_id: &str,
        files: Vec<meshd_protocol::fed::FileSet>,
        full: bool,
    ) {
        if files.is_empty() && !full {
            return;
        }
        self.to_every_link(
            mesh_id,
            meshd_protocol::fed::Frame::Files {
                mesh_id: mesh_id.to_owned(),
                files,
                full,
            },
        );
    }
}

/// Frames from peer brokers.
mod from_peers {
    use crate::fed::*;
    use meshd_protocol::fed::{Frame, RejectReason};

    /// Applies a peer broker's `Files` frame.
    pub(crate) async fn on_peer_files(
        ctx: &std::sync::Arc<crate::Ctx>,
        link: &std::sync::Arc<crate::fed::LinkShared>,
        mesh_id: String,
        files: Vec<meshd_protocol::fed::FileSet>,
        full: bool,
    ) -> Result<(), meshd_federation::LinkError> {
        let hub = if link.accepts(&mesh_id) && files.len() <= 10_000 {
            ctx.hub.mesh(&ctx.db, &mesh_id).await.ok().flatten()
        } else {
            None
        };
        let ok = match hub {
            Some(hub) => {
                match crate::features::files::engine::apply_remote(
                    ctx,
                    &link.broker,
                    &hub,
                    files,
                    full,
                )
                .await
                {
                    Ok(all_valid) => all_valid,
                    Err(e) => {
                        tracing::warn!(cause = %e, "storing a peer's files");
                        false
                    }
                }
            }
            None => false,
        };
        if !ok {
            count_refused(ctx, link, RejectReason::Invalid, 1);
        }
        Ok(())
    }

    /// Applies a peer broker's `FileUrlAsk` frame.
    pub(crate) async fn on_peer_file_url_ask(
        fed: &std::sync::Arc<crate::fed::Fed>,
        ctx: &std::sync::Arc<crate::Ctx>,
        link: &std::sync::Arc<crate::fed::LinkShared>,
        a: Box<meshd_protocol::fed::FileUrlAsk>,
    ) -> Result<(), meshd_federation::LinkError> {
        let mut a = *a;
        // The reader must be a presence the peer hosts for that member; its
        // groups are the ones the peer announced for it, not the ask's.
        let hub = if link.accepts(&a.mesh_id) && a.reader_name.len() <= 256 {
            ctx.hub.mesh(&ctx.db, &a.mesh_id).await.ok().flatten()
        } else {
            None
        };
        let allowed = hub.as_ref().is_some_and(|hub| {
            hub.remote_presence_of(&link.broker, &a.reader_key, &a.member_pubkey)
                && hub
                    .member(&a.member_pubkey)
                    .is_some_and(|m| m.id == a.member_id)
        });
        if let (true, Some(hub)) = (allowed, &hub) {
            a.groups = hub.remote_groups(&a.reader_key);
            let answer = crate::features::files::engine::remote_url(ctx, &a).await;
            fed.relay_send(
                &link.broker,
                &a.mesh_id,
                Frame::FileUrlAnswer(Box::new(answer)),
            );
        } else {
            count_refused(ctx, link, RejectReason::ForgedSender, 1);
        }
        Ok(())
    }

    /// Applies a peer broker's `FileUrlAnswer` frame.
    pub(crate) async fn on_peer_file_url_answer(
        ctx: &std::sync::Arc<crate::Ctx>,
        link: &std::sync::Arc<crate::fed::LinkShared>,
        a: Box<meshd_protocol::fed::FileUrlAnswer>,
    ) -> Result<(), meshd_federation::LinkError> {
        if link.accepts(&a.mesh_id) {
            ctx.files.answered(&link.broker, *a);
        }
        Ok(())
    }
}
pub(crate) use from_peers::*;
