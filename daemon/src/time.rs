//! The one place this crate reads a clock.
//!
//! State machines take `now` as an argument (so tests drive time by hand); the code
//! around them asks here. `clippy.toml` forbids clock reads (`Instant::now`,
//! `SystemTime::now`, `elapsed`) everywhere else, and CI runs clippy with `-D warnings`.
//! (The mesh's simulation clock is a feature: see `clock`.)
#![allow(clippy::disallowed_methods)]

use std::time::Duration;

/// Milliseconds since the Unix epoch (wall clock: stored timestamps, expiries).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The monotonic clock, as the runtime sees it (timers, deadlines, rate buckets).
pub(crate) fn instant() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

/// The monotonic clock as a std instant (where no runtime is involved).
pub(crate) fn std_instant() -> std::time::Instant {
    std::time::Instant::now()
}

/// Time since `t` (zero if `t` is in the future).
pub(crate) fn since(t: tokio::time::Instant) -> Duration {
    instant().saturating_duration_since(t)
}

/// Time since the std instant `t` (zero if `t` is in the future).
pub(crate) fn since_std(t: std::time::Instant) -> Duration {
    std_instant().saturating_duration_since(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wall_clock_is_in_milliseconds_since_the_epoch() {
        // 2023-11-14 and 2100-01-01: a clock read in seconds or µs falls outside.
        assert!((1_700_000_000_000..4_102_444_800_000).contains(&now_ms()));
    }

    #[test]
    fn elapsed_time_never_goes_negative() {
        let later = std_instant() + Duration::from_secs(60);
        assert_eq!(since_std(later), Duration::ZERO);
    }
}
