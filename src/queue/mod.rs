//! The durable path of a webhook event to a worker: Redis streams sharded by conversation, shard
//! leases, retries and the dead-letter stream, and the PostgreSQL spool used while Redis is down.

pub mod event;

pub use event::{AcceptedJob, InboundMessageEvent, Intake, IntakeError, QueuedEvent, StatusEvent};
