//! The org CA, the broker certificates it issues, the bundle an org hands to its peers,
//! and loading a broker's own identity for the daemon.
//!
//! Layout of an org CA directory: `ca.pem` (the CA certificate, 0644) and `ca.key` (its
//! PKCS#8 key, a secret file). A broker gets `<broker>.pem` (its certificate followed by
//! the CA certificate, so peers that pin the CA need nothing else) and `<broker>.key`.

use crate::der;
use crate::secret::{
    SecretFileError, ensure_private_dir, read_secret_file, write_public_file, write_secret_file,
};
use crate::{InvalidNameError, dns_name, provider};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::{self, PemObject as _};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// File name of the org CA certificate inside the CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the org CA private key inside the CA directory.
pub const CA_KEY_FILE: &str = "ca.key";

const CA_VALIDITY_DAYS: i64 = 3650;
/// 825 days: the longest leaf lifetime common TLS stacks still accept.
const LEAF_VALIDITY_DAYS: i64 = 825;
/// Certificates start a day early so a peer whose clock is behind still accepts them.
const BACKDATE_DAYS: i64 = 1;

/// Lowercase hex SHA-256 of a DER certificate (64 characters): the fingerprint operators
/// compare and pin.
pub fn fingerprint_sha256(der: &[u8]) -> String {
    hex::encode(sha256(der))
}

pub(crate) fn sha256(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// A certificate pin that is not a SHA-256 fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid certificate pin {input:?}: expected the 64 hex digits of a SHA-256 fingerprint (as printed by `meshd certs bundle`), optionally with ':' separators and a \"sha256:\" prefix"
)]
pub struct PinError {
    /// The rejected input.
    pub input: String,
}

/// Parses a pin as operators copy it: 64 hex digits in any case, optionally separated by
/// colons and prefixed with `sha256:`.
///
/// # Errors
/// [`PinError`] for anything else.
pub fn parse_pin(s: &str) -> Result<[u8; 32], PinError> {
    let err = || PinError {
        input: s.to_owned(),
    };
    let trimmed = s.trim();
    let digits = match trimmed.split_once(':') {
        Some((prefix, rest)) if prefix.eq_ignore_ascii_case("sha256") => rest,
        _ => trimmed,
    };
    let digits: String = digits.chars().filter(|&c| c != ':').collect();
    let mut pin = [0u8; 32];
    hex::decode_to_slice(&digits, &mut pin).map_err(|_| err())?;
    Ok(pin)
}

/// Why the org CA could not be created or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// The org name is not DNS-like.
    #[error(transparent)]
    InvalidOrg(#[from] InvalidNameError),
    /// One of `ca.pem` / `ca.key` exists without the other.
    #[error(
        "found {present} but not {missing}: restore the missing file, or remove {present} to create a new org CA (every broker certificate must then be re-issued)"
    )]
    Incomplete {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// The existing CA belongs to another org.
    #[error(
        "{path} is the CA of org {found:?}, not {expected:?}; refusing to use one org's CA for another"
    )]
    OrgMismatch {
        /// The CA certificate.
        path: PathBuf,
        /// The org named in it.
        found: String,
        /// The org asked for.
        expected: String,
    },
    /// `ca.key` is not the key of `ca.pem`.
    #[error("{key} is not the private key of the CA certificate in {cert}")]
    KeyMismatch {
        /// The CA certificate.
        cert: PathBuf,
        /// The CA key.
        key: PathBuf,
    },
    /// A CA file exists but cannot be used.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The CA certificate file is unreadable or not a CA.
    #[error(transparent)]
    CertFile(#[from] CaFileError),
    /// Key or certificate generation failed.
    #[error("cannot generate the CA of org {org:?}: {source}")]
    Generate {
        /// The org.
        org: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// Reading or writing a file failed, or `ca.key` is readable by other users.
    #[error(transparent)]
    File(#[from] SecretFileError),
}

/// Why a broker certificate could not be issued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The broker name is not a DNS name.
    #[error(transparent)]
    InvalidName(#[from] InvalidNameError),
    /// Key or certificate generation failed.
    #[error("cannot generate a certificate for broker {broker}: {source}")]
    Generate {
        /// The broker.
        broker: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// The broker name would overwrite the CA's own files (`ca.pem`, `ca.key`).
    #[error(
        "broker name {broker:?} is reserved: its files would overwrite the org CA's ca.pem and ca.key"
    )]
    Reserved {
        /// The broker.
        broker: String,
    },
    /// The new certificate does not verify under the CA: the CA files are broken.
    #[error(
        "the certificate issued for broker {broker} does not verify under the org CA ({reason}); check ca.pem and ca.key"
    )]
    SelfCheck {
        /// The broker.
        broker: String,
        /// Why verification failed.
        reason: String,
    },
    /// Writing the files failed.
    #[error(transparent)]
    File(#[from] SecretFileError),
}

