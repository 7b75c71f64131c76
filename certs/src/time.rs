//! The one place this crate reads the clock: issuing stamps validity from now, and the
//! convenience verifiers check against now (the `*_at` forms take the time).
#![allow(clippy::disallowed_methods)]

/// Now, for certificate validity periods.
pub(crate) fn now_utc() -> ::time::OffsetDateTime {
    ::time::OffsetDateTime::now_utc()
}

/// Now, for chain verification.
pub(crate) fn unix_now() -> rustls::pki_types::UnixTime {
    rustls::pki_types::UnixTime::now()
}
