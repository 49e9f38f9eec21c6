//! The `local` LLM, the embedded default: no model and no network. It answers by quoting the most
//! relevant retrieved passage verbatim, or greets the user when nothing was retrieved, so that a
//! fresh install answers from its knowledge base and every test gets the same answer every time.

use engine::{
    async_trait,
    message::KnowledgeChunk,
    ports::{Llm, LlmRequest, LlmResponse, PortError},
};

/// The model name the local LLM reports, whatever model the pipeline asked for: logs must say
/// who really answered.
pub const MODEL: &str = "local";

/// The greeting when no passage was retrieved. It echoes nothing of the user's message.
pub const GREETING: &str = "Bonjour ! Je suis l'assistant virtuel de l'entreprise. Comment puis-je vous aider ?";

/// The introduction of a quoted passage.
pub const QUOTE_INTRO: &str = "D'après nos informations :";

/// The longest quote, in characters: a WhatsApp answer is read on a phone.
const MAX_QUOTE_CHARS: usize = 600;

#[derive(Debug, Default, Clone, Copy)]
pub struct LocalLlm;

impl LocalLlm {
    pub fn new() -> Self {
        Self
    }

    /// The answer to a request: deterministic, a function of the retrieved passages only.
    pub fn answer(knowledge: &[KnowledgeChunk]) -> String {
        match best_passage(knowledge) {
            Some(chunk) => format!("{QUOTE_INTRO} « {} »", excerpt(&chunk.text, MAX_QUOTE_CHARS)),
            None => GREETING.to_owned(),
        }
    }
}

#[async_trait]
impl Llm for LocalLlm {
    async fn complete(&self, request: &LlmRequest) -> Result<LlmResponse, PortError> {
        let text = Self::answer(&request.knowledge);
        // Words stand in for tokens, so that usage figures and dashboards have something to show.
        let prompt_words = request.messages.iter().map(|m| word_count(&m.content)).sum::<usize>();
        Ok(LlmResponse {
            model: MODEL.to_owned(),
            prompt_tokens: Some(saturate(prompt_words)),
            completion_tokens: Some(saturate(word_count(&text))),
            text,
        })
    }
}

/// The highest-scoring passage with some text; the first one wins a tie, so that the answer does
/// not depend on anything but the retrieval order.
fn best_passage(knowledge: &[KnowledgeChunk]) -> Option<&KnowledgeChunk> {
    knowledge.iter().filter(|c| !c.text.trim().is_empty()).fold(None, |best: Option<&KnowledgeChunk>, chunk| match best
    {
        // A NaN score (a broken vector) never beats a real one.
        Some(b) if chunk.score > b.score || (b.score.is_nan() && !chunk.score.is_nan()) => Some(chunk),
        Some(b) => Some(b),
        None => Some(chunk),
    })
}

/// The passage itself when short enough; else its beginning up to the last sentence that fits,
/// or, when a single sentence is too long, up to the last whole word followed by "…".
fn excerpt(text: &str, max_chars: usize) -> String {
    let text = text.trim();
    let Some((limit, _)) = text.char_indices().nth(max_chars) else {
        return text.to_owned();
    };
    let head = &text[..limit];
    let sentence_end = head
        .char_indices()
        .rev()
        .find(|&(i, c)| {
            matches!(c, '.' | '!' | '?' | '…')
                && text[i + c.len_utf8()..].chars().next().is_none_or(char::is_whitespace)
        })
        .map(|(i, c)| i + c.len_utf8())
        // A sentence end in the first few words would leave too little of the passage.
        .filter(|&end| end >= limit / 3);
    match sentence_end {
        Some(end) => head[..end].to_owned(),
        None => {
            let cut = head.rfind(char::is_whitespace).unwrap_or(limit);
            format!("{} …", head[..cut].trim_end())
        }
    }
}

fn word_count(text: &str) -> usize {
    text.split_whitespace().count()
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use engine::ports::{ChatMessage, ChatRole};

    use super::*;

    const HOURS: &str = "Nos horaires d'ouverture : du lundi au vendredi, de 9h à 18h.";
    const DELIVERY: &str = "La livraison est gratuite dès 50 euros d'achat.";

    fn chunk(id: &str, text: &str, score: f32) -> KnowledgeChunk {
        KnowledgeChunk { document_id: id.into(), title: id.into(), text: text.into(), score }
    }

    fn request(user: &str, knowledge: Vec<KnowledgeChunk>) -> LlmRequest {
        LlmRequest {
            model: Some("gemini-1.5-pro".into()),
            messages: vec![
                ChatMessage { role: ChatRole::System, content: "Tu es l'assistant de la boutique.".into() },
                ChatMessage { role: ChatRole::User, content: user.into() },
            ],
            temperature: None,
            max_tokens: Some(512),
            knowledge,
        }
    }

    #[tokio::test]
    async fn question_is_answered_by_quoting_the_most_relevant_passage() {
        let knowledge = vec![chunk("delivery", DELIVERY, 0.41), chunk("hours", HOURS, 0.83)];

        let answer = LocalLlm::new().complete(&request("Quels sont vos horaires ?", knowledge)).await.expect("answer");

        assert_eq!(answer.text, format!("D'après nos informations : « {HOURS} »"));
        assert_eq!(answer.model, "local");
        assert_eq!(answer.prompt_tokens, Some(6 + 5));
        assert_eq!(answer.completion_tokens, Some(u32::try_from(answer.text.split_whitespace().count()).unwrap()));
    }

    #[tokio::test]
    async fn without_knowledge_the_user_is_greeted_and_nothing_is_echoed() {
        let answer = LocalLlm::new()
            .complete(&request("Je suis Jean Dupont, 12 rue des Lilas, rappelez-moi au 0612345678", vec![]))
            .await
            .expect("answer");

        assert_eq!(answer.text, GREETING);
        assert!(!answer.text.contains("Dupont") && !answer.text.contains("0612345678"));
    }

    #[tokio::test]
    async fn same_request_gets_the_same_answer() {
        let knowledge = vec![chunk("a", HOURS, 0.7), chunk("b", DELIVERY, 0.7)];
        let llm = LocalLlm::new();

        let first = llm.complete(&request("Bonjour", knowledge.clone())).await.expect("answer");
        let second = llm.complete(&request("Bonjour", knowledge)).await.expect("answer");

        assert_eq!(first, second);
        assert!(first.text.contains(HOURS), "the first of equal passages wins: {}", first.text);
    }

    #[test]
    fn long_passage_is_cut_at_the_last_sentence_that_fits() {
        let first = "Le retour est gratuit sous trente jours. ".repeat(10);
        let passage = format!("{first}Au-delà, des frais de dix euros s'appliquent à chaque colis renvoyé.");

        let quoted = excerpt(&passage, 420);

        assert_eq!(quoted, first.trim_end());
        assert!(quoted.ends_with("jours."));
    }

    #[test]
    fn one_endless_sentence_is_cut_at_a_word() {
        let passage = "mot ".repeat(300);

        let quoted = excerpt(&passage, 50);

        assert!(quoted.ends_with("mot …"), "{quoted}");
        assert!(quoted.chars().count() <= 52, "{quoted}");
    }

    #[test]
    fn blank_passages_are_not_quoted() {
        assert_eq!(LocalLlm::answer(&[chunk("blank", "   ", 0.9)]), GREETING);
    }
}
