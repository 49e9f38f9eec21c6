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

use std::{borrow::Cow, fmt, marker::PhantomData};

use chrono::{DateTime, Utc};
use serde::{
    Deserialize, Deserializer,
    de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor},
};
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
/// One pass over the body, in place: each level is a struct of borrowed strings whose every
/// member accepts a value of any type (a member of an unexpected type reads as absent, an item that
/// is not an object as "not an object"), so nothing is built as a tree; a message object is read a
/// second time, from its raw text, which is copied as it came into its event. As a
/// `serde_json::Value` tree this parsing was an eighth of the webhook's CPU (BENCHMARKS.md). An
/// object with a key twice makes the body malformed (400).
pub fn parse_webhook(body: &[u8], received_at: DateTime<Utc>) -> Result<ParsedWebhook, PayloadError> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(match serde_json::from_slice::<IgnoredAny>(body) {
            Ok(_) => PayloadError::NotAnObject,
            Err(_) => PayloadError::InvalidJson,
        });
    }
    // Reading the root checks that the whole body is JSON (nesting bounded, nothing after it).
    let root: Root = serde_json::from_slice(body).map_err(|_| PayloadError::InvalidJson)?;
    if root.object.0.is_none() {
        return Err(PayloadError::MissingObject);
    }
    let Some(entries) = root.entry.0 else {
        return Err(PayloadError::MissingEntry);
    };

    let mut parsed = ParsedWebhook::default();
    for (e, entry) in entries.into_iter().enumerate() {
        let Some(entry) = entry.0 else {
            parsed.skip(format!("entry[{e}]"), "not an object");
            continue;
        };
        let Some(changes) = entry.changes.0 else {
            continue;
        };
        for (c, change) in changes.into_iter().enumerate() {
            // Written only for an item that is skipped.
            let here = ChangeAt(e, c);
            let Some(change) = change.0 else {
                parsed.skip(here.to_string(), "not an object");
                continue;
            };
            if change.field.0.as_deref() != Some("messages") {
                parsed.ignored_changes += 1;
                continue;
            }
            let Some(value) = change.value.0 else {
                parsed.skip(format!("{here}.value"), "missing or not an object");
                continue;
            };
            parsed.change(here, value, received_at);
        }
    }
    Ok(parsed)
}

/// A member read whatever its JSON type: `Some` when it is the expected type, `None` otherwise
/// (the value is skipped). Absent members are `None` too (`#[serde(default)]`).
#[derive(Debug)]
struct Lenient<T>(Option<T>);

impl<T> Default for Lenient<T> {
    fn default() -> Self {
        Self(None)
    }
}

/// What a [`Lenient`] member can be: an object (a struct of lenient members), an array, a string.
trait Shape<'de>: Sized {
    fn from_map<A: MapAccess<'de>>(_map: A) -> Result<Option<Self>, A::Error> {
        Ok(None)
    }
    fn from_seq<A: SeqAccess<'de>>(_seq: A) -> Result<Option<Self>, A::Error> {
        Ok(None)
    }
    fn from_str(_s: Cow<'de, str>) -> Option<Self> {
        None
    }
}

impl<'de, T: Shape<'de>> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Any<T>(PhantomData<T>);
        impl<'de, T: Shape<'de>> Visitor<'de> for Any<T> {
            type Value = Lenient<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                // `from_map` reads the whole map or nothing; drain what it left.
                let read = T::from_map(&mut map)?;
                if read.is_none() {
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                }
                Ok(Lenient(read))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let read = T::from_seq(&mut seq)?;
                if read.is_none() {
                    while seq.next_element::<IgnoredAny>()?.is_some() {}
                }
                Ok(Lenient(read))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Lenient(T::from_str(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Lenient(T::from_str(Cow::Owned(v.to_owned()))))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
        }
        deserializer.deserialize_any(Any(PhantomData))
    }
}

impl<'de: 'a, 'a> Shape<'de> for Cow<'a, str> {
    fn from_str(s: Cow<'de, str>) -> Option<Self> {
        Some(s)
    }
}

impl<'de, T: Deserialize<'de>> Shape<'de> for Vec<T> {
    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Option<Self>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Some(items))
    }
}

