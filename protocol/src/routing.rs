//! Addressing and delivery rules: target specs, priorities, statuses and group matching.

use serde::{Deserialize, Serialize};

use crate::keys::Pubkey;

/// Delivery priority of a `send`.
///
/// The order is meaningful: a lower rank is more urgent, and statuses admit a prefix of
/// the ranks (see [`Status::admits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Delivered whatever the recipient's status.
    Now,
    /// Held while the recipient is `working` or `dnd`.
    Next,
    /// Behaves exactly like `next` (the reference broker never implemented "pull-only").
    Low,
}

impl Priority {
    /// All priorities, most urgent first.
    pub const ALL: [Self; 3] = [Self::Now, Self::Next, Self::Low];

    /// Stable integer rank used in storage (`now` = 0 … `low` = 2).
    pub const fn rank(self) -> i64 {
        match self {
            Self::Now => 0,
            Self::Next => 1,
            Self::Low => 2,
        }
    }

    /// Inverse of [`Priority::rank`].
    pub const fn from_rank(rank: i64) -> Option<Self> {
        match rank {
            0 => Some(Self::Now),
            1 => Some(Self::Next),
            2 => Some(Self::Low),
            _ => None,
        }
    }

    /// The wire spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Now => "now",
            Self::Next => "next",
            Self::Low => "low",
        }
    }

    /// Parses the wire spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "now" => Some(Self::Now),
            "next" => Some(Self::Next),
            "low" => Some(Self::Low),
            _ => None,
        }
    }
}

/// A presence's availability, which gates direct messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Everything is delivered.
    #[default]
    Idle,
    /// Only `now` is delivered; `next` and `low` wait.
    Working,
    /// Do not disturb: only `now` is delivered, and hooks cannot clear it.
    Dnd,
}

impl Status {
    /// The least urgent priority this status admits.
    pub const fn max_admitted(self) -> Priority {
        match self {
            Self::Idle => Priority::Low,
            Self::Working | Self::Dnd => Priority::Now,
        }
    }

    /// Whether a direct message of `priority` may be pushed now (§4.5 gating table).
    pub fn admits(self, priority: Priority) -> bool {
        priority <= self.max_admitted()
    }

    /// The wire spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Working => "working",
            Self::Dnd => "dnd",
        }
    }

    /// Parses the wire spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "idle" => Some(Self::Idle),
            "working" => Some(Self::Working),
            "dnd" => Some(Self::Dnd),
            _ => None,
        }
    }
}

/// What a `send`'s `targetSpec` addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    /// `*` or `@all`: every visible peer of the mesh except the sender.
    Broadcast,
    /// `@name`: visible peers in group `name` or in any of its sub-groups (`name/…`).
    Group(String),
    /// A member or session public key (64 hex characters).
    Direct(Pubkey),
    /// `#name`: a channel/topic. Not routable by a core broker.
    Channel(String),
    /// `tag:name`: visible peers subscribed to the tag (see [`crate::tags`]).
    Tag(String),
    /// Anything else, typically a display name the client could not resolve.
    /// Name resolution is the client's job, so a broker cannot route it.
    Name(String),
}

/// Why a target spec was refused outright.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// Empty string.
    #[error("targetSpec is empty")]
    Empty,
    /// `@` with no group name.
    #[error("group name is empty")]
    EmptyGroup,
    /// `tag:` with a name outside the tag alphabet or length.
    #[error("invalid tag in target: 1..=64 bytes of letters, digits and - _ . : /")]
    InvalidTag,
}

