"""The C row kernels (seq2seq.native) compute what the torch code they replace computes, on
every path a user's machine can take: built, built by two processes at once, and off."""

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from seq2seq import native
from seq2seq.errors import Seq2SeqError

# Up to rounding: glibc's vector expf against torch's, a division against torch's, and for bf16
# gradients one rounding step (an ulp of 2^-8 relative).
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=8e-3, atol=1e-6)}


@pytest.fixture
def built():
    """The library, which every machine with a C compiler must be able to build (CI has one):
    the tests below would otherwise check only the torch fallback."""
    assert shutil.which("cc") or shutil.which("gcc"), "no C compiler on this machine"
    lib = native.library()
    assert lib is not None, "the C kernels did not build"
    return lib


def logits(rows, cols, dtype, seed=0, scale=4.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=gen) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (7, 5), (64, 7000), (5, 7003)])
def test_log_softmax_equals_torch(built, dtype, shape):
    x = logits(*shape, dtype)
    assert native.usable(x)
    got = native.log_softmax(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got, torch.log_softmax(x.float(), dim=-1), rtol=1e-5, atol=2e-6)


def test_log_softmax_of_rows_apart_and_of_extreme_values(built):
    wide = logits(9, 300, torch.bfloat16)
    x = wide[::2, 17:217]  # rows 600 elements apart, each contiguous
    assert native.usable(x) and not x.is_contiguous()
    torch.testing.assert_close(native.log_softmax(x), torch.log_softmax(x.float(), dim=-1))
    x = torch.tensor([[1e30, -1e30, 0.0], [-3e38, -3e38, -3e38], [88.0, 89.0, 90.0]])
    torch.testing.assert_close(native.log_softmax(x), torch.log_softmax(x, dim=-1))
    x = torch.tensor([[0.0, float("-inf"), 1.0]])  # a masked logit stays -inf
    got = native.log_softmax(x)
    assert got[0, 1] == float("-inf")
    torch.testing.assert_close(got, torch.log_softmax(x, dim=-1))


def test_what_the_kernels_do_not_take_goes_to_torch(built):
    for x in (logits(4, 6, torch.float64), logits(4, 6, torch.float32).t(),
              logits(4, 6, torch.float32).requires_grad_(), torch.zeros(0, 6)):
        assert not native.usable(x)
        torch.testing.assert_close(native.log_softmax(x), torch.log_softmax(x.float(), dim=-1))


def reference_cross_entropy(x, target, smoothing, bias_grad):
    """The loss's torch passes (seq2seq.training.loss) on fp32 logits."""
    vocab = x.size(1)
    log_probs = torch.log_softmax(x, dim=-1)
    loss = -(1 - smoothing) * log_probs.gather(1, target.unsqueeze(1)).squeeze(1) \
        - smoothing / vocab * log_probs.sum(dim=1)
    grad = log_probs.exp() - smoothing / vocab
    grad[torch.arange(x.size(0)), target] += smoothing - 1
    bias_grad += grad.sum(dim=0)
    return loss, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("shape", [(1, 2), (37, 29), (130, 7001)])
def test_cross_entropy_rows_equal_the_torch_passes(built, dtype, smoothing, shape):
    x = logits(*shape, dtype, seed=1)
    target = torch.randint(0, shape[1], (shape[0],), generator=torch.Generator().manual_seed(2))
    want_bias = torch.full((shape[1],), 0.5)
    want_loss, want_grad = reference_cross_entropy(x.float(), target, smoothing, want_bias)
    got = x.clone()
    bias = torch.full((shape[1],), 0.5)
    loss = native.cross_entropy_rows(got, target, smoothing, bias)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-4)
    assert got.dtype == dtype  # the gradient, over the logits
    torch.testing.assert_close(got.float(), want_grad.to(dtype).float(), **TOLERANCE[dtype])
    torch.testing.assert_close(bias, want_bias, rtol=1e-5, atol=1e-4)


