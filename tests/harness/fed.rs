//! Federation fixtures: organizations with their own CAs, broker configurations that
//! trust exactly the configured peers, and status polling.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use meshd_certs::{BrokerCertPaths, OrgCa};
use meshd_config::{Federation, FederationPeer, PeerAnchorConfig};
use serde_json::Value;

/// An organization: a DNS name and its own CA in a temporary directory.
#[derive(Debug)]
pub struct Org {
    /// The org's DNS name.
    pub name: String,
    /// Its CA.
    pub ca: OrgCa,
    dir: tempfile::TempDir,
}

impl Org {
    /// Creates the org and its CA.
    ///
    /// # Errors
    /// Certificate generation failed.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let (ca, created) = OrgCa::init_or_load(dir.path(), name)?;
        if !created {
            bail!("a fresh directory already held a CA");
        }
        Ok(Self {
            name: name.to_owned(),
            ca,
            dir,
        })
    }

    /// The CA certificate file.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join(meshd_certs::CA_CERT_FILE)
    }

    /// Issues a broker certificate signed by this org's CA.
    ///
    /// # Errors
    /// Issuance failed.
    pub fn issue(&self, broker: &str) -> anyhow::Result<BrokerCertPaths> {
        let out = self.dir.path().join(broker);
        Ok(self.ca.issue_broker(broker, &out)?)
    }

    /// A peer entry trusting this org's CA for `broker`.
    pub fn peer(&self, broker: &str, addr: Option<SocketAddr>) -> FederationPeer {
        FederationPeer {
            name: broker.to_owned(),
            addr: addr.map(|a| a.to_string()),
            anchor: PeerAnchorConfig::CaFile(self.ca_path()),
        }
    }

    /// A `[federation]` section for `broker` of this org, with timers short enough for
    /// tests (reconnects within half a second, a dead link noticed in 1.5 s).
    ///
    /// # Errors
    /// Issuance failed.
    pub fn federation(
        &self,
        broker: &str,
        nameserver: Option<SocketAddr>,
        peers: Vec<FederationPeer>,
    ) -> anyhow::Result<Federation> {
        let paths = self.issue(broker)?;
        Ok(Federation {
            broker: broker.to_owned(),
            listen: "127.0.0.1:0".parse()?,
            cert: paths.cert,
            key: paths.key,
            ca: self.ca_path(),
            nameservers: nameserver.map(|n| vec![n]),
            presence_grace: Duration::from_secs(2),
            spatial_interest: true,
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_millis(500),
            keepalive: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(1500),
            outbox_window: 1024,
            max_frame_bytes: 4 << 20,
            peers,
        })
    }
}

/// `GET /federation` of a broker.
///
/// # Errors
/// Transport failure or a non-JSON answer.
pub async fn status(http: SocketAddr) -> anyhow::Result<Value> {
    let (code, _, body) = crate::broker::http(http, "GET", "/federation", None).await?;
    let body: Value = serde_json::from_slice(&body)?;
    if code != 200 {
        bail!("/federation answered {code}: {body}");
    }
    Ok(body)
}

/// The status entry of one link.
pub fn link<'a>(status: &'a Value, peer: &str) -> Option<&'a Value> {
    status["links"]
        .as_array()?
        .iter()
        .find(|l| l["peer"] == peer)
}

/// Polls `GET /federation` until `pred` holds for the link to `peer`.
///
/// # Errors
/// The deadline passed.
pub async fn wait_link(
    http: SocketAddr,
    peer: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let r = crate::eventually(&format!("link to {peer} {what}"), || async {
        let st = status(http).await.ok()?;
        link(&st, peer).filter(|l| pred(l)).cloned()
    })
    .await;
    match r {
        Ok(v) => Ok(v),
        Err(e) => {
            let last = status(http).await.unwrap_or_default();
            Err(e.context(format!("last status: {last}")))
        }
    }
}

/// Waits until `mesh` flows over the link to `peer`.
///
/// # Errors
/// Deadline.
pub async fn wait_flowing(http: SocketAddr, peer: &str, mesh: &str) -> anyhow::Result<()> {
    wait_link(http, peer, &format!("flowing {mesh}"), |l| {
        l["state"] == "up"
            && l["meshes"]
                .as_array()
                .is_some_and(|m| m.iter().any(|x| x == mesh))
    })
    .await
    .map(drop)
}

/// A link handler waiting at [`HeldLinks::before_run`] until the test releases it.
#[derive(Debug)]
pub struct HeldLink {
    /// Peer broker.
    pub peer: String,
    /// The manager's link number.
    pub id: u64,
    /// Whether the broker under test dialed it.
    pub dialer: bool,
    release: tokio::sync::oneshot::Sender<()>,
}

impl HeldLink {
    /// Lets the handler run.
    pub fn release(self) {
        let _ = self.release.send(());
    }
}

/// What the link manager of a broker under test reports.
#[derive(Debug)]
pub enum LinkEvent {
    /// A handler is about to run and waits for its release.
    Held(HeldLink),
    /// The handler of link `id` returned.
    Ended(u64),
}

/// Link hooks that hold every link's handler until the test releases it, so a test can
/// start two links' handlers in the order it wants.
#[derive(Debug)]
pub struct HeldLinks {
    tx: tokio::sync::mpsc::UnboundedSender<LinkEvent>,
}

impl HeldLinks {
    /// The hooks, and where their events arrive.
    pub fn new() -> (
        std::sync::Arc<Self>,
        tokio::sync::mpsc::UnboundedReceiver<LinkEvent>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (std::sync::Arc::new(Self { tx }), rx)
    }
}

impl meshd_federation::LinkHooks for HeldLinks {
    fn before_run(
        &self,
        peer: &str,
        id: u64,
        dialer: bool,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let (release, wait) = tokio::sync::oneshot::channel();
        let _ = self.tx.send(LinkEvent::Held(HeldLink {
            peer: peer.to_owned(),
            id,
            dialer,
            release,
        }));
        Box::pin(async move {
            let _ = wait.await;
        })
    }

    fn after_run(&self, _peer: &str, id: u64) {
        let _ = self.tx.send(LinkEvent::Ended(id));
    }
}
