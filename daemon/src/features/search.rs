//! `search_peers` (meshd extension; the seed's "semantic peer search"): one ranked search
//! over every peer the caller can see — local and on peer brokers, within its spatial
//! radius, hidden peers left out — and the mesh's members who are not connected. Reached
//! three ways with the same arguments and answer: the `search_peers` frame, `GET
//! /api/v1/peers/search`, and the `search_peers` tool of the broker's built-in MCP server
//! (`meshd`, see `features::mcp`).
//!
//! Ranking is [`rank`] (BM25F with typo tolerance) over name, groups, role, tags,
//! summary, profile, the skills a peer shared and a little metadata. The index covers
//! every peer and member of the mesh and is kept ([`Cache`]) until the hub's presence or
//! member change counts move or the skills catalogue changes; each query then only
//! applies the caller's visibility (a set of keys) and its filters.

pub mod rank;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::extract::{OriginalUri, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use meshd_protocol::broker::PeerEntry;
use meshd_protocol::search::{Filters, Hit, Reply, Request, Why};

use crate::Ctx;
use crate::hub::MeshHub;
use crate::session::*;
use crate::store::StoreError;
use rank::{Field, Index};

/// One searchable peer or member.
struct Candidate {
    live: Option<PeerEntry>,
    member_pubkey: String,
    name: String,
    member_role: String,
    home: Option<String>,
}

impl Candidate {
    fn profile_role(&self) -> Option<&str> {
        let p = self.live.as_ref()?.profile.as_ref()?;
        p.get("roleTag").or_else(|| p.get("role"))?.as_str()
    }

    fn groups(&self) -> Vec<String> {
        self.live
            .as_ref()
            .map(|p| p.groups.iter().map(|g| g.name.clone()).collect())
            .unwrap_or_default()
    }

    /// The fields indexed, with their text.
    fn fields(&self, skills: &[(String, String)]) -> Vec<(Field, String)> {
        let mut f = vec![(Field::Name, self.name.clone())];
        let mut role = self.member_role.clone();
        if let Some(p) = &self.live {
            let groups: Vec<String> = p
                .groups
                .iter()
                .map(|g| format!("{} {}", g.name, g.role.as_deref().unwrap_or("")))
                .collect();
            f.push((Field::Groups, groups.join(" ")));
            role.push(' ');
            role.push_str(p.peer_role);
            f.push((Field::Tags, p.tags.join(" ")));
            if let Some(s) = &p.summary {
                f.push((Field::Summary, s.clone()));
            }
            if let Some(profile) = &p.profile {
                let mut text = String::new();
                for (k, v) in profile {
                    if k != "roleTag" && k != "role" {
                        flatten(v, &mut text);
                    }
                }
                f.push((Field::Profile, text));
            }
            let cwd = p.cwd.rsplit('/').next().unwrap_or("");
            let meta = [
                p.peer_type.as_deref().unwrap_or(""),
                p.hostname.as_deref().unwrap_or(""),
                p.model.as_deref().unwrap_or(""),
                p.channel.as_deref().unwrap_or(""),
                cwd,
            ]
            .join(" ");
            f.push((Field::Meta, meta));
        }
        if let Some(r) = self.profile_role() {
            role.push(' ');
            role.push_str(r);
        }
        f.push((Field::Role, role));
        let mine: Vec<&str> = skills
            .iter()
            .filter(|(author, _)| *author == self.name)
            .map(|(_, text)| text.as_str())
            .collect();
        if !mine.is_empty() {
            f.push((Field::Skills, mine.join(" ")));
        }
        f
    }

    fn keeps(&self, filters: &Filters, me: Option<&str>) -> bool {
        let eq = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        if let Some(g) = &filters.group {
            let g = g.trim_start_matches('@');
            if !self.groups().iter().any(|x| eq(x, g)) {
                return false;
            }
        }
        if let Some(r) = &filters.role {
            let peer_role = self.live.as_ref().map(|p| p.peer_role);
            if !(eq(&self.member_role, r)
                || peer_role.is_some_and(|p| eq(p, r))
                || self.profile_role().is_some_and(|p| eq(p, r)))
            {
                return false;
            }
        }
        if let Some(s) = &filters.status {
            let status = self.live.as_ref().map_or("offline", |p| p.status);
            if !eq(status, s) {
                return false;
            }
        }
        if let Some(b) = &filters.broker {
            let here = eq(b, "local") || me.is_some_and(|m| eq(m, b));
            let on = self
                .live
                .as_ref()
                .map_or(self.home.as_deref(), |p| p.broker.as_deref());
            let keep = match on {
                None => here,
                Some(on) => eq(on, b),
            };
            if !keep {
                return false;
            }
        }
        if let Some(t) = &filters.peer_type
            && !self
                .live
                .as_ref()
                .and_then(|p| p.peer_type.as_deref())
                .is_some_and(|p| eq(p, t))
        {
            return false;
        }
        if let Some(online) = filters.online
            && self.live.is_some() != online
        {
            return false;
        }
        true
    }

