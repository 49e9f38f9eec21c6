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

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::queue::{InboundMessageEvent, QueuedEvent, RawJson, StatusEvent};

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
///
/// The body is read in place: each level is a small struct of borrowed raw values, so nothing is
/// built as a tree and a message object is copied once, as text, into its event (this parsing was
/// an eighth of the webhook's CPU as a `serde_json::Value` tree, BENCHMARKS.md). An object with a
/// key twice is read as malformed at its level (the body, or the one item).
pub fn parse_webhook(body: &[u8], received_at: DateTime<Utc>) -> Result<ParsedWebhook, PayloadError> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            Ok(_) => PayloadError::NotAnObject,
            Err(_) => PayloadError::InvalidJson,
        });
    }
    // Reading the root checks that the whole body is JSON (nesting bounded, nothing after it).
    let root: Root = serde_json::from_slice(body).map_err(|_| PayloadError::InvalidJson)?;
    if root.object.and_then(text).is_none() {
        return Err(PayloadError::MissingObject);
    }
    let Some(entries) = root.entry.and_then(array) else {
        return Err(PayloadError::MissingEntry);
    };

    let mut parsed = ParsedWebhook::default();
    for (e, entry) in entries.iter().enumerate() {
        let Some(entry) = object::<Entry>(entry) else {
            parsed.skip(format!("entry[{e}]"), "not an object");
            continue;
        };
        let Some(changes) = entry.changes.and_then(array) else {
            continue;
        };
        for (c, change) in changes.iter().enumerate() {
            let here = format!("entry[{e}].changes[{c}]");
            let Some(change) = object::<Change>(change) else {
                parsed.skip(here, "not an object");
                continue;
            };
            if change.field.and_then(text).as_deref() != Some("messages") {
                parsed.ignored_changes += 1;
                continue;
            }
            let Some(value) = change.value.and_then(object::<ChangeValue>) else {
                parsed.skip(format!("{here}.value"), "missing or not an object");
                continue;
            };
            parsed.change(&here, &value, received_at);
        }
    }
    Ok(parsed)
}

/// The levels of a body that are looked at; every other key is skipped unread.
#[derive(Deserialize)]
struct Root<'a> {
    #[serde(borrow)]
    object: Option<&'a RawValue>,
    #[serde(borrow)]
    entry: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Entry<'a> {
    #[serde(borrow)]
    changes: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Change<'a> {
    #[serde(borrow)]
    field: Option<&'a RawValue>,
    #[serde(borrow)]
    value: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChangeValue<'a> {
    #[serde(borrow)]
    metadata: Option<&'a RawValue>,
    #[serde(borrow)]
    contacts: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    statuses: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Metadata<'a> {
    #[serde(borrow)]
    phone_number_id: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Contact<'a> {
    #[serde(borrow)]
    wa_id: Option<&'a RawValue>,
    #[serde(borrow)]
    profile: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Profile<'a> {
    #[serde(borrow)]
    name: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct MessageFields<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    from: Option<&'a RawValue>,
    #[serde(borrow, rename = "type")]
    message_type: Option<&'a RawValue>,
    #[serde(borrow)]
    timestamp: Option<&'a RawValue>,
    #[serde(borrow)]
    text: Option<&'a RawValue>,
    #[serde(borrow)]
    interactive: Option<&'a RawValue>,
    #[serde(borrow)]
    button: Option<&'a RawValue>,
    #[serde(borrow)]
    image: Option<&'a RawValue>,
    #[serde(borrow)]
    video: Option<&'a RawValue>,
    #[serde(borrow)]
    document: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct StatusFields<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    status: Option<&'a RawValue>,
    #[serde(borrow)]
    recipient_id: Option<&'a RawValue>,
    #[serde(borrow)]
    timestamp: Option<&'a RawValue>,
    #[serde(borrow)]
    errors: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ErrorFields<'a> {
    #[serde(borrow)]
    code: Option<&'a RawValue>,
    #[serde(borrow)]
    title: Option<&'a RawValue>,
}

/// The members of the nested objects a message's text is read from.
#[derive(Deserialize)]
struct Nested<'a> {
    #[serde(borrow)]
    body: Option<&'a RawValue>,
    #[serde(borrow)]
    button_reply: Option<&'a RawValue>,
    #[serde(borrow)]
    list_reply: Option<&'a RawValue>,
    #[serde(borrow)]
    title: Option<&'a RawValue>,
    #[serde(borrow)]
    text: Option<&'a RawValue>,
    #[serde(borrow)]
    caption: Option<&'a RawValue>,
}

fn first_byte(raw: &RawValue) -> u8 {
    // A RawValue holds no leading whitespace.
    raw.get().as_bytes().first().copied().unwrap_or_default()
}

fn is_object(raw: &RawValue) -> bool {
    first_byte(raw) == b'{'
}

