"""Every option has a range, checked before any work, with the same words wherever it is given:
in a recipe, on the ``translate`` / ``evaluate`` command line, or through the Python API."""

import dataclasses
import math
import typing

import pytest
import torch

from seq2seq.config import (
    DECODE_RANGES,
    SECTIONS,
    Corpus,
    Recipe,
    RecipeError,
    load_recipe,
    recipe_from_dict,
)
from seq2seq.config.ranges import SEED_MAX
from seq2seq.errors import Seq2SeqError
from seq2seq.translate import SettingError, Translator, resolve_device
from tests.robustness.conftest import error_lines, seq2seq, snapshot

SECTION_CLASSES = [(f"{name}.", type(getattr(Recipe(), name))) for name in SECTIONS]
RANGED = [(prefix + f.name, f.metadata["range"]) for prefix, cls in
          [("", Recipe), ("data.train.", Corpus), *SECTION_CLASSES]
          for f in dataclasses.fields(cls) if f.metadata.get("range") is not None]


def problems_of(overrides):
    try:
        recipe_from_dict({}, overrides)
    except RecipeError as error:
        return error.problems
    return []


def test_every_numeric_field_has_a_range():
    for prefix, cls in [("", Recipe), ("data.train.", Corpus), *SECTION_CLASSES]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if tp in (int, float) or {int, float} & set(typing.get_args(tp)):
                assert f.metadata.get("range") is not None, f"{prefix}{f.name} has no range"


@pytest.mark.parametrize("key, bounds", RANGED, ids=[key for key, _ in RANGED])
def test_just_outside_a_range_is_named_and_the_bounds_inside_are_not(key, bounds):
    step = 1 if bounds.integer else max(abs(bounds.hi), 1) * 1e-3
    outside = [bounds.hi + step, bounds.lo - step]
    for value in outside:
        problems = problems_of([_override(key, value)])
        assert any(p.startswith(f"recipe: {_named(key)}: must be in {bounds}")
                   for p in problems), (value, problems)
    for value, is_open in ((bounds.lo, bounds.lo_open), (bounds.hi, bounds.hi_open)):
        problems = problems_of([_override(key, value)])
        named = [p for p in problems if p.startswith(f"recipe: {_named(key)}: must be in")]
        assert bool(named) == is_open, (value, problems)


def _override(key, value):
    return f"{key}=[{value!r}, 0.5]" if key == "train.betas" else f"{key}={value!r}"


def _named(key):
    return key + "[0]" if key == "train.betas" else key


def test_seeds_are_32_bit():
    assert problems_of([f"seed={SEED_MAX}", f"data.train.seed={SEED_MAX}"]) == []
    problems = problems_of([f"seed={SEED_MAX + 1}", "data.valid.seed=-1"])
    assert problems == [
        "recipe: data.valid.seed: must be in [0, 4_294_967_295], got -1 (from the override "
        "data.valid.seed=-1)",
        "recipe: seed: must be in [0, 4_294_967_295], got 4_294_967_296 (from the override "
        "seed=4294967296)"]


@pytest.mark.parametrize("override", ["decode.alpha=.inf", "train.lr=.nan", "decode.alpha=1e400",
                                      "model.dropout=-.inf"])
def test_a_float_in_a_recipe_is_finite(override):
    (problem,) = problems_of([override])
    assert problem.startswith(f"recipe: {override.split('=')[0]}: expected a number")


def test_cross_field_rules_that_would_silently_change_a_meaning():
    assert problems_of(["train.min_lr=0.01", "train.lr=0.001"]) == [
        "recipe: train.min_lr: must not exceed train.lr (0.001), got 0.01 (from the override "
        "train.min_lr=0.01)"]
    # A ratio filter below 1 would drop every pair.
    assert problems_of(["data.max_length_ratio=0.5"]) == [
        "recipe: data.max_length_ratio: must be 0 (no ratio filter) or at least 1, got 0.5 "
        "(from the override data.max_length_ratio=0.5)"]
    assert problems_of(["distributed.rdzv_endpoint=host:70000"]) == [
        "recipe: distributed.rdzv_endpoint: expected host:port (port 1 to 65535), "
        "got 'host:70000' (from the override distributed.rdzv_endpoint=host:70000)"]


