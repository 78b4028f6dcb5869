"""The chat page: Gradio's ChatInterface streaming from the same engine as the API.

Multi-turn (the history goes back through the chat template every turn), an editable system prompt, the
sampling controls, stop (frees the request's slot at the next engine step) and clear, the last reply's
speed under the chat. Every message is shown as plain text: a model, or a pasted message, that writes `<img src=x onerror=...>` shows those characters (`plain_text_chatbot`). Gradio runs up to
`concurrency` handlers at once, so several people chatting are decoded in one batch.
"""

from __future__ import annotations

import html
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from serve.api import ServerState
from serve.engine import EngineBusy, SamplingParams
from serve.prompt import PromptError

# Gradio reports usage to its makers unless told not to; a local server sends nothing anywhere.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import gradio as gr
from gradio.components.chatbot import TextMessage

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_MAX_TOKENS = 512


def message_text(content: Any) -> str:
    """The text of a Gradio history message's content (a string, a text part, or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""


def history_messages(history: list[Any]) -> list[dict[str, str]]:
    """Gradio's history as chat messages."""
    messages = []
    for item in history:
        role = item.get("role") if isinstance(item, dict) else None
        if role in ("user", "assistant"):
            messages.append({"role": role, "content": message_text(item.get("content"))})
    return messages


def plain_text_chatbot(**kwargs: Any) -> gr.Chatbot:
    """A gr.Chatbot that shows every message exactly as text.

    The page puts a message's text into the page as HTML even with Markdown off (sanitised, but `<b>` still
    makes bold text), and Gradio dedents text and drops its leading and trailing blank lines on the way. Here
    text goes to the page HTML-escaped and untouched, and comes back unescaped, so the history sent to the
    model again next turn is exactly what was said. (The two conversions are replaced on the instance: a
    subclass of a Gradio component makes Gradio write a .pyi stub beside this file.)
    """
    chatbot = gr.Chatbot(render_markdown=False, **kwargs)
    to_page, from_page = chatbot._postprocess_content, chatbot._preprocess_content

    def postprocess_content(chat_message: Any) -> Any:
        if isinstance(chat_message, str):
            return TextMessage(text=html.escape(chat_message))
        return to_page(chat_message)

    def preprocess_content(chat_message: Any) -> Any:
        if isinstance(chat_message, TextMessage):
            return {"type": "text", "text": html.unescape(chat_message.text)}
        return from_page(chat_message)

    chatbot._postprocess_content = postprocess_content
    chatbot._preprocess_content = preprocess_content
    return chatbot


def speed_line(tokens: int, started: float, first_token_at: float | None, now: float) -> str:
    if not tokens or first_token_at is None:
        return "No tokens generated."
    total = now - started
    decode = now - first_token_at
    rate = (tokens - 1) / decode if tokens > 1 and decode > 0 else tokens / max(total, 1e-9)
    return (
        f"Last reply: {tokens} tokens in {total:.2f} s, **{rate:.1f} tokens/s** "
        f"(first token after {first_token_at - started:.2f} s)"
    )


def build_ui(state: ServerState, *, concurrency: int) -> gr.Blocks:
    """The chat page for `state` (the model may still be loading when it is built)."""

    async def respond(
        message: str,
        history: list[Any],
        system_prompt: str,
        temperature: float,
        top_p: float,
        top_k: float,
        repetition_penalty: float,
        max_tokens: float,
        seed: float | None,
    ) -> AsyncIterator[tuple[str, str]]:
        if not state.ready:
            raise gr.Error("The model is still loading; try again in a moment.")
        engine, prompts = state.engine, state.prompts
        messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
        messages += [*history_messages(history), {"role": "user", "content": message_text(message)}]
        try:
            _, ids = prompts.encode_chat(messages)
        except PromptError as exc:
            raise gr.Error(str(exc)) from None
        room = engine.context_length - len(ids)
        if room < 1:
            raise gr.Error(
                f"The conversation ({len(ids)} tokens) fills the model's context of {engine.context_length} "
                "tokens: clear it to start again."
            )
        params = SamplingParams(
            max_tokens=min(int(max_tokens), room),
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            repetition_penalty=float(repetition_penalty),
            seed=None if seed is None or seed < 0 else int(seed),
        )
        started = time.perf_counter()
        try:
            events = engine.stream(ids, params)
        except EngineBusy:
            raise gr.Error("The server is busy; try again in a moment.") from None
        reply, tokens, first_token_at = "", 0, None
        try:
            async for first in events:
                for event in [first, *events.pending()]:
                    if event.error:
                        raise gr.Error(event.error)
                    tokens = event.completion_tokens
                    if first_token_at is None and tokens:
                        first_token_at = time.perf_counter()
                    reply += event.text
                yield reply, "Generating…"
        finally:
            events.cancel()  # the stop button cancels this generator: free the slot
        yield reply, speed_line(tokens, started, first_token_at, time.perf_counter())

    with gr.Blocks(title=f"Open-Llama chat: {state.model_name}", fill_height=True) as page:
        gr.Markdown(f"### Open-Llama chat · `{state.model_name}`")
        with gr.Sidebar(label="Settings", open=True):
            system_prompt = gr.Textbox(DEFAULT_SYSTEM_PROMPT, label="System prompt", lines=3)
            temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.01, 1, value=0.95, step=0.01, label="Top-p")
            top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)")
            repetition_penalty = gr.Slider(1, 2, value=1.0, step=0.01, label="Repetition penalty")
            max_tokens = gr.Slider(1, 4096, value=DEFAULT_MAX_TOKENS, step=1, label="Max new tokens")
            seed = gr.Number(-1, label="Seed (-1 = random)", precision=0)
        stats = gr.Markdown("", elem_id="reply-stats")
        chatbot = plain_text_chatbot(label="Chat", elem_id="chatbot", scale=1)
        gr.ChatInterface(
            respond,
            chatbot=chatbot,
            textbox=gr.Textbox(
                placeholder="Type a message and press Enter",
                elem_id="chat-input",
                show_label=False,
                scale=7,
                submit_btn=True,
                stop_btn=True,
            ),
            additional_inputs=[
                system_prompt,
                temperature,
                top_p,
                top_k,
                repetition_penalty,
                max_tokens,
                seed,
            ],
            additional_outputs=[stats],
            concurrency_limit=concurrency,
            fill_height=True,
        )
    return page
