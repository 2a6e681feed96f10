"""scripts/benchmark.py end to end on a tiny recipe: its table, its JSON, its FLOP counts."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from tests.conftest import REPO, load_script, tiny_tree


def test_benchmark_reports_speed_and_arithmetic(tmp_path):
    tree = tiny_tree(str(tmp_path / "unused"), data={"test": {"t": {
        "format": "generated", "split": "test", "size": 30}}})
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark.py"), str(recipe), "--warmup", "1",
         "--steps", "2", "--repeat", "30", "--flops", "--threads", "1", "--work-dir",
         str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["train"]["steps_timed"] == 2 and report["train"]["target_tokens_per_s"] > 0
    assert [row["beam"] for row in report["decode"]] == [1, 5]
    assert all(row["sentences"] == 30 for row in report["decode"])
    flops = report["flops"]
    assert flops["matmul_gflops"] > 0
    rows = {row["what"]: row for row in flops["rows"]}
    assert set(rows) == {"training, per target token", "decoding greedy, per sentence",
                         "decoding beam 5, per sentence"}
    # The output layer alone costs 2 * H * V FLOPs per token forward and twice that backward.
    vocab = 120
    assert rows["training, per target token"]["flops_per_item"] >= 6 * 16 * vocab
    # Five beams do more arithmetic per sentence than one.
    assert (rows["decoding beam 5, per sentence"]["flops_per_item"]
            > rows["decoding greedy, per sentence"]["flops_per_item"])
    assert rows["training, per target token"]["rate"] == report["train"]["target_tokens_per_s"]
    assert "arithmetic: one fp32 matmul" in result.stdout
    assert "| training, per target token |" in result.stdout


def test_benchmark_refuses_a_work_dir_holding_a_training_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"a checkpoint")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark.py"),
         str(REPO / "recipes" / "quickstart.yaml"), "--work-dir", str(run)],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"error: --work-dir {run} holds checkpoints of a training run (last.pt); give the "
        "benchmark a directory of its own"]
    assert (run / "last.pt").read_bytes() == b"a checkpoint"  # nothing deleted


@pytest.mark.parametrize("flags,message", [
    (["recipes/quickstart.yaml", "--beams", "1,x"], "argument --beams: '1,x': 'x' is not"),
    (["recipes/quickstart.yaml", "--steps", "-3"], "argument --steps: must be at least 0"),
    (["recipes/quickstart.yaml", "--json", "missing/x.json"], "missing/x.json: directory"),
    (["recipes/quickstart.yaml", "--checkpoint", "nope.pt"], "--checkpoint nope.pt: no such"),
    (["recipes/quickstart.yaml", "train.lrr=1"], "train.lrr: unknown key"),
    (["nope.yaml"], "nope.yaml: no such recipe file"),
])
def test_benchmark_refuses_bad_arguments_in_one_line_before_any_work(flags, message):
    """Each of these was a traceback, some only after the timed training had run."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), *flags],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "training:" not in result.stderr


def run_benchmark_decoding(tmp_path, name, overrides):
    tree = tiny_tree(str(tmp_path / "unused"), data={"test": {"t": {
        "format": "generated", "split": "test", "size": 30}}})
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    out = tmp_path / f"{name}.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark.py"), str(recipe), *overrides,
         "--warmup", "0", "--steps", "0", "--repeat", "30", "--threads", "1", "--work-dir",
         str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())["decode"]


def test_benchmark_honours_min_len_for_a_fixed_output_length(tmp_path):
    # min = max = 12 tokens: every output of greedy and beam search is exactly 12 tokens long,
    # so an untrained model (which says EOS early) costs what a trained one does.
    fixed = ["decode.min_len=12", "decode.max_len_ratio=1e-9", "decode.max_len_add=12"]
    rows = run_benchmark_decoding(tmp_path, "fixed", fixed)
    assert [row["beam"] for row in rows] == [1, 5]
    for row in rows:
        assert row["min_len"] == 12
        assert row["mean_output_tokens"] == 12.0
        assert row["cut_at_max_len"] == row["sentences"] == 30


