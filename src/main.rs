//! `parley`: the WhatsApp AI backend's single binary. This file holds the command line; each
//! command lives in `commands/`.

mod commands;

use parley as _;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

/// Parley runs an AI assistant on WhatsApp for many businesses.
#[derive(Debug, Parser)]
#[command(name = "parley", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check pipeline files; exit 0 when valid, 1 when not, printing every problem with its line.
    Validate {
        /// Files to check; default: $PIPELINE_FILE or pipelines/whatsapp.toml.
        files: Vec<PathBuf>,
        /// Treat warnings as errors.
        #[arg(long)]
        deny_warnings: bool,
    },
    /// Print the JSON schema of pipeline files, or check the committed copy.
    Schema {
        /// Exit 1 if the committed schema differs from the one the code generates.
        #[arg(long)]
        check: bool,
        /// The committed schema's path.
        #[arg(long, default_value = commands::schema::COMMITTED_SCHEMA)]
        path: PathBuf,
    },
    /// List the registered stage kinds with their description and default failure policy.
    Stages {
        /// Also print each kind's example configuration.
        #[arg(long)]
        examples: bool,
    },
    /// Inspect pipelines.
    Pipeline {
        #[command(subcommand)]
        command: PipelineCommand,
    },
}

#[derive(Debug, Subcommand)]
enum PipelineCommand {
    /// Print the effective pipeline of a tier after resolution, defaults filled in.
    Show {
        /// The tier; default: the base pipeline.
        #[arg(long)]
        tier: Option<String>,
        /// Print JSON instead of TOML.
        #[arg(long)]
        json: bool,
        /// The pipeline file; default: $PIPELINE_FILE or pipelines/whatsapp.toml.
        file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    stages::link();
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { files, deny_warnings } => commands::validate::run(&files, deny_warnings),
        Command::Schema { check, path } => commands::schema::run(check, &path),
        Command::Stages { examples } => commands::stages::run(examples),
        Command::Pipeline { command: PipelineCommand::Show { tier, json, file } } => {
            commands::pipeline_show::run(file, tier.as_deref(), json)
        }
    }
}
