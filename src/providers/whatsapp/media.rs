//! Inbound media through the provider's media API: the [`MediaSource`] port the worker fetches
//! images, voice messages, videos, documents and stickers through, and [`MediaFetcher`], its Cloud
//! API adapter for Meta and 360dialog alike.
//!
//! A fetch is two calls with the channel's key: `GET {WHATSAPP_API_URL}/{media_id}` answers
//! `{url, mime_type, sha256, file_size, id}`, then the file is downloaded from `url`. Meta's `url`
//! is used as it is (a `lookaside.fbsbx.com` address that takes the same bearer token); 360dialog
//! serves the download itself, so its `url` keeps its path and query but goes to the host of
//! `WHATSAPP_API_URL`, with the `D360-API-KEY` header.
//!
//! Sizes are checked twice: a `file_size` over the limit is refused before downloading, and the
//! download stops as soon as it passes the limit, so a lying `file_size` cannot exhaust memory.

use std::{num::NonZeroU64, sync::Arc, time::Duration};

use engine::{async_trait, events::Event, message::ChannelInfo, ports::PortError};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use url::Url;

use super::{
    CredentialSource, GlobalApiKey,
    cloud_api::{ChannelAuth, CloudApiAuth, CloudApiClient},
};
use crate::{
    providers::{
        ProviderError,
        credentials::ChannelCredentialCache,
        http_client::{self, HttpTimeouts, transport_error},
        retry::{AttemptError, Retries, RetryPolicy},
    },
    settings::{Settings, WhatsAppProvider},
};

/// A media call may take longer than a send: a document may weigh 100 MB.
pub const MEDIA_TIMEOUTS: HttpTimeouts =
    HttpTimeouts { connect: Duration::from_secs(3), total: Duration::from_secs(120) };

/// The lookup of a media id: a small JSON answer.
const LOOKUP_POLICY: RetryPolicy = RetryPolicy {
    retries: 2,
    min_delay: Duration::from_millis(250),
    max_delay: Duration::from_secs(1),
    budget: Duration::from_secs(10),
};

/// The kinds of inbound media Parley fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    Image,
    Audio,
    Video,
    Document,
    Sticker,
}

impl MediaKind {
    /// The kind of a WhatsApp message `type`; `None` for messages without a file.
    pub fn from_message_type(message_type: &str) -> Option<Self> {
        Some(match message_type {
            "image" => Self::Image,
            "audio" => Self::Audio,
            "video" => Self::Video,
            "document" => Self::Document,
            "sticker" => Self::Sticker,
            _ => return None,
        })
    }

    /// The message type, which is also the key of the media object in the message.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Image => "image",
            Self::Audio => "audio",
            Self::Video => "video",
            Self::Document => "document",
            Self::Sticker => "sticker",
        }
    }

    /// WhatsApp's own limit for the kind: nothing larger can be sent to a business.
    pub const fn whatsapp_limit(self) -> u64 {
        const MB: u64 = 1024 * 1024;
        match self {
            Self::Image => 5 * MB,
            Self::Audio | Self::Video => 16 * MB,
            Self::Document => 100 * MB,
            Self::Sticker => 500 * 1024,
        }
    }
}

/// The largest file fetched per kind: WhatsApp's limit, lowered by `MEDIA_MAX_BYTES` when set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MediaLimits {
    cap: Option<NonZeroU64>,
}

impl MediaLimits {
    pub fn new(cap: Option<NonZeroU64>) -> Self {
        Self { cap }
    }

    pub fn for_kind(self, kind: MediaKind) -> u64 {
        let limit = kind.whatsapp_limit();
        self.cap.map_or(limit, |cap| cap.get().min(limit))
    }
}

/// A downloaded file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedMedia {
    pub bytes: Vec<u8>,
    /// The provider's `mime_type`, else the download's `Content-Type`, else
    /// `application/octet-stream`.
    pub mime_type: String,
    /// Hex SHA-256 of `bytes`.
    pub sha256: String,
}

