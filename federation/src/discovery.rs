//! Finding a peer broker's QUIC addresses from its name.
//!
//! A peer organization is named by a DNS name (usually its domain). Its brokers are
//! published as SRV records at `_meshd._udp.<name>` (RFC 2782), so an organization can run
//! several brokers, on any port, with failover order and load shares chosen in DNS. A
//! name without SRV records falls back to its own A/AAAA records on the default port,
//! which keeps a one-broker setup free of SRV.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::ProtoError;
use hickory_resolver::proto::rr::{Name, RData};
use hickory_resolver::{Resolver, TokioResolver};
use rand::{Rng, RngExt};

/// The SRV service label pair queried under a peer broker's name.
const SERVICE_PREFIX: &str = "_meshd._udp";

/// Why a broker name did not yield any address.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The resolver could not be built (for example an unreadable `/etc/resolv.conf`).
    #[error("cannot build the DNS resolver: {0}")]
    Resolver(#[source] NetError),
    /// The name is not a valid DNS name.
    #[error("invalid broker name {name:?}: {source}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What the parser objected to.
        #[source]
        source: ProtoError,
    },
    /// The domain publishes a single SRV record with target `.`: RFC 2782's way of saying
    /// the service is decidedly not available there, so no fallback is tried.
    #[error("broker {0} explicitly offers no meshd service (SRV target \".\")")]
    NoService(String),
    /// Every lookup failed; `source` is the last DNS error.
    #[error("cannot resolve broker {name}: {source}")]
    Lookup {
        /// The broker name as given.
        name: String,
        /// The last DNS error seen.
        #[source]
        source: NetError,
    },
}

/// One SRV record, as ordered by [`order_srv`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrvTarget {
    /// Lower is tried first.
    pub priority: u16,
    /// Relative share among records of the same priority.
    pub weight: u16,
    /// The port the broker listens on.
    pub port: u16,
    /// The host to resolve, as a fully qualified name (trailing dot).
    pub target: String,
}

/// Orders SRV records as RFC 2782 prescribes: ascending priority, and within a priority a
/// weighted random draw without replacement.
///
/// Zero-weight records are put first in each draw, so they are chosen only when the
/// random number is 0, as the RFC's selection algorithm specifies; a group of only
/// zero-weight records keeps its order. Taking the generator as a parameter keeps the
/// function deterministic under test.
pub fn order_srv(mut records: Vec<SrvTarget>, rng: &mut impl Rng) -> Vec<SrvTarget> {
    records.sort_by_key(|r| r.priority); // stable: equal priorities keep their order
    let mut ordered = Vec::with_capacity(records.len());
    let mut rest = records.into_iter().peekable();
    while let Some(first) = rest.next() {
        let priority = first.priority;
        let mut group = vec![first];
        while let Some(r) = rest.next_if(|r| r.priority == priority) {
            group.push(r);
        }
        group.sort_by_key(|r| r.weight != 0); // stable: zero weights first
        while !group.is_empty() {
            let total: u64 = group.iter().map(|r| u64::from(r.weight)).sum();
            let pick = rng.random_range(0..=total);
            let mut running = 0u64;
            let index = group
                .iter()
                .position(|r| {
                    running += u64::from(r.weight);
                    running >= pick
                })
                .unwrap_or(0); // unreachable: the full sum is >= pick
            ordered.push(group.remove(index));
        }
    }
    ordered
}

/// Resolves peer broker names to socket addresses via SRV, falling back to A/AAAA.
#[derive(Clone, Debug)]
pub struct Discovery {
    resolver: TokioResolver,
}

