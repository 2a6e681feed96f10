"""The static-shape training path (CUDA graphs) against the plain path.

On the CPU the static programs run eagerly: bucket padding, the unpacked encoder, fused Adam
with on-device skipping and the trainer's use of them are all checked here. The graph capture
itself needs a GPU: the tests marked ``gpu`` run on the device machine.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seq2seq.config import RecipeError, recipe_from_dict
from seq2seq.data.batching import Batch
from seq2seq.models.encoder import Encoder
from seq2seq.models.seq2seq import PAD, build_model
from seq2seq.training.graphs import StaticSteps, bucket_shape, fused_adam, pad_batch
from seq2seq.training.step import build_step
from seq2seq.training.trainer import Trainer
from tests.conftest import tiny_tree

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_batch(rows: int, src_steps: int, trg_steps: int, vocab: int, seed: int) -> Batch:
    """Right-padded random batch with lengths from 1 to the full width (both present)."""
    generator = torch.Generator().manual_seed(seed)
    src_lens = torch.randint(1, src_steps + 1, (rows,), generator=generator)
    trg_lens = torch.randint(1, trg_steps + 1, (rows,), generator=generator)
    src_lens[0], trg_lens[-1] = src_steps, trg_steps
    src = torch.randint(4, vocab, (rows, src_steps), generator=generator)
    src[torch.arange(src_steps) >= src_lens[:, None]] = PAD
    trg_out = torch.randint(4, vocab, (rows, trg_steps), generator=generator)
    trg_out[torch.arange(trg_steps) >= trg_lens[:, None]] = PAD
    trg_in = torch.cat([torch.full((rows, 1), 2), trg_out[:, :-1]], dim=1)
    trg_in[torch.arange(trg_steps) >= trg_lens[:, None]] = PAD
    return Batch(src, src_lens, trg_in, trg_out, int(trg_lens.sum()))


def tiny_model(cell="gru", seed=0, **changes):
    recipe = recipe_from_dict(tiny_tree("unused"))
    cfg = dataclasses.replace(recipe.model, cell=cell, enc_layers=2, dec_layers=2, dropout=0.0,
                              **changes)
    torch.manual_seed(seed)
    return build_model(cfg, 40, 40)


def plain_loss_and_grads(model, batch, norm, label_smoothing=0.1):
    model.zero_grad(set_to_none=True)
    logits = model(batch.src, batch.src_lens, batch.trg_in)
    loss = F.cross_entropy(logits.flatten(0, 1), batch.trg_out.flatten(), ignore_index=PAD,
                           reduction="sum", label_smoothing=label_smoothing)
    (loss * norm).backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def assert_close_lists(a, b, rtol=1e-5, atol=1e-6):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# The unpacked encoder
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["gru", "rnn", "lstm"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_unpacked_encoder_equals_packed_outputs_finals_and_gradients(cell, bidirectional):
    torch.manual_seed(0)
    encoder = Encoder(nn.Embedding(30, 6, padding_idx=PAD), cell, 5, 2, bidirectional, 0.0)
    batch = random_batch(6, 9, 4, 30, seed=1)
    results = []
    for packed in (True, False):
        encoder.packed = packed
        encoder.zero_grad(set_to_none=True)
        enc_out, final = encoder(batch.src, batch.src_lens)
        (enc_out.square().sum() + final.sin().sum()).backward()
        results.append([enc_out, final] + [p.grad.clone() for p in encoder.parameters()])
    assert_close_lists(results[0], results[1])
    assert results[1][0][batch.src == PAD].abs().max() == 0  # padding outputs are zero


def test_cuda_graphs_need_a_precision_without_a_host_side_scaler():
    with pytest.raises(RecipeError, match="train.cuda_graphs"):
        recipe_from_dict(tiny_tree("unused"), ["train.cuda_graphs=true", "train.precision=fp16"])


# --------------------------------------------------------------------------------------------
# Bucket padding and the static programs
# --------------------------------------------------------------------------------------------


def test_bucket_padding_rounds_every_dimension_and_keeps_the_rows():
    batch = random_batch(5, 9, 3, 40, seed=2)
    shape = bucket_shape(batch)
    assert shape == (32, 16, 8)
    padded = pad_batch(batch, shape)
    assert padded.src.shape == (32, 16) and padded.trg_in.shape == (32, 8)
    assert torch.equal(padded.src[:5, :9], batch.src) and torch.equal(padded.src_lens[:5],
                                                                        batch.src_lens)
    assert (padded.src_lens[5:] == 1).all() and (padded.src[5:, 0] != PAD).all()
    assert (padded.trg_out[5:] == PAD).all() and (padded.trg_out[:5, 3:] == PAD).all()


@pytest.mark.parametrize("cell, decoder, input_feeding", [
    ("gru", "luong", True), ("gru", "bahdanau", True), ("gru", "luong", False),
    ("lstm", "luong", True)])
def test_static_forward_backward_on_a_padded_batch_equals_the_plain_path(cell, decoder,
                                                                         input_feeding):
    model = tiny_model(cell, decoder=decoder, input_feeding=input_feeding)
    batch = random_batch(7, 9, 6, 40, seed=3)
    norm = 1.0 / batch.n_trg_tokens
    loss, grads = plain_loss_and_grads(model, batch, norm)
    optimizer = fused_adam(model, torch.optim.Adam, 1e-3, (0.9, 0.999), 0.0, torch.device("cpu"))
    static = StaticSteps(model, optimizer, 1.0, 0.1, None, capture=False)
    assert not model.encoder.packed
    static_loss = static.run_forward_backward(batch, norm)
    torch.testing.assert_close(static_loss, loss, rtol=1e-5, atol=1e-5)
    assert_close_lists([p.grad for p in model.parameters()], grads)


def test_static_update_equals_clipped_adam_and_accumulates_micro_batches():
    plain, static_model = tiny_model(seed=4), tiny_model(seed=4)
    batches = [random_batch(5, 7, 5, 40, seed=s) for s in (5, 6)]
    norm = 1.0 / sum(b.n_trg_tokens for b in batches)
    reference = torch.optim.Adam(plain.parameters(), lr=3e-3)
    optimizer = fused_adam(static_model, torch.optim.Adam, 3e-3, (0.9, 0.999), 0.0,
                           torch.device("cpu"))
    # a clipping norm below the gradients' (about 0.17 at the first update), so that it acts
    static = StaticSteps(static_model, optimizer, 0.1, 0.1, None, capture=False)
    for step in range(3):
        plain.zero_grad(set_to_none=True)
        for batch in batches:  # two micro-batches, one update
            logits = plain(batch.src, batch.src_lens, batch.trg_in)
            loss = F.cross_entropy(logits.flatten(0, 1), batch.trg_out.flatten(),
                                   ignore_index=PAD, reduction="sum", label_smoothing=0.1)
            (loss * norm).backward()
        for batch in batches:
            static.run_forward_backward(batch, norm)
        grads = [p.grad.clone() for p in static_model.parameters()]
        assert_close_lists(grads, [p.grad for p in plain.parameters()])
        # The reference update starts from the same gradients: Adam divides each by its own
        # running size, so a gradient that is rounding noise (a few 1e-10 here, the sum of
        # terms that cancel) would move a weight by up to lr whichever way its noise went.
        for p, grad in zip(plain.parameters(), grads):
            p.grad = grad.clone()
        assert torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.1) > 0.1
        for group in reference.param_groups:
            group["lr"] = 3e-3 / (step + 1)
        reference.step()
        static.run_update(3e-3 / (step + 1))
        assert all((p.grad == 0).all() for p in static_model.parameters())
    assert_close_lists(list(static_model.parameters()), list(plain.parameters()))
    assert static.read_bad_updates() == (0, 0, 0)


def test_a_non_finite_gradient_skips_the_update_on_the_device():
    model = tiny_model(seed=7)
    optimizer = fused_adam(model, torch.optim.AdamW, 1e-2, (0.9, 0.999), 0.1,
                           torch.device("cpu"))
    static = StaticSteps(model, optimizer, 1.0, 0.1, None, capture=False)
    batch = random_batch(4, 6, 5, 40, seed=8)
    static.run_forward_backward(batch, 0.1)
    static.run_update(1e-2)  # a good update: creates the optimizer state
    before = [p.detach().clone() for p in model.parameters()]
    moments = [s["exp_avg"].clone() for s in optimizer.state.values()]
    for _ in range(2):
        static.run_forward_backward(batch, 0.1)
        next(model.parameters()).grad[0, 0] = float("nan")
        static.run_update(1e-2)
    assert static.read_bad_updates() == (2, 2, 2)
    assert_close_lists(list(model.parameters()), before, rtol=0, atol=0)  # weight decay too
    assert_close_lists([s["exp_avg"] for s in optimizer.state.values()], moments, rtol=0, atol=0)
    assert all(int(s["step"]) == 1 for s in optimizer.state.values())
    static.run_forward_backward(batch, 0.1)
    static.run_update(1e-2)
    assert static.read_bad_updates() == (0, 2, 2)
    assert not torch.equal(next(model.parameters()), before[0])


def test_trainer_on_the_static_path_ends_where_the_plain_path_ends(tmp_path):
    """The trainer's use of the static programs (lr, normaliser, accumulation, checkpoints)."""
    def recipe(name):
        tree = tiny_tree(str(tmp_path / name), model={"dropout": 0.0},
                         train={"accumulate": 2, "max_steps": 4, "valid_every": 2})
        tree["data"]["cache_dir"] = str(tmp_path / "cache")
        return recipe_from_dict(tree)

    plain = Trainer(recipe("plain"))
    plain.fit()
    static = Trainer(recipe("static"))
    static.step = build_step(static.model, static.recipe, static.device, static.data.train,
                             static.data.train_lengths()[1], tmp_path / "static" / "last.pt",
                             graphs=True, capture=False)
    static.step.start(static.progress)
    static.fit()
    assert static.progress.step == plain.progress.step == 4
    assert_close_lists(list(static.model.parameters()), list(plain.model.parameters()),
                       rtol=1e-4, atol=1e-5)
    saved = torch.load(tmp_path / "static" / "last.pt", weights_only=True)
    assert saved["progress"]["skipped_updates"] == 0


