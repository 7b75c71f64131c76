//! A small authoritative DNS server for discovery tests.
//!
//! It serves a zone the test edits while it runs (SRV, A, AAAA), on 127.0.0.1 over UDP
//! and TCP on the same port, so `Discovery` can be pointed at it exactly as at a real
//! nameserver. It counts queries per name so a test can prove which path was taken.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::Context as _;
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

/// TTL of every answer; the resolver under test is expected to cache nothing anyway.
const TTL: u32 = 5;

/// A DNS server on 127.0.0.1 (UDP and TCP, one port) answering from an editable zone.
///
/// Dropping it stops the server.
#[derive(Debug)]
pub struct TestDns {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    _udp: AbortOnDropHandle<()>,
    _tcp: AbortOnDropHandle<()>,
}

#[derive(Debug, Default)]
struct Zone {
    names: HashMap<String, Node>,
    queries: HashMap<String, usize>,
}

#[derive(Debug, Default)]
struct Node {
    srv: Vec<(u16, u16, u16, Name)>,
    a: Vec<Ipv4Addr>,
    aaaa: Vec<Ipv6Addr>,
}

/// Zone key: lower case, no trailing dot.
fn key(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

impl TestDns {
    /// Binds UDP and TCP on one free 127.0.0.1 port and starts serving an empty zone.
    ///
    /// # Errors
    /// No port was free for both protocols.
    pub async fn start() -> anyhow::Result<Self> {
        // Port 0 picks a free UDP port; TCP on the same number is usually free too, but
        // not always, so try a few.
        let mut last_err = None;
        for _ in 0..16 {
            let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
            let addr = udp.local_addr()?;
            match TcpListener::bind(addr).await {
                Ok(tcp) => {
                    let zone = Arc::new(Mutex::new(Zone::default()));
                    let udp_task = tokio::spawn(serve_udp(udp, zone.clone()));
                    let tcp_task = tokio::spawn(serve_tcp(tcp, zone.clone()));
                    return Ok(Self {
                        addr,
                        zone,
                        _udp: AbortOnDropHandle::new(udp_task),
                        _tcp: AbortOnDropHandle::new(tcp_task),
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.map_or_else(|| anyhow::anyhow!("no port"), anyhow::Error::from))
            .context("binding TCP next to the test DNS UDP port")
    }

    /// The server's address (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn zone(&self) -> MutexGuard<'_, Zone> {
        // A test that panicked mid-edit leaves a usable zone; keep serving.
        self.zone.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the SRV records of `name` with `(priority, weight, port, target)` tuples.
    ///
    /// An empty slice leaves the name existing without SRV (NODATA); target `"."` is the
    /// RFC 2782 "service not available" record.
    ///
    /// # Panics
    /// A target is not a valid DNS name (a bug in the test).
    pub fn set_srv(&self, name: &str, records: &[(u16, u16, u16, &str)]) {
        let srv = records
            .iter()
            .map(|&(prio, weight, port, target)| {
                let target = if target == "." {
                    Name::root()
                } else {
                    let bare = target.strip_suffix('.').unwrap_or(target);
                    Name::from_utf8(format!("{bare}."))
                        .unwrap_or_else(|e| panic!("bad SRV target {target:?}: {e}"))
                };
                (prio, weight, port, target)
            })
            .collect();
        self.zone().names.entry(key(name)).or_default().srv = srv;
    }

    /// Replaces the A records of `name` with `ip`.
    pub fn set_a(&self, name: &str, ip: Ipv4Addr) {
        self.zone().names.entry(key(name)).or_default().a = vec![ip];
    }

    /// Replaces the AAAA records of `name` with `ip`.
    pub fn set_aaaa(&self, name: &str, ip: Ipv6Addr) {
        self.zone().names.entry(key(name)).or_default().aaaa = vec![ip];
    }

    /// Removes `name` and all its records: it answers NXDOMAIN again.
    pub fn remove(&self, name: &str) {
        self.zone().names.remove(&key(name));
    }

    /// How many queries (any type, either transport) named `name` so far.
    pub fn queries(&self, name: &str) -> usize {
        self.zone().queries.get(&key(name)).copied().unwrap_or(0)
    }
}

async fn serve_udp(sock: UdpSocket, zone: Arc<Mutex<Zone>>) {
    let mut buf = vec![0u8; 4096];
    loop {
        // ICMP errors from earlier replies surface here on some systems; keep serving.
        let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        if let Some(reply) = answer(&buf[..n], &zone, true) {
            let _ = sock.send_to(&reply, peer).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, zone: Arc<Mutex<Zone>>) {
    // Connection tasks live in the set, so stopping this task stops them too.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    conns.spawn(serve_tcp_conn(stream, zone.clone()));
                }
            }
            Some(_) = conns.join_next() => {}
        }
    }
}

async fn serve_tcp_conn(mut stream: TcpStream, zone: Arc<Mutex<Zone>>) {
    loop {
        let Ok(len) = stream.read_u16().await else {
            return;
        };
        let mut msg = vec![0u8; usize::from(len)];
        if stream.read_exact(&mut msg).await.is_err() {
            return;
        }
        let Some(reply) = answer(&msg, &zone, false) else {
            continue;
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        if stream.write_u16(len).await.is_err() || stream.write_all(&reply).await.is_err() {
            return;
        }
    }
}

/// The encoded reply to one request, or `None` for datagrams that get no answer
/// (undecodable, or not a query).
fn answer(request: &[u8], zone: &Mutex<Zone>, udp: bool) -> Option<Vec<u8>> {
    let req = Message::from_vec(request).ok()?;
    if req.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.authoritative = true;
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.queries = req.queries.clone();

    match (req.metadata.op_code, req.queries.as_slice()) {
        (OpCode::Query, [q]) => {
            let mut zone = zone.lock().unwrap_or_else(PoisonError::into_inner);
            let k = key(&q.name().to_utf8());
            *zone.queries.entry(k.clone()).or_default() += 1;
            match zone.names.get(&k) {
                None => resp.metadata.response_code = ResponseCode::NXDomain,
                Some(node) => {
                    // Answers carry the query's own spelling of the name (0x20 case).
                    let owner = q.name().clone();
                    match q.query_type() {
                        RecordType::A => {
                            for ip in &node.a {
                                resp.add_answer(Record::from_rdata(
                                    owner.clone(),
                                    TTL,
                                    RData::A(A(*ip)),
                                ));
                            }
                        }
                        RecordType::AAAA => {
                            for ip in &node.aaaa {
                                resp.add_answer(Record::from_rdata(
                                    owner.clone(),
                                    TTL,
                                    RData::AAAA(AAAA(*ip)),
                                ));
                            }
                        }
                        RecordType::SRV => {
                            for (prio, weight, port, target) in &node.srv {
                                let rdata = SRV::new(*prio, *weight, *port, target.clone());
                                resp.add_answer(Record::from_rdata(
                                    owner.clone(),
                                    TTL,
                                    RData::SRV(rdata),
                                ));
                                add_glue(&mut resp, &zone, target);
                            }
                        }
                        _ => {} // NODATA
                    }
                }
            }
        }
        (OpCode::Query, _) => resp.metadata.response_code = ResponseCode::FormErr,
        _ => resp.metadata.response_code = ResponseCode::NotImp,
    }

    let bytes = resp.to_vec().ok()?;
    // Over UDP, a reply larger than the client accepts is truncated so it retries on TCP.
    if udp && bytes.len() > usize::from(req.max_payload().max(512)) {
        return resp.truncate().to_vec().ok();
    }
    Some(bytes)
}

/// Adds the A/AAAA records of `target`, if the zone has them, to the additional section.
fn add_glue(resp: &mut Message, zone: &Zone, target: &Name) {
    let Some(node) = zone.names.get(&key(&target.to_utf8())) else {
        return;
    };
    for ip in &node.a {
        resp.add_additional(Record::from_rdata(target.clone(), TTL, RData::A(A(*ip))));
    }
    for ip in &node.aaaa {
        resp.add_additional(Record::from_rdata(
            target.clone(),
            TTL,
            RData::AAAA(AAAA(*ip)),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use meshd_federation::discovery::{Discovery, DiscoveryError};

    const SRV_NAME: &str = "_meshd._udp.example.test";

    async fn setup() -> (TestDns, Discovery) {
        let dns = TestDns::start().await.unwrap();
        let discovery = Discovery::new(Some(vec![dns.addr()])).unwrap();
        (dns, discovery)
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn srv_targets_come_in_priority_order_with_their_ports() {
        let (dns, d) = setup().await;
        dns.set_srv(
            SRV_NAME,
            &[
                (20, 0, 5002, "b.example.test."),
                (10, 0, 5001, "a.example.test"),
            ],
        );
        dns.set_a("a.example.test", Ipv4Addr::new(127, 0, 0, 1));
        dns.set_aaaa("a.example.test", Ipv6Addr::LOCALHOST);
        dns.set_a("B.Example.Test.", Ipv4Addr::new(127, 0, 0, 2));

        let addrs = d.resolve("example.test", 4433).await.unwrap();
        assert_eq!(
            addrs,
            [sa("127.0.0.1:5001"), sa("[::1]:5001"), sa("127.0.0.2:5002")]
        );
        assert_eq!(dns.queries(SRV_NAME), 1);
        assert_eq!(dns.queries("example.test"), 0, "no fallback taken");

        // Case and a trailing dot do not matter; the zone change is seen at once.
        dns.set_srv(SRV_NAME, &[(10, 0, 6001, "a.example.test")]);
        let addrs = d.resolve("EXAMPLE.test.", 4433).await.unwrap();
        assert_eq!(addrs, [sa("127.0.0.1:6001"), sa("[::1]:6001")]);
        assert_eq!(dns.queries(SRV_NAME), 2);
    }

    #[tokio::test]
    async fn a_lone_dot_target_means_no_service() {
        let (dns, d) = setup().await;
        dns.set_srv(SRV_NAME, &[(0, 0, 0, ".")]);
        dns.set_a("example.test", Ipv4Addr::new(127, 0, 0, 1));
        let err = d.resolve("example.test", 4433).await.unwrap_err();
        assert!(
            matches!(&err, DiscoveryError::NoService(n) if n == "example.test"),
            "{err}"
        );
        assert_eq!(
            dns.queries("example.test"),
            0,
            "no fallback after an opt-out"
        );
    }

    #[tokio::test]
    async fn without_srv_the_name_itself_is_used_with_the_default_port() {
        let (dns, d) = setup().await;
        dns.set_a("example.test", Ipv4Addr::new(127, 0, 0, 3));
        let addrs = d.resolve("example.test", 4433).await.unwrap();
        assert_eq!(addrs, [sa("127.0.0.3:4433")]);
        assert_eq!(dns.queries(SRV_NAME), 1, "SRV asked first (NXDOMAIN)");

        // NODATA for SRV (the name exists) falls back the same way.
        dns.set_srv(SRV_NAME, &[]);
        let addrs = d.resolve("example.test", 4434).await.unwrap();
        assert_eq!(addrs, [sa("127.0.0.3:4434")]);
        assert_eq!(dns.queries(SRV_NAME), 2);
    }

    #[tokio::test]
    async fn unknown_names_fail_naming_the_broker() {
        let (dns, d) = setup().await;
        let err = d.resolve("nowhere.test", 4433).await.unwrap_err();
        assert!(matches!(&err, DiscoveryError::Lookup { name, .. } if name == "nowhere.test"));
        assert!(err.to_string().contains("nowhere.test"), "{err}");
        assert_eq!(dns.queries("_meshd._udp.nowhere.test"), 1);

        // Removing a name makes it unknown again.
        dns.set_a("gone.test", Ipv4Addr::new(127, 0, 0, 1));
        assert!(d.resolve("gone.test", 1).await.is_ok());
        dns.remove("gone.test");
        assert!(d.resolve("gone.test", 1).await.is_err());
    }

    #[tokio::test]
    async fn srv_targets_that_do_not_resolve_are_an_error_not_a_fallback() {
        let (dns, d) = setup().await;
        dns.set_srv(SRV_NAME, &[(10, 0, 5001, "missing.example.test")]);
        dns.set_a("example.test", Ipv4Addr::new(127, 0, 0, 1));
        let err = d.resolve("example.test", 4433).await.unwrap_err();
        assert!(matches!(err, DiscoveryError::Lookup { .. }), "{err}");
        assert_eq!(dns.queries("example.test"), 0);
    }

    #[tokio::test]
    async fn garbage_is_ignored_and_tcp_answers_with_glue() {
        let (dns, d) = setup().await;
        dns.set_srv(SRV_NAME, &[(10, 5, 5001, "a.example.test")]);
        dns.set_a("a.example.test", Ipv4Addr::new(127, 0, 0, 1));

        let junk = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        for datagram in [
            &b""[..],
            b"\x00",
            b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        ] {
            junk.send_to(datagram, dns.addr()).await.unwrap();
        }
        assert_eq!(
            d.resolve("example.test", 1).await.unwrap(),
            [sa("127.0.0.1:5001")]
        );

        let mut q = Message::query();
        q.add_query(Query::query(
            Name::from_utf8(format!("{SRV_NAME}.")).unwrap(),
            RecordType::SRV,
        ));
        let bytes = q.to_vec().unwrap();
        let mut tcp = TcpStream::connect(dns.addr()).await.unwrap();
        tcp.write_u16(u16::try_from(bytes.len()).unwrap())
            .await
            .unwrap();
        tcp.write_all(&bytes).await.unwrap();
        let len = tcp.read_u16().await.unwrap();
        let mut buf = vec![0u8; usize::from(len)];
        tcp.read_exact(&mut buf).await.unwrap();
        let resp = Message::from_vec(&buf).unwrap();
        assert_eq!(resp.metadata.id, q.metadata.id);
        assert_eq!(resp.answers.len(), 1);
        assert!(matches!(&resp.answers[0].data, RData::SRV(s) if s.port == 5001 && s.weight == 5));
        assert!(matches!(&resp.additionals[..], [r] if r.data == RData::A(A::new(127, 0, 0, 1))));
    }
}
