//! `execute_code` (meshd extension; the seed's "per-mesh compute sandboxes"): a member
//! runs a short python, node or bash program on the broker's host, in a bubblewrap
//! sandbox per run (see [`sandbox`] for what it can and cannot reach). Reached by the
//! `execute_code` frame and by the `execute_code` tool of the broker's built-in MCP
//! server (`meshd`), with the same arguments.
//!
//! Who may run: every member, or admins only (`sandbox.role`). Each mesh runs at most
//! `sandbox.per_mesh` programs at once (more wait for a slot — up to the wall time —
//! then are refused `busy`), and each member may start `sandbox.runs_per_minute`.
//! Off unless `sandbox.enabled`; enabled on a host that cannot sandbox, the daemon
//! refuses to start (see `lib.rs`).

// The only module allowed `unsafe`: process set-up between fork and exec, rlimits,
// wait4 and memfds have no safe std API (see the module's SAFETY comments).
#[allow(unsafe_code)]
pub mod sandbox;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use base64::Engine as _;
use meshd_protocol::exec::{Finished, Output, OutputFile, Request};
use tokio::sync::Semaphore;

use crate::hub::Outbound;
use crate::session::*;
use sandbox::{Outcome, Sandbox};

/// The feature's state: the checked sandbox, per-mesh slots, per-member rates.
#[derive(Debug, Default)]
pub(crate) struct Exec {
    sandbox: Option<Sandbox>,
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
    starts: Mutex<HashMap<String, (Instant, u32)>>,
}

/// Why a run was refused before it started.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RunError {
    #[error("execute_code is not enabled on this broker ([sandbox] enabled = true)")]
    Disabled,
    #[error("only a mesh admin may run code here")]
    Forbidden,
    #[error("at most {0} runs per minute per member")]
    RateLimited(u32),
    #[error("the mesh already runs its {0} programs at once; try again")]
    Busy(usize),
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
}

impl RunError {
    pub(crate) const fn code(&self) -> &'static str {
        match self {
            Self::Disabled => "not_enabled",
            Self::Forbidden => "forbidden",
            Self::RateLimited(_) => "rate_limited",
            Self::Busy(_) => "busy",
            Self::Sandbox(_) => "sandbox_error",
        }
    }
}

impl Exec {
    /// Checks the host can sandbox when the feature is on.
    ///
    /// # Errors
    /// The sandbox cannot be made (the daemon then refuses to start).
    pub(crate) fn new(cfg: &meshd_config::Sandbox) -> Result<Self, sandbox::SandboxError> {
        Ok(Self {
            sandbox: if cfg.enabled {
                Some(Sandbox::probe(cfg)?)
            } else {
                None
            },
            ..Self::default()
        })
    }

    /// Runs `req` for a member of `mesh_id` (`admin`: whether it is a mesh admin).
    pub(crate) async fn run(
        &self,
        cfg: &meshd_config::Sandbox,
        mesh_id: &str,
        member_id: &str,
        admin: bool,
        req: &Request,
        stream: Option<tokio::sync::mpsc::Sender<sandbox::Chunk>>,
    ) -> Result<Outcome, RunError> {
        let sb = self.sandbox.as_ref().ok_or(RunError::Disabled)?;
        if cfg.admin_only && !admin {
            return Err(RunError::Forbidden);
        }
        {
            let mut starts = crate::hub::lock(&self.starts);
            let now = crate::time::std_instant();
            let e = starts
                .entry(format!("{mesh_id}/{member_id}"))
                .or_insert((now, 0));
            if now.duration_since(e.0).as_secs() >= 60 {
                *e = (now, 0);
            }
            if e.1 >= cfg.runs_per_minute {
                return Err(RunError::RateLimited(cfg.runs_per_minute));
            }
            e.1 += 1;
            if starts.len() > 100_000 {
                starts.retain(|_, (t, _)| now.duration_since(*t).as_secs() < 60);
            }
        }
        let slots = crate::hub::lock(&self.slots)
            .entry(mesh_id.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(cfg.per_mesh)))
            .clone();
        let _permit = tokio::time::timeout(cfg.wall_time, slots.acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(RunError::Busy(cfg.per_mesh))?;
        Ok(sb.run(req, stream).await?)
    }
}

/// The answer's frame body for an outcome.
fn result(o: Outcome, req_id: Option<String>) -> Finished {
    let b64 = base64::engine::general_purpose::STANDARD;
    Finished {
        exit_code: o.exit_code,
        signal: o.signal,
        limit: o.limit,
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        truncated: o.truncated,
        time_ms: u64::try_from(o.wall.as_millis()).unwrap_or(u64::MAX),
        cpu_ms: u64::try_from(o.cpu.as_millis()).unwrap_or(u64::MAX),
        max_rss_kb: o.max_rss_kb,
        files: o
            .files
            .into_iter()
            .map(|(name, bytes, size)| OutputFile {
                name,
                content: bytes.map(|b| b64.encode(b)),
                size,
            })
            .collect(),
        req_id,
    }
}

impl Session {
    /// `execute_code`.
    pub(crate) fn on_execute_code(&mut self, req: Request, req_id: Option<String>) {
        let ctx = self.ctx.clone();
        let mesh_id = self.mesh_id().to_owned();
        let member_id = self.member_id.clone();
        let admin = self.is_admin();
        let shared = self.shared.clone();
        self.reply_later(async move {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<sandbox::Chunk>(64);
            let streaming = req.stream;
            let rid = req_id.clone();
            // Output chunks go to this connection's queue as they come.
            let pump = tokio::spawn(async move {
                while let Some((stream, data)) = rx.recv().await {
                    let f = Output {
                        stream,
                        data: String::from_utf8_lossy(&data).into_owned(),
                        req_id: rid.clone(),
                    };
                    let text = serde_json::to_string(&f).unwrap_or_default();
                    let _ = shared.try_queue(Outbound::Frame(text.into()));
                }
            });
            let run = ctx
                .exec
                .run(
                    &ctx.config.sandbox,
                    &mesh_id,
                    &member_id,
                    admin,
                    &req,
                    streaming.then_some(tx),
                )
                .await;
            let _ = pump.await;
            match run {
                Ok(o) => {
                    ctx.metrics.exec_runs.inc(o.limit.unwrap_or("ok"));
                    Some(
                        serde_json::to_string(&result(o, req_id))
                            .unwrap_or_default()
                            .into(),
                    )
                }
                Err(e) => {
                    ctx.metrics.exec_runs.inc(e.code());
                    error(e.code(), e.to_string(), req_id)
                }
            }
        });
    }
}

/// The built-in MCP tool: the frame's arguments; the result's JSON.
pub(crate) async fn tool(
    ctx: &crate::Ctx,
    mesh_id: &str,
    member_id: &str,
    admin: bool,
    args: &str,
) -> Result<serde_json::Value, String> {
    let req = meshd_protocol::exec::decode(args).map_err(|e| format!("invalid arguments: {e}"))?;
    let o = ctx
        .exec
        .run(&ctx.config.sandbox, mesh_id, member_id, admin, &req, None)
        .await
        .map_err(|e| e.to_string())?;
    ctx.metrics.exec_runs.inc(o.limit.unwrap_or("ok"));
    serde_json::to_value(result(o, None)).map_err(|e| e.to_string())
}
