//! Scheduled messages and cron reminders (`schedule`, `list_scheduled`,
//! `cancel_scheduled`).

use meshd_tests::client::now_ms;
use meshd_tests::{Backend, TestBroker};
use serde_json::{Value, json};

/// Runs one statement on a store (to move a schedule's fire time).
async fn exec(db: &meshd::store::Db, sql: &'static str, id: &str, at: i64) -> anyhow::Result<()> {
    match db {
        meshd::store::Db::Sqlite(p, _) => {
            sqlx::query(sql).bind(at).bind(id).execute(p).await?;
        }
        meshd::store::Db::Postgres(p) => {
            sqlx::query(sql).bind(at).bind(id).execute(p).await?;
        }
    }
    Ok(())
}

/// Polls `list_scheduled` until schedule `id` has fired more than `above` times (the
/// push leaves before the schedule's row moves on); returns its entry.
async fn until_fired(
    a: &mut meshd_tests::client::Client,
    id: &str,
    above: i64,
) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + meshd_tests::client::patience();
    loop {
        let list = a.request(json!({"type": "list_scheduled"})).await?;
        let e = list["messages"]
            .as_array()
            .and_then(|m| m.iter().find(|e| e["id"] == id).cloned())
            .unwrap_or_default();
        if e["firedCount"].as_i64().unwrap_or_default() > above {
            return Ok(e);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "schedule {id} did not fire again: {list}"
        );
    }
}

/// The base64 text of a plaintext push (how clients read scheduled messages).
fn c_text(v: &Value) -> Option<String> {
    meshd_tests::crypto::unplain(v["ciphertext"].as_str()?)
}

fn is_reminder(v: &Value) -> bool {
    v["type"] == "push" && v["subtype"] == "reminder"
}

