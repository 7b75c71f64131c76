//! Token buckets, alone or by key, and the address key for limits a stranger can reach.
//!
//! Every map keyed by something a client or stranger chooses is bounded: [`Buckets`]
//! holds at most `cap` keys. A bucket that has been idle long enough to refill
//! completely is indistinguishable from a new one, so it is forgotten when room is
//! needed; when every slot holds a bucket still in use, a new key is refused
//! ([`Take::Full`]) rather than evicting someone who is being limited (evicting would
//! hand an attacker a fresh burst).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

/// How long a request refused by a per-address limit waits for its answer. A flood's
/// sender mostly waits for the answer before sending again; answering at once would let
/// it cost the broker as much as its CPU allows, and with this delay each of its
/// connections (at most `limits.max_pending_per_address`) sends one request a second.
/// An honest sender over the limit is told to slow down either way.
pub(crate) const TARPIT: Duration = Duration::from_secs(1);

/// Waits [`TARPIT`] before a refusal is answered (at once when the broker is stopping).
pub(crate) async fn tarpit(stopping: &tokio_util::sync::CancellationToken) {
    tokio::select! {
        () = stopping.cancelled() => {}
        () = tokio::time::sleep(TARPIT) => {}
    }
}

/// Token bucket (rate 0 = unlimited): `send`s per connection, posts per webhook.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket at `now`.
    pub(crate) fn new(rate: u32, burst: u32, now: Instant) -> Self {
        Self::with_rate(f64::from(rate), f64::from(burst), now)
    }

    fn with_rate(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    pub(crate) fn take(&mut self, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Full again by `now` (so forgetting it changes nothing).
    fn refilled(&self, now: Instant) -> bool {
        self.rate <= 0.0
            || self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * self.rate
                >= self.burst
    }
}

/// The answer of [`Buckets::take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Take {
    /// Within the limit.
    Allowed,
    /// Over this key's limit.
    Limited,
    /// A new key, and every slot holds a bucket still in use.
    Full,
}

/// Token buckets by key, at most `cap` of them (see the module docs).
#[derive(Debug)]
pub(crate) struct Buckets<K> {
    map: HashMap<K, Bucket>,
    cap: usize,
    /// Tokens per second, and burst.
    rate: f64,
    burst: f64,
    /// When a full map was last swept, so a map kept full does not cost a sweep per call.
    swept: Option<Instant>,
}

impl<K: Hash + Eq> Buckets<K> {
    /// `per_min` a minute per key (bursting to as many), at most `cap` keys.
    pub(crate) fn per_minute(per_min: f64, cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            cap,
            rate: per_min / 60.0,
            burst: per_min,
            swept: None,
        }
    }

    /// `rate` a second, bursting to `burst`, at most `cap` keys.
    pub(crate) fn per_second(rate: u32, burst: u32, cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            cap,
            rate: f64::from(rate),
            burst: f64::from(burst),
            swept: None,
        }
    }

    /// Takes a token for `key` at `now`.
    pub(crate) fn take(&mut self, key: K, now: Instant) -> Take {
        if let Some(b) = self.map.get_mut(&key) {
            return if b.take(now) {
                Take::Allowed
            } else {
                Take::Limited
            };
        }
        if self.map.len() >= self.cap {
            // At most one sweep a second while full.
            if self
                .swept
                .is_some_and(|at| now.saturating_duration_since(at) < Duration::from_secs(1))
            {
                return Take::Full;
            }
            self.swept = Some(now);
            self.map.retain(|_, b| !b.refilled(now));
            if self.map.len() >= self.cap {
                return Take::Full;
            }
        }
        let mut b = Bucket::with_rate(self.rate, self.burst, now);
        let ok = b.take(now);
        self.map.insert(key, b);
        if ok { Take::Allowed } else { Take::Limited }
    }

    /// Forgets buckets that are full again (periodic upkeep).
    pub(crate) fn prune(&mut self, now: Instant) {
        self.map.retain(|_, b| !b.refilled(now));
    }

    /// Keys held.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

/// The unit a per-address limit counts: an IPv4 address, or the /64 of an IPv6
/// address (one host usually holds a whole /64, so finer keys would be free to vary).
pub(crate) fn addr_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills() {
        let t0 = crate::time::instant();
        let mut b = Bucket::with_rate(10.0, 2.0, t0);
        assert!(b.take(t0));
        assert!(b.take(t0));
        assert!(!b.take(t0));
        assert!(b.take(t0 + Duration::from_millis(150)));
        assert!(!b.take(t0 + Duration::from_millis(150)));
        let mut unlimited = Bucket::with_rate(0.0, 0.0, t0);
        assert!((0..1000).all(|_| unlimited.take(t0)));
    }

    #[test]
    fn buckets_are_bounded_and_forget_only_refilled_keys() {
        let t0 = crate::time::instant();
        // 60 a minute (1/s), burst 60, at most 3 keys.
        let mut m = Buckets::per_minute(60.0, 3);
        for k in 0..3 {
            assert_eq!(m.take(k, t0), Take::Allowed);
        }
        // Full, and nobody has refilled yet: a new key is refused, not admitted by evicting.
        assert_eq!(m.take(99, t0), Take::Full);
        assert_eq!(m.len(), 3);
        // Existing keys keep their own limits.
        for _ in 0..59 {
            assert_eq!(m.take(0, t0), Take::Allowed);
        }
        assert_eq!(m.take(0, t0), Take::Limited);
        // Two seconds later keys 1 and 2 are full again and make room; key 0 is not.
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(m.take(7, t1), Take::Allowed);
        assert_eq!(m.len(), 2);
        assert_eq!(m.take(0, t1), Take::Allowed);
        m.prune(t1 + Duration::from_secs(3600));
        assert_eq!(m.len(), 0);
    }

    #[test]
    fn full_map_sweeps_at_most_once_a_second() {
        let t0 = crate::time::instant();
        let mut m = Buckets::per_second(1, 1, 1);
        assert_eq!(m.take(1, t0), Take::Allowed);
        assert_eq!(m.take(2, t0), Take::Full);
        // Key 1 refilled after 1 s, but the last sweep was under a second ago.
        assert_eq!(m.take(2, t0 + Duration::from_millis(999)), Take::Full);
        assert_eq!(m.take(2, t0 + Duration::from_millis(1500)), Take::Allowed);
    }

    #[test]
    fn ipv6_counts_by_slash_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1"
            .parse()
            .unwrap_or(IpAddr::V4([0; 4].into()));
        let b: IpAddr = "2001:db8:1:2:bbbb::9"
            .parse()
            .unwrap_or(IpAddr::V4([0; 4].into()));
        let c: IpAddr = "2001:db8:1:3::1"
            .parse()
            .unwrap_or(IpAddr::V4([0; 4].into()));
        assert_eq!(addr_key(a), addr_key(b));
        assert_ne!(addr_key(a), addr_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1"
            .parse()
            .unwrap_or(IpAddr::V4([0; 4].into()));
        assert_eq!(
            addr_key(mapped),
            "10.0.0.1".parse::<IpAddr>().unwrap_or(mapped)
        );
    }
}
