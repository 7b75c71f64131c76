//! The audit log, as clients query and verify it (`engine` writes it).

pub mod engine;

pub mod store;

use meshd_protocol::broker::BrokerFrame;
use meshd_protocol::client::ClientFrame;
use meshd_protocol::time::iso8601_ms;

use crate::hub::raw;
use crate::session::*;

impl Session {
    /// `audit_query` and `audit_verify`.
    pub(crate) fn queue_audit(&mut self, frame: ClientFrame, req_id: Option<String>) {
        use meshd_protocol::broker::{AuditEntry, AuditResult, AuditVerifyResult};
        let db = self.ctx.db.clone();
        let audit = self.ctx.audit.clone();
        let mesh_id = self.mesh_id().to_owned();
        self.reply_later(async move {
            let reply = match frame {
                ClientFrame::AuditQuery {
                    limit,
                    offset,
                    event_type,
                } => match db
                    .audit_page(&mesh_id, event_type.as_deref(), limit, offset)
                    .await
                {
                    Ok((rows, total)) => BrokerFrame::AuditResult(AuditResult {
                        entries: rows
                            .into_iter()
                            .map(|r| AuditEntry {
                                id: r.seq,
                                event_type: r.event_type,
                                actor: r.actor,
                                payload: raw(&r.payload),
                                hash: r.hash,
                                sig: r.sig,
                                created_at: iso8601_ms(r.created_at),
                            })
                            .collect(),
                        total,
                        req_id,
                    }),
                    Err(e) => return store_unavailable("audit", req_id, &e),
                },
                ClientFrame::AuditVerify => match db.audit_rows(&mesh_id).await {
                    Ok(rows) => {
                        let v = crate::features::audit::engine::verify_rows(
                            &rows,
                            &audit.verifying_key(),
                        );
                        BrokerFrame::AuditVerifyResult(AuditVerifyResult {
                            valid: v.valid,
                            entries: v.entries,
                            broken_at: v.broken_at,
                            reason: v.reason,
                            req_id,
                        })
                    }
                    Err(e) => return store_unavailable("audit", req_id, &e),
                },
                _ => return None,
            };
            Some(reply.to_json().into())
        });
    }
}
