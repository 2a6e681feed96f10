"""End to end through the `seq2seq` command: prepare, train, translate, evaluate, average."""

import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, shared_data_root


def seq2seq(*args, stdin=None, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "seq2seq", *map(str, args)], input=stdin,
                          capture_output=True, cwd=REPO, timeout=timeout, env=env)


def tiny_recipe_file(tmp_path):
    tree = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    tree["output_dir"] = str(tmp_path / "run")
    tree["data"]["train"]["size"] = 400
    tree["data"]["valid"]["size"] = 30
    tree["data"]["test"]["synthetic"]["size"] = 40
    tree["data"]["num_proc"] = 1
    tree["tokenizer"]["vocab_size"] = 150
    tree["model"].update(emb_size=8, enc_hidden=8, dec_hidden=16, attention_size=8)
    tree["train"].update(max_epochs=0, max_steps=4, valid_every=2, batch_tokens=400)
    tree["decode"].update(beam_size=3, max_len_ratio=1.0, max_len_add=3)
    tree["eval"].update(bootstrap=20, attention_plots=2)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("e2e")
    recipe = tiny_recipe_file(tmp_path)
    result = seq2seq("train", recipe)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    return recipe, tmp_path / "run"


def test_a_signal_stops_training_with_a_saved_checkpoint_and_exit_128_plus_n(tmp_path):
    recipe = tiny_recipe_file(tmp_path)
    tree = yaml.safe_load(recipe.read_text())
    tree["train"].update(max_steps=100_000, valid_every=2)
    recipe.write_text(yaml.safe_dump(tree))
    run = tmp_path / "run"
    # each one after the first resumes
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)):
        seen = set(run.glob("step_*.pt"))
        # SIGHUP as from a terminal, whatever the test runner inherited (nohup ignores it)
        process = subprocess.Popen([sys.executable, "-m", "seq2seq", "train", recipe], cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   preexec_fn=lambda: signal.signal(signal.SIGHUP,
                                                                    signal.SIG_DFL))
        deadline = time.monotonic() + 300
        while not set(run.glob("step_*.pt")) - seen and process.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.1)
        process.send_signal(sig)
        _, err = process.communicate(timeout=300)
        # Non-zero, so `seq2seq train R && seq2seq evaluate R` stops after Ctrl-C.
        assert process.returncode == code, err.decode()[-2000:]
        assert f"received {sig.name}" in err.decode()
        assert (run / "last.pt").is_file()


def test_checkpoints_carry_a_lexicon_for_the_shortlist(trained, tmp_path):
    from seq2seq.checkpoint import load_checkpoint, save_checkpoint

    _, run = trained
    ckpt = load_checkpoint(run / "best.pt")
    table = ckpt["lexicon"]["table"]
    assert table.shape[0] == ckpt["model"]["encoder.embedding.weight"].shape[0]
    text = b"a small house\n\nthe dog sleeps\n"
    plain = seq2seq("translate", "--checkpoint", run / "best.pt", "--beam", "3", stdin=text)
    listed = seq2seq("translate", "--checkpoint", run / "best.pt", "--beam", "3",
                     "--shortlist", "5", stdin=text)
    assert plain.returncode == 0 and listed.returncode == 0, listed.stderr.decode()
    assert len(listed.stdout.decode().split("\n")) == 4 and listed.stdout.decode().split(
        "\n")[1] == ""
    # averaging keeps it; a checkpoint without one is refused in one line, before decoding
    averaged = tmp_path / "avg.pt"
    assert seq2seq("average", "--output", averaged, run / "best.pt", run / "last.pt"
                   ).returncode == 0
    assert load_checkpoint(averaged)["lexicon"]["table"].equal(table)
    del ckpt["lexicon"]
    old = tmp_path / "old.pt"
    save_checkpoint(ckpt, old)
    refused = seq2seq("translate", "--checkpoint", old, "--shortlist", "5", stdin=text)
    err = refused.stderr.decode()
    assert refused.returncode == 2 and err.count("\n") == 1, err  # a setting error: 2
    assert "--shortlist" in err and str(old) in err and "lexicon" in err
    out_of_range = seq2seq("translate", "--checkpoint", run / "best.pt", "--shortlist", "101",
                           stdin=text)
    assert out_of_range.returncode == 2 and "--shortlist" in out_of_range.stderr.decode()


def test_translate_keeps_every_line_including_blank_ones(trained):
    _, run = trained
    result = seq2seq("translate", "--checkpoint", run / "best.pt", stdin=b"a\n\n  \nb\n")
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().split("\n")
    assert len(lines) == 5 and lines[-1] == ""  # four lines, each ending in \n
    assert lines[1] == "" and lines[2] == ""


def test_translate_ten_thousand_lines_in_order(trained, tmp_path):
    _, run = trained
    # Every line differs, and the output of each is checked against translating it alone.
    words = ["dog", "cat", "the", "small", "sees", "a", "house", "sleeps", "at 7 o'clock"]
    lines = [" ".join(words[(i * 7 + k) % len(words)] for k in range(1 + i % 6))
             for i in range(10_000)]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    result = seq2seq("translate", "--checkpoint", run / "best.pt", "--input", src,
                     "--output", out, "--beam", "2", "--batch-tokens", "2000")
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    outputs = out.read_text(encoding="utf-8").split("\n")
    assert len(outputs) == 10_001 and outputs[-1] == ""
    sample = [0, 1, 2, 4999, 9998, 9999]
    alone = seq2seq("translate", "--checkpoint", run / "best.pt", "--beam", "2",
                    stdin="".join(lines[i] + "\n" for i in sample).encode())
    assert alone.stdout.decode().split("\n")[:-1] == [outputs[i] for i in sample]


