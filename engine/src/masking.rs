//! The one place that hides personal data: phone numbers in logs, and the pseudonym that stands
//! for a sender in Redis keys.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Masks a phone number, keeping the first four and last two characters:
/// `+33612345678` → `+336XXXXXX78`, `33612345678` → `3361XXXXX78`. Short inputs are masked whole.
pub fn mask_phone(raw: &str) -> String {
    const KEEP_HEAD: usize = 4;
    const KEEP_TAIL: usize = 2;
    let count = raw.chars().count();
    if count <= 6 {
        return "X".repeat(count);
    }
    // Byte offsets of the kept head and tail (any characters, not only ASCII digits).
    let head_end = raw.char_indices().nth(KEEP_HEAD).map_or(raw.len(), |(i, _)| i);
    let tail_start = raw.char_indices().nth(count - KEEP_TAIL).map_or(raw.len(), |(i, _)| i);
    let mut out = String::with_capacity(raw.len());
    out.push_str(&raw[..head_end]);
    out.extend(std::iter::repeat_n('X', count - KEEP_HEAD - KEEP_TAIL));
    out.push_str(&raw[tail_start..]);
    out
}

/// Masks every run of 8 or more digits (optionally led by `+`) in free text, for messages that
/// may quote a number (provider error bodies, for instance).
pub fn mask_phones_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        let digits = run.chars().filter(char::is_ascii_digit).count();
        if digits >= 8 {
            out.push_str(&mask_phone(run));
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() || (c == '+' && run.is_empty()) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// A keyed pseudonym for a sender, stable per tenant: HMAC-SHA256(key, tenant ‖ phone), first 16
/// bytes in hex. Keyed, because phone numbers are few enough to brute-force a plain hash.
pub fn sender_pseudonym(key: &[u8], tenant: &str, phone: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(tenant.as_bytes());
    mac.update(&[0]);
    mac.update(phone.as_bytes());
    let digest = mac.finalize().into_bytes();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_like_the_checklist() {
        assert_eq!(mask_phone("+33612345678"), "+336XXXXXX78");
        assert_eq!(mask_phone("15559876543"), "1555XXXXX43");
        assert_eq!(mask_phone("123"), "XXX");
        assert_eq!(mask_phone("1234567"), "1234X67");
        assert_eq!(mask_phone(""), "");
        // Not only ASCII: characters are kept or masked whole.
        assert_eq!(mask_phone("٣٣٦١٢٣٤٥٦٧٨"), "٣٣٦١XXXXX٧٨");
    }

    #[test]
    fn masks_numbers_inside_text() {
        assert_eq!(
            mask_phones_in("recipient 33612345678 is not on WhatsApp (code 131026)"),
            "recipient 3361XXXXX78 is not on WhatsApp (code 131026)"
        );
    }

    #[test]
    fn pseudonym_is_stable_keyed_and_free_of_the_number() {
        let a = sender_pseudonym(b"k1", "t1", "33612345678");
        assert_eq!(a, sender_pseudonym(b"k1", "t1", "33612345678"));
        assert_ne!(a, sender_pseudonym(b"k2", "t1", "33612345678"));
        assert_ne!(a, sender_pseudonym(b"k1", "t2", "33612345678"));
        assert_eq!(a.len(), 32);
        assert!(!a.contains("33612345678"));
    }
}
