//! What the worker does with an inbound message that carries a file (image, voice message, video,
//! document, sticker): fetches it through the provider's [`MediaSource`], keeps it in object
//! storage under `media/<tenant>/<provider message id>`, records it on the message row, and says
//! what text the pipeline answers — the caption, else a placeholder such as
//! `[The user sent a voice message]`, so that the user gets an answer.
//!
//! A transient failure (provider or storage unreachable, throttled) retries the job, except on its
//! last attempt; any other failure (too large, refused, checksum) is logged as
//! `media_fetch_failed` and the message is answered with a note that the file could not be read.
//! Stickers are fetched and kept like the rest but not answered: like a reaction (ignored too), a
//! sticker usually closes or punctuates a conversation, and answering each one would spam the user.

use engine::{
    events::{Event, EventSink, names},
    masking::mask_phone,
};

use super::media::{FetchedMedia, MediaError, MediaKind, MediaSource};
use crate::{
    knowledge::{ObjectStorage, StorageError},
    queue::InboundMessageEvent,
    store::{ChannelContext, PgStore, StoredMedia},
};

/// The longest document name quoted to the LLM.
const MAX_FILENAME_CHARS: usize = 120;

/// What the worker does next with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaTurn {
    /// Not a media message: handled as before (its text, or ignored without one).
    NotMedia,
    /// Run the pipeline with this text.
    Answer(String),
    /// Recorded, not answered (stickers).
    Unanswered,
    /// A transient failure: try the job again later.
    Retry(String),
}

/// The parts the worker lends for one media message.
pub struct MediaIntake<'a> {
    /// `None` with the sandbox, which has no media API: the placeholder is answered at once.
    pub source: Option<&'a dyn MediaSource>,
    pub storage: &'a dyn ObjectStorage,
    pub store: &'a PgStore,
    pub events: &'a dyn EventSink,
}

impl MediaIntake<'_> {
    /// Fetches and keeps the file of `event`, if it has one, and says what to answer.
    /// `correlate` adds the job's identifying fields to the events; on the `last_attempt` a
    /// transient failure no longer retries: the user is answered without the file.
    pub async fn receive(
        &self,
        ctx: &ChannelContext,
        event: &InboundMessageEvent,
        last_attempt: bool,
        correlate: &(dyn Fn(Event) -> Event + Sync),
    ) -> MediaTurn {
        let Some(kind) = MediaKind::from_message_type(&event.message_type) else { return MediaTurn::NotMedia };
        let raw = event.raw.value();
        let object = &raw[kind.as_str()];
        let said = event.text.clone().filter(|t| !t.trim().is_empty()).unwrap_or_else(|| placeholder(kind, object));
        let answer =
            |text: String| if kind == MediaKind::Sticker { MediaTurn::Unanswered } else { MediaTurn::Answer(text) };
        let Some(source) = self.source else { return answer(said) };

        let media_id = object["id"].as_str().map(str::trim).unwrap_or_default();
        let channel = ctx.channel.id.as_str();
        let wamid = event.provider_message_id.as_str();
        let failed = |reason: &str, error: &str, retryable: bool| {
            self.events.emit(correlate(
                Event::warn(names::MEDIA_FETCH_FAILED)
                    .with("messageType", kind.as_str())
                    .with("mediaId", media_id)
                    .with("reason", reason)
                    .with("error", error)
                    .with("retryable", retryable)
                    .with("from", mask_phone(&event.from)),
            ));
        };
        // An earlier attempt of this job stored it already (the job failed further on).
        match self.store.inbound_media(channel, wamid).await {
            Ok(Some(row)) if row.media_key.is_some() => return answer(said),
            Ok(_) => {}
            Err(e) => return MediaTurn::Retry(format!("cannot read the message's media: {e}")),
        }

        let outcome = if media_id.is_empty() {
            Err(Failure {
                reason: "no_media_id".into(),
                error: format!("the {} message has no media id", kind.as_str()),
                retryable: false,
            })
        } else {
            match source.fetch(&ctx.channel, media_id, kind).await {
                Ok(media) => self.keep(ctx, wamid, media_id, media).await,
                Err(e) => Err(Failure::from_media(&e)),
            }
        };
        match outcome {
            Ok(stored) => {
                if let Err(e) = self.store.record_inbound_media(channel, wamid, &stored).await {
                    return MediaTurn::Retry(format!("cannot record the message's media: {e}"));
                }
                self.events.emit(correlate(
                    Event::info(names::MEDIA_STORED)
                        .with("messageType", kind.as_str())
                        .with("mediaId", media_id)
                        .with("objectKey", &stored.object_key)
                        .with("mimeType", &stored.mime_type)
                        .with("bytes", stored.bytes),
                ));
                answer(said)
            }
            Err(failure) if failure.retryable && !last_attempt => {
                failed(&failure.reason, &failure.error, true);
                MediaTurn::Retry(format!("cannot fetch the {}: {}", kind.as_str(), failure.error))
            }
            Err(failure) => {
                failed(&failure.reason, &failure.error, false);
                if let Err(e) = self.store.record_inbound_media_failure(channel, wamid, media_id, &failure.reason).await
                {
                    return MediaTurn::Retry(format!("cannot record the message's media: {e}"));
                }
                answer(format!("{said}\n{}", unreadable_note(kind, &failure.reason)))
            }
        }
    }

    /// Puts the file in object storage.
    async fn keep(
        &self,
        ctx: &ChannelContext,
        wamid: &str,
        media_id: &str,
        media: FetchedMedia,
    ) -> Result<StoredMedia, Failure> {
        let object_key = object_key(ctx.tenant.id.as_str(), wamid);
        self.storage.put(&object_key, &media.bytes).await.map_err(|e| Failure {
            reason: "storage".into(),
            retryable: matches!(e, StorageError::Io(_)),
            error: e.to_string(),
        })?;
        Ok(StoredMedia {
            media_id: media_id.to_owned(),
            object_key,
            mime_type: media.mime_type,
            bytes: media.bytes.len() as u64,
            sha256: media.sha256,
        })
    }
}