def test_translate_nbest_and_scores(trained):
    _, run = trained
    result = seq2seq("translate", "--checkpoint", run / "best.pt", "--nbest", "2", "--beam",
                     "3", stdin=b"the dog\nthe cat sees a house\n")
    rows = [line.split("\t") for line in result.stdout.decode().splitlines()]
    assert [r[0] for r in rows] == ["0", "0", "1", "1"]
    scores = [float(r[1]) for r in rows]
    assert scores[0] >= scores[1] and scores[2] >= scores[3]


def test_translator_nbest_of_a_batch_equals_each_sentence_alone(trained):
    from seq2seq.translate import Translator

    _, run = trained
    translator = Translator.from_checkpoint(run / "best.pt", device="cpu")
    settings = translator.decode_settings(beam=3, nbest=2)
    sentences = ["the dog", "", "the cat sees a small house", "a house"]
    batch = translator.translate_full(sentences, settings)
    for sentence, together in zip(sentences, batch):
        alone = translator.translate_full([sentence], settings)[0]
        assert together.hypotheses == alone.hypotheses
        assert len(alone.hypotheses) == (2 if sentence else 1)  # a blank one is not decoded
        assert together.scores == pytest.approx(alone.scores, abs=1e-5)
        assert together.src_pieces == [] and together.hyp_pieces == [[]] * len(alone.hypotheses)
    # With attention, the pieces label its rows (hypothesis tokens) and columns (source + EOS).
    detailed = translator.translate_full(sentences[2:3], settings, return_attention=True)[0]
    matrix = detailed.attention[0]
    assert matrix.shape == (len(detailed.hyp_pieces[0]), len(detailed.src_pieces))
    assert detailed.src_pieces[-1] == "</s>" and len(detailed.src_pieces) > 1


def test_translator_refuses_a_single_string(trained):
    from seq2seq.translate import Translator

    _, run = trained
    translator = Translator.from_checkpoint(run / "best.pt", device="cpu")
    # Iterating a str would translate it character by character.
    with pytest.raises(TypeError, match="list of strings, not one string"):
        translator.translate("the dog sleeps .")
    with pytest.raises(TypeError, match="list of strings"):
        translator.translate_full("the dog", translator.decode_settings())


def test_translator_refuses_settings_it_does_not_know_and_takes_lone_surrogates(trained):
    from seq2seq.translate import SettingError, SettingTypeError, Translator

    _, run = trained
    best = run / "best.pt"
    for kwargs, error, words in [
            (dict(precision="fp8"), SettingError, "fp32, bf16 or auto"),
            (dict(precision=None), SettingError, "fp32, bf16 or auto"),
            (dict(quantize="no"), SettingTypeError, "True or False"),
            (dict(paths=None), SettingTypeError, "got NoneType"),
            (dict(paths=str(best).encode()), SettingTypeError, "got bytes")]:
        with pytest.raises(error, match=words):  # "fp8" became fp32, "no" int8
            Translator.from_checkpoint(**{"paths": best, "device": "cpu", **kwargs})
    translator = Translator.from_checkpoint((best,), device="cpu")
    # as the server takes them (JSON allows "\ud800"): replaced, not a tokenizer's error
    (odd,) = translator.translate(["the \ud800 dog"])
    assert odd == translator.translate(["the \ufffd dog"])[0]


def test_translator_gives_blank_sentences_an_empty_translation_without_decoding(
        trained, monkeypatch):
    import seq2seq.translate as translate_module

    _, run = trained
    translator = translate_module.Translator.from_checkpoint(run / "best.pt", device="cpu")
    searched = []
    decode_ids = translate_module.decode_ids

    def recording_decode_ids(model, src_ids, *args):
        searched.extend(src_ids)
        return decode_ids(model, src_ids, *args)

    monkeypatch.setattr(translate_module, "decode_ids", recording_decode_ids)
    # and lines of only what SentencePiece deletes (a zero-width space, a control character):
    # they encoded to no token, from which the model made a sentence up
    sentences = ["", "the dog", "  ", "\t", "a house", "\u200b", "\x01\u200b"]
    hyps = translator.translate(sentences, beam=2)
    assert len(searched) == 2 and all(searched)  # the blank ones never reached the search
    assert hyps[0] == hyps[2] == hyps[3] == hyps[5] == hyps[6] == ""
    assert hyps[1] == translator.translate(["the dog"], beam=2)[0]
    assert translator.translate(["", "a house"], beam=3, nbest=2)[0] == [""]
    # The API agrees with the command line, which writes an empty line for a blank one.
    cli = seq2seq("translate", "--checkpoint", run / "best.pt", "--beam", "2",
                  stdin="".join(s + "\n" for s in sentences).encode())
    assert cli.stdout.decode().split("\n")[:-1] == hyps


