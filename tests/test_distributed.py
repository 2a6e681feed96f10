"""Multi-process training with real processes: torchrun workers talking gloo on CPU.

Every test starts ``python -m seq2seq train`` (or torchrun on a small script) as subprocesses
with a timeout, so a hang fails the test instead of blocking the suite.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from seq2seq.checkpoint import load_checkpoint
from tests.conftest import tiny_tree

PACKAGE = Path(__file__).resolve().parents[1] / "seq2seq"
TIMEOUT_S = 240  # per command; generous because the test machine may be busy

# Validation through seq2seq.training.validation.validate, on 1 process or inside torchrun:
# records what was scored and how many sentences this rank decoded. The weights are drawn at
# random (large enough that every sentence gets its own hypothesis, small enough that batching
# does not change any argmax), so the check does not depend on a trained model.
VALIDATE_SCRIPT = '''
import json, sys
import torch
import seq2seq.training.validation as validation
from seq2seq import distributed as dist
from seq2seq.config import load_recipe
from seq2seq.training.trainer import Trainer

seen = {"decoded": 0}
score, decode = validation.corpus_bleu, validation.decode_ids
def spy_score(hyps, refs, **options):
    seen["hyps"] = list(hyps)
    return score(hyps, refs, **options)
def spy_decode(model, src_ids, *args):
    seen["decoded"] += len(src_ids)
    return decode(model, src_ids, *args)
validation.corpus_bleu, validation.decode_ids = spy_score, spy_decode

trainer = Trainer(load_recipe(sys.argv[1]))
generator = torch.Generator().manual_seed(0)
with torch.no_grad():
    for parameter in trainer.model.parameters():
        parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.6)
metrics = validation.validate(trainer.model, trainer.data.valid, trainer.data.tokenizer,
                              trainer.recipe, trainer.device)
with open(f"{sys.argv[2]}.rank{dist.rank()}.json", "w") as handle:
    json.dump({"metrics": metrics, "hyps": seen.get("hyps"), "decoded": seen["decoded"],
               "world": dist.world_size()}, handle)
trainer.close()
dist.shutdown()
'''

# The trainer on the static (CUDA-graph) path, its programs run eagerly on the CPU: gradients
# summed over ranks by StaticSteps' one all-reduce instead of DDP.
STATIC_SCRIPT = '''
import sys
import torch
from seq2seq import distributed as dist
from seq2seq.config import load_recipe
from seq2seq.training.step import build_step
from seq2seq.training.trainer import Trainer

trainer = Trainer(load_recipe(sys.argv[1]))
trainer.step.close()  # the eager step's DDP wrapper
trainer.step = build_step(trainer.model, trainer.recipe, trainer.device, trainer.data.train,
                          trainer.data.train_lengths()[1], trainer.run.path / "last.pt",
                          graphs=True, capture=False)
trainer.step.start(trainer.progress)
trainer.fit()
trainer.close()
dist.shutdown()
'''

# Training through seq2seq.training.trainer.fit inside torchrun, then a look at what is left:
# nothing that holds the process group may outlive fit (a gloo group torn down during interpreter
# finalization can abort the worker after a successful run), and the signal handlers are back.
TEARDOWN_SCRIPT = '''
import gc, json, signal, sys
from torch.nn.parallel import DistributedDataParallel
from seq2seq import distributed as dist
from seq2seq.config import load_recipe
from seq2seq.training.trainer import fit

before = signal.getsignal(signal.SIGTERM)
trainer = fit(load_recipe(sys.argv[1]))
gc.collect()
with open(f"{sys.argv[2]}.rank{trainer.rank}.json", "w") as handle:
    json.dump({"world": trainer.world, "step": trainer.progress.step,
               "initialized": dist.is_initialized(),
               "ddp_alive": sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects()),
               "handler_restored": signal.getsignal(signal.SIGTERM) is before}, handle)
'''


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One encoded-data cache for the module: the tokenizer is trained once."""
    return tmp_path_factory.mktemp("cache")


def write_recipe(tmp_path: Path, cache: Path, name: str, **sections) -> Path:
    """A tiny recipe on the generated task as a YAML file; ``sections`` update its sections."""
    tree = tiny_tree(str(tmp_path / name), seed=3,
                     train={"threads": 1}, model={"dropout": 0.0})
    tree["data"].update(cache_dir=str(cache))
    tree["data"]["valid"]["size"] = 21
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def seq2seq_train(recipe: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "seq2seq", "train", str(recipe), *overrides]


