"""What clients cannot do to ``seq2seq serve``: hostile requests get the right 4xx and a JSON
error, a burst past the queue gets 503s, slow translations time out, and SIGTERM under load
answers every accepted request and exits 0; a killed decoding process fails its requests with
a JSON 500, later ones with 503, and ``/health`` with 503."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import LIMITS, Offline, Server

KEY = "secret-key"
GOOD = {"q": "the dog sleeps .", "source": "en", "target": "de", "api_key": KEY}
AS_JSON = {"Content-Type": "application/json"}


def with_(**changes) -> dict:
    """``GOOD`` with fields changed; a value of ``None`` removes the field."""
    fields = {**GOOD, **changes}
    return {name: value for name, value in fields.items() if value is not None}


def raw(text: str) -> dict:
    return {"content": text.encode("utf-8"), "headers": AS_JSON}


HOSTILE = [
    # (what, method, path, httpx keyword arguments, status)
    ("malformed JSON", "POST", "translate", raw('{"q": "the dog"'), 400),
    ("a JSON array", "POST", "translate", raw('["the dog"]'), 400),
    ("a JSON string", "POST", "translate", raw('"the dog"'), 400),
    ("invalid UTF-8 in JSON", "POST", "translate",
     {"content": b'{"q": "\xff\xfe"}', "headers": AS_JSON}, 400),
    ("JSON nested past the recursion limit", "POST", "translate", raw("[" * 1500), 400),
    ("NaN alternatives", "POST", "translate",
     raw(json.dumps(GOOD)[:-1] + ', "alternatives": NaN}'), 400),
    ("no q", "POST", "translate", {"json": with_(q=None)}, 400),
    ("q a number", "POST", "translate", {"json": with_(q=42)}, 400),
    ("q an object", "POST", "translate", {"json": with_(q={"text": "x"})}, 400),
    ("q a list holding a number", "POST", "translate", {"json": with_(q=["a", 1])}, 400),
    ("q a nested list", "POST", "translate", {"json": with_(q=[["a"]])}, 400),
    ("q a list too long", "POST", "translate",
     {"json": with_(q=["a"] * (LIMITS["max_texts"] + 1))}, 400),
    ("q over the character limit", "POST", "translate",
     {"json": with_(q="a" * (LIMITS["char_limit"] + 1))}, 400),
    ("q list over the character limit", "POST", "translate",
     {"json": with_(q=["a" * 41] * 5)}, 400),
    ("body over the size limit", "POST", "translate",
     {"json": with_(q="a" * LIMITS["body_limit"])}, 413),
    ("no source", "POST", "translate", {"json": with_(source=None)}, 400),
    ("no target", "POST", "translate", {"json": with_(target=None)}, 400),
    ("source a number", "POST", "translate", {"json": with_(source=7)}, 400),
    ("an unknown pair", "POST", "translate", {"json": with_(target="fr")}, 400),
    ("the reversed pair", "POST", "translate", {"json": with_(source="de", target="en")}, 400),
    ("source auto", "POST", "translate", {"json": with_(source="auto")}, 400),
    ("format html", "POST", "translate", {"json": with_(format="html")}, 400),
    ("format unknown", "POST", "translate", {"json": with_(format="markdown")}, 400),
    ("alternatives negative", "POST", "translate", {"json": with_(alternatives=-1)}, 400),
    ("alternatives text", "POST", "translate", {"json": with_(alternatives="two")}, 400),
    ("alternatives true", "POST", "translate", {"json": with_(alternatives=True)}, 400),
    # digits to str.isdigit, not to int()
    ("alternatives superscript", "POST", "translate", {"json": with_(alternatives="²")}, 400),
    ("alternatives of 1,500 digits", "POST", "translate",
     {"json": with_(alternatives="9" * 1500)}, 400),
    ("a form with alternatives superscript", "POST", "translate",
     {"content": "q=a&source=en&target=de&api_key=secret-key&alternatives=²".encode(),
      "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 400),
    ("a form of 101 fields", "POST", "translate",
     {"content": ("q=a&source=en&target=de&api_key=secret-key&"
                  + "&".join(f"f{i}=1" for i in range(97))).encode(),
      "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 400),
    ("alternatives past the limit", "POST", "translate", {"json": with_(alternatives=99)}, 400),
    ("alternatives past the beam", "POST", "translate", {"json": with_(alternatives=5)}, 400),
    ("attention not a boolean", "POST", "translate", {"json": with_(attention="maybe")}, 400),
    ("no API key", "POST", "translate", {"json": with_(api_key=None)}, 403),
    ("a wrong API key", "POST", "translate", {"json": with_(api_key="guess")}, 403),
    ("an API key that is a number", "POST", "translate", {"json": with_(api_key=1)}, 403),
    ("a form with q twice", "POST", "translate",
     {"content": b"q=a&q=b&source=en&target=de&api_key=secret-key",
      "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 400),
    ("a multipart form with a file", "POST", "translate",
     {"data": {"source": "en", "target": "de", "api_key": KEY},
      "files": {"q": ("q.txt", b"the dog")}}, 400),
    # Nothing, the key included, can be read from it: the key check answers first.
    ("a broken multipart body", "POST", "translate",
     {"content": b"--x\r\nnonsense", "headers": {
         "Content-Type": "multipart/form-data; boundary=x"}}, 403),
    ("a multipart form with a bad field", "POST", "translate",
     {"files": {"q": (None, b"the dog"), "source": (None, b"en"), "target": (None, b"de"),
                "api_key": (None, KEY.encode()), "format": (None, b"html")}}, 400),
    ("plain text", "POST", "translate",
     {"content": b"the dog", "headers": {"Content-Type": "text/plain"}}, 400),
    ("GET /translate", "GET", "translate", {}, 405),
    ("DELETE /languages", "DELETE", "languages", {}, 405),
    ("an unknown path", "GET", "admin/../../etc/passwd", {}, 404),
]


def test_hostile_requests_get_4xx_json_errors(limited_server):
    failures = []
    with httpx.Client(base_url=limited_server.url, timeout=60) as http:
        for what, method, path, kwargs, status in HOSTILE:
            response = http.request(method, path, **kwargs)
            body = response.json() if response.headers.get(
                "content-type", "").startswith("application/json") else None
            if (response.status_code != status or not isinstance(body, dict)
                    or not isinstance(body.get("error"), str) or not body["error"]
                    or "Traceback" in response.text):
                failures.append((what, response.status_code, response.text[:200]))
        assert not failures, failures
        assert http.get("health").status_code == 200
        # The server still translates, also a text with a lone surrogate (JSON allows one).
        assert http.post("translate", json=GOOD).status_code == 200
        odd = http.post("translate", **raw(json.dumps(GOOD)[:-1] + ', "q": "\\ud800 dog"}'))
        assert odd.status_code == 200 and isinstance(odd.json()["translatedText"], str)
    assert "Traceback" not in limited_server.output()


def test_a_burst_past_the_queue_gets_503_not_a_hang(limited_server, test_sentences):
    burst = 40

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=limited_server.url, timeout=60) as http:
            return await asyncio.gather(*(
                http.post("translate", json=with_(q=test_sentences[i])) for i in range(burst)))

    responses = asyncio.run(asyncio.wait_for(send_all(), timeout=120))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= burst // 2, statuses
    assert statuses.count(200) >= 1, statuses
    for response in responses:
        if response.status_code == 503:
            assert int(response.headers["Retry-After"]) >= 1
            assert "busy" in response.json()["error"]
    assert httpx.get(limited_server.url + "health").status_code == 200


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response with a Content-Length: its head and body may come in
    separate reads."""
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + int(
            re.search(rb"(?i)content-length: *(\d+)", data).group(1)):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_a_request_cut_short_or_held_back_is_a_4xx_or_closed_not_a_held_connection(
        checkpoint, tmp_path):
    server = Server(checkpoint, tmp_path / "serve.log", "--timeout", "2")
    host, port = re.match(r"http://([^:/]+):(\d+)/", server.url).groups()
    head = (b"POST /translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"q\": \"the d")
    try:
        with socket.create_connection((host, int(port))) as gone:
            gone.sendall(head)  # and goes away
        with socket.create_connection((host, int(port)), timeout=30) as slow:
            slow.sendall(head)  # and sends no more
            started = time.monotonic()
            answer = read_response(slow)
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert b"did not arrive within 2 seconds" in answer
            assert 1.5 < time.monotonic() - started < 20
        # Nor does a connection that sends nothing, or stops half way through its headers,
        # on its own or as the second request of a kept-alive connection.
        for first, sent in ((b"", b""), (b"", b"POST /translate HTTP/1.1\r\nHost: x\r\n"),
                            (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /hea")):
            with socket.create_connection((host, int(port)), timeout=30) as stalled:
                stalled.sendall(first)
                if first:
                    assert read_response(stalled).startswith(b"HTTP/1.1 200")
                stalled.sendall(sent)
                started = time.monotonic()
                assert stalled.recv(4096) == b"", (first, sent)  # closed by the server
                assert 1.5 < time.monotonic() - started < 20, (first, sent)
        deadline = time.monotonic() + 10
        while 'status="499"' not in httpx.get(server.url + "metrics").text:
            assert time.monotonic() < deadline, "the closed request was not counted"
            time.sleep(0.1)
        assert httpx.get(server.url + "health").status_code == 200
    finally:
        assert server.stop() == 0, server.output()
    assert "Traceback" not in server.output() and "Exception" not in server.output()


def test_a_request_whose_client_has_gone_is_not_decoded(checkpoint, test_sentences, tmp_path):
    """Requests whose clients gave up were all decoded, and counted as answered (200): a
    client that retries after a timeout doubled the work."""
    server = Server(checkpoint, tmp_path / "serve.log", "--batch-size", "1",
                    "--batch-wait-ms", "0")
    host, port = re.match(r"http://([^:/]+):(\d+)/", server.url).groups()

    def metric(name: str) -> float:
        found = re.search(rf"^{re.escape(name)} (\S+)$", httpx.get(server.url + "metrics").text,
                          re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    try:
        clients = []
        for start in range(0, 90, 3):  # 30 requests of 3 sentences
            body = json.dumps({"q": "\n".join(test_sentences[start:start + 3]), "source": "en",
                               "target": "de"}).encode()
            client = socket.create_connection((host, int(port)))
            client.sendall(b"POST /translate HTTP/1.1\r\nHost: x\r\nContent-Type: "
                           b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            clients.append(client)
        # Every request read and queued (else it ends as 499 before it is queued), all but the
        # one or two in decoding; then every client goes away.
        deadline = time.monotonic() + 60
        while (metric('seq2seq_queue_sentences{pair="en-de"}')
               + metric('seq2seq_sentences_total{pair="en-de"}') < 90 - 2 * 3):
            assert time.monotonic() < deadline, httpx.get(server.url + "metrics").text
            time.sleep(0.01)
        for client in clients:
            client.close()
        answered, gone = (f'seq2seq_requests_total{{path="/translate",status="{status}"}}'
                          for status in (200, 499))
        deadline = time.monotonic() + 60
        while (metric(answered) + metric(gone) < 30
               or metric('seq2seq_queue_sentences{pair="en-de"}') > 0):
            assert time.monotonic() < deadline, httpx.get(server.url + "metrics").text
            time.sleep(0.2)
        time.sleep(1)  # a request in decoding when its client left is still decoded
        assert metric(answered) <= 10, httpx.get(server.url + "metrics").text
        assert metric('seq2seq_sentences_total{pair="en-de"}') <= 3 * (metric(answered) + 2)
    finally:
        assert server.stop() == 0, server.output()
    assert "Traceback" not in server.output()


def test_a_slow_translation_times_out_with_503(checkpoint, test_sentences, tmp_path):
    server = Server(checkpoint, tmp_path / "serve.log", "--timeout", "0.01",
                    "--batch-size", "1")
    try:
        response = httpx.post(server.url + "translate", timeout=60, json={
            "q": test_sentences[:20], "source": "en", "target": "de"})
        assert response.status_code == 503
        assert "longer than 0.01 s" in response.json()["error"]
        assert response.headers["Retry-After"] == "1"
        assert httpx.get(server.url + "health").status_code == 200
    finally:
        assert server.stop() == 0, server.output()


def test_sigterm_under_load_answers_every_accepted_request(checkpoint, test_sentences,
                                                           tmp_path):
    sentences = test_sentences[100:132]
    expected = Offline(checkpoint, sentences, tmp_path)
    # One sentence per decode, so that the load lasts well past the moment all are accepted.
    server = Server(checkpoint, tmp_path / "serve.log", "--batch-size", "1",
                    "--batch-wait-ms", "0")

    async def load_then_sigterm() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            requests = [asyncio.create_task(http.post("translate", json={
                "q": sentence, "source": "en", "target": "de"})) for sentence in sentences]
            # SIGTERM once the server holds every request not yet answered (its gauge of
            # requests whose answer has not started; one answered is in it no more), however
            # fast or loaded this machine is.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                metrics = (await http.get("metrics")).text
                held = re.search(r'^seq2seq_requests_in_progress\{path="/translate"\} (\S+)$',
                                 metrics, re.MULTILINE)
                answered = sum(1 for request in requests if request.done())
                if held and float(held.group(1)) + answered >= len(requests):
                    break
                await asyncio.sleep(0.005)
            pending = sum(1 for request in requests if not request.done())
            server.process.terminate()
            answered = await asyncio.gather(*requests)
            return answered, pending

    try:
        responses, pending = asyncio.run(load_then_sigterm())
        code = server.process.wait(60)
    finally:
        server.kill()
    assert pending > 0, "the load was over before SIGTERM: nothing was tested"
    assert [r.status_code for r in responses] == [200] * len(sentences)
    expected.check([r.json()["translatedText"] for r in responses])
    assert code == 0, server.output()
    assert "every accepted request was answered" in server.output()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "health")


def decoding_process(server_pid: int) -> int:
    """The pid of the server's decoding process (its child running multiprocessing's spawn)."""
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    found = [int(pid) for pid in children
             if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(found) == 1, children
    return found[0]


def test_a_killed_decoding_process_fails_requests_and_health(checkpoint, test_sentences,
                                                             tmp_path):
    server = Server(checkpoint, tmp_path / "serve.log", "--batch-size", "1",
                    "--batch-wait-ms", "0")

    async def kill_while_decoding() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            # One sentence at a time: the worker is busy with these for a while.
            requests = [asyncio.create_task(http.post("translate", json={
                "q": sentence, "source": "en", "target": "de"}))
                for sentence in test_sentences[:60]]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                metrics = (await http.get("metrics")).text
                if re.search(r"^seq2seq_batch_sentences_count\S* [1-9]", metrics, re.M):
                    break  # decoding has begun
                await asyncio.sleep(0.002)
            os.kill(decoding_process(server.process.pid), signal.SIGKILL)
            return await asyncio.gather(*requests)

    try:
        responses = asyncio.run(kill_while_decoding())
        failed = [r.json()["error"] for r in responses if r.status_code != 200]
        assert failed, "every request was answered before the kill: nothing was tested"
        assert all("decoding process has ended (exit code -9)" in error for error in failed)
        assert {r.status_code for r in responses} <= {200, 500, 503}
        later = httpx.post(server.url + "translate", json={
            "q": "the dog sleeps .", "source": "en", "target": "de"})
        assert later.status_code == 503 and "decoding process has ended" in later.json()["error"]
        health = httpx.get(server.url + "health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert "exit code -9" in health.json()["models"][0]["failure"]
        assert httpx.head(server.url + "health").status_code == 503
    finally:
        assert server.stop() == 0, server.output()
