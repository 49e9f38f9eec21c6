//! The one place that names events: every structured event Parley logs, a sink trait to emit them,
//! a JSON-lines sink for production and a recording sink for tests. See `docs/events.md`.

use std::{
    borrow::Cow,
    cell::RefCell,
    fmt::Write as _,
    io::Write,
    sync::{Arc, Mutex},
};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

/// Event names, stable: dashboards and alerts match on them.
pub mod names {
    pub const MESSAGE_RECEIVED: &str = "message_received";
    pub const JOB_ADDED: &str = "job_added";
    pub const DUPLICATE_MESSAGE_DROPPED: &str = "duplicate_message_dropped";
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const QUOTA_EXCEEDED: &str = "quota_exceeded";
    pub const QUOTA_EXCEEDED_HANDLED: &str = "quota_exceeded_handled";
    pub const KNOWLEDGE_RETRIEVED: &str = "knowledge_retrieved";
    pub const LLM_REQUEST: &str = "llm_request";
    pub const LLM_REQUEST_COMPLETED: &str = "llm_request_completed";
    /// A retried job found the answer an earlier attempt recorded and did not ask the LLM again.
    pub const LLM_ANSWER_REUSED: &str = "llm_answer_reused";
    pub const MESSAGE_SENT: &str = "message_sent";
    pub const SEND_FAILED: &str = "send_failed";
    pub const SEND_SKIPPED: &str = "send_skipped";
    pub const SEND_REFUSED_WINDOW: &str = "send_refused_window";
    pub const SANDBOX_REPLY: &str = "sandbox_reply";
    pub const JOB_RETRY: &str = "job_retry";
    /// An outbound call (LLM, embeddings, WhatsApp send) failed with a retryable error and is tried
    /// again within the same job; emitted by the provider clients.
    pub const PROVIDER_CALL_RETRIED: &str = "provider_call_retried";
    pub const JOB_FAILED: &str = "job_failed";
    pub const MESSAGE_IGNORED: &str = "message_ignored";
    /// The file of an inbound media message was fetched from the provider and stored.
    pub const MEDIA_STORED: &str = "media_stored";
    /// The file of an inbound media message could not be fetched or stored; the message is
    /// answered from its caption or a placeholder, or retried when the failure is transient.
    pub const MEDIA_FETCH_FAILED: &str = "media_fetch_failed";
    pub const STATUS_UPDATED: &str = "status_updated";
    pub const WORKER_STARTED: &str = "worker_started";
    pub const WORKER_STOPPED: &str = "worker_stopped";
    pub const SHARD_ACQUIRED: &str = "shard_acquired";
    pub const SHARD_RELEASED: &str = "shard_released";
    pub const STAGE_FAILED_OPEN: &str = "stage_failed_open";
    pub const PIPELINE_RELOADED: &str = "pipeline_reloaded";
    pub const PIPELINE_RELOAD_FAILED: &str = "pipeline_reload_failed";
    /// A knowledge worker indexed a document (its chunks searchable).
    pub const KNOWLEDGE_DOCUMENT_INDEXED: &str = "knowledge_document_indexed";
    /// A document's indexing failed for good: status `error` with the reason.
    pub const KNOWLEDGE_DOCUMENT_FAILED: &str = "knowledge_document_failed";
    /// A document's indexing failed for a reason that may pass; queued again after a backoff.
    pub const KNOWLEDGE_JOB_RETRY: &str = "knowledge_job_retry";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

/// One structured event: a stable name, a level and flat fields (camelCase names).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: &'static str,
    pub level: Level,
    pub fields: Fields,
}

/// An event's fields, in the order they were added; a name added again replaces its value in
/// place. A list rather than a hash map: an event has a handful of fields, usually named by
/// literals, and hashing and copying each name cost the webhook ~3 % of its CPU (BENCHMARKS.md).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fields(Vec<(Cow<'static, str>, Value)>);

impl Fields {
    /// Sets `key`, returning the value it replaced.
    pub fn insert(&mut self, key: impl Into<Cow<'static, str>>, value: Value) -> Option<Value> {
        let key = key.into();
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some((_, old)) => Some(std::mem::replace(old, value)),
            None => {
                self.0.push((key, value));
                None
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Names and values, in the order added.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.0.iter().map(|(k, v)| (k.as_ref(), v))
    }
}

impl std::ops::Index<&str> for Fields {
    type Output = Value;

