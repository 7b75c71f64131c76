//! The test client's crypto is libsodium's, byte for byte (vectors from libsodium 1.0.18,
//! see tests/vectors/gen_libsodium_vectors.py), and the broker verifies libsodium's
//! signatures.

use meshd_protocol::keys::{Pubkey, Signature};
use meshd_tests::Keypair;
use meshd_tests::crypto::{open, seal_with_nonce, x25519_public};
use serde_json::Value;

fn cases() -> Vec<Value> {
    let v: Value =
        serde_json::from_str(include_str!("../vectors/libsodium.json")).expect("vectors");
    v["cases"].as_array().expect("cases").clone()
}

fn s<'a>(c: &'a Value, k: &str) -> &'a str {
    c[k].as_str().expect(k)
}

#[test]
fn signatures_match_libsodium_and_verify_in_the_broker() {
    for c in cases() {
        let alice = Keypair::from_secret_hex(s(&c, "alice_secret_key"));
        assert_eq!(alice.public_hex(), s(&c, "alice_pubkey"));
        let msg = s(&c, "hello_message");
        assert_eq!(
            alice.sign_hex(msg),
            s(&c, "hello_signature"),
            "deterministic ed25519"
        );
        let pk = Pubkey::parse_hex(s(&c, "alice_pubkey")).unwrap();
        let sig = Signature::parse_hex(s(&c, "hello_signature")).unwrap();
        assert!(pk.verify(msg.as_bytes(), &sig));
        assert!(!pk.verify(format!("{msg}x").as_bytes(), &sig));
    }
}

#[test]
fn x25519_conversion_and_crypto_box_match_libsodium() {
    for c in cases() {
        let alice = Keypair::from_secret_hex(s(&c, "alice_secret_key"));
        let bob = Keypair::from_secret_hex(s(&c, "bob_secret_key"));
        assert_eq!(hex::encode(alice.x25519_secret()), s(&c, "alice_x25519_sk"));
        assert_eq!(
            hex::encode(x25519_public(s(&c, "alice_pubkey")).unwrap()),
            s(&c, "alice_x25519_pk")
        );
        let msg = hex::decode(s(&c, "box_message")).unwrap();
        let nonce: [u8; 24] = hex::decode(s(&c, "box_nonce")).unwrap().try_into().unwrap();
        let (nonce_b64, c_b64) = seal_with_nonce(&msg, &nonce, s(&c, "bob_pubkey"), &alice);
        use base64::Engine as _;
        let ours = base64::engine::general_purpose::STANDARD
            .decode(&c_b64)
            .unwrap();
        assert_eq!(
            hex::encode(&ours),
            s(&c, "box_alice_to_bob"),
            "crypto_box_easy output"
        );
        let opened = open(&nonce_b64, &c_b64, s(&c, "alice_pubkey"), &bob).unwrap();
        assert_eq!(opened.as_bytes(), &msg[..]);
        // Wrong recipient key: does not open.
        assert!(open(&nonce_b64, &c_b64, s(&c, "alice_pubkey"), &alice).is_none());
    }
}
