//! Loading a pipeline file: the one function used by start-up, reload and `parley validate`.
//!
//! TOML → JSON value (with every key's line) → JSON Schema check (all errors, with paths) → typed
//! configs → each stage's own checks → pipeline rules (unique ids, `send` last, every tier
//! resolves) → errors and warnings kept apart.

pub mod diagnostic;
pub mod schema;
pub mod source;

use std::{collections::BTreeMap, path::Path, sync::Arc, sync::OnceLock};

use serde_json::{Map, Value, json};

pub use diagnostic::{Diagnostic, LoadError, Severity};
pub use source::SourceDoc;

use crate::{
    duration::ConfigDuration,
    registry::{self, ErasedConfig, StageKind},
    stage::OnError,
};
use diagnostic::Collector;
use schema::{COMMON_KEYS, POSITION_KEYS};

/// The kind that must close every pipeline.
pub const SEND_KIND: &str = "send";

/// One stage of a resolved pipeline, ready to build.
#[derive(Clone)]
pub struct StageSpec {
    pub id: String,
    pub kind: &'static StageKind,
    pub on_error: OnError,
    pub timeout: ConfigDuration,
    pub config: Arc<dyn ErasedConfig>,
    /// The complete entry with defaults filled in, as `parley pipeline show` prints it.
    pub entry: Value,
    /// Same fingerprint, same stage: a reload reuses the running instance.
    pub fingerprint: String,
}

impl std::fmt::Debug for StageSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageSpec").field("id", &self.id).field("entry", &self.entry).finish()
    }
}

/// The ordered stages of the base pipeline or of one tier.
#[derive(Debug, Clone)]
pub struct PipelineSpec {
    pub tier: Option<String>,
    pub stages: Vec<StageSpec>,
}

/// A valid pipeline file: the base pipeline, every tier resolved, and the warnings.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub base: PipelineSpec,
    pub tiers: BTreeMap<String, PipelineSpec>,
    pub warnings: Vec<Diagnostic>,
}

impl PipelineConfig {
    /// The pipeline of a tier; the base pipeline for no tier or a tier the file does not define.
    pub fn for_tier(&self, tier: Option<&str>) -> &PipelineSpec {
        tier.and_then(|t| self.tiers.get(t)).unwrap_or(&self.base)
    }
}

/// Reads and checks a pipeline file.
pub fn load_file(path: &Path) -> Result<PipelineConfig, LoadError> {
    let name = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => load_str(&text, &name),
        Err(e) => Err(LoadError {
            errors: vec![Diagnostic {
                severity: Severity::Error,
                file: name,
                path: String::new(),
                line: None,
                message: format!("cannot read the file: {e}"),
            }],
            warnings: Vec::new(),
        }),
    }
}

/// Checks pipeline TOML; `file` names it in diagnostics.
pub fn load_str(text: &str, file: &str) -> Result<PipelineConfig, LoadError> {
    let mut out = Collector::default();
    let doc = match SourceDoc::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            out.push(
                Severity::Error,
                file,
                String::new(),
                e.position.map(|p| p.line),
                format!("invalid TOML: {}", e.message),
            );
            let (errors, warnings) = out.split();
            return Err(LoadError { errors, warnings });
        }
    };
    let loader = Loader { file, doc: &doc };
    let result = loader.load(&mut out);
    let (errors, warnings) = out.split();
    match result {
        Some((base, tiers)) if errors.is_empty() => Ok(PipelineConfig { base, tiers, warnings }),
        _ => Err(LoadError { errors, warnings }),
    }
}

fn file_validator() -> &'static Result<jsonschema::Validator, String> {
    static V: OnceLock<Result<jsonschema::Validator, String>> = OnceLock::new();
    V.get_or_init(|| jsonschema::validator_for(schema::pipeline_schema()).map_err(|e| e.to_string()))
}

