//! Link policies: per shared mesh and per peer broker, what may leave this broker
//! (export) and what may enter it (import) — message kinds, tags (allow and deny lists,
//! prefix match) and presence fields.
//!
//! Each side enforces its own half: the sender's broker checks its export rules before
//! anything crosses (a refused DM is refused in the sender's `ack`; a multicast is not
//! forwarded to that broker and the refusal is recorded for `message_status`), the
//! receiver checks its import rules (a DM is rejected on the link, which the sender's
//! `message_status` shows; a multicast is dropped and a `MulticastRefused` goes back).
//! Withheld presence fields are blanked before a presence leaves (export) or after it
//! arrives (import). Every refusal is counted per reason.
//!
//! Rules are stored (`fed_policy`, written by `meshd mesh policy`) and re-read on every
//! reconcile tick, so a change applies to the running daemon within a second; a
//! change of the presence fields a broker may see re-sends that mesh's presence to it.
//! A mesh and broker without rules lets everything through.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use meshd_protocol::TargetSpec;
use meshd_protocol::fed::PresenceEntry;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::Fed;
use crate::Ctx;
use crate::hub::lock;
use crate::store::{Db, StoreError, with_db, with_db_write};

/// Message kinds a policy names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A direct message.
    Dm,
    /// `*` / `@all`.
    Broadcast,
    /// `@group`.
    Group,
    /// `tag:NAME`.
    Tagged,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Self; 4] = [Self::Dm, Self::Broadcast, Self::Group, Self::Tagged];

    /// The kind of a message sent to `target`; `None` for targets never forwarded.
    pub fn of(target: &TargetSpec) -> Option<Self> {
        match target {
            TargetSpec::Direct(_) => Some(Self::Dm),
            TargetSpec::Broadcast => Some(Self::Broadcast),
            TargetSpec::Group(_) => Some(Self::Group),
            TargetSpec::Tag(_) => Some(Self::Tagged),
            TargetSpec::Channel(_) | TargetSpec::Name(_) => None,
        }
    }

    /// Its name on the command line and in stored rules.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Dm => "dm",
            Self::Broadcast => "broadcast",
            Self::Group => "group",
            Self::Tagged => "tagged",
        }
    }

    /// The kind a name means.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Presence fields a policy may withhold. The key, member and display name always
/// cross: routing and the member roster need them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    /// Status (withheld: shown as `idle`).
    Status,
    /// Summary.
    Summary,
    /// Groups (withheld: `@group` sends from there do not reach the peer).
    Groups,
    /// Tag subscriptions (withheld: `tag:` sends from there do not reach the peer).
    Tags,
    /// Working directory.
    Cwd,
    /// Host name.
    Hostname,
    /// Public profile.
    Profile,
    /// Counters.
    Stats,
    /// Peer type.
    PeerType,
    /// Channel.
    Channel,
    /// Model.
    Model,
    /// Client session id.
    SessionId,
    /// Position (withheld: viewers standing somewhere there never see the peer).
    Position,
}

impl Field {
    /// Every field.
    pub const ALL: [Self; 13] = [
        Self::Status,
        Self::Summary,
        Self::Groups,
        Self::Tags,
        Self::Cwd,
        Self::Hostname,
        Self::Profile,
        Self::Stats,
        Self::PeerType,
        Self::Channel,
        Self::Model,
        Self::SessionId,
        Self::Position,
    ];

