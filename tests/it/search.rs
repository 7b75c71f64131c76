//! `search_peers` (`features::search`): ranked, typo-tolerant, filtered search over the
//! peers a caller can see, by frame, REST and the broker's built-in MCP tool; across
//! brokers; and its ranking quality on a labelled set (`tests/data/search-labelled.json`).

use meshd_protocol::invite::Role;
use meshd_tests::{Backend, Client, HelloOpts, TestBroker};
use serde_json::{Value, json};

use meshd_tests::labelled::{Peer as Labelled, Query};

fn labelled_set() -> anyhow::Result<(Vec<Labelled>, Vec<Query>)> {
    meshd_tests::labelled::load()
}

/// Connects `p` to `broker` with its groups, summary and profile.
async fn connect_labelled(
    broker: &TestBroker,
    mesh: &meshd::admin::MeshCreated,
    p: &Labelled,
) -> anyhow::Result<Client> {
    let m = broker.enroll(mesh, &p.name).await?;
    let opts = HelloOpts {
        groups: p.groups.iter().map(|g| (g.clone(), None)).collect(),
        peer_type: Some(p.peer_type.clone().unwrap_or_else(|| "ai".into())),
        ..HelloOpts::default()
    };
    let mut c = Client::connect(&broker.ws_url(), &m, opts).await?;
    c.send(json!({"type": "set_summary", "summary": p.summary}))
        .await?;
    let r = c
        .request(json!({"type": "set_profile", "title": p.title, "capabilities": p.capabilities}))
        .await?;
    anyhow::ensure!(r["type"] != "error", "{r}");
    Ok(c)
}

