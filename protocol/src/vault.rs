//! Vault frames (HEAD addendum §5): a member's own encrypted secrets. The broker keeps
//! opaque blobs (the client encrypts with a random key it seals to its member key);
//! fields are snake_case on the wire, as the reference sends them.

use serde::{Deserialize, Serialize};

/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 256;
/// Longest description or mount path accepted.
pub const MAX_TEXT_LEN: usize = 1024;

/// `entry_type`: how a deployed service would receive the secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryType {
    /// An environment variable.
    Env,
    /// A file at `mount_path`.
    File,
}

impl EntryType {
    /// The stored spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Env => "env",
            Self::File => "file",
        }
    }

    /// Parses the stored spelling (anything unknown reads as `env`).
    pub fn parse(s: &str) -> Self {
        if s == "file" { Self::File } else { Self::Env }
    }
}

/// `vault_set`.
#[derive(Debug, Clone, Deserialize)]
pub struct VaultSet {
    /// Name of the secret.
    pub key: String,
    /// `crypto_secretbox` of the value, base64.
    pub ciphertext: String,
    /// Its nonce, base64.
    pub nonce: String,
    /// The value key sealed to the member key, base64.
    pub sealed_key: String,
    /// `env` (default) or `file`.
    #[serde(default = "default_type")]
    pub entry_type: EntryType,
    /// Where a `file` entry is mounted.
    #[serde(default)]
    pub mount_path: Option<String>,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
}

const fn default_type() -> EntryType {
    EntryType::Env
}

/// A vault request.
#[derive(Debug, Clone)]
pub enum Request {
    /// Store or replace one entry.
    Set(Box<VaultSet>),
    /// List entries (no ciphertext).
    List,
    /// Fetch entries by key (unknown keys are omitted).
    Get {
        /// Keys.
        keys: Vec<String>,
    },
    /// Delete one entry.
    Delete {
        /// Key.
        key: String,
    },
}

/// Decodes the body of a vault frame of type `kind`.
///
/// # Errors
/// Missing or oversized fields.
pub fn decode(kind: &str, text: &str) -> Result<Request, serde_json::Error> {
    use serde::de::Error as _;
    #[derive(Deserialize)]
    struct KeyBody {
        key: String,
    }
    #[derive(Deserialize)]
    struct KeysBody {
        #[serde(default)]
        keys: Vec<String>,
    }
    let check_key = |k: &str| {
        if k.is_empty() || k.len() > MAX_KEY_LEN {
            Err(serde_json::Error::custom(format!(
                "key must be 1..={MAX_KEY_LEN} bytes"
            )))
        } else {
            Ok(())
        }
    };
    Ok(match kind {
        "vault_set" => {
            let b: VaultSet = serde_json::from_str(text)?;
            check_key(&b.key)?;
            if b.ciphertext.is_empty() || b.nonce.is_empty() || b.sealed_key.is_empty() {
                return Err(serde_json::Error::custom(
                    "ciphertext, nonce and sealed_key are required",
                ));
            }
            let long = |s: &Option<String>| s.as_ref().is_some_and(|s| s.len() > MAX_TEXT_LEN);
            if long(&b.mount_path) || long(&b.description) {
                return Err(serde_json::Error::custom(format!(
                    "mount_path and description are at most {MAX_TEXT_LEN} bytes"
                )));
            }
            Request::Set(Box::new(b))
        }
        "vault_get" => Request::Get {
            keys: serde_json::from_str::<KeysBody>(text)?.keys,
        },
        "vault_delete" => {
            let key = serde_json::from_str::<KeyBody>(text)?.key;
            check_key(&key)?;
            Request::Delete { key }
        }
        _ => Request::List,
    })
}

/// One entry of `vault_list_result` (no secret material).
#[derive(Debug, Clone, Serialize)]
pub struct ListedEntry {
    /// Key.
    pub key: String,
    /// `env` or `file`.
    pub entry_type: EntryType,
    /// Mount path of a `file` entry.
    pub mount_path: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// ISO time of the last write.
    pub updated_at: String,
}

/// One entry of `vault_get_result`.
#[derive(Debug, Clone, Serialize)]
pub struct SecretEntry {
    /// Key.
    pub key: String,
    /// Encrypted value, base64.
    pub ciphertext: String,
    /// Nonce, base64.
    pub nonce: String,
    /// Sealed value key, base64.
    pub sealed_key: String,
    /// `env` or `file`.
    pub entry_type: EntryType,
    /// Mount path.
    pub mount_path: Option<String>,
}

/// A vault reply.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// Answer to `vault_set` (`stored`) and `vault_delete` (`deleted`/`not_found`).
    VaultAck {
        /// Key.
        key: String,
        /// What happened.
        action: &'static str,
        /// Correlation id.
        #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
    /// Answer to `vault_list`.
    VaultListResult {
        /// Entries, by key.
        entries: Vec<ListedEntry>,
        /// Correlation id.
        #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
    /// Answer to `vault_get`.
    VaultGetResult {
        /// The entries found.
        entries: Vec<SecretEntry>,
        /// Correlation id.
        #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_needs_every_blob_and_a_sane_key() {
        let ok = r#"{"key":"API_TOKEN","ciphertext":"Y3Q=","nonce":"bm9uY2U=","sealed_key":"c2s=","entry_type":"file","mount_path":"/run/x"}"#;
        let Ok(Request::Set(s)) = decode("vault_set", ok) else {
            panic!("not decoded")
        };
        assert_eq!(
            (s.entry_type, s.mount_path.as_deref()),
            (EntryType::File, Some("/run/x"))
        );
        assert!(
            decode(
                "vault_set",
                r#"{"key":"K","ciphertext":"","nonce":"n","sealed_key":"s"}"#
            )
            .is_err()
        );
        assert!(
            decode(
                "vault_set",
                r#"{"key":"","ciphertext":"c","nonce":"n","sealed_key":"s"}"#
            )
            .is_err()
        );
        assert!(
            decode(
                "vault_set",
                r#"{"key":"K","ciphertext":"c","nonce":"n","sealed_key":"s","entry_type":"blob"}"#
            )
            .is_err()
        );
        let long = format!(r#"{{"key":"{}"}}"#, "k".repeat(MAX_KEY_LEN + 1));
        assert!(decode("vault_delete", &long).is_err());
        assert!(matches!(decode("vault_get", "{}"), Ok(Request::Get { keys }) if keys.is_empty()));
    }
}
