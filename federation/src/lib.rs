//! Broker-to-broker federation for meshd.
//!
//! This crate will hold the QUIC endpoint (quinn + rustls with mutual TLS against each
//! peer organization's CA), DNS SRV discovery, per-peer link actors with durable outboxes,
//! and presence/message replication between the brokers of a shared mesh. It depends on
//! `meshd-protocol` for the wire frames and `meshd-certs` for key material, never on the
//! daemon: the daemon hands it a narrow interface.
//!
//! It is empty until the federation issue lands; the core broker does not federate.