# --------------------------------------------------------------------------------------------
# On a GPU: the captured graphs
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_graphed_steps_equal_eager_steps_on_the_gpu(cell, dtype):
    device = torch.device("cuda")
    eager_model = tiny_model(cell, seed=9).to(device)
    graph_model = tiny_model(cell, seed=9).to(device)
    programs = []
    for model, capture in ((eager_model, False), (graph_model, True)):
        optimizer = fused_adam(model, torch.optim.Adam, 1e-3, (0.9, 0.999), 0.0, device)
        programs.append(StaticSteps(model, optimizer, 1.0, 0.1, dtype, capture=capture))
    tolerance = {"rtol": 2e-2, "atol": 2e-3} if dtype else {"rtol": 1e-4, "atol": 1e-5}
    # The graphs read and write the parameters where they are: nothing may move them.
    addresses = [p.data_ptr() for p in graph_model.parameters()]
    # Three shapes, one of them twice, with accumulation: capture, replay, reuse.
    for step, sizes in enumerate([(5, 7, 5), (40, 9, 12), (5, 7, 5)]):
        batches = [random_batch(*sizes, 40, seed=10 * step + k) for k in (0, 1)]
        norm = 1.0 / sum(b.n_trg_tokens for b in batches)
        losses = [[p.run_forward_backward(b, norm) for b in batches] for p in programs]
        torch.testing.assert_close(losses[1], losses[0], **tolerance)
        assert_close_lists([p.grad for p in graph_model.parameters()],
                           [p.grad for p in eager_model.parameters()], **tolerance)
        for program in programs:
            program.run_update(1e-3)
    assert len(programs[1].graphs) == 2
    assert_close_lists(list(graph_model.parameters()), list(eager_model.parameters()),
                       **tolerance)
    graph_model.eval()
    check = random_batch(5, 7, 5, 40, seed=99)
    graph_model.encode(check.src.to(device), check.src_lens.to(device))  # eagerly, as in validation
    assert [p.data_ptr() for p in graph_model.parameters()] == addresses


