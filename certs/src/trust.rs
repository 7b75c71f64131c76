//! Which peer brokers we accept, and the rustls configurations that enforce it.
//!
//! Each configured peer broker is bound to its own org's CA, given either as the CA
//! certificate or as a pin of its SHA-256 (the CA is then taken from the chain the peer
//! sends, which is leaf + CA). Roots of different orgs are never merged into one store:
//! a certificate is checked against the anchor of the peer it claims to be, so org X's
//! CA can never vouch for a broker configured under org Y.
//!
//! Every broker certificate must allow both serverAuth and clientAuth (when it lists
//! extended key usages at all), because every broker both dials and accepts.

use crate::pki::{CaFileError, PinError, parse_pin, read_ca_file, sha256};
use crate::{BrokerIdentity, InvalidNameError, dns_name, provider};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, SignatureVerificationAlgorithm, UnixTime};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use webpki::{EndEntityCert, ExtendedKeyUsageValidator, KeyPurposeId, KeyPurposeIdIter, KeyUsage};

/// What vouches for one peer broker: its org's CA certificate, or a pin of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAnchor {
    /// The peer org's CA certificate (from its bundle).
    Ca(CertificateDer<'static>),
    /// SHA-256 of the peer org's CA certificate (DER); the CA itself must follow the leaf
    /// in the chain the peer presents.
    Pin([u8; 32]),
}

impl PeerAnchor {
    /// Loads a peer org's bundle (or any file holding exactly its CA certificate).
    ///
    /// # Errors
    /// [`CaFileError`] naming the file.
    pub fn load_ca_file(path: &Path) -> Result<Self, CaFileError> {
        Ok(Self::Ca(read_ca_file(path)?))
    }

    /// Parses a pin (see [`crate::parse_pin`]).
    ///
    /// # Errors
    /// [`PinError`].
    pub fn pin(s: &str) -> Result<Self, PinError> {
        Ok(Self::Pin(parse_pin(s)?))
    }
}

/// Why a [`PeerTrust`] or a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// A peer name is not a DNS name.
    #[error(transparent)]
    InvalidName(#[from] InvalidNameError),
    /// The same peer appears twice.
    #[error("peer broker {name} is configured twice")]
    Duplicate {
        /// The peer.
        name: String,
    },
    /// A configured CA certificate cannot be parsed.
    #[error("the CA certificate configured for peer broker {name} is unusable: {reason}")]
    BadCa {
        /// The peer.
        name: String,
        /// The parser's complaint.
        reason: String,
    },
    /// A client configuration was asked for a peer that is not configured.
    #[error("{name} is not a configured peer broker")]
    UnknownPeer {
        /// The name asked for.
        name: String,
    },
    /// rustls refused the configuration (e.g. an unusable identity key).
    #[error("cannot build the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Why a peer's certificate chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerCertError {
    /// The chain is empty or a certificate cannot be parsed.
    #[error("malformed certificate chain: {0}")]
    Malformed(String),
    /// No configured anchor (of the peer asked for, or of any peer) issued the chain.
    #[error("certificate not issued by an accepted org CA (unknown issuer)")]
    UnknownIssuer,
    /// The chain verifies under a configured org CA, but names no broker configured for
    /// that CA.
    #[error("certificate for {presented:?}, but its org CA is accepted only for {expected:?}")]
    NameMismatch {
        /// The DNS names in the certificate.
        presented: Vec<String>,
        /// The peer names configured for the CA that issued it.
        expected: Vec<String>,
    },
    /// [`PeerTrust::verify_for`] was asked about a peer that is not configured.
    #[error("{name} is not a configured peer broker")]
    UnknownPeer {
        /// The name asked for.
        name: String,
    },
    /// The chain is issued by the right CA but invalid otherwise (expired, wrong key
    /// usage, bad signature...).
    #[error("certificate refused: {0}")]
    Invalid(webpki::Error),
}

