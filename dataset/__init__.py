"""Open-Llama: tokenizer and datasets (pretraining stream, instruction and preference data)."""