/// Why a CA certificate file (our `ca.pem` or a peer org's bundle) cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaFileError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid PEM.
    #[error("{path} is not a valid PEM file: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: pem::Error,
    },
    /// The file does not hold exactly one certificate.
    #[error(
        "{path} holds {count} certificates; expected exactly one org CA certificate (the output of `meshd certs bundle`)"
    )]
    Count {
        /// The file.
        path: PathBuf,
        /// How many certificates it holds.
        count: usize,
    },
    /// The certificate is not a CA certificate.
    #[error(
        "{path} is not a CA certificate (was a broker certificate given instead of the org bundle?)"
    )]
    NotCa {
        /// The file.
        path: PathBuf,
    },
    /// The certificate cannot be parsed as a trust anchor.
    #[error("{path}: unusable CA certificate: {reason}")]
    Unusable {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        reason: String,
    },
    /// The pin line (`# pin = "sha256:…"`) of a bundle does not match its certificate.
    #[error(
        "{path}: the certificate's SHA-256 is {actual} but the file states {stated}; the bundle was altered or mixed up"
    )]
    FingerprintMismatch {
        /// The file.
        path: PathBuf,
        /// The fingerprint written in the file.
        stated: String,
        /// The fingerprint of the certificate.
        actual: String,
    },
}

/// Why a broker's own certificate and key could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The expected broker name is not a DNS name.
    #[error(transparent)]
    InvalidName(#[from] InvalidNameError),
    /// The certificate file cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The key file cannot be read or is accessible to other users.
    #[error(transparent)]
    File(#[from] SecretFileError),
    /// A file is not valid PEM.
    #[error("{path} is not a valid PEM file: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error("{path} holds no certificate")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The key file holds no private key.
    #[error("{path} holds no private key")]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The certificate is for another broker.
    #[error(
        "{path} is a certificate for {presented:?}, not for {expected}; issue one for {expected} with the org CA"
    )]
    NameMismatch {
        /// The certificate file.
        path: PathBuf,
        /// The broker name from the configuration.
        expected: String,
        /// The DNS names in the certificate.
        presented: Vec<String>,
    },
    /// The key is not the certificate's key.
    #[error("{key} is not the private key of the certificate in {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// Anything else wrong with a file (unparsable, expired, not signed by the CA after it).
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Where [`OrgCa::issue_broker`] wrote a broker's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerCertPaths {
    /// `<broker>.pem`: the broker certificate followed by the org CA certificate.
    pub cert: PathBuf,
    /// `<broker>.key`: the broker's PKCS#8 private key (mode 0600).
    pub key: PathBuf,
}

/// An org's certificate authority: signs the certificates of the org's brokers.
pub struct OrgCa {
    org: String,
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for OrgCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrgCa")
            .field("org", &self.org)
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

fn exists(path: &Path) -> Result<bool, SecretFileError> {
    path.try_exists().map_err(|source| SecretFileError::Io {
        path: path.to_owned(),
        source,
    })
}

impl OrgCa {
    /// Loads the CA of `org` from `dir`, or creates it when neither file exists. The
    /// boolean is `true` when the CA was created.
    ///
    /// # Errors
    /// [`CaError`]: invalid org name, only one of the two files present, a CA of another
    /// org, a `ca.key` readable by other users, unreadable files, I/O.
    pub fn init_or_load(dir: &Path, org: &str) -> Result<(Self, bool), CaError> {
        let org = dns_name("org", org)?;
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        match (exists(&cert_path)?, exists(&key_path)?) {
            (true, true) => {
                let ca = Self::load(dir)?;
                if !ca.org.eq_ignore_ascii_case(&org) {
                    return Err(CaError::OrgMismatch {
                        path: cert_path,
                        found: ca.org,
                        expected: org,
                    });
                }
                Ok((ca, false))
            }
            (false, false) => Ok((Self::create(dir, &org)?, true)),
            (true, false) => Err(CaError::Incomplete {
                present: cert_path,
                missing: key_path,
            }),
            (false, true) => Err(CaError::Incomplete {
                present: key_path,
                missing: cert_path,
            }),
        }
    }

