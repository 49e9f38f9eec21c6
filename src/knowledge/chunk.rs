//! Chunking: a document's text cut into passages of about [`ChunkOptions::max_tokens`] tokens
//! with an overlap, along its structure. Markdown `#` headings (HTML headings arrive as such, see
//! [`super::extract`]) open sections, and a chunk never spans two sections; inside a section, a
//! chunk ends at a paragraph break when one falls in its second half. Each chunk carries its
//! section's heading path ("Livraison > Délais").
//!
//! Tokens are approximated by whitespace-separated words: a French word averages about 1.3
//! tokens of the usual embedding models, well within their input limits at these sizes, and no
//! tokenizer model has to ship with Parley.

/// How to cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkOptions {
    /// Words per chunk at most.
    pub max_tokens: usize,
    /// Words a chunk repeats from the end of the previous one in the same section, so that a
    /// sentence cut at a boundary is whole in one of them.
    pub overlap_tokens: usize,
}

impl Default for ChunkOptions {
    fn default() -> Self {
        Self { max_tokens: 200, overlap_tokens: 40 }
    }
}

/// One passage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The heading path of its section; `None` before the first heading.
    pub section: Option<String>,
    /// The passage (paragraph breaks kept as blank lines).
    pub text: String,
}

impl Chunk {
    /// What is stored, embedded and shown to the LLM: the section, then the passage, so that a
    /// question naming the topic finds it and the answer knows its context.
    pub fn content(&self) -> String {
        match &self.section {
            Some(section) => format!("{section}\n\n{}", self.text),
            None => self.text.clone(),
        }
    }
}

/// The text's first top-level heading, for a document title.
pub fn first_heading(text: &str) -> Option<String> {
    text.lines().find_map(|line| heading(line).map(|(_, title)| title.to_owned())).filter(|t| !t.is_empty())
}

/// A markdown ATX heading: its level (1–6) and title.
fn heading(line: &str) -> Option<(usize, &str)> {
    let line = line.trim();
    let level = line.chars().take_while(|&c| c == '#').count();
    if level == 0 || level > 6 {
        return None;
    }
    let rest = &line[level..];
    // `#hashtag` is not a heading.
    if !rest.is_empty() && !rest.starts_with(' ') {
        return None;
    }
    Some((level, rest.trim().trim_end_matches('#').trim()))
}

/// A section: its heading path and its paragraphs, each a list of words.
struct Section {
    path: Option<String>,
    paragraphs: Vec<Vec<String>>,
}

fn sections(text: &str) -> Vec<Section> {
    let mut out = vec![Section { path: None, paragraphs: Vec::new() }];
    let mut headings: Vec<(usize, String)> = Vec::new();
    let mut paragraph: Vec<String> = Vec::new();
    for line in text.lines() {
        if let Some((level, title)) = heading(line) {
            flush(&mut out, &mut paragraph);
            headings.retain(|(l, _)| *l < level);
            if !title.is_empty() {
                headings.push((level, title.to_owned()));
            }
            let path = headings.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>().join(" > ");
            out.push(Section { path: (!path.is_empty()).then_some(path), paragraphs: Vec::new() });
        } else if line.trim().is_empty() {
            flush(&mut out, &mut paragraph);
        } else {
            paragraph.extend(line.split_whitespace().map(str::to_owned));
        }
    }
    flush(&mut out, &mut paragraph);
    out.retain(|s| !s.paragraphs.is_empty());
    out
}

fn flush(sections: &mut [Section], paragraph: &mut Vec<String>) {
    if !paragraph.is_empty()
        && let Some(last) = sections.last_mut()
    {
        last.paragraphs.push(std::mem::take(paragraph));
    }
}

/// The chunks of `text`, in order.
pub fn chunk(text: &str, options: ChunkOptions) -> Vec<Chunk> {
    let max = options.max_tokens.max(1);
    // An overlap as large as the chunk would never advance.
    let overlap = options.overlap_tokens.min(max / 2);
    let mut out = Vec::new();
    for section in sections(text) {
        // The section's words, and the positions where a paragraph ends.
        let mut words: Vec<&str> = Vec::new();
        let mut breaks: Vec<usize> = Vec::new();
        for p in &section.paragraphs {
            words.extend(p.iter().map(String::as_str));
            breaks.push(words.len());
        }
        let mut start = 0;
        while start < words.len() {
            let mut end = (start + max).min(words.len());
            if end < words.len()
                && let Some(&b) = breaks.iter().rev().find(|&&b| b > start + max / 2 && b <= end)
            {
                end = b;
            }
            let mut text = String::new();
            for (i, word) in words[start..end].iter().enumerate() {
                let at = start + i;
                if i > 0 {
                    text.push_str(if breaks.contains(&at) { "\n\n" } else { " " });
                }
                text.push_str(word);
            }
            out.push(Chunk { section: section.path.clone(), text });
            if end == words.len() {
                break;
            }
            start = end.saturating_sub(overlap).max(start + 1);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(n: usize, prefix: &str) -> String {
        (0..n).map(|i| format!("{prefix}{i}")).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn each_chunk_stays_in_its_section_and_carries_its_heading_path() {
        let text = "Intro sans titre.\n\n# Livraison\nGratuite dès 50 €.\n\n## Délais\nSous 48 heures.\n\n# Retours\n30 jours.";
        let chunks = chunk(text, ChunkOptions::default());
        let got: Vec<(Option<&str>, &str)> = chunks.iter().map(|c| (c.section.as_deref(), c.text.as_str())).collect();
        assert_eq!(
            got,
            [
                (None, "Intro sans titre."),
                (Some("Livraison"), "Gratuite dès 50 €."),
                (Some("Livraison > Délais"), "Sous 48 heures."),
                (Some("Retours"), "30 jours."),
            ]
        );
        assert_eq!(chunks[2].content(), "Livraison > Délais\n\nSous 48 heures.");
        assert_eq!(first_heading(text).as_deref(), Some("Livraison"));
    }

    #[test]
    fn long_sections_are_cut_with_overlap_and_at_paragraph_breaks() {
        let text = format!("# Long\n{}\n\n{}", words(70, "a"), words(70, "b"));
        let chunks = chunk(&text, ChunkOptions { max_tokens: 100, overlap_tokens: 10 });
        // The first chunk ends at the paragraph break (70 words, past half of 100), not mid-paragraph.
        assert_eq!(chunks[0].text, words(70, "a"));
        // The next one repeats the last 10 words of the first.
        assert!(chunks[1].text.starts_with("a60 a61"), "{}", chunks[1].text);
        assert!(chunks[1].text.contains("a69\n\nb0"), "{}", chunks[1].text);
        assert!(chunks[1].text.ends_with("b69"));
        assert_eq!(chunks.len(), 2);

        let one_paragraph = words(250, "w");
        let chunks = chunk(&one_paragraph, ChunkOptions { max_tokens: 100, overlap_tokens: 20 });
        let sizes: Vec<usize> = chunks.iter().map(|c| c.text.split_whitespace().count()).collect();
        assert_eq!(sizes, [100, 100, 90]);
        assert!(chunks[1].text.starts_with("w80 "));
        assert!(chunks.iter().all(|c| c.section.is_none()));
    }

    #[test]
    fn hashtags_are_not_headings_and_empty_text_gives_no_chunk() {
        let chunks = chunk("#promo du jour\nsuite", ChunkOptions::default());
        assert_eq!(chunks, [Chunk { section: None, text: "#promo du jour suite".into() }]);
        assert!(chunk("\n\n# Titre seul\n\n", ChunkOptions::default()).is_empty());
    }
}
