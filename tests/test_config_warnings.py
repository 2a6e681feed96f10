"""Recipe values that pass the checks but would not do what they say are warned of, by key."""

import os
import re

import numpy as np
import torch

from seq2seq.config import recipe_from_dict
from seq2seq.search import EOS
from tests.conftest import tiny_tree


def warnings_of(*overrides, cpus=64):
    from seq2seq.config.checks import recipe_warnings

    return recipe_warnings(recipe_from_dict({}, list(overrides)), cpus=cpus)


def test_a_warmup_not_shorter_than_max_steps_says_how_high_the_rate_gets():
    (message,) = warnings_of("train.max_steps=1000", "train.warmup_steps=4000", "train.lr=1e-3")
    assert message == ("train.warmup_steps: 4000 is not below train.max_steps (1000): the whole "
                       "run is warm-up, in which the learning rate climbs to no more than "
                       "0.00025 (train.lr 0.001 x 1000/4000)")
    (message,) = warnings_of("train.max_steps=500", "train.warmup_steps=500")
    assert message.startswith("train.warmup_steps: 500 is not below train.max_steps (500)")
    assert warnings_of("train.max_steps=500", "train.warmup_steps=499") == []
    assert warnings_of("train.max_steps=0", "train.warmup_steps=4000") == []  # (by epochs)


def test_the_warned_peak_is_the_schedules_highest_rate():
    from seq2seq.training.optim import Schedule

    (message,) = warnings_of("train.max_steps=30", "train.warmup_steps=70", "train.lr=0.02")
    schedule = Schedule(0.02, "constant", 70, 1e-6, 0.5, 2)
    highest = max(schedule.at(step) for step in range(1, 31))
    assert f"no more than {highest:.3g} (train.lr 0.02 x 30/70)" in message


def test_threads_beyond_the_cpus_this_process_may_use_are_said(monkeypatch):
    (message,) = warnings_of("train.threads=8", cpus=2)
    assert message == ("train.threads: 8 threads for the 2 CPUs this process may use: threads "
                       "beyond the CPUs wait for one another and slow training; set at most 2")
    (message,) = warnings_of("train.threads=2", "distributed.nproc_per_node=2", cpus=3)
    assert message.startswith("train.threads: 2 threads in each of 2 processes "
                              "(distributed.nproc_per_node) for the 3 CPUs")
    assert warnings_of("train.threads=2", cpus=2) == warnings_of("train.threads=0", cpus=1) == []
    # By default, the CPUs of this process's affinity, not all of the machine's.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    (message,) = warnings_of("train.threads=2", cpus=None)
    assert "for the 1 CPU this process may use" in message


def test_min_len_above_short_sources_maximum_output_length_says_what_the_search_does():
    from seq2seq.config import DecodeConfig
    from seq2seq.decoding import decode_ids
    from tests.search.toy_models import ToyModel

    settings = ["decode.max_len_ratio=1.5", "decode.max_len_add=2", "decode.min_len=8"]
    (message,) = warnings_of(*settings)
    assert message == ("decode.min_len: 8 is above the maximum output length of sources of up to "
                       "2 subword tokens (5 for one: decode.max_len_ratio 1.5 x (source tokens "
                       "+ 1 for EOS) + decode.max_len_add 2, rounded down): their outputs are cut "
                       "at that maximum, without EOS, shorter than min_len")
    # What the search does: sources of 1 and 2 tokens are cut short of min_len, without EOS;
    # from 3 tokens (a maximum of 8) min_len is met.
    model = ToyModel(eos_bias=2.0)  # (a model that would rather end at once)
    for beam_size in (1, 3):
        decode = DecodeConfig(beam_size=beam_size, alpha=0.0, max_len_ratio=1.5, max_len_add=2,
                              min_len=8)
        results = decode_ids(model, [[5] * k for k in range(1, 5)], decode, torch.device("cpu"))
        lengths = [len(hyps[0].tokens) for hyps in results]
        assert lengths == [5, 6, 8, 9] and not any(EOS in hyps[0].tokens for hyps in results)
    # A minimum equal to a one-token source's maximum makes a fixed length, as asked.
    assert warnings_of("decode.max_len_ratio=1.5", "decode.max_len_add=2",
                       "decode.min_len=5") == []
    (message,) = warnings_of("decode.max_len_ratio=0.3", "decode.max_len_add=0",
                             "decode.min_len=7")
    assert "of sources of up to 22 subword tokens (1 for one:" in message  # 0.3 x 23 < 7


def test_the_start_of_training_says_a_warmup_as_long_as_a_run_set_in_epochs(capsys):
    from seq2seq.training.step import say_recipe_warnings

    # 300 pairs of 9 target tokens (+ EOS) in batches of 300 tokens: 10 updates an epoch.
    trg_lens = np.full(300, 9)
    for warmup, warned in ((19, False), (20, True), (50, True)):
        recipe = recipe_from_dict(tiny_tree("run"), [
            "train.max_steps=0", "train.max_epochs=2", f"train.warmup_steps={warmup}",
            "train.lr=0.01"])
        say_recipe_warnings(recipe, trg_lens)
        err = capsys.readouterr().err
        expected = (f"warning: train.warmup_steps: {warmup} is not below the run's 20 updates "
                    f"(train.max_epochs 2 x 10 an epoch): the whole run is warm-up, in which "
                    f"the learning rate climbs to no more than {0.01 * 20 / warmup:.3g}")
        assert (expected in err) is warned, err
    # train.max_steps below the epochs' updates ends the run first: it has said so.
    recipe = recipe_from_dict(tiny_tree("run"), [
        "train.max_steps=15", "train.max_epochs=2", "train.warmup_steps=15"])
    say_recipe_warnings(recipe, trg_lens)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: train.warmup_steps: 15 is not below train.max_steps (15)")


def test_a_training_run_starts_with_its_warnings(tmp_path, monkeypatch, capsys):
    from seq2seq.training.trainer import fit

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    tree = tiny_tree(str(tmp_path / "run"))
    tree["data"]["cache_dir"] = str(tmp_path / "cache")
    recipe = recipe_from_dict(tree, [
        "train.max_steps=0", "train.max_epochs=1", "train.warmup_steps=1000",
        "train.valid_every=1000", "train.keep_last=0", "train.batch_tokens=1000",
        "train.threads=2", "decode.min_len=5"])
    threads = torch.get_num_threads()
    try:
        trainer = fit(recipe)
    finally:
        torch.set_num_threads(threads)
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("warning: ")]
    assert len(warnings) == 3, warnings
    assert warnings[0].startswith("warning: train.threads: 2 threads for the 1 CPU ")
    assert warnings[1].startswith("warning: decode.min_len: 5 is above the maximum output "
                                  "length of sources of up to 1 subword token (4 for one:")
    # The updates it counts are those the run made.
    updates = re.fullmatch(r"warning: train\.warmup_steps: 1000 is not below the run's (\d+) "
                           r"updates \(train\.max_epochs 1 x \1 an epoch\): .*", warnings[2])
    assert updates and int(updates[1]) == trainer.progress.step > 0
