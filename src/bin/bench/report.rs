//! The results table each scenario prints: one row per figure, with its target and whether it is
//! met, in Markdown so that it can go into BENCHMARKS.md as printed.

/// Whether a figure meets its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// A figure without a target.
    Info,
}

impl Verdict {
    pub fn of(met: bool) -> Self {
        if met { Self::Met } else { Self::Missed }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Met => "met",
            Self::Missed => "**missed**",
            Self::Info => "",
        }
    }
}

pub struct Table {
    title: String,
    rows: Vec<(String, String, String, Verdict)>,
    notes: Vec<String>,
}

impl Table {
    pub fn new(title: impl Into<String>) -> Self {
        Self { title: title.into(), rows: Vec::new(), notes: Vec::new() }
    }

    /// A figure without a target.
    pub fn info(&mut self, metric: impl Into<String>, value: impl Into<String>) {
        self.rows.push((metric.into(), value.into(), String::new(), Verdict::Info));
    }

    /// A figure with its target.
    pub fn target(
        &mut self,
        metric: impl Into<String>,
        value: impl Into<String>,
        target: impl Into<String>,
        verdict: Verdict,
    ) {
        self.rows.push((metric.into(), value.into(), target.into(), verdict));
    }

    /// A line printed under the table.
    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    pub fn print(&self) {
        println!("\n### {}\n", self.title);
        println!("| figure | value | target | |");
        println!("|---|---|---|---|");
        for (metric, value, target, verdict) in &self.rows {
            println!("| {metric} | {value} | {target} | {} |", verdict.label());
        }
        if !self.notes.is_empty() {
            println!();
            for note in &self.notes {
                println!("- {note}");
            }
        }
        println!();
    }
}
