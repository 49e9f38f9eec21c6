//! The LLMs behind the engine's `Llm` port: any OpenAI-compatible chat server, Gemini on Vertex
//! AI, and the `local` stand-in that answers from the retrieved knowledge without a model.

pub mod local;
pub mod openai;
pub mod vertex;

pub use local::LocalLlm;
pub use openai::OpenAiLlm;
pub use vertex::VertexLlm;
