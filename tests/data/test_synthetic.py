"""The synthetic task: deterministic, disjoint splits, and a target that needs reordering."""

import hashlib
import os
import re
import subprocess
import sys
import time

import pytest

from seq2seq.config import Corpus, DataConfig
from seq2seq.data import lexicon, synthetic
from seq2seq.data.corpus import read_pairs
from seq2seq.data.synthetic import generate_pairs, write_synthetic

# German finite verb forms of the lexicon (a separable prefix joins them at the clause end).
FINITE = (
    {f for v in lexicon.TRANSITIVE + lexicon.INTRANSITIVE
     for f in (v.de_1sg, v.de_3sg, v.de_pl)}
    | {f for forms in lexicon.AUX.values() for f in forms.values()}
    | {f for *_, forms in lexicon.MODALS.values() for f in forms.values()}
)
FINITE_LAST = FINITE | {v.prefix + f for v in lexicon.TRANSITIVE + lexicon.INTRANSITIVE
                        if v.prefix for f in (v.de_1sg, v.de_3sg, v.de_pl)}
DAYS = "|".join(lexicon.DAYS)


def words(sentence: str) -> list[str]:
    return sentence.rstrip(".").replace(",", "").split()


@pytest.fixture(scope="module")
def train():
    return list(generate_pairs("train", 3000, seed=0))


def test_same_arguments_same_pairs(train):
    assert list(generate_pairs("train", 3000, seed=0)) == train
    assert list(generate_pairs("train", 100, seed=0)) == train[:100]
    assert list(generate_pairs("train", 100, seed=1)) != train[:100]


