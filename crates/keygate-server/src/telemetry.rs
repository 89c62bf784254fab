//! Logging: `tracing` to stderr, text or JSON. Stdout is kept for the one line a script reads
//! (the root key at first start).

use keygate_engine::config::LogConfig;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber once; later calls do nothing (tests start many apps).
pub fn init(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if cfg.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
