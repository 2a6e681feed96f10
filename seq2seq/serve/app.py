"""The FastAPI app: LibreTranslate's ``/translate`` and ``/languages``, plus ``/health``,
``/metrics`` and the page at ``/``.

Every refusal is ``{"error": "..."}`` with LibreTranslate's status codes (400 bad request, 403
API key, 413 body too large, 503 queue full or too slow, with ``Retry-After``); a failure of
the service itself is a 500 with the same shape and no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from seq2seq.serve.metrics import Metrics
from seq2seq.serve.options import ServeOptions
from seq2seq.serve.page import PAGE
from seq2seq.serve.pairs import LanguagePairs, ServedModel, assemble, attention_of, text_lines
from seq2seq.serve.parsing import (
    MAX_FORM_FIELDS,
    ApiError,
    TranslateRequest,
    form_fields,
    parse_fields,
    parse_translate,
    read_body,
)
from seq2seq.serve.worker import DecodeFailed, Job, QueueFull, WorkerGone

ROUTES = ("/", "/translate", "/languages", "/health", "/metrics")
RETRY_AFTER_S = "1"


def build_app(pairs: LanguagePairs, options: ServeOptions, metrics: Metrics) -> FastAPI:
    """The app serving ``pairs``; its lifespan starts the workers and, at shutdown, lets them
    finish what they were given."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        pairs.start()
        yield
        await asyncio.to_thread(pairs.stop)

    app = FastAPI(title="seq2seq", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    # LibreTranslate answers browsers from any origin (extensions, web pages): so does this.
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST"],
                       allow_headers=["Content-Type", "Authorization"])
    add_error_handlers(app, metrics)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.api_route("/languages", methods=["GET", "POST"])
    async def languages() -> JSONResponse:
        return JSONResponse(pairs.languages())

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        # 503 once a model's decoding process has died, so that a supervisor restarts us.
        # HEAD too: uptime monitors and load balancers probe with it (the status, no body).
        models = [{"source": m.source, "target": m.target, "checkpoint": m.checkpoint,
                   "queued": m.worker.queued, "failure": m.worker.failure}
                  for m in pairs.models.values()]
        failed = any(model["failure"] for model in models)
        return JSONResponse({"status": "error" if failed else "ok", "models": models},
                            status_code=503 if failed else 200)

    @app.get("/metrics")
    async def metrics_page() -> Response:
        return Response(metrics.exposition(), media_type=metrics.content_type)

    @app.post("/translate")
    async def translate(request: Request) -> JSONResponse:
        started = time.monotonic()
        fields = await request_fields(request, options.body_limit, options.timeout)
        checked = parse_translate(fields, options)
        answer = await unless_gone(request, translate_request(
            pairs.get(checked.source, checked.target), checked, options.timeout))
        metrics.latency.observe(time.monotonic() - started)
        return JSONResponse(answer)

    return app


def add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Refusals and failures as ``{"error": ...}``; every answer counted by path and status."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse({"error": error.message}, status_code=error.status,
                            headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def failure(request: Request, error: Exception) -> JSONResponse:
        # Logged by uvicorn with its traceback; the client gets one line. This handler runs
        # outside the CORS middleware: without the header a browser could not read the answer.
        return JSONResponse({"error": f"Translation error: {type(error).__name__}"},
                            status_code=500, headers={"Access-Control-Allow-Origin": "*"})

    app.add_middleware(CountAnswers, metrics=metrics)


