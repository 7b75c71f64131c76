//! Ed25519 keys and signatures as claudemesh encodes them.
//!
//! Public keys travel as 64 hex characters, signatures as 128, secret keys in libsodium's
//! 64-byte `seed || public key` form as 128. Verification uses
//! [`ed25519_dalek::VerifyingKey::verify_strict`], which rejects the small-order-key
//! forgeries that libsodium rejects and plain `verify` accepts.

use std::fmt;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

/// Why a key or signature string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Not exactly the expected number of hex digits.
    #[error("expected {expected} hex characters, got {got}")]
    Length {
        /// Hex characters expected.
        expected: usize,
        /// Characters received.
        got: usize,
    },
    /// A character outside `[0-9a-fA-F]`.
    #[error("not hexadecimal")]
    NotHex,
    /// The bytes are not a valid Ed25519 point or key pair.
    #[error("not a valid ed25519 key")]
    InvalidKey,
}

/// An Ed25519 public key (a member, session or mesh-owner identity).
///
/// Displays as 64 lowercase hex characters, the form every claudemesh client emits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pubkey([u8; 32]);

impl Pubkey {
    /// Parses 64 hex characters, in either case.
    ///
    /// # Errors
    /// [`KeyError::Length`] or [`KeyError::NotHex`].
    pub fn parse_hex(s: &str) -> Result<Self, KeyError> {
        Ok(Self(decode_hex::<32>(s)?))
    }

    /// Wraps raw key bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw key bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, the canonical claudemesh rendering.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Verifies a detached signature exactly as libsodium's
    /// `crypto_sign_verify_detached` would (strict: small-order keys and
    /// non-canonical scalars are refused).
    pub fn verify(&self, message: &[u8], signature: &Signature) -> bool {
        match VerifyingKey::from_bytes(&self.0) {
            Ok(vk) => vk
                .verify_strict(message, &ed25519_dalek::Signature::from_bytes(&signature.0))
                .is_ok(),
            Err(_) => false,
        }
    }
}

impl fmt::Display for Pubkey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Pubkey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pubkey({}…)", &self.to_hex()[..12])
    }
}

/// A detached Ed25519 signature (64 bytes, 128 hex characters on the wire).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature([u8; 64]);

impl Signature {
    /// Parses 128 hex characters, in either case.
    ///
    /// # Errors
    /// [`KeyError::Length`] or [`KeyError::NotHex`].
    pub fn parse_hex(s: &str) -> Result<Self, KeyError> {
        Ok(Self(decode_hex::<64>(s)?))
    }

    /// The raw signature bytes.
    pub const fn as_bytes(&self) -> &[u8; 64] {
        &self.0
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}…)", &self.to_hex()[..12])
    }
}

/// An Ed25519 signing key in libsodium's layout (`seed || public key`).
///
/// Its `Debug` never prints key material.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// Derives the key pair from a 32-byte seed. The caller supplies the randomness,
    /// which keeps this crate free of OS calls.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    /// Parses libsodium's 128-hex secret key and checks that its public half matches
    /// the seed.
    ///
    /// # Errors
    /// [`KeyError::Length`], [`KeyError::NotHex`] or [`KeyError::InvalidKey`] when the
    /// halves disagree.
    pub fn parse_hex(s: &str) -> Result<Self, KeyError> {
        let bytes = decode_hex::<64>(s)?;
        SigningKey::from_keypair_bytes(&bytes)
            .map(Self)
            .map_err(|_| KeyError::InvalidKey)
    }

    /// libsodium's 128-hex form (`seed || public key`).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.to_keypair_bytes())
    }

    /// The 32-byte seed.
    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The matching public key.
    pub fn public(&self) -> Pubkey {
        Pubkey(self.0.verifying_key().to_bytes())
    }

    /// Signs `message` (deterministic, byte-identical to `crypto_sign_detached`).
    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature(self.0.sign(message).to_bytes())
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public={})", self.public())
    }
}

/// True when `s` is exactly 64 lowercase hex characters, the form claudemesh clients use
/// to recognise a direct-message target.
pub fn is_lower_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn decode_hex<const N: usize>(s: &str) -> Result<[u8; N], KeyError> {
    if s.len() != N * 2 {
        return Err(KeyError::Length {
            expected: N * 2,
            got: s.len(),
        });
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).map_err(|_| KeyError::NotHex)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_case() {
        let sk = SecretKey::from_seed([7; 32]);
        let pk = sk.public();
        let upper = pk.to_hex().to_uppercase();
        assert_eq!(Pubkey::parse_hex(&upper).unwrap(), pk);
        assert_eq!(pk.to_string(), pk.to_hex());
        assert!(is_lower_hex64(&pk.to_hex()));
        assert!(!is_lower_hex64(&upper));
        assert_eq!(
            Pubkey::parse_hex("abc"),
            Err(KeyError::Length {
                expected: 64,
                got: 3
            })
        );
        assert_eq!(Pubkey::parse_hex(&"zz".repeat(32)), Err(KeyError::NotHex));
    }

    #[test]
    fn libsodium_secret_key_layout() {
        let sk = SecretKey::from_seed([9; 32]);
        let hex = sk.to_hex();
        assert_eq!(hex.len(), 128);
        assert_eq!(&hex[64..], sk.public().to_hex());
        let back = SecretKey::parse_hex(&hex).unwrap();
        assert_eq!(back.public(), sk.public());
        // A public half that does not belong to the seed is refused.
        let other = SecretKey::from_seed([10; 32]).public().to_hex();
        let forged = format!("{}{}", &hex[..64], other);
        assert_eq!(
            SecretKey::parse_hex(&forged).unwrap_err(),
            KeyError::InvalidKey
        );
    }

    #[test]
    fn verify_is_strict() {
        let sk = SecretKey::from_seed([1; 32]);
        let sig = sk.sign(b"hello");
        assert!(sk.public().verify(b"hello", &sig));
        assert!(!sk.public().verify(b"hellO", &sig));
        // The small-order forgery that non-strict verification accepts for any message:
        // public key 01 00..00 (the identity point), R = identity, S = 0.
        let mut pk = [0u8; 32];
        pk[0] = 1;
        let mut sig = [0u8; 64];
        sig[0] = 1;
        assert!(!Pubkey::from_bytes(pk).verify(b"anything", &Signature(sig)));
    }
}