impl Discovery {
    /// Builds a resolver.
    ///
    /// `None` uses the system configuration (`/etc/resolv.conf`). `Some(servers)` asks only
    /// those servers (UDP, TCP after truncation), ignores `/etc/hosts` and caches nothing,
    /// so that tests and operators pinning a nameserver see every zone change at once.
    ///
    /// # Errors
    /// [`DiscoveryError::Resolver`] when the system configuration cannot be read.
    pub fn new(nameservers: Option<Vec<SocketAddr>>) -> Result<Self, DiscoveryError> {
        let mut builder = match nameservers {
            None => {
                let mut b = Resolver::builder_tokio().map_err(DiscoveryError::Resolver)?;
                let opts = b.options_mut();
                // A broker that vanished from DNS must not stay unresolvable for the
                // zone's full negative TTL once it comes back.
                opts.negative_max_ttl = Some(Duration::from_secs(30));
                opts.positive_max_ttl = Some(Duration::from_secs(300));
                b
            }
            Some(servers) => {
                let name_servers = servers
                    .iter()
                    .map(|s| {
                        let mut udp = ConnectionConfig::udp();
                        udp.port = s.port();
                        let mut tcp = ConnectionConfig::tcp();
                        tcp.port = s.port();
                        NameServerConfig::new(s.ip(), true, vec![udp, tcp])
                    })
                    .collect();
                let config = ResolverConfig::from_name_servers(name_servers);
                let mut b = Resolver::builder_with_config(config, TokioRuntimeProvider::default());
                let opts = b.options_mut();
                opts.cache_size = 0;
                // Belt and braces: even if an entry slips into the cache it is stale at once.
                opts.positive_max_ttl = Some(Duration::ZERO);
                opts.negative_max_ttl = Some(Duration::ZERO);
                opts.attempts = 2;
                opts.timeout = Duration::from_secs(2);
                opts.use_hosts_file = ResolveHosts::Never;
                b
            }
        };
        // Both families, IPv4 first: the order the addresses are tried in.
        builder.options_mut().ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        let resolver = builder.build().map_err(DiscoveryError::Resolver)?;
        Ok(Self { resolver })
    }

    /// Returns the addresses of broker `name`, in the order they should be tried.
    ///
    /// Queries SRV `_meshd._udp.<name>.`; targets are ordered by [`order_srv`] and each is
    /// resolved to A then AAAA addresses with the record's port. Without SRV records
    /// (NXDOMAIN or no data) the name's own A/AAAA records are used with `default_port`.
    /// An IP literal is returned as is, with `default_port`. Names are always queried
    /// absolute, so no search list applies.
    ///
    /// # Errors
    /// [`DiscoveryError::NoService`] when the domain opts out with target `.`;
    /// [`DiscoveryError::Lookup`] with the last DNS error when nothing resolved (including
    /// transient failures of the SRV query itself: a guessed port is not tried then);
    /// [`DiscoveryError::InvalidName`] for a malformed name.
    pub async fn resolve(
        &self,
        name: &str,
        default_port: u16,
    ) -> Result<Vec<SocketAddr>, DiscoveryError> {
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, default_port)]);
        }
        let invalid = |source| DiscoveryError::InvalidName {
            name: name.to_owned(),
            source,
        };
        let bare = name.strip_suffix('.').unwrap_or(name);
        let host = Name::from_utf8(format!("{bare}.")).map_err(invalid)?;
        let srv_name = Name::from_utf8(format!("{SERVICE_PREFIX}.{bare}.")).map_err(invalid)?;
        let lookup_err = |source| DiscoveryError::Lookup {
            name: name.to_owned(),
            source,
        };

        let records: Vec<SrvTarget> = match self.resolver.srv_lookup(srv_name).await {
            Ok(lookup) => lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::SRV(s) => Some(SrvTarget {
                        priority: s.priority,
                        weight: s.weight,
                        port: s.port,
                        target: s.target.to_utf8(),
                    }),
                    _ => None,
                })
                .collect(),
            Err(e) if e.is_no_records_found() => Vec::new(),
            Err(e) => return Err(lookup_err(e)),
        };

        if records.is_empty() {
            tracing::debug!(broker = name, "no SRV records; falling back to A/AAAA");
            let ips = self.resolver.lookup_ip(host).await.map_err(lookup_err)?;
            let addrs: Vec<SocketAddr> = ips
                .iter()
                .map(|ip| SocketAddr::new(ip, default_port))
                .collect();
            return non_empty(addrs, name);
        }
        if let [only] = records.as_slice()
            && is_root(&only.target)
        {
            return Err(DiscoveryError::NoService(name.to_owned()));
        }

        // Ordering needs the thread-local generator, which must not live across an await.
        let ordered = order_srv(
            records
                .into_iter()
                .filter(|r| !is_root(&r.target))
                .collect(),
            &mut rand::rng(),
        );
        let mut addrs = Vec::new();
        let mut last_err = None;
        for srv in &ordered {
            match self.resolver.lookup_ip(srv.target.as_str()).await {
                Ok(ips) => {
                    for ip in ips.iter() {
                        let addr = SocketAddr::new(ip, srv.port);
                        if !addrs.contains(&addr) {
                            addrs.push(addr);
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(broker = name, target = %srv.target, error = %e, "SRV target did not resolve");
                    last_err = Some(e);
                }
            }
        }
        match (addrs.is_empty(), last_err) {
            (true, Some(e)) => Err(lookup_err(e)),
            _ => non_empty(addrs, name),
        }
    }
}

fn is_root(target: &str) -> bool {
    target.is_empty() || target == "."
}

