//! Topic rows: topics, subscriptions, sealed keys, history, mention notifications.
//! (Posts are written by the store writer, `WriteOp::TopicPost`, so they commit with
//! the batch their sender's other writes go in.)

use crate::store::{Db, StoreError, with_db, with_db_write};

/// A topic row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TopicRow {
    /// Id (derived from the mesh and the name: the same on every broker).
    pub id: String,
    /// Mesh.
    pub mesh_id: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// `public`, `private` or `dm`.
    pub visibility: String,
    /// Creator's member id.
    pub created_by_member_id: Option<String>,
    /// Set when the topic has a key (an opaque flag, as in the reference).
    pub encrypted_key_pubkey: Option<String>,
    /// Creation (ms).
    pub created_at: i64,
}

/// A subscription.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TopicMemberRow {
    /// Topic.
    pub topic_id: String,
    /// Member.
    pub member_id: String,
    /// `lead`, `member` or `observer`.
    pub role: String,
    /// Subscription (ms).
    pub joined_at: i64,
    /// Read cursor (ms).
    pub last_read_at: Option<i64>,
}

/// A sealed copy of a topic key.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SealRow {
    /// Topic.
    pub topic_id: String,
    /// Member it is for.
    pub member_id: String,
    /// `sender x25519 pub ‖ crypto_box(key)`, base64.
    pub encrypted_key: String,
    /// Nonce, base64.
    pub nonce: String,
    /// The member key it was sealed to.
    pub sealed_for: String,
    /// First seal (ms).
    pub created_at: i64,
    /// Last re-seal (ms).
    pub rotated_at: Option<i64>,
}

/// A stored topic message.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TopicMessageRow {
    /// Id.
    pub id: String,
    /// Topic.
    pub topic_id: String,
    /// Mesh.
    pub mesh_id: String,
    /// Sender member.
    pub sender_member_id: String,
    /// Sender member key.
    pub sender_member_pubkey: String,
    /// Sender session key, if it had one.
    pub sender_session_pubkey: Option<String>,
    /// Sender display name.
    pub sender_name: String,
    /// Nonce.
    pub nonce: String,
    /// Body.
    pub ciphertext: String,
    /// 1 or 2.
    pub body_version: i64,
    /// Answered message.
    pub reply_to_id: Option<String>,
    /// Time (ms).
    pub created_at: i64,
    /// The peer broker it came from.
    pub origin_broker: Option<String>,
}

/// A mention notification with what a list shows of it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct NotificationRow {
    /// Notification id.
    pub id: String,
    /// Mesh.
    pub mesh_id: String,
    /// Topic.
    pub topic_id: String,
    /// Topic name.
    pub topic_name: String,
    /// The message.
    pub message_id: String,
    /// Who was mentioned.
    pub recipient_member_id: String,
    /// Sender name.
    pub sender_name: String,
    /// Sender member key.
    pub sender_pubkey: String,
    /// Body.
    pub ciphertext: String,
    /// Body version.
    pub body_version: i64,
    /// `mention`.
    pub kind: String,
    /// When (ms).
    pub created_at: i64,
    /// Read (ms).
    pub read_at: Option<i64>,
}

