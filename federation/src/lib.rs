//! Broker-to-broker links for meshd: QUIC (quinn) with mutual TLS against each peer
//! organization's CA, DNS SRV discovery, and a manager that keeps one authenticated link
//! per configured peer broker.
//!
//! The wire frames live in `meshd_protocol::fed` (sans-IO); key material and trust in
//! `meshd_certs`. What flows over a link (meshes, presence, messages) is decided by the
//! daemon through [`manager::LinkHandler`]: this crate never touches the store.

pub mod discovery;
pub mod link;
pub mod manager;
mod time;

pub use link::{Endpoint, FrameReader, FrameWriter, Link, LinkConn, LinkError, LinkOptions};
pub use manager::{
    Backoff, LinkCounters, LinkHandler, LinkHooks, LinkState, Manager, PeerStatus, PeerTarget,
};
