"""`engram-llama serve`: an OpenAI-compatible chat endpoint whose answers are steered to the
documents sent with each request.

The stack of llama-cpp-python's own server (FastAPI, uvicorn, sse-starlette, pydantic models of the
OpenAI schema). One context with a sequence per parallel slot (`-np`, sequences.py), each slot an `EngramLlama`
with its own bias (the hook is per sequence) and cache manager, so a request whose documents a slot
saw before reuses their cached state; requests beyond the slots wait in a queue. The blocking work runs in threads; a client that disconnects
mid-stream stops its answer at the next token and frees its slot.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

MAX_BODY_BYTES = 8 << 20     # a request body larger than this is refused (413)
MAX_DOCUMENTS = 512          # documents per request
DEFAULT_MAX_TOKENS = 256     # an answer's length when the request does not say


# --- the OpenAI schema (the part a chat client sends), with engram-llama's extensions ----------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class Document(BaseModel):
    """engram-llama's extension: a document to answer from (a retriever's hit)."""
    model_config = ConfigDict(extra="ignore")
    id: str | int | None = None
    text: str
    title: str | None = None


class EngramOptions(BaseModel):
    """Per-request steering, within what `engram-llama run` allows."""
    model_config = ConfigDict(extra="forbid")
    off: bool = False
    strength: float | None = Field(None, ge=-50, le=50)
    layers: str | list[int] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # top_p, n, user, ...: accepted, not used
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    stream: bool = False
    documents: list[Document] | None = None
    engram: EngramOptions | None = None


# --- errors, as OpenAI's API writes them --------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err.get("loc", ()))
    return (f"{where}: {err.get('msg')}" if where else str(err.get("msg"))), where or None


# --- the engines --------------------------------------------------------------------------------


@dataclass
class Config:
    model_id: str                       # the name /v1/models gives and requests may send
    n_ctx: int                          # per slot
    n_parallel: int = 1
    api_key: str | None = None
    chunks: list | None = None          # the --chunks folder's, for requests that send none


class Cancelled(Exception):
    """The client went away: the answer stops at the next token."""


def _doc_chunks(docs: list[Document]):
    """The request's documents split as the CLI splits files; each chunk's source names its
    document (a unique label), and the label maps back to the document's id and title."""
    from .chunks import split

    labels: dict[str, tuple[Any, str | None]] = {}
    named = []
    for k, d in enumerate(docs):
        base = d.title or (str(d.id) if d.id is not None else f"document {k + 1}")
        label, n = base, 2
        while label in labels:
            label, n = f"{base} ({n})", n + 1
        labels[label] = (d.id if d.id is not None else k, d.title)
        named.append((label, d.text))
    return split(named), labels


