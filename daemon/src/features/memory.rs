//! Mesh memory: remember, recall, get, forget.

pub mod store;

use meshd_protocol::broker::{Ack, BrokerFrame, ErrorFrame};
use meshd_protocol::client::ClientFrame;
use meshd_protocol::time::iso8601_ms;

use crate::session::*;

impl Session {
    /// The mesh's memory: `remember`, ranked full-text `recall`, `forget`.
    pub(crate) fn queue_memory(&mut self, frame: ClientFrame, req_id: Option<String>, now: i64) {
        use meshd_protocol::broker::{Memory, MemoryResults, MemoryStored};
        let db = self.ctx.db.clone();
        let ctx = self.ctx.clone();
        let fed = self.ctx.fed.clone();
        let member_pubkey = self.member_pubkey.clone();
        let mesh_id = self.mesh_id().to_owned();
        let (member_id, name) = (self.member_id.clone(), self.display_name.clone());
        self.reply_later(async move {
            let reply = match frame {
                ClientFrame::Remember { content, tags } => {
                    let row = crate::features::memory::store::MemoryRow {
                        id: crate::ids::random_id(),
                        mesh_id,
                        content,
                        // Space-separated, so the full-text index covers tags too.
                        tags: tags
                            .iter()
                            .map(|t| t.replace(char::is_whitespace, "_"))
                            .collect::<Vec<_>>()
                            .join(" "),
                        remembered_by: member_id,
                        remembered_by_name: name,
                        remembered_at: now,
                    };
                    let weight =
                        i64::try_from(row.content.len() + row.tags.len()).unwrap_or(i64::MAX);
                    if let Err(e) = crate::quota::check(
                        &ctx,
                        crate::quota::Kind::Memory,
                        &row.mesh_id,
                        &row.remembered_by,
                        crate::quota::Usage::new(1, weight),
                    ) {
                        return Some(
                            BrokerFrame::Error(
                                ErrorFrame::new(crate::quota::QuotaExceeded::CODE, e.to_string())
                                    .with_req_id(req_id),
                            )
                            .to_json()
                            .into(),
                        );
                    }
                    match db.remember(&row).await {
                        Ok(()) => {
                            let id = row.id.clone();
                            if let Some(fed) = &fed {
                                fed.memory_remembered(memory_set(row, &member_pubkey, None));
                            }
                            BrokerFrame::MemoryStored(MemoryStored {
                                memory_id: id.clone(),
                                id,
                                req_id,
                            })
                        }
                        Err(e) => return store_unavailable("memory", req_id, &e),
                    }
                }
                ClientFrame::Recall { query } => match db.recall(&mesh_id, &query).await {
                    Ok(rows) => BrokerFrame::MemoryResults(MemoryResults {
                        memories: rows
                            .into_iter()
                            .map(|m| Memory {
                                tags: m.tags.split_whitespace().map(str::to_owned).collect(),
                                id: m.id,
                                content: m.content,
                                remembered_by: m.remembered_by_name,
                                remembered_at: iso8601_ms(m.remembered_at),
                            })
                            .collect(),
                        req_id,
                    }),
                    Err(e) => return store_unavailable("memory", req_id, &e),
                },
                ClientFrame::GetMemory { memory_id } => {
                    match db.memory(&mesh_id, &memory_id).await {
                        Ok(Some(m)) => {
                            BrokerFrame::MemoryData(meshd_protocol::broker::MemoryData {
                                memory: Memory {
                                    tags: m.tags.split_whitespace().map(str::to_owned).collect(),
                                    id: m.id,
                                    content: m.content,
                                    remembered_by: m.remembered_by_name,
                                    remembered_at: iso8601_ms(m.remembered_at),
                                },
                                req_id,
                            })
                        }
                        Ok(None) => BrokerFrame::Error(
                            ErrorFrame::new("not_found", "no such memory in this mesh")
                                .with_req_id(req_id),
                        ),
                        Err(e) => return store_unavailable("memory", req_id, &e),
                    }
                }
                ClientFrame::Forget { memory_id } => {
                    match db.forget(&mesh_id, &memory_id, now).await {
                        Ok(Some(owner)) => {
                            crate::quota::recount_member(
                                &ctx,
                                crate::quota::Kind::Memory,
                                &mesh_id,
                                &owner,
                            )
                            .await;
                            if let Some(fed) = &fed {
                                fed.memory_forgotten(&mesh_id, &memory_id, now);
                            }
                        }
                        Ok(None) => {}
                        Err(e) => return store_unavailable("memory", req_id, &e),
                    }
                    // The reference's answer, sent whether or not something matched.
                    BrokerFrame::Ack(Ack {
                        id: memory_id.clone(),
                        message_id: memory_id,
                        queued: false,
                        error: None,
                        req_id,
                    })
                }
                _ => return None,
            };
            Some(reply.to_json().into())
        });
    }
}

pub(crate) use replication::*;

/// Replication across brokers: applying a peer's change, and this broker's part of a
/// link's catch-up.
mod replication {

