//! Errors that name the offending key, so an operator can fix the file without reading code.

use std::path::PathBuf;

/// Why a configuration was rejected; its `Display` is one self-contained line naming the
/// dotted key (or file/position), so it can be logged as is.
///
/// Underlying errors are folded into the message rather than exposed through
/// [`std::error::Error::source`], so chain-printing reporters (`anyhow`'s `{:#}`) do not
/// repeat them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read; the path says which of several candidate files failed.
    #[error("{}: cannot read: {error}", path.display())]
    Read {
        /// The file that was being read.
        path: PathBuf,
        /// What the OS reported.
        error: std::io::Error,
    },

    /// The text is not valid TOML; the position points the operator at the broken line.
    #[error("TOML syntax error at line {line}, column {column}: {message}")]
    Syntax {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column (in characters) of the error.
        column: usize,
        /// The toml crate's description of the problem.
        message: String,
    },

    /// A key is unknown or its value has the wrong type or spelling; the dotted path is data
    /// because it comes from the user's file.
    #[error("{key}: {message}")]
    Key {
        /// Full dotted path, e.g. `hypervisor.vcpus`.
        key: String,
        /// What is wrong with it, usually the toml/serde message plus its position.
        message: String,
    },

    /// A value parsed but is outside what the runtime can use (range, relative path, ...).
    #[error("{key}: {reason}")]
    Invalid {
        /// Full dotted path, e.g. `vsock.guest_cid`.
        key: &'static str,
        /// What is wrong and what was found.
        reason: String,
    },

    /// A parse or validation error found while loading a file; wrapping it names the file.
    #[error("{}: {error}", path.display())]
    InFile {
        /// The file that contained the error.
        path: PathBuf,
        /// The error inside that file (never another `InFile`).
        error: Box<ConfigError>,
    },
}

impl ConfigError {
    /// The dotted key at fault, so callers and tests can react to a key without parsing text.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Key { key, .. } => Some(key),
            Self::Invalid { key, .. } => Some(key),
            Self::InFile { error, .. } => error.key(),
            Self::Read { .. } | Self::Syntax { .. } => None,
        }
    }

    /// Turns a syntax error from the toml crate into a one-line message with line/column.
    pub(crate) fn syntax(src: &str, err: &toml::de::Error) -> Self {
        let (line, column) = err.span().map_or((1, 1), |span| line_col(src, span.start));
        Self::Syntax {
            line,
            column,
            message: one_line(err.message()),
        }
    }

    /// Turns a typed-deserialization error into a `Key` error carrying the serde path.
    pub(crate) fn from_path_error(
        src: &str,
        err: &serde_path_to_error::Error<toml::de::Error>,
    ) -> Self {
        let inner = err.inner();
        let mut message = one_line(inner.message());
        if let Some(span) = inner.span() {
            let (line, column) = line_col(src, span.start);
            message.push_str(&format!(" (line {line}, column {column})"));
        }
        let path = err.path().to_string();
        // serde_path_to_error spells the root as "."; an empty file cannot fail, but a
        // non-table root could only come from a bug, so keep the message meaningful.
        let key = if path == "." {
            "(root)".to_owned()
        } else {
            path
        };
        Self::Key { key, message }
    }
}

/// Why a `FromStr` on one of the config enums failed; shared by the file parser and CLI flags
/// so both report the same accepted spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown value {value:?}, expected one of {}", expected.join(", "))]
pub struct ParseEnumError {
    value: String,
    expected: &'static [&'static str],
}

impl ParseEnumError {
    /// Built by the enums' `FromStr`; `expected` lists every accepted spelling.
    pub(crate) fn new(value: &str, expected: &'static [&'static str]) -> Self {
        Self {
            value: value.to_owned(),
            expected,
        }
    }
}

/// 1-based (line, column) of a byte offset; columns count characters, as editors do.
fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let mut line = 1;
    let mut column = 1;
    for (i, c) in src.char_indices() {
        if i >= offset {
            break;
        }
        if c == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    (line, column)
}

/// Keeps every error on one log line even if the toml crate's message spans several.
fn one_line(message: &str) -> String {
    message
        .trim()
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("abc", 0), (1, 1));
        assert_eq!(line_col("abc\ndef", 5), (2, 2));
        assert_eq!(line_col("é\nx", 3), (2, 1));
        assert_eq!(line_col("ab", 99), (1, 3));
    }

    #[test]
    fn one_line_joins_lines() {
        assert_eq!(one_line("a\n  b\n"), "a; b");
    }

    #[test]
    fn key_sees_through_in_file() {
        let err = ConfigError::InFile {
            path: PathBuf::from("/etc/x.toml"),
            error: Box::new(ConfigError::Invalid {
                key: "vsock.guest_cid",
                reason: "bad".to_owned(),
            }),
        };
        assert_eq!(err.key(), Some("vsock.guest_cid"));
        assert_eq!(err.to_string(), "/etc/x.toml: vsock.guest_cid: bad");
    }

    #[test]
    fn parse_enum_error_lists_choices() {
        let err = ParseEnumError::new("kvm", &["auto", "qemu"]);
        assert_eq!(
            err.to_string(),
            r#"unknown value "kvm", expected one of auto, qemu"#
        );
    }
}
