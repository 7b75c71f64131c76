//! The broker-to-broker wire contract (federation), sans-IO.
//!
//! Brokers talk over one QUIC connection per pair (ALPN [`ALPN`]). Every stream carries
//! length-prefixed [postcard] frames: a 4-byte big-endian length, then the body. The
//! length is checked against a cap *before* anything is allocated ([`frame_len`]).
//!
//! Streams and what they carry (one traffic class each, so a backlog of one never
//! delays another):
//! - *control* (bidirectional, opened by the dialer): [`Frame::Hello`] both ways first,
//!   then mesh consent ([`Frame::MeshOffer`], [`Frame::MeshReady`],
//!   [`Frame::MeshWithdraw`]) and [`Frame::Close`];
//! - *messages* (bidirectional, one per direction, opened by the sending side): member
//!   announcements and durable direct messages in order, answered on the same stream by
//!   [`Frame::Ack`] / [`Frame::Reject`] — members travel ahead of the messages that
//!   depend on them;
//! - *presence* (unidirectional): snapshots, upserts and departures of sessions;
//! - *live* (unidirectional): broadcasts, group messages and shared-state changes.
//!
//! The first byte of every stream other than control names its [`StreamClass`].

use serde::{Deserialize, Serialize};

/// ALPN protocol id of federation links.
pub const ALPN: &[u8] = b"meshd-fed/1";
/// Version carried in the hello; a peer with another version is refused with a clear
/// reason (frames are postcard: an unknown variant or field is a decode error). 2: the
/// feature frames (tasks, clock, files, MCP servers sent in parts, …). 3: tags on
/// messages and presence, link policies (`RejectReason::Policy`, `MulticastRefused`),
/// positions in presence, bridges (`Bridges`, `BridgeRelay`, `BridgePeers`, `Dm.bridged`).
pub const VERSION: u16 = 4;
/// Default UDP port of the federation endpoint (DNS A/AAAA fallback).
pub const DEFAULT_PORT: u16 = 7901;
/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Which traffic a stream carries (its first byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StreamClass {
    /// Durable direct messages and member announcements (bidirectional).
    Messages = 1,
    /// Presence (unidirectional).
    Presence = 2,
    /// Broadcasts, groups and state (unidirectional).
    Live = 3,
}

impl StreamClass {
    /// The class named by a stream's first byte.
    pub const fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Messages),
            2 => Some(Self::Presence),
            3 => Some(Self::Live),
            _ => None,
        }
    }
}

/// A mesh this broker is ready to exchange with the peer (its side of the consent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshClaim {
    /// Mesh id (the same on every broker of the mesh).
    pub mesh_id: String,
}

/// Capability a dialer puts in its hello when it already has a link to the peer (a dial
/// begun before that link came up, completing after it): both sides then close the new
/// connection, whatever they hold, and keep the serving link, instead of letting the
/// tie-break replace it and lose what was in flight on it.
pub const CAP_HAS_LINK: &str = "has_link";
/// Hello capability: the sender understands [`Frame::Signal`].
pub const CAP_SIGNALS: &str = "signals";
/// Hello capability: the sender understands [`Frame::Log`].
pub const CAP_TELEMETRY: &str = "telemetry";

/// A mesh log entry written at the sending broker by a member it hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Mesh.
    pub mesh_id: String,
    /// Entry id (applied once).
    pub id: String,
    /// Epoch ms.
    pub at: i64,
    /// 0 debug … 3 error.
    pub level: i64,
    /// The writer's member id and member key.
    pub member_id: String,
    /// The writer's member key.
    pub member_pubkey: String,
    /// The writer's display name.
    pub peer_name: String,
    /// The writer's session (or member) key.
    pub peer_pubkey: String,
    /// Message.
    pub message: String,
    /// JSON text.
    pub data: Option<String>,
}

/// First frame on the control stream, both ways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`VERSION`].
    pub version: u16,
    /// The sender's broker name; must equal the name its certificate was accepted for.
    pub broker: String,
    /// Optional features the sender understands.
    pub caps: Vec<String>,
    /// Meshes the sender is ready to exchange with this peer right now.
    pub meshes: Vec<MeshClaim>,
}

/// The home broker's description of a shared mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshOffer {
    /// Mesh id.
    pub mesh_id: String,
    /// Display name.
    pub name: String,
    /// Slug on the home broker.
    pub slug: String,
    /// Every broker the home shares the mesh with, the home included; replicas link
    /// with each other only when both are on it.
    pub roster: Vec<String>,
}

/// A member the sending broker hosts (or revoked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberAnn {
    /// Member id.
    pub member_id: String,
    /// Ed25519 public key, hex.
    pub pubkey: String,
    /// Display name.
    pub display_name: String,
    /// Role.
    pub role: String,
    /// Revoked members stay listed so the revocation reaches every broker.
    pub revoked: bool,
}

/// A durable direct message forwarded to the broker hosting its recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dm {
    /// Position in the sending broker's outbox for this link: strictly increasing per
    /// link, not contiguous. The receiver de-duplicates by (sender broker, seq).
    pub seq: u64,
    /// Mesh id.
    pub mesh_id: String,
    /// Message id, kept end to end.
    pub id: String,
    /// Sending member.
    pub sender_member_id: String,
    /// Sending member's key (must be hosted by the sending broker).
    pub sender_member_pubkey: String,
    /// The sender's routing key (session key or member key).
    pub sender_pubkey: String,
    /// Sender's display name.
    pub sender_name: String,
    /// The target spec the client used.
    pub target_spec: String,
    /// Recipient key (member or session).
    pub target_key: String,
    /// Priority rank (see `routing::Priority::rank`).
    pub priority: i64,
    /// E2E nonce, untouched.
    pub nonce: String,
    /// E2E ciphertext, untouched.
    pub ciphertext: String,
    /// Subtype, if any.
    pub subtype: Option<String>,
    /// The sender's client message id.
    pub client_message_id: Option<String>,
    /// Creation time (ms).
    pub created_at: i64,
    /// Expiry (ms).
    pub expires_at: i64,
    /// Tags (see [`crate::tags`]).
    pub tags: Vec<String>,
    /// For a DM through a bridge: the sender's mesh on the sending broker (id, name);
    /// `mesh_id` is then the recipient's mesh on the receiver.
    pub bridged: Option<(String, String)>,
}

