//! The web app (`features::webapp`) in a real headless Chromium against a real broker:
//! a person enrolls from an invite link and talks with a peer that runs the test
//! client (the CLI's crypto). SQLite only: the app adds no store queries.

use meshd_protocol::invite::Role;
use meshd_tests::browser::Browser;
use meshd_tests::{Backend, TestBroker, http_with};
use serde_json::json;

/// A one-use invite's browser link.
async fn web_link(broker: &TestBroker, slug: &str, role: Role) -> anyhow::Result<String> {
    let invite = broker.invite(slug, role, 1).await?;
    invite
        .web_url
        .ok_or_else(|| anyhow::anyhow!("an invite has a browser link"))
}

/// The header `name` of a raw HTTP head, if present.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_is_embedded_and_served_with_a_strict_policy() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let (status, head, body) = http_with(broker.addr, "GET", "/app/", &[], None).await?;
    assert_eq!(status, 200, "{head}");
    assert!(header(&head, "content-type").is_some_and(|v| v.starts_with("text/html")));
    let csp = header(&head, "content-security-policy").unwrap_or_default();
    assert_eq!(csp, meshd::features::webapp::CSP);
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"));
    assert_eq!(header(&head, "x-content-type-options"), Some("nosniff"));
    assert_eq!(header(&head, "x-frame-options"), Some("DENY"));
    let html = String::from_utf8(body)?;
    // No inline script: every <script> has a src on this origin.
    for tag in html.split("<script").skip(1) {
        let open = &tag[..tag.find('>').unwrap_or(tag.len())];
        assert!(
            open.contains("src=\"/app/"),
            "inline or foreign script: <script{open}>"
        );
        assert!(
            tag[open.len() + 1..].starts_with("</script>"),
            "inline script body"
        );
    }
    assert!(!html.contains("style=\""), "inline style");

    // The vendored library comes from the binary, with its license beside it.
    let (status, head, js) = http_with(
        broker.addr,
        "GET",
        "/app/vendor/nacl-fast.min.js",
        &[],
        None,
    )
    .await?;
    assert_eq!(status, 200);
    assert!(header(&head, "content-type").is_some_and(|v| v.starts_with("text/javascript")));
    assert!(js.len() > 20_000);
    let (status, _, license) = http_with(
        broker.addr,
        "GET",
        "/app/vendor/LICENSE-tweetnacl",
        &[],
        None,
    )
    .await?;
    assert_eq!(status, 200);
    assert!(String::from_utf8(license)?.contains("public domain"));

    // Revalidation: the ETag answers 304 with no body.
    let etag = header(&head, "etag").expect("etag").to_owned();
    let (status, _, body) = http_with(
        broker.addr,
        "GET",
        "/app/vendor/nacl-fast.min.js",
        &[("If-None-Match", &etag)],
        None,
    )
    .await?;
    assert_eq!((status, body.len()), (304, 0));

    // Nothing else is served from /app, not by traversal either.
    for path in [
        "/app/nope.js",
        "/app/../Cargo.toml",
        "/app/%2e%2e/Cargo.toml",
        "/app/vendor",
    ] {
        let (status, head, _) = http_with(broker.addr, "GET", path, &[], None).await?;
        assert_eq!(status, 404, "{path}: {head}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_joins_from_an_invite_and_talks_with_a_claude_peer() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("web-team").await?;
    let claude = broker.enroll(&mesh, "claude").await?;
    let mut peer = broker.connect(&claude).await?;
    let invite = broker.invite(&mesh.slug, Role::Member, 1).await?;
    let link = invite
        .web_url
        .clone()
        .expect("an invite has a browser link");
    assert!(link.starts_with(&format!("http://{}/app/#join=", broker.addr)));

    let mut browser = Browser::launch().await?;
    let steps = async {
        browser.goto(&link).await?;
        browser
            .wait_for("the join form", "!document.getElementById('join').hidden")
            .await?;
        let text = browser.text().await?;
        assert!(text.contains(&mesh.slug) && text.contains(&mesh.mesh_id), "{text}");
        browser.fill("#join-name", "Ada").await?;
        browser.click("#join-btn").await?;
        browser
            .wait_for(
                "the page to be online",
                "document.getElementById('conn').textContent === 'online'",
            )
            .await?;
        let me = browser
            .eval("JSON.parse(localStorage.getItem('meshd.identities.v1'))[0]")
            .await?;
        let my_key = me["publicKey"].as_str().unwrap_or_default().to_owned();
        assert_eq!(me["meshId"], json!(mesh.mesh_id));
        assert_eq!(my_key.len(), 64);

        // The broker sees a human member with the browser's key.
        let peers = peer
            .poll(
                "the browser's presence",
                json!({"type": "list_peers"}),
                |v| {
                    v["peers"]
                        .as_array()
                        .is_some_and(|p| p.iter().any(|p| p["displayName"] == "Ada"))
                },
            )
            .await?;
        let ada = peers["peers"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["displayName"] == "Ada"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(ada["peerType"], "human");
        assert_eq!(ada["pubkey"], json!(my_key));

        // A DM from the page arrives sealed and opens with the peer's session key.
        browser
            .wait_for(
                "claude in the peer list",
                "[...document.querySelectorAll('#peers li')].some(li => li.textContent.includes('claude'))",
            )
            .await?;
        browser
            .eval("[...document.querySelectorAll('#peers li')].find(li => li.textContent.includes('claude')).click()")
            .await?;
        browser.fill("#compose", "hello from a browser").await?;
        browser.click("#send-btn").await?;
        let (push, text) = peer.expect_message().await?;
        assert_eq!(text, "hello from a browser");
        assert_eq!(push["senderPubkey"], json!(my_key));
        assert!(
            peer.open_push(&push).is_some(),
            "the DM is a crypto_box, not plaintext"
        );
        browser
            .wait_for(
                "the send's ack",
                "document.getElementById('messages').innerText.includes('sent')",
            )
            .await?;

        // The reply, sealed by the peer, is decrypted in the page.
        peer.dm(&my_key, "hi Ada, from claude", "now").await?;
        browser
            .wait_for(
                "the decrypted reply",
                "document.getElementById('messages').innerText.includes('hi Ada, from claude')",
            )
            .await?;
        browser.readme_shot("webapp-chat").await?;

        // History survives a reload (kept by the browser; the broker holds only
        // ciphertext in transit).
        browser.goto(&format!("http://{}/app/", broker.addr)).await?;
        browser
            .wait_for(
                "online again",
                "document.getElementById('conn').textContent === 'online'",
            )
            .await?;
        browser
            .eval("[...document.querySelectorAll('#peers li')].find(li => li.textContent.includes('claude')).click()")
            .await?;
        let shown = browser
            .wait_for(
                "the history after a reload",
                "(t => t.includes('hello from a browser') && t.includes('hi Ada, from claude') && t)(document.getElementById('messages').innerText)",
            )
            .await?;
        assert!(shown.as_str().is_some());
        let violations = browser.csp_violations();
        assert!(violations.is_empty(), "CSP violations: {violations:?}");
        anyhow::Ok(())
    }
    .await;
    let r = browser.on_failure("webapp-join-and-dm", steps).await;
    browser.close().await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_invites_from_the_page_and_members_cannot() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("ops").await?;
    let other = broker.create_mesh("lab").await?;
    let admin_link = web_link(&broker, &mesh.slug, Role::Admin).await?;
    let member_link = web_link(&broker, &other.slug, Role::Member).await?;

    let mut browser = Browser::launch().await?;
    let steps = async {
        browser.goto(&admin_link).await?;
        browser.fill("#join-name", "Grace").await?;
        browser.click("#join-btn").await?;
        browser
            .wait_for(
                "online as an admin",
                "document.getElementById('conn').textContent === 'online' && !document.getElementById('invite-btn').hidden",
            )
            .await?;
        browser.click("#invite-btn").await?;
        browser
            .eval("document.getElementById('invite-role').value = 'member'")
            .await?;
        browser.fill("#invite-uses", "2").await?;
        browser.click("#invite-create").await?;
        let cli = browser
            .wait_for(
                "the created invite",
                "!document.getElementById('invite-result').hidden && document.getElementById('invite-cli').textContent",
            )
            .await?;
        let cli = cli.as_str().unwrap_or_default().to_owned();
        let token = cli
            .strip_prefix("claudemesh join ic://join/")
            .unwrap_or_else(|| panic!("not a join command: {cli}"))
            .to_owned();
        let qr = browser
            .eval("document.getElementById('invite-qr').src")
            .await?;
        browser.readme_shot("webapp-invite").await?;
        assert!(
            qr.as_str().is_some_and(|s| s.starts_with("data:image/gif;base64,")),
            "{qr}"
        );
        let web = browser
            .eval("document.getElementById('invite-web').textContent")
            .await?;
        assert_eq!(
            web.as_str(),
            Some(format!("http://{}/app/#join={token}", broker.addr).as_str())
        );

        // A CLI enrolls with it (the same /join claudemesh join posts), twice: two uses.
        for name in ["cli-1", "cli-2"] {
            let keys = meshd_tests::Keypair::generate();
            let (status, body) = broker.join(&token, &keys, name).await?;
            assert_eq!(status, 200, "{body}");
            let member = meshd_tests::Member {
                mesh_id: mesh.mesh_id.clone(),
                member_id: body["memberId"].as_str().unwrap_or_default().to_owned(),
                keys,
                display_name: name.to_owned(),
            };
            broker.connect(&member).await?.close().await;
        }
        let (status, body) = broker
            .join(&token, &meshd_tests::Keypair::generate(), "cli-3")
            .await?;
        assert_eq!(status, 400, "a third use: {body}");

        // A member of another mesh, in the same browser: no admin action in the page…
        browser.goto(&member_link).await?;
        browser.fill("#join-name", "Grace").await?;
        browser.click("#join-btn").await?;
        browser
            .wait_for(
                "online in the second mesh",
                &format!(
                    "document.getElementById('conn').textContent === 'online' && document.getElementById('identity').options.length === 2 && document.getElementById('whoami').textContent.includes({})",
                    json!(other.slug)
                ),
            )
            .await?;
        assert_eq!(
            browser
                .eval("document.getElementById('invite-btn').hidden")
                .await?,
            json!(true)
        );
        anyhow::Ok(())
    }
    .await;
    let r = browser.on_failure("webapp-admin-invite", steps).await;
    browser.close().await;
    r?;

    // …and none through the protocol either.
    let plain = broker.enroll(&other, "plain").await?;
    let mut c = broker.connect(&plain).await?;
    let v = c
        .request(json!({"type": "invite_create", "role": "admin", "maxUses": 5}))
        .await?;
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["code"], "forbidden");
    Ok(())
}

/// Opens an invite link, joins as `name` and waits until the page is online.
async fn join_as(browser: &mut Browser, link: &str, name: &str) -> anyhow::Result<()> {
    browser.goto(link).await?;
    browser.fill("#join-name", name).await?;
    browser.click("#join-btn").await?;
    browser
        .wait_for(
            &format!("{name} online"),
            "document.getElementById('conn').textContent === 'online'",
        )
        .await?;
    Ok(())
}

/// Opens the conversation with the peer named `name` once it is listed.
async fn open_chat(browser: &mut Browser, name: &str) -> anyhow::Result<()> {
    let find = format!(
        "[...document.querySelectorAll('#peers li')].find(li => li.querySelector('.name').textContent === {})",
        json!(name)
    );
    browser
        .wait_for(&format!("{name} in the peer list"), &format!("!!{find}"))
        .await?;
    browser.eval(&format!("{find}.click()")).await?;
    Ok(())
}

/// Ada and Bob join from their links and open their conversation; Ada types (Bob sees
/// the indicator), sends `text` (Bob reads it and the indicator goes), and Bob's open
/// conversation sends a receipt that Ada's message shows.
async fn typing_dm_and_receipt(
    ada: &mut Browser,
    link_a: &str,
    bob: &mut Browser,
    link_b: &str,
    text: &str,
) -> anyhow::Result<()> {
    join_as(ada, link_a, "Ada").await?;
    join_as(bob, link_b, "Bob").await?;
    open_chat(ada, "Bob").await?;
    open_chat(bob, "Ada").await?;
    ada.fill("#compose", &text[..3]).await?;
    bob.wait_for(
        "Ada's typing indicator",
        "document.getElementById('typing').textContent === 'Ada is typing…'",
    )
    .await?;
    ada.fill("#compose", text).await?;
    ada.click("#send-btn").await?;
    bob.wait_for(
        "the DM",
        &format!(
            "document.getElementById('messages').innerText.includes({})",
            json!(text)
        ),
    )
    .await?;
    // The message arriving ends the typing indicator.
    bob.wait_for(
        "the indicator to go",
        "document.getElementById('typing').textContent === ''",
    )
    .await?;
    ada.wait_for(
        "the read receipt",
        "[...document.querySelectorAll('#messages li.out .meta')].some(m => m.textContent.endsWith('· read'))",
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_see_typing_and_read_receipts() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("pair").await?;
    let link_a = web_link(&broker, &mesh.slug, Role::Member).await?;
    let link_b = web_link(&broker, &mesh.slug, Role::Member).await?;
    let mut ada = Browser::launch().await?;
    let mut bob = Browser::launch().await?;
    let steps = async {
        typing_dm_and_receipt(&mut ada, &link_a, &mut bob, &link_b, "hello Bob").await?;
        ada.readme_shot("webapp-receipt").await?;
        anyhow::Ok(())
    }
    .await;
    let r = ada.on_failure("webapp-typing-ada", steps).await;
    let r = bob.on_failure("webapp-typing-bob", r).await;
    ada.close().await;
    bob.close().await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_watches_the_live_dashboard() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("live").await?;
    let link = web_link(&broker, &mesh.slug, Role::Admin).await?;
    let (a, b) = (
        broker.enroll(&mesh, "alpha").await?,
        broker.enroll(&mesh, "beta").await?,
    );
    let mut browser = Browser::launch().await?;
    let steps = async {
        join_as(&mut browser, &link, "Admin").await?;
        browser.click("#dash-btn").await?;
        browser
            .wait_for(
                "the dashboard feed",
                "typeof window.__meshdDashboard === 'function' && window.__meshdDashboard().nodes >= 1",
            )
            .await?;
        // A peer joins: the graph and the timeline show it.
        let mut alpha = broker.connect(&a).await?;
        let mut beta = broker.connect(&b).await?;
        browser
            .wait_for(
                "two peers in the graph",
                "window.__meshdDashboard().nodes >= 3 && document.getElementById('timeline').innerText.includes('beta joined')",
            )
            .await?;
        // A DM and a status change: metadata in the stream, never the body.
        alpha.dm(&beta.key(), "top secret plan", "now").await?;
        beta.expect_message().await?;
        beta.send(json!({"type": "set_status", "status": "working"}))
            .await?;
        let stream = browser
            .wait_for(
                "the DM's metadata",
                "(t => t.includes('alpha →') && t.includes('direct · now') && t)(document.getElementById('stream').innerText)",
            )
            .await?;
        assert!(!stream.to_string().contains("top secret"), "{stream}");
        browser
            .wait_for(
                "the status change",
                "document.getElementById('timeline').innerText.includes('beta → working')",
            )
            .await?;
        // Audit entries reach the timeline live (a join is audited as member_joined).
        broker.enroll(&mesh, "gamma").await?;
        browser
            .wait_for(
                "the audit entry",
                "document.getElementById('timeline').innerText.includes('audit: member_joined by gamma')",
            )
            .await?;
        // Resource cards follow a task and a skill made by a peer (pushed as `resource`
        // events; the page asks for the counts again).
        let t = alpha
            .request(json!({"type": "create_task", "title": "ship it"}))
            .await?;
        assert!(t["error"].is_null(), "{t}");
        let k = alpha
            .request(json!({"type": "share_skill", "name": "deploy", "description": "d", "instructions": "i"}))
            .await?;
        assert!(k["error"].is_null(), "{k}");
        browser
            .wait_for(
                "the task and skill cards",
                "document.getElementById('card-tasks').textContent === '1 / 0 / 0' && document.getElementById('card-skills').textContent === '1'",
            )
            .await?;
        let timing = browser.eval("window.__meshdDashboard()").await?;
        assert!(timing["draws"].as_u64().unwrap_or(0) > 0, "{timing}");
        browser.readme_shot("webapp-dashboard").await?;
        let violations = browser.csp_violations();
        assert!(violations.is_empty(), "CSP violations: {violations:?}");
        anyhow::Ok(())
    }
    .await;
    let r = browser.on_failure("webapp-dashboard", steps).await;
    browser.close().await;
    r?;
    // A member who is not an admin cannot watch.
    let mut plain = broker.connect(&a).await?;
    let v = plain
        .request(json!({"type": "dashboard_subscribe"}))
        .await?;
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{v}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_in_the_page_with_history_mentions_and_unread() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("forum").await?;
    let claude = broker.enroll(&mesh, "claude").await?;
    let mut peer = broker.connect(&claude).await?;
    let link = web_link(&broker, &mesh.slug, Role::Member).await?;
    // #general has a post before the person joins (history).
    let topics = peer.request(json!({"type": "topic_list"})).await?;
    let general = topics["topics"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "general"))
        .and_then(|t| t["id"].as_str())
        .expect("#general")
        .to_owned();
    let post = |text: &str| {
        json!({"type": "send", "targetSpec": format!("#{general}"), "priority": "now",
            "nonce": meshd_tests::crypto::plain(text).0, "ciphertext": meshd_tests::crypto::plain(text).1,
            "bodyVersion": 1})
    };
    peer.send(post("welcome, everyone")).await?;
    peer.sync().await?;

    let mut browser = Browser::launch().await?;
    let steps = async {
        join_as(&mut browser, &link, "Ada").await?;
        browser
            .wait_for(
                "#general in the list",
                "[...document.querySelectorAll('#topics li')].some(li => li.textContent.startsWith('#general'))",
            )
            .await?;
        // A post with a mention while the topic is closed: unread and mention badges.
        peer.send(post("@Ada can you review the plan?")).await?;
        browser
            .wait_for(
                "the unread and mention badges",
                "(li => li && li.querySelector('.unread')?.textContent === '1' && li.querySelector('.mention')?.textContent === '@1')([...document.querySelectorAll('#topics li')].find(li => li.textContent.startsWith('#general')))",
            )
            .await?;
        browser
            .eval("[...document.querySelectorAll('#topics li')].find(li => li.textContent.startsWith('#general')).click()")
            .await?;
        browser
            .wait_for(
                "history and the live post, the mention marked",
                "(t => t.includes('welcome, everyone') && t.includes('can you review the plan?') && document.querySelector('#messages mark.me')?.textContent === '@Ada')(document.getElementById('messages').innerText)",
            )
            .await?;
        assert_eq!(
            browser
                .eval("document.querySelector('#topics li .unread') === null")
                .await?,
            json!(true),
            "opening the topic clears its badges"
        );
        // Autocomplete: "@cl" offers claude; Tab completes it.
        browser.fill("#compose", "thanks @cl").await?;
        browser
            .wait_for(
                "the suggestion",
                "!document.getElementById('mention-list').hidden && document.querySelector('#mention-list li').textContent === '@claude'",
            )
            .await?;
        browser
            .eval("document.getElementById('compose').dispatchEvent(new KeyboardEvent('keydown', {key: 'Tab', bubbles: true})); document.getElementById('compose').value")
            .await?;
        let value = browser.eval("document.getElementById('compose').value").await?;
        assert_eq!(value, json!("thanks @claude "));
        browser.fill("#compose", "thanks @claude, on it").await?;
        browser.click("#send-btn").await?;
        let push = peer
            .ws
            .expect_within("the page's topic post", meshd_tests::patience(), |v| {
                v["type"] == "push" && v["topicId"] == general.as_str()
            })
            .await?;
        assert_eq!(
            meshd_tests::crypto::unplain(push["ciphertext"].as_str().unwrap_or_default()).as_deref(),
            Some("thanks @claude, on it")
        );
        assert_eq!(push["senderName"], "Ada");
        browser
            .wait_for(
                "the page's own post",
                "document.querySelector('#messages li.out')?.innerText.includes('thanks @claude, on it')",
            )
            .await?;
        browser.readme_shot("webapp-topic").await?;
        anyhow::Ok(())
    }
    .await;
    let r = browser.on_failure("webapp-topics", steps).await;
    browser.close().await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_encrypted_in_the_page_is_read_by_another_person_only() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("sealed").await?;
    let claude = broker.enroll(&mesh, "claude").await?;
    let mut peer = broker.connect(&claude).await?;
    let link_a = web_link(&broker, &mesh.slug, Role::Member).await?;
    let link_b = web_link(&broker, &mesh.slug, Role::Member).await?;
    let open_general = "[...document.querySelectorAll('#topics li')].find(li => li.textContent.startsWith('#general'))";
    let mut ada = Browser::launch().await?;
    let mut bob = Browser::launch().await?;
    let steps = async {
        join_as(&mut ada, &link_a, "Ada").await?;
        join_as(&mut bob, &link_b, "Bob").await?;
        ada.wait_for("#general", &format!("!!{open_general}")).await?;
        ada.eval(&format!("{open_general}.click()")).await?;
        ada.wait_for(
            "a plaintext topic",
            "document.getElementById('key-state').textContent === 'plaintext (v1)' && !document.getElementById('claim-key').hidden",
        )
        .await?;
        ada.click("#claim-key").await?;
        ada.wait_for(
            "the topic encrypted",
            "document.getElementById('key-state').textContent === 'end-to-end encrypted'",
        )
        .await?;
        // Bob opens it: Ada's page seals the key for him (pending-seals → seal).
        bob.wait_for("#general", &format!("!!{open_general}")).await?;
        bob.eval(&format!("{open_general}.click()")).await?;
        bob.wait_for(
            "the key sealed for Bob",
            "document.getElementById('key-state').textContent === 'end-to-end encrypted'",
        )
        .await?;
        ada.fill("#compose", "the secret plan").await?;
        ada.click("#send-btn").await?;
        bob.wait_for(
            "the v2 post, decrypted",
            "document.getElementById('messages').innerText.includes('the secret plan')",
        )
        .await?;
        // The broker and a member without the key see only ciphertext.
        let push = peer
            .ws
            .expect_within("the post", meshd_tests::patience(), |v| {
                v["type"] == "push" && v["bodyVersion"] == 2
            })
            .await?;
        let c = push["ciphertext"].as_str().unwrap_or_default();
        assert!(!c.is_empty());
        assert_ne!(
            meshd_tests::crypto::unplain(c).as_deref(),
            Some("the secret plan")
        );
        anyhow::Ok(())
    }
    .await;
    let r = ada.on_failure("webapp-topic-key-ada", steps).await;
    let r = bob.on_failure("webapp-topic-key-bob", r).await;
    ada.close().await;
    bob.close().await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_bans_and_unbans_a_member_from_the_page() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("admin").await?;
    let eve = broker.enroll(&mesh, "eve").await?;
    let mut eve_client = broker.connect(&eve).await?;
    let link = web_link(&broker, &mesh.slug, Role::Admin).await?;
    let mut browser = Browser::launch().await?;
    let steps = async {
        join_as(&mut browser, &link, "Root").await?;
        browser.click("#admin-btn").await?;
        let eve_row = "document.querySelector('#admin-members tr[data-member=\"eve\"]')";
        browser
            .wait_for("eve listed", &format!("!!{eve_row}"))
            .await?;
        browser
            .eval(&format!("{eve_row}.querySelector('button[data-action=Ban]').click()"))
            .await?;
        // Eve's connection is closed with 4002 and she is listed as banned.
        let close = eve_client.ws.expect_close().await;
        assert_eq!(close.map(|c| c.0), Some(4002));
        browser
            .wait_for(
                "eve among the banned",
                "!!document.querySelector('#admin-bans li[data-member=\"eve\"]') && !document.querySelector('#admin-members tr[data-member=\"eve\"]')",
            )
            .await?;
        assert!(broker.connect(&eve).await.is_err(), "a banned member is refused");
        browser
            .eval("document.querySelector('#admin-bans li[data-member=\"eve\"] button').click()")
            .await?;
        browser
            .wait_for(
                "eve back among the members",
                "!!document.querySelector('#admin-members tr[data-member=\"eve\"]')",
            )
            .await?;
        broker.connect(&eve).await?.close().await;
        // An API key made in the page shows its secret once and is listed.
        browser.fill("#key-label", "ci").await?;
        browser.click("#key-create").await?;
        browser
            .wait_for(
                "the key's secret and listing",
                "document.getElementById('key-secret').textContent.startsWith('Secret (shown once): ') && document.getElementById('admin-keys').innerText.includes('ci ·')",
            )
            .await?;
        anyhow::Ok(())
    }
    .await;
    let r = browser.on_failure("webapp-admin", steps).await;
    browser.close().await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_posts_to_groups_and_everyone_and_creates_a_topic() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("crowd").await?;
    let link = web_link(&broker, &mesh.slug, Role::Member).await?;
    let cli = broker.enroll(&mesh, "claude").await?;
    let mut claude = broker.connect(&cli).await?;
    claude
        .send(json!({"type": "join_group", "name": "ops"}))
        .await?;
    claude.sync().await?;
    let mut browser = Browser::launch().await?;
    let steps = async {
        join_as(&mut browser, &link, "Ada").await?;
        // Ada joins @ops from the page; the peer list shows her in it.
        browser.click("#group-new").await?;
        browser.fill("#group-name", "ops").await?;
        browser
            .eval("document.getElementById('group-form').requestSubmit()")
            .await?;
        browser
            .wait_for(
                "@ops joined",
                "(li => li && li.innerText.includes('joined'))(document.querySelector('#groups li[data-group=\"@ops\"]'))",
            )
            .await?;
        // A group message from the peer lands in @ops (open since the join), not in a
        // DM with the sender; a broadcast while @ops is open counts as unread in Everyone.
        let ack = claude.multicast("@ops", "deploy at noon").await?;
        assert!(ack["error"].is_null(), "{ack}");
        let ack = claude.multicast("*", "lunch is here").await?;
        assert!(ack["error"].is_null(), "{ack}");
        browser
            .wait_for(
                "the unread broadcast",
                "(u => u && u.textContent === '1')(document.querySelector('#groups li[data-group=\"*\"] .unread'))",
            )
            .await?;
        assert_eq!(
            browser
                .eval("[...document.querySelectorAll('#peers li .unread')].length")
                .await?,
            json!(0),
            "nothing filed under the sender's DM"
        );
        browser
            .wait_for(
                "the group message with its sender",
                "(t => t.includes('claude') && t.includes('deploy at noon'))(document.getElementById('messages').innerText)",
            )
            .await?;
        // Ada answers the group, then everyone; the peer reads both (base64 text, as the
        // CLI sends them) with the target in the push.
        browser.fill("#compose", "on it").await?;
        browser.click("#send-btn").await?;
        let (push, text) = claude.expect_message().await?;
        assert_eq!((push["targetSpec"].as_str(), text.as_str()), (Some("@ops"), "on it"), "{push}");
        browser
            .eval("document.querySelector('#groups li[data-group=\"*\"]').click()")
            .await?;
        browser
            .wait_for(
                "the broadcast in Everyone",
                "document.getElementById('messages').innerText.includes('lunch is here')",
            )
            .await?;
        browser.fill("#compose", "hello everyone").await?;
        browser.click("#send-btn").await?;
        let (push, text) = claude.expect_message().await?;
        assert_eq!((push["targetSpec"].as_str(), text.as_str()), (Some("*"), "hello everyone"), "{push}");
        browser
            .wait_for(
                "the broadcast acked",
                "[...document.querySelectorAll('#messages li.out .meta')].some(m => m.textContent.includes('· sent'))",
            )
            .await?;
        // A topic created in the page exists for the peer, and the page has it open.
        browser.click("#topic-new").await?;
        browser.fill("#topic-name", "launch").await?;
        browser
            .eval("document.getElementById('topic-form').requestSubmit()")
            .await?;
        browser
            .wait_for(
                "the new topic open",
                "document.getElementById('chat-title').textContent === '#launch'",
            )
            .await?;
        let list = claude.request(json!({"type": "topic_list"})).await?;
        let topics = list["topics"].as_array().cloned().unwrap_or_default();
        assert!(topics.iter().any(|t| t["name"] == "launch"), "{list}");
        let violations = browser.csp_violations();
        assert!(violations.is_empty(), "CSP violations: {violations:?}");
        anyhow::Ok(())
    }
    .await;
    let r = browser.on_failure("webapp-groups", steps).await;
    browser.close().await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_changes_roles_from_the_page_and_keeps_one_admin() -> anyhow::Result<()> {
    let broker = TestBroker::start(Backend::Sqlite).await?;
    let mesh = broker.create_mesh("roles").await?;
    let eve = broker.enroll(&mesh, "eve").await?;
    let mut eve_client = broker.connect(&eve).await?;
    // Eve is a member: every admin frame of the page is refused to her.
    for frame in [
        json!({"type": "member_role", "target": "eve", "role": "admin"}),
        json!({"type": "share_list"}),
        json!({"type": "share_set", "broker": "b.example", "shared": true}),
        json!({"type": "dashboard_resources"}),
    ] {
        let v = eve_client.request(frame.clone()).await?;
        assert_eq!(
            (v["type"].as_str(), v["code"].as_str()),
            (Some("error"), Some("forbidden")),
            "{frame} → {v}"
        );
    }
    let link = web_link(&broker, &mesh.slug, Role::Admin).await?;
    let mut browser = Browser::launch().await?;
    let steps = async {
        join_as(&mut browser, &link, "Root").await?;
        browser.click("#admin-btn").await?;
        let row = |name: &str| {
            format!("document.querySelector('#admin-members tr[data-member=\"{name}\"]')")
        };
        browser
            .wait_for("eve listed", &format!("!!{}", row("eve")))
            .await?;
        // Without federation the page says so and lists no peer broker.
        browser
            .wait_for(
                "the federation note",
                "document.getElementById('admin-fed').textContent.includes('not configured')",
            )
            .await?;
        browser
            .eval(&format!(
                "{}.querySelector('button[data-action=\"Make admin\"]').click()",
                row("eve")
            ))
            .await?;
        browser
            .wait_for(
                "eve an admin",
                &format!(
                    "(r => r && r.children[1].textContent === 'admin')({})",
                    row("eve")
                ),
            )
            .await?;
        // The change applies to eve's open connection at once.
        let v = eve_client
            .request(json!({"type": "dashboard_resources"}))
            .await?;
        assert_eq!(v["type"], "dashboard_resources", "{v}");
        assert_eq!(v["queue"]["now"], 0, "{v}");
        // Root steps down (eve is an admin now); the page, no longer an admin's, is
        // refused the admin lists by the broker.
        browser
            .eval(&format!(
                "{}.querySelector('button[data-action=\"Make member\"]').click()",
                row("Root")
            ))
            .await?;
        browser
            .wait_for(
                "the refusal after stepping down",
                "document.getElementById('admin-error').textContent.includes('only a mesh admin')",
            )
            .await?;
        // Eve may not step down: she is the last admin.
        let v = eve_client
            .request(
                json!({"type": "member_role", "target": eve.keys.public_hex(), "role": "member"}),
            )
            .await?;
        assert_eq!(v["code"], "invalid", "{v}");
        assert!(
            v["message"].as_str().unwrap_or("").contains("last admin"),
            "{v}"
        );
        anyhow::Ok(())
    }
    .await;
    let r = browser.on_failure("webapp-roles", steps).await;
    browser.close().await;
    r?;
    let roles: Vec<(String, String)> = broker
        .db
        .members(&mesh.mesh_id)
        .await?
        .into_iter()
        .map(|m| (m.display_name, m.role))
        .collect();
    assert!(roles.contains(&("eve".into(), "admin".into())), "{roles:?}");
    assert!(
        roles.contains(&("Root".into(), "member".into())),
        "{roles:?}"
    );
    // The audit chain has both changes, by Root.
    meshd_tests::eventually("both role changes audited", || async {
        let rows = broker.db.audit_rows(&mesh.mesh_id).await.ok()?;
        let by: Vec<String> = rows
            .into_iter()
            .filter(|e| e.event_type == "member_role_changed")
            .map(|e| e.actor)
            .collect();
        (by == ["Root", "Root"]).then_some(())
    })
    .await?;
    Ok(())
}

/// Two people on two brokers of a shared mesh: typing and a read receipt cross the link;
/// the admin's dashboard shows the peer broker's link and who is on which broker; the
/// admin page unshares the mesh and the dashboard sees the link stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_on_two_brokers_and_the_link_in_the_dashboard() -> anyhow::Result<()> {
    use crate::federation::{B, linked_pair, replica};
    let p = linked_pair(|_| {}, Backend::Sqlite).await?;
    let mesh_b = replica(&p.b.db, &p.mesh.mesh_id).await?;
    let link_a = web_link(&p.a, &p.mesh.slug, Role::Admin).await?;
    let link_b = web_link(&p.b, &mesh_b.slug, Role::Member).await?;
    let mut ada = Browser::launch().await?;
    let mut bob = Browser::launch().await?;
    let steps = async {
        typing_dm_and_receipt(&mut ada, &link_a, &mut bob, &link_b, "are you there, Bob?")
            .await?;
        // The dashboard: the link to B carries the mesh; Bob is drawn on his broker.
        ada.click("#dash-btn").await?;
        let chip = format!("document.querySelector('#links li[data-broker=\"{B}\"]')");
        ada.wait_for(
            "the link to B flowing",
            &format!("(c => c && c.dataset.state === 'flowing')({chip})"),
        )
        .await?;
        ada.wait_for(
            "two brokers counted",
            "document.getElementById('card-brokers').textContent === '2'",
        )
        .await?;
        ada.readme_shot("webapp-federated").await?;
        // The admin page lists B as shared (offered from here), and unshares.
        ada.click("#admin-btn").await?;
        let share = format!("document.querySelector('#admin-shares li[data-broker=\"{B}\"]')");
        ada.wait_for(
            "B listed as shared",
            &format!("(l => l && l.innerText.includes('shared (offer)') && l.innerText.includes('flowing'))({share})"),
        )
        .await?;
        // Bob's home is B: his row names it and offers no action here.
        let bob_row = "document.querySelector('#admin-members tr[data-member=\"Bob\"]')";
        ada.wait_for(
            "Bob's row naming his broker",
            &format!("(r => r && r.innerText.includes('on {B}') && !r.querySelector('button'))({bob_row})"),
        )
        .await?;
        ada.readme_shot("webapp-admin").await?;
        ada.eval(&format!("{share}.querySelector('button[data-action=Unshare]').click()"))
            .await?;
        ada.wait_for(
            "B no longer shared",
            &format!("(l => l && l.innerText.includes('not shared'))({share})"),
        )
        .await?;
        // The dashboard (still subscribed behind the admin page) heard the link stop.
        ada.wait_for(
            "the link stop pushed to the dashboard",
            &format!("(c => c && c.dataset.state === 'stopped')({chip})"),
        )
        .await?;
        anyhow::Ok(())
    }
    .await;
    let r = ada.on_failure("webapp-fed-ada", steps).await;
    let r = bob.on_failure("webapp-fed-bob", r).await;
    ada.close().await;
    bob.close().await;
    r
}
