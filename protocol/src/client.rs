//! Client → broker frames.
//!
//! A frame is one JSON object per WebSocket text message, discriminated by `type`, with an
//! optional `_reqId` correlation string. [`decode`] parses the envelope first and then the
//! body of the named type, so a bad body still yields the `type`, `_reqId` and `id` needed
//! to answer it correctly (the CLI correlates replies per response type and falls back to
//! FIFO matching when `_reqId` is missing, so a reply must never go out un-correlated).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::routing::Status;

/// Longest accepted display name, summary, hostname etc. (characters are bytes here).
pub const MAX_NAME_LEN: usize = 256;
/// Longest accepted working directory.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest accepted summary.
pub const MAX_SUMMARY_LEN: usize = 16 * 1024;
/// Most groups a presence can be in.
pub const MAX_GROUPS: usize = 64;
/// Longest accepted state key.
pub const MAX_STATE_KEY_LEN: usize = 512;
/// Largest JSON of one `set_profile` field (avatar, title, bio, capabilities).
pub const MAX_PROFILE_FIELD_BYTES: usize = 4096;

/// A decoded frame with its correlation id.
#[derive(Debug)]
pub struct Inbound {
    /// The client's `_reqId`, echoed in the direct reply.
    pub req_id: Option<String>,
    /// The frame body.
    pub frame: ClientFrame,
}

/// Every client → broker frame meshd understands.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientFrame {
    /// Authenticate with a member key (§2.1).
    Hello(Box<Hello>),
    /// Authenticate a session vouched for by its member (§2.6).
    SessionHello(Box<SessionHello>),
    /// Route an envelope (§4).
    Send(Box<Send>),
    /// Manual status. No reply.
    SetStatus {
        /// New status.
        status: Status,
    },
    /// Free-text summary. No reply.
    SetSummary {
        /// New summary.
        summary: String,
    },
    /// Hide or show this presence. Replied with an `ack`.
    SetVisible {
        /// Whether others see this peer.
        visible: bool,
    },
    /// Merge profile fields. Replied with an `ack`.
    SetProfile(ProfilePatch),
    /// Replace the reported counters. No reply.
    SetStats(Stats),
    /// Join (or change role in) a group. No reply.
    JoinGroup(GroupEntry),
    /// Leave a group. No reply.
    LeaveGroup {
        /// Group name.
        name: String,
    },
    /// List the mesh's live peers.
    ListPeers,
    /// Upsert a shared key. No reply to the sender.
    SetState {
        /// Key.
        key: String,
        /// Any JSON value, kept verbatim; `None` is JSON `null` (or an absent value).
        value: Option<Box<RawValue>>,
    },
    /// Read a shared key.
    GetState {
        /// Key.
        key: String,
    },
    /// List every shared key.
    ListState,
    /// Delivery status of a message this mesh sent.
    MessageStatus {
        /// The `messageId` from the send's ack.
        message_id: String,
    },
    /// The client confirms it processed a push (HEAD clients). No reply.
    ClientAck {
        /// The sender's idempotency id.
        client_message_id: Option<String>,
        /// The broker's `messageId`.
        broker_message_id: Option<String>,
    },
    /// Publish (or replace) a skill in the mesh's catalogue.
    ShareSkill(Box<ShareSkill>),
    /// Read one skill.
    GetSkill {
        /// Name.
        name: String,
    },
    /// List skills, optionally filtered (case-insensitive substring of name,
    /// description or a tag).
    ListSkills {
        /// Filter.
        query: Option<String>,
    },
    /// Delete a skill.
    RemoveSkill {
        /// Name.
        name: String,
    },
    /// Create or update the mesh's simulation clock.
    SetClock {
        /// Speed, clamped to 1..=100 (a missing or non-numeric speed is 1).
        speed: u32,
    },
    /// Pause the clock.
    PauseClock,
    /// Resume the clock.
    ResumeClock,
    /// Read the clock.
    GetClock,
    /// Create an inbound webhook (`None`: no name given).
    CreateWebhook {
        /// Name, unique among the mesh's active webhooks.
        name: Option<String>,
    },
    /// List the mesh's active webhooks.
    ListWebhooks,
    /// Deactivate a webhook.
    DeleteWebhook {
        /// Name.
        name: String,
    },
    /// Register a stream (idempotent).
    CreateStream {
        /// Name.
        name: String,
    },
    /// Send data to a stream's subscribers (no reply; the stream need not exist).
    Publish {
        /// Stream name.
        stream: String,
        /// Any JSON value, verbatim.
        data: Box<RawValue>,
    },
    /// Receive a stream's data.
    Subscribe {
        /// Stream name.
        stream: String,
    },
    /// Stop receiving it (no reply).
    Unsubscribe {
        /// Stream name.
        stream: String,
    },
    /// The mesh's streams.
    ListStreams,
    /// Create a task.
    CreateTask(Box<CreateTask>),
    /// Claim an open task (answered with the task list; the CLI does not wait).
    ClaimTask {
        /// Task id.
        task_id: String,
    },
    /// Complete a task (answered with the task list; the CLI does not wait).
    CompleteTask {
        /// Task id.
        task_id: String,
        /// Outcome.
        result: Option<String>,
    },
    /// List tasks, newest first (at most 100).
    ListTasks {
        /// `open`, `claimed` or `done`.
        status: Option<String>,
        /// Assignee.
        assignee: Option<String>,
    },
    /// Store a note in the mesh's memory.
    Remember {
        /// The note.
        content: String,
        /// Tags.
        tags: Vec<String>,
    },
    /// Full-text search of the mesh's memory.
    Recall {
        /// Words to find.
        query: String,
    },
    /// Forget a note (answered with an `ack` the CLI does not wait for).
    Forget {
        /// Memory id.
        memory_id: String,
    },
    /// Read one memory whole (meshd extension: lists may shorten long notes).
    GetMemory {
        /// Memory id.
        memory_id: String,
    },
    /// Read one task whole (meshd extension: lists may shorten long results).
    GetTask {
        /// Task id.
        task_id: String,
    },
    /// Publish what this member is working on (replaces its previous context).
    ShareContext(Box<ShareContext>),
    /// Search contexts.
    GetContext {
        /// Text in the summary, or a tag.
        query: String,
    },
    /// Every context.
    ListContexts,
    /// An overview of the mesh.
    MeshInfo,
    /// Read the audit log, newest first.
    AuditQuery {
        /// Page size (default 50, at most 500).
        limit: i64,
        /// Entries to skip.
        offset: i64,
        /// Only this event type.
        event_type: Option<String>,
    },
    /// Verify the audit chain.
    AuditVerify,
    /// Deliver a text later, once or on a cron schedule.
    Schedule(Box<Schedule>),
    /// The caller's pending schedules.
    ListScheduled,
    /// Cancel one of the caller's schedules.
    CancelScheduled {
        /// Schedule id.
        scheduled_id: String,
    },
    /// Offer an MCP server's tools to the mesh, hosted by this session.
    McpRegister(Box<McpRegister>),
    /// Withdraw a server (no reply).
    McpUnregister {
        /// Server name.
        server_name: String,
    },
    /// The mesh's servers.
    McpList,
    /// Call a tool of a server hosted by another session.
    McpCall(Box<McpCall>),
    /// The host's answer to an `mcp_call_forward` (no reply).
    McpCallResponse(Box<McpCallResponse>),
    /// A download URL for a stored file.
    GetFile {
        /// File id.
        file_id: String,
    },
    /// Stored files the caller may read, newest first.
    ListFiles {
        /// Case-insensitive substring of the name.
        query: Option<String>,
        /// Exact uploader name.
        from: Option<String>,
    },
    /// Who downloaded a file.
    FileStatus {
        /// File id.
        file_id: String,
    },
    /// Delete a stored file (owner or admin).
    DeleteFile {
        /// File id.
        file_id: String,
    },
    /// Give a peer the sealed key of an encrypted file (owner only).
    GrantFileAccess {
        /// File id.
        file_id: String,
        /// The peer's key.
        peer_pubkey: String,
        /// The file key sealed for that peer (base64).
        sealed_key: String,
    },
    /// Ask a peer for one of its files (relayed).
    PeerFileRequest {
        /// The asked peer's key.
        target_pubkey: String,
        /// Path relative to its shared directories.
        file_path: String,
    },
    /// The asked peer's answer (relayed back; no reply).
    PeerFileResponse(Box<PeerFileResponse>),
    /// Ask a peer for a directory listing (relayed).
    PeerDirRequest {
        /// The asked peer's key.
        target_pubkey: String,
        /// Directory.
        dir_path: String,
        /// Glob filter.
        pattern: Option<String>,
    },
    /// The asked peer's listing (relayed back; no reply).
    PeerDirResponse(Box<PeerDirResponse>),
    /// meshd extension: subscribe this presence to tags (`tag:NAME` sends reach it).
    /// Replied with `tag_subscriptions`.
    SubscribeTags {
        /// Tags to add.
        tags: Vec<String>,
    },
    /// meshd extension: drop tag subscriptions. Replied with `tag_subscriptions`.
    UnsubscribeTags {
        /// Tags to drop (unknown ones are ignored).
        tags: Vec<String>,
    },
    /// meshd extension: stand at a position and see within its radius
    /// (see [`crate::spatial`]). Replied with `position`.
    SetPosition(crate::spatial::Position),
    /// meshd extension: stand nowhere again (see every peer). Replied with `position`.
    ClearPosition,
    /// `kick`, `disconnect`, `ban`, `unban`, `list_bans` (HEAD §4).
    Moderation(crate::moderation::Request),
    /// meshd extension: `invite_create` (admins). Replied with `invite_created`.
    InviteCreate(crate::invites::Create),
    /// meshd extension: `signals`, `typing`, `read` (no reply).
    Signal(crate::signals::Request),
    /// meshd extension: watch the mesh's live dashboard feed (admins). Replied with
    /// `dashboard_subscribed`; then `mesh_event` frames.
    DashboardSubscribe,
    /// meshd extension: the dashboard's resource counts and link states (admins).
    /// Replied with `dashboard_resources`.
    DashboardResources,
    /// meshd extension: `share_list`, `share_set` (admins).
    Share(crate::shares::Request),
    /// meshd extension: `search_peers`. Replied with `search_peers_result`.
    SearchPeers(crate::search::Request),
    /// meshd extension: `mesh_log`, `mesh_logs`, `mesh_report`.
    Telemetry(crate::telemetry::Request),
    /// meshd extension: `execute_code`. Replied with `execute_result` (after
    /// `execute_output` frames when streamed).
    ExecuteCode(Box<crate::exec::Request>),
    /// `vault_set`, `vault_list`, `vault_get`, `vault_delete` (HEAD §5).
    Vault(crate::vault::Request),
    /// `apikey_create`, `apikey_list`, `apikey_revoke` (HEAD §2).
    ApiKey(crate::apikeys::Request),
    /// The seven `topic_*` frames (HEAD §1.2).
    Topic(crate::topics::Request),
    /// `watch`, `unwatch`, `watch_list` (HEAD §6).
    Watch(crate::watch::Request),
    /// A claudemesh frame type that meshd recognises but does not serve.
    Unsupported {
        /// The frame type.
        kind: &'static str,
        /// Whether the client waits for an answer (so an `error` must be sent back).
        awaits_reply: bool,
    },
}

