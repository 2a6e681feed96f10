"""Recipes: every shipped recipe loads; every mistake is named by its dotted path."""

import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seq2seq.config import (
    SECTIONS,
    Recipe,
    RecipeError,
    load_recipe,
    recipe_from_dict,
    recipe_reference,
    recipe_to_yaml,
)
from tests.conftest import RECIPES, REPO


def problems_of(tree, overrides=()):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(tree, list(overrides))
    return info.value.problems


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_loads_and_round_trips(path):
    recipe = load_recipe(path)
    assert recipe.name
    again = recipe_from_dict(yaml.safe_load(recipe_to_yaml(recipe)))
    assert again == recipe


def test_recipes_exist():
    names = {p.relative_to(REPO).as_posix() for p in RECIPES}
    assert {"recipes/quickstart.yaml", "recipes/multi30k/de-en.gru.yaml",
            "recipes/multi30k/en-de.lstm.yaml"} <= names


@pytest.mark.parametrize("name", ["de-en.gru", "de-en.best"])
def test_multi30k_gru_recipe_stays_within_15m_parameters(name):
    """The Multi30k GRU recipes' budget: at most 15M parameters at their joint vocabulary size."""
    from seq2seq.models.seq2seq import build_model

    recipe = load_recipe(REPO / f"recipes/multi30k/{name}.yaml")
    vocab = recipe.tokenizer.vocab_size
    assert recipe.tokenizer.joint
    assert 10_000_000 < build_model(recipe.model, vocab, vocab).num_parameters <= 15_000_000


def test_defaults_build():
    assert recipe_from_dict({}) == Recipe()


def test_misspelt_key_names_itself_and_the_closest_key():
    (problem,) = problems_of({}, ["train.lrr=1"])
    assert "train.lrr" in problem and "did you mean train.lr?" in problem


def test_a_dotted_key_in_yaml_is_shown_how_to_nest():
    assert problems_of({"train.lr": 2}) == [
        "recipe: train.lr: unknown key; a dotted key is for the command line (train.lr=VALUE); "
        "in YAML, nest it: train: {lr: VALUE}"]


def test_misspelt_section_and_nested_corpus_key():
    problems = problems_of({"trian": {}, "data": {"train": {"scr": "a.txt"}}})
    assert any("trian: unknown key; did you mean train?" in p for p in problems)
    assert any("data.train.scr: unknown key; did you mean data.train.src?" in p for p in problems)


def test_every_problem_reported_at_once():
    problems = problems_of({"train": {"lr": "fast", "accumulate": 0},
                            "model": {"cell": "transformer"}, "decode": {"beam_size": 1.5}})
    text = "\n".join(problems)
    assert len(problems) == 4, text
    assert "train.lr: expected a number, got 'fast'" in text
    assert "train.accumulate: must be in [1, 10000], got 0" in text
    assert "model.cell: expected one of 'gru', 'lstm', 'rnn', got 'transformer'" in text
    assert "decode.beam_size: expected an integer, got 1.5" in text


def test_overrides_are_typed_and_applied():
    recipe = recipe_from_dict({}, ["train.lr=3e-4", "model.cell=lstm", "output_dir=runs/a",
                                   "data.test.t1.src=x.de", "train.betas=[0.8, 0.9]"])
    assert recipe.train.lr == pytest.approx(3e-4)
    assert recipe.model.cell == "lstm"
    assert recipe.output_dir == "runs/a"
    assert recipe.data.test["t1"].src == "x.de"
    assert recipe.train.betas == (0.8, 0.9)


def test_bool_is_not_an_integer_and_string_is_not_a_bool():
    problems = problems_of({"train": {"max_steps": True}, "model": {"bidirectional": "yes"}})
    assert any("train.max_steps: expected an integer, got True" in p for p in problems)
    assert any("model.bidirectional: expected true or false" in p for p in problems)