def test_attention_jsonl_has_one_label_per_row_and_column(trained, tmp_path, monkeypatch):
    import torch

    import seq2seq.translate as translate_module
    from seq2seq.search import Hypothesis
    from seq2seq.translate_io import write_attention_jsonl

    _, run = trained

    def fake_decode_ids(model, src_ids, decode, device, return_attention, lexicon=None):
        # Sentence 0 ends in EOS (one attention row more than tokens); sentence 1 was cut at
        # the maximum length (no EOS row).
        nbests = []
        for i, ids in enumerate(src_ids):
            tokens = [5, 6, 7]
            rows = len(tokens) + (1 if i == 0 else 0)
            attention = torch.softmax(torch.randn(rows, len(ids) + 1), dim=-1)
            nbests.append([Hypothesis(tokens=tokens, score=-1.0, log_prob=-1.0,
                                      attention=attention)])
        return nbests

    monkeypatch.setattr(translate_module, "decode_ids", fake_decode_ids)
    (tmp_path / "in.txt").write_text("the dog sleeps\n\nthe cat\n")
    result = seq2seq("translate", "--checkpoint", run / "best.pt", "--beam", "2",
                     "--input", tmp_path / "in.txt", "--attention", tmp_path / "attn.jsonl")
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "attn.jsonl").read_text().splitlines()]
    assert [row["index"] for row in rows] == [0, 2]  # the blank line has no row
    for row in rows:
        assert len(row["attention"]) == len(row["hyp"])
        assert all(len(weights) == len(row["src"]) for weights in row["attention"])
        assert row["src"][-1] == "</s>"
    # The fake search only runs in-process; the command above decoded for real. Check the
    # labels of both kinds of hypotheses through the Translator itself.
    translator = translate_module.Translator.from_checkpoint(run / "best.pt", device="cpu")
    ended, cut = translator.translate_full(["the dog sleeps", "the cat"],
                                           translator.decode_settings(), True)
    assert ended.hyp_pieces[0][-1] == "</s>" and len(ended.hyp_pieces[0]) == 4
    assert "</s>" not in cut.hyp_pieces[0] and len(cut.hyp_pieces[0]) == 3
    for r in (ended, cut):
        assert r.attention[0].shape == (len(r.hyp_pieces[0]), len(r.src_pieces))
    buffer = io.StringIO()
    write_attention_jsonl(buffer, 0, ended)
    row = json.loads(buffer.getvalue())
    assert row["hyp"][-1] == "</s>" and len(row["attention"]) == len(row["hyp"]) == 4


def test_evaluate_writes_reports(trained):
    recipe, run = trained
    result = seq2seq("evaluate", recipe)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    report = json.loads((run / "eval" / "report.json").read_text())
    entry = report["test_sets"][0]
    assert entry["n_sentences"] == 40
    for name in ("report.md", "bleu_by_length_synthetic.png", "attention_synthetic_1.png",
                 "attention_synthetic_2.png"):
        assert (run / "eval" / name).is_file(), name
    assert entry["decoding"]["beam_size"] == 3  # the recipe's decode section


def test_evaluate_takes_decode_overrides_of_the_recipe(trained, tmp_path):
    recipe, _ = trained
    result = seq2seq("evaluate", recipe, "decode.beam_size=2", "decode.alpha=0.3",
                     "--report-dir", tmp_path / "eval")
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    entry = json.loads((tmp_path / "eval" / "report.json").read_text())["test_sets"][0]
    assert (entry["decoding"]["beam_size"], entry["decoding"]["alpha"]) == (2, 0.3)


def test_evaluate_a_reference_against_itself_scores_100(trained, tmp_path):
    _, run = trained
    ref = shared_data_root() / "multi30k" / "test_2016_flickr.en.gz"
    result = seq2seq("evaluate", "--checkpoint", run / "best.pt", "--src", ref, "--ref", ref,
                     "--compare", ref, "--report-dir", tmp_path / "rep")
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    # The system output is the model's; the --compare system is the reference itself.
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    entry = report["test_sets"][0]
    assert entry["compare"]["bleu"]["b"] == pytest.approx(100.0)
    # allowed, but surely not meant: said in one line
    assert result.stderr.decode().count(f"warning: {ref}: is the --src file itself") == 1


def test_a_compare_file_of_another_length_is_refused_before_the_model_loads(tmp_path):
    """It was refused after the whole test set had been decoded."""
    src, ref, other = tmp_path / "src.txt", tmp_path / "ref.txt", tmp_path / "other.txt"
    src.write_text("ein Hund\nzwei Katzen\n")
    ref.write_text("a dog\ntwo cats\n")
    other.write_text("a dog\n")
    result = seq2seq("evaluate", "--checkpoint", tmp_path / "none.pt", "--src", src, "--ref",
                     ref, "--compare", other, "--report-dir", tmp_path / "rep")
    assert result.returncode == 2
    assert result.stderr.decode().strip().splitlines() == [
        f"error: {other}: 1 lines but test set src.txt has 2"]


def test_one_compare_file_is_not_paired_with_several_test_sets_nor_a_report_dir_dash(tmp_path):
    """--compare FILE was paired with every test set of the recipe (a 'significant' test
    between outputs of other sentences); --report-dir - made a directory named '-'."""
    other = tmp_path / "other.txt"
    other.write_text("a\n" * 20)
    two = ["recipes/quickstart.yaml", f"output_dir={tmp_path / 'run'}",
           "data.test.synthetic.size=20", "data.test.more.format=generated",
           "data.test.more.split=valid", "data.test.more.size=20"]
    result = seq2seq("evaluate", *two, "--checkpoint", tmp_path / "none.pt", "--compare", other)
    assert result.returncode == 2 and result.stderr.decode().strip().splitlines() == [
        f"error: --compare {other}: the recipe has 2 test sets; compare on one with --src FILE "
        "--ref FILE"]
    result = seq2seq("evaluate", *two, "--report-dir", "-")
    assert result.returncode == 2 and not (REPO / "-").exists()
    assert "--report-dir -: a report is several files" in result.stderr.decode()


