"""The request counter of ``/metrics``: every answer counted once by path and status, failures
(500s, answered outside the counting middleware) included."""

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.testclient import TestClient

from seq2seq.serve.app import add_error_handlers
from seq2seq.serve.metrics import Metrics
from seq2seq.serve.parsing import ApiError


def counts(metrics: Metrics) -> dict[tuple[str, str], float]:
    return {(s.labels["path"], s.labels["status"]): s.value
            for family in metrics.registry.collect() if family.name == "seq2seq_requests"
            for s in family.samples if s.name.endswith("_total")}


def test_answers_are_counted_by_path_and_status():
    metrics = Metrics()
    app = FastAPI()
    add_error_handlers(app, metrics)

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.post("/translate")
    async def translate(fail: str = "") -> JSONResponse:
        if fail == "bug":
            raise RuntimeError("a bug")
        if fail == "refused":
            raise ApiError(400, "Invalid request")
        return JSONResponse({"translatedText": "x"})

    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/health").status_code == 200
    assert client.get("/health").status_code == 200
    assert client.post("/translate").status_code == 200
    assert client.post("/translate?fail=refused").status_code == 400
    failed = client.post("/translate?fail=bug")
    assert failed.status_code == 500 and failed.json() == {"error": "Translation error: "
                                                           "RuntimeError"}
    assert client.get("/secret/path").status_code == 404
    assert counts(metrics) == {("/health", "200"): 2, ("/translate", "200"): 1,
                               ("/translate", "400"): 1, ("/translate", "500"): 1,
                               ("other", "404"): 1}
    # Every request, answered or failed, has left the gauge of requests in progress.
    in_progress = {s.labels["path"]: s.value for family in metrics.registry.collect()
                   if family.name == "seq2seq_requests_in_progress" for s in family.samples}
    assert in_progress == {"/health": 0, "/translate": 0, "other": 0}


def test_a_request_is_in_progress_until_its_answer_starts():
    metrics = Metrics()
    app = FastAPI()
    add_error_handlers(app, metrics)
    seen = []

    @app.get("/health")
    async def health() -> JSONResponse:
        seen.append(metrics.in_progress.labels(path="/health")._value.get())
        return JSONResponse({"status": "ok"})

    client = TestClient(app)
    assert client.get("/health").status_code == 200
    assert seen == [1] and metrics.in_progress.labels(path="/health")._value.get() == 0


def test_a_decoding_failure_is_a_500_that_names_it_and_that_a_browser_can_read():
    """Starlette answers an unexpected error outside the CORS middleware: a web page could
    not read the 500. A worker's failure (out of memory, say) is now an ApiError naming it."""
    from seq2seq.serve.app import build_app
    from seq2seq.serve.options import ServeOptions
    from seq2seq.serve.pairs import LanguagePairs, ServedModel
    from seq2seq.serve.worker import DecodeFailed

    class Failing:  # delivers what a worker delivers when decoding fails
        queued, failure = 0, None
        error: Exception = RuntimeError("out of memory")  # an in-process BatchWorker's

        def start(self):
            pass

        def stop(self):
            pass

        def cancel(self, job):
            pass

        def submit(self, job):
            job.deliver(self.error)

    worker = Failing()
    model = ServedModel("en", "de", "x.pt", None, None, worker)
    metrics = Metrics()
    with TestClient(build_app(LanguagePairs([model]), ServeOptions(), metrics),
                    raise_server_exceptions=False) as client:
        failed = client.post("/translate", json={"q": "a dog", "source": "en", "target": "de"},
                             headers={"Origin": "https://example.org"})
        # a worker process sends the type and text of its error (WorkerProcess delivers them)
        worker.error = DecodeFailed("OutOfMemoryError: CUDA out of memory")
        from_process = client.post("/translate", json={"q": "a dog", "source": "en",
                                                     "target": "de"})
    assert failed.status_code == 500
    assert failed.json() == {"error": "Translation failed: RuntimeError: out of memory"}
    assert failed.headers["access-control-allow-origin"] == "*"
    assert from_process.json() == {"error": "Translation failed: OutOfMemoryError: CUDA out of "
                                          "memory"}
    assert counts(metrics)[("/translate", "500")] == 2

    app = FastAPI()  # and an error that nothing expected: the catch-all answer has it too
    add_error_handlers(app, Metrics())

    @app.get("/bug")
    async def bug() -> JSONResponse:
        raise RuntimeError("a bug")

    answer = TestClient(app, raise_server_exceptions=False).get(
        "/bug", headers={"Origin": "https://example.org"})
    assert answer.status_code == 500 and answer.headers["access-control-allow-origin"] == "*"

