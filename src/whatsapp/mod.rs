//! What the WhatsApp providers (Meta Cloud API, 360dialog) send us: the webhook bodies, parsed into
//! queue events, and their authentication (signature or shared token).

pub mod payload;
pub mod signature;

pub use payload::{ParsedWebhook, PayloadError, SkippedItem, parse_webhook};
pub use signature::{SignatureError, meta_signature, verify_header_token, verify_meta_signature};