def run(command: list[str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``command`` to the end; a hang past ``timeout`` raises (and kills it)."""
    return subprocess.run(command, env=env(), capture_output=True, text=True, timeout=timeout)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (f"{' '.join(map(str, result.args))}: exit "
                                    f"{result.returncode}\n{result.stdout[-2000:]}\n"
                                    f"{result.stderr[-6000:]}")
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metrics(run_dir: Path, split: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["split"] == split]


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc, no psutil)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def worker_of_rank(agent_pid: int, rank: int) -> int:
    """The torchrun worker with global rank ``rank`` among the agent's children."""
    for pid in children(agent_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker of rank {rank} under torchrun agent {agent_pid}")


def kill_rank_after(command: list[str], marker: Path, rank: int,
                    log: Path) -> subprocess.CompletedProcess:
    """Run ``command``; once ``marker`` exists, SIGKILL the worker of ``rank``; wait for the end."""
    with open(log, "w") as out:
        launcher = subprocess.Popen(command, env=env(), stdout=out, stderr=subprocess.STDOUT,
                                    text=True)
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while not marker.exists():
                assert launcher.poll() is None, f"ended before {marker.name}: {log.read_text()}"
                assert time.monotonic() < deadline, f"no {marker.name} in time"
                time.sleep(0.02)
            os.kill(worker_of_rank(launcher.pid, rank), signal.SIGKILL)
            code = launcher.wait(timeout=TIMEOUT_S)
        finally:
            if launcher.poll() is None:
                launcher.kill()
    return subprocess.CompletedProcess(command, code, "", log.read_text())


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_two_processes_equal_one_process_accumulating_two(tmp_path, cache_dir):
    """Split independence: the same global batches give the same updates and losses."""
    recipe = write_recipe(tmp_path, cache_dir, "two")
    launched = check(run(seq2seq_train(recipe, "distributed.nproc_per_node=1",
                                       "distributed.nproc_per_node=2")))
    # Said by the launching process only: not again by the workers, which read the same line.
    assert launched.stderr.count("is overridden twice") == 1, launched.stderr
    check(run(seq2seq_train(recipe, "train.accumulate=2", f"output_dir={tmp_path / 'one'}")))
    two = load_checkpoint(tmp_path / "two" / "last.pt")
    one = load_checkpoint(tmp_path / "one" / "last.pt")
    assert one["step"] == two["step"] == 6
    assert max_relative_difference(one["model"], two["model"]) <= 1e-5
    losses_one = [(r["step"], r["loss"]) for r in metrics(tmp_path / "one", "train")]
    losses_two = [(r["step"], r["loss"]) for r in metrics(tmp_path / "two", "train")]
    assert [s for s, _ in losses_one] == [s for s, _ in losses_two] == list(range(1, 7))
    for (_, a), (_, b) in zip(losses_one, losses_two):
        assert b == pytest.approx(a, rel=1e-5)
    assert len(two["rng"]) == 2  # both ranks' RNG states are in the checkpoint


def test_a_torchrun_group_of_one_trains_like_a_single_process(tmp_path, cache_dir):
    """The distributed code path (process group, DDP) with one process: what the NCCL check
    on a single GPU runs, here with gloo."""
    recipe = write_recipe(tmp_path, cache_dir, "group")
    grouped = check(run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1",
                         "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "-m", "seq2seq",
                         "train", str(recipe)]))
    assert "in a process group of 1 (gloo)" in grouped.stderr
    single = check(run(seq2seq_train(recipe, f"output_dir={tmp_path / 'single'}")))
    assert "process group" not in single.stderr
    losses = [[(r["step"], r["loss"]) for r in metrics(tmp_path / name, "train")]
              for name in ("group", "single")]
    assert [s for s, _ in losses[0]] == [s for s, _ in losses[1]] == list(range(1, 7))
    for (_, a), (_, b) in zip(*losses):
        assert a == pytest.approx(b, rel=1e-6)
    grouped_ckpt = load_checkpoint(tmp_path / "group" / "last.pt")
    single_ckpt = load_checkpoint(tmp_path / "single" / "last.pt")
    assert max_relative_difference(grouped_ckpt["model"], single_ckpt["model"]) <= 1e-6


def test_static_path_over_two_ranks_ends_where_ddp_ends(tmp_path, cache_dir):
    """CUDA-graph training with several processes sums gradients itself: same updates."""
    recipe = write_recipe(tmp_path, cache_dir, "static", train={"accumulate": 2})
    script = tmp_path / "static.py"
    script.write_text(STATIC_SCRIPT, encoding="utf-8")
    check(run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
               "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", str(script), str(recipe)]))
    check(run(seq2seq_train(recipe, "distributed.nproc_per_node=2",
                            f"output_dir={tmp_path / 'ddp'}")))
    static = load_checkpoint(tmp_path / "static" / "last.pt")
    ddp = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert static["step"] == ddp["step"] == 6
    assert max_relative_difference(static["model"], ddp["model"]) <= 1e-4
    losses = [[r["loss"] for r in metrics(tmp_path / name, "train")] for name in ("static", "ddp")]
    assert len(losses[0]) == len(losses[1]) == 6
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_validation_over_two_ranks_scores_the_same_sentences_in_order(tmp_path, cache_dir):
    recipe = write_recipe(tmp_path, cache_dir, "valid")  # 21 validation pairs: odd
    script = tmp_path / "validate.py"
    script.write_text(VALIDATE_SCRIPT, encoding="utf-8")
    check(run([sys.executable, str(script), str(recipe), str(tmp_path / "one")]))
    check(run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
               "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", str(script), str(recipe),
               str(tmp_path / "two")]))
    one = json.loads((tmp_path / "one.rank0.json").read_text())
    two = [json.loads((tmp_path / f"two.rank{r}.json").read_text()) for r in (0, 1)]
    assert one["world"] == 1 and two[0]["world"] == 2
    # Each rank decoded its own shard (11 + 10), none padded, none dropped.
    assert one["decoded"] == 21 and [t["decoded"] for t in two] == [11, 10]
    assert len(set(one["hyps"])) > 10, "hypotheses must differ for the order to be checked"
    assert two[0]["hyps"] == one["hyps"]
    assert two[1]["hyps"] is None  # only the main rank scores
    for t in two:  # every rank returns the main rank's metrics
        assert t["metrics"]["n_sentences"] == one["metrics"]["n_sentences"] == 21
        assert t["metrics"]["bleu"] == one["metrics"]["bleu"] > 0
        assert t["metrics"]["loss"] == pytest.approx(one["metrics"]["loss"], rel=1e-5)