both! {
    /// One-shot reminders: to oneself (arrives at once, live), to a peer after the
    /// creator's session is gone (sent as the creator), to an offline peer (drained on
    /// connect, still tagged), to `*`; every path carries `subtype: "reminder"`.
    /// Bad input is refused with the `_reqId`; list and cancel are the member's own.
    async fn one_shot_reminders(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("remind").await?;
        let (ann, bo, cy) = (
            broker.enroll(&mesh, "ann").await?,
            broker.enroll(&mesh, "bo").await?,
            broker.enroll(&mesh, "cy").await?,
        );
        let mut a = broker.connect(&ann).await?;
        let mut c = broker.connect(&bo).await?;

        // To oneself: delivered to the creating session at once.
        let ack = a.request(json!({"type": "schedule", "to": a.key(), "message": "stretch", "deliverAt": now_ms(), "subtype": "reminder"})).await?;
        assert_eq!(ack["type"], "scheduled_ack", "{ack}");
        let push = a.ws.expect("self reminder", is_reminder).await?;
        assert_eq!(a.read_push(&push).as_deref(), Some("stretch"));
        assert_eq!((push["priority"].as_str(), push["nonce"].as_str()), (Some("now"), Some("")));
        assert_eq!(push["senderPubkey"].as_str(), Some(a.key().as_str()));

        // To a peer, fired after the creator disconnected.
        let at = now_ms() + 1_500;
        let ack = a.request(json!({"type": "schedule", "to": c.key(), "message": "standup", "deliverAt": at, "subtype": "reminder"})).await?;
        assert_eq!(ack["deliverAt"].as_i64(), Some(at));
        let a_key = a.key();
        a.close().await;
        let push = c.ws.expect("reminder from a departed creator", is_reminder).await?;
        assert_eq!(c.read_push(&push).as_deref(), Some("standup"));
        assert_eq!((push["senderPubkey"].as_str(), push["senderName"].as_str()), (Some(a_key.as_str()), Some("ann")));

        // To an offline member: stored, drained with its tag when it connects.
        let mut a = broker.connect(&ann).await?;
        let cy_key = cy.keys.public_hex();
        a.request(json!({"type": "schedule", "to": cy_key, "message": "review", "deliverAt": now_ms(), "subtype": "reminder"})).await?;
        // The next request on the same socket is answered after the schedule fired or not;
        // wait for the store to hold it as a queued message instead of sleeping.
        let deadline = tokio::time::Instant::now() + meshd_tests::client::patience();
        loop {
            let n: i64 = match &broker.db {
                meshd::store::Db::Sqlite(p, _) => sqlx::query_scalar("SELECT COUNT(*) FROM message WHERE subtype = 'reminder' AND target_key = $1").bind(&cy_key).fetch_one(p).await?,
                meshd::store::Db::Postgres(p) => sqlx::query_scalar("SELECT COUNT(*) FROM message WHERE subtype = 'reminder' AND target_key = $1").bind(&cy_key).fetch_one(p).await?,
            };
            if n == 1 {
                break;
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "the reminder to an offline member was not stored");
            tokio::task::yield_now().await;
        }
        let mut y = broker.connect(&cy).await?;
        let push = y.ws.expect("drained reminder", is_reminder).await?;
        assert_eq!(y.read_push(&push).as_deref(), Some("review"));

        // To everyone: live, tagged.
        a.request(json!({"type": "schedule", "to": "*", "message": "lunch", "deliverAt": now_ms(), "subtype": "reminder"})).await?;
        for peer in [&mut c, &mut y] {
            let push = peer.ws.expect("broadcast reminder", |v| is_reminder(v) && v["senderName"] == "ann").await?;
            assert_eq!(peer.read_push(&push).as_deref(), Some("lunch"));
        }

        // Scheduled without `subtype` (the CLI's `remind` command): delivered untagged, as
        // the reference does.
        a.request(json!({"type": "schedule", "to": c.key(), "message": "plain", "deliverAt": now_ms()})).await?;
        let push = c.ws.expect("plain scheduled message", |v| v["type"] == "push" && c_text(v) == Some("plain".into())).await?;
        assert!(push.get("subtype").is_none(), "{push}");

        // Refusals name the problem and echo the request id.
        for (frame, code) in [
            (json!({"type": "schedule", "to": "*", "message": "x", "deliverAt": 0, "cron": "61 * * * *"}), "invalid_cron"),
            (json!({"type": "schedule", "to": "*", "message": "x", "deliverAt": 0, "cron": "0 0 30 2 *"}), "invalid_cron"),
            (json!({"type": "schedule", "to": "*", "message": "x", "deliverAt": 0}), "invalid_schedule"),
            (json!({"type": "schedule", "to": "*", "message": "", "deliverAt": now_ms()}), "invalid_schedule"),
            (json!({"type": "schedule", "to": "#general", "message": "x", "deliverAt": now_ms()}), "invalid_schedule"),
            (json!({"type": "schedule", "to": "ab".repeat(32), "message": "x", "deliverAt": now_ms()}), "invalid_schedule"),
        ] {
            let r = a.request(frame.clone()).await?;
            assert_eq!((r["type"].as_str(), r["code"].as_str()), (Some("error"), Some(code)), "{frame} → {r}");
            assert!(r["_reqId"].is_string(), "{r}");
        }

        // A pending cron schedule: listed with its next time; only its member cancels it.
        let before = now_ms();
        let ack = a.request(json!({"type": "schedule", "to": "@ops", "message": "rotate logs", "deliverAt": 0, "cron": "0 3 * * *", "recurring": true})).await?;
        let id = ack["scheduledId"].as_str().unwrap_or_default().to_owned();
        let next = ack["deliverAt"].as_i64().unwrap_or_default();
        assert_eq!(ack["cron"], "0 3 * * *");
        assert!(next > before && next - before <= 86_400_000 && next % 86_400_000 == 3 * 3_600_000, "{ack}");
        // Fired one-shots are not pending (the push leaves before the row is closed).
        let deadline = tokio::time::Instant::now() + meshd_tests::client::patience();
        let entries = loop {
            let list = a.request(json!({"type": "list_scheduled"})).await?;
            let entries = list["messages"].as_array().cloned().unwrap_or_default();
            if entries.len() == 1 {
                break entries;
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "fired one-shots still pending: {list}");
        };
        assert_eq!((entries[0]["id"].as_str(), entries[0]["to"].as_str(), entries[0]["deliverAt"].as_i64()), (Some(id.as_str()), Some("@ops"), Some(next)));
        assert_eq!((entries[0]["cron"].as_str(), entries[0]["firedCount"].as_i64()), (Some("0 3 * * *"), Some(0)));
        let other = c.request(json!({"type": "list_scheduled"})).await?;
        assert_eq!(other["messages"], json!([]));
        let theirs = c.request(json!({"type": "cancel_scheduled", "scheduledId": id})).await?;
        assert_eq!(theirs["ok"], false);
        let mine = a.request(json!({"type": "cancel_scheduled", "scheduledId": id})).await?;
        assert_eq!((mine["type"].as_str(), mine["ok"].as_bool()), (Some("cancel_scheduled_ack"), Some(true)));
        let again = a.request(json!({"type": "cancel_scheduled", "scheduledId": id})).await?;
        assert_eq!(again["ok"], false);
        let list = a.request(json!({"type": "list_scheduled"})).await?;
        assert_eq!(list["messages"], json!([]));
        Ok(())
    }
}