/// The objects of a body: structs whose members are all lenient, read from a map.
macro_rules! lenient_object {
    ($($name:ident),* $(,)?) => {$(
        impl<'de: 'a, 'a> Shape<'de> for $name<'a> {
            fn from_map<A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
                Self::deserialize(de::value::MapAccessDeserializer::new(map)).map(Some)
            }
        }
    )*};
}
lenient_object!(Entry, Change, ChangeValue, Metadata, Contact, Profile, StatusFields, ErrorFields, Nested, Interactive);

type Text<'a> = Lenient<Cow<'a, str>>;
type List<T> = Lenient<Vec<T>>;

/// The levels of a body that are looked at; every other key is skipped unread.
#[derive(Deserialize)]
struct Root<'a> {
    #[serde(borrow, default)]
    object: Text<'a>,
    #[serde(borrow, default)]
    entry: List<Lenient<Entry<'a>>>,
}

#[derive(Deserialize)]
struct Entry<'a> {
    #[serde(borrow, default)]
    changes: List<Lenient<Change<'a>>>,
}

#[derive(Deserialize)]
struct Change<'a> {
    #[serde(borrow, default)]
    field: Text<'a>,
    #[serde(borrow, default)]
    value: Lenient<ChangeValue<'a>>,
}

#[derive(Deserialize)]
struct ChangeValue<'a> {
    #[serde(borrow, default)]
    metadata: Lenient<Metadata<'a>>,
    #[serde(borrow, default)]
    contacts: List<Lenient<Contact<'a>>>,
    /// Kept as text: each is read on its own (and copied into its event as it came).
    #[serde(borrow, default)]
    messages: List<&'a RawValue>,
    #[serde(borrow, default)]
    statuses: List<Lenient<StatusFields<'a>>>,
}

#[derive(Deserialize)]
struct Metadata<'a> {
    #[serde(borrow, default)]
    phone_number_id: Text<'a>,
}

#[derive(Deserialize)]
struct Contact<'a> {
    #[serde(borrow, default)]
    wa_id: Text<'a>,
    #[serde(borrow, default)]
    profile: Lenient<Profile<'a>>,
}

#[derive(Deserialize)]
struct Profile<'a> {
    #[serde(borrow, default)]
    name: Text<'a>,
}

#[derive(Deserialize)]
struct MessageFields<'a> {
    #[serde(borrow, default)]
    id: Text<'a>,
    #[serde(borrow, default)]
    from: Text<'a>,
    #[serde(borrow, default, rename = "type")]
    message_type: Text<'a>,
    #[serde(borrow, default)]
    timestamp: Option<&'a RawValue>,
    #[serde(borrow, default)]
    text: Lenient<Nested<'a>>,
    #[serde(borrow, default)]
    interactive: Lenient<Interactive<'a>>,
    #[serde(borrow, default)]
    button: Lenient<Nested<'a>>,
    #[serde(borrow, default)]
    image: Lenient<Nested<'a>>,
    #[serde(borrow, default)]
    video: Lenient<Nested<'a>>,
    #[serde(borrow, default)]
    document: Lenient<Nested<'a>>,
}

#[derive(Deserialize)]
struct StatusFields<'a> {
    #[serde(borrow, default)]
    id: Text<'a>,
    #[serde(borrow, default)]
    status: Text<'a>,
    #[serde(borrow, default)]
    recipient_id: Text<'a>,
    #[serde(borrow, default)]
    timestamp: Option<&'a RawValue>,
    #[serde(borrow, default)]
    errors: List<Lenient<ErrorFields<'a>>>,
}

#[derive(Deserialize)]
struct ErrorFields<'a> {
    #[serde(borrow, default)]
    code: Option<&'a RawValue>,
    #[serde(borrow, default)]
    title: Text<'a>,
}

#[derive(Deserialize)]
struct Interactive<'a> {
    #[serde(borrow, default)]
    button_reply: Lenient<Nested<'a>>,
    #[serde(borrow, default)]
    list_reply: Lenient<Nested<'a>>,
}

/// The members of the nested objects a message's text is read from.
#[derive(Deserialize)]
struct Nested<'a> {
    #[serde(borrow, default)]
    body: Text<'a>,
    #[serde(borrow, default)]
    title: Text<'a>,
    #[serde(borrow, default)]
    text: Text<'a>,
    #[serde(borrow, default)]
    caption: Text<'a>,
}

