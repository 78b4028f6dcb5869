"""The generation engine: one model, a static KV cache with a row (slot) per running request, and one thread
that decodes every running request together.

A request's way through it:

1. `submit` puts it in a bounded waiting queue; when the queue is full it raises `EngineBusy` at once
   (the API answers 429 with Retry-After) instead of letting the client hang.
2. Between two decoding steps, waiting requests take free slots, lowest first, and their prompts run into
   their slot's rows of the cache (prefill), in chunks of at most `prefill_chunk` tokens per step, so a long
   prompt delays the others' next token by one chunk at most. The last chunk's logits give the first token.
3. Each step then feeds the newest token of every decoding request as one batch: cache rows 0..hi, each at
   its own position (models/kv_cache.py: KVCache keeps a length per row). Free or still-prefilling rows inside
   that range ride along; their outputs are dropped and their lengths put back, so nothing moves in memory.
4. A request leaves between steps, its slot free for the next: a stop token, a stop string, max_tokens,
   its time limit, or `cancel()` (a client that went away, the UI's stop button).

Sampling is per request: its own temperature, top-k, top-p, repetition penalty and random generator (seeded
when asked), so its tokens do not depend on which requests share its batch. Greedy requests give the same
text alone or 16 at once (up to floating-point rounding of batched matrix products, far below the gap between
the two best tokens in practice; the tests check it), and the same as transformers' greedy `generate`.

Every request's text goes through a `TextStream` (serve/text.py): deltas never split a character or show
part of a stop string. Events reach the consumer through a callback from the engine thread; `stream()`
turns them into an async iterator for the API and the UI, `generate()` waits for the whole reply.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from models.generate import process_logits
from models.kv_cache import KVCache
from models.llama import Llama
from serve.text import TextStream

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """How the engine batches: slots, queue, context, time limit, chunked prefill, device and precision."""

    slots: int = 8
    """Requests decoded together (rows of the KV cache); more wait in the queue."""
    max_queue: int = 32
    """Requests that may wait for a slot; beyond it a request is refused at once (HTTP 429)."""
    max_len: int = 0
    """Positions per slot (prompt + reply); 0 = the model's context length (max_position_embeddings)."""
    request_timeout_s: float = 600.0
    """A request's time limit from its arrival: queued past it, it fails; running past it, its reply ends
    there (finish_reason "length")."""
    prefill_chunk: int = 512
    """Prompt tokens run per step: bounds how long a long prompt stalls the other requests' next token."""
    threads: int = 0
    """Torch threads decoding on a CPU; 0 = one fewer than the cores (at least 1). The core left over runs
    the HTTP server and tokenization: with every core decoding, the server's thread waits for a core at
    every token and streaming slows down tenfold on a 2-core machine."""
    device: str = "auto"
    """cpu, cuda, cuda:1, ...; auto = cuda when available."""
    dtype: str = "auto"
    """float32, bfloat16 or float16; auto = bfloat16 on a GPU, float32 on a CPU."""

    def __post_init__(self) -> None:
        for name in ("slots", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if min(self.max_queue, self.max_len, self.threads) < 0 or self.request_timeout_s <= 0:
            raise ValueError("max_queue, max_len and threads must be >= 0 and request_timeout_s > 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]


DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SamplingParams:
    """One request's decoding settings (the API checks their ranges)."""

    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None
    ignore_eos: bool = False  # run to max_tokens (benchmarks)


@dataclass
class Event:
    """What a request's consumer receives: new text, and at the end a finish reason or an error."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # "stop" | "length" on the last event
    error: str | None = None  # set on the last event when the request failed


@dataclass
class Completion:
    """A whole reply (`Engine.generate`)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class EngineBusy(RuntimeError):
    """The waiting queue is full: try again shortly."""


class EngineError(RuntimeError):
    """A request failed inside the engine (`generate`); the message says why."""


@dataclass(eq=False)
class Request:
    """A request inside the engine. Consumers only call `cancel()`."""

    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    deadline: float
    id: int = 0
    slot: int = -1
    prefilled: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: TextStream | None = None
    generator: torch.Generator | None = None
    cancelled: bool = False
    done: bool = False

    def cancel(self) -> None:
        """Stop this request; its slot is freed before the next step (safe from any thread)."""
        self.cancelled = True


class EventStream:
    """A submitted request's events as an async iterator, for consumers running in an asyncio loop."""

    def __init__(self, engine: Engine, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._done = False
        self.request = engine.submit(
            prompt_ids, params, lambda event: loop.call_soon_threadsafe(self._events.put_nowait, event)
        )

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        event = await self._events.get()
        self._done = bool(event.finish_reason or event.error)
        return event

    def pending(self) -> list[Event]:
        """The events already queued, taken without waiting: a consumer slower than the engine (a page
        redrawn per update) catches up in one update instead of falling behind."""
        taken = []
        while not self._done and not self._events.empty():
            event = self._events.get_nowait()
            self._done = bool(event.finish_reason or event.error)
            taken.append(event)
        return taken

    def cancel(self) -> None:
        """Free the request's slot (a no-op once it has finished)."""
        self.request.cancel()


class Engine:
    """Continuous batching over a static per-slot KV cache (see the module docstring)."""

    def __init__(
        self,
        model: Llama,
        tokenizer,  # a tokenizers.Tokenizer (transformers' `backend_tokenizer`): decoding in the engine thread
        stop_token_ids: Sequence[int],
        config: EngineConfig | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.stop_token_ids = set(stop_token_ids)
        self.device = next(model.parameters()).device
        self.context_length = min(self.config.max_len or model.config.max_seq_len, model.config.max_seq_len)
        self.vocab_size = model.config.vocab_size
        dtype = next(model.parameters()).dtype
        self.cache = KVCache(
            model.config, self.config.slots, self.context_length, dtype=dtype, device=self.device
        )
        # Tokens each slot has seen (prompt and reply), for the repetition penalty.
        self.seen = torch.zeros(self.config.slots, self.vocab_size, dtype=torch.bool, device=self.device)
        self.slots: list[Request | None] = [None] * self.config.slots
        self.waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="serve-engine", daemon=True)
        self._thread.start()

    # ---- the consumers' side (any thread) ----------------------------------------------------------------

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_event: Callable[[Event], None],
        timeout_s: float | None = None,
    ) -> Request:
        """Queue a request; `on_event` is called from the engine thread. Raises EngineBusy, ValueError.
        `timeout_s`: this request's time limit (default: the config's request_timeout_s)."""
        if not prompt_ids:
            raise ValueError("empty prompt: give at least one token")
        if len(prompt_ids) + params.max_tokens > self.context_length:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens and max_tokens is {params.max_tokens}: more than "
                f"the context length {self.context_length}"
            )
        limit = self.config.request_timeout_s if timeout_s is None else timeout_s
        request = Request(list(prompt_ids), params, on_event, time.monotonic() + limit)
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            # Free slots take waiting requests at the next step: they are room in the queue too.
            if len(self.waiting) >= self.config.max_queue + self.slots.count(None):
                raise EngineBusy(
                    f"all {self.config.slots} slots are busy and {len(self.waiting)} requests are waiting"
                )
            request.id = next(self._ids)
            self.waiting.append(request)
            self._wake.notify()
        return request

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> EventStream:
        """Submit now (EngineBusy, ValueError raise here) and return the events as an async iterator; call
        its `cancel()` when the consumer leaves early (a disconnect, the stop button)."""
        return EventStream(self, prompt_ids, params)

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, timeout_s: float | None = None
    ) -> Completion:
        """The whole reply, waiting for it (benchmarks, tests). Raises EngineError if the request fails."""
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        request = self.submit(prompt_ids, params, events.put, timeout_s)
        text = []
        while True:
            event = events.get()
            text.append(event.text)
            if event.error:
                raise EngineError(event.error)
            if event.finish_reason:
                return Completion(
                    "".join(text),
                    list(request.token_ids),
                    event.finish_reason,
                    event.prompt_tokens,
                    event.completion_tokens,
                )

    def stats(self) -> dict[str, int]:
        with self._wake:
            running = sum(r is not None for r in self.slots)
            return {"running": running, "waiting": len(self.waiting), "slots": self.config.slots}

    def close(self) -> None:
        """Stop the engine thread; requests still running or waiting get an error event."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # ---- the engine thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        if self.device.type == "cpu":  # a per-thread setting: it leaves the server's own threads alone
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            torch.set_num_threads(self.config.threads or max(1, cores - 1))
        while True:
            with self._wake:
                while not self._closed and not self.waiting and all(r is None for r in self.slots):
                    self._wake.wait()
                if self._closed:
                    break
                self._admit()
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as exc:  # a bug or out of memory: fail what runs, keep serving
                log.exception("engine step failed")
                for request in self.slots:
                    if request is not None:
                        self._finish(request, error=f"generation failed: {type(exc).__name__}: {exc}")
        for request in [*self.waiting, *(r for r in self.slots if r is not None)]:
            self._finish(request, error="the server is shutting down")
        self.waiting.clear()

    def _admit(self) -> None:
        """Move waiting requests into free slots (lowest first: keeps the decoded rows 0..hi dense)."""
        now = time.monotonic()
        while self.waiting:
            request = self.waiting[0]
            if request.cancelled or now > request.deadline:
                self.waiting.popleft()
                if not request.cancelled:
                    self._finish(request, error="timed out waiting for a free slot")
                continue
            if None not in self.slots:
                return
            self.waiting.popleft()
            request.slot = self.slots.index(None)
            self.slots[request.slot] = request
            self._start(request)

    def _start(self, request: Request) -> None:
        slot, params = request.slot, request.params
        self.cache.lengths[slot] = 0
        request.text = TextStream(self.tokenizer, params.stop)
        request.generator = torch.Generator(device=self.device)
        if params.seed is not None:
            request.generator.manual_seed(params.seed)
        else:
            request.generator.seed()
        if params.repetition_penalty != 1.0:
            self.seen[slot] = False
            self.seen[slot, torch.tensor(request.prompt_ids, device=self.device)] = True

    def _step(self) -> None:
        now = time.monotonic()
        for request in self.slots:
            if request is not None and (request.cancelled or now > request.deadline):
                self._finish(request, finish_reason="length")  # the time limit cuts the reply like max_tokens
        self._prefill()
        decoding = [r for r in self.slots if r is not None and r.token_ids]
        if decoding:
            self._decode(decoding)

    def _prefill(self) -> None:
        """Run up to `prefill_chunk` prompt tokens of the requests that joined; sample their first tokens."""
        budget = self.config.prefill_chunk
        for request in self.slots:
            if budget <= 0:
                return
            if request is None or request.token_ids or request.done:
                continue
            chunk = request.prompt_ids[request.prefilled : request.prefilled + budget]
            ids = torch.tensor([chunk], device=self.device)
            view = self.cache.rows(request.slot, request.slot + 1)
            logits = self.model(ids, kv_cache=view, logits_to_keep=1).logits[:, -1]
            request.prefilled += len(chunk)
            budget -= len(chunk)
            if request.prefilled == len(request.prompt_ids):
                self._accept([request], self._sample(logits, [request]))

    def _decode(self, decoding: list[Request]) -> None:
        """One token for every decoding request, all in one forward over cache rows 0..hi."""
        hi = max(r.slot for r in decoding) + 1
        tokens = torch.zeros(hi, 1, dtype=torch.long)
        for request in decoding:
            tokens[request.slot, 0] = request.token_ids[-1]
        logits = self.model(tokens.to(self.device), kv_cache=self.cache.rows(0, hi)).logits[:, -1]
        riding = [s for s in range(hi) if self.slots[s] is None or not self.slots[s].token_ids]
        self.cache.lengths[riding] -= 1  # their rows took a position they do not keep
        rows = torch.tensor([r.slot for r in decoding], device=self.device)
        self._accept(decoding, self._sample(logits[rows], decoding))

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """The next token of each request (rows of `logits` in the same order)."""
        params = [r.params for r in requests]
        if all(p.temperature == 0 and p.repetition_penalty == 1.0 for p in params):
            return logits.argmax(dim=-1).tolist()

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=self.device)

        slots = torch.tensor([r.slot for r in requests], device=self.device)
        scores = process_logits(
            logits,
            self.seen[slots],
            temperature=column([p.temperature for p in params]),
            top_k=column([p.top_k for p in params]),
            top_p=column([p.top_p for p in params]),
            repetition_penalty=column([p.repetition_penalty for p in params]),
        )
        tokens = scores.argmax(dim=-1)
        probs = None
        for row, request in enumerate(requests):
            if request.params.temperature > 0:
                probs = torch.softmax(scores, dim=-1) if probs is None else probs
                tokens[row] = torch.multinomial(probs[row], 1, generator=request.generator)[0]
        return tokens.tolist()

    def _accept(self, requests: list[Request], tokens: list[int]) -> None:
        """Record each request's new token: text out, and the end of the reply when it is one."""
        for request, token in zip(requests, tokens):
            if request.done:
                continue
            request.token_ids.append(token)
            params = request.params
            if params.repetition_penalty != 1.0:
                self.seen[request.slot, token] = True
            if token in self.stop_token_ids and not params.ignore_eos:
                self._finish(request, finish_reason="stop")
                continue
            text = request.text.add(token)
            if request.text.stopped:
                self._finish(request, text, finish_reason="stop")
            elif len(request.token_ids) >= params.max_tokens:
                self._finish(request, text, finish_reason="length")
            elif text and not request.cancelled:
                _deliver(request, Event(text, len(request.prompt_ids), len(request.token_ids)))

    def _finish(
        self, request: Request, text: str = "", *, finish_reason: str | None = None, error: str | None = None
    ) -> None:
        """Send the last event (unless the consumer left) and free the slot."""
        if request.done:
            return
        request.done = True
        if request.slot >= 0:
            self.slots[request.slot] = None
            self.cache.lengths[request.slot] = 0  # a free row that rides along reads no stale positions
        if request.cancelled:
            return
        if error is None and request.text is not None:
            text += request.text.finish()
        _deliver(request, Event(text, len(request.prompt_ids), len(request.token_ids), finish_reason, error))


def _deliver(request: Request, event: Event) -> None:
    """Hand an event to the consumer; a consumer that is gone (its event loop closed) never stops the engine."""
    try:
        request.on_event(event)
    except Exception:
        log.debug("could not deliver an event of request %d", request.id, exc_info=True)
