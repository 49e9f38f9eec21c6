//! `parley validate`: the CI gate for pipeline files.

use std::{path::PathBuf, process::ExitCode};

use engine::config;

pub fn run(files: &[PathBuf], deny_warnings: bool) -> ExitCode {
    let files = if files.is_empty() { vec![super::default_pipeline_file()] } else { files.to_vec() };
    let mut failed = false;
    for file in &files {
        match config::load_file(file) {
            Ok(cfg) => {
                for w in &cfg.warnings {
                    eprintln!("{w}");
                }
                if deny_warnings && !cfg.warnings.is_empty() {
                    failed = true;
                    eprintln!("{}: invalid: {} warning(s) and --deny-warnings", file.display(), cfg.warnings.len());
                } else {
                    let tiers: Vec<&str> = cfg.tiers.keys().map(String::as_str).collect();
                    println!(
                        "{}: ok ({} stages{}{})",
                        file.display(),
                        cfg.base.stages.len(),
                        if tiers.is_empty() { String::new() } else { format!("; tiers: {}", tiers.join(", ")) },
                        if cfg.warnings.is_empty() {
                            String::new()
                        } else {
                            format!("; {} warning(s)", cfg.warnings.len())
                        }
                    );
                }
            }
            Err(e) => {
                failed = true;
                eprintln!("{e}");
                eprintln!("{}: invalid: {} error(s)", file.display(), e.errors.len());
            }
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