@pytest.mark.parametrize("tree, needle", [
    ({"decode": {"beam_size": 2, "n_best": 3}}, "decode.n_best"),
    ({"model": {"tie_embeddings": "decoder", "emb_size": 8, "dec_hidden": 16}},
     "model.tie_embeddings"),
    ({"model": {"tie_embeddings": "all", "emb_size": 16, "dec_hidden": 16},
      "tokenizer": {"joint": False}}, "joint vocabulary"),
    ({"model": {"attention": "dot", "enc_hidden": 8, "dec_hidden": 8}}, "model.attention"),
    ({"train": {"max_steps": 0, "max_epochs": 0}}, "train.max_steps"),
    ({"distributed": {"nnodes": 2, "node_rank": 2}}, "distributed.node_rank"),
    ({"distributed": {"rdzv_endpoint": "nohost"}}, "distributed.rdzv_endpoint"),
    ({"train": {"rdrop_alpha": 1.0}, "model": {"dropout": 0.0, "word_dropout": 0.0}},
     "train.rdrop_alpha: R-Drop compares two passes"),
])
def test_impossible_combinations(tree, needle):
    assert any(needle in p for p in problems_of(tree))


@pytest.mark.parametrize("languages, needle", [
    ({"src_lang": "en", "trg_lang": "EN"}, "data.trg_lang: must differ from data.src_lang"),
    ({"src_lang": "", "trg_lang": "de"}, "data.src_lang: must be a language code"),
    ({"src_lang": "en", "trg_lang": "x y"}, "data.trg_lang: must be a language code"),
])
def test_language_codes_are_codes_and_differ_ignoring_case(languages, needle):
    """``EN`` passed as another language than ``en``; ``''`` and ``x y`` were codes."""
    assert any(needle in p for p in problems_of({"data": languages})), problems_of(
        {"data": languages})
    assert recipe_from_dict({"data": {"src_lang": "pt-BR", "trg_lang": "zh_Hant"}})
    assert recipe_from_dict({"data": {"src_lang": "en.tok", "trg_lang": "de.tok"}})  # (older)


def test_check_names_a_bleu_tokenizer_sacrebleu_cannot_run():
    """eval.tokenize=ja-mecab without sacreBLEU's Japanese extra failed at the first
    validation, after hundreds of updates (and evaluate after decoding every test set)."""
    try:
        import MeCab  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("this test needs a machine without sacrebleu[ja] (as CI)")
    result = run_cli("check", "recipes/quickstart.yaml", "data.trg_lang=ja")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert ("error: recipes/quickstart.yaml: eval.tokenize=auto (ja-mecab for data.trg_lang "
            "ja): sacreBLEU cannot tokenize: ") in result.stderr, result.stderr


@pytest.mark.parametrize("model", [{"dropout": 0.1}, {"dropout": 0.0, "word_dropout": 0.1}])
def test_rdrop_needs_some_dropout_and_either_kind_will_do(model):
    recipe = recipe_from_dict({"train": {"rdrop_alpha": 1.0}, "model": model})
    assert recipe.train.rdrop_alpha == 1.0


def test_beam_size_zero_is_named_alone_and_an_empty_output_dir_is_refused():
    assert problems_of({"decode": {"beam_size": 0}}) == [
        "recipe: decode.beam_size: must be in [1, 1000], got 0"]
    assert problems_of({}, ["output_dir="]) == [
        "recipe: output_dir: must not be empty (from the override output_dir=)"]


def test_home_and_variables_are_expanded_in_the_output_directories(monkeypatch):
    """As they are in input paths: never a literal "./~" directory beside the real one."""
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.setenv("RUNS", "/data/runs")
    recipe = recipe_from_dict({"output_dir": "~/runs/x", "eval": {"report_dir": "$RUNS/rep"}})
    assert recipe.output_dir == "/home/someone/runs/x"
    assert recipe.eval.report_dir == "/data/runs/rep"
    assert recipe_from_dict({}, ["output_dir=~/y"]).output_dir == "/home/someone/y"
    assert recipe_from_dict({"output_dir": "runs/z"}).eval.report_dir is None


def test_bad_override_syntax():
    assert any("key.path=value" in p for p in problems_of({}, ["train.lr"]))