impl ClientFrame {
    /// Whether the reference broker answers this frame. Errors for frames that get no
    /// answer must not be sent: the CLI would hand them to an unrelated waiter.
    pub const fn awaits_reply(&self) -> bool {
        match self {
            Self::Hello(_)
            | Self::SessionHello(_)
            | Self::Send(_)
            | Self::SetVisible { .. }
            | Self::SetProfile(_)
            | Self::SubscribeTags { .. }
            | Self::UnsubscribeTags { .. }
            | Self::SetPosition(_)
            | Self::ClearPosition
            | Self::ListPeers
            | Self::GetState { .. }
            | Self::ListState
            | Self::MessageStatus { .. }
            | Self::ShareSkill(_)
            | Self::GetSkill { .. }
            | Self::ListSkills { .. }
            | Self::RemoveSkill { .. }
            | Self::SetClock { .. }
            | Self::PauseClock
            | Self::ResumeClock
            | Self::GetClock
            | Self::CreateWebhook { .. }
            | Self::ListWebhooks
            | Self::DeleteWebhook { .. }
            | Self::CreateStream { .. }
            | Self::ListStreams
            | Self::CreateTask(_)
            | Self::ListTasks { .. }
            | Self::Remember { .. }
            | Self::Recall { .. }
            | Self::GetMemory { .. }
            | Self::GetTask { .. }
            | Self::GetContext { .. }
            | Self::ListContexts
            | Self::MeshInfo
            | Self::AuditQuery { .. }
            | Self::AuditVerify
            | Self::Schedule(_)
            | Self::ListScheduled
            | Self::CancelScheduled { .. }
            | Self::McpRegister(_)
            | Self::McpList
            | Self::McpCall(_)
            | Self::GetFile { .. }
            | Self::ListFiles { .. }
            | Self::FileStatus { .. }
            | Self::GrantFileAccess { .. }
            | Self::PeerFileRequest { .. }
            | Self::PeerDirRequest { .. }
            | Self::Moderation(_)
            | Self::InviteCreate(_)
            | Self::DashboardSubscribe
            | Self::DashboardResources
            | Self::Share(_)
            | Self::SearchPeers(_)
            | Self::ExecuteCode(_)
            | Self::Telemetry(_)
            | Self::Vault(_)
            | Self::ApiKey(_)
            | Self::Watch(_) => true,
            Self::Topic(r) => r.answered(),
            Self::McpUnregister { .. } | Self::McpCallResponse(_) => false,
            // Answered with an `ack` the CLI does not wait for.
            Self::DeleteFile { .. } => false,
            Self::PeerFileResponse(_) | Self::PeerDirResponse(_) => false,
            // `context_shared` is sent, but the CLI does not wait for it.
            Self::ShareContext(_) => false,
            // meshd extension, fire-and-forget.
            Self::Signal(_) => false,
            Self::Forget { .. } => false,
            Self::ClaimTask { .. } | Self::CompleteTask { .. } => false,
            // `subscribed` is sent, but the reference's clients do not wait for it.
            Self::Publish { .. } | Self::Subscribe { .. } | Self::Unsubscribe { .. } => false,
            Self::SetStatus { .. }
            | Self::SetSummary { .. }
            | Self::SetStats(_)
            | Self::JoinGroup(_)
            | Self::LeaveGroup { .. }
            | Self::SetState { .. }
            | Self::ClientAck { .. } => false,
            Self::Unsupported { awaits_reply, .. } => *awaits_reply,
        }
    }
}