/// Why a file could not be fetched. Messages never hold the key or an unmasked number.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MediaError {
    /// Over the limit, by the provider's `file_size` (`size`) or while downloading (`size: None`).
    #[error("the {kind} is larger than the {limit}-byte limit{}", size.map(|s| format!(" ({s} bytes)")).unwrap_or_default())]
    TooLarge { kind: &'static str, size: Option<u64>, limit: u64 },
    /// The downloaded bytes are not the file the provider described.
    #[error("the downloaded {kind} does not match the provider's sha256")]
    ChecksumMismatch { kind: &'static str },
    #[error("{0}")]
    Provider(PortError),
}

impl MediaError {
    /// Whether the same fetch may succeed later (the provider was unreachable or throttled).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Provider(e) if e.is_retryable())
    }

    /// A short code for events and the message row: `too_large`, `sha256_mismatch`, or the
    /// provider's (`131052`, `http_404`, `timeout`…).
    pub fn reason(&self) -> String {
        match self {
            Self::TooLarge { .. } => "too_large".into(),
            Self::ChecksumMismatch { .. } => "sha256_mismatch".into(),
            Self::Provider(e) => e.code.clone().unwrap_or_else(|| "provider_error".into()),
        }
    }
}

impl From<PortError> for MediaError {
    fn from(error: PortError) -> Self {
        Self::Provider(error)
    }
}

/// Where the worker fetches inbound media. The sandbox has none.
#[async_trait]
pub trait MediaSource: Send + Sync {
    /// Downloads the file `media_id` that a user sent to `channel`.
    async fn fetch(&self, channel: &ChannelInfo, media_id: &str, kind: MediaKind) -> Result<FetchedMedia, MediaError>;
}

/// The media APIs: Meta's, and 360dialog's proxy of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaApi {
    /// Bearer token; the download from the URL the lookup returns.
    Meta,
    /// `D360-API-KEY`; the download through 360dialog's host.
    Dialog360,
}

/// Where the download goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DownloadHost {
    /// To the URL the lookup returned (Meta).
    AsReturned,
    /// The returned URL's path and query on the host of `WHATSAPP_API_URL` (360dialog).
    ApiHost,
}

/// The Cloud API media client: one per process, for every channel of the provider.
pub struct MediaFetcher {
    api: CloudApiClient,
    base_url: Url,
    download: DownloadHost,
    limits: MediaLimits,
}

/// Meta's answer to a media lookup.
#[derive(Debug, Deserialize)]
struct MediaInfo {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    mime_type: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
    /// A number, or a string of digits from some API versions.
    #[serde(default)]
    file_size: Option<serde_json::Value>,
}

impl MediaInfo {
    fn file_size(&self) -> Option<u64> {
        match self.file_size.as_ref()? {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }
}

impl MediaFetcher {
    /// The fetcher of `api`, for every channel whose key `credentials` give.
    pub fn new(
        api: MediaApi,
        client: reqwest::Client,
        base_url: Url,
        credentials: Arc<dyn CredentialSource>,
        retries: Retries,
        limits: MediaLimits,
    ) -> Self {
        let (service, auth, download) = match api {
            MediaApi::Meta => (super::meta::SERVICE, CloudApiAuth::Bearer, DownloadHost::AsReturned),
            MediaApi::Dialog360 => (super::dialog360::SERVICE, CloudApiAuth::D360ApiKey, DownloadHost::ApiHost),
        };
        Self { api: CloudApiClient::new(client, service, auth, credentials, retries), base_url, download, limits }
    }

    /// The fetcher of `WHATSAPP_PROVIDER`, or `None` for the sandbox (no media API: the worker
    /// answers media messages from their caption or a placeholder).
    pub fn from_settings(
        settings: &Settings,
        credentials: Arc<dyn CredentialSource>,
        events: Arc<dyn engine::events::EventSink>,
    ) -> Result<Option<Self>, ProviderError> {
        let limits = MediaLimits::new(settings.media_max_bytes);
        let retries = Retries::new(LOOKUP_POLICY, events);
        let base = settings.whatsapp_api_url.clone();
        let api = match settings.whatsapp_provider {
            WhatsAppProvider::Sandbox => return Ok(None),
            WhatsAppProvider::Meta => MediaApi::Meta,
            WhatsAppProvider::Dialog360 => MediaApi::Dialog360,
        };
        Ok(Some(Self::new(api, http_client::build(MEDIA_TIMEOUTS)?, base, credentials, retries, limits)))
    }

