//! Vault (`vault_set`, `vault_list`, `vault_get`, `vault_delete`).

use meshd_tests::{Backend, Client, TestBroker};
use serde_json::json;

both! {
    /// A member's entries are its own: every session of the member sees them, another
    /// member sees none; a write replaces; the list carries no secret material; unknown
    /// keys are left out of `vault_get`; a bad entry is refused with its `_reqId`.
    async fn vault(b: Backend) -> anyhow::Result<()> {
        let broker = TestBroker::start(b).await?;
        let mesh = broker.create_mesh("vault").await?;
        let ann = broker.enroll(&mesh, "ann").await?;
        let bo = broker.enroll(&mesh, "bo").await?;
        let mut a = broker.connect(&ann).await?;
        let mut a2 = Client::connect_session(&broker.ws_url(), &ann).await?;
        let mut o = broker.connect(&bo).await?;

        let set = |key: &str, ct: &str| json!({"type": "vault_set", "key": key, "ciphertext": ct, "nonce": "bm9uY2U=", "sealed_key": "c2VhbA==", "entry_type": "env", "description": "token"});
        let ack = a.request(set("GITHUB_TOKEN", "Y3Qx")).await?;
        assert_eq!((ack["type"].as_str(), ack["key"].as_str(), ack["action"].as_str()), (Some("vault_ack"), Some("GITHUB_TOKEN"), Some("stored")), "{ack}");
        a.request(set("GITHUB_TOKEN", "Y3Qy")).await?;
        let file = json!({"type": "vault_set", "key": "cert", "ciphertext": "Y2VydA==", "nonce": "bg==", "sealed_key": "cw==", "entry_type": "file", "mount_path": "/run/cert.pem"});
        a2.request(file).await?;

        let list = a2.request(json!({"type": "vault_list"})).await?;
        assert_eq!(list["type"], "vault_list_result");
        let entries = list["entries"].as_array().cloned().unwrap_or_default();
        assert_eq!(entries.len(), 2, "{list}");
        assert_eq!((entries[0]["key"].as_str(), entries[0]["entry_type"].as_str(), entries[0]["mount_path"].as_str()), (Some("GITHUB_TOKEN"), Some("env"), None));
        assert_eq!((entries[1]["key"].as_str(), entries[1]["mount_path"].as_str()), (Some("cert"), Some("/run/cert.pem")));
        assert!(entries[0].get("ciphertext").is_none() && entries[0]["updated_at"].is_string(), "{list}");

        let got = a.request(json!({"type": "vault_get", "keys": ["GITHUB_TOKEN", "nope"]})).await?;
        assert_eq!(got["type"], "vault_get_result");
        assert_eq!(got["entries"].as_array().map(Vec::len), Some(1));
        assert_eq!((got["entries"][0]["ciphertext"].as_str(), got["entries"][0]["sealed_key"].as_str()), (Some("Y3Qy"), Some("c2VhbA==")), "the write replaced");

        let theirs = o.request(json!({"type": "vault_list"})).await?;
        assert_eq!(theirs["entries"], json!([]), "another member sees nothing");
        let theirs = o.request(json!({"type": "vault_get", "keys": ["GITHUB_TOKEN"]})).await?;
        assert_eq!(theirs["entries"], json!([]));
        let not_theirs = o.request(json!({"type": "vault_delete", "key": "GITHUB_TOKEN"})).await?;
        assert_eq!(not_theirs["action"], "not_found");

        let bad = a.request(json!({"type": "vault_set", "key": "X", "ciphertext": "", "nonce": "n", "sealed_key": "s"})).await?;
        assert_eq!(bad["type"], "error", "{bad}");

        let del = a.request(json!({"type": "vault_delete", "key": "GITHUB_TOKEN"})).await?;
        assert_eq!((del["type"].as_str(), del["action"].as_str()), (Some("vault_ack"), Some("deleted")));
        let again = a.request(json!({"type": "vault_delete", "key": "GITHUB_TOKEN"})).await?;
        assert_eq!(again["action"], "not_found");
        let left = a.request(json!({"type": "vault_list"})).await?;
        assert_eq!(left["entries"].as_array().map(Vec::len), Some(1));

        // Entries survive a restart.
        a.close().await;
        a2.close().await;
        o.close().await;
        let broker = broker.restart().await?;
        let mut a = broker.connect(&ann).await?;
        let kept = a.request(json!({"type": "vault_get", "keys": ["cert"]})).await?;
        assert_eq!(kept["entries"][0]["ciphertext"], "Y2VydA==");
        Ok(())
    }
}
