//! The simulation clock (`set_clock`, `pause_clock`, `resume_clock`, `get_clock`, ticks).

use meshd_tests::{Backend, TestBroker};
use serde_json::json;

/// A clock ticks a simulated minute per `60 s / speed` for everyone in the mesh, pauses
/// and resumes where it stopped, clamps its speed, and pauses by itself when the mesh
/// empties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulation_clock() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("clock").await?;
    let (ann, bo) = (
        broker.enroll(&mesh, "ann").await?,
        broker.enroll(&mesh, "bo").await?,
    );
    let mut a = broker.connect(&ann).await?;
    let mut b = broker.connect(&bo).await?;

    let none = a.request(json!({"type": "get_clock"})).await?;
    assert_eq!(none["type"], "clock_status");
    assert_eq!(
        (
            none["speed"].as_u64(),
            none["paused"].as_bool(),
            none["tick"].as_u64()
        ),
        (Some(0), Some(true), Some(0))
    );
    let err = a.request(json!({"type": "pause_clock"})).await?;
    assert_eq!(
        (err["type"].as_str(), err["code"].as_str()),
        (Some("error"), Some("no_clock"))
    );
    let err = a.request(json!({"type": "resume_clock"})).await?;
    assert_eq!(err["code"], "no_clock");

    // Speeds are clamped to 1..=100; a non-numeric speed is 1.
    let st = a
        .request(json!({"type": "set_clock", "speed": 1000}))
        .await?;
    assert_eq!(
        (
            st["speed"].as_u64(),
            st["paused"].as_bool(),
            st["tick"].as_u64()
        ),
        (Some(100), Some(false), Some(0))
    );
    let start = chrono_ms(st["simTime"].as_str().unwrap_or(""))?;
    // At x100 a tick comes every 600 ms, to both peers, the setter included.
    for expected in 1..=2u64 {
        for c in [&mut a, &mut b] {
            let t = c.expect_event("tick").await?;
            assert_eq!(t["eventData"]["tick"].as_u64(), Some(expected));
            assert_eq!(t["eventData"]["speed"].as_u64(), Some(100));
            let sim = chrono_ms(t["eventData"]["simTime"].as_str().unwrap_or(""))?;
            assert_eq!(
                sim - start,
                60_000 * i64::try_from(expected)?,
                "a simulated minute per tick"
            );
        }
    }
    let paused = b.request(json!({"type": "pause_clock"})).await?;
    assert_eq!(paused["paused"], true);
    let at = paused["tick"].as_u64().unwrap_or(0);
    assert!(at >= 2);
    let resumed = a.request(json!({"type": "resume_clock"})).await?;
    assert_eq!(
        (resumed["paused"].as_bool(), resumed["tick"].as_u64()),
        (Some(false), Some(at))
    );
    // Ticks continue from where the clock paused (nothing was counted meanwhile).
    let next =
        a.ws.expect("the tick after the pause", |v| {
            v["event"] == "tick" && v["eventData"]["tick"].as_u64() == Some(at + 1)
        })
        .await?;
    assert_eq!(next["subtype"], "system");
    let slow = a
        .request(json!({"type": "set_clock", "speed": "fast"}))
        .await?;
    assert_eq!(slow["speed"], 1);

    // Everyone leaves (the broker has no session left): the clock pauses by itself.
    a.close().await;
    b.close().await;
    meshd_tests::eventually("every session gone", || async {
        let m = broker.metrics().await.ok()?;
        m.lines()
            .any(|l| l == "meshd_sessions_active 0")
            .then_some(())
    })
    .await?;
    let mut c = broker.connect(&ann).await?;
    let st = c.request(json!({"type": "get_clock"})).await?;
    assert_eq!(
        (st["paused"].as_bool(), st["speed"].as_u64()),
        (Some(true), Some(1)),
        "kept, paused: {st}"
    );
    Ok(())
}

/// Milliseconds of an ISO-8601 UTC time as the broker writes it
/// (`YYYY-MM-DDTHH:MM:SS.mmmZ`).
fn chrono_ms(iso: &str) -> anyhow::Result<i64> {
    let bad = || anyhow::anyhow!("not a time: {iso:?}");
    let n = |r: std::ops::Range<usize>| -> anyhow::Result<i64> {
        iso.get(r).and_then(|s| s.parse().ok()).ok_or_else(bad)
    };
    anyhow::ensure!(iso.len() == 24 && iso.ends_with('Z'), bad());
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    // Days from the civil date (proleptic Gregorian), Howard Hinnant's algorithm.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(((days * 24 + n(11..13)?) * 60 + n(14..16)?) * 60_000 + n(17..19)? * 1000 + n(20..23)?)
}

#[test]
fn iso_parsing_matches_the_broker() {
    for ms in [0, 1_700_000_000_123, 1_796_000_000_999] {
        assert_eq!(
            chrono_ms(&meshd_protocol::time::iso8601_ms(ms)).ok(),
            Some(ms)
        );
    }
}

/// Across federated brokers.
mod across_brokers {

    use serde_json::json;

    use crate::federation::*;

    /// The simulation clock is one clock on every broker: set on A, it ticks for peers on B
    /// too; paused on B, it is paused on A.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clock_crosses_brokers() -> anyhow::Result<()> {
        let mut p = cut_pair().await?;
        until_known(&mut p.alice, &p.bob).await?;
        let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
        let set = p
            .alice
            .request(json!({"type": "set_clock", "speed": 100}))
            .await?;
        assert_eq!(set["speed"], 100, "{set}");
        let tick = bob.expect_event("tick").await?;
        assert_eq!(tick["eventData"]["speed"], 100, "{tick}");
        let paused = bob.request(json!({"type": "pause_clock"})).await?;
        assert_eq!(paused["paused"], true, "{paused}");
        let c = p
            .alice
            .poll("B's pause at A", json!({"type": "get_clock"}), |c| {
                c["paused"] == true
            })
            .await?;
        assert_eq!(c["speed"], 100);
        Ok(())
    }
}
