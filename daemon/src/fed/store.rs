//! Federation rows: shares, replicas, members hosted by peer brokers, the outbox read
//! side and the inbox cursor. Writes made while serving traffic go through the writer;
//! these are the reads and the rare writes (consent, member announcements).

use crate::store::{Db, MeshRow, StoreError, with_db, with_db_write};

/// Which side of a share this broker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareRole {
    /// This broker is the mesh's home and shares it with the peer broker.
    Offer,
    /// The peer broker is the home; this broker accepted its offer.
    Accept,
}

impl ShareRole {
    /// Stored spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Offer => "offer",
            Self::Accept => "accept",
        }
    }
}

/// A stored consent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareRow {
    /// Mesh id.
    pub mesh_id: String,
    /// Peer broker.
    pub broker: String,
    /// Our side.
    pub role: ShareRole,
}

#[derive(sqlx::FromRow)]
struct RawShare {
    mesh_id: String,
    #[sqlx(rename = "peer")]
    broker: String,
    role: String,
}

/// A replica of a mesh whose home is a peer broker.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ReplicaRow {
    /// Mesh id.
    pub mesh_id: String,
    /// The home broker.
    pub home_broker: String,
    /// JSON array of broker names the home shares the mesh with.
    pub roster: String,
}

/// A pending outbox row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    /// Outbox position (`forward_seq`).
    pub seq: i64,
    /// Message id.
    pub id: String,
    /// Mesh.
    pub mesh_id: String,
    /// Sender member id.
    pub sender_member_id: String,
    /// Sender routing key.
    pub sender_pubkey: String,
    /// Sender member key.
    pub sender_member_pubkey: String,
    /// Sender display name.
    pub sender_name: String,
    /// Target spec.
    pub target_spec: String,
    /// Recipient key.
    pub target_key: Option<String>,
    /// Priority rank.
    pub priority: i64,
    /// Nonce.
    pub nonce: String,
    /// Ciphertext.
    pub ciphertext: String,
    /// Subtype.
    pub subtype: Option<String>,
    /// Client message id.
    pub client_message_id: Option<String>,
    /// Created (ms).
    pub created_at: i64,
    /// Expires (ms).
    pub expires_at: i64,
    /// Tags, space-separated.
    pub tags: Option<String>,
    /// For a DM through a bridge: its sender's mesh (JSON).
    pub bridged: Option<String>,
}

/// Outcome of applying a member announced by a peer broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberUpsert {
    /// Stored (new or updated); `revoked_now` when this announcement revoked it.
    Applied {
        /// Member id as stored.
        member_id: String,
        /// The announcement revoked a live member.
        revoked_now: bool,
    },
    /// The key belongs to a member hosted elsewhere: the announcement is forged.
    Forged,
}

impl Db {
    /// Every consent, in a stable order.
    pub async fn shares(&self) -> Result<Vec<ShareRow>, StoreError> {
        const SQL: &str = "SELECT mesh_id, peer, role FROM fed_share ORDER BY mesh_id, peer";
        let rows: Vec<RawShare> = with_db!(self, p => sqlx::query_as(SQL).fetch_all(p).await)?;
        rows.into_iter()
            .map(|r| {
                let role = match r.role.as_str() {
                    "offer" => ShareRole::Offer,
                    "accept" => ShareRole::Accept,
                    other => return Err(StoreError::Corrupt(format!("share role {other:?}"))),
                };
                Ok(ShareRow {
                    mesh_id: r.mesh_id,
                    broker: r.broker,
                    role,
                })
            })
            .collect()
    }

