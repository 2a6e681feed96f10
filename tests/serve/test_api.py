"""The LibreTranslate API of ``seq2seq serve`` against ``seq2seq translate``: same outputs,
whatever the batching, through libretranslatepy, JSON, forms, lists and n-best lists."""

from __future__ import annotations

import asyncio
import re

import httpx
from libretranslatepy import LibreTranslateAPI

from tests.serve.conftest import Offline

CLIENTS = 32

# Lines `seq2seq translate` treats specially, or that stress the tokenizer: blank lines, a line
# past translate's 5000-character cut, odd Unicode, a NUL, a carriage return inside a line.
ODD_LINES = [
    "", "   ", "\t", "  the dog sleeps .  ", "Äpfel, Öl und Übermut – café naïve ß",
    "🐕🐕 the dog 🐕", "שלום the cat", "a\u0301b\u0308c combining marks", "zero\u200bwidth",
    "nul\x00byte in the middle", "a carriage\rreturn inside", "\u2028 a line separator",
    "tab\tinside", "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ", "\ufeffbyte order mark",
]


def long_line(sentences: list[str]) -> str:
    """A line of 6000 characters: ``translate`` cuts it to its first 5000."""
    return " ".join(sentences * 20)[:6000]


def batch_counts(url: str) -> tuple[float, float, float]:
    """(search steps run, their sentences summed, sentences translated) from ``/metrics``."""
    text = httpx.get(url + "metrics").text

    def value(name: str) -> float:
        return float(re.search(rf'^{name}\{{pair="en-de"\}} (\S+)$', text, re.M).group(1))

    return (value("seq2seq_batch_sentences_count"), value("seq2seq_batch_sentences_sum"),
            value("seq2seq_sentences_total"))


def test_libretranslatepy_translates_and_lists_languages(server, checkpoint, tmp_path):
    client = LibreTranslateAPI(server.url)
    assert client.languages() == [
        {"code": "de", "name": "German", "targets": []},
        {"code": "en", "name": "English", "targets": ["de"]}]
    sentences = ["the small dog sleeps .", "", "Äpfel & café"]
    expected = Offline(checkpoint, sentences, tmp_path)
    expected.check([client.translate(s, "en", "de") for s in sentences])
    assert expected.best[0][0]  # a real translation, not an empty line


def test_concurrent_clients_get_what_translate_writes(server, checkpoint, test_sentences,
                                                      tmp_path):
    lines = test_sentences + ODD_LINES + [long_line(test_sentences)]
    expected = Offline(checkpoint, lines, tmp_path)
    steps_before, stepped_before, translated_before = batch_counts(server.url)

    async def run_clients() -> list[str]:
        answers: list[str | None] = [None] * len(lines)
        todo = iter(range(len(lines)))

        async def client(http: httpx.AsyncClient) -> None:
            for i in todo:  # the clients share one iterator: each line is sent once
                response = await http.post("translate", json={
                    "q": lines[i], "source": "en", "target": "de"})
                assert response.status_code == 200, response.text
                answers[i] = response.json()["translatedText"]

        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
        return answers

    answers = asyncio.run(run_clients())
    expected.check(answers)
    # The sentences really were decoded together: many per search step on average.
    steps, stepped, translated = batch_counts(server.url)
    non_blank = sum(1 for line in lines if line.strip())
    assert translated - translated_before == non_blank
    assert (stepped - stepped_before) / (steps - steps_before) > 4


def test_lists_and_multiline_texts_follow_translate_line_by_line(server, checkpoint,
                                                                 test_sentences, tmp_path):
    block = test_sentences[:4]
    text = f"{block[0]}\n\n{block[1]}\r\n  \n{block[2]}\n{block[3]}\n"
    lines = text.split("\n")
    expected = Offline(checkpoint, [line.rstrip("\r") for line in lines] + [block[0]], tmp_path)
    q = [text, "", "   ", block[0]]
    response = httpx.post(server.url + "translate",
                          json={"q": q, "source": "en", "target": "de"})
    assert response.status_code == 200, response.text
    answer = response.json()["translatedText"]
    assert len(answer) == len(q) and answer[1:3] == ["", ""]
    expected.check(answer[0].split("\n") + answer[3:])
    assert httpx.post(server.url + "translate", json={
        "q": [], "source": "en", "target": "de"}).json() == {"translatedText": []}


def test_alternatives_are_translates_nbest_list(server, checkpoint, test_sentences, tmp_path):
    sentences = test_sentences[10:14]
    expected = Offline(checkpoint, sentences, tmp_path, nbest=3)
    answers = []
    for sentence in sentences:
        as_json = httpx.post(server.url + "translate", json={
            "q": sentence, "source": "en", "target": "de", "alternatives": 2}).json()
        as_form = httpx.post(server.url + "translate", data={
            "q": sentence, "source": "en", "target": "de", "alternatives": "2"}).json()
        assert as_json == as_form
        assert sorted(as_json) == ["alternatives", "translatedText"]
        answers.append([as_json["translatedText"]] + as_json["alternatives"])
    expected.check(answers)
    both = httpx.post(server.url + "translate", json={
        "q": sentences[:2], "source": "en", "target": "de", "alternatives": 2}).json()
    assert sorted(both) == ["alternatives", "translatedText"]
    assert len(both["translatedText"]) == len(both["alternatives"]) == 2
    Offline(checkpoint, sentences[:2], tmp_path, nbest=3).check(
        [[both["translatedText"][i]] + both["alternatives"][i] for i in range(2)])


def test_attention_for_one_sentence(server, checkpoint, tmp_path):
    sentence = "the small dog sleeps ."
    answer = httpx.post(server.url + "translate", json={
        "q": sentence, "source": "en", "target": "de", "attention": True}).json()
    Offline(checkpoint, [sentence], tmp_path).check([answer["translatedText"]])
    attention = answer["attention"]
    assert attention["src"][-1] == "</s>"
    assert len(attention["weights"]) == len(attention["hyp"])
    for row in attention["weights"]:
        assert len(row) == len(attention["src"])
        assert abs(sum(row) - 1) < 0.01  # each output piece's attention is a distribution
    several = httpx.post(server.url + "translate", json={
        "q": "one .\ntwo .", "source": "en", "target": "de", "attention": True}).json()
    assert several["attention"] is None  # a heatmap is for one sentence


def test_health_and_metrics(server):
    health = httpx.get(server.url + "health").json()
    assert health["status"] == "ok"
    assert [(m["source"], m["target"]) for m in health["models"]] == [("en", "de")]
    probe = httpx.head(server.url + "health")  # as uptime monitors probe
    assert probe.status_code == 200 and probe.content == b""
    metrics = httpx.get(server.url + "metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ["seq2seq_requests_total", "seq2seq_sentences_total",
                 "seq2seq_batch_sentences_bucket", "seq2seq_queue_sentences",
                 "seq2seq_request_seconds_bucket"]:
        assert name in metrics.text
    page = httpx.get(server.url)
    assert page.status_code == 200 and "<textarea" in page.text
