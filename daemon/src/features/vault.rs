//! Vault (HEAD §5): each member's own secrets, encrypted by the client before they
//! arrive (a random key per entry, sealed to the member key). Scoped to (mesh, member):
//! every session of the member sees them, nobody else does.

pub mod store;

use meshd_protocol::broker::BrokerFrame;
use meshd_protocol::time::iso8601_ms;
use meshd_protocol::vault::{EntryType, ListedEntry, Reply, Request, SecretEntry};

use tracing::warn;

use crate::features::vault::store::{VaultRow, VaultSetError};
use crate::session::*;

impl Session {
    /// `vault_set` / `vault_list` / `vault_get` / `vault_delete`.
    pub(crate) fn queue_vault(&mut self, request: Request, req_id: Option<String>, now: i64) {
        let db = self.ctx.db.clone();
        let mesh_id = self.mesh_id().to_owned();
        let member_id = self.member_id.clone();
        self.reply_later(async move {
            let failed = |e: &dyn std::fmt::Display, req_id| {
                warn!(cause = %e, "vault");
                error("vault_error", "the broker's store is unavailable", req_id)
            };
            let reply = match request {
                Request::Set(set) => {
                    let row = VaultRow {
                        key: set.key,
                        ciphertext: set.ciphertext,
                        nonce: set.nonce,
                        sealed_key: set.sealed_key,
                        entry_type: set.entry_type.as_str().to_owned(),
                        mount_path: set.mount_path,
                        description: set.description,
                        updated_at: now,
                    };
                    match db.vault_set(&mesh_id, &member_id, &row).await {
                        Ok(()) => Reply::VaultAck {
                            key: row.key,
                            action: "stored",
                            req_id,
                        },
                        Err(e @ VaultSetError::Full) => {
                            return error("vault_error", e.to_string(), req_id);
                        }
                        Err(VaultSetError::Store(e)) => return failed(&e, req_id),
                    }
                }
                Request::List => match db.vault_list(&mesh_id, &member_id).await {
                    Ok(rows) => Reply::VaultListResult {
                        entries: rows
                            .into_iter()
                            .map(|r| ListedEntry {
                                entry_type: EntryType::parse(&r.entry_type),
                                key: r.key,
                                mount_path: r.mount_path,
                                description: r.description,
                                updated_at: iso8601_ms(r.updated_at),
                            })
                            .collect(),
                        req_id,
                    },
                    Err(e) => return failed(&e, req_id),
                },
                Request::Get { keys } => {
                    let rows = if keys.is_empty() {
                        Vec::new()
                    } else {
                        match db.vault_list(&mesh_id, &member_id).await {
                            Ok(rows) => rows,
                            Err(e) => return failed(&e, req_id),
                        }
                    };
                    Reply::VaultGetResult {
                        entries: rows
                            .into_iter()
                            .filter(|r| keys.contains(&r.key))
                            .map(|r| SecretEntry {
                                entry_type: EntryType::parse(&r.entry_type),
                                key: r.key,
                                ciphertext: r.ciphertext,
                                nonce: r.nonce,
                                sealed_key: r.sealed_key,
                                mount_path: r.mount_path,
                            })
                            .collect(),
                        req_id,
                    }
                }
                Request::Delete { key } => {
                    match db.vault_delete(&mesh_id, &member_id, &key).await {
                        Ok(found) => Reply::VaultAck {
                            key,
                            action: if found { "deleted" } else { "not_found" },
                            req_id,
                        },
                        Err(e) => return failed(&e, req_id),
                    }
                }
            };
            Some(BrokerFrame::Vault(reply).to_json().into())
        });
    }
}
