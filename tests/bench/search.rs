//! `meshd-bench search`: `search_peers` latency and ranking quality as a mesh grows. For
//! each size N, a fresh broker gets the 40 peers of the labelled set
//! (`tests/data/search-labelled.json`) plus N − 40 distractors whose profiles are drawn
//! from a vocabulary the queries do not use; one asker then runs the labelled queries
//! over and over, timing each `search_peers` round trip, and scores the first pass
//! (precision at 5).

use super::*;

/// Words no labelled query contains: the distractors' profiles.
const FILLER: &[&str] = &[
    "meeting",
    "notes",
    "lunch",
    "travel",
    "budget",
    "report",
    "quarterly",
    "offsite",
    "coffee",
    "calendar",
    "agenda",
    "slides",
    "vendor",
    "invoice",
    "contract",
    "renewal",
    "office",
    "parking",
    "badge",
    "laptop",
    "monitor",
    "chair",
    "desk",
    "printer",
    "onboarding",
    "training",
    "workshop",
    "webinar",
    "newsletter",
    "survey",
    "feedback",
    "retro",
    "standup",
    "sprint",
    "backlog",
    "ticket",
    "estimate",
    "deadline",
    "milestone",
    "launch",
    "campaign",
    "brand",
    "copy",
    "translation",
    "german",
    "french",
    "spanish",
    "japanese",
    "podcast",
    "video",
    "photo",
    "camera",
    "audio",
    "music",
    "garden",
    "kitchen",
    "bicycle",
    "marathon",
    "chess",
    "puzzle",
    "novel",
    "poetry",
    "history",
    "geography",
    "astronomy",
    "botany",
];
const TEAMS: &[&str] = &[
    "sales",
    "marketing",
    "finance",
    "people",
    "facilities",
    "events",
    "partners",
    "growth",
];

impl Bench {
    pub(crate) async fn search(&self, sizes: &[usize], rounds: usize) -> anyhow::Result<()> {
        let (peers, queries) = meshd_tests::labelled::load()?;
        for &n in sizes {
            let n = n.max(peers.len());
            let broker = self.start().await?;
            let members = broker.enroll(n + 1).await?;
            let t = Instant::now();
            let mut drains = Vec::with_capacity(n);
            let mut seed = u64::from(rand_u32()) | 1;
            let mut pick = |len: usize| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                usize::try_from(seed % len as u64).unwrap_or(0)
            };
            for (i, m) in members.iter().take(n).enumerate() {
                let (name, groups, summary, title, caps, peer_type) = match peers.get(i) {
                    Some(p) => (
                        p.name.clone(),
                        p.groups.clone(),
                        p.summary.clone(),
                        p.title.clone(),
                        p.capabilities.clone(),
                        p.peer_type.clone(),
                    ),
                    None => {
                        let words = |k: usize, pick: &mut dyn FnMut(usize) -> usize| {
                            (0..k)
                                .map(|_| FILLER[pick(FILLER.len())])
                                .collect::<Vec<_>>()
                        };
                        (
                            format!("peer{i}"),
                            vec![TEAMS[pick(TEAMS.len())].to_owned()],
                            words(6, &mut pick).join(" "),
                            words(2, &mut pick).join(" "),
                            words(3, &mut pick).into_iter().map(str::to_owned).collect(),
                            None,
                        )
                    }
                };
                let opts = HelloOpts {
                    display_name: Some(name),
                    groups: groups.into_iter().map(|g| (g, None)).collect(),
                    peer_type: Some(peer_type.unwrap_or_else(|| "ai".into())),
                    ..HelloOpts::default()
                };
                let mut c = Conn::connect_with(&broker, m, opts).await?;
                c.send_raw(&json!({"type": "set_summary", "summary": summary}).to_string())
                    .await?;
                c.send_raw(
                    &json!({"type": "set_profile", "title": title, "capabilities": caps})
                        .to_string(),
                )
                .await?;
                let (_sink, mut stream) = c.ws.split();
                drains.push(tokio::spawn(async move {
                    let _keep = _sink;
                    while stream.next().await.is_some() {}
                }));
            }
            let asker = &members[n];
            let mut asker =
                meshd_tests::Client::connect(&broker.proc.ws_url(), asker, HelloOpts::default())
                    .await?;
            // Every profile is in before the clock starts.
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let v = asker
                    .request(
                        json!({"type": "search_peers", "filters": {"online": true}, "limit": 1}),
                    )
                    .await?;
                if v["searched"].as_u64() >= Some(n as u64 + 1) {
                    let probe = asker
                        .request(
                            json!({"type": "search_peers", "query": peers[peers.len() - 1].title}),
                        )
                        .await?;
                    if probe["results"].as_array().is_some_and(|a| !a.is_empty()) {
                        break;
                    }
                }
                anyhow::ensure!(Instant::now() < deadline, "profiles never arrived: {v}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            println!(
                "search {n:>6} peers connected with profiles in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            let mut samples = Samples::with_capacity(rounds * queries.len());
            let (mut p5, mut norm) = (0.0, 0.0);
            for round in 0..rounds {
                for q in &queries {
                    let t = Instant::now();
                    let v = asker
                        .request(json!({"type": "search_peers", "query": q.query, "limit": 5}))
                        .await?;
                    samples.push(t.elapsed());
                    anyhow::ensure!(v["type"] == "search_peers_result", "{v}");
                    if round == 0 {
                        let hits = v["results"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .filter(|r| {
                                        r["displayName"]
                                            .as_str()
                                            .is_some_and(|n| q.relevant.iter().any(|x| x == n))
                                    })
                                    .count()
                            })
                            .unwrap_or(0);
                        p5 += hits as f64 / 5.0;
                        norm += hits as f64 / q.relevant.len().min(5) as f64;
                    }
                }
            }
            let nq = queries.len() as f64;
            println!(
                "search {n:>6} peers: {} queries, latency p50 {:.0} µs, p99 {:.0} µs; precision@5 {:.3} (over min(5, relevant): {:.3})",
                samples.len(),
                samples.percentile_us(50.0),
                samples.percentile_us(99.0),
                p5 / nq,
                norm / nq,
            );
            for d in drains {
                d.abort();
            }
        }
        Ok(())
    }
}