    /// Loads an existing CA from `dir`; the org is the certificate's organization name.
    ///
    /// # Errors
    /// See [`OrgCa::init_or_load`].
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let key_pem = read_secret_file(&key_path)?;
        let invalid_key = |reason: String| CaError::Invalid {
            path: key_path.clone(),
            reason,
        };
        let key_pem = String::from_utf8(key_pem)
            .map_err(|_| invalid_key("not a PEM private key".to_owned()))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| invalid_key(format!("unusable private key: {e}")))?;
        let cert = read_ca_file(&cert_path)?;
        let org = der::organization(&cert).ok_or_else(|| CaError::Invalid {
            path: cert_path.clone(),
            reason: "the CA certificate has no organization name (O=)".to_owned(),
        })?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        if keys_match(vec![cert.clone()], key_der).is_err() {
            return Err(CaError::KeyMismatch {
                cert: cert_path,
                key: key_path,
            });
        }
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|e| CaError::Invalid {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self { org, cert, issuer })
    }

    fn create(dir: &Path, org: &str) -> Result<Self, CaError> {
        let generate = |source| CaError::Generate {
            org: org.to_owned(),
            source,
        };
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, org);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{org} meshd org CA"));
        // Path length 0: the CA signs broker certificates only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = crate::time::now_utc();
        params.not_before = now - Duration::days(BACKDATE_DAYS);
        params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
        let key = KeyPair::generate().map_err(generate)?;
        let cert = params.self_signed(&key).map_err(generate)?;

        ensure_private_dir(dir)?;
        // Key first: a crash in between leaves a lone key, which init refuses loudly
        // instead of silently creating a second CA.
        write_secret_file(&dir.join(CA_KEY_FILE), key.serialize_pem().as_bytes())?;
        write_public_file(&dir.join(CA_CERT_FILE), cert.pem().as_bytes())?;
        Ok(Self {
            org: org.to_owned(),
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The org name (the certificate's O=).
    pub fn org(&self) -> &str {
        &self.org
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> String {
        der::pem_encode("CERTIFICATE", &self.cert)
    }

    /// SHA-256 fingerprint of the CA certificate, as peers pin it.
    pub fn fingerprint(&self) -> String {
        fingerprint_sha256(&self.cert)
    }

    /// What `meshd certs bundle` hands to peer orgs.
    pub fn bundle(&self) -> Bundle {
        Bundle::from_ca_der(&self.cert)
    }

    /// Issues (or re-issues, replacing the files) the certificate of `broker`, writing
    /// `out_dir/<broker>.pem` (certificate + CA) and `out_dir/<broker>.key` (0600).
    ///
    /// # Errors
    /// [`IssueError`]: invalid name, generation failure, a CA that does not verify its
    /// own certificates, I/O.
    pub fn issue_broker(
        &self,
        broker: &str,
        out_dir: &Path,
    ) -> Result<BrokerCertPaths, IssueError> {
        let name = dns_name("broker", broker)?;
        if Path::new(CA_CERT_FILE).file_stem() == Some(name.as_ref()) {
            return Err(IssueError::Reserved { broker: name });
        }
        let now = crate::time::now_utc();
        let (cert, key) = self
            .issue_leaf(
                &name,
                now - Duration::days(BACKDATE_DAYS),
                now + Duration::days(LEAF_VALIDITY_DAYS),
                // Both: brokers dial (client) and accept (server) connections.
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ],
            )
            .map_err(|source| IssueError::Generate {
                broker: name.clone(),
                source,
            })?;
        crate::trust::verify_chain(
            &self.cert,
            cert.der(),
            &[],
            Some(&name),
            crate::time::unix_now(),
        )
        .map_err(|e| IssueError::SelfCheck {
            broker: name.clone(),
            reason: e.to_string(),
        })?;

        ensure_private_dir(out_dir)?;
        let paths = BrokerCertPaths {
            cert: out_dir.join(format!("{name}.pem")),
            key: out_dir.join(format!("{name}.key")),
        };
        write_secret_file(&paths.key, key.serialize_pem().as_bytes())?;
        let chain = format!("{}{}", cert.pem(), self.cert_pem());
        write_public_file(&paths.cert, chain.as_bytes())?;
        Ok(paths)
    }

    /// Signs a broker leaf; separate from [`OrgCa::issue_broker`] so tests can make
    /// expired or wrongly-purposed certificates.
    pub(crate) fn issue_leaf(
        &self,
        name: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        ekus: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<(rcgen::Certificate, KeyPair), rcgen::Error> {
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, self.org.as_str());
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = ekus;
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert, key))
    }
}

