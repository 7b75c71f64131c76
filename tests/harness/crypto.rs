//! The claudemesh client crypto, as the CLI and SDK do it with libsodium: ed25519 keys in
//! libsodium's layout, `crypto_box_easy` between X25519 keys converted from ed25519, and
//! standard padded base64. Checked byte-for-byte against libsodium in `it::compat`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use dryoc::classic::crypto_box::{crypto_box_easy, crypto_box_open_easy};
use dryoc::classic::crypto_sign_ed25519::{
    crypto_sign_ed25519_pk_to_curve25519, crypto_sign_ed25519_sk_to_curve25519,
};
use meshd_protocol::keys::SecretKey;

/// An ed25519 identity (member or session).
#[derive(Clone, Debug)]
pub struct Keypair {
    /// The signing key.
    pub secret: SecretKey,
}

impl Keypair {
    /// A fresh random key pair (`crypto_sign_keypair`).
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).expect("OS randomness");
        Self {
            secret: SecretKey::from_seed(seed),
        }
    }

    /// From libsodium's 128-hex secret key.
    pub fn from_secret_hex(hex: &str) -> Self {
        Self {
            secret: SecretKey::parse_hex(hex).expect("libsodium secret key"),
        }
    }

    /// Public key, 64 lowercase hex.
    pub fn public_hex(&self) -> String {
        self.secret.public().to_hex()
    }

    /// Detached signature, 128 hex.
    pub fn sign_hex(&self, message: &str) -> String {
        self.secret.sign(message.as_bytes()).to_hex()
    }

    fn sk64(&self) -> [u8; 64] {
        let mut sk = [0u8; 64];
        sk.copy_from_slice(&hex::decode(self.secret.to_hex()).expect("hex"));
        sk
    }

    /// `crypto_sign_ed25519_sk_to_curve25519`.
    pub fn x25519_secret(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        crypto_sign_ed25519_sk_to_curve25519(&mut out, &self.sk64());
        out
    }
}

/// `crypto_sign_ed25519_pk_to_curve25519` of a 64-hex ed25519 key.
pub fn x25519_public(ed25519_hex: &str) -> Option<[u8; 32]> {
    let pk: [u8; 32] = hex::decode(ed25519_hex).ok()?.try_into().ok()?;
    let mut out = [0u8; 32];
    crypto_sign_ed25519_pk_to_curve25519(&mut out, &pk).ok()?;
    Some(out)
}

/// Encrypts a DM like the CLI: returns base64 `(nonce, ciphertext)`.
pub fn seal(plaintext: &str, recipient_ed25519_hex: &str, sender: &Keypair) -> (String, String) {
    let mut nonce = [0u8; 24];
    getrandom::fill(&mut nonce).expect("OS randomness");
    seal_with_nonce(plaintext.as_bytes(), &nonce, recipient_ed25519_hex, sender)
}

/// [`seal`] with a given nonce (for test vectors).
pub fn seal_with_nonce(
    plaintext: &[u8],
    nonce: &[u8; 24],
    recipient_ed25519_hex: &str,
    sender: &Keypair,
) -> (String, String) {
    let rpk = x25519_public(recipient_ed25519_hex).expect("recipient key");
    let mut c = vec![0u8; plaintext.len() + 16];
    crypto_box_easy(&mut c, plaintext, nonce, &rpk, &sender.x25519_secret())
        .expect("crypto_box_easy");
    (STANDARD.encode(nonce), STANDARD.encode(c))
}

/// Opens a DM like the CLI: `crypto_box_open_easy` with the push's `senderPubkey` and
/// our own key. `None` when it does not authenticate.
pub fn open(
    nonce_b64: &str,
    ciphertext_b64: &str,
    sender_ed25519_hex: &str,
    me: &Keypair,
) -> Option<String> {
    let nonce: [u8; 24] = STANDARD.decode(nonce_b64).ok()?.try_into().ok()?;
    let c = STANDARD.decode(ciphertext_b64).ok()?;
    if c.len() < 16 {
        return None;
    }
    let spk = x25519_public(sender_ed25519_hex)?;
    let mut m = vec![0u8; c.len() - 16];
    crypto_box_open_easy(&mut m, &c, &nonce, &spk, &me.x25519_secret()).ok()?;
    String::from_utf8(m).ok()
}

/// Plaintext "encryption" for broadcasts and groups: base64 of the text and a random
/// 24-byte placeholder nonce (§5.3).
pub fn plain(text: &str) -> (String, String) {
    let mut nonce = [0u8; 24];
    getrandom::fill(&mut nonce).expect("OS randomness");
    (STANDARD.encode(nonce), STANDARD.encode(text.as_bytes()))
}

/// Decodes a plaintext broadcast body.
pub fn unplain(ciphertext_b64: &str) -> Option<String> {
    String::from_utf8(STANDARD.decode(ciphertext_b64).ok()?).ok()
}
