//! The running configuration: built pipelines behind an `ArcSwap`, so that a job takes one
//! snapshot when it starts and finishes on it while reloads swap in new generations.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;

use crate::{
    config::{PipelineConfig, PipelineSpec, StageSpec},
    events::{Event, EventSink, names},
    message::{DegradedStage, Message, Reply, ReplySource},
    ports::Resources,
    registry::BuildError,
    stage::{Correlation, Decision, OnError, Stage, StageContext, StageError},
};

/// One stage as the pipeline runs it: the instance with its id, policy and timeout.
pub struct StageSlot {
    pub id: String,
    pub kind: &'static str,
    pub on_error: OnError,
    pub timeout: Duration,
    pub fingerprint: String,
    pub stage: Arc<dyn Stage>,
}

/// How a pipeline run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every stage ran (the answer, if any, was sent by the last one).
    Completed,
    /// A stage replied with a notice (delivered by the last stage) and stopped the pipeline.
    Replied { stage: String },
    /// A stage stopped the pipeline without an answer.
    Dropped { stage: String, reason: String },
    /// A stage failed closed: the job must be retried (if `retryable`) or dead-lettered.
    Failed { stage: String, kind: String, error: StageError, retryable: bool },
}

/// The ordered stages of one tier (or the base pipeline).
pub struct Pipeline {
    pub tier: Option<String>,
    pub stages: Vec<StageSlot>,
}

impl Pipeline {
    /// Runs the message through the stages, applying each stage's failure policy and timeout.
    pub async fn run(&self, msg: &mut Message, events: &dyn EventSink, generation: u64) -> Outcome {
        let correlation = Correlation::of(msg);
        let last = self.stages.len().saturating_sub(1);
        let mut replied_by: Option<String> = None;
        for (index, slot) in self.stages.iter().enumerate() {
            if replied_by.is_some() && index != last {
                continue;
            }
            let cx =
                StageContext { stage_id: &slot.id, kind: slot.kind, generation, correlation: &correlation, events };
            let result = match tokio::time::timeout(slot.timeout, slot.stage.process(msg, &cx)).await {
                Ok(result) => result,
                Err(_) => Err(StageError::Timeout(slot.timeout)),
            };
            match result {
                Ok(Decision::Continue) => {}
                Ok(Decision::Reply(text)) => {
                    msg.reply = Some(Reply { text, source: ReplySource::Notice { stage: slot.id.clone() } });
                    if index == last {
                        return Outcome::Replied { stage: slot.id.clone() };
                    }
                    replied_by = Some(slot.id.clone());
                }
                Ok(Decision::Drop(reason)) => return Outcome::Dropped { stage: slot.id.clone(), reason },
                Err(error) => match slot.on_error {
                    OnError::Open => {
                        metrics::counter!("parley_stage_failed_open_total", "stage" => slot.id.clone(), "kind" => slot.kind)
                            .increment(1);
                        cx.emit(
                            Event::warn(names::STAGE_FAILED_OPEN)
                                .with("stage", &slot.id)
                                .with("kind", slot.kind)
                                .with("error", error.to_string()),
                        );
                        msg.degraded.push(DegradedStage {
                            stage: slot.id.clone(),
                            kind: slot.kind.to_owned(),
                            error: error.to_string(),
                        });
                    }
                    OnError::Closed => {
                        let retryable = error.is_retryable();
                        return Outcome::Failed {
                            stage: slot.id.clone(),
                            kind: slot.kind.to_owned(),
                            error,
                            retryable,
                        };
                    }
                },
            }
        }
        match replied_by {
            Some(stage) => Outcome::Replied { stage },
            None => Outcome::Completed,
        }
    }

    pub fn stage_ids(&self) -> Vec<&str> {
        self.stages.iter().map(|s| s.id.as_str()).collect()
    }
}

