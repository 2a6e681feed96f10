"""Training: loss normalisation, checkpoints, exact resume, run outputs."""

import json
from pathlib import Path

import pytest
import torch

from seq2seq.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from seq2seq.config import recipe_from_dict, recipe_to_dict
from seq2seq.errors import Seq2SeqError
from seq2seq.training.optim import Schedule, run_done
from seq2seq.training.run_dir import check_resumable
from seq2seq.training.trainer import fit
from tests.conftest import tiny_tree


def tiny_recipe(tmp_path, *overrides, name="run"):
    tree = tiny_tree(str(tmp_path / name))
    tree["data"]["cache_dir"] = str(tmp_path / "cache")
    return recipe_from_dict(tree, list(overrides))


def weights(path):
    return load_checkpoint(path)["model"]


def test_run_writes_its_outputs(tmp_path):
    recipe = tiny_recipe(tmp_path)
    fit(recipe)
    out = tmp_path / "run"
    for name in ("recipe.yaml", "metrics.jsonl", "last.pt", "best.pt"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all({"step", "split", "loss"} <= row.keys() for row in rows)
    valid = [r for r in rows if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [3, 6]
    assert all({"bleu", "ppl"} <= r.keys() for r in valid)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 6 and "model" in ckpt and "recipe" in ckpt
    assert len(list(out.glob("step_*.pt"))) == 2


@pytest.mark.parametrize("overrides", [["train.precision=fp32"], ["train.precision=bf16"],
                                       ["train.rdrop_alpha=1.0"]], ids=["fp32", "bf16", "rdrop"])
def test_stop_at_k_and_resume_equals_uninterrupted_bitwise(tmp_path, overrides):
    # Within one precision: bf16 on the CPU (emulated where it is not native) included.
    full = tiny_recipe(tmp_path, "train.max_steps=8", *overrides, name="full")
    fit(full)
    part = tiny_recipe(tmp_path, "train.max_steps=4", *overrides, name="part")
    fit(part)
    resumed = tiny_recipe(tmp_path, "train.max_steps=8", *overrides, name="part")
    fit(resumed)
    a, b = weights(tmp_path / "full" / "last.pt"), weights(tmp_path / "part" / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """A run killed after its checkpoint had logged more steps, and the resumed run logged
    them again: metrics.jsonl held those rows twice. The rows after the checkpoint go, and
    a half-written last row with them."""
    fit(tiny_recipe(tmp_path, "train.max_steps=4", "train.log_every=1", "train.valid_every=2"))
    metrics = tmp_path / "run" / "metrics.jsonl"
    clean = metrics.read_text()
    with open(metrics, "a") as handle:  # what the killed run had written after step 4
        handle.write('{"step": 5, "split": "train", "loss": 1.0}\n{"step": 6, "spl')
    fit(tiny_recipe(tmp_path, "train.max_steps=6", "train.log_every=1", "train.valid_every=2"))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert metrics.read_text().startswith(clean)
    steps = [(row["step"], row["split"]) for row in rows]
    assert len(steps) == len(set(steps)) and (5, "train") in steps and (6, "valid") in steps


def test_a_run_that_starts_over_drops_the_rows_of_a_try_that_made_no_checkpoint(tmp_path):
    """A run killed before its first checkpoint left its rows, and the next start (from
    step 0) logged its own after them: steps repeated, with two runs' losses."""
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text('{"step": 1, "split": "train", "loss": 9.0}\n'
                       '{"step": 2, "split": "train", "loss": 8.0}\n')
    fit(tiny_recipe(tmp_path, "train.max_steps=2", "train.log_every=1", "train.valid_every=2"))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(row["step"], row["split"]) for row in rows] == [
        (1, "train"), (2, "train"), (2, "valid")]
    assert all(row["loss"] < 8.0 for row in rows), rows


def test_resume_takes_processes_for_accumulation_steps_when_their_product_stays():
    """The refusal of another process count says "keep the product equal": a run of 2
    processes resumes as 1 process accumulating 2 batches (the same updates)."""
    saved = recipe_to_dict(recipe_from_dict(tiny_tree("run")))
    check_resumable(saved, recipe_from_dict(tiny_tree("run"), ["train.accumulate=2"]))


def test_linear_schedule_resumes_bitwise_when_max_steps_stops_the_run_early(tmp_path):
    # The run's length is max_epochs, so a stop at max_steps=4 does not change the schedule.
    linear = ("train.schedule=linear", "train.decay_last=0.8", "train.max_epochs=2")
    full = tiny_recipe(tmp_path, *linear, "train.max_steps=0", name="full")
    fit(full)
    part = tiny_recipe(tmp_path, *linear, "train.max_steps=4", name="part")
    fit(part)
    fit(tiny_recipe(tmp_path, *linear, "train.max_steps=0", name="part"))
    a, b = weights(tmp_path / "full" / "last.pt"), weights(tmp_path / "part" / "last.pt")
    assert all(torch.equal(a[key], b[key]) for key in a)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text()
            .splitlines()]
    rates = [r["lr"] for r in rows if r["split"] == "train"]
    assert len(rates) > 4 and rates[0] == 0.01 and rates[-1] < rates[0]
    assert rates == sorted(rates, reverse=True)


def test_linear_schedule_holds_the_rate_then_falls_to_min_lr():
    schedule = Schedule(1e-3, "linear", 0, 1e-6, 0.5, 1, decay_last=0.25)
    assert schedule.at(1, 0.0) == schedule.at(1, 0.75) == 1e-3
    assert schedule.at(1, 0.875) == pytest.approx(5e-4)
    assert schedule.at(1, 1.0) == 1e-6
    warm = Schedule(1e-3, "linear", 10, 0, 0.5, 1, decay_last=1.0)
    assert warm.at(5, 0.0) == pytest.approx(5e-4)  # warmup first
    assert warm.at(20, 0.5) == pytest.approx(5e-4)
    warm.validated(improved=False)
    warm.validated(improved=False)
    assert warm.scale == 1.0  # no plateau bookkeeping


def test_cpu_training_updates_with_the_fused_adam_kernel(tmp_path):
    from seq2seq.training.optim import make_optimizer

    recipe = tiny_recipe(tmp_path, "train.optimizer=adamw", "train.weight_decay=0.01")
    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer(model, recipe, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["fused"] is True
    # The same update as torch's default loop, up to rounding.
    reference = torch.nn.Linear(3, 2)
    reference.load_state_dict(model.state_dict())
    plain = torch.optim.AdamW(reference.parameters(), lr=recipe.train.lr,
                              betas=recipe.train.betas, weight_decay=0.01)
    for _ in range(3):
        for net, opt in ((model, optimizer), (reference, plain)):
            net(torch.ones(4, 3)).square().sum().backward()
            opt.step()
            opt.zero_grad()
    for fused, looped in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(fused, looped, rtol=1e-6, atol=1e-7)


def test_run_done_counts_epochs_and_falls_back_to_steps():
    from types import SimpleNamespace as Position

    epochs = Position(max_epochs=4, max_steps=3)  # max_steps only stops early
    assert run_done(epochs, Position(epoch=1, epoch_step=50, step=150), 100) == 0.375
    steps = Position(max_epochs=0, max_steps=200)
    assert run_done(steps, Position(epoch=1, epoch_step=50, step=150), 100) == 0.75


def test_resume_refuses_a_changed_recipe(tmp_path):
    fit(tiny_recipe(tmp_path, "train.max_steps=2"))
    with pytest.raises(Seq2SeqError, match="model.dec_hidden"):
        fit(tiny_recipe(tmp_path, "train.max_steps=4", "model.dec_hidden=32"))


def test_a_checkpoint_from_before_a_recipe_key_existed_still_resumes():
    recipe = tiny_recipe(Path("/tmp"))
    saved = recipe_to_dict(recipe)
    del saved["data"]["train"]["seed"]  # written before generated corpora had their own seed
    check_resumable(saved, recipe)
    saved["model"]["old_key"] = 1  # a key since removed is named
    with pytest.raises(Seq2SeqError, match=r"model\.old_key"):
        check_resumable(saved, recipe)


def test_a_refused_resume_leaves_the_tokenizer_and_cache_untouched(tmp_path):
    fit(tiny_recipe(tmp_path, "train.max_steps=2"))
    out, cache = tmp_path / "run", tmp_path / "cache"
    before = {p: p.stat().st_mtime_ns for p in [*out.rglob("*"), *cache.rglob("*")]}
    with pytest.raises(Seq2SeqError, match="tokenizer.vocab_size"):
        fit(tiny_recipe(tmp_path, "train.max_steps=4", "tokenizer.vocab_size=100"))
    after = {p: p.stat().st_mtime_ns for p in [*out.rglob("*"), *cache.rglob("*")]}
    assert after == before


def test_a_finished_run_run_again_changes_nothing(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, "train.max_steps=0", "train.max_epochs=2",
                         "train.valid_every=1000", "data.train.size=60")
    fit(recipe)
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # The last validation (after the final update) belongs to epoch 2, not to an epoch 3.
    assert [r["epoch"] for r in rows if r["split"] == "valid"] == [2]
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    fit(recipe)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files
    err = capsys.readouterr().err
    assert "nothing to train: reached train.max_epochs=2 at step" in err
    # Raising the limit trains on from there.
    fit(tiny_recipe(tmp_path, "train.max_steps=0", "train.max_epochs=3",
                    "train.valid_every=1000", "data.train.size=60"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["split"] == "valid"] == [2, 3]


@pytest.mark.parametrize("again, reason", [
    ([], "reached train.max_steps=3"),
    (["train.max_steps=2"], "reached train.max_steps=2"),  # a lower limit than the step
    (["train.max_steps=5", "train.patience=1"],
     "early stopping: no loss improvement in 1 validations")])
def test_a_run_at_its_step_limit_or_stopped_early_makes_no_update_when_run_again(
        tmp_path, capsys, again, reason):
    """Not one more update per re-run: the limits and early stopping are checked before the
    first update too."""
    base = ["train.max_steps=3", "train.valid_every=1", "train.early_stop_metric=loss"]
    fit(tiny_recipe(tmp_path, *base))
    out = tmp_path / "run"
    if "train.patience=1" in again:  # as a run whose last validation did not improve
        ckpt = load_checkpoint(out / "last.pt")
        ckpt["progress"]["bad_validations"] = 1
        save_checkpoint(ckpt, out / "last.pt")
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    fit(tiny_recipe(tmp_path, *base, *again))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files
    assert f"nothing to train: {reason} at step 3" in capsys.readouterr().err


def test_output_dir_that_is_a_file_is_an_error(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(Seq2SeqError, match="not a directory"):
        fit(tiny_recipe(tmp_path))


def test_accumulation_gives_the_same_update_as_one_batch(tmp_path):
    """Loss normalisation by global target tokens: 2 half-size micro-batches == 1 batch."""
    from seq2seq.training.trainer import Trainer

    trainer = Trainer(tiny_recipe(tmp_path, "model.dropout=0.0"))
    trainer.model.train()
    from seq2seq.data.batching import epoch_batches

    src_lens, trg_lens = trainer.data.train_lengths()
    batch = epoch_batches(trg_lens, src_lens, 300, 0, 1, 0, 1)[0]
    tokens = int(trg_lens[batch].sum()) + len(batch)
    grads = []
    for parts in ([batch], [batch[: len(batch) // 2], batch[len(batch) // 2:]]):
        trainer.step.optimizer.zero_grad()
        trainer.step.accumulate(parts, tokens)
        grads.append([p.grad.clone() for p in trainer.model.parameters()])
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


def test_checkpoint_refuses_pickled_objects_and_damage(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "recipe": {}, "x": Schedule(1, "constant", 0, 0, 0.5, 1)}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(evil)
    good = tmp_path / "good.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "recipe": {}}, good)
    assert torch.equal(load_checkpoint(good)["model"]["w"], torch.ones(3))
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(good)


def test_tensorboard_logging(tmp_path):
    fit(tiny_recipe(tmp_path, "train.tensorboard=true", "train.max_steps=2",
                    "train.valid_every=2"))
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_average_last_writes_a_validated_average_of_the_last_step_checkpoints(tmp_path):
    from seq2seq.checkpoint import average_checkpoints

    recipe = tiny_recipe(tmp_path, "train.max_steps=6", "train.valid_every=2",
                         "train.keep_last=3", "train.average_last=2")
    fit(recipe)
    out = tmp_path / "run"
    averaged = load_checkpoint(out / "averaged.pt")
    assert averaged["averaged_from"] == [str(out / "step_00000004.pt"),
                                         str(out / "step_00000006.pt")]
    average_checkpoints([out / "step_00000004.pt", out / "step_00000006.pt"], tmp_path / "a.pt")
    expected = load_checkpoint(tmp_path / "a.pt")["model"]
    assert all(torch.equal(averaged["model"][k], expected[k]) for k in expected)
    last = load_checkpoint(out / "last.pt")["model"]
    assert not all(torch.equal(averaged["model"][k], last[k]) for k in last)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if r["split"] == "averaged"]
    assert row["step"] == 6 and 0 <= row["bleu"] <= 100 and row["loss"] > 0


def test_average_last_needs_that_many_kept_checkpoints():
    from seq2seq.config import RecipeError

    with pytest.raises(RecipeError, match="train.average_last: averages step checkpoints, so "
                                          "it needs train.keep_last >= 5; got keep_last 2"):
        recipe_from_dict(tiny_tree("run"), ["train.average_last=5", "train.keep_last=2"])


def test_rdrop_without_dropout_gives_the_plain_update(tmp_path):
    """With no dropout the two passes agree, the KL is 0 and R-Drop's update is the plain one;
    with dropout the passes differ and so does the update."""
    from seq2seq.data.batching import epoch_batches
    from seq2seq.models.dropout import Dropout
    from seq2seq.training.trainer import Trainer

    def update_gradients(*overrides, no_dropout=False):
        torch.manual_seed(0)
        trainer = Trainer(tiny_recipe(tmp_path, *overrides, name="-".join(overrides)))
        if no_dropout:  # a recipe refuses R-Drop without dropout; the model can still have none
            for module in trainer.model.modules():
                if isinstance(module, Dropout):
                    module.p = 0.0
                elif isinstance(module, torch.nn.RNNBase):
                    module.dropout = 0.0
        trainer.model.train()
        src_lens, trg_lens = trainer.data.train_lengths()
        batch = epoch_batches(trg_lens, src_lens, 300, 0, 1, 0, 1)[0]
        trainer.step.optimizer.zero_grad()
        trainer.step.accumulate([batch], int(trg_lens[batch].sum()) + len(batch))
        return [p.grad.clone() for p in trainer.model.parameters()]

    plain = update_gradients("model.dropout=0.3", no_dropout=True)
    rdrop = update_gradients("model.dropout=0.3", "train.rdrop_alpha=2.0", no_dropout=True)
    for g1, g2 in zip(plain, rdrop):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    with_dropout = update_gradients("model.dropout=0.3", "train.rdrop_alpha=2.0")
    plain_dropout = update_gradients("model.dropout=0.3")
    assert any(not torch.allclose(a, b) for a, b in zip(with_dropout, plain_dropout))



def test_prepare_takes_the_runs_lock_and_never_retrains_a_tokenizer_under_its_weights(
        tmp_path):
    from seq2seq.training.commands import prepare_command
    from seq2seq.training.run_dir import RunDirectory

    fit(tiny_recipe(tmp_path, "train.max_steps=2"))
    out, cache = tmp_path / "run", tmp_path / "cache"
    before = {p: p.read_bytes() for p in [*out.rglob("*"), *cache.rglob("*")] if p.is_file()}
    with pytest.raises(Seq2SeqError, match="tokenizer.vocab_size"):
        prepare_command(tiny_recipe(tmp_path, "tokenizer.vocab_size=100"))
    held = RunDirectory(out)
    held.lock()  # as a train running on it holds it
    try:
        with pytest.raises(Seq2SeqError, match="is in use by another training run"):
            prepare_command(tiny_recipe(tmp_path))
    finally:
        held.close()
    after = {p: p.read_bytes() for p in [*out.rglob("*"), *cache.rglob("*")] if p.is_file()}
    assert after == before
    assert prepare_command(tiny_recipe(tmp_path)).stats  # the run's own settings: its data


def test_a_signal_in_the_last_update_leaves_the_run_s_end_to_the_next_run(tmp_path,
                                                                         monkeypatch, capsys):
    """The last validation and the averaging were skipped for the signal, and the rerun said
    'nothing to train': averaged.pt never came, eval.checkpoint=averaged had nothing."""
    import os
    import signal

    from seq2seq.training import step

    base = ["train.max_steps=5", "train.valid_every=3", "train.average_last=2"]
    apply = step.EagerStep.apply

    def apply_then_signal(self, lr):
        ok = apply(self, lr)
        self.updates = getattr(self, "updates", 0) + 1
        if self.updates == 5:
            os.kill(os.getpid(), signal.SIGINT)  # (the trainer's handler takes it)
        return ok

    monkeypatch.setattr(step.EagerStep, "apply", apply_then_signal)
    assert fit(tiny_recipe(tmp_path, *base)).interrupted
    # (the summary said "reached train.max_steps=5", hiding that the run's end was cut)
    assert "stopped at step 5: received SIGINT;" in capsys.readouterr().err
    monkeypatch.setattr(step.EagerStep, "apply", apply)
    out = tmp_path / "run"

    def rows():
        return [(r["step"], r["split"]) for r in map(json.loads, (out / "metrics.jsonl")
                                                      .read_text().splitlines())
                if r["split"] != "train"]

    assert rows() == [(3, "valid")] and not (out / "averaged.pt").exists()
    fit(tiny_recipe(tmp_path, *base))
    assert rows() == [(3, "valid"), (5, "valid"), (5, "averaged")]
    assert (out / "averaged.pt").is_file() and (out / "step_00000005.pt").is_file()
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    fit(tiny_recipe(tmp_path, *base))  # done now: a rerun changes nothing
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files


def test_training_on_after_a_finished_run_decides_as_one_longer_run(tmp_path, monkeypatch):
    """The validation a run adds at its end counted as the best for the plateau schedule and
    patience of a later, longer run: its learning rate halved where one run's did not."""
    from seq2seq.training import trainer as module

    losses = []  # what each validation of the next fit() reports, in order

    def scripted(*args):
        loss = losses.pop(0)
        return {"loss": loss, "ppl": 2.0 ** loss, "bleu": 0.0, "n_sentences": 20}

    monkeypatch.setattr(module, "validate", scripted)
    base = ["train.valid_every=2", "train.schedule=plateau", "train.plateau_patience=0",
            "train.early_stop_metric=loss", "train.keep_last=0"]
    losses[:] = [5.0, 4.0, 3.0, 2.5]  # steps 2, 4, 6, 8
    fit(tiny_recipe(tmp_path, *base, "train.max_steps=8", name="one"))
    losses[:] = [5.0, 4.0, 1.0]  # steps 2, 4, and the run's end at 5: its best
    fit(tiny_recipe(tmp_path, *base, "train.max_steps=5", name="two"))
    losses[:] = [3.0, 2.5]  # steps 6 and 8: better than every scheduled one before
    fit(tiny_recipe(tmp_path, *base, "train.max_steps=8", name="two"))
    one, two = (load_checkpoint(tmp_path / name / "last.pt") for name in ("one", "two"))
    assert one["schedule"] == two["schedule"] == {"scale": 1.0, "bad_validations": 0}
    for key in one["model"]:
        assert torch.equal(one["model"][key], two["model"][key]), key
    # best.pt is the best of every validation, the one at the end of the first run included
    assert load_checkpoint(tmp_path / "two" / "best.pt")["step"] == 5


def test_a_run_killed_after_its_first_best_pt_resumes_from_it(tmp_path):
    """Saves go best.pt, step checkpoint, last.pt: a kill between left best.pt alone, and
    every rerun refused ('it holds best.pt but no last.pt or step checkpoint')."""
    fit(tiny_recipe(tmp_path, "train.max_steps=6", name="whole"))
    fit(tiny_recipe(tmp_path, "train.max_steps=3"))
    out = tmp_path / "run"
    assert load_checkpoint(out / "best.pt")["step"] == 3
    for path in [out / "last.pt", *out.glob("step_*.pt")]:
        path.unlink()
    fit(tiny_recipe(tmp_path, "train.max_steps=6"))
    a, b = weights(tmp_path / "whole" / "last.pt"), weights(out / "last.pt")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_checkpoint_from_before_scheduled_best_and_closed_step_resumes_as_it_did():
    from seq2seq.training.progress import Progress

    old = {"step": 9, "epoch": 1, "epoch_step": 2, "best_value": 3.5, "best_step": 6,
           "bad_validations": 1, "bad_updates": 0, "skipped_updates": 0}
    progress = Progress.from_state(old)
    assert progress.scheduled_best == 3.5 and progress.closed_step == 9
    new = {**old, "scheduled_best": None, "validated_step": 8, "closed_step": -1}
    assert Progress.from_state(new) == Progress(**new)


def test_perplexity_keeps_the_order_of_losses_of_a_diverged_run():
    """ppl was exp(min(loss, 100)): validations at losses 1701 and 1378 had equal ppl, so
    train.early_stop_metric=ppl never saw the recovery."""
    import math

    from seq2seq.training.validation import perplexity

    assert perplexity(150.0) < perplexity(160.0) < perplexity(700.0) == perplexity(1e6)
    assert math.isfinite(perplexity(1e6)) and perplexity(0.0) == 1.0
    assert perplexity(2.0) == math.exp(2.0)


def test_a_run_whose_best_pt_went_missing_says_so_when_it_resumes(tmp_path, capsys):
    """Neither train nor check said anything; evaluate's default checkpoint then failed."""
    fit(tiny_recipe(tmp_path, "train.max_steps=3"))
    (tmp_path / "run" / "best.pt").unlink()
    capsys.readouterr()
    fit(tiny_recipe(tmp_path, "train.max_steps=4"))
    assert (f"warning: {tmp_path / 'run' / 'best.pt'}: missing; the best validation so far "
            "(step 3) has no checkpoint until a later one beats it") in capsys.readouterr().err


def test_a_signal_at_the_end_of_training_on_after_a_finished_run_also_leaves_it_to_a_rerun(
        tmp_path, monkeypatch):
    """The first run's 'end done' stayed true through the later updates: the rerun said
    'nothing to train' and kept the first run's averaged.pt."""
    import os
    import signal

    from seq2seq.training import step

    base = ["train.valid_every=3", "train.average_last=2"]
    fit(tiny_recipe(tmp_path, *base, "train.max_steps=4"))
    apply = step.EagerStep.apply

    def apply_then_signal(self, lr):
        ok = apply(self, lr)
        self.updates = getattr(self, "updates", 0) + 1
        if self.updates == 3:  # update 7, the last
            os.kill(os.getpid(), signal.SIGINT)
        return ok

    monkeypatch.setattr(step.EagerStep, "apply", apply_then_signal)
    assert fit(tiny_recipe(tmp_path, *base, "train.max_steps=7")).interrupted
    monkeypatch.setattr(step.EagerStep, "apply", apply)
    fit(tiny_recipe(tmp_path, *base, "train.max_steps=7"))
    rows = [(r["step"], r["split"]) for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl")
                                                  .read_text().splitlines())
            if r["split"] != "train"]
    assert rows == [(3, "valid"), (4, "valid"), (4, "averaged"), (6, "valid"), (7, "valid"),
                    (7, "averaged")]
    assert load_checkpoint(tmp_path / "run" / "averaged.pt")["step"] == 7


def test_a_run_killed_in_its_end_does_the_rest_once(tmp_path, monkeypatch):
    """Killed after the averaging's row, before the last save: the rerun validated and
    averaged again, and metrics.jsonl had the step's rows twice."""
    from seq2seq.training import trainer as module

    average = module.average_and_validate

    def average_then_die(*args, **kwargs):
        average(*args, **kwargs)
        raise KeyboardInterrupt  # as a kill: no save after it

    base = ["train.max_steps=5", "train.valid_every=3", "train.average_last=2"]
    monkeypatch.setattr(module, "average_and_validate", average_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_recipe(tmp_path, *base))
    monkeypatch.setattr(module, "average_and_validate", average)
    fit(tiny_recipe(tmp_path, *base))
    rows = [(r["step"], r["split"]) for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl")
                                                  .read_text().splitlines())
            if r["split"] != "train"]
    assert rows == [(3, "valid"), (5, "valid"), (5, "averaged")]


@pytest.mark.parametrize("search", ["beam", "greedy"])
def test_a_recipe_with_a_shortlist_validates_without_it(tmp_path, search):
    """decode.shortlist (for translate, evaluate and serve) made the first validation of a
    beam-validated run crash: the lexicon is made at the run's end, and nothing was saved."""
    recipe = tiny_recipe(tmp_path, "train.max_steps=3", "train.valid_every=3",
                         f"train.valid_search={search}", "decode.shortlist=5")
    fit(recipe)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [row["step"] for row in rows if "bleu" in row] == [3]
    assert (tmp_path / "run" / "best.pt").is_file()