/// A broadcast or group message, live-only, delivered by the receiver to its own peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Multicast {
    /// Mesh id.
    pub mesh_id: String,
    /// Message id.
    pub id: String,
    /// Sending member.
    pub sender_member_id: String,
    /// Sending member's key.
    pub sender_member_pubkey: String,
    /// Sender's routing key.
    pub sender_pubkey: String,
    /// Sender's display name.
    pub sender_name: String,
    /// `*`, `@group` or `tag:NAME`.
    pub target_spec: String,
    /// Priority rank.
    pub priority: i64,
    /// Nonce.
    pub nonce: String,
    /// Ciphertext.
    pub ciphertext: String,
    /// The sender's client message id.
    pub client_message_id: Option<String>,
    /// Creation time (ms).
    pub created_at: i64,
    /// `reminder` for a scheduled delivery.
    pub subtype: Option<String>,
    /// Tags (see [`crate::tags`]); a `tag:NAME` target's NAME among them.
    pub tags: Vec<String>,
}

/// A bridge this broker keeps between one of its meshes and a mesh of the receiver
/// (its side of the consent; a bridge flows when both sides claim it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeClaim {
    /// The sender's mesh.
    pub mesh_id: String,
    /// Its name (shown with bridged peers and messages).
    pub mesh_name: String,
    /// The receiver's mesh.
    pub remote_mesh_id: String,
    /// The sender relays tagged messages of its mesh into the receiver's.
    pub relays: bool,
    /// The sender takes tagged messages of the receiver's mesh into its own.
    pub accepts: bool,
    /// Each mesh's peers are listed in the other and reachable by DM.
    pub peers: bool,
}

/// A tagged multicast relayed by a bridge into a mesh of the receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeRelay {
    /// The receiver's mesh it goes into.
    pub to_mesh_id: String,
    /// The sender's mesh it was delivered in.
    pub from_mesh_id: String,
    /// Every (broker, mesh) it was delivered in, origin first, the sender's last.
    pub path: Vec<(String, String)>,
    /// The message as delivered there (its `mesh_id` is the sender's mesh).
    pub message: Multicast,
}

/// A topic (created here, or its key flag set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicSet {
    /// Mesh id.
    pub mesh_id: String,
    /// Topic id (derived from the mesh and the name: the same on every broker).
    pub id: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// `public`, `private` or `dm`.
    pub visibility: String,
    /// Creator's member id.
    pub created_by: Option<String>,
    /// The key flag.
    pub encrypted_key_pubkey: Option<String>,
    /// Creation (ms).
    pub created_at: i64,
}

/// A member subscribed to (or left) a topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMemberSet {
    /// Mesh id.
    pub mesh_id: String,
    /// Topic id.
    pub topic_id: String,
    /// Member id.
    pub member_id: String,
    /// Its key (hosted by the sending broker).
    pub member_pubkey: String,
    /// `lead`, `member` or `observer`.
    pub role: String,
    /// Subscribed (`false`: left).
    pub joined: bool,
    /// When (ms).
    pub at: i64,
}

/// A topic key sealed for a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicSealSet {
    /// Mesh id.
    pub mesh_id: String,
    /// Topic id.
    pub topic_id: String,
    /// The member it is for.
    pub member_id: String,
    /// The sealed key, base64.
    pub encrypted_key: String,
    /// Nonce, base64.
    pub nonce: String,
    /// The member key it was sealed to.
    pub sealed_for: String,
    /// When (ms).
    pub at: i64,
}

/// A topic post by a member the sender hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicPostSet {
    /// Mesh id.
    pub mesh_id: String,
    /// Topic message id (the same on every broker).
    pub id: String,
    /// Topic id.
    pub topic_id: String,
    /// Sender member id.
    pub sender_member_id: String,
    /// Its key.
    pub sender_member_pubkey: String,
    /// The sending session's key.
    pub sender_session_pubkey: Option<String>,
    /// Sender display name.
    pub sender_name: String,
    /// Nonce, base64.
    pub nonce: String,
    /// Body, base64.
    pub ciphertext: String,
    /// 1 or 2.
    pub body_version: i64,
    /// Answered message.
    pub reply_to_id: Option<String>,
    /// Mention tokens (lowercased names).
    pub mentions: Vec<String>,
    /// When (ms).
    pub created_at: i64,
}

/// A remembered note.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemorySet {
    /// Mesh id.
    pub mesh_id: String,
    /// Memory id (the same on every broker).
    pub id: String,
    /// The note.
    pub content: String,
    /// Tags, space-separated.
    pub tags: String,
    /// Member id of who remembered it.
    pub remembered_by: String,
    /// That member's key (must be hosted by the sending broker).
    pub remembered_by_pubkey: String,
    /// Their display name.
    pub remembered_by_name: String,
    /// When (ms).
    pub remembered_at: i64,
    /// When it was forgotten, if it was.
    pub forgotten_at: Option<i64>,
}

