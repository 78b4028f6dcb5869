"""The chat server's parts: a batched, streaming generation engine, an OpenAI-compatible API and a Gradio UI."""