class Service:
    """The slots and the request logic, apart from HTTP (the tests and the bench drive it too)."""

    def __init__(self, cfg: Config, engines: list):
        self.cfg = cfg
        self.engines = engines
        self.free: asyncio.Queue | None = None
        self.cancelled = 0              # answers stopped because their client went away
        self._busy = 0
        self._idle = threading.Condition()

    async def start(self) -> None:
        self.free = asyncio.Queue()
        for e in self.engines:
            self.free.put_nowait(e)

    def close(self, timeout: float = 600) -> bool:
        """Free the engines once no answer runs on them (a shutdown waits for the running ones).
        False when one still runs after timeout: nothing is freed under it (the process's exit does)."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._busy == 0, timeout):
                return False
        for e in self.engines:
            e.close()
        return True

    # request -> what ask takes ------------------------------------------------------------------

    def parse(self, raw: bytes) -> ChatRequest:
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}",
                           code="request_too_large")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise APIError(400, f"the request body is not UTF-8 (byte {e.start})") from None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        try:
            req = ChatRequest.model_validate(data)
        except ValidationError as e:
            msg, param = _validation_message(e)
            raise APIError(400, msg, param=param) from None
        if req.model and req.model != self.cfg.model_id:
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{self.cfg.model_id}'",
                           code="model_not_found", param="model")
        return req

    def plan_request(self, req: ChatRequest):
        from .plan import Settings, parse_layers

        last = req.messages[-1]
        if last.role != "user":
            raise APIError(400, "the last message must be the user's question", param="messages")
        question = last.text().strip()
        if not question:
            raise APIError(400, "the question (the last user message) is empty", param="messages")
        history = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                   for m in req.messages[:-1] if m.role != "tool"]
        if req.documents is not None:
            if not req.documents:
                raise APIError(400, "documents is empty: send at least one, or leave the field out", param="documents")
            if len(req.documents) > MAX_DOCUMENTS:
                raise APIError(400, f"too many documents ({len(req.documents)}; at most {MAX_DOCUMENTS})",
                               param="documents")
            if any(not d.text.strip() for d in req.documents):
                raise APIError(400, "a document's text is empty", param="documents")
            chunks, labels = _doc_chunks(req.documents)
        elif self.cfg.chunks:
            chunks, labels = self.cfg.chunks, {c.source: (c.source, c.source) for c in self.cfg.chunks}
        else:
            raise APIError(400, "no documents: send 'documents' with the request, or start the server with --chunks",
                           param="documents")
        o = req.engram or EngramOptions()
        if o.layers is not None and self.cfg.n_parallel > 1:
            raise APIError(400, "engram.layers per request needs -np 1: the slots' sequences share one context, "
                                "and its biased layers", param="engram")
        try:
            settings = Settings(engram=not o.off, strength=o.strength,
                                layers=parse_layers(",".join(map(str, o.layers)) if isinstance(o.layers, list)
                                                    else o.layers))
        except ValueError as e:
            raise APIError(400, str(e), param="engram") from None
        max_tokens = req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS
        return question, history, chunks, labels, settings, max_tokens

    # one answer on a free engine --------------------------------------------------------------

    async def answer(self, req: ChatRequest, planned: tuple, on_piece=None, cancelled: threading.Event | None = None,
                     on_ready=None):
        """Wait for a free engine, answer on it in a thread (planned: plan_request's); the engine
        goes back to the pool when the thread ends (also after a cancel). on_ready: called from the
        thread once the prompt is prepared and fits, before the answer's first token."""
        question, history, chunks, labels, settings, max_tokens = planned
        loop = asyncio.get_running_loop()
        eng = await self.free.get()  # a cancel while queued takes no engine
        if cancelled is not None and cancelled.is_set():
            self.free.put_nowait(eng)
            self.cancelled += 1
            raise Cancelled
        done: asyncio.Future = loop.create_future()
        with self._idle:
            self._busy += 1

        def work():
            try:
                res = self._run(eng, question, history, chunks, labels, settings, max_tokens,
                                req.temperature or 0.0, on_piece, cancelled, on_ready)
                _call(loop, _settle, done, res, None)
            except BaseException as e:  # noqa: BLE001  (handed to the request)
                if isinstance(e, Cancelled):
                    self.cancelled += 1
                _call(loop, _settle, done, None, e)
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()
                _call(loop, self.free.put_nowait, eng)

        threading.Thread(target=work, daemon=True).start()
        return await asyncio.shield(done)  # a cancelled request leaves the thread to finish and free the engine

    def _run(self, eng, question, history, chunks, labels, settings, max_tokens, temperature, on_piece, cancelled,
             on_ready=None):
        from ._hook import EngramError
        from .plan import check_layers
        from .runtime import ContextTooSmall

        def check() -> None:
            if cancelled is not None and cancelled.is_set():
                raise Cancelled

        check()
        try:
            check_layers(settings.layers, eng.hook.kinds)
        except ValueError as e:
            raise APIError(400, f"invalid engram.layers: {e}", param="engram") from None
        max_tokens = min(max_tokens, eng.n_ctx // 2)
        pieces: list[str] = []

        def on_token(t: str) -> None:
            check()
            pieces.append(t)
            if on_piece is not None:
                on_piece(t)

        try:  # as eng.ask, with the checks between its steps
            prep = eng.prepare(question, chunks, max_tokens, settings=settings, history=history)
            if len(prep.dropped) == len(chunks):
                raise APIError(400, f"no document fits in the context ({eng.n_ctx} tokens, {max_tokens} of them "
                                    f"for the answer; the prompt without documents takes {len(prep.prompt.tokens)})",
                               code="context_length_exceeded", param="documents")
            check()
            if on_ready is not None:
                on_ready()
            ans = eng.answer(prep, eng.plan(prep, question, settings), max_tokens, temperature, on_token)
        except ContextTooSmall as e:
            raise APIError(400, str(e), code="context_length_exceeded", param="messages") from None
        except (EngramError, ValueError) as e:
            raise APIError(400, str(e)) from None
        toks, _, n_pre = eng.llm.tokenize(ans.text) if ans.text else ([], [], 0)
        n_completion = max(len(pieces), len(toks) - n_pre)
        cites = []
        for c in ans.citations:
            doc_id, title = labels.get(c.chunk.source, (c.chunk.source, None))
            cites.append({"id": doc_id, "title": title, "position": c.position, "relevance": round(c.score, 4)})
        return {
            "text": ans.text, "citations": cites,
            "finish_reason": ans.finish_reason or "stop",
            "usage": {"prompt_tokens": ans.n_prompt_tokens, "completion_tokens": n_completion,
                      "total_tokens": ans.n_prompt_tokens + n_completion},
            "dropped_documents": sorted({labels.get(c.source, (c.source,))[0] for c in ans.dropped}, key=str),
        }


def _call(loop, fn, *args) -> None:
    """fn(*args) on the event loop, from a worker thread; nothing when the loop has shut down."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def _settle(fut: asyncio.Future, value, error) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


# --- HTTP ---------------------------------------------------------------------------------------


def create_app(service: Service) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await service.start()
        yield

    # the generated API docs only on an open server: --api-key covers every endpoint but /health
    docs = service.cfg.api_key is None
    app = FastAPI(title="engram-llama", version=_version(), lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url=None, openapi_url="/openapi.json" if docs else None)

    def check_key(request: Request) -> None:
        key = service.cfg.api_key
        if key and request.headers.get("authorization", "") != f"Bearer {key}":
            raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(_request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, e: RequestValidationError):
        return JSONResponse(APIError(400, str(e.errors()[0].get("msg"))).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_request, e: Exception):
        return JSONResponse(APIError(500, f"{type(e).__name__}: {e}".splitlines()[0], "server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "slots": service.cfg.n_parallel,
                "slots_idle": service.free.qsize() if service.free is not None else 0,
                "answers_cancelled": service.cancelled}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": service.cfg.model_id, "object": "model",
                                            "created": 0, "owned_by": "engram-llama"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        n = request.headers.get("content-length")
        if n is not None and n.isdigit() and int(n) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is {n} bytes; the limit is {MAX_BODY_BYTES}",
                           code="request_too_large")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > MAX_BODY_BYTES:
                raise APIError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes", code="request_too_large")
        req = service.parse(bytes(raw))
        planned = service.plan_request(req)  # bad input answered before a slot is taken
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": created, "model": service.cfg.model_id}
        if not req.stream:
            cancelled = threading.Event()
            task = asyncio.ensure_future(service.answer(req, planned, None, cancelled))
            while not task.done():  # a client gone before its answer stops it
                await asyncio.wait({task}, timeout=0.5)
                if not task.done() and await request.is_disconnected():
                    cancelled.set()
                    task.cancel()
                    task.add_done_callback(_retrieve)
                    return JSONResponse(APIError(499, "the client went away").body(), status_code=499)
            res = task.result()
            return {**head, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": res["text"]},
                                 "finish_reason": res["finish_reason"]}],
                    "usage": res["usage"], "citations": res["citations"],
                    "dropped_documents": res["dropped_documents"]}
        return await _start_stream(service, req, planned, head, request)

    return app


async def _start_stream(service: Service, req: ChatRequest, planned: tuple, head: dict, request):
    """Start the answer and hold the response until its prompt is prepared: what fails before that
    (a context overflow, layers the model cannot bias) is the HTTP error a request without streaming
    gets, not an error event after a 200. A client gone while it waits cancels it."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    cancelled, ready = threading.Event(), asyncio.Event()
    task = asyncio.ensure_future(service.answer(req, planned, lambda t: loop.call_soon_threadsafe(q.put_nowait, t),
                                                cancelled, on_ready=lambda: _call(loop, ready.set)))

    def ended(t: asyncio.Task) -> None:
        _retrieve(t)
        q.put_nowait(None)

    task.add_done_callback(ended)
    waiter = asyncio.ensure_future(ready.wait())
    try:
        while not (ready.is_set() or task.done()):
            await asyncio.wait({task, waiter}, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            if not (ready.is_set() or task.done()) and await request.is_disconnected():
                cancelled.set()
                task.cancel()
                return JSONResponse(APIError(499, "the client went away").body(), status_code=499)
    finally:
        waiter.cancel()
    if not ready.is_set():
        task.result()  # it failed before its first token: its error is the response's
    return EventSourceResponse(_stream(task, q, cancelled, head), ping=15)


async def _stream(task: asyncio.Task, q: asyncio.Queue, cancelled: threading.Event, head: dict):
    """SSE chunks in OpenAI's format: the role, the answer's pieces, a last chunk with the finish
    reason, usage and citations, then [DONE]. A client gone mid-stream cancels its answer."""

    def chunk(delta: dict, finish=None, **extra) -> str:
        return json.dumps({**head, "object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra},
                          ensure_ascii=False)

    try:
        yield {"data": chunk({"role": "assistant", "content": ""})}
        while True:
            piece = await q.get()
            if piece is None:
                break
            yield {"data": chunk({"content": piece})}
        try:
            res = task.result()
        except APIError as e:
            yield {"data": json.dumps(e.body())}
            return
        except Exception as e:  # noqa: BLE001  (after the 200 headers: an error event, not a cut stream)
            yield {"data": json.dumps(APIError(500, f"{type(e).__name__}: {e}".splitlines()[0], "server_error").body())}
            return
        yield {"data": chunk({}, res["finish_reason"], usage=res["usage"], citations=res["citations"],
                             dropped_documents=res["dropped_documents"])}
        yield {"data": "[DONE]"}
    finally:
        if not task.done():  # the client went away: queued, it takes no slot; running, it stops at its next token
            cancelled.set()
            task.cancel()


def _retrieve(t: asyncio.Task) -> None:
    """A finished answer's exception, read so that asyncio does not report it (its client is gone)."""
    if not t.cancelled():
        t.exception()


def _version() -> str:
    from . import __version__

    return __version__


def serve(cfg: Config, host: str, port: int, engines: list, log=None, on_close=None) -> None:
    import uvicorn

    service = Service(cfg, engines)
    app = create_app(service)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    if log:
        log(f"serving {cfg.model_id} on http://{host}:{port}/v1 ({cfg.n_parallel} slot"
            f"{'s' if cfg.n_parallel != 1 else ''}, {cfg.n_ctx}-token context each)")
    try:
        server.run()
    finally:
        if service.close() and on_close is not None:
            on_close()