/// The presence fields shared by `hello` and `session_hello`, relayed in `peers_list`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PresenceFields {
    /// Per-session display name override.
    #[serde(default)]
    pub display_name: Option<String>,
    /// Changes on every reconnect.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Client process id.
    #[serde(default)]
    pub pid: Option<serde_json::Number>,
    /// Working directory; the SDK sends none.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Host name.
    #[serde(default)]
    pub hostname: Option<String>,
    /// `ai`, `human` or `connector` (not interpreted).
    #[serde(default)]
    pub peer_type: Option<String>,
    /// `claude-code`, `sdk`, `slack`… (not interpreted).
    #[serde(default)]
    pub channel: Option<String>,
    /// Model name (not interpreted).
    #[serde(default)]
    pub model: Option<String>,
    /// Initial groups.
    #[serde(default)]
    pub groups: Option<Vec<GroupEntry>>,
}

/// `hello` (§2.1). Only the listed fields are read; the rest are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    /// Mesh id (not the slug).
    pub mesh_id: String,
    /// Member id from `/join`; must match the member found by `pubkey`.
    pub member_id: String,
    /// Member public key, 64 hex.
    pub pubkey: String,
    /// Per-process session key used for routing and DM crypto.
    #[serde(default)]
    pub session_pubkey: Option<String>,
    /// What the presence shows of itself.
    #[serde(flatten)]
    pub presence: PresenceFields,
    /// Milliseconds since the epoch; must be an integer.
    pub timestamp: serde_json::Number,
    /// Ed25519 signature over [`crate::hello::hello_signing_string`], 128 hex.
    pub signature: String,
}

/// Signed statement by a member key that a session key acts for it (§2.6).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attestation {
    /// Session key being vouched for.
    pub session_pubkey: String,
    /// Vouching member key.
    pub parent_member_pubkey: String,
    /// Expiry in ms since the epoch.
    pub expires_at: serde_json::Number,
    /// Signature by the parent key over [`crate::hello::attestation_signing_string`].
    pub signature: String,
}

/// `session_hello` (§2.6, HEAD clients).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionHello {
    /// Mesh id.
    pub mesh_id: String,
    /// If present, must be the id of the member owning `parent_member_pubkey`.
    #[serde(default)]
    pub parent_member_id: Option<String>,
    /// Member key.
    pub parent_member_pubkey: String,
    /// Session key (signs this hello).
    pub session_pubkey: String,
    /// The member's attestation for the session key.
    pub parent_attestation: Attestation,
    /// What the presence shows of itself.
    #[serde(flatten)]
    pub presence: PresenceFields,
    /// Milliseconds since the epoch.
    pub timestamp: serde_json::Number,
    /// Signature by the session key over [`crate::hello::session_hello_signing_string`].
    pub signature: String,
}

/// `send` (§4). Validation of the priority and target happens in the broker so that a bad
/// value is answered with an `ack` carrying `error`, which every client matches by `id`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Send {
    /// Client correlation id, echoed in the `ack`.
    #[serde(default)]
    pub id: Option<String>,
    /// Recipient spec (see [`crate::routing::TargetSpec`]).
    pub target_spec: String,
    /// `now`, `next` (default) or `low`.
    #[serde(default)]
    pub priority: Option<String>,
    /// Base64 nonce (24 bytes for crypto_box DMs; a placeholder for plaintext).
    pub nonce: String,
    /// Base64 ciphertext (or base64 plaintext for multicast).
    pub ciphertext: String,
    /// HEAD idempotency id; its presence marks a client that sends `client_ack`.
    #[serde(default, rename = "client_message_id")]
    pub client_message_id: Option<String>,
    /// meshd extension: tags the message carries (see [`crate::tags`]); checked by the
    /// broker, which answers a bad list with an `ack` error like any bad `send`.
    #[serde(default)]
    pub tags: Vec<String>,
    /// HEAD, topic posts: lowercased display names mentioned (without `@`).
    #[serde(default)]
    pub mentions: Option<Vec<String>>,
    /// HEAD, topic posts: the topic message this one answers.
    #[serde(default)]
    pub reply_to_id: Option<String>,
    /// HEAD, topic posts: 1 = base64 plaintext, 2 = sealed with the topic key.
    #[serde(default)]
    pub body_version: Option<i64>,
}

/// A group membership, `{name, role?}`. Roles are free text the broker never interprets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupEntry {
    /// Group name, hierarchical with `/`.
    pub name: String,
    /// Free-text role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// The profile fields a `set_profile` may carry. A field absent from the frame is left
/// alone; a field present with JSON `null` is set to null (the reference's semantics).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfilePatch {
    /// `(field, value)` for each of `avatar`, `title`, `bio`, `capabilities` present.
    pub fields: Vec<(&'static str, serde_json::Value)>,
}

/// The profile keys `set_profile` may change.
pub const PROFILE_FIELDS: [&str; 4] = ["avatar", "title", "bio", "capabilities"];

/// `set_stats` counters. Reported numbers are kept as given; missing ones are absent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// Messages received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_in: Option<f64>,
    /// Messages sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_out: Option<f64>,
    /// Tool calls made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<f64>,
    /// Seconds since the session started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime: Option<f64>,
    /// Errors seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<f64>,
}

/// Why a text frame could not be turned into an [`Inbound`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not a JSON object with a string `type`. Nothing can be correlated.
    #[error("frame is not a JSON object with a string \"type\": {0}")]
    Malformed(String),
    /// A `type` this broker does not know.
    #[error("unknown message type {kind:?}")]
    UnknownType {
        /// The type as sent (truncated to 64 bytes).
        kind: String,
        /// Its `_reqId`.
        req_id: Option<String>,
    },
    /// A known type whose fields are missing or of the wrong shape.
    #[error("invalid {kind} frame: {reason}")]
    Invalid {
        /// The frame type.
        kind: &'static str,
        /// Its `_reqId`.
        req_id: Option<String>,
        /// Its `id` (a `send`'s correlation id), if a string.
        id: Option<String>,
        /// What was wrong, for the error message.
        reason: String,
        /// Whether the client waits for a reply to this type.
        awaits_reply: bool,
    },
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(rename = "_reqId", default)]
    req_id: Option<serde_json::Value>,
    #[serde(default)]
    id: Option<serde_json::Value>,
}

/// Decodes one text frame.
///
/// # Errors
/// See [`DecodeError`]. Decoding never panics, whatever the input.
pub fn decode(text: &str) -> Result<Inbound, DecodeError> {
    let env: Envelope<'_> =
        serde_json::from_str(text).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    let req_id = match env.req_id {
        Some(serde_json::Value::String(s)) => Some(s),
        _ => None,
    };
    let Some((kind, awaits_reply)) = lookup_kind(&env.kind) else {
        let mut kind = env.kind.into_owned();
        truncate_utf8(&mut kind, 64);
        return Err(DecodeError::UnknownType { kind, req_id });
    };
    let invalid = |reason: String| DecodeError::Invalid {
        kind,
        req_id: req_id.clone(),
        id: match &env.id {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            _ => None,
        },
        reason,
        awaits_reply,
    };
    // Refused whatever the frame: PostgreSQL cannot store U+0000 (see `nul`).
    if crate::nul::json_has_nul(text) {
        return Err(invalid("U+0000 is not allowed in any string".into()));
    }
    let frame = decode_body(kind, text).map_err(|e| invalid(e.to_string()))?;
    validate(&frame).map_err(|r| invalid(r.to_owned()))?;
    Ok(Inbound { req_id, frame })
}