/// A `peer_file_request` or `peer_dir_request` for a peer of the receiving broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayAsk {
    /// Mesh id.
    pub mesh_id: String,
    /// The sender's id for this request (the answer carries it back).
    pub relay_id: String,
    /// A directory listing rather than a file.
    pub dir: bool,
    /// The asking peer's key (a presence of the sending broker).
    pub requester_key: String,
    /// Its member's key (must be hosted by the sending broker).
    pub requester_member_pubkey: String,
    /// The asked peer's key.
    pub target_key: String,
    /// File or directory path.
    pub path: String,
    /// Glob filter (directories).
    pub pattern: Option<String>,
    /// The asker's `_reqId`, passed through to the asked peer.
    pub req_id: Option<String>,
}

/// The answer to a [`RelayAsk`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayAnswer {
    /// Mesh id.
    pub mesh_id: String,
    /// The ask's id.
    pub relay_id: String,
    /// File content, base64.
    pub content: Option<String>,
    /// Directory entries.
    pub entries: Option<Vec<String>>,
    /// Or why not.
    pub error: Option<String>,
}

/// An MCP server registered at the sending broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct McpServerSet {
    /// Server name.
    pub name: String,
    /// Hosting member.
    pub member_id: String,
    /// Its key (must be hosted by the sending broker).
    pub member_pubkey: String,
    /// Its display name.
    pub hosted_by: String,
    /// Description.
    pub description: String,
    /// Tools, JSON array.
    pub tools_json: String,
    /// Kept while its host is away.
    pub persistent: bool,
    /// Its host is connected.
    pub online: bool,
    /// Since when it is offline (ms).
    pub offline_since: Option<i64>,
    /// Withdrawn.
    pub removed: bool,
}

/// An `mcp_call` for a server hosted at the receiving broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct McpCallAsk {
    /// Mesh id.
    pub mesh_id: String,
    /// The sender's call id (the result carries it back).
    pub call_id: String,
    /// Server.
    pub server_name: String,
    /// Tool.
    pub tool_name: String,
    /// Arguments, JSON object text.
    pub args: String,
    /// The caller's display name.
    pub caller_name: String,
    /// The caller's member key (must be hosted by the sending broker).
    pub caller_member_pubkey: String,
}

/// The result of an [`McpCallAsk`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct McpCallDone {
    /// Mesh id.
    pub mesh_id: String,
    /// The ask's call id.
    pub call_id: String,
    /// The tool's result, JSON text.
    pub result: Option<String>,
    /// Or why there is none.
    pub error: Option<String>,
}

/// A task as one broker knows it. Brokers merge states: done beats claimed beats open;
/// of two claims the earlier wins (then the smaller name); of two completions the
/// later (completing again replaces the result).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSet {
    /// Mesh id.
    pub mesh_id: String,
    /// Task id.
    pub id: String,
    /// Title.
    pub title: String,
    /// Assignee.
    pub assignee: Option<String>,
    /// Priority.
    pub priority: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Creator's display name.
    pub created_by: Option<String>,
    /// Creator's member key (a new task must come from the broker hosting it).
    pub creator_pubkey: String,
    /// The sender hosts the creator: a receiver that does not know the creator yet
    /// waits for its announcement. (Claims and completions of other brokers' tasks
    /// are sent too; nothing will announce those creators on this link.)
    pub creator_hosted: bool,
    /// Created (ms).
    pub created_at: i64,
    /// Claimer's display name.
    pub claimed_by: Option<String>,
    /// Claimed (ms).
    pub claimed_at: Option<i64>,
    /// Outcome.
    pub result: Option<String>,
    /// Completed (ms).
    pub completed_at: Option<i64>,
}

/// A mesh's simulation clock after a change (`set_clock`, pause, resume).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockSet {
    /// Mesh id.
    pub mesh_id: String,
    /// Speed 1..=100.
    pub speed: u32,
    /// Paused.
    pub paused: bool,
    /// Ticks so far.
    pub tick: u64,
    /// Simulated time (ms).
    pub sim_ms: i64,
    /// When the clock was created (ms).
    pub started_at: i64,
    /// When this change was made (ms); the newest wins, then the larger broker name.
    pub changed_at: i64,
    /// The broker that made it.
    pub broker: String,
}

/// A stored file's metadata (the bytes stay with the broker that holds them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSet {
    /// File id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Bytes.
    pub size: i64,
    /// Content type.
    pub mime_type: Option<String>,
    /// SHA-256, hex.
    pub sha256: String,
    /// Tags, JSON array.
    pub tags: String,
    /// Kept until deleted.
    pub persistent: bool,
    /// E2E-encrypted.
    pub encrypted: bool,
    /// Key that may grant access.
    pub owner_pubkey: String,
    /// Uploading member.
    pub uploader_member_id: String,
    /// Its member key (must be hosted by the sending broker).
    pub uploader_pubkey: String,
    /// Its display name.
    pub uploaded_by_name: String,
    /// Who may read it (`None`: the whole mesh).
    pub target_spec: Option<String>,
    /// Uploaded (ms).
    pub uploaded_at: i64,
    /// Expiry (ms).
    pub expires_at: Option<i64>,
    /// Deleted.
    pub deleted: bool,
}

/// `get_file` for a file the receiver holds, on behalf of a peer of the sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileUrlAsk {
    /// Mesh id.
    pub mesh_id: String,
    /// The sender's id for the ask.
    pub ask_id: String,
    /// File id.
    pub file_id: String,
    /// The reader's member id.
    pub member_id: String,
    /// Its member key (must be hosted by the sender).
    pub member_pubkey: String,
    /// Its routing key (session or member key).
    pub reader_key: String,
    /// Its display name (recorded as the download's reader).
    pub reader_name: String,
    /// Groups its presence is in.
    pub groups: Vec<String>,
}

