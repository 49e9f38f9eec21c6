//! Durations written the way operators write them in TOML: `"500ms"`, `"30s"`, `"5m"`, `"24h"`.

use std::{borrow::Cow, fmt, str::FromStr, time::Duration};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A positive duration parsed from a human string (humantime syntax: `30s`, `5m`, `1h 30m`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConfigDuration(Duration);

impl ConfigDuration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }
    pub const fn from_millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }
    pub const fn get(self) -> Duration {
        self.0
    }
}

impl From<ConfigDuration> for Duration {
    fn from(value: ConfigDuration) -> Self {
        value.0
    }
}

impl FromStr for ConfigDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let d = humantime::parse_duration(s.trim())
            .map_err(|e| format!("`{s}` is not a duration ({e}); write e.g. \"500ms\", \"30s\", \"5m\", \"24h\""))?;
        if d.is_zero() {
            return Err(format!("`{s}` is zero; a duration must be positive"));
        }
        Ok(Self(d))
    }
}

/// Prints the way operators write durations: one unit, the largest that divides it among h, m,
/// s and ms (`24h`, `5m`, `90s`, `500ms`), never days, since the checklist speaks in hours.
impl fmt::Display for ConfigDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            return match self.0.subsec_nanos() % 1_000_000 {
                0 => write!(f, "{ms}ms"),
                _ => write!(f, "{}", humantime::format_duration(self.0)),
            };
        }
        let s = ms / 1000;
        match s {
            _ if s.is_multiple_of(3600) => write!(f, "{}h", s / 3600),
            _ if s.is_multiple_of(60) => write!(f, "{}m", s / 60),
            _ => write!(f, "{s}s"),
        }
    }
}

impl fmt::Debug for ConfigDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

impl Serialize for ConfigDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The pattern the schema gives editors; the parser above is the authority.
pub const DURATION_PATTERN: &str = r"^\s*[0-9]+\s*[a-zµ]+(\s*[0-9]+\s*[a-zµ]+)*\s*$";

impl JsonSchema for ConfigDuration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "A duration such as \"500ms\", \"30s\", \"5m\" or \"24h\".",
            "examples": ["30s", "5m", "24h"]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_operator_durations() {
        assert_eq!("30s".parse::<ConfigDuration>().unwrap().get(), Duration::from_secs(30));
        assert_eq!("5m".parse::<ConfigDuration>().unwrap().get(), Duration::from_secs(300));
        assert_eq!("24h".parse::<ConfigDuration>().unwrap().get(), Duration::from_secs(86_400));
        assert_eq!("500ms".parse::<ConfigDuration>().unwrap().get(), Duration::from_millis(500));
    }

    #[test]
    fn rejects_bare_numbers_and_zero() {
        assert!("30".parse::<ConfigDuration>().unwrap_err().contains("not a duration"));
        assert!("0s".parse::<ConfigDuration>().unwrap_err().contains("positive"));
    }

    #[test]
    fn displays_back_to_the_same_text() {
        for text in ["5m", "24h", "48h", "90s", "500ms", "30s"] {
            assert_eq!(text.parse::<ConfigDuration>().unwrap().to_string(), text);
        }
        assert_eq!("1h 30m".parse::<ConfigDuration>().unwrap().to_string(), "90m");
    }
}