def test_evaluate_files_and_int8_have_default_report_dirs_of_their_own(trained, tmp_path):
    from seq2seq.quantize import int8_kernel as this_cpus_kernel

    _, run = trained
    (tmp_path / "run" / "eval").mkdir(parents=True)
    shutil.copy(run / "best.pt", tmp_path / "run" / "best.pt")
    recipe_report = tmp_path / "run" / "eval" / "report.md"
    recipe_report.write_text("the recipe's report\n")
    (tmp_path / "src.txt").write_text("the dog\nthe cat sees a house\n\n")
    (tmp_path / "ref.txt").write_text("der Hund\ndie Katze sieht ein Haus\n\n")
    args = ["evaluate", "--checkpoint", tmp_path / "run" / "best.pt", "--src",
            tmp_path / "src.txt", "--ref", tmp_path / "ref.txt", "--beam", "1"]
    for extra, report_dir, quantized in (([], "eval-src.txt", False),
                                         (["--quantize"], "eval-src.txt-int8", True)):
        result = seq2seq(*args, *extra)
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        report = tmp_path / "run" / report_dir
        entry = json.loads((report / "report.json").read_text())["test_sets"][0]
        assert entry["decoding"]["quantized"] is quantized
        assert entry["decoding"].get("int8_kernel") == (this_cpus_kernel() if quantized else None)
        assert f"quantized={quantized}" in (report / "report.md").read_text()
        assert recipe_report.read_text() == "the recipe's report\n"  # not overwritten
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "best.pt", "eval", "eval-src.txt", "eval-src.txt-int8"]


def test_default_report_dirs_of_a_recipe():
    from types import SimpleNamespace

    from seq2seq.evaluate import default_report_dir

    recipe = SimpleNamespace(output_dir="runs/x", eval=SimpleNamespace(report_dir=None))
    assert default_report_dir(recipe, ["runs/x/best.pt"], None, False) == Path("runs/x/eval")
    assert default_report_dir(recipe, ["runs/x/best.pt"], None, True) == Path(
        "runs/x/eval-int8")
    recipe.eval.report_dir = "reports/x/"
    assert default_report_dir(recipe, ["a/b.pt"], None, True) == Path("reports/x-int8")
    assert default_report_dir(recipe, ["a/b.pt", "c/d.pt"], "data/test.de.gz", False) == Path(
        "a/eval-test.de")


def test_average_two_checkpoints(trained, tmp_path):
    _, run = trained
    steps = sorted(run.glob("step_*.pt"))
    assert len(steps) >= 2
    result = seq2seq("average", *steps[-2:], "--output", tmp_path / "avg.pt")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().endswith("(average of 2 checkpoints)\n")
    from seq2seq.checkpoint import load_checkpoint

    newest = load_checkpoint(steps[-1])["step"]  # the step of the newest, in either order
    assert load_checkpoint(tmp_path / "avg.pt")["step"] == newest
    seq2seq("average", steps[-1], steps[-2], "--output", tmp_path / "reversed.pt")
    assert load_checkpoint(tmp_path / "reversed.pt")["step"] == newest
    one = seq2seq("average", steps[-1], "--output", tmp_path / "one.pt")
    assert one.stdout.decode().endswith("(average of 1 checkpoint)\n")
    again = seq2seq("translate", "--checkpoint", tmp_path / "avg.pt", stdin=b"the dog\n")
    assert again.returncode == 0 and again.stdout.count(b"\n") == 1


def test_ensemble_of_two_checkpoints(trained):
    _, run = trained
    result = seq2seq("translate", "--checkpoint", run / "best.pt", "--checkpoint",
                     run / "last.pt", stdin=b"the dog\n\nthe cat\n")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.count(b"\n") == 3
    # The help says "give several": one flag with two files is the same ensemble.
    listed = seq2seq("translate", "--checkpoint", run / "best.pt", run / "last.pt",
                     stdin=b"the dog\n\nthe cat\n")
    assert listed.returncode == 0, listed.stderr.decode()
    assert listed.stdout == result.stdout