#[derive(Debug)]
struct Peer {
    name: String,
    /// SHA-256 of the org CA: peers sharing it belong to the same org.
    ca_fingerprint: [u8; 32],
    /// `None` for a pin: the CA comes from the presented chain.
    ca: Option<CertificateDer<'static>>,
}

/// The peer brokers we accept, each with its own org's anchor. Cheap to clone.
#[derive(Clone)]
pub struct PeerTrust {
    peers: Arc<[Peer]>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for PeerTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.peers.iter().map(|p| {
                let kind = if p.ca.is_some() { "ca" } else { "pin" };
                (
                    &p.name,
                    format!("{kind} sha256 {}", hex::encode(p.ca_fingerprint)),
                )
            }))
            .finish()
    }
}

/// Requires serverAuth and clientAuth when the certificate lists key purposes at all.
struct BrokerUsage;

const EKU_SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
const EKU_CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];

impl ExtendedKeyUsageValidator for BrokerUsage {
    fn validate(&self, iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        let (mut empty, mut server, mut client) = (true, false, false);
        let mut present = Vec::new();
        for id in iter {
            let id = id?;
            empty = false;
            server |= id == KeyPurposeId::new(EKU_SERVER_AUTH);
            client |= id == KeyPurposeId::new(EKU_CLIENT_AUTH);
            present.push(id.to_decoded_oid());
        }
        if empty || (server && client) {
            return Ok(());
        }
        Err(webpki::Error::RequiredEkuNotFoundContext(
            webpki::RequiredEkuNotFoundContext {
                required: if server {
                    KeyUsage::client_auth()
                } else {
                    KeyUsage::server_auth()
                },
                present,
            },
        ))
    }
}

/// The ring provider's certificate signature algorithms (a static list, cached so path
/// building does not rebuild a provider each time).
fn algorithms() -> &'static [&'static dyn SignatureVerificationAlgorithm] {
    static ALGORITHMS: OnceLock<&'static [&'static dyn SignatureVerificationAlgorithm]> =
        OnceLock::new();
    ALGORITHMS.get_or_init(|| {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all
    })
}

fn from_webpki(e: webpki::Error) -> PeerCertError {
    match e {
        // A bad signature under an anchor whose name matches is a CA with the same DN
        // but another key (a forgery, or a re-created CA): not issued by this anchor.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            PeerCertError::UnknownIssuer
        }
        e => PeerCertError::Invalid(e),
    }
}

/// Verifies that `end_entity` (with `intermediates`) chains to `anchor` at `now` as a
/// broker certificate.
fn verify_path(
    anchor: &CertificateDer<'_>,
    end_entity: &EndEntityCert<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<(), PeerCertError> {
    let anchor = webpki::anchor_from_trusted_cert(anchor)
        .map_err(|e| PeerCertError::Malformed(format!("CA certificate: {e}")))?;
    end_entity
        .verify_for_usage(
            algorithms(),
            &[anchor],
            intermediates,
            now,
            BrokerUsage,
            None,
            None,
        )
        .map(drop)
        .map_err(from_webpki)
}

fn presented_names(end_entity: &EndEntityCert<'_>) -> Vec<String> {
    end_entity.valid_dns_names().map(str::to_owned).collect()
}

fn valid_for(end_entity: &EndEntityCert<'_>, name: &str) -> bool {
    ServerName::try_from(name)
        .is_ok_and(|name| end_entity.verify_is_valid_for_subject_name(&name).is_ok())
}

fn parse_leaf<'a>(leaf: &'a CertificateDer<'a>) -> Result<EndEntityCert<'a>, PeerCertError> {
    EndEntityCert::try_from(leaf).map_err(|e| PeerCertError::Malformed(e.to_string()))
}

/// Verifies a broker chain under one CA and, when given, for one name. Shared with
/// issuance (self-check) and identity loading.
pub(crate) fn verify_chain(
    anchor: &CertificateDer<'_>,
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    name: Option<&str>,
    now: UnixTime,
) -> Result<(), PeerCertError> {
    let end_entity = parse_leaf(leaf)?;
    verify_path(anchor, &end_entity, intermediates, now)?;
    match name {
        Some(name) if !valid_for(&end_entity, name) => Err(PeerCertError::NameMismatch {
            presented: presented_names(&end_entity),
            expected: vec![name.to_owned()],
        }),
        _ => Ok(()),
    }
}

impl Peer {
    /// Verifies the path (not the name) under this peer's anchor.
    fn verify_path(
        &self,
        end_entity: &EndEntityCert<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), PeerCertError> {
        if let Some(ca) = &self.ca {
            return verify_path(ca, end_entity, intermediates, now);
        }
        // Pin: the pinned CA must be in the chain; it becomes the only anchor.
        let Some(pos) = intermediates
            .iter()
            .position(|c| sha256(c) == self.ca_fingerprint)
        else {
            return Err(PeerCertError::UnknownIssuer);
        };
        let others: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != pos)
            .map(|(_, c)| c.clone())
            .collect();
        match intermediates.get(pos) {
            Some(ca) => verify_path(ca, end_entity, &others, now),
            None => Err(PeerCertError::UnknownIssuer),
        }
    }
}

