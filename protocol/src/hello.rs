//! Handshake verification: canonical strings, signature and freshness checks, and the
//! replay cache the reference broker lacked (§10.1.1).
//!
//! Membership (does this key belong to the mesh, is it revoked) needs the store, so the
//! daemon checks it after [`verify_hello`] succeeds.

use std::collections::{BTreeMap, HashSet};

use crate::client::{Hello, SessionHello};
use crate::keys::{Pubkey, Signature};

/// Accepted clock difference between client and broker (±60 s, as the reference).
pub const DEFAULT_SKEW_MS: i64 = 60_000;

/// Longest lifetime a session attestation may claim (24 h, as HEAD).
pub const MAX_ATTESTATION_TTL_MS: i64 = 24 * 3_600_000;

/// Why a handshake was refused. [`HelloError::code`] is the wire code; every one of
/// these is followed by a close with code 1008 and the code as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HelloError {
    /// Timestamp further than the allowed skew from the broker clock, or not an integer.
    #[error("timestamp outside the ±{0} ms window")]
    TimestampSkew(i64),
    /// A field has the wrong shape.
    #[error("malformed: {0}")]
    Malformed(&'static str),
    /// The signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// This exact signed hello was already used.
    #[error("this signed hello was already used")]
    Replayed,
    /// `sessionPubkey` is not a 64-hex key.
    #[error("sessionPubkey must be 64 hex characters")]
    BadSessionPubkey,
    /// `parentMemberPubkey` is not a 64-hex key.
    #[error("parentMemberPubkey must be 64 hex characters")]
    BadParentPubkey,
    /// The attestation names other keys than the hello.
    #[error("attestation does not match the hello's keys")]
    AttestationMismatch,
    /// The attestation has expired.
    #[error("attestation expired")]
    Expired,
    /// The attestation claims a lifetime over 24 h.
    #[error("attestation lifetime exceeds 24 h")]
    TtlTooLong,
    /// Too many handshakes in flight to remember them all.
    #[error("replay cache is full; retry shortly")]
    Busy,
}

impl HelloError {
    /// The reference's wire code.
    pub const fn code(&self) -> &'static str {
        match self {
            Self::TimestampSkew(_) => "timestamp_skew",
            Self::Malformed(_) => "malformed",
            Self::BadSignature => "bad_signature",
            Self::Replayed => "replayed",
            Self::BadSessionPubkey => "bad_session_pubkey",
            Self::BadParentPubkey => "bad_parent_pubkey",
            Self::AttestationMismatch => "attestation_mismatch",
            Self::Expired => "expired",
            Self::TtlTooLong => "ttl_too_long",
            Self::Busy => "capacity",
        }
    }
}

/// The UTF-8 bytes a member signs in `hello`: `meshId|memberId|pubkey|timestamp`.
pub fn hello_signing_string(
    mesh_id: &str,
    member_id: &str,
    pubkey: &str,
    timestamp: i64,
) -> String {
    format!("{mesh_id}|{member_id}|{pubkey}|{timestamp}")
}

/// The bytes a member signs to vouch for a session key.
pub fn attestation_signing_string(parent: &str, session: &str, expires_at: i64) -> String {
    format!("claudemesh-session-attest|{parent}|{session}|{expires_at}")
}

/// The bytes a session key signs in `session_hello`.
pub fn session_hello_signing_string(
    mesh_id: &str,
    parent: &str,
    session: &str,
    timestamp: i64,
) -> String {
    format!("claudemesh-session-hello|{mesh_id}|{parent}|{session}|{timestamp}")
}

/// A hello whose signature and freshness checked out.
#[derive(Debug, Clone)]
pub struct VerifiedHello {
    /// Member key (signed).
    pub member_pubkey: Pubkey,
    /// Session key (unsigned in `hello`; bound to the member by the daemon).
    pub session_pubkey: Option<Pubkey>,
    /// The signed timestamp.
    pub timestamp: i64,
    /// The signature, for the replay cache.
    pub signature: Signature,
}