def test_cross_field_rules_of_valid_fields_run_beside_range_problems():
    """A range problem in a section hid its cross-field problems until the next run."""
    found = problems_of({}, ["decode.n_best=6", "decode.alpha=11", "train.min_lr=0.5",
                             "train.log_every=0"])
    assert sorted(p.split(":")[1].strip() for p in found) == [
        "decode.alpha", "decode.n_best", "train.log_every", "train.min_lr"]
    # A rule over a field out of range does not run: it would compare a value already refused.
    assert [p.split(":")[1].strip() for p in problems_of({}, ["train.lr=-1",
                                                             "train.min_lr=0.5"])] == ["train.lr"]


def test_a_generated_validation_or_test_split_has_a_bounded_size(tmp_path):
    """One drawn sentence in 40 is a validation one: 10,000,000 took hours to generate. The
    bound is the preflight's (check, prepare), not the schema's: a checkpoint's recipe that
    holds more still loads."""
    from seq2seq.data.preflight import input_problems

    tree = {"output_dir": str(tmp_path / "run"), "data": {
        "train": {"format": "generated", "split": "valid", "size": 100_001},
        "valid": {"format": "generated", "split": "valid", "size": 200_000},
        "test": {"t": {"format": "generated", "split": "train", "size": 200_000}}}}
    recipe = recipe_from_dict(tree)  # (loads: the schema leaves it alone)
    assert [p for p in input_problems(recipe) if "at most" in p] == [
        "data.train.size: at most 100,000 pairs of a generated valid split, got 100,001",
        "data.valid.size: at most 100,000 pairs of a generated valid split, got 200,000"]


def test_a_report_dir_that_cannot_be_one_is_found_by_the_preflight(tmp_path):
    """`check` passed eval.report_dir naming a file; evaluate refused it after training."""
    from seq2seq.data.preflight import input_problems

    (tmp_path / "notes.txt").write_text("x\n")
    tree = {"output_dir": str(tmp_path / "run"),
            "eval": {"report_dir": str(tmp_path / "notes.txt")},
            "data": {"train": {"format": "generated", "size": 100},
                     "valid": {"format": "generated", "split": "valid", "size": 10}}}
    assert f"eval.report_dir {tmp_path / 'notes.txt'}: {tmp_path / 'notes.txt'} exists and is " \
        "not a directory" in input_problems(recipe_from_dict(tree))


def test_the_data_root_variable_expands_home_and_variables_as_data_root_does(monkeypatch):
    from seq2seq.config.loading import data_root

    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.setenv("CORPORA", "/srv/corpora")
    for value, root in [("~/data", "/home/someone/data"), ("$CORPORA/nmt", "/srv/corpora/nmt")]:
        monkeypatch.setenv("SEQ2SEQ_DATA", value)
        assert str(data_root(recipe_from_dict({}).data)) == root
        monkeypatch.delenv("SEQ2SEQ_DATA")
        assert str(data_root(recipe_from_dict({"data": {"root": value}}).data)) == root


def test_an_override_given_twice_is_said(capsys):
    """The last one held in silence. Scripts layer overrides (a base list, then the user's),
    so it is said, not refused."""
    assert recipe_from_dict({}, ["train.lr=3e-4", "train.lr=1"]).train.lr == 1
    assert capsys.readouterr().err == ("warning: train.lr is overridden twice (train.lr=3e-4, "
                                       "then train.lr=1); the last one holds\n")
    assert recipe_from_dict({}, ["train.lr=3e-4", "train.max_steps=5"]).train.lr == 3e-4
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("special", ["big", "deep"])
def test_a_recipe_file_that_is_too_big_or_too_deep_is_one_line(tmp_path, special):
    """1,000 '[' were a RecursionError traceback from the YAML parser."""
    path = tmp_path / "r.yaml"
    path.write_text("#" * 2**20 + "\n" if special == "big" else "[" * 1000 + "\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert error.value.problems == [f"{path}: larger than 1 MiB, which no recipe is"
                                    if special == "big"
                                    else f"{path}: invalid YAML (nested deeper than 50 levels)"]
    assert problems_of({}, ["train.lr=" + "[" * 1000])  # an override's value likewise