/// The answer to a [`FileUrlAsk`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileUrlAnswer {
    /// Mesh id.
    pub mesh_id: String,
    /// The ask's id.
    pub ask_id: String,
    /// The download URL (at the holding broker).
    pub url: Option<String>,
    /// File name.
    pub name: String,
    /// E2E-encrypted.
    pub encrypted: bool,
    /// The file key sealed for the reader.
    pub sealed_key: Option<String>,
    /// Refusal: (code, message).
    pub error: Option<(String, String)>,
}

/// A member's shared context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextSet {
    /// Mesh id.
    pub mesh_id: String,
    /// Member id.
    pub member_id: String,
    /// Member key (must be hosted by the sending broker).
    pub member_pubkey: String,
    /// Display name.
    pub peer_name: String,
    /// Summary.
    pub summary: String,
    /// Files read.
    pub files_read: Vec<String>,
    /// Key findings.
    pub key_findings: Vec<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Shared (ms); the newest wins.
    pub updated_at: i64,
}

/// A shared-state write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSet {
    /// Mesh id.
    pub mesh_id: String,
    /// Key.
    pub key: String,
    /// Value as JSON text.
    pub value: String,
    /// Writer's display name.
    pub updated_by: String,
    /// Write time (ms); the newest write wins on every broker.
    pub updated_at: i64,
    /// The writing member's key (must be hosted by the sending broker).
    pub member_pubkey: String,
}

/// Data published to a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPublish {
    /// Mesh id.
    pub mesh_id: String,
    /// Stream name.
    pub stream: String,
    /// The value, JSON text.
    pub data: String,
    /// Display name of the publisher.
    pub published_by: String,
    /// The publisher's member key (must be hosted by the sending broker).
    pub member_pubkey: String,
}

/// An event push the receiving broker hands to every connection of the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventPush {
    /// Mesh id.
    pub mesh_id: String,
    /// Message id, kept end to end.
    pub id: String,
    /// Only `webhook` today.
    pub subtype: String,
    /// Event name (the webhook's name).
    pub event: String,
    /// Event data, JSON text.
    pub data: String,
    /// `senderPubkey` of the push (`webhook:<name>`).
    pub sender: String,
    /// Creation time (ms).
    pub created_at: i64,
}

/// A skill of the catalogue, or its removal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkillSet {
    /// Mesh id.
    pub mesh_id: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Instructions.
    pub instructions: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Display name of who shared it.
    pub author: String,
    /// First shared (ms).
    pub created_at: i64,
    /// This write (ms).
    pub updated_at: i64,
    /// A removal rather than a write.
    pub removed: bool,
}

/// A group membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Option<String>,
}

/// The latest state of one session, as its hosting broker sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresenceEntry {
    /// Routing key (session key, else member key); unique per broker and mesh.
    pub key: String,
    /// Member key behind the session.
    pub member_pubkey: String,
    /// Member id.
    pub member_id: String,
    /// Update version, increasing per origin broker; an older one never wins.
    pub version: u64,
    /// Display name.
    pub display_name: String,
    /// `idle`, `working` or `dnd`.
    pub status: String,
    /// Summary.
    pub summary: Option<String>,
    /// Groups.
    pub groups: Vec<Group>,
    /// Visible to others.
    pub visible: bool,
    /// Client session id.
    pub session_id: String,
    /// Connect time (ms).
    pub connected_at: i64,
    /// Working directory.
    pub cwd: String,
    /// Host name.
    pub hostname: Option<String>,
    /// Peer type.
    pub peer_type: Option<String>,
    /// Channel.
    pub channel: Option<String>,
    /// Model.
    pub model: Option<String>,
    /// `control-plane` or `session`.
    pub peer_role: String,
    /// Profile as a JSON object text (`{}` when empty).
    pub profile: String,
    /// Stats as JSON text, if reported.
    pub stats: Option<String>,
    /// Tags the session subscribes to.
    pub tags: Vec<String>,
    /// Where the session stands (see [`crate::spatial`]).
    pub position: Option<crate::spatial::Position>,
}

/// Why a receiver refused a forwarded message (it is not retried).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    /// The sender is not a member the sending broker hosts.
    ForgedSender,
    /// The mesh is not shared between the two brokers (any more).
    NotShared,
    /// No member or session of the mesh on this broker has the target key.
    UnknownRecipient,
    /// The recipient was revoked.
    Revoked,
    /// The frame broke a limit or rule.
    Invalid,
    /// The sender, or the mesh, holds its quota of stored messages on the receiver.
    /// (Appended: the wire enum only grows at its end.)
    OverQuota,
    /// The receiver's import policy for this mesh and the sending broker refuses it.
    Policy,
}

impl RejectReason {
    /// The reason a label names.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::ForgedSender,
            Self::NotShared,
            Self::UnknownRecipient,
            Self::Revoked,
            Self::Invalid,
            Self::OverQuota,
            Self::Policy,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }

    /// Stable label for metrics and `message_status`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ForgedSender => "forged_sender",
            Self::NotShared => "not_shared",
            Self::UnknownRecipient => "unknown_recipient",
            Self::Revoked => "revoked",
            Self::Invalid => "invalid",
            Self::OverQuota => "quota_exceeded",
            Self::Policy => "policy_denied",
        }
    }
}

