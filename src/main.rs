//! `parley`: the WhatsApp AI backend's single binary. This file holds the command line; each
//! command lives in `commands/`.

mod commands;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: Parley allocates many small short-lived buffers per message
/// (JSON, HTTP, SQL rows), where glibc's allocator cost a sixth of the CPU (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Parley runs an AI assistant on WhatsApp for many businesses.
#[derive(Debug, Parser)]
#[command(name = "parley", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP API and the workers in one process (development and small installs).
    Serve,
    /// Run only the HTTP API (webhook, admin, health, metrics).
    Api,
    /// Run only the workers.
    Worker,
    /// Apply the database migrations.
    Migrate,
    /// Create the plans and the demo tenant (idempotent), or upsert a tenant with --tenant.
    Seed {
        /// The tenant's name (with --phone-number-id).
        #[arg(long)]
        tenant: Option<String>,
        /// The `phone_number_id` of the tenant's WhatsApp number.
        #[arg(long)]
        phone_number_id: Option<String>,
        /// A plan code (starter, pro, business, enterprise); none: the base pipeline.
        #[arg(long)]
        plan: Option<String>,
        /// The tenant's monthly message limit, overriding its plan's.
        #[arg(long)]
        monthly_messages: Option<i64>,
        /// The channel's provider (sandbox, meta, 360dialog); default: WHATSAPP_PROVIDER.
        #[arg(long)]
        provider: Option<String>,
    },
    /// Post a signed webhook for one text message and print the reply (sandbox sender).
    Simulate {
        /// The message text.
        text: String,
        /// The sender's number.
        #[arg(long, default_value = "33612345678")]
        from: String,
        /// The provider message id; default: a new one.
        #[arg(long)]
        id: Option<String>,
        /// The business number's phone_number_id (the demo tenant's by default).
        #[arg(long, default_value = "PARLEY_DEMO")]
        phone_number_id: String,
        /// The webhook URL; default: http://127.0.0.1:$PORT/api/v1/whatsapp/webhook.
        #[arg(long)]
        url: Option<String>,
        /// How long to wait for the reply.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Manage a tenant's knowledge base (ingest, list, reindex, delete documents).
    Kb(commands::kb::KbArgs),
    /// Print a bearer token for the admin API, signed with JWT_SECRET.
    Token {
        /// `admin` or `super-admin`.
        #[arg(long, default_value = "admin")]
        role: String,
        /// The tenant the token is scoped to (its id or name); the knowledge endpoints require it.
        #[arg(long)]
        tenant: Option<String>,
        /// Validity; default: JWT_EXPIRES_IN.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
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
    // Lines printed through `engine::stdout` are written in batches: write what is pending before a
    // panic report and before exiting.
    engine::stdout::flush_on_panic();
    let cli = Cli::parse();
    let code = run(cli);
    engine::stdout::flush();
    code
}

fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve => commands::service::run(parley::app::Role::Serve),
        Command::Api => commands::service::run(parley::app::Role::Api),
        Command::Worker => commands::service::run(parley::app::Role::Worker),
        Command::Migrate => commands::database::migrate(),
        Command::Seed { tenant, phone_number_id, plan, monthly_messages, provider } => {
            commands::database::seed(commands::database::SeedArgs {
                tenant,
                phone_number_id,
                plan,
                monthly_messages,
                provider,
            })
        }
        Command::Simulate { text, from, id, phone_number_id, url, timeout } => {
            commands::simulate::run(commands::simulate::SimulateArgs { text, from, id, phone_number_id, url, timeout })
        }
        Command::Kb(args) => commands::kb::run(args),
        Command::Token { role, tenant, ttl } => commands::token::run(&role, tenant.as_deref(), ttl),
        Command::Validate { files, deny_warnings } => commands::validate::run(&files, deny_warnings),
        Command::Schema { check, path } => commands::schema::run(check, &path),
        Command::Stages { examples } => commands::stages::run(examples),
        Command::Pipeline { command: PipelineCommand::Show { tier, json, file } } => {
            commands::pipeline_show::run(file, tier.as_deref(), json)
        }
    }
}