impl PeerTrust {
    /// Builds the trust from `(peer broker DNS name, anchor)` pairs.
    ///
    /// # Errors
    /// [`TrustError`]: an invalid or duplicate name, an unparsable CA certificate.
    pub fn new(peers: impl IntoIterator<Item = (String, PeerAnchor)>) -> Result<Self, TrustError> {
        let mut list: Vec<Peer> = Vec::new();
        for (name, anchor) in peers {
            let name = dns_name("peer", &name)?;
            if list.iter().any(|p| p.name == name) {
                return Err(TrustError::Duplicate { name });
            }
            let peer = match anchor {
                PeerAnchor::Ca(ca) => {
                    if let Err(e) = webpki::anchor_from_trusted_cert(&ca) {
                        return Err(TrustError::BadCa {
                            name,
                            reason: e.to_string(),
                        });
                    }
                    Peer {
                        name,
                        ca_fingerprint: sha256(&ca),
                        ca: Some(ca),
                    }
                }
                PeerAnchor::Pin(pin) => Peer {
                    name,
                    ca_fingerprint: pin,
                    ca: None,
                },
            };
            list.push(peer);
        }
        Ok(Self {
            peers: list.into(),
            provider: provider(),
        })
    }

    /// The configured peer names (lower case), in configuration order.
    pub fn peer_names(&self) -> impl Iterator<Item = &str> {
        self.peers.iter().map(|p| p.name.as_str())
    }

    /// The peer whose anchor stands for `peer`'s org: one configured with the CA
    /// certificate if any, so a pin elsewhere in the config never makes a CA file useless
    /// (a pin needs the CA in the presented chain, a CA file does not).
    fn org_anchor<'p>(&'p self, peer: &'p Peer) -> &'p Peer {
        self.peers
            .iter()
            .find(|p| p.ca.is_some() && p.ca_fingerprint == peer.ca_fingerprint)
            .unwrap_or(peer)
    }