class CountAnswers:
    """Counts every answer by path and status, and the requests in progress, as plain ASGI
    middleware (Starlette's ``BaseHTTPMiddleware`` costs a task and a stream per request)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        path = scope["path"] if scope["path"] in ROUTES else "other"
        started = False

        # In progress from the moment the app has the request to the start of its answer.
        in_progress = self.metrics.in_progress.labels(path=path)
        in_progress.inc()

        async def counted(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                in_progress.dec()
                self.metrics.requests.labels(path=path, status=str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:  # answered as a 500 by the handler outside this middleware
            if not started:
                self.metrics.requests.labels(path=path, status="500").inc()
            raise
        finally:
            if not started:
                in_progress.dec()


async def request_fields(request: Request, body_limit: int, timeout_s: float
                         ) -> dict[str, Any]:
    """The fields of a JSON, urlencoded or multipart body of at most ``body_limit`` bytes,
    received within ``timeout_s`` seconds: a client that stops sending half way holds no
    connection for ever (408), and one that goes away is no server error (499, nginx's
    "client closed request", for the metrics: nobody reads the answer)."""
    try:
        body = await asyncio.wait_for(read_body(request.stream(),
                                                request.headers.get("content-length"),
                                                body_limit), timeout_s)
    except ClientDisconnect:
        raise ApiError(499, "Client closed the request before its body was complete") from None
    except asyncio.TimeoutError:
        raise ApiError(408, f"Request timeout: the body did not arrive within {timeout_s:g} "
                       "seconds") from None
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        return parse_fields(body, content_type)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, receive).form(max_files=0,
                                                          max_fields=MAX_FORM_FIELDS)
    except Exception:  # Starlette's multipart errors have no common public base
        raise ApiError(400, "Invalid request: the multipart form cannot be read") from None
    values: dict[str, list[str]] = {}
    for name, value in form.multi_items():
        if not isinstance(value, str):
            raise ApiError(400, "Invalid request: files are not accepted")
        values.setdefault(name, []).append(value)
    return form_fields(values)


async def unless_gone(request: Request, work: Any) -> Any:
    """``await work``, unless the client disconnects first: then the work is cancelled (the
    worker skips the sentences it has not started) and the answer, which nobody reads, is a
    499 for the metrics. A client that gave up and retries costs no second decoding."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request is cancelled itself (a forced shutdown)
        task.cancel()
        raise
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ApiError(499, "Client closed the request before its answer")
    return task.result()


async def disconnected(request: Request) -> None:
    """Returns when the client has gone (its body is read: uvicorn's next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def translate_request(model: ServedModel, checked: TranslateRequest,
                            timeout_s: float) -> dict[str, Any]:
    """The ``/translate`` answer: ``translatedText`` (and ``alternatives``) shaped like ``q``."""
    lines = [text_lines(text) for text in checked.texts]
    sentences = [line for text in lines for line in text if line]
    attention = checked.attention and not checked.is_list and len(sentences) == 1
    translations = await decode(model, Job(sentences, model.settings_for(checked.alternatives),
                                           attention, deliver=lambda result: None), timeout_s)
    found = iter(translations)
    texts, alternatives = [], []
    for text_lines_ in lines:
        mine = [next(found) for line in text_lines_ if line]
        text, others = assemble(text_lines_, mine, checked.alternatives)
        texts.append(text)
        alternatives.append(others)
    answer: dict[str, Any] = {"translatedText": texts if checked.is_list else texts[0]}
    if checked.alternatives:
        answer["alternatives"] = alternatives if checked.is_list else alternatives[0]
    if checked.attention:
        answer["attention"] = attention_of(translations[0]) if attention else None
    return answer


async def decode(model: ServedModel, job: Job, timeout_s: float) -> list[Any]:
    """Queue ``job`` on the model's worker and wait for its translations.

    Raises:
        ApiError: 503 with ``Retry-After`` when the queue is full or the wait passes
            ``timeout_s``; 500 when decoding failed.
    """
    if not job.sentences:
        return []
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(result: Any) -> None:
        if done.done():  # the request already gave up waiting
            return
        if isinstance(result, BaseException):
            done.set_exception(result)
        else:
            done.set_result(result)

    job.deliver = lambda result: loop.call_soon_threadsafe(settle, result)
    retry = {"Retry-After": RETRY_AFTER_S}
    try:
        model.worker.submit(job)
    except QueueFull as error:
        raise ApiError(503, f"Server busy ({error}); retry later", retry) from None
    try:
        return await asyncio.wait_for(done, timeout_s)
    except (WorkerGone, DecodeFailed) as error:
        raise ApiError(500, f"Translation failed: {error}") from None
    except asyncio.CancelledError:  # the server stopped waiting (a forced shutdown)
        model.worker.cancel(job)
        raise
    except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
        model.worker.cancel(job)
        raise ApiError(503, f"Translation took longer than {timeout_s:g} s; retry later",
                       retry) from None
    except Exception as error:  # decoding failed (out of memory, a bug): said in one line
        raise ApiError(500, f"Translation failed: {type(error).__name__}: {error}") from None
