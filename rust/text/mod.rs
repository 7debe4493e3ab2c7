//! Text: Gemma's tokenizer (from tokenizer.json or a GGUF vocabulary) and chat templates.

pub mod chat_template;
pub mod tokenizer;
