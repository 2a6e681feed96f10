"""prepare_data: drop counts per reason, unfiltered valid/test sets, reuse, atomic builds."""

import os
import random
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from seq2seq.config import recipe_from_dict, recipe_to_dict
from seq2seq.data import cache, encoding
from seq2seq.data.batching import collate, epoch_batches
from seq2seq.data.cache import prepare_data
from seq2seq.data.corpus import DataError
from seq2seq.data.stats import format_stats
from seq2seq.tokenizer import EOS, UNK
from tests.conftest import shared_data_root

SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "ba", "gu", "fe"]
MAX_TOKENS, RATIO = 40, 3.0


def sentence(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choices(words, k=n))


def write_corpus(root: Path, seed: int = 0) -> None:
    """~300 ordinary pairs plus pairs for every drop reason, and valid/test sets with them."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(120)]
    pairs = [(sentence(rng, words, rng.randint(3, 8)), sentence(rng, words, rng.randint(3, 8)))
             for _ in range(300)]
    odd = [("", "lo mi"), ("ka", ""), ("", ""),  # empty
           (sentence(rng, words, 100), "ka lo"),  # source too long
           ("ka lo", sentence(rng, words, 100)),  # target too long
           ("ka", sentence(rng, words, 9))]  # ratio
    train = pairs[:150] + odd + pairs[150:]
    for name, rows in (("train", train), ("valid", pairs[:20] + odd), ("test", odd + pairs[20:30])):
        (root / f"{name}.src").write_text("".join(s + "\n" for s, _ in rows), encoding="utf-8")
        (root / f"{name}.trg").write_text("".join(t + "\n" for _, t in rows), encoding="utf-8")


def make_recipe(root: Path, *overrides: str):
    tree = {
        "output_dir": str(root / "run"),
        "data": {"root": str(root), "num_proc": 1, "max_src_tokens": MAX_TOKENS,
                 "max_trg_tokens": MAX_TOKENS, "max_length_ratio": RATIO,
                 "train": {"src": "train.src", "trg": "train.trg"},
                 "valid": {"src": "valid.src", "trg": "valid.trg"},
                 "test": {"t1": {"src": "test.src", "trg": "test.trg"}}},
        "tokenizer": {"vocab_size": 64, "type": "bpe"},
    }
    return recipe_from_dict(tree, list(overrides))


def read(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


@pytest.fixture
def corpus(tmp_path) -> Path:
    write_corpus(tmp_path)
    return tmp_path


def expected_reason(src_len: int, trg_len: int) -> str | None:
    if src_len == 0 or trg_len == 0:
        return "empty"
    if src_len > MAX_TOKENS:
        return "src_too_long"
    if trg_len > MAX_TOKENS:
        return "trg_too_long"
    if max(src_len, trg_len) > RATIO * min(src_len, trg_len):
        return "ratio"
    return None


def test_training_pairs_dropped_and_counted_per_reason(corpus):
    prepared = prepare_data(make_recipe(corpus), show_progress=False)
    tok = prepared.tokenizer
    src, trg = read(corpus / "train.src"), read(corpus / "train.trg")
    src_ids, trg_ids = tok.encode_src(src), tok.encode_trg(trg)
    reasons = [expected_reason(len(s), len(t)) for s, t in zip(src_ids, trg_ids)]
    stats = prepared.stats["train"]
    assert stats["read"] == len(src)
    assert stats["dropped"] == {r: reasons.count(r) for r in encoding.DROP_REASONS.values()}
    assert all(count >= 1 for count in stats["dropped"].values())  # the corpus has each kind
    kept = [i for i, r in enumerate(reasons) if r is None]
    assert stats["kept"] == len(kept) == len(prepared.train)
    # The cache holds exactly the kept pairs, in corpus order, with their lengths.
    train = prepared.train.with_format("numpy")
    assert [list(r) for r in train["src_ids"]] == [src_ids[i] for i in kept]
    assert [list(r) for r in train["trg_ids"]] == [trg_ids[i] for i in kept]
    src_lens, trg_lens = prepared.train_lengths()
    assert src_lens.tolist() == [len(src_ids[i]) for i in kept]
    assert trg_lens.tolist() == [len(trg_ids[i]) for i in kept]
    assert str(prepared.train.features["src_ids"].feature.dtype) == "int32"
    assert stats["src_tokens"] == sum(src_lens) and stats["trg_len"]["max"] == max(trg_lens)


def test_valid_and_test_never_filtered_and_keep_raw_text(corpus):
    prepared = prepare_data(make_recipe(corpus), show_progress=False)
    tok = prepared.tokenizer
    for eval_set, name in ((prepared.valid, "valid"), (prepared.tests["t1"], "test")):
        src, trg = read(corpus / f"{name}.src"), read(corpus / f"{name}.trg")
        assert eval_set.src_text == src and eval_set.trg_text == trg  # empty and long included
        assert eval_set.src_ids == tok.encode_src(src)
        assert eval_set.trg_ids == tok.encode_trg(trg)
    assert prepared.stats["valid"]["pairs"] == len(read(corpus / "valid.src"))
    assert prepared.stats["tests"]["t1"]["pairs"] == len(read(corpus / "test.src"))


def test_cache_reused_when_unchanged_rebuilt_when_inputs_change(corpus):
    first = prepare_data(make_recipe(corpus), show_progress=False)
    assert not first.stats["cache"]["reused"] and not first.stats["tokenizer"]["reused"]
    again = prepare_data(make_recipe(corpus), show_progress=False)
    assert again.stats["cache"]["reused"] and again.stats["tokenizer"]["reused"]
    assert again.cache_dir == first.cache_dir and again.stats["train"] == first.stats["train"]

    # A filter setting: new cache, same tokenizer.
    looser = prepare_data(make_recipe(corpus, "data.max_src_tokens=200"), show_progress=False)
    assert looser.stats["tokenizer"]["reused"] and not looser.stats["cache"]["reused"]
    assert looser.cache_dir != first.cache_dir
    assert looser.stats["train"]["dropped"]["src_too_long"] == 0
    # The run's own cache directory keeps only the cache of its current inputs.
    assert sorted((corpus / "run" / "cache").iterdir()) == [looser.cache_dir]

    # A different training corpus: new tokenizer and new cache, even with the files' times
    # set back to what they were.
    before = (corpus / "train.src").stat()
    write_corpus(corpus, seed=1)
    os.utime(corpus / "train.src", ns=(before.st_atime_ns, before.st_mtime_ns))
    changed = prepare_data(make_recipe(corpus), show_progress=False)
    assert not changed.stats["tokenizer"]["reused"] and not changed.stats["cache"]["reused"]
    cache_root = corpus / "run" / "cache"
    assert not [p for p in cache_root.iterdir() if p.name.startswith(".")]  # no temp dirs


@pytest.mark.parametrize("damage", ["stats.json", "train/state.json", "arrow", "gone stats",
                                    "tokenizer"])
def test_a_damaged_cache_or_tokenizer_is_built_again(corpus, damage, capsys):
    """Each was a traceback (JSONDecodeError, ArrowInvalid, SentencePiece's RuntimeError) or a
    dead end: the cache counted as reusable because its directory existed."""
    first = prepare_data(make_recipe(corpus), show_progress=False)
    if damage == "tokenizer":
        (corpus / "run" / "tokenizer" / "spm.model").write_bytes(b"garbage")
    elif damage == "arrow":
        (arrow,) = (first.cache_dir / "train").glob("*.arrow")
        with open(arrow, "r+b") as f:
            f.truncate(1000)
    elif damage == "gone stats":
        (first.cache_dir / "stats.json").unlink()
    else:
        (first.cache_dir / damage).write_text("x{")
    again = prepare_data(make_recipe(corpus), show_progress=False)
    assert not again.stats["cache"]["reused"]
    assert again.stats["tokenizer"]["reused"] == (damage != "tokenizer")
    assert again.stats["train"] == first.stats["train"] and len(again.train) == len(first.train)
    if damage != "tokenizer":
        assert "the training cache cannot be read" in capsys.readouterr().err
    assert prepare_data(make_recipe(corpus), show_progress=False).stats["cache"]["reused"]


def test_cache_dir_setting_and_generated_corpus_content_fingerprint(tmp_path):
    recipe = recipe_from_dict({
        "output_dir": str(tmp_path / "run"),
        "data": {"src_lang": "en", "trg_lang": "de", "cache_dir": str(tmp_path / "shared"),
                 "train": {"format": "generated", "size": 300, "split": "train"},
                 "valid": {"format": "generated", "size": 20, "split": "valid"}},
        "tokenizer": {"vocab_size": 100, "type": "bpe"}})
    first = prepare_data(recipe, show_progress=False)
    assert first.cache_dir.parent == tmp_path / "shared"
    assert len(first.valid) == 20 and first.tests == {}
    assert prepare_data(recipe, show_progress=False).stats["cache"]["reused"]
    # The run's seed is not the corpus's: another seed reads the same generated pairs.
    reseeded = prepare_data(recipe_from_dict(recipe_to_dict(recipe), ["seed=7"]),
                            show_progress=False)
    assert reseeded.stats["cache"]["reused"] and reseeded.valid.trg_text == first.valid.trg_text
    # Other runs may read a shared cache directory: a new cache there deletes nothing.
    other = recipe_from_dict(recipe_to_dict(recipe), ["data.max_src_tokens=50"])
    second = prepare_data(other, show_progress=False)
    assert sorted((tmp_path / "shared").iterdir()) == sorted([first.cache_dir, second.cache_dir])


def test_failed_build_leaves_nothing_half_written(corpus, monkeypatch):
    def broken(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(cache, "_encode_and_filter", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_data(make_recipe(corpus), show_progress=False)
    assert not (corpus / "run" / "cache").exists()  # nothing half-written, no empty directory
    monkeypatch.undo()
    assert not prepare_data(make_recipe(corpus), show_progress=False).stats["cache"]["reused"]


def test_bad_training_corpus_is_one_line_error_naming_the_key(corpus):
    (corpus / "train.trg").write_text("only one line\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"^data\.train: .*train\.src has \d+ lines") as info:
        prepare_data(make_recipe(corpus), show_progress=False)
    assert "\n" not in str(info.value)
    assert not (corpus / "run" / "cache").exists()
    with pytest.raises(DataError, match=r"^data\.test\.t1: .*no such file"):
        prepare_data(make_recipe(corpus, "data.train.trg=valid.trg", "data.train.src=valid.src",
                                 "data.test.t1.src=missing.src"), show_progress=False)


def test_a_filter_that_drops_every_training_pair_is_one_line_error_naming_its_key(corpus):
    # The corpus holds 3 pairs with an empty side; every other target has over one token.
    with pytest.raises(DataError, match=r"^data\.train: the training filter dropped all 306 "
                       r"pairs \(3 empty, 303 trg_too_long\); raise data\.max_trg_tokens$"):
        prepare_data(make_recipe(corpus, "data.max_trg_tokens=1", "data.max_src_tokens=500",
                                 "data.max_length_ratio=0"), show_progress=False)
    assert not (corpus / "run" / "cache").exists()  # nothing half-written, no empty directory


def test_a_bad_test_corpus_is_reported_before_the_tokenizer_or_cache_is_built(corpus):
    # Invalid UTF-8 on line 3 of the test source: only reading the file can find it.
    data = (corpus / "test.src").read_bytes().split(b"\n")
    data[2] = b"caf\xe9"
    (corpus / "test.src").write_bytes(b"\n".join(data))
    with pytest.raises(DataError, match=r"^data\.test\.t1: .*test\.src.* line 3") as info:
        prepare_data(make_recipe(corpus), show_progress=False)
    assert "\n" not in str(info.value)
    run = corpus / "run"
    assert not (run / "tokenizer").exists()
    assert not (run / "cache").exists() or not list((run / "cache").iterdir())


def test_format_stats_reports_counts_reasons_and_percentiles(corpus):
    stats = prepare_data(make_recipe(corpus), show_progress=False).stats
    text = format_stats(stats)
    train = stats["train"]
    assert f"{train['read']:,} pairs read, {train['kept']:,} kept" in text
    for label in ("empty", "too long source", "too long target", "length ratio"):
        assert label in text
    assert "p50/p90/p99/max" in text and "test t1" in text and "valid" in text
    p = train["src_len"]
    assert p["p50"] <= p["p90"] <= p["p99"] <= p["max"] <= MAX_TOKENS


def test_prepare_counts_the_unknown_pieces_of_every_set(corpus):
    """A character outside the vocabulary is a ⁇ in translations: prepare said nothing."""
    stats = prepare_data(make_recipe(corpus), show_progress=False).stats
    assert "unknown pieces" not in format_stats(stats)  # every character of this corpus fits
    with open(corpus / "train.src", "a", encoding="utf-8") as handle:
        handle.write("".join(chr(0x4E00 + i) for i in range(20)) + " ab\n")
    with open(corpus / "train.trg", "a", encoding="utf-8") as handle:
        handle.write("ab\n")
    (corpus / "test.src").write_text("ab \u4e00 cd \u4e01\n", encoding="utf-8")
    (corpus / "test.trg").write_text("ab\n", encoding="utf-8")
    prepared = prepare_data(make_recipe(corpus, "tokenizer.character_coverage=0.99",
                                        "data.max_src_tokens=10000", "data.max_length_ratio=0"),
                            show_progress=False)
    tok, stats = prepared.tokenizer, prepared.stats
    train_ids = tok.encode_src(read(corpus / "train.src"))
    assert stats["train"]["unknown"][0] == sum(ids.count(UNK) for ids in train_ids) > 0
    test_unknown = tok.encode_src(["ab \u4e00 cd \u4e01"])[0].count(UNK)
    assert stats["tests"]["t1"]["unknown"] == [test_unknown, 0] and test_unknown >= 2
    assert f", test t1 {test_unknown} / 0;" in format_stats(stats)


def test_multi30k_train_prepares_in_worker_processes(tmp_path):
    """Real data through the multi-process path (29,000 pairs > one encoding batch)."""
    m30k = shared_data_root() / "multi30k"
    recipe = recipe_from_dict({
        "output_dir": str(tmp_path / "run"),
        "data": {"src_lang": "de", "trg_lang": "en", "num_proc": 2, "max_length_ratio": 2.0,
                 "train": {"src": str(m30k / "train.de.gz"), "trg": str(m30k / "train.en.gz")},
                 "valid": {"src": str(m30k / "val.de.gz"), "trg": str(m30k / "val.en.gz")}},
        "tokenizer": {"vocab_size": 2000, "type": "bpe", "input_sentence_size": 20000}})
    prepared = prepare_data(recipe, show_progress=False)
    stats = prepared.stats["train"]
    assert stats["read"] == 29_000
    assert stats["kept"] + sum(stats["dropped"].values()) == 29_000
    assert stats["dropped"]["ratio"] > 0 and stats["kept"] > 28_000
    assert len(prepared.valid) == 1014
    hyps = prepared.tokenizer.decode_trg(prepared.valid.trg_ids)
    same = sum(h == r for h, r in zip(hyps, prepared.valid.trg_text))
    assert same / len(hyps) > 0.99  # SentencePiece's NFKC normalisation may change a few
    src_lens, trg_lens = prepared.train_lengths()
    batches = epoch_batches(trg_lens, src_lens, 2000, 0, 1, 0, group_size=2)
    batch = collate(prepared.train, batches[0])
    assert batch.trg_out.shape[0] == len(batches[0])
    assert int((batch.src == EOS).sum()) == len(batches[0])
    assert np.array_equal(batch.src_lens.numpy() - 1, src_lens[batches[0]])


def test_a_full_disk_while_building_names_the_cache_and_leaves_nothing(corpus, monkeypatch):
    """pyarrow's 'No space left on device' named no file: 'error: No space left on device'."""
    def full(*args, **kwargs):
        raise OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left")

    monkeypatch.setattr(encoding, "encode_rows", full)
    monkeypatch.setattr(cache, "encode_rows", full)
    with pytest.raises(OSError) as error:
        prepare_data(make_recipe(corpus), show_progress=False)
    assert error.value.filename == str(corpus / "run" / "cache")
    assert "No space left" in error.value.strerror
    assert not (corpus / "run").exists() or not list((corpus / "run").rglob(".train-*"))


def test_a_training_file_appended_to_while_it_is_read_is_refused(corpus, monkeypatch):
    """The cache was named after the fingerprint of the files before the append and held the
    pairs after it, and the checkpoint recorded the new files: the run could never resume."""
    from seq2seq.data import fingerprint

    read_pairs = fingerprint.read_pairs

    def appended_to(corpus_, data):
        for number, pair in enumerate(read_pairs(corpus_, data)):
            if number == 10:
                for name in ("train.src", "train.trg"):
                    with open(corpus / name, "a", encoding="utf-8") as handle:
                        handle.write("ka lo mi\n")
            yield pair

    monkeypatch.setattr(fingerprint, "read_pairs", appended_to)
    with pytest.raises(DataError, match=r"^data.train: .*train.src, .*train.trg: changed while "
                                        r"they were read; start again once they are written$"):
        prepare_data(make_recipe(corpus), show_progress=False)
    assert not list((corpus / "run").rglob("train-*")) and not list(
        (corpus / "run").rglob(".train-*"))
    monkeypatch.setattr(fingerprint, "read_pairs", read_pairs)
    assert len(prepare_data(make_recipe(corpus), show_progress=False).train) > 0  # then it's fine


def test_a_corpus_whose_src_and_trg_are_one_file_is_warned_about(corpus, capsys):
    (corpus / "link.src").symlink_to(corpus / "valid.src")
    recipe = make_recipe(corpus, "data.valid.trg=link.src")
    prepared = prepare_data(recipe, show_progress=False)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1, err
    assert (f"warning: data.valid: src and trg are one file ({corpus / 'valid.src'}): the "
            "model learns to copy its input") in err
    prepare_data(recipe, show_progress=False, known=prepared.fingerprints)  # another rank
    assert "warning:" not in capsys.readouterr().err


def test_what_killed_builds_left_is_removed_by_the_next_prepare(corpus, tmp_path):
    """A SIGKILL during prepare left its temporary cache and tokenizer directories for good."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    run, shared = corpus / "run", tmp_path / "shared"

    def leftovers(cache: Path) -> tuple[list[Path], list[Path]]:
        gone = [cache / f".train-{dead}-abc", run / f".tokenizer-{dead}-abc",
                run / f".tokenizer-{os.getpid()}-abc"]  # (a restarted container: same pid)
        kept = [cache / f".train-{os.getppid()}-abc", cache / ".train-old_name"]  # (alive)
        for path in gone + kept:
            (path / "part").mkdir(parents=True, exist_ok=True)
        return gone, kept

    gone, kept = leftovers(run / "cache")
    prepare_data(make_recipe(corpus), show_progress=False)  # built
    assert [path.exists() for path in gone + kept] == [False] * 3 + [True] * 2
    gone, kept = leftovers(run / "cache")
    prepare_data(make_recipe(corpus), show_progress=False)  # reused
    assert [path.exists() for path in gone + kept] == [False] * 3 + [True] * 2
    gone, kept = leftovers(shared)  # a shared cache directory: its builds may be others'
    prepare_data(make_recipe(corpus, f"data.cache_dir={shared}"), show_progress=False)
    assert [path.exists() for path in gone + kept] == [True, False, False, True, True]


def test_the_fingerprint_reads_regular_files_only(corpus):
    """It hashes the training files: a pipe among them is left to the reader, which refuses
    it by name, rather than opened (which blocks until a writer comes)."""
    from seq2seq.data.fingerprint import corpus_files

    recipe = make_recipe(corpus)
    assert [f[0] for f in corpus_files(recipe.data.train, recipe.data)] == [
        str(corpus / "train.src"), str(corpus / "train.trg")]
    (corpus / "train.trg").unlink()
    os.mkfifo(corpus / "train.trg")
    found = []
    worker = threading.Thread(target=lambda: found.extend(
        corpus_files(recipe.data.train, recipe.data)), daemon=True)
    worker.start()
    worker.join(30)
    if worker.is_alive():
        with open(corpus / "train.trg", "w"):  # a writer lets the blocked open return
            pass
        worker.join()
        pytest.fail("the fingerprint opened the pipe")
    assert found[1] is None
    with pytest.raises(DataError, match="train.trg: not a regular file"):
        prepare_data(recipe, show_progress=False)


def hf_recipe(root: Path, directory: str):
    tree = recipe_to_dict(make_recipe(root))
    tree["data"]["train"] = {"format": "hf", "path": directory, "split": "train",
                             "src_field": "src", "trg_field": "trg"}
    return recipe_from_dict(tree)


def test_an_hf_directory_of_links_and_its_copy_are_the_same_corpus(tmp_path):
    """Its files are named by their place in the directory, not by where links lead (a
    dataset whose files link into a store outside it, copied with the links followed)."""
    from seq2seq.data.fingerprint import corpus_fingerprint

    store, linked = tmp_path / "store", tmp_path / "linked" / "train"
    store.mkdir()
    linked.mkdir(parents=True)
    for name, content in (("data-00000-of-00001.arrow", b"rows"), ("state.json", b"{}")):
        (store / name).write_bytes(content)
        (linked / name).symlink_to(store / name)
    shutil.copytree(tmp_path / "linked", tmp_path / "copy")  # (links followed)
    assert not (tmp_path / "copy" / "train" / "state.json").is_symlink()
    original = hf_recipe(tmp_path, "linked")
    fingerprint = corpus_fingerprint(original.data.train, original.data, False)
    copied = hf_recipe(tmp_path, "copy")
    assert corpus_fingerprint(copied.data.train, copied.data, False) == fingerprint
    (tmp_path / "copy" / "train" / "state.json").rename(tmp_path / "copy" / "train" / "s.json")
    assert corpus_fingerprint(copied.data.train, copied.data, False) != fingerprint


def test_a_training_file_that_changes_while_it_is_hashed_is_refused(corpus):
    from seq2seq.data.fingerprint import corpus_files

    recipe = make_recipe(corpus)

    def grow(_: int) -> None:  # another process still writing the file, once
        if (corpus / "train.src").stat().st_size == size:
            with open(corpus / "train.src", "a", encoding="utf-8") as handle:
                handle.write("ka lo\n")

    size = (corpus / "train.src").stat().st_size

    with pytest.raises(DataError, match=f"{corpus / 'train.src'}: changed while it was read"):
        corpus_files(recipe.data.train, recipe.data, grow)


def test_a_resume_on_an_hf_directory_names_the_file_that_changed(tmp_path):
    from seq2seq.data.fingerprint import check_same_inputs, corpus_files, corpus_fingerprint

    train = tmp_path / "ds" / "train"
    train.mkdir(parents=True)
    (train / "data-00000-of-00002.arrow").write_bytes(b"rows")
    (train / "state.json").write_bytes(b"{}")
    recipe = hf_recipe(tmp_path, "ds")
    expect = {"train_corpus": corpus_fingerprint(recipe.data.train, recipe.data, False),
              "train_files": corpus_files(recipe.data.train, recipe.data)}
    (train / "data-00001-of-00002.arrow").write_bytes(b"more rows")  # sorts before the state
    now = corpus_fingerprint(recipe.data.train, recipe.data, False)
    with pytest.raises(DataError, match=rf"trained on \(changed: {train}/data-00001-of-00002"
                                        r"\.arrow\)"):
        check_same_inputs(expect, recipe, now, None)


def test_what_the_user_keeps_in_output_dir_is_never_deleted(corpus):
    """An output_dir that was a project folder lost its tokenizer/ folder (replaced by a new
    tokenizer without a word) and any cache/train-* folder (removed as a stale cache)."""
    run = corpus / "run"
    notes, mine = run / "tokenizer" / "notes.txt", run / "cache" / "train-mine" / "data.txt"
    for path in (notes, mine):
        path.parent.mkdir(parents=True)
        path.write_text("keep\n")
    with pytest.raises(DataError, match=r"tokenizer holds what seq2seq does not write there "
                                        r"\(notes.txt\); a new tokenizer replaces"):
        prepare_data(make_recipe(corpus), show_progress=False)
    notes.unlink()
    first = prepare_data(make_recipe(corpus), show_progress=False)
    prepare_data(make_recipe(corpus, "data.max_src_tokens=200"), show_progress=False)
    assert mine.read_text() == "keep\n"  # while the first cache, now stale, is gone
    assert not first.cache_dir.exists()


def test_a_sampled_tokenizer_is_the_same_in_every_process(corpus, tmp_path):
    """SentencePiece's own sampling of a joint model's sentences (source and target count
    twice against input_sentence_size) differed from process to process: a rerun of an
    interrupted prepare got another tokenizer, and another cache."""
    import subprocess
    import sys

    code = ("import sys\nfrom seq2seq.data.cache import prepare_data\n"
            "from tests.data.test_cache import make_recipe\nfrom pathlib import Path\n"
            "prepare_data(make_recipe(Path(sys.argv[1]), 'tokenizer.input_sentence_size=101',"
            " f'output_dir={sys.argv[2]}'), show_progress=False)\n")
    models = []
    for run in ("a", "b"):
        subprocess.run([sys.executable, "-c", code, str(corpus), str(tmp_path / run)],
                       check=True, cwd=Path(__file__).parents[2], timeout=300)
        models.append((tmp_path / run / "tokenizer" / "spm.model").read_bytes())
    assert models[0] == models[1]