fn stage_validator() -> &'static Result<jsonschema::Validator, String> {
    static V: OnceLock<Result<jsonschema::Validator, String>> = OnceLock::new();
    V.get_or_init(|| {
        let full = schema::pipeline_schema();
        let only_stage = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$ref": "#/$defs/stage",
            "$defs": full["$defs"].clone(),
        });
        jsonschema::validator_for(&only_stage).map_err(|e| e.to_string())
    })
}

/// Where a resolved stage entry came from, to point its problems at the right lines.
#[derive(Clone)]
struct Origin {
    /// `/stages/N` for a base stage.
    base: Option<String>,
    /// `/tiers/T/stages/ID` and the override's table, when a tier changed it.
    patch: Option<(String, Value)>,
    /// `/tiers/T/add/N` for a stage a tier added.
    added: Option<String>,
}

impl Origin {
    /// The pointer in the file that defines `rel` (a pointer inside the entry).
    fn locate(&self, rel: &str) -> String {
        if let Some(added) = &self.added {
            return format!("{added}{rel}");
        }
        if let Some((at, patch)) = &self.patch
            && (rel.is_empty() || first_defined(patch, rel))
        {
            return format!("{at}{rel}");
        }
        format!("{}{rel}", self.base.as_deref().unwrap_or(""))
    }
}

/// True when the patch spells out the first key of `rel`.
fn first_defined(patch: &Value, rel: &str) -> bool {
    let first = rel.trim_start_matches('/').split('/').next().unwrap_or("");
    patch.get(first).is_some()
}

struct Entry {
    value: Value,
    origin: Origin,
    /// The schema already refused this entry: its problems are reported, do not parse it.
    refused: bool,
}

struct Loader<'a> {
    file: &'a str,
    doc: &'a SourceDoc,
}