def test_an_endless_recipe_file_is_one_line():
    """/dev/zero was read until memory ran out: a MemoryError traceback (memory capped here)."""
    import resource

    def capped():
        resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))

    result = subprocess.run([sys.executable, "-m", "seq2seq", "check", "/dev/zero"],
                            capture_output=True, text=True, cwd=REPO, timeout=120,
                            preexec_fn=capped)
    assert (result.returncode, result.stderr) == (
        2, "error: /dev/zero: larger than 1 MiB, which no recipe is\n")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: line \d+ invalid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="is a directory"):
        load_recipe(tmp_path)


def test_reference_documents_every_field():
    reference = recipe_reference()
    for section in SECTIONS:
        for name in Recipe.__dataclass_fields__[section].default.__dataclass_fields__:
            assert f"`{section}.{name}`" in reference


def test_readme_recipe_reference_is_current():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert recipe_reference() in readme, "README recipe reference is stale: " \
        "run `python scripts/update_readme.py`"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "seq2seq", *args], capture_output=True,
                          text=True, cwd=REPO)


def test_check_warns_of_values_the_run_would_not_do_as_written(tmp_path):
    result = run_cli("check", "recipes/quickstart.yaml", "train.max_steps=100",
                     "train.warmup_steps=200", "decode.min_len=30",
                     f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["decode"]["min_len"] == 30
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        "warning: recipes/quickstart.yaml: train.warmup_steps: 200 is not below "
        "train.max_steps (100): the whole run is warm-up, in which the learning rate climbs "
        "to no more than 0.0015 (train.lr 0.003 x 100/200)",
        "warning: recipes/quickstart.yaml: decode.min_len: 30 is above the maximum output "
        "length of sources of up to 12 subword tokens (13 for one: decode.max_len_ratio 1.5 x "
        "(source tokens + 1 for EOS) + decode.max_len_add 10, rounded down): their outputs are "
        "cut at that maximum, without EOS, shorter than min_len"]


def test_cli_check_prints_resolved_recipe(tmp_path):
    # (output_dir of its own: check now reads the run directory, and runs/quickstart may hold
    # a run trained at another lr)
    result = run_cli("check", "recipes/quickstart.yaml", "train.lr=0.5",
                     f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["train"]["lr"] == 0.5


def test_cli_check_error_is_one_line_per_problem_exit_2_no_traceback():
    result = run_cli("check", "recipes/quickstart.yaml", "train.lrr=1", "model.cell=x")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert "train.lrr" in result.stderr and "train.lr?" in result.stderr
    assert result.stdout == ""


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8)
known_keys = st.sampled_from(
    ["name", "seed", "train.lr", "train.betas", "model.cell", "data.train.src", "data.test.x",
     "decode.n_best", "distributed.rdzv_endpoint", "tokenizer", "eval.tokenize", "zzz.y"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=yaml_values | st.dictionaries(st.sampled_from(["train", "model", "data", "x"]),
                                          yaml_values, max_size=4),
       overrides=st.lists(st.tuples(known_keys | st.text(max_size=6), st.text(max_size=8)),
                          max_size=3))
def test_loader_raises_only_recipe_errors(tree, overrides):
    texts = [f"{k}={v}" for k, v in overrides]
    try:
        recipe_from_dict(tree, texts)
    except RecipeError as error:
        assert error.problems and all(p.strip() for p in error.problems)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80))
def test_loader_on_random_yaml_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("r") / "r.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_recipe(path)
    except RecipeError:
        pass


# ---- the YAML itself: a key given twice, an alias inside itself, an alias bomb --------------

def test_a_duplicate_key_names_both_lines(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: a\ntrain:\n  lr: 0.1\n  max_steps: 3\n  lr: 0.2\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.problems == [
        f"{path}: line 5 invalid YAML (duplicate key 'lr' on lines 3 and 5)"]


def test_merged_keys_may_be_overridden_and_the_same_key_in_two_sections_is_no_duplicate(
        tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("decode: &d {beam_size: 4, n_best: 2}\n"
                    "train: {max_steps: 5}\nmodel: {dropout: 0.1}\n"
                    "data: {test: {a: &c {format: generated, size: 3},\n"
                    "              b: {<<: *c, size: 5}}}\n")
    recipe = load_recipe(path)
    assert recipe.data.test["b"].size == 5 and recipe.data.test["a"].size == 3


@pytest.mark.parametrize("text, message", [
    ("a: &x [*x]\n", "line 1 invalid YAML (recursive alias *x (inside the value it names))"),
    ("a: &x {b: *x}\n", "line 1 invalid YAML (recursive alias *x (inside the value it names))"),
    ("".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else '1'}]\n"
             for i in range(7)),
     "nested deeper than 50 levels or holding more than 100,000 values"),
    # PyYAML raises ValueError for an impossible date or an int too long to convert
    ("name: 2026-02-30\n", "invalid YAML (a value YAML cannot build: day is out of range"),
    ("seed: 1" + "0" * 5000 + "\n", "invalid YAML (a value YAML cannot build: Exceeds the"),
])
def test_recursive_aliases_alias_bombs_and_unbuildable_values_are_one_line_errors(
        tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}: ") and message in problem


