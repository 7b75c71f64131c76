//! The HTTP/WebSocket listener: accepts TCP connections and serves each with hyper,
//! under limits a stranger cannot exceed.
//!
//! - At most `limits.max_http_connections` connections at once (every kind: plain HTTP,
//!   keep-alive, upgraded WebSocket). Beyond, a new connection is closed at once. The cap
//!   is kept below the process's file-descriptor limit, so the broker never runs out of
//!   descriptors for its store, its files and its federation endpoint.
//! - At most `limits.max_pending_per_address` *unauthenticated* connections per client
//!   address (an IPv6 /64 counts as one): a TCP connection counts from accept until it
//!   becomes an authenticated WebSocket session, so half-sent requests, idle keep-alive
//!   connections and WebSockets that never say hello cannot fill the server. Connections
//!   from `server.trusted_proxies` are exempt (every client behind a proxy shares its
//!   address; the proxy is expected to apply its own limits).
//! - A request's headers must arrive within `limits.http_header_timeout`, and a
//!   keep-alive connection idle (no request) for as long is closed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::Ctx;
use crate::hub::lock;
use crate::ratelimit::addr_key;

/// Unauthenticated connections per client address.
#[derive(Debug)]
pub(crate) struct PendingTable {
    counts: Mutex<HashMap<IpAddr, usize>>,
    cap: usize,
}

/// One unauthenticated connection's place in its address's count; dropped when the
/// connection ends or authenticates.
#[derive(Debug)]
pub(crate) struct PendingSlot {
    table: Arc<PendingTable>,
    key: IpAddr,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut counts = lock(&self.table.counts);
        if let Some(n) = counts.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

impl PendingTable {
    pub(crate) fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            counts: Mutex::default(),
            cap,
        })
    }

    /// A slot for a new connection from `ip`, unless the address holds `cap` already.
    /// (The table holds at most one entry per open connection: it is bounded by the
    /// connection cap.)
    pub(crate) fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<PendingSlot> {
        let key = addr_key(ip);
        let mut counts = lock(&self.counts);
        let n = counts.entry(key).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(PendingSlot {
            table: self.clone(),
            key,
        })
    }

    /// Addresses with unauthenticated connections (for `/metrics`).
    pub(crate) fn len(&self) -> usize {
        lock(&self.counts).len()
    }
}

/// A connection's unauthenticated slot, handed to its WebSocket session (which drops it
/// once the hello is accepted). Shared through the request's extensions.
#[derive(Debug, Clone, Default)]
pub(crate) struct SlotHandle(Arc<Mutex<Option<PendingSlot>>>);

impl SlotHandle {
    /// Takes the slot (the first caller gets it).
    pub(crate) fn take(&self) -> Option<PendingSlot> {
        lock(&self.0).take()
    }
}

/// Closes a connection refused at accept with a reset (zero linger): a flood of
/// connections leaves no `TIME_WAIT` sockets behind here (thousands a second would keep
/// hundreds of thousands for a minute), and nothing was sent that a reset could lose.
fn refuse(tcp: tokio::net::TcpStream) {
    let _ = tcp.set_zero_linger();
    drop(tcp);
}

/// The most connections this process can hold: the configured cap, but never within
/// `RESERVED_FDS` of the descriptor limit (read from `/proc/self/limits`).
pub(crate) fn connection_cap(configured: usize) -> usize {
    const RESERVED_FDS: usize = 256;
    match open_files_limit() {
        Some(limit) if limit.saturating_sub(RESERVED_FDS) < configured => {
            let cap = limit.saturating_sub(RESERVED_FDS).max(16);
            warn!(
                configured,
                fd_limit = limit,
                cap,
                "limits.max_http_connections is above what the file-descriptor limit allows; capping (raise LimitNOFILE)"
            );
            cap
        }
        _ => configured,
    }
}

fn open_files_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    // "Max open files            1024                 4096                 files"
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Serves `app` on `listener` until `stop` is cancelled, then lets every connection
/// finish its request (graceful) while the caller waits on `conns`.
pub(crate) async fn serve(
    ctx: Arc<Ctx>,
    listener: tokio::net::TcpListener,
    app: Router,
    stop: CancellationToken,
    conns: TaskTracker,
) {
    let limits = &ctx.config.limits;
    let slots = Arc::new(Semaphore::new(connection_cap(limits.max_http_connections)));
    let header_timeout = limits.http_header_timeout;
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        let (tcp, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors (or another transient error): back off rather than
                // spin; the connections holding them end by their timeouts.
                warn!(cause = %e, "accepting a connection");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            ctx.metrics.http_refused.inc("http_connections");
            refuse(tcp);
            continue;
        };
        let trusted = ctx.config.server.trusted_proxies.contains(&remote.ip());
        let slot = if trusted {
            None
        } else {
            match ctx.pending.enter(remote.ip()) {
                Some(s) => Some(s),
                None => {
                    ctx.metrics.http_refused.inc("address_pending");
                    debug!(%remote, "too many unauthenticated connections from this address");
                    refuse(tcp);
                    continue;
                }
            }
        };
        // Pushes are small frames: without TCP_NODELAY, Nagle's algorithm would hold
        // them back waiting for the client's delayed ACK.
        let _ = tcp.set_nodelay(true);
        let handle = SlotHandle(Arc::new(Mutex::new(slot)));
        let app = app.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            let _permit = permit;
            let keep = handle.clone();
            let service = hyper::service::service_fn(move |mut req| {
                req.extensions_mut().insert(ConnectInfo(remote));
                req.extensions_mut().insert(handle.clone());
                let mut app = app.clone();
                async move {
                    use tower_service::Service as _;
                    app.call(req).await
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(%remote, cause = %e, "http connection ended");
            }
            // An upgraded connection's slot went to its session; any other is released.
            drop(keep);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_slots_are_counted_per_address_and_released() {
        let t = PendingTable::new(2);
        let a: IpAddr = [10, 0, 0, 1].into();
        let s1 = t.enter(a);
        let s2 = t.enter(a);
        assert!(s1.is_some() && s2.is_some());
        assert!(t.enter(a).is_none(), "third from one address");
        assert!(t.enter([10, 0, 0, 2].into()).is_some());
        drop(s1);
        let s3 = t.enter(a);
        assert!(s3.is_some());
        drop((s2, s3));
        assert_eq!(t.len(), 0);
        // An IPv6 /64 is one address.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap_or(a);
        let x = t.enter(v6("2001:db8::1"));
        let y = t.enter(v6("2001:db8::2"));
        assert!(x.is_some() && y.is_some());
        assert!(t.enter(v6("2001:db8::3")).is_none());
    }
}
