//! `parley kb`: the knowledge base from the command line — ingest files, list, re-index and
//! delete a tenant's documents.
//!
//! `ingest` stores each file (KNOWLEDGE_DIR or GCS_BUCKET_NAME) and queues it for the knowledge
//! workers, then waits until every file is indexed or failed, printing one line per file in the
//! order given: `<path>: indexed`, `<path>: duplicate` or `<path>: error: <reason>`; exit 1 if any
//! failed. While it waits it runs a knowledge worker itself (the configured EMBEDDING_PROVIDER),
//! so that it works without a running `parley worker`; both may run at once (claims skip each
//! other's rows). `--no-wait` only queues (`<path>: queued`). A progress bar goes to stderr when
//! stderr is a terminal.

use std::{
    collections::HashMap,
    io::IsTerminal,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use clap::{Args, Subcommand};
use engine::events::{JsonLinesSink, Level};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use parley::{
    knowledge::{
        KnowledgeWorker, KnowledgeWorkerConfig, ObjectStorage, UploadOutcome, build_storage, delete, document_states,
        list_documents, queue_reindex, resolve_tenant, upload,
    },
    providers,
    settings::Settings,
    store::{self, PgStore},
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Args)]
pub struct KbArgs {
    #[command(subcommand)]
    pub command: KbCommand,
}

