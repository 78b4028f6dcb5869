"""The chat server put together: config, model loading, the API and the UI on one FastAPI app, uvicorn.

The server listens at once and loads the model in a background thread: /health answers 503 until the
engine is ready, then 200. The Gradio page is mounted at / on the same app, so one process and one port
serve both, and the UI's requests are batched with the API's by the one engine.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from jsonargparse.typing import restricted_number_type

from dataset.chat_template import ROLE_TOKENS
from models.hf import recorded_model_name
from serve.api import ServerState, build_api
from serve.engine import Engine, EngineConfig

log = logging.getLogger("serve")
API_KEY_ENV = "OPEN_LLAMA_API_KEY"
SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "repetition_penalty")
Port = restricted_number_type(
    None, int, [(">=", 1), ("<=", 65535)]
)  # named by its bounds, as in jsonargparse


@dataclasses.dataclass
class ServerConfig:
    """What to serve and where."""

    model: str = ""
    """A Hugging Face Llama folder with a chat template in its tokenizer (ours, or anyone's)."""
    host: str = "127.0.0.1"
    """Address to listen on; only this machine can connect unless you choose another (e.g. 0.0.0.0)."""
    port: Port = 7860
    """Port for both the chat page (/) and the API (/v1)."""
    api_key: str | None = None
    """Require 'Authorization: Bearer KEY' on the API (and KEY as the chat page's password); default: the
    OPEN_LLAMA_API_KEY environment variable, which, unlike a flag, other users cannot see in `ps`."""
    model_name: str = ""
    """The model's name in /v1/models, in requests' `model` field and on the chat page; empty = the name the
    export records (its training run's, e.g. demo-sft), else the folder's name."""
    ui: bool = True
    """Serve the Gradio chat page at / (false: the API only)."""


@dataclasses.dataclass
class ChatServerConfig:
    """The chat server: the model and address (server), and how the engine batches (engine)."""

    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)


def stop_token_ids(folder: Path, tokenizer) -> list[int]:
    """Ids that end a reply: generation_config.json's eos ids, the tokenizer's eos, and our end-of-turn token.

    The end-of-turn token closes every turn in our chat template; models fine-tuned on it stop there
    whatever their generation config says (exports made before it was listed there included).
    """
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    end_of_turn = tokenizer.convert_tokens_to_ids(ROLE_TOKENS["end"])
    if end_of_turn is not None and end_of_turn in tokenizer.all_special_ids:
        ids.add(end_of_turn)
    return sorted(ids)


def sampling_defaults(folder: Path) -> dict[str, float]:
    """The folder's own sampling defaults (generation_config.json), used when a request gives none."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    defaults = {k: config[k] for k in SAMPLING_DEFAULTS if isinstance(config.get(k), (int, float))}
    if config.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults


def load(state: ServerState, folder: str | Path, engine_config: EngineConfig) -> None:
    """Load the model folder into `state` (the tokenizer, the model on its device, the engine)."""
    from transformers import AutoTokenizer

    from models.hf import load_hf
    from models.llama import RunOptions
    from serve.prompt import PromptBuilder

    folder = Path(folder)
    device = engine_config.torch_device()
    dtype = engine_config.torch_dtype(device)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))  # tokenizer.json: data, no code
    prompts = PromptBuilder(tokenizer)
    if not prompts.has_chat_template:
        log.warning(
            "%s has no chat template: /v1/chat/completions and the chat page will refuse requests", folder
        )
    elif (problem := prompts.check_against_transformers()) is not None:
        log.warning("prompt ids differ from transformers' apply_chat_template on a sample: %s", problem)
    # sdpa: the decoding step attends from rows at different positions through an explicit mask.
    model = load_hf(folder, options=RunOptions(attention_backend="sdpa"), dtype=dtype, device=device)
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}"
        )
    stops = stop_token_ids(folder, tokenizer)
    engine = Engine(model, tokenizer.backend_tokenizer, stops, engine_config)
    state.defaults = sampling_defaults(folder)
    state.prompts, state.engine = prompts, engine
    cache_gib = (engine.cache.k.numel() + engine.cache.v.numel()) * engine.cache.k.element_size() / 2**30
    log.info(
        "serving %s: %d parameters, %s on %s, context %d, %d slots (KV cache %.2f GiB), stop ids %s",
        state.model_name, model.num_parameters(), str(dtype).removeprefix("torch."), device,
        engine.context_length, engine_config.slots, cache_gib, stops,
    )  # fmt: skip


def build_app(state: ServerState, config: ChatServerConfig, *, load_in_background: bool = True) -> FastAPI:
    """The API (+ the chat page) for `state`; with `load_in_background`, the model loads once the app starts."""
    api_key = config.server.api_key

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if load_in_background and not state.ready:
            threading.Thread(
                target=_load_logged, args=(state, config), name="serve-load", daemon=True
            ).start()
        yield
        if load_in_background and state.engine is not None:
            state.engine.close()

    app = build_api(state, api_key)
    app.router.lifespan_context = lifespan
    if config.server.ui:
        import gradio as gr

        from serve.ui import build_ui

        engine = config.engine
        page = build_ui(state, concurrency=engine.slots + engine.max_queue)

        def password_is_key(_: str, password: str) -> bool:
            return hmac.compare_digest(password.encode(), api_key.encode())

        app = gr.mount_gradio_app(
            app, page, path="/", auth=password_is_key if api_key else None, ssr_mode=False, footer_links=[]
        )
    return app


def _load_logged(state: ServerState, config: ChatServerConfig) -> None:
    try:
        load(state, config.server.model, config.engine)
    except Exception as exc:  # reported by /health and every route, and in the log
        log.exception("could not load %s", config.server.model)
        state.load_error = f"{type(exc).__name__}: {exc}"


def resolve(config: ChatServerConfig) -> ChatServerConfig:
    """Check the config and fill in what it leaves open (the API key from the environment, the model name)."""
    server = config.server
    if not server.model:
        raise ValueError("give the model folder: --model DIR")
    folder = Path(server.model)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: not a Hugging Face model folder (no config.json)")
    api_key = server.api_key if server.api_key is not None else os.environ.get(API_KEY_ENV) or None
    name = server.model_name or recorded_model_name(folder) or folder.resolve().name
    return dataclasses.replace(config, server=dataclasses.replace(server, api_key=api_key, model_name=name))


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(config: ChatServerConfig) -> None:
    """Run the server until interrupted."""
    import uvicorn

    config = resolve(config)
    server = config.server
    if not is_loopback(server.host) and server.api_key is None:
        log.warning(
            "listening on %s without an API key: anyone who can reach it can use the model", server.host
        )
    state = ServerState(model_name=server.model_name)
    app = build_app(state, config)
    where = f"http://{server.host}:{server.port}"
    log.info("chat page %s/ , API %s/v1 (loading %s in the background)", where, where, server.model)
    uvicorn.run(app, host=server.host, port=server.port, log_level="info", timeout_graceful_shutdown=5)
