"""``seq2seq evaluate`` reads its sources as ``seq2seq translate`` reads its input.

A source line longer than ``translate_io.DEFAULT_MAX_CHARS`` characters is cut to that many, with
the one warning translate gives (naming the file and the first cut line), whether the sources
come from ``--src`` or from a recipe's test set: a line of 10,000 words, uncut, was still being
decoded after 400 s. References are never decoded, so they are scored whole.
"""

import json

import yaml

from tests.robustness.conftest import seq2seq

MAX_CHARS = 5000  # translate_io.DEFAULT_MAX_CHARS
SENTENCE = "the dog sees a small house . "  # 29 characters, 7 words as BLEU counts them
LONG = SENTENCE * 2000  # 58,000 characters
# Greedy and short outputs: the sentences are decoded as fast as the model can, the same way by
# translate and evaluate.
DECODE = ["--beam", "1", "--alpha", "0", "--max-len-ratio", "0.1"]
WARNING = (f"1 line(s) longer than {MAX_CHARS} characters were cut to {MAX_CHARS} "
           "(first: line 2)")


def warnings(stderr: bytes) -> list[str]:
    return [line for line in stderr.decode().splitlines() if line.startswith("warning:")]


def translated(trained, path, cwd) -> list[str]:
    result = seq2seq("translate", "--checkpoint", trained, "--input", path, *DECODE, cwd=cwd)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert warnings(result.stderr) == [f"warning: {path}: {WARNING}"]
    return result.stdout.decode().splitlines()


def test_a_long_src_line_is_cut_as_translate_cuts_it_and_the_ref_is_scored_whole(trained,
                                                                                 tmp_path):
    src, ref = tmp_path / "src.txt", tmp_path / "ref.txt"
    lines = ["the dog", LONG.strip(), "a small house"]
    src.write_text("\n".join(lines) + "\n")
    ref.write_text("\n".join(lines) + "\n")  # a file of its own: no warning of a self-compare
    result = seq2seq("evaluate", "--checkpoint", trained, "--src", src, "--ref", ref, *DECODE,
                     "--report-dir", "rep", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert warnings(result.stderr) == [f"warning: {src}: {WARNING}"]  # none for the ref
    report = json.loads((tmp_path / "rep" / "report.json").read_text())["test_sets"][0]
    assert report["n_sentences"] == 3
    assert report["bleu"]["details"]["ref_len"] == 2 + 2000 * 7 + 3  # the long ref is whole
    # What translate makes of the same file, line by line.
    hyps = (tmp_path / "rep" / report["hypotheses_file"]).read_text().splitlines()
    assert hyps == translated(trained, src, tmp_path)


def test_a_long_line_of_a_recipe_test_set_is_cut_with_the_same_warning(trained, tmp_path):
    recipe = trained.parent.parent / "tiny.yaml"
    src, trg = tmp_path / "test.en", tmp_path / "test.de"
    src.write_text(f"the dog\n{LONG}\na small house\n")
    trg.write_text("der Hund\nein kleines Haus\nein kleines Haus\n")
    test_set = yaml.safe_dump({"t": {"format": "text", "src": str(src), "trg": str(trg)}},
                              default_flow_style=True, width=10_000).strip()
    result = seq2seq("evaluate", recipe, f"data.test={test_set}", "--checkpoint", trained,
                     *DECODE, "--report-dir", "rep", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert warnings(result.stderr) == [f"warning: {src}: {WARNING}"]
    report = json.loads((tmp_path / "rep" / "report.json").read_text())["test_sets"][0]
    hyps = (tmp_path / "rep" / report["hypotheses_file"]).read_text().splitlines()
    # A test set's lines are stripped: the long line ends in a space, translate strips it too.
    assert hyps == translated(trained, src, tmp_path)