fn names(v: &Value) -> Vec<String> {
    v["results"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["displayName"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Precision at 5 over the labelled set, from `asker`: (standard P@5, P@5 over
/// min(5, relevant)).
async fn precision_at_5(
    asker: &mut Client,
    queries: &[Query],
) -> anyhow::Result<(f64, f64, Vec<String>)> {
    let (mut p5, mut norm) = (0.0, 0.0);
    let mut misses = Vec::new();
    for q in queries {
        let v = asker
            .request(json!({"type": "search_peers", "query": q.query, "limit": 5}))
            .await?;
        anyhow::ensure!(v["type"] == "search_peers_result", "{v}");
        let got = names(&v);
        let hits = got.iter().filter(|n| q.relevant.contains(n)).count();
        p5 += hits as f64 / 5.0;
        norm += hits as f64 / q.relevant.len().min(5) as f64;
        if hits < q.relevant.len().min(5) {
            misses.push(format!(
                "{:?}: got {got:?}, relevant {:?}",
                q.query, q.relevant
            ));
        }
    }
    let n = queries.len() as f64;
    Ok((p5 / n, norm / n, misses))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranking_quality_on_the_labelled_set() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("org").await?;
    let (peers, queries) = labelled_set()?;
    let mut clients = Vec::new();
    for p in &peers {
        clients.push(connect_labelled(&broker, &mesh, p).await?);
    }
    let asker = broker.enroll(&mesh, "asker").await?;
    let mut asker = broker.connect(&asker).await?;
    let (p5, norm, misses) = precision_at_5(&mut asker, &queries).await?;
    println!("precision@5 {p5:.3}, over min(5, relevant) {norm:.3}; misses: {misses:#?}");
    // The floor this ranking reached when the set was written; a change that ranks worse
    // fails here (the README reports the exact figure).
    assert!(norm >= 0.9, "P@5/min(5,|rel|) = {norm:.3}: {misses:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_by_frame_rest_and_mcp_with_filters_and_reasons() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("search").await?;
    let (peers, _) = labelled_set()?;
    let pick = |n: &str| peers.iter().find(|p| p.name == n).expect("in the set");
    let mut bob = connect_labelled(&broker, &mesh, pick("bob")).await?;
    let _carol = connect_labelled(&broker, &mesh, pick("carol")).await?;
    let _dave = connect_labelled(&broker, &mesh, pick("dave")).await?;
    let _ada = connect_labelled(&broker, &mesh, pick("ada")).await?;
    // Hidden: found by nobody else.
    let mut ghost = connect_labelled(&broker, &mesh, pick("igor")).await?;
    ghost
        .send(json!({"type": "set_visible", "visible": false}))
        .await?;
    ghost.sync().await?;
    // A member who is not connected, and a skill carol shared.
    broker.enroll(&mesh, "eve").await?;
    let asker_m = broker.enroll_as(&mesh, "asker", Role::Admin).await?;
    let mut asker = broker.connect(&asker_m).await?;
    let skill = bob
        .request(json!({"type": "share_skill", "name": "k8s-rollout", "description": "kubernetes rollout runbook", "instructions": "…"}))
        .await?;
    assert!(skill["error"].is_null(), "{skill}");

    let search = |q: Value| {
        let mut f = json!({"type": "search_peers"});
        f.as_object_mut()
            .expect("object")
            .extend(q.as_object().cloned().unwrap_or_default());
        f
    };
    let v = asker.request(search(json!({"query": "postgres"}))).await?;
    assert_eq!(names(&v), ["bob"], "the hidden igor is not found: {v}");
    let top = &v["results"][0];
    assert_eq!(top["online"], true);
    assert_eq!(top["pubkey"], json!(bob.key()));
    assert_eq!(top["why"][0]["match"], "exact", "{top}");
    // A typo, and the reason says so.
    let v = asker.request(search(json!({"query": "postgras"}))).await?;
    assert_eq!(names(&v), ["bob"], "{v}");
    assert_eq!(v["results"][0]["why"][0]["match"], "typo", "{v}");
    // Skills count: bob shared the kubernetes runbook.
    let v = asker
        .request(search(json!({"query": "kubernetes"})))
        .await?;
    assert_eq!(names(&v), ["bob"], "{v}");
    assert_eq!(v["results"][0]["why"][0]["field"], "skills", "{v}");
    // Filters: peer type, group alone, online.
    let v = asker
        .request(search(
            json!({"query": "design review", "filters": {"peerType": "human"}}),
        ))
        .await?;
    assert_eq!(names(&v), ["dave"], "{v}");
    let v = asker
        .request(search(json!({"filters": {"group": "@infra"}})))
        .await?;
    assert_eq!(names(&v), ["carol"], "{v}");
    let v = asker.request(search(json!({"query": "eve"}))).await?;
    assert_eq!(names(&v), ["eve"], "{v}");
    assert_eq!(
        (
            v["results"][0]["online"].as_bool(),
            v["results"][0].get("pubkey")
        ),
        (Some(false), None),
        "{v}"
    );
    let v = asker
        .request(search(json!({"query": "eve", "filters": {"online": true}})))
        .await?;
    assert!(names(&v).is_empty(), "{v}");
    // Bad input is refused with a clear error.
    for bad in [
        json!({}),
        json!({"query": "x", "limit": 99}),
        json!({"query": "x", "filters": {"colour": "red"}}),
    ] {
        let v = asker.request(search(bad.clone())).await?;
        assert_eq!(v["type"], "error", "{bad} → {v}");
    }

    // REST, with an API key acting as the asker.
    let key = asker
        .request(json!({"type": "apikey_create", "label": "search", "capabilities": ["read"]}))
        .await?;
    let secret = key["secret"].as_str().expect("secret").to_owned();
    let auth = format!("Bearer {secret}");
    let get = |path: &'static str| {
        let auth = auth.clone();
        async move {
            let (status, _, body) =
                meshd_tests::http_with(broker.addr, "GET", path, &[("authorization", &auth)], None)
                    .await?;
            anyhow::Ok((status, serde_json::from_slice::<Value>(&body)?))
        }
    };
    let (status, body) = get("/api/v1/peers/search?q=quic&limit=3").await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(names(&body), ["carol"], "{body}");
    let (status, body) = get("/api/v1/peers/search?q=x&online=maybe").await?;
    assert_eq!(status, 422, "{body}");

    // The broker's built-in MCP server: listed, callable, its name reserved.
    let list = asker.request(json!({"type": "mcp_list"})).await?;
    let meshd = list["servers"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "meshd"))
        .cloned()
        .expect("the meshd server is listed");
    assert!(
        meshd["tools"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["name"] == "search_peers"))
    );
    let call = asker
        .request(json!({"type": "mcp_call", "serverName": "meshd", "toolName": "search_peers", "args": {"query": "typescript"}}))
        .await?;
    assert_eq!(call["type"], "mcp_call_result", "{call}");
    assert_eq!(names(&call["result"]), ["ada"], "{call}");
    let call = asker
        .request(json!({"type": "mcp_call", "serverName": "meshd", "toolName": "nope", "args": {}}))
        .await?;
    assert!(
        call["error"]
            .as_str()
            .is_some_and(|e| e.contains("no tool")),
        "{call}"
    );
    let taken = bob
        .request(json!({"type": "mcp_register", "serverName": "meshd", "description": "mine", "tools": []}))
        .await?;
    assert_eq!(taken["code"], "mcp_name_taken", "{taken}");
    Ok(())
}

/// A search at A finds a peer connected at B, named with its broker, and filters by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_sees_peers_on_other_brokers() -> anyhow::Result<()> {
    use crate::federation::{B, broker_of, linked_pair, member_client};
    let mut p = linked_pair(|_| {}, Backend::Sqlite).await?;
    let mut bob = member_client(&p.b.ws_url(), &p.bob, &["infra"]).await?;
    bob.send(json!({"type": "set_summary", "summary": "terraform modules for staging"}))
        .await?;
    bob.sync().await?;
    let bob_key = p.bob.keys.public_hex();
    p.alice
        .until_peers("bob's summary at A", |v| {
            broker_of(v, &bob_key).is_some()
                && v["peers"].as_array().is_some_and(|a| {
                    a.iter()
                        .any(|x| x["summary"] == "terraform modules for staging")
                })
        })
        .await?;
    let v = p
        .alice
        .request(json!({"type": "search_peers", "query": "terraform"}))
        .await?;
    assert_eq!(names(&v), ["bob"], "{v}");
    assert_eq!(v["results"][0]["broker"], B, "{v}");
    let v = p
        .alice
        .request(
            json!({"type": "search_peers", "query": "terraform", "filters": {"broker": "local"}}),
        )
        .await?;
    assert!(names(&v).is_empty(), "{v}");
    let v = p
        .alice
        .request(json!({"type": "search_peers", "filters": {"broker": B, "group": "infra"}}))
        .await?;
    assert_eq!(names(&v), ["bob"], "{v}");
    Ok(())
}

/// A positioned searcher finds only the peers within its radius (and unpositioned
/// ones), and its answer follows them as they move — the index is kept between queries,
/// the visibility is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_respects_the_spatial_radius() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("space").await?;
    let (peers, _) = labelled_set()?;
    let pick = |n: &str| peers.iter().find(|p| p.name == n).expect("in the set");
    let mut near = connect_labelled(&broker, &mesh, pick("bob")).await?;
    let mut far = connect_labelled(&broker, &mesh, pick("igor")).await?;
    let me = broker.enroll(&mesh, "seeker").await?;
    let mut me = broker.connect(&me).await?;
    let place =
        |x: f64, y: f64, r: f64| json!({"type": "set_position", "x": x, "y": y, "radius": r});
    for (c, f) in [
        (&mut me, place(0.0, 0.0, 10.0)),
        (&mut near, place(3.0, 4.0, 1.0)),
        (&mut far, place(100.0, 0.0, 1.0)),
    ] {
        let v = c.request(f).await?;
        assert_eq!(v["type"], "position", "{v}");
    }
    let q = json!({"type": "search_peers", "query": "postgres"});
    let v = me.request(q.clone()).await?;
    assert_eq!(names(&v), ["bob"], "igor is out of range: {v}");
    far.request(place(6.0, 8.0, 1.0)).await?;
    let v = me.request(q.clone()).await?;
    let mut got = names(&v);
    got.sort();
    assert_eq!(got, ["bob", "igor"], "igor moved within range: {v}");
    me.request(json!({"type": "clear_position"})).await?;
    far.request(place(500.0, 0.0, 1.0)).await?;
    let v = me.request(q).await?;
    assert_eq!(
        names(&v).len(),
        2,
        "unpositioned, the seeker sees everyone: {v}"
    );
    Ok(())
}

