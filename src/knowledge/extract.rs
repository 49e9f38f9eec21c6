//! Text extraction from an uploaded original: .txt and .md as UTF-8 text, .html rendered to text
//! (scripts and styles dropped, h1–h6 kept as markdown `#` headings so that chunking sees the
//! sections), .pdf through `pdf-extract`.

use std::path::Path;

/// The largest original accepted, per file: bounds the memory an upload takes while it is
/// extracted and embedded.
pub const MAX_FILE_BYTES: usize = 10 * 1024 * 1024;

/// The formats the knowledge base accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocumentKind {
    Text,
    Markdown,
    Html,
    Pdf,
}

impl DocumentKind {
    /// The kind of a file, from its extension (case-insensitive).
    pub fn from_name(name: &str) -> Option<Self> {
        let ext = Path::new(name).extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "txt" | "text" => Some(Self::Text),
            "md" | "markdown" => Some(Self::Markdown),
            "html" | "htm" => Some(Self::Html),
            "pdf" => Some(Self::Pdf),
            _ => None,
        }
    }

    /// The MIME type stored with the document.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Text => "text/plain",
            Self::Markdown => "text/markdown",
            Self::Html => "text/html",
            Self::Pdf => "application/pdf",
        }
    }
}

/// Why a file's text could not be extracted. The message is the document's `error` reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    #[error("unsupported file type (accepted: .txt, .md, .html, .pdf)")]
    Unsupported,
    #[error("file too large: {bytes} bytes, the limit is {limit} bytes")]
    TooLarge { bytes: usize, limit: usize },
    #[error("not valid UTF-8 text")]
    NotUtf8,
    #[error("unreadable HTML: {0}")]
    Html(String),
    #[error("unreadable PDF: {0}")]
    Pdf(String),
    #[error("no text found in the document")]
    Empty,
}

/// The text of `bytes`, a file of `kind`. Never panics: a PDF parser panic becomes
/// [`ExtractError::Pdf`].
pub fn extract(kind: DocumentKind, bytes: &[u8]) -> Result<String, ExtractError> {
    if bytes.len() > MAX_FILE_BYTES {
        return Err(ExtractError::TooLarge { bytes: bytes.len(), limit: MAX_FILE_BYTES });
    }
    let text = match kind {
        DocumentKind::Text | DocumentKind::Markdown => utf8(bytes)?.to_owned(),
        DocumentKind::Html => html_to_text(utf8(bytes)?)?,
        DocumentKind::Pdf => pdf_to_text(bytes)?,
    };
    // Windows line ends and NULs (PostgreSQL refuses them in text) would only get in the way.
    let text = text.replace("\r\n", "\n").replace('\0', "");
    if text.trim().is_empty() {
        return Err(ExtractError::Empty);
    }
    Ok(text)
}

fn utf8(bytes: &[u8]) -> Result<&str, ExtractError> {
    let text = std::str::from_utf8(bytes).map_err(|_| ExtractError::NotUtf8)?;
    // A byte-order mark is not text.
    Ok(text.strip_prefix('\u{feff}').unwrap_or(text))
}

fn html_to_text(html: &str) -> Result<String, ExtractError> {
    // A very wide line: html2text wraps at this width, and wrapped lines would cut sentences.
    html2text::config::plain_no_decorate()
        .no_table_borders()
        .string_from_read(html.as_bytes(), 100_000)
        .map_err(|e| ExtractError::Html(e.to_string()))
}