/// Whether `key` is the private key of the first certificate of `chain`.
pub(crate) fn keys_match(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(), rustls::Error> {
    let signing_key = provider().key_provider.load_private_key(key)?;
    rustls::sign::CertifiedKey::new(chain, signing_key).keys_match()
}

/// Reads a file holding exactly one CA certificate (PEM), such as `ca.pem` or a peer
/// org's bundle. A `# pin = "sha256:<hex>"` line, as [`Bundle`] writes (or the
/// `# sha256 <hex>` line of earlier releases), must match the certificate, which catches
/// bundles that were edited or swapped.
pub(crate) fn read_ca_file(path: &Path) -> Result<CertificateDer<'static>, CaFileError> {
    let text = fs::read(path).map_err(|source| CaFileError::Io {
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CaFileError::Pem {
            path: path.to_owned(),
            source,
        })?;
    let [cert] = <[_; 1]>::try_from(certs).map_err(|certs| CaFileError::Count {
        path: path.to_owned(),
        count: certs.len(),
    })?;
    if !der::is_ca(&cert) {
        return Err(CaFileError::NotCa {
            path: path.to_owned(),
        });
    }
    webpki::anchor_from_trusted_cert(&cert).map_err(|e| CaFileError::Unusable {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let actual = fingerprint_sha256(&cert);
    for line in String::from_utf8_lossy(&text).lines() {
        let line = line.trim();
        let stated = line
            .strip_prefix(BUNDLE_PIN_PREFIX)
            .map(|s| s.trim().trim_matches('"'))
            .or_else(|| line.strip_prefix(OLD_BUNDLE_FINGERPRINT_PREFIX));
        if let Some(stated) = stated {
            let stated = stated.trim();
            if parse_pin(stated).map(hex::encode).as_deref() != Ok(actual.as_str()) {
                return Err(CaFileError::FingerprintMismatch {
                    path: path.to_owned(),
                    stated: stated.to_owned(),
                    actual,
                });
            }
        }
    }
    Ok(cert)
}

/// The bundle's fingerprint line: `# pin = "sha256:<hex>"`, the very text a peer puts in
/// its configuration.
const BUNDLE_PIN_PREFIX: &str = "# pin = ";
/// How bundles made by earlier releases state it (still checked when present).
const OLD_BUNDLE_FINGERPRINT_PREFIX: &str = "# sha256 ";

/// The org CA as handed to peer orgs (`meshd certs bundle`): the certificate PEM and its
/// fingerprint, so the receiving operator can check it over another channel or pin it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The CA certificate, PEM.
    pub pem: String,
    /// Lowercase hex SHA-256 of the CA certificate DER.
    pub fingerprint: String,
}

impl Bundle {
    /// The bundle of a CA certificate.
    pub fn from_ca_der(ca: &CertificateDer<'_>) -> Self {
        Self {
            pem: der::pem_encode("CERTIFICATE", ca),
            fingerprint: fingerprint_sha256(ca),
        }
    }

    /// The bundle of the CA certificate in `path` (e.g. `ca.pem`).
    ///
    /// # Errors
    /// [`CaFileError`] when the file does not hold exactly one CA certificate.
    pub fn from_ca_pem_file(path: &Path) -> Result<Self, CaFileError> {
        Ok(Self::from_ca_der(&read_ca_file(path)?))
    }

    /// The file contents: the PEM followed by `# pin = "sha256:<fingerprint>"` (the
    /// line a peer that pins instead of keeping the file puts in its configuration).
    /// The peer loads it with [`crate::PeerAnchor::load_ca_file`], which checks that line.
    pub fn to_text(&self) -> String {
        format!("{}{BUNDLE_PIN_PREFIX}\"{}\"\n", self.pem, self.pin())
    }

    /// The pin as the configuration takes it: `sha256:<hex>`.
    pub fn pin(&self) -> String {
        format!("sha256:{}", self.fingerprint)
    }
}

impl fmt::Display for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

/// A broker's own certificate chain and key, checked against its configured name.
pub struct BrokerIdentity {
    name: String,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    not_after: OffsetDateTime,
}

impl fmt::Debug for BrokerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerIdentity")
            .field("name", &self.name)
            .field("chain_len", &self.chain.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Clone for BrokerIdentity {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_after: self.not_after,
        }
    }
}

impl BrokerIdentity {
    /// Loads `cert_path` (PEM chain, leaf first) and `key_path` (PEM private key) and
    /// checks them before the daemon listens: the key file is not accessible to other
    /// users, the leaf is valid for `expected_name`, the key is the leaf's, and the leaf
    /// verifies under the CA certificate that follows it (which also catches expiry).
    ///
    /// # Errors
    /// [`IdentityError`], naming the file and, for a name mismatch, both names.
    pub fn load(
        cert_path: &Path,
        key_path: &Path,
        expected_name: &str,
    ) -> Result<Self, IdentityError> {
        let name = dns_name("broker", expected_name)?;
        let pem_text = fs::read(cert_path).map_err(|source| IdentityError::Io {
            path: cert_path.to_owned(),
            source,
        })?;
        let chain = CertificateDer::pem_slice_iter(&pem_text)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| IdentityError::Pem {
                path: cert_path.to_owned(),
                source,
            })?;
        let Some((leaf, rest)) = chain.split_first() else {
            return Err(IdentityError::NoCertificate {
                path: cert_path.to_owned(),
            });
        };

        let key_pem = read_secret_file(key_path)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
            pem::Error::NoItemsFound => IdentityError::NoKey {
                path: key_path.to_owned(),
            },
            source => IdentityError::Pem {
                path: key_path.to_owned(),
                source,
            },
        })?;

        let invalid_cert = |reason: String| IdentityError::Invalid {
            path: cert_path.to_owned(),
            reason,
        };
        let end_entity = webpki::EndEntityCert::try_from(leaf)
            .map_err(|e| invalid_cert(format!("unparsable certificate: {e}")))?;
        let server_name = ServerName::try_from(name.as_str()).map_err(|_| InvalidNameError {
            what: "broker",
            name: name.clone(),
        })?;
        if end_entity
            .verify_is_valid_for_subject_name(&server_name)
            .is_err()
        {
            return Err(IdentityError::NameMismatch {
                path: cert_path.to_owned(),
                expected: name,
                presented: end_entity.valid_dns_names().map(str::to_owned).collect(),
            });
        }

        match keys_match(chain.clone(), key.clone_key()) {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(IdentityError::KeyMismatch {
                    cert: cert_path.to_owned(),
                    key: key_path.to_owned(),
                });
            }
            Err(e) => {
                return Err(IdentityError::Invalid {
                    path: key_path.to_owned(),
                    reason: format!("unusable private key: {e}"),
                });
            }
        }

        if let Some((ca, intermediates)) = rest.split_last() {
            crate::trust::verify_chain(
                ca,
                leaf,
                intermediates,
                Some(&name),
                crate::time::unix_now(),
            )
            .map_err(|e| {
                invalid_cert(format!(
                    "the certificate does not verify under the CA certificate that follows it: {e}"
                ))
            })?;
        }
        let not_after = der::not_after(leaf)
            .ok_or_else(|| invalid_cert("unreadable validity period".to_owned()))?;
        Ok(Self {
            name,
            chain,
            key,
            not_after,
        })
    }

    /// The broker's DNS name (lower case).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The certificate chain, leaf first (normally leaf + org CA).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key (a copy: rustls configurations take ownership).
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// When the leaf certificate expires, so the daemon can warn before it does.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{Org, chmod};
    use std::os::unix::fs::PermissionsExt as _;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_creates_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let (ca, created) = OrgCa::init_or_load(&ca_dir, "Example.Test").unwrap();
        assert!(created);
        assert_eq!(ca.org(), "example.test");
        assert_eq!(mode(&ca_dir.join(CA_KEY_FILE)), 0o600);
        assert_eq!(mode(&ca_dir), 0o700);
        assert_eq!(
            der::organization(&ca.cert_der()).as_deref(),
            Some("example.test")
        );
        assert!(der::is_ca(&ca.cert_der()));
        let expires = der::not_after(&ca.cert_der()).unwrap() - crate::time::now_utc();
        assert!((Duration::days(3649)..=Duration::days(3650)).contains(&expires));

        let (again, created) = OrgCa::init_or_load(&ca_dir, "example.test").unwrap();
        assert!(!created);
        assert_eq!(again.fingerprint(), ca.fingerprint());
        assert_eq!(again.org(), "example.test");
        // The reloaded CA re-encodes the same certificate.
        assert_eq!(
            again.cert_pem(),
            fs::read_to_string(ca_dir.join(CA_CERT_FILE)).unwrap()
        );
        // And still signs certificates that verify under it.
        again.issue_broker("b.example.test", dir.path()).unwrap();
    }

    #[test]
    fn another_org_on_reuse_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        OrgCa::init_or_load(dir.path(), "x.test").unwrap();
        let err = OrgCa::init_or_load(dir.path(), "y.test").unwrap_err();
        assert!(matches!(err, CaError::OrgMismatch { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("\"x.test\"") && msg.contains("\"y.test\""),
            "{msg}"
        );
    }

    #[test]
    fn invalid_org_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for org in ["", "acme corp", "x.test.", "10.0.0.1", "a/b"] {
            let err = OrgCa::init_or_load(dir.path(), org).unwrap_err();
            assert!(matches!(err, CaError::InvalidOrg(_)), "{org}: {err:?}");
        }
        assert!(!dir.path().join(CA_KEY_FILE).exists());
    }

    #[test]
    fn a_lone_ca_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        OrgCa::init_or_load(dir.path(), "x.test").unwrap();
        fs::remove_file(dir.path().join(CA_CERT_FILE)).unwrap();
        let err = OrgCa::init_or_load(dir.path(), "x.test").unwrap_err();
        assert!(
            matches!(&err, CaError::Incomplete { missing, .. } if missing.ends_with(CA_CERT_FILE)),
            "{err:?}"
        );
        // The lone key was not replaced by a new CA.
        assert!(!dir.path().join(CA_CERT_FILE).exists());
    }

    #[test]
    fn world_readable_ca_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        OrgCa::init_or_load(dir.path(), "x.test").unwrap();
        let key = dir.path().join(CA_KEY_FILE);
        chmod(&key, 0o644);
        let err = OrgCa::init_or_load(dir.path(), "x.test").unwrap_err();
        assert!(
            matches!(err, CaError::File(SecretFileError::WorldAccessible { .. })),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&key.display().to_string()) && msg.contains("chmod 600"),
            "{msg}"
        );
    }

    #[test]
    fn a_ca_key_of_another_ca_is_refused() {
        let x = tempfile::tempdir().unwrap();
        let y = tempfile::tempdir().unwrap();
        OrgCa::init_or_load(x.path(), "x.test").unwrap();
        OrgCa::init_or_load(y.path(), "x.test").unwrap();
        fs::copy(y.path().join(CA_KEY_FILE), x.path().join(CA_KEY_FILE)).unwrap();
        let err = OrgCa::init_or_load(x.path(), "x.test").unwrap_err();
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err:?}");
    }

    #[test]
    fn issue_and_load_round_trip() {
        let org = Org::new("x.test");
        let paths = org.ca.issue_broker("B.X.Test", org.dir.path()).unwrap();
        assert_eq!(paths.cert, org.dir.path().join("b.x.test.pem"));
        assert_eq!(paths.key, org.dir.path().join("b.x.test.key"));
        assert_eq!(mode(&paths.key), 0o600);
        assert_eq!(mode(&paths.cert), 0o644);

        let id = BrokerIdentity::load(&paths.cert, &paths.key, "b.x.test").unwrap();
        assert_eq!(id.name(), "b.x.test");
        assert_eq!(id.chain().len(), 2);
        assert_eq!(id.chain()[1], org.ca.cert_der());
        assert!(matches!(id.key(), PrivateKeyDer::Pkcs8(_)));
        let leaf = id.chain()[0].clone();
        assert_eq!(der::organization(&leaf).as_deref(), Some("x.test"));
        assert!(!der::is_ca(&leaf));
        let left = id.not_after() - crate::time::now_utc();
        assert!(
            (Duration::days(824)..=Duration::days(825)).contains(&left),
            "{left}"
        );

        // Re-issuing replaces both files with a new certificate and key.
        org.ca.issue_broker("b.x.test", org.dir.path()).unwrap();
        let again = BrokerIdentity::load(&paths.cert, &paths.key, "b.x.test").unwrap();
        assert_ne!(again.chain()[0], leaf);
    }

    #[test]
    fn invalid_broker_names_are_refused() {
        let org = Org::new("x.test");
        for name in ["127.0.0.1", "a..x.test", "*.x.test", "../evil", "b.x.test."] {
            let err = org.ca.issue_broker(name, org.dir.path()).unwrap_err();
            assert!(matches!(err, IssueError::InvalidName(_)), "{name}: {err:?}");
        }
        // "ca" issued into the CA directory would replace the CA key.
        let ca_dir = org.dir.path().join("ca");
        let err = org.ca.issue_broker("CA", &ca_dir).unwrap_err();
        assert!(matches!(err, IssueError::Reserved { .. }), "{err:?}");
        OrgCa::init_or_load(&ca_dir, "x.test").unwrap();
    }

    #[test]
    fn load_for_another_name_is_refused() {
        let org = Org::new("x.test");
        let paths = org.ca.issue_broker("b.x.test", org.dir.path()).unwrap();
        let err = BrokerIdentity::load(&paths.cert, &paths.key, "c.x.test").unwrap_err();
        assert!(matches!(err, IdentityError::NameMismatch { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("b.x.test") && msg.contains("c.x.test"),
            "{msg}"
        );
        assert!(msg.contains(&paths.cert.display().to_string()), "{msg}");
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let org = Org::new("x.test");
        let b = org.ca.issue_broker("b.x.test", org.dir.path()).unwrap();
        let c = org.ca.issue_broker("c.x.test", org.dir.path()).unwrap();
        let err = BrokerIdentity::load(&b.cert, &c.key, "b.x.test").unwrap_err();
        assert!(matches!(err, IdentityError::KeyMismatch { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("c.x.test.key") && msg.contains("b.x.test.pem"),
            "{msg}"
        );
    }

    #[test]
    fn world_readable_broker_key_is_refused() {
        let org = Org::new("x.test");
        let paths = org.ca.issue_broker("b.x.test", org.dir.path()).unwrap();
        chmod(&paths.key, 0o604);
        let err = BrokerIdentity::load(&paths.cert, &paths.key, "b.x.test").unwrap_err();
        assert!(
            matches!(
                err,
                IdentityError::File(SecretFileError::WorldAccessible { .. })
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&paths.key.display().to_string()) && msg.contains("chmod 600"),
            "{msg}"
        );
    }

    #[test]
    fn a_chain_with_a_foreign_ca_or_an_expired_leaf_is_refused() {
        let x = Org::new("x.test");
        let y = Org::new("y.test");
        let paths = x.ca.issue_broker("b.x.test", x.dir.path()).unwrap();
        // Leaf of X followed by Y's CA.
        let text = fs::read_to_string(&paths.cert).unwrap();
        let leaf_pem = &text[..text.find("-----END CERTIFICATE-----").unwrap() + 26];
        fs::write(&paths.cert, format!("{leaf_pem}{}", y.ca.cert_pem())).unwrap();
        let err = BrokerIdentity::load(&paths.cert, &paths.key, "b.x.test").unwrap_err();
        assert!(matches!(err, IdentityError::Invalid { .. }), "{err:?}");
        assert!(err.to_string().contains("unknown issuer"), "{err}");
        // A leaf alone (no CA after it) is accepted: there is nothing to verify it with.
        fs::write(&paths.cert, leaf_pem).unwrap();
        BrokerIdentity::load(&paths.cert, &paths.key, "b.x.test").unwrap();

        let expired = x.write_leaf("old.x.test", -30, -1);
        let err = BrokerIdentity::load(&expired.cert, &expired.key, "old.x.test").unwrap_err();
        assert!(err.to_string().contains("CertExpired"), "{err}");
    }

    #[test]
    fn fingerprints_and_pins_round_trip() {
        let org = Org::new("x.test");
        let fp = org.ca.fingerprint();
        assert_eq!(fp.len(), 64);
        assert!(
            fp.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(fp, fingerprint_sha256(&org.ca.cert_der()));
        let pin = parse_pin(&fp).unwrap();
        assert_eq!(hex::encode(pin), fp);
        let colons = fp
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap().to_ascii_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(parse_pin(&colons).unwrap(), pin);
        assert_eq!(parse_pin(&format!("SHA256:{colons}")).unwrap(), pin);
        assert_eq!(parse_pin(&format!(" sha256:{fp}\n")).unwrap(), pin);
        for bad in [
            "",
            "sha256:",
            &fp[..62],
            &format!("{fp}00"),
            // Not hex (a fixed position: a random fingerprint may hold no given digit).
            &format!("g{}", &fp[1..]),
            "md5:00",
        ] {
            assert!(parse_pin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bundles_load_as_peer_anchors_and_are_checked() {
        let org = Org::new("x.test");
        let bundle =
            Bundle::from_ca_pem_file(&org.dir.path().join("ca").join(CA_CERT_FILE)).unwrap();
        assert_eq!(bundle, org.ca.bundle());
        let text = bundle.to_text();
        assert!(text.starts_with("-----BEGIN CERTIFICATE-----\n"));
        // The pin line is what a peer's configuration takes.
        assert!(text.ends_with(&format!(
            "-----END CERTIFICATE-----\n# pin = \"sha256:{}\"\n",
            org.ca.fingerprint()
        )));
        let pin_line = text.lines().last().unwrap().trim_start_matches("# ");
        let config: toml::Table = toml::from_str(pin_line).unwrap();
        assert_eq!(
            parse_pin(config["pin"].as_str().unwrap()).unwrap().to_vec(),
            hex::decode(org.ca.fingerprint()).unwrap()
        );
        // Bundles of earlier releases still load, and are still checked.
        let old = org.dir.path().join("old.bundle");
        fs::write(
            &old,
            format!("{}# sha256 {}\n", bundle.pem, org.ca.fingerprint()),
        )
        .unwrap();
        assert!(crate::PeerAnchor::load_ca_file(&old).is_ok());
        fs::write(
            &old,
            format!(
                "{}# sha256 {}\n",
                bundle.pem,
                Org::new("y.test").ca.fingerprint()
            ),
        )
        .unwrap();
        assert!(crate::PeerAnchor::load_ca_file(&old).is_err());

        let path = org.dir.path().join("x.bundle");
        fs::write(&path, &text).unwrap();
        let anchor = crate::PeerAnchor::load_ca_file(&path).unwrap();
        assert!(matches!(anchor, crate::PeerAnchor::Ca(ref der) if *der == org.ca.cert_der()));

        let other = Org::new("x.test");
        fs::write(
            &path,
            text.replace(&org.ca.fingerprint(), &other.ca.fingerprint()),
        )
        .unwrap();
        let err = crate::PeerAnchor::load_ca_file(&path).unwrap_err();
        assert!(
            matches!(err, CaFileError::FingerprintMismatch { .. }),
            "{err:?}"
        );

        // A broker chain (two certificates) or a lone broker certificate is not a bundle.
        let paths = org.ca.issue_broker("b.x.test", org.dir.path()).unwrap();
        let err = crate::PeerAnchor::load_ca_file(&paths.cert).unwrap_err();
        assert!(
            matches!(err, CaFileError::Count { count: 2, .. }),
            "{err:?}"
        );
        let chain = fs::read_to_string(&paths.cert).unwrap();
        let leaf = &chain[..chain.find("-----END CERTIFICATE-----").unwrap() + 26];
        fs::write(&path, leaf).unwrap();
        let err = crate::PeerAnchor::load_ca_file(&path).unwrap_err();
        assert!(matches!(err, CaFileError::NotCa { .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()));
    }
}
