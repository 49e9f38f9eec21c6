//! The webhook requests the benchmark sends: Meta-shaped bodies of one text message each, signed
//! with the app secret as Meta signs them (the same shape as `parley simulate`), built and signed
//! before any timed loop starts.

use std::net::SocketAddr;

use parley::whatsapp::{meta_signature, signature::META_SIGNATURE_HEADER};
use secrecy::SecretString;
use serde_json::json;

use crate::http_load::post_request;

pub const WEBHOOK_PATH: &str = "/api/v1/whatsapp/webhook";

/// One text message from `from` to the business number `phone_number_id`.
#[derive(Debug, Clone)]
pub struct TextMessage {
    pub phone_number_id: String,
    pub from: String,
    pub wamid: String,
    pub text: String,
}

/// The sender number of conversation `n` (distinct per conversation, French mobile shape).
pub fn sender(n: usize) -> String {
    format!("3361{:07}", n % 10_000_000)
}

pub fn body(message: &TextMessage) -> String {
    json!({
        "object": "whatsapp_business_account",
        "entry": [{
            "id": "PARLEY_BENCH",
            "changes": [{
                "field": "messages",
                "value": {
                    "messaging_product": "whatsapp",
                    "metadata": { "display_phone_number": "15550000000", "phone_number_id": message.phone_number_id },
                    "contacts": [{ "profile": { "name": "Bench" }, "wa_id": message.from }],
                    "messages": [{
                        "from": message.from,
                        "id": message.wamid,
                        "timestamp": chrono::Utc::now().timestamp().to_string(),
                        "type": "text",
                        "text": { "body": message.text }
                    }]
                }
            }]
        }]
    })
    .to_string()
}

/// The complete signed `POST` for `message`, ready for the load generator.
pub fn signed_request(target: SocketAddr, secret: &SecretString, message: &TextMessage) -> Vec<u8> {
    let body = body(message);
    let signature = meta_signature(secret, body.as_bytes());
    post_request(
        target,
        WEBHOOK_PATH,
        &[("content-type", "application/json"), (META_SIGNATURE_HEADER, &signature)],
        body.as_bytes(),
    )
}

/// A few questions a shop's customers ask, so that the knowledge search has something to match.
pub const QUESTIONS: [&str; 6] = [
    "Bonjour, quels sont vos horaires d'ouverture le samedi ?",
    "Est-ce que la livraison est gratuite à partir de 50 euros ?",
    "Comment puis-je retourner un article qui ne me va pas ?",
    "Avez-vous ce modèle de chaussures en taille 42 ?",
    "Je n'ai pas reçu ma commande, que dois-je faire ?",
    "Acceptez-vous le paiement en plusieurs fois ?",
];