impl Loader<'_> {
    fn report(&self, out: &mut Collector, severity: Severity, pointer: &str, message: String) {
        let line = self.doc.position(pointer).map(|p| p.line);
        out.push(severity, self.file, dotted(&self.doc.value, pointer), line, message);
    }

    fn load(&self, out: &mut Collector) -> Option<(PipelineSpec, BTreeMap<String, PipelineSpec>)> {
        let validator = match file_validator() {
            Ok(v) => v,
            Err(e) => {
                self.report(
                    out,
                    Severity::Error,
                    "",
                    format!("internal error: the pipeline schema does not compile: {e}"),
                );
                return None;
            }
        };
        let mut refused = std::collections::HashSet::new();
        for error in validator.iter_errors(&self.doc.value) {
            let (pointer, message) = describe(&error);
            if let Some(index) = pointer.strip_prefix("/stages/").and_then(|r| r.split('/').next()) {
                refused.insert(index.to_owned());
            }
            self.report(out, Severity::Error, &pointer, message);
        }
        let root = self.doc.value.as_object()?;
        let base_entries: Vec<Entry> = root
            .get("stages")
            .and_then(Value::as_array)
            .map(|stages| {
                stages
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Entry {
                        value: v.clone(),
                        origin: Origin { base: Some(format!("/stages/{i}")), patch: None, added: None },
                        refused: refused.contains(&i.to_string()),
                    })
                    .collect()
            })
            .unwrap_or_default();
        for e in &base_entries {
            for key in POSITION_KEYS {
                if e.value.get(key).is_some() {
                    let at = e.origin.locate(&format!("/{key}"));
                    self.report(
                        out,
                        Severity::Error,
                        &at,
                        format!("`{key}` only places a stage in a tier's `add` list"),
                    );
                }
            }
        }
        let base = self.resolve(out, None, &base_entries, false);

        let mut tiers = BTreeMap::new();
        if let Some(tier_tables) = root.get("tiers").and_then(Value::as_object) {
            for (name, tier) in tier_tables {
                let entries = self.apply_tier(out, name, tier, &base_entries, base.as_ref());
                if let Some(spec) = entries.and_then(|entries| self.resolve(out, Some(name), &entries, true)) {
                    tiers.insert(name.clone(), spec);
                }
            }
        }
        Some((base?, tiers))
    }

    /// The base entries with a tier's overrides, removals and additions applied.
    /// Tier changes merge onto the base stages with their defaults filled in (when the base
    /// resolved), so that changing one key of a nested table keeps the default of its siblings.
    fn apply_tier(
        &self,
        out: &mut Collector,
        name: &str,
        tier: &Value,
        base: &[Entry],
        resolved: Option<&PipelineSpec>,
    ) -> Option<Vec<Entry>> {
        let at = format!("/tiers/{}", escape(name));
        let mut entries: Vec<Entry> = base
            .iter()
            .enumerate()
            .map(|(i, e)| Entry {
                value: resolved.and_then(|r| r.stages.get(i)).map_or_else(|| e.value.clone(), |s| s.entry.clone()),
                origin: e.origin.clone(),
                refused: e.refused,
            })
            .collect();
        let mut ok = true;
        let id_of = |v: &Value| entry_id(v).map(str::to_owned);

        if let Some(patches) = tier.get("stages").and_then(Value::as_object) {
            for (id, patch) in patches {
                let patch_at = format!("{at}/stages/{}", escape(id));
                let Some(entry) = entries.iter_mut().find(|e| id_of(&e.value).as_deref() == Some(id)) else {
                    self.report(
                        out,
                        Severity::Error,
                        &patch_at,
                        format!(
                            "tier `{name}` changes stage `{id}`, which the base pipeline does not have{}",
                            known_ids(base)
                        ),
                    );
                    ok = false;
                    continue;
                };
                if let Some(kind) = patch.get("kind")
                    && Some(kind) != entry.value.get("kind")
                {
                    self.report(
                        out,
                        Severity::Error,
                        &format!("{patch_at}/kind"),
                        "a tier cannot change a stage's kind; remove the stage and add another".into(),
                    );
                    ok = false;
                    continue;
                }
                if patch.get("id").is_some_and(|v| v.as_str() != Some(id)) {
                    self.report(out, Severity::Error, &format!("{patch_at}/id"), "a tier cannot rename a stage".into());
                    ok = false;
                    continue;
                }
                merge(&mut entry.value, patch);
                entry.origin.patch = Some((patch_at, patch.clone()));
            }
        }

        if let Some(removals) = tier.get("remove").and_then(Value::as_array) {
            for (i, id) in removals.iter().enumerate() {
                let Some(id) = id.as_str() else { continue };
                let before = entries.len();
                entries.retain(|e| id_of(&e.value).as_deref() != Some(id));
                if entries.len() == before {
                    self.report(
                        out,
                        Severity::Error,
                        &format!("{at}/remove/{i}"),
                        format!(
                            "tier `{name}` removes stage `{id}`, which the base pipeline does not have{}",
                            known_ids(base)
                        ),
                    );
                    ok = false;
                }
            }
        }

        if let Some(additions) = tier.get("add").and_then(Value::as_array) {
            for (i, added) in additions.iter().enumerate() {
                let add_at = format!("{at}/add/{i}");
                let before = added.get("before").and_then(Value::as_str);
                let after = added.get("after").and_then(Value::as_str);
                let index = match (before, after) {
                    (Some(_), Some(_)) => {
                        self.report(out, Severity::Error, &add_at, "give `before` or `after`, not both".into());
                        ok = false;
                        continue;
                    }
                    (Some(anchor), None) | (None, Some(anchor)) => {
                        match entries.iter().position(|e| id_of(&e.value).as_deref() == Some(anchor)) {
                            Some(p) => p + usize::from(after.is_some()),
                            None => {
                                let key = if before.is_some() { "before" } else { "after" };
                                self.report(
                                    out,
                                    Severity::Error,
                                    &format!("{add_at}/{key}"),
                                    format!("no stage `{anchor}` in tier `{name}` to place this stage {key}"),
                                );
                                ok = false;
                                continue;
                            }
                        }
                    }
                    (None, None) => entries.len().saturating_sub(1),
                };
                let mut value = added.clone();
                if let Some(obj) = value.as_object_mut() {
                    obj.remove("before");
                    obj.remove("after");
                }
                entries.insert(
                    index,
                    Entry { value, origin: Origin { base: None, patch: None, added: Some(add_at) }, refused: false },
                );
            }
        }
        ok.then_some(entries)
    }

    /// Typed configs, stage checks and pipeline rules for one pipeline. `revalidate` checks the
    /// entries a tier changed or added against the schema (base entries were checked with the file).
    fn resolve(
        &self,
        out: &mut Collector,
        tier: Option<&str>,
        entries: &[Entry],
        revalidate: bool,
    ) -> Option<PipelineSpec> {
        let errors_before = out.items.iter().filter(|d| d.severity == Severity::Error).count();
        let mut stages = Vec::with_capacity(entries.len());
        let mut entry_ok = true;
        for entry in entries {
            if entry.refused {
                entry_ok = false;
                continue;
            }
            let touched = entry.origin.patch.is_some() || entry.origin.added.is_some();
            if revalidate
                && touched
                && let Ok(v) = stage_validator()
            {
                let mut bad = false;
                for error in v.iter_errors(&entry.value) {
                    let (rel, message) = describe(&error);
                    self.report(out, Severity::Error, &entry.origin.locate(&rel), message);
                    bad = true;
                }
                if bad {
                    entry_ok = false;
                    continue;
                }
            }
            match self.stage_spec(out, entry) {
                Some(spec) => stages.push(spec),
                None => entry_ok = false,
            }
        }
        if !entry_ok {
            return None;
        }
        self.pipeline_rules(out, tier, entries, &stages);
        let errors_after = out.items.iter().filter(|d| d.severity == Severity::Error).count();
        (errors_after == errors_before).then(|| PipelineSpec { tier: tier.map(str::to_owned), stages })
    }

    fn stage_spec(&self, out: &mut Collector, entry: &Entry) -> Option<StageSpec> {
        let obj = entry.value.as_object()?;
        let kind_name = obj.get("kind").and_then(Value::as_str)?;
        let kind = registry::find(kind_name)?;
        let id = obj.get("id").and_then(Value::as_str).unwrap_or(kind.kind).to_owned();
        let on_error = match obj.get("on_error") {
            Some(v) => serde_json::from_value::<OnError>(v.clone()).ok()?,
            None => kind.default_on_error,
        };
        let timeout = match obj.get("timeout").and_then(Value::as_str) {
            Some(t) => match t.parse::<ConfigDuration>() {
                Ok(d) => d,
                Err(e) => {
                    self.report(out, Severity::Error, &entry.origin.locate("/timeout"), e);
                    return None;
                }
            },
            None => kind.default_timeout,
        };
        let params: Map<String, Value> = obj
            .iter()
            .filter(|(k, _)| !COMMON_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let config = match kind.parse(Value::Object(params.clone())) {
            Ok(c) => c,
            Err(e) => {
                self.report(out, Severity::Error, &entry.origin.locate(""), format!("stage `{id}` ({kind_name}): {e}"));
                return None;
            }
        };
        for problem in config.check() {
            let rel =
                if problem.key.is_empty() { String::new() } else { format!("/{}", problem.key.replace('.', "/")) };
            let severity = if problem.warning { Severity::Warning } else { Severity::Error };
            self.report(out, severity, &entry.origin.locate(&rel), problem.message);
        }
        let mut full = Map::new();
        full.insert("kind".into(), kind.kind.into());
        full.insert("id".into(), id.clone().into());
        full.insert("on_error".into(), serde_json::to_value(on_error).unwrap_or(Value::Null));
        full.insert("timeout".into(), timeout.to_string().into());
        match config.to_json() {
            Value::Object(all) => full.extend(all.into_iter().filter(|(_, v)| !v.is_null())),
            _ => full.extend(params),
        }
        let entry_value = Value::Object(full);
        let fingerprint = entry_value.to_string();
        Some(StageSpec { id, kind, on_error, timeout, config, entry: entry_value, fingerprint })
    }

    fn pipeline_rules(&self, out: &mut Collector, tier: Option<&str>, entries: &[Entry], stages: &[StageSpec]) {
        let whose = tier.map(|t| format!("tier `{t}`")).unwrap_or_else(|| "the base pipeline".into());
        let fallback = tier.map(|t| format!("/tiers/{}", escape(t))).unwrap_or_else(|| "/stages".into());
        if stages.is_empty() {
            self.report(out, Severity::Error, &fallback, format!("{whose} has no stages"));
            return;
        }
        for (i, spec) in stages.iter().enumerate() {
            let origin = &entries[i].origin;
            if stages[..i].iter().any(|s| s.id == spec.id) {
                let at = origin.locate(if entries[i].value.get("id").is_some() { "/id" } else { "/kind" });
                self.report(
                    out,
                    Severity::Error,
                    &at,
                    format!("duplicate stage id `{}` in {whose}; give one of them another `id`", spec.id),
                );
            }
            let last = i + 1 == stages.len();
            if spec.kind.kind == SEND_KIND && !last {
                self.report(
                    out,
                    Severity::Error,
                    &origin.locate("/kind"),
                    format!("`send` must be the last stage of {whose}, but stage `{}` follows it", stages[i + 1].id),
                );
            }
            if spec.on_error == OnError::Open && spec.kind.default_on_error == OnError::Closed {
                self.report(
                    out,
                    Severity::Warning,
                    &origin.locate("/on_error"),
                    format!("stage `{}` ({}) fails open: {}", spec.id, spec.kind.kind, open_risk(spec.kind.kind)),
                );
            }
        }
        if let Some(last) = stages.last()
            && last.kind.kind != SEND_KIND
        {
            let origin = &entries[stages.len() - 1].origin;
            self.report(
                out,
                Severity::Error,
                &origin.locate("/kind"),
                format!(
                    "the last stage of {whose} must be `send`, not `{}`: nothing would answer the user",
                    last.kind.kind
                ),
            );
        }
    }
}

