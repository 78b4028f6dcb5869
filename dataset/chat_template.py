"""The chat format: role tokens and the Jinja chat template stored in every tokenizer folder.

A conversation is rendered as

    <s><|system|>\\n{system}<|end|>\\n<|user|>\\n{user}<|end|>\\n<|assistant|>\\n{reply}<|end|>\\n

where `<s>`, `<|system|>`, `<|user|>`, `<|assistant|>` and `<|end|>` are control tokens (single ids that
text can never produce). The instruction-tuning stage defines the final template; this module is its one
home, so `dataset/tokenizer.py` writes it into `tokenizer_config.json` and Hugging Face's
`apply_chat_template` renders exactly what our own code builds.
"""

from __future__ import annotations

# Role name (as in {"role": ..., "content": ...} messages) -> control token. "end" closes every turn.
ROLE_TOKENS: dict[str, str] = {
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end": "<|end|>",
}

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role ' + message['role'] + '; expected system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