# A stop signal that reaches one rank only (kill -INT of one worker, or the ranks signalled
# at different steps): that rank skipped the vote of the others and saved, while they waited
# in the vote until distributed.timeout_s, then died in gloo's tracebacks.
ONE_RANK_SIGNAL_SCRIPT = '''
import json, os, signal, sys
from seq2seq import distributed as dist
from seq2seq.config import load_recipe
from seq2seq.training import step
from seq2seq.training.trainer import fit

apply = step.EagerStep.apply

def apply_then_signal(self, lr):  # rank 1 alone gets a SIGINT during its second update
    ok = apply(self, lr)
    self.updates = getattr(self, "updates", 0) + 1
    if dist.rank() == 1 and self.updates == 2:
        os.kill(os.getpid(), signal.SIGINT)
    return ok

step.EagerStep.apply = apply_then_signal
trainer = fit(load_recipe(sys.argv[1]))
with open(f"{sys.argv[2]}.rank{trainer.rank}.json", "w") as handle:
    json.dump({"step": trainer.progress.step, "interrupted": trainer.interrupted,
               "reason": trainer.stop_reason}, handle)
'''


@pytest.mark.parametrize("max_steps, reason", [
    (50, "a rank received a stop signal"),
    # in the last update: the signalled rank skipped the final validation, the other ran it
    (2, "reached train.max_steps=2"),
])
def test_a_stop_signal_to_one_rank_stops_every_rank_after_the_same_update(
        tmp_path, cache_dir, max_steps, reason):
    from seq2seq.checkpoint import load_checkpoint

    recipe = write_recipe(tmp_path, cache_dir, "one_signal", distributed={"timeout_s": 30},
                          train={"max_steps": max_steps, "valid_every": 100})
    script = tmp_path / "one_signal.py"
    script.write_text(ONE_RANK_SIGNAL_SCRIPT, encoding="utf-8")
    started = time.monotonic()
    result = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                  "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", str(script),
                  str(recipe), str(tmp_path / "out")])
    check(result)
    assert time.monotonic() - started < 30 + 60, "a rank waited for the timeout"
    states = [json.loads((tmp_path / f"out.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert states[0] == states[1] == {"step": 2, "interrupted": True, "reason": reason}
    assert load_checkpoint(tmp_path / "one_signal" / "last.pt")["step"] == 2


# The main rank prepares the data alone (a large corpus: a tokenizer, an encoded cache) while
# the others wait: they waited within distributed.timeout_s and died of a gloo timeout.
SLOW_PREPARE_SCRIPT = '''
import json, sys, time
from seq2seq import distributed as dist
from seq2seq.config import load_recipe
from seq2seq.training import trainer as module

prepare = module.prepare_data

def slowly(*args, **kwargs):
    if dist.is_main():
        time.sleep(8)
    return prepare(*args, **kwargs)

module.prepare_data = slowly
trainer = module.fit(load_recipe(sys.argv[1]))
with open(f"{sys.argv[2]}.rank{trainer.rank}.json", "w") as handle:
    json.dump({"step": trainer.progress.step}, handle)
'''


def test_the_other_ranks_wait_for_the_main_rank_s_prepare_past_the_timeout(tmp_path,
                                                                            cache_dir):
    recipe = write_recipe(tmp_path, cache_dir, "slow_prepare", train={"max_steps": 1},
                          distributed={"timeout_s": 3})
    script = tmp_path / "slow_prepare.py"
    script.write_text(SLOW_PREPARE_SCRIPT, encoding="utf-8")
    check(run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
               "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", str(script),
               str(recipe), str(tmp_path / "out")]))
    for rank in (0, 1):
        assert json.loads((tmp_path / f"out.rank{rank}.json").read_text()) == {"step": 1}


FROM_MAIN_SCRIPT = '''
import sys, time
from pathlib import Path
from seq2seq import distributed as dist

dist.init_from_env("gloo", 30)

def work():
    time.sleep(1)
    raise ValueError("a bad corpus")

try:
    outcome = dist.from_main("data preparation", work)
except ValueError as error:
    outcome = f"raised {error}"
except dist.MainRankFailed as error:
    outcome = str(error)
Path(sys.argv[1], f"rank{dist.rank()}").write_text(outcome)
dist.shutdown()
'''


def test_the_other_ranks_learn_that_the_main_rank_s_work_failed(tmp_path):
    script = tmp_path / "from_main.py"
    script.write_text(FROM_MAIN_SCRIPT, encoding="utf-8")
    check(run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
               "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", str(script),
               str(tmp_path)]))
    assert (tmp_path / "rank0").read_text() == "raised a bad corpus"
    assert (tmp_path / "rank1").read_text() == (
        "rank 1: the main rank failed in its data preparation (its output says why)")


