//! Identifiers (message ids, uuids, random tokens) and the plausibility check for ids
//! strangers send.
//!
//! Ids are drawn from the OS CSPRNG: the reference used `Math.random`, which let a
//! guessed `messageId` reveal a target through `message_status` (§10.1.8).

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Fills `buf` from the OS CSPRNG, through a per-thread buffer refilled 4 KiB at a
/// time (one `getrandom(2)` per ~100 ids instead of one per id; the bytes are the
/// kernel's either way, and meshd never forks).
///
/// # Panics
/// If the kernel cannot provide randomness, which leaves no safe way to mint keys or
/// ids; on Linux `getrandom(2)` does not fail once the pool is initialised.
#[allow(clippy::expect_used)]
pub(crate) fn fill_random(buf: &mut [u8]) {
    use std::cell::RefCell;
    const POOL: usize = 4096;
    thread_local! {
        static RANDOM: RefCell<(Box<[u8; POOL]>, usize)> = RefCell::new((Box::new([0; POOL]), POOL));
    }
    if buf.len() > POOL / 4 {
        getrandom::fill(buf).expect("the operating system's random number generator failed");
        return;
    }
    RANDOM.with_borrow_mut(|(pool, used)| {
        let mut filled = 0;
        while filled < buf.len() {
            if *used == POOL {
                getrandom::fill(&mut pool[..])
                    .expect("the operating system's random number generator failed");
                *used = 0;
            }
            let n = (buf.len() - filled).min(POOL - *used);
            buf[filled..filled + n].copy_from_slice(&pool[*used..*used + n]);
            // Never hand out the same bytes twice.
            pool[*used..*used + n].fill(0);
            *used += n;
            filled += n;
        }
    });
}

/// `N` random bytes.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    fill_random(&mut b);
    b
}

/// A 32-character `[0-9A-Za-z]` id (≈190 bits), the reference's id shape.
pub(crate) fn random_id() -> String {
    let mut out = String::with_capacity(32);
    push_random_base62(&mut out, 32);
    out
}

/// Appends random `[0-9A-Za-z]` characters until `out` is `len` long.
fn push_random_base62(out: &mut String, len: usize) {
    let mut buf = [0u8; 48];
    while out.len() < len {
        fill_random(&mut buf);
        // Rejection sampling keeps the distribution uniform (248 = 4 × 62).
        for b in buf {
            if b < 248 && out.len() < len {
                out.push(ALPHABET[usize::from(b % 62)] as char);
            }
        }
    }
}

/// A message id: 8 base62 characters of the millisecond clock, then 24 random ones
/// (≈142 bits). Still 32 `[0-9A-Za-z]` characters and unguessable, but time-ordered, so
/// the store's unique index on message ids grows at its end instead of dirtying random
/// pages on every commit.
pub(crate) fn message_id() -> String {
    let mut out = String::with_capacity(32);
    let mut t = u64::try_from(crate::time::now_ms()).unwrap_or(0);
    let mut prefix = [b'0'; 8];
    for slot in prefix.iter_mut().rev() {
        *slot = ALPHABET[(t % 62) as usize];
        t /= 62;
    }
    out.extend(prefix.iter().map(|&b| b as char));
    push_random_base62(&mut out, 32);
    out
}

/// A random UUIDv4, the reference's id for system pushes.
pub(crate) fn uuid_v4() -> String {
    let mut b: [u8; 16] = random_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Whether `s` could be an id meshd generated (mesh, member, file ids: base62, `-`, `_`,
/// at most 64 bytes): what strangers send as an id is checked with this before it is
/// used as a key anywhere.
pub(crate) fn plausible_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let a = random_id();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(a, random_id());
        let m1 = message_id();
        assert_eq!(m1.len(), 32);
        assert!(m1.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert!(m1[..8] <= message_id()[..8], "time-ordered prefix");
        assert_ne!(m1[8..], message_id()[8..]);
        let u = uuid_v4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(crate::time::now_ms() > 1_700_000_000_000);
        assert!(plausible_id(&a) && plausible_id(&u) && plausible_id("a-b_c"));
        assert!(!plausible_id("") && !plausible_id("a/b") && !plausible_id(&"x".repeat(65)));
    }
}
