//! Spatial visibility (meshd extension): `set_position` / `clear_position`, what a
//! positioned peer lists, hears and receives, and range events, here and across brokers.

use meshd_tests::{Backend, Client, TestBroker};
use serde_json::{Value, json};

/// Stands a client at `(x, y)` with `radius`.
async fn stand(c: &mut Client, x: f64, y: f64, radius: f64) -> anyhow::Result<()> {
    let v = c
        .request(json!({"type": "set_position", "x": x, "y": y, "radius": radius}))
        .await?;
    anyhow::ensure!(v["type"] == "position", "set_position: {v}");
    Ok(())
}

/// Display names in a `peers_list`, sorted.
fn names(peers: &Value) -> Vec<String> {
    let mut n: Vec<String> = peers["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["displayName"].as_str().map(str::to_owned))
        .collect();
    n.sort();
    n
}

/// Range events (`peer_in_range` / `peer_out_of_range`) already read, as (event, name).
fn range_events(c: &mut Client) -> Vec<(String, String)> {
    c.ws.drain_backlog(|v| {
        v["type"] == "push" && (v["event"] == "peer_in_range" || v["event"] == "peer_out_of_range")
    })
    .into_iter()
    .map(|v| {
        (
            v["event"].as_str().unwrap_or_default().to_owned(),
            v["eventData"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    })
    .collect()
}

fn ev(e: &str, n: &str) -> (String, String) {
    (e.to_owned(), n.to_owned())
}

/// A customer in a shop (radius 10) sees the rep beside it, not the one down the street
/// nor a peer standing nowhere; it gets multicasts only from peers it sees; moving
/// changes its view with range events on both sides; clearing its position restores the
/// whole mesh. Peers standing nowhere see and hear everyone, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_decide_what_a_peer_sees() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("store").await?;
    let mut c = Vec::new();
    for name in ["customer", "rep-near", "rep-far", "roamer"] {
        let m = broker.enroll(&mesh, name).await?;
        c.push(broker.connect(&m).await?);
    }
    let [customer, near, far, roamer] = &mut c[..] else {
        unreachable!()
    };
    stand(near, 5.0, 0.0, 100.0).await?;
    stand(far, 50.0, 0.0, 5.0).await?;
    stand(customer, 0.0, 0.0, 10.0).await?;
    let listed = customer.sync().await?;
    assert_eq!(names(&listed), ["customer", "rep-near"], "{listed}");
    let mine = listed["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["displayName"] == "rep-near")
        .unwrap();
    assert_eq!(
        mine["position"],
        json!({"x": 5.0, "y": 0.0, "radius": 100.0})
    );
    assert_eq!(
        names(&roamer.sync().await?),
        ["customer", "rep-far", "rep-near", "roamer"]
    );
    assert_eq!(
        names(&far.sync().await?),
        ["rep-far"],
        "rep-far sees 5 around it: nobody"
    );

    // Multicasts reach a positioned receiver only from senders it sees.
    far.multicast("*", "from far").await?;
    near.multicast("*", "from near").await?;
    roamer.multicast("*", "from nowhere").await?;
    assert_eq!(customer.expect_message().await?.1, "from near");
    for (cl, want) in [
        (&mut *near, vec!["from far"]),
        (&mut *roamer, vec!["from far", "from near"]),
    ] {
        let mut texts = Vec::new();
        for _ in 0..want.len() {
            texts.push(cl.expect_message().await?.1);
        }
        texts.sort();
        assert_eq!(texts, want);
    }
    for cl in [&mut *customer, &mut *near, &mut *far, &mut *roamer] {
        cl.expect_no_messages().await?;
    }
    // DMs are not spatial.
    let key = customer.key();
    far.dm(&key, "psst", "now").await?;
    assert_eq!(customer.expect_message().await?.1, "psst");

    // The customer walks down the street: it loses the near rep, finds the far one; the
    // far rep (radius 5) now sees the customer too.
    for cl in [&mut *customer, &mut *near, &mut *far, &mut *roamer] {
        cl.sync().await?;
        range_events(cl);
    }
    stand(customer, 48.0, 0.0, 10.0).await?;
    customer.sync().await?;
    let mut seen = range_events(customer);
    seen.sort();
    assert_eq!(
        seen,
        [
            ev("peer_in_range", "rep-far"),
            ev("peer_out_of_range", "rep-near")
        ]
    );
    far.sync().await?;
    assert_eq!(range_events(far), [ev("peer_in_range", "customer")]);
    for cl in [&mut *near, &mut *roamer] {
        cl.sync().await?;
        assert!(
            range_events(cl).is_empty(),
            "{} saw the customer all along",
            cl.member.display_name
        );
    }
    assert_eq!(names(&customer.sync().await?), ["customer", "rep-far"]);

    // A newcomer stands nowhere: the customer is not told it joined, the roamer is.
    customer.ws.drain_backlog(|v| v["event"] == "peer_joined");
    let late = broker.enroll(&mesh, "late").await?;
    let late = broker.connect(&late).await?;
    roamer.expect_event("peer_joined").await?;
    customer.sync().await?;
    let joined = customer.ws.drain_backlog(|v| v["event"] == "peer_joined");
    assert!(joined.is_empty(), "{joined:?}");

    // Standing nowhere again: everyone is in view.
    let v = customer.request(json!({"type": "clear_position"})).await?;
    assert_eq!(
        (v["type"].as_str(), &v["position"]),
        (Some("position"), &Value::Null)
    );
    customer.sync().await?;
    let mut back = range_events(customer);
    back.sort();
    assert_eq!(
        back,
        [
            ev("peer_in_range", "late"),
            ev("peer_in_range", "rep-near"),
            ev("peer_in_range", "roamer")
        ]
    );
    assert_eq!(
        names(&customer.sync().await?),
        ["customer", "late", "rep-far", "rep-near", "roamer"]
    );
    drop(late);
    Ok(())
}

/// Bad positions are refused with a clear error; moves are rate-limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_are_bounded_and_rate_limited() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("bounds").await?;
    let m = broker.enroll(&mesh, "walker").await?;
    let mut w = broker.connect(&m).await?;
    for bad in [
        json!({"type": "set_position", "x": 0, "y": 0, "radius": 0}),
        json!({"type": "set_position", "x": 0, "y": 0, "radius": -1}),
        json!({"type": "set_position", "x": 2e6, "y": 0, "radius": 1}),
        json!({"type": "set_position", "x": 0, "y": 0}),
        json!({"type": "set_position", "x": "north", "y": 0, "radius": 1}),
    ] {
        let e = w.request(bad.clone()).await?;
        assert_eq!(e["type"], "error", "{bad}: {e}");
    }
    let mut refused = 0;
    for i in 0..100 {
        let v = w
            .request(json!({"type": "set_position", "x": f64::from(i), "y": 0, "radius": 1}))
            .await?;
        if v["code"] == "rate_limited" {
            refused += 1;
        }
    }
    assert!(
        refused > 0 && refused < 100,
        "{refused} of 100 moves refused"
    );
    Ok(())
}

/// Across federated brokers.
mod across_brokers {
    use meshd_tests::{Backend, Client};
    use serde_json::json;

    use super::{ev, names, range_events, stand};
    use crate::federation::*;

    /// Moves of `c` driven by the simulation clock: one step per tick.
    async fn walk(c: &mut Client, steps: &[f64], radius: f64) -> anyhow::Result<()> {
        for x in steps {
            c.expect_event("tick").await?;
            stand(c, *x, 0.0, radius).await?;
        }
        Ok(())
    }

    /// Three brokers: a sales rep stands in a store zone at B, an observer at C, a
    /// customer at A walks through the zone, one step per simulation-clock tick. B and C
    /// see it enter and leave exactly once, at the right steps; out of range, the rep's
    /// broadcast does not reach the customer. Far away, small moves are not sent to B
    /// and C at all (interest management) and nothing is missed when the customer comes
    /// back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_walk_through_a_radius_across_brokers() -> anyhow::Result<()> {
        let t = Trio::start(Backend::Sqlite).await?;
        let [ma, mb, mc] = t.shared_mesh("mall").await?;
        let customer = t.a.enroll(&ma, "customer").await?;
        let rep = t.b.enroll(&mb, "rep").await?;
        let observer = t.c.enroll(&mc, "observer").await?;
        let mut customer = member_client(&t.a.ws_url(), &customer, &[]).await?;
        let mut rep = member_client(&t.b.ws_url(), &rep, &[]).await?;
        let mut observer = member_client(&t.c.ws_url(), &observer, &[]).await?;
        let ck = customer.key();
        stand(&mut customer, -30.0, 0.0, 15.0).await?;
        stand(&mut rep, 0.0, 0.0, 10.0).await?;
        stand(&mut observer, 0.0, 1.0, 10.0).await?;
        // Each knows the others are there, and who it sees: nobody sees the customer yet.
        for cl in [&mut rep, &mut observer] {
            cl.until_peers("the customer known, not seen", |v| names(v).len() == 2)
                .await?;
        }
        customer
            .until_peers("the others, out of view", |v| names(v) == ["customer"])
            .await?;
        for cl in [&mut customer, &mut rep, &mut observer] {
            cl.sync().await?;
            range_events(cl);
        }

        customer
            .request(json!({"type": "set_clock", "speed": 100}))
            .await?;
        walk(&mut customer, &[-20.0, -10.0, 0.0, 10.0, 20.0, 30.0], 15.0).await?;
        customer.request(json!({"type": "pause_clock"})).await?;
        // The rep (at 0,0, radius 10) sees it from -10 to 10 and loses it at 20; the
        // observer (at 0,1) only from 0 to 0 (10 is 10.05 away), losing it at 10.
        for (cl, enter_x, leave_x) in [(&mut rep, -10.0, 20.0), (&mut observer, 0.0, 10.0)] {
            let entered = cl.expect_event("peer_in_range").await?;
            let left = cl.expect_event("peer_out_of_range").await?;
            assert_eq!(
                (&entered["eventData"]["name"], &left["eventData"]["name"]),
                (&json!("customer"), &json!("customer"))
            );
            assert_eq!(
                (
                    entered["eventData"]["position"]["x"].as_f64(),
                    left["eventData"]["position"]["x"].as_f64()
                ),
                (Some(enter_x), Some(leave_x)),
                "{}: {entered} then {left}",
                cl.member.display_name
            );
            cl.sync().await?;
            let more = range_events(cl);
            assert!(
                more.is_empty(),
                "{}: exactly one entry and one exit: {more:?}",
                cl.member.display_name
            );
        }
        customer.sync().await?;
        let mut seen = range_events(&mut customer);
        assert_eq!(seen.len(), 4, "{seen:?}");
        seen.sort();
        assert_eq!(
            seen,
            [
                ev("peer_in_range", "observer"),
                ev("peer_in_range", "rep"),
                ev("peer_out_of_range", "observer"),
                ev("peer_out_of_range", "rep"),
            ]
        );

        // Out of range: the rep's broadcast reaches the observer, not the customer.
        rep.multicast("*", "sale in aisle 3").await?;
        assert_eq!(observer.expect_message().await?.1, "sale in aisle 3");
        customer.sync().await?;
        assert!(customer.pending_messages().is_empty());

        // Far away, small moves do not cross; coming back still enters.
        let suppressed = |text: String| {
            text.lines()
                .find_map(|l| l.strip_prefix("meshd_federation_moves_suppressed_total "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let before = suppressed(t.a.metrics().await?);
        for x in [31.0, 32.0, 33.0, 32.0, 31.0] {
            stand(&mut customer, x, 0.0, 15.0).await?;
        }
        let after = suppressed(t.a.metrics().await?);
        assert!(
            after >= before + 8,
            "moves within the slack, far from every viewer, stayed home: {before} → {after}"
        );
        // Back in steps of 1 (each within the slack). Near the viewers every step must
        // cross (interest management): each step's position is what B and C list. (Far
        // away the same steps stay home, above.) Updates may coalesce on the link, so
        // the entry event is at the first step heard within range.
        for x in (11..=30).rev() {
            stand(&mut customer, f64::from(x), 0.0, 15.0).await?;
        }
        for x in (5..=10).rev() {
            stand(&mut customer, f64::from(x), 0.0, 15.0).await?;
            // (A viewer lists the customer once it is in its range: the rep from 10,
            // the observer, 10.05 away at 10, from 9.)
            for (cl, edge) in [(&mut rep, 10), (&mut observer, 9)] {
                if x > edge {
                    continue;
                }
                let key = ck.clone();
                let want = f64::from(x);
                cl.until_peers("each step near a viewer", |v| {
                    v["peers"].as_array().is_some_and(|ps| {
                        ps.iter().any(|p| {
                            p["pubkey"] == key && p["position"]["x"].as_f64() == Some(want)
                        })
                    })
                })
                .await?;
            }
        }
        for (cl, radius_edge) in [(&mut rep, 10.0), (&mut observer, 9.0)] {
            let entered = cl.expect_event("peer_in_range").await?;
            let x = entered["eventData"]["position"]["x"]
                .as_f64()
                .unwrap_or(f64::NAN);
            assert!(
                (5.0..=radius_edge).contains(&x),
                "entered in range, at {x}: {entered}"
            );
            cl.sync().await?;
            assert!(range_events(cl).is_empty(), "one entry");
        }
        Ok(())
    }
}
