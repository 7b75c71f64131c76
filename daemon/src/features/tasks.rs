//! Tasks: create, claim, complete, get, list.

pub mod store;

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
                fed.task_changed(task_set(&hub, t));
            }
        };
        self.reply_later(async move {
            let error = |code: &'static str, msg: &str, req_id: Option<String>| {
                req_id.is_some().then(|| {
                    BrokerFrame::Error(ErrorFrame::new(code, msg).with_req_id(req_id))
                        .to_json()
                        .into()
                })
            };
            let list = |rows: Vec<crate::features::tasks::store::TaskRow>, req_id| {
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
                    let row = crate::features::tasks::store::TaskRow {
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
                            crate::features::dashboard::touched(&ctx, &row.mesh_id, "tasks");
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
                            crate::features::dashboard::touched(&ctx, &mesh_id, "tasks");
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
                            crate::features::dashboard::touched(&ctx, &mesh_id, "tasks");
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

    use crate::hub::MeshHub;

    use crate::store::StoreError;
    use crate::time::now_ms;

    use crate::fed::*;
    use meshd_protocol::fed::Frame;

    /// Tasks a peer broker is sent when its link comes up (newest first).
    pub(crate) const TASK_CATCH_UP: i64 = 10_000;

    /// A stored task as a federation frame (`hub`: its mesh, to tell whether this broker
    /// hosts the creator).
    pub(crate) fn task_set(
        hub: &MeshHub,
        t: crate::features::tasks::store::TaskFull,
    ) -> meshd_protocol::fed::TaskSet {
        let creator_hosted = t
            .creator_pubkey
            .as_deref()
            .and_then(|k| hub.member(k))
            .is_some_and(|m| m.home.is_none());
        meshd_protocol::fed::TaskSet {
            creator_hosted,
            tags: serde_json::from_str(&t.tags).unwrap_or_default(),
            mesh_id: t.mesh_id,
            id: t.id,
            title: t.title,
            assignee: t.assignee,
            priority: t.priority,
            created_by: t.created_by,
            creator_pubkey: t.creator_pubkey.unwrap_or_default(),
            created_at: t.created_at,
            claimed_by: t.claimed_by,
            claimed_at: t.claimed_at,
            result: t.result,
            completed_at: t.completed_at,
        }
    }

    /// Merges a peer broker's view of a task. A task new here must have been created by a
    /// member the peer hosts; progress (claims, completions) merges from any sharing broker.
    pub(crate) async fn apply_task(
        ctx: &Ctx,
        link: &LinkShared,
        t: meshd_protocol::fed::TaskSet,
    ) -> Result<(), RejectReason> {
        use crate::features::tasks::store::{TaskFull, TaskProgress};
        use meshd_protocol::client::{
            MAX_GROUPS, MAX_NAME_LEN, MAX_SKILL_INSTRUCTIONS, MAX_SUMMARY_LEN,
        };
        if !link.accepts(&t.mesh_id) {
            return Err(RejectReason::NotShared);
        }
        let name_ok = |n: &Option<String>| n.as_ref().is_none_or(|n| n.len() <= MAX_NAME_LEN);
        // Claims and completions win by being earliest: times before the task existed or
        // from the future are refused, so no broker can win every race with a zero.
        let now = now_ms();
        let plausible = |at: Option<i64>| {
            at.is_none_or(|at| at >= t.created_at && at <= now.saturating_add(5 * 60_000))
        };
        if !plausible(t.claimed_at)
            || !plausible(t.completed_at)
            || t.created_at > now.saturating_add(5 * 60_000)
            || t.id.is_empty()
            || t.id.len() > 64
            || t.title.len() > MAX_SUMMARY_LEN
            || t.priority.len() > MAX_NAME_LEN
            || !name_ok(&t.assignee)
            || !name_ok(&t.created_by)
            || !name_ok(&t.claimed_by)
            || t.tags.len() > MAX_GROUPS
            || t.tags.iter().any(|x| x.len() > MAX_NAME_LEN)
            || t.result
                .as_ref()
                .is_some_and(|r| r.len() > MAX_SKILL_INSTRUCTIONS)
        {
            return Err(RejectReason::Invalid);
        }
        let store = |e: StoreError| {
            warn!(cause = %e, "storing a peer's task");
            RejectReason::Invalid
        };
        let incoming = TaskFull {
            tags: serde_json::to_string(&t.tags).unwrap_or_else(|_| "[]".into()),
            id: t.id,
            mesh_id: t.mesh_id,
            title: t.title,
            assignee: t.assignee,
            priority: t.priority,
            created_by: t.created_by,
            creator_pubkey: Some(t.creator_pubkey),
            created_at: t.created_at,
            claimed_by: t.claimed_by,
            claimed_at: t.claimed_at,
            result: t.result,
            completed_at: t.completed_at,
        };
        // Read, merge, compare-and-set; a local claim or completion in between makes the
        // write miss, and the merge is done again over what it wrote.
        for _ in 0..TASK_MERGE_ATTEMPTS {
            match ctx
                .db
                .task_full(&incoming.mesh_id, &incoming.id)
                .await
                .map_err(store)?
            {
                None => {
                    let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, &incoming.mesh_id).await else {
                        return Err(RejectReason::NotShared);
                    };
                    let creator = incoming.creator_pubkey.as_deref().unwrap_or_default();
                    if !hub.hosted_by(&link.broker, creator) {
                        return Err(RejectReason::ForgedSender);
                    }
                    ctx.db.insert_remote_task(&incoming).await.map_err(store)?;
                    // Not stored (the mesh's open tasks are at their cap) or stored as
                    // sent: done. Changed here meanwhile: merged next round.
                    match ctx
                        .db
                        .task_full(&incoming.mesh_id, &incoming.id)
                        .await
                        .map_err(store)?
                    {
                        Some(t) if t.progress() != incoming.progress() => {}
                        _ => return Ok(()),
                    }
                }
                Some(local) => {
                    let was = local.progress();
                    let merged: TaskProgress = was.merge(&incoming.progress());
                    if merged == was
                        || ctx
                            .db
                            .set_task_progress(&local.mesh_id, &local.id, &was, &merged)
                            .await
                            .map_err(store)?
                    {
                        return Ok(());
                    }
                }
            }
        }
        warn!(task = %incoming.id, "a peer's task kept changing here while merging; left for the next catch-up");
        Ok(())
    }

    /// Rounds of read-merge-write for one task from a peer before it is left to the next
    /// catch-up (each lost round means a local change won the race).
    pub(crate) const TASK_MERGE_ATTEMPTS: usize = 8;

    /// Catch-up: the mesh's newest tasks.
    pub(crate) async fn catch_up(c: &CatchUp<'_>) -> bool {
        let rows = c.ctx.db.tasks_full(c.mesh_id(), TASK_CATCH_UP).await;
        c.send_rows("tasks", rows, |t| {
            Some(Frame::Task(Box::new(task_set(c.hub, t))))
        })
        .await
    }
}

/// Telling the mesh's other brokers of a change made here.
impl crate::fed::Fed {
    /// A task changed here.
    pub(crate) fn task_changed(&self, t: meshd_protocol::fed::TaskSet) {
        let mesh_id = t.mesh_id.clone();
        self.to_every_link(&mesh_id, meshd_protocol::fed::Frame::Task(Box::new(t)));
    }
}
