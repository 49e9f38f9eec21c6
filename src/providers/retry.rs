//! Bounded retries of one outbound call (a send, a completion, an embedding batch) inside the job
//! that makes it: a few attempts with jittered exponential pauses, only on errors the caller says
//! are worth another try, all within a time budget shorter than the calling stage's timeout. Each
//! retried attempt is logged as `provider_call_retried`.
//!
//! These retries smooth over a blip (a refused connection, a 429) without failing the job; the
//! job's own retries with backoff (`job_retry`) remain the answer to a longer outage.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use backon::{ExponentialBuilder, Retryable};
use engine::{
    events::{Event, EventSink, names},
    ports::PortError,
};

use super::http_client::HttpTimeouts;

/// How many times, how fast, and for how long in all a call is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts after the first one.
    pub retries: usize,
    /// The first pause; each next one doubles, plus a random jitter of up to its own length, so
    /// that many replicas retrying after the same blip do not hit the provider in step.
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// The whole call, every attempt and pause included. Each attempt gets what is left of it as
    /// its timeout, and a retry starts only if at least a quarter of it is left: a retry that
    /// cannot finish is not worth starting.
    pub budget: Duration,
}

impl RetryPolicy {
    /// WhatsApp sends: within the send stage's 10 s.
    pub const WHATSAPP: Self = Self {
        retries: 2,
        min_delay: Duration::from_millis(250),
        max_delay: Duration::from_secs(1),
        budget: HttpTimeouts::WHATSAPP.total,
    };
    /// Chat completions: within the llm stage's 30 s.
    pub const LLM: Self = Self {
        retries: 2,
        min_delay: Duration::from_millis(500),
        max_delay: Duration::from_secs(2),
        budget: HttpTimeouts::LLM.total,
    };
    /// The embedding of a question: within the rag-retrieve stage's 3 s, which fails open.
    pub const EMBED_QUERY: Self = Self {
        retries: 2,
        min_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(400),
        budget: HttpTimeouts::EMBED_QUERY.total,
    };
    /// The embedding of a batch of document chunks (ingestion, not on a user's path).
    pub const EMBED_DOCUMENTS: Self = Self {
        retries: 2,
        min_delay: Duration::from_millis(500),
        max_delay: Duration::from_secs(4),
        budget: HttpTimeouts::EMBED_DOCUMENTS.total,
    };

    /// An OAuth token request.
    pub const OAUTH: Self = Self {
        retries: 2,
        min_delay: Duration::from_millis(250),
        max_delay: Duration::from_secs(1),
        budget: HttpTimeouts::OAUTH.total,
    };

    /// A single attempt with the given budget.
    pub const fn once(budget: Duration) -> Self {
        Self { retries: 0, min_delay: Duration::ZERO, max_delay: Duration::ZERO, budget }
    }

    /// Two retries with millisecond pauses within `budget`: for tests.
    #[cfg(test)]
    pub(crate) const fn fast(budget: Duration) -> Self {
        Self { retries: 2, min_delay: Duration::from_millis(1), max_delay: Duration::from_millis(2), budget }
    }

    fn min_attempt(&self) -> Duration {
        self.budget / 4
    }
}

/// A failed attempt and whether another one is safe and useful.
#[derive(Debug)]
pub(crate) struct AttemptError {
    pub error: PortError,
    pub retry: bool,
}

impl AttemptError {
    /// Retried when the error is retryable: for calls that can safely be repeated (completions,
    /// embeddings, token requests).
    pub fn idempotent(error: PortError) -> Self {
        Self { retry: error.is_retryable(), error }
    }

    /// Never retried here (the job may still retry it, according to the error's kind).
    pub fn final_(error: PortError) -> Self {
        Self { error, retry: false }
    }
}

impl From<PortError> for AttemptError {
    fn from(error: PortError) -> Self {
        Self::idempotent(error)
    }
}

/// Runs calls under a [`RetryPolicy`] and logs their retried attempts. Cheap to clone.
#[derive(Clone)]
pub struct Retries {
    policy: RetryPolicy,
    events: Arc<dyn EventSink>,
}