both! {
    /// A cron reminder is stored: after a restart during which it came due, it fires
    /// once (as its creator, who is not connected) and is re-armed for its next match,
    /// then keeps firing.
    async fn cron_reminders_survive_a_restart(b: Backend) -> anyhow::Result<()> {
        const MOVE: &str = "UPDATE scheduled_message SET next_at = $1 WHERE id = $2";
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("cron").await?;
        let (ann, bo) = (broker.enroll(&mesh, "ann").await?, broker.enroll(&mesh, "bo").await?);
        let mut a = broker.connect(&ann).await?;
        let bo_key = bo.keys.public_hex();
        let ack = a.request(json!({"type": "schedule", "to": bo_key, "message": "tick", "deliverAt": 0, "cron": "* * * * *", "recurring": true, "subtype": "reminder"})).await?;
        let id = ack["scheduledId"].as_str().unwrap_or_default().to_owned();
        let first = ack["deliverAt"].as_i64().unwrap_or_default();
        assert!(first % 60_000 == 0 && first > now_ms() - 1, "{ack}");
        a.close().await;

        // Down while it comes due.
        let mut broker = broker;
        broker.stop().await?;
        let db = meshd::store::Db::open(&broker.config.storage.backend, broker.config.storage.durability).await?;
        exec(&db, MOVE, &id, now_ms() - 5_000).await?;
        db.close().await;
        let mut broker = broker.restart().await?;
        let mut c = broker.connect(&bo).await?;
        let push = c.ws.expect("recovered cron reminder", is_reminder).await?;
        assert_eq!((c.read_push(&push).as_deref(), push["senderName"].as_str()), (Some("tick"), Some("ann")));

        let mut a = broker.connect(&ann).await?;
        let e = until_fired(&mut a, &id, 0).await?;
        // At least once: a minute boundary may have passed since.
        let fired = e["firedCount"].as_i64().unwrap_or_default();
        let next = e["deliverAt"].as_i64().unwrap_or_default();
        assert!(next % 60_000 == 0 && next > now_ms() - 60_000, "re-armed at the next minute: {e}");

        // And it keeps firing: bring the next occurrence forward and wake the scheduler
        // with another schedule (a write wakes it).
        exec(&broker.db, MOVE, &id, now_ms()).await?;
        a.request(json!({"type": "schedule", "to": "*", "message": "wake", "deliverAt": now_ms() + 3_600_000})).await?;
        let seen = push["messageId"].clone();
        let push = c.ws.expect("second cron delivery", |v| is_reminder(v) && v["messageId"] != seen).await?;
        assert_eq!(c.read_push(&push).as_deref(), Some("tick"));
        let e = until_fired(&mut a, &id, fired).await?;
        assert!(e["deliverAt"].as_i64().unwrap_or_default() > now_ms() - 60_000, "re-armed: {e}");
        broker.stop().await?;
        Ok(())
    }
}

/// Across federated brokers.
mod across_brokers {

    use serde_json::json;

    use crate::federation::*;

    /// Reminders scheduled on A reach a member hosted by B, direct (through the durable
    /// outbox) and broadcast (live), tagged `subtype: "reminder"` and sent as their creator.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reminders_cross_brokers() -> anyhow::Result<()> {
        let (mut p, mut bob, bob_key) = pair_with_bob_online().await?;
        let now = meshd_tests::client::now_ms();
        for (to, text) in [(bob_key.as_str(), "direct"), ("*", "everyone")] {
            let ack = p
                .alice
                .request(json!({"type": "schedule", "to": to, "message": text, "deliverAt": now, "subtype": "reminder"}))
                .await?;
            assert_eq!(ack["type"], "scheduled_ack", "{ack}");
            let push = bob
                .ws
                .expect("reminder from A", |v| {
                    v["type"] == "push" && v["subtype"] == "reminder"
                })
                .await?;
            assert_eq!(
                (bob.read_push(&push).as_deref(), push["senderName"].as_str()),
                (Some(text), Some("alice"))
            );
        }
        Ok(())
    }
}
