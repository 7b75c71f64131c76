//! `search_peers` (the seed's roadmap; a meshd extension): ranked search over the
//! mesh's peers — names, groups, roles, tags, summaries, profile fields and the skills
//! they shared — with filters and an explanation of each match. Answered with
//! `search_peers_result`, which echoes `_reqId`.

use serde::{Deserialize, Serialize};

/// Longest query accepted, bytes.
pub const MAX_QUERY: usize = 512;
/// Most results one answer carries.
pub const MAX_LIMIT: usize = 50;
/// Results when the request names no limit.
pub const DEFAULT_LIMIT: usize = 10;

/// What a result must be, besides matching.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Filters {
    /// In this group (with or without the `@`).
    #[serde(default)]
    pub group: Option<String>,
    /// This member role, peer role or profile role tag.
    #[serde(default)]
    pub role: Option<String>,
    /// `idle`, `working` or `dnd` (live peers only).
    #[serde(default)]
    pub status: Option<String>,
    /// On this broker (`local` for this one).
    #[serde(default)]
    pub broker: Option<String>,
    /// `claude`, `human`, `connector`, …
    #[serde(default)]
    pub peer_type: Option<String>,
    /// Connected now (`true`), or members not connected (`false`).
    #[serde(default)]
    pub online: Option<bool>,
}

/// A `search_peers` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Free text (may be empty when filters are given).
    pub query: String,
    /// Filters.
    pub filters: Filters,
    /// Most results wanted, 1..=[`MAX_LIMIT`].
    pub limit: usize,
}

#[derive(Deserialize)]
struct Body {
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    filters: Option<Filters>,
    #[serde(default)]
    limit: Option<u64>,
}

/// Decodes a `search_peers` body (also the MCP tool's and the REST route's arguments).
///
/// # Errors
/// A query longer than [`MAX_QUERY`], a limit outside 1..=[`MAX_LIMIT`], an unknown
/// filter, or neither a query nor a filter.
pub fn decode(text: &str) -> Result<Request, serde_json::Error> {
    use serde::de::Error as _;
    let b: Body = serde_json::from_str(text)?;
    let query = b.query.unwrap_or_default().trim().to_owned();
    if query.len() > MAX_QUERY {
        return Err(serde_json::Error::custom("query is longer than 512 bytes"));
    }
    let filters = b.filters.unwrap_or_default();
    if query.is_empty() && filters == Filters::default() {
        return Err(serde_json::Error::custom("a query or a filter is required"));
    }
    let limit = match b.limit {
        None => DEFAULT_LIMIT,
        Some(n @ 1..=50) => usize::try_from(n).unwrap_or(MAX_LIMIT),
        Some(_) => return Err(serde_json::Error::custom("limit must be 1 to 50")),
    };
    Ok(Request {
        query,
        filters,
        limit,
    })
}

/// Why a peer matched one query term.
#[derive(Debug, Clone, Serialize)]
pub struct Why {
    /// The query term.
    pub term: String,
    /// `name`, `groups`, `role`, `tags`, `summary`, `profile`, `skills` or `meta`.
    pub field: &'static str,
    /// The peer's word it matched.
    pub word: String,
    /// `exact`, `prefix` or `typo`.
    #[serde(rename = "match")]
    pub how: &'static str,
}

/// One result.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Hit {
    /// The routing key to message it (absent for a member not connected).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pubkey: Option<String>,
    /// The member's key.
    pub member_pubkey: String,
    /// Display name.
    pub display_name: String,
    /// `idle`, `working`, `dnd`, or `offline`.
    pub status: String,
    /// Peer type, when connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_type: Option<String>,
    /// The peer broker it is on (absent: this one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    /// Its groups.
    pub groups: Vec<String>,
    /// Its summary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// Connected now.
    pub online: bool,
    /// Relevance (higher is better; 0 for a filter-only search).
    pub score: f64,
    /// Why it matched, strongest field first.
    pub why: Vec<Why>,
}

/// `search_peers_result`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "search_peers_result", rename_all = "camelCase")]
pub struct Reply {
    /// Best first.
    pub results: Vec<Hit>,
    /// Peers and members searched (after visibility).
    pub searched: usize,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_search_has_a_query_or_a_filter_within_bounds() {
        let r = decode(
            r#"{"query":" rust reviewer ","filters":{"group":"@ops","online":true},"limit":5}"#,
        )
        .unwrap();
        assert_eq!(r.query, "rust reviewer");
        assert_eq!(r.filters.group.as_deref(), Some("@ops"));
        assert_eq!(r.limit, 5);
        assert_eq!(decode(r#"{"query":"x"}"#).unwrap().limit, DEFAULT_LIMIT);
        assert!(decode(r#"{"filters":{"peerType":"human"}}"#).is_ok());
        for bad in [
            "{}",
            r#"{"query":"  "}"#,
            r#"{"query":"x","limit":0}"#,
            r#"{"query":"x","limit":51}"#,
            r#"{"query":"x","filters":{"colour":"red"}}"#,
        ] {
            assert!(decode(bad).is_err(), "{bad}");
        }
        let long = format!(r#"{{"query":"{}"}}"#, "a".repeat(513));
        assert!(decode(&long).is_err());
    }
}
