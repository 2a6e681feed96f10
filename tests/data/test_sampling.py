"""Subword regularisation (seq2seq/data/sampling.py): sampled per epoch, seeded, same text."""

import numpy as np
import pytest

from seq2seq.config import RecipeError, recipe_from_dict
from seq2seq.data.cache import prepare_data
from seq2seq.data.sampling import sampled_epoch
from seq2seq.training.trainer import fit
from tests.conftest import tiny_tree


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    return prepare_data(recipe_from_dict(tiny_tree(str(root / "run"))), show_progress=False)


def test_each_epoch_samples_other_segmentations_of_the_same_text(prepared):
    data, tok = prepared, prepared.tokenizer
    first, src_lens, trg_lens = sampled_epoch(data.train, tok, 0.3, -1, seed=1, epoch=0)
    second = sampled_epoch(data.train, tok, 0.3, -1, seed=1, epoch=1)[0]
    plain = data.train.data.table
    for side in ("src", "trg"):
        decode = tok.decode_src if side == "src" else tok.decode_trg
        texts = decode(plain.column(f"{side}_ids").to_pylist())
        for table in (first, second):
            assert decode(table.column(f"{side}_ids").to_pylist()) == texts  # same sentences
        assert first.column(f"{side}_ids") != plain.column(f"{side}_ids")  # other pieces
        assert first.column(f"{side}_ids") != second.column(f"{side}_ids")
    assert first.num_rows == len(data.train) == len(src_lens) == len(trg_lens)
    lengths = first.column("trg_ids").combine_chunks().value_lengths().to_numpy()
    assert np.array_equal(trg_lens, lengths)


def test_the_shares_of_an_epoch_hold_its_pairs_in_order(prepared):
    """Each rank draws one share of an epoch (seq2seq.data.sampling.shared_epoch)."""
    import pyarrow as pa

    from seq2seq.data.sampling import share_bounds

    tok, n = prepared.tokenizer, len(prepared.train)
    assert [share_bounds(10, k, 3) for k in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert [share_bounds(2, k, 3) for k in range(3)] == [(0, 0), (0, 1), (1, 2)]
    shares = [sampled_epoch(prepared.train, tok, 0.3, -1, 1, 0, (k, 3)) for k in range(3)]
    assert [len(share[0]) for share in shares] == [b - a for a, b in
                                                   (share_bounds(n, k, 3) for k in range(3))]
    whole = pa.concat_tables([share[0] for share in shares])
    plain = prepared.train.data.table
    for side, decode in (("src", tok.decode_src), ("trg", tok.decode_trg)):
        assert decode(whole.column(f"{side}_ids").to_pylist()) == decode(
            plain.column(f"{side}_ids").to_pylist())
    assert np.array_equal(np.concatenate([share[2] for share in shares]),
                          whole.column("trg_ids").combine_chunks().value_lengths().to_numpy())


def test_the_same_seed_and_epoch_draw_the_same_segmentations(prepared):
    tok = prepared.tokenizer
    a = sampled_epoch(prepared.train, tok, 0.3, 8, seed=5, epoch=2)[0]
    sampled_epoch(prepared.train, tok, 0.3, 8, seed=6, epoch=2)  # another draw between
    b = sampled_epoch(prepared.train, tok, 0.3, 8, seed=5, epoch=2)[0]
    assert a.equals(b)


def test_a_run_with_sampling_resumes_bitwise_and_validates_deterministically(tmp_path):
    import torch

    def recipe(name, steps):
        tree = tiny_tree(str(tmp_path / name), train={"max_steps": steps, "sample_alpha": 0.3})
        tree["data"]["cache_dir"] = str(tmp_path / "cache")
        tree["data"]["train"]["size"] = 20  # ~5 updates per epoch: the resume crosses epochs
        return recipe_from_dict(tree)

    full = fit(recipe("full", 8))
    fit(recipe("part", 3))
    resumed = fit(recipe("part", 8))
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert full.progress.epoch >= 1  # the run went through more than one sampled epoch
    valid, tok = full.data.valid, full.data.tokenizer
    assert valid.src_ids == tok.encode_src(valid.src_text)  # validation is not sampled
    assert valid.trg_ids == tok.encode_trg(valid.trg_text)


def test_sample_nbest_of_one_is_refused():
    with pytest.raises(RecipeError, match="train.sample_nbest: must be -1 .* got 1"):
        recipe_from_dict(tiny_tree("run"), ["train.sample_nbest=1"])


def test_a_resume_in_another_process_trains_on_the_segmentations_it_had(tmp_path):
    """sentencepiece draws other segmentations for the same seed in another process: each
    epoch's draw is kept in the run directory, and a resume (or another rank) reads it."""
    import shutil
    import subprocess
    import sys

    import torch
    import yaml

    from seq2seq.checkpoint import load_checkpoint
    from tests.conftest import REPO

    tree = tiny_tree(str(tmp_path / "a"), train={"max_steps": 2, "valid_every": 100,
                                                 "sample_alpha": 0.3})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree), encoding="utf-8")

    def train(*overrides):
        result = subprocess.run([sys.executable, "-m", "seq2seq", "train", str(recipe),
                                 *overrides], capture_output=True, cwd=REPO, timeout=600)
        assert result.returncode == 0, result.stderr.decode()[-2000:]

    train()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for name in "ab":  # each resumed in a process of its own, to step 5 of the same epoch
        train(f"output_dir={tmp_path / name}", "train.max_steps=5")
    assert [p.name for p in (tmp_path / "a" / "sampled").iterdir()] == ["epoch-0.arrow"]
    a, b = (load_checkpoint(tmp_path / name / "last.pt") for name in "ab")
    assert a["step"] == b["step"] == 5
    for key, weight in a["model"].items():
        assert torch.equal(weight, b["model"][key]), key


def test_a_stored_draw_is_read_back_only_for_the_data_and_settings_it_was_drawn_from(
        prepared, tmp_path, capsys):
    """A run directory can keep a draw after a run that made no checkpoint; the next run may
    use other data (a filter, a corpus, a tokenizer) or settings."""
    import dataclasses

    from seq2seq.data.sampling import shared_epoch

    folder = tmp_path / "sampled"
    first = shared_epoch(folder, prepared, 0.3, -1, 1, 0)[0]
    stored = (folder / "epoch-0.arrow").read_bytes()
    assert shared_epoch(folder, prepared, 0.3, -1, 1, 0)[0].equals(first)  # read back
    assert (folder / "epoch-0.arrow").read_bytes() == stored  # not drawn again
    fewer = dataclasses.replace(prepared, train=prepared.train.select(range(10)))
    assert shared_epoch(folder, fewer, 0.3, -1, 1, 0)[0].num_rows == 10
    other = shared_epoch(folder, prepared, 0.3, 8, 1, 0)[0]  # another setting: drawn again
    assert other.num_rows == first.num_rows
    (folder / "epoch-0.arrow").write_bytes(stored[:100])  # a damaged file: drawn again, said
    assert shared_epoch(folder, prepared, 0.3, -1, 1, 0)[0].num_rows == first.num_rows
    assert "epoch-0.arrow: cannot be read" in capsys.readouterr().err
    for epoch in (1, 2, 3):  # this epoch's draw and the one before are kept
        shared_epoch(folder, prepared, 0.3, -1, 1, epoch)
    assert sorted(p.name for p in folder.iterdir()) == ["epoch-2.arrow", "epoch-3.arrow"]
