//! Parley's built-in stages, one file each. Each registers itself with
//! [`engine::register_stage!`]; linking this crate (see [`link`]) makes them known to the loader.

pub mod ack;
pub mod dedupe;
pub mod llm;
pub mod quota_gate;
pub mod rag_retrieve;
pub mod ratelimit;
pub mod send;

/// The checklist's default notices (French), used when a pipeline does not set its own.
pub mod notices {
    pub const RATE_LIMITED: &str = "⚠️ Trop de messages en peu de temps. Merci de réessayer dans quelques instants.";
    pub const QUOTA_EXCEEDED: &str = "⚠️ Ce service a atteint sa limite de messages pour ce mois. Nous ne pouvons pas répondre pour l'instant. Veuillez réessayer le mois prochain ou contacter l'administrateur. Merci de votre compréhension.";
}

/// Call once from a binary that uses these stages. Registration happens at link time, and a
/// crate no code refers to may be left out of the link; this reference keeps it in.
pub fn link() {}

#[cfg(test)]
mod tests {
    #[test]
    fn the_six_builtin_kinds_are_registered() {
        let kinds = engine::registry::kinds();
        for kind in ["dedupe", "ratelimit", "quota-gate", "rag-retrieve", "llm", "send"] {
            assert!(kinds.contains_key(kind), "stage kind `{kind}` is not registered");
        }
    }
}
