//! Parsing of the webhook bodies Meta and 360dialog send (the same shape for both) into the
//! events the queue carries: one [`QueuedEvent`] per message and per delivery status, across
//! every entry and change of the body.
//!
//! The body as a whole is either accepted or refused (400): it must be a JSON object with a string
//! `object` and an `entry` array. Inside it, parsing is lenient, because a provider retries a
//! refused body for days and one odd item must not hold back the good ones: a message without `id`
//! or `from`, or a status without `id` or `status`, is skipped and reported in
//! [`ParsedWebhook::skipped`] (the webhook logs them at warn); changes whose `field` is not
//! `messages` are skipped silently (account updates, template reviews…).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::queue::{InboundMessageEvent, QueuedEvent, StatusEvent};

/// Why a body was refused as a whole; the text is the short reason of the 400 answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("body is not valid JSON")]
    InvalidJson,
    #[error("body is not a JSON object")]
    NotAnObject,
    #[error("`object` is missing or not a string")]
    MissingObject,
    #[error("`entry` is missing or not an array")]
    MissingEntry,
}

/// An item of the body that was left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedItem {
    /// Where it is in the body, e.g. `entry[0].changes[1].value.messages[2]`.
    pub location: String,
    /// What was wrong with it, e.g. `missing id`.
    pub reason: &'static str,
}

/// The events of one webhook body, in body order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedWebhook {
    pub events: Vec<QueuedEvent>,
    pub skipped: Vec<SkippedItem>,
    /// Changes with a `field` other than `messages`, ignored.
    pub ignored_changes: usize,
}

impl ParsedWebhook {
    pub fn messages(&self) -> impl Iterator<Item = &InboundMessageEvent> {
        self.events.iter().filter_map(|e| match e {
            QueuedEvent::Message(m) => Some(m),
            QueuedEvent::Status(_) => None,
        })
    }
}

/// Parses a webhook body. `received_at` stamps every message (and stands in for a missing
/// provider timestamp).
pub fn parse_webhook(body: &[u8], received_at: DateTime<Utc>) -> Result<ParsedWebhook, PayloadError> {
    let root: Value = serde_json::from_slice(body).map_err(|_| PayloadError::InvalidJson)?;
    let Value::Object(root) = root else {
        return Err(PayloadError::NotAnObject);
    };
    if !root.get("object").is_some_and(Value::is_string) {
        return Err(PayloadError::MissingObject);
    }
    let Some(Value::Array(entries)) = root.get("entry") else {
        return Err(PayloadError::MissingEntry);
    };

    let mut parsed = ParsedWebhook::default();
    for (e, entry) in entries.iter().enumerate() {
        let Some(entry) = entry.as_object() else {
            parsed.skip(format!("entry[{e}]"), "not an object");
            continue;
        };
        let Some(changes) = entry.get("changes").and_then(Value::as_array) else {
            continue;
        };
        for (c, change) in changes.iter().enumerate() {
            let here = format!("entry[{e}].changes[{c}]");
            let Some(change) = change.as_object() else {
                parsed.skip(here, "not an object");
                continue;
            };
            if change.get("field").and_then(Value::as_str) != Some("messages") {
                parsed.ignored_changes += 1;
                continue;
            }
            let Some(value) = change.get("value").and_then(Value::as_object) else {
                parsed.skip(format!("{here}.value"), "missing or not an object");
                continue;
            };
            parsed.change(&here, value, received_at);
        }
    }
    Ok(parsed)
}

impl ParsedWebhook {
    fn skip(&mut self, location: String, reason: &'static str) {
        self.skipped.push(SkippedItem { location, reason });
    }

    fn change(&mut self, here: &str, value: &Map<String, Value>, received_at: DateTime<Utc>) {
        // A body without metadata (hand-written test bodies, like the checklist's curl examples)
        // yields an empty business number: the worker's channel resolution decides what it means.
        let phone_number_id =
            value.get("metadata").and_then(|m| m.get("phone_number_id")).and_then(Value::as_str).unwrap_or_default();
        let contacts = value.get("contacts").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();

        for (i, msg) in value.get("messages").and_then(Value::as_array).into_iter().flatten().enumerate() {
            match message(phone_number_id, contacts, msg, received_at) {
                Ok(event) => self.events.push(QueuedEvent::Message(event)),
                Err(reason) => self.skip(format!("{here}.value.messages[{i}]"), reason),
            }
        }
        for (i, st) in value.get("statuses").and_then(Value::as_array).into_iter().flatten().enumerate() {
            match status(phone_number_id, st, received_at) {
                Ok(event) => self.events.push(QueuedEvent::Status(event)),
                Err(reason) => self.skip(format!("{here}.value.statuses[{i}]"), reason),
            }
        }
    }
}