#[derive(Debug, Subcommand)]
pub enum KbCommand {
    /// Add files (.txt, .md, .html, .pdf) to a tenant's knowledge base and wait until they are
    /// indexed; prints one line per file (`indexed`, `duplicate` or `error: <reason>`) and exits 1
    /// if any failed.
    Ingest {
        /// The files.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The tenant: its id or its name.
        #[arg(long)]
        tenant: String,
        /// Only queue the files for the knowledge workers (`<path>: queued`).
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
    /// Index a document again from its stored original, and wait for it.
    Reindex {
        /// The document id.
        document: Uuid,
        #[arg(long)]
        tenant: String,
        /// Only queue it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Delete a document, its chunks and its original.
    Delete {
        /// The document id.
        document: Uuid,
        #[arg(long)]
        tenant: String,
    },
}

/// How often the waiting CLI reads its documents' states.
const POLL: Duration = Duration::from_millis(200);

pub fn run(args: KbArgs) -> ExitCode {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // Two threads: the progress bar and the polling stay live while a document is extracted.
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
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

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

async fn kb(settings: Settings, command: KbCommand) -> Result<ExitCode, String> {
    let pool = store::connect(&settings.database_url).await.map_err(text)?;
    let store = PgStore::new(pool);
    let storage = build_storage(&settings).map_err(text)?;

    match command {
        KbCommand::Ingest { paths, tenant, no_wait } => {
            let tenant = resolve_tenant(&store, &tenant).await.map_err(text)?;
            let mut files = Vec::with_capacity(paths.len());
            for path in &paths {
                let label = path.display().to_string();
                let state = match upload_file(&store, storage.as_ref(), tenant, path).await {
                    Ok(UploadOutcome::Uploaded { document_id }) => FileState::Waiting(document_id),
                    Ok(UploadOutcome::Duplicate { .. }) => FileState::Done("duplicate".into(), false),
                    Err(e) => FileState::Done(format!("error: {e}"), true),
                };
                files.push((label, state));
            }
            if no_wait {
                let mut failed = false;
                for (label, state) in files {
                    let line = match state {
                        FileState::Waiting(_) => "queued".to_owned(),
                        FileState::Done(line, f) => {
                            failed |= f;
                            line
                        }
                    };
                    println!("{label}: {line}");
                }
                return Ok(exit(failed));
            }
            let failed = wait(&settings, &store, storage, files).await?;
            Ok(exit(failed))
        }
        KbCommand::List { tenant, json } => {
            let tenant = resolve_tenant(&store, &tenant).await.map_err(text)?;
            let documents = list_documents(&store, tenant).await.map_err(text)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&documents).map_err(text)?);
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
        KbCommand::Reindex { document, tenant, no_wait } => {
            let tenant = resolve_tenant(&store, &tenant).await.map_err(text)?;
            queue_reindex(&store, tenant, document).await.map_err(text)?;
            if no_wait {
                println!("{document}: queued");
                return Ok(ExitCode::SUCCESS);
            }
            let files = vec![(document.to_string(), FileState::Waiting(document))];
            let failed = wait(&settings, &store, storage, files).await?;
            Ok(exit(failed))
        }
        KbCommand::Delete { document, tenant } => {
            let tenant = resolve_tenant(&store, &tenant).await.map_err(text)?;
            if delete(&store, storage.as_ref(), tenant, document).await.map_err(text)? {
                println!("{document}: deleted");
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("parley kb: document {document} not found for this tenant");
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

fn exit(failed: bool) -> ExitCode {
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

/// A file on the command line: waiting for its document, or its line (and whether it failed).
enum FileState {
    Waiting(Uuid),
    Done(String, bool),
}

/// Runs a knowledge worker here and polls the documents until each is indexed or failed,
/// printing the lines in the order of `files`. True if any failed.
async fn wait(
    settings: &Settings,
    store: &PgStore,
    storage: Arc<dyn ObjectStorage>,
    mut files: Vec<(String, FileState)>,
) -> Result<bool, String> {
    let bar = progress_bar(files.iter().filter(|(_, s)| matches!(s, FileState::Waiting(_))).count());
    // Retries and provider warnings go to stderr (around the bar), so that stdout is the one
    // line per file.
    let events = Arc::new(JsonLinesSink::new(Box::new(AroundBar(bar.clone())), Level::Warn));
    let providers = providers::build(settings, events.clone()).map_err(text)?;
    let worker_id = format!("kb-cli-{}", Uuid::new_v4().simple());
    let worker = KnowledgeWorker::new(
        KnowledgeWorkerConfig::from_settings(worker_id, settings),
        store.clone(),
        providers.embedder,
        storage,
        events,
    );
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));

    let mut printed = 0;
    let mut failed = false;
    let result = loop {
        let waiting: Vec<Uuid> =
            files.iter().filter_map(|(_, s)| if let FileState::Waiting(id) = s { Some(*id) } else { None }).collect();
        if !waiting.is_empty() {
            let states = match document_states(store, &waiting).await {
                Ok(states) => states.into_iter().map(|s| (s.id, s)).collect::<HashMap<_, _>>(),
                Err(e) => break Err(e.to_string()),
            };
            let mut shown = false;
            for (label, state) in files.iter_mut() {
                let FileState::Waiting(id) = state else { continue };
                match states.get(id) {
                    None => {
                        *state = FileState::Done("error: the document was deleted while it was waiting".into(), true);
                        bar.inc(1);
                    }
                    Some(s) if s.is_final() => {
                        *state = match (s.status.as_str(), &s.error) {
                            ("indexed", _) => FileState::Done("indexed".into(), false),
                            (_, Some(reason)) => FileState::Done(format!("error: {reason}"), true),
                            (_, None) => FileState::Done("error: indexing failed".into(), true),
                        };
                        bar.inc(1);
                    }
                    // The bar shows the first file still waiting.
                    Some(_) if shown => {}
                    Some(s) => {
                        shown = true;
                        bar.set_message(match (s.status.as_str(), &s.error) {
                            ("uploaded", Some(reason)) => format!("{label}: retrying ({reason})"),
                            (status, _) => format!("{label}: {status}"),
                        });
                    }
                }
            }
        }
        // The lines in the order given, as soon as the ones before are done.
        while let Some((label, FileState::Done(line, f))) = files.get(printed) {
            failed |= *f;
            bar.suspend(|| println!("{label}: {line}"));
            printed += 1;
        }
        if printed == files.len() {
            break Ok(failed);
        }
        tokio::time::sleep(POLL).await;
    };
    bar.finish_and_clear();
    stop.cancel();
    let _ = running.await;
    result
}

/// A bar on stderr when it is a terminal; hidden otherwise (scripts, CI, pipes).
fn progress_bar(len: usize) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{bar:30} {pos}/{len} done  {elapsed}  {wide_msg}") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Writes to stderr with the bar cleared, then redraws it.
struct AroundBar(ProgressBar);

impl std::io::Write for AroundBar {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.suspend(|| std::io::stderr().write(buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

async fn upload_file(
    store: &PgStore,
    storage: &dyn ObjectStorage,
    tenant: Uuid,
    path: &Path,
) -> Result<UploadOutcome, String> {
    // The size is checked before reading: a huge file must not be loaded to be refused.
    let size = tokio::fs::metadata(path).await.map_err(text)?.len();
    let limit = parley::knowledge::extract::MAX_FILE_BYTES;
    if size > limit as u64 {
        return Err(format!("file too large: {size} bytes, the limit is {limit} bytes"));
    }
    let bytes = tokio::fs::read(path).await.map_err(text)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    upload(store, storage, tenant, name, &bytes).await.map_err(text)
}