/// `raw` read as `T` if it is an object (that `T` can read: no key twice).
fn object<'a, T: Deserialize<'a>>(raw: &'a RawValue) -> Option<T> {
    if !is_object(raw) {
        return None;
    }
    serde_json::from_str(raw.get()).ok()
}

fn array(raw: &RawValue) -> Option<Vec<&RawValue>> {
    if first_byte(raw) != b'[' {
        return None;
    }
    serde_json::from_str(raw.get()).ok()
}

/// A JSON string's text (borrowed when it holds no escape).
fn text(raw: &RawValue) -> Option<Cow<'_, str>> {
    if first_byte(raw) != b'"' {
        return None;
    }
    match serde_json::from_str::<&str>(raw.get()) {
        Ok(borrowed) => Some(Cow::Borrowed(borrowed)),
        Err(_) => serde_json::from_str::<String>(raw.get()).ok().map(Cow::Owned),
    }
}

/// A string that is not blank.
fn non_empty(raw: Option<&RawValue>) -> Option<Cow<'_, str>> {
    raw.and_then(text).filter(|s| !s.trim().is_empty())
}

impl ParsedWebhook {
    fn skip(&mut self, location: String, reason: &'static str) {
        self.skipped.push(SkippedItem { location, reason });
    }

    fn change(&mut self, here: &str, value: &ChangeValue<'_>, received_at: DateTime<Utc>) {
        // A body without metadata (hand-written test bodies, like the checklist's curl examples)
        // yields an empty business number: the worker's channel resolution decides what it means.
        let phone_number_id = value
            .metadata
            .and_then(object::<Metadata>)
            .and_then(|m| m.phone_number_id)
            .and_then(text)
            .unwrap_or_default();
        let contacts = value.contacts.and_then(array).unwrap_or_default();

        for (i, msg) in value.messages.and_then(array).into_iter().flatten().enumerate() {
            match message(&phone_number_id, &contacts, msg, received_at) {
                Ok(event) => self.events.push(QueuedEvent::Message(event)),
                Err(reason) => self.skip(format!("{here}.value.messages[{i}]"), reason),
            }
        }
        for (i, st) in value.statuses.and_then(array).into_iter().flatten().enumerate() {
            match status(&phone_number_id, st, received_at) {
                Ok(event) => self.events.push(QueuedEvent::Status(event)),
                Err(reason) => self.skip(format!("{here}.value.statuses[{i}]"), reason),
            }
        }
    }
}

fn message(
    phone_number_id: &str,
    contacts: &[&RawValue],
    raw: &RawValue,
    received_at: DateTime<Utc>,
) -> Result<InboundMessageEvent, &'static str> {
    let fields = object::<MessageFields>(raw).ok_or("not an object")?;
    let id = non_empty(fields.id).ok_or("missing id")?;
    let from = non_empty(fields.from).ok_or("missing from")?;
    let message_type = non_empty(fields.message_type).unwrap_or(Cow::Borrowed("unknown"));
    let text = message_text(&message_type, &fields).filter(|t| !t.is_empty()).map(Cow::into_owned);
    Ok(InboundMessageEvent {
        phone_number_id: phone_number_id.to_owned(),
        provider_message_id: id.into_owned(),
        contact_name: contact_name(contacts, &from),
        from: from.into_owned(),
        timestamp: fields.timestamp.and_then(timestamp).unwrap_or_else(|| received_at.timestamp()),
        message_type: message_type.into_owned(),
        text,
        received_at,
        raw: RawJson::from_raw(raw),
    })
}

/// The text a message carries, by type: what the user typed, the title of the button or list row
/// they picked, or the caption of their media. Other types (audio, sticker, location, contacts,
/// reaction, unsupported…) carry none.
fn message_text<'a>(message_type: &str, fields: &MessageFields<'a>) -> Option<Cow<'a, str>> {
    let nested = |raw: Option<&'a RawValue>| raw.and_then(object::<Nested<'a>>);
    match message_type {
        "text" => nested(fields.text)?.body.and_then(text),
        "interactive" => {
            let interactive = nested(fields.interactive)?;
            let title = |reply: Option<&'a RawValue>| nested(reply).and_then(|r| r.title).and_then(text);
            title(interactive.button_reply).or_else(|| title(interactive.list_reply))
        }
        "button" => nested(fields.button)?.text.and_then(text),
        "image" => nested(fields.image)?.caption.and_then(text),
        "video" => nested(fields.video)?.caption.and_then(text),
        "document" => nested(fields.document)?.caption.and_then(text),
        _ => None,
    }
}

