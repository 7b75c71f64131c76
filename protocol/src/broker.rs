//! Broker → client frames.
//!
//! Field names and optionality follow the reference broker exactly (§3.2): clients read
//! `_reqId`, `id`, `senderPubkey` and friends by name, and old clients ignore fields they
//! do not know, so HEAD-era additions are sent to everyone.

use serde::Serialize;
use serde_json::value::RawValue;

use crate::client::{GroupEntry, McpTool, Stats};

/// One outbound frame. Serialises with its `type` tag.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum BrokerFrame {
    /// Answer to a successful `hello`/`session_hello`.
    HelloAck(HelloAck),
    /// Answer to `send`, `set_visible`, `set_profile`.
    Ack(Ack),
    /// A delivered envelope or a broker event.
    Push(Push),
    /// Answer to `list_peers`.
    PeersList(PeersList),
    /// Another peer changed a shared key.
    StateChange(StateChange),
    /// Answer to `get_state`.
    StateResult(StateResult),
    /// Answer to `list_state`.
    StateList(StateList),
    /// Answer to `message_status`.
    MessageStatusResult(MessageStatusResult),
    /// Answer to `share_skill` and `remove_skill`.
    SkillAck(SkillAck),
    /// Answer to `get_skill`.
    SkillData(SkillData),
    /// Answer to `list_skills`.
    SkillList(SkillList),
    /// Answer to the clock frames.
    ClockStatus(ClockStatus),
    /// Answer to `audit_query`.
    AuditResult(AuditResult),
    /// Answer to `audit_verify`.
    AuditVerifyResult(AuditVerifyResult),
    /// Answer to `mesh_info`.
    MeshInfoResult(MeshInfoResult),
    /// Answer to `share_context` (the CLI ignores it).
    ContextShared(ContextShared),
    /// Answer to `get_context`.
    ContextResults(ContextResults),
    /// Answer to `list_contexts`.
    ContextList(ContextList),
    /// Answer to `remember`.
    MemoryStored(MemoryStored),
    /// Answer to `recall`.
    MemoryResults(MemoryResults),
    /// Answer to `create_task`.
    TaskCreated(TaskCreated),
    /// Answer to `list_tasks`, `claim_task`, `complete_task`.
    TaskList(TaskList),
    /// Answer to `get_task` (meshd extension).
    TaskData(TaskData),
    /// Answer to `get_memory` (meshd extension).
    MemoryData(MemoryData),
    /// Answer to `create_stream`.
    StreamCreated(StreamCreated),
    /// Data published to a subscribed stream.
    StreamData(StreamData),
    /// Answer to `subscribe`.
    Subscribed(Subscribed),
    /// Answer to `list_streams`.
    StreamList(StreamList),
    /// Answer to `create_webhook` and `delete_webhook`.
    WebhookAck(WebhookAck),
    /// Answer to `list_webhooks`.
    WebhookList(WebhookList),
    /// Answer to `schedule`.
    ScheduledAck(ScheduledAck),
    /// Answer to `list_scheduled`.
    ScheduledList(ScheduledList),
    /// Answer to `cancel_scheduled`.
    CancelScheduledAck(CancelScheduledAck),
    /// Answer to `mcp_register`.
    McpRegisterAck(McpRegisterAck),
    /// Answer to `mcp_list`.
    McpListResult(McpListResult),
    /// Answer to `mcp_call`.
    McpCallResult(McpCallResult),
    /// A call for the host of an MCP server (no `_reqId`: the host answers by `callId`).
    McpCallForward(McpCallForward),
    /// Answer to `get_file`.
    FileUrl(FileUrl),
    /// Answer to `list_files`.
    FileList(FileList),
    /// Answer to `file_status`.
    FileStatusResult(FileStatusResult),
    /// Answer to `grant_file_access`.
    GrantFileAccessOk(GrantFileAccessOk),
    /// Another peer asks this one for a file.
    PeerFileRequestForward(PeerFileRequestForward),
    /// The asked peer's answer.
    PeerFileResponseForward(PeerFileResponseForward),
    /// Another peer asks this one for a directory listing.
    PeerDirRequestForward(PeerDirRequestForward),
    /// The asked peer's listing.
    PeerDirResponseForward(PeerDirResponseForward),
    /// Answer to `subscribe_tags` / `unsubscribe_tags` (meshd extension).
    TagSubscriptions(TagSubscriptions),
    /// Answer to `set_position` / `clear_position` (meshd extension).
    Position(PositionFrame),
    /// A refusal.
    Error(ErrorFrame),
    /// Moderation replies (they carry their own `type`).
    #[serde(untagged)]
    Moderation(crate::moderation::Reply),
    /// `invite_created` (it carries its own `type`).
    #[serde(untagged)]
    InviteCreated(crate::invites::Created),
    /// `share_list` / `share_set` replies.
    #[serde(untagged)]
    Share(crate::shares::Reply),
    /// Vault replies.
    #[serde(untagged)]
    Vault(crate::vault::Reply),
    /// API key replies.
    #[serde(untagged)]
    ApiKey(crate::apikeys::Reply),
    /// Topic replies.
    #[serde(untagged)]
    Topic(crate::topics::Reply),
    /// Watch replies.
    #[serde(untagged)]
    Watch(crate::watch::Reply),
}