fn decode_body(kind: &'static str, text: &str) -> Result<ClientFrame, serde_json::Error> {
    #[derive(Deserialize)]
    struct StatusBody {
        status: Status,
    }
    #[derive(Deserialize)]
    struct SummaryBody {
        summary: String,
    }
    #[derive(Deserialize)]
    struct VisibleBody {
        visible: bool,
    }
    #[derive(Deserialize)]
    struct StatsBody {
        #[serde(default)]
        stats: Stats,
    }
    #[derive(Deserialize)]
    struct NameBody {
        name: String,
    }
    #[derive(Deserialize)]
    struct TagsBody {
        tags: Vec<String>,
    }
    #[derive(Deserialize)]
    struct SetStateBody {
        key: String,
        #[serde(default)]
        value: Option<Box<RawValue>>,
    }
    #[derive(Deserialize)]
    struct KeyBody {
        key: String,
    }
    #[derive(Deserialize)]
    struct OptNameBody {
        #[serde(default)]
        name: Option<String>,
    }
    #[derive(Deserialize)]
    struct RememberBody {
        content: String,
        #[serde(default)]
        tags: Vec<String>,
    }
    #[derive(Deserialize)]
    struct RecallBody {
        query: String,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct ForgetBody {
        memory_id: String,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct TaskIdBody {
        task_id: String,
        #[serde(default)]
        result: Option<String>,
    }
    #[derive(Deserialize)]
    struct ListTasksBody {
        #[serde(default)]
        status: Option<String>,
        #[serde(default)]
        assignee: Option<String>,
    }
    #[derive(Deserialize)]
    struct StreamBody {
        stream: String,
    }
    #[derive(Deserialize)]
    struct PublishBody {
        stream: String,
        #[serde(default)]
        data: Option<Box<RawValue>>,
    }
    #[derive(Deserialize)]
    struct QueryBody {
        #[serde(default)]
        query: Option<String>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct MessageStatusBody {
        message_id: String,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct ClientAckBody {
        #[serde(default)]
        client_message_id: Option<String>,
        #[serde(default)]
        broker_message_id: Option<String>,
    }

    Ok(match kind {
        "hello" => ClientFrame::Hello(Box::new(serde_json::from_str(text)?)),
        "session_hello" => ClientFrame::SessionHello(Box::new(serde_json::from_str(text)?)),
        "send" => ClientFrame::Send(Box::new(serde_json::from_str(text)?)),
        "set_status" => ClientFrame::SetStatus {
            status: serde_json::from_str::<StatusBody>(text)?.status,
        },
        "set_summary" => ClientFrame::SetSummary {
            summary: serde_json::from_str::<SummaryBody>(text)?.summary,
        },
        "set_visible" => ClientFrame::SetVisible {
            visible: serde_json::from_str::<VisibleBody>(text)?.visible,
        },
        "set_profile" => {
            let mut obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)?;
            let fields = PROFILE_FIELDS
                .iter()
                .filter_map(|&f| obj.remove(f).map(|v| (f, v)))
                .collect();
            ClientFrame::SetProfile(ProfilePatch { fields })
        }
        "set_stats" => ClientFrame::SetStats(serde_json::from_str::<StatsBody>(text)?.stats),
        "join_group" => ClientFrame::JoinGroup(serde_json::from_str(text)?),
        "subscribe_tags" => ClientFrame::SubscribeTags {
            tags: serde_json::from_str::<TagsBody>(text)?.tags,
        },
        "unsubscribe_tags" => ClientFrame::UnsubscribeTags {
            tags: serde_json::from_str::<TagsBody>(text)?.tags,
        },
        "set_position" => ClientFrame::SetPosition(serde_json::from_str(text)?),
        "clear_position" => ClientFrame::ClearPosition,
        "leave_group" => ClientFrame::LeaveGroup {
            name: serde_json::from_str::<NameBody>(text)?.name,
        },
        "list_peers" => ClientFrame::ListPeers,
        "set_state" => {
            let b: SetStateBody = serde_json::from_str(text)?;
            ClientFrame::SetState {
                key: b.key,
                value: b.value,
            }
        }
        "get_state" => ClientFrame::GetState {
            key: serde_json::from_str::<KeyBody>(text)?.key,
        },
        "list_state" => ClientFrame::ListState,
        "share_skill" => ClientFrame::ShareSkill(Box::new(serde_json::from_str(text)?)),
        "get_skill" => ClientFrame::GetSkill {
            name: serde_json::from_str::<NameBody>(text)?.name,
        },
        "list_skills" => ClientFrame::ListSkills {
            query: serde_json::from_str::<QueryBody>(text)?
                .query
                .filter(|q| !q.is_empty()),
        },
        "set_clock" => {
            // The reference clamps to 1..=100 and treats anything non-numeric as 1.
            let v: serde_json::Value = serde_json::from_str(text)?;
            let speed = v
                .get("speed")
                .and_then(serde_json::Value::as_f64)
                .filter(|f| f.is_finite())
                .map_or(1.0, |f| f.clamp(1.0, 100.0));
            ClientFrame::SetClock {
                // Clamped to 1..=100 above, so the cast cannot truncate meaningfully.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                speed: speed.round() as u32,
            }
        }
        "create_webhook" => ClientFrame::CreateWebhook {
            name: serde_json::from_str::<OptNameBody>(text)?
                .name
                .map(|n| n.trim().to_owned())
                .filter(|n| !n.is_empty()),
        },
        "list_webhooks" => ClientFrame::ListWebhooks,
        "delete_webhook" => ClientFrame::DeleteWebhook {
            name: serde_json::from_str::<NameBody>(text)?.name,
        },
        "share_context" => ClientFrame::ShareContext(Box::new(serde_json::from_str(text)?)),
        "get_context" => ClientFrame::GetContext {
            query: serde_json::from_str::<RecallBody>(text)?.query,
        },
        "list_contexts" => ClientFrame::ListContexts,
        "mesh_info" => ClientFrame::MeshInfo,
        "audit_query" => {
            #[derive(Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct AuditQueryBody {
                #[serde(default)]
                limit: Option<i64>,
                #[serde(default)]
                offset: Option<i64>,
                #[serde(default)]
                event_type: Option<String>,
            }
            let b: AuditQueryBody = serde_json::from_str(text)?;
            ClientFrame::AuditQuery {
                limit: b.limit.unwrap_or(50).clamp(1, 500),
                offset: b.offset.unwrap_or(0).max(0),
                event_type: b.event_type.filter(|t| !t.is_empty()),
            }
        }
        "audit_verify" => ClientFrame::AuditVerify,
        "schedule" => {
            #[derive(Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct ScheduleBody {
                to: String,
                message: String,
                #[serde(default)]
                deliver_at: Option<f64>,
                #[serde(default)]
                cron: Option<String>,
                #[serde(default)]
                subtype: Option<String>,
            }
            let b: ScheduleBody = serde_json::from_str(text)?;
            ClientFrame::Schedule(Box::new(Schedule {
                to: b.to,
                message: b.message,
                // JSON numbers are doubles; `as` saturates an absurd time into the i64
                // range (NaN cannot come out of a JSON parser).
                deliver_at: b.deliver_at.map_or(0, |t| t as i64),
                cron: b.cron.filter(|c| !c.trim().is_empty()),
                reminder: b.subtype.as_deref() == Some("reminder"),
            }))
        }
        "list_scheduled" => ClientFrame::ListScheduled,
        "mcp_register" => ClientFrame::McpRegister(Box::new(serde_json::from_str(text)?)),
        "mcp_unregister" => {
            #[derive(Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct ServerBody {
                server_name: String,
            }
            ClientFrame::McpUnregister {
                server_name: serde_json::from_str::<ServerBody>(text)?.server_name,
            }
        }
        "mcp_list" => ClientFrame::McpList,
        "get_file" | "file_status" | "delete_file" => {
            #[derive(Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct FileBody {
                file_id: String,
            }
            let file_id = serde_json::from_str::<FileBody>(text)?.file_id;
            match kind {
                "get_file" => ClientFrame::GetFile { file_id },
                "file_status" => ClientFrame::FileStatus { file_id },
                _ => ClientFrame::DeleteFile { file_id },
            }
        }
        "list_files" => {
            #[derive(Deserialize)]
            struct ListBody {
                #[serde(default)]
                query: Option<String>,
                #[serde(default)]
                from: Option<String>,
            }
            let b: ListBody = serde_json::from_str(text)?;
            ClientFrame::ListFiles {
                query: b.query.filter(|q| !q.is_empty()),
                from: b.from.filter(|f| !f.is_empty()),
            }
        }
        "grant_file_access" => {
            #[derive(Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct GrantBody {
                file_id: String,
                peer_pubkey: String,
                sealed_key: String,
            }
            let b: GrantBody = serde_json::from_str(text)?;
            ClientFrame::GrantFileAccess {
                file_id: b.file_id,
                peer_pubkey: b.peer_pubkey,
                sealed_key: b.sealed_key,
            }
        }
        "peer_file_request" => {
            #[derive(Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct Body {
                target_pubkey: String,
                file_path: String,
            }
            let b: Body = serde_json::from_str(text)?;
            ClientFrame::PeerFileRequest {
                target_pubkey: b.target_pubkey,
                file_path: b.file_path,
            }
        }
        "peer_dir_request" => {
            #[derive(Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct Body {
                target_pubkey: String,
                #[serde(default)]
                dir_path: String,
                #[serde(default)]
                pattern: Option<String>,
            }
            let b: Body = serde_json::from_str(text)?;
            ClientFrame::PeerDirRequest {
                target_pubkey: b.target_pubkey,
                dir_path: b.dir_path,
                pattern: b.pattern,
            }
        }
        "peer_file_response" => {
            ClientFrame::PeerFileResponse(Box::new(serde_json::from_str(text)?))
        }
        "peer_dir_response" => ClientFrame::PeerDirResponse(Box::new(serde_json::from_str(text)?)),
        "mcp_call" => ClientFrame::McpCall(Box::new(serde_json::from_str(text)?)),
        "mcp_call_response" => ClientFrame::McpCallResponse(Box::new(serde_json::from_str(text)?)),
        "cancel_scheduled" => {
            #[derive(Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct CancelBody {
                scheduled_id: String,
            }
            ClientFrame::CancelScheduled {
                scheduled_id: serde_json::from_str::<CancelBody>(text)?.scheduled_id,
            }
        }
        "remember" => {
            let b: RememberBody = serde_json::from_str(text)?;
            ClientFrame::Remember {
                content: b.content,
                tags: b.tags,
            }
        }
        "recall" => ClientFrame::Recall {
            query: serde_json::from_str::<RecallBody>(text)?.query,
        },
        "forget" => ClientFrame::Forget {
            memory_id: serde_json::from_str::<ForgetBody>(text)?.memory_id,
        },
        "get_memory" => ClientFrame::GetMemory {
            memory_id: serde_json::from_str::<ForgetBody>(text)?.memory_id,
        },
        "get_task" => ClientFrame::GetTask {
            task_id: serde_json::from_str::<TaskIdBody>(text)?.task_id,
        },
        "create_task" => ClientFrame::CreateTask(Box::new(serde_json::from_str(text)?)),
        "claim_task" => ClientFrame::ClaimTask {
            task_id: serde_json::from_str::<TaskIdBody>(text)?.task_id,
        },
        "complete_task" => {
            let b: TaskIdBody = serde_json::from_str(text)?;
            ClientFrame::CompleteTask {
                task_id: b.task_id,
                result: b.result,
            }
        }
        "list_tasks" => {
            let b: ListTasksBody = serde_json::from_str(text)?;
            ClientFrame::ListTasks {
                status: b.status.filter(|s| !s.is_empty()),
                assignee: b.assignee.filter(|s| !s.is_empty()),
            }
        }
        "create_stream" => ClientFrame::CreateStream {
            name: serde_json::from_str::<NameBody>(text)?.name,
        },
        "publish" => {
            let b: PublishBody = serde_json::from_str(text)?;
            ClientFrame::Publish {
                stream: b.stream,
                data: b
                    .data
                    .unwrap_or_else(|| RawValue::from_string("null".into()).unwrap_or_default()),
            }
        }
        "subscribe" => ClientFrame::Subscribe {
            stream: serde_json::from_str::<StreamBody>(text)?.stream,
        },
        "unsubscribe" => ClientFrame::Unsubscribe {
            stream: serde_json::from_str::<StreamBody>(text)?.stream,
        },
        "list_streams" => ClientFrame::ListStreams,
        "pause_clock" => ClientFrame::PauseClock,
        "resume_clock" => ClientFrame::ResumeClock,
        "get_clock" => ClientFrame::GetClock,
        "remove_skill" => ClientFrame::RemoveSkill {
            name: serde_json::from_str::<NameBody>(text)?.name,
        },
        "message_status" => ClientFrame::MessageStatus {
            message_id: serde_json::from_str::<MessageStatusBody>(text)?.message_id,
        },
        "client_ack" => {
            let b: ClientAckBody = serde_json::from_str(text)?;
            ClientFrame::ClientAck {
                client_message_id: b.client_message_id,
                broker_message_id: b.broker_message_id,
            }
        }
        "kick" | "disconnect" | "ban" | "unban" | "list_bans" | "member_role" => {
            ClientFrame::Moderation(crate::moderation::decode(kind, text)?)
        }
        "invite_create" => ClientFrame::InviteCreate(crate::invites::decode(text)?),
        "signals" | "typing" | "read" => ClientFrame::Signal(crate::signals::decode(kind, text)?),
        "dashboard_subscribe" => ClientFrame::DashboardSubscribe,
        "dashboard_resources" => ClientFrame::DashboardResources,
        "share_list" | "share_set" => ClientFrame::Share(crate::shares::decode(kind, text)?),
        "search_peers" => ClientFrame::SearchPeers(crate::search::decode(text)?),
        "execute_code" => ClientFrame::ExecuteCode(Box::new(crate::exec::decode(text)?)),
        "mesh_log" | "mesh_logs" | "mesh_report" => {
            ClientFrame::Telemetry(crate::telemetry::decode(kind, text)?)
        }
        "topic_create" | "topic_list" | "topic_join" | "topic_leave" | "topic_members"
        | "topic_history" | "topic_mark_read" => {
            ClientFrame::Topic(crate::topics::decode(kind, text)?)
        }
        "watch" | "unwatch" | "watch_list" => ClientFrame::Watch(crate::watch::decode(kind, text)?),
        "apikey_create" | "apikey_list" | "apikey_revoke" => {
            ClientFrame::ApiKey(crate::apikeys::decode(kind, text)?)
        }
        "vault_set" | "vault_list" | "vault_get" | "vault_delete" => {
            ClientFrame::Vault(crate::vault::decode(kind, text)?)
        }
        other => {
            let awaits_reply = lookup_kind(other).is_some_and(|(_, r)| r);
            ClientFrame::Unsupported { kind, awaits_reply }
        }
    })
}