fn contact_name(contacts: &[&RawValue], from: &str) -> Option<String> {
    let read: Vec<Contact> = contacts.iter().filter_map(|c| object::<Contact>(c)).collect();
    let by_id = read.iter().find(|c| c.wa_id.and_then(text).as_deref() == Some(from));
    // A lone contact without `wa_id` can only be the sender.
    let contact = by_id.or_else(|| match (contacts, read.as_slice()) {
        ([_], [only]) if only.wa_id.is_none() => Some(only),
        _ => None,
    })?;
    non_empty(contact.profile.and_then(object::<Profile>)?.name).map(Cow::into_owned)
}

fn status(phone_number_id: &str, raw: &RawValue, received_at: DateTime<Utc>) -> Result<StatusEvent, &'static str> {
    let fields = object::<StatusFields>(raw).ok_or("not an object")?;
    let id = non_empty(fields.id).ok_or("missing id")?;
    let status = non_empty(fields.status).ok_or("missing status")?;
    let first_error =
        fields.errors.and_then(array).and_then(|errors| errors.first().copied()).and_then(object::<ErrorFields>);
    Ok(StatusEvent {
        phone_number_id: phone_number_id.to_owned(),
        provider_message_id: id.into_owned(),
        status: status.into_owned(),
        recipient: non_empty(fields.recipient_id).map(Cow::into_owned),
        timestamp: fields.timestamp.and_then(timestamp).unwrap_or_else(|| received_at.timestamp()),
        error_code: first_error.as_ref().and_then(|e| e.code).and_then(scalar_text),
        error_title: first_error.as_ref().and_then(|e| non_empty(e.title)).map(Cow::into_owned),
    })
}

/// Meta sends Unix seconds as a string; accept a number too.
fn timestamp(raw: &RawValue) -> Option<i64> {
    match first_byte(raw) {
        b'"' => text(raw)?.trim().parse().ok(),
        _ => serde_json::from_str::<i64>(raw.get()).ok(),
    }
}

/// A non-empty string, or a number written as JSON wrote it.
fn scalar_text(raw: &RawValue) -> Option<String> {
    match first_byte(raw) {
        b'"' => text(raw).filter(|s| !s.is_empty()).map(Cow::into_owned),
        b'-' | b'0'..=b'9' => Some(raw.get().to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

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
        assert_eq!(m.raw.value()["text"]["body"], "Hello!");
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
    fn escaped_strings_are_read_as_their_text_and_the_raw_object_is_kept_as_sent() {
        let raw = br#"{"object":"whatsapp_business_account","entry":[{"changes":[{"field":"mess\u0061ges","value":{
            "metadata":{"phone_number_id":"P\u004eID"},
            "contacts":[{"profile":{"name":"Jos\u00e9 \"Pepe\""}}],
            "messages":[{"from":"15559876543","id":"wamid.\"q\"","timestamp":1700000000,"type":"text",
                         "text":{"body":"Bonjour \"ami\"\n\u00e9t\u00e9 \ud83d\ude00"}}]}}]}]}"#;
        let parsed = parse_webhook(raw, now()).unwrap();
        let m = parsed.messages().next().cloned().unwrap();
        assert_eq!(m.phone_number_id, "PNID");
        assert_eq!(m.provider_message_id, "wamid.\"q\"");
        assert_eq!(m.contact_name.as_deref(), Some("José \"Pepe\""), "a lone contact without wa_id is the sender");
        assert_eq!(m.timestamp, 1_700_000_000);
        assert_eq!(m.text.as_deref(), Some("Bonjour \"ami\"\nété 😀"));
        assert!(m.raw.get().starts_with(r#"{"from":"15559876543","id":"wamid.\"q\"""#), "{}", m.raw.get());
        assert_eq!(m.raw.value()["text"]["body"], "Bonjour \"ami\"\nété 😀");
    }

    #[test]
    fn an_item_with_a_key_twice_is_skipped_and_values_of_the_wrong_type_are_ignored() {
        let raw = body(change_with_messages(json!([
            {"from": "15559876543", "id": "wamid.ok", "type": "text", "text": {"body": 42}, "timestamp": {"x": 1}}
        ])));
        let parsed = parse_webhook(&raw, now()).unwrap();
        let m = parsed.messages().next().cloned().unwrap();
        assert_eq!((m.text, m.timestamp), (None, now().timestamp()));

        let raw = br#"{"object":"x","entry":[{"changes":[{"field":"messages","value":{"messages":[
            {"from":"15559876543","id":"wamid.1","id":"wamid.2","type":"text","text":{"body":"a"}},
            {"from":"15559876543","id":"wamid.3","type":"text","text":{"body":"b"}}]}}]}]}"#;
        let parsed = parse_webhook(raw, now()).unwrap();
        let ids: Vec<&str> = parsed.messages().map(|m| m.provider_message_id.as_str()).collect();
        assert_eq!(ids, ["wamid.3"]);
        assert_eq!(parsed.skipped[0].location, "entry[0].changes[0].value.messages[0]");
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