/// meshd extension: where a bridged peer, or a message relayed by a bridge, comes
/// from (a mesh on this broker, or on `broker`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bridged {
    /// The mesh it comes from.
    pub mesh_id: String,
    /// That mesh's name.
    pub mesh_name: String,
    /// The broker hosting that mesh, when it is not this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    /// For a relayed message: every mesh it was delivered in before, origin first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path: Vec<Hop>,
}

/// One mesh on a relayed message's path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hop {
    /// The broker hosting it (`None`: the broker that delivered the push).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    /// Mesh id.
    pub mesh_id: String,
}

/// `position`: where the presence stands now (`null`: nowhere).
#[derive(Debug, Serialize)]
pub struct PositionFrame {
    /// The position in force.
    pub position: Option<crate::spatial::Position>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `tag_subscriptions`: the presence's subscriptions after the change.
#[derive(Debug, Serialize)]
pub struct TagSubscriptions {
    /// Every tag subscribed to, in subscription order.
    pub tags: Vec<String>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

impl BrokerFrame {
    /// The JSON text of this frame.
    pub fn to_json(&self) -> String {
        // Serialising these types cannot fail: every map key is a string and no
        // Serialize impl here returns an error.
        serde_json::to_string(self)
            .unwrap_or_else(|e| format!(r#"{{"type":"error","code":"internal","message":"{e}"}}"#))
    }
}

/// `hello_ack` (§2.2 plus the HEAD additions of §2.7).
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HelloAck {
    /// Id of this presence.
    pub presence_id: String,
    /// Effective display name.
    pub member_display_name: String,
    /// True when a saved session state existed ("welcome back").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored: Option<bool>,
    /// Summary saved at the last disconnect.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_summary: Option<String>,
    /// ISO time of the last disconnect.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen_at: Option<String>,
    /// Saved groups, when the hello carried none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored_groups: Option<Vec<GroupEntry>>,
    /// Cumulative counters across sessions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored_stats: Option<CumulativeStats>,
    /// HEAD: the member's profile as the broker sees it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub member_profile: Option<MemberProfile>,
}

/// Counters carried in `hello_ack.restoredStats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CumulativeStats {
    /// Messages received.
    pub messages_in: u64,
    /// Messages sent.
    pub messages_out: u64,
    /// Tool calls.
    pub tool_calls: u64,
    /// Errors.
    pub errors: u64,
}

/// HEAD's `hello_ack.memberProfile`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberProfile {
    /// The member's role in the mesh (`admin` or `member`).
    pub role_tag: String,
    /// The presence's groups.
    pub groups: Vec<GroupEntry>,
    /// Always `"push"`: meshd pushes messages as they arrive.
    pub message_mode: String,
}

/// `ack`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ack {
    /// The send's `id` (or the `_reqId`/resource id for the other ack shapes).
    pub id: String,
    /// Broker message id; empty when the send was refused.
    pub message_id: String,
    /// Whether the message was accepted.
    pub queued: bool,
    /// Why a send was refused (HEAD shape).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `push`: a delivered envelope, or a broker event when `subtype` is set.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Push {
    /// Broker message id.
    pub message_id: String,
    /// Mesh id.
    pub mesh_id: String,
    /// Session key of the sender if it announced one, else its member key;
    /// `"system"` for events.
    pub sender_pubkey: String,
    /// `now`, `next` or `low`.
    pub priority: &'static str,
    /// Base64 nonce, or empty.
    pub nonce: String,
    /// Base64 ciphertext, or empty for events.
    pub ciphertext: String,
    /// ISO send time.
    pub created_at: String,
    /// `system`, `webhook` or `reminder`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subtype: Option<&'static str>,
    /// Event name for system/webhook pushes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<std::borrow::Cow<'static, str>>,
    /// Event payload, as JSON text (a webhook's body goes out as it was posted, keys
    /// in their order).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_data: Option<Box<RawValue>>,
    /// HEAD: the sender's member key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender_member_pubkey: Option<String>,
    /// HEAD: the sender's member id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender_member_id: Option<String>,
    /// HEAD: the sender's display name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender_name: Option<String>,
    /// HEAD: the sender's idempotency id.
    #[serde(rename = "client_message_id", skip_serializing_if = "Option::is_none")]
    pub client_message_id: Option<String>,
    /// meshd extension: the message's tags (absent when it has none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// meshd extension: the mesh a bridged sender or relayed message comes from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bridged: Option<Bridged>,
    /// meshd extension: what a broadcast, group or tag message was sent to (`*`,
    /// `@group`, `tag:…`), so a client can file it under that conversation rather than
    /// the sender's. Absent on direct messages, topic posts and events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_spec: Option<String>,
    /// A topic post's fields (boxed: most pushes are not topic posts).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub topic: Option<Box<TopicPush>>,
}

/// The fields a topic post's push adds.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TopicPush {
    /// HEAD: the topic's name.
    pub topic: String,
    /// meshd: the topic's id (`#<topicId>` targets it).
    pub topic_id: String,
    /// HEAD: the message answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to_id: Option<String>,
    /// meshd: 1 (base64 plaintext) or 2 (sealed with the topic key).
    pub body_version: i64,
}