def test_an_ensemble_refuses_another_tokenizer_or_language_pair(trained, tmp_path):
    """Members average their probabilities token id by token id: each must have the first's
    tokenizer (equal vocabulary sizes are not enough) and translate the same pair."""
    import torch
    from sentencepiece import sentencepiece_model_pb2

    from seq2seq.checkpoint import load_checkpoint, save_checkpoint

    _, run = trained
    ckpt = load_checkpoint(run / "last.pt")
    proto = sentencepiece_model_pb2.ModelProto()
    name = "spm_model" if "spm_model" in ckpt["tokenizer"] else "src_model"
    proto.ParseFromString(ckpt["tokenizer"][name].numpy().tobytes())
    proto.pieces[-1].score -= 1.0  # the same pieces and size, other segmentations
    tokenizer = dict(ckpt["tokenizer"])
    tokenizer[name] = torch.frombuffer(bytearray(proto.SerializeToString()), dtype=torch.uint8)
    save_checkpoint({**ckpt, "tokenizer": tokenizer}, tmp_path / "other_tok.pt")
    recipe = {**ckpt["recipe"], "data": {**ckpt["recipe"]["data"], "src_lang": "fr"}}
    save_checkpoint({**ckpt, "recipe": recipe}, tmp_path / "other_pair.pt")
    for member, message in [("other_tok.pt", "its tokenizer differs from"),
                            ("other_pair.pt", "other_pair.pt: translates fr-de, but the "
                             f"language pair of {run / 'last.pt'} is en-de; an ensemble needs "
                             "one language pair")]:
        result = seq2seq("translate", "--checkpoint", run / "last.pt", tmp_path / member,
                         stdin=b"the dog\n")
        err = result.stderr.decode()
        assert result.returncode != 0 and message in err and err.count("\n") == 1, err
        assert result.stdout == b""
    alone = seq2seq("translate", "--checkpoint", tmp_path / "other_tok.pt", stdin=b"the dog\n")
    assert alone.returncode == 0, alone.stderr.decode()  # the member itself is sound


@pytest.mark.parametrize("option,argv", [
    ("--input", ["translate", "--checkpoint", "a.pt", "--input", "x", "--input", "y"]),
    ("--beam", ["translate", "--checkpoint", "a.pt", "--beam", "2", "--beam=3"]),
    ("--src", ["evaluate", "--checkpoint", "a.pt", "--src", "x", "--ref", "r", "--src", "y"]),
    ("--port", ["serve", "a.pt", "--port", "1", "--port", "2"]),
    ("--output", ["average", "a.pt", "b.pt", "--output", "x.pt", "--output", "y.pt"]),
])
def test_an_option_of_one_value_given_twice_is_refused(option, argv, capsys):
    """argparse would keep the last value: ``--input x --input y`` read y without a word."""
    from seq2seq.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"error: seq2seq {argv[0]}: argument {option}: given more than once "
                   f"(see seq2seq {argv[0]} --help)\n")


def test_options_that_collect_values_still_take_several():
    from seq2seq.cli import build_parser

    args = build_parser().parse_args(["evaluate", "--checkpoint", "a.pt", "--checkpoint",
                                      "b.pt", "--src", "s", "--ref", "r1", "--ref", "r2"])
    assert args.checkpoint == ["a.pt", "b.pt"] and args.ref == ["r1", "r2"]
    assert not hasattr(args, "_options_given")


def test_evaluate_refuses_src_without_ref_and_ref_without_src(trained, tmp_path):
    recipe, run = trained
    for flags, message in [(["--src", "x.txt"], "--src FILE needs at least one --ref"),
                           (["--ref", "x.txt"], "--ref FILE needs --src FILE")]:
        result = seq2seq("evaluate", recipe, *flags)
        err = result.stderr.decode()
        assert result.returncode == 2 and message in err and err.count("\n") == 1, err


def test_evaluate_refuses_a_bad_report_dir_and_plots_over_inputs_before_decoding(
        trained, tmp_path):
    _, run = trained
    src, ref = tmp_path / "s.txt", tmp_path / "r.txt"
    src.write_text("the dog\n")
    ref.write_text("der Hund\n")
    (tmp_path / "file").write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    victim = tmp_path / "victim.pt"
    shutil.copy(run / "best.pt", victim)
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "attention_s.txt_1.png").symlink_to(victim)
    for report_dir, message in [
            (tmp_path / "file" / "sub", "exists and is not a directory"),
            (tmp_path / "dangling", "is a symbolic link to nothing"),
            (plots, "is the same file as the input")]:
        result = seq2seq("evaluate", "--checkpoint", victim, "--src", src, "--ref", ref,
                         "--report-dir", report_dir)
        err = result.stderr.decode()
        assert result.returncode == 2 and message in err and err.count("\n") == 1, err
    assert victim.read_bytes() == (run / "best.pt").read_bytes()


def test_evaluate_refuses_report_files_it_cannot_write_or_that_it_reads_before_decoding(
        trained, tmp_path):
    """A read-only report.md (or a report.json that is a directory) was found after the whole
    decoding; a recipe's test corpus named like a report file was overwritten by the report."""
    recipe, run = trained
    src, ref = tmp_path / "s.txt", tmp_path / "r.txt"
    src.write_text("the dog\n")
    ref.write_text("der Hund\n")
    locked, odd = tmp_path / "locked", tmp_path / "odd"
    (locked).mkdir()
    (locked / "report.md").write_text("keep\n")
    (locked / "report.md").chmod(0o444)
    (odd / "report.json").mkdir(parents=True)
    for report_dir, message in [(locked, "report.md: is read-only; not replaced"),
                                (odd, "report.json: is a directory, not an output file")]:
        result = seq2seq("evaluate", "--checkpoint", run / "best.pt", "--src", src, "--ref",
                         ref, "--report-dir", report_dir)
        err = result.stderr.decode()
        assert result.returncode == 2 and message in err and err.count("\n") == 1, err
        assert not (report_dir / "s.txt.hyp.txt").exists()  # refused before decoding
    corpus = tmp_path / "report.json"
    corpus.write_text('{"en": "the dog", "de": "der Hund"}\n')
    before = corpus.read_bytes()
    result = seq2seq("evaluate", recipe,
                     f"data.test={{t: {{format: jsonl, path: {corpus}}}}}",
                     f"eval.report_dir={tmp_path}")
    err = result.stderr.decode()
    assert result.returncode == 2 and err.count("\n") == 1, err
    assert f"{tmp_path / 'report.json'}: is the same file as the input {corpus}" in err
    assert corpus.read_bytes() == before


