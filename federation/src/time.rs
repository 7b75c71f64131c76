//! The one place this crate reads the clock (see clippy.toml): link status times and
//! the age of an established link.
#![allow(clippy::disallowed_methods)]

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The monotonic clock.
pub(crate) fn instant() -> std::time::Instant {
    std::time::Instant::now()
}
