//! What the webhook hands to the workers: one event per inbound message or delivery status,
//! serialised as JSON in a queue entry (Redis stream) or a spool row (PostgreSQL).
//!
//! The entry holds the user's phone number and text, which the worker needs to answer; Redis keys
//! never do (see `kv`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One unit of work from a webhook body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum QueuedEvent {
    Message(InboundMessageEvent),
    Status(StatusEvent),
}

/// A message a user sent to a business number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboundMessageEvent {
    /// `metadata.phone_number_id`: the business number, which resolves the channel and tenant.
    pub phone_number_id: String,
    /// The provider's message id (`wamid.…`).
    pub provider_message_id: String,
    /// The sender's WhatsApp id (digits of the phone number). Never logged unmasked.
    pub from: String,
    /// `contacts[].profile.name`, when given.
    pub contact_name: Option<String>,
    /// The provider's timestamp (Unix seconds).
    pub timestamp: i64,
    /// `text`, `image`, `audio`, `interactive`, `button`, …
    pub message_type: String,
    /// The text to answer: the body of a text, the title of a button or list reply, or the
    /// caption of a media message. `None` for messages without text.
    pub text: Option<String>,
    /// When the webhook accepted it.
    pub received_at: DateTime<Utc>,
    /// The provider's message object as received (media ids, context, …).
    pub raw: RawJson,
}

/// A JSON value kept as its text: the webhook copies the message object from the body into the
/// queue entry without building it as a tree ([`RawJson::value`] parses it when needed).
#[derive(Debug, Clone)]
pub struct RawJson(Box<serde_json::value::RawValue>);

impl RawJson {
    /// Copies a value of a parsed body.
    pub fn from_raw(raw: &serde_json::value::RawValue) -> Self {
        Self(raw.to_owned())
    }

    /// The value as a tree.
    pub fn value(&self) -> serde_json::Value {
        serde_json::from_str(self.0.get()).unwrap_or(serde_json::Value::Null)
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }
}

impl From<serde_json::Value> for RawJson {
    fn from(value: serde_json::Value) -> Self {
        // A Value always serialises.
        Self(serde_json::value::to_raw_value(&value).unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned()))
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

impl Serialize for RawJson {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

/// Read through a tree: [`QueuedEvent`] is an internally tagged enum, which serde buffers before
/// it reads the variant, and a buffered value cannot be read as raw text.
impl<'de> Deserialize<'de> for RawJson {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde_json::Value::deserialize(deserializer).map(Self::from)
    }
}

/// A delivery status of a message Parley sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusEvent {
    pub phone_number_id: String,
    /// The id of the outbound message the status is about.
    pub provider_message_id: String,
    /// `sent`, `delivered`, `read` or `failed`.
    pub status: String,
    /// The recipient's WhatsApp id, when given.
    pub recipient: Option<String>,
    pub timestamp: i64,
    /// `errors[0].code` of a failed status.
    pub error_code: Option<String>,
    pub error_title: Option<String>,
}

impl QueuedEvent {
    pub fn phone_number_id(&self) -> &str {
        match self {
            Self::Message(m) => &m.phone_number_id,
            Self::Status(s) => &s.phone_number_id,
        }
    }

    /// The provider message id the event is about (inbound for messages, outbound for statuses).
    pub fn provider_message_id(&self) -> &str {
        match self {
            Self::Message(m) => &m.provider_message_id,
            Self::Status(s) => &s.provider_message_id,
        }
    }

    /// The key that keeps one conversation's events in one shard, in order: the business number
    /// and the end user.
    pub fn conversation_key(&self) -> String {
        match self {
            Self::Message(m) => format!("{}:{}", m.phone_number_id, m.from),
            Self::Status(s) => format!("{}:{}", s.phone_number_id, s.recipient.as_deref().unwrap_or("")),
        }
    }

    /// The shard of the event among `shards`: a stable hash of its conversation key.
    pub fn shard(&self, shards: u32) -> u32 {
        shard_of(&self.conversation_key(), shards)
    }
}

/// FNV-1a of the key, modulo the shard count: stable across processes and versions.
pub fn shard_of(key: &str, shards: u32) -> u32 {
    let h = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    (h % u64::from(shards.max(1))) as u32
}

/// Where an accepted event went, and the id of its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedJob {
    /// `stream:{shard}:{entry id}` or `spool:{row id}`: stable across the job's retries.
    pub job_id: String,
    /// `redis` or `postgres` (the spool, when Redis is down).
    pub durable_in: &'static str,
    pub shard: u32,
}

/// Why events could not be made durable anywhere: the webhook answers 500 so the provider retries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("neither Redis nor PostgreSQL accepted the events: redis: {redis}; postgres: {postgres}")]
pub struct IntakeError {
    pub redis: String,
    pub postgres: String,
}

/// Makes webhook events durable: the queue (Redis streams) first, the spool (PostgreSQL) when
/// Redis is down. Returns only once every event is stored somewhere.
#[async_trait::async_trait]
pub trait Intake: Send + Sync {
    async fn accept(&self, events: &[QueuedEvent]) -> Result<Vec<AcceptedJob>, IntakeError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversation_always_lands_in_the_same_shard() {
        let a = shard_of("PHONE_ID:33612345678", 16);
        assert_eq!(a, shard_of("PHONE_ID:33612345678", 16));
        assert!(a < 16);
        let spread: std::collections::HashSet<u32> = (0..200).map(|i| shard_of(&format!("P:336{i:08}"), 16)).collect();
        assert!(spread.len() > 12, "conversations must spread over the shards: {spread:?}");
    }

    #[test]
    fn a_message_with_its_raw_object_round_trips_through_a_stream_entry_and_the_spool() {
        let raw = r#"{"from":"33612345678","id":"wamid.1","type":"image","image":{"id":"MEDIA","caption":"é \"x\""}}"#;
        let e = QueuedEvent::Message(InboundMessageEvent {
            phone_number_id: "P".into(),
            provider_message_id: "wamid.1".into(),
            from: "33612345678".into(),
            contact_name: None,
            timestamp: 1_700_000_000,
            message_type: "image".into(),
            text: Some("é \"x\"".into()),
            received_at: DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default(),
            raw: RawJson::from_raw(&serde_json::from_str::<Box<serde_json::value::RawValue>>(raw).unwrap()),
        });
        // As text (a stream entry): the raw object is embedded as it came.
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.contains(raw), "{json}");
        let back = serde_json::from_str::<QueuedEvent>(&json).unwrap();
        assert_eq!(back, e);
        // As a tree (the spool's jsonb column).
        let tree = serde_json::to_value(&e).unwrap();
        assert_eq!(tree["raw"]["image"]["caption"], "é \"x\"");
        let QueuedEvent::Message(m) = serde_json::from_value::<QueuedEvent>(tree).unwrap() else { panic!("a message") };
        assert_eq!(m.raw.value()["image"]["id"], "MEDIA");
    }

    #[test]
    fn events_round_trip_as_json() {
        let e = QueuedEvent::Status(StatusEvent {
            phone_number_id: "P".into(),
            provider_message_id: "wamid.out".into(),
            status: "read".into(),
            recipient: Some("33612345678".into()),
            timestamp: 1_700_000_000,
            error_code: None,
            error_title: None,
        });
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.contains("\"kind\":\"status\""));
        assert_eq!(serde_json::from_str::<QueuedEvent>(&json).unwrap(), e);
    }
}