def test_sections_built_from_python_are_checked_for_types_too():
    from seq2seq.config import DecodeConfig

    with pytest.raises(RecipeError) as info:
        DecodeConfig(beam_size="5", alpha=math.nan)
    assert info.value.problems == [
        "decode.beam_size: expected an integer in [1, 1000], got '5'",
        "decode.alpha: expected a finite number in [0, 10], got nan"]


# ---- translate and evaluate: the same flags, the same ranges, the same words -----------------

BAD_FLAGS = [
    (["--beam", "0"], "argument --beam: must be in [1, 1000], got 0"),
    (["--beam", "1001"], "argument --beam: must be in [1, 1000], got 1001"),
    (["--beam", "2.5"], "argument --beam: expected an integer in [1, 1000], got '2.5'"),
    (["--alpha", "nan"], "argument --alpha: expected a finite number in [0, 10], got nan"),
    (["--alpha", "inf"], "argument --alpha: expected a finite number in [0, 10], got inf"),
    (["--alpha", "-1"], "argument --alpha: must be in [0, 10], got -1.0"),
    (["--max-len-ratio", "0"], "argument --max-len-ratio: must be in (0, 10], got 0.0"),
    (["--max-len-ratio", "1e9"], "argument --max-len-ratio: must be in (0, 10], got 1000000000.0"),
    (["--batch-tokens", "0"], "argument --batch-tokens: must be in [1, 1_000_000], got 0"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_translate_and_evaluate_refuse_a_flag_with_the_same_message(flags, message, tmp_path):
    (tmp_path / "in.txt").write_text("the dog\n")
    before = snapshot(tmp_path)
    lines = {}
    for command in (["translate", "--checkpoint", "x.pt", "--input", "in.txt"],
                    ["evaluate", "--checkpoint", "x.pt", "--src", "in.txt", "--ref", "in.txt"]):
        result = seq2seq(*command, *flags, cwd=tmp_path)
        assert result.returncode == 2
        (line,) = result.stderr.decode().splitlines()
        prog = f"error: seq2seq {command[0]}: "
        assert line.startswith(prog) and line.endswith(f" (see seq2seq {command[0]} --help)")
        lines[command[0]] = line.removeprefix(prog).split(" (see ")[0]
    assert lines["translate"] == lines["evaluate"] == message
    assert snapshot(tmp_path) == before


def test_decode_ranges_are_the_recipes():
    assert set(DECODE_RANGES) >= {"beam_size", "n_best", "alpha", "max_len_ratio",
                                  "batch_tokens"}


def test_nbest_above_the_beam_is_an_error_not_a_larger_beam(trained, tmp_path):
    ckpt = str(trained)
    # The tiny recipe's beam is 2: --nbest 3 alone, or with --beam 2, asks for more than it has.
    for flags, source in ((["--nbest", "3"], "(2, the recipe's decode.beam_size)"),
                          (["--nbest", "3", "--beam", "2"], "(--beam 2)")):
        result = seq2seq("translate", "--checkpoint", ckpt, *flags, cwd=tmp_path,
                         stdin=b"the dog\n")
        assert result.returncode == 2, result.stderr
        assert error_lines(result.stderr) == [
            f"error: --nbest 3 is larger than the beam size {source}; give --beam 3 or more"]
        assert result.stdout == b""
    ok = seq2seq("translate", "--checkpoint", ckpt, "--nbest", "3", "--beam", "3", cwd=tmp_path,
                 stdin=b"the dog\n")
    assert ok.returncode == 0 and len(ok.stdout.decode().splitlines()) == 3


def test_evaluate_beam_zero_is_refused_not_run_greedy(trained, tmp_path):
    (tmp_path / "in.txt").write_text("the dog\n")
    result = seq2seq("evaluate", "--checkpoint", trained, "--src", "in.txt", "--ref", "in.txt",
                     "--beam", "0", "--report-dir", "rep", cwd=tmp_path)
    assert result.returncode == 2
    assert "--beam: must be in [1, 1000], got 0" in result.stderr.decode()
    assert not (tmp_path / "rep").exists()


# ---- devices ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, message", [
    ("garbage", "--device garbage: not a device name (auto, cpu, cuda or cuda:N)"),
    ("cpu:x", "--device cpu:x: not a device name (auto, cpu, cuda or cuda:N)"),
    ("cuda:-1", "--device cuda:-1: not a device name (auto, cpu, cuda or cuda:N)"),
    ("CUDA", "--device CUDA: not a device name (auto, cpu, cuda or cuda:N)"),
    ("cpu:1", "--device cpu:1: the CPU is one device (cpu or cpu:0)"),
    ("", "--device : not a device name (auto, cpu, cuda or cuda:N)"),
])
def test_device_names_are_checked(name, message):
    with pytest.raises(SettingError) as info:
        resolve_device(name)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