    use meshd_protocol::fed::RejectReason;

    use tracing::warn;

    use crate::Ctx;

    use crate::fed::*;
    use meshd_protocol::fed::Frame;

    /// Memories a peer broker is sent when its link comes up (newest first).
    pub(crate) const MEMORY_CATCH_UP: i64 = 10_000;

    /// A stored memory as a federation frame.
    pub(crate) fn memory_set(
        row: crate::features::memory::store::MemoryRow,
        pubkey: &str,
        forgotten_at: Option<i64>,
    ) -> meshd_protocol::fed::MemorySet {
        meshd_protocol::fed::MemorySet {
            mesh_id: row.mesh_id,
            id: row.id,
            content: row.content,
            tags: row.tags,
            remembered_by: row.remembered_by,
            remembered_by_pubkey: pubkey.to_owned(),
            remembered_by_name: row.remembered_by_name,
            remembered_at: row.remembered_at,
            forgotten_at,
        }
    }

    /// Stores a memory a member of the peer remembered (idempotent).
    pub(crate) async fn apply_memory(
        ctx: &Ctx,
        link: &LinkShared,
        m: meshd_protocol::fed::MemorySet,
    ) -> Result<(), RejectReason> {
        use meshd_protocol::client::{MAX_NAME_LEN, MAX_SKILL_INSTRUCTIONS, MAX_SUMMARY_LEN};
        if !link.accepts(&m.mesh_id) {
            return Err(RejectReason::NotShared);
        }
        if m.id.is_empty()
            || m.id.len() > 64
            || m.content.len() > MAX_SKILL_INSTRUCTIONS
            || m.tags.len() > MAX_SUMMARY_LEN
            || m.remembered_by_name.len() > MAX_NAME_LEN
        {
            return Err(RejectReason::Invalid);
        }
        let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &m.mesh_id).await else {
            return Err(RejectReason::NotShared);
        };
        if !speaks_for(
            &hub,
            &link.broker,
            &m.remembered_by,
            &m.remembered_by_pubkey,
        ) {
            return Err(RejectReason::ForgedSender);
        }
        let row = crate::features::memory::store::MemoryRow {
            id: m.id,
            mesh_id: m.mesh_id,
            content: m.content,
            tags: m.tags,
            remembered_by: m.remembered_by,
            remembered_by_name: m.remembered_by_name,
            remembered_at: m.remembered_at,
        };
        ctx.db
            .put_remote_memory(&row, m.forgotten_at)
            .await
            .map_err(|e| {
                warn!(cause = %e, "storing a peer's memory");
                RejectReason::Invalid
            })
    }

    /// Catch-up: the memories of the members hosted here, and every forgetting (any
    /// member may forget).
    pub(crate) async fn catch_up(c: &CatchUp<'_>) -> bool {
        let local = c.local_members();
        let rows = c.ctx.db.memories_by(c.mesh_id(), MEMORY_CATCH_UP).await;
        c.send_rows("memories", rows, |(row, forgotten_at)| {
            match local.get(&row.remembered_by) {
                Some(pk) => Some(Frame::Memory(Box::new(memory_set(row, pk, forgotten_at)))),
                None => forgotten_at.map(|at| Frame::Forget {
                    mesh_id: row.mesh_id,
                    id: row.id,
                    at,
                }),
            }
        })
        .await
    }
}

/// Telling the mesh's other brokers of a change made here.
impl crate::fed::Fed {
    /// A member hosted here remembered something.
    pub(crate) fn memory_remembered(&self, m: meshd_protocol::fed::MemorySet) {
        let mesh_id = m.mesh_id.clone();
        self.to_every_link(&mesh_id, meshd_protocol::fed::Frame::Memory(Box::new(m)));
    }

    /// A member here forgot a memory.
    pub(crate) fn memory_forgotten(&self, mesh_id: &str, id: &str, at: i64) {
        self.to_every_link(
            mesh_id,
            meshd_protocol::fed::Frame::Forget {
                mesh_id: mesh_id.to_owned(),
                id: id.to_owned(),
                at,
            },
        );
    }
}

/// Frames from peer brokers.
mod from_peers {
    use crate::fed::*;
    use meshd_protocol::fed::RejectReason;

    /// Applies a peer broker's `Forget` frame.
    pub(crate) async fn on_peer_forget(
        ctx: &std::sync::Arc<crate::Ctx>,
        link: &std::sync::Arc<crate::fed::LinkShared>,
        mesh_id: String,
        id: String,
        at: i64,
    ) -> Result<(), meshd_federation::LinkError> {
        if !link.accepts(&mesh_id) || id.len() > 64 {
            count_refused(ctx, link, RejectReason::NotShared, 1);
        } else if let Err(e) = ctx.db.forget(&mesh_id, &id, at).await {
            tracing::warn!(cause = %e, "storing a peer's forget");
        }
        Ok(())
    }
}
pub(crate) use from_peers::*;