/// `schedule`. The reference's `recurring` field is accepted and ignored: a schedule
/// recurs exactly when it has a cron expression.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Target spec (member or session key, `@group` or `*`).
    pub to: String,
    /// Plain text.
    pub message: String,
    /// One-shot delivery time (ms); ignored with a cron expression.
    pub deliver_at: i64,
    /// 5-field cron expression.
    pub cron: Option<String>,
    /// Whether deliveries are tagged `subtype: "reminder"` (the only subtype a schedule
    /// may carry; others are dropped).
    pub reminder: bool,
}

/// `peer_file_response`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerFileResponse {
    /// Who asked.
    pub requester_pubkey: String,
    /// The path asked for.
    pub file_path: String,
    /// The file, base64.
    #[serde(default)]
    pub content: Option<String>,
    /// Or why not.
    #[serde(default)]
    pub error: Option<String>,
}

/// `peer_dir_response`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerDirResponse {
    /// Who asked.
    pub requester_pubkey: String,
    /// The directory asked for.
    #[serde(default)]
    pub dir_path: String,
    /// Its entries.
    #[serde(default)]
    pub entries: Option<Vec<String>>,
    /// Or why not.
    #[serde(default)]
    pub error: Option<String>,
}

/// One tool of an MCP server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct McpTool {
    /// Tool name.
    pub name: String,
    /// What it does.
    #[serde(default)]
    pub description: String,
    /// JSON Schema of its arguments, verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<Box<RawValue>>,
}

