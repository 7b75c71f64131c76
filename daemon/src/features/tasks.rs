//! Tasks: create, claim, complete, get, list.

use meshd_protocol::broker::{BrokerFrame, ErrorFrame};
use meshd_protocol::client::ClientFrame;
use meshd_protocol::time::iso8601_ms;
use tracing::warn;

use crate::session::*;
use crate::store::StoreError;

impl Session {
    /// Tasks. `claim_task` and `complete_task` are answered with the task list; their
    /// failures are answered only to a request with a `_reqId` (the CLI sends them
    /// without one, and would hand an uncorrelated error to another waiter).
    pub(crate) fn queue_task(&mut self, frame: ClientFrame, req_id: Option<String>, now: i64) {
        use meshd_protocol::broker::{TaskCreated, TaskEntry, TaskList};
        let db = self.ctx.db.clone();
        let ctx = self.ctx.clone();
        let mesh_id = self.mesh_id().to_owned();
        let me = self.display_name.clone();
        let member_pubkey = self.member_pubkey.clone();
        let fed = self.ctx.fed.clone();
        let hub = self.mesh.clone();
        // A task that changed here goes to the mesh's other brokers.
        let replicate = move |db: crate::store::Db, mesh_id: String, id: String| async move {
            if let Some(fed) = fed
                && let Ok(Some(t)) = db.task_full(&mesh_id, &id).await
            {
                fed.task_changed(crate::fed::task_set(&hub, t));
            }
        };
        self.replies.push_back(Box::pin(async move {
            let error = |code: &'static str, msg: &str, req_id: Option<String>| {
                req_id.is_some().then(|| {
                    BrokerFrame::Error(ErrorFrame::new(code, msg).with_req_id(req_id))
                        .to_json()
                        .into()
                })
            };
            let list = |rows: Vec<crate::store::tasks::TaskRow>, req_id| {
                BrokerFrame::TaskList(TaskList {
                    tasks: rows
                        .into_iter()
                        .map(|t| TaskEntry {
                            tags: serde_json::from_str(&t.tags).unwrap_or_default(),
                            id: t.id,
                            title: t.title,
                            assignee: t.assignee,
                            claimed_by: t.claimed_by,
                            status: t.status,
                            priority: t.priority,
                            created_by: t.created_by,
                            created_at: iso8601_ms(t.created_at),
                            result: t.result,
                        })
                        .collect(),
                    req_id,
                })
            };
            let store_err = |e: &StoreError, req_id| {
                warn!(cause = %e, "tasks");
                error("internal", "the broker's store is unavailable", req_id)
            };
            let reply = match frame {
                ClientFrame::CreateTask(t) => {
                    let row = crate::store::tasks::TaskRow {
                        id: crate::ids::random_id(),
                        mesh_id,
                        title: t.title,
                        assignee: t.assignee,
                        claimed_by: None,
                        priority: t.priority.unwrap_or_else(|| "normal".into()),
                        status: "open".into(),
                        tags: serde_json::to_string(&t.tags).unwrap_or_else(|_| "[]".into()),
                        result: None,
                        created_by: Some(me),
                        created_at: now,
                    };
                    let weight =
                        i64::try_from(row.title.len() + row.tags.len()).unwrap_or(i64::MAX);
                    if let Err(e) = crate::quota::check(
                        &ctx,
                        crate::quota::Kind::Tasks,
                        &row.mesh_id,
                        &member_pubkey,
                        crate::quota::Usage::new(1, weight),
                    ) {
                        return error(crate::quota::QuotaExceeded::CODE, &e.to_string(), req_id);
                    }
                    match db.insert_task(&row, &member_pubkey).await {
                        Ok(true) => {
                            replicate(db.clone(), row.mesh_id.clone(), row.id.clone()).await;
                            BrokerFrame::TaskCreated(TaskCreated { id: row.id, req_id })
                        }
                        Ok(false) => {
                            return error(
                                "tasks_full",
                                "this mesh has too many open tasks",
                                req_id,
                            );
                        }
                        Err(e) => return store_err(&e, req_id),
                    }
                }
                ClientFrame::ClaimTask { task_id } => {
                    match db.claim_task(&mesh_id, &task_id, &me, now).await {
                        Ok(true) => {
                            replicate(db.clone(), mesh_id.clone(), task_id.clone()).await;
                            match db.tasks(&mesh_id, None, None).await {
                                Ok(rows) => list(rows, req_id),
                                Err(e) => return store_err(&e, req_id),
                            }
                        }
                        Ok(false) => {
                            return error(
                                "task_not_claimable",
                                "no open task with that id",
                                req_id,
                            );
                        }
                        Err(e) => return store_err(&e, req_id),
                    }
                }
                ClientFrame::CompleteTask { task_id, result } => {
                    // A result is weighed against the task's creator (and the mesh).
                    if let Some(r) = &result {
                        let creator = match db.task_full(&mesh_id, &task_id).await {
                            Ok(t) => t
                                .and_then(|t| t.creator_pubkey)
                                .unwrap_or_else(|| member_pubkey.clone()),
                            Err(e) => return store_err(&e, req_id),
                        };
                        let weight = i64::try_from(r.len()).unwrap_or(i64::MAX);
                        if let Err(e) = crate::quota::check(
                            &ctx,
                            crate::quota::Kind::Tasks,
                            &mesh_id,
                            &creator,
                            crate::quota::Usage::new(0, weight),
                        ) {
                            return error(
                                crate::quota::QuotaExceeded::CODE,
                                &e.to_string(),
                                req_id,
                            );
                        }
                    }
                    match db
                        .complete_task(&mesh_id, &task_id, result.as_deref(), now)
                        .await
                    {
                        Ok(true) => {
                            replicate(db.clone(), mesh_id.clone(), task_id.clone()).await;
                            match db.tasks(&mesh_id, None, None).await {
                                Ok(rows) => list(rows, req_id),
                                Err(e) => return store_err(&e, req_id),
                            }
                        }
                        Ok(false) => {
                            return error("task_not_found", "no task with that id", req_id);
                        }
                        Err(e) => return store_err(&e, req_id),
                    }
                }
                ClientFrame::ListTasks { status, assignee } => {
                    match db
                        .tasks(&mesh_id, status.as_deref(), assignee.as_deref())
                        .await
                    {
                        Ok(rows) => list(rows, req_id),
                        Err(e) => return store_err(&e, req_id),
                    }
                }
                ClientFrame::GetTask { task_id } => match db.task_full(&mesh_id, &task_id).await {
                    Ok(Some(t)) => {
                        let status = t.progress().status().to_owned();
                        BrokerFrame::TaskData(meshd_protocol::broker::TaskData {
                            task: TaskEntry {
                                tags: serde_json::from_str(&t.tags).unwrap_or_default(),
                                id: t.id,
                                title: t.title,
                                assignee: t.assignee,
                                claimed_by: t.claimed_by,
                                status,
                                priority: t.priority,
                                created_by: t.created_by,
                                created_at: iso8601_ms(t.created_at),
                                result: t.result,
                            },
                            req_id,
                        })
                    }
                    Ok(None) => {
                        return error("not_found", "no such task in this mesh", req_id);
                    }
                    Err(e) => return store_err(&e, req_id),
                },
                _ => return None,
            };
            Some(reply.to_json().into())
        }));
    }
}