fn open_risk(kind: &str) -> &'static str {
    match kind {
        "quota-gate" => "a database outage would let every message through without counting it",
        SEND_KIND => "a failed send would be forgotten and the user would get no answer",
        "llm" => "a failed LLM call would leave the message unanswered",
        _ => "its failures will be skipped instead of retried",
    }
}

fn known_ids(entries: &[Entry]) -> String {
    let ids: Vec<&str> = entries.iter().filter_map(|e| entry_id(&e.value)).collect();
    if ids.is_empty() { String::new() } else { format!(" (it has: {})", ids.join(", ")) }
}

fn entry_id(v: &Value) -> Option<&str> {
    v.get("id").and_then(Value::as_str).or_else(|| v.get("kind").and_then(Value::as_str))
}

/// Deep merge: tables merge key by key, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                match t.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

fn unescape(segment: &str) -> String {
    segment.replace("~1", "/").replace("~0", "~")
}

/// `/stages/1/conversation/limit` → `stages[1].conversation.limit`, using the document to tell
/// array indices from keys.
fn dotted(doc: &Value, pointer: &str) -> String {
    let mut out = String::new();
    let mut current = Some(doc);
    for raw in pointer.split('/').skip(1) {
        let seg = unescape(raw);
        match current {
            Some(Value::Array(items)) => {
                out.push_str(&format!("[{seg}]"));
                current = seg.parse::<usize>().ok().and_then(|i| items.get(i));
            }
            other => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !seg.is_empty() && seg.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if bare {
                    out.push_str(&seg)
                } else {
                    out.push_str(&format!("{seg:?}"))
                }
                current = other.and_then(|v| v.get(&seg));
            }
        }
    }
    out
}

