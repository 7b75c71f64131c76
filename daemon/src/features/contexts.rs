//! Shared contexts: what each member is working on.

pub mod store;

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
        use crate::features::contexts::store::{ContextRow, SEARCH_LIMIT, matches};
        use meshd_protocol::broker::{
            ContextEntry, ContextList, ContextResults, ContextShared, ContextSummary,
        };
        let db = self.ctx.db.clone();
        let fed = self.ctx.fed.clone();
        let member_pubkey = self.member_pubkey.clone();
        let mesh = self.mesh.clone();
        let conn = self.conn;
        let (member_id, name) = (self.member_id.clone(), self.display_name.clone());
        self.reply_later(async move {
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
                        fed.context_shared(context_set(row, &member_pubkey));
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
        });
    }
}

pub(crate) use replication::*;

/// Replication across brokers: applying a peer's change, and this broker's part of a
/// link's catch-up.
mod replication {

    use axum::extract::ws::Utf8Bytes;

    use meshd_protocol::broker::BrokerFrame;
    use meshd_protocol::fed::RejectReason;

    use tracing::warn;

    use crate::Ctx;

    use crate::fed::*;
    use meshd_protocol::fed::Frame;

    /// A stored context as a federation frame.
    pub(crate) fn context_set(
        row: crate::features::contexts::store::ContextRow,
        pubkey: &str,
    ) -> meshd_protocol::fed::ContextSet {
        use crate::features::contexts::store::ContextRow;
        meshd_protocol::fed::ContextSet {
            files_read: ContextRow::list(&row.files_read),
            key_findings: ContextRow::list(&row.key_findings),
            tags: ContextRow::list(&row.tags),
            mesh_id: row.mesh_id,
            member_id: row.member_id,
            member_pubkey: pubkey.to_owned(),
            peer_name: row.peer_name,
            summary: row.summary,
            updated_at: row.updated_at,
        }
    }

    /// Stores a context a member of the peer shared (newest wins) and tells local peers.
    pub(crate) async fn apply_context(
        ctx: &Ctx,
        link: &LinkShared,
        c: meshd_protocol::fed::ContextSet,
    ) -> Result<(), RejectReason> {
        use meshd_protocol::client::{MAX_GROUPS, MAX_NAME_LEN, MAX_PATH_LEN, MAX_SUMMARY_LEN};
        if !link.accepts(&c.mesh_id) {
            return Err(RejectReason::NotShared);
        }
        if c.summary.len() > MAX_SUMMARY_LEN
            || c.peer_name.len() > MAX_NAME_LEN
            || [&c.files_read, &c.key_findings, &c.tags]
                .iter()
                .any(|l| l.len() > MAX_GROUPS || l.iter().any(|x| x.len() > MAX_PATH_LEN))
        {
            return Err(RejectReason::Invalid);
        }
        let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &c.mesh_id).await else {
            return Err(RejectReason::NotShared);
        };
        if !speaks_for(&hub, &link.broker, &c.member_id, &c.member_pubkey) {
            return Err(RejectReason::ForgedSender);
        }
        let json = |v: &Vec<String>| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
        let row = crate::features::contexts::store::ContextRow {
            mesh_id: c.mesh_id.clone(),
            member_id: c.member_id.clone(),
            peer_name: c.peer_name.clone(),
            summary: c.summary.clone(),
            files_read: json(&c.files_read),
            key_findings: json(&c.key_findings),
            tags: json(&c.tags),
            updated_at: c.updated_at,
        };
        match ctx.db.put_context_if_newer(&row).await {
            Ok(true) => {
                // As for a local share_context: a state_change of `_context:<name>`.
                let change = BrokerFrame::StateChange(meshd_protocol::broker::StateChange {
                    key: format!("_context:{}", c.peer_name),
                    value: crate::hub::raw(&serde_json::Value::String(c.summary).to_string()),
                    updated_by: c.peer_name,
                });
                hub.announce(&Utf8Bytes::from(change.to_json()), 0, None);
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => {
                warn!(cause = %e, "storing a peer's context");
                Err(RejectReason::Invalid)
            }
        }
    }

    /// Catch-up: the contexts of the members hosted here.
    pub(crate) async fn catch_up(c: &CatchUp<'_>) -> bool {
        let local = c.local_members();
        let rows = c.ctx.db.contexts(c.mesh_id()).await;
        c.send_rows("contexts", rows, |row| {
            let pk = local.get(&row.member_id)?;
            Some(Frame::Context(Box::new(context_set(row, pk))))
        })
        .await
    }
}

/// Telling the mesh's other brokers of a change made here.
impl crate::fed::Fed {
    /// A member hosted here shared its context.
    pub(crate) fn context_shared(&self, c: meshd_protocol::fed::ContextSet) {
        let mesh_id = c.mesh_id.clone();
        self.to_every_link(&mesh_id, meshd_protocol::fed::Frame::Context(Box::new(c)));
    }
}
