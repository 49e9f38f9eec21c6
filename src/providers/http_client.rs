//! The one HTTP client builder for every outbound call (WhatsApp providers, LLMs, embeddings), and
//! the one mapping of a transport failure (timeout, refused connection) to a port error.

use std::time::Duration;

use engine::{masking::mask_phones_in, ports::PortError};

/// How long an outbound call may take. Each provider picks its own budget, shorter than the
/// timeout of the stage that calls it, so that a slow provider is reported as this provider's
/// timeout rather than as the stage's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpTimeouts {
    /// Establishing the TCP (and TLS) connection.
    pub connect: Duration,
    /// The whole call, from sending the request to the last byte of the answer.
    pub total: Duration,
}

impl HttpTimeouts {
    /// WhatsApp sends: the `send` stage allows 10 s by default.
    pub const WHATSAPP: Self = Self { connect: Duration::from_secs(3), total: Duration::from_secs(8) };
    /// Chat completions: the `llm` stage allows 30 s by default.
    pub const LLM: Self = Self { connect: Duration::from_secs(3), total: Duration::from_secs(25) };
    /// The embedding of a question: the `rag-retrieve` stage allows 3 s, and fails open.
    pub const EMBED_QUERY: Self = Self { connect: Duration::from_secs(1), total: Duration::from_millis(2500) };
    /// The embedding of document chunks during ingestion, in batches: no user is waiting.
    pub const EMBED_DOCUMENTS: Self = Self { connect: Duration::from_secs(3), total: Duration::from_secs(60) };
    /// An OAuth token request (Google's token endpoint), made once an hour.
    pub const OAUTH: Self = Self { connect: Duration::from_secs(3), total: Duration::from_secs(10) };
}

/// The user agent every outbound call sends: providers' support asks for it.
pub const USER_AGENT: &str = concat!("parley/", env!("CARGO_PKG_VERSION"));

/// The client could not be built (the TLS backend failed to initialise).
#[derive(Debug, thiserror::Error)]
#[error("could not build the HTTP client: {0}")]
pub struct HttpClientError(#[source] reqwest::Error);

/// Builds a client with rustls, the given timeouts and Parley's user agent. A client holds a
/// connection pool: build one per provider at start-up and clone it, never one per call.
pub fn build(timeouts: HttpTimeouts) -> Result<reqwest::Client, HttpClientError> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(timeouts.connect)
        .timeout(timeouts.total)
        .user_agent(USER_AGENT)
        // Providers answer with JSON; a redirect would carry the bearer token to another host.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(HttpClientError)
}

/// A call that got no HTTP answer: always worth retrying (the provider may not have seen it, and
/// every sender is idempotent on the caller's side). The URL is left out of the message because it
/// can hold identifiers, and any digits are masked.
pub fn transport_error(service: &'static str, error: reqwest::Error) -> PortError {
    let (code, message) = if error.is_timeout() {
        ("timeout", "request timed out".to_owned())
    } else if error.is_connect() {
        ("connect", format!("could not connect: {}", error_chain(&error.without_url())))
    } else {
        ("transport", format!("request failed: {}", error_chain(&error.without_url())))
    };
    // A code, so that dashboards can tell a slow provider from an unreachable one.
    PortError { code: Some(code.to_owned()), ..PortError::unavailable(service, mask_phones_in(&message)) }
}

/// The error and its causes on one line: reqwest's own text alone says little ("error sending
/// request"); the cause says what happened ("connection refused").
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// Keeps the first `max` characters of a provider's text, so that an HTML error page from a proxy
/// does not fill a log line.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    let text = text.trim();
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refused_connection_is_a_retryable_error_without_the_url() {
        let client = build(HttpTimeouts::WHATSAPP).expect("client");
        // Port 9 (discard) is closed on loopback: the connection is refused at once.
        let error = client.get("http://127.0.0.1:9/12345678901/messages").send().await.expect_err("refused");

        let port_error = transport_error("meta", error);

        assert!(port_error.is_retryable());
        assert_eq!(port_error.code.as_deref(), Some("connect"));
        assert!(port_error.message.starts_with("could not connect"), "{port_error}");
        assert!(!port_error.to_string().contains("12345678901"), "{port_error}");
    }

    #[test]
    fn long_provider_text_is_cut() {
        assert_eq!(truncate("  abcdef ", 3), "abc…");
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(truncate("éèà", 2), "éè…");
    }

    #[test]
    fn user_agent_names_parley_and_its_version() {
        assert_eq!(USER_AGENT, format!("parley/{}", env!("CARGO_PKG_VERSION")));
    }
}