def test_cross_entropy_rows_leave_other_rows_and_a_missing_bias_alone(built):
    block = logits(10, 50, torch.bfloat16)
    before = block.clone()
    x = block[2:6]  # rows 2-5 of a larger tensor
    native.cross_entropy_rows(x, torch.tensor([0, 49, 3, 3]), 0.1, None)
    assert torch.equal(block[:2], before[:2]) and torch.equal(block[6:], before[6:])
    assert not torch.equal(block[2:6], before[2:6])


def test_cross_entropy_rows_refuse_a_target_outside_the_vocabulary(built):
    for bad in (7, -1):
        x = logits(3, 7, torch.float32)
        with pytest.raises(IndexError, match=r"outside \[0, 7\)"):
            native.cross_entropy_rows(x, torch.tensor([0, bad, 1]), 0.1, None)
        assert torch.equal(x, logits(3, 7, torch.float32))  # nothing written


def test_results_do_not_depend_on_the_thread_count(built):
    x = logits(301, 1000, torch.bfloat16, seed=5)
    target = torch.randint(0, 1000, (301,), generator=torch.Generator().manual_seed(6))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            grad = x.clone()
            loss = native.cross_entropy_rows(grad, target, 0.1, torch.zeros(1000))
            results.append((native.log_softmax(x), loss, grad))
    finally:
        torch.set_num_threads(threads)
    for one, three in zip(*results):
        assert torch.equal(one, three)


def test_built_once_per_source_and_reused(built, tmp_path):
    cc = native.compiler()
    path = native.build(cc, tmp_path / "lib")
    assert path.parent == tmp_path / "lib" and path.suffix == ".so"
    stamp = path.stat().st_mtime_ns
    assert native.build(cc, tmp_path / "lib") == path
    assert path.stat().st_mtime_ns == stamp  # not built again
    assert [p.name for p in (tmp_path / "lib").iterdir()] == [path.name]  # no leftovers