/// `mcp_register`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct McpRegister {
    /// Server name, unique in the mesh.
    pub server_name: String,
    /// What it offers.
    #[serde(default)]
    pub description: String,
    /// Its tools.
    #[serde(default)]
    pub tools: Vec<McpTool>,
    /// Kept (offline) when the host disconnects, restored when its member returns.
    #[serde(default)]
    pub persistent: bool,
}

/// `mcp_call`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct McpCall {
    /// Server name.
    pub server_name: String,
    /// Tool name.
    pub tool_name: String,
    /// Arguments, verbatim (an object; absent is `{}`).
    #[serde(default)]
    pub args: Option<Box<RawValue>>,
}

/// `mcp_call_response`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct McpCallResponse {
    /// The id from `mcp_call_forward`.
    pub call_id: String,
    /// The tool's result, verbatim.
    #[serde(default)]
    pub result: Option<Box<RawValue>>,
    /// Or why it failed.
    #[serde(default)]
    pub error: Option<String>,
}

/// `share_context`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShareContext {
    /// What the member is doing.
    pub summary: String,
    /// Files read.
    #[serde(default)]
    pub files_read: Vec<String>,
    /// Key findings.
    #[serde(default)]
    pub key_findings: Vec<String>,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// `create_task`.
#[derive(Debug, Clone, Deserialize)]
pub struct CreateTask {
    /// What to do.
    pub title: String,
    /// Who should do it.
    #[serde(default)]
    pub assignee: Option<String>,
    /// Free text, `normal` when absent.
    #[serde(default)]
    pub priority: Option<String>,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// `share_skill`.
#[derive(Debug, Clone, Deserialize)]
pub struct ShareSkill {
    /// Name, unique per mesh (an existing skill of that name is replaced).
    pub name: String,
    /// One-line description.
    #[serde(default)]
    pub description: String,
    /// The instructions.
    #[serde(default)]
    pub instructions: String,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Largest skill instructions.
pub const MAX_SKILL_INSTRUCTIONS: usize = 256 * 1024;
/// Most tools one MCP server registers.
pub const MAX_MCP_TOOLS: usize = 256;

/// Field limits that serde cannot express. Returns the reason on failure.
fn validate(frame: &ClientFrame) -> Result<(), &'static str> {
    fn opt_len(s: &Option<String>, max: usize) -> bool {
        s.as_ref().is_none_or(|s| s.len() <= max)
    }
    fn groups_ok(g: &Option<Vec<GroupEntry>>) -> bool {
        g.as_ref().is_none_or(|g| {
            g.len() <= MAX_GROUPS
                && g.iter().all(|e| {
                    !e.name.is_empty()
                        && e.name.len() <= MAX_NAME_LEN
                        && opt_len(&e.role, MAX_NAME_LEN)
                })
        })
    }
    let presence_ok = |p: &PresenceFields| {
        [
            &p.display_name,
            &p.session_id,
            &p.hostname,
            &p.peer_type,
            &p.channel,
            &p.model,
        ]
        .iter()
        .all(|n| opt_len(n, MAX_NAME_LEN))
            && opt_len(&p.cwd, MAX_PATH_LEN)
            && groups_ok(&p.groups)
    };
    match frame {
        ClientFrame::Hello(h) if !presence_ok(&h.presence) => {
            return Err("a hello field exceeds its length limit");
        }
        ClientFrame::SessionHello(h) if !presence_ok(&h.presence) => {
            return Err("a session_hello field exceeds its length limit");
        }
        ClientFrame::SetProfile(p)
            if p.fields
                .iter()
                .any(|(_, v)| v.to_string().len() > MAX_PROFILE_FIELD_BYTES) =>
        {
            return Err("a profile field exceeds 4 KiB");
        }
        ClientFrame::SetSummary { summary } if summary.len() > MAX_SUMMARY_LEN => {
            return Err("summary exceeds 16 KiB");
        }
        ClientFrame::JoinGroup(g) if !groups_ok(&Some(vec![g.clone()])) => {
            return Err("group name must be 1..=256 bytes");
        }
        ClientFrame::SubscribeTags { tags } | ClientFrame::UnsubscribeTags { tags }
            if tags.len() > crate::tags::MAX_SUBSCRIPTIONS
                || !tags.iter().all(|t| crate::tags::valid(t)) =>
        {
            return Err("tags: up to 64, each 1..=64 bytes of letters, digits and - _ . : /");
        }
        ClientFrame::SetPosition(p) if !p.valid() => {
            return Err("position: finite x and y within ±1e6, radius in (0, 1e6]");
        }
        ClientFrame::SetState { key, .. } | ClientFrame::GetState { key }
            if key.is_empty() || key.len() > MAX_STATE_KEY_LEN =>
        {
            return Err("state key must be 1..=512 bytes");
        }
        ClientFrame::CreateWebhook { name: Some(name) } | ClientFrame::DeleteWebhook { name }
            if name.len() > MAX_NAME_LEN =>
        {
            return Err("webhook name must be 1..=256 bytes");
        }
        ClientFrame::ShareContext(c)
            if c.summary.len() > MAX_SUMMARY_LEN
                || [&c.files_read, &c.key_findings, &c.tags]
                    .iter()
                    .any(|l| l.len() > MAX_GROUPS || l.iter().any(|x| x.len() > MAX_PATH_LEN)) =>
        {
            return Err("context fields exceed their limits");
        }
        ClientFrame::GetContext { query } if query.len() > MAX_SUMMARY_LEN => {
            return Err("context query exceeds 16 KiB");
        }
        ClientFrame::Remember { content, tags }
            if content.trim().is_empty()
                || content.len() > MAX_SKILL_INSTRUCTIONS
                || tags.len() > MAX_GROUPS
                || tags.iter().any(|t| t.len() > MAX_NAME_LEN) =>
        {
            return Err("memory content must be 1 byte..256 KiB, tags up to 256 bytes");
        }
        ClientFrame::Recall { query } if query.len() > MAX_SUMMARY_LEN => {
            return Err("recall query exceeds 16 KiB");
        }
        ClientFrame::CreateTask(t)
            if t.title.trim().is_empty()
                || t.title.len() > MAX_SUMMARY_LEN
                || t.assignee.as_ref().is_some_and(|a| a.len() > MAX_NAME_LEN)
                || t.priority.as_ref().is_some_and(|p| p.len() > MAX_NAME_LEN)
                || t.tags.len() > MAX_GROUPS
                || t.tags.iter().any(|x| x.len() > MAX_NAME_LEN) =>
        {
            return Err("task title must be 1 byte..16 KiB, names and tags up to 256 bytes");
        }
        ClientFrame::CompleteTask {
            result: Some(r), ..
        } if r.len() > MAX_SKILL_INSTRUCTIONS => {
            return Err("task result exceeds 256 KiB");
        }
        ClientFrame::CreateStream { name: stream }
        | ClientFrame::Publish { stream, .. }
        | ClientFrame::Subscribe { stream }
        | ClientFrame::Unsubscribe { stream }
            if stream.is_empty() || stream.len() > MAX_NAME_LEN =>
        {
            return Err("stream name must be 1..=256 bytes");
        }
        ClientFrame::GetSkill { name } | ClientFrame::RemoveSkill { name }
            if name.is_empty() || name.len() > MAX_NAME_LEN =>
        {
            return Err("skill name must be 1..=256 bytes");
        }
        ClientFrame::McpRegister(r) => {
            if r.server_name.trim().is_empty() || r.server_name.len() > MAX_NAME_LEN {
                return Err("MCP server name must be 1..=256 bytes");
            }
            if r.description.len() > MAX_SUMMARY_LEN {
                return Err("MCP server description exceeds 16 KiB");
            }
            if r.tools.len() > MAX_MCP_TOOLS
                || r.tools.iter().any(|t| {
                    t.name.trim().is_empty()
                        || t.name.len() > MAX_NAME_LEN
                        || t.description.len() > MAX_SUMMARY_LEN
                        || t.input_schema
                            .as_ref()
                            .is_some_and(|s| !s.get().starts_with('{'))
                })
            {
                return Err(
                    "at most 256 MCP tools, each named (1..=256 bytes), described in up to 16 KiB, with an object inputSchema",
                );
            }
        }
        ClientFrame::McpUnregister { server_name }
            if server_name.is_empty() || server_name.len() > MAX_NAME_LEN =>
        {
            return Err("MCP server name must be 1..=256 bytes");
        }
        ClientFrame::McpCall(c) => {
            if c.server_name.is_empty()
                || c.server_name.len() > MAX_NAME_LEN
                || c.tool_name.is_empty()
                || c.tool_name.len() > MAX_NAME_LEN
            {
                return Err("MCP server and tool names must be 1..=256 bytes");
            }
            if c.args.as_ref().is_some_and(|a| !a.get().starts_with('{')) {
                return Err("MCP call args must be an object");
            }
        }
        ClientFrame::GetFile { file_id }
        | ClientFrame::FileStatus { file_id }
        | ClientFrame::DeleteFile { file_id }
        | ClientFrame::GrantFileAccess { file_id, .. }
            if file_id.is_empty() || file_id.len() > MAX_NAME_LEN =>
        {
            return Err("fileId must be 1..=256 bytes");
        }
        ClientFrame::GrantFileAccess {
            peer_pubkey,
            sealed_key,
            ..
        } if peer_pubkey.len() > MAX_NAME_LEN
            || sealed_key.is_empty()
            || sealed_key.len() > MAX_PROFILE_FIELD_BYTES =>
        {
            return Err("grant_file_access needs a peerPubkey and a sealedKey of at most 4 KiB");
        }
        ClientFrame::ListFiles { query, from }
            if opt_len(query, MAX_NAME_LEN) && opt_len(from, MAX_NAME_LEN) => {}
        ClientFrame::ListFiles { .. } => {
            return Err("list_files query and from are at most 256 bytes");
        }
        ClientFrame::PeerFileRequest {
            target_pubkey,
            file_path: path,
        }
        | ClientFrame::PeerDirRequest {
            target_pubkey,
            dir_path: path,
            ..
        } if target_pubkey.len() > MAX_NAME_LEN || path.len() > MAX_PATH_LEN => {
            return Err("peer file requests take a key and a path of at most 4 KiB");
        }
        ClientFrame::McpCallResponse(r)
            if r.call_id.is_empty()
                || r.call_id.len() > MAX_NAME_LEN
                || r.error.as_ref().is_some_and(|e| e.len() > MAX_SUMMARY_LEN) =>
        {
            return Err("mcp_call_response needs a callId; its error is at most 16 KiB");
        }
        ClientFrame::ShareSkill(s) => {
            if s.name.trim().is_empty() || s.name.len() > MAX_NAME_LEN {
                return Err("skill name must be 1..=256 bytes");
            }
            if s.description.len() > MAX_SUMMARY_LEN {
                return Err("skill description exceeds 16 KiB");
            }
            if s.instructions.len() > MAX_SKILL_INSTRUCTIONS {
                return Err("skill instructions exceed 256 KiB");
            }
            if s.tags.len() > MAX_GROUPS || s.tags.iter().any(|t| t.len() > MAX_NAME_LEN) {
                return Err("at most 64 skill tags of 1..=256 bytes");
            }
        }
        _ => {}
    }
    Ok(())
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// The error code the reference gives a HEAD-era frame with bad arguments (`None`: the
/// frame is older, and gets `malformed`).
pub fn head_invalid_code(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "apikey_create" | "apikey_list" | "apikey_revoke" => "invalid_args",
        "vault_set" | "vault_list" | "vault_get" | "vault_delete" => "vault_error",
        "kick" | "disconnect" | "ban" | "unban" | "list_bans" | "watch" | "unwatch"
        | "watch_list" | "topic_create" | "topic_list" | "topic_join" | "topic_leave"
        | "topic_members" | "topic_history" | "topic_mark_read" => "invalid",
        _ => return None,
    })
}

