//! The labelled set for `search_peers` (`tests/data/search-labelled.json`): 40 peers of a
//! made-up company and 20 queries with the peers judged relevant. Used by the ranking
//! test and by `meshd-bench search`.

use serde::Deserialize;

/// A peer of the set.
#[derive(Debug, Clone, Deserialize)]
pub struct Peer {
    /// Display name.
    pub name: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Summary.
    pub summary: String,
    /// Profile title.
    pub title: String,
    /// Profile capabilities.
    pub capabilities: Vec<String>,
    /// Peer type (default `ai`).
    #[serde(rename = "peerType")]
    pub peer_type: Option<String>,
}

/// A query and its relevant peers.
#[derive(Debug, Clone, Deserialize)]
pub struct Query {
    /// The text.
    pub query: String,
    /// Names of the relevant peers.
    pub relevant: Vec<String>,
}

#[derive(Deserialize)]
struct Set {
    peers: Vec<Peer>,
    queries: Vec<Query>,
}

/// The set.
///
/// # Errors
/// The embedded file does not parse.
pub fn load() -> anyhow::Result<(Vec<Peer>, Vec<Query>)> {
    let s: Set = serde_json::from_str(include_str!("../data/search-labelled.json"))?;
    Ok((s.peers, s.queries))
}
