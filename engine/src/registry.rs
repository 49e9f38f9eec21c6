//! Stage kinds register themselves at link time with [`register_stage!`]; the registry is how the
//! loader, the schema generator and `parley stages` find them.

use std::{collections::BTreeMap, fmt, sync::Arc};

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::{
    duration::ConfigDuration,
    ports::Resources,
    stage::{OnError, Stage},
};

/// A problem a stage's own checks found in its configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted path inside the stage's table (`conversation.limit`), empty for the whole stage.
    pub key: String,
    pub message: String,
    pub warning: bool,
}

impl ConfigProblem {
    pub fn error(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self { key: key.into(), message: message.into(), warning: false }
    }
    pub fn warning(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self { key: key.into(), message: message.into(), warning: true }
    }
}

/// Why a stage could not be built from a valid configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BuildError(pub String);

/// A stage kind's configuration: plain data, deserialised strictly (`deny_unknown_fields`; give
/// every field a default so that tiers can override one key), documented with doc comments that
/// become the schema's descriptions. `build` turns it into the runtime stage.
pub trait StageConfig: DeserializeOwned + Serialize + JsonSchema + Send + Sync + 'static {
    /// The name operators write in `kind = "…"`.
    const KIND: &'static str;
    /// One line for `parley stages`.
    const DESCRIPTION: &'static str;
    const DEFAULT_ON_ERROR: OnError;
    const DEFAULT_TIMEOUT: ConfigDuration;
    /// A complete `[[stages]]` entry, validated by the tests.
    const EXAMPLE: &'static str;

    /// Checks the schema cannot express; warnings are kept apart from errors.
    fn check(&self) -> Vec<ConfigProblem> {
        Vec::new()
    }

    fn build(&self, resources: &Resources) -> Result<Arc<dyn Stage>, BuildError>;
}

/// A parsed configuration with its type erased, as the runtime holds it.
pub trait ErasedConfig: Send + Sync + fmt::Debug {
    fn check(&self) -> Vec<ConfigProblem>;
    /// Every parameter, defaults included, as JSON.
    fn to_json(&self) -> Value;
    fn build(&self, resources: &Resources) -> Result<Arc<dyn Stage>, BuildError>;
}

struct Typed<C>(C);

impl<C: StageConfig> fmt::Debug for Typed<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let json = serde_json::to_string(&self.0).unwrap_or_default();
        write!(f, "{}({json})", C::KIND)
    }
}

impl<C: StageConfig> ErasedConfig for Typed<C> {
    fn check(&self) -> Vec<ConfigProblem> {
        self.0.check()
    }
    fn to_json(&self) -> Value {
        serde_json::to_value(&self.0).unwrap_or(Value::Null)
    }
    fn build(&self, resources: &Resources) -> Result<Arc<dyn Stage>, BuildError> {
        self.0.build(resources)
    }
}

/// A registered stage kind. Create with [`StageKind::of`] through [`register_stage!`].
pub struct StageKind {
    pub kind: &'static str,
    pub description: &'static str,
    pub default_on_error: OnError,
    pub default_timeout: ConfigDuration,
    pub example: &'static str,
    schema: fn(&mut SchemaGenerator) -> Schema,
    parse: fn(Value) -> Result<Arc<dyn ErasedConfig>, String>,
}

impl StageKind {
    pub const fn of<C: StageConfig>() -> Self {
        Self {
            kind: C::KIND,
            description: C::DESCRIPTION,
            default_on_error: C::DEFAULT_ON_ERROR,
            default_timeout: C::DEFAULT_TIMEOUT,
            example: C::EXAMPLE,
            schema: schema_of::<C>,
            parse: parse_as::<C>,
        }
    }

    /// The JSON schema of the kind's own keys (without `kind`, `id`, `on_error`, `timeout`).
    pub fn params_schema(&self, generator: &mut SchemaGenerator) -> Schema {
        (self.schema)(generator)
    }

    /// Deserialises the kind's own keys into its typed configuration.
    pub fn parse(&self, params: Value) -> Result<Arc<dyn ErasedConfig>, String> {
        (self.parse)(params)
    }
}

impl fmt::Debug for StageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StageKind").field("kind", &self.kind).finish_non_exhaustive()
    }
}

fn schema_of<C: StageConfig>(generator: &mut SchemaGenerator) -> Schema {
    C::json_schema(generator)
}

fn parse_as<C: StageConfig>(params: Value) -> Result<Arc<dyn ErasedConfig>, String> {
    serde_json::from_value::<C>(params).map(|c| Arc::new(Typed(c)) as Arc<dyn ErasedConfig>).map_err(|e| e.to_string())
}

inventory::collect!(StageKind);

/// Registers a [`StageConfig`] type as a stage kind. Linking the crate that calls this is enough
/// for the kind to be known to the loader.
#[macro_export]
macro_rules! register_stage {
    ($config:ty) => {
        $crate::inventory::submit! { $crate::registry::StageKind::of::<$config>() }
    };
}

/// Every registered kind, by name.
pub fn kinds() -> BTreeMap<&'static str, &'static StageKind> {
    inventory::iter::<StageKind>.into_iter().map(|k| (k.kind, k)).collect()
}

pub fn find(kind: &str) -> Option<&'static StageKind> {
    inventory::iter::<StageKind>.into_iter().find(|k| k.kind == kind)
}
