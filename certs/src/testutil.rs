//! Test fixtures: real org CAs and broker certificates in temporary directories, and a
//! TLS handshake pumped through memory buffers.

use crate::secret::{write_public_file, write_secret_file};
use crate::{BrokerCertPaths, BrokerIdentity, OrgCa, PeerAnchor};
use rcgen::ExtendedKeyUsagePurpose;
use rustls::{ClientConfig, ClientConnection, ConnectionCommon, ServerConfig, ServerConnection};
use rustls_pki_types::{CertificateDer, ServerName};
use std::ops::DerefMut;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use tempfile::TempDir;
use time::Duration;

pub(crate) const ALPN: &[u8] = b"meshd-fed/1";

pub(crate) fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// An org with its CA in `dir/ca` and broker files in `dir`.
pub(crate) struct Org {
    pub(crate) dir: TempDir,
    pub(crate) ca: OrgCa,
}

impl Org {
    pub(crate) fn new(org: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (ca, created) = OrgCa::init_or_load(&dir.path().join("ca"), org).unwrap();
        assert!(created);
        Self { dir, ca }
    }

    pub(crate) fn anchor(&self) -> PeerAnchor {
        PeerAnchor::Ca(self.ca.cert_der())
    }

    pub(crate) fn pin(&self) -> PeerAnchor {
        PeerAnchor::pin(&self.ca.fingerprint()).unwrap()
    }

    /// Issues `broker` the normal way and loads it back.
    pub(crate) fn identity(&self, broker: &str) -> BrokerIdentity {
        let paths = self.ca.issue_broker(broker, self.dir.path()).unwrap();
        BrokerIdentity::load(&paths.cert, &paths.key, broker).unwrap()
    }

    /// Leaf + CA chain with a chosen validity (days from now) and key purposes.
    pub(crate) fn chain(
        &self,
        name: &str,
        from_days: i64,
        to_days: i64,
        ekus: Vec<ExtendedKeyUsagePurpose>,
    ) -> (Vec<CertificateDer<'static>>, rcgen::KeyPair) {
        let now = crate::time::now_utc();
        let (cert, key) = self
            .ca
            .issue_leaf(
                name,
                now + Duration::days(from_days),
                now + Duration::days(to_days),
                ekus,
            )
            .unwrap();
        (vec![cert.der().clone(), self.ca.cert_der()], key)
    }

    /// Writes a leaf with a chosen validity as `<name>.pem` / `<name>.key`.
    pub(crate) fn write_leaf(&self, name: &str, from_days: i64, to_days: i64) -> BrokerCertPaths {
        let (chain, key) = self.chain(name, from_days, to_days, both_ekus());
        let paths = BrokerCertPaths {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}.key")),
        };
        let pem: String = chain
            .iter()
            .map(|c| crate::der::pem_encode("CERTIFICATE", c))
            .collect();
        write_public_file(&paths.cert, pem.as_bytes()).unwrap();
        write_secret_file(&paths.key, key.serialize_pem().as_bytes()).unwrap();
        paths
    }
}

pub(crate) fn both_ekus() -> Vec<ExtendedKeyUsagePurpose> {
    vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ]
}

/// Which side refused the handshake.
#[derive(Debug)]
pub(crate) enum Failure {
    Client(rustls::Error),
    Server(rustls::Error),
}

fn transfer<A, B, DA, DB>(from: &mut A, to: &mut B) -> Result<(), rustls::Error>
where
    A: DerefMut<Target = ConnectionCommon<DA>>,
    B: DerefMut<Target = ConnectionCommon<DB>>,
{
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    let mut rest = buf.as_slice();
    while !rest.is_empty() {
        to.read_tls(&mut rest).unwrap();
        to.process_new_packets()?;
    }
    Ok(())
}

/// Runs a full handshake between the two configurations without sockets.
pub(crate) fn handshake(
    client: ClientConfig,
    server: ServerConfig,
    server_name: &str,
) -> Result<(ClientConnection, ServerConnection), Failure> {
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    let mut client = ClientConnection::new(Arc::new(client), name).unwrap();
    let mut server = ServerConnection::new(Arc::new(server)).unwrap();
    for _ in 0..10 {
        transfer(&mut client, &mut server).map_err(Failure::Server)?;
        transfer(&mut server, &mut client).map_err(Failure::Client)?;
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok((client, server));
        }
    }
    panic!("handshake did not finish");
}