fn message(
    phone_number_id: &str,
    contacts: &[Value],
    raw: &Value,
    received_at: DateTime<Utc>,
) -> Result<InboundMessageEvent, &'static str> {
    let obj = raw.as_object().ok_or("not an object")?;
    let id = non_empty_str(obj.get("id")).ok_or("missing id")?;
    let from = non_empty_str(obj.get("from")).ok_or("missing from")?;
    let message_type = non_empty_str(obj.get("type")).unwrap_or("unknown");
    let text = message_text(message_type, obj).filter(|t| !t.is_empty()).map(str::to_owned);
    Ok(InboundMessageEvent {
        phone_number_id: phone_number_id.to_owned(),
        provider_message_id: id.to_owned(),
        from: from.to_owned(),
        contact_name: contact_name(contacts, from),
        timestamp: timestamp(obj.get("timestamp")).unwrap_or_else(|| received_at.timestamp()),
        message_type: message_type.to_owned(),
        text,
        received_at,
        raw: raw.clone(),
    })
}

/// The text a message carries, by type: what the user typed, the title of the button or list row
/// they picked, or the caption of their media. Other types (audio, sticker, location, contacts,
/// reaction, unsupported…) carry none.
fn message_text<'a>(message_type: &str, obj: &'a Map<String, Value>) -> Option<&'a str> {
    let at = |path: &[&str]| {
        let mut v = obj.get(path[0])?;
        for key in &path[1..] {
            v = v.get(key)?;
        }
        v.as_str()
    };
    match message_type {
        "text" => at(&["text", "body"]),
        "interactive" => {
            at(&["interactive", "button_reply", "title"]).or_else(|| at(&["interactive", "list_reply", "title"]))
        }
        "button" => at(&["button", "text"]),
        "image" | "video" | "document" => at(&[message_type, "caption"]),
        _ => None,
    }
}

fn contact_name(contacts: &[Value], from: &str) -> Option<String> {
    let by_id = contacts.iter().find(|c| c.get("wa_id").and_then(Value::as_str) == Some(from));
    // A lone contact without `wa_id` can only be the sender.
    let contact = by_id.or_else(|| match contacts {
        [only] if only.get("wa_id").is_none() => Some(only),
        _ => None,
    })?;
    non_empty_str(contact.get("profile").and_then(|p| p.get("name"))).map(str::to_owned)
}

fn status(phone_number_id: &str, raw: &Value, received_at: DateTime<Utc>) -> Result<StatusEvent, &'static str> {
    let obj = raw.as_object().ok_or("not an object")?;
    let id = non_empty_str(obj.get("id")).ok_or("missing id")?;
    let status = non_empty_str(obj.get("status")).ok_or("missing status")?;
    let first_error = obj.get("errors").and_then(Value::as_array).and_then(|e| e.first());
    Ok(StatusEvent {
        phone_number_id: phone_number_id.to_owned(),
        provider_message_id: id.to_owned(),
        status: status.to_owned(),
        recipient: non_empty_str(obj.get("recipient_id")).map(str::to_owned),
        timestamp: timestamp(obj.get("timestamp")).unwrap_or_else(|| received_at.timestamp()),
        error_code: first_error.and_then(|e| e.get("code")).and_then(scalar_text),
        error_title: first_error.and_then(|e| non_empty_str(e.get("title"))).map(str::to_owned),
    })
}

fn non_empty_str(v: Option<&Value>) -> Option<&str> {
    v.and_then(Value::as_str).filter(|s| !s.trim().is_empty())
}

