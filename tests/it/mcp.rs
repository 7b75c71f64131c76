//! The MCP proxy (`mcp_register`, `mcp_unregister`, `mcp_list`, `mcp_call` →
//! `mcp_call_forward` → `mcp_call_response` → `mcp_call_result`).

use std::time::Duration;

use meshd_tests::client::Client;
use meshd_tests::{Backend, TestBroker};
use serde_json::{Value, json};

fn system(event: &'static str) -> impl Fn(&Value) -> bool {
    move |v| v["type"] == "push" && v["subtype"] == "system" && v["event"] == event
}

/// Sends `mcp_call` with `rid` as `_reqId`, without waiting for its result.
async fn call(
    c: &mut Client,
    rid: &str,
    server: &str,
    tool: &str,
    args: Value,
) -> anyhow::Result<()> {
    c.send(json!({"type": "mcp_call", "serverName": server, "toolName": tool, "args": args, "_reqId": rid})).await
}

async fn forwarded(host: &mut Client, tool: &str) -> anyhow::Result<Value> {
    host.ws
        .expect("mcp_call_forward", |v| {
            v["type"] == "mcp_call_forward" && v["toolName"] == tool
        })
        .await
}

async fn result(c: &mut Client, rid: &str) -> anyhow::Result<Value> {
    let r =
        c.ws.expect("mcp_call_result", |v| v["_reqId"] == rid)
            .await?;
    assert_eq!(r["type"], "mcp_call_result", "{r}");
    Ok(r)
}

