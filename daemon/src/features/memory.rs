//! Mesh memory: remember, recall, get, forget.

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
        self.replies.push_back(Box::pin(async move {
            let reply = match frame {
                ClientFrame::Remember { content, tags } => {
                    let row = crate::store::memory::MemoryRow {
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
                                fed.memory_remembered(crate::fed::memory_set(
                                    row,
                                    &member_pubkey,
                                    None,
                                ));
                            }
                            BrokerFrame::MemoryStored(MemoryStored { id, req_id })
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
        }));
    }
}
