//! `parley stages`: what stage kinds this binary knows.

use std::process::ExitCode;

use engine::OnError;

pub fn run(examples: bool) -> ExitCode {
    let kinds = engine::registry::kinds();
    let width = kinds.keys().map(|k| k.len()).max().unwrap_or(0);
    for kind in kinds.values() {
        let policy = match kind.default_on_error {
            OnError::Open => "open",
            OnError::Closed => "closed",
        };
        println!(
            "{:<width$}  on_error={:<6}  timeout={:<6}  {}",
            kind.kind,
            policy,
            kind.default_timeout.to_string(),
            kind.description
        );
        if examples {
            println!("\n[[stages]]\n{}", kind.example.trim_end());
            println!();
        }
    }
    ExitCode::SUCCESS
}