/// Where a change is in the body: `entry[e].changes[c]`.
#[derive(Clone, Copy)]
struct ChangeAt(usize, usize);

impl fmt::Display for ChangeAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "entry[{}].changes[{}]", self.0, self.1)
    }
}

fn first_byte(raw: &RawValue) -> u8 {
    // A RawValue holds no leading whitespace.
    raw.get().as_bytes().first().copied().unwrap_or_default()
}

/// A string that is not blank.
fn non_empty<'a>(text: &'a Text<'_>) -> Option<&'a str> {
    text.0.as_deref().filter(|s| !s.trim().is_empty())
}

impl ParsedWebhook {
    fn skip(&mut self, location: String, reason: &'static str) {
        self.skipped.push(SkippedItem { location, reason });
    }

    fn change(&mut self, here: ChangeAt, value: ChangeValue<'_>, received_at: DateTime<Utc>) {
        // A body without metadata (hand-written test bodies, like the checklist's curl examples)
        // yields an empty business number: the worker's channel resolution decides what it means.
        let phone_number_id = value.metadata.0.and_then(|m| m.phone_number_id.0).unwrap_or_default();
        let contacts = value.contacts.0.unwrap_or_default();

        for (i, msg) in value.messages.0.into_iter().flatten().enumerate() {
            match message(&phone_number_id, &contacts, msg, received_at) {
                Ok(event) => self.events.push(QueuedEvent::Message(event)),
                Err(reason) => self.skip(format!("{here}.value.messages[{i}]"), reason),
            }
        }
        for (i, st) in value.statuses.0.into_iter().flatten().enumerate() {
            match status(&phone_number_id, st, received_at) {
                Ok(event) => self.events.push(QueuedEvent::Status(event)),
                Err(reason) => self.skip(format!("{here}.value.statuses[{i}]"), reason),
            }
        }
    }
}

fn message(
    phone_number_id: &str,
    contacts: &[Lenient<Contact<'_>>],
    raw: &RawValue,
    received_at: DateTime<Utc>,
) -> Result<InboundMessageEvent, &'static str> {
    if first_byte(raw) != b'{' {
        return Err("not an object");
    }
    // A key twice in the message: malformed, skipped.
    let fields: MessageFields = serde_json::from_str(raw.get()).map_err(|_| "not an object")?;
    let id = non_empty(&fields.id).ok_or("missing id")?;
    let from = non_empty(&fields.from).ok_or("missing from")?;
    let message_type = non_empty(&fields.message_type).unwrap_or("unknown");
    let text = message_text(message_type, &fields).filter(|t| !t.is_empty()).map(str::to_owned);
    Ok(InboundMessageEvent {
        phone_number_id: phone_number_id.to_owned(),
        provider_message_id: id.to_owned(),
        contact_name: contact_name(contacts, from),
        from: from.to_owned(),
        timestamp: fields.timestamp.and_then(timestamp).unwrap_or_else(|| received_at.timestamp()),
        message_type: message_type.to_owned(),
        text,
        received_at,
        raw: RawJson::from_raw(raw),
    })
}

/// The text a message carries, by type: what the user typed, the title of the button or list row
/// they picked, or the caption of their media. Other types (audio, sticker, location, contacts,
/// reaction, unsupported…) carry none.
fn message_text<'f>(message_type: &str, fields: &'f MessageFields<'_>) -> Option<&'f str> {
    let member = |nested: &'f Lenient<Nested<'_>>, pick: fn(&'f Nested<'_>) -> &'f Text<'f>| {
        nested.0.as_ref().and_then(|n| pick(n).0.as_deref())
    };
    match message_type {
        "text" => member(&fields.text, |n| &n.body),
        "interactive" => fields
            .interactive
            .0
            .as_ref()
            .and_then(|i| member(&i.button_reply, |n| &n.title).or_else(|| member(&i.list_reply, |n| &n.title))),
        "button" => member(&fields.button, |n| &n.text),
        "image" => member(&fields.image, |n| &n.caption),
        "video" => member(&fields.video, |n| &n.caption),
        "document" => member(&fields.document, |n| &n.caption),
        _ => None,
    }
}