    fn hit(&self, score: f64, why: Vec<Why>) -> Hit {
        let live = self.live.as_ref();
        Hit {
            pubkey: live.map(|p| p.pubkey.clone()),
            member_pubkey: self.member_pubkey.clone(),
            display_name: self.name.clone(),
            status: live.map_or("offline", |p| p.status).to_owned(),
            peer_type: live.and_then(|p| p.peer_type.clone()),
            broker: live.map_or(self.home.clone(), |p| p.broker.clone()),
            groups: self.groups(),
            summary: live.and_then(|p| p.summary.clone()),
            online: live.is_some(),
            score: (score * 1000.0).round() / 1000.0,
            why,
        }
    }
}

/// The text of a profile value: strings, numbers and booleans, in arrays and objects.
fn flatten(v: &serde_json::Value, out: &mut String) {
    const MAX: usize = 4096;
    if out.len() >= MAX {
        return;
    }
    match v {
        serde_json::Value::String(s) => {
            out.push_str(s);
            out.push(' ');
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| flatten(x, out)),
        serde_json::Value::Object(o) => o.iter().for_each(|(k, x)| {
            out.push_str(k);
            out.push(' ');
            flatten(x, out);
        }),
        serde_json::Value::Number(_) | serde_json::Value::Bool(_) | serde_json::Value::Null => {}
    }
}

/// One mesh's index and what it was built from.
struct Built {
    key: (u64, u64, u64),
    cands: Vec<Candidate>,
    index: Index,
}

/// The latest index per mesh (at most [`CACHED_MESHES`]); `Ctx` holds it in a mutex.
#[derive(Default)]
pub(crate) struct Cache(HashMap<String, Arc<Built>>);

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("search::Cache")
    }
}

/// Meshes whose index is kept.
const CACHED_MESHES: usize = 64;

/// The mesh's index, built again when a peer, a member or a skill changed.
async fn index_of(ctx: &Ctx, mesh: &MeshHub) -> Result<Arc<Built>, StoreError> {
    let skills: Vec<(String, String)> = ctx
        .db
        .skills(&mesh.row.id)
        .await?
        .into_iter()
        .map(|s| {
            let text = format!("{} {} {}", s.name, s.description, s.tags);
            (s.author, text)
        })
        .collect();
    let skills_hash = {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        skills.hash(&mut h);
        h.finish()
    };
    let (presence, members_gen) = mesh.change_counts();
    if let Some(b) = crate::hub::lock(&ctx.search).0.get(&mesh.row.id)
        && b.key == (presence, members_gen, skills_hash)
    {
        return Ok(b.clone());
    }
    // Read again with the copy: a change between the two reads is in the copy, and the
    // key it is stored under says so.
    let ((presence, members_gen), entries) = mesh.all_entries();
    let key = (presence, members_gen, skills_hash);
    let members = mesh.all_members();
    let roles: HashMap<&str, &str> = members
        .iter()
        .map(|(k, m)| (k.as_str(), m.role.as_str()))
        .collect();
    let online: HashSet<String> = entries.iter().map(|p| p.member_pubkey.clone()).collect();
    let mut cands: Vec<Candidate> = Vec::with_capacity(entries.len() + members.len());
    for p in entries {
        cands.push(Candidate {
            member_pubkey: p.member_pubkey.clone(),
            name: p.display_name.clone(),
            member_role: roles
                .get(p.member_pubkey.as_str())
                .map(|r| (*r).to_owned())
                .unwrap_or_default(),
            home: p.broker.clone(),
            live: Some(p),
        });
    }
    for (pk, m) in &members {
        if !m.revoked && !online.contains(pk) {
            cands.push(Candidate {
                live: None,
                member_pubkey: pk.clone(),
                name: m.display_name.clone(),
                member_role: m.role.clone(),
                home: m.home.as_deref().map(str::to_owned),
            });
        }
    }
    let texts: Vec<Vec<(Field, String)>> = cands.iter().map(|c| c.fields(&skills)).collect();
    let index = Index::build(
        texts
            .iter()
            .map(|fields| fields.iter().map(|(f, t)| (*f, t.as_str())).collect()),
    );
    let built = Arc::new(Built { key, cands, index });
    let mut cache = crate::hub::lock(&ctx.search);
    if cache.0.len() >= CACHED_MESHES && !cache.0.contains_key(&mesh.row.id) {
        cache.0.clear();
    }
    cache.0.insert(mesh.row.id.clone(), built.clone());
    Ok(built)
}