    /// Its name on the command line and in stored rules.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Summary => "summary",
            Self::Groups => "groups",
            Self::Tags => "tags",
            Self::Cwd => "cwd",
            Self::Hostname => "hostname",
            Self::Profile => "profile",
            Self::Stats => "stats",
            Self::PeerType => "peer_type",
            Self::Channel => "channel",
            Self::Model => "model",
            Self::SessionId => "session_id",
            Self::Position => "position",
        }
    }

    /// The field a name means.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == s)
    }

    /// Blanks the field in `e`; whether it held anything.
    fn blank(self, e: &mut PresenceEntry) -> bool {
        fn take<T: Default + PartialEq>(v: &mut T) -> bool {
            std::mem::take(v) != T::default()
        }
        match self {
            Self::Status => std::mem::replace(&mut e.status, "idle".into()) != "idle",
            Self::Summary => take(&mut e.summary),
            Self::Groups => take(&mut e.groups),
            Self::Tags => take(&mut e.tags),
            Self::Cwd => take(&mut e.cwd),
            Self::Hostname => take(&mut e.hostname),
            Self::Profile => std::mem::replace(&mut e.profile, "{}".into()) != "{}",
            Self::Stats => take(&mut e.stats),
            Self::PeerType => take(&mut e.peer_type),
            Self::Channel => take(&mut e.channel),
            Self::Model => take(&mut e.model),
            Self::SessionId => take(&mut e.session_id),
            Self::Position => e.position.take().is_some(),
        }
    }
}

/// Export or import.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// What this broker sends to the peer broker.
    Export,
    /// What this broker takes from the peer broker.
    Import,
}

impl Direction {
    /// Stored spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Export => "export",
            Self::Import => "import",
        }
    }

    /// The direction a name means.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "export" => Some(Self::Export),
            "import" => Some(Self::Import),
            _ => None,
        }
    }
}

/// Most prefixes in one tag list.
pub(crate) const MAX_PREFIXES: usize = 64;

/// One direction's rules. A field left out (`None`) lets everything through.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rules {
    /// Kinds that pass; `None`: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<Vec<Kind>>,
    /// Tag prefixes a message's tags must each match; `None`: any tag. A message
    /// without tags is not affected (the kinds decide).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_tags: Option<Vec<String>>,
    /// Tag prefixes no tag of a message may match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_tags: Vec<String>,
    /// Presence fields that pass; `None`: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_fields: Option<Vec<Field>>,
}

/// Why a message did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// Its kind is not let through.
    Kind(Kind),
    /// A tag matches the deny list.
    DenyListed(String),
    /// A tag matches no prefix of the allow list.
    TagNotAllowed(String),
}

impl Denied {
    /// Label of the refusal (metrics, `message_status`).
    pub const fn label(&self) -> &'static str {
        match self {
            Self::Kind(_) => "kind",
            Self::DenyListed(_) => "tag_denied",
            Self::TagNotAllowed(_) => "tag_not_allowed",
        }
    }

    /// A short machine-readable reason: `kind:broadcast`, `tag:secret`.
    pub fn reason(&self) -> String {
        match self {
            Self::Kind(k) => format!("kind:{}", k.as_str()),
            Self::DenyListed(t) | Self::TagNotAllowed(t) => format!("tag:{t}"),
        }
    }
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kind(k) => write!(f, "{} messages are not let through", k.as_str()),
            Self::DenyListed(t) => write!(f, "tag {t:?} is on the deny list"),
            Self::TagNotAllowed(t) => write!(f, "tag {t:?} is not on the allow list"),
        }
    }
}

impl Rules {
    /// Whether a message of `kind` carrying `tags` passes.
    ///
    /// # Errors
    /// The first rule it breaks.
    pub fn admits(&self, kind: Kind, tags: &[String]) -> Result<(), Denied> {
        if self.kinds.as_ref().is_some_and(|k| !k.contains(&kind)) {
            return Err(Denied::Kind(kind));
        }
        for t in tags {
            if self
                .deny_tags
                .iter()
                .any(|p| meshd_protocol::tags::matches_prefix(t, p))
            {
                return Err(Denied::DenyListed(t.clone()));
            }
            if let Some(allow) = &self.allow_tags
                && !allow
                    .iter()
                    .any(|p| meshd_protocol::tags::matches_prefix(t, p))
            {
                return Err(Denied::TagNotAllowed(t.clone()));
            }
        }
        Ok(())
    }

    /// Blanks the fields these rules withhold; the names of those that held something.
    pub fn strip(&self, e: &mut PresenceEntry) -> Vec<Field> {
        let Some(pass) = &self.presence_fields else {
            return Vec::new();
        };
        Field::ALL
            .into_iter()
            .filter(|f| !pass.contains(f))
            .filter(|f| f.blank(e))
            .collect()
    }

