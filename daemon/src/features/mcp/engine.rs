//! The MCP proxy: sessions offer MCP servers' tools to their mesh, other sessions call
//! them through the broker (`mcp_call` → `mcp_call_forward` → `mcp_call_response` →
//! `mcp_call_result`).
//!
//! Unlike the reference: a server name belongs to the member that registered it (another
//! member cannot take it over and receive its callers' arguments); only the session the
//! call was forwarded to may answer it (a `callId` alone proves nothing); a call to a
//! host that leaves fails at once instead of waiting for the timeout. Persistent
//! registrations are stored, so they survive the host's disconnect *and* a broker
//! restart (offline, with a clear error on call) and come back when a session of the
//! hosting member connects.
//!
//! Results go to the caller through its outbound queue, not its reply queue: a slow
//! tool must not hold back the caller's other replies.
//!
//! In a mesh shared across brokers, each broker tells the others which servers its
//! members host (a full list when a link comes up, then changes); a call for a server
//! hosted elsewhere goes over the link to the hosting broker, which forwards it to the
//! host and sends the result back. A broker speaks only for the members it hosts, and
//! only the broker a call was sent to may answer it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;
use meshd_protocol::broker::{BrokerFrame, McpCallForward, McpCallResult, McpServerEntry};
use meshd_protocol::client::{McpCall, McpRegister, McpTool};
use serde_json::value::RawValue;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::Ctx;
use crate::features::mcp::store::McpServerRow;
use crate::hub::{ConnId, Outbound, PeerShared, lock, offer};

/// Most servers one mesh registers.
pub(crate) const MAX_SERVERS_PER_MESH: usize = 256;
/// Most servers one member registers in a mesh.
pub(crate) const MAX_SERVERS_PER_MEMBER: usize = 32;
/// Largest tool list of one server (JSON bytes, schemas included).
const MAX_TOOLS_BYTES: usize = 256 * 1024;
/// Most calls one connection has in flight.
const MAX_CALLS_PER_CALLER: usize = 64;
/// Most calls a peer broker has in flight here (for all its sessions).
const MAX_CALLS_PER_BROKER: usize = 1_024;

/// The session hosting a server.
#[derive(Debug, Clone)]
pub(crate) struct Host {
    pub(crate) conn: ConnId,
    pub(crate) shared: Arc<PeerShared>,
}

/// A registered server.
#[derive(Debug)]
struct Server {
    member_id: String,
    member_pubkey: String,
    hosted_by: String,
    description: String,
    tools: Vec<McpTool>,
    persistent: bool,
    /// `None` while offline (a persistent server whose host left), and for a server of
    /// another broker.
    host: Option<Host>,
    offline_since: Option<i64>,
    /// The peer broker hosting it, and whether its host is connected there.
    remote: Option<(Arc<str>, bool)>,
}

impl Server {
    fn online(&self) -> bool {
        self.remote
            .as_ref()
            .map_or(self.host.is_some(), |(_, online)| *online)
    }

    fn to_set(&self, name: &str, removed: bool) -> meshd_protocol::fed::McpServerSet {
        meshd_protocol::fed::McpServerSet {
            name: name.to_owned(),
            member_id: self.member_id.clone(),
            member_pubkey: self.member_pubkey.clone(),
            hosted_by: self.hosted_by.clone(),
            description: self.description.clone(),
            tools_json: serde_json::to_string(&self.tools).unwrap_or_else(|_| "[]".into()),
            persistent: self.persistent,
            online: self.online(),
            offline_since: self.offline_since,
            removed,
        }
    }
}

/// Where a call's answer must come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CallHost {
    /// The hosting connection here.
    Conn(ConnId),
    /// The peer broker hosting the server.
    Broker(Arc<str>),
}

/// Who waits for a call's result.
#[derive(Debug)]
enum Caller {
    Local(Arc<PeerShared>),
    /// A peer broker, for one of its sessions, under its call id.
    Remote {
        broker: Arc<str>,
        call_id: String,
    },
}

/// A call waiting for its host's answer.
#[derive(Debug)]
struct Call {
    mesh_id: String,
    host: CallHost,
    caller: Caller,
    req_id: Option<String>,
    deadline: Instant,
}

