//! Dispatch: each client frame to its feature (`crate::features`).

use super::*;

impl Session {
    /// Handles one text frame. Returns an immediate reply, if any; asynchronous replies
    /// are queued on `replies`.
    pub(crate) fn on_text(&mut self, text: &str) -> Option<Utf8Bytes> {
        let inbound = match self.machine.on_text(text) {
            Verdict::Request(inbound) => inbound,
            Verdict::Reply(e) => return Some(BrokerFrame::Error(e).to_json().into()),
            Verdict::Ignore(reason) => {
                self.ctx.metrics.frames_dropped.inc(reason);
                return None;
            }
            Verdict::Handshake(_) => return None,
        };
        let req_id = inbound.req_id;
        let now = now_ms();
        // One line per feature: the handlers live with their features.
        match inbound.frame {
            ClientFrame::Send(send) => self.on_send(req_id, *send, now),
            frame @ (ClientFrame::SetStatus { .. }
            | ClientFrame::SetSummary { .. }
            | ClientFrame::SetVisible { .. }
            | ClientFrame::SetProfile(_)
            | ClientFrame::SetStats(_)
            | ClientFrame::JoinGroup(_)
            | ClientFrame::LeaveGroup { .. }
            | ClientFrame::ListPeers) => self.on_presence(frame, req_id, now),
            frame @ (ClientFrame::SubscribeTags { .. } | ClientFrame::UnsubscribeTags { .. }) => {
                self.on_tags(frame, req_id)
            }
            frame @ (ClientFrame::SetPosition(_) | ClientFrame::ClearPosition) => {
                self.on_position(frame, req_id, now)
            }
            frame @ (ClientFrame::SetState { .. }
            | ClientFrame::GetState { .. }
            | ClientFrame::ListState) => self.on_state(frame, req_id, now),
            frame @ (ClientFrame::SetClock { .. }
            | ClientFrame::PauseClock
            | ClientFrame::ResumeClock
            | ClientFrame::GetClock) => self.on_clock(frame, req_id),
            frame @ (ClientFrame::Publish { .. }
            | ClientFrame::Subscribe { .. }
            | ClientFrame::Unsubscribe { .. }) => self.on_stream_data(frame, req_id),
            frame @ ClientFrame::ClientAck { .. } => self.on_client_ack(frame, now),
            ClientFrame::MessageStatus { message_id } => {
                self.queue_message_status(message_id, req_id);
                None
            }
            ClientFrame::AuditQuery { .. } | ClientFrame::AuditVerify => {
                self.queue_audit(inbound.frame, req_id);
                None
            }
            ClientFrame::Schedule(_)
            | ClientFrame::ListScheduled
            | ClientFrame::CancelScheduled { .. } => self.on_schedule(inbound.frame, req_id, now),
            ClientFrame::GetFile { .. }
            | ClientFrame::ListFiles { .. }
            | ClientFrame::FileStatus { .. }
            | ClientFrame::DeleteFile { .. }
            | ClientFrame::GrantFileAccess { .. } => {
                self.queue_files(inbound.frame, req_id, now);
                None
            }
            ClientFrame::PeerFileRequest { .. }
            | ClientFrame::PeerDirRequest { .. }
            | ClientFrame::PeerFileResponse(_)
            | ClientFrame::PeerDirResponse(_) => self.on_relay(inbound.frame, req_id),
            ClientFrame::McpRegister(_)
            | ClientFrame::McpUnregister { .. }
            | ClientFrame::McpList
            | ClientFrame::McpCall(_)
            | ClientFrame::McpCallResponse(_) => self.on_mcp(inbound.frame, req_id, now),
            ClientFrame::MeshInfo => {
                self.queue_mesh_info(req_id);
                None
            }
            frame @ (ClientFrame::ShareContext(_)
            | ClientFrame::GetContext { .. }
            | ClientFrame::ListContexts) => {
                self.queue_context(frame, req_id, now);
                None
            }
            frame @ (ClientFrame::Remember { .. }
            | ClientFrame::Recall { .. }
            | ClientFrame::GetMemory { .. }
            | ClientFrame::Forget { .. }) => {
                self.queue_memory(frame, req_id, now);
                None
            }
            frame @ (ClientFrame::CreateTask(_)
            | ClientFrame::ClaimTask { .. }
            | ClientFrame::CompleteTask { .. }
            | ClientFrame::GetTask { .. }
            | ClientFrame::ListTasks { .. }) => {
                self.queue_task(frame, req_id, now);
                None
            }
            frame @ (ClientFrame::CreateStream { .. } | ClientFrame::ListStreams) => {
                self.queue_stream(frame, req_id, now);
                None
            }
            frame @ (ClientFrame::CreateWebhook { .. }
            | ClientFrame::ListWebhooks
            | ClientFrame::DeleteWebhook { .. }) => {
                self.queue_webhook(frame, req_id, now);
                None
            }
            frame @ (ClientFrame::ShareSkill(_)
            | ClientFrame::GetSkill { .. }
            | ClientFrame::ListSkills { .. }
            | ClientFrame::RemoveSkill { .. }) => {
                self.queue_skill(frame, req_id, now);
                None
            }
            ClientFrame::Moderation(request) => self.on_moderation(request, req_id, now),
            ClientFrame::InviteCreate(request) => self.on_invite_create(request, req_id),
            ClientFrame::Signal(request) => self.on_signal(request, now),
            ClientFrame::DashboardSubscribe => self.on_dashboard_subscribe(req_id),
            ClientFrame::DashboardResources => self.on_dashboard_resources(req_id),
            ClientFrame::Share(request) => self.on_share(request, req_id),
            ClientFrame::Telemetry(request) => {
                self.on_telemetry(request, req_id, now);
                None
            }
            ClientFrame::ExecuteCode(request) => {
                self.on_execute_code(*request, req_id);
                None
            }
            ClientFrame::SearchPeers(request) => {
                self.on_search_peers(request, req_id);
                None
            }
            ClientFrame::Topic(request) => self.on_topic(request, req_id, now),
            ClientFrame::Watch(request) => {
                self.queue_watch(request, req_id, now);
                None
            }
            ClientFrame::ApiKey(request) => {
                self.queue_apikey(request, req_id, now);
                None
            }
            ClientFrame::Vault(request) => {
                self.queue_vault(request, req_id, now);
                None
            }
            // Handshakes and unsupported frames are answered by the protocol machine.
            _ => None,
        }
    }

    /// The bare `ack` some requests get (the reference answers them so).
    pub(crate) fn small_ack(req_id: Option<String>) -> Option<Utf8Bytes> {
        Some(
            BrokerFrame::Ack(Ack {
                id: req_id.clone().unwrap_or_default(),
                message_id: String::new(),
                queued: false,
                error: None,
                req_id,
            })
            .to_json()
            .into(),
        )
    }
}