/// Why a link was closed (sent in [`Frame::Close`] and kept as the link's last error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CloseReason {
    /// The broker is shutting down.
    Shutdown,
    /// A second connection between the same pair won the tie-break.
    Duplicate,
    /// The peer broke the protocol.
    Protocol,
    /// Versions do not match.
    Version,
    /// The hello's broker name differs from the certificate's.
    NameMismatch,
    /// The peer is not (or no longer) configured.
    NotConfigured,
}

impl CloseReason {
    /// QUIC application close code.
    pub const fn code(self) -> u32 {
        match self {
            Self::Shutdown => 1,
            Self::Duplicate => 2,
            Self::Protocol => 3,
            Self::Version => 4,
            Self::NameMismatch => 5,
            Self::NotConfigured => 6,
        }
    }

    /// Stable label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Shutdown => "shutdown",
            Self::Duplicate => "duplicate",
            Self::Protocol => "protocol_error",
            Self::Version => "version_mismatch",
            Self::NameMismatch => "name_mismatch",
            Self::NotConfigured => "not_configured",
        }
    }

    /// The reason for a close code, if it is one of ours.
    pub const fn from_code(code: u64) -> Option<Self> {
        match code {
            1 => Some(Self::Shutdown),
            2 => Some(Self::Duplicate),
            3 => Some(Self::Protocol),
            4 => Some(Self::Version),
            5 => Some(Self::NameMismatch),
            6 => Some(Self::NotConfigured),
            _ => None,
        }
    }
}

/// Every federation frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    /// Control: the first frame both ways.
    Hello(Hello),
    /// Control: home → peer, the mesh and its roster (sent while shared).
    MeshOffer(MeshOffer),
    /// Control: the sender consents to exchange this mesh now.
    MeshReady(MeshClaim),
    /// Control: the sender stopped exchanging this mesh.
    MeshWithdraw(MeshClaim),
    /// Control: the sender is closing the link.
    Close(CloseReason),
    /// Messages: the sender's members of a mesh (`full`: replaces what the receiver
    /// knows of this broker's members in that mesh).
    Members {
        /// Mesh id.
        mesh_id: String,
        /// Members.
        members: Vec<MemberAnn>,
        /// Whether this is the complete list.
        full: bool,
    },
    /// Messages: a durable direct message.
    Dm(Box<Dm>),
    /// Messages (reverse direction): everything up to `seq` is stored or refused.
    Ack {
        /// Highest processed seq.
        seq: u64,
    },
    /// Messages (reverse direction): this seq was refused and will not be delivered.
    Reject {
        /// Refused seq.
        seq: u64,
        /// Why.
        reason: RejectReason,
    },
    /// Presence: every visible-or-not session the sender hosts in a mesh.
    PresenceSnapshot {
        /// Mesh id.
        mesh_id: String,
        /// Sessions.
        entries: Vec<PresenceEntry>,
    },
    /// Presence: one session's latest state.
    PresenceUpsert {
        /// Mesh id.
        mesh_id: String,
        /// Entry.
        entry: Box<PresenceEntry>,
    },
    /// Presence: a session left.
    PresenceGone {
        /// Mesh id.
        mesh_id: String,
        /// Its routing key.
        key: String,
        /// Version of the departure.
        version: u64,
    },
    /// Live: a broadcast or group message.
    Multicast(Box<Multicast>),
    /// Control: every bridge the sender keeps with the receiver's meshes (replaces the
    /// previous list).
    Bridges(Vec<BridgeClaim>),
    /// Live: a tagged multicast relayed by a bridge.
    BridgeRelay(Box<BridgeRelay>),
    /// Presence: sessions of the sender's mesh `from_mesh_id`, listed in the receiver's
    /// `to_mesh_id` through a bridge (`full`: replaces what the receiver had).
    BridgePeers {
        /// The sender's mesh.
        from_mesh_id: String,
        /// The receiver's mesh.
        to_mesh_id: String,
        /// Sessions.
        entries: Vec<PresenceEntry>,
        /// A complete list.
        full: bool,
    },
    /// Presence: a session listed through a bridge left.
    BridgePeerGone {
        /// The sender's mesh.
        from_mesh_id: String,
        /// The receiver's mesh.
        to_mesh_id: String,
        /// Its routing key.
        key: String,
    },
    /// Live: a shared-state write.
    State(Box<StateSet>),
    /// Live: a skill shared or removed (the newest write wins).
    Skill(Box<SkillSet>),
    /// Live: an event push for the whole mesh (an inbound webhook's post).
    Event(Box<EventPush>),
    /// Live: data published to a stream (the receiver hands it to its subscribers).
    StreamData(Box<StreamPublish>),
    /// Live: a memory remembered (or forgotten) by a member the sender hosts.
    Memory(Box<MemorySet>),
    /// Live: a memory forgotten (by any member of the mesh).
    Forget {
        /// Mesh id.
        mesh_id: String,
        /// Memory id.
        id: String,
        /// When (ms).
        at: i64,
    },
    /// Live: a member's shared context (the newest write wins).
    Context(Box<ContextSet>),
    /// Live: a peer here asks a peer hosted by the receiver for a file or listing.
    RelayAsk(Box<RelayAsk>),
    /// Live: the asked peer's answer to a [`RelayAsk`].
    RelayAnswer(Box<RelayAnswer>),
    /// Live: MCP servers hosted by the sender's members.
    McpServers {
        /// Mesh id.
        mesh_id: String,
        /// Servers.
        servers: Vec<McpServerSet>,
        /// When set, the name of every server the sender hosts for this mesh: the
        /// receiver drops the sender's servers not named. The servers themselves may
        /// come in this frame and the ones after it (a full list can exceed a frame).
        all: Option<Vec<String>>,
    },
    /// Live: a call for a server the receiver hosts.
    McpCall(Box<McpCallAsk>),
    /// Live: the result of an [`McpCallAsk`].
    McpResult(Box<McpCallDone>),
    /// Live: a task's state (created, claimed or completed); receivers merge.
    Task(Box<TaskSet>),
    /// Live: the mesh's simulation clock (the newest change wins).
    Clock(Box<ClockSet>),
    /// Live: files the sender holds (`full`: all of them, replacing what the receiver
    /// knew from the sender for this mesh).
    Files {
        /// Mesh id.
        mesh_id: String,
        /// Files (a removed one has `deleted`).
        files: Vec<FileSet>,
        /// A complete list.
        full: bool,
    },
    /// Live: a download URL asked of the broker holding a file.
    FileUrlAsk(Box<FileUrlAsk>),
    /// Live: its answer.
    FileUrlAnswer(Box<FileUrlAnswer>),
    /// Live: the receiver's import policy refused a multicast the sender forwarded
    /// (so the sender's `message_status` can say so).
    MulticastRefused {
        /// Mesh id.
        mesh_id: String,
        /// The multicast's message id.
        id: String,
        /// Which rule refused it (a short label, e.g. `kind:broadcast`, `tag:secret`).
        reason: String,
    },
    /// Live: a topic of the mesh.
    Topic(Box<TopicSet>),
    /// Live: a subscription changed.
    TopicMember(Box<TopicMemberSet>),
    /// Live: a topic key sealed for a member.
    TopicSeal(Box<TopicSealSet>),
    /// Live: a topic post (applied once, by id).
    TopicPost(Box<TopicPostSet>),
    /// Live: a typing indicator or read receipt for a peer of the receiver (sent only
    /// to brokers whose hello lists [`CAP_SIGNALS`]).
    Signal(Box<crate::signals::SignalRelay>),
    /// Live: a mesh log entry (sent only to brokers whose hello lists
    /// [`CAP_TELEMETRY`]).
    Log(Box<LogEntry>),
}