/// `peers_list`.
#[derive(Debug, Serialize)]
pub struct PeersList {
    /// Live, visible peers (the caller included).
    pub peers: Vec<PeerEntry>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// One `peers_list` entry (§4.3 plus HEAD's `memberPubkey`/`peerRole`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerEntry {
    /// Session key if announced, else member key.
    pub pubkey: String,
    /// Effective display name.
    pub display_name: String,
    /// `idle`, `working` or `dnd`.
    pub status: &'static str,
    /// Summary or null.
    pub summary: Option<String>,
    /// Groups.
    pub groups: Vec<GroupEntry>,
    /// Client session id.
    pub session_id: String,
    /// ISO connect time.
    pub connected_at: String,
    /// Working directory (`""` when the client sent none).
    pub cwd: String,
    /// Host name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Peer type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_type: Option<String>,
    /// Channel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Last reported counters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
    /// Visibility (always present for live peers).
    pub visible: bool,
    /// Profile, only when non-empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<serde_json::Map<String, serde_json::Value>>,
    /// HEAD: the member key behind this presence.
    pub member_pubkey: String,
    /// HEAD: `control-plane` for `hello` presences, `session` for `session_hello` ones.
    pub peer_role: &'static str,
    /// meshd extension: the broker hosting a peer of another broker (absent for local
    /// peers; clients ignore unknown fields).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    /// meshd extension: the tags this presence subscribes to (absent when none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// meshd extension: where the presence stands (absent when nowhere).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<crate::spatial::Position>,
    /// meshd extension: a peer of another mesh, listed through a bridge.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bridged: Option<Bridged>,
}

/// `state_change`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StateChange {
    /// Key.
    pub key: String,
    /// New value, verbatim.
    pub value: Box<RawValue>,
    /// Display name of the writer.
    pub updated_by: String,
}

/// `state_result`. A missing key has `value: null`, `updatedBy: ""`, `updatedAt: ""`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StateResult {
    /// Key.
    pub key: String,
    /// Value, verbatim, or null.
    pub value: Box<RawValue>,
    /// ISO time of the last write, or `""`.
    pub updated_at: String,
    /// Display name of the last writer, or `""`.
    pub updated_by: String,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// An audit entry.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// Position in the mesh's chain.
    pub id: i64,
    /// Event type.
    pub event_type: String,
    /// Actor's display name, or `system`.
    pub actor: String,
    /// Event data.
    pub payload: Box<RawValue>,
    /// Entry hash.
    pub hash: String,
    /// Broker signature of the hash (meshd extension).
    pub sig: String,
    /// ISO time.
    pub created_at: String,
}

