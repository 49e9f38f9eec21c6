//! Hot reload: a new configuration is loaded and built completely off to the side, then swapped in
//! only if everything succeeded. Triggers: a change of the file (debounced), SIGHUP, or a call
//! (the admin API).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use notify_debouncer_mini::{DebounceEventResult, Debouncer, new_debouncer, notify};
use sha2::{Digest, Sha256};
use tokio::{sync::Mutex, task::JoinHandle};

use crate::{
    config::{self, LoadError},
    events::{Event, names},
    ports::Resources,
    registry::BuildError,
    runtime::{Generation, Runtime},
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new generation serves new jobs.
    Reloaded { generation: u64, stages_reused: usize, stages_built: usize },
    /// The file did not change: nothing was rebuilt.
    Unchanged { generation: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(#[from] LoadError),
    #[error("{0}")]
    Build(#[from] BuildError),
}

impl ReloadError {
    /// Every reason, one line each.
    pub fn reasons(&self) -> Vec<String> {
        match self {
            Self::Invalid(e) => e.errors.iter().map(ToString::to_string).collect(),
            Self::Build(e) => vec![e.to_string()],
        }
    }
}

/// Owns the pipeline file and the runtime built from it.
pub struct Reloader {
    path: PathBuf,
    resources: Resources,
    runtime: Arc<Runtime>,
    serial: Mutex<()>,
}

impl Reloader {
    /// Loads and builds generation 1. Fails, with every reason, when the file is invalid.
    pub fn start(path: impl Into<PathBuf>, resources: Resources) -> Result<Self, ReloadError> {
        let path = path.into();
        let text = read(&path)?;
        let config = config::load_str(&text, &path.display().to_string())?;
        let warnings = config.warnings.len();
        let generation = Generation::build(1, content_hash(&text), config, &resources, None)?;
        let stages = generation.instances().len();
        resources.events.emit(
            Event::info(names::PIPELINE_RELOADED)
                .with("generation", 1)
                .with("trigger", "startup")
                .with("file", path.display().to_string())
                .with("tiers", generation.tier_names())
                .with("stagesBuilt", stages)
                .with("stagesReused", 0)
                .with("warnings", warnings),
        );
        Ok(Self { path, resources, runtime: Arc::new(Runtime::new(generation)), serial: Mutex::new(()) })
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reloads the file. On any error the current generation keeps serving and
    /// `pipeline_reload_failed` says why.
    pub async fn reload(&self, trigger: &str) -> Result<ReloadOutcome, ReloadError> {
        let _one_at_a_time = self.serial.lock().await;
        let current = self.runtime.snapshot();
        let result = self.try_reload(&current);
        let events = &self.resources.events;
        match &result {
            Ok(ReloadOutcome::Reloaded { generation, stages_reused, stages_built }) => {
                let next = self.runtime.snapshot();
                events.emit(
                    Event::info(names::PIPELINE_RELOADED)
                        .with("generation", generation)
                        .with("previousGeneration", current.number)
                        .with("trigger", trigger)
                        .with("file", self.path.display().to_string())
                        .with("tiers", next.tier_names())
                        .with("stagesBuilt", stages_built)
                        .with("stagesReused", stages_reused)
                        .with("warnings", next.config.warnings.len()),
                );
            }
            Ok(ReloadOutcome::Unchanged { .. }) => {}
            Err(e) => {
                events.emit(
                    Event::error(names::PIPELINE_RELOAD_FAILED)
                        .with("generation", current.number)
                        .with("trigger", trigger)
                        .with("file", self.path.display().to_string())
                        .with("errors", e.reasons()),
                );
            }
        }
        result
    }

    fn try_reload(&self, current: &Generation) -> Result<ReloadOutcome, ReloadError> {
        let text = read(&self.path)?;
        let hash = content_hash(&text);
        if hash == current.content_hash {
            return Ok(ReloadOutcome::Unchanged { generation: current.number });
        }
        let config = config::load_str(&text, &self.path.display().to_string())?;
        let next = Generation::build(current.number + 1, hash, config, &self.resources, Some(current))?;
        let old: Vec<usize> = current.instances().values().map(|s| Arc::as_ptr(s) as *const () as usize).collect();
        let (reused, built) = next.instances().values().fold((0, 0), |(r, b), s| {
            if old.contains(&(Arc::as_ptr(s) as *const () as usize)) { (r + 1, b) } else { (r, b + 1) }
        });
        let generation = next.number;
        self.runtime.swap(next);
        Ok(ReloadOutcome::Reloaded { generation, stages_reused: reused, stages_built: built })
    }

    /// Reloads when the file changes. Watches the directory, so that editors that save by
    /// renaming a temporary file are seen too. Keep the handle alive to keep watching.
    pub fn watch(self: &Arc<Self>, debounce: Duration) -> Result<WatchHandle, notify::Error> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let file_name = self.path.file_name().map(|n| n.to_owned());
        let mut debouncer = new_debouncer(debounce, move |res: DebounceEventResult| {
            if let Ok(events) = res
                && events.iter().any(|e| e.path.file_name() == file_name.as_deref())
            {
                let _ = tx.send(());
            }
        })?;
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        debouncer.watcher().watch(&dir, notify::RecursiveMode::NonRecursive)?;
        let me = Arc::clone(self);
        let task = tokio::spawn(async move {
            while rx.recv().await.is_some() {
                let _ = me.reload("file").await;
            }
        });
        Ok(WatchHandle { _debouncer: debouncer, task })
    }

    /// Reloads on SIGHUP.
    #[cfg(unix)]
    pub fn reload_on_sighup(self: &Arc<Self>) -> std::io::Result<JoinHandle<()>> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = signal(SignalKind::hangup())?;
        let me = Arc::clone(self);
        Ok(tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                let _ = me.reload("sighup").await;
            }
        }))
    }
}

/// Stops watching when dropped.
pub struct WatchHandle {
    _debouncer: Debouncer<notify::RecommendedWatcher>,
    task: JoinHandle<()>,
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn read(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|e| LoadError {
        errors: vec![config::Diagnostic {
            severity: config::Severity::Error,
            file: path.display().to_string(),
            path: String::new(),
            line: None,
            message: format!("cannot read the file: {e}"),
        }],
        warnings: Vec::new(),
    })
}

fn content_hash(text: &str) -> String {
    Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}