/// Frame types meshd knows, and whether the client awaits a reply. Types served by
/// this build decode into their own variants; the rest become [`ClientFrame::Unsupported`].
fn lookup_kind(kind: &str) -> Option<(&'static str, bool)> {
    KNOWN.iter().find(|(k, _)| *k == kind).copied()
}

/// Every client frame of the reference broker at 56b1cc0 plus `session_hello` and
/// `client_ack`, with whether its sender waits for the answer. Several are answered by
/// the reference but sent by the CLI without `_reqId` and not awaited (`forget`,
/// `delete_file`, `vector_delete`, `share_context`, `subscribe`, `claim_task`,
/// `complete_task`, `mesh_execute`): an error for them would be handed by the CLI to an
/// unrelated pending request, so they must not get one.
pub(crate) const KNOWN: &[(&str, bool)] = &[
    ("hello", true),
    ("session_hello", true),
    ("send", true),
    ("set_status", false),
    ("list_peers", true),
    ("set_summary", false),
    ("set_visible", true),
    ("set_profile", true),
    ("set_stats", false),
    ("join_group", false),
    ("leave_group", false),
    ("set_state", false),
    ("get_state", true),
    ("list_state", true),
    ("message_status", true),
    ("client_ack", false),
    ("remember", true),
    ("recall", true),
    ("forget", false),
    ("get_file", true),
    ("list_files", true),
    ("file_status", true),
    ("delete_file", false),
    ("grant_file_access", true),
    ("share_context", false),
    ("get_context", true),
    ("list_contexts", true),
    ("create_task", true),
    ("claim_task", false),
    ("complete_task", false),
    ("list_tasks", true),
    ("vector_store", true),
    ("vector_search", true),
    ("vector_delete", false),
    ("list_collections", true),
    ("graph_query", true),
    ("graph_execute", true),
    ("mesh_query", true),
    ("mesh_execute", false),
    ("mesh_schema", true),
    ("create_stream", true),
    ("publish", false),
    ("subscribe", false),
    ("unsubscribe", false),
    ("list_streams", true),
    ("mesh_info", true),
    ("set_clock", true),
    ("pause_clock", true),
    ("resume_clock", true),
    ("get_clock", true),
    ("schedule", true),
    ("list_scheduled", true),
    ("cancel_scheduled", true),
    ("mcp_register", true),
    ("mcp_unregister", false),
    ("mcp_list", true),
    ("mcp_call", true),
    ("mcp_call_response", false),
    ("share_skill", true),
    ("get_skill", true),
    ("get_memory", true),
    ("get_task", true),
    ("list_skills", true),
    ("remove_skill", true),
    ("create_webhook", true),
    ("list_webhooks", true),
    ("delete_webhook", true),
    ("peer_file_request", true),
    ("peer_file_response", false),
    ("peer_dir_request", true),
    ("peer_dir_response", false),
    ("audit_query", true),
    ("audit_verify", true),
    // meshd extensions (no claudemesh client sends them).
    ("subscribe_tags", true),
    ("unsubscribe_tags", true),
    ("set_position", true),
    ("clear_position", true),
    // HEAD (213a6b3) additions; every one is awaited by `_reqId`.
    ("kick", true),
    ("disconnect", true),
    ("ban", true),
    ("unban", true),
    ("list_bans", true),
    ("vault_set", true),
    ("vault_list", true),
    ("vault_get", true),
    ("vault_delete", true),
    ("apikey_create", true),
    ("apikey_list", true),
    ("apikey_revoke", true),
    ("topic_create", true),
    ("topic_list", true),
    ("topic_join", false),
    ("topic_leave", false),
    ("topic_members", true),
    ("topic_history", true),
    ("topic_mark_read", false),
    ("watch", true),
    ("unwatch", true),
    ("watch_list", true),
    ("invite_create", true),
    ("signals", false),
    ("typing", false),
    ("read", false),
    ("dashboard_subscribe", true),
    ("member_role", true),
    ("dashboard_resources", true),
    ("share_list", true),
    ("share_set", true),
    ("search_peers", true),
    ("execute_code", true),
    ("mesh_log", true),
    ("mesh_logs", true),
    ("mesh_report", true),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_hello_without_cwd() {
        let text = r#"{"type":"hello","meshId":"m","memberId":"u","pubkey":"aa","sessionPubkey":"bb",
            "sessionId":"sdk-1-2","pid":42,"peerType":"connector","channel":"sdk","timestamp":1775599200123,
            "signature":"cc"}"#;
        let inbound = decode(text).unwrap();
        let ClientFrame::Hello(h) = inbound.frame else {
            panic!("not a hello")
        };
        assert_eq!(h.presence.cwd, None);
        assert_eq!(h.timestamp.to_string(), "1775599200123");
        assert_eq!(h.presence.pid.and_then(|p| p.as_i64()), Some(42));
    }

    #[test]
    fn envelope_errors_keep_correlation() {
        assert!(matches!(decode("not json"), Err(DecodeError::Malformed(_))));
        assert!(matches!(decode("[1,2]"), Err(DecodeError::Malformed(_))));
        assert!(matches!(
            decode(r#"{"type":7}"#),
            Err(DecodeError::Malformed(_))
        ));
        assert_eq!(
            decode(r#"{"type":"teleport","_reqId":"r1"}"#).unwrap_err(),
            DecodeError::UnknownType {
                kind: "teleport".into(),
                req_id: Some("r1".into())
            }
        );
        let err =
            decode(r#"{"type":"send","id":"s1","_reqId":"r2","targetSpec":"*"}"#).unwrap_err();
        let DecodeError::Invalid {
            kind,
            req_id,
            id,
            awaits_reply,
            ..
        } = err
        else {
            panic!("expected Invalid, got {err:?}")
        };
        assert_eq!(
            (kind, req_id.as_deref(), id.as_deref(), awaits_reply),
            ("send", Some("r2"), Some("s1"), true)
        );
    }

    #[test]
    fn unsupported_frames_know_whether_a_reply_is_awaited() {
        let f = decode(r#"{"type":"vector_search","collection":"c","_reqId":"r"}"#).unwrap();
        assert!(matches!(
            f.frame,
            ClientFrame::Unsupported {
                kind: "vector_search",
                awaits_reply: true
            }
        ));
        let f = decode(r#"{"type":"publish","stream":"s","data":1}"#).unwrap();
        assert!(!f.frame.awaits_reply());
    }

    #[test]
    fn profile_patch_distinguishes_absent_from_null() {
        let f = decode(r#"{"type":"set_profile","title":null,"bio":"b","evil":1}"#).unwrap();
        let ClientFrame::SetProfile(p) = f.frame else {
            panic!()
        };
        assert_eq!(
            p.fields,
            vec![
                ("title", serde_json::Value::Null),
                ("bio", serde_json::Value::String("b".into()))
            ]
        );
    }

    #[test]
    fn set_state_keeps_raw_value_and_defaults_to_null() {
        let f = decode(r#"{"type":"set_state","key":"k","value":{"b":1, "a":[1,2]}}"#).unwrap();
        let ClientFrame::SetState { value, .. } = f.frame else {
            panic!()
        };
        assert_eq!(value.unwrap().get(), r#"{"b":1, "a":[1,2]}"#);
        let f = decode(r#"{"type":"set_state","key":"k"}"#).unwrap();
        let ClientFrame::SetState { value, .. } = f.frame else {
            panic!()
        };
        assert!(value.is_none());
    }

    #[test]
    fn profile_fields_are_bounded() {
        let big = "x".repeat(MAX_PROFILE_FIELD_BYTES);
        let text = format!(r#"{{"type":"set_profile","bio":"{big}","_reqId":"r"}}"#);
        assert!(matches!(decode(&text), Err(DecodeError::Invalid { .. })));
    }

    #[test]
    fn limits_are_enforced() {
        let long = "x".repeat(MAX_STATE_KEY_LEN + 1);
        let text = format!(r#"{{"type":"get_state","key":"{long}","_reqId":"r"}}"#);
        assert!(matches!(decode(&text), Err(DecodeError::Invalid { .. })));
        let text = r#"{"type":"join_group","name":""}"#;
        assert!(matches!(decode(text), Err(DecodeError::Invalid { .. })));
    }

    #[test]
    fn unknown_type_is_truncated_on_a_char_boundary() {
        let kind = "é".repeat(100);
        let err = decode(&format!(r#"{{"type":"{kind}"}}"#)).unwrap_err();
        let DecodeError::UnknownType { kind, .. } = err else {
            panic!()
        };
        assert!(kind.len() <= 64 && kind.chars().all(|c| c == 'é'));
    }
}
