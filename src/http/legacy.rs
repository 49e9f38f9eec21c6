//! The legacy webhook URL `/whatsapp/webhook`: gone (410) for every method, naming the new URL, so
//! that a provider still configured with it fails loudly instead of silently losing messages.

use poem::{Response, handler, http::StatusCode};

use super::webhook::WEBHOOK_PATH;

pub const LEGACY_WEBHOOK_PATH: &str = "/whatsapp/webhook";

#[handler]
pub async fn gone() -> Response {
    let body = serde_json::json!({
        "error": format!("this webhook URL is gone; configure {WEBHOOK_PATH} instead"),
        "url": WEBHOOK_PATH,
    });
    Response::builder().status(StatusCode::GONE).content_type("application/json").body(body.to_string())
}