/// Runs `req` over the peers whose keys are in `visible` (what the caller sees) and the
/// mesh's members who are not connected.
pub(crate) async fn search(
    ctx: &Ctx,
    mesh: &MeshHub,
    visible: &HashSet<String>,
    req: &Request,
) -> Result<(Vec<Hit>, usize), StoreError> {
    let built = index_of(ctx, mesh).await?;
    let me = ctx.config.federation.as_ref().map(|f| f.broker.as_str());
    let sees = |c: &Candidate| c.live.as_ref().is_none_or(|p| visible.contains(&p.pubkey));
    let searched = built.cands.iter().filter(|c| sees(c)).count();
    if req.query.is_empty() {
        let mut kept: Vec<&Candidate> = built
            .cands
            .iter()
            .filter(|c| sees(c) && c.keeps(&req.filters, me))
            .collect();
        kept.sort_by(|a, b| (a.live.is_none(), &a.name).cmp(&(b.live.is_none(), &b.name)));
        let hits = kept
            .into_iter()
            .take(req.limit)
            .map(|c| c.hit(0.0, Vec::new()))
            .collect();
        return Ok((hits, searched));
    }
    let hits = built
        .index
        .search(
            &req.query,
            |d| sees(&built.cands[d]) && built.cands[d].keeps(&req.filters, me),
            req.limit,
        )
        .into_iter()
        .map(|h| {
            let why = h
                .why
                .into_iter()
                .map(|w| Why {
                    term: w.term,
                    field: w.field.as_str(),
                    word: w.word,
                    how: w.how.as_str(),
                })
                .collect();
            built.cands[h.doc].hit(h.score, why)
        })
        .collect();
    Ok((hits, searched))
}

impl Session {
    /// `search_peers`: over what this connection sees (its visibility and radius).
    pub(crate) fn on_search_peers(&mut self, req: Request, req_id: Option<String>) {
        let ctx = self.ctx.clone();
        let mesh = self.mesh.clone();
        let visible = self.mesh.visible_keys(&self.member_pubkey, self.conn);
        self.reply_later(async move {
            match search(&ctx, &mesh, &visible, &req).await {
                Ok((results, searched)) => Some(
                    serde_json::to_string(&Reply {
                        results,
                        searched,
                        req_id,
                    })
                    .unwrap_or_default()
                    .into(),
                ),
                Err(e) => store_unavailable("search_peers", req_id, &e),
            }
        });
    }
}

/// The built-in MCP tool: `args` as the frame's body; the answer's JSON.
pub(crate) async fn tool(
    ctx: &Ctx,
    mesh: &MeshHub,
    viewer: (&str, crate::hub::ConnId),
    args: &str,
) -> Result<serde_json::Value, String> {
    let req =
        meshd_protocol::search::decode(args).map_err(|e| format!("invalid arguments: {e}"))?;
    let visible = mesh.visible_keys(viewer.0, viewer.1);
    let (results, searched) = search(ctx, mesh, &visible, &req)
        .await
        .map_err(|e| format!("the broker's store is unavailable: {e}"))?;
    Ok(serde_json::json!({"results": results, "searched": searched}))
}

/// `GET /api/v1/peers/search?q=…&group=&role=&status=&broker=&peerType=&online=&limit=`:
/// what the key's member would see with no position.
pub(crate) async fn rest(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    use meshd_protocol::apikeys::Capability;
    let c = match crate::api::caller(&ctx, &headers, uri.path(), Some(Capability::Read)).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let mut filters = serde_json::Map::new();
    for (param, key) in [
        ("group", "group"),
        ("role", "role"),
        ("status", "status"),
        ("broker", "broker"),
        ("peerType", "peerType"),
    ] {
        if let Some(v) = q.get(param) {
            filters.insert(key.into(), v.clone().into());
        }
    }
    if let Some(v) = q.get("online") {
        match v.as_str() {
            "true" => filters.insert("online".into(), true.into()),
            "false" => filters.insert("online".into(), false.into()),
            _ => return crate::api::invalid(uri.path(), "online must be true or false"),
        };
    }
    let mut body =
        serde_json::json!({"query": q.get("q").cloned().unwrap_or_default(), "filters": filters});
    if let Some(l) = q.get("limit") {
        match l.parse::<u64>() {
            Ok(n) => body["limit"] = n.into(),
            Err(_) => return crate::api::invalid(uri.path(), "limit must be a number"),
        }
    }
    let req = match meshd_protocol::search::decode(&body.to_string()) {
        Ok(r) => r,
        Err(e) => return crate::api::invalid(uri.path(), &e.to_string()),
    };
    // As `GET /peers`: no connection, so no position and no hidden peer of its own.
    let visible = c.mesh.visible_keys("", 0);
    match search(&ctx, &c.mesh, &visible, &req).await {
        Ok((results, searched)) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({"results": results, "searched": searched})),
        )
            .into_response(),
        Err(e) => crate::api::store_failed(uri.path(), &e),
    }
}
