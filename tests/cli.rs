//! `parley validate`, `schema`, `stages` and `pipeline show`, run as CI and operators run them.

use std::process::{Command, Output};

fn parley(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_parley")).args(args).output().expect("run parley")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn validate_accepts_the_shipped_pipeline() {
    let out = parley(&["validate", "pipelines/whatsapp.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("pipelines/whatsapp.toml: ok (6 stages; tiers: business, enterprise, pro, starter)"));
}

#[test]
fn validate_refuses_a_broken_file_naming_file_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.toml");
    std::fs::write(&file, "[[stages]]\nkind = \"ratelimit\"\nconversation = { limit = 5, windw = \"30s\" }\n\n[[stages]]\nkind = \"send\"\n").unwrap();
    let out = parley(&["validate", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let all = text(&out);
    assert!(
        all.contains(&format!("{}:3: error: stages[0].conversation.windw: unknown key `windw`", file.display())),
        "{all}"
    );
}

#[test]
fn validate_with_deny_warnings_refuses_a_risky_policy() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("risky.toml");
    std::fs::write(&file, "[[stages]]\nkind = \"quota-gate\"\non_error = \"open\"\n\n[[stages]]\nkind = \"send\"\n")
        .unwrap();
    let path = file.to_str().unwrap();
    assert_eq!(parley(&["validate", path]).status.code(), Some(0));
    let out = parley(&["validate", "--deny-warnings", path]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("warning: stages[0].on_error"), "{}", text(&out));
}

#[test]
fn schema_check_passes_on_the_committed_schema_and_names_the_fix_when_stale() {
    assert_eq!(parley(&["schema", "--check"]).status.code(), Some(0));
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("old.json");
    std::fs::write(&stale, "{}\n").unwrap();
    let out = parley(&["schema", "--check", "--path", stale.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("cargo run -- schema >"), "{}", text(&out));
}

#[test]
fn stages_lists_the_builtin_kinds_with_their_policy() {
    let out = parley(&["stages"]);
    assert!(out.status.success());
    let all = text(&out);
    for (kind, policy) in [
        ("dedupe", "open"),
        ("ratelimit", "open"),
        ("quota-gate", "closed"),
        ("rag-retrieve", "open"),
        ("llm", "closed"),
        ("send", "closed"),
    ] {
        let line = all
            .lines()
            .find(|l| l.starts_with(&format!("{kind} ")))
            .unwrap_or_else(|| panic!("{kind} missing:\n{all}"));
        assert!(line.contains(&format!("on_error={policy}")), "{line}");
    }
}

#[test]
fn pipeline_show_prints_a_tier_after_resolution() {
    let out = parley(&["pipeline", "show", "--tier", "enterprise", "pipelines/whatsapp.toml"]);
    assert!(out.status.success(), "{}", text(&out));
    let all = text(&out);
    assert!(all.contains("conversation = { limit = 20, window = \"30s\" }"), "{all}");
    assert!(all.contains("model = \"gemini-1.5-pro\""), "{all}");

    let starter = text(&parley(&["pipeline", "show", "--tier", "starter", "pipelines/whatsapp.toml"]));
    assert!(!starter.contains("rag-retrieve"), "{starter}");

    let unknown = parley(&["pipeline", "show", "--tier", "platinum", "pipelines/whatsapp.toml"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(text(&unknown).contains("no tier `platinum`"));
}
