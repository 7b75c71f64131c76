//! The claudemesh wire contract, sans-IO.
//!
//! This crate knows the JSON frames that claudemesh clients (the CLI/MCP server and
//! `@claudemesh/sdk`) exchange with a broker, the canonical strings they sign, and the
//! pure rules a broker applies to them: hello verification with a replay cache, invite
//! verification, target-spec parsing, status/priority gating and the per-connection
//! handshake phases.
//!
//! It never opens a socket, never reads a clock and never spawns a task: every function
//! that depends on time takes `now` (milliseconds since the Unix epoch) as an argument.
//! The daemon (`meshd`) drives it; tests drive it with plain values.
//!
//! Entry points: [`client::decode`] for inbound frames, [`broker::BrokerFrame`] for
//! outbound ones, [`hello::verify_hello`], [`invite::InvitePayload`] and
//! [`session::ClientMachine`].

#![warn(missing_docs)]

pub mod apikeys;
pub mod broker;
pub mod client;
pub mod exec;
pub mod fed;
pub mod fit;
#[cfg(test)]
mod fuzz;
pub mod hello;
pub mod invite;
pub mod invites;
pub mod keys;
pub mod moderation;
pub mod nul;
pub mod routing;
pub mod search;
pub mod session;
pub mod shares;
pub mod signals;
pub mod spatial;
pub mod status;
pub mod tags;
pub mod telemetry;
pub mod time;
pub mod topics;
pub mod vault;
pub mod watch;

pub use keys::{KeyError, Pubkey};
pub use routing::{Priority, Status, TargetSpec};