@pytest.mark.parametrize("override, message", [
    ("train.lr=1" + "0" * 400, "train.lr: expected a number, got 1000"),
    ("seed=1" + "0" * 5000, "seed: expected an integer, got '1000"),
    ("seed=1" + "0" * 400, "seed: must be in [0, 4_294_967_295], got 10_000"),
])
def test_huge_numbers_in_overrides_are_recipe_errors(override, message):
    with pytest.raises(RecipeError) as info:
        load_recipe(REPO / "recipes" / "quickstart.yaml", [override])
    assert any(message in problem for problem in info.value.problems), info.value.problems


def test_an_override_yaml_cannot_build_is_its_text():
    """As an override that is no YAML at all is: a date of month 13 is a name."""
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", ["name=2026-13-01"])
    assert recipe.name == "2026-13-01"


def test_a_symlink_loop_as_a_corpus_or_output_dir_is_named(tmp_path):
    """Path.resolve() raises RuntimeError for a loop (Python < 3.13): a traceback."""
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    base = ["recipes/quickstart.yaml", "data.train.size=300", "data.valid.size=10",
            "data.test.synthetic.size=10"]
    for overrides, problem in (
            ([f"data.valid.src={tmp_path / 'loop1'}", "data.valid.format=text",
              f"data.valid.trg={tmp_path / 'loop1'}", f"output_dir={tmp_path / 'run'}"],
             "cannot open (Too many levels of symbolic links)"),
            ([f"output_dir={tmp_path / 'loop1'}"], "is a symbolic link in a loop")):
        result = run_cli("check", *base, *overrides)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert problem in result.stderr.splitlines()[-1], result.stderr


def test_version():
    from seq2seq import __version__

    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout == f"seq2seq {__version__}\n"


# ---- check: every check prepare and train make first, all at once, nothing written ----------