impl Frame {
    /// For a live frame whose content is attributed to members of a mesh: the mesh and
    /// those members' keys. Members are announced on the messages stream, so such a
    /// frame can overtake the announcement of a member who just joined; a receiver
    /// that does not know a key yet holds the frame until it does.
    /// Empty keys (entries sent without one, such as catch-up state writes), removals
    /// of files and MCP servers, and tasks of members the sender does not host are not
    /// attributed.
    pub fn attribution(&self) -> Option<(&str, Vec<&str>)> {
        let (mesh, keys) = match self {
            Self::Multicast(m) => (&m.mesh_id, vec![m.sender_member_pubkey.as_str()]),
            Self::State(s) => (&s.mesh_id, vec![s.member_pubkey.as_str()]),
            Self::StreamData(d) => (&d.mesh_id, vec![d.member_pubkey.as_str()]),
            Self::Memory(m) => (&m.mesh_id, vec![m.remembered_by_pubkey.as_str()]),
            Self::Context(c) => (&c.mesh_id, vec![c.member_pubkey.as_str()]),
            Self::RelayAsk(a) => (&a.mesh_id, vec![a.requester_member_pubkey.as_str()]),
            Self::McpServers {
                mesh_id, servers, ..
            } => (
                mesh_id,
                servers
                    .iter()
                    .filter(|s| !s.removed)
                    .map(|s| s.member_pubkey.as_str())
                    .collect(),
            ),
            Self::McpCall(c) => (&c.mesh_id, vec![c.caller_member_pubkey.as_str()]),
            Self::Task(t) if t.creator_hosted => (&t.mesh_id, vec![t.creator_pubkey.as_str()]),
            Self::Files { mesh_id, files, .. } => (
                mesh_id,
                files
                    .iter()
                    .filter(|f| !f.deleted)
                    .map(|f| f.uploader_pubkey.as_str())
                    .collect(),
            ),
            Self::FileUrlAsk(a) => (&a.mesh_id, vec![a.member_pubkey.as_str()]),
            Self::TopicPost(p) => (&p.mesh_id, vec![p.sender_member_pubkey.as_str()]),
            Self::TopicMember(m) => (&m.mesh_id, vec![m.member_pubkey.as_str()]),
            _ => return None,
        };
        let keys: Vec<&str> = keys.into_iter().filter(|k| !k.is_empty()).collect();
        (!keys.is_empty()).then_some((mesh.as_str(), keys))
    }

    /// Whether this frame may travel on a stream of `class` (`None`: control).
    pub const fn allowed_on(&self, class: Option<StreamClass>) -> bool {
        match self {
            Self::Hello(_)
            | Self::MeshOffer(_)
            | Self::MeshReady(_)
            | Self::MeshWithdraw(_)
            | Self::Bridges(_)
            | Self::Close(_) => class.is_none(),
            Self::Members { .. } | Self::Dm(_) | Self::Ack { .. } | Self::Reject { .. } => {
                matches!(class, Some(StreamClass::Messages))
            }
            Self::PresenceSnapshot { .. }
            | Self::PresenceUpsert { .. }
            | Self::PresenceGone { .. }
            | Self::BridgePeers { .. }
            | Self::BridgePeerGone { .. } => {
                matches!(class, Some(StreamClass::Presence))
            }
            Self::Multicast(_)
            | Self::State(_)
            | Self::Skill(_)
            | Self::Event(_)
            | Self::StreamData(_)
            | Self::Memory(_)
            | Self::Forget { .. }
            | Self::Context(_)
            | Self::RelayAsk(_)
            | Self::RelayAnswer(_)
            | Self::McpServers { .. }
            | Self::McpCall(_)
            | Self::McpResult(_)
            | Self::Task(_)
            | Self::Clock(_)
            | Self::Files { .. }
            | Self::FileUrlAsk(_)
            | Self::FileUrlAnswer(_)
            | Self::MulticastRefused { .. }
            | Self::BridgeRelay(_)
            | Self::Topic(_)
            | Self::TopicMember(_)
            | Self::TopicSeal(_)
            | Self::TopicPost(_)
            | Self::Signal(_)
            | Self::Log(_) => {
                matches!(class, Some(StreamClass::Live))
            }
        }
    }