    /// The worker's media source: [`Self::from_settings`] with the channels' own keys when
    /// there are any (else `WHATSAPP_API_KEY`). A client that cannot be built is logged, and the
    /// worker answers media messages from their caption or a placeholder.
    pub fn source_for(
        settings: &Settings,
        channel_credentials: Option<Arc<ChannelCredentialCache>>,
        events: Arc<dyn engine::events::EventSink>,
    ) -> Option<Arc<dyn MediaSource>> {
        let credentials: Arc<dyn CredentialSource> = match channel_credentials {
            Some(cache) => cache,
            None => Arc::new(GlobalApiKey::new(settings.whatsapp_api_key.clone())),
        };
        match Self::from_settings(settings, credentials, events) {
            Ok(fetcher) => fetcher.map(|f| Arc::new(f) as Arc<dyn MediaSource>),
            Err(e) => {
                tracing::error!(error = %e, "cannot build the media client; media messages get placeholders");
                None
            }
        }
    }

    fn service(&self) -> &'static str {
        self.api.service()
    }

    /// `{base}/{media_id}`, the id escaped as one path segment.
    fn lookup_url(&self, media_id: &str) -> Result<Url, PortError> {
        if media_id.trim().is_empty() {
            return Err(PortError::permanent(
                self.service(),
                Some("no_media_id".into()),
                "the message has no media id",
            ));
        }
        let mut url = self.base_url.clone();
        url.path_segments_mut()
            .map_err(|_| PortError::permanent(self.service(), None, "WHATSAPP_API_URL cannot take a path"))?
            .pop_if_empty()
            .push(media_id);
        Ok(url)
    }

    /// Where to download the file the lookup described.
    fn download_url(&self, returned: &str) -> Result<Url, PortError> {
        let invalid = || {
            PortError::permanent(
                self.service(),
                Some("invalid_response".into()),
                "the media lookup returned no usable download URL",
            )
        };
        let returned = Url::parse(returned).map_err(|_| invalid())?;
        if !matches!(returned.scheme(), "http" | "https") {
            return Err(invalid());
        }
        Ok(match self.download {
            DownloadHost::AsReturned => returned,
            DownloadHost::ApiHost => {
                let mut url = self.base_url.clone();
                let prefix = url.path().trim_end_matches('/').to_owned();
                url.set_path(&format!("{prefix}{}", returned.path()));
                url.set_query(returned.query());
                url
            }
        })
    }

    async fn lookup(&self, url: &Url, auth: &ChannelAuth, timeout: Duration) -> Result<MediaInfo, AttemptError> {
        let service = self.service();
        let invalid =
            |what: String| AttemptError::final_(PortError::permanent(service, Some("invalid_response".into()), what));
        let answer = self.get(url, auth, timeout, MAX_LOOKUP_BYTES).await?;
        let Body::Complete(body) = answer.body else {
            return Err(invalid(format!("HTTP {}: the media lookup answer is too long", answer.status)));
        };
        if !(200..300).contains(&answer.status) {
            return Err(AttemptError::idempotent(self.api.error_from_body(answer.status, &body, &auth.key).0));
        }
        serde_json::from_slice::<MediaInfo>(&body)
            .map_err(|_| invalid(format!("HTTP {}: the media lookup answer is not the expected JSON", answer.status)))
    }

    /// Downloads the file; `Ok(None)` once it passes `limit`.
    async fn download(
        &self,
        url: &Url,
        auth: &ChannelAuth,
        limit: u64,
        timeout: Duration,
    ) -> Result<Option<(Vec<u8>, Option<String>)>, AttemptError> {
        let answer = self.get(url, auth, timeout, limit).await?;
        let Body::Complete(body) = answer.body else { return Ok(None) };
        if !(200..300).contains(&answer.status) {
            return Err(AttemptError::idempotent(self.api.error_from_body(answer.status, &body, &auth.key).0));
        }
        Ok(Some((body, answer.content_type)))
    }