    /// The value of `key`; panics when the event has no such field (for tests).
    fn index(&self, key: &str) -> &Value {
        self.get(key).unwrap_or_else(|| panic!("the event has no field `{key}`"))
    }
}

impl Event {
    pub fn new(level: Level, name: &'static str) -> Self {
        Self { name, level, fields: Fields(Vec::with_capacity(6)) }
    }
    pub fn info(name: &'static str) -> Self {
        Self::new(Level::Info, name)
    }
    pub fn warn(name: &'static str) -> Self {
        Self::new(Level::Warn, name)
    }
    pub fn error(name: &'static str) -> Self {
        Self::new(Level::Error, name)
    }
    pub fn debug(name: &'static str) -> Self {
        Self::new(Level::Debug, name)
    }

    /// Adds a field. Values that fail to serialise become their error text rather than vanish.
    pub fn with(mut self, key: impl Into<Cow<'static, str>>, value: impl Serialize) -> Self {
        let value = serde_json::to_value(value).unwrap_or_else(|e| Value::String(e.to_string()));
        self.fields.insert(key, value);
        self
    }

    pub fn field(&self, key: &str) -> Option<&Value> {
        self.fields.get(key)
    }
}

pub trait EventSink: Send + Sync {
    fn emit(&self, event: Event);
}

/// Writes one JSON object per line: `timestamp`, `level`, `event`, then the fields at top level.
pub struct JsonLinesSink {
    out: Output,
    min_level: Level,
}

enum Output {
    /// The batched stdout, which keeps each line whole by itself: no lock of our own.
    Stdout,
    /// Any other writer, one line at a time.
    Writer(Mutex<Box<dyn Write + Send>>),
}

impl JsonLinesSink {
    /// Lines to the process's stdout, in batches (see [`crate::stdout`]).
    pub fn stdout(min_level: Level) -> Self {
        Self { out: Output::Stdout, min_level }
    }

    pub fn new(out: Box<dyn Write + Send>, min_level: Level) -> Self {
        Self { out: Output::Writer(Mutex::new(out)), min_level }
    }

    pub fn render(event: &Event) -> String {
        let mut line = Vec::with_capacity(256);
        Self::render_into(event, &mut line);
        // Only serde_json and ASCII literals were written: valid UTF-8.
        String::from_utf8(line).unwrap_or_default()
    }

    /// Writes the line straight into `out`, without building an intermediate JSON object. A field
    /// named like one of the three leading keys replaces it, as a map would.
    fn render_into(event: &Event, out: &mut Vec<u8>) {
        let reserved = |key: &str| event.fields.contains_key(key);
        out.push(b'{');
        let mut first = true;
        let mut key = |out: &mut Vec<u8>, name: &str| {
            if !std::mem::take(&mut first) {
                out.push(b',');
            }
            let _ = serde_json::to_writer(&mut *out, name);
            out.push(b':');
        };
        if !reserved("timestamp") {
            key(out, "timestamp");
            out.push(b'"');
            write_timestamp(Utc::now(), out);
            out.push(b'"');
        }
        if !reserved("level") {
            key(out, "level");
            let _ = serde_json::to_writer(&mut *out, &event.level);
        }
        if !reserved("event") {
            key(out, "event");
            let _ = serde_json::to_writer(&mut *out, event.name);
        }
        for (name, value) in event.fields.iter() {
            key(out, name);
            let _ = serde_json::to_writer(&mut *out, value);
        }
        out.push(b'}');
    }
}

/// `2026-11-28T19:43:04.123Z` (RFC 3339, UTC, milliseconds), as chrono's `to_rfc3339_opts` writes
/// it; the part up to the seconds is formatted once per second and thread.
fn write_timestamp(now: DateTime<Utc>, out: &mut Vec<u8>) {
    thread_local! {
        static SECOND: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) };
    }
    let second = now.timestamp();
    let cached = SECOND.with(|cell| {
        let Ok(mut cell) = cell.try_borrow_mut() else { return false };
        let (at, text) = &mut *cell;
        if *at != second {
            text.clear();
            let _ = write!(text, "{}", now.format("%Y-%m-%dT%H:%M:%S"));
            *at = second;
        }
        out.extend_from_slice(text.as_bytes());
        true
    });
    if !cached {
        let _ = write!(out, "{}", now.format("%Y-%m-%dT%H:%M:%S"));
    }
    // A leap second reads as 1000-1999 ms; chrono writes it the same way.
    let millis = now.timestamp_subsec_millis();
    let _ = write!(out, ".{millis:03}Z");
}