impl TargetSpec {
    /// Classifies a `targetSpec` string.
    ///
    /// # Errors
    /// [`TargetError`] for strings that cannot mean anything.
    pub fn parse(spec: &str) -> Result<Self, TargetError> {
        match spec {
            "" => Err(TargetError::Empty),
            "*" | "@all" => Ok(Self::Broadcast),
            "@" => Err(TargetError::EmptyGroup),
            _ => {
                if let Some(group) = spec.strip_prefix('@') {
                    return Ok(Self::Group(group.to_owned()));
                }
                if let Some(channel) = spec.strip_prefix('#') {
                    return Ok(Self::Channel(channel.to_owned()));
                }
                if let Some(tag) = spec.strip_prefix("tag:") {
                    if !crate::tags::valid(tag) {
                        return Err(TargetError::InvalidTag);
                    }
                    return Ok(Self::Tag(tag.to_owned()));
                }
                match Pubkey::parse_hex(spec) {
                    Ok(pk) => Ok(Self::Direct(pk)),
                    Err(_) => Ok(Self::Name(spec.to_owned())),
                }
            }
        }
    }

    /// True for `*`, `@all`, `@group` and `tag:name`: delivered live to many peers.
    pub const fn is_multicast(&self) -> bool {
        matches!(self, Self::Broadcast | Self::Group(_) | Self::Tag(_))
    }
}

/// Whether a peer in group `member_group` is reached by a send to `@target`.
///
/// Groups are hierarchical with `/`: `@eng` reaches `eng` and `eng/backend`, but not
/// `engineering`. (The reference broker only matched exactly on its live path.)
pub fn group_reaches(target: &str, member_group: &str) -> bool {
    match member_group.strip_prefix(target) {
        Some("") => true,
        Some(rest) => rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gating_table() {
        use Priority::*;
        use Status::*;
        for p in Priority::ALL {
            assert!(Idle.admits(p));
        }
        assert!(Working.admits(Now) && !Working.admits(Next) && !Working.admits(Low));
        assert!(Dnd.admits(Now) && !Dnd.admits(Next) && !Dnd.admits(Low));
    }

    #[test]
    fn priority_ranks_round_trip() {
        for p in Priority::ALL {
            assert_eq!(Priority::from_rank(p.rank()), Some(p));
            assert_eq!(Priority::parse(p.as_str()), Some(p));
        }
        assert_eq!(Priority::parse("urgent"), None);
    }

    #[test]
    fn target_specs() {
        let pk = "ab".repeat(32);
        assert_eq!(TargetSpec::parse("*"), Ok(TargetSpec::Broadcast));
        assert_eq!(TargetSpec::parse("@all"), Ok(TargetSpec::Broadcast));
        assert_eq!(
            TargetSpec::parse("@eng/backend"),
            Ok(TargetSpec::Group("eng/backend".into()))
        );
        assert!(matches!(TargetSpec::parse(&pk), Ok(TargetSpec::Direct(_))));
        assert!(matches!(
            TargetSpec::parse(&pk.to_uppercase()),
            Ok(TargetSpec::Direct(_))
        ));
        assert_eq!(
            TargetSpec::parse("#general"),
            Ok(TargetSpec::Channel("general".into()))
        );
        assert_eq!(
            TargetSpec::parse("tag:ops"),
            Ok(TargetSpec::Tag("ops".into()))
        );
        assert_eq!(
            TargetSpec::parse("alice"),
            Ok(TargetSpec::Name("alice".into()))
        );
        assert_eq!(TargetSpec::parse(""), Err(TargetError::Empty));
        assert_eq!(TargetSpec::parse("@"), Err(TargetError::EmptyGroup));
        assert_eq!(TargetSpec::parse("tag:"), Err(TargetError::InvalidTag));
        assert_eq!(TargetSpec::parse("tag:a b"), Err(TargetError::InvalidTag));
        assert!(TargetSpec::parse("tag:ops").unwrap().is_multicast());
    }

    #[test]
    fn hierarchical_groups() {
        assert!(group_reaches("eng", "eng"));
        assert!(group_reaches("eng", "eng/backend"));
        assert!(group_reaches("eng/backend", "eng/backend/db"));
        assert!(!group_reaches("eng", "engineering"));
        assert!(!group_reaches("eng/backend", "eng"));
    }
}