/// One loaded configuration: a pipeline per tier, built and ready.
pub struct Generation {
    pub number: u64,
    /// Hash of the file content it was built from: identical content is not rebuilt.
    pub content_hash: String,
    pub config: PipelineConfig,
    base: Arc<Pipeline>,
    tiers: BTreeMap<String, Arc<Pipeline>>,
}

impl Generation {
    /// Builds every pipeline of `config`, reusing the instances of `previous` whose configuration
    /// is unchanged. Fails without side effects if any stage fails to build.
    pub fn build(
        number: u64,
        content_hash: String,
        config: PipelineConfig,
        resources: &Resources,
        previous: Option<&Generation>,
    ) -> Result<Self, BuildError> {
        let mut reusable: HashMap<&str, Arc<dyn Stage>> = HashMap::new();
        if let Some(prev) = previous {
            for pipeline in std::iter::once(&prev.base).chain(prev.tiers.values()) {
                for slot in &pipeline.stages {
                    reusable.insert(slot.fingerprint.as_str(), slot.stage.clone());
                }
            }
        }
        let mut built: HashMap<String, Arc<dyn Stage>> = HashMap::new();
        let mut build_pipeline = |spec: &PipelineSpec| -> Result<Arc<Pipeline>, BuildError> {
            let mut stages = Vec::with_capacity(spec.stages.len());
            for s in &spec.stages {
                stages.push(slot_for(s, resources, &reusable, &mut built)?);
            }
            Ok(Arc::new(Pipeline { tier: spec.tier.clone(), stages }))
        };
        let base = build_pipeline(&config.base)?;
        let mut tiers = BTreeMap::new();
        for (name, spec) in &config.tiers {
            tiers.insert(name.clone(), build_pipeline(spec)?);
        }
        Ok(Self { number, content_hash, config, base, tiers })
    }

    /// The pipeline for a tenant's tier; the base one for no tier or an unknown tier.
    pub fn pipeline(&self, tier: Option<&str>) -> &Arc<Pipeline> {
        tier.and_then(|t| self.tiers.get(t)).unwrap_or(&self.base)
    }

    pub fn tier_names(&self) -> Vec<&str> {
        self.tiers.keys().map(String::as_str).collect()
    }

    /// Every distinct stage instance of the generation, by fingerprint.
    pub fn instances(&self) -> HashMap<&str, &Arc<dyn Stage>> {
        std::iter::once(&self.base)
            .chain(self.tiers.values())
            .flat_map(|p| p.stages.iter())
            .map(|s| (s.fingerprint.as_str(), &s.stage))
            .collect()
    }
}

fn slot_for(
    spec: &StageSpec,
    resources: &Resources,
    reusable: &HashMap<&str, Arc<dyn Stage>>,
    built: &mut HashMap<String, Arc<dyn Stage>>,
) -> Result<StageSlot, BuildError> {
    let stage = match reusable.get(spec.fingerprint.as_str()).or_else(|| built.get(&spec.fingerprint)) {
        Some(existing) => existing.clone(),
        None => {
            let stage = spec
                .config
                .build(resources)
                .map_err(|e| BuildError(format!("stage `{}` ({}): {e}", spec.id, spec.kind.kind)))?;
            built.insert(spec.fingerprint.clone(), stage.clone());
            stage
        }
    };
    Ok(StageSlot {
        id: spec.id.clone(),
        kind: spec.kind.kind,
        on_error: spec.on_error,
        timeout: spec.timeout.get(),
        fingerprint: spec.fingerprint.clone(),
        stage,
    })
}

/// The live configuration. Cheap to read from any number of workers.
pub struct Runtime {
    current: ArcSwap<Generation>,
}

impl Runtime {
    pub fn new(first: Generation) -> Self {
        Self { current: ArcSwap::from_pointee(first) }
    }

    /// The current generation; a job keeps this snapshot until it ends.
    pub fn snapshot(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    pub fn generation(&self) -> u64 {
        self.current.load().number
    }

    pub(crate) fn swap(&self, next: Generation) {
        self.current.store(Arc::new(next));
    }
}