def test_evaluate_refuses_a_checkpoint_of_another_language_pair_than_the_recipe(trained):
    """A recipe's test sets decoded with a checkpoint of another pair scored near 0, no word."""
    recipe, run = trained
    result = seq2seq("evaluate", recipe, "data.src_lang=fr", "--checkpoint", run / "best.pt")
    assert result.returncode == 2
    assert result.stderr.decode().splitlines()[-1] == (
        f"error: {run / 'best.pt'}: translates en-de, but the language pair of the recipe's "
        "test sets is fr-de")
    late = seq2seq("evaluate", recipe, "--checkpoint", run / "best.pt", "data.src_lang=fr")
    assert late.stderr.decode().splitlines()[-1] == (
        "error: data.src_lang=fr: no such checkpoint (an override? it goes before the "
        "checkpoints)")


def test_translate_refuses_a_stdout_appended_to_its_own_input(trained, tmp_path):
    """`translate --input a >> a` read its own translations and grew a without end."""
    _, run = trained
    data = tmp_path / "in.txt"
    data.write_text("the dog\n")
    with open(data, "ab") as out:
        result = subprocess.run([sys.executable, "-m", "seq2seq", "translate", "--checkpoint",
                                 str(run / "best.pt"), "--input", str(data)], stdout=out,
                                stderr=subprocess.PIPE, cwd=REPO, timeout=600)
    assert result.returncode == 2
    assert result.stderr.decode() == (f"error: <stdout>: is the same file as the input {data}; "
                                      "writing it would destroy the input\n")
    assert data.read_text() == "the dog\n"


def test_a_path_with_a_newline_is_said_on_one_line(trained, tmp_path):
    _, run = trained
    result = seq2seq("translate", "--checkpoint", run / "best.pt", "--input",
                     tmp_path / "no\nsuch.txt")
    assert result.returncode == 2
    assert result.stderr.decode() == f"error: {tmp_path}/no\\nsuch.txt: no such input file\n"


def test_an_output_onto_a_checkpoint_s_checksum_file_is_refused(trained, tmp_path):
    """A tab-completion slip replaced best.pt.sha256 with a checkpoint: every later load of
    best.pt then warned that its checksum file was stale."""
    _, run = trained
    for name in ("best.pt", "last.pt", "best.pt.sha256"):
        shutil.copy(run / name, tmp_path / name)
    sidecar = tmp_path / "best.pt.sha256"
    before = sidecar.read_bytes()
    for argv in (["average", tmp_path / "best.pt", tmp_path / "last.pt", "--output", sidecar],
                 ["translate", "--checkpoint", tmp_path / "best.pt", "--output", sidecar]):
        result = seq2seq(*argv, stdin=b"the dog\n")
        err = result.stderr.decode()
        assert result.returncode == 2 and err.count("\n") == 1, err
        assert f"{sidecar}: is the same file as the input {sidecar}" in err
    assert sidecar.read_bytes() == before


def test_a_checkpoint_given_twice_is_refused_by_average_and_ensembles(trained, tmp_path):
    _, run = trained
    (tmp_path / "link.pt").symlink_to(run / "best.pt")
    for argv in (["average", run / "best.pt", tmp_path / "link.pt", "--output",
                  tmp_path / "avg.pt"],
                 ["translate", "--checkpoint", run / "best.pt", run / "last.pt",
                  run / "best.pt"]):
        result = seq2seq(*argv, stdin=b"the dog\n")
        err = result.stderr.decode()
        assert result.returncode == 2 and "given twice to an" in err, err
        assert err.count("\n") == 1 and result.stdout == b""
    assert not (tmp_path / "avg.pt").exists()


@pytest.mark.parametrize("attention", ["-", "/dev/stdout", "/dev/fd/1"])
def test_translate_refuses_attention_on_the_stdout_of_the_translations(trained, attention):
    """The JSON lines landed between the translations: one output line per input no more."""
    _, run = trained
    result = seq2seq("translate", "--checkpoint", run / "best.pt", "--attention", attention,
                     stdin=b"the dog\nthe cat\n")
    err = result.stderr.decode()
    assert result.returncode == 2 and "stdout already receives the translations" in err, err
    assert result.stdout == b""


def test_translate_refuses_scores_with_nbest_which_would_ignore_it(trained):
    _, run = trained
    result = seq2seq("translate", "--checkpoint", run / "best.pt", "--nbest", "2", "--scores",
                     stdin=b"the dog\n")
    err = result.stderr.decode()
    assert result.returncode == 2 and "drop --scores" in err and err.count("\n") == 1, err


def test_evaluate_takes_several_checkpoints_after_one_flag():
    from seq2seq.cli import build_parser

    args = build_parser().parse_args(["evaluate", "--checkpoint", "a.pt", "b.pt",
                                      "--checkpoint", "c.pt", "--src", "s", "--ref", "r"])
    assert args.checkpoint == ["a.pt", "b.pt", "c.pt"]


