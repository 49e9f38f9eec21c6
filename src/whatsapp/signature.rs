//! Webhook authentication: Meta's `X-Hub-Signature-256` (HMAC-SHA256 of the raw body with the
//! app secret) and 360dialog's shared header token, with the business numbers a body names (whose
//! channels may each have their own token). Every comparison runs in constant time, so that
//! response timing tells an attacker nothing about how close a guess was.

use std::collections::BTreeSet;

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The header Meta signs webhook bodies in.
pub const META_SIGNATURE_HEADER: &str = "X-Hub-Signature-256";

/// Why a webhook was not authenticated. The texts are for logs; the caller answers a bare 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature header is missing")]
    Missing,
    #[error("the signature header is not `sha256=<64 hex digits>`")]
    Malformed,
    #[error("the signature does not match the body")]
    Mismatch,
    #[error("the token header is missing")]
    MissingToken,
    #[error("the token does not match")]
    WrongToken,
    #[error("no secret is configured to check it against")]
    NotConfigured,
}

/// The value of `X-Hub-Signature-256` for `body`: what Meta sends, and what `parley simulate` signs
/// with.
pub fn meta_signature(app_secret: &SecretString, body: &[u8]) -> String {
    let mut mac = hmac_with(app_secret.expose_secret().as_bytes());
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

/// Checks a `X-Hub-Signature-256` header value against the raw body.
pub fn verify_meta_signature(
    app_secret: Option<&SecretString>,
    body: &[u8],
    header: Option<&str>,
) -> Result<(), SignatureError> {
    verify_meta_digest(app_secret, body, &parse_signature_header(header)?)
}

/// Checks a digest already read by [`parse_signature_header`] against the raw body, in constant
/// time.
pub fn verify_meta_digest(
    app_secret: Option<&SecretString>,
    body: &[u8],
    provided: &[u8; 32],
) -> Result<(), SignatureError> {
    let secret = app_secret.ok_or(SignatureError::NotConfigured)?;
    let mut mac = hmac_with(secret.expose_secret().as_bytes());
    mac.update(body);
    mac.verify_slice(provided).map_err(|_| SignatureError::Mismatch)
}

/// Parses `sha256=<hex>` into the 32 bytes of the digest. Done before the body is read, so that an
/// unsigned request is refused without reading it.
pub fn parse_signature_header(header: Option<&str>) -> Result<[u8; 32], SignatureError> {
    let header = header.map(str::trim).filter(|h| !h.is_empty()).ok_or(SignatureError::Missing)?;
    let hex = header.strip_prefix("sha256=").ok_or(SignatureError::Malformed)?.as_bytes();
    if hex.len() != 64 {
        return Err(SignatureError::Malformed);
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let (Some(hi), Some(lo)) = (hex_value(pair[0]), hex_value(pair[1])) else {
            return Err(SignatureError::Malformed);
        };
        out[i] = (hi << 4) | lo;
    }
    Ok(out)
}

/// Checks a shared token sent in a header (360dialog).
pub fn verify_header_token(expected: Option<&SecretString>, provided: Option<&str>) -> Result<(), SignatureError> {
    let provided = provided.filter(|p| !p.is_empty()).ok_or(SignatureError::MissingToken)?;
    let expected = expected.ok_or(SignatureError::NotConfigured)?;
    if constant_time_eq(expected.expose_secret().as_bytes(), provided.as_bytes()) {
        Ok(())
    } else {
        Err(SignatureError::WrongToken)
    }
}

/// The business numbers a webhook body names (`entry[].changes[].value.metadata.phone_number_id`),
/// each once, in order; `""` stands for a change that names none, and for a body that is not a
/// webhook at all, so that something is always authenticated. A 360dialog body must carry the token
/// of every channel it names (the channel's own, else the global one).
pub fn channels_named(body: &[u8]) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    let root = serde_json::from_slice::<serde_json::Value>(body).unwrap_or_default();
    let changes = root
        .get("entry")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.get("changes").and_then(serde_json::Value::as_array))
        .flatten();
    for change in changes {
        let number = change
            .get("value")
            .and_then(|v| v.get("metadata"))
            .and_then(|m| m.get("phone_number_id"))
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default();
        named.insert(number.to_owned());
    }
    if named.is_empty() {
        named.insert(String::new());
    }
    named
}