    /// Short name for logs and metrics.
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::Hello(_) => "hello",
            Self::MeshOffer(_) => "mesh_offer",
            Self::MeshReady(_) => "mesh_ready",
            Self::MeshWithdraw(_) => "mesh_withdraw",
            Self::Close(_) => "close",
            Self::Members { .. } => "members",
            Self::Dm(_) => "dm",
            Self::Ack { .. } => "ack",
            Self::Reject { .. } => "reject",
            Self::PresenceSnapshot { .. } => "presence_snapshot",
            Self::PresenceUpsert { .. } => "presence_upsert",
            Self::PresenceGone { .. } => "presence_gone",
            Self::Multicast(_) => "multicast",
            Self::State(_) => "state",
            Self::Skill(_) => "skill",
            Self::Event(_) => "event",
            Self::StreamData(_) => "stream_data",
            Self::Memory(_) => "memory",
            Self::Forget { .. } => "forget",
            Self::Context(_) => "context",
            Self::RelayAsk(_) => "relay_ask",
            Self::RelayAnswer(_) => "relay_answer",
            Self::McpServers { .. } => "mcp_servers",
            Self::McpCall(_) => "mcp_call",
            Self::McpResult(_) => "mcp_result",
            Self::Task(_) => "task",
            Self::Clock(_) => "clock",
            Self::Files { .. } => "files",
            Self::FileUrlAsk(_) => "file_url_ask",
            Self::FileUrlAnswer(_) => "file_url_answer",
            Self::MulticastRefused { .. } => "multicast_refused",
            Self::Topic(_) => "topic",
            Self::TopicMember(_) => "topic_member",
            Self::TopicSeal(_) => "topic_seal",
            Self::TopicPost(_) => "topic_post",
            Self::Signal(_) => "signal",
            Self::Log(_) => "log",
            Self::Bridges(_) => "bridges",
            Self::BridgeRelay(_) => "bridge_relay",
            Self::BridgePeers { .. } => "bridge_peers",
            Self::BridgePeerGone { .. } => "bridge_peer_gone",
        }
    }
}

/// A frame that could not be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The announced length exceeds the cap (nothing was allocated).
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Cap.
        max: usize,
    },
    /// A zero-length frame.
    #[error("empty frame")]
    Empty,
    /// The body is not a valid frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encodes a frame with its length prefix.
///
/// # Errors
/// [`FrameError::TooLarge`] if the body exceeds `max`, [`FrameError::Malformed`] if
/// serialization fails.
pub fn encode(frame: &Frame, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0; LEN_PREFIX];
    out = postcard::to_extend(frame, out).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = out.len() - LEN_PREFIX;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let len32 = u32::try_from(len).map_err(|_| FrameError::TooLarge { len, max })?;
    out[..LEN_PREFIX].copy_from_slice(&len32.to_be_bytes());
    Ok(out)
}

