//! Consent: which meshes this broker exchanges with which peer broker (shares,
//! accepted offers, replicas and their rosters), and adopting a home's offer as a replica.

use super::*;

/// Stored consent, cached.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Consent {
    /// (mesh, peer broker) → our role.
    pub(crate) shares: HashMap<(String, String), ShareRole>,
    /// Replicas: mesh → (home, roster).
    pub(crate) replicas: HashMap<String, (String, Vec<String>)>,
}

impl Consent {
    /// Whether this broker consents to exchange `mesh` with `broker`.
    pub(crate) fn local_ready(&self, mesh: &str, broker: &str) -> bool {
        match self.shares.get(&(mesh.to_owned(), broker.to_owned())) {
            Some(ShareRole::Offer) => true,
            // Accepted, and the home's offer has arrived (the replica exists).
            Some(ShareRole::Accept) => self.replicas.get(mesh).is_some_and(|(h, _)| h == broker),
            None => self.replicas.get(mesh).is_some_and(|(home, roster)| {
                self.shares
                    .get(&(mesh.to_owned(), home.clone()))
                    .is_some_and(|r| *r == ShareRole::Accept)
                    && roster.iter().any(|b| b == broker)
            }),
        }
    }

    /// Meshes this broker consents to exchange with `broker`.
    pub(crate) fn ready_for(&self, broker: &str) -> HashSet<String> {
        let mut meshes: HashSet<String> = self.shares.keys().map(|(m, _)| m.clone()).collect();
        meshes.extend(self.replicas.keys().cloned());
        meshes.retain(|m| self.local_ready(m, broker));
        meshes
    }

    /// The roster a home announces: itself and every broker it shares the mesh with.
    pub(crate) fn roster(&self, me: &str, mesh: &str) -> Vec<String> {
        let mut r: Vec<String> = std::iter::once(me.to_owned())
            .chain(
                self.shares
                    .iter()
                    .filter(|((m, _), role)| m == mesh && **role == ShareRole::Offer)
                    .map(|((_, p), _)| p.clone()),
            )
            .collect();
        r.sort();
        r
    }
}

pub(crate) async fn replica_row(
    ctx: &Ctx,
    offer: &MeshOffer,
) -> Result<MeshRow, crate::admin::AdminError> {
    if let Some(row) = ctx.db.mesh_by_id(&offer.mesh_id).await? {
        return Ok(row);
    }
    crate::admin::replica_mesh_row(ctx, &offer.mesh_id, &offer.name, &offer.slug).await
}

impl Fed {
    /// Re-reads stored consent; `true` when it changed. Also called once before the
    /// daemon serves, so the first sends already see it.
    pub(crate) async fn reload_consent(&self, ctx: &Ctx) -> Result<bool, StoreError> {
        let mut next = Consent::default();
        for s in ctx.db.shares().await? {
            next.shares.insert((s.mesh_id, s.broker), s.role);
        }
        for r in ctx.db.replicas().await? {
            let roster: Vec<String> = serde_json::from_str(&r.roster).unwrap_or_default();
            next.replicas.insert(r.mesh_id, (r.home_broker, roster));
        }
        let changes: Vec<(&'static str, String, String, ShareRole)> = {
            let mut cur = lock(&self.consent);
            if *cur == next {
                return Ok(false);
            }
            let added = next
                .shares
                .iter()
                .filter(|(k, _)| !cur.shares.contains_key(*k))
                .map(|((m, p), r)| ("mesh_shared", m.clone(), p.clone(), *r));
            let removed = cur
                .shares
                .iter()
                .filter(|(k, _)| !next.shares.contains_key(*k))
                .map(|((m, p), r)| ("mesh_unshared", m.clone(), p.clone(), *r));
            let changes = added.chain(removed).collect();
            *cur = next;
            changes
        };
        for (event, mesh, broker, role) in changes {
            ctx.audit.record(
                &mesh,
                event,
                None,
                "system",
                serde_json::json!({"peer": broker, "role": role.as_str()}),
            );
        }
        Ok(true)
    }

