//! Catch-up: what a link sends when it comes up (state, memories, contexts, tasks,
//! skills, files, MCP servers), in parts of bounded size.

use super::*;

/// Queues a catch-up frame on the live stream, leaving half of it to live traffic: a
/// sender awaiting room would be handed every freed slot, so broadcasts and calls
/// (queued without waiting) would be dropped for the whole catch-up. `false` when the
/// link ended.
pub(crate) async fn send_catch_up(link: &LinkShared, mut frame: Frame) -> bool {
    loop {
        let drained = link.live_drained.notified();
        tokio::pin!(drained);
        drained.as_mut().enable();
        if link.live.capacity() > LIVE_QUEUE / 2 {
            match link.live.try_send(frame) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
                Err(mpsc::error::TrySendError::Full(f)) => frame = f,
            }
        }
        tokio::select! {
            () = drained => {}
            () = link.live.closed() => return false,
        }
    }
}

/// Sends a peer what converges without the outbox: the clock, MCP servers and files
/// (full lists), shared state, skills, contexts, memories, tasks. Waits for room on
/// the live stream (see [`send_catch_up`]); stops when the link ends.
pub(crate) async fn catch_up(ctx: &Ctx, link: &LinkShared, hub: &MeshHub) {
    let m = hub.row.id.clone();
    let send = |frame: Frame| send_catch_up(link, frame);
    if let Some(c) = ctx.clocks.set_of(&m)
        && !send(Frame::Clock(Box::new(c))).await
    {
        return;
    }
    // Full lists replace what the peer knew from us, so withdrawals made while the
    // link was down are not missed. They go in parts that stay well below any frame
    // limit; the first names every MCP server, so the peer drops the others.
    let budget = ctx
        .config
        .federation
        .as_ref()
        .map_or(CATCH_UP_PART_BYTES, |f| {
            CATCH_UP_PART_BYTES.min(f.max_frame_bytes / 2)
        });
    // MCP servers: every name first, in a frame of its own (a part holding a large
    // registration could exceed a small frame limit and be dropped), then the servers.
    let sets = ctx.mcp.local_sets(&m);
    let names = Frame::McpServers {
        mesh_id: m.clone(),
        servers: Vec::new(),
        all: Some(sets.iter().map(|s| s.name.clone()).collect()),
    };
    if !send(names).await {
        return;
    }
    let mcp_size = |s: &meshd_protocol::fed::McpServerSet| {
        s.name.len() + s.hosted_by.len() + s.description.len() + s.tools_json.len() + 256
    };
    for servers in parts(sets, budget, mcp_size) {
        if servers.is_empty() {
            continue;
        }
        let frame = Frame::McpServers {
            mesh_id: m.clone(),
            servers,
            all: None,
        };
        if !send(frame).await {
            return;
        }
    }
    // Files: the empty full list first (the peer forgets ours), then the list read
    // after it, so a file uploaded meanwhile is in the list or arrives after it.
    let files = |files, full| Frame::Files {
        mesh_id: m.clone(),
        files,
        full,
    };
    if !send(files(Vec::new(), true)).await {
        return;
    }
    match ctx.db.local_files(&m, now_ms()).await {
        Ok(rows) => {
            let sets = rows
                .iter()
                .map(|f| crate::files::file_set(f, false))
                .collect();
            for part in parts(sets, budget, file_set_size) {
                if !part.is_empty() && !send(files(part, false)).await {
                    return;
                }
            }
        }
        Err(e) => warn!(cause = %e, "reading files for a peer"),
    }
    for (key, v) in hub.state_list() {
        let frame = Frame::State(Box::new(StateSet {
            mesh_id: m.clone(),
            key,
            value: v.value.to_string(),
            updated_by: v.updated_by,
            updated_at: v.updated_at,
            member_pubkey: String::new(),
        }));
        if !send(frame).await {
            return;
        }
    }
    match ctx.db.skills(&m).await {
        Ok(skills) => {
            for row in skills {
                if !send(Frame::Skill(Box::new(skill_set(row, false)))).await {
                    return;
                }
            }
        }
        Err(e) => warn!(cause = %e, "reading skills for a peer"),
    }
    // Memories and contexts of the members hosted here (and every forgetting: any
    // member may forget).
    let local: HashMap<String, String> = hub
        .local_members()
        .into_iter()
        .map(|(pk, m)| (m.id, pk))
        .collect();
    match ctx.db.contexts(&m).await {
        Ok(rows) => {
            for row in rows {
                if let Some(pk) = local.get(&row.member_id)
                    && !send(Frame::Context(Box::new(context_set(row, pk)))).await
                {
                    return;
                }
            }
        }
        Err(e) => warn!(cause = %e, "reading contexts for a peer"),
    }
    match ctx.db.memories_by(&m, MEMORY_CATCH_UP).await {
        Ok(rows) => {
            for (row, forgotten_at) in rows {
                let frame = match local.get(&row.remembered_by) {
                    Some(pk) => Frame::Memory(Box::new(memory_set(row, pk, forgotten_at))),
                    None => match forgotten_at {
                        Some(at) => Frame::Forget {
                            mesh_id: row.mesh_id,
                            id: row.id,
                            at,
                        },
                        None => continue,
                    },
                };
                if !send(frame).await {
                    return;
                }
            }
        }
        Err(e) => warn!(cause = %e, "reading memories for a peer"),
    }
    match ctx.db.tasks_full(&m, TASK_CATCH_UP).await {
        Ok(rows) => {
            for t in rows {
                if !send(Frame::Task(Box::new(task_set(hub, t)))).await {
                    return;
                }
            }
        }
        Err(e) => warn!(cause = %e, "reading tasks for a peer"),
    }
}

/// When the live catch-up is sent a second time after a link comes up.
pub(crate) const CATCH_UP_AGAIN: Duration = Duration::from_secs(5);

/// Bytes of one catch-up part (a list split into frames), at most half the frame limit.
pub(crate) const CATCH_UP_PART_BYTES: usize = 256 * 1024;

/// Splits `items` into parts whose estimated `size` stays within `budget` (an item
/// larger than it goes alone). Always at least one part, so a full list is sent even
/// when empty.
pub(crate) fn parts<T>(items: Vec<T>, budget: usize, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut used = 0usize;
    for item in items {
        let n = size(&item);
        if !current.is_empty() && used.saturating_add(n) > budget {
            out.push(std::mem::take(&mut current));
            used = 0;
        }
        used = used.saturating_add(n);
        current.push(item);
    }
    out.push(current);
    out
}

/// Upper estimate of a file entry's encoded size.
pub(crate) fn file_set_size(f: &meshd_protocol::fed::FileSet) -> usize {
    [
        &f.id,
        &f.name,
        &f.sha256,
        &f.tags,
        &f.owner_pubkey,
        &f.uploader_member_id,
        &f.uploader_pubkey,
        &f.uploaded_by_name,
    ]
    .iter()
    .map(|s| s.len() + 5)
    .sum::<usize>()
        + f.mime_type.as_ref().map_or(0, String::len)
        + f.target_spec.as_ref().map_or(0, String::len)
        + 64
}
