//! The JSON schema of a pipeline file, generated from the registered stage kinds. The committed
//! copy (`schemas/pipeline.schema.json`) is for editors and CI; the loader uses this one.

use std::sync::OnceLock;

use schemars::{SchemaGenerator, generate::SchemaSettings};
use serde_json::{Map, Value, json};

use crate::{registry, stage::OnError};

/// Keys every stage entry may have besides its kind's own.
pub const COMMON_KEYS: [&str; 4] = ["kind", "id", "on_error", "timeout"];
/// Keys only an entry of a tier's `add` may have.
pub const POSITION_KEYS: [&str; 2] = ["before", "after"];

/// The schema of a whole pipeline file.
pub fn pipeline_schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(generate)
}

/// The schema as committed: pretty JSON with a final newline.
pub fn pipeline_schema_text() -> String {
    let mut text = serde_json::to_string_pretty(pipeline_schema()).unwrap_or_default();
    text.push('\n');
    text
}

fn generate() -> Value {
    let mut generator = SchemaGenerator::new(SchemaSettings::draft2020_12());
    let kinds = registry::kinds();
    let mut defs = Map::new();
    let mut dispatch = Vec::new();

    let on_error = serde_json::to_value(generator.subschema_for::<OnError>()).unwrap_or(Value::Null);
    let duration =
        serde_json::to_value(generator.subschema_for::<crate::duration::ConfigDuration>()).unwrap_or(Value::Null);

    for (name, kind) in &kinds {
        let mut schema = serde_json::to_value(kind.params_schema(&mut generator)).unwrap_or(Value::Null);
        let obj = schema.as_object_mut().expect("a stage config's schema is an object");
        obj.insert("additionalProperties".into(), Value::Bool(false));
        let props = obj.entry("properties").or_insert_with(|| json!({}));
        if let Some(props) = props.as_object_mut() {
            props.insert("kind".into(), json!({ "const": name, "description": kind.description }));
            props.insert(
                "id".into(),
                json!({
                    "type": "string",
                    "pattern": "^[a-z0-9][a-z0-9_-]*$",
                    "description": "Unique name of this stage in the pipeline; defaults to its kind."
                }),
            );
            let mut on_error = on_error.clone();
            if let Some(o) = on_error.as_object_mut() {
                o.insert(
                    "description".into(),
                    format!(
                        "What happens when the stage fails: \"open\" skips it and goes on, \"closed\" fails the job so it is retried. Default: \"{}\".",
                        match kind.default_on_error {
                            OnError::Open => "open",
                            OnError::Closed => "closed",
                        }
                    )
                    .into(),
                );
            }
            props.insert("on_error".into(), on_error);
            let mut timeout = duration.clone();
            if let Some(t) = timeout.as_object_mut() {
                t.insert(
                    "description".into(),
                    format!(
                        "How long the stage may run before it counts as failed. Default: \"{}\".",
                        kind.default_timeout
                    )
                    .into(),
                );
            }
            props.insert("timeout".into(), timeout);
            for key in POSITION_KEYS {
                props.insert(
                    key.into(),
                    json!({
                        "type": "string",
                        "description": format!("In a tier's `add` only: insert the stage {key} the stage with this id.")
                    }),
                );
            }
        }
        obj.insert("required".into(), json!(["kind"]));
        defs.insert(format!("stage.{name}"), schema);
        dispatch.push(json!({
            "if": { "properties": { "kind": { "const": name } }, "required": ["kind"] },
            "then": { "$ref": format!("#/$defs/stage.{name}") }
        }));
    }

    let names: Vec<&str> = kinds.keys().copied().collect();
    defs.insert(
        "stage".into(),
        json!({
            "type": "object",
            "description": "One stage of the pipeline: `kind` picks what it does, the other keys configure it.",
            "required": ["kind"],
            "properties": { "kind": { "type": "string", "enum": names } },
            "allOf": dispatch
        }),
    );
    defs.insert(
        "tier".into(),
        json!({
            "type": "object",
            "description": "A variant of the base pipeline for the tenants whose plan names this tier.",
            "additionalProperties": false,
            "properties": {
                "description": { "type": "string" },
                "stages": {
                    "type": "object",
                    "description": "Per stage id, the keys to change; tables merge, other values replace.",
                    "additionalProperties": { "type": "object" }
                },
                "remove": {
                    "type": "array",
                    "description": "Ids of base stages this tier runs without.",
                    "items": { "type": "string" },
                    "uniqueItems": true
                },
                "add": {
                    "type": "array",
                    "description": "Stages this tier adds, each placed with `before` or `after` (default: before the last stage).",
                    "items": { "$ref": "#/$defs/stage" }
                }
            }
        }),
    );
    for (name, def) in generator.take_definitions(true) {
        defs.insert(name, def);
    }

    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Parley pipeline",
        "description": "The stages a WhatsApp message goes through, and the tier variants of that pipeline. Generated by `parley schema`; do not edit.",
        "type": "object",
        "additionalProperties": false,
        "required": ["stages"],
        "properties": {
            "stages": {
                "type": "array",
                "description": "The base pipeline, in order; the last stage must be `send`.",
                "minItems": 1,
                "items": { "$ref": "#/$defs/stage" }
            },
            "tiers": {
                "type": "object",
                "description": "Tier variants, by tier name.",
                "propertyNames": { "pattern": "^[a-z0-9][a-z0-9_-]*$" },
                "additionalProperties": { "$ref": "#/$defs/tier" }
            }
        },
        "$defs": defs
    })
}
