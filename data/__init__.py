"""Open-Llama: data pipeline package."""