/// The servers peers registered (the broker's own `meshd` server left out).
fn peer_servers(list: &Value) -> Vec<Value> {
    list["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] != "meshd")
        .cloned()
        .collect()
}

fn server<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list["servers"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
}

both! {
    /// Registration, announcement, listing and calls through the host; a name is its
    /// member's (no hijacking); only the asked session answers a call; calls time out;
    /// a host that leaves fails its calls at once and its server goes.
    async fn mcp_proxy(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start_with(b, |c| c.limits.mcp_call_timeout = Duration::from_secs(1)).await?;
        let mesh = broker.create_mesh("mcp").await?;
        let (ann, bo, cy) = (
            broker.enroll(&mesh, "ann").await?,
            broker.enroll(&mesh, "bo").await?,
            broker.enroll(&mesh, "cy").await?,
        );
        let (mut a, mut c, mut y) = (broker.connect(&ann).await?, broker.connect(&bo).await?, broker.connect(&cy).await?);

        let schema = json!({"type": "object", "properties": {"path": {"type": "string"}}});
        let ack = a.request(json!({"type": "mcp_register", "serverName": "fs", "description": "files",
            "tools": [{"name": "read", "description": "read a file", "inputSchema": schema}, {"name": "slow", "description": ""}]})).await?;
        assert_eq!((ack["type"].as_str(), ack["serverName"].as_str(), ack["toolCount"].as_u64()), (Some("mcp_register_ack"), Some("fs"), Some(2)));
        let ev = c.ws.expect("mcp_registered", system("mcp_registered")).await?;
        assert_eq!(ev["eventData"], json!({"serverName": "fs", "description": "files", "tools": ["read", "slow"], "hostedBy": "ann"}));

        let list = c.request(json!({"type": "mcp_list"})).await?;
        let fs = server(&list, "fs").cloned().unwrap_or_default();
        assert_eq!((fs["hostedBy"].as_str(), fs["online"].as_bool(), fs["description"].as_str()), (Some("ann"), Some(true), Some("files")));
        assert_eq!(fs["tools"][0], json!({"name": "read", "description": "read a file", "inputSchema": schema}));

        // No hijacking: another member cannot take the name.
        let taken = c.request(json!({"type": "mcp_register", "serverName": "fs", "tools": []})).await?;
        assert_eq!((taken["type"].as_str(), taken["code"].as_str()), (Some("error"), Some("mcp_name_taken")), "{taken}");

        // A call goes to the host, whose answer (and no one else's) comes back.
        call(&mut c, "c1", "fs", "read", json!({"path": "/etc/motd"})).await?;
        let fwd = forwarded(&mut a, "read").await?;
        assert_eq!((fwd["serverName"].as_str(), fwd["callerName"].as_str(), &fwd["args"]), (Some("fs"), Some("bo"), &json!({"path": "/etc/motd"})));
        assert!(fwd.get("_reqId").is_none(), "{fwd}");
        let call_id = fwd["callId"].as_str().unwrap_or_default().to_owned();
        y.send(json!({"type": "mcp_call_response", "callId": call_id, "result": "forged"})).await?;
        y.sync().await?;
        a.send(json!({"type": "mcp_call_response", "callId": call_id, "result": {"content": "hello"}})).await?;
        let r = result(&mut c, "c1").await?;
        assert_eq!((&r["result"], r.get("error")), (&json!({"content": "hello"}), None), "{r}");
        // The host's error is relayed as the error.
        call(&mut c, "c2", "fs", "read", json!({})).await?;
        let fwd = forwarded(&mut a, "read").await?;
        a.send(json!({"type": "mcp_call_response", "callId": fwd["callId"], "error": "no such file"})).await?;
        assert_eq!(result(&mut c, "c2").await?["error"], "no such file");

        // Unknown server; a host that never answers.
        call(&mut c, "c3", "nope", "x", json!({})).await?;
        assert_eq!(result(&mut c, "c3").await?["error"], "MCP server \"nope\" not found in mesh");
        call(&mut c, "c4", "fs", "slow", json!({})).await?;
        forwarded(&mut a, "slow").await?;
        assert_eq!(result(&mut c, "c4").await?["error"], "MCP call timed out (1s)");

        // Only its member withdraws a server.
        c.send(json!({"type": "mcp_unregister", "serverName": "fs"})).await?;
        let list = c.request(json!({"type": "mcp_list"})).await?;
        assert!(server(&list, "fs").is_some(), "{list}");

        // The host leaves mid-call: the call fails now, not at the timeout; the server goes.
        call(&mut c, "c5", "fs", "read", json!({})).await?;
        forwarded(&mut a, "read").await?;
        a.close().await;
        let r = result(&mut c, "c5").await?;
        assert!(r["error"].as_str().unwrap_or_default().contains("disconnected"), "{r}");
        let ev = c.ws.expect("mcp_unregistered", system("mcp_unregistered")).await?;
        assert_eq!(ev["eventData"]["serverName"], "fs");
        let list = c.request(json!({"type": "mcp_list"})).await?;
        assert!(peer_servers(&list).is_empty(), "{list}");
        Ok(())
    }
}

both! {
    /// A persistent registration outlives its host's session and a broker restart:
    /// listed offline with a clear error on call, restored (`mcp_restored`) when a
    /// session of its member connects, then withdrawn by that member.
    async fn persistent_mcp_servers(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("mcp-p").await?;
        let (ann, bo) = (broker.enroll(&mesh, "ann").await?, broker.enroll(&mesh, "bo").await?);
        let mut a = broker.connect(&ann).await?;
        let ack = a.request(json!({"type": "mcp_register", "serverName": "db", "description": "sql",
            "tools": [{"name": "query", "description": "run a query"}], "persistent": true})).await?;
        assert_eq!(ack["type"], "mcp_register_ack", "{ack}");
        a.close().await;

        let broker = broker.restart().await?;
        let mut c = broker.connect(&bo).await?;
        let list = c.request(json!({"type": "mcp_list"})).await?;
        let db = server(&list, "db").cloned().unwrap_or_default();
        assert_eq!((db["online"].as_bool(), db["persistent"].as_bool(), db["hostedBy"].as_str()), (Some(false), Some(true), Some("ann")), "{list}");
        assert!(db["offlineSince"].is_string(), "{list}");
        call(&mut c, "o1", "db", "query", json!({"sql": "select 1"})).await?;
        let r = result(&mut c, "o1").await?;
        assert!(r["error"].as_str().unwrap_or_default().starts_with("Server 'db' is offline — hosted by ann"), "{r}");

        // The member returns: the server is hosted by the new session again.
        let mut a = broker.connect(&ann).await?;
        let ev = c.ws.expect("mcp_restored", system("mcp_restored")).await?;
        assert_eq!(ev["eventData"], json!({"serverName": "db", "hostedBy": "ann"}));
        call(&mut c, "o2", "db", "query", json!({"sql": "select 1"})).await?;
        let fwd = forwarded(&mut a, "query").await?;
        a.send(json!({"type": "mcp_call_response", "callId": fwd["callId"], "result": [[1]]})).await?;
        assert_eq!(result(&mut c, "o2").await?["result"], json!([[1]]));

        // The member connects again before its old session ends: the server moves to the
        // new session instead of going offline.
        let mut a2 = broker.connect(&ann).await?;
        a.close().await;
        let deadline = tokio::time::Instant::now() + meshd_tests::patience();
        loop {
            // Wait until the old session's end was processed (the call then goes to a2).
            call(&mut c, "o3", "db", "query", json!({})).await?;
            let got = tokio::select! {
                fwd = forwarded(&mut a2, "query") => Some(fwd?),
                r = result(&mut c, "o3") => { let r = r?; assert!(!r["error"].as_str().unwrap_or_default().contains("offline"), "{r}"); None }
            };
            if let Some(fwd) = got {
                a2.send(json!({"type": "mcp_call_response", "callId": fwd["callId"], "result": "moved"})).await?;
                assert_eq!(result(&mut c, "o3").await?["result"], "moved");
                break;
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "the server never moved to the new session");
        }
        let list = c.request(json!({"type": "mcp_list"})).await?;
        assert_eq!(server(&list, "db").map(|d| d["online"].clone()), Some(json!(true)), "{list}");
        let mut a = a2;
        a.send(json!({"type": "mcp_unregister", "serverName": "db"})).await?;
        c.ws.expect("mcp_unregistered", system("mcp_unregistered")).await?;
        let broker = broker.restart().await?;
        let mut c = broker.connect(&bo).await?;
        let list = c.request(json!({"type": "mcp_list"})).await?;
        assert!(peer_servers(&list).is_empty(), "withdrawn servers stay withdrawn: {list}");
        Ok(())
    }
}

/// Across federated brokers.
mod across_brokers {

    use super::peer_servers;
    use meshd_tests::fed::{self};
    use meshd_tests::{Backend, Client};
    use serde_json::{Value, json};

    use crate::federation::*;

    /// MCP servers are the mesh's on every broker: registered on A, listed and called from
    /// B (the call goes over the link to the host and back), the name is refused to another
    /// member at B, and the server goes away everywhere when its host leaves.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mcp_servers_cross_brokers() -> anyhow::Result<()> {
        let mut p = cut_pair().await?;
        until_known(&mut p.alice, &p.bob).await?;
        let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
        let ack = p
            .alice
            .request(json!({"type": "mcp_register", "serverName": "fs", "description": "files", "tools": [{"name": "read", "description": "read a file"}]}))
            .await?;
        assert_eq!(ack["type"], "mcp_register_ack", "{ack}");
        let ev = bob
            .ws
            .expect("mcp_registered at B", |v| v["event"] == "mcp_registered")
            .await?;
        assert_eq!(
            ev["eventData"],
            json!({"serverName": "fs", "description": "files", "tools": ["read"], "hostedBy": "alice"})
        );
        let list = peer_servers(&bob.request(json!({"type": "mcp_list"})).await?);
        assert_eq!(
            (list[0]["name"].as_str(), list[0]["online"].as_bool()),
            (Some("fs"), Some(true)),
            "{list:?}"
        );
        let taken = bob
            .request(json!({"type": "mcp_register", "serverName": "fs", "tools": []}))
            .await?;
        assert_eq!(taken["code"], "mcp_name_taken", "{taken}");

        bob.send(json!({"type": "mcp_call", "serverName": "fs", "toolName": "read", "args": {"path": "x"}, "_reqId": "m1"}))
            .await?;
        let fwd = p
            .alice
            .ws
            .expect("forward at A", |v| v["type"] == "mcp_call_forward")
            .await?;
        assert_eq!(
            (fwd["callerName"].as_str(), &fwd["args"]),
            (Some("bob"), &json!({"path": "x"}))
        );
        p.alice
            .send(
                json!({"type": "mcp_call_response", "callId": fwd["callId"], "result": {"text": "hi"}}),
            )
            .await?;
        let r = bob
            .ws
            .expect("result at B", |v| v["_reqId"] == "m1")
            .await?;
        assert_eq!(
            (r["type"].as_str(), &r["result"]),
            (Some("mcp_call_result"), &json!({"text": "hi"})),
            "{r}"
        );

        p.alice.close().await;
        let gone = bob
            .ws
            .expect("mcp_unregistered at B", |v| {
                v["event"] == "mcp_unregistered"
            })
            .await?;
        assert_eq!(gone["eventData"]["serverName"], "fs");
        let list = bob.request(json!({"type": "mcp_list"})).await?;
        assert!(peer_servers(&list).is_empty(), "{list}");
        Ok(())
    }

    /// Names of the MCP servers an `mcp_list` answer lists, sorted.
    fn mcp_names(list: &Value) -> Vec<String> {
        let mut names: Vec<String> = peer_servers(list)
            .iter()
            .filter_map(|s| s["name"].as_str().map(str::to_owned))
            .collect();
        names.sort();
        names
    }

    /// Polls `client`'s `mcp_list` until it names exactly `want`.
    async fn until_mcp_names(client: &mut Client, want: &[String]) -> anyhow::Result<()> {
        client
            .poll(
                &format!("MCP servers {want:?}"),
                json!({"type": "mcp_list"}),
                |l| mcp_names(l) == want,
            )
            .await
            .map(drop)
    }

    /// The full MCP list a broker sends when a link comes up may exceed a frame: it is sent
    /// in parts (A's frames are limited to 256 KiB here, its 8 servers hold ~400 KiB), and
    /// a server withdrawn while the link was down is gone from B after the reconnect.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_mcp_lists_cross_a_reconnect() -> anyhow::Result<()> {
        let mut p = linked_pair(
            |c| {
                c.limits.max_message_bytes = 64 * 1024;
                if let Some(f) = c.federation.as_mut() {
                    f.max_frame_bytes = 256 * 1024;
                }
            },
            Backend::Sqlite,
        )
        .await?;
        until_known(&mut p.alice, &p.bob).await?;
        let mut bob = member_client(&p.b.ws_url(), &p.bob, &[]).await?;
        let mut names: Vec<String> = (0..8).map(|i| format!("srv{i}")).collect();
        for name in &names {
            let tools: Vec<Value> = (0..4)
                .map(|t| json!({"name": format!("t{t}"), "description": "x".repeat(12 * 1024)}))
                .collect();
            let ack = p
                .alice
                .request(json!({"type": "mcp_register", "serverName": name, "tools": tools}))
                .await?;
            assert_eq!(ack["type"], "mcp_register_ack", "{ack}");
        }
        until_mcp_names(&mut bob, &names).await?;

        p.to_a.cut();
        p.to_b.cut();
        fed::wait_link(p.a.addr, B, "down", |l| l["state"] != "up").await?;
        p.alice
            .send(json!({"type": "mcp_unregister", "serverName": "srv0"}))
            .await?;
        names.remove(0);
        assert_eq!(
            mcp_names(&p.alice.request(json!({"type": "mcp_list"})).await?),
            names
        );
        p.to_a.heal();
        p.to_b.heal();
        fed::wait_link(p.a.addr, B, "up again", |l| {
            l["state"] == "up" && l["connects"].as_u64() >= Some(2)
        })
        .await?;
        until_mcp_names(&mut bob, &names).await?;
        Ok(())
    }
}
