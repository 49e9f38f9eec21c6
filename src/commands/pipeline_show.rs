//! `parley pipeline show`: the pipeline a tier really runs, after the tier's changes are applied
//! and every default is filled in.

use std::{path::PathBuf, process::ExitCode};

use engine::config;
use serde_json::Value;

pub fn run(file: Option<PathBuf>, tier: Option<&str>, json: bool) -> ExitCode {
    let file = file.unwrap_or_else(super::default_pipeline_file);
    let cfg = match config::load_file(&file) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let spec = match tier {
        None => &cfg.base,
        Some(t) => match cfg.tiers.get(t) {
            Some(spec) => spec,
            None => {
                let known: Vec<&str> = cfg.tiers.keys().map(String::as_str).collect();
                eprintln!(
                    "{}: no tier `{t}` (tiers: {}); tenants of an unknown tier run the base pipeline",
                    file.display(),
                    if known.is_empty() { "none".to_owned() } else { known.join(", ") }
                );
                return ExitCode::FAILURE;
            }
        },
    };
    let stages: Vec<Value> = spec.stages.iter().map(|s| s.entry.clone()).collect();
    if json {
        let out = serde_json::json!({ "file": file.display().to_string(), "tier": tier, "stages": stages });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    println!(
        "# Effective pipeline of {} in {}",
        tier.map_or("the base".to_owned(), |t| format!("tier `{t}`")),
        file.display()
    );
    for stage in &stages {
        println!("\n[[stages]]");
        if let Value::Object(entry) = stage {
            for (key, value) in entry {
                println!("{key} = {}", toml_value(value));
            }
        }
    }
    ExitCode::SUCCESS
}

/// A JSON value as an inline TOML value.
fn toml_value(v: &Value) -> String {
    match v {
        Value::Null => "\"\"".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => Value::String(s.clone()).to_string(),
        Value::Array(items) => format!("[{}]", items.iter().map(toml_value).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => format!(
            "{{ {} }}",
            map.iter().map(|(k, v)| format!("{} = {}", toml_key(k), toml_value(v))).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn toml_key(k: &str) -> String {
    if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        k.to_owned()
    } else {
        Value::String(k.to_owned()).to_string()
    }
}
