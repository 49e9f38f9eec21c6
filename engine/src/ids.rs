//! Domain identifiers: parsed once at the edge, then passed around as types rather than bare
//! strings. `PhoneNumber` never prints itself unmasked.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::masking::mask_phone;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Self {
                Self(value.into())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                Self(value.to_owned())
            }
        }
    };
}

string_id!(
    /// A tenant (one business using Parley).
    TenantId
);
string_id!(
    /// A conversation between one end user and one business number.
    ConversationId
);
string_id!(
    /// A business number connected through a provider.
    ChannelId
);
string_id!(
    /// The provider's id of a message (Meta's `wamid.…`).
    ProviderMessageId
);
string_id!(
    /// One queued job. Stable across retries of that job, different for another delivery of the
    /// same provider message.
    JobId
);

/// An end user's phone number (WhatsApp id). `Display` and `Debug` mask it; only
/// [`PhoneNumber::expose`] gives the digits, for the provider call that needs them.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PhoneNumber(String);

impl PhoneNumber {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The unmasked number: only for the provider API and for pseudonymisation.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&mask_phone(&self.0))
    }
}

impl fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PhoneNumber({})", mask_phone(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_number_never_prints_its_digits() {
        let phone = PhoneNumber::new("+33612345678");
        assert_eq!(phone.to_string(), "+336XXXXXX78");
        assert_eq!(format!("{phone:?}"), "PhoneNumber(+336XXXXXX78)");
        assert_eq!(phone.expose(), "+33612345678");
    }
}