/// A schema error as (pointer of the offending key, message an operator understands).
fn describe(error: &jsonschema::ValidationError<'_>) -> (String, String) {
    use jsonschema::error::ValidationErrorKind as K;
    let pointer = error.instance_path().as_str().to_owned();
    let instance = error.instance();
    match error.kind() {
        K::AdditionalProperties { unexpected } | K::UnevaluatedProperties { unexpected } => {
            let key = unexpected.first().cloned().unwrap_or_default();
            let allowed = match (pointer.as_str(), instance.get("kind").and_then(Value::as_str)) {
                ("", _) => "stages, tiers".to_owned(),
                (_, Some(kind)) => allowed_keys(kind),
                _ if pointer.starts_with("/tiers/") => "description, stages, remove, add".to_owned(),
                _ => String::new(),
            };
            let hint = if allowed.is_empty() { String::new() } else { format!(" (allowed here: {allowed})") };
            let names = unexpected.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ");
            let noun = if unexpected.len() > 1 { "unknown keys" } else { "unknown key" };
            (format!("{pointer}/{}", escape(&key)), format!("{noun} {names}{hint}"))
        }
        K::Enum { options } if pointer.ends_with("/kind") => {
            let known = options
                .as_array()
                .map(|o| o.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            (pointer, format!("unknown stage kind {instance}; known kinds: {known}"))
        }
        K::Required { property } => (pointer, format!("missing required key {property}")),
        K::Type { .. } => (pointer, format!("wrong type: {error}")),
        K::Pattern { pattern } if pattern == crate::duration::DURATION_PATTERN => {
            (pointer, format!("{instance} is not a duration; write e.g. \"500ms\", \"30s\", \"5m\" or \"24h\""))
        }
        _ => (pointer, error.to_string()),
    }
}

fn allowed_keys(kind: &str) -> String {
    let schema = schema::pipeline_schema();
    schema["$defs"][format!("stage.{kind}")]["properties"]
        .as_object()
        .map(|p| p.keys().filter(|k| !POSITION_KEYS.contains(&k.as_str())).cloned().collect::<Vec<_>>().join(", "))
        .unwrap_or_default()
}

/// Checks one stage entry on its own (the keys of a `[[stages]]` table), without the pipeline
/// rules: for stage unit tests and for checking a kind's example.
pub fn load_stage(text: &str, file: &str) -> Result<StageSpec, LoadError> {
    let mut out = Collector::default();
    let spec = match SourceDoc::parse(text) {
        Ok(doc) => {
            let loader = Loader { file, doc: &doc };
            let mut valid = true;
            match stage_validator() {
                Ok(v) => {
                    for error in v.iter_errors(&doc.value) {
                        let (pointer, message) = describe(&error);
                        loader.report(&mut out, Severity::Error, &pointer, message);
                        valid = false;
                    }
                }
                Err(e) => {
                    loader.report(&mut out, Severity::Error, "", format!("internal error: {e}"));
                    valid = false;
                }
            }
            let entry = Entry {
                value: doc.value.clone(),
                origin: Origin { base: Some(String::new()), patch: None, added: None },
                refused: !valid,
            };
            if valid { loader.stage_spec(&mut out, &entry) } else { None }
        }
        Err(e) => {
            out.push(
                Severity::Error,
                file,
                String::new(),
                e.position.map(|p| p.line),
                format!("invalid TOML: {}", e.message),
            );
            None
        }
    };
    let (errors, warnings) = out.split();
    match spec {
        Some(spec) if errors.is_empty() => Ok(spec),
        _ => Err(LoadError { errors, warnings }),
    }
}
