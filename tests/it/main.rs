//! meshd integration tests: one binary, one module per area. Tests that touch the store
//! run against SQLite and PostgreSQL (see [`both!`]).

// Tests and benchmarks measure real time (see clippy.toml).
#![allow(clippy::disallowed_methods)]

/// The daemon binary built by this package (same code as `meshd`).
pub const DAEMON: &str = env!("CARGO_BIN_EXE_meshd-under-test");

/// Defines `mod $name { fn sqlite(); fn postgres(); }` running the same body on both
/// backends.
macro_rules! both {
    ($(#[$m:meta])* async fn $name:ident($b:ident: Backend) -> anyhow::Result<()> $body:block) => {
        $(#[$m])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            async fn body($b: Backend) -> anyhow::Result<()> $body
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() -> anyhow::Result<()> {
                body(meshd_tests::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() -> anyhow::Result<()> {
                body(meshd_tests::Backend::Postgres).await
            }
        }
    };
}

mod api;
mod audit;
mod bridges;
mod cli;
mod clock;
mod compat;
mod contexts;
mod durability;
mod enroll;
mod exec;
mod federation;
mod files;
mod frames;
mod gating;
mod handshake;
mod hooks;
mod http;
mod mcp;
mod memory;
mod moderation;
mod perf;
mod policy;
mod presence;
mod quotas;
mod reminders;
mod routing;
mod schema;
mod search;
mod signals;
mod skills;
mod spatial;
mod state;
mod streams;
mod tags;
mod tasks;
mod telemetry;
mod topics;
mod vault;
mod watch;
mod webapp;
mod webhooks;