    /// Offers received before the local admin accepted them.
    pub(crate) async fn apply_pending_offers(&self, ctx: &Arc<Ctx>) {
        let offers: Vec<((String, String), MeshOffer)> = lock(&self.offers)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for ((_, broker), offer) in offers {
            let accepted = lock(&self.consent)
                .shares
                .get(&(offer.mesh_id.clone(), broker.clone()))
                .is_some_and(|r| *r == ShareRole::Accept);
            if accepted {
                self.adopt_offer(ctx, &broker, &offer).await;
            }
        }
    }

    /// Creates or updates the replica described by an accepted offer. One at a time:
    /// the link that receives an offer and the reconcile loop that sees its acceptance
    /// may both adopt it at once.
    pub(crate) async fn adopt_offer(&self, ctx: &Arc<Ctx>, home: &str, offer: &MeshOffer) {
        let _one = self.adopting.lock().await;
        let roster = serde_json::to_string(&offer.roster).unwrap_or_else(|_| "[]".into());
        let known = lock(&self.consent)
            .replicas
            .get(&offer.mesh_id)
            .is_some_and(|(h, r)| h == home && *r == offer.roster);
        if known {
            return;
        }
        let row = match replica_row(ctx, offer).await {
            Ok(r) => r,
            Err(e) => {
                warn!(mesh.id = %offer.mesh_id, cause = %e, "creating a replica");
                return;
            }
        };
        if let Err(e) = ctx.db.upsert_replica(&row, home, &roster).await {
            warn!(mesh.id = %offer.mesh_id, cause = %e, "storing a replica");
            return;
        }
        info!(mesh.id = %offer.mesh_id, slug = %row.slug, home, "replica of a shared mesh ready");
        if let Err(e) = self.reload_consent(ctx).await {
            warn!(cause = %e, "reloading federation consent");
        }
        let links: Vec<Arc<LinkShared>> = lock(&self.links).values().cloned().collect();
        for l in links {
            self.reconcile_link(ctx, &l).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consent(shares: &[(&str, &str, ShareRole)], replicas: &[(&str, &str, &[&str])]) -> Consent {
        Consent {
            shares: shares
                .iter()
                .map(|(m, p, r)| (((*m).to_owned(), (*p).to_owned()), *r))
                .collect(),
            replicas: replicas
                .iter()
                .map(|(m, home, roster)| {
                    let roster = roster.iter().map(|b| (*b).to_owned()).collect();
                    ((*m).to_owned(), ((*home).to_owned(), roster))
                })
                .collect(),
        }
    }

    #[test]
    fn consent_follows_offer_accept_and_roster() {
        // The home offers: ready at once, for that broker only.
        let home = consent(&[("m", "b", ShareRole::Offer)], &[]);
        assert!(home.local_ready("m", "b") && !home.local_ready("m", "c"));
        assert_eq!(home.roster("a", "m"), ["a", "b"]);
        // Accepted before the home's offer arrived: not ready (no replica yet).
        let accepted = consent(&[("m", "a", ShareRole::Accept)], &[]);
        assert!(!accepted.local_ready("m", "a"));
        // The offer arrived (replica of home a): ready with a, and with a roster broker
        // only through the accepted home.
        let replica = consent(
            &[("m", "a", ShareRole::Accept)],
            &[("m", "a", &["a", "b", "c"])],
        );
        assert!(replica.local_ready("m", "a") && replica.local_ready("m", "c"));
        assert!(!replica.local_ready("m", "d"), "not on the roster");
        assert_eq!(
            replica.ready_for("c").into_iter().collect::<Vec<_>>(),
            ["m"]
        );
        // Withdrawn (the accept is gone): the replica alone consents to nothing.
        let withdrawn = consent(&[], &[("m", "a", &["a", "b", "c"])]);
        assert!(!withdrawn.local_ready("m", "a") && !withdrawn.local_ready("m", "c"));
        assert!(withdrawn.ready_for("a").is_empty());
        // An accept of a different home does not make another home's replica ready.
        let other = consent(&[("m", "x", ShareRole::Accept)], &[("m", "a", &["a", "c"])]);
        assert!(!other.local_ready("m", "x") && !other.local_ready("m", "c"));
    }
}