def test_check_reports_every_corpus_problem_at_once_and_writes_nothing(tmp_path):
    from tests.robustness.conftest import snapshot

    (tmp_path / "train.en").write_text("hello\n")
    # Blank lines only: a run would score BLEU 0 on this validation set.
    (tmp_path / "valid.en").write_text("\n\n")
    (tmp_path / "valid.de").write_text("\n  \n")
    (tmp_path / "test.tsv").write_text("a\tb\nc\n")  # line 2 has no tab
    (tmp_path / "out").write_text("a file where output_dir should be")
    tree = {"output_dir": str(tmp_path / "out"), "data": {
        "root": str(tmp_path),
        "train": {"format": "text", "src": "train.en", "trg": "train.de"},
        "valid": {"format": "text", "src": "valid.en", "trg": "valid.de"},
        "test": {"t": {"format": "tsv", "path": "test.tsv"},
                 "g": {"format": "generated", "split": "test", "size": 5}}}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    before = snapshot(tmp_path)
    result = run_cli("check", str(recipe))
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    root = str(tmp_path)
    assert result.stderr.splitlines() == [
        f"error: {recipe}: output_dir {root}/out: {root}/out exists and is not a directory",
        f"error: {recipe}: data.train: {root}/train.de: no such file",
        f"error: {recipe}: data.valid: {root}/valid.en, {root}/valid.de: no sentence pair has "
        "text on both sides (an empty corpus)",
        f"error: {recipe}: data.test.t: {root}/test.tsv: line 2 has 0 tabs; expected exactly "
        "one (source<TAB>target)"]
    assert snapshot(tmp_path) == before


def test_check_refuses_an_output_dir_below_a_directory_it_cannot_write(tmp_path, monkeypatch):
    """check passed it and prepare then failed ("cannot write there"). Mode bits do not stop
    root, who runs the tests, so the permission is what ``os.access`` says here."""
    import os
    from pathlib import Path

    from seq2seq.data import preflight

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(preflight.os, "access", lambda path, mode: (
        Path(path) != locked and real_access(path, mode)))
    assert preflight.directory_problem(locked / "run" / "x") == f"{locked} is not writable"
    # A directory only read (a current tokenizer's) need not be writable; one below it would be
    # made, so its parent must be.
    assert preflight.directory_problem(locked, written=False) is None
    assert preflight.directory_problem(locked / "x", written=False) == f"{locked} is not writable"
    assert preflight.directory_problem(tmp_path / "elsewhere") is None



def test_check_refuses_an_output_dir_on_a_kernel_filesystem(tmp_path, monkeypatch):
    """/sys is writable to root by its mode, so check passed output_dir=/sys/run and prepare
    then failed to make it."""
    import os
    from pathlib import Path
    from types import SimpleNamespace

    from seq2seq.data import preflight

    for path, where in (("/sys/run", "/sys"), ("/sys/kernel/x/y", "/sys/kernel"),
                        ("/proc/run", "/proc")):
        assert preflight.directory_problem(Path(path)) == (
            f"{where} is on a kernel filesystem (like /proc or /sys) where no directory can "
            "be made")
    # Some network filesystems report no blocks either: there a directory can be made.
    monkeypatch.setattr(preflight.os, "statvfs", lambda path: SimpleNamespace(
        f_blocks=0, f_files=0))
    assert preflight.directory_problem(tmp_path / "run") is None
    assert os.listdir(tmp_path) == []  # (the directory it made to be sure is gone)


def test_check_passes_a_recipe_whose_corpora_are_fine(tmp_path):
    for name in ("train.en", "train.de", "valid.en", "valid.de"):
        (tmp_path / name).write_text("\nsome text\n")  # a blank line is allowed, not only those
    tree = {"output_dir": str(tmp_path / "run"), "data": {
        "root": str(tmp_path),
        "train": {"format": "text", "src": "train.en", "trg": "train.de"},
        "valid": {"format": "text", "src": "valid.en", "trg": "valid.de"}}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    result = run_cli("check", str(recipe))
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["data"]["valid"]["src"] == "valid.en"
    assert not (tmp_path / "run").exists()


def test_prepare_refuses_an_empty_validation_set_before_writing(tmp_path):
    from seq2seq.data.cache import prepare_data
    from seq2seq.data.corpus import DataError
    from tests.conftest import tiny_tree

    (tmp_path / "v.tsv").write_text("")
    tree = tiny_tree(str(tmp_path / "run"))
    tree["data"]["valid"] = {"format": "tsv", "path": str(tmp_path / "v.tsv")}
    with pytest.raises(DataError, match=r"^data\.valid: .*v\.tsv: no sentence pair"):
        prepare_data(recipe_from_dict(tree), show_progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_passes_check(path, data_root, tmp_path):
    # (another output_dir: the recipe's own may hold a run, or one in progress)
    result = run_cli("check", str(path.relative_to(REPO)), f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("where", ["cache", "tokenizer", "dangling cache"])
def test_check_and_prepare_refuse_a_file_where_prepare_makes_a_directory(tmp_path, where):
    """check said OK; prepare trained the tokenizer, then failed: "cache: File exists"."""
    run = tmp_path / "run"
    run.mkdir()
    name = where.split()[-1]
    if where.startswith("dangling"):
        (run / name).symlink_to(tmp_path / "nothing")
    else:
        (run / name).write_text("x\n")
    args = ["recipes/quickstart.yaml", f"output_dir={run}", "data.train.size=300",
            "data.valid.size=10", "data.test.synthetic.size=10"]
    problem = (f"{run / name} is a symbolic link to nothing ({tmp_path / 'nothing'})"
               if where.startswith("dangling") else f"{run / name} exists and is not a directory")
    for command in ("check", "prepare"):
        result = run_cli(command, *args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.splitlines()[-1].endswith(
            f"output_dir {run / name}: {problem}"), result.stderr
        # (prepare holds the run's lock while it checks)
        assert sorted(p.name for p in run.iterdir() if p.name != ".lock") == [name]


def test_inverse_sqrt_without_warmup_is_refused_rather_than_held_constant():
    """Its rate falls as sqrt(warmup_steps / step) after warm-up: with no warm-up it was the
    constant schedule, without a word."""
    from tests.conftest import tiny_tree

    with pytest.raises(RecipeError, match=r"train.warmup_steps: must be at least 1 with "
                                          r"train.schedule inverse_sqrt"):
        recipe_from_dict(tiny_tree("run"), ["train.schedule=inverse_sqrt"])
    recipe_from_dict(tiny_tree("run"), ["train.schedule=inverse_sqrt", "train.warmup_steps=10"])


@pytest.mark.parametrize("override, problem", [
    ("train.sample_nbest=513", "train.sample_nbest: must be in [-1, 512]"),
    ("tokenizer.character_coverage=0.97", "tokenizer.character_coverage: must be in [0.98, 1"),
    ("tokenizer.input_sentence_size=100",
     "tokenizer.input_sentence_size: must be 0 (all) or more than 100, got 100"),
    ("eval.bootstrap=1", "eval.bootstrap: must be 0 (off) or at least 2, got 1"),
])
def test_values_that_cannot_work_are_refused_by_the_recipe(override, problem):
    """They passed `check`, then failed prepare or the first epoch inside SentencePiece (a
    traceback for sample_nbest, a message naming no key for the others); eval.bootstrap=1
    made the confidence intervals vanish without a word."""
    assert [p for p in problems_of({}, [override]) if p.startswith(f"recipe: {problem}")], \
        problems_of({}, [override])
    key, value = override.split("=")
    edge = {"train.sample_nbest": "512", "tokenizer.character_coverage": "0.98",
            "tokenizer.input_sentence_size": "101", "eval.bootstrap": "2"}[key]
    recipe_from_dict({}, [f"{key}={edge}"])  # SentencePiece's own bound is allowed


def test_integers_that_yaml_1_1_reads_in_another_base_are_refused(tmp_path):
    """`vocab_size: 010000` loaded as 4096 (octal) and `seed: 1:00` as 60 (base 60), silently."""
    path = tmp_path / "r.yaml"
    for text, line in [("tokenizer:\n  vocab_size: 010000\n", 2), ("seed: 1:00\n", 1)]:
        path.write_text(text)
        with pytest.raises(RecipeError) as info:
            load_recipe(path)
        assert info.value.problems == [
            f"{path}: line {line} invalid YAML ({text.split(': ')[-1].strip()}: YAML 1.1 reads "
            "this integer as octal or base 60; write it in decimal without a leading 0)"]
    assert problems_of({}, ["seed=017"]) == [
        "recipe: seed: expected an integer, got '017' (from the override seed=017)"]
    path.write_text("seed: 0\ntokenizer:\n  vocab_size: 10_000\ntrain:\n  lr: 0.001\n")
    recipe = load_recipe(path)
    assert (recipe.seed, recipe.tokenizer.vocab_size) == (0, 10_000)


def test_a_section_given_whole_in_an_override_says_what_it_drops(capsys):
    """`train={lr: 0.01}` reset the recipe's batch_tokens, max_epochs, ... to the defaults
    without a word."""
    tree = {"train": {"batch_tokens": 2000, "lr": 0.003}, "data": {"test": {"a": {}}}}
    recipe = recipe_from_dict(tree, ["train={lr: 0.01}"])
    assert (recipe.train.lr, recipe.train.batch_tokens) == (0.01, 4096)
    assert capsys.readouterr().err == (
        "warning: train={...} replaces the whole train of the recipe: its batch_tokens are "
        "dropped (defaults, if any, hold); to change one key, write train.KEY=VALUE\n")
    recipe_from_dict(tree, ["train.lr=0.01", "data.test={b: {format: generated}}"])
    assert capsys.readouterr().err == ""  # test sets given whole replace, as meant