def test_fit_lets_go_of_the_process_group_before_the_worker_exits(tmp_path, cache_dir):
    recipe = write_recipe(tmp_path, cache_dir, "teardown", train={"max_steps": 2})
    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN_SCRIPT, encoding="utf-8")
    check(run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
               "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", str(script), str(recipe),
               str(tmp_path / "out")]))
    for rank in (0, 1):
        state = json.loads((tmp_path / f"out.rank{rank}.json").read_text())
        assert state == {"world": 2, "step": 2, "initialized": False, "ddp_alive": 0,
                         "handler_restored": True}, rank


def test_two_nodes_on_one_machine_train_together(tmp_path, cache_dir):
    recipe = write_recipe(tmp_path, cache_dir, "nodes")
    endpoint = f"distributed.rdzv_endpoint=127.0.0.1:{free_port()}"
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = []
    try:
        for rank, log in enumerate(logs):
            # Output to files, not pipes: a full pipe nobody reads would stall that node.
            with open(log, "w") as out:
                nodes.append(subprocess.Popen(
                    seq2seq_train(recipe, "distributed.nnodes=2", f"distributed.node_rank={rank}",
                                  "distributed.nproc_per_node=1", endpoint),
                    env=env(), stdout=out, stderr=subprocess.STDOUT))
        codes = [node.wait(timeout=TIMEOUT_S) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for code, log in zip(codes, logs):
        assert code == 0, log.read_text()[-6000:]
    ckpt = load_checkpoint(tmp_path / "nodes" / "last.pt")
    assert ckpt["step"] == 6 and len(ckpt["rng"]) == 2


def test_elastic_restart_after_a_killed_worker_ends_where_an_uninterrupted_run_ends(
        tmp_path, cache_dir):
    """torchrun restarts the group, which resumes from last.pt: same weights, bit for bit.

    Dropout is on, so this also checks that every rank's RNG state is restored.
    """
    recipe = write_recipe(tmp_path, cache_dir, "killed", model={"dropout": 0.2},
                          train={"max_steps": 12, "valid_every": 4})
    command = seq2seq_train(recipe, "distributed.nproc_per_node=2", "distributed.max_restarts=1")
    result = kill_rank_after(command, tmp_path / "killed" / "step_00000004.pt.sha256", rank=1,
                             log=tmp_path / "killed.log")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "exitcode: -9" in result.stderr  # the kill landed ...
    # ... and the group resumed: from last.pt, or from step_4.pt when the kill came between
    # the two writes.
    assert re.search(r"resuming from .*\.pt at step (4|8)", result.stderr)
    check(run(command + [f"output_dir={tmp_path / 'whole'}"]))
    killed = load_checkpoint(tmp_path / "killed" / "last.pt")
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")
    assert killed["step"] == whole["step"] == 12
    for key in whole["model"]:
        assert torch.equal(killed["model"][key], whole["model"][key]), key


def test_a_rank_that_fails_for_good_ends_the_job_with_a_clear_error(tmp_path, cache_dir):
    recipe = write_recipe(tmp_path, cache_dir, "fails", train={"max_steps": 40, "valid_every": 4})
    started = time.monotonic()
    result = kill_rank_after(seq2seq_train(recipe, "distributed.nproc_per_node=2"),
                             tmp_path / "fails" / "step_00000004.pt.sha256", rank=1,
                             log=tmp_path / "fails.log")
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: distributed training failed: rank 1"), last_line
    assert "SIGKILL" in last_line
    assert time.monotonic() - started < TIMEOUT_S


def test_a_resume_with_another_process_count_is_one_line_before_any_worker_starts(
        tmp_path, cache_dir):
    """It was refused by every worker, each line amid torchrun's messages."""
    recipe = write_recipe(tmp_path, cache_dir, "one")
    check(run(seq2seq_train(recipe, "train.max_steps=2")))
    result = run(seq2seq_train(recipe, "train.max_steps=4", "distributed.nproc_per_node=2"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: cannot resume {tmp_path / 'one'}: it was trained with 1 batches per update "
        "(processes x train.accumulate), this run uses 2 x 1; keep the product equal"]
    # and the way it names is taken: 1 process accumulating 2 batches resumes a 2-process run
    two = write_recipe(tmp_path, cache_dir, "two")
    check(run(seq2seq_train(two, "train.max_steps=2", "distributed.nproc_per_node=2")))
    check(run(seq2seq_train(two, "train.max_steps=4", "train.accumulate=2")))


@pytest.mark.parametrize("target, code, said", [
    ("launcher", 130, "stopped: the launcher received SIGINT"),
    ("worker", 143, "stopped: a worker received SIGTERM")])
def test_a_signal_to_the_launcher_or_one_worker_exits_with_128_plus_it(tmp_path, cache_dir,
                                                                      target, code, said):
    """Ctrl-C to the launcher exited 2 with "error: distributed training failed", as a bad
    recipe does, after the workers had stopped cleanly; a signal to one worker exited 0 with
    "distributed training finished": `train && evaluate` evaluated a half-trained model."""
    from seq2seq.checkpoint import load_checkpoint

    recipe = write_recipe(tmp_path, cache_dir, target, train={"max_steps": 10_000,
                                                              "log_every": 1})
    launcher = subprocess.Popen(seq2seq_train(recipe, "distributed.nproc_per_node=2"),
                                env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    metrics = tmp_path / target / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT_S
    while not (metrics.exists() and '"split": "train"' in metrics.read_text()):
        assert time.monotonic() < deadline and launcher.poll() is None, launcher.stderr.read()
        time.sleep(0.2)
    if target == "launcher":
        launcher.send_signal(signal.SIGINT)
    else:
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text()
        assert len(children.split()) == 2, children  # torchrun starts the workers itself
        os.kill(int(children.split()[1]), signal.SIGTERM)
    _, err = launcher.communicate(timeout=TIMEOUT_S)
    assert launcher.returncode == code, err
    assert said in err and "training finished" not in err and "error:" not in err, err
    assert 0 < load_checkpoint(tmp_path / target / "last.pt")["step"] < 10_000


@pytest.mark.parametrize("ends, code, said", [
    ({(0, 0): ("stopped", signal.SIGINT), (0, 1): ("stopped", None)}, 130,
     "stopped: a worker received SIGINT"),
    ({(0, 0): ("stopped", None), (0, 1): ("stopped", None)}, 143,
     "stopped: a worker received a stop signal"),  # (a rank's on another node)
    # a group restarted after one worker had stopped, then ended: finished, not stopped
    ({(0, 1): ("stopped", signal.SIGTERM), (1, 0): ("ended", None), (1, 1): ("ended", None)},
     0, "distributed training finished"),
    ({(0, 0): ("ended", None), (0, 1): ("ended", None)}, 0, "distributed training finished"),
])
def test_the_launcher_exits_as_the_last_group_of_workers_ended(ends, code, said, monkeypatch,
                                                                 tmp_path, capsys):
    """A stop recorded by a group that torchrun then restarted made a finished job exit 143."""
    from seq2seq import launch
    from seq2seq.config import recipe_from_dict

    def workers(argv):  # as torchrun's workers would record their ends
        for (attempt, rank), (how, signum) in ends.items():
            monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(attempt))
            monkeypatch.setenv("RANK", str(rank))
            launch.record_end(how == "stopped", signum)
        return 0

    monkeypatch.setattr(launch.dist, "launch", workers)
    recipe = recipe_from_dict(tiny_tree(str(tmp_path / "run")))
    assert launch.launch_workers(recipe, tmp_path / "r.yaml", []) == code
    assert said in capsys.readouterr().err
    assert launch.STOP_RECORD not in os.environ


@pytest.mark.parametrize("variables, message", [
    ({"LOCAL_RANK": "abc"}, "the environment variable LOCAL_RANK='abc' is no process number"),
    ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is no process number"),
    ({"LOCAL_RANK": "0"}, "the environment sets LOCAL_RANK=0 but not all of RANK and WORLD_SIZE"),
    ({"RANK": "1"}, "the environment sets RANK=1 but not all of RANK and WORLD_SIZE"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "the environment sets RANK=2 for WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "1"}, "rank 0: cannot join the process group of 1 ("),
])
def test_a_torchrun_environment_that_is_not_one_is_one_line(tmp_path, cache_dir, variables,
                                                            message):
    """LOCAL_RANK left in a shell made `train` skip its launcher and train one process, and
    a malformed or incomplete environment was a traceback."""
    recipe = write_recipe(tmp_path, cache_dir, "environment")
    environment = {name: value for name, value in env().items()
                   if name not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                   "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")}
    # (with LOCAL_RANK set, `train` takes itself for a torchrun worker and starts no launcher)
    launcher = ["distributed.nproc_per_node=2"] if "LOCAL_RANK" in variables else []
    result = subprocess.run(seq2seq_train(recipe, *launcher), env={**environment, **variables},
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "environment" / "last.pt").exists()


def test_a_worker_whose_peer_went_away_says_so_in_one_line(monkeypatch):
    """gloo's RuntimeError in the surviving worker was a 35-line traceback before torchrun's
    own one-line account of the worker that failed."""
    from seq2seq.distributed import peer_lost

    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:42396. This is typically caused by a remote worker crashing.")
    assert peer_lost(gone) is None  # outside torchrun: not this case
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    assert peer_lost(gone) == (
        "rank 0: another worker went away during a collective ([../gloo/transport/tcp/pair.cc"
        ":553] Connection closed by peer [127.0.0.1]:42396. This is typically caused by a "
        "remote worker crashing.)")
    late = RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed "
                        "out waiting 1000ms for recv operation to complete")
    assert peer_lost(late) == (
        "rank 0: a collective waited longer than distributed.timeout_s for another worker "
        "([../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
        "1000ms for recv operation to complete); raise it if a rank has long work of its own "
        "between collectives, else a worker is stuck")
    assert peer_lost(RuntimeError("CUDA out of memory")) is None  # any other error: its traceback
    assert peer_lost(ValueError("Connection closed by peer")) is None


@pytest.mark.parametrize("device, backend, cuda, expected", [
    ("cpu", "auto", True, ("cpu", "gloo")),    # was the GPUs: train.device went unread
    ("auto", "auto", True, ("cuda:1", "nccl")),
    ("auto", "gloo", True, ("cpu", "gloo")),
    ("cuda", "gloo", True, ("cuda:1", "gloo")),
    ("auto", "auto", False, ("cpu", "gloo")),
    ("cuda", "auto", False, "train.device cuda: no CUDA GPU is available"),
])
def test_each_rank_takes_the_device_of_train_device(device, backend, cuda, expected,
                                                    monkeypatch):
    from seq2seq import distributed
    from seq2seq.errors import Seq2SeqError

    joined = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(distributed, "attempt_store", lambda timeout: None)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kwargs: joined.update(backend=backend))
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    if isinstance(expected, str):
        with pytest.raises(Seq2SeqError, match=expected):
            distributed.init_from_env(backend, 60, device)
        assert not joined
        return
    rank_device = distributed.init_from_env(backend, 60, device)
    assert (str(rank_device), joined["backend"]) == expected


SAMPLING_SCRIPT = '''
import hashlib
import sys
from pathlib import Path

from seq2seq import distributed as dist
from seq2seq.config import load_recipe
from seq2seq.data import sampling
from seq2seq.data.cache import prepare_data

drawn = []
draw = sampling.sampled_epoch
sampling.sampled_epoch = lambda *args: drawn.append(args[-1]) or draw(*args)
dist.init_from_env("gloo", 120)
data = prepare_data(load_recipe(sys.argv[1]), show_progress=False)  # the cache is there
table = sampling.shared_epoch(Path(sys.argv[2]), data, 0.3, -1, 3, 0)[0]
texts = data.tokenizer.decode_trg(table.column("trg_ids").to_pylist())
assert texts == data.tokenizer.decode_trg(data.train.data.table.column("trg_ids").to_pylist())
assert drawn == [(dist.rank(), 2)], drawn  # each rank drew its own share, once
digest = hashlib.sha256(str(table.to_pydict()).encode()).hexdigest()
Path(sys.argv[3], f"rank{dist.rank()}").write_text(digest)
'''


def test_every_rank_trains_on_one_draw_of_subword_sampling(tmp_path, cache_dir):
    """sentencepiece draws other segmentations for the same seed in another process: each
    rank drew its own and built its own partition of the batches from it, so some pairs were
    trained by both ranks and others by neither. Now each rank draws one share, and all
    receive the whole draw, in the corpus's order."""
    recipe = write_recipe(tmp_path, cache_dir, "sampling")
    check(run(seq2seq_train(recipe, "train.max_steps=1")))  # tokenizer and cache, once
    script = tmp_path / "sampling.py"
    script.write_text(SAMPLING_SCRIPT, encoding="utf-8")
    check(run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
               "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", str(script), str(recipe),
               str(tmp_path / "sampled"), str(tmp_path)]))
    digests = {(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)}
    assert len(digests) == 1
    assert [path.name for path in (tmp_path / "sampled").iterdir()] == ["epoch-0.arrow"]