/// `audit_result`.
#[derive(Debug, Serialize)]
pub struct AuditResult {
    /// Entries, newest first.
    pub entries: Vec<AuditEntry>,
    /// Entries matching in all.
    pub total: i64,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `audit_verify_result`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditVerifyResult {
    /// Every entry checks out.
    pub valid: bool,
    /// Entries checked.
    pub entries: usize,
    /// The first that does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broken_at: Option<i64>,
    /// Why (meshd extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// Task counts in `mesh_info_result`.
#[derive(Debug, Default, Serialize)]
pub struct TaskCounts {
    /// Open.
    pub open: i64,
    /// Claimed.
    pub claimed: i64,
    /// Done.
    pub done: i64,
}

/// `mesh_info_result`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshInfoResult {
    /// Mesh id.
    pub mesh: String,
    /// Peers the asker can see (on every broker of the mesh).
    pub peers: usize,
    /// Groups in use, as `@name`.
    pub groups: Vec<String>,
    /// Shared-state keys.
    pub state_keys: Vec<String>,
    /// Live memories.
    pub memory_count: i64,
    /// Stored files (0: this build stores none).
    pub file_count: i64,
    /// Tasks by status.
    pub tasks: TaskCounts,
    /// Registered streams.
    pub streams: Vec<String>,
    /// SQL tables (none: meshd runs no per-mesh SQL).
    pub tables: Vec<String>,
    /// Vector collections (none, as the reference).
    pub collections: Vec<String>,
    /// The asker's display name.
    pub your_name: String,
    /// The asker's groups, `{name, role?}` as in `peers_list` (the reference's shape,
    /// which the CLI's `mesh_info` tool renders as `@name:role`).
    pub your_groups: Vec<GroupEntry>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `context_shared`.
#[derive(Debug, Serialize)]
pub struct ContextShared {
    /// Context id (the member's).
    pub id: String,
    /// Correlation id (echoed, unlike the reference).
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// A context in `context_results`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContextEntry {
    /// Who shared it.
    pub peer_name: String,
    /// Summary.
    pub summary: String,
    /// Files read.
    pub files_read: Vec<String>,
    /// Key findings.
    pub key_findings: Vec<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// ISO time.
    pub updated_at: String,
}

/// `context_results`.
#[derive(Debug, Serialize)]
pub struct ContextResults {
    /// Matches, newest first.
    pub contexts: Vec<ContextEntry>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// A context in `context_list`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContextSummary {
    /// Who shared it.
    pub peer_name: String,
    /// Summary.
    pub summary: String,
    /// Tags.
    pub tags: Vec<String>,
    /// ISO time.
    pub updated_at: String,
}

/// `context_list`.
#[derive(Debug, Serialize)]
pub struct ContextList {
    /// Every context, newest first.
    pub contexts: Vec<ContextSummary>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `memory_stored`.
#[derive(Debug, Serialize)]
pub struct MemoryStored {
    /// Memory id.
    pub id: String,
    /// The id again, as `memoryId`: the newest CLI's daemon reads this name (the
    /// reference sends only `id`, so that daemon never sees the id and the CLI stores
    /// the memory a second time through its fallback path).
    #[serde(rename = "memoryId")]
    pub memory_id: String,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// A recalled memory.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Memory {
    /// Id.
    pub id: String,
    /// The note.
    pub content: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Display name of who remembered it.
    pub remembered_by: String,
    /// ISO time.
    pub remembered_at: String,
}

/// `memory_data`: one memory, whole.
#[derive(Debug, Serialize)]
pub struct MemoryData {
    /// The memory.
    pub memory: Memory,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `task_data`: one task, whole.
#[derive(Debug, Serialize)]
pub struct TaskData {
    /// The task.
    pub task: TaskEntry,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `memory_results`.
#[derive(Debug, Serialize)]
pub struct MemoryResults {
    /// Best matches first.
    pub memories: Vec<Memory>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `task_created`.
#[derive(Debug, Serialize)]
pub struct TaskCreated {
    /// Task id.
    pub id: String,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// A task in `task_list`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskEntry {
    /// Id.
    pub id: String,
    /// Title.
    pub title: String,
    /// Assignee or null.
    pub assignee: Option<String>,
    /// Display name of the claimer, or null.
    pub claimed_by: Option<String>,
    /// `open`, `claimed` or `done`.
    pub status: String,
    /// Priority.
    pub priority: String,
    /// Display name of the creator, or null.
    pub created_by: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// ISO creation time.
    pub created_at: String,
    /// Outcome, once done (meshd extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
}

/// `task_list`.
#[derive(Debug, Serialize)]
pub struct TaskList {
    /// Tasks, newest first.
    pub tasks: Vec<TaskEntry>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `stream_created`.
#[derive(Debug, Serialize)]
pub struct StreamCreated {
    /// Stream id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `stream_data`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamData {
    /// Stream name.
    pub stream: String,
    /// The published value, verbatim.
    pub data: Box<RawValue>,
    /// Display name of the publisher.
    pub published_by: String,
}

/// `subscribed`.
#[derive(Debug, Serialize)]
pub struct Subscribed {
    /// Stream name.
    pub stream: String,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// One entry of `stream_list`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamEntry {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Display name of the creator.
    pub created_by: String,
    /// ISO creation time.
    pub created_at: String,
    /// Live subscribers on this broker.
    pub subscriber_count: usize,
}

/// `stream_list`.
#[derive(Debug, Serialize)]
pub struct StreamList {
    /// Streams of the mesh, by name.
    pub streams: Vec<StreamEntry>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `webhook_ack`. `url` and `secret` are empty after a deletion.
#[derive(Debug, Serialize)]
pub struct WebhookAck {
    /// Webhook name.
    pub name: String,
    /// `POST` target (carries the secret).
    pub url: String,
    /// The secret.
    pub secret: String,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// One entry of `webhook_list`. `url` (which carries the secret) is empty unless the
/// viewer created the webhook or is an admin.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookEntry {
    /// Name.
    pub name: String,
    /// URL, or empty.
    pub url: String,
    /// Still accepting posts.
    pub active: bool,
    /// ISO creation time.
    pub created_at: String,
}

/// `webhook_list`.
#[derive(Debug, Serialize)]
pub struct WebhookList {
    /// Active webhooks of the mesh.
    pub webhooks: Vec<WebhookEntry>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `clock_status`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClockStatus {
    /// Ticks per real minute (0: no clock).
    pub speed: u32,
    /// Paused (or no clock).
    pub paused: bool,
    /// Ticks so far.
    pub tick: u64,
    /// Simulated time, ISO.
    pub sim_time: String,
    /// When the clock was created, ISO.
    pub started_at: String,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `skill_ack`.
#[derive(Debug, Serialize)]
pub struct SkillAck {
    /// Skill name.
    pub name: String,
    /// `shared`, `removed` or `not_found`.
    pub action: &'static str,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// A skill as `get_skill` returns it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Skill {
    /// Name (unique per mesh).
    pub name: String,
    /// One-line description.
    pub description: String,
    /// The instructions.
    pub instructions: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Display name of who shared it.
    pub author: String,
    /// ISO time it was first shared.
    pub created_at: String,
}

/// `skill_data`.
#[derive(Debug, Serialize)]
pub struct SkillData {
    /// The skill, or null.
    pub skill: Option<Skill>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// A skill as `list_skills` returns it (no instructions).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SkillSummary {
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Author.
    pub author: String,
    /// ISO creation time.
    pub created_at: String,
}

/// `skill_list`.
#[derive(Debug, Serialize)]
pub struct SkillList {
    /// Matching skills, by name.
    pub skills: Vec<SkillSummary>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `state_list`.
#[derive(Debug, Serialize)]
pub struct StateList {
    /// Every key of the mesh, sorted.
    pub entries: Vec<StateEntry>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// One `state_list` entry.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StateEntry {
    /// Key.
    pub key: String,
    /// Value, verbatim.
    pub value: Box<RawValue>,
    /// Display name of the last writer.
    pub updated_by: String,
    /// ISO time of the last write.
    pub updated_at: String,
}

/// `message_status_result` (§4.7).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageStatusResult {
    /// The message.
    pub message_id: String,
    /// Its target spec.
    pub target_spec: String,
    /// Whether it was delivered.
    pub delivered: bool,
    /// ISO delivery time or null.
    pub delivered_at: Option<String>,
    /// Per-recipient state.
    pub recipients: Vec<RecipientStatus>,
    /// meshd extension: the message's tags (absent when it has none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// meshd extension: brokers a link policy kept the message from (absent when none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<PolicyRefusal>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// One recipient in a `message_status_result`.
#[derive(Debug, Serialize)]
pub struct RecipientStatus {
    /// Display name.
    pub name: String,
    /// Key addressed.
    pub pubkey: String,
    /// `delivered`, `held` (recipient online, message waiting), `disconnected`, or,
    /// across brokers, `queued`, `forwarded` and `refused`.
    pub status: &'static str,
    /// meshd extension: why it was refused (e.g. `policy_denied`), when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// meshd extension: a broker whose link policy kept a multicast from its peers.
#[derive(Debug, Serialize)]
pub struct PolicyRefusal {
    /// The broker whose peers did not get it.
    pub broker: String,
    /// Whose policy: `export` (this broker's) or `import` (that broker's).
    pub by: String,
    /// Which rule: `kind:broadcast`, `tag:secret`, …
    pub reason: String,
}

/// `error`. Handshake errors carry neither `id` nor `_reqId`.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorFrame {
    /// Machine-readable code.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// The `id` of the send this refuses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

impl ErrorFrame {
    /// An error without correlation (handshake errors, `no_hello`).
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            id: None,
            req_id: None,
        }
    }

    /// The same error answering a request.
    #[must_use]
    pub fn with_req_id(mut self, req_id: Option<String>) -> Self {
        self.req_id = req_id;
        self
    }
}

/// Builds the payload of a `system` push about a peer (`peer_joined`, `peer_left`, …).
pub fn peer_event_data(name: &str, pubkey: &str) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert("name".into(), name.into());
    m.insert("pubkey".into(), pubkey.into());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_shape() {
        let f = BrokerFrame::Ack(Ack {
            id: "s1".into(),
            message_id: "m1".into(),
            queued: true,
            error: None,
            req_id: None,
        });
        assert_eq!(
            f.to_json(),
            r#"{"type":"ack","id":"s1","messageId":"m1","queued":true}"#
        );
    }

    #[test]
    fn error_shape_and_req_id() {
        let f = BrokerFrame::Error(
            ErrorFrame::new("unknown_message_type", "unknown type x").with_req_id(Some("r".into())),
        );
        assert_eq!(
            f.to_json(),
            r#"{"type":"error","code":"unknown_message_type","message":"unknown type x","_reqId":"r"}"#
        );
    }

    #[test]
    fn push_omits_absent_optionals() {
        let f = BrokerFrame::Push(Push {
            message_id: "m".into(),
            mesh_id: "x".into(),
            sender_pubkey: "system".into(),
            priority: "low",
            nonce: String::new(),
            ciphertext: String::new(),
            created_at: "2026-01-01T00:00:00.000Z".into(),
            subtype: Some("system"),
            event: Some("peer_left".into()),
            event_data: serde_json::value::to_raw_value(&peer_event_data("a", "b")).ok(),
            sender_member_pubkey: None,
            sender_member_id: None,
            sender_name: None,
            client_message_id: None,
            tags: Vec::new(),
            bridged: None,
            target_spec: None,
            topic: None,
        });
        let v: serde_json::Value = serde_json::from_str(&f.to_json()).unwrap();
        assert!(v.get("targetSpec").is_none());
        assert_eq!(v["type"], "push");
        assert_eq!(v["senderPubkey"], "system");
        assert_eq!(v["eventData"]["name"], "a");
        assert!(v.get("senderName").is_none());
        assert!(v.get("tags").is_none());
    }
}

/// `scheduled_ack` (schedule times are epoch milliseconds, not ISO strings).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScheduledAck {
    /// Id of the schedule.
    pub scheduled_id: String,
    /// First delivery (ms).
    pub deliver_at: i64,
    /// The cron expression, for recurring schedules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// A pending schedule in `scheduled_list`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScheduledEntry {
    /// Id.
    pub id: String,
    /// Target spec.
    pub to: String,
    /// Text.
    pub message: String,
    /// Next delivery (ms).
    pub deliver_at: i64,
    /// Created (ms).
    pub created_at: i64,
    /// The cron expression, for recurring schedules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// Deliveries so far (recurring schedules).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fired_count: Option<i64>,
}

/// `scheduled_list`.
#[derive(Debug, Serialize)]
pub struct ScheduledList {
    /// The caller's pending schedules, soonest first.
    pub messages: Vec<ScheduledEntry>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `cancel_scheduled_ack`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelScheduledAck {
    /// The schedule.
    pub scheduled_id: String,
    /// Whether a pending schedule of the caller's was cancelled.
    pub ok: bool,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `mcp_register_ack`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct McpRegisterAck {
    /// Server name.
    pub server_name: String,
    /// Tools registered.
    pub tool_count: usize,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// A server in `mcp_list_result`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct McpServerEntry {
    /// Server name.
    pub name: String,
    /// What it offers.
    pub description: String,
    /// Display name of the hosting member.
    pub hosted_by: String,
    /// Its tools (with their input schemas).
    pub tools: Vec<McpTool>,
    /// Whether its host is connected.
    pub online: bool,
    /// ISO time the host left, for a persistent server that is offline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offline_since: Option<String>,
    /// Whether it survives its host's disconnect.
    pub persistent: bool,
}

/// `mcp_list_result`.
#[derive(Debug, Serialize)]
pub struct McpListResult {
    /// The mesh's servers, by name.
    pub servers: Vec<McpServerEntry>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `mcp_call_result`.
#[derive(Debug, Serialize)]
pub struct McpCallResult {
    /// The tool's result, verbatim.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Box<RawValue>>,
    /// Or why there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `mcp_call_forward`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct McpCallForward {
    /// Answer with this id.
    pub call_id: String,
    /// Server name.
    pub server_name: String,
    /// Tool name.
    pub tool_name: String,
    /// Arguments, verbatim.
    pub args: Box<RawValue>,
    /// Display name of the caller.
    pub caller_name: String,
}

/// `file_url`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FileUrl {
    /// File id.
    pub file_id: String,
    /// A short-lived signed download URL.
    pub url: String,
    /// File name.
    pub name: String,
    /// Whether the bytes are E2E-encrypted (opaque to the broker).
    pub encrypted: bool,
    /// The file key sealed for the caller, for an encrypted file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sealed_key: Option<String>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// A file in `file_list`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FileEntry {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Bytes.
    pub size: i64,
    /// Tags.
    pub tags: Vec<String>,
    /// Uploader's display name.
    pub uploaded_by: String,
    /// ISO upload time.
    pub uploaded_at: String,
    /// Kept until deleted (else it expires).
    pub persistent: bool,
    /// E2E-encrypted.
    pub encrypted: bool,
}

/// `file_list`.
#[derive(Debug, Serialize)]
pub struct FileList {
    /// Newest first.
    pub files: Vec<FileEntry>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// One download in `file_status_result`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FileAccess {
    /// Who.
    pub peer_name: String,
    /// ISO time.
    pub accessed_at: String,
}

/// `file_status_result`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FileStatusResult {
    /// File id.
    pub file_id: String,
    /// Downloads (URLs handed out), newest first.
    pub accesses: Vec<FileAccess>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `grant_file_access_ok`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrantFileAccessOk {
    /// File id.
    pub file_id: String,
    /// The peer granted.
    pub peer_pubkey: String,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `peer_file_request_forward`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerFileRequestForward {
    /// Who asks (answer to this key).
    pub requester_pubkey: String,
    /// Path.
    pub file_path: String,
    /// The requester's correlation id, passed through.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `peer_file_response_forward`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerFileResponseForward {
    /// Path.
    pub file_path: String,
    /// The file, base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Or why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The requester's correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `peer_dir_request_forward`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerDirRequestForward {
    /// Who asks.
    pub requester_pubkey: String,
    /// Directory.
    pub dir_path: String,
    /// Glob filter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// The requester's correlation id, passed through.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `peer_dir_response_forward`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerDirResponseForward {
    /// Directory.
    pub dir_path: String,
    /// Entries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entries: Option<Vec<String>>,
    /// Or why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The requester's correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}
