//! `parley kb`: the knowledge base from the command line — ingest files, list, re-index and
//! delete a tenant's documents.
//!
//! Ingestion runs in this process, synchronously, with the configured embedder
//! (`EMBEDDING_PROVIDER`) and the local object storage (`KNOWLEDGE_DIR`). Queuing it on the
//! `knowledge` worker, with retries, is still to come; until then `--no-wait` is accepted and
//! ignored (with a warning), so that scripts written for the contract keep working.

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use clap::{Args, Subcommand};
use engine::events::{JsonLinesSink, Level};
use parley::{
    knowledge::{IngestOutcome, Ingestor, KnowledgeError, LocalDirectory, list_documents, resolve_tenant},
    providers,
    settings::Settings,
    store::{self, PgStore},
};
use uuid::Uuid;

#[derive(Debug, Args)]
pub struct KbArgs {
    #[command(subcommand)]
    pub command: KbCommand,
}

#[derive(Debug, Subcommand)]
pub enum KbCommand {
    /// Add files (.txt, .md, .html, .pdf) to a tenant's knowledge base; prints one line per file
    /// (`indexed`, `duplicate` or `error: <reason>`) and exits 1 if any failed.
    Ingest {
        /// The files.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The tenant: its id or its name.
        #[arg(long)]
        tenant: String,
        /// Only queue the files (not yet available: ingestion runs here and waits).
        #[arg(long)]
        no_wait: bool,
    },
    /// List a tenant's documents with their status.
    List {
        /// The tenant: its id or its name.
        #[arg(long)]
        tenant: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Index a document again from its stored original.
    Reindex {
        /// The document id.
        document: Uuid,
        #[arg(long)]
        tenant: String,
    },
    /// Delete a document, its chunks and its original.
    Delete {
        /// The document id.
        document: Uuid,
        #[arg(long)]
        tenant: String,
    },
}

pub fn run(args: KbArgs) -> ExitCode {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("parley kb: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match kb(settings, args.command).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("parley kb: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn kb(settings: Settings, command: KbCommand) -> Result<ExitCode, String> {
    let pool = store::connect(&settings.database_url).await.map_err(|e| e.to_string())?;
    let store = PgStore::new(pool);
    // Retries and provider warnings go to stderr, so that stdout is the one line per file.
    let events = Arc::new(JsonLinesSink::new(Box::new(std::io::stderr()), Level::Warn));
    let providers = providers::build(&settings, events).map_err(|e| e.to_string())?;
    let storage = LocalDirectory::from_env();
    let ingestor = Ingestor::new(&store, providers.embedder.as_ref(), &storage);

    match command {
        KbCommand::Ingest { paths, tenant, no_wait } => {
            let tenant = resolve_tenant(&store, &tenant).await.map_err(|e| e.to_string())?;
            if no_wait {
                eprintln!("parley kb: --no-wait: the knowledge worker is not available yet; indexing here");
            }
            let mut failed = false;
            for path in &paths {
                let line = match ingest_file(&ingestor, tenant, path).await {
                    Ok(outcome) => {
                        failed |= matches!(outcome, IngestOutcome::Failed { .. });
                        outcome.summary()
                    }
                    Err(e) => {
                        failed = true;
                        format!("error: {e}")
                    }
                };
                println!("{}: {line}", path.display());
            }
            Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        KbCommand::List { tenant, json } => {
            let tenant = resolve_tenant(&store, &tenant).await.map_err(|e| e.to_string())?;
            let documents = list_documents(&store, tenant).await.map_err(|e| e.to_string())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&documents).map_err(|e| e.to_string())?);
            } else {
                for d in &documents {
                    let error = d.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default();
                    println!(
                        "{}  {:<8} {:>4} chunks {:>9} bytes  {}{error}",
                        d.id, d.status, d.chunks, d.bytes, d.source
                    );
                }
                if documents.is_empty() {
                    eprintln!("no documents");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        KbCommand::Reindex { document, tenant } => {
            let tenant = resolve_tenant(&store, &tenant).await.map_err(|e| e.to_string())?;
            let outcome = ingestor.reindex(tenant, document).await.map_err(|e| e.to_string())?;
            println!("{document}: {}", outcome.summary());
            Ok(if matches!(outcome, IngestOutcome::Failed { .. }) { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        KbCommand::Delete { document, tenant } => {
            let tenant = resolve_tenant(&store, &tenant).await.map_err(|e| e.to_string())?;
            if ingestor.delete(tenant, document).await.map_err(|e| e.to_string())? {
                println!("{document}: deleted");
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("parley kb: document {document} not found for this tenant");
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

async fn ingest_file(ingestor: &Ingestor<'_>, tenant: Uuid, path: &std::path::Path) -> Result<IngestOutcome, String> {
    // The size is checked before reading: a huge file must not be loaded to be refused.
    let size = tokio::fs::metadata(path).await.map_err(|e| e.to_string())?.len();
    let limit = parley::knowledge::extract::MAX_FILE_BYTES;
    if size > limit as u64 {
        return Err(format!("file too large: {size} bytes, the limit is {limit} bytes"));
    }
    let bytes = tokio::fs::read(path).await.map_err(|e| e.to_string())?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    ingestor.ingest(tenant, name, &bytes).await.map_err(|e: KnowledgeError| e.to_string())
}
