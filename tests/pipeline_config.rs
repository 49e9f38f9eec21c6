//! The pipeline files operators edit: what is accepted, what is refused and how the refusal reads.

use std::path::Path;

use engine::config::{self, LoadError, schema::pipeline_schema_text};
use serde_json::json;

fn load(text: &str) -> Result<config::PipelineConfig, LoadError> {
    stages::link();
    config::load_str(text, "pipeline.toml")
}

const TAIL: &str = "\n[[stages]]\nkind = \"llm\"\n\n[[stages]]\nkind = \"send\"\n";

#[test]
fn every_file_in_pipelines_is_valid_without_warnings() {
    stages::link();
    let mut checked = 0;
    for entry in std::fs::read_dir("pipelines").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let cfg = config::load_file(&path).unwrap_or_else(|e| panic!("{} is invalid:\n{e}", path.display()));
            assert!(cfg.warnings.is_empty(), "{}: {:?}", path.display(), cfg.warnings);
            checked += 1;
        }
    }
    assert!(checked >= 1);
}

#[test]
fn the_committed_schema_is_current() {
    stages::link();
    let committed = std::fs::read_to_string("schemas/pipeline.schema.json").unwrap_or_default();
    assert!(
        committed == pipeline_schema_text(),
        "schemas/pipeline.schema.json is stale; regenerate it with:\n  cargo run -- schema > schemas/pipeline.schema.json"
    );
}

#[test]
fn every_stage_example_is_valid_alone_and_in_a_pipeline() {
    stages::link();
    let kinds = engine::registry::kinds();
    assert!(kinds.len() >= 6);
    for (name, kind) in kinds {
        let spec = config::load_stage(kind.example, name)
            .unwrap_or_else(|e| panic!("the example of `{name}` is invalid:\n{e}"));
        assert_eq!(spec.kind.kind, name);
        let pipeline = if name == "send" {
            format!("[[stages]]\n{}", kind.example)
        } else {
            format!("[[stages]]\n{}\n[[stages]]\nkind = \"send\"\n", kind.example)
        };
        load(&pipeline).unwrap_or_else(|e| panic!("a pipeline with the example of `{name}` is invalid:\n{e}"));
    }
}

/// (what is wrong, the file, what the error must say, the line it must name)
const BROKEN: &[(&str, &str, &str, usize)] = &[
    (
        "misspelled key",
        "[[stages]]\nkind = \"ratelimit\"\nconversation = { limit = 5, windw = \"30s\" }\n",
        "unknown key `windw`",
        3,
    ),
    ("misspelled stage key", "[[stages]]\nkind = \"dedupe\"\nttll = \"24h\"\n", "unknown key `ttll`", 3),
    ("unknown kind", "[[stages]]\nkind = \"dedup\"\n", "unknown stage kind \"dedup\"", 2),
    ("wrong type", "[[stages]]\nkind = \"ratelimit\"\nconversation = { limit = \"five\" }\n", "wrong type", 3),
    (
        "duplicate id",
        "[[stages]]\nkind = \"dedupe\"\n\n[[stages]]\nkind = \"dedupe\"\n",
        "duplicate stage id `dedupe`",
        5,
    ),
    (
        "send not last",
        "[[stages]]\nkind = \"send\"\n\n[[stages]]\nkind = \"dedupe\"\n",
        "`send` must be the last stage",
        2,
    ),
    (
        "tier removes an unknown stage",
        "[[stages]]\nkind = \"dedupe\"\n\n[tiers.starter]\nremove = [\"rag\"]\n",
        "removes stage `rag`, which the base pipeline does not have",
        5,
    ),
    (
        "tier changes an unknown stage",
        "[[stages]]\nkind = \"dedupe\"\n\n[tiers.gold]\nstages.ratelimt.conversation = { limit = 9 }\n",
        "changes stage `ratelimt`",
        5,
    ),
    (
        "tier sets a wrong value",
        "[[stages]]\nkind = \"ratelimit\"\n\n[tiers.gold]\nstages.ratelimit.conversation = { limit = 0 }\n",
        "tiers.gold.stages.ratelimit.conversation.limit",
        5,
    ),
    ("invalid duration", "[[stages]]\nkind = \"dedupe\"\nttl = \"24 hours and a bit\"\n", "is not a duration", 3),
    ("TOML syntax error", "[[stages]]\nkind = \"dedupe\"\nttl = \n", "invalid TOML", 3),
    ("unknown top-level key", "stage = []\n[[stages]]\nkind = \"dedupe\"\n", "unknown key `stage`", 1),
    ("no stages", "[tiers.gold]\nremove = []\n", "missing required key \"stages\"", 0),
    (
        "tier adds next to an unknown stage",
        "[[stages]]\nkind = \"dedupe\"\n\n[[tiers.gold.add]]\nkind = \"dedupe\"\nid = \"again\"\nafter = \"nope\"\n",
        "no stage `nope`",
        7,
    ),
];

