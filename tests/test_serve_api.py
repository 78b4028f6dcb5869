"""The chat server over HTTP: the real `openai` client and a real browser against a live server on 127.0.0.1.

One server per module (uvicorn in a thread, the model loaded once, 4 slots and a queue of 12); a second one
shares its engine to test the API key; one test starts `chat_server.py` itself as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import uvicorn

from serve.api import ServerState
from serve.app import API_KEY_ENV, ChatServerConfig, ServerConfig, build_app, load, resolve
from serve.engine import EngineConfig
from tests.helpers.serve import MODEL_NAME as MODEL

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 from a thread, stopped by `stop()`."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def config(our_folder) -> ChatServerConfig:
    """No --model_name: the server takes the name the export records (its run's), not the folder's."""
    server = ServerConfig(model=str(our_folder))
    return resolve(ChatServerConfig(server=server, engine=EngineConfig(slots=4, max_queue=12)))


@pytest.fixture(scope="module")
def state(our_folder, config):
    state = ServerState(model_name=config.server.model_name)
    load(state, our_folder, config.engine)
    yield state
    state.engine.close()


@pytest.fixture(scope="module")
def server(state, config):
    live = LiveServer(build_app(state, config, load_in_background=False))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def wait_idle(server: LiveServer, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{server.url}/health").json()
        if health["running"] == 0 and health["waiting"] == 0:
            return health
        assert time.monotonic() < deadline, f"requests still running: {health}"
        time.sleep(0.02)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# ---- the happy paths ----------------------------------------------------------------------------------------


def test_models_and_health(server, client, our_folder):
    assert our_folder.name != MODEL  # the id is the name the export records
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "model": MODEL, "running": 0, "waiting": 0, "slots": 4}


def test_chat_streamed_equals_not_streamed_with_exact_usage(server, client):
    messages = [{"role": "system", "content": "Be brief."}, *user("the time of day")]
    prompt_tokens = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()["count"]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-") and whole.created > 0
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens, 20)
    assert whole.usage.total_tokens == prompt_tokens + 20

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content


def test_the_event_stream_is_openais_format(server):
    body = {"model": MODEL, "messages": user("hello"), "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["finish_reason"] for e in events].count("length") == 1


def test_completions_streamed_and_not(client):
    whole = client.completions.create(model=MODEL, prompt="the time of", max_tokens=12, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="the time of", max_tokens=12, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]


def test_stop_strings_cut_the_reply(client):
    free = client.chat.completions.create(model=MODEL, messages=user("hello"), max_tokens=30, temperature=0)
    text = free.choices[0].message.content
    cut = text.index(" ", len(text) // 2)
    stop = text[cut : cut + 3]
    stopped = client.chat.completions.create(
        model=MODEL, messages=user("hello"), max_tokens=30, temperature=0, stop=[stop, "never"]
    )
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 30
    streamed = client.chat.completions.create(
        model=MODEL, messages=user("hello"), max_tokens=30, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[: text.index(stop)]


def test_sixteen_concurrent_greedy_requests_equal_the_same_one_by_one(server, client):
    """8 chat and 8 raw completions (whose last words differ, so do their replies), alone and all at once."""
    words = ["time", "one", "two", "more", "day", "people", "water", "first"]
    chats = [f"the {word} of day" for word in words]
    raws = [f"what is the {word}" for word in words]

    def chat(c, text):
        return c.chat.completions.create(model=MODEL, messages=user(text), max_tokens=24, temperature=0)

    def raw(c, text):
        return c.completions.create(model=MODEL, prompt=text, max_tokens=24, temperature=0)

    alone = [chat(client, t).choices[0].message.content for t in chats]
    alone += [raw(client, t).choices[0].text for t in raws]

    async def together() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as aclient:
            replies = await asyncio.gather(
                *(chat(aclient, t) for t in chats), *(raw(aclient, t) for t in raws)
            )
        return [r.choices[0].message.content for r in replies[:8]] + [r.choices[0].text for r in replies[8:]]

    assert asyncio.run(together()) == alone
    assert len(set(alone[8:])) > 4


def test_tokenize_and_the_rendered_template(server):
    messages = [{"role": "system", "content": "sys"}, *user("hi <|end|>")]
    template = httpx.post(f"{server.url}/v1/chat/template", json={"messages": messages}).json()
    assert template["prompt"] == "<s><|system|>sys<|end|><|user|>hi <|end|><|end|><|assistant|>"
    assert template["token_strs"].count("<|end|>") == 2  # the template's two, not the user's text
    tokens = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()
    assert tokens["tokens"] == template["tokens"] and tokens["max_model_len"] == 512
    raw = httpx.post(f"{server.url}/tokenize", json={"prompt": "the", "return_token_strs": True}).json()
    assert raw["token_strs"][0] == "<s>"
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": raw["tokens"]}).json()["prompt"]
    assert text == "<s>the"


# ---- errors -----------------------------------------------------------------------------------------------

CHAT = {"model": MODEL, "messages": user("hi")}
JSON = {"content-type": "application/json"}
BAD_REQUESTS = [
    ({"messages": []}, "messages", "at least one message"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages", "unknown role 'wizard'"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be at least 1"),
    ({"max_completion_tokens": -3}, "max_completion_tokens", "must be at least 1"),
    ({"temperature": 2.5}, "temperature", "between 0 and 2"),
    ({"temperature": -0.1}, "temperature", "between 0 and 2"),
    ({"top_p": 0}, "top_p", "(0, 1]"),
    ({"top_p": 1.5}, "top_p", "(0, 1]"),
    ({"n": 2}, "n", "n must be 1"),
    ({"stop": [""]}, "stop", "non-empty"),
    ({"temperature": "hot"}, "temperature", "valid number"),
    ({"messages": "hi"}, "messages", "valid list"),
    ({"messages": [{"content": "no role"}]}, "messages", "required"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages", "only text"),
    ({"tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"presence_penalty": 0.5}, "presence_penalty", "repetition_penalty"),
    ({"messages": [{"role": "user", "content": "a\ud800"}]}, "messages", "lone surrogate"),
]


@pytest.mark.parametrize(("change", "param", "message"), BAD_REQUESTS)
def test_bad_requests_are_400s_in_openais_shape(server, change, param, message):
    body = json.dumps({**CHAT, **change})  # ASCII, escapes included: a lone surrogate travels as \\ud800
    response = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=JSON)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and message in error["message"]


def test_the_openai_client_sees_the_errors(client):
    with pytest.raises(openai.BadRequestError, match="between 0 and 2"):
        client.chat.completions.create(model=MODEL, messages=user("hi"), temperature=3)
    with pytest.raises(openai.NotFoundError, match="'gpt-4' does not exist"):
        client.chat.completions.create(model="gpt-4", messages=user("hi"))


def test_malformed_json_is_a_400(server):
    for body in (b"{bad json", b"[1, 2]", b'"text"', b""):
        response = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=JSON)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_the_context_length_is_checked_exactly(server, client):
    context = 512
    word = httpx.post(f"{server.url}/tokenize", json={"prompt": "the", "add_special_tokens": False}).json()
    prompt = word["tokens"][:1] * (context - 1)
    fits = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    assert fits.usage.prompt_tokens == context - 1 and fits.usage.completion_tokens == 1
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    assert error.value.body["message"] == (
        f"this model's maximum context length is {context} tokens; the prompt has {context - 1} and "
        "max_tokens asks for 2"
    )
    assert error.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match=r"the prompt has 5\d\d and max_tokens asks for 100"):
        client.chat.completions.create(model=MODEL, messages=user("the " * 500), max_tokens=100)


WEIRD_BODIES = [
    {"messages": None},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": None}], "max_tokens": 2},
    {"max_tokens": 10**30},
    {"max_tokens": "3"},
    {"seed": 2**70, "temperature": 1, "max_tokens": 2},
    {"seed": -5, "temperature": 1, "max_tokens": 2},
    {"top_k": 10**9, "temperature": 1, "max_tokens": 2},
    {"top_k": -7},
    {"stop": [1, 2]},
    {"stop": ["x"] * 40},
    {"stream": "yes please"},
    {"stream_options": "x"},
    {"logit_bias": {"5": 100}},
    {"repetition_penalty": 0},
    {"repetition_penalty": 1e308, "max_tokens": 2},
    {"response_format": {"type": "json_object"}},
    {"messages": [{"role": "user", "content": "x" * 20000}]},
    {"model": None, "max_tokens": 2},
    {"model": ["a"]},
    {"nested": json.loads("[" * 200 + "]" * 200)},
]


@pytest.mark.parametrize("change", WEIRD_BODIES, ids=range(len(WEIRD_BODIES)))
def test_no_request_gives_a_500(server, change):
    response = httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, **change}, timeout=60)
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_nan_and_infinity_are_400s(server):
    for value in ("NaN", "Infinity", "-Infinity"):
        body = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "x"}}], "temperature": {value}}}'
        response = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=JSON)
        assert response.status_code == 400, response.text


# ---- load, disconnects, failures --------------------------------------------------------------------------


def long_stream(server: LiveServer) -> httpx.Response:
    """A streamed request that runs until the context is full, opened and left unread."""
    body = {**CHAT, "max_tokens": 480, "stream": True, "ignore_eos": True}
    client = httpx.Client(timeout=30)
    response = client.send(
        client.build_request("POST", f"{server.url}/v1/chat/completions", json=body), stream=True
    )
    response.client = client
    return response


def test_overload_answers_429_with_retry_after_at_once(server, state, monkeypatch):
    forward = state.engine.model.forward  # slow steps: the 16 stay busy while the 17th arrives
    monkeypatch.setattr(state.engine.model, "forward", lambda *a, **k: time.sleep(0.01) or forward(*a, **k))
    held = [long_stream(server) for _ in range(16)]  # 4 slots + 12 queued
    try:
        health = httpx.get(f"{server.url}/health").json()
        assert health["running"] + health["waiting"] == 16
        started = time.monotonic()
        response = httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "max_tokens": 5})
        assert time.monotonic() - started < 2
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "rate_limit_error"
    finally:
        for response in held:
            response.close()
            response.client.close()
    wait_idle(server)


def test_a_client_that_disconnects_frees_its_slot(server):
    response = long_stream(server)
    lines = response.iter_lines()
    assert next(lines).startswith("data: ")
    assert httpx.get(f"{server.url}/health").json()["running"] == 1
    response.close()
    response.client.close()
    wait_idle(server, timeout=5)
    # The same for a request that is not streamed: the client gives up waiting.
    with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=0.3) as impatient:
        impatient.post(
            f"{server.url}/v1/chat/completions", json={**CHAT, "max_tokens": 480, "ignore_eos": True}
        )
    wait_idle(server, timeout=5)


def test_an_error_during_a_stream_is_an_event_then_done(server, state, client, monkeypatch):
    forward = state.engine.model.forward
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 4:
            raise RuntimeError("simulated failure")
        return forward(*args, **kwargs)

    monkeypatch.setattr(state.engine.model, "forward", failing)
    body = {**CHAT, "max_tokens": 20, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert "simulated failure" in error["message"] and error["type"] == "server_error"
    calls["n"] = 0
    with pytest.raises(openai.APIError, match="simulated failure"):
        list(client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=20, stream=True))
    monkeypatch.undo()
    assert (
        client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=3).usage.completion_tokens
        == 3
    )


# ---- the API key ------------------------------------------------------------------------------------------


def test_the_api_key_guards_every_v1_route_but_not_health(state, config):
    keyed = ChatServerConfig(
        server=ServerConfig(model=config.server.model, api_key="s3cret"), engine=config.engine
    )
    live = LiveServer(build_app(state, keyed, load_in_background=False))
    try:
        wrong = openai.OpenAI(base_url=f"{live.url}/v1", api_key="s3creT", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as error:
            wrong.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2)
        assert error.value.status_code == 401 and error.value.body["type"] == "authentication_error"
        for headers in ({}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}):
            response = httpx.post(f"{live.url}/v1/chat/completions", json=CHAT, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        for method, path in [
            ("GET", "/v1/models"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/chat/template"),
        ]:
            assert httpx.request(method, f"{live.url}{path}", json={}).status_code == 401
        assert httpx.get(f"{live.url}/health").status_code == 200
        # The page asks for the key as its password.
        assert httpx.get(f"{live.url}/config").status_code == 401
        assert (
            httpx.post(f"{live.url}/login", data={"username": "me", "password": "wrong"}).status_code == 400
        )
        with httpx.Client() as browser_session:
            login = {"username": "me", "password": "s3cret"}
            assert browser_session.post(f"{live.url}/login", data=login).status_code == 200
            assert browser_session.get(f"{live.url}/config").status_code == 200
        with_key = openai.OpenAI(base_url=f"{live.url}/v1", api_key="s3cret", max_retries=0)
        reply = with_key.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2)
        assert reply.usage.completion_tokens == 2
    finally:
        live.stop()


def test_the_model_name_is_the_flags_else_the_exports_else_the_folders(our_folder, tmp_path):
    named = ChatServerConfig(server=ServerConfig(model=str(our_folder), model_name="mine"))
    assert resolve(named).server.model_name == "mine"
    assert resolve(ChatServerConfig(server=ServerConfig(model=str(our_folder)))).server.model_name == MODEL
    unnamed = tmp_path / "unnamed"
    shutil.copytree(our_folder, unnamed)
    config = json.loads((unnamed / "config.json").read_text())
    del config["open_llama_model_name"]
    (unnamed / "config.json").write_text(json.dumps(config))
    assert resolve(ChatServerConfig(server=ServerConfig(model=str(unnamed)))).server.model_name == "unnamed"


def test_the_api_key_comes_from_the_environment(our_folder, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert resolve(ChatServerConfig(server=ServerConfig(model=str(our_folder)))).server.api_key == "from-env"
    flag = ChatServerConfig(server=ServerConfig(model=str(our_folder), api_key="from-flag"))
    assert resolve(flag).server.api_key == "from-flag"
    monkeypatch.delenv(API_KEY_ENV)
    assert resolve(ChatServerConfig(server=ServerConfig(model=str(our_folder)))).server.api_key is None


# ---- the entry point --------------------------------------------------------------------------------------


def test_chat_server_py_loads_in_the_background_and_listens_on_loopback_only(our_folder):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(API_KEY_ENV, None)
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "chat_server.py"),
            "--model",
            str(our_folder),
            "--port",
            str(port),
            "--slots",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        seen = []
        deadline = time.monotonic() + 120
        while not seen or seen[-1] != 200:
            assert time.monotonic() < deadline and process.poll() is None, f"no 200 from /health: {seen}"
            try:
                seen.append(httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code)
            except httpx.TransportError:
                time.sleep(0.05)
        assert set(seen) <= {503, 200}
        listening = [
            c.laddr
            for c in psutil.Process(process.pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN
        ]
        assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", port)]
        page = httpx.get(f"http://127.0.0.1:{port}/")
        assert page.status_code == 200 and "gradio" in page.text.lower()
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_chat_server_py_names_a_missing_model():
    result = subprocess.run(
        [sys.executable, str(REPO / "chat_server.py"), "--model", "/nonexistent/model"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2 and "/nonexistent/model: not a Hugging Face model folder" in result.stderr


# ---- the page, in a real browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium; `make setup` tries it)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_the_chat_page_streams_a_reply_shows_text_as_text_and_stops(
    server, state, browser, tmp_path, monkeypatch
):
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.goto(f"{server.url}/")
    box = page.locator("#chat-input textarea")
    box.fill("Hello <b>there</b> & welcome")
    box.press("Enter")
    bot = page.locator("#chatbot .bot").last
    lengths = set()
    deadline = time.monotonic() + 60
    while "tokens/s" not in page.inner_text("#reply-stats"):
        assert time.monotonic() < deadline, "no reply"
        if bot.count():
            lengths.add(len(bot.inner_text()))
        time.sleep(0.01)
    reply = bot.inner_text().strip()
    assert reply and len(lengths) >= 2  # seen growing: streamed, not sent at the end
    user_bubble = page.locator("#chatbot .user").last
    assert user_bubble.inner_text().strip() == "Hello <b>there</b> & welcome"  # as typed, not bold
    assert page.locator("#chatbot b").count() == 0
    page.screenshot(path=str(tmp_path / "chat.png"))
    assert (tmp_path / "chat.png").stat().st_size > 10_000

    # Clear empties the chat (the reply above filled most of the context); stop ends a long reply and
    # frees its slot.
    page.locator("#chatbot .top-panel button[aria-label='Clear']").click()
    page.wait_for_function("document.querySelectorAll('#chatbot .message-row').length === 0")
    forward = state.engine.model.forward
    monkeypatch.setattr(state.engine.model, "forward", lambda *a, **k: time.sleep(0.02) or forward(*a, **k))
    box.fill("tell me more")
    box.press("Enter")
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/health").json()["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    page.locator("#chat-input .stop-button").click()
    wait_idle(server, timeout=5)
    page.close()
