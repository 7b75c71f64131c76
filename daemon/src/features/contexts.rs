//! Shared contexts: what each member is working on.

use axum::extract::ws::Utf8Bytes;
use meshd_protocol::broker::BrokerFrame;
use meshd_protocol::client::ClientFrame;
use meshd_protocol::time::iso8601_ms;

use crate::hub::raw;
use crate::session::*;

impl Session {
    /// Shared contexts: one per member, announced to the others as a `state_change` of
    /// `_context:<name>` (as the reference does; it is not stored as state).
    pub(crate) fn queue_context(&mut self, frame: ClientFrame, req_id: Option<String>, now: i64) {
        use crate::store::contexts::{ContextRow, SEARCH_LIMIT, matches};
        use meshd_protocol::broker::{
            ContextEntry, ContextList, ContextResults, ContextShared, ContextSummary,
        };
        let db = self.ctx.db.clone();
        let fed = self.ctx.fed.clone();
        let member_pubkey = self.member_pubkey.clone();
        let mesh = self.mesh.clone();
        let conn = self.conn;
        let (member_id, name) = (self.member_id.clone(), self.display_name.clone());
        self.replies.push_back(Box::pin(async move {
            let json = |v: &Vec<String>| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
            let reply = match frame {
                ClientFrame::ShareContext(c) => {
                    let row = ContextRow {
                        mesh_id: mesh.row.id.clone(),
                        member_id: member_id.clone(),
                        peer_name: name.clone(),
                        summary: c.summary.clone(),
                        files_read: json(&c.files_read),
                        key_findings: json(&c.key_findings),
                        tags: json(&c.tags),
                        updated_at: now,
                    };
                    if let Err(e) = db.put_context(&row).await {
                        return store_unavailable("contexts", req_id, &e);
                    }
                    if let Some(fed) = &fed {
                        fed.context_shared(crate::fed::context_set(row, &member_pubkey));
                    }
                    let change = BrokerFrame::StateChange(meshd_protocol::broker::StateChange {
                        key: format!("_context:{name}"),
                        value: raw(&serde_json::Value::String(c.summary).to_string()),
                        updated_by: name,
                    });
                    mesh.announce(&Utf8Bytes::from(change.to_json()), conn, None);
                    BrokerFrame::ContextShared(ContextShared {
                        id: member_id,
                        req_id,
                    })
                }
                ClientFrame::GetContext { query } => match db.contexts(&mesh.row.id).await {
                    Ok(rows) => BrokerFrame::ContextResults(ContextResults {
                        contexts: rows
                            .into_iter()
                            .filter(|c| matches(c, &query))
                            .take(SEARCH_LIMIT)
                            .map(|c| ContextEntry {
                                files_read: ContextRow::list(&c.files_read),
                                key_findings: ContextRow::list(&c.key_findings),
                                tags: ContextRow::list(&c.tags),
                                peer_name: c.peer_name,
                                summary: c.summary,
                                updated_at: iso8601_ms(c.updated_at),
                            })
                            .collect(),
                        req_id,
                    }),
                    Err(e) => return store_unavailable("contexts", req_id, &e),
                },
                ClientFrame::ListContexts => match db.contexts(&mesh.row.id).await {
                    Ok(rows) => BrokerFrame::ContextList(ContextList {
                        contexts: rows
                            .into_iter()
                            .map(|c| ContextSummary {
                                tags: ContextRow::list(&c.tags),
                                peer_name: c.peer_name,
                                summary: c.summary,
                                updated_at: iso8601_ms(c.updated_at),
                            })
                            .collect(),
                        req_id,
                    }),
                    Err(e) => return store_unavailable("contexts", req_id, &e),
                },
                _ => return None,
            };
            Some(reply.to_json().into())
        }));
    }
}
