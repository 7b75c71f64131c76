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
