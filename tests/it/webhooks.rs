//! Inbound webhooks (`create_webhook`, `list_webhooks`, `delete_webhook`, `POST /hook/…`).

use meshd_protocol::invite::Role;
use meshd_tests::{Backend, Keypair, Member, TestBroker, http};
use serde_json::{Value, json};

both! {
    /// A webhook's URL (built from the public URL) posts its JSON body to every
    /// connection of the mesh; only its creator and admins see its secret; a wrong
    /// secret, a non-JSON body, an oversized body and a flood are refused; deleting
    /// frees the name and stops the URL.
    async fn inbound_webhooks(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("hooks").await?;
        let ann = broker.enroll(&mesh, "ann").await?;
        let bo = broker.enroll(&mesh, "bo").await?;
        let admin = {
            let inv = broker.invite(&mesh.slug, Role::Admin, 1).await?;
            let keys = Keypair::generate();
            let (_, body) = broker.join(&inv.token, &keys, "root").await?;
            Member { mesh_id: mesh.mesh_id.clone(), member_id: body["memberId"].as_str().unwrap_or("").into(), keys, display_name: "root".into() }
        };
        let mut a = broker.connect(&ann).await?;
        let mut c = broker.connect(&bo).await?;
        let mut r = broker.connect(&admin).await?;

        let none = a.request(json!({"type": "create_webhook"})).await?;
        assert_eq!((none["type"].as_str(), none["code"].as_str()), (Some("error"), Some("invalid_webhook")));
        let ack = a.request(json!({"type": "create_webhook", "name": "ci"})).await?;
        assert_eq!(ack["type"], "webhook_ack");
        let secret = ack["secret"].as_str().unwrap_or("").to_owned();
        assert_eq!(secret.len(), 64);
        let url = ack["url"].as_str().unwrap_or("").to_owned();
        assert_eq!(url, format!("http://{}/hook/{}/{secret}", broker.addr, mesh.mesh_id));
        let dup = c.request(json!({"type": "create_webhook", "name": "ci"})).await?;
        assert_eq!(dup["code"], "webhook_exists");

        // Only the creator and admins see the URL (it carries the secret).
        let list = |v: &Value| v["webhooks"][0]["url"].as_str().unwrap_or("?").to_owned();
        assert_eq!(list(&a.request(json!({"type": "list_webhooks"})).await?), url);
        assert_eq!(list(&r.request(json!({"type": "list_webhooks"})).await?), url);
        let theirs = c.request(json!({"type": "list_webhooks"})).await?;
        assert_eq!((list(&theirs).as_str(), theirs["webhooks"][0]["name"].as_str()), ("", Some("ci")));

        let path = format!("/hook/{}/{secret}", mesh.mesh_id);
        let (status, _, body) = http(broker.addr, "POST", &path, Some(br#"{"zeta":{"b":2,"a":1},"build":"green","n":7}"#)).await?;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        for cl in [&mut a, &mut c, &mut r] {
            let push = cl.ws.expect("webhook push", |v| v["type"] == "push" && v["subtype"] == "webhook").await?;
            assert_eq!((push["event"].as_str(), push["priority"].as_str()), (Some("ci"), Some("next")));
            assert_eq!(push["eventData"], json!({"build": "green", "n": 7, "zeta": {"a": 1, "b": 2}}));
            assert_eq!(push["senderPubkey"], "webhook:ci");
            // The body goes out as posted, keys in their order (as the reference).
            let raw = cl.ws.raw_texts().iter().find(|t| t.contains(r#""subtype":"webhook""#)).cloned().unwrap_or_default();
            assert!(raw.contains(r#""eventData":{"zeta":{"b":2,"a":1},"build":"green","n":7}"#), "{raw}");
        }
        // Refusals: wrong secret (same length), not JSON, too large.
        // A wrong secret is the reference's 401 {ok:false, error:"unauthorized"}.
        let wrong = format!("/hook/{}/{}", mesh.mesh_id, "0".repeat(64));
        let (status, _, body) = http(broker.addr, "POST", &wrong, Some(b"{}")).await?;
        assert_eq!(status, 401);
        assert_eq!(serde_json::from_slice::<Value>(&body)?, json!({"ok": false, "error": "unauthorized"}));
        assert_eq!(http(broker.addr, "POST", &path, Some(b"not json")).await?.0, 400);
        let big = json!({"x": "y".repeat(70 * 1024)}).to_string();
        assert_eq!(http(broker.addr, "POST", &path, Some(big.as_bytes())).await?.0, 413);
        // A flood is cut off at the rate limit (burst 20 per webhook).
        let mut limited = false;
        for _ in 0..100 {
            if http(broker.addr, "POST", &path, Some(b"{}")).await?.0 == 429 {
                limited = true;
                break;
            }
        }
        assert!(limited, "never rate limited");

        // Only the creator or an admin may delete; deleting frees the name, stops the URL.
        let denied = c.request(json!({"type": "delete_webhook", "name": "ci"})).await?;
        assert_eq!(denied["code"], "forbidden");
        let del = r.request(json!({"type": "delete_webhook", "name": "ci"})).await?;
        assert_eq!((del["type"].as_str(), del["secret"].as_str()), (Some("webhook_ack"), Some("")));
        assert_eq!(http(broker.addr, "POST", &path, Some(b"{}")).await?.0, 401);
        let again = c.request(json!({"type": "create_webhook", "name": "ci"})).await?;
        assert_eq!(again["type"], "webhook_ack");
        Ok(())
    }
}

/// Across federated brokers.
mod across_brokers {

    use anyhow::Context as _;

    use serde_json::json;

    use crate::federation::*;

    /// A webhook of a shared mesh reaches the mesh's peers on every broker.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn webhook_posts_reach_every_broker() -> anyhow::Result<()> {
        let (mut p, mut bob, _) = pair_with_bob_online().await?;
        let ack = p
            .alice
            .request(json!({"type": "create_webhook", "name": "deploys"}))
            .await?;
        let secret = ack["secret"].as_str().context("secret")?;
        let path = format!("/hook/{}/{secret}", p.mesh.mesh_id);
        let (status, _, _) =
            meshd_tests::http(p.a.addr, "POST", &path, Some(br#"{"env":"prod","at":1}"#)).await?;
        assert_eq!(status, 200);
        for c in [&mut p.alice, &mut bob] {
            let push =
                c.ws.expect("webhook push", |v| {
                    v["type"] == "push" && v["subtype"] == "webhook"
                })
                .await?;
            assert_eq!(
                (push["event"].as_str(), push["eventData"]["env"].as_str()),
                (Some("deploys"), Some("prod"))
            );
            // The body as posted, on every broker.
            assert!(
                c.ws.raw_texts()
                    .iter()
                    .any(|t| t.contains(r#""eventData":{"env":"prod","at":1}"#)),
                "{:?}",
                c.ws.raw_texts()
            );
        }
        Ok(())
    }
}