#[test]
fn broken_configs_are_refused_with_a_message_naming_the_problem_and_its_line() {
    for (what, head, expected, line) in BROKEN {
        let text = if head.contains("kind = \"send\"") || !head.contains("[[stages]]") {
            head.to_string()
        } else {
            format!("{head}{TAIL}")
        };
        let err = match load(&text) {
            Ok(_) => panic!("{what}: accepted, but must be refused:\n{text}"),
            Err(e) => e,
        };
        let rendered = err.to_string();
        let hit = err
            .errors
            .iter()
            .find(|d| d.to_string().contains(expected))
            .unwrap_or_else(|| panic!("{what}: no error mentions {expected:?}; got:\n{rendered}"));
        if *line > 0 {
            assert_eq!(hit.line, Some(*line), "{what}: wrong line in {hit}");
            assert!(hit.to_string().starts_with(&format!("pipeline.toml:{line}: error: ")), "{what}: {hit}");
        }
    }
}

#[test]
fn all_problems_are_reported_at_once() {
    let text = "[[stages]]\nkind = \"dedupe\"\nttll = \"1h\"\n\n[[stages]]\nkind = \"ratelimit\"\nconversation = { limit = \"x\" }\n\n[[stages]]\nkind = \"bogus\"\n";
    let err = load(&format!("{text}{TAIL}")).unwrap_err();
    let all = err.to_string();
    assert!(all.contains("ttll") && all.contains("conversation.limit") && all.contains("bogus"), "{all}");
}

#[test]
fn failing_open_where_it_is_dangerous_is_a_warning_not_an_error() {
    let cfg = load("[[stages]]\nkind = \"quota-gate\"\non_error = \"open\"\n\n[[stages]]\nkind = \"send\"\n").unwrap();
    assert_eq!(cfg.warnings.len(), 1);
    assert!(cfg.warnings[0].to_string().contains("quota-gate"), "{}", cfg.warnings[0]);
    assert_eq!(cfg.warnings[0].line, Some(3));
}

#[test]
fn the_shipped_tiers_resolve_as_operators_expect() {
    stages::link();
    let cfg = config::load_file(Path::new("pipelines/whatsapp.toml")).unwrap();
    let ids = |tier: Option<&str>| cfg.for_tier(tier).stages.iter().map(|s| s.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(None), ["dedupe", "ratelimit", "quota-gate", "rag-retrieve", "llm", "send"]);
    assert_eq!(ids(Some("starter")), ["dedupe", "ratelimit", "quota-gate", "llm", "send"]);

    let ratelimit = |tier: Option<&str>| cfg.for_tier(tier).stages[1].entry.clone();
    assert_eq!(ratelimit(None)["conversation"], json!({ "limit": 5, "window": "30s" }));
    assert_eq!(ratelimit(None)["sender"], json!({ "limit": 20, "window": "5m" }));
    // A tier that changes only the limit keeps the base window.
    assert_eq!(ratelimit(Some("enterprise"))["conversation"], json!({ "limit": 20, "window": "30s" }));
    let llm = cfg.for_tier(Some("enterprise")).stages.iter().find(|s| s.id == "llm").unwrap();
    assert_eq!(llm.entry["model"], "gemini-1.5-pro");
    // A tier the file does not define runs the base pipeline.
    assert_eq!(ids(Some("platinum")), ids(None));
}

#[test]
fn a_tier_adds_stages_before_or_after_another() {
    let text = r#"
[[stages]]
kind = "dedupe"

[[stages]]
kind = "llm"

[[stages]]
kind = "send"

[[tiers.gold.add]]
kind = "ratelimit"
after = "dedupe"

[[tiers.gold.add]]
kind = "rag-retrieve"
before = "llm"
top_k = 3
"#;
    let cfg = load(text).unwrap();
    let gold: Vec<&str> = cfg.for_tier(Some("gold")).stages.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(gold, ["dedupe", "ratelimit", "rag-retrieve", "llm", "send"]);
    assert_eq!(cfg.for_tier(Some("gold")).stages[2].entry["top_k"], 3);
}

#[test]
fn a_tier_changing_one_nested_key_keeps_the_defaults_of_the_others() {
    // The base entry leaves `conversation` to its default (5 per 30 s); the tier changes the limit.
    let cfg = load("[[stages]]\nkind = \"ratelimit\"\n\n[[stages]]\nkind = \"send\"\n\n[tiers.gold]\nstages.ratelimit.conversation = { limit = 9 }\n").unwrap();
    assert_eq!(cfg.for_tier(Some("gold")).stages[0].entry["conversation"], json!({ "limit": 9, "window": "30s" }));
}

#[test]
fn a_wrong_policy_names_the_allowed_values() {
    let err = load("[[stages]]\nkind = \"dedupe\"\non_error = \"maybe\"\n\n[[stages]]\nkind = \"send\"\n").unwrap_err();
    let all = err.to_string();
    assert!(all.contains("pipeline.toml:3:") && all.contains("\"open\"") && all.contains("\"closed\""), "{all}");
}