def test_a_gpu_this_machine_lacks_is_refused():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    name = f"cuda:{count}"
    with pytest.raises(SettingError, match=f"--device {name}: "):
        resolve_device(name)
    assert resolve_device("cpu:0") == resolve_device("cpu") == torch.device("cpu")


def test_translate_refuses_a_missing_gpu_in_one_line(trained, tmp_path):
    result = seq2seq("translate", "--checkpoint", trained, "--device", "cuda:7", cwd=tmp_path,
                     stdin=b"the dog\n")
    if torch.cuda.device_count() > 7:  # a machine with 8 GPUs has cuda:7
        assert result.returncode == 0
        return
    assert result.returncode == 2
    (line,) = result.stderr.decode().splitlines()
    assert line.startswith("error: --device cuda:7: ")


# ---- the Python API ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def translator(trained):
    return Translator.from_checkpoint(trained, device="cpu")


def test_from_checkpoint_names_its_own_arguments_and_takes_a_torch_device(trained):
    """The Python API's errors said `--device cuda`, `--quantize and --precision bf16` (the
    command line's flags), and torch.device("cpu") was "not a device name"."""
    assert Translator.from_checkpoint(trained, device=torch.device("cpu")).device.type == "cpu"
    with pytest.raises(SettingError, match="^device cpu:1: the CPU is one device"):
        Translator.from_checkpoint(trained, device="cpu:1")
    with pytest.raises(Seq2SeqError, match="^quantize=True and precision=bf16 exclude each "
                                           "other"):
        Translator.from_checkpoint([trained, "not/loaded.pt"], quantize=True, precision="bf16")


@pytest.mark.parametrize("sentences, message", [
    ("the dog", "not one string"),
    ({"the dog": 1}, "sentences must be a list of strings, got dict"),
    ({"the dog"}, "sentences must be a list of strings, got set"),
    (None, "sentences must be a list of strings, got NoneType"),
    (b"the dog", "sentences must be a list of strings, got bytes"),
    (5, "sentences must be a list of strings, got int"),
    (["the dog", 5], r"sentences\[1\] must be a string, got int"),
    ([None], r"sentences\[0\] must be a string, got NoneType"),
])
def test_translate_refuses_what_is_not_a_list_of_strings(translator, sentences, message):
    with pytest.raises(TypeError, match=message):
        translator.translate(sentences)
    with pytest.raises(TypeError, match=message):
        translator.translate_full(sentences, translator.decode_settings())


def test_translate_takes_any_sequence_of_strings_alike(translator):
    expected = translator.translate(["the dog", "a house"])
    assert translator.translate(("the dog", "a house")) == expected
    assert translator.translate(s for s in ["the dog", "a house"]) == expected
    assert translator.translate([]) == []


@pytest.mark.parametrize("kwargs, error, message", [
    ({"beam": "5"}, TypeError, "beam: expected an integer in [1, 1000], got '5'"),
    ({"beam": 2.0}, TypeError, "beam: expected an integer in [1, 1000], got 2.0"),
    ({"beam": True}, TypeError, "beam: expected an integer in [1, 1000], got True"),
    ({"beam": 0}, ValueError, "beam: must be in [1, 1000], got 0"),
    ({"nbest": 0}, ValueError, "nbest: must be in [1, 1000], got 0"),
    ({"nbest": 3}, ValueError, "nbest 3 is larger than the beam size (2, the recipe's "
     "decode.beam_size); give beam 3 or more"),
    ({"beam": 2, "nbest": 3}, ValueError, "nbest 3 is larger than the beam size (beam 2); "
     "give beam 3 or more"),
    ({"alpha": math.nan}, ValueError, "alpha: expected a finite number in [0, 10], got nan"),
    ({"alpha": "0.6"}, TypeError, "alpha: expected a finite number in [0, 10], got '0.6'"),
    ({"alpha": -0.5}, ValueError, "alpha: must be in [0, 10], got -0.5"),
    ({"max_len_ratio": math.inf}, ValueError,
     "max_len_ratio: expected a finite number in (0, 10], got inf"),
    ({"batch_tokens": 10**7}, ValueError,
     "batch_tokens: must be in [1, 1_000_000], got 10_000_000"),
])
def test_translate_refuses_settings_of_the_wrong_type_or_range(translator, kwargs, error,
                                                               message):
    with pytest.raises(error) as info:
        translator.translate(["the dog"], **kwargs)
    assert str(info.value) == message


