//! Log output: `tracing` with an `EnvFilter` (RUST_LOG wins over the config), as text or
//! one JSON object per line.

use meshd_config::{Log, LogFormat};
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Safe to call more than once (later calls are no-ops).
pub(crate) fn init(log: &Log) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