    fn peer(&self, name: &str) -> Option<&Peer> {
        self.peers
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))
    }

    /// Which configured peer presented `chain` (leaf first): the peer whose name the leaf
    /// is valid for and whose org anchor verifies the chain. Used on the accepting side
    /// after the handshake, and as a second check on the dialing side.
    ///
    /// # Errors
    /// [`PeerCertError::UnknownIssuer`] when no configured anchor verifies the chain,
    /// [`PeerCertError::NameMismatch`] when one does but names none of its peers,
    /// [`PeerCertError::Invalid`] for e.g. an expired certificate from a known org,
    /// [`PeerCertError::Malformed`].
    pub fn identify(&self, chain: &[CertificateDer<'_>]) -> Result<String, PeerCertError> {
        let (leaf, rest) = chain
            .split_first()
            .ok_or_else(|| PeerCertError::Malformed("no certificate".to_owned()))?;
        self.identify_at(leaf, rest, crate::time::unix_now())
            .map(str::to_owned)
    }

    fn identify_at(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<&str, PeerCertError> {
        let end_entity = parse_leaf(leaf)?;
        let mut tried: Vec<[u8; 32]> = Vec::new();
        let mut refusal = None;
        for peer in self.peers.iter() {
            // Peers of one org share an anchor: verify each org once.
            if tried.contains(&peer.ca_fingerprint) {
                continue;
            }
            tried.push(peer.ca_fingerprint);
            match self
                .org_anchor(peer)
                .verify_path(&end_entity, intermediates, now)
            {
                Ok(()) => {
                    let same_org = || {
                        self.peers
                            .iter()
                            .filter(|p| p.ca_fingerprint == peer.ca_fingerprint)
                    };
                    if let Some(p) = same_org().find(|p| valid_for(&end_entity, &p.name)) {
                        return Ok(&p.name);
                    }
                    return Err(PeerCertError::NameMismatch {
                        presented: presented_names(&end_entity),
                        expected: same_org().map(|p| p.name.clone()).collect(),
                    });
                }
                Err(PeerCertError::UnknownIssuer) => {}
                // Keep the first specific reason (e.g. expired) over "unknown issuer".
                Err(e) => {
                    refusal.get_or_insert(e);
                }
            }
        }
        Err(refusal.unwrap_or(PeerCertError::UnknownIssuer))
    }

    /// Checks that `chain` (leaf first) is a valid certificate of the configured peer
    /// `name`, under that peer's anchor only.
    ///
    /// # Errors
    /// [`PeerCertError`]; `UnknownPeer` when `name` is not configured.
    pub fn verify_for(
        &self,
        name: &str,
        chain: &[CertificateDer<'_>],
    ) -> Result<(), PeerCertError> {
        let (leaf, rest) = chain
            .split_first()
            .ok_or_else(|| PeerCertError::Malformed("no certificate".to_owned()))?;
        self.verify_for_at(name, leaf, rest, crate::time::unix_now())
    }

    fn verify_for_at(
        &self,
        name: &str,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), PeerCertError> {
        let peer = self.peer(name).ok_or_else(|| PeerCertError::UnknownPeer {
            name: name.to_owned(),
        })?;
        let end_entity = parse_leaf(leaf)?;
        self.org_anchor(peer)
            .verify_path(&end_entity, intermediates, now)?;
        if !valid_for(&end_entity, &peer.name) {
            return Err(PeerCertError::NameMismatch {
                presented: presented_names(&end_entity),
                expected: vec![peer.name.clone()],
            });
        }
        Ok(())
    }

    /// TLS 1.3 client configuration for dialing `peer`: accepts only a chain valid for
    /// that peer's name under that peer's anchor (whatever server name the caller
    /// passes to the connection), and authenticates with `identity`.
    ///
    /// # Errors
    /// [`TrustError::UnknownPeer`], or [`TrustError::Tls`] when rustls refuses the
    /// identity.
    pub fn client_config(
        &self,
        peer: &str,
        identity: &BrokerIdentity,
        alpn: &[u8],
    ) -> Result<ClientConfig, TrustError> {
        let peer = self
            .peer(peer)
            .ok_or_else(|| TrustError::UnknownPeer {
                name: peer.to_owned(),
            })?
            .name
            .clone();
        let verifier = Arc::new(PeerServerVerifier {
            trust: self.clone(),
            peer,
        });
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(identity.chain().to_vec(), identity.key())?;
        config.alpn_protocols = alpn_list(alpn);
        Ok(config)
    }

    /// TLS 1.3 server configuration: requires a client certificate that
    /// [`PeerTrust::identify`] accepts, and presents `identity`. Call `identify` on the
    /// connection's peer certificates afterwards to learn which peer it is.
    ///
    /// # Errors
    /// [`TrustError::Tls`] when rustls refuses the identity.
    pub fn server_config(
        &self,
        identity: &BrokerIdentity,
        alpn: &[u8],
    ) -> Result<ServerConfig, TrustError> {
        let verifier = Arc::new(PeerClientVerifier {
            trust: self.clone(),
        });
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(identity.chain().to_vec(), identity.key())?;
        config.alpn_protocols = alpn_list(alpn);
        Ok(config)
    }

    fn verify_tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Unreachable with TLS 1.3-only configurations; kept correct anyway.
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn alpn_list(alpn: &[u8]) -> Vec<Vec<u8>> {
    if alpn.is_empty() {
        Vec::new()
    } else {
        vec![alpn.to_vec()]
    }
}

/// A client certificate no configured peer's org CA verifies, with the names it claims.
#[derive(Debug, thiserror::Error)]
#[error("certificate for {presented:?} is not from the org CA configured for those names")]
struct ForeignCertificate {
    presented: Vec<String>,
}

/// Maps a refusal to the rustls error whose TLS alert says the most (48 unknown_ca for
/// a foreign CA, 42 bad_certificate for a wrong name...).
fn to_rustls(e: PeerCertError) -> rustls::Error {
    let cert_error = match e {
        PeerCertError::Malformed(_) => CertificateError::BadEncoding,
        PeerCertError::UnknownIssuer | PeerCertError::UnknownPeer { .. } => {
            CertificateError::UnknownIssuer
        }
        PeerCertError::NameMismatch {
            presented,
            expected,
        } => match expected
            .into_iter()
            .next()
            .and_then(|name| ServerName::try_from(name).ok())
        {
            Some(expected) => CertificateError::NotValidForNameContext {
                expected,
                presented,
            },
            None => CertificateError::NotValidForName,
        },
        PeerCertError::Invalid(webpki::Error::CertExpired { time, not_after }) => {
            CertificateError::ExpiredContext { time, not_after }
        }
        PeerCertError::Invalid(webpki::Error::CertNotValidYet { time, not_before }) => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        PeerCertError::Invalid(webpki::Error::InvalidSignatureForPublicKey) => {
            CertificateError::BadSignature
        }
        PeerCertError::Invalid(webpki::Error::RequiredEkuNotFoundContext(_)) => {
            CertificateError::InvalidPurpose
        }
        PeerCertError::Invalid(e) => CertificateError::Other(OtherError(Arc::new(e))),
    };
    rustls::Error::InvalidCertificate(cert_error)
}

/// Dialing side: the server must be the one peer this configuration was built for.
#[derive(Debug)]
struct PeerServerVerifier {
    trust: PeerTrust,
    peer: String,
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.trust
            .verify_for_at(&self.peer, end_entity, intermediates, now)
            .map_err(to_rustls)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.trust.verify_tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.trust.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.schemes()
    }
}

/// Accepting side: the client must be some configured peer, under its own org's anchor.
#[derive(Debug)]
struct PeerClientVerifier {
    trust: PeerTrust,
}

impl ClientCertVerifier for PeerClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: each broker has exactly one certificate to offer.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.trust.identify_at(end_entity, intermediates, now) {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            // A stranger's certificate: say which broker it claims to be, so the
            // operator reading the refusal knows who knocked.
            Err(PeerCertError::UnknownIssuer | PeerCertError::UnknownPeer { .. }) => {
                let presented = parse_leaf(end_entity)
                    .map(|e| presented_names(&e))
                    .unwrap_or_default();
                Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    rustls::OtherError(std::sync::Arc::new(ForeignCertificate { presented })),
                )))
            }
            Err(e) => Err(to_rustls(e)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.trust.verify_tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.trust.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{ALPN, Failure, Org, both_ekus, handshake};
    use rcgen::ExtendedKeyUsagePurpose;

    fn trust(peers: Vec<(&str, PeerAnchor)>) -> PeerTrust {
        PeerTrust::new(peers.into_iter().map(|(n, a)| (n.to_owned(), a))).unwrap()
    }

    #[test]
    fn identify_names_the_peer_under_its_own_org() {
        let x = Org::new("x.test");
        let y = Org::new("y.test");
        let t = trust(vec![("b.x.test", x.anchor()), ("c.y.test", y.anchor())]);
        let b = x.identity("b.x.test");
        let c = y.identity("c.y.test");
        assert_eq!(t.identify(b.chain()).unwrap(), "b.x.test");
        assert_eq!(t.identify(c.chain()).unwrap(), "c.y.test");
        // The CA in the chain is not needed when the anchor is the CA itself.
        assert_eq!(t.identify(&b.chain()[..1]).unwrap(), "b.x.test");

        t.verify_for("b.x.test", b.chain()).unwrap();
        t.verify_for("B.X.Test", b.chain()).unwrap();
        assert_eq!(
            t.verify_for("c.y.test", b.chain()),
            Err(PeerCertError::UnknownIssuer)
        );
        assert!(matches!(
            t.verify_for("d.x.test", b.chain()),
            Err(PeerCertError::UnknownPeer { .. })
        ));
        assert!(matches!(t.identify(&[]), Err(PeerCertError::Malformed(_))));
        assert!(matches!(
            t.identify(&[CertificateDer::from(vec![0x30, 0x00])]),
            Err(PeerCertError::Malformed(_))
        ));
        assert_eq!(t.peer_names().collect::<Vec<_>>(), ["b.x.test", "c.y.test"]);
    }

    #[test]
    fn a_certificate_from_an_unknown_ca_is_refused() {
        let x = Org::new("x.test");
        let z = Org::new("x.test"); // same org name and DN, different CA key
        let t = trust(vec![("b.x.test", x.anchor())]);
        let forged = z.identity("b.x.test");
        assert_eq!(
            t.identify(forged.chain()),
            Err(PeerCertError::UnknownIssuer)
        );
        assert_eq!(
            t.verify_for("b.x.test", forged.chain()),
            Err(PeerCertError::UnknownIssuer)
        );
        // Appending the real CA to the forged chain does not help.
        let mut chain = forged.chain().to_vec();
        chain.push(x.ca.cert_der());
        assert_eq!(t.identify(&chain), Err(PeerCertError::UnknownIssuer));
    }

    #[test]
    fn a_name_not_configured_for_its_org_is_refused() {
        let x = Org::new("x.test");
        let t = trust(vec![("b.x.test", x.anchor())]);
        let other = x.identity("other.x.test");
        let expected = PeerCertError::NameMismatch {
            presented: vec!["other.x.test".to_owned()],
            expected: vec!["b.x.test".to_owned()],
        };
        assert_eq!(t.identify(other.chain()), Err(expected.clone()));
        assert_eq!(t.verify_for("b.x.test", other.chain()), Err(expected));
    }

    #[test]
    fn one_org_cannot_vouch_for_another_orgs_broker() {
        let x = Org::new("x.test");
        let y = Org::new("y.test");
        // X's CA signs a certificate for the broker configured under Y.
        let impostor = x.identity("c.y.test");
        for t in [
            trust(vec![("b.x.test", x.anchor()), ("c.y.test", y.anchor())]),
            trust(vec![("b.x.test", x.pin()), ("c.y.test", y.pin())]),
        ] {
            assert_eq!(
                t.identify(impostor.chain()),
                Err(PeerCertError::NameMismatch {
                    presented: vec!["c.y.test".to_owned()],
                    expected: vec!["b.x.test".to_owned()],
                }),
                "{t:?}"
            );
            assert_eq!(
                t.verify_for("c.y.test", impostor.chain()),
                Err(PeerCertError::UnknownIssuer)
            );
            // Smuggling Y's real CA into the chain does not make X's leaf Y's.
            let mut chain = impostor.chain().to_vec();
            chain.push(y.ca.cert_der());
            assert_eq!(
                t.verify_for("c.y.test", &chain),
                Err(PeerCertError::UnknownIssuer)
            );
        }
    }

    #[test]
    fn pins_accept_the_pinned_ca_only() {
        let x = Org::new("x.test");
        let y = Org::new("y.test");
        let b = x.identity("b.x.test");
        let d = x.identity("d.x.test");
        let t = trust(vec![("b.x.test", x.pin()), ("d.x.test", x.anchor())]);
        assert_eq!(t.identify(b.chain()).unwrap(), "b.x.test");
        assert_eq!(t.identify(d.chain()).unwrap(), "d.x.test");
        t.verify_for("b.x.test", b.chain()).unwrap();
        // Without the CA in the chain there is nothing to match a pin against.
        let pin_only = trust(vec![("b.x.test", x.pin())]);
        assert_eq!(
            pin_only.verify_for("b.x.test", &b.chain()[..1]),
            Err(PeerCertError::UnknownIssuer)
        );
        assert_eq!(
            pin_only.identify(&b.chain()[..1]),
            Err(PeerCertError::UnknownIssuer)
        );

        // A pin listed first does not stop the same org's CA file from vouching for a
        // leaf sent without its CA.
        assert_eq!(t.identify(&d.chain()[..1]).unwrap(), "d.x.test");
        assert_eq!(t.identify(&b.chain()[..1]).unwrap(), "b.x.test");

        let wrong = trust(vec![("b.x.test", y.pin())]);
        assert_eq!(wrong.identify(b.chain()), Err(PeerCertError::UnknownIssuer));
        assert_eq!(
            wrong.verify_for("b.x.test", b.chain()),
            Err(PeerCertError::UnknownIssuer)
        );
    }

    #[test]
    fn expired_or_single_purpose_certificates_are_refused_with_the_reason() {
        let x = Org::new("x.test");
        let t = trust(vec![("b.x.test", x.anchor())]);
        let (expired, _) = x.chain("b.x.test", -30, -1, both_ekus());
        assert!(
            matches!(
                t.identify(&expired),
                Err(PeerCertError::Invalid(webpki::Error::CertExpired { .. }))
            ),
            "{:?}",
            t.identify(&expired)
        );
        let (future, _) = x.chain("b.x.test", 1, 30, both_ekus());
        assert!(matches!(
            t.verify_for("b.x.test", &future),
            Err(PeerCertError::Invalid(
                webpki::Error::CertNotValidYet { .. }
            ))
        ));
        for ekus in [
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        ] {
            let (chain, _) = x.chain("b.x.test", -1, 30, ekus);
            assert!(matches!(
                t.identify(&chain),
                Err(PeerCertError::Invalid(
                    webpki::Error::RequiredEkuNotFoundContext(_)
                ))
            ));
        }
        // No EKU extension at all means any purpose (RFC 5280), as in rustls.
        let (chain, _) = x.chain("b.x.test", -1, 30, Vec::new());
        assert_eq!(t.identify(&chain).unwrap(), "b.x.test");
    }

    #[test]
    fn bad_configurations_are_refused() {
        let x = Org::new("x.test");
        let dup = PeerTrust::new([
            ("b.x.test".to_owned(), x.anchor()),
            ("B.x.test".to_owned(), x.pin()),
        ]);
        assert!(matches!(dup, Err(TrustError::Duplicate { .. })), "{dup:?}");
        let bad_name = PeerTrust::new([("b.x.test.".to_owned(), x.anchor())]);
        assert!(matches!(bad_name, Err(TrustError::InvalidName(_))));
        let bad_ca = PeerTrust::new([(
            "b.x.test".to_owned(),
            PeerAnchor::Ca(CertificateDer::from(vec![1, 2, 3])),
        )]);
        assert!(matches!(bad_ca, Err(TrustError::BadCa { .. })));
        assert!(matches!(PeerAnchor::pin("abc"), Err(PinError { .. })));

        let t = trust(vec![("b.x.test", x.anchor())]);
        let me = x.identity("a.x.test");
        let err = t.client_config("nope.x.test", &me, ALPN).unwrap_err();
        assert!(matches!(err, TrustError::UnknownPeer { .. }), "{err:?}");
    }

    /// a.x.test (org X) dials c.y.test (org Y); each trusts the other's org only.
    struct Pair {
        x: Org,
        y: Org,
        a: BrokerIdentity,
        c: BrokerIdentity,
        a_trust: PeerTrust,
        c_trust: PeerTrust,
    }

    fn pair() -> Pair {
        let x = Org::new("x.test");
        let y = Org::new("y.test");
        let a = x.identity("a.x.test");
        let c = y.identity("c.y.test");
        let a_trust = trust(vec![("c.y.test", y.pin())]);
        let c_trust = trust(vec![("a.x.test", x.anchor())]);
        Pair {
            x,
            y,
            a,
            c,
            a_trust,
            c_trust,
        }
    }

    #[test]
    fn configured_peers_complete_a_handshake_and_identify_each_other() {
        let p = pair();
        let client = p.a_trust.client_config("c.y.test", &p.a, ALPN).unwrap();
        let server = p.c_trust.server_config(&p.c, ALPN).unwrap();
        let (client, server) = handshake(client, server, "c.y.test").unwrap();
        assert_eq!(client.alpn_protocol(), Some(ALPN));
        let from_client = server.peer_certificates().unwrap();
        assert_eq!(p.c_trust.identify(from_client).unwrap(), "a.x.test");
        let from_server = client.peer_certificates().unwrap();
        assert_eq!(p.a_trust.identify(from_server).unwrap(), "c.y.test");
    }

    #[test]
    fn the_dialer_refuses_a_server_with_the_wrong_name_or_an_unknown_ca() {
        let p = pair();
        let client = || p.a_trust.client_config("c.y.test", &p.a, ALPN).unwrap();
        let server_trust = trust(vec![("a.x.test", p.x.anchor())]);

        // Right org, wrong broker.
        let other = p.y.identity("other.y.test");
        let err = handshake(
            client(),
            server_trust.server_config(&other, ALPN).unwrap(),
            "c.y.test",
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                Failure::Client(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForNameContext { .. }
                ))
            ),
            "{err:?}"
        );

        // Right name, foreign CA (same org name).
        let z = Org::new("y.test");
        let forged = z.identity("c.y.test");
        let err = handshake(
            client(),
            server_trust.server_config(&forged, ALPN).unwrap(),
            "c.y.test",
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                Failure::Client(rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer
                ))
            ),
            "{err:?}"
        );

        // The name the caller dials does not widen what is accepted.
        let err = handshake(
            client(),
            server_trust.server_config(&other, ALPN).unwrap(),
            "other.y.test",
        )
        .unwrap_err();
        assert!(matches!(err, Failure::Client(_)), "{err:?}");
    }

    #[test]
    fn the_acceptor_refuses_a_client_with_an_unknown_ca_or_an_unconfigured_name() {
        let p = pair();
        let server = || p.c_trust.server_config(&p.c, ALPN).unwrap();

        let z = Org::new("x.test");
        let forged = z.identity("a.x.test");
        let err = handshake(
            p.a_trust.client_config("c.y.test", &forged, ALPN).unwrap(),
            server(),
            "c.y.test",
        )
        .unwrap_err();
        // Refused, naming the broker the certificate claims.
        match &err {
            Failure::Server(rustls::Error::InvalidCertificate(CertificateError::Other(e))) => {
                assert!(e.to_string().contains("a.x.test"), "{e}");
            }
            other => panic!("{other:?}"),
        }

        let stranger = p.x.identity("evil.x.test");
        let err = handshake(
            p.a_trust
                .client_config("c.y.test", &stranger, ALPN)
                .unwrap(),
            server(),
            "c.y.test",
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                Failure::Server(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForNameContext { .. }
                ))
            ),
            "{err:?}"
        );
    }
}
