//! `parley schema`: prints the pipeline schema generated from the registered stages, or checks
//! that the committed copy is current.

use std::{path::Path, process::ExitCode};

use engine::config::schema::pipeline_schema_text;

pub const COMMITTED_SCHEMA: &str = "schemas/pipeline.schema.json";

pub fn run(check: bool, path: &Path) -> ExitCode {
    let generated = pipeline_schema_text();
    if !check {
        print!("{generated}");
        return ExitCode::SUCCESS;
    }
    match std::fs::read_to_string(path) {
        Ok(committed) if committed == generated => {
            println!("{}: up to date", path.display());
            ExitCode::SUCCESS
        }
        Ok(_) => {
            eprintln!("{}: stale; regenerate it with:\n  cargo run -- schema > {}", path.display(), path.display());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!(
                "{}: cannot read it ({e}); generate it with:\n  cargo run -- schema > {}",
                path.display(),
                path.display()
            );
            ExitCode::FAILURE
        }
    }
}
