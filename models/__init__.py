"""Open-Llama: the Llama model, attention backends, Hugging Face import/export."""
