//! The `parley` subcommands.

pub mod database;
pub mod kb;
pub mod pipeline_show;
pub mod schema;
pub mod service;
pub mod simulate;
pub mod stages;
pub mod token;
pub mod validate;

use std::path::PathBuf;

/// The pipeline file used when none is named: `$PIPELINE_FILE`, else `pipelines/whatsapp.toml`.
pub fn default_pipeline_file() -> PathBuf {
    std::env::var_os("PIPELINE_FILE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("pipelines/whatsapp.toml"))
}