# --------------------------------------------------------------------------------------------
# Resuming across the switch (train.cuda_graphs may change when a run resumes)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("saved_fused", [False, True], ids=["plain-to-fused", "fused-to-plain"])
def test_optimizer_state_loads_across_the_graphs_switch_keeping_this_runs_kernel(saved_fused):
    import copy

    from seq2seq.training.optim import load_optimizer_state

    def optimizer(model, fused):
        if fused:
            return fused_adam(model, torch.optim.Adam, 1e-2, (0.9, 0.999), 0.0,
                              torch.device("cpu"))
        return torch.optim.Adam(model.parameters(), lr=1e-2)

    def step(model, opt, batch):
        plain_loss_and_grads(model, batch, 0.01)
        opt.step()

    saved_model = tiny_model()
    saved = optimizer(saved_model, saved_fused)
    batch = random_batch(6, 5, 4, 40, seed=3)
    for _ in range(2):
        step(saved_model, saved, batch)
    model = copy.deepcopy(saved_model)
    resumed = optimizer(model, not saved_fused)
    load_optimizer_state(resumed, copy.deepcopy(saved.state_dict()))  # as if from disk
    assert bool(resumed.param_groups[0]["fused"]) is (not saved_fused)  # this run's kernel
    steps = [resumed.state[p]["step"] for p in model.parameters()]
    assert all(s.dtype == torch.float32 and float(s) == 2.0 for s in steps)
    # Both go on to take the same third step (lr 1e-2 in both, a tensor in the fused one).
    step(saved_model, saved, batch)
    step(model, resumed, batch)
    assert_close_lists(list(model.parameters()), list(saved_model.parameters()),
                       rtol=1e-5, atol=1e-6)