    /// Whether these rules let everything through.
    pub fn is_open(&self) -> bool {
        *self == Self::default()
    }

    /// Checks prefixes (tag alphabet, bounded lists).
    ///
    /// # Errors
    /// What is wrong, for the command line.
    pub fn validate(&self) -> Result<(), String> {
        for list in self
            .allow_tags
            .iter()
            .chain(std::iter::once(&self.deny_tags))
        {
            if list.len() > MAX_PREFIXES {
                return Err(format!("at most {MAX_PREFIXES} tag prefixes per list"));
            }
            if let Some(bad) = list.iter().find(|p| !meshd_protocol::tags::valid(p)) {
                return Err(format!(
                    "invalid tag prefix {bad:?}: 1..=64 bytes of letters, digits and - _ . : /"
                ));
            }
        }
        Ok(())
    }
}

/// Both halves for one mesh and peer broker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LinkPolicy {
    /// What may leave.
    pub(crate) export: Rules,
    /// What may enter.
    pub(crate) import: Rules,
}

impl LinkPolicy {
    /// One half.
    pub(crate) fn rules(&self, d: Direction) -> &Rules {
        match d {
            Direction::Export => &self.export,
            Direction::Import => &self.import,
        }
    }
}

/// Every policy, by mesh then peer broker (looked up by `&str` on the hot path).
pub(crate) type Policies = HashMap<String, HashMap<String, LinkPolicy>>;

/// A stored policy row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PolicyRow {
    /// Mesh id.
    pub mesh_id: String,
    /// Peer broker.
    pub broker: String,
    /// `export` or `import`.
    pub direction: String,
    /// [`Rules`] as JSON.
    pub rules: String,
    /// Last change (ms).
    pub updated_at: i64,
}

/// Builds the lookup from stored rows; rows that do not parse are skipped (and named).
pub(crate) fn from_rows(rows: &[PolicyRow]) -> (Policies, Vec<String>) {
    let mut out = Policies::new();
    let mut bad = Vec::new();
    for r in rows {
        let (Some(d), Ok(rules)) = (
            Direction::parse(&r.direction),
            serde_json::from_str::<Rules>(&r.rules),
        ) else {
            bad.push(format!("{} {} {}", r.mesh_id, r.broker, r.direction));
            continue;
        };
        let p = out
            .entry(r.mesh_id.clone())
            .or_default()
            .entry(r.broker.clone())
            .or_default();
        match d {
            Direction::Export => p.export = rules,
            Direction::Import => p.import = rules,
        }
    }
    (out, bad)
}

/// The metric label of a refusal: direction and rule.
const fn metric_label(d: Direction, rule: &str) -> &'static str {
    match (d, rule.as_bytes()) {
        (Direction::Export, b"kind") => "export_kind",
        (Direction::Export, b"tag_denied") => "export_tag_denied",
        (Direction::Export, b"tag_not_allowed") => "export_tag_not_allowed",
        (Direction::Export, b"field") => "export_field",
        (Direction::Import, b"kind") => "import_kind",
        (Direction::Import, b"tag_denied") => "import_tag_denied",
        (Direction::Import, b"tag_not_allowed") => "import_tag_not_allowed",
        (Direction::Import, b"field") => "import_field",
        _ => "other",
    }
}

impl Fed {
    /// Runs `f` on this broker's `d` rules for `mesh` and `broker`, if any are stored.
    fn with_rules<R>(
        &self,
        mesh: &str,
        broker: &str,
        d: Direction,
        f: impl FnOnce(&Rules) -> R,
    ) -> Option<R> {
        let all = lock(&self.policies).clone();
        all.get(mesh)
            .and_then(|m| m.get(broker))
            .map(|p| f(p.rules(d)))
    }

    /// Whether a message of `kind` with `tags` of `mesh` passes this broker's `d` rules
    /// for `broker`; a refusal is counted.
    ///
    /// # Errors
    /// The rule it breaks.
    pub(crate) fn policy_check(
        &self,
        mesh: &str,
        broker: &str,
        d: Direction,
        kind: Kind,
        tags: &[String],
    ) -> Result<(), Denied> {
        let r = self
            .with_rules(mesh, broker, d, |r| r.admits(kind, tags))
            .unwrap_or(Ok(()));
        if let Err(e) = &r {
            self.count_policy(broker, metric_label(d, e.label()), 1);
        }
        r
    }