    /// Records a consent (idempotent; the role of an existing row is kept).
    pub async fn insert_share(
        &self,
        mesh_id: &str,
        broker: &str,
        role: ShareRole,
        now: i64,
    ) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO fed_share (mesh_id, peer, role, created_at) VALUES ($1, $2, $3, $4) \
                           ON CONFLICT (mesh_id, peer) DO NOTHING";
        with_db_write!(self, p => sqlx::query(SQL).bind(mesh_id).bind(broker).bind(role.as_str()).bind(now)
            .execute(p).await.map(drop))?;
        Ok(())
    }

    /// Withdraws a consent. Returns whether one existed.
    pub async fn delete_share(&self, mesh_id: &str, broker: &str) -> Result<bool, StoreError> {
        const SQL: &str = "DELETE FROM fed_share WHERE mesh_id = $1 AND peer = $2";
        let n = with_db_write!(self, p => sqlx::query(SQL).bind(mesh_id).bind(broker).execute(p).await
            .map(|r| r.rows_affected()))?;
        Ok(n > 0)
    }

    /// Every replica.
    pub async fn replicas(&self) -> Result<Vec<ReplicaRow>, StoreError> {
        const SQL: &str = "SELECT mesh_id, home_broker, roster FROM fed_replica";
        Ok(with_db!(self, p => sqlx::query_as(SQL).fetch_all(p).await)?)
    }

    /// Creates a replica's mesh row (with this broker's own invite keys) if it does not
    /// exist, and records its home and roster.
    pub async fn upsert_replica(
        &self,
        mesh: &MeshRow,
        home: &str,
        roster: &str,
    ) -> Result<(), StoreError> {
        const MESH_SQL: &str = "INSERT INTO mesh (id, name, slug, owner_pubkey, root_key, created_at, archived_at) \
                                VALUES ($1, $2, $3, $4, $5, $6, NULL) ON CONFLICT (id) DO NOTHING";
        const REPLICA_SQL: &str = "INSERT INTO fed_replica (mesh_id, home_broker, roster) VALUES ($1, $2, $3) \
                                   ON CONFLICT (mesh_id) DO UPDATE SET home_broker = excluded.home_broker, roster = excluded.roster";
        with_db_write!(self, p => async {
            let mut tx = p.begin().await?;
            sqlx::query(MESH_SQL).bind(&mesh.id).bind(&mesh.name).bind(&mesh.slug)
                .bind(&mesh.owner_pubkey).bind(&mesh.root_key).bind(mesh.created_at)
                .execute(&mut *tx).await?;
            sqlx::query(REPLICA_SQL).bind(&mesh.id).bind(home).bind(roster)
                .execute(&mut *tx).await?;
            tx.commit().await
        }.await)?;
        Ok(())
    }

    /// The highest outbox position committed per peer broker (for the writer's [`OutSeqs`]).
    ///
    /// [`OutSeqs`]: crate::store::writer::OutSeqs
    pub async fn outseqs(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(
            with_db!(self, p => sqlx::query_as(crate::store::writer::OUTSEQS_SQL).fetch_all(p).await)?,
        )
    }

    /// Why this broker refused `broker`'s outbox position `seq`, if it did.
    pub async fn inbox_rejection(
        &self,
        broker: &str,
        seq: i64,
    ) -> Result<Option<String>, StoreError> {
        const SQL: &str = "SELECT reason FROM fed_inbox_reject WHERE peer = $1 AND seq = $2";
        Ok(
            with_db!(self, p => sqlx::query_scalar(SQL).bind(broker).bind(seq).fetch_optional(p).await)?,
        )
    }

    /// Highest outbox seq of `broker` already stored here.
    pub async fn inbox_high(&self, broker: &str) -> Result<i64, StoreError> {
        const SQL: &str = "SELECT high_seq FROM fed_inbox WHERE peer = $1";
        let v: Option<i64> =
            with_db!(self, p => sqlx::query_scalar(SQL).bind(broker).fetch_optional(p).await)?;
        Ok(v.unwrap_or(0))
    }

    /// Up to `limit` pending outbox rows for `broker` after `after`, in order.
    pub async fn outbox_page(
        &self,
        broker: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        const SQL: &str = "SELECT forward_seq AS seq, id, mesh_id, sender_member_id, sender_pubkey, sender_member_pubkey, sender_name, \
                           target_spec, target_key, priority, nonce, ciphertext, subtype, client_message_id, created_at, expires_at, tags, bridged \
                           FROM message WHERE forward_to = $1 AND forwarded_at IS NULL AND forward_seq > $2 \
                           ORDER BY forward_seq LIMIT +$3";
        Ok(
            with_db!(self, p => sqlx::query_as(SQL).bind(broker).bind(after).bind(limit).fetch_all(p).await)?,
        )
    }

    /// Pending outbox rows for `broker`.
    pub async fn outbox_len(&self, broker: &str) -> Result<i64, StoreError> {
        const SQL: &str =
            "SELECT COUNT(*) FROM message WHERE forward_to = $1 AND forwarded_at IS NULL";
        Ok(with_db!(self, p => sqlx::query_scalar(SQL).bind(broker).fetch_one(p).await)?)
    }

    /// Applies a member announced by `broker`. A key already held by a member hosted
    /// anywhere else (here included) is refused as forged. The home broker is the
    /// authority on its members' revocations: an announcement lifts a ban (`unban`) as
    /// well as it sets one.
    pub async fn upsert_remote_member(
        &self,
        mesh_id: &str,
        broker: &str,
        ann: &meshd_protocol::fed::MemberAnn,
        now: i64,
    ) -> Result<MemberUpsert, StoreError> {
        const INSERT_SQL: &str = "INSERT INTO member (id, mesh_id, pubkey, display_name, role, joined_at, revoked_at, invite_id, home_broker) \
                                  VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, $8) ON CONFLICT (mesh_id, pubkey) DO NOTHING";
        const UPDATE_SQL: &str = "UPDATE member SET display_name = $1, role = $2, \
                                  revoked_at = CASE WHEN $3 THEN COALESCE(revoked_at, $4) ELSE NULL END \
                                  WHERE mesh_id = $5 AND pubkey = $6 AND home_broker = $7";
        if let Some(existing) = self.member_by_pubkey(mesh_id, &ann.pubkey).await? {
            if existing.home_broker.as_deref() != Some(broker) {
                return Ok(MemberUpsert::Forged);
            }
            let revoked_now = ann.revoked && existing.revoked_at.is_none();
            with_db_write!(self, p => sqlx::query(UPDATE_SQL).bind(&ann.display_name).bind(&ann.role)
                .bind(ann.revoked).bind(now).bind(mesh_id).bind(&ann.pubkey).bind(broker)
                .execute(p).await.map(drop))?;
            return Ok(MemberUpsert::Applied {
                member_id: existing.id,
                revoked_now,
            });
        }
        let revoked_at = ann.revoked.then_some(now);
        with_db_write!(self, p => sqlx::query(INSERT_SQL).bind(&ann.member_id).bind(mesh_id).bind(&ann.pubkey)
            .bind(&ann.display_name).bind(&ann.role).bind(now).bind(revoked_at).bind(broker)
            .execute(p).await.map(drop))?;
        // A lost race with another insert of the same key: judge what is stored now.
        match self.member_by_pubkey(mesh_id, &ann.pubkey).await? {
            Some(m) if m.home_broker.as_deref() == Some(broker) => Ok(MemberUpsert::Applied {
                member_id: m.id,
                revoked_now: false,
            }),
            _ => Ok(MemberUpsert::Forged),
        }
    }
}
