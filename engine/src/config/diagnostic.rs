//! Problems found in a pipeline file: each with its severity, file, key path and line, errors kept
//! apart from warnings.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    /// The file as the caller named it.
    pub file: String,
    /// Dotted TOML key path (`stages[1].conversation.limit`); empty for the whole file.
    pub path: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": {level}: ")?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Why a pipeline file was refused: at least one error, plus whatever warnings were found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LoadError {
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for d in self.errors.iter().chain(&self.warnings) {
            if !first {
                f.write_str("\n")?;
            }
            first = false;
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Collects diagnostics while a file is checked.
#[derive(Debug, Default)]
pub(crate) struct Collector {
    pub(crate) items: Vec<Diagnostic>,
}

impl Collector {
    pub(crate) fn push(&mut self, severity: Severity, file: &str, path: String, line: Option<usize>, message: String) {
        let d = Diagnostic { severity, file: file.to_owned(), path, line, message };
        if !self.items.contains(&d) {
            self.items.push(d);
        }
    }

    pub(crate) fn split(mut self) -> (Vec<Diagnostic>, Vec<Diagnostic>) {
        self.items.sort_by_key(|d| (d.line.unwrap_or(usize::MAX), d.path.clone()));
        self.items.into_iter().partition(|d| d.severity == Severity::Error)
    }
}
