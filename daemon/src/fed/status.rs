//! `/federation` and `meshd federation status`: each link's state and counters.

use super::*;

impl Fed {
    /// `GET /federation`.
    pub(crate) fn status_json(&self) -> serde_json::Value {
        let links = self.manager().map(|m| m.status()).unwrap_or_default();
        let refusals = self.manager().map(|m| m.refusals()).unwrap_or_default();
        let live = lock(&self.links).clone();
        let consent = lock(&self.consent).clone();
        let links: Vec<serde_json::Value> = links
            .into_iter()
            .map(|st| {
                let c = &st.counters;
                let mut meshes: Vec<String> = live
                    .get(&st.name)
                    .map(|l| lock(&l.flowing).iter().cloned().collect())
                    .unwrap_or_default();
                meshes.sort();
                let held = live.get(&st.name).map_or(0, |l| lock(&l.held).frames.len());
                serde_json::json!({
                    "peer": st.name,
                    "state": st.state.as_str(),
                    "linkId": st.link_id,
                    "servedLinkId": live.get(&st.name).map(|l| l.id),
                    "since": meshd_protocol::time::iso8601_ms(st.since_ms),
                    "addr": st.addr.map(|a| a.to_string()),
                    "dialer": st.dialer,
                    "rttMs": st.rtt.map(|d| d.as_secs_f64() * 1000.0),
                    "connects": st.connects,
                    "queued": c.queued.load(Ordering::Relaxed),
                    "sent": c.sent.load(Ordering::Relaxed),
                    "resent": c.resent.load(Ordering::Relaxed),
                    "received": c.received.load(Ordering::Relaxed),
                    "rejected": c.rejected.load(Ordering::Relaxed),
                    "refused": c.refused.load(Ordering::Relaxed),
                    "policyRefused": self.policy_counts(&st.name),
                    "held": held,
                    "lastError": st.last_error,
                    "meshes": meshes,
                })
            })
            .collect();
        let mut shares: Vec<serde_json::Value> = consent
            .shares
            .iter()
            .map(|((m, p), r)| serde_json::json!({"meshId": m, "peer": p, "role": r.as_str()}))
            .collect();
        shares.sort_by_key(|v| v.to_string());
        let mut policies: Vec<serde_json::Value> = lock(&self.policies)
            .iter()
            .flat_map(|(mesh, by)| {
                by.iter().map(move |(broker, p)| {
                    serde_json::json!({
                        "meshId": mesh,
                        "peer": broker,
                        "export": p.export,
                        "import": p.import,
                    })
                })
            })
            .collect();
        policies.sort_by_key(|v| v.to_string());
        serde_json::json!({
            "broker": &*self.me,
            "policies": policies,
            "quic": self.local_addr().map(|a| a.to_string()),
            "links": links,
            "shares": shares,
            "refusedHandshakes": refusals,
        })
    }
}

impl Fed {
    /// Each peer broker as one mesh sees it: this broker's consent, the link's state,
    /// whether the mesh flows over it (the dashboard's links and the admin page's shares).
    pub(crate) fn mesh_links(&self, mesh_id: &str) -> Vec<meshd_protocol::shares::PeerShare> {
        let links = self.manager().map(|m| m.status()).unwrap_or_default();
        let live = lock(&self.links).clone();
        let consent = lock(&self.consent).clone();
        let mut out: Vec<meshd_protocol::shares::PeerShare> = links
            .into_iter()
            .map(|st| {
                let role = match consent.shares.get(&(mesh_id.to_owned(), st.name.clone())) {
                    Some(r) => Some(r.as_str()),
                    None => consent
                        .replicas
                        .get(mesh_id)
                        .is_some_and(|(home, roster)| *home != st.name && roster.contains(&st.name))
                        .then_some("roster"),
                };
                meshd_protocol::shares::PeerShare {
                    flowing: live
                        .get(&st.name)
                        .is_some_and(|l| lock(&l.flowing).contains(mesh_id)),
                    role,
                    link: st.state.as_str().to_owned(),
                    rtt_ms: st.rtt.map(|d| d.as_secs_f64() * 1000.0),
                    broker: st.name,
                }
            })
            .collect();
        out.sort_by(|a, b| a.broker.cmp(&b.broker));
        out
    }

    /// Whether this broker is `mesh_id`'s home (not a replica of a peer's mesh).
    pub(crate) fn is_home(&self, mesh_id: &str) -> bool {
        !lock(&self.consent).replicas.contains_key(mesh_id)
    }
}
