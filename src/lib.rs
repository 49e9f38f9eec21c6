//! The Parley service: settings, HTTP (webhook, admin, health, metrics), the queue and workers,
//! the PostgreSQL store, the Redis key-value adapter and the providers (WhatsApp, LLM, embeddings)
//! behind the engine's ports. `main.rs` is the command line over it.

pub mod app;
pub mod http;
pub mod knowledge;
pub mod kv;
pub mod providers;
pub mod queue;
pub mod settings;
pub mod store;
pub mod telemetry;
pub mod whatsapp;
pub mod worker;