    /// Blanks the presence fields this broker's `d` rules for `broker` withhold;
    /// every withheld field that held something is counted.
    pub(crate) fn strip_presence(
        &self,
        mesh: &str,
        broker: &str,
        d: Direction,
        e: &mut PresenceEntry,
    ) {
        let gone = self
            .with_rules(mesh, broker, d, |r| r.strip(e))
            .unwrap_or_default();
        if !gone.is_empty() {
            self.count_policy(broker, metric_label(d, "field"), gone.len() as u64);
        }
    }

    fn count_policy(&self, broker: &str, label: &'static str, n: u64) {
        self.metrics.fed_policy_refused.inc_by(label, n);
        *lock(&self.policy_counts)
            .entry(broker.to_owned())
            .or_default()
            .entry(label)
            .or_default() += n;
    }

    /// Refusals by policy involving `broker`, by reason (for `/federation`).
    pub(crate) fn policy_counts(&self, broker: &str) -> serde_json::Value {
        lock(&self.policy_counts)
            .get(broker)
            .map(|c| serde_json::json!(c))
            .unwrap_or_else(|| serde_json::json!({}))
    }

    /// Re-reads the stored policies; when they changed, puts them in force: a broker
    /// whose visible presence fields changed gets the mesh's presence again, and a
    /// stricter import takes the withheld fields off what is listed now.
    ///
    /// # Errors
    /// The store's.
    pub(crate) async fn reload_policies(&self, ctx: &Ctx) -> Result<(), StoreError> {
        let rows = ctx.db.policies().await?;
        if *lock(&self.policy_rows) == rows {
            return Ok(());
        }
        let (next, bad) = from_rows(&rows);
        for b in bad {
            warn!(policy = %b, "a stored link policy does not parse; ignored (everything passes)");
        }
        let next = Arc::new(next);
        let prev = std::mem::replace(&mut *lock(&self.policies), next.clone());
        *lock(&self.policy_rows) = rows;
        info!(meshes = next.len(), "link policies in force");
        let open = LinkPolicy::default();
        let pairs: std::collections::BTreeSet<(&String, &String)> = prev
            .iter()
            .chain(next.iter())
            .flat_map(|(m, by)| by.keys().map(move |b| (m, b)))
            .collect();
        for (mesh, broker) in pairs {
            let get = |p: &Arc<Policies>| {
                p.get(mesh)
                    .and_then(|m| m.get(broker))
                    .cloned()
                    .unwrap_or_else(|| open.clone())
            };
            let (before, after) = (get(&prev), get(&next));
            let Some(hub) = ctx.hub.loaded(mesh) else {
                continue;
            };
            if before.export.presence_fields != after.export.presence_fields
                && let Some(link) = self.link(broker)
                && link.flows(mesh)
            {
                self.send_presence_snapshot(&link, &hub);
            }
            if before.import.presence_fields != after.import.presence_fields {
                let _ = hub.remote_restrip(broker, |e| after.import.strip(e).len());
            }
        }
        Ok(())
    }
}

impl Db {
    /// Every stored policy row.
    pub async fn policies(&self) -> Result<Vec<PolicyRow>, StoreError> {
        const SQL: &str = "SELECT mesh_id, broker, direction, rules, updated_at FROM fed_policy \
                           ORDER BY mesh_id, broker, direction";
        Ok(with_db!(self, p => sqlx::query_as(SQL).fetch_all(p).await)?)
    }

