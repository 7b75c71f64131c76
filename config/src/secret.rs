//! A value that must never reach a log.

use std::fmt;

/// Holds a secret. `Debug` prints `***` (for URLs, the URL with its password masked),
/// so `debug!("{config:?}")` is safe. Read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a secret.
    pub const fn new(value: T) -> Self {
        Self(value)
    }

    /// The secret itself; call only where it is used.
    pub const fn expose(&self) -> &T {
        &self.0
    }
}

impl fmt::Debug for Secret<String> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", mask_url(&self.0))
    }
}

/// `scheme://user:password@host/…` → `scheme://user:***@host/…`; anything else → `***`.
pub fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".into();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{path}")
        }
        // No credentials in the authority; a password may still hide in the query.
        None if path.contains("password") => format!("{scheme}://{authority}/***"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_passwords() {
        assert_eq!(
            mask_url("postgres://meshd:s3cret@db:5432/meshd"),
            "postgres://meshd:***@db:5432/meshd"
        );
        assert_eq!(mask_url("postgres://db/meshd"), "postgres://db/meshd");
        assert_eq!(
            mask_url("postgres://db/meshd?password=x"),
            "postgres://db/***"
        );
        assert_eq!(mask_url("garbage"), "***");
        assert!(!format!("{:?}", Secret::new("postgres://a:b@c/d".to_owned())).contains(":b@"));
    }
}
