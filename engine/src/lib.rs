//! Parley's pipeline engine: the stage API and registry, the pipeline configuration (TOML, schema,
//! tiers, validation), the runtime that runs messages through stages with their failure policies,
//! hot reload, the ports stages use, and in-memory ports for tests.

pub mod config;
pub mod duration;
pub mod embedding;
pub mod events;
pub mod ids;
pub mod masking;
pub mod memory;
pub mod message;
pub mod ports;
pub mod registry;
pub mod reload;
pub mod runtime;
pub mod stage;
pub mod stdout;
pub mod testing;

#[doc(hidden)]
pub use inventory;

pub use async_trait::async_trait;
pub use duration::ConfigDuration;
pub use registry::{BuildError, ConfigProblem, StageConfig};
pub use stage::{Decision, OnError, Stage, StageContext, StageError};