/// Reads a length prefix and checks it against `max` before the body is allocated.
///
/// # Errors
/// [`FrameError::TooLarge`] or [`FrameError::Empty`].
pub fn frame_len(prefix: [u8; LEN_PREFIX], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decodes a frame body (without its prefix). Trailing bytes are an error: a frame is
/// exactly its length.
///
/// # Errors
/// [`FrameError::Malformed`].
pub fn decode(body: &[u8]) -> Result<Frame, FrameError> {
    let (frame, rest) =
        postcard::take_from_bytes(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    // Refused as in client frames (see `nul`): stored text must fit both backends.
    if crate::nul::has_nul(&frame) {
        return Err(FrameError::Malformed("U+0000 in a string".into()));
    }
    Ok(frame)
}

/// Why a peer's hello is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum HelloError {
    /// Another protocol version.
    #[error("peer speaks federation version {0}, this broker speaks {VERSION}")]
    Version(u16),
    /// The hello names another broker than the certificate.
    #[error("hello names broker {claimed:?} but its certificate was accepted for {certified:?}")]
    NameMismatch {
        /// Name in the hello.
        claimed: String,
        /// Name the certificate was verified for.
        certified: String,
    },
    /// The first control frame was not a hello.
    #[error("expected hello, got {0}")]
    NotHello(&'static str),
}

/// Checks a peer's first control frame against the name its certificate was verified
/// for (the TLS layer proves the key, this proves the peer also *says* it is that broker).
///
/// # Errors
/// [`HelloError`].
pub fn check_hello(frame: Frame, certified: &str) -> Result<Hello, HelloError> {
    let Frame::Hello(hello) = frame else {
        return Err(HelloError::NotHello(frame.kind()));
    };
    if hello.version != VERSION {
        return Err(HelloError::Version(hello.version));
    }
    if !hello.broker.eq_ignore_ascii_case(certified) {
        return Err(HelloError::NameMismatch {
            claimed: hello.broker,
            certified: certified.to_owned(),
        });
    }
    Ok(hello)
}

/// Of two connections between the same pair of brokers, the one dialed by the broker
/// whose name sorts first survives; both sides compute the same answer.
pub fn keep_dialed_by(a: &str, b: &str) -> bool {
    a.to_ascii_lowercase() <= b.to_ascii_lowercase()
}

/// Receiver-side de-duplication for one sending broker: messages arrive in seq order
/// on one stream and are processed in order, so a high-water mark is enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InboxCursor {
    /// Highest seq processed (stored or refused).
    pub high: u64,
}

impl InboxCursor {
    /// Whether `seq` is new; if so it becomes the high-water mark.
    pub const fn admit(&mut self, seq: u64) -> bool {
        if seq <= self.high {
            return false;
        }
        self.high = seq;
        true
    }
}

/// Whether a presence update of `version` replaces what is known at `known` (an older
/// or equal version never overwrites a newer one).
pub const fn newer(version: u64, known: Option<u64>) -> bool {
    match known {
        None => true,
        Some(k) => version > k,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dm(seq: u64) -> Frame {
        Frame::Dm(Box::new(Dm {
            seq,
            mesh_id: "m".into(),
            id: "id".into(),
            sender_member_id: "s".into(),
            sender_member_pubkey: "aa".into(),
            sender_pubkey: "aa".into(),
            sender_name: "n".into(),
            target_spec: "bb".into(),
            target_key: "bb".into(),
            priority: 1,
            nonce: "x".into(),
            ciphertext: "y".repeat(300),
            subtype: None,
            client_message_id: Some("c".into()),
            created_at: 1,
            expires_at: 2,
            tags: vec!["ops".into()],
            bridged: None,
        }))
    }

    #[test]
    fn nul_in_any_string_is_refused() {
        let Frame::Dm(mut d) = dm(1) else {
            unreachable!()
        };
        d.client_message_id = Some("c\0".into());
        let bytes = encode(&Frame::Dm(d), 1 << 20).unwrap();
        assert!(matches!(decode(&bytes[4..]), Err(FrameError::Malformed(_))));
        let f = Frame::Members {
            mesh_id: "m".into(),
            members: vec![MemberAnn {
                member_id: "i".into(),
                pubkey: "k".into(),
                display_name: "eve\0".into(),
                role: "member".into(),
                revoked: false,
            }],
            full: false,
        };
        let bytes = encode(&f, 1 << 20).unwrap();
        assert!(decode(&bytes[4..]).is_err());
    }

    #[test]
    fn round_trip_and_cap() {
        let f = dm(7);
        let bytes = encode(&f, 1 << 20).unwrap();
        let len = frame_len(bytes[..4].try_into().unwrap(), 1 << 20).unwrap();
        assert_eq!(len, bytes.len() - 4);
        assert_eq!(decode(&bytes[4..]).unwrap(), f);
        assert!(matches!(encode(&f, 10), Err(FrameError::TooLarge { .. })));
        assert_eq!(
            frame_len(u32::MAX.to_be_bytes(), 1 << 20),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                max: 1 << 20
            })
        );
        assert_eq!(frame_len([0; 4], 10), Err(FrameError::Empty));
    }

    #[test]
    fn garbage_and_trailing_bytes_are_errors() {
        assert!(matches!(decode(&[0xff; 9]), Err(FrameError::Malformed(_))));
        let mut bytes = encode(&Frame::Ack { seq: 3 }, 100).unwrap();
        bytes.push(0);
        assert!(matches!(decode(&bytes[4..]), Err(FrameError::Malformed(_))));
        // Truncations of a valid frame never panic.
        let full = encode(&dm(1), 1 << 20).unwrap();
        for cut in 4..full.len() {
            assert!(decode(&full[4..cut]).is_err());
        }
    }

    #[test]
    fn hello_checks() {
        let h = |v, b: &str| {
            Frame::Hello(Hello {
                version: v,
                broker: b.into(),
                caps: vec![],
                meshes: vec![],
            })
        };
        assert!(check_hello(h(VERSION, "B.example"), "b.example").is_ok());
        assert_eq!(
            check_hello(h(VERSION, "c.example"), "b.example"),
            Err(HelloError::NameMismatch {
                claimed: "c.example".into(),
                certified: "b.example".into()
            })
        );
        assert_eq!(
            check_hello(h(9, "b.example"), "b.example"),
            Err(HelloError::Version(9))
        );
        assert_eq!(
            check_hello(Frame::Ack { seq: 1 }, "b.example"),
            Err(HelloError::NotHello("ack"))
        );
    }

    #[test]
    fn streams_carry_only_their_class() {
        assert!(dm(1).allowed_on(Some(StreamClass::Messages)));
        assert!(!dm(1).allowed_on(Some(StreamClass::Live)));
        assert!(!dm(1).allowed_on(None));
        assert!(Frame::Close(CloseReason::Shutdown).allowed_on(None));
        assert_eq!(StreamClass::from_byte(2), Some(StreamClass::Presence));
        assert_eq!(StreamClass::from_byte(9), None);
    }

    #[test]
    fn dedup_tie_break_and_versions() {
        let mut c = InboxCursor::default();
        assert!(c.admit(3));
        assert!(!c.admit(3));
        assert!(!c.admit(2));
        assert!(c.admit(10));
        assert!(keep_dialed_by("a.example", "b.example"));
        assert!(!keep_dialed_by("b.example", "a.example"));
        assert!(newer(2, Some(1)) && !newer(1, Some(1)) && newer(0, None));
        for r in [1, 2, 3, 4, 5, 6] {
            assert_eq!(
                CloseReason::from_code(r).map(CloseReason::code),
                Some(r as u32)
            );
        }
    }
}
