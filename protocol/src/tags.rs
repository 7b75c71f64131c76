//! Tags: labels a message carries (`send.tags`, `tag:NAME` targets) and peers subscribe
//! to (`subscribe_tags`). An extension of the claudemesh protocol: every field is extra,
//! so clients that do not know tags ignore them.
//!
//! A tag is 1..=[`MAX_TAG_LEN`] bytes of ASCII letters, digits and `- _ . : /`, compared
//! exactly (case-sensitive). Link policies and bridges filter by *prefix*
//! ([`matches_prefix`]): `ops` admits `ops`, `ops/db` and `opsec`; write `ops/` to mean
//! the `ops/…` family only.

/// Tags one message may carry (its `tag:` target included).
pub const MAX_TAGS: usize = 8;
/// Bytes of one tag.
pub const MAX_TAG_LEN: usize = 64;
/// Tags one presence may subscribe to.
pub const MAX_SUBSCRIPTIONS: usize = 64;

/// Why a tag list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    /// A tag is empty, too long, or has a character outside the alphabet.
    #[error("invalid tag {0:?}: 1..=64 bytes of letters, digits and - _ . : /")]
    Invalid(String),
    /// More tags than allowed.
    #[error("too many tags: {count} (max {max})")]
    TooMany {
        /// Distinct tags given.
        count: usize,
        /// The limit.
        max: usize,
    },
}

/// Whether `tag` is well formed.
pub fn valid(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/'))
}

/// Validates a list, drops duplicates (first occurrence kept) and enforces `max`.
///
/// # Errors
/// [`TagError`] naming the first bad tag, or the count.
pub fn normalize(tags: Vec<String>, max: usize) -> Result<Vec<String>, TagError> {
    let mut out: Vec<String> = Vec::with_capacity(tags.len().min(max));
    for t in tags {
        if !valid(&t) {
            return Err(TagError::Invalid(t));
        }
        if !out.contains(&t) {
            out.push(t);
        }
    }
    if out.len() > max {
        return Err(TagError::TooMany {
            count: out.len(),
            max,
        });
    }
    Ok(out)
}

/// Whether `tag` is admitted by the prefix `prefix` (plain byte prefix; an empty
/// prefix admits every tag).
pub fn matches_prefix(tag: &str, prefix: &str) -> bool {
    tag.starts_with(prefix)
}

/// Whether any of `tags` starts with any of `prefixes`.
pub fn any_matches(tags: &[String], prefixes: &[String]) -> bool {
    tags.iter()
        .any(|t| prefixes.iter().any(|p| matches_prefix(t, p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alphabet_and_length_are_enforced() {
        for ok in ["ops", "a", "sales/emea", "v1.2:rc-3_x", &"x".repeat(64)] {
            assert!(valid(ok), "{ok}");
        }
        for bad in [
            "",
            "with space",
            "ünï",
            "a,b",
            "#topic",
            &"x".repeat(65),
            "new\nline",
        ] {
            assert!(!valid(bad), "{bad:?}");
        }
    }

    #[test]
    fn normalize_dedups_keeps_order_and_counts_distinct_tags() {
        let v = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(normalize(v(&["b", "a", "b"]), 2), Ok(v(&["b", "a"])));
        assert_eq!(
            normalize(v(&["a", "b", "c"]), 2),
            Err(TagError::TooMany { count: 3, max: 2 })
        );
        assert_eq!(
            normalize(v(&["a", "no good"]), 8),
            Err(TagError::Invalid("no good".into()))
        );
        assert_eq!(normalize(Vec::new(), 0), Ok(Vec::new()));
    }

    #[test]
    fn prefixes_are_plain_byte_prefixes() {
        assert!(matches_prefix("ops/db", "ops"));
        assert!(matches_prefix("opsec", "ops"));
        assert!(!matches_prefix("opsec", "ops/"));
        assert!(matches_prefix("anything", ""));
        let tags = vec!["sales/emea".to_owned(), "urgent".to_owned()];
        assert!(any_matches(&tags, &["urg".to_owned()]));
        assert!(!any_matches(&tags, &["ops".to_owned()]));
        assert!(!any_matches(&[], &[String::new()]));
    }
}