/// Checks a `hello` in the reference's order: timestamp, format, signature; then the
/// session key's shape (HEAD). Does not consult the replay cache or membership.
///
/// # Errors
/// The first failing check, as a [`HelloError`].
pub fn verify_hello(hello: &Hello, now_ms: i64, skew_ms: i64) -> Result<VerifiedHello, HelloError> {
    let timestamp = check_timestamp(&hello.timestamp, now_ms, skew_ms)?;
    let member_pubkey =
        Pubkey::parse_hex(&hello.pubkey).map_err(|_| HelloError::Malformed("pubkey"))?;
    let signature =
        Signature::parse_hex(&hello.signature).map_err(|_| HelloError::Malformed("signature"))?;
    let message = hello_signing_string(&hello.mesh_id, &hello.member_id, &hello.pubkey, timestamp);
    if !member_pubkey.verify(message.as_bytes(), &signature) {
        return Err(HelloError::BadSignature);
    }
    let session_pubkey = match hello.session_pubkey.as_deref() {
        None | Some("") => None,
        Some(s) => Some(Pubkey::parse_hex(s).map_err(|_| HelloError::BadSessionPubkey)?),
    };
    Ok(VerifiedHello {
        member_pubkey,
        session_pubkey,
        timestamp,
        signature,
    })
}

/// A `session_hello` whose attestation and signature checked out.
#[derive(Debug, Clone)]
pub struct VerifiedSessionHello {
    /// The vouching member key.
    pub member_pubkey: Pubkey,
    /// The session key.
    pub session_pubkey: Pubkey,
    /// Signed timestamp.
    pub timestamp: i64,
    /// The session signature, for the replay cache.
    pub signature: Signature,
}

/// Checks a `session_hello` in HEAD's order (§2.6): key shapes, attestation binding,
/// attestation expiry and signature, then the session signature and freshness.
///
/// # Errors
/// The first failing check, as a [`HelloError`].
pub fn verify_session_hello(
    hello: &SessionHello,
    now_ms: i64,
    skew_ms: i64,
) -> Result<VerifiedSessionHello, HelloError> {
    let session_pubkey =
        Pubkey::parse_hex(&hello.session_pubkey).map_err(|_| HelloError::BadSessionPubkey)?;
    let member_pubkey =
        Pubkey::parse_hex(&hello.parent_member_pubkey).map_err(|_| HelloError::BadParentPubkey)?;
    let att = &hello.parent_attestation;
    if !att
        .session_pubkey
        .eq_ignore_ascii_case(&hello.session_pubkey)
        || !att
            .parent_member_pubkey
            .eq_ignore_ascii_case(&hello.parent_member_pubkey)
    {
        return Err(HelloError::AttestationMismatch);
    }
    let expires_at = att
        .expires_at
        .as_i64()
        .ok_or(HelloError::Malformed("attestation expiresAt"))?;
    if expires_at <= now_ms {
        return Err(HelloError::Expired);
    }
    if expires_at > now_ms.saturating_add(MAX_ATTESTATION_TTL_MS) {
        return Err(HelloError::TtlTooLong);
    }
    let att_sig = Signature::parse_hex(&att.signature)
        .map_err(|_| HelloError::Malformed("attestation signature"))?;
    let att_msg =
        attestation_signing_string(&att.parent_member_pubkey, &att.session_pubkey, expires_at);
    if !member_pubkey.verify(att_msg.as_bytes(), &att_sig) {
        return Err(HelloError::BadSignature);
    }
    let timestamp = check_timestamp(&hello.timestamp, now_ms, skew_ms)?;
    let signature =
        Signature::parse_hex(&hello.signature).map_err(|_| HelloError::Malformed("signature"))?;
    let msg = session_hello_signing_string(
        &hello.mesh_id,
        &hello.parent_member_pubkey,
        &hello.session_pubkey,
        timestamp,
    );
    if !session_pubkey.verify(msg.as_bytes(), &signature) {
        return Err(HelloError::BadSignature);
    }
    Ok(VerifiedSessionHello {
        member_pubkey,
        session_pubkey,
        timestamp,
        signature,
    })
}

fn check_timestamp(ts: &serde_json::Number, now_ms: i64, skew_ms: i64) -> Result<i64, HelloError> {
    let ts = ts.as_i64().ok_or(HelloError::TimestampSkew(skew_ms))?;
    if ts.abs_diff(now_ms) > skew_ms.unsigned_abs() {
        return Err(HelloError::TimestampSkew(skew_ms));
    }
    Ok(ts)
}

