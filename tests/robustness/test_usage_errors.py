"""Bad recipes and arguments, through the real ``seq2seq`` command.

Every row must end with exit code 2, one ``error: ...`` line per problem on stderr (nothing else
there: no usage block, no traceback, no progress bar) and nothing written: the working directory
(recipe, corpora, checkpoint, output_dir) is byte for byte and mtime for mtime as it was.
"""

import shutil

import pytest
import torch

from tests.robustness.conftest import (
    error_lines,
    seq2seq,
    snapshot,
    tiny_tree,
    write_recipe,
)

GOOD = "good.yaml"  # the tiny recipe; output_dir "run" (relative to the row's directory)
TEXT_CORPUS = ["data.train.format=text", "data.train.src=train.en", "data.train.trg=train.de",
               "data.root=."]


class Row:
    """One matrix row: ``seq2seq ARGV`` in a directory holding ``files``; stderr must contain
    every string of ``expect`` and hold ``problems`` error lines."""

    def __init__(self, id, argv, expect, files=None, problems=1, needs_ckpt=False):
        self.id, self.argv, self.expect = id, argv, expect
        self.files, self.problems, self.needs_ckpt = files or {}, problems, needs_ckpt


DIR = object()  # a files entry that is a directory
ROWS = [
    # ---- recipe keys and types ------------------------------------------------------------
    Row("unknown-top-level-key", ["check", "bad.yaml"],
        ["trian: unknown key", "did you mean train"],
        {"bad.yaml": b"trian: {max_steps: 3}\n"}),
    Row("unknown-key-in-override", ["train", GOOD, "train.lrr=0.1"],
        ["train.lrr: unknown key", "did you mean train.lr"]),
    Row("unknown-corpus-key", ["prepare", "bad.yaml"], ["data.train.scr", "data.train.src"],
        {"bad.yaml": b"data:\n  train: {format: text, scr: a.txt}\n"}),
    Row("unknown-section-override", ["check", GOOD, "modle.cell=lstm"], ["modle", "model"]),
    Row("float-is-a-word", ["train", GOOD, "train.lr=fast"], ["train.lr", "expected a number"]),
    Row("int-is-a-float", ["check", GOOD, "model.emb_size=1.5"], ["model.emb_size", "integer"]),
    Row("bool-is-a-word", ["check", GOOD, "model.bidirectional=maybe"],
        ["model.bidirectional", "true or false"]),
    Row("choice-not-offered", ["check", GOOD, "model.cell=transformer"],
        ["model.cell", "'gru'", "'lstm'"]),
    Row("section-is-a-number", ["check", GOOD, "model=5"], ["model", "expected a mapping"]),
    Row("betas-wrong-length", ["check", GOOD, "train.betas=[0.9]"], ["train.betas"]),
    Row("negative-learning-rate", ["train", GOOD, "train.lr=-1"], ["train.lr", "(0, 10]"]),
    Row("nan-learning-rate", ["train", GOOD, "train.lr=.nan"], ["train.lr"]),
    Row("three-problems-three-lines",
        ["check", GOOD, "train.lr=fast", "model.cell=cnn", "decode.alpha=-1"],
        ["train.lr", "model.cell", "decode.alpha"], problems=3),
    # ---- impossible combinations ----------------------------------------------------------
    Row("n-best-above-beam", ["train", GOOD, "decode.n_best=5", "decode.beam_size=2"],
        ["decode.n_best", "beam_size (2)"]),
    Row("tied-embeddings-different-sizes", ["train", GOOD, "model.tie_embeddings=decoder"],
        ["model.tie_embeddings", "emb_size (8)", "dec_hidden (16)"]),
    Row("lstm-only-option-on-a-gru", ["train", GOOD, "model.cell=gru", "model.forget_bias=1.0"],
        ["model.forget_bias", "LSTM-only", "'gru'"]),
    Row("tie-all-without-joint-vocabulary",
        ["prepare", GOOD, "model.tie_embeddings=all", "tokenizer.joint=false",
         "model.emb_size=16"], ["model.tie_embeddings", "joint"]),
    Row("dot-attention-size-mismatch",
        ["train", GOOD, "model.attention=dot", "model.bidirectional=false"],
        ["model.attention", "general"]),
    Row("a-run-that-never-stops", ["train", GOOD, "train.max_steps=0", "train.max_epochs=0"],
        ["train.max_steps", "both be 0"]),
    Row("node-rank-outside-nnodes", ["train", GOOD, "distributed.node_rank=2"],
        ["distributed.node_rank"]),
    *[Row(f"nccl-{command}-on-a-cpu", [command, GOOD, "distributed.backend=nccl",
                                       "distributed.nproc_per_node=2", "train.device=cpu"],
          ["distributed.backend: nccl needs"]) for command in ("check", "prepare", "train")],
    Row("same-source-and-target-language", ["prepare", GOOD, "data.trg_lang=en"],
        ["data.trg_lang"]),
    # ---- overrides and recipe files -------------------------------------------------------
    Row("override-without-equals", ["train", GOOD, "train.lr"], ["train.lr", "key.path=value"]),
    Row("override-without-key", ["check", GOOD, "=3"], ["key.path=value"]),
    Row("recipe-missing", ["train", "nope.yaml"], ["nope.yaml", "no such recipe file"]),
    Row("recipe-is-a-directory", ["prepare", "adir"], ["adir", "directory"], {"adir": DIR}),
    Row("recipe-not-utf8", ["check", "bad.yaml"], ["bad.yaml", "cannot read"],
        {"bad.yaml": b"name: \xff\xfe\n"}),
    Row("recipe-invalid-yaml", ["train", "bad.yaml"], ["bad.yaml", "line 3", "invalid YAML"],
        {"bad.yaml": b"name: x\ntrain: [1, 2\n"}),
    Row("recipe-is-a-list", ["check", "bad.yaml"], ["bad.yaml", "mapping"],
        {"bad.yaml": b"- train\n- model\n"}),
    Row("recipe-duplicate-key", ["train", "bad.yaml"],
        ["bad.yaml: line 3", "duplicate key 'name' on lines 1 and 3"],
        {"bad.yaml": b"name: a\nseed: 1\nname: b\n"}),
    Row("recipe-recursive-alias", ["prepare", "bad.yaml"], ["bad.yaml", "recursive alias *x"],
        {"bad.yaml": b"name: &x [*x]\n"}),
    Row("seed-above-32-bits", ["check", GOOD, "seed=4294967296"],
        ["seed: must be in [0, 4_294_967_295]"]),
    Row("length-ratio-without-upper-bound", ["train", GOOD, "decode.max_len_ratio=1e6"],
        ["decode.max_len_ratio: must be in (0, 10]"]),
    Row("model-too-large-for-this-machine", ["train", GOOD, "model.dec_hidden=65536"],
        ["model.dec_hidden", "GiB for weights, gradients and Adam state"]),
    Row("check-empty-validation-set", ["check", GOOD, "data.valid.format=tsv",
                                       "data.valid.path=v.tsv", "data.root=."],
        ["data.valid", "v.tsv", "no sentence pair"], {"v.tsv": b""}),
    Row("recipe-yaml-python-tag", ["check", "bad.yaml"], ["bad.yaml", "invalid YAML"],
        {"bad.yaml": b"name: !!python/object/apply:os.system ['touch pwned']\n"}),
    # ---- files the recipe points at -------------------------------------------------------
    Row("output-dir-is-a-file-train", ["train", GOOD, "output_dir=taken"],
        ["taken", "not a directory"], {"taken": b"x"}),
    Row("output-dir-is-a-file-prepare", ["prepare", GOOD, "output_dir=taken"],
        ["taken", "not a directory"], {"taken": b"x"}),
    Row("output-dir-below-a-file", ["prepare", GOOD, "output_dir=taken/run"],
        ["taken", "not a directory"], {"taken": b"x"}),
    Row("cache-dir-is-a-file", ["prepare", GOOD, "data.cache_dir=taken"],
        ["taken", "not a directory"], {"taken": b"x"}),
    Row("corpus-file-missing-prepare", ["prepare", GOOD, *TEXT_CORPUS],
        ["data.train", "train.en", "no such file"], {"train.de": b"hallo\n"}),
    Row("corpus-file-missing-train", ["train", GOOD, *TEXT_CORPUS],
        ["data.train", "train.de", "no such file"], {"train.en": b"hello\n"}),
    Row("corpus-file-is-a-directory", ["prepare", GOOD, *TEXT_CORPUS],
        ["train.en", "directory"], {"train.en": DIR, "train.de": b"hallo\n"}),
    Row("valid-corpus-missing", ["prepare", GOOD, "data.valid.format=tsv",
                                 "data.valid.path=valid.tsv", "data.root=."],
        ["data.valid", "valid.tsv", "no such file"]),
    Row("test-corpus-missing", ["prepare", GOOD, "data.test.t.format=jsonl",
                                "data.test.t.path=t.jsonl", "data.root=."],
        ["data.test.t", "t.jsonl", "no such file"]),
    Row("text-corpus-without-trg", ["prepare", GOOD, "data.train.format=text",
                                    "data.train.src=train.en"], ["trg"],
        {"train.en": b"hello\n"}),
    Row("generated-corpus-of-size-0", ["prepare", GOOD, "data.train.size=0"],
        ["data.train", "size"]),
    # ---- translate ------------------------------------------------------------------------
    Row("checkpoint-missing", ["translate", "--checkpoint", "nope.pt"],
        ["nope.pt", "no such checkpoint"]),
    Row("checkpoint-is-a-directory", ["translate", "--checkpoint", "adir"], ["adir"],
        {"adir": DIR}),
    Row("checkpoint-is-empty", ["translate", "--checkpoint", "empty.pt"], ["empty.pt", "empty"],
        {"empty.pt": b""}),
    Row("checkpoint-is-a-yaml-file", ["translate", "--checkpoint", GOOD],
        [GOOD, "not a PyTorch checkpoint"]),
    Row("checkpoint-holds-pickled-objects", ["translate", "--checkpoint", "evil.pt"],
        ["evil.pt", "arbitrary pickled objects", "refused"], {"evil.pt": "EVIL"}),
    Row("checkpoint-without-recipe", ["translate", "--checkpoint", "bare.pt"],
        ["bare.pt", "not a seq2seq checkpoint"], {"bare.pt": "BARE"}),
    Row("translate-input-missing", ["translate", "--checkpoint", "ckpt.pt", "--input", "in.txt"],
        ["in.txt", "no such input file"], needs_ckpt=True),
    Row("translate-input-is-a-directory",
        ["translate", "--checkpoint", "ckpt.pt", "--input", "adir"], ["adir", "directory"],
        {"adir": DIR}, needs_ckpt=True),
    Row("translate-output-directory-missing",
        ["translate", "--checkpoint", "ckpt.pt", "--input", "in.txt", "--output", "no/out.txt"],
        ["no/out.txt", "does not exist"], {"in.txt": b"the dog\n"}, needs_ckpt=True),
    Row("translate-output-is-a-directory",
        ["translate", "--checkpoint", "ckpt.pt", "--input", "in.txt", "--output", "adir"],
        ["adir: is a directory, not an output file"], {"in.txt": b"the dog\n", "adir": DIR},
        needs_ckpt=True),
    Row("translate-attention-is-a-directory",
        ["translate", "--checkpoint", "ckpt.pt", "--input", "in.txt", "--attention", "adir"],
        ["adir: is a directory, not an output file"], {"in.txt": b"the dog\n", "adir": DIR},
        needs_ckpt=True),
    Row("translate-beam-zero", ["translate", "--checkpoint", "ckpt.pt", "--beam", "0"],
        ["--beam", "[1, 1000]"], needs_ckpt=True),
    Row("translate-nbest-zero", ["translate", "--checkpoint", "ckpt.pt", "--nbest", "0"],
        ["--nbest", "[1, 1000]"], needs_ckpt=True),
    Row("translate-negative-alpha", ["translate", "--checkpoint", "ckpt.pt", "--alpha", "-1"],
        ["alpha"], needs_ckpt=True),
    Row("translate-nbest-above-the-beam",
        ["translate", "--checkpoint", "ckpt.pt", "--nbest", "3"],
        ["--nbest 3 is larger than the beam size"], needs_ckpt=True),
    Row("translate-alpha-nan", ["translate", "--checkpoint", "x.pt", "--alpha", "nan"],
        ["--alpha", "finite"]),
    Row("translate-cpu-index", ["translate", "--checkpoint", "ckpt.pt", "--device", "cpu:x"],
        ["--device cpu:x: not a device name"], needs_ckpt=True),
    Row("evaluate-beam-zero", ["evaluate", "--checkpoint", "x.pt", "--src", "in.txt", "--ref",
                               "in.txt", "--beam", "0"], ["--beam", "[1, 1000]"],
        {"in.txt": b"the dog\n"}),
    Row("translate-beam-not-a-number", ["translate", "--checkpoint", "x.pt", "--beam", "abc"],
        ["--beam", "'abc'"]),
    Row("translate-bad-device", ["translate", "--checkpoint", "ckpt.pt", "--device", "tpu7"],
        ["--device", "tpu7"], needs_ckpt=True),
    Row("translate-cuda-without-gpu" if not torch.cuda.is_available() else "translate-cuda-99",
        ["translate", "--checkpoint", "ckpt.pt", "--device",
         "cuda" if not torch.cuda.is_available() else "cuda:99"], ["cuda"], needs_ckpt=True),
    Row("translate-without-checkpoint", ["translate"], ["--checkpoint"]),
    # ---- evaluate, average, generate-data, the command line itself ------------------------
    Row("evaluate-without-anything", ["evaluate"], ["RECIPE", "--checkpoint"]),
    Row("evaluate-checkpoint-without-src", ["evaluate", "--checkpoint", "ckpt.pt"], ["--src"],
        needs_ckpt=True),
    Row("evaluate-ref-missing", ["evaluate", "--checkpoint", "ckpt.pt", "--src", "in.txt",
                                 "--ref", "ref.txt"], ["ref.txt"], {"in.txt": b"the dog\n"},
        needs_ckpt=True),
    Row("evaluate-empty-src", ["evaluate", "--checkpoint", "ckpt.pt", "--src", "in.txt",
                               "--ref", "ref.txt", "--report-dir", "rep"],
        ["in.txt: empty; no sentence to evaluate"], {"in.txt": b"", "ref.txt": b""},
        needs_ckpt=True),
    Row("evaluate-report-dir-is-a-file",
        ["evaluate", "--checkpoint", "ckpt.pt", "--src", "in.txt", "--ref", "in.txt",
         "--report-dir", "taken"], ["taken", "not a directory"],
        {"in.txt": b"the dog\n", "taken": b"x"}, needs_ckpt=True),
    Row("evaluate-run-never-trained", ["evaluate", GOOD], ["best.pt"]),
    Row("average-missing-checkpoint", ["average", "nope.pt", "--output", "avg.pt"], ["nope.pt"]),
    Row("average-into-missing-directory", ["average", "ckpt.pt", "--output", "no/avg.pt"],
        ["no/avg.pt"], needs_ckpt=True),
    Row("average-into-a-directory", ["average", "ckpt.pt", "--output", "adir"],
        ["adir: is a directory, not an output file"], {"adir": DIR}, needs_ckpt=True),
    Row("generate-data-into-a-file", ["generate-data", "taken", "--train", "5"], ["taken"],
        {"taken": b"x"}),
    Row("generate-data-negative-size", ["generate-data", "out", "--train", "-5"], ["--train"]),
    Row("generate-data-endless-size", ["generate-data", "out", "--train", "99999999999999"],
        ["--train must be in [0, 10000000], got 99999999999999"]),
    # one drawn sentence in 40 is a validation one: 10M took hours
    Row("generate-data-hours-of-validation", ["generate-data", "out", "--valid", "100001"],
        ["--valid must be in [0, 100000], got 100001"]),
    Row("check-without-a-recipe", ["check"], ["required: recipe (see"]),  # not KEY=VALUE
    Row("unknown-command", ["trian", GOOD], ["trian"]),
    Row("unknown-flag", ["translate", "--checkpoint", "x.pt", "--beem", "3"], ["--beem"]),
]


def _populate(root, row, trained):
    write_recipe(root / GOOD, tiny_tree("run"))
    for name, content in row.files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is DIR:
            path.mkdir()
        elif content == "EVIL":
            # Any class: torch pickles it as a global.
            from seq2seq.training.progress import Progress

            torch.save({"model": {}, "recipe": {}, "progress": Progress()}, path)
        elif content == "BARE":
            torch.save({"weights": torch.ones(2)}, path)
        else:
            path.write_bytes(content)
    if row.needs_ckpt:
        shutil.copy(trained, root / "ckpt.pt")


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.id)
def test_usage_error_is_one_line_per_problem_exit_2_and_writes_nothing(row, tmp_path, request):
    trained = request.getfixturevalue("trained") if row.needs_ckpt else None
    _populate(tmp_path, row, trained)
    before = snapshot(tmp_path)
    result = seq2seq(*row.argv, cwd=tmp_path, stdin=b"the dog\n", timeout=120)
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(line.startswith("error: ") for line in lines), err
    assert len(error_lines(result.stderr)) == row.problems, err
    for text in row.expect:
        assert text in err, f"{text!r} not in {err!r}"
    assert result.stdout == b""
    assert snapshot(tmp_path) == before, "something was written"