/// Compares two byte strings in time independent of their content and of their lengths: both are
/// first reduced to fixed-size MACs, which `verify_slice` compares in constant time.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    const BLIND: &[u8] = b"parley constant-time comparison";
    let mut mac_a = hmac_with(BLIND);
    mac_a.update(a);
    let digest_a = mac_a.finalize().into_bytes();
    let mut mac_b = hmac_with(BLIND);
    mac_b.update(b);
    mac_b.verify_slice(&digest_a).is_ok()
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn hmac_with(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    match <HmacSha256 as Mac>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> SecretString {
        SecretString::from(s.to_owned())
    }

    #[test]
    fn a_body_signed_with_the_app_secret_verifies() {
        let s = secret("app-secret");
        let body = br#"{"object":"whatsapp_business_account","entry":[]}"#;
        let header = meta_signature(&s, body);
        assert!(header.starts_with("sha256=") && header.len() == 71, "{header}");
        assert_eq!(verify_meta_signature(Some(&s), body, Some(&header)), Ok(()));
        // Meta documents lowercase hex; accept uppercase too.
        let upper = format!("sha256={}", header["sha256=".len()..].to_uppercase());
        assert_eq!(verify_meta_signature(Some(&s), body, Some(&upper)), Ok(()));
    }

    #[test]
    fn a_known_vector_matches_meta_signing() {
        // HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog").
        assert_eq!(
            meta_signature(&secret("key"), b"The quick brown fox jumps over the lazy dog"),
            "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }

    #[test]
    fn tampered_unsigned_or_wrongly_signed_bodies_are_refused() {
        let s = secret("app-secret");
        let header = meta_signature(&s, b"original");
        assert_eq!(verify_meta_signature(Some(&s), b"tampered", Some(&header)), Err(SignatureError::Mismatch));
        assert_eq!(verify_meta_signature(Some(&s), b"original", None), Err(SignatureError::Missing));
        assert_eq!(verify_meta_signature(Some(&s), b"original", Some("")), Err(SignatureError::Missing));
        let other = meta_signature(&secret("other-secret"), b"original");
        assert_eq!(verify_meta_signature(Some(&s), b"original", Some(&other)), Err(SignatureError::Mismatch));
        for bad in ["sha1=abc", "sha256=xyz", "sha256=abcd", &format!("sha256={}", "g".repeat(64))] {
            assert_eq!(verify_meta_signature(Some(&s), b"original", Some(bad)), Err(SignatureError::Malformed));
        }
        assert_eq!(verify_meta_signature(None, b"original", Some(&header)), Err(SignatureError::NotConfigured));
    }

    #[test]
    fn header_tokens_must_match_exactly() {
        let s = secret("shared-token");
        assert_eq!(verify_header_token(Some(&s), Some("shared-token")), Ok(()));
        assert_eq!(verify_header_token(Some(&s), Some("shared-token-")), Err(SignatureError::WrongToken));
        assert_eq!(verify_header_token(Some(&s), Some("shared-tokeN")), Err(SignatureError::WrongToken));
        assert_eq!(verify_header_token(Some(&s), None), Err(SignatureError::MissingToken));
        assert_eq!(verify_header_token(None, Some("shared-token")), Err(SignatureError::NotConfigured));
    }

    #[test]
    fn channels_named_lists_every_business_number_once() {
        let change = |pnid: Option<&str>| match pnid {
            Some(p) => serde_json::json!({"field": "messages", "value": {"metadata": {"phone_number_id": p}}}),
            None => serde_json::json!({"field": "messages", "value": {"messages": []}}),
        };
        let body = serde_json::json!({"object": "whatsapp_business_account", "entry": [
            {"changes": [change(Some("PN-B")), change(Some("PN-A"))]},
            {"changes": [change(Some("PN-B")), change(None)]},
        ]});
        let named: Vec<String> = channels_named(body.to_string().as_bytes()).into_iter().collect();
        assert_eq!(named, ["", "PN-A", "PN-B"]);

        for not_a_webhook in [&b"garbage"[..], b"{}", br#"{"object":"x","entry":[]}"#] {
            assert_eq!(channels_named(not_a_webhook).into_iter().collect::<Vec<_>>(), [""]);
        }
    }

    #[test]
    fn constant_time_eq_compares_content_and_length() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }
}