    /// Stores one direction's rules (replacing what was there).
    pub async fn set_policy(
        &self,
        mesh_id: &str,
        broker: &str,
        d: Direction,
        rules: &Rules,
        now: i64,
    ) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO fed_policy (mesh_id, broker, direction, rules, updated_at) \
                           VALUES ($1, $2, $3, $4, $5) ON CONFLICT (mesh_id, broker, direction) \
                           DO UPDATE SET rules = excluded.rules, updated_at = excluded.updated_at";
        let json = serde_json::to_string(rules).unwrap_or_else(|_| "{}".into());
        with_db_write!(self, p => sqlx::query(SQL).bind(mesh_id).bind(broker).bind(d.as_str()).bind(json).bind(now).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Removes rules (one direction, or both); how many rows went.
    pub async fn delete_policy(
        &self,
        mesh_id: &str,
        broker: &str,
        d: Option<Direction>,
    ) -> Result<u64, StoreError> {
        const ONE: &str =
            "DELETE FROM fed_policy WHERE mesh_id = $1 AND broker = $2 AND direction = $3";
        const BOTH: &str = "DELETE FROM fed_policy WHERE mesh_id = $1 AND broker = $2";
        let r = match d {
            Some(d) => {
                with_db_write!(self, p => sqlx::query(ONE).bind(mesh_id).bind(broker).bind(d.as_str()).execute(p).await.map(|r| r.rows_affected()))
            }
            None => {
                with_db_write!(self, p => sqlx::query(BOTH).bind(mesh_id).bind(broker).execute(p).await.map(|r| r.rows_affected()))
            }
        }?;
        Ok(r)
    }

    /// Records that a broker's policy kept a multicast from it (`direction` is whose
    /// half: `export` ours, `import` theirs); a repeat changes nothing. The message's own
    /// row may not be committed yet when a peer broker's refusal arrives (its commit and
    /// the round trip race), so the row is not required: `message_status` reads
    /// refusals only for a message it found, and stray rows go with the sweep.
    pub async fn record_refusal(
        &self,
        message_id: &str,
        mesh_id: &str,
        broker: &str,
        d: Direction,
        reason: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO message_refusal (message_id, mesh_id, broker, direction, reason, at) \
                           VALUES ($1, $2, $3, $4, $5, $6) \
                           ON CONFLICT (message_id, broker, direction) DO NOTHING";
        with_db_write!(self, p => sqlx::query(SQL).bind(message_id).bind(mesh_id).bind(broker).bind(d.as_str()).bind(reason).bind(now).execute(p).await.map(drop))?;
        Ok(())
    }

    /// The recorded refusals of a message: (broker, direction, reason).
    pub async fn refusals(
        &self,
        message_id: &str,
        mesh_id: &str,
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        const SQL: &str = "SELECT broker, direction, reason FROM message_refusal \
                           WHERE message_id = $1 AND mesh_id = $2 ORDER BY broker, direction";
        Ok(
            with_db!(self, p => sqlx::query_as(SQL).bind(message_id).bind(mesh_id).fetch_all(p).await)?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn open_rules_let_everything_through() {
        let r = Rules::default();
        assert!(r.is_open());
        for k in Kind::ALL {
            assert_eq!(r.admits(k, &v(&["any", "thing"])), Ok(()));
        }
    }

    #[test]
    fn kinds_then_deny_then_allow() {
        let r = Rules {
            kinds: Some(vec![Kind::Dm, Kind::Tagged]),
            allow_tags: Some(v(&["public/", "ops"])),
            deny_tags: v(&["ops/secret"]),
            presence_fields: None,
        };
        assert_eq!(
            r.admits(Kind::Broadcast, &[]),
            Err(Denied::Kind(Kind::Broadcast))
        );
        assert_eq!(r.admits(Kind::Dm, &[]), Ok(()), "no tags: the kinds decide");
        assert_eq!(
            r.admits(Kind::Tagged, &v(&["public/news", "ops/db"])),
            Ok(())
        );
        assert_eq!(
            r.admits(Kind::Tagged, &v(&["ops/secret/keys"])),
            Err(Denied::DenyListed("ops/secret/keys".into())),
            "deny wins over allow"
        );
        let e = r.admits(Kind::Dm, &v(&["public", "hr"])).unwrap_err();
        assert_eq!(
            e,
            Denied::TagNotAllowed("public".into()),
            "`public/` does not admit `public`"
        );
        assert_eq!(
            (e.label(), e.reason().as_str()),
            ("tag_not_allowed", "tag:public")
        );
        assert_eq!(Denied::Kind(Kind::Group).reason(), "kind:group");
    }

    #[test]
    fn withheld_fields_are_blanked_and_reported_when_they_held_something() {
        let mut e = PresenceEntry {
            key: "k".into(),
            member_pubkey: "k".into(),
            member_id: "m".into(),
            version: 1,
            display_name: "alice".into(),
            status: "working".into(),
            summary: Some("fixing the build".into()),
            groups: vec![],
            visible: true,
            session_id: "s".into(),
            connected_at: 0,
            cwd: "/home/alice/secret-project".into(),
            hostname: Some("alice-laptop".into()),
            peer_type: None,
            channel: None,
            model: None,
            peer_role: "session".into(),
            profile: "{}".into(),
            stats: None,
            tags: v(&["ops"]),
            position: None,
        };
        let r = Rules {
            presence_fields: Some(vec![Field::Status, Field::Tags]),
            ..Rules::default()
        };
        let gone = r.strip(&mut e);
        assert_eq!(
            gone,
            [
                Field::Summary,
                Field::Cwd,
                Field::Hostname,
                Field::SessionId
            ]
        );
        assert_eq!(
            (e.status.as_str(), e.summary.as_deref(), e.cwd.as_str()),
            ("working", None, "")
        );
        assert_eq!(
            (e.display_name.as_str(), e.hostname.as_deref()),
            ("alice", None)
        );
        assert_eq!(e.tags, v(&["ops"]));
        assert!(r.strip(&mut e).is_empty(), "nothing left to withhold");
        let none = Rules {
            presence_fields: Some(vec![]),
            ..Rules::default()
        };
        assert_eq!(none.strip(&mut e), [Field::Status, Field::Tags]);
        assert_eq!(e.status, "idle");
    }

    #[test]
    fn stored_rules_round_trip_and_unknown_keys_are_refused() {
        let r = Rules {
            kinds: Some(vec![Kind::Dm]),
            allow_tags: None,
            deny_tags: v(&["x"]),
            presence_fields: Some(vec![Field::PeerType]),
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"kinds":["dm"],"denyTags":["x"],"presenceFields":["peer_type"]}"#
        );
        assert_eq!(serde_json::from_str::<Rules>(&json).unwrap(), r);
        assert!(serde_json::from_str::<Rules>(r#"{"kindz":[]}"#).is_err());
        let rows = vec![
            PolicyRow {
                mesh_id: "m".into(),
                broker: "b".into(),
                direction: "export".into(),
                rules: json,
                updated_at: 1,
            },
            PolicyRow {
                mesh_id: "m".into(),
                broker: "b".into(),
                direction: "sideways".into(),
                rules: "{}".into(),
                updated_at: 1,
            },
        ];
        let (p, bad) = from_rows(&rows);
        assert_eq!(p["m"]["b"].export, r);
        assert!(p["m"]["b"].import.is_open());
        assert_eq!(bad, ["m b sideways"]);
    }

    #[test]
    fn every_refusal_has_its_own_metric_label() {
        let labels = crate::metrics::FED_POLICY_REFUSALS;
        for d in [Direction::Export, Direction::Import] {
            for rule in ["kind", "tag_denied", "tag_not_allowed", "field"] {
                let l = metric_label(d, rule);
                assert!(labels.contains(&l) && l != "other", "{l}");
            }
        }
        let denied = [
            Denied::Kind(Kind::Dm),
            Denied::DenyListed("x".into()),
            Denied::TagNotAllowed("x".into()),
        ];
        for e in denied {
            assert_ne!(metric_label(Direction::Export, e.label()), "other");
        }
    }

    #[test]
    fn prefixes_are_checked() {
        let mut r = Rules {
            deny_tags: v(&["fine", "not fine"]),
            ..Rules::default()
        };
        assert!(r.validate().unwrap_err().contains("not fine"));
        r.deny_tags = (0..65).map(|i| format!("t{i}")).collect();
        assert!(r.validate().is_err());
        r.deny_tags = v(&["ok"]);
        assert_eq!(r.validate(), Ok(()));
    }
}