fn non_empty(addrs: Vec<SocketAddr>, name: &str) -> Result<Vec<SocketAddr>, DiscoveryError> {
    if addrs.is_empty() {
        Err(DiscoveryError::Lookup {
            name: name.to_owned(),
            source: NetError::Message("no addresses"),
        })
    } else {
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn srv(priority: u16, weight: u16, port: u16) -> SrvTarget {
        SrvTarget {
            priority,
            weight,
            port,
            target: format!("b{port}.example.test."),
        }
    }

    /// How often each port came first over `draws` orderings of `records`.
    fn first_counts(records: &[SrvTarget], draws: usize) -> std::collections::HashMap<u16, usize> {
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..draws {
            let ordered = order_srv(records.to_vec(), &mut rng);
            *counts.entry(ordered[0].port).or_default() += 1;
        }
        counts
    }

    #[test]
    fn empty_stays_empty() {
        let mut rng = StdRng::seed_from_u64(1);
        assert!(order_srv(Vec::new(), &mut rng).is_empty());
    }

    #[test]
    fn priorities_are_ascending_whatever_the_weights() {
        let records = vec![
            srv(20, 65535, 1),
            srv(10, 1, 2),
            srv(30, 100, 3),
            srv(10, 1000, 4),
            srv(20, 0, 5),
        ];
        let mut rng = StdRng::seed_from_u64(2);
        for _ in 0..200 {
            let ordered = order_srv(records.clone(), &mut rng);
            let prios: Vec<u16> = ordered.iter().map(|r| r.priority).collect();
            assert_eq!(prios, [10, 10, 20, 20, 30]);
            let mut ports: Vec<u16> = ordered.iter().map(|r| r.port).collect();
            ports.sort_unstable();
            assert_eq!(ports, [1, 2, 3, 4, 5], "every record exactly once");
        }
    }

    #[test]
    fn weights_set_the_share_of_first_place() {
        // Draws are uniform over 0..=100: port 1 (first in list) wins for 0..=60.
        let counts = first_counts(&[srv(10, 60, 1), srv(10, 40, 2)], 20_000);
        let share = counts[&1] as f64 / 20_000.0;
        assert!((0.58..0.63).contains(&share), "share {share}");

        let counts = first_counts(&[srv(10, 1, 1), srv(10, 9, 2)], 20_000);
        let share = counts[&2] as f64 / 20_000.0;
        assert!((0.78..0.86).contains(&share), "share {share}");
    }

    #[test]
    fn equal_weights_split_evenly() {
        let counts = first_counts(&[srv(5, 10, 1), srv(5, 10, 2), srv(5, 10, 3)], 30_000);
        for port in [1, 2, 3] {
            let share = counts[&port] as f64 / 30_000.0;
            assert!((0.30..0.37).contains(&share), "port {port}: share {share}");
        }
    }

    #[test]
    fn zero_weight_gets_the_rfc_chance() {
        // Zero weight is moved first and wins only when the draw is 0: 1 in 11.
        let counts = first_counts(&[srv(10, 10, 1), srv(10, 0, 2)], 22_000);
        let share = counts[&2] as f64 / 22_000.0;
        assert!((0.07..0.115).contains(&share), "share {share}");
    }

    #[test]
    fn all_zero_weights_keep_their_order() {
        let records = vec![srv(1, 0, 1), srv(1, 0, 2), srv(1, 0, 3)];
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..50 {
            assert_eq!(order_srv(records.clone(), &mut rng), records);
        }
    }

    #[tokio::test]
    async fn ip_literals_need_no_dns() {
        // Port 9 (discard) is never asked: literals short-circuit.
        let d = Discovery::new(Some(vec![SocketAddr::from(([127, 0, 0, 1], 9))])).unwrap();
        assert_eq!(
            d.resolve("127.0.0.1", 4433).await.unwrap(),
            [SocketAddr::from(([127, 0, 0, 1], 4433))]
        );
        assert_eq!(
            d.resolve("::1", 4433).await.unwrap(),
            ["[::1]:4433".parse::<SocketAddr>().unwrap()]
        );
    }

    #[tokio::test]
    async fn malformed_names_are_rejected_before_any_query() {
        let d = Discovery::new(Some(vec![SocketAddr::from(([127, 0, 0, 1], 9))])).unwrap();
        let long = "a".repeat(64);
        let err = d
            .resolve(&format!("{long}.example"), 4433)
            .await
            .unwrap_err();
        assert!(matches!(err, DiscoveryError::InvalidName { .. }), "{err}");
        let err = d.resolve("a..b", 4433).await.unwrap_err();
        assert!(matches!(err, DiscoveryError::InvalidName { .. }), "{err}");
    }
}