fn pdf_to_text(bytes: &[u8]) -> Result<String, ExtractError> {
    if !bytes.starts_with(b"%PDF-") {
        return Err(ExtractError::Pdf("missing the %PDF header".into()));
    }
    // pdf-extract indexes and unwraps freely inside malformed files: a corrupt upload must fail
    // that document, not the process.
    let owned = bytes.to_vec();
    match std::panic::catch_unwind(move || pdf_extract::extract_text_from_mem(&owned)) {
        Ok(Ok(text)) => Ok(text),
        Ok(Err(e)) => Err(ExtractError::Pdf(e.to_string())),
        Err(_) => Err(ExtractError::Pdf("the file is corrupt (the PDF parser gave up)".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_come_from_the_extension() {
        assert_eq!(DocumentKind::from_name("FAQ.MD"), Some(DocumentKind::Markdown));
        assert_eq!(DocumentKind::from_name("a/b/page.htm"), Some(DocumentKind::Html));
        assert_eq!(DocumentKind::from_name("notice.pdf"), Some(DocumentKind::Pdf));
        assert_eq!(DocumentKind::from_name("notes.txt"), Some(DocumentKind::Text));
        assert_eq!(DocumentKind::from_name("image.png"), None);
        assert_eq!(DocumentKind::from_name("README"), None);
    }

    #[test]
    fn html_loses_scripts_styles_and_tags_but_keeps_headings() {
        let html = "<html><head><style>p{color:red}</style><script>var secret = 1;</script></head>\
                    <body><h1>Livraison</h1><p>Gratuite dès <b>50 €</b>.</p><h2>Délais</h2><p>48 heures.</p></body></html>";
        let text = extract(DocumentKind::Html, html.as_bytes()).unwrap();
        assert!(!text.contains("secret") && !text.contains("color"), "{text}");
        assert!(!text.contains('<'), "{text}");
        assert!(text.contains("Gratuite dès 50 €"), "{text}");
        assert!(text.lines().any(|l| l.trim() == "# Livraison"), "{text}");
        assert!(text.lines().any(|l| l.trim() == "## Délais"), "{text}");
    }

    #[test]
    fn a_corrupt_pdf_is_an_error_not_a_panic() {
        let corrupt = b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF";
        let err = extract(DocumentKind::Pdf, corrupt).unwrap_err();
        assert!(matches!(err, ExtractError::Pdf(_)), "{err:?}");
        let err = extract(DocumentKind::Pdf, b"not a pdf at all").unwrap_err();
        assert_eq!(err.to_string(), "unreadable PDF: missing the %PDF header");
    }

    /// A one-page PDF showing `text` in Helvetica, with a correct cross-reference table.
    fn pdf(text: &str) -> Vec<u8> {
        let stream = format!("BT /F1 12 Tf 72 720 Td ({text}) Tj ET");
        let objects = [
            "<< /Type /Catalog /Pages 2 0 R >>".to_owned(),
            "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_owned(),
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R \
             /Resources << /Font << /F1 5 0 R >> >> >>"
                .to_owned(),
            format!("<< /Length {} >>\nstream\n{stream}\nendstream", stream.len()),
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>".to_owned(),
        ];
        let mut out = b"%PDF-1.4\n".to_vec();
        let mut offsets = Vec::new();
        for (i, object) in objects.iter().enumerate() {
            offsets.push(out.len());
            out.extend(format!("{} 0 obj\n{object}\nendobj\n", i + 1).bytes());
        }
        let xref = out.len();
        out.extend(format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).bytes());
        for offset in offsets {
            out.extend(format!("{offset:010} 00000 n \n").bytes());
        }
        out.extend(format!("trailer << /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF", objects.len() + 1).bytes());
        out
    }

    #[test]
    fn a_pdf_gives_its_text() {
        let text = extract(DocumentKind::Pdf, &pdf("Livraison gratuite des 50 euros")).unwrap();
        assert!(text.contains("Livraison gratuite des 50 euros"), "{text:?}");
    }

    #[test]
    fn oversized_empty_and_binary_files_are_refused() {
        let big = vec![b'a'; MAX_FILE_BYTES + 1];
        assert!(matches!(extract(DocumentKind::Text, &big), Err(ExtractError::TooLarge { .. })));
        assert_eq!(extract(DocumentKind::Text, b"  \n\n "), Err(ExtractError::Empty));
        assert_eq!(extract(DocumentKind::Text, &[0xff, 0xfe, 0x00]), Err(ExtractError::NotUtf8));
    }
}