def test_valid_settings_translate_as_before(translator):
    one = translator.translate(["the dog"], beam=2, alpha=0)
    assert isinstance(one, list) and isinstance(one[0], str)
    nbest = translator.translate(["the dog"], beam=2, nbest=2, alpha=1)
    assert len(nbest) == 1 and len(nbest[0]) == 2 and all(isinstance(h, str) for h in nbest[0])


def test_check_accepts_every_recipe_value_at_its_upper_bound_that_fits(tmp_path):
    # Sizes at their bound would not fit in memory: they are the memory check's business.
    recipe = load_recipe(_write(tmp_path, "decode: {beam_size: 1000, n_best: 1000, "
                                "max_len_ratio: 10, max_len_add: 1000, min_len: 1000}\n"))
    assert recipe.decode.beam_size == 1000


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


# ---- sizes against this machine's memory ------------------------------------------------------

@pytest.mark.parametrize("model", [
    {"cell": "gru"},
    {"cell": "lstm", "decoder": "luong", "input_feeding": False, "attention": "general"},
    {"cell": "rnn", "bidirectional": False, "init": "zeros", "enc_hidden": 16},
    {"cell": "lstm", "tie_embeddings": "decoder", "emb_size": 16, "dec_layers": 3},
    {"tie_embeddings": "all", "emb_size": 16, "attention": "dot"},
])
def test_the_parameter_estimate_is_the_models_count(model):
    from seq2seq.config import ModelConfig
    from seq2seq.config.memory import parameter_groups
    from seq2seq.models.seq2seq import build_model

    cfg = ModelConfig(**{"emb_size": 8, "enc_hidden": 8, "dec_hidden": 16, "enc_layers": 2,
                         "dec_layers": 2, "attention_size": 5, **model})
    assert sum(parameter_groups(cfg, 37).values()) == build_model(cfg, 37, 37).num_parameters


def test_memory_problems_name_the_key_and_the_figures():
    from seq2seq.config.memory import GIB, memory_problems

    model = recipe_from_dict({}, ["model.dec_hidden=4096", "train.device=cpu"])
    (problem,) = memory_problems(model, ram=2 * GIB)
    assert problem.startswith("model.dec_hidden: the model would need ~")
    assert problem.endswith("GiB for weights, gradients and Adam state, this machine has 2.0 GiB")
    batch = recipe_from_dict({}, ["train.batch_tokens=200000", "train.device=cpu"])
    (problem,) = memory_problems(batch, ram=8 * GIB)
    assert problem.startswith("train.batch_tokens: a batch of 200000 target tokens (sources up "
                              "to data.max_src_tokens 100, vocabulary 8000) would need ~")
    assert memory_problems(batch, ram=10**6 * GIB) == []
    # R-Drop keeps two passes' activations: twice what the same batch needs without it.
    from seq2seq.config.memory import activation_bytes
    rdrop = recipe_from_dict({}, ["train.batch_tokens=200000", "train.rdrop_alpha=1"])
    assert activation_bytes(rdrop) == 2 * activation_bytes(batch)
    # On a GPU the activations are the GPU's business; the weights are still built on the host.
    on_gpu = recipe_from_dict({}, ["train.batch_tokens=200000", "train.device=cuda"])
    assert memory_problems(on_gpu, ram=8 * GIB) == []
    # Processes of one node on the CPU each hold the model.
    two = recipe_from_dict({}, ["model.dec_hidden=2048", "train.device=cpu",
                                "distributed.nproc_per_node=64"])
    assert "(64 processes)" in memory_problems(two, ram=24 * GIB)[0]


@pytest.mark.parametrize("command", ["check", "prepare", "train"])
def test_a_model_too_large_for_this_machine_is_refused_before_any_work(command, tmp_path):
    from tests.robustness.conftest import tiny_tree, write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", tiny_tree("run"))
    before = snapshot(tmp_path)
    result = seq2seq(command, recipe, "model.dec_hidden=65536", "model.attention_size=65536",
                     cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.decode().splitlines()
    assert line.startswith(f"error: {recipe}: model.dec_hidden: the model would need ~")
    assert "GiB for weights, gradients and Adam state, this machine has" in line
    assert snapshot(tmp_path) == before