def test_only_distributed_py_mentions_torch_distributed():
    """`grep -rl torch.distributed seq2seq/` lists one file: distributed code lives in one place."""
    sources = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "distributed.py" in sources
    mentioning = [path.relative_to(PACKAGE.parent).as_posix() for path in sources
                  if "torch.distributed" in path.read_text(encoding="utf-8")]
    assert mentioning == ["seq2seq/distributed.py"]


def test_two_launches_on_one_output_dir_at_once_one_trains_the_other_is_one_line(
        tmp_path, cache_dir):
    """The launcher checked the run's lock, then its main rank took it seconds later: a second
    launch in between passed the check, and its main rank failed amid torchrun's messages and
    the other rank's "another worker went away". The launcher now holds the lock for its
    workers, so whichever launch comes second is refused at once, in one line."""
    recipe = write_recipe(tmp_path, cache_dir, "race")
    command = seq2seq_train(recipe, "distributed.nproc_per_node=2")
    first = subprocess.Popen(command, env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(command, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    results = []
    for process in (first, second):
        try:
            _, stderr = process.communicate(timeout=TIMEOUT_S)
        finally:
            process.kill()
        results.append((process.returncode, stderr))
    (trained,), (refused,) = ([r for r in results if r[0] == code] for code in (0, 2))
    assert "distributed training finished" in trained[1]
    holder = first if refused is results[1] else second  # (its launcher holds the lock)
    assert refused[1] == (f"error: output_dir {tmp_path / 'race'} is in use by another "
                          f"training run (process {holder.pid}); wait for it to end, or use "
                          "another output_dir\n")
    assert load_checkpoint(tmp_path / "race" / "last.pt")["step"] == 6