    /// One GET with the channel's key, its body read up to `cap` bytes: a larger success is
    /// [`Body::TooLarge`] (stopped as soon as it passes the cap), a larger error page is cut.
    async fn get(&self, url: &Url, auth: &ChannelAuth, timeout: Duration, cap: u64) -> Result<Answer, AttemptError> {
        let service = self.service();
        let (name, value) = &auth.header;
        let mut response =
            match self.api.http().get(url.clone()).header(name, value.clone()).timeout(timeout).send().await {
                Ok(response) => response,
                Err(e) => return Err(AttemptError::idempotent(transport_error(service, e))),
            };
        let status = response.status().as_u16();
        let success = (200..300).contains(&status);
        let content_type =
            response.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let cap = if success { cap } else { MAX_ERROR_BYTES };
        if success && response.content_length().is_some_and(|length| length > cap) {
            return Ok(Answer { status, content_type, body: Body::TooLarge });
        }
        let mut bytes = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    bytes.extend_from_slice(&chunk);
                    if bytes.len() as u64 > cap {
                        if success {
                            return Ok(Answer { status, content_type, body: Body::TooLarge });
                        }
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(AttemptError::idempotent(transport_error(service, e))),
            }
        }
        Ok(Answer { status, content_type, body: Body::Complete(bytes) })
    }
}

/// The longest media lookup answer read: it is a few hundred bytes of JSON.
const MAX_LOOKUP_BYTES: u64 = 64 * 1024;
/// The longest error page read.
const MAX_ERROR_BYTES: u64 = 64 * 1024;

/// An answer as read.
struct Answer {
    status: u16,
    content_type: Option<String>,
    body: Body,
}

/// A body as read: whole, or given up past the cap.
enum Body {
    Complete(Vec<u8>),
    TooLarge,
}

#[async_trait]
impl MediaSource for MediaFetcher {
    async fn fetch(&self, channel: &ChannelInfo, media_id: &str, kind: MediaKind) -> Result<FetchedMedia, MediaError> {
        let limit = self.limits.for_kind(kind);
        let too_large = |size| MediaError::TooLarge { kind: kind.as_str(), size, limit };
        let lookup_url = self.lookup_url(media_id)?;
        let auth = self.api.auth(channel).await?;
        let describe = |event: Event| event.with("channelId", channel.id.as_str()).with("mediaId", media_id);
        let retries = self.api.retries();

        let info = retries.run(&describe, |timeout| self.lookup(&lookup_url, &auth, timeout)).await?;
        if let Some(size) = info.file_size()
            && size > limit
        {
            return Err(too_large(Some(size)));
        }
        let download_url = self.download_url(info.url.as_deref().unwrap_or_default())?;
        // The lookup's retries, with the time a large file needs.
        let download_policy = RetryPolicy { budget: MEDIA_TIMEOUTS.total, ..retries.policy() };
        let downloaded = retries
            .with_policy(download_policy)
            .run(&describe, |timeout| self.download(&download_url, &auth, limit, timeout))
            .await?;
        let Some((bytes, content_type)) = downloaded else { return Err(too_large(None)) };

        let digest = Sha256::digest(&bytes);
        let sha256 = format!("{digest:x}");
        if let Some(expected) = info.sha256.as_deref().map(str::trim).filter(|s| !s.is_empty())
            && !expected.eq_ignore_ascii_case(&sha256)
            && expected != base64(&digest)
        {
            return Err(MediaError::ChecksumMismatch { kind: kind.as_str() });
        }
        let mime_type = [info.mime_type, content_type]
            .into_iter()
            .flatten()
            .find(|m| !m.trim().is_empty())
            .unwrap_or_else(|| "application/octet-stream".to_owned());
        Ok(FetchedMedia { bytes, mime_type, sha256 })
    }
}