/// Remembers every accepted handshake signature until its timestamp leaves the skew
/// window, so a captured hello cannot be replayed from another socket.
///
/// Ed25519 signatures are deterministic, so the signature alone identifies the signed
/// `(mesh, member, key, timestamp)` tuple. The daemon inserts a signature only after it
/// verified it *and* found the key to be a live member, so filling the cache takes
/// members; it is bounded all the same, and expiry is by time order, O(log n).
#[derive(Debug)]
pub struct ReplayCache {
    seen: HashSet<[u8; 64]>,
    by_expiry: BTreeMap<i64, Vec<[u8; 64]>>,
    capacity: usize,
    window_ms: i64,
}

impl ReplayCache {
    /// A cache for handshakes valid within `window_ms` of the clock, holding at most
    /// `capacity` entries.
    pub fn new(window_ms: i64, capacity: usize) -> Self {
        Self {
            seen: HashSet::new(),
            by_expiry: BTreeMap::new(),
            capacity,
            window_ms,
        }
    }

    /// Records a verified handshake.
    ///
    /// # Errors
    /// [`HelloError::Replayed`] when the signature was seen before;
    /// [`HelloError::Busy`] when the cache is full of still-valid entries.
    pub fn check_and_insert(
        &mut self,
        signature: &Signature,
        timestamp: i64,
        now_ms: i64,
    ) -> Result<(), HelloError> {
        while let Some(entry) = self.by_expiry.first_entry() {
            if *entry.key() > now_ms {
                break;
            }
            for sig in entry.remove() {
                self.seen.remove(&sig);
            }
        }
        if self.seen.contains(signature.as_bytes()) {
            return Err(HelloError::Replayed);
        }
        if self.seen.len() >= self.capacity {
            return Err(HelloError::Busy);
        }
        // After timestamp + window the hello fails the skew check anyway.
        self.seen.insert(*signature.as_bytes());
        self.by_expiry
            .entry(timestamp.saturating_add(self.window_ms))
            .or_default()
            .push(*signature.as_bytes());
        Ok(())
    }

    /// Entries currently remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ClientFrame, decode};
    use crate::keys::SecretKey;

    const NOW: i64 = 1_775_599_200_000;

    fn hello_json(sk: &SecretKey, mesh: &str, member: &str, ts: i64) -> String {
        let pk = sk.public().to_hex();
        let sig = sk.sign(hello_signing_string(mesh, member, &pk, ts).as_bytes());
        format!(
            r#"{{"type":"hello","meshId":"{mesh}","memberId":"{member}","pubkey":"{pk}","sessionId":"s","pid":1,"timestamp":{ts},"signature":"{}"}}"#,
            sig.to_hex()
        )
    }

    fn parse(text: &str) -> Hello {
        match decode(text).unwrap().frame {
            ClientFrame::Hello(h) => *h,
            _ => unreachable!(),
        }
    }

    #[test]
    fn accepts_a_good_hello() {
        let sk = SecretKey::from_seed([3; 32]);
        let h = parse(&hello_json(&sk, "mesh1", "mem1", NOW - 59_000));
        let v = verify_hello(&h, NOW, DEFAULT_SKEW_MS).unwrap();
        assert_eq!(v.member_pubkey, sk.public());
        assert_eq!(v.session_pubkey, None);
    }

    #[test]
    fn refuses_in_the_reference_order() {
        let sk = SecretKey::from_seed([3; 32]);
        let h = parse(&hello_json(&sk, "mesh1", "mem1", NOW - 61_000));
        assert_eq!(
            verify_hello(&h, NOW, DEFAULT_SKEW_MS).unwrap_err().code(),
            "timestamp_skew"
        );
        // Signed for another member id: the canonical string differs.
        let mut h = parse(&hello_json(&sk, "mesh1", "mem1", NOW));
        h.member_id = "mem2".into();
        assert_eq!(
            verify_hello(&h, NOW, DEFAULT_SKEW_MS).unwrap_err(),
            HelloError::BadSignature
        );
        let mut h = parse(&hello_json(&sk, "mesh1", "mem1", NOW));
        h.signature = "00".into();
        assert_eq!(
            verify_hello(&h, NOW, DEFAULT_SKEW_MS).unwrap_err().code(),
            "malformed"
        );
        let mut h = parse(&hello_json(&sk, "mesh1", "mem1", NOW));
        h.session_pubkey = Some("xyz".into());
        assert_eq!(
            verify_hello(&h, NOW, DEFAULT_SKEW_MS).unwrap_err(),
            HelloError::BadSessionPubkey
        );
    }