/// Why a file could not be had.
struct Failure {
    reason: String,
    error: String,
    retryable: bool,
}

impl Failure {
    fn from_media(error: &MediaError) -> Self {
        Self { reason: error.reason(), error: error.to_string(), retryable: error.is_retryable() }
    }
}

/// `media/<tenant>/<provider message id>`. The id is kept readable: characters other than
/// letters, digits, `.` and `-` (a wamid's base64 `=`, `+`, `/`) become `_XX` (their hex code),
/// so that the key stays one path segment and two ids never share a key.
pub fn object_key(tenant_id: &str, provider_message_id: &str) -> String {
    let mut key = format!("media/{}/", escape(tenant_id));
    key.push_str(&escape(provider_message_id));
    key
}

fn escape(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    for byte in part.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'.' || byte == b'-' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("_{byte:02X}"));
        }
    }
    out
}

/// What the LLM reads for a file without a caption.
pub fn placeholder(kind: MediaKind, object: &serde_json::Value) -> String {
    match kind {
        MediaKind::Image => "[The user sent an image]".into(),
        MediaKind::Video => "[The user sent a video]".into(),
        MediaKind::Sticker => "[The user sent a sticker]".into(),
        // Voice notes are `voice: true`; an audio file shared from the phone is not.
        MediaKind::Audio if object["voice"].as_bool() == Some(false) => "[The user sent an audio file]".into(),
        MediaKind::Audio => "[The user sent a voice message]".into(),
        MediaKind::Document => match object["filename"].as_str().map(str::trim).filter(|f| !f.is_empty()) {
            Some(name) => {
                format!("[The user sent a document: {}]", name.chars().take(MAX_FILENAME_CHARS).collect::<String>())
            }
            None => "[The user sent a document]".into(),
        },
    }
}

/// The note added for a file that could not be read, so that the answer does not pretend to.
fn unreadable_note(kind: MediaKind, reason: &str) -> String {
    let why = if reason == "too_large" { "it is too large" } else { "it could not be downloaded" };
    format!("[The {} could not be opened: {why}]", kind.as_str())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn object_keys_are_one_safe_segment_per_part_and_never_collide() {
        assert_eq!(object_key("t-1", "wamid.HBgL=="), "media/t-1/wamid.HBgL_3D_3D");
        assert_eq!(object_key("t-1", "a/b"), "media/t-1/a_2Fb");
        assert_ne!(object_key("t", "a_2F"), object_key("t", "a/"), "`_` is escaped too");
        assert_eq!(object_key("t", "a_"), "media/t/a_5F");
    }

    #[test]
    fn placeholders_say_what_was_sent() {
        assert_eq!(placeholder(MediaKind::Image, &json!({"id": "1"})), "[The user sent an image]");
        assert_eq!(
            placeholder(MediaKind::Audio, &json!({"id": "1", "voice": true})),
            "[The user sent a voice message]"
        );
        assert_eq!(placeholder(MediaKind::Audio, &json!({"id": "1", "voice": false})), "[The user sent an audio file]");
        assert_eq!(
            placeholder(MediaKind::Document, &json!({"id": "1", "filename": "contrat.pdf"})),
            "[The user sent a document: contrat.pdf]"
        );
        assert_eq!(placeholder(MediaKind::Document, &json!({"id": "1"})), "[The user sent a document]");
        let long = "x".repeat(500);
        assert!(placeholder(MediaKind::Document, &json!({"filename": long})).chars().count() < 200);
    }

    #[test]
    fn the_note_says_why_the_file_could_not_be_read() {
        assert_eq!(unreadable_note(MediaKind::Video, "too_large"), "[The video could not be opened: it is too large]");
        assert_eq!(
            unreadable_note(MediaKind::Image, "131052"),
            "[The image could not be opened: it could not be downloaded]"
        );
    }
}