impl EventSink for JsonLinesSink {
    fn emit(&self, event: Event) {
        if event.level < self.min_level {
            return;
        }
        // One line buffer per thread, reused; a fresh one if this thread is already rendering.
        thread_local! {
            static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
        }
        let write = |line: &mut Vec<u8>| {
            line.clear();
            Self::render_into(&event, line);
            line.push(b'\n');
            match &self.out {
                Output::Stdout => {
                    let _ = crate::stdout::Lines.write_all(line);
                }
                Output::Writer(out) => {
                    // A poisoned lock only means another thread panicked mid-write; keep logging.
                    let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = out.write_all(line);
                    let _ = out.flush();
                }
            }
            line.shrink_to(4096);
        };
        let done = LINE.with(|cell| match cell.try_borrow_mut() {
            Ok(mut line) => {
                write(&mut line);
                true
            }
            Err(_) => false,
        });
        if !done {
            write(&mut Vec::with_capacity(256));
        }
    }
}

/// Keeps every event, for tests.
#[derive(Default, Clone)]
pub struct MemoryEvents {
    events: Arc<Mutex<Vec<Event>>>,
}

impl MemoryEvents {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn all(&self) -> Vec<Event> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.all().iter().map(|e| e.name).collect()
    }

    pub fn named(&self, name: &str) -> Vec<Event> {
        self.all().into_iter().filter(|e| e.name == name).collect()
    }

    pub fn count(&self, name: &str) -> usize {
        self.named(name).len()
    }

    pub fn clear(&self) {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl EventSink for MemoryEvents {
    fn emit(&self, event: Event) {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).push(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_puts_fields_at_top_level() {
        let e = Event::info(names::RATE_LIMITED).with("scope", "conversation").with("count", 6);
        let line: Value = serde_json::from_str(&JsonLinesSink::render(&e)).unwrap();
        assert_eq!(line["event"], "rate_limited");
        assert_eq!(line["level"], "info");
        assert_eq!(line["scope"], "conversation");
        assert_eq!(line["count"], 6);
    }

    #[test]
    fn timestamps_are_written_as_chrono_writes_rfc_3339_with_milliseconds() {
        use chrono::{SecondsFormat, TimeZone};
        let instants = [
            Utc.timestamp_millis_opt(0).unwrap(),
            Utc.timestamp_millis_opt(1_795_000_000_007).unwrap(),
            Utc.timestamp_millis_opt(1_795_000_000_999).unwrap(),
            // The same second again (cached), then the next one, then an earlier one.
            Utc.timestamp_millis_opt(1_795_000_000_120).unwrap(),
            Utc.timestamp_millis_opt(1_795_000_001_000).unwrap(),
            Utc.timestamp_millis_opt(951_782_400_500).unwrap(),
            Utc::now(),
        ];
        for at in instants {
            let mut out = Vec::new();
            write_timestamp(at, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), at.to_rfc3339_opts(SecondsFormat::Millis, true));
        }
    }

    #[test]
    fn a_field_set_again_keeps_its_place_and_takes_the_new_value() {
        let e = Event::info(names::JOB_ADDED)
            .with("jobId", "a")
            .with(String::from("shard"), 3)
            .with("jobId", "b")
            .with("durableIn", "redis");
        let names: Vec<&str> = e.fields.iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["jobId", "shard", "durableIn"]);
        assert_eq!(e.field("jobId"), Some(&Value::from("b")));
        assert_eq!(e.fields["shard"], 3);
        assert!(!e.fields.contains_key("tenantId"));
        let line = JsonLinesSink::render(&e);
        assert!(line.ends_with(r#""event":"job_added","jobId":"b","shard":3,"durableIn":"redis"}"#), "{line}");
    }
}