def test_prepare_multi30k_prints_statistics(tmp_path):
    result = seq2seq("prepare", "recipes/multi30k/de-en.gru.yaml", f"output_dir={tmp_path}/m",
                     "tokenizer.vocab_size=2000", f"data.root={shared_data_root()}")
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    out = result.stdout.decode()
    assert "29,000 pairs read" in out and "test_2016_flickr" in out


def test_prepare_with_a_target_file_one_line_short_names_both(tmp_path):
    root = shared_data_root() / "multi30k"
    (tmp_path / "multi30k").mkdir()
    for split in ("val", "test_2016_flickr"):
        for lang in ("de", "en"):
            (tmp_path / "multi30k" / f"{split}.{lang}.gz").symlink_to(root / f"{split}.{lang}.gz")
    (tmp_path / "multi30k" / "train.de.gz").symlink_to(root / "train.de.gz")
    with gzip.open(root / "train.en.gz", "rt", encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    with gzip.open(tmp_path / "multi30k" / "train.en.gz", "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines[:-1]) + "\n")
    result = seq2seq("prepare", "recipes/multi30k/de-en.gru.yaml", f"output_dir={tmp_path}/run",
                     f"data.root={tmp_path}")
    err = result.stderr.decode()
    assert result.returncode == 2
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert "train.de.gz" in err and "train.en.gz" in err
    assert "29,000" in err and "28,999" in err
    assert not (tmp_path / "run" / "cache").exists() or not any(
        p.name.startswith("train-") for p in (tmp_path / "run" / "cache").iterdir())


def test_missing_checkpoint_is_one_line(tmp_path):
    result = seq2seq("translate", "--checkpoint", tmp_path / "nope.pt", stdin=b"x\n")
    assert result.returncode == 2
    assert result.stderr.decode().strip().startswith("error:")
    assert "Traceback" not in result.stderr.decode()


@pytest.mark.parametrize("part, value, said", [
    ("tokenizer", {"spm_model": b"not a tensor"}, "its tokenizer cannot be read"),
    ("tokenizer", {"spm_model": "random"}, "its tokenizer cannot be read"),
    ("model", ["a", "list"], "its weights are not a state dict (a list)"),
])
def test_a_hand_made_checkpoint_with_an_unreadable_part_is_one_line(trained, tmp_path, part,
                                                                      value, said):
    """Written without seq2seq's digest of its contents (as another program would), so
    that nothing but the reading of each part can tell."""
    import torch

    _, run = trained
    ckpt = torch.load(run / "best.pt", weights_only=True)
    del ckpt["integrity"]
    if value == "random":
        value = {"spm_model": torch.randint(0, 256, (300,), dtype=torch.uint8)}
    ckpt[part] = value
    torch.save(ckpt, tmp_path / "made.pt")
    result = seq2seq("translate", "--checkpoint", tmp_path / "made.pt", stdin=b"the dog\n")
    err = result.stderr.decode()
    assert result.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert err.startswith(f"error: {tmp_path / 'made.pt'}: {said}"), err


def test_translate_in_bf16_gives_the_fp32_output_greedily(trained):
    # bf16 weights (cast once) on the tiny trained model: greedy output equals fp32's here;
    # beam search may differ where two hypotheses score within bf16's rounding (~0.4 %).
    _, run = trained
    lines = b"".join(f"{' '.join(['a', 'b', 'c'][:1 + i % 3])} {i}\n".encode()
                     for i in range(20))
    outputs = {}
    for precision in ("fp32", "bf16"):
        result = seq2seq("translate", "--checkpoint", run / "best.pt", "--beam", "1",
                         "--precision", precision, "--device", "cpu", stdin=lines)
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        outputs[precision] = result.stdout.decode().splitlines()
    assert len(outputs["fp32"]) == 20 and any(outputs["fp32"])
    assert outputs["bf16"] == outputs["fp32"]


def test_evaluate_in_bf16_reports_its_precision_in_a_dir_of_its_own(trained, tmp_path):
    _, run = trained
    shutil.copy(run / "best.pt", tmp_path / "best.pt")
    (tmp_path / "src.txt").write_text("the dog\nthe cat sees a house\n")
    (tmp_path / "ref.txt").write_text("der Hund\ndie Katze sieht ein Haus\n")
    result = seq2seq("evaluate", "--checkpoint", tmp_path / "best.pt", "--src",
                     tmp_path / "src.txt", "--ref", tmp_path / "ref.txt", "--beam", "1",
                     "--precision", "bf16", "--device", "cpu")
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    entry = json.loads((tmp_path / "eval-src.txt-bf16" / "report.json").read_text())
    assert entry["test_sets"][0]["decoding"]["precision"] == "bf16"
    both = seq2seq("translate", "--checkpoint", tmp_path / "best.pt", "--quantize",
                   "--precision", "bf16", stdin=b"a\n")
    assert both.returncode != 0
    assert both.stderr.decode().strip().splitlines() == [
        "error: --quantize and --precision bf16 exclude each other: int8 weights compute in "
        "int8 and fp32"]


def closed(descriptor, *args, tmp_path):
    """``seq2seq *args`` started with ``descriptor`` (0 or 1) closed, as ``<&-`` / ``>&-``."""
    return subprocess.run([sys.executable, "-m", "seq2seq", *map(str, args)], cwd=tmp_path,
                          stdin=subprocess.DEVNULL if descriptor else None,
                          stdout=subprocess.DEVNULL if not descriptor else None,
                          stderr=subprocess.PIPE, preexec_fn=lambda: os.close(descriptor),
                          timeout=600)


def test_a_closed_stdin_or_stdout_is_refused_only_where_it_is_needed(trained, tmp_path):
    recipe, run = trained
    checkpoint = run / "best.pt"
    (tmp_path / "in.txt").write_text("a b c\n", encoding="utf-8")
    refusals = [
        (1, ["translate", "--checkpoint", checkpoint, "--input", "in.txt"],
         "error: <stdout>: is closed; name an output file"),
        (0, ["translate", "--checkpoint", checkpoint, "--output", "out.txt"],
         "error: <stdin>: is closed; name an input file"),
    ]
    for descriptor, argv, line in refusals:
        result = closed(descriptor, *argv, tmp_path=tmp_path)
        assert (result.returncode, result.stderr.decode()) == (2, line + "\n")
        assert not (tmp_path / "out.txt").exists()
    # Where the output goes to a file, or stdout only shows what was done, stdout is not needed.
    done = closed(1, "translate", "--checkpoint", checkpoint, "--input", "in.txt", "--output",
                  "out.txt", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert (tmp_path / "out.txt").read_text(encoding="utf-8").count("\n") == 1
    for argv in (["check", recipe], ["average", checkpoint, "--output", "averaged.pt"]):
        done = closed(1, *argv, tmp_path=tmp_path)
        assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr.decode()
    assert (tmp_path / "averaged.pt").is_file()


@pytest.mark.parametrize("flag", ["--input", "--output", "--attention", "--checkpoint"])
def test_an_empty_path_is_refused_not_taken_for_stdin_or_here(flag, trained):
    _, run = trained
    argv = ["translate", "--checkpoint", run / "best.pt", flag, ""]
    result = seq2seq(*argv, stdin=b"a b c\n")
    assert result.returncode == 2 and result.stdout == b""
    assert f"argument {flag}: an empty path" in result.stderr.decode()


def test_attention_on_stdout_beside_an_output_file_leaves_stdout_open(trained, tmp_path):
    """The attention's text wrapper closed stdout when collected, and the command's last
    flush of stdout then ended in a traceback."""
    _, run = trained
    result = seq2seq("translate", "--checkpoint", run / "best.pt", "--attention", "-",
                     "--output", tmp_path / "out.txt", stdin=b"a b c\nd e\n")
    assert result.returncode == 0 and result.stderr == b"", result.stderr.decode()
    assert [json.loads(row)["index"] for row in result.stdout.decode().splitlines()] == [0, 1]
    assert (tmp_path / "out.txt").read_text(encoding="utf-8").count("\n") == 2


def test_a_max_len_ratio_flag_that_puts_min_len_out_of_reach_is_warned_of(trained, tmp_path,
                                                                           capsys):
    """`--max-len-ratio` lowers the search's maximum; below the recipe's decode.min_len it cut
    short sources' outputs without EOS, and nothing said so."""
    import argparse
    import dataclasses

    from seq2seq.translate import Translator, command_settings

    recipe, run = trained
    result = seq2seq("evaluate", recipe, "decode.min_len=6", "--max-len-ratio", "0.5",
                     "--report-dir", tmp_path / "report")
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    (warning,) = [line for line in result.stderr.decode().splitlines()
                  if line.startswith("warning: decode.min_len")]
    assert warning == ("warning: decode.min_len: 6 is above the maximum output length of "
                       "sources of up to 4 subword tokens (4 for one: --max-len-ratio 0.5 x "
                       "(source tokens + 1 for EOS) + decode.max_len_add 3, rounded down): their "
                       "outputs are cut at that maximum, without EOS, shorter than min_len")
    # Without the flag the recipe's own ratio (1.0) is named as the recipe spells it.
    recipes = seq2seq("evaluate", recipe, "decode.min_len=6", "--report-dir", tmp_path / "r2")
    assert recipes.returncode == 0 and ("(5 for one: decode.max_len_ratio 1 x (source tokens "
                                        "+ 1 for EOS)") in recipes.stderr.decode()
    quiet = seq2seq("evaluate", recipe, "decode.min_len=5", "--report-dir", tmp_path / "r3")
    assert quiet.returncode == 0 and b"decode.min_len" not in quiet.stderr  # 5 for one token
    # translate takes the minimum from the checkpoint's recipe, and warns the same way.
    translator = Translator.from_checkpoint(run / "best.pt", device="cpu")
    translator.recipe = dataclasses.replace(  # as if trained with these: 7 for one token
        translator.recipe, decode=dataclasses.replace(translator.recipe.decode, min_len=6,
                                                      max_len_ratio=2.0))
    for ratio, warned in ((0.5, True), (None, False), (1.5, False)):
        args = argparse.Namespace(max_len_ratio=ratio, beam=None, alpha=None,
                                  batch_tokens=None, shortlist=None)
        settings = command_settings(translator, args, nbest=None)
        assert settings.min_len == 6 and settings.max_len_ratio == (ratio or 2.0)
        err = capsys.readouterr().err
        assert ("warning: decode.min_len: 6 is above" in err) is warned, err
        assert ("--max-len-ratio 0.5 x" in err) is warned, err