fn contact_name(contacts: &[Lenient<Contact<'_>>], from: &str) -> Option<String> {
    let by_id = contacts.iter().filter_map(|c| c.0.as_ref()).find(|c| c.wa_id.0.as_deref() == Some(from));
    // A lone contact without `wa_id` can only be the sender.
    let contact = by_id.or_else(|| match contacts {
        [Lenient(Some(only))] if only.wa_id.0.is_none() => Some(only),
        _ => None,
    })?;
    non_empty(&contact.profile.0.as_ref()?.name).map(str::to_owned)
}

fn status(
    phone_number_id: &str,
    fields: Lenient<StatusFields<'_>>,
    received_at: DateTime<Utc>,
) -> Result<StatusEvent, &'static str> {
    let fields = fields.0.ok_or("not an object")?;
    let id = non_empty(&fields.id).ok_or("missing id")?;
    let status = non_empty(&fields.status).ok_or("missing status")?;
    let first_error = fields.errors.0.as_ref().and_then(|errors| errors.first()).and_then(|e| e.0.as_ref());
    Ok(StatusEvent {
        phone_number_id: phone_number_id.to_owned(),
        provider_message_id: id.to_owned(),
        status: status.to_owned(),
        recipient: non_empty(&fields.recipient_id).map(str::to_owned),
        timestamp: fields.timestamp.and_then(timestamp).unwrap_or_else(|| received_at.timestamp()),
        error_code: first_error.and_then(|e| e.code).and_then(scalar_text),
        error_title: first_error.and_then(|e| non_empty(&e.title)).map(str::to_owned),
    })
}

/// Meta sends Unix seconds as a string; accept a number too.
fn timestamp(raw: &RawValue) -> Option<i64> {
    match first_byte(raw) {
        b'"' => serde_json::from_str::<Cow<str>>(raw.get()).ok()?.trim().parse().ok(),
        _ => serde_json::from_str::<i64>(raw.get()).ok(),
    }
}

/// A non-empty string, or a number written as JSON wrote it.
fn scalar_text(raw: &RawValue) -> Option<String> {
    match first_byte(raw) {
        b'"' => serde_json::from_str::<String>(raw.get()).ok().filter(|s| !s.is_empty()),
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
    fn members_of_unexpected_types_are_skipped_or_ignored_in_place_and_the_good_items_kept() {
        let raw = json!({"object": "whatsapp_business_account", "entry": [
            "not an entry",
            {"changes": "not a list"},
            {"changes": [
                42,
                {"field": 7, "value": {"messages": "x"}},
                {"field": "messages", "value": "not an object"},
                {"field": "messages", "value": {
                    "metadata": {"phone_number_id": 123},
                    "contacts": "nobody",
                    "messages": [{"from": "15559876543", "id": "wamid.kept", "type": "text", "text": "flat"}],
                    "statuses": [[1], {"id": "wamid.out", "status": "failed", "errors": {"code": 1}}]
                }}
            ]}
        ]});
        let parsed = parse_webhook(raw.to_string().as_bytes(), now()).unwrap();
        let m = parsed.messages().next().cloned().unwrap();
        assert_eq!((m.phone_number_id.as_str(), m.provider_message_id.as_str()), ("", "wamid.kept"));
        assert_eq!((m.text, m.contact_name), (None, None));
        let statuses: Vec<_> = parsed.events.iter().filter(|e| matches!(e, QueuedEvent::Status(_))).collect();
        assert_eq!(statuses.len(), 1);
        assert_eq!(parsed.ignored_changes, 1);
        let skipped: Vec<(&str, &str)> = parsed.skipped.iter().map(|s| (s.location.as_str(), s.reason)).collect();
        assert_eq!(
            skipped,
            [
                ("entry[0]", "not an object"),
                ("entry[2].changes[0]", "not an object"),
                ("entry[2].changes[2].value", "missing or not an object"),
                ("entry[2].changes[3].value.statuses[0]", "not an object"),
            ]
        );
        // A key twice in the envelope: the body is malformed.
        assert_eq!(parse_webhook(br#"{"object":"x","entry":[],"entry":[]}"#, now()), Err(PayloadError::InvalidJson));
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
