//! `mesh_info`: the mesh at a glance.

use meshd_protocol::broker::BrokerFrame;

use crate::session::*;
use crate::time::now_ms;

impl Session {
    /// `mesh_info`: an overview from the hub and the stores.
    pub(crate) fn queue_mesh_info(&mut self, req_id: Option<String>) {
        use meshd_protocol::broker::{MeshInfoResult, TaskCounts};
        let db = self.ctx.db.clone();
        let mesh = self.mesh.clone();
        let viewer = self.member_pubkey.clone();
        let conn = self.conn;
        let your_name = self.display_name.clone();
        let your_groups = self
            .mesh
            .local_peer(self.conn, |p| p.groups.clone())
            .unwrap_or_default();
        self.reply_later(async move {
            let id = mesh.row.id.clone();
            let (memory_count, tasks, streams, file_count) = match tokio::try_join!(
                db.memory_count(&id),
                db.task_counts(&id),
                db.streams(&id),
                db.file_count(&id, now_ms())
            ) {
                Ok(v) => v,
                Err(e) => return store_unavailable("mesh_info", req_id, &e),
            };
            let info = MeshInfoResult {
                peers: mesh.peers_for(&viewer, conn).len(),
                groups: mesh
                    .groups_in_use(&viewer)
                    .into_iter()
                    .map(|g| format!("@{g}"))
                    .collect(),
                state_keys: mesh.state_list().into_iter().map(|(k, _)| k).collect(),
                memory_count,
                file_count,
                tasks: TaskCounts {
                    open: tasks.0,
                    claimed: tasks.1,
                    done: tasks.2,
                },
                streams: streams.into_iter().map(|s| s.name).collect(),
                tables: Vec::new(),
                collections: Vec::new(),
                your_name,
                your_groups,
                mesh: id,
                req_id,
            };
            Some(BrokerFrame::MeshInfoResult(info).to_json().into())
        });
    }
}
