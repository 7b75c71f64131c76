//! URL watches (`watch`, `unwatch`, `watch_list`).

use std::sync::{Arc, Mutex};

use meshd_tests::{Backend, Client, TestBroker};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A tiny HTTP server answering every GET with the current body (JSON).
async fn serve(body: Arc<Mutex<String>>) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let body = body.lock().map(|b| b.clone()).unwrap_or_default();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(addr)
}

both! {
    /// A watch belongs to its member: added from one connection, listed and triggered
    /// on another (`match:` fires when the value becomes the one named), removed only
    /// by its owner; it survives a restart. A URL on the broker's own network is refused
    /// unless `watch.allow_private`; the per-member cap holds.
    async fn watches(b: Backend) -> anyhow::Result<()> {
        let body = Arc::new(Mutex::new(r#"{"build":{"state":"running"}}"#.to_owned()));
        let addr = serve(body.clone()).await?;
        let broker = TestBroker::start_with(b, |c| {
            c.watch.allow_private = true;
            c.watch.max_per_member = 2;
        })
        .await?;
        let mesh = broker.create_mesh("watch").await?;
        let ann = broker.enroll(&mesh, "ann").await?;
        let bo = broker.enroll(&mesh, "bo").await?;
        let mut cold = broker.connect(&ann).await?;
        let mut o = broker.connect(&bo).await?;
        let url = format!("http://{addr}/status");
        let ack = cold.request(json!({"type": "watch", "url": url, "mode": "json", "extract": "$.build.state",
            "interval": 5, "notify_on": "match:passed", "label": "ci"})).await?;
        assert_eq!((ack["type"].as_str(), ack["interval"].as_u64()), (Some("watch_ack"), Some(5)), "{ack}");
        let id = ack["watchId"].as_str().unwrap_or_default().to_owned();
        assert_eq!(ack["id"], id.as_str(), "the CLI reads `id`");
        cold.close().await;

        // Another session of ann sees it once its baseline is taken.
        let mut a = Client::connect_session(&broker.ws_url(), &ann).await?;
        a.poll("the baseline", json!({"type": "watch_list"}), |v| v["watches"][0]["lastValue"] == "running").await?;
        let theirs = o.request(json!({"type": "watch_list"})).await?;
        assert_eq!(theirs["watches"], json!([]));
        let not_theirs = o.request(json!({"type": "unwatch", "watchId": id})).await?;
        assert_eq!((not_theirs["type"].as_str(), not_theirs["url"].as_str()), (Some("watch_ack"), Some("")), "{not_theirs}");

        if let Ok(mut b) = body.lock() {
            *b = r#"{"build":{"state":"passed"}}"#.to_owned();
        }
        let hit = a.expect_event("watch_triggered").await?;
        let d = &hit["eventData"];
        assert_eq!((d["watchId"].as_str(), d["oldValue"].as_str(), d["newValue"].as_str(), d["label"].as_str()),
            (Some(id.as_str()), Some("running"), Some("passed"), Some("ci")), "{hit}");
        o.expect_no_messages().await?;

        let second = a.request(json!({"type": "watch", "url": url})).await?;
        assert_eq!(second["type"], "watch_ack");
        let third = a.request(json!({"type": "watch", "url": url})).await?;
        assert_eq!((third["type"].as_str(), third["code"].as_str()), (Some("error"), Some("watch_limit")), "{third}");
        let bad = a.request(json!({"type": "watch", "url": "file:///etc/passwd"})).await?;
        assert_eq!(bad["type"], "error");

        a.close().await;
        o.close().await;
        let broker = broker.restart().await?;
        let mut a = broker.connect(&ann).await?;
        let list = a.request(json!({"type": "watch_list"})).await?;
        assert_eq!(list["watches"].as_array().map(Vec::len), Some(2), "{list}");
        let gone = a.request(json!({"type": "unwatch", "watchId": id})).await?;
        assert_eq!(gone["url"], url.as_str());
        let list = a.request(json!({"type": "watch_list"})).await?;
        assert_eq!(list["watches"].as_array().map(Vec::len), Some(1));
        Ok(())
    }
}

/// By default the broker refuses to fetch its own networks (SSRF): the check fails and
/// nothing is recorded or pushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_addresses_are_refused() -> anyhow::Result<()> {
    let addr = serve(Arc::new(Mutex::new("{}".into()))).await?;
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("ssrf").await?;
    let ann = broker.enroll(&mesh, "ann").await?;
    let mut a = broker.connect(&ann).await?;
    let ack = a
        .request(json!({"type": "watch", "url": format!("http://{addr}/")}))
        .await?;
    assert_eq!(ack["type"], "watch_ack");
    let v = a
        .poll("a check", json!({"type": "watch_list"}), |v| {
            v["watches"][0]["lastCheck"].is_string()
        })
        .await?;
    assert!(v["watches"][0]["lastValue"].is_null(), "{v}");
    Ok(())
}
