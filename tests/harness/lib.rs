//! Test harness for meshd: a claudemesh-compatible client (the CLI's crypto and framing),
//! brokers in-process and as child processes, PostgreSQL clusters, and helpers.
//!
//! Used by the `it` integration tests and by the `meshd-bench` load generator.

// Tests and benchmarks measure real time (see clippy.toml).
#![allow(clippy::disallowed_methods)]

pub mod broker;
pub mod browser;
pub mod client;
pub mod crypto;
pub mod dns;
pub mod faultproxy;
pub mod fed;
pub mod labelled;
pub mod postgres;

pub use broker::{Backend, DaemonProcess, TestBroker, http, http_json, http_with, run_cli};
pub use client::{
    Client, HelloOpts, Member, RawWs, hello_frame, now_ms, patience, session_hello_frame, unique_ts,
};
pub use crypto::{Keypair, x25519_public};

/// Routes `tracing` output to the test writer once (`RUST_LOG` selects, default off).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Polls `check` until it returns `Some`, or fails after [`patience`].
///
/// # Errors
/// The deadline passed; the error names `what`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + patience();
    let mut pause = std::time::Duration::from_millis(5);
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out waiting for {what}");
        }
        // Back off between polls of external state (a process, the store).
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(100));
    }
}