def test_bench_decoding_passes_min_len_to_every_search():
    # A model that wants EOS at once: only min_len keeps its outputs going to the fixed length.
    import torch

    from tests.search.toy_models import ToyModel

    benchmark = load_script("benchmark")
    torch.manual_seed(0)
    model = ToyModel(eos_bias=20.0).eval()
    tokenizer = SimpleNamespace(decode_trg=lambda hyps: [" ".join(map(str, h)) for h in hyps])
    src_ids = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    for min_len, expected in ((9, 9.0), (0, 0.0)):
        decode = SimpleNamespace(alpha=0.6, max_len_ratio=1e-9, max_len_add=9, min_len=min_len,
                                 no_repeat_ngram=0, cuda_graphs=False, shortlist=0,
                                 shortlist_frequent=0)
        for beam in (1, 5):
            row = benchmark.bench_decoding(model, src_ids, ["a", "b", "c"], tokenizer, decode,
                                           beam, 2, torch.device("cpu"))
            assert (row["min_len"], row["mean_output_tokens"]) == (min_len, expected)


def test_bench_decoding_passes_no_repeat_ngram_to_every_search():
    """decode.no_repeat_ngram was left out of both searches: silently ignored."""
    import dataclasses

    import torch

    from seq2seq.config import DecodeConfig
    from tests.search.toy_models import ToyModel

    benchmark = load_script("benchmark")
    model = ToyModel(eos_bias=-20.0).eval()  # never says EOS: outputs run to 12 tokens
    decoded = []
    tokenizer = SimpleNamespace(decode_trg=lambda hyps: decoded.append(hyps) or ["x"] * 3)
    src_ids = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    plain = DecodeConfig(alpha=0.6, max_len_ratio=1e-9, max_len_add=12)
    for n, repeats in ((0, True), (1, False)):
        decode = dataclasses.replace(plain, no_repeat_ngram=n)
        for beam in (1, 5):
            row = benchmark.bench_decoding(model, src_ids, ["a", "b", "c"], tokenizer, decode,
                                           beam, 2, torch.device("cpu"))
            assert row["no_repeat_ngram"] == n
            hyps = decoded.pop()
            assert all(len(h) == 12 for h in hyps)
            assert any(len(set(h)) < len(h) for h in hyps) == repeats, (n, beam, hyps)