impl Call {
    fn caller_is(&self, conn: ConnId) -> bool {
        matches!(&self.caller, Caller::Local(p) if p.conn_id == conn)
    }
}

/// What `register` needs to know about the registering session.
#[derive(Debug)]
pub(crate) struct Registrant<'a> {
    pub(crate) member_id: &'a str,
    pub(crate) member_pubkey: &'a str,
    pub(crate) display_name: &'a str,
    pub(crate) host: Host,
}

/// Why a registration was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RegisterError {
    /// Another member registered that name.
    #[error("the MCP server name {name:?} belongs to {hosted_by}; pick another name")]
    Taken { name: String, hosted_by: String },
    /// The mesh, or the member, has too many servers.
    #[error(
        "at most {MAX_SERVERS_PER_MESH} MCP servers per mesh and {MAX_SERVERS_PER_MEMBER} per member"
    )]
    Full,
    /// The tool list is too large.
    #[error("an MCP server's tools (with their schemas) are at most 256 KiB of JSON")]
    TooLarge,
}

/// A call that could not be forwarded; the text is the `mcp_call_result` error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct CallError(String);

/// Store writes of persistent registrations, applied in order by one task (a
/// registration and its withdrawal must not overtake each other), drained at shutdown.
#[derive(Debug)]
pub(crate) enum StoreOp {
    /// Store (or replace) a registration; the reply lets the ack follow the write.
    Upsert(
        McpServerRow,
        Option<oneshot::Sender<Result<(), crate::store::StoreError>>>,
    ),
    /// Remove a registration (withdrawn, or replaced by a non-persistent one).
    Delete { mesh_id: String, name: String },
    /// Its host left (`Some(ms)`) or is back (`None`).
    Offline {
        mesh_id: String,
        name: String,
        since: Option<i64>,
    },
}

/// Store operations waiting; when full, a registration is refused and other changes
/// are logged as lost (the in-memory registry stays right until a restart).
const STORE_QUEUE: usize = 4_096;

/// The registry and the calls in flight.
#[derive(Debug)]
pub(crate) struct Mcp {
    /// mesh → name → server.
    servers: Mutex<HashMap<String, BTreeMap<String, Server>>>,
    /// callId → call.
    calls: Mutex<HashMap<String, Call>>,
    /// A call was added (the timeout task re-reads the earliest deadline).
    wake: Notify,
    store_tx: mpsc::Sender<StoreOp>,
    store_rx: Mutex<Option<mpsc::Receiver<StoreOp>>>,
}

impl Default for Mcp {
    fn default() -> Self {
        let (store_tx, store_rx) = mpsc::channel(STORE_QUEUE);
        Self {
            servers: Mutex::default(),
            calls: Mutex::default(),
            wake: Notify::new(),
            store_tx,
            store_rx: Mutex::new(Some(store_rx)),
        }
    }
}

impl Mcp {
    /// Queues a store write. `false` when the queue is full.
    pub(crate) fn persist(&self, op: StoreOp) -> bool {
        match self.store_tx.try_send(op) {
            Ok(()) => true,
            Err(e) => {
                warn!(op = ?e.into_inner(), "MCP store queue full; change not stored");
                false
            }
        }
    }

    /// Loads the stored (persistent) registrations, offline until their member returns.
    pub(crate) fn load(&self, rows: Vec<McpServerRow>, now: i64) {
        let mut servers = lock(&self.servers);
        for r in rows {
            let tools = serde_json::from_str(&r.tools).unwrap_or_default();
            servers.entry(r.mesh_id).or_default().insert(
                r.name,
                Server {
                    member_id: r.member_id,
                    member_pubkey: r.member_pubkey,
                    hosted_by: r.hosted_by,
                    description: r.description,
                    tools,
                    persistent: true,
                    host: None,
                    offline_since: Some(r.offline_since.unwrap_or(now)),
                    remote: None,
                },
            );
        }
    }