/// Meta sends Unix seconds as a string; accept a number too.
fn timestamp(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::String(s) => s.trim().parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
    }

    fn body(changes: Value) -> Vec<u8> {
        json!({"object": "whatsapp_business_account", "entry": [{"id": "WABA", "changes": changes}]})
            .to_string()
            .into_bytes()
    }

    fn change_with_messages(messages: Value) -> Value {
        json!([{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15551234567", "phone_number_id": "PNID"},
            "contacts": [{"profile": {"name": "John Doe"}, "wa_id": "15559876543"}],
            "messages": messages
        }}])
    }

    fn only_message(msg: Value) -> InboundMessageEvent {
        let parsed = parse_webhook(&body(change_with_messages(json!([msg]))), now()).unwrap();
        assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
        let messages: Vec<_> = parsed.messages().cloned().collect();
        assert_eq!(messages.len(), 1);
        messages.into_iter().next().unwrap()
    }

    #[test]
    fn the_checklist_text_message_becomes_one_event_with_everything_the_worker_needs() {
        let m = only_message(json!({
            "from": "15559876543", "id": "wamid.UNIQUE", "timestamp": "1699999999",
            "type": "text", "text": {"body": "Hello!"}
        }));
        assert_eq!(m.phone_number_id, "PNID");
        assert_eq!(m.provider_message_id, "wamid.UNIQUE");
        assert_eq!(m.from, "15559876543");
        assert_eq!(m.contact_name.as_deref(), Some("John Doe"));
        assert_eq!(m.timestamp, 1_699_999_999);
        assert_eq!(m.message_type, "text");
        assert_eq!(m.text.as_deref(), Some("Hello!"));
        assert_eq!(m.received_at, now());
        assert_eq!(m.raw["text"]["body"], "Hello!");
    }

    #[test]
    fn every_message_type_is_accepted_with_the_text_it_carries() {
        let cases = [
            (
                json!({"type": "interactive", "interactive": {"type": "button_reply", "button_reply": {"id": "b1", "title": "Yes"}}}),
                Some("Yes"),
            ),
            (
                json!({"type": "interactive", "interactive": {"type": "list_reply", "list_reply": {"id": "r1", "title": "Paris", "description": "d"}}}),
                Some("Paris"),
            ),
            (
                json!({"type": "button", "button": {"text": "Stop promotions", "payload": "STOP"}}),
                Some("Stop promotions"),
            ),
            (
                json!({"type": "image", "image": {"id": "MEDIA", "caption": "my receipt", "mime_type": "image/jpeg"}}),
                Some("my receipt"),
            ),
            (json!({"type": "video", "video": {"id": "MEDIA", "caption": "look"}}), Some("look")),
            (
                json!({"type": "document", "document": {"id": "MEDIA", "caption": "the contract", "filename": "c.pdf"}}),
                Some("the contract"),
            ),
            (json!({"type": "image", "image": {"id": "MEDIA"}}), None),
            (json!({"type": "audio", "audio": {"id": "MEDIA", "voice": true}}), None),
            (json!({"type": "sticker", "sticker": {"id": "MEDIA"}}), None),
            (json!({"type": "location", "location": {"latitude": 48.8, "longitude": 2.3}}), None),
            (json!({"type": "contacts", "contacts": [{"name": {"formatted_name": "A"}}]}), None),
            (json!({"type": "reaction", "reaction": {"message_id": "wamid.X", "emoji": "👍"}}), None),
            (json!({"type": "unsupported", "errors": [{"code": 131051}]}), None),
            (json!({"type": "text", "text": {"body": ""}}), None),
        ];
        for (mut msg, text) in cases {
            let ty = msg["type"].as_str().unwrap_or_default().to_owned();
            msg["from"] = json!("15559876543");
            msg["id"] = json!(format!("wamid.{ty}"));
            let m = only_message(msg);
            assert_eq!(m.message_type, ty);
            assert_eq!(m.text.as_deref(), text, "type {ty}");
        }
    }

    #[test]
    fn three_messages_in_two_entries_are_three_events_in_body_order() {
        let raw = json!({"object": "whatsapp_business_account", "entry": [
            {"id": "A", "changes": [{"field": "messages", "value": {"metadata": {"phone_number_id": "P1"}, "messages": [
                {"from": "33600000001", "id": "wamid.1", "type": "text", "text": {"body": "one"}},
                {"from": "33600000002", "id": "wamid.2", "type": "text", "text": {"body": "two"}}
            ]}}]},
            {"id": "B", "changes": [{"field": "messages", "value": {"metadata": {"phone_number_id": "P2"}, "messages": [
                {"from": "33600000003", "id": "wamid.3", "type": "text", "text": {"body": "three"}}
            ]}}]}
        ]});
        let parsed = parse_webhook(raw.to_string().as_bytes(), now()).unwrap();
        let ids: Vec<(&str, &str)> =
            parsed.messages().map(|m| (m.phone_number_id.as_str(), m.provider_message_id.as_str())).collect();
        assert_eq!(ids, [("P1", "wamid.1"), ("P1", "wamid.2"), ("P2", "wamid.3")]);
    }

    #[test]
    fn statuses_become_status_events_with_their_error() {
        let raw = body(json!([{"field": "messages", "value": {"metadata": {"phone_number_id": "PNID"}, "statuses": [
            {"id": "wamid.out1", "status": "delivered", "timestamp": "1700000001", "recipient_id": "15559876543"},
            {"id": "wamid.out2", "status": "failed", "timestamp": 1_700_000_002, "recipient_id": "15559876543",
             "errors": [{"code": 131047, "title": "Re-engagement message"}]}
        ]}}]));
        let parsed = parse_webhook(&raw, now()).unwrap();
        assert_eq!(parsed.messages().count(), 0);
        let statuses: Vec<StatusEvent> = parsed
            .events
            .into_iter()
            .filter_map(|e| if let QueuedEvent::Status(s) = e { Some(s) } else { None })
            .collect();
        assert_eq!(statuses.len(), 2);
        assert_eq!(statuses[0].status, "delivered");
        assert_eq!(statuses[0].recipient.as_deref(), Some("15559876543"));
        assert_eq!(statuses[0].timestamp, 1_700_000_001);
        assert_eq!(statuses[1].error_code.as_deref(), Some("131047"));
        assert_eq!(statuses[1].error_title.as_deref(), Some("Re-engagement message"));
        assert_eq!(statuses[1].timestamp, 1_700_000_002);
    }

    #[test]
    fn a_malformed_message_is_skipped_with_its_location_and_the_others_kept() {
        let raw = body(change_with_messages(json!([
            {"from": "15559876543", "id": "wamid.ok1", "type": "text", "text": {"body": "a"}},
            {"from": "15559876543", "type": "text", "text": {"body": "no id"}},
            {"id": "wamid.nofrom", "type": "text", "text": {"body": "no from"}},
            "not an object",
            {"from": "15559876543", "id": "wamid.ok2", "type": "text", "text": {"body": "b"}}
        ])));
        let parsed = parse_webhook(&raw, now()).unwrap();
        let ids: Vec<&str> = parsed.messages().map(|m| m.provider_message_id.as_str()).collect();
        assert_eq!(ids, ["wamid.ok1", "wamid.ok2"]);
        let skipped: Vec<(String, &str)> = parsed.skipped.iter().map(|s| (s.location.clone(), s.reason)).collect();
        assert_eq!(
            skipped,
            [
                ("entry[0].changes[0].value.messages[1]".to_owned(), "missing id"),
                ("entry[0].changes[0].value.messages[2]".to_owned(), "missing from"),
                ("entry[0].changes[0].value.messages[3]".to_owned(), "not an object"),
            ]
        );
    }

    #[test]
    fn changes_of_other_fields_are_ignored() {
        let raw = body(json!([
            {"field": "account_update", "value": {"event": "VERIFIED_ACCOUNT"}},
            {"field": "messages", "value": {"messages": [{"from": "15559876543", "id": "wamid.1", "type": "text", "text": {"body": "hi"}}]}}
        ]));
        let parsed = parse_webhook(&raw, now()).unwrap();
        assert_eq!(parsed.ignored_changes, 1);
        assert_eq!(parsed.events.len(), 1);
    }

    #[test]
    fn a_body_without_metadata_or_timestamp_still_yields_its_message() {
        // The checklist's curl example: no metadata, no timestamp, no contacts.
        let raw = br#"{"object":"whatsapp_business_account","entry":[{"changes":[{"field":"messages","value":{"messages":[{"from":"33612345678","id":"wamid.test","type":"text","text":{"body":"Test GO-LIVE"}}]}}]}]}"#;
        let parsed = parse_webhook(raw, now()).unwrap();
        let m = parsed.messages().next().cloned().unwrap();
        assert_eq!(m.phone_number_id, "");
        assert_eq!(m.timestamp, now().timestamp());
        assert_eq!(m.contact_name, None);
        assert_eq!(m.text.as_deref(), Some("Test GO-LIVE"));
    }

    #[test]
    fn bodies_that_are_not_webhooks_are_refused_with_a_reason() {
        let cases: [(&[u8], PayloadError); 6] = [
            (b"not json at all", PayloadError::InvalidJson),
            (b"{\"object\": ", PayloadError::InvalidJson),
            (b"[1, 2]", PayloadError::NotAnObject),
            (br#"{"entry": []}"#, PayloadError::MissingObject),
            (br#"{"object": "whatsapp_business_account"}"#, PayloadError::MissingEntry),
            (br#"{"object": "whatsapp_business_account", "entry": {}}"#, PayloadError::MissingEntry),
        ];
        for (raw, expected) in cases {
            assert_eq!(parse_webhook(raw, now()), Err(expected));
        }
    }
}