def test_compare_peers_runs_both_sides_and_prints_ratios(tmp_path):
    from seq2seq.precision import cpu_native_bf16

    # The peers' kit stands in as a script printing its one JSON line; our side is the real
    # benchmark on the tiny recipe. Nothing is filled in from figures measured elsewhere.
    tree = tiny_tree(str(tmp_path / "unused"), data={"test": {"t": {
        "format": "generated", "split": "test", "size": 20}}})
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    kit = tmp_path / "bench.sh"
    kit.write_text('echo "setting up" >&2\necho \'{"cpu": "x", "onmt": '
                   '{"train_target_tokens_per_s": 100, "beam5_batch100_sent_per_s": 10.0}, '
                   '"joey": {"train_target_tokens_per_s": 50, '
                   '"beam5_batch100_sent_per_s": null}}\'\n')
    out = tmp_path / "compare.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compare_peers.py"), "--recipe", str(recipe),
         "--warmup", "1", "--steps", "1", "--repeat", "20", "--len", "6", "--threads", "1",
         "--shortlist", "5",
         "--work-dir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=900,
        env={**os.environ, "PEERS_BENCH": str(kit), "SEQ2SEQ_FP32_GEMM": "onednn"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert len(report["rounds"]) == 1  # --rounds 1, the default
    ours = report["rounds"][0]["seq2seq"]["fp32"]
    # fp32 products by oneDNN, so the fp32 training runs again with BLAS's, in its own row
    assert ours["fp32_products"].startswith("onednn")
    blas = report["rounds"][0]["seq2seq"]["fp32, BLAS products"]
    assert blas["fp32_products"].startswith("blas") and "decode" not in blas
    assert sum(line.startswith("| training, target tokens/s (seq2seq fp32, BLAS products)")
               for line in result.stdout.splitlines()) == 1
    # every weights variant with and without the shortlist, whose rows say which; bf16 where
    # the CPU computes it natively
    native = cpu_native_bf16()
    weights = ("bf16", "fp32", "int8") if native else ("fp32", "int8")
    assert sorted((row["weights"], str(row["shortlist"])) for row in ours["decode"]) == [
        (w, s) for w in weights for s in ("None", "[5, 100]")]
    assert all(row["mean_output_tokens"] == 6.0 for row in ours["decode"])  # fixed length
    assert sum("weights, shortlist 5+100)" in line
               for line in result.stdout.splitlines()) == len(weights)
    assert result.stdout.startswith(f"CPU: {report['cpu']}; bf16 flags: ")
    train = ours["train"]["target_tokens_per_s"]
    row = next(line for line in result.stdout.splitlines()
               if line.startswith("| training, target tokens/s (seq2seq fp32)"))
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    assert cells[2:6] == ["100", "50", f"{train / 100:.2f}x", f"{train / 50:.2f}x"]
    beam = next(line for line in result.stdout.splitlines() if "fp32 weights" in line)
    assert beam.split("|")[6].strip() == "n/a"  # Joey's missing figure stays missing
    # bf16 against our own fp32, beside what the CPU's products allow
    rates = report["products"]
    assert sorted(rates) == ["bf16", "fp32", "fp32_blas"] and rates["fp32"] > 0
    assert rates["fp32_blas"] > 0 and (rates["bf16"] > 0 if native else rates["bf16"] is None)
    last = result.stdout.splitlines()[-1]
    assert last.startswith("Products of two 2048 x 2048 matrices, 1 thread: fp32 ")
    if native:
        decode = {row["weights"]: row["sentences_per_s"] for row in ours["decode"]
                  if not row["shortlist"]}
        assert f"products bf16 / fp32 {rates['bf16'] / rates['fp32']:.2f}x" in last
        assert last.endswith(f"beam 5 with bf16 weights {decode['bf16'] / decode['fp32']:.2f}x.")
    else:
        assert "bf16 not run (no native bf16)" in last and "products bf16 / fp32 n/a" in last
    assert ("training " in last) == ("bf16" in report["rounds"][0]["seq2seq"]) == bool(native)


def test_compare_peers_rounds_alternate_and_give_the_median_of_their_own_ratios(
        tmp_path, monkeypatch, capsys):
    compare = load_script("compare_peers")
    calls = []

    def ours(args, work, precision, decode, gemm=None, bf16=False):
        calls.append(("ours", precision, gemm))
        assert work.parent == tmp_path  # each round in a folder of its own
        speed = {"round-1": 300.0, "round-2": 100.0, "round-3": 200.0}[work.name]
        run = {"train": {"target_tokens_per_s": speed, "load_average": 1.0},
               "fp32_products": "blas (auto)"}
        if decode:
            run["decode"] = [{"weights": "fp32", "shortlist": None, "sentences_per_s": speed / 10,
                              "load_average": 1.5}]
        return run

    def peers(args, work):
        calls.append(("peers",))
        speed = {"round-1": 100, "round-2": 50, "round-3": 40}[work.name]
        return {"onmt": {"train_target_tokens_per_s": speed, "beam5_batch100_sent_per_s": 10.0},
                "joey": {"train_target_tokens_per_s": None, "beam5_batch100_sent_per_s": None},
                "load_average": [1.0, 1.0]}

    monkeypatch.setattr(compare, "ours", ours)
    monkeypatch.setattr(compare, "peers", peers)
    (tmp_path / "bench.sh").write_text("")  # checked before anything runs, never run here
    monkeypatch.setattr(compare, "PEERS_BENCH", tmp_path / "bench.sh")
    monkeypatch.setattr(compare, "cpu_native_bf16", lambda: None)  # fp32 parts only
    monkeypatch.setattr(compare, "product_rates", lambda threads, size, bf16: {
        "fp32": 100.0, "fp32_blas": 100.0, "bf16": None})
    monkeypatch.setenv("SEQ2SEQ_DATA", os.environ.get("SEQ2SEQ_DATA", "unused"))
    out = tmp_path / "compare.json"
    assert compare.main(["--rounds", "3", "--threads", "1", "--work-dir", str(tmp_path),
                         "--json", str(out)]) == 0
    # the peers go first in every other round
    assert [call[0] for call in calls] == ["ours", "peers", "peers", "ours", "ours", "peers"]
    rounds = json.loads(out.read_text())["rounds"]
    assert [r["seq2seq"]["fp32"]["train"]["target_tokens_per_s"] for r in rounds] == [
        300.0, 100.0, 200.0]
    printed = capsys.readouterr().out
    assert "; 3 rounds, the peers first in every other" in printed.splitlines()[0]
    assert compare.table(rounds, 24)[2] in printed
    lines = compare.table(rounds, 24)
    train = next(line for line in lines if line.startswith("| training"))
    cells = [cell.strip() for cell in train.split("|")[1:-1]]
    # ratios within each round 3.0, 2.0 and 5.0: their median and range, not the ratio of
    # the medians (200 / 50) nor of the sums (600 / 190)
    assert cells[1:7] == ["200.0 (300, 100, 200)", "50.0 (100, 50, 40)", "n/a",
                          "3.00x (2.00-5.00)", "n/a", "1.0, 1.0, 1.0"]
    beam = next(line for line in lines if "fp32 weights" in line)
    assert [cell.strip() for cell in beam.split("|")[1:-1]][4] == "2.00x (1.00-3.00)"


def test_compare_peers_refuses_zero_rounds():
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compare_peers.py"), "--rounds", "0"],
        capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("--rounds: 0: at least 1")


def test_compare_peers_takes_relative_paths_from_where_it_runs(tmp_path, monkeypatch):
    """Its parts run in the repository: a relative --recipe, --work-dir or --json named a
    path there, not where the user ran it."""
    compare = load_script("compare_peers")
    monkeypatch.chdir(tmp_path)
    args = compare.parse_args(["--recipe", "mine.yaml", "--work-dir", "w", "--json", "c.json"])
    assert (args.recipe, args.work_dir, args.json) == (
        str(tmp_path / "mine.yaml"), str(tmp_path / "w"), str(tmp_path / "c.json"))
    assert compare.parse_args([]).recipe == compare.RECIPE  # the repository's own
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit):
        compare.parse_args(["--work-dir", "afile"])


