//! Key material on disk for meshd.
//!
//! - [`secret`]: secret files are written atomically with mode 0600 inside a 0700
//!   directory, and a secret file that others can read is refused with a message naming
//!   the file and the fix.
//! - [`pki`]: the org CA (`ca.pem` + `ca.key`), broker certificates issued by it, the
//!   bundle an org hands to its peers, and loading a broker's identity for the daemon.
//! - [`trust`]: which peer brokers we accept, each bound to its own org CA (or a pin of
//!   it), and the rustls client/server configurations that enforce it.
//!
//! Every rustls object here is built with the *ring* provider explicitly, so nothing
//! depends on a process-wide default provider. This crate never opens a socket.

#![warn(missing_docs)]

mod der;
pub mod pki;
pub mod secret;
mod time;
pub mod trust;

#[cfg(test)]
mod testutil;

pub use pki::{
    BrokerCertPaths, BrokerIdentity, Bundle, CA_CERT_FILE, CA_KEY_FILE, CaError, CaFileError,
    IdentityError, IssueError, OrgCa, PinError, fingerprint_sha256, parse_pin,
};
pub use secret::{
    SecretFileError, already_exists, check_not_world_accessible, create_secret_file,
    ensure_private_dir, read_secret_file, write_secret_file,
};
pub use trust::{PeerAnchor, PeerCertError, PeerTrust, TrustError};

use rustls_pki_types::DnsName;
use std::sync::Arc;

/// A name (org or broker) that is not a usable DNS name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what} name {name:?} is not a valid DNS name (letters, digits, '-' and '.', no IP address, no trailing dot)"
)]
pub struct InvalidNameError {
    /// What the name is for ("org", "broker", "peer").
    pub what: &'static str,
    /// The rejected input.
    pub name: String,
}

/// Validates a DNS-like name and returns it in lower case: certificate names compare
/// case-insensitively, and file names and logs should show one spelling.
pub(crate) fn dns_name(what: &'static str, name: &str) -> Result<String, InvalidNameError> {
    let invalid = || InvalidNameError {
        what,
        name: name.to_owned(),
    };
    // A trailing dot would make "b.example" and "b.example." two names for one broker.
    if name.ends_with('.') || name.parse::<std::net::IpAddr>().is_ok() {
        return Err(invalid());
    }
    DnsName::try_from(name).map_err(|_| invalid())?;
    Ok(name.to_ascii_lowercase())
}

/// The one crypto provider this crate uses.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_are_validated_and_lowercased() {
        assert_eq!(
            dns_name("broker", "B.Example.TEST").unwrap(),
            "b.example.test"
        );
        assert_eq!(dns_name("org", "acme").unwrap(), "acme");
        for bad in [
            "",
            "a..b",
            "b.example.",
            "127.0.0.1",
            "::1",
            "*.example",
            "-a.example",
            "a b",
            "ex/ample",
        ] {
            let err = dns_name("broker", bad).unwrap_err();
            assert!(err.to_string().contains("broker name"), "{bad}: {err}");
        }
    }
}