def test_two_processes_building_at_once_load_one_whole_library(built, tmp_path):
    """Each writes its own temporary file and renames it into place: whichever rename is
    last, the name always holds a complete library, and no temporary file is left."""
    script = ("import sys; from seq2seq import native; "
              "lib = native.library(); print(lib is not None and lib._name)")
    env = {**os.environ, "SEQ2SEQ_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=120) for p in procs]
    names = {out.strip() for out, _ in outputs}
    assert len(names) == 1 and all(p.returncode == 0 for p in procs), outputs
    (name,) = names
    assert Path(name).parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [Path(name).name]


def test_a_compiler_command_with_arguments(built, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", f"env {native.compiler()[0]}")  # as CC="ccache gcc" would be
    assert native.compiler()[0] == "env"
    assert native.build(native.compiler(), tmp_path).exists()


@pytest.fixture
def fresh_library():
    native.library.cache_clear()
    yield
    native.library.cache_clear()  # the next caller builds or loads the real one again


def test_off_by_environment(fresh_library, monkeypatch, capsys):
    monkeypatch.setenv("SEQ2SEQ_NATIVE", "0")
    x = logits(3, 7, torch.bfloat16)
    assert native.library() is None and not native.usable(x)
    torch.testing.assert_close(native.log_softmax(x), torch.log_softmax(x.float(), dim=-1))
    assert capsys.readouterr().err == ""  # asked for: no note


def test_a_bad_setting_is_refused_in_one_line(fresh_library, monkeypatch, capsys):
    from seq2seq.cli import main

    monkeypatch.setenv("SEQ2SEQ_NATIVE", "off")
    with pytest.raises(Seq2SeqError, match="SEQ2SEQ_NATIVE='off': 1 .* or 0"):
        native.library()
    assert main(["check", "no-such-recipe.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: SEQ2SEQ_NATIVE='off'"), err


def test_a_failing_compiler_turns_the_kernels_off_with_one_note(fresh_library, monkeypatch,
                                                                 tmp_path, capsys):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake 1.0 && exit 0\n"
                    "echo 'rows.c:1: error: no such thing' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("SEQ2SEQ_CACHE", str(tmp_path / "cache"))
    assert native.library() is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rows.c:1: error: no such thing" in err, err
    assert native.library() is None and capsys.readouterr().err == ""  # said once
    assert list((tmp_path / "cache").iterdir()) == []  # no half-built file left


def test_an_unwritable_cache_turns_the_kernels_off(fresh_library, monkeypatch, tmp_path,
                                                   capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SEQ2SEQ_CACHE", str(blocker / "cache"))  # under a file: cannot exist
    assert native.library() is None
    assert "kernels are off" in capsys.readouterr().err


def test_no_compiler(fresh_library, monkeypatch, capsys):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert native.library() is None
    assert "no C compiler" in capsys.readouterr().err


def exact_additive_scores(query, keys, v):
    """``2 v^T sigmoid(q + k) - sum(v)`` in float64."""
    hidden = torch.sigmoid(query.double().unsqueeze(2) + keys.double().unsqueeze(1))
    return 2 * (hidden * v.double().view(-1)).sum(-1) - v.double().sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (6, 3, 7, 12), (4, 5, 33, 512)])
def test_additive_scores_equal_the_formula(built, dtype, shape):
    n, queries, sources, size = shape
    gen = torch.Generator().manual_seed(7)
    query = torch.randn(n, queries, size, generator=gen).to(dtype)
    keys = torch.randn(n, sources, size, generator=gen).to(dtype)
    v = (torch.randn(1, size, generator=gen) / size**0.5).to(dtype)
    got = native.additive_scores(query, keys, v)
    assert got.dtype == dtype and got.shape == (n, queries, sources)
    want = exact_additive_scores(query, keys, v)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    else:  # computed in fp32 and rounded once: within one bf16 rounding of the exact value
        assert ((got.double() - want).abs() <= want.abs() * 2**-8 + 1e-6).all()


@pytest.mark.parametrize("grad", [False, True])  # decoding, and training (with a backward)
def test_additive_scores_hold_over_the_whole_range_of_their_exponential(built, grad):
    # sigmoid(z) = 1 / (1 + exp(-z)) over z far past exp's range both ways (clamped there),
    # on sizes with and without a tail after the 8-lane blocks
    gen = torch.Generator().manual_seed(9)
    for size in (8, 20, 515):
        query = torch.randn(3, 2, size, generator=gen) * 40
        keys = torch.randn(3, 4, size, generator=gen) * 40
        query[0, 0, :3] = torch.tensor([200.0, -200.0, 0.0])
        v = torch.randn(1, size, generator=gen) / size**0.5
        got = native.additive_scores(query.requires_grad_(grad), keys, v)
        torch.testing.assert_close(got.detach().double(),
                                   exact_additive_scores(query.detach(), keys, v),
                                   rtol=1e-5, atol=1e-5)
        query = query.detach()
    query[0, 0, 0] = float("nan")
    assert native.additive_scores(query, keys, v)[0, 0].isnan().all()


def test_additive_scores_of_a_sentence_do_not_depend_on_its_batch(built):
    gen = torch.Generator().manual_seed(8)
    query = torch.randn(5, 4, 64, generator=gen).bfloat16()
    keys = torch.randn(5, 9, 64, generator=gen).bfloat16()
    v = torch.randn(1, 64, generator=gen).bfloat16()
    whole = native.additive_scores(query, keys, v)
    for i in range(5):
        alone = native.additive_scores(query[i:i + 1], keys[i:i + 1], v)
        assert torch.equal(alone[0], whole[i])
    # slices that are not contiguous are read as they are meant
    strided = native.additive_scores(query[::2], keys[::2], v)
    assert torch.equal(strided, whole[::2])


def test_attention_makes_no_hidden_layer_with_or_without_gradients(built, monkeypatch):
    from seq2seq.models.attention import Attention

    torch.manual_seed(0)
    attention = Attention("bahdanau", query_size=16, value_size=16, attention_size=12)
    enc_out, query = torch.randn(6, 7, 16), torch.randn(18, 1, 16)  # 3 beams per sentence
    src_mask = torch.arange(7) < torch.tensor([[7], [2], [1], [7], [4], [3]])
    keys = attention.project_keys(enc_out)
    calls = []
    sigmoid = torch.sigmoid
    monkeypatch.setattr(torch, "sigmoid", lambda x: calls.append(x.shape) or sigmoid(x))
    with torch.no_grad():
        context, weights = attention(query, keys, enc_out, src_mask)
    trained = attention(query, keys, enc_out, src_mask)
    assert calls == [] and trained[1].requires_grad  # the hidden layer was never made
    torch.testing.assert_close(weights, trained[1].detach(), rtol=0, atol=0)
    torch.testing.assert_close(context, trained[0].detach(), rtol=0, atol=0)
    assert (weights[~src_mask.repeat_interleave(3, 0).unsqueeze(1)] == 0).all()


def additive_gradients(query, keys, v, grad, fused):
    leaves = [x.detach().clone().requires_grad_() for x in (query, keys, v)]
    if fused:
        scores = native.additive_scores(*leaves)
    else:  # torch's ops, in float64
        q, k, w = (x.double() for x in leaves)
        hidden = torch.sigmoid(q.unsqueeze(2) + k.unsqueeze(1))
        scores = 2 * (hidden * w.view(-1)).sum(-1) - w.sum()
    scores.backward(grad.to(scores.dtype))
    return [scores.detach()] + [x.grad for x in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_additive_scores_gradients_equal_torch(built, dtype):
    gen = torch.Generator().manual_seed(9)
    n, queries, sources, size = 5, 3, 11, 40
    query = torch.randn(n, queries, size, generator=gen).to(dtype)
    keys = torch.randn(n, sources, size, generator=gen).to(dtype)
    v = torch.randn(1, size, generator=gen) / size**0.5  # an fp32 master weight
    grad = torch.randn(n, queries, sources, generator=gen)
    grad[:, :, 8:] = 0  # masked positions: their scores get no gradient
    got = additive_gradients(query, keys, v.to(dtype) if dtype == torch.float32 else v, grad,
                             True)
    want = additive_gradients(query, keys, v.to(dtype), grad, False)
    assert [g.dtype for g in got[1:]] == [dtype, dtype, torch.float32]  # v's own dtype
    for have, expected in zip(got, want):
        scale = expected.abs().max()
        tolerance = 1e-5 if dtype == torch.float32 else 2**-7  # bf16: one rounding, and v's
        assert (have.double() - expected).abs().max() <= tolerance * scale, (have, expected)


def test_additive_scores_add_their_keys_gradient_to_a_given_sum(built):
    gen = torch.Generator().manual_seed(11)
    query = torch.randn(3, 2, 20, generator=gen)
    keys = torch.randn(3, 5, 20, generator=gen).requires_grad_()
    v = torch.randn(1, 20, generator=gen)
    grad = torch.randn(3, 2, 5, generator=gen)
    native.additive_scores(query, keys, v).backward(grad)
    want = keys.grad.clone()
    keys.grad = None
    total = torch.full(keys.shape, 0.5)
    for _ in range(2):  # two steps over the same keys
        native.additive_scores(query, keys, v, lambda: total).backward(grad)
    assert keys.grad is None  # added to the sum, not returned
    torch.testing.assert_close(total, 0.5 + 2 * want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="keys_grad gave torch.bfloat16"):
        native.additive_scores(query, keys, v, lambda: total.bfloat16()).backward(grad)


@pytest.mark.filterwarnings("ignore:Input #.* is not a double precision")
def test_additive_scores_gradients_pass_gradcheck(built):
    gen = torch.Generator().manual_seed(10)
    query = torch.randn(2, 2, 6, generator=gen).requires_grad_()
    keys = torch.randn(2, 3, 6, generator=gen).requires_grad_()
    v = torch.randn(1, 6, generator=gen).requires_grad_()
    # fp32 kernels: finite differences at eps 1e-2 with a loose tolerance
    assert torch.autograd.gradcheck(native.AdditiveScores.apply, (query, keys, v), eps=1e-2,
                                    atol=1e-2, rtol=1e-2)


def test_additive_scores_refuse_what_they_cannot_take(built):
    query, keys, v = torch.randn(2, 1, 8), torch.randn(2, 3, 8), torch.randn(1, 8)
    assert native.additive_scores(query, keys.double(), v) is None
    assert native.additive_scores(query.double(), keys.double(), v) is None
    assert native.additive_scores(query, keys, torch.randn(1, 9)) is None
    assert native.additive_scores(query[:, :0], keys, v) is None
    assert native.additive_scores(query, keys[:1], v) is None  # shapes that do not match
    assert native.additive_scores(query, keys[..., :4], v[:, :4]) is None
    assert native.additive_scores(query[0], keys[0], v) is None


def torch_quantize_rows(x, qmax, dtype):
    """seq2seq.quantize's torch passes."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-12).div_(qmax)
    return (x / scale).round_().to(dtype), scale


@pytest.mark.parametrize("dtype,qmax", [(torch.int8, 127.0), (torch.float32, 63.0)])
@pytest.mark.parametrize("shape", [(1, 1), (5, 512), (37, 1023), (500, 64)])
def test_quantize_rows_equal_the_torch_passes_bitwise(built, dtype, qmax, shape):
    x = logits(*shape, torch.float32, scale=3.0)
    x[0, 0] = 0.5 * (x[0].abs().max() / qmax)  # exactly half a step: rounds to even
    if shape[0] > 1:
        x[1] = 0.0  # an all-zero row: the scale's floor
    got, got_scale = native.quantize_rows(x, qmax, dtype)
    want, want_scale = torch_quantize_rows(x, qmax, dtype)
    assert got.dtype == dtype and got.shape == x.shape and got_scale.shape == (shape[0], 1)
    assert torch.equal(got_scale, want_scale) and torch.equal(got, want)
    assert got.abs().max() <= qmax


def test_quantize_rows_of_rows_apart(built):
    wide = logits(9, 300, torch.float32)
    x = wide[::2, 17:217]
    assert not x.is_contiguous()
    got = native.quantize_rows(x, 127.0, torch.int8)
    want = torch_quantize_rows(x, 127.0, torch.int8)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("acc_dtype", [torch.int32, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
def test_scale_rows_equal_the_torch_passes_bitwise(built, acc_dtype, with_bias):
    gen = torch.Generator().manual_seed(3)
    acc = torch.randint(-2**24, 2**24, (33, 1537), generator=gen).to(acc_dtype)
    row_scale = torch.rand(33, 1, generator=gen) / 127
    col_scale = torch.rand(1, 1537, generator=gen) / 127
    bias = torch.randn(1537, generator=gen) if with_bias else None
    want = acc.float().clone().mul_(row_scale).mul_(col_scale)
    if bias is not None:
        want.add_(bias)
    got = native.scale_rows(acc.clone(), row_scale, col_scale, bias)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_scale_rows_refuse_what_they_cannot_take(built):
    acc, rows, cols = torch.zeros(4, 6, dtype=torch.int32), torch.ones(4, 1), torch.ones(1, 6)
    assert native.scale_rows(acc, rows, cols, None) is not None
    for bad in ((acc.t(), rows, torch.ones(1, 4), None), (acc.double(), rows, cols, None),
                (acc, torch.ones(3, 1), cols, None), (acc, rows, cols, torch.ones(5)),
                (acc[:, ::2], rows, torch.ones(1, 3), None)):
        assert native.scale_rows(*bad) is None
    assert native.quantize_rows(torch.zeros(4, 6, dtype=torch.float64), 127.0,
                                torch.int8) is None


def torch_gru_update(gates, hidden, h):
    size = h.size(-1)
    reset, update = torch.sigmoid(gates[:, :2 * size] + hidden[:, :2 * size]).chunk(2, -1)
    new = torch.tanh(gates[:, 2 * size:] + reset * hidden[:, 2 * size:])
    return new + update * (h - new)


@pytest.mark.parametrize("rows,size", [(1, 1), (5, 512), (37, 33)])
def test_gru_update_equals_the_cell_equations(built, rows, size):
    gen = torch.Generator().manual_seed(rows)
    gates, hidden = (torch.randn(rows, 3 * size, generator=gen) * 4 for _ in range(2))
    h = torch.randn(rows, size, generator=gen).tanh()
    gates[0, :3] = torch.tensor([60.0, -60.0, 1e-6])  # saturated gates, a tiny candidate
    got = native.gru_update(gates, hidden, h)
    torch.testing.assert_close(got, torch_gru_update(gates, hidden, h), rtol=0, atol=3e-7)


def test_gru_update_reads_rows_apart_and_refuses_what_it_cannot_take(built):
    gen = torch.Generator().manual_seed(1)
    steps = torch.randn(6, 3, 3 * 16, generator=gen)  # (B, T, G): a step's gates are rows apart
    hidden, state = torch.randn(6, 3 * 16, generator=gen), torch.randn(6, 2, 16, generator=gen)
    gates, h = steps[:, 1], state[:, 0]
    assert not gates.is_contiguous() and not h.is_contiguous()
    torch.testing.assert_close(native.gru_update(gates, hidden, h),
                               torch_gru_update(gates, hidden, h), rtol=0, atol=3e-7)
    for bad in ((gates.double(), hidden.double(), h.double()), (gates, hidden[:, :47], h),
                (gates, hidden, h[:, :15]), (gates.t(), hidden, h),
                (gates, hidden, h.clone().requires_grad_())):
        assert native.gru_update(*bad) is None


def test_a_gru_step_in_inference_takes_the_c_kernel(built, monkeypatch):
    from seq2seq.models import cells

    gen = torch.Generator().manual_seed(2)
    gates, hidden = torch.randn(4, 24, generator=gen), torch.randn(4, 24, generator=gen)
    h = torch.randn(4, 8, generator=gen)
    calls = []
    kernel = native.gru_update
    monkeypatch.setattr(native, "gru_update", lambda *args: calls.append(1) or kernel(*args))
    with torch.no_grad():
        fused, _ = cells.cell_update("gru", gates, hidden, h, None)
    assert calls == [1]
    monkeypatch.setattr(native, "library", lambda: None)
    with torch.no_grad():
        plain, _ = cells.cell_update("gru", gates, hidden, h, None)
    torch.testing.assert_close(fused, plain, rtol=0, atol=3e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_softmax_over_what_is_not_blocked(built, dtype):
    x = logits(40, 703, dtype, seed=3)
    gen = torch.Generator().manual_seed(4)
    blocked = torch.rand(40, 703, generator=gen) < 0.7
    blocked[0] = True
    blocked[0, 5] = False  # one target left: log-probability 0
    blocked[1] = False
    x[2, ~blocked[2]] = float("-inf")  # a row of banned targets only: NaN, as in torch
    want = torch.log_softmax(x.float().masked_fill(blocked, float("-inf")), dim=-1)
    got = native.log_softmax(x, blocked)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got[2]).all()
    assert got[0, 5] == 0.0
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=2e-6)
    # rows apart, and what the kernels do not take: the same through torch
    wide = logits(9, 300, torch.float32)
    x, mask = wide[::2, 17:217], torch.rand(5, 200, generator=gen) < 0.5
    want = torch.log_softmax(x.masked_fill(mask, float("-inf")), dim=-1)
    for args in ((x, mask), (x.double(), mask), (x, mask.t().contiguous().t())):
        got = native.log_softmax(*args)
        assert got.dtype == torch.float32 and torch.equal(torch.isinf(got), mask)
        torch.testing.assert_close(got[~mask], want[~mask], rtol=1e-5, atol=2e-6)
    for bad in (mask[:, :199], mask.float()):
        with pytest.raises(ValueError, match="blocked"):
            native.log_softmax(x, bad)


def test_tanh_within_its_tolerance_odd_and_saturated(built):
    x = torch.cat([torch.linspace(-12, 12, 200_001), torch.tensor(
        [0.0, -0.0, 1e-30, -1e-8, 44.0, 89.0, 1e30, float("inf"), float("-inf")])])
    got = native.tanh(x)
    torch.testing.assert_close(got, torch.tanh(x.double()).float(), rtol=0, atol=1.6e-7)
    assert torch.equal(native.tanh(-x), -got)  # odd, signed zeros included
    assert torch.equal(torch.signbit(got[200_001:200_003]), torch.tensor([False, True]))
    assert got[-4:-1].eq(1.0).all() and got[-1] == -1.0
    assert torch.isnan(native.tanh(torch.tensor([float("nan")]))).all()
    # a view's values are its own, whatever its layout, in the tensor's shape
    grid = torch.randn(6, 8, 3)
    assert torch.equal(native.tanh(grid.transpose(0, 1).contiguous()),
                       native.tanh(grid).transpose(0, 1))
    assert native.tanh(torch.zeros(0, 4)).shape == (0, 4)
    for bad in (grid.double(), grid.transpose(0, 1), grid.clone().requires_grad_()):
        assert native.tanh(bad) is None


def test_decoding_tanh_takes_the_c_kernel(built, monkeypatch):
    from seq2seq.models import cells

    x = torch.randn(5, 7)
    calls = []
    kernel = native.tanh
    monkeypatch.setattr(native, "tanh", lambda t: calls.append(1) or kernel(t))
    fused = cells.tanh(x.t())  # a transposed view: made contiguous for the kernel
    assert calls == [1] and fused.shape == (7, 5)
    monkeypatch.setattr(native, "library", lambda: None)
    torch.testing.assert_close(fused, cells.tanh(x.t()), rtol=0, atol=1.6e-7)
    torch.testing.assert_close(fused, torch.tanh(x.t()), rtol=0, atol=1.6e-7)


def test_the_kernels_reuse_one_scratch_buffer_per_thread(built):
    """A decoder step's scratch is kept for the next step, not allocated and freed at each one:
    between the small tensors a decoder keeps per step, the freed ones left glibc's heap in
    holes, and one long sentence's memory grew with its length times its steps."""
    gen = torch.Generator().manual_seed(0)
    query, keys = torch.randn(1, 1, 16, generator=gen), torch.randn(1, 900, 16, generator=gen)
    v = torch.randn(1, 16, generator=gen)
    first = native.additive_scores(query, keys, v)
    buffer = native.scratch(0)
    assert buffer.numel() >= torch.get_num_threads() * 902 * 16
    for _ in range(3):  # later steps, and a shorter source, write into the same buffer
        assert torch.equal(native.additive_scores(query, keys, v), first)
        native.additive_scores(query, keys[:, :500], v)
        assert native.scratch(0).data_ptr() == buffer.data_ptr()
    grown = native.scratch(buffer.numel() + 1)  # a larger one grows by a quarter at least
    assert grown.numel() >= buffer.numel() * 5 // 4
    assert native.scratch(grown.numel()).data_ptr() == grown.data_ptr()
    other = []  # another thread (a server's) has its own
    thread = threading.Thread(target=lambda: other.append(native.scratch(1).data_ptr()))
    thread.start()
    thread.join()
    assert other and other[0] != grown.data_ptr()