    /// Registers (or re-registers) a server hosted by `who`. Returns the row to store
    /// when the registration is persistent, `None` when any stored row must go.
    pub(crate) fn register(
        &self,
        mesh_id: &str,
        r: McpRegister,
        who: Registrant<'_>,
        now: i64,
    ) -> Result<Option<McpServerRow>, RegisterError> {
        let McpRegister {
            server_name,
            description,
            tools,
            persistent,
        } = r;
        let name = server_name.as_str();
        let tools_json = serde_json::to_string(&tools).unwrap_or_else(|_| "[]".into());
        if tools_json.len() > MAX_TOOLS_BYTES {
            return Err(RegisterError::TooLarge);
        }
        if name == super::builtin::NAME {
            return Err(RegisterError::Taken {
                name: name.to_owned(),
                hosted_by: "the broker".to_owned(),
            });
        }
        let mut servers = lock(&self.servers);
        let mesh = servers.entry(mesh_id.to_owned()).or_default();
        let members = mesh
            .iter()
            .filter(|(n, s)| s.member_id == who.member_id && n.as_str() != name)
            .count();
        if members >= MAX_SERVERS_PER_MEMBER {
            return Err(RegisterError::Full);
        }
        match mesh.get(name) {
            Some(s) if s.member_id != who.member_id => {
                return Err(RegisterError::Taken {
                    name: name.to_owned(),
                    hosted_by: s.hosted_by.clone(),
                });
            }
            None if mesh.len() >= MAX_SERVERS_PER_MESH => return Err(RegisterError::Full),
            _ => {}
        }
        let row = persistent.then(|| McpServerRow {
            mesh_id: mesh_id.to_owned(),
            name: name.to_owned(),
            member_id: who.member_id.to_owned(),
            member_pubkey: who.member_pubkey.to_owned(),
            hosted_by: who.display_name.to_owned(),
            description: description.clone(),
            tools: tools_json,
            registered_at: now,
            offline_since: None,
        });
        mesh.insert(
            name.to_owned(),
            Server {
                member_id: who.member_id.to_owned(),
                member_pubkey: who.member_pubkey.to_owned(),
                hosted_by: who.display_name.to_owned(),
                description,
                tools,
                persistent,
                host: Some(who.host),
                offline_since: None,
                remote: None,
            },
        );
        Ok(row)
    }

    /// Withdraws a server of `member_id`. Returns its host's name and whether it was
    /// persistent, or `None` when there is no such server of this member.
    pub(crate) fn unregister(
        &self,
        mesh_id: &str,
        name: &str,
        member_id: &str,
    ) -> Option<(String, bool)> {
        let mut servers = lock(&self.servers);
        let mesh = servers.get_mut(mesh_id)?;
        let s = mesh.get(name)?;
        if s.member_id != member_id || s.remote.is_some() {
            return None;
        }
        let s = mesh.remove(name)?;
        Some((s.hosted_by, s.persistent))
    }

