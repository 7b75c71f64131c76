//! The topics of a loaded mesh, in memory: which exist (by id and by name), who is
//! subscribed, whether a topic is encrypted, and who listens to its posts outside the
//! WebSocket sessions (SSE streams, external API-key connections). Written through by
//! `features::topics` after each store write and by peer brokers' frames; read on every
//! topic post, so a post is routed without touching the store.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use meshd_protocol::topics::{TopicRole, Visibility};
use tokio::sync::mpsc;

use super::{MeshHub, Outbound, offer};

/// Most posts queued for one listener; a listener that falls this far behind is
/// dropped (its stream ends with an error and the client reconnects and backfills).
pub(crate) const LISTENER_QUEUE: usize = 256;

/// One topic.
#[derive(Debug, Clone)]
pub(crate) struct TopicInfo {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) description: Option<String>,
    pub(crate) visibility: Visibility,
    pub(crate) encrypted_key_pubkey: Option<String>,
    pub(crate) created_at: i64,
    /// Member id → role.
    pub(crate) members: HashMap<String, TopicRole>,
}

impl From<crate::features::topics::store::TopicRow> for TopicInfo {
    fn from(t: crate::features::topics::store::TopicRow) -> Self {
        Self {
            visibility: Visibility::parse(&t.visibility),
            id: t.id,
            name: t.name,
            description: t.description,
            encrypted_key_pubkey: t.encrypted_key_pubkey,
            created_at: t.created_at,
            members: HashMap::new(),
        }
    }
}

/// A post as listeners receive it (rendered by each: SSE, external WebSocket).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PostView {
    pub(crate) id: String,
    pub(crate) topic: String,
    pub(crate) topic_id: String,
    pub(crate) sender_member_id: String,
    /// The sender's member key (the REST shape).
    pub(crate) sender_pubkey: String,
    pub(crate) sender_name: String,
    pub(crate) nonce: String,
    pub(crate) ciphertext: String,
    pub(crate) body_version: i64,
    pub(crate) reply_to_id: Option<String>,
    pub(crate) created_at: String,
}

/// A listener's handle: dropped from the topic when its receiver is gone or full.
#[derive(Debug)]
struct Listener {
    id: u64,
    tx: mpsc::Sender<Arc<PostView>>,
}

/// The topic book of one mesh.
#[derive(Debug, Default)]
pub(crate) struct TopicBook {
    by_id: HashMap<String, TopicInfo>,
    by_name: HashMap<String, String>,
    listeners: HashMap<String, Vec<Listener>>,
    next_listener: u64,
}

impl TopicBook {
    /// A topic, to change.
    pub(crate) fn by_id_mut(&mut self, id: &str) -> Option<&mut TopicInfo> {
        self.by_id.get_mut(id)
    }

    /// Adds or replaces a topic's row (its members are kept).
    pub(crate) fn put(&mut self, mut t: TopicInfo) {
        if let Some(old) = self.by_id.get_mut(&t.id) {
            if old.name != t.name {
                self.by_name.remove(&old.name);
            }
            t.members = std::mem::take(&mut old.members);
        }
        self.by_name.insert(t.name.clone(), t.id.clone());
        self.by_id.insert(t.id.clone(), t);
    }
}

impl MeshHub {
    /// The topic `s` names: an id of this mesh first (when it looks like one), then a
    /// name. A clone without its members.
    pub(crate) fn topic(&self, s: &str) -> Option<TopicInfo> {
        let inner = self.inner();
        let book = &inner.topics;
        let t = (meshd_protocol::topics::looks_like_id(s))
            .then(|| book.by_id.get(s))
            .flatten()
            .or_else(|| book.by_name.get(s).and_then(|id| book.by_id.get(id)))?;
        Some(t.clone())
    }

    /// Every topic, by name.
    pub(crate) fn topics(&self) -> Vec<TopicInfo> {
        let inner = self.inner();
        let mut all: Vec<TopicInfo> = inner.topics.by_id.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Topics `member_id` is subscribed to.
    pub(crate) fn member_topics(&self, member_id: &str) -> Vec<TopicInfo> {
        self.topics()
            .into_iter()
            .filter(|t| t.members.contains_key(member_id))
            .collect()
    }

    /// Adds or updates a topic row.
    pub(crate) fn topic_put(&self, t: TopicInfo) {
        self.inner().topics.put(t);
    }

    /// Sets the key flag of a topic if it has none (first key wins).
    pub(crate) fn topic_set_key(&self, topic_id: &str, pubkey: &str) -> bool {
        let mut inner = self.inner();
        match inner.topics.by_id.get_mut(topic_id) {
            Some(t) if t.encrypted_key_pubkey.is_none() => {
                t.encrypted_key_pubkey = Some(pubkey.to_owned());
                true
            }
            _ => false,
        }
    }

    /// Subscribes a member (keeping an existing role unless `replace`).
    pub(crate) fn topic_join(
        &self,
        topic_id: &str,
        member_id: &str,
        role: TopicRole,
        replace: bool,
    ) {
        if let Some(t) = self.inner().topics.by_id.get_mut(topic_id) {
            if replace {
                t.members.insert(member_id.to_owned(), role);
            } else {
                t.members.entry(member_id.to_owned()).or_insert(role);
            }
        }
    }

    /// Unsubscribes a member.
    pub(crate) fn topic_leave(&self, topic_id: &str, member_id: &str) {
        if let Some(t) = self.inner().topics.by_id.get_mut(topic_id) {
            t.members.remove(member_id);
        }
    }

    /// Registers a listener for a topic's posts.
    pub(crate) fn topic_listen(&self, topic_id: &str) -> (u64, mpsc::Receiver<Arc<PostView>>) {
        let (tx, rx) = mpsc::channel(LISTENER_QUEUE);
        let mut inner = self.inner();
        inner.topics.next_listener += 1;
        let id = inner.topics.next_listener;
        inner
            .topics
            .listeners
            .entry(topic_id.to_owned())
            .or_default()
            .push(Listener { id, tx });
        (id, rx)
    }

    /// Removes a listener.
    pub(crate) fn topic_unlisten(&self, topic_id: &str, listener: u64) {
        let mut inner = self.inner();
        if let Some(l) = inner.topics.listeners.get_mut(topic_id) {
            l.retain(|x| x.id != listener);
            if l.is_empty() {
                inner.topics.listeners.remove(topic_id);
            }
        }
    }

    /// Delivers a post live: the push to every connection of every subscribed member
    /// except `skip_member`'s, and the view to every listener (a full or closed one is
    /// dropped). Returns (connections queued, connections dropped as slow).
    pub(crate) fn topic_fan_out(
        &self,
        topic_id: &str,
        skip_member: &str,
        frame: &Utf8Bytes,
        view: &Arc<PostView>,
    ) -> (usize, usize) {
        let mut inner = self.inner();
        let (mut delivered, mut dropped) = (0, 0);
        if let Some(t) = inner.topics.by_id.get(topic_id) {
            for p in inner.peers.values() {
                if p.member_id == skip_member || !t.members.contains_key(&p.member_id) {
                    continue;
                }
                if offer(&p.shared, Outbound::Frame(frame.clone())) {
                    delivered += 1;
                } else {
                    dropped += 1;
                }
            }
        }
        if let Some(l) = inner.topics.listeners.get_mut(topic_id) {
            l.retain(|x| x.tx.try_send(view.clone()).is_ok());
        }
        (delivered, dropped)
    }
}