def test_same_pairs_in_another_process_with_another_hash_seed():
    code = ("import hashlib; from seq2seq.data.synthetic import generate_pairs; "
            "print(hashlib.sha1(repr(list(generate_pairs('test', 50, 7))).encode()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == hashlib.sha1(repr(list(generate_pairs("test", 50, 7))).encode()).hexdigest()


def test_sizes_exact_and_sources_distinct(train):
    assert len(train) == 3000
    assert len({src for src, _ in train}) == 3000
    assert len(list(generate_pairs("valid", 37, seed=4))) == 37


def test_splits_are_disjoint_whatever_the_seeds(train):
    valid = {src for src, _ in generate_pairs("valid", 100, seed=0)}
    test = {src for src, _ in generate_pairs("test", 100, seed=0)}
    other_test = {src for src, _ in generate_pairs("test", 100, seed=5)}
    sources = {src for src, _ in train}
    assert len(valid) == len(test) == 100
    assert not sources & valid and not sources & test and not valid & test
    assert not sources & other_test and not valid & other_test


def test_unknown_split():
    with pytest.raises(ValueError, match="dev"):
        next(generate_pairs("dev", 3))


def test_lengths_and_multi_word_outputs(train):
    src_lens = [len(src.split()) for src, _ in train]
    trg_lens = [len(trg.split()) for _, trg in train]
    assert min(src_lens) >= 4 and max(src_lens) <= 25
    assert min(trg_lens) >= 2 and sum(trg_lens) / len(trg_lens) > 6
    assert max(src_lens) >= 20  # long sentences exist: attention must carry them


def test_vocabulary_is_a_few_hundred_words(train):
    src_vocab = {w.lower() for src, _ in train for w in words(src)}
    trg_vocab = {w.lower() for _, trg in train for w in words(trg)}
    assert 150 <= len(src_vocab) <= 700
    assert 150 <= len(trg_vocab) <= 1000


def test_fronted_time_puts_the_verb_before_the_subject(train):
    fronted = [(s, t) for s, t in train if re.match(rf"On ({DAYS}) (the|a|my|I|he|she|we)\b", s)]
    assert len(fronted) >= 10
    for src, trg in fronted:
        assert src.split()[2] not in FINITE  # English: time, subject, verb
        assert words(trg)[2] in FINITE, (src, trg)  # German: time, verb, subject


def test_subordinate_clauses_end_with_the_finite_verb(train):
    clauses = [(s, t) for s, t in train if " because " in s and "," not in s]
    assert len(clauses) >= 10
    for src, trg in clauses:
        assert ", weil " in trg
        assert words(trg)[-1] in FINITE_LAST, (src, trg)


def test_word_order_differs_from_the_source(train):
    # A participle or separable prefix at the clause end, far from the English verb position.
    moved = [(s, t) for s, t in train
             if len(words(t)) > 4 and words(t)[-1] in {v.de_part for v in lexicon.TRANSITIVE}]
    assert len(moved) >= 50


def test_grammar_examples():
    """A few hand-checked translations, built from the grammar's own parts."""
    man = synthetic.NounPhrase(["the", "man"], ["der", "Mann"], "3sg", False, True)
    ball = synthetic.NounPhrase(["the", "ball"], ["den", "Ball"], "3sg", False, True)
    pick_up = next(v for v in lexicon.TRANSITIVE if v.en == "pick up")
    monday = synthetic.Phrase(["on", "Monday"], ["am", "Montag"])

    def clause(tense, negated=False, time=None):
        return synthetic.Clause(man, pick_up, tense, negated, ball, None, time)

    render = synthetic._render
    assert render(synthetic._english(clause("past"), False)) == "The man picked up the ball."
    assert render(synthetic._german_main(clause("past"))) == "Der Mann hat den Ball aufgehoben."
    assert render(synthetic._german_main(clause("present", True, monday))) == (
        "Der Mann hebt am Montag den Ball nicht auf.")
    assert render(synthetic._german_main(clause("can", time=monday), monday.de, True)) == (
        "Am Montag kann der Mann den Ball aufheben.")
    assert render(synthetic._german_subordinate(clause("present"), "weil")) == (
        "Weil der Mann den Ball aufhebt.")
    assert render(synthetic._english(clause("present", True), False)) == (
        "The man does not pick up the ball.")
    us = synthetic.NounPhrase(["us"], ["uns"], "1pl", True, True)
    picked_us = synthetic.Clause(man, pick_up, "past", False, us, None, monday)
    assert render(synthetic._english(picked_us, False)) == "The man picked us up on Monday."
    assert render(synthetic._german_main(picked_us)) == "Der Mann hat uns am Montag aufgehoben."


@pytest.mark.parametrize("article, case, gender, klein, muede", [
    ("definite", "nom", "m", "kleine", "müde"),
    ("definite", "acc", "m", "kleinen", "müden"),
    ("ein", "nom", "m", "kleiner", "müder"),
    ("ein", "nom", "n", "kleines", "müdes"),
    ("ein", "dat", "f", "kleinen", "müden"),
    ("none", "nom", "pl", "kleine", "müde"),
])
def test_adjective_endings(article, case, gender, klein, muede):
    assert synthetic._adjective("klein", article, case, gender) == klein
    assert synthetic._adjective("müde", article, case, gender) == muede


def test_no_adjective_doubles_its_stem_final_e(train):
    stems = [de for de in lexicon.ADJECTIVES.values() if de.endswith("e")]
    assert stems
    forms = {w for _, t in train for w in words(t)}
    assert {w for w in forms for stem in stems if w.startswith(stem + "e")} == set()
    assert {stem[:-1] + ending for stem in stems for ending in ("e", "en")} <= forms


def test_dates_reorder_day_and_month(train):
    dates = [(s, t) for s, t in train if re.search(r"on [A-Z][a-z]+ \d+\b", s)]
    assert dates
    for src, trg in dates:
        month, day = re.search(r"on ([A-Z][a-z]+) (\d+)\b", src).groups()
        assert f"am {day}. {lexicon.MONTHS[month]}" in trg


def test_generation_is_fast():
    start = time.process_time()
    assert sum(1 for _ in generate_pairs("train", 24_000)) == 24_000
    assert time.process_time() - start < 2.0


def test_write_synthetic_files_read_back(tmp_path):
    sizes = {"train": 50, "valid": 10, "test": 10}
    paths = write_synthetic(tmp_path / "syn", sizes, src_lang="en", trg_lang="de")
    assert [p.name for p in paths] == ["train.en", "train.de", "valid.en", "valid.de",
                                       "test.en", "test.de"]
    assert sorted(p.name for p in (tmp_path / "syn").iterdir()) == sorted(p.name for p in paths)
    data = DataConfig(root=str(tmp_path / "syn"), src_lang="en", trg_lang="de")
    for split, size in sizes.items():
        pairs = list(read_pairs(Corpus(src=f"{split}.en", trg=f"{split}.de"), data))
        assert pairs == list(generate_pairs(split, size))


def test_a_split_of_size_0_leaves_its_files_alone(tmp_path):
    """quickstart.sh writes only the test split (--train 0 --valid 0): it emptied the train and
    valid files of a directory that held them."""
    write_synthetic(tmp_path, {"train": 30, "valid": 5, "test": 5})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    paths = write_synthetic(tmp_path, {"train": 0, "valid": 0, "test": 7})
    assert [p.name for p in paths] == ["test.en", "test.de"]
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {k: v for k, v in after.items() if not k.startswith("test.")} == {
        k: v for k, v in before.items() if not k.startswith("test.")}
    assert after["test.en"].count(b"\n") == after["test.de"].count(b"\n") == 7


def test_a_failed_write_leaves_every_file_as_it_was(tmp_path):
    """Each file was replaced on its own: a refused test.de (read-only) came after five new
    files, leaving test.en with 20 lines beside test.de with 10."""
    from seq2seq.errors import Seq2SeqError

    write_synthetic(tmp_path, {"train": 10, "valid": 10, "test": 10})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    os.chmod(tmp_path / "test.de", 0o444)
    with pytest.raises(Seq2SeqError, match="test.de: is read-only"):
        write_synthetic(tmp_path, {"train": 20, "valid": 20, "test": 20})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("name", ["", "-"])
def test_generate_data_needs_a_directory_name(tmp_path, name):
    from seq2seq.cli import main

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["generate-data", name, "--train", "3"]) == 2
    finally:
        os.chdir(cwd)
    assert list(tmp_path.iterdir()) == []


def test_two_calls_into_one_directory_never_leave_the_sides_of_a_split_out_of_line(
        tmp_path, monkeypatch):
    """Two `generate-data DIR` at once put their files in place interleaved: test.en of one
    (101 lines) beside test.de of the other (100)."""
    import threading

    replace, together, renames = os.replace, threading.Barrier(2), []

    def slow_replace(src, dst, *args, **kwargs):  # the calls renaming at once, crosswise
        if str(tmp_path) in str(dst):
            try:
                together.wait(timeout=1)  # (a call held back by the other waits in vain)
            except threading.BrokenBarrierError:
                pass
            me = threading.current_thread().name
            first = renames.count(me) == 0
            renames.append(me)
            time.sleep(0.1 if (me == "101") == first else 0)
        replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", slow_replace)
    calls = [threading.Thread(target=write_synthetic, name=str(size),
                              args=(tmp_path, {"train": 0, "valid": 0, "test": size}))
             for size in (100, 101)]
    for call in calls:
        call.start()
    for call in calls:
        call.join()
    counts = {path.name: len(path.read_text().splitlines()) for path in tmp_path.iterdir()}
    assert counts["test.en"] == counts["test.de"], counts
