//! The `[access_log]` config section and the line formats it names.

use serde::{Deserialize, Serialize};

use super::record::AccessRecord;
use super::{DEFAULT_BUFFER, MAX_BUFFER};

/// Line format, config key `access_log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON object per line with every field in [`fields`].
    #[default]
    Json,
    /// Squid's native `logformat squid`, byte for byte.
    Squid,
    /// Apache/NCSA combined.
    Combined,
}

/// The `[access_log]` config section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    /// Line format.
    pub format: Format,
    /// File path, or `-` for stdout.
    pub path: String,
    /// Queue capacity in lines; when full, new requests wait (see the module docs).
    pub buffer: usize,
}

/// An invalid `[access_log]` setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("access_log.buffer = {0}: must be between 1 and {MAX_BUFFER}")]
    Buffer(usize),
    #[error("access_log.path = \"\": must be a file path or \"-\" for stdout")]
    EmptyPath,
}

// === impl AccessLogConfig ===

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            format: Format::Json,
            path: "-".to_owned(),
            buffer: DEFAULT_BUFFER,
        }
    }
}

impl AccessLogConfig {
    /// Check the values serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.buffer == 0 || self.buffer > MAX_BUFFER {
            return Err(ConfigError::Buffer(self.buffer));
        }
        if self.path.is_empty() {
            return Err(ConfigError::EmptyPath);
        }
        Ok(())
    }
}

// === impl Format ===

impl Format {
    /// Append one line for `rec`, newline included. Every value is escaped so that no input can
    /// break the line or start a new one.
    pub fn write_line(self, rec: &AccessRecord, out: &mut Vec<u8>) {
        out.reserve(512);
        match self {
            Format::Json => super::json::write_json(rec, out),
            Format::Squid => super::squid::write_squid(rec, out),
            Format::Combined => super::combined::write_combined(rec, out),
        }
        out.push(b'\n');
    }

    /// Config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Squid => "squid",
            Format::Combined => "combined",
        }
    }
}