def test_compare_peers_stops_with_one_line_when_a_part_fails(tmp_path):
    kit = tmp_path / "bench.sh"
    kit.write_text("exit 3\n")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compare_peers.py"), "--recipe", "missing.yaml",
         "--work-dir", str(tmp_path / "work")],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env={**os.environ, "PEERS_BENCH": str(kit)})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: seq2seq-fp32 failed (exit ")
    assert last.endswith(f"; see {tmp_path / 'work' / 'seq2seq-fp32.log'}")


def test_the_cpu_is_named_with_its_family_model_and_stepping(tmp_path):
    # "AMD EPYC" alone covers Zen 4 and Zen 5, whose bf16 speeds differ by 2x.
    benchmark = load_script("benchmark")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n"
                       "model\t\t: 2\nmodel name\t: AMD EPYC\nstepping\t: 1\n\n"
                       "processor\t: 1\ncpu family\t: 25\nmodel name\t: Other\n")
    assert benchmark.cpu_model(cpuinfo) == "AMD EPYC (cpu family 26, model 2, stepping 1)"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\n")
    assert benchmark.cpu_model(cpuinfo) == "Some CPU"
    assert benchmark.cpu_model(tmp_path / "missing") == (benchmark.platform.processor()
                                                          or benchmark.platform.machine())
