//! A UDP relay between federation peers that a test can cut and heal.
//!
//! QUIC runs over UDP, so a partition is simulated by silently dropping datagrams, the way
//! a firewall or a dead route would: neither side gets an error, only silence, and the
//! links must notice through their own timeouts. Each client source address gets its own
//! upstream-facing socket, so the upstream sees one distinct 4-tuple per client, as it
//! would without the proxy.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::net::UdpSocket;
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

/// Largest datagram relayed; QUIC datagrams are far smaller.
const MAX_DATAGRAM: usize = 65_535;

/// A UDP relay on 127.0.0.1 towards one upstream, with a switch to drop all traffic.
///
/// Dropping it stops every relay task.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _task: AbortOnDropHandle<()>,
}

#[derive(Debug)]
struct Shared {
    upstream: Mutex<SocketAddr>,
    cut: AtomicBool,
    forwarded: AtomicU64,
    dropped: AtomicU64,
}

impl Shared {
    fn upstream(&self) -> SocketAddr {
        *self.upstream.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts the datagram and says whether it may pass.
    fn admit(&self) -> bool {
        if self.cut.load(Ordering::SeqCst) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            false
        } else {
            true
        }
    }

    /// Sends, counting the datagram as forwarded before it can arrive, so a receiver
    /// never sees a datagram the counter does not yet include.
    async fn forward(&self, send: impl Future<Output = std::io::Result<usize>>) {
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        if send.await.is_err() {
            self.forwarded.fetch_sub(1, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl FaultProxy {
    /// Starts relaying from a fresh 127.0.0.1 port to `upstream`.
    ///
    /// # Errors
    /// The listening socket could not be bound.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listen = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listen.local_addr()?;
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            cut: AtomicBool::new(false),
            forwarded: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        let task = tokio::spawn(relay(Arc::new(listen), shared.clone()));
        Ok(Self {
            addr,
            shared,
            _task: AbortOnDropHandle::new(task),
        })
    }

    /// Where clients send to reach the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every datagram, both directions, until [`heal`](Self::heal).
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
    }

    /// Lets datagrams pass again.
    pub fn heal(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Sends all further client datagrams to `upstream` (a restarted broker on a new
    /// port). Existing client mappings, and so their source ports, are kept.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self
            .shared
            .upstream
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = upstream;
    }

    /// Datagrams relayed so far, both directions.
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::Relaxed)
    }

    /// Datagrams dropped so far (cut, or a send that failed), both directions.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

/// Client-to-upstream direction; spawns one return task per client.
async fn relay(listen: Arc<UdpSocket>, shared: Arc<Shared>) {
    // Return tasks live in the set, so stopping this task stops them too.
    let mut returns = JoinSet::new();
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, client) = tokio::select! {
            received = listen.recv_from(&mut buf) => match received {
                Ok(v) => v,
                // ICMP errors from an earlier send surface here on some systems.
                Err(_) => continue,
            },
            Some(_) = returns.join_next() => continue,
        };
        if !shared.admit() {
            continue;
        }
        let upstream = shared.upstream();
        let sock = match clients.get(&client) {
            Some(sock) => sock.clone(),
            None => {
                let local: SocketAddr = if upstream.is_ipv4() {
                    (Ipv4Addr::LOCALHOST, 0).into()
                } else {
                    (Ipv6Addr::LOCALHOST, 0).into()
                };
                let Ok(sock) = UdpSocket::bind(local).await else {
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let sock = Arc::new(sock);
                clients.insert(client, sock.clone());
                returns.spawn(relay_back(
                    sock.clone(),
                    listen.clone(),
                    client,
                    shared.clone(),
                ));
                sock
            }
        };
        shared.forward(sock.send_to(&buf[..n], upstream)).await;
    }
}

/// Upstream-to-client direction for one client.
async fn relay_back(
    upstream_sock: Arc<UdpSocket>,
    listen: Arc<UdpSocket>,
    client: SocketAddr,
    shared: Arc<Shared>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, _from)) = upstream_sock.recv_from(&mut buf).await else {
            continue;
        };
        if !shared.admit() {
            continue;
        }
        shared.forward(listen.send_to(&buf[..n], client)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::patience;
    use std::time::Duration;
    use tokio::time::timeout;

    /// How long silence must last to count as "nothing arrives".
    const QUIET: Duration = Duration::from_millis(300);

    async fn bind() -> UdpSocket {
        UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap()
    }

    async fn recv(sock: &UdpSocket) -> (Vec<u8>, SocketAddr) {
        let mut buf = vec![0u8; 2048];
        let (n, from) = timeout(patience(), sock.recv_from(&mut buf))
            .await
            .expect("datagram within patience")
            .unwrap();
        buf.truncate(n);
        (buf, from)
    }

    async fn assert_silent(sock: &UdpSocket) {
        let mut buf = [0u8; 2048];
        let got = timeout(QUIET, sock.recv_from(&mut buf)).await;
        assert!(got.is_err(), "unexpected datagram: {got:?}");
    }

    /// An echo server that stops when the handle drops.
    async fn echo() -> (SocketAddr, AbortOnDropHandle<()>) {
        let sock = bind().await;
        let addr = sock.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let _ = sock.send_to(&buf[..n], from).await;
            }
        });
        (addr, AbortOnDropHandle::new(task))
    }

    #[tokio::test]
    async fn echo_passes_then_is_cut_then_heals() {
        let (upstream, _echo) = echo().await;
        let proxy = FaultProxy::start(upstream).await.unwrap();
        let client = bind().await;

        client.send_to(b"one", proxy.addr()).await.unwrap();
        assert_eq!(recv(&client).await, (b"one".to_vec(), proxy.addr()));
        assert_eq!(proxy.forwarded(), 2);

        proxy.cut();
        client.send_to(b"two", proxy.addr()).await.unwrap();
        assert_silent(&client).await;
        assert_eq!(proxy.dropped(), 1);

        proxy.heal();
        client.send_to(b"three", proxy.addr()).await.unwrap();
        assert_eq!(recv(&client).await.0, b"three");
        assert_eq!((proxy.forwarded(), proxy.dropped()), (4, 1));
    }

    #[tokio::test]
    async fn cut_drops_the_return_direction_too() {
        let upstream = bind().await;
        let proxy = FaultProxy::start(upstream.local_addr().unwrap())
            .await
            .unwrap();
        let client = bind().await;

        client.send_to(b"hello", proxy.addr()).await.unwrap();
        let (got, mapped) = recv(&upstream).await;
        assert_eq!(got, b"hello");

        proxy.cut();
        upstream.send_to(b"lost", mapped).await.unwrap();
        assert_silent(&client).await;
        proxy.heal();
        upstream.send_to(b"back", mapped).await.unwrap();
        assert_eq!(recv(&client).await, (b"back".to_vec(), proxy.addr()));
        assert_eq!(proxy.dropped(), 1);
    }

    #[tokio::test]
    async fn each_client_gets_its_own_upstream_port_and_keeps_it_across_retargeting() {
        let first = bind().await;
        let proxy = FaultProxy::start(first.local_addr().unwrap())
            .await
            .unwrap();
        let (a, b) = (bind().await, bind().await);

        a.send_to(b"a", proxy.addr()).await.unwrap();
        let (_, from_a) = recv(&first).await;
        b.send_to(b"b", proxy.addr()).await.unwrap();
        let (_, from_b) = recv(&first).await;
        assert_ne!(from_a, from_b, "distinct 4-tuples upstream");

        // A restarted upstream on another port: same client mapping, new destination.
        let second = bind().await;
        proxy.set_upstream(second.local_addr().unwrap());
        a.send_to(b"again", proxy.addr()).await.unwrap();
        let (got, from) = recv(&second).await;
        assert_eq!((got.as_slice(), from), (&b"again"[..], from_a));
        second.send_to(b"reply", from).await.unwrap();
        assert_eq!(recv(&a).await.0, b"reply");
        assert_silent(&first).await;
    }
}
