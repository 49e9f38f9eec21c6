//! The durable path of a webhook event to a worker: Redis streams sharded by conversation, shard
//! leases, retries and the dead-letter stream, and the PostgreSQL spool used while Redis is down.

pub mod event;
pub mod intake;
pub mod leases;
pub mod streams;

pub use event::{AcceptedJob, InboundMessageEvent, Intake, IntakeError, QueuedEvent, RawJson, StatusEvent};
pub use intake::{DurableIntake, SpoolSink};
pub use leases::{Leases, Rebalance, fair_share, rebalance};
pub use streams::{DeadLetter, Queue, QueueEntry, QueueError};