/// Standard base64 with padding: the webhook gives `sha256` in base64, the lookup in hex.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use engine::{
        events::{MemoryEvents, names},
        ids::ChannelId,
        ports::PortErrorKind,
    };
    use secrecy::SecretString;
    use serde_json::{Value, json};

    use super::*;
    use crate::providers::{
        fake_http::{FakeReply, FakeServer},
        whatsapp::{GlobalApiKey, cloud_api::test_support},
    };

    const KEY: &str = "EAAG-media-test-key";
    const MEDIA_ID: &str = "1037543291543636";
    const JPEG: &str = "not really a jpeg, but bytes all the same";

    fn channel() -> ChannelInfo {
        ChannelInfo {
            id: ChannelId::new("channel-1"),
            provider: "meta".into(),
            phone_number_id: "106540352242922".into(),
        }
    }

    fn hex_sha256(bytes: &[u8]) -> String {
        format!("{:x}", Sha256::digest(bytes))
    }

    fn key() -> Arc<dyn CredentialSource> {
        Arc::new(GlobalApiKey::new(Some(SecretString::from(KEY))))
    }

    fn retries(events: &MemoryEvents) -> Retries {
        Retries::new(RetryPolicy::fast(Duration::from_secs(5)), Arc::new(events.clone()))
    }

    fn meta_fetcher(graph: &FakeServer, limits: MediaLimits, events: &MemoryEvents) -> MediaFetcher {
        let client = http_client::build(MEDIA_TIMEOUTS).expect("client");
        MediaFetcher::new(MediaApi::Meta, client, graph.base("/v21.0"), key(), retries(events), limits)
    }

    /// Meta's lookup answer for a file on `files` (Meta's `lookaside` host).
    fn lookup(files: &FakeServer, mime_type: &str, sha256: &str, file_size: Value) -> FakeReply {
        FakeReply::Json(
            200,
            json!({
                "messaging_product": "whatsapp",
                "url": format!("{}download/{MEDIA_ID}?ext=1&hash=abc", files.url),
                "mime_type": mime_type,
                "sha256": sha256,
                "file_size": file_size,
                "id": MEDIA_ID
            }),
        )
    }

    /// Fetches `MEDIA_ID` as `kind` from a graph server answering `lookup_reply` and a file server
    /// answering `file`; returns the result and both servers.
    async fn fetch_with(
        kind: MediaKind,
        limits: MediaLimits,
        file: FakeReply,
        lookup_reply: impl FnOnce(&FakeServer) -> Vec<FakeReply>,
    ) -> (Result<FetchedMedia, MediaError>, FakeServer, FakeServer, MemoryEvents) {
        let files = FakeServer::start(file).await;
        let graph = FakeServer::start_sequence(lookup_reply(&files)).await;
        let events = MemoryEvents::new();
        let result = meta_fetcher(&graph, limits, &events).fetch(&channel(), MEDIA_ID, kind).await;
        if let Err(error) = &result {
            assert!(!format!("{error} {error:?}").contains(KEY), "the key leaked: {error:?}");
        }
        (result, graph, files, events)
    }

    #[tokio::test]
    async fn image_is_looked_up_then_downloaded_with_the_bearer_token() {
        let (result, graph, files, _) =
            fetch_with(MediaKind::Image, MediaLimits::default(), FakeReply::Text(200, JPEG.into()), |files| {
                vec![lookup(files, "image/jpeg", &hex_sha256(JPEG.as_bytes()), json!(JPEG.len()))]
            })
            .await;

        let media = result.expect("fetched");
        assert_eq!(media.bytes, JPEG.as_bytes());
        assert_eq!(media.mime_type, "image/jpeg");
        assert_eq!(media.sha256, hex_sha256(JPEG.as_bytes()));
        let looked_up = graph.only_request();
        assert_eq!(looked_up.method, "GET");
        assert_eq!(looked_up.path, format!("/v21.0/{MEDIA_ID}"));
        assert_eq!(looked_up.header("authorization"), Some(format!("Bearer {KEY}").as_str()));
        let downloaded = files.only_request();
        assert_eq!(downloaded.method, "GET");
        assert_eq!(downloaded.path, format!("/download/{MEDIA_ID}"));
        assert_eq!(downloaded.header("authorization"), Some(format!("Bearer {KEY}").as_str()));
    }

    #[tokio::test]
    async fn dialog360_downloads_through_its_own_host_with_its_key() {
        let server = FakeServer::start_sequence(vec![
            FakeReply::Json(
                200,
                json!({
                    "url": "https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=1037&ext=1&hash=ATs",
                    "mime_type": "audio/ogg; codecs=opus",
                    "sha256": hex_sha256(b"OggS voice"),
                    "file_size": "10",
                    "id": MEDIA_ID
                }),
            ),
            FakeReply::Text(200, "OggS voice".into()),
        ])
        .await;
        let client = http_client::build(MEDIA_TIMEOUTS).expect("client");
        let events = MemoryEvents::new();
        let fetcher = MediaFetcher::new(
            MediaApi::Dialog360,
            client,
            server.url.clone(),
            key(),
            retries(&events),
            MediaLimits::default(),
        );

        let media = fetcher.fetch(&channel(), MEDIA_ID, MediaKind::Audio).await.expect("fetched");

        assert_eq!(media.bytes, b"OggS voice");
        assert_eq!(media.mime_type, "audio/ogg; codecs=opus");
        let requests = server.requests();
        assert_eq!(requests.len(), 2);
        assert_eq!(requests[0].path, format!("/{MEDIA_ID}"));
        assert_eq!(requests[1].path, "/whatsapp_business/attachments/", "lookaside's path on 360dialog's host");
        for request in &requests {
            assert_eq!(request.method, "GET");
            assert_eq!(request.header("D360-API-KEY"), Some(KEY));
            assert_eq!(request.header("authorization"), None);
        }
    }

    #[tokio::test]
    async fn file_declared_over_the_limit_is_refused_before_downloading() {
        let six_mb = 6 * 1024 * 1024;
        let (result, _, files, _) =
            fetch_with(MediaKind::Image, MediaLimits::default(), FakeReply::Text(200, JPEG.into()), |files| {
                vec![lookup(files, "image/jpeg", "", json!(six_mb))]
            })
            .await;

        let error = result.expect_err("too large");
        assert_eq!(error, MediaError::TooLarge { kind: "image", size: Some(six_mb), limit: 5 * 1024 * 1024 });
        assert!(!error.is_retryable());
        assert_eq!(error.reason(), "too_large");
        assert!(files.requests().is_empty(), "nothing downloaded");
    }

    #[tokio::test]
    async fn file_larger_than_its_declared_size_is_cut_at_the_limit() {
        let big = "x".repeat(5000);
        let limits = MediaLimits::new(NonZeroU64::new(1000));
        let (result, _, files, _) = fetch_with(MediaKind::Document, limits, FakeReply::Text(200, big), |files| {
            vec![lookup(files, "application/pdf", "", json!(10))]
        })
        .await;

        assert_eq!(result, Err(MediaError::TooLarge { kind: "document", size: None, limit: 1000 }));
        assert_eq!(files.requests().len(), 1, "not downloaded again");
    }

    #[tokio::test]
    async fn download_not_matching_the_sha256_is_refused() {
        let (result, _, _, _) =
            fetch_with(MediaKind::Image, MediaLimits::default(), FakeReply::Text(200, JPEG.into()), |files| {
                vec![lookup(files, "image/jpeg", &hex_sha256(b"another file"), json!(JPEG.len()))]
            })
            .await;

        let error = result.expect_err("mismatch");
        assert_eq!(error, MediaError::ChecksumMismatch { kind: "image" });
        assert!(!error.is_retryable());
        assert_eq!(error.reason(), "sha256_mismatch");
    }

    #[tokio::test]
    async fn sha256_in_base64_is_accepted() {
        let b64 = base64(&Sha256::digest(JPEG.as_bytes()));
        let (result, _, _, _) =
            fetch_with(MediaKind::Image, MediaLimits::default(), FakeReply::Text(200, JPEG.into()), |files| {
                vec![lookup(files, "image/jpeg", &b64, json!(JPEG.len()))]
            })
            .await;

        assert_eq!(result.expect("fetched").bytes, JPEG.as_bytes());
    }

    #[tokio::test]
    async fn unknown_media_id_is_a_permanent_provider_error() {
        let (result, graph, files, _) =
            fetch_with(MediaKind::Video, MediaLimits::default(), FakeReply::Text(200, JPEG.into()), |_| {
                vec![FakeReply::Json(400, test_support::meta_error(100, "Unsupported get request", "33612345678"))]
            })
            .await;

        let error = result.expect_err("unknown id");
        assert!(matches!(&error, MediaError::Provider(e) if e.kind == PortErrorKind::Permanent), "{error:?}");
        assert_eq!(error.reason(), "100");
        assert!(!error.to_string().contains("33612345678"), "{error}");
        assert_eq!(graph.requests().len(), 1, "not retried");
        assert!(files.requests().is_empty());
    }

    #[tokio::test]
    async fn lookup_meeting_an_outage_is_retried_and_then_succeeds() {
        let (result, graph, _, events) =
            fetch_with(MediaKind::Image, MediaLimits::default(), FakeReply::Text(200, JPEG.into()), |files| {
                vec![
                    FakeReply::Text(503, "Service Unavailable".into()),
                    lookup(files, "image/jpeg", "", json!(JPEG.len())),
                ]
            })
            .await;

        assert_eq!(result.expect("fetched on the second lookup").bytes, JPEG.as_bytes());
        assert_eq!(graph.requests().len(), 2);
        let retried = events.named(names::PROVIDER_CALL_RETRIED);
        assert_eq!(retried.len(), 1);
        assert_eq!(retried[0].field("mediaId"), Some(&json!(MEDIA_ID)));
    }

    #[tokio::test]
    async fn download_failing_for_good_is_retryable_only_when_the_provider_says_so() {
        let (result, _, files, _) =
            fetch_with(MediaKind::Image, MediaLimits::default(), FakeReply::Text(503, "busy".into()), |files| {
                vec![lookup(files, "image/jpeg", "", json!(JPEG.len()))]
            })
            .await;

        let error = result.expect_err("still down");
        assert!(error.is_retryable(), "the job may try again: {error:?}");
        assert_eq!(error.reason(), "http_503");
        assert_eq!(files.requests().len(), 3, "one attempt and two retries");
    }

    #[tokio::test]
    async fn no_key_fails_for_good_without_a_call() {
        let graph = FakeServer::start(FakeReply::Json(200, json!({}))).await;
        let client = http_client::build(MEDIA_TIMEOUTS).expect("client");
        let fetcher = MediaFetcher::new(
            MediaApi::Meta,
            client,
            graph.base("/v21.0"),
            Arc::new(GlobalApiKey::new(None)),
            retries(&MemoryEvents::new()),
            MediaLimits::default(),
        );

        let error = fetcher.fetch(&channel(), MEDIA_ID, MediaKind::Image).await.expect_err("no key");

        assert_eq!(error.reason(), "no_api_key");
        assert!(graph.requests().is_empty());
    }

    #[test]
    fn media_max_bytes_lowers_the_limits_but_never_raises_them() {
        let default = MediaLimits::default();
        assert_eq!(default.for_kind(MediaKind::Sticker), 500 * 1024);
        assert_eq!(default.for_kind(MediaKind::Document), 100 * 1024 * 1024);
        let capped = MediaLimits::new(NonZeroU64::new(1024 * 1024));
        assert_eq!(capped.for_kind(MediaKind::Video), 1024 * 1024);
        assert_eq!(capped.for_kind(MediaKind::Sticker), 500 * 1024);
    }

    fn settings(pairs: &[(&str, &str)]) -> Result<Settings, crate::settings::SettingsError> {
        Settings::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn media_max_bytes_is_a_positive_number_of_bytes() {
        assert_eq!(settings(&[]).expect("defaults").media_max_bytes, None);
        assert_eq!(settings(&[("MEDIA_MAX_BYTES", "2048")]).expect("valid").media_max_bytes, NonZeroU64::new(2048));
        for bad in ["0", "-1", "5MB"] {
            let error = settings(&[("MEDIA_MAX_BYTES", bad)]).expect_err(bad).to_string();
            assert!(error.contains("MEDIA_MAX_BYTES: expected a whole number of bytes"), "{error}");
        }
    }

    #[test]
    fn the_sandbox_has_no_media_api_and_the_real_providers_do() {
        let events: Arc<dyn engine::events::EventSink> = Arc::new(MemoryEvents::new());
        let sandbox = settings(&[]).expect("defaults");
        assert!(MediaFetcher::from_settings(&sandbox, key(), events.clone()).expect("built").is_none());
        for provider in ["meta", "360dialog"] {
            let real = settings(&[
                ("WHATSAPP_PROVIDER", provider),
                ("WHATSAPP_API_KEY", KEY),
                ("WHATSAPP_WEBHOOK_TOKEN", "token"),
            ])
            .expect("valid");
            let fetcher = MediaFetcher::from_settings(&real, key(), events.clone()).expect("built").expect(provider);
            assert_eq!(fetcher.service(), if provider == "meta" { "meta" } else { "360dialog" });
        }
    }

    #[test]
    fn only_file_messages_are_media() {
        for kind in ["image", "audio", "video", "document", "sticker"] {
            assert_eq!(MediaKind::from_message_type(kind).map(MediaKind::as_str), Some(kind));
        }
        for other in ["text", "location", "contacts", "reaction", "unsupported"] {
            assert_eq!(MediaKind::from_message_type(other), None);
        }
    }

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"hello"), "aGVsbG8=");
    }
}