/// The kept index follows every change a search can see: a summary, a group, a skill,
/// a member who connects or leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_follows_changes() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("moving").await?;
    let (p, q) = (
        broker.enroll(&mesh, "pat").await?,
        broker.enroll(&mesh, "quinn").await?,
    );
    let mut pat = broker.connect(&p).await?;
    let mut quinn = broker.connect(&q).await?;
    let find = |query: &str| json!({"type": "search_peers", "query": query});
    pat.send(json!({"type": "set_summary", "summary": "migrating kafka"}))
        .await?;
    pat.sync().await?;
    assert_eq!(names(&quinn.request(find("kafka")).await?), ["pat"]);
    pat.send(json!({"type": "set_summary", "summary": "reviewing terraform"}))
        .await?;
    pat.sync().await?;
    assert!(names(&quinn.request(find("kafka")).await?).is_empty());
    assert_eq!(names(&quinn.request(find("terraform")).await?), ["pat"]);
    pat.send(json!({"type": "join_group", "name": "sre"}))
        .await?;
    pat.sync().await?;
    let v = quinn
        .request(json!({"type": "search_peers", "filters": {"group": "sre"}}))
        .await?;
    assert_eq!(names(&v), ["pat"], "{v}");
    let k = quinn
        .request(json!({"type": "share_skill", "name": "pager", "description": "incident paging runbook", "instructions": "…"}))
        .await?;
    assert!(k["error"].is_null(), "{k}");
    assert_eq!(names(&quinn.request(find("paging")).await?), ["quinn"]);
    // Pat leaves: still found, as a member not connected.
    pat.close().await;
    let v = quinn
        .poll("pat offline", find("pat"), |v| {
            v["results"][0]["online"] == false
        })
        .await?;
    assert_eq!(names(&v), ["pat"], "{v}");
    Ok(())
}