    /// The mesh's servers, by name.
    pub(crate) fn list(&self, mesh_id: &str) -> Vec<McpServerEntry> {
        let servers = lock(&self.servers);
        servers
            .get(mesh_id)
            .map(|mesh| {
                mesh.iter()
                    .map(|(name, s)| McpServerEntry {
                        name: name.clone(),
                        description: s.description.clone(),
                        hosted_by: s.hosted_by.clone(),
                        tools: s.tools.clone(),
                        online: s.online(),
                        offline_since: s.offline_since.map(meshd_protocol::time::iso8601_ms),
                        persistent: s.persistent,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Forwards a call to the server's host (here, or its broker). The caller gets
    /// `mcp_call_result` through its outbound queue when the host answers, leaves, or
    /// `timeout` passes.
    pub(crate) fn call(
        &self,
        ctx: &Ctx,
        mesh_id: &str,
        c: McpCall,
        caller: (&Arc<PeerShared>, &str, &str, Option<String>),
        now: i64,
    ) -> Result<(), CallError> {
        let McpCall {
            server_name,
            tool_name,
            args,
        } = c;
        let server_name = server_name.as_str();
        // Absent arguments are an empty object, as the reference's clients send them.
        let args = args.unwrap_or_else(|| crate::hub::raw("{}"));
        let (caller_shared, caller_name, caller_member_pubkey, req_id) = caller;
        enum Target {
            Here(Host),
            Broker(Arc<str>),
        }
        let target = {
            let servers = lock(&self.servers);
            let Some(s) = servers.get(mesh_id).and_then(|m| m.get(server_name)) else {
                return Err(CallError(format!(
                    "MCP server \"{server_name}\" not found in mesh"
                )));
            };
            if !s.online() {
                let mins = now.saturating_sub(s.offline_since.unwrap_or(now)).max(0) / 60_000;
                return Err(CallError(format!(
                    "Server '{server_name}' is offline — hosted by {} who disconnected {mins}m ago. It will restore when they reconnect.",
                    s.hosted_by
                )));
            }
            match (&s.host, &s.remote) {
                (_, Some((broker, _))) => Target::Broker(broker.clone()),
                (Some(h), None) => Target::Here(h.clone()),
                (None, None) => {
                    return Err(CallError("the MCP server's host is not connected".into()));
                }
            }
        };
        let call_id = crate::ids::uuid_v4();
        {
            let mut calls = lock(&self.calls);
            let mine = calls
                .values()
                .filter(|c| matches!(&c.caller, Caller::Local(p) if Arc::ptr_eq(p, caller_shared)))
                .count();
            if mine >= MAX_CALLS_PER_CALLER {
                return Err(CallError(format!(
                    "too many MCP calls in flight (at most {MAX_CALLS_PER_CALLER} per session)"
                )));
            }
            calls.insert(
                call_id.clone(),
                Call {
                    mesh_id: mesh_id.to_owned(),
                    host: match &target {
                        Target::Here(h) => CallHost::Conn(h.conn),
                        Target::Broker(b) => CallHost::Broker(b.clone()),
                    },
                    caller: Caller::Local(caller_shared.clone()),
                    req_id,
                    deadline: crate::time::instant() + ctx.config.limits.mcp_call_timeout,
                },
            );
        }
        self.wake.notify_one();
        let sent = match target {
            Target::Here(host) => {
                let forward = BrokerFrame::McpCallForward(McpCallForward {
                    call_id: call_id.clone(),
                    server_name: server_name.to_owned(),
                    tool_name,
                    args,
                    caller_name: caller_name.to_owned(),
                });
                offer(&host.shared, Outbound::Frame(forward.to_json().into()))
                    .then_some(())
                    .ok_or_else(|| format!("MCP server \"{server_name}\" host disconnected"))
            }
            Target::Broker(broker) => {
                let ask = meshd_protocol::fed::Frame::McpCall(Box::new(
                    meshd_protocol::fed::McpCallAsk {
                        mesh_id: mesh_id.to_owned(),
                        call_id: call_id.clone(),
                        server_name: server_name.to_owned(),
                        tool_name,
                        args: args.get().to_owned(),
                        caller_name: caller_name.to_owned(),
                        caller_member_pubkey: caller_member_pubkey.to_owned(),
                    },
                ));
                ctx.fed
                    .as_ref()
                    .is_some_and(|f| f.relay_send(&broker, mesh_id, ask))
                    .then_some(())
                    .ok_or_else(|| {
                        format!("the MCP server's broker {broker} cannot be reached now")
                    })
            }
        };
        sent.map_err(|e| {
            lock(&self.calls).remove(&call_id);
            CallError(e)
        })
    }

    /// A peer broker's call for a server hosted here: forwarded to the host; the result
    /// (or the refusal) goes back over the link.
    pub(crate) fn remote_call(
        &self,
        ctx: &Ctx,
        broker: &Arc<str>,
        a: meshd_protocol::fed::McpCallAsk,
    ) {
        let refuse = |error: String| {
            finish(
                ctx,
                Call {
                    mesh_id: a.mesh_id.clone(),
                    host: CallHost::Broker(broker.clone()),
                    caller: Caller::Remote {
                        broker: broker.clone(),
                        call_id: a.call_id.clone(),
                    },
                    req_id: None,
                    deadline: crate::time::instant(),
                },
                None,
                Some(error),
            );
        };
        let host = {
            let servers = lock(&self.servers);
            servers
                .get(&a.mesh_id)
                .and_then(|m| m.get(&a.server_name))
                .and_then(|s| s.host.clone().filter(|_| s.remote.is_none()))
        };
        let Some(host) = host else {
            return refuse(format!(
                "MCP server \"{}\" is not hosted at this broker now",
                a.server_name
            ));
        };
        let Ok(args) = RawValue::from_string(a.args) else {
            return refuse("the call's arguments are not JSON".into());
        };
        let in_flight = lock(&self.calls)
            .values()
            .filter(|c| matches!(&c.caller, Caller::Remote { broker: b, .. } if b == broker))
            .count();
        if in_flight >= MAX_CALLS_PER_BROKER {
            return refuse(format!(
                "too many MCP calls in flight from broker {broker} (at most {MAX_CALLS_PER_BROKER})"
            ));
        }
        let call_id = crate::ids::uuid_v4();
        lock(&self.calls).insert(
            call_id.clone(),
            Call {
                mesh_id: a.mesh_id.clone(),
                host: CallHost::Conn(host.conn),
                caller: Caller::Remote {
                    broker: broker.clone(),
                    call_id: a.call_id.clone(),
                },
                req_id: None,
                deadline: crate::time::instant() + ctx.config.limits.mcp_call_timeout,
            },
        );
        self.wake.notify_one();
        let forward = BrokerFrame::McpCallForward(McpCallForward {
            call_id: call_id.clone(),
            server_name: a.server_name,
            tool_name: a.tool_name,
            args,
            caller_name: a.caller_name,
        });
        let undelivered = (!offer(&host.shared, Outbound::Frame(forward.to_json().into())))
            .then(|| lock(&self.calls).remove(&call_id))
            .flatten();
        if let Some(call) = undelivered {
            finish(
                ctx,
                call,
                None,
                Some("the MCP server's host disconnected".into()),
            );
        }
    }

    /// A peer broker's result for a call sent to it (ignored unless that broker was
    /// asked under that id).
    pub(crate) fn remote_result(
        &self,
        ctx: &Ctx,
        broker: &str,
        d: meshd_protocol::fed::McpCallDone,
    ) {
        let call = {
            let mut calls = lock(&self.calls);
            match calls.get(&d.call_id) {
                Some(c) if matches!(&c.host, CallHost::Broker(b) if &**b == broker) => {
                    calls.remove(&d.call_id)
                }
                _ => None,
            }
        };
        if let Some(call) = call {
            let result = d.result.and_then(|r| RawValue::from_string(r).ok());
            let error = match (&result, d.error) {
                (_, Some(e)) if !e.is_empty() => Some(e),
                (None, _) => {
                    Some("the MCP host answered with neither a result nor an error".into())
                }
                _ => None,
            };
            finish(ctx, call, result, error);
        }
    }

    /// The host's answer. Only the connection the call was forwarded to may answer;
    /// anything else is ignored (returns `false`).
    pub(crate) fn respond(
        &self,
        ctx: &Ctx,
        conn: ConnId,
        call_id: &str,
        result: Option<Box<RawValue>>,
        error: Option<String>,
    ) -> bool {
        let call = {
            let mut calls = lock(&self.calls);
            match calls.get(call_id) {
                Some(c) if c.host == CallHost::Conn(conn) => calls.remove(call_id),
                _ => None,
            }
        };
        let Some(call) = call else { return false };
        let error = match (&result, error) {
            (_, Some(e)) if !e.is_empty() => Some(e),
            (None, _) => Some("the MCP host answered with neither a result nor an error".into()),
            _ => None,
        };
        finish(ctx, call, result, error);
        true
    }

    /// A connection closed: its non-persistent servers go (returned, to announce),
    /// its persistent ones go offline (returned, to store), calls it hosted fail, and
    /// calls it made are forgotten.
    ///
    /// `successor` is a newer live session of the same member: persistent servers move
    /// to it instead of going offline (the member reconnected before this connection's
    /// end was noticed, and its restore found them still hosted here).
    pub(crate) fn conn_gone(
        &self,
        ctx: &Ctx,
        mesh_id: &str,
        conn: ConnId,
        successor: Option<Host>,
        now: i64,
    ) -> ConnGone {
        let mut gone = ConnGone::default();
        {
            let mut servers = lock(&self.servers);
            if let Some(mesh) = servers.get_mut(mesh_id) {
                mesh.retain(|name, s| {
                    if s.host.as_ref().is_none_or(|h| h.conn != conn) {
                        return true;
                    }
                    if s.persistent && successor.is_some() {
                        s.host.clone_from(&successor);
                        return true;
                    }
                    if s.persistent {
                        s.host = None;
                        s.offline_since = Some(now);
                        gone.offline.push(name.clone());
                        gone.sets.push(s.to_set(name, false));
                        true
                    } else {
                        gone.removed.push((name.clone(), s.hosted_by.clone()));
                        gone.sets.push(s.to_set(name, true));
                        false
                    }
                });
            }
        }
        let failed: Vec<Call> = {
            let mut calls = lock(&self.calls);
            let ids: Vec<String> = calls
                .iter()
                .filter(|(_, c)| c.host == CallHost::Conn(conn) || c.caller_is(conn))
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter()
                .filter_map(|id| calls.remove(id))
                .filter(|c| !c.caller_is(conn))
                .collect()
        };
        for call in failed {
            finish(
                ctx,
                call,
                None,
                Some("the MCP server's host disconnected during the call".into()),
            );
        }
        gone
    }

    /// A session of `member_id` connected: its offline servers are hosted by it again.
    /// Returns their names and host names (to announce `mcp_restored`).
    pub(crate) fn member_back(
        &self,
        mesh_id: &str,
        member_id: &str,
        display_name: &str,
        host: &Host,
    ) -> Vec<String> {
        let mut servers = lock(&self.servers);
        let Some(mesh) = servers.get_mut(mesh_id) else {
            return Vec::new();
        };
        // Offline servers, and those still bound to a connection that is closing (the
        // member reconnected before its old connection's end was processed).
        mesh.iter_mut()
            .filter(|(_, s)| {
                s.member_id == member_id
                    && s.remote.is_none()
                    && s.host.as_ref().is_none_or(|h| {
                        h.conn != host.conn
                            && (h.shared.cancel.is_cancelled() || h.shared.close_reason().is_some())
                    })
            })
            .map(|(name, s)| {
                s.host = Some(host.clone());
                s.offline_since = None;
                display_name.clone_into(&mut s.hosted_by);
                name.clone()
            })
            .collect()
    }

    /// The servers hosted here, for a peer broker (its link came up).
    pub(crate) fn local_sets(&self, mesh_id: &str) -> Vec<meshd_protocol::fed::McpServerSet> {
        lock(&self.servers).get(mesh_id).map_or_else(Vec::new, |m| {
            m.iter()
                .filter(|(_, s)| s.remote.is_none())
                .map(|(n, s)| s.to_set(n, false))
                .collect()
        })
    }

    /// One server's state (or its removal) for the peer brokers.
    pub(crate) fn set_of(
        &self,
        mesh_id: &str,
        name: &str,
    ) -> Option<meshd_protocol::fed::McpServerSet> {
        lock(&self.servers)
            .get(mesh_id)
            .and_then(|m| m.get(name))
            .filter(|s| s.remote.is_none())
            .map(|s| s.to_set(name, false))
    }

    /// Applies a peer broker's servers (each already checked to be of a member it
    /// hosts). Returns the system events to announce here: (event, name, hosted by).
    pub(crate) fn apply_remote(
        &self,
        broker: &Arc<str>,
        mesh_id: &str,
        sets: Vec<meshd_protocol::fed::McpServerSet>,
        all: Option<Vec<String>>,
    ) -> Vec<(&'static str, String, String)> {
        let mut events = Vec::new();
        let mut servers = lock(&self.servers);
        let mesh = servers.entry(mesh_id.to_owned()).or_default();
        if let Some(all) = &all {
            let listed: std::collections::HashSet<&str> = all.iter().map(String::as_str).collect();
            mesh.retain(|name, s| {
                let stale = matches!(&s.remote, Some((b, _)) if b == broker)
                    && !listed.contains(name.as_str());
                if stale {
                    events.push(("mcp_unregistered", name.clone(), s.hosted_by.clone()));
                }
                !stale
            });
        }
        for set in sets {
            let ours = |s: &Server| matches!(&s.remote, Some((b, _)) if b == broker);
            if set.removed {
                if mesh.get(&set.name).is_some_and(ours) {
                    mesh.remove(&set.name);
                    events.push(("mcp_unregistered", set.name, set.hosted_by));
                }
                continue;
            }
            let was = match mesh.get(&set.name) {
                // A name held here or by another broker's member is not taken over.
                Some(s) if !ours(s) => {
                    warn!(server = %set.name, %broker, "a peer broker's MCP server name is taken here; ignored");
                    continue;
                }
                Some(s) => Some(s.online()),
                None if mesh.len() >= MAX_SERVERS_PER_MESH
                    || mesh
                        .values()
                        .filter(|s| s.member_id == set.member_id)
                        .count()
                        >= MAX_SERVERS_PER_MEMBER =>
                {
                    continue;
                }
                None => None,
            };
            let tools: Vec<McpTool> = serde_json::from_str(&set.tools_json).unwrap_or_default();
            match was {
                None => events.push(("mcp_registered", set.name.clone(), set.hosted_by.clone())),
                Some(false) if set.online => {
                    events.push(("mcp_restored", set.name.clone(), set.hosted_by.clone()));
                }
                _ => {}
            }
            mesh.insert(
                set.name,
                Server {
                    member_id: set.member_id,
                    member_pubkey: set.member_pubkey,
                    hosted_by: set.hosted_by,
                    description: set.description,
                    tools,
                    persistent: set.persistent,
                    host: None,
                    offline_since: set.offline_since,
                    remote: Some((broker.clone(), set.online)),
                },
            );
        }
        events
    }

    /// The description and tool names of a server, for `mcp_registered`.
    pub(crate) fn summary(&self, mesh_id: &str, name: &str) -> Option<(String, Vec<String>)> {
        lock(&self.servers)
            .get(mesh_id)
            .and_then(|m| m.get(name))
            .map(|s| {
                (
                    s.description.clone(),
                    s.tools.iter().map(|t| t.name.clone()).collect(),
                )
            })
    }

    /// A member was revoked: its servers go. Returns (name, hosted by, persistent, the
    /// removal for peer brokers).
    pub(crate) fn drop_member(
        &self,
        mesh_id: &str,
        member_id: &str,
    ) -> Vec<(String, String, bool, meshd_protocol::fed::McpServerSet)> {
        let mut servers = lock(&self.servers);
        let Some(mesh) = servers.get_mut(mesh_id) else {
            return Vec::new();
        };
        let mut dropped = Vec::new();
        mesh.retain(|name, s| {
            if s.member_id == member_id && s.remote.is_none() {
                dropped.push((
                    name.clone(),
                    s.hosted_by.clone(),
                    s.persistent,
                    s.to_set(name, true),
                ));
                false
            } else {
                true
            }
        });
        dropped
    }

    /// Fails the calls past their deadline; returns the next deadline.
    fn expire(&self, ctx: &Ctx, now: Instant, timeout: std::time::Duration) -> Option<Instant> {
        let expired: Vec<Call> = {
            let mut calls = lock(&self.calls);
            let ids: Vec<String> = calls
                .iter()
                .filter(|(_, c)| c.deadline <= now)
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| calls.remove(id)).collect()
        };
        for call in expired {
            finish(
                ctx,
                call,
                None,
                Some(format!("MCP call timed out ({}s)", timeout.as_secs())),
            );
        }
        lock(&self.calls).values().map(|c| c.deadline).min()
    }
}

/// What a closed connection changed.
#[derive(Debug, Default)]
pub(crate) struct ConnGone {
    /// Non-persistent servers removed: (name, hosted by).
    pub(crate) removed: Vec<(String, String)>,
    /// Persistent servers now offline.
    pub(crate) offline: Vec<String>,
    /// Both, for the mesh's other brokers.
    pub(crate) sets: Vec<meshd_protocol::fed::McpServerSet>,
}

/// A peer broker's link is gone (past the presence grace) or the mesh stopped flowing
/// to it: its servers leave the list (`mcp_unregistered`); they come back with its next
/// full list.
pub(crate) fn broker_gone(ctx: &Ctx, hub: &crate::hub::MeshHub, broker: &str) {
    let gone: Vec<(String, String)> = {
        let mut servers = lock(&ctx.mcp.servers);
        let Some(mesh) = servers.get_mut(&hub.row.id) else {
            return;
        };
        let mut gone = Vec::new();
        mesh.retain(|name, s| {
            let theirs = matches!(&s.remote, Some((b, _)) if &**b == broker);
            if theirs {
                gone.push((name.clone(), s.hosted_by.clone()));
            }
            !theirs
        });
        gone
    };
    let now = crate::time::now_ms();
    for (name, hosted_by) in gone {
        let mut data = serde_json::Map::new();
        data.insert("serverName".into(), name.into());
        data.insert("hostedBy".into(), hosted_by.into());
        hub.announce(
            &crate::delivery::system_push(&hub.row.id, "mcp_unregistered", data, now),
            0,
            None,
        );
    }
}

/// Tells the mesh's other brokers about servers hosted here that changed.
pub(crate) fn publish(ctx: &Ctx, mesh_id: &str, sets: Vec<meshd_protocol::fed::McpServerSet>) {
    if let (Some(fed), false) = (&ctx.fed, sets.is_empty()) {
        fed.mcp_servers(mesh_id, sets);
    }
}

/// Hands a call's outcome to its caller: a session here, or the broker that sent it.
fn finish(ctx: &Ctx, call: Call, result: Option<Box<RawValue>>, error: Option<String>) {
    let result = if error.is_some() { None } else { result };
    match call.caller {
        Caller::Local(p) => {
            let frame = BrokerFrame::McpCallResult(McpCallResult {
                result,
                error,
                req_id: call.req_id,
            });
            offer(&p, Outbound::Frame(Utf8Bytes::from(frame.to_json())));
        }
        Caller::Remote { broker, call_id } => {
            if let Some(fed) = &ctx.fed {
                fed.relay_send(
                    &broker,
                    &call.mesh_id,
                    meshd_protocol::fed::Frame::McpResult(Box::new(
                        meshd_protocol::fed::McpCallDone {
                            mesh_id: call.mesh_id.clone(),
                            call_id,
                            result: result.map(|r| r.get().to_owned()),
                            error,
                        },
                    )),
                );
            }
        }
    }
}

/// Fails calls whose host did not answer in time; ends when `cancel` fires.
pub(crate) async fn run(ctx: Arc<Ctx>, cancel: CancellationToken) {
    let timeout = ctx.config.limits.mcp_call_timeout;
    loop {
        let next = ctx.mcp.expire(&ctx, crate::time::instant(), timeout);
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => break,
            () = ctx.mcp.wake.notified() => {}
            () = sleep => {}
        }
    }
}

/// Applies [`StoreOp`]s in order; at `cancel` (after the sessions ended) applies what is
/// queued, then ends.
pub(crate) async fn run_store(ctx: Arc<Ctx>, cancel: CancellationToken) {
    let Some(mut rx) = lock(&ctx.mcp.store_rx).take() else {
        return;
    };
    loop {
        let op = tokio::select! {
            biased;
            op = rx.recv() => op,
            () = cancel.cancelled() => {
                while let Ok(op) = rx.try_recv() {
                    apply(&ctx, op).await;
                }
                break;
            }
        };
        let Some(op) = op else { break };
        apply(&ctx, op).await;
    }
}

async fn apply(ctx: &Ctx, op: StoreOp) {
    let mesh_id = match &op {
        StoreOp::Upsert(row, _) => &row.mesh_id,
        StoreOp::Delete { mesh_id, .. } | StoreOp::Offline { mesh_id, .. } => mesh_id,
    };
    crate::features::dashboard::touched(ctx, mesh_id, "mcp");
    let result = match &op {
        StoreOp::Upsert(row, _) => ctx.db.upsert_mcp_server(row).await,
        StoreOp::Delete { mesh_id, name } => ctx.db.delete_mcp_server(mesh_id, name).await,
        StoreOp::Offline {
            mesh_id,
            name,
            since,
        } => ctx.db.mcp_server_offline(mesh_id, name, *since).await,
    };
    match op {
        StoreOp::Upsert(_, Some(reply)) => {
            let _ = reply.send(result);
        }
        _ => {
            if let Err(e) = result {
                warn!(cause = %e, "storing an MCP registration change");
            }
        }
    }
}