impl std::fmt::Debug for Retries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retries").field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl Retries {
    pub fn new(policy: RetryPolicy, events: Arc<dyn EventSink>) -> Self {
        Self { policy, events }
    }

    pub fn policy(&self) -> RetryPolicy {
        self.policy
    }

    /// The same sink with another policy (an embedder uses one for questions, one for documents).
    pub fn with_policy(&self, policy: RetryPolicy) -> Self {
        Self { policy, events: self.events.clone() }
    }

    /// Runs `attempt` (given its timeout: what is left of the budget) until it succeeds, fails
    /// for good, or the retries or the budget run out; returns the last error. `describe` adds
    /// the call's identifying fields to each `provider_call_retried` event.
    pub(crate) async fn run<T, F, Fut>(
        &self,
        describe: &(dyn Fn(Event) -> Event + Sync),
        mut attempt: F,
    ) -> Result<T, PortError>
    where
        F: FnMut(Duration) -> Fut,
        Fut: Future<Output = Result<T, AttemptError>>,
    {
        let policy = self.policy;
        let start = Instant::now();
        let left = move || policy.budget.saturating_sub(start.elapsed());
        let mut failed_attempts = 0u32;
        let delays = ExponentialBuilder::default()
            .with_min_delay(policy.min_delay)
            .with_max_delay(policy.max_delay)
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(policy.retries);
        let result = (|| attempt(left()))
            .retry(delays)
            .sleep(tokio::time::sleep)
            .when(|e: &AttemptError| e.retry)
            // No retry that could not finish within the budget.
            .adjust(|_, delay| delay.filter(|d| left().saturating_sub(*d) >= policy.min_attempt()))
            .notify(|e: &AttemptError, delay: Duration| {
                failed_attempts += 1;
                self.events.emit(describe(
                    Event::warn(names::PROVIDER_CALL_RETRIED)
                        .with("service", e.error.service)
                        .with("attempt", failed_attempts)
                        .with("maxAttempts", policy.retries + 1)
                        .with("delayMs", u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
                        .with("code", &e.error.code)
                        // Port error messages are already free of secrets and phone numbers.
                        .with("error", &e.error.message),
                ));
            })
            .await;
        result.map_err(|e| e.error)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use engine::{events::MemoryEvents, ports::PortErrorKind};
    use serde_json::json;

    use super::*;

    fn fast(retries: usize) -> RetryPolicy {
        RetryPolicy {
            retries,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
            budget: Duration::from_secs(5),
        }
    }

    fn unavailable() -> PortError {
        PortError { code: Some("http_503".into()), ..PortError::unavailable("llm", "HTTP 503") }
    }

    #[tokio::test]
    async fn a_blip_is_retried_and_each_retry_is_logged() {
        let events = MemoryEvents::new();
        let retries = Retries::new(fast(2), Arc::new(events.clone()));
        let calls = AtomicUsize::new(0);

        let answer = retries
            .run(&|e| e.with("model", "m"), |_| async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0 | 1 => Err(AttemptError::idempotent(unavailable())),
                    _ => Ok("answer"),
                }
            })
            .await;

        assert_eq!(answer, Ok("answer"));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        let logged = events.named(names::PROVIDER_CALL_RETRIED);
        assert_eq!(logged.len(), 2);
        assert_eq!(logged[0].field("attempt"), Some(&json!(1)));
        assert_eq!(logged[1].field("attempt"), Some(&json!(2)));
        assert_eq!(logged[0].field("maxAttempts"), Some(&json!(3)));
        assert_eq!(logged[0].field("service"), Some(&json!("llm")));
        assert_eq!(logged[0].field("code"), Some(&json!("http_503")));
        assert_eq!(logged[0].field("model"), Some(&json!("m")), "the caller's fields are added");
    }

    #[tokio::test]
    async fn retries_are_bounded_and_the_last_error_is_returned() {
        let events = MemoryEvents::new();
        let retries = Retries::new(fast(2), Arc::new(events.clone()));
        let calls = AtomicUsize::new(0);

        let error = retries
            .run(&|e| e, |_| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(AttemptError::idempotent(unavailable()))
            })
            .await
            .expect_err("always failing");

        assert_eq!(calls.load(Ordering::SeqCst), 3, "one attempt and two retries");
        assert_eq!(error, unavailable());
        assert_eq!(events.count(names::PROVIDER_CALL_RETRIED), 2);
    }

    #[tokio::test]
    async fn a_permanent_error_is_not_retried() {
        let events = MemoryEvents::new();
        let retries = Retries::new(fast(2), Arc::new(events.clone()));
        let calls = AtomicUsize::new(0);

        let error = retries
            .run(&|e| e, |_| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(AttemptError::idempotent(PortError::permanent("llm", None, "bad model")))
            })
            .await
            .expect_err("refused");

        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(error.kind, PortErrorKind::Permanent);
        assert!(events.all().is_empty());
    }

    #[tokio::test]
    async fn an_error_the_caller_marks_unsafe_to_repeat_is_not_retried_but_stays_retryable() {
        let retries = Retries::new(fast(2), Arc::new(MemoryEvents::new()));
        let calls = AtomicUsize::new(0);

        let error = retries
            .run(&|e| e, |_| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(AttemptError::final_(unavailable()))
            })
            .await
            .expect_err("failed");

        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(error.is_retryable(), "the job decides about it");
    }

    #[tokio::test]
    async fn no_retry_starts_without_enough_budget_left() {
        let retries =
            Retries::new(RetryPolicy { budget: Duration::from_millis(40), ..fast(5) }, Arc::new(MemoryEvents::new()));
        let calls = AtomicUsize::new(0);

        let _ = retries
            .run(&|e| e, |timeout| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    // An attempt that uses its whole timeout, like a provider that does not answer.
                    tokio::time::sleep(timeout).await;
                    Err::<(), _>(AttemptError::idempotent(unavailable()))
                }
            })
            .await;

        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn each_attempt_gets_what_is_left_of_the_budget_as_its_timeout() {
        let retries = Retries::new(fast(1), Arc::new(MemoryEvents::new()));
        let timeouts = std::sync::Mutex::new(Vec::new());

        let _ = retries
            .run(&|e| e, |timeout| {
                timeouts.lock().unwrap().push(timeout);
                async { Err::<(), _>(AttemptError::idempotent(unavailable())) }
            })
            .await;

        let timeouts = timeouts.into_inner().unwrap();
        assert_eq!(timeouts.len(), 2);
        assert!(timeouts[0] <= Duration::from_secs(5) && timeouts[1] < timeouts[0], "{timeouts:?}");
    }
}
