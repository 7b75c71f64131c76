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

/// One link's catch-up of one mesh, as each feature contributes to it.
pub(crate) struct CatchUp<'a> {
    pub(crate) ctx: &'a Ctx,
    pub(crate) link: &'a LinkShared,
    pub(crate) hub: &'a MeshHub,
    /// Bytes of one part of a list (well below the peer broker's frame limit).
    pub(crate) budget: usize,
}

impl CatchUp<'_> {
    /// The mesh's id.
    pub(crate) fn mesh_id(&self) -> &str {
        &self.hub.row.id
    }

    /// Queues a frame (see [`send_catch_up`]); `false` when the link ended.
    pub(crate) async fn send(&self, frame: Frame) -> bool {
        send_catch_up(self.link, frame).await
    }

    /// Sends a frame for each row read (`frame` may skip one); a failed read is logged
    /// and skipped (the next catch-up reads again). `false` when the link ended.
    pub(crate) async fn send_rows<T>(
        &self,
        what: &'static str,
        rows: Result<Vec<T>, StoreError>,
        frame: impl Fn(T) -> Option<Frame>,
    ) -> bool {
        match rows {
            Ok(rows) => {
                for f in rows.into_iter().filter_map(frame) {
                    if !self.send(f).await {
                        return false;
                    }
                }
            }
            Err(e) => warn!(cause = %e, what, "reading for a peer's catch-up"),
        }
        true
    }

    /// Member id → member key of the members hosted here (whose memories and contexts
    /// this broker speaks for).
    pub(crate) fn local_members(&self) -> HashMap<String, String> {
        self.hub
            .local_members()
            .into_iter()
            .map(|(pk, m)| (m.id, pk))
            .collect()
    }
}

/// Sends a peer broker what converges without the outbox, feature by feature (each stops
/// the rest when the link ends). Full lists (MCP servers, files) replace what that broker
/// knew from us, so withdrawals made while the link was down are not missed.
pub(crate) async fn catch_up(ctx: &Ctx, link: &LinkShared, hub: &MeshHub) {
    let budget = ctx
        .config
        .federation
        .as_ref()
        .map_or(CATCH_UP_PART_BYTES, |f| {
            CATCH_UP_PART_BYTES.min(f.max_frame_bytes / 2)
        });
    let c = CatchUp {
        ctx,
        link,
        hub,
        budget,
    };
    use crate::features::{clock, contexts, files, mcp, memory, skills, state, tasks};
    let _ = clock::catch_up(&c).await
        && mcp::catch_up(&c).await
        && files::catch_up(&c).await
        && state::catch_up(&c).await
        && skills::catch_up(&c).await
        && contexts::catch_up(&c).await
        && memory::catch_up(&c).await
        && tasks::catch_up(&c).await
        && crate::features::topics::catch_up(&c).await;
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
