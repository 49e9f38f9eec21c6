//! The one telemetry set-up: structured events (one JSON line each on stdout, see
//! `docs/events.md`) and diagnostic logs through `tracing`, at the level LOG_LEVEL names.

use std::sync::Arc;

use engine::events::{EventSink, JsonLinesSink, Level};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::settings::{LogLevel, Settings};

/// Installs the tracing subscriber (JSON, or human-readable with LOG_PRETTY) and returns the
/// event sink. Both write to the batched stdout (`engine::stdout`), so that diagnostics and events
/// keep their order. Safe to call more than once: later calls keep the first subscriber.
pub fn init(settings: &Settings) -> Arc<dyn EventSink> {
    let directive = match settings.log_level {
        LogLevel::Fatal | LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Trace => "trace",
    };
    // Our own crates at the chosen level; dependencies one notch quieter unless asked otherwise.
    let filter = EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,parley={directive},engine={directive},stages={directive}")));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = if settings.log_pretty {
        registry.with(fmt::layer().with_writer(|| engine::stdout::Lines).with_target(false)).try_init()
    } else {
        registry
            .with(
                fmt::layer().json().flatten_event(true).with_current_span(false).with_writer(|| engine::stdout::Lines),
            )
            .try_init()
    };
    Arc::new(JsonLinesSink::stdout(event_level(settings.log_level)))
}

/// The lowest event level shown for a LOG_LEVEL.
pub fn event_level(level: LogLevel) -> Level {
    match level {
        LogLevel::Fatal | LogLevel::Error => Level::Error,
        LogLevel::Warn => Level::Warn,
        LogLevel::Info => Level::Info,
        LogLevel::Debug | LogLevel::Trace => Level::Debug,
    }
}
