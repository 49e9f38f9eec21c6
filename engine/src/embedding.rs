//! The `hash` embedding: a deterministic bag-of-words vector (feature hashing of words and word
//! pairs), so that Parley runs and its retrieval can be tested without a model. Similar wording
//! scores high; it knows nothing of synonyms.

/// The dimension Parley's knowledge tables use.
pub const DEFAULT_DIMENSIONS: usize = 768;

/// Embeds `text` into an L2-normalised vector of `dims` values.
pub fn hash_embedding(text: &str, dims: usize) -> Vec<f32> {
    let mut v = vec![0f32; dims.max(1)];
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| fold(&w.to_lowercase()))
        .filter(|w| w.chars().count() > 1)
        .collect();
    let mut add = |feature: &str, weight: f32| {
        let h = fnv1a(feature.as_bytes());
        let index = (h % v.len() as u64) as usize;
        let sign = if (h >> 63) == 0 { 1.0 } else { -1.0 };
        v[index] += sign * weight;
    };
    for w in &words {
        add(w, 1.0);
    }
    for pair in words.windows(2) {
        add(&format!("{} {}", pair[0], pair[1]), 0.5);
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// Cosine similarity of two vectors of equal length.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 { 0.0 } else { dot / (na * nb) }
}

/// Strips the accents of Latin letters, so that "réponse" and "reponse" are the same word.
fn fold(word: &str) -> String {
    word.chars()
        .map(|c| match c {
            'à' | 'â' | 'ä' | 'á' => 'a',
            'é' | 'è' | 'ê' | 'ë' => 'e',
            'î' | 'ï' | 'í' => 'i',
            'ô' | 'ö' | 'ó' => 'o',
            'ù' | 'û' | 'ü' | 'ú' => 'u',
            'ç' => 'c',
            'ñ' => 'n',
            other => other,
        })
        .collect()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similar_texts_score_higher_than_unrelated_ones() {
        let q = hash_embedding("Quels sont vos horaires d'ouverture ?", DEFAULT_DIMENSIONS);
        let good = hash_embedding("Nos horaires d'ouverture : du lundi au vendredi, 9h-18h.", DEFAULT_DIMENSIONS);
        let bad = hash_embedding("La livraison est gratuite dès 50 euros d'achat.", DEFAULT_DIMENSIONS);
        assert_eq!(q.len(), 768);
        assert!(cosine(&q, &good) > cosine(&q, &bad) + 0.2);
        assert!((cosine(&q, &q) - 1.0).abs() < 1e-5);
    }

    #[test]
    fn accents_do_not_matter() {
        let a = hash_embedding("réponse", 64);
        let b = hash_embedding("reponse", 64);
        assert!((cosine(&a, &b) - 1.0).abs() < 1e-5);
    }
}
