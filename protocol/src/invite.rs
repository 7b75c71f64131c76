//! claudemesh invite v1 (§7.1): the signed payload, its canonical string and the token.
//!
//! The token is `base64url(JSON(payload))` without padding, with the payload's keys in
//! the order below (the order `JSON.stringify` used when the reference minted them).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::keys::{Pubkey, SecretKey, Signature};

/// A member's role in a mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Ordinary member.
    Member,
    /// Administrator.
    Admin,
}

impl Role {
    /// Wire spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Member => "member",
            Self::Admin => "admin",
        }
    }

    /// Parses the wire spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "member" => Some(Self::Member),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// The invite payload, field order as on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvitePayload {
    /// Always 1.
    pub v: u32,
    /// Mesh id.
    pub mesh_id: String,
    /// Mesh slug.
    pub mesh_slug: String,
    /// WebSocket URL of the broker to enroll with.
    pub broker_url: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// The mesh root key, base64url.
    pub mesh_root_key: String,
    /// `admin` or `member` (kept as a string: the signature covers the text).
    pub role: String,
    /// Mesh owner key, 64 hex.
    pub owner_pubkey: String,
    /// Owner signature over [`InvitePayload::signing_string`], 128 hex.
    pub signature: String,
}

/// Why an invite token or payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InviteError {
    /// The token is not base64url JSON of a payload.
    #[error("invite token is not a base64url-encoded invite payload")]
    BadToken,
    /// `v` is not 1.
    #[error("unsupported invite version {0}")]
    Version(u32),
    /// The owner key or signature is not hex of the right length.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// The signature does not verify under `owner_pubkey`.
    #[error("invite signature does not verify")]
    BadSignature,
}

impl InvitePayload {
    /// Builds and signs a payload.
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        owner: &SecretKey,
        mesh_id: &str,
        mesh_slug: &str,
        broker_url: &str,
        expires_at: i64,
        mesh_root_key: &str,
        role: Role,
    ) -> Self {
        let mut p = Self {
            v: 1,
            mesh_id: mesh_id.to_owned(),
            mesh_slug: mesh_slug.to_owned(),
            broker_url: broker_url.to_owned(),
            expires_at,
            mesh_root_key: mesh_root_key.to_owned(),
            role: role.as_str().to_owned(),
            owner_pubkey: owner.public().to_hex(),
            signature: String::new(),
        };
        p.signature = owner.sign(p.signing_string().as_bytes()).to_hex();
        p
    }

    /// `v|mesh_id|mesh_slug|broker_url|expires_at|mesh_root_key|role|owner_pubkey`.
    pub fn signing_string(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}|{}|{}|{}",
            self.v,
            self.mesh_id,
            self.mesh_slug,
            self.broker_url,
            self.expires_at,
            self.mesh_root_key,
            self.role,
            self.owner_pubkey
        )
    }

    /// Checks the version and the owner's signature.
    ///
    /// # Errors
    /// [`InviteError::Version`], [`InviteError::Malformed`] or [`InviteError::BadSignature`].
    pub fn verify(&self) -> Result<Pubkey, InviteError> {
        if self.v != 1 {
            return Err(InviteError::Version(self.v));
        }
        let owner = Pubkey::parse_hex(&self.owner_pubkey)
            .map_err(|_| InviteError::Malformed("owner_pubkey"))?;
        let sig = Signature::parse_hex(&self.signature)
            .map_err(|_| InviteError::Malformed("signature"))?;
        if owner.verify(self.signing_string().as_bytes(), &sig) {
            Ok(owner)
        } else {
            Err(InviteError::BadSignature)
        }
    }

    /// The invite token: base64url (no padding) of the payload's JSON.
    pub fn to_token(&self) -> String {
        // Serialising a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        URL_SAFE_NO_PAD.encode(json)
    }

    /// Decodes a token. Tolerates trailing `=` padding.
    ///
    /// # Errors
    /// [`InviteError::BadToken`].
    pub fn from_token(token: &str) -> Result<Self, InviteError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(token.trim_end_matches('='))
            .map_err(|_| InviteError::BadToken)?;
        serde_json::from_slice(&bytes).map_err(|_| InviteError::BadToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (SecretKey, InvitePayload) {
        let owner = SecretKey::from_seed([8; 32]);
        let p = InvitePayload::sign(
            &owner,
            "meshid",
            "team",
            "ws://127.0.0.1:7900/ws",
            1_900_000_000,
            "cm9vdA",
            Role::Member,
        );
        (owner, p)
    }

    #[test]
    fn round_trips_and_verifies() {
        let (owner, p) = sample();
        assert_eq!(p.verify().unwrap(), owner.public());
        let token = p.to_token();
        assert!(!token.contains('=') && !token.contains('+') && !token.contains('/'));
        assert_eq!(InvitePayload::from_token(&token).unwrap(), p);
        // Key order is the reference's.
        let json = String::from_utf8(URL_SAFE_NO_PAD.decode(&token).unwrap()).unwrap();
        assert!(json.starts_with(r#"{"v":1,"mesh_id":"meshid","mesh_slug":"team","broker_url":"#));
        assert!(json.ends_with(&format!(r#""signature":"{}"}}"#, p.signature)));
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let (_, mut p) = sample();
        p.role = "admin".into();
        assert_eq!(p.verify(), Err(InviteError::BadSignature));
        let (_, mut p) = sample();
        p.v = 2;
        assert_eq!(p.verify(), Err(InviteError::Version(2)));
        assert_eq!(InvitePayload::from_token("!!!"), Err(InviteError::BadToken));
    }
}