    #[test]
    fn non_integer_timestamp_is_skew() {
        let text = r#"{"type":"hello","meshId":"m","memberId":"u","pubkey":"aa","timestamp":1.5,"signature":"bb"}"#;
        assert_eq!(
            verify_hello(&parse(text), NOW, DEFAULT_SKEW_MS)
                .unwrap_err()
                .code(),
            "timestamp_skew"
        );
    }

    #[test]
    fn replay_cache_refuses_reuse_until_expiry() {
        let sk = SecretKey::from_seed([4; 32]);
        let sig = sk.sign(b"x");
        let mut cache = ReplayCache::new(DEFAULT_SKEW_MS, 10);
        cache.check_and_insert(&sig, NOW, NOW).unwrap();
        assert_eq!(
            cache.check_and_insert(&sig, NOW, NOW + 1),
            Err(HelloError::Replayed)
        );
        // Once the timestamp is out of the window the entry is dropped.
        cache.check_and_insert(&sig, NOW, NOW + 70_000).unwrap();
    }

    #[test]
    fn replay_cache_is_bounded() {
        let sk = SecretKey::from_seed([5; 32]);
        let mut cache = ReplayCache::new(DEFAULT_SKEW_MS, 2);
        cache.check_and_insert(&sk.sign(b"1"), NOW, NOW).unwrap();
        cache.check_and_insert(&sk.sign(b"2"), NOW, NOW).unwrap();
        assert_eq!(
            cache.check_and_insert(&sk.sign(b"3"), NOW, NOW),
            Err(HelloError::Busy)
        );
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn session_hello_checks() {
        let member = SecretKey::from_seed([6; 32]);
        let session = SecretKey::from_seed([7; 32]);
        let (mpk, spk) = (member.public().to_hex(), session.public().to_hex());
        let make = |expires: i64, ts: i64, att_signer: &SecretKey| {
            let att = att_signer.sign(attestation_signing_string(&mpk, &spk, expires).as_bytes());
            let sig = session.sign(session_hello_signing_string("m", &mpk, &spk, ts).as_bytes());
            let text = format!(
                r#"{{"type":"session_hello","meshId":"m","parentMemberPubkey":"{mpk}","sessionPubkey":"{spk}",
                "parentAttestation":{{"sessionPubkey":"{spk}","parentMemberPubkey":"{mpk}","expiresAt":{expires},"signature":"{}"}},
                "timestamp":{ts},"signature":"{}"}}"#,
                att.to_hex(),
                sig.to_hex()
            );
            match decode(&text).unwrap().frame {
                ClientFrame::SessionHello(h) => *h,
                _ => unreachable!(),
            }
        };
        let ok = make(NOW + 3_600_000, NOW, &member);
        let v = verify_session_hello(&ok, NOW, DEFAULT_SKEW_MS).unwrap();
        assert_eq!(
            (v.member_pubkey, v.session_pubkey),
            (member.public(), session.public())
        );

        let codes = |h: &SessionHello| {
            verify_session_hello(h, NOW, DEFAULT_SKEW_MS)
                .unwrap_err()
                .code()
        };
        assert_eq!(codes(&make(NOW - 1, NOW, &member)), "expired");
        assert_eq!(
            codes(&make(NOW + 25 * 3_600_000, NOW, &member)),
            "ttl_too_long"
        );
        assert_eq!(codes(&make(NOW + 1000, NOW, &session)), "bad_signature");
        assert_eq!(
            codes(&make(NOW + 1000, NOW - 120_000, &member)),
            "timestamp_skew"
        );
        let mut mismatch = ok.clone();
        mismatch.parent_attestation.session_pubkey = mpk.clone();
        assert_eq!(codes(&mismatch), "attestation_mismatch");
    }
}