impl Db {
    /// The live topics of a mesh.
    pub async fn topic_rows(&self, mesh_id: &str) -> Result<Vec<TopicRow>, StoreError> {
        const SQL: &str = "SELECT id, mesh_id, name, description, visibility, created_by_member_id, encrypted_key_pubkey, created_at \
                           FROM topic WHERE mesh_id = $1 AND archived_at IS NULL ORDER BY name";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).fetch_all(p).await)?)
    }

    /// One topic by id (archived or not).
    pub async fn topic_row(&self, id: &str) -> Result<Option<TopicRow>, StoreError> {
        const SQL: &str = "SELECT id, mesh_id, name, description, visibility, created_by_member_id, encrypted_key_pubkey, created_at \
                           FROM topic WHERE id = $1";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(id).fetch_optional(p).await)?)
    }

    /// Every subscription in a mesh's live topics.
    pub async fn topic_memberships(
        &self,
        mesh_id: &str,
    ) -> Result<Vec<TopicMemberRow>, StoreError> {
        const SQL: &str = "SELECT tm.topic_id, tm.member_id, tm.role, tm.joined_at, tm.last_read_at \
                           FROM topic_member tm JOIN topic t ON t.id = tm.topic_id \
                           WHERE t.mesh_id = $1 AND t.archived_at IS NULL";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).fetch_all(p).await)?)
    }

    /// Subscriptions of one topic.
    pub async fn topic_members(&self, topic_id: &str) -> Result<Vec<TopicMemberRow>, StoreError> {
        const SQL: &str = "SELECT topic_id, member_id, role, joined_at, last_read_at FROM topic_member WHERE topic_id = $1";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(topic_id).fetch_all(p).await)?)
    }

    /// Creates a topic unless its id exists (a peer's copy, or a race); returns whether
    /// this call created it. A remote copy's key flag fills a missing one.
    pub async fn put_topic(&self, t: &TopicRow) -> Result<bool, StoreError> {
        const SQL: &str = "INSERT INTO topic (id, mesh_id, name, description, visibility, created_by_member_id, encrypted_key_pubkey, created_at, archived_at) \
                           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL) ON CONFLICT (id) DO NOTHING";
        const KEY_SQL: &str = "UPDATE topic SET encrypted_key_pubkey = $1 WHERE id = $2 AND encrypted_key_pubkey IS NULL";
        let created = with_db_write!(self, p => sqlx::query(SQL).bind(&t.id).bind(&t.mesh_id).bind(&t.name)
            .bind(&t.description).bind(&t.visibility).bind(&t.created_by_member_id).bind(&t.encrypted_key_pubkey)
            .bind(t.created_at).execute(p).await.map(|r| r.rows_affected() > 0))?;
        if !created && let Some(k) = &t.encrypted_key_pubkey {
            with_db_write!(self, p => sqlx::query(KEY_SQL).bind(k).bind(&t.id).execute(p).await.map(drop))?;
        }
        Ok(created)
    }

    /// Sets a topic's key flag if it has none (`claim-key`). Returns whether it was set.
    pub async fn claim_topic_key(&self, topic_id: &str, pubkey: &str) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE topic SET encrypted_key_pubkey = $1 WHERE id = $2 AND encrypted_key_pubkey IS NULL";
        Ok(
            with_db_write!(self, p => sqlx::query(SQL).bind(pubkey).bind(topic_id).execute(p).await
            .map(|r| r.rows_affected() > 0))?,
        )
    }

    /// Subscribes a member (an existing subscription keeps its role unless `replace`).
    /// Returns whether something changed.
    pub async fn join_topic(
        &self,
        topic_id: &str,
        member_id: &str,
        role: &str,
        now: i64,
        replace: bool,
    ) -> Result<bool, StoreError> {
        const KEEP: &str = "INSERT INTO topic_member (topic_id, member_id, role, joined_at, last_read_at) VALUES ($1, $2, $3, $4, NULL) \
                            ON CONFLICT (topic_id, member_id) DO NOTHING";
        const REPLACE: &str = "INSERT INTO topic_member (topic_id, member_id, role, joined_at, last_read_at) VALUES ($1, $2, $3, $4, NULL) \
                               ON CONFLICT (topic_id, member_id) DO UPDATE SET role = excluded.role";
        let sql = if replace { REPLACE } else { KEEP };
        Ok(
            with_db_write!(self, p => sqlx::query(sql).bind(topic_id).bind(member_id).bind(role).bind(now)
            .execute(p).await.map(|r| r.rows_affected() > 0))?,
        )
    }

    /// Unsubscribes a member. Returns whether it was subscribed.
    pub async fn leave_topic(&self, topic_id: &str, member_id: &str) -> Result<bool, StoreError> {
        const SQL: &str = "DELETE FROM topic_member WHERE topic_id = $1 AND member_id = $2";
        Ok(
            with_db_write!(self, p => sqlx::query(SQL).bind(topic_id).bind(member_id).execute(p).await
            .map(|r| r.rows_affected() > 0))?,
        )
    }

    /// Moves a member's read cursor to `now`; `subscribe` makes it a member first (REST
    /// `PATCH …/read`), otherwise only a subscription moves. Returns whether one moved.
    pub async fn mark_topic_read(
        &self,
        topic_id: &str,
        member_id: &str,
        now: i64,
        subscribe: bool,
    ) -> Result<bool, StoreError> {
        const UPDATE: &str =
            "UPDATE topic_member SET last_read_at = $1 WHERE topic_id = $2 AND member_id = $3";
        const UPSERT: &str = "INSERT INTO topic_member (topic_id, member_id, role, joined_at, last_read_at) VALUES ($2, $3, 'member', $1, $1) \
                              ON CONFLICT (topic_id, member_id) DO UPDATE SET last_read_at = excluded.last_read_at";
        let sql = if subscribe { UPSERT } else { UPDATE };
        Ok(
            with_db_write!(self, p => sqlx::query(sql).bind(now).bind(topic_id).bind(member_id).execute(p).await
            .map(|r| r.rows_affected() > 0))?,
        )
    }

    /// A page of history, newest first: `before` (a message id) pages back; an unknown
    /// `before` gives an empty page.
    pub async fn topic_history(
        &self,
        topic_id: &str,
        limit: i64,
        before: Option<&str>,
    ) -> Result<Vec<TopicMessageRow>, StoreError> {
        const LATEST: &str = "SELECT id, topic_id, mesh_id, sender_member_id, sender_member_pubkey, sender_session_pubkey, sender_name, \
                              nonce, ciphertext, body_version, reply_to_id, created_at, origin_broker \
                              FROM topic_message WHERE topic_id = $1 ORDER BY created_at DESC, id DESC LIMIT +$2";
        const BEFORE: &str = "SELECT m.id, m.topic_id, m.mesh_id, m.sender_member_id, m.sender_member_pubkey, m.sender_session_pubkey, m.sender_name, \
                              m.nonce, m.ciphertext, m.body_version, m.reply_to_id, m.created_at, m.origin_broker \
                              FROM topic_message m JOIN topic_message b ON b.id = $3 AND b.topic_id = $1 \
                              WHERE m.topic_id = $1 AND (m.created_at < b.created_at OR (m.created_at = b.created_at AND m.id < b.id)) \
                              ORDER BY m.created_at DESC, m.id DESC LIMIT +$2";
        Ok(match before {
            None => {
                with_db!(self, p => sqlx::query_as(LATEST).bind(topic_id).bind(limit).fetch_all(p).await)?
            }
            Some(b) => {
                with_db!(self, p => sqlx::query_as(BEFORE).bind(topic_id).bind(limit).bind(b).fetch_all(p).await)?
            }
        })
    }

    /// Whether a message exists in a topic.
    pub async fn topic_message_exists(&self, topic_id: &str, id: &str) -> Result<bool, StoreError> {
        const SQL: &str = "SELECT COUNT(*) FROM topic_message WHERE topic_id = $1 AND id = $2";
        let n: i64 = with_db!(self, p => sqlx::query_scalar(SQL).bind(topic_id).bind(id).fetch_one(p).await)?;
        Ok(n > 0)
    }

    /// Posts made here in a mesh at or after `since` (ms), oldest first: a peer
    /// broker's catch-up.
    pub async fn local_topic_posts_since(
        &self,
        mesh_id: &str,
        since: i64,
        limit: i64,
    ) -> Result<Vec<TopicMessageRow>, StoreError> {
        const SQL: &str = "SELECT id, topic_id, mesh_id, sender_member_id, sender_member_pubkey, sender_session_pubkey, sender_name, \
                           nonce, ciphertext, body_version, reply_to_id, created_at, origin_broker \
                           FROM topic_message WHERE mesh_id = $1 AND created_at >= $2 AND origin_broker IS NULL \
                           ORDER BY created_at, id LIMIT +$3";
        Ok(
            with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(since).bind(limit).fetch_all(p).await)?,
        )
    }

    /// Stores a sealed key (re-sealing overwrites and stamps `rotated_at`).
    pub async fn put_seal(&self, s: &SealRow) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO topic_member_key (topic_id, member_id, encrypted_key, nonce, sealed_for, created_at, rotated_at) \
                           VALUES ($1, $2, $3, $4, $5, $6, NULL) ON CONFLICT (topic_id, member_id) DO UPDATE SET \
                           encrypted_key = excluded.encrypted_key, nonce = excluded.nonce, sealed_for = excluded.sealed_for, \
                           rotated_at = excluded.created_at";
        with_db_write!(self, p => sqlx::query(SQL).bind(&s.topic_id).bind(&s.member_id).bind(&s.encrypted_key)
            .bind(&s.nonce).bind(&s.sealed_for).bind(s.created_at).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Every sealed key of a topic.
    pub async fn seals(&self, topic_id: &str) -> Result<Vec<SealRow>, StoreError> {
        const SQL: &str = "SELECT topic_id, member_id, encrypted_key, nonce, sealed_for, created_at, rotated_at \
                           FROM topic_member_key WHERE topic_id = $1";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(topic_id).fetch_all(p).await)?)
    }

    /// Sealed keys of a mesh's topics (a peer broker's catch-up).
    pub async fn mesh_seals(&self, mesh_id: &str) -> Result<Vec<SealRow>, StoreError> {
        const SQL: &str = "SELECT k.topic_id, k.member_id, k.encrypted_key, k.nonce, k.sealed_for, k.created_at, k.rotated_at \
                           FROM topic_member_key k JOIN topic t ON t.id = k.topic_id WHERE t.mesh_id = $1";
        Ok(with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).fetch_all(p).await)?)
    }

    /// Per topic of a mesh: messages after the member's read cursor not sent by it, and
    /// the newest message time. Topics without messages are absent.
    pub async fn topic_activity(
        &self,
        mesh_id: &str,
        member_id: &str,
    ) -> Result<Vec<(String, i64, i64)>, StoreError> {
        const SQL: &str = "SELECT m.topic_id, \
                             SUM(CASE WHEN m.sender_member_id <> $2 AND m.created_at > COALESCE(tm.last_read_at, 0) THEN 1 ELSE 0 END), \
                             MAX(m.created_at) \
                           FROM topic_message m LEFT JOIN topic_member tm ON tm.topic_id = m.topic_id AND tm.member_id = $2 \
                           WHERE m.mesh_id = $1 GROUP BY m.topic_id";
        Ok(
            with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(member_id).fetch_all(p).await)?,
        )
    }

    /// A member's mention notifications in a mesh created after `since`, newest first.
    pub async fn notifications(
        &self,
        mesh_id: &str,
        member_id: &str,
        since: i64,
        unread_only: bool,
        limit: i64,
    ) -> Result<Vec<NotificationRow>, StoreError> {
        const SQL: &str = "SELECT n.id, n.mesh_id, n.topic_id, t.name AS topic_name, n.message_id, n.recipient_member_id, \
                             m.sender_name, m.sender_member_pubkey AS sender_pubkey, m.ciphertext, m.body_version, n.kind, n.created_at, n.read_at \
                           FROM notification n JOIN topic t ON t.id = n.topic_id JOIN topic_message m ON m.id = n.message_id \
                           WHERE n.mesh_id = $1 AND n.recipient_member_id = $2 AND n.created_at > $3 AND ($4 = 0 OR n.read_at IS NULL) \
                           ORDER BY n.created_at DESC, n.id DESC LIMIT +$5";
        Ok(
            with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(member_id).bind(since)
            .bind(i64::from(unread_only)).bind(limit).fetch_all(p).await)?,
        )
    }

    /// Marks a member's notifications read: those of `ids`, or (`ids` `None`) every
    /// unread one created before `before`. Returns how many changed.
    pub async fn read_notifications(
        &self,
        mesh_id: &str,
        member_id: &str,
        ids: Option<&[String]>,
        before: i64,
        now: i64,
    ) -> Result<u64, StoreError> {
        const ONE: &str = "UPDATE notification SET read_at = $1 WHERE mesh_id = $2 AND recipient_member_id = $3 \
                           AND read_at IS NULL AND (id = $4 OR message_id = $4)";
        const ALL: &str = "UPDATE notification SET read_at = $1 WHERE mesh_id = $2 AND recipient_member_id = $3 \
                           AND read_at IS NULL AND created_at < $4";
        match ids {
            Some(ids) => {
                let mut n = 0;
                for id in ids {
                    n += with_db_write!(self, p => sqlx::query(ONE).bind(now).bind(mesh_id).bind(member_id).bind(id)
                        .execute(p).await.map(|r| r.rows_affected()))?;
                }
                Ok(n)
            }
            None => Ok(
                with_db_write!(self, p => sqlx::query(ALL).bind(now).bind(mesh_id).bind(member_id).bind(before)
                .execute(p).await.map(|r| r.rows_affected()))?,
            ),
        }
    }

    /// Messages of a mesh's topics since `since`, newest first (activity and search).
    pub async fn mesh_topic_messages(
        &self,
        mesh_id: &str,
        since: i64,
        limit: i64,
    ) -> Result<Vec<TopicMessageRow>, StoreError> {
        const SQL: &str = "SELECT id, topic_id, mesh_id, sender_member_id, sender_member_pubkey, sender_session_pubkey, sender_name, \
                           nonce, ciphertext, body_version, reply_to_id, created_at, origin_broker \
                           FROM topic_message WHERE mesh_id = $1 AND created_at > $2 ORDER BY created_at DESC, id DESC LIMIT +$3";
        Ok(
            with_db!(self, p => sqlx::query_as(SQL).bind(mesh_id).bind(since).bind(limit).fetch_all(p).await)?,
        )
    }
}
