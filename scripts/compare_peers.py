"""Compare scripts/benchmark.py's figures with Joey NMT and OpenNMT-py on the same data and model.

    python scripts/benchmark.py recipes/multi30k/de-en.gru.yaml --json ours.json
    python scripts/compare_peers.py ours.json [--steps 30] [--device cpu]

For each peer that is importable (``importlib.util.find_spec``: ``joeynmt``, ``onmt``), the
script writes that toolkit's configuration for the model of ``recipes/multi30k/de-en.gru.yaml``
(embeddings 256, bi-GRU encoder 2 x 256, GRU decoder 2 x 512, additive attention, input
feeding, dropout 0.3, ~4k target tokens per batch) on the same Multi30k files, tokenised with
*our* SentencePiece model (from the benchmark's work directory), runs its trainer for
``--steps`` updates and reads the target tokens/s from its log, then times its beam-5
translation of the test set at batch 100 (wall clock of the whole command, start-up included,
so a lower bound of its speed). The peers are never project dependencies and should live in
their own virtual environment (they pin other torch versions): point ``--python`` at it.

A peer that is not installed is reported as missing, and the ratio uses its reference figures,
measured elsewhere on the same model (2 CPU cores): Joey NMT 2.3.0 893 target tokens/s and
57 sentences/s beam-5 at batch 100; OpenNMT-py 3.5.1 1,671 tokens/s and 108 sentences/s.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# Measured elsewhere, same model and data, 2 CPU cores (the speed issue's table).
REFERENCE = {
    "joeynmt": {"label": "Joey NMT 2.3.0", "target_tokens_per_s": 893.0,
                "beam5_sentences_per_s": 57.0},
    "onmt": {"label": "OpenNMT-py 3.5.1", "target_tokens_per_s": 1671.0,
             "beam5_sentences_per_s": 108.0},
}
REFERENCE_NOTE = "reference, measured elsewhere"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ours", help="JSON written by scripts/benchmark.py --json")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter of the environment holding the peers")
    parser.add_argument("--steps", type=int, default=30, help="peer training updates to run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--work-dir", help="where to write peer configs and runs "
                        "(default: a temporary directory)")
    parser.add_argument("--json", help="write the comparison here")
    return parser.parse_args(argv)


def peer_installed(module: str, python: str) -> bool:
    """``importlib.util.find_spec(module)`` in the interpreter that would run the peer."""
    if python == sys.executable:
        return importlib.util.find_spec(module) is not None
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", probe], check=False).returncode == 0


def ours_figures(result: dict[str, Any]) -> dict[str, float | None]:
    beam5 = [row for row in result.get("decode", [])
             if row["beam"] == 5 and row.get("weights", "fp32") == "fp32"]
    return {"target_tokens_per_s": (result.get("train") or {}).get("target_tokens_per_s"),
            "beam5_sentences_per_s": beam5[0]["sentences_per_s"] if beam5 else None}


# --------------------------------------------------------------------------------------------
# Shared inputs: the Multi30k files tokenised with our SentencePiece model
# --------------------------------------------------------------------------------------------


def write_pieces(data_dir: Path, tokenizer_dir: Path, out: Path) -> dict[str, Path]:
    """train/val/test ``.de`` / ``.en`` as space-separated pieces, plus a shared vocab file.

    Both peers then read pre-tokenised text, so all three toolkits see the same subwords.
    """
    import sentencepiece as spm

    model = next(tokenizer_dir.glob("*.model"))
    sp = spm.SentencePieceProcessor(model_file=str(model))
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": "train", "val": "val", "test": "test_2016_flickr"}
    for split, stem in splits.items():
        for lang in ("de", "en"):
            with gzip.open(data_dir / "multi30k" / f"{stem}.{lang}.gz", "rt",
                           encoding="utf-8") as handle:
                lines = handle.read().splitlines()
            pieces = sp.encode(lines, out_type=str)
            (out / f"{split}.{lang}").write_text(
                "".join(" ".join(p) + "\n" for p in pieces), encoding="utf-8")
    vocab = out / "vocab.txt"
    vocab.write_text("".join(sp.id_to_piece(i) + "\n" for i in range(4, sp.get_piece_size())),
                     encoding="utf-8")
    return {"dir": out, "vocab": vocab}


def run_logged(cmd: list[str], log: Path, cwd: Path) -> float:
    """Run ``cmd``, write its output to ``log``; returns the wall time in seconds."""
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-5:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {' | '.join(tail)}")
    return seconds


def last_rate(log: Path, pattern: str) -> float:
    """The mean of the rates ``pattern`` captures in ``log``, skipping the first (warm-up)."""
    rates = [float(m.replace(",", "")) for m in re.findall(pattern, log.read_text())]
    if not rates:
        raise RuntimeError(f"{log}: no throughput line matching {pattern!r}")
    rates = rates[1:] or rates
    return sum(rates) / len(rates)


def count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as handle:
        return sum(1 for _ in handle)


# --------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------


def run_joeynmt(python: str, pieces: dict[str, Path], work: Path, steps: int,
                device: str) -> dict[str, float]:
    """Joey NMT: train ``steps`` updates (log: "Tokens per Sec"), then translate the test set."""
    import yaml

    data = pieces["dir"]
    side = {"level": "bpe", "lowercase": False, "voc_file": str(pieces["vocab"]),
            "tokenizer_type": "subword-nmt", "tokenizer_cfg": {"pretokenizer": "none"}}
    rnn = {"rnn_type": "gru", "dropout": 0.3, "emb_dropout": 0.3}
    config = {
        "name": "bench", "joeynmt_version": "2.3.0",
        "data": {"train": str(data / "train"), "dev": str(data / "val"),
                 "test": str(data / "test"), "dataset_type": "plain",
                 "src": {"lang": "de", **side}, "trg": {"lang": "en", **side}},
        "training": {"model_dir": str(work / "joey_model"), "overwrite": True,
                     "optimizer": "adam", "learning_rate": 0.001, "batch_size": 4096,
                     "batch_type": "token", "epochs": 1, "logging_freq": 5,
                     "validation_freq": 10**9, "use_cuda": device == "cuda",
                     "random_seed": 1, "label_smoothing": 0.1, "max_steps": steps},
        "testing": {"beam_size": 5, "alpha": 0.6, "batch_size": 100, "batch_type": "sentence"},
        "model": {
            "encoder": {"type": "recurrent", "hidden_size": 256, "bidirectional": True,
                        "num_layers": 2, "embeddings": {"embedding_dim": 256}, **rnn},
            "decoder": {"type": "recurrent", "hidden_size": 512, "num_layers": 2,
                        "attention": "bahdanau", "input_feeding": True, "init_hidden": "bridge",
                        "embeddings": {"embedding_dim": 256}, **rnn},
        },
    }
    cfg_path = work / "joey.yaml"
    cfg_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    log = work / "joey_train.log"
    run_logged([python, "-m", "joeynmt", "train", str(cfg_path)], log, work)
    tokens_per_s = last_rate(log, r"Tokens per Sec:\s*([\d,.]+)")
    test = data / "test.de"
    seconds = run_logged([python, "-m", "joeynmt", "translate", str(cfg_path),
                          "--output_path", str(work / "joey.hyp")],
                         work / "joey_translate.log", work) if test.exists() else float("nan")
    return {"target_tokens_per_s": tokens_per_s,
            "beam5_sentences_per_s": count_lines(test) / seconds}


def run_onmt(python: str, pieces: dict[str, Path], work: Path, steps: int,
             device: str) -> dict[str, float]:
    """OpenNMT-py: train ``steps`` updates (log: "src/tgt tok/s"), then translate the test set."""
    import yaml

    data = pieces["dir"]
    config = {
        "save_data": str(work / "onmt"), "src_vocab": str(work / "onmt.vocab.src"),
        "tgt_vocab": str(work / "onmt.vocab.tgt"), "overwrite": True,
        "data": {"corpus_1": {"path_src": str(data / "train.de"),
                              "path_tgt": str(data / "train.en")},
                 "valid": {"path_src": str(data / "val.de"), "path_tgt": str(data / "val.en")}},
        "save_model": str(work / "onmt_model"), "save_checkpoint_steps": steps,
        "train_steps": steps, "valid_steps": 10**9, "report_every": 5, "seed": 1,
        "batch_size": 4096, "batch_type": "tokens", "optim": "adam", "learning_rate": 0.001,
        "label_smoothing": 0.1, "dropout": 0.3,
        "encoder_type": "brnn", "rnn_type": "GRU", "enc_layers": 2, "enc_hid_size": 512,
        "word_vec_size": 256, "decoder_type": "rnn", "dec_layers": 2, "dec_hid_size": 512,
        "global_attention": "mlp", "input_feed": 1, "bridge": True,
        "world_size": 1, "gpu_ranks": [0] if device == "cuda" else [],
    }
    cfg_path = work / "onmt.yaml"
    cfg_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    run_logged([python, "-m", "onmt.bin.build_vocab", "-config", str(cfg_path), "-n_sample",
                "-1"], work / "onmt_vocab.log", work)
    log = work / "onmt_train.log"
    run_logged([python, "-m", "onmt.bin.train", "-config", str(cfg_path)], log, work)
    tokens_per_s = last_rate(log, r"[\d.]+/\s*([\d.]+) tok/s")
    test = data / "test.de"
    cmd = [python, "-m", "onmt.bin.translate", "-model", str(work / f"onmt_model_step_{steps}.pt"),
           "-src", str(test), "-output", str(work / "onmt.hyp"), "-beam_size", "5",
           "-batch_size", "100", "-batch_type", "sents"]
    if device == "cuda":
        cmd += ["-gpu", "0"]
    seconds = run_logged(cmd, work / "onmt_translate.log", work)
    return {"target_tokens_per_s": tokens_per_s,
            "beam5_sentences_per_s": count_lines(test) / seconds}


PEERS = {"joeynmt": run_joeynmt, "onmt": run_onmt}


def format_ratio(ours: float | None, theirs: float | None) -> str:
    if not ours or not theirs:
        return "n/a"
    return f"{ours / theirs:.2f}x"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = json.loads(Path(args.ours).read_text(encoding="utf-8"))
    ours = ours_figures(result)
    if Path(result["recipe"]).name != "de-en.gru.yaml" or result.get("overrides"):
        print(f"warning: {result['recipe']} {' '.join(result.get('overrides', []))} is not "
              "recipes/multi30k/de-en.gru.yaml as is: the peers' model and figures are that "
              "recipe's, so the ratios are not like for like", file=sys.stderr)
    data_dir = Path(os.environ.get("SEQ2SEQ_DATA") or REPO.parent / "shared" / "data")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="seq2seq-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    rows, pieces = [], None
    for module, runner in PEERS.items():
        ref = REFERENCE[module]
        figures, source = None, REFERENCE_NOTE
        if not peer_installed(module, args.python):
            print(f"{ref['label']}: not installed ({module} not importable by {args.python}); "
                  f"using its figures {REFERENCE_NOTE}", file=sys.stderr)
        else:
            try:
                if pieces is None:
                    tokenizer_dir = Path(result.get("work_dir", "")) / "tokenizer"
                    pieces = write_pieces(data_dir, tokenizer_dir, work / "pieces")
                peer_work = work / module
                peer_work.mkdir(exist_ok=True)
                figures = runner(args.python, pieces, peer_work, args.steps, args.device)
                source = f"measured here ({args.device}, {args.steps} updates)"
            except (RuntimeError, OSError, StopIteration) as error:
                print(f"{ref['label']}: run failed ({error}); using its figures "
                      f"{REFERENCE_NOTE}", file=sys.stderr)
        figures = figures or {k: ref[k] for k in ("target_tokens_per_s",
                                                  "beam5_sentences_per_s")}
        rows.append({"peer": ref["label"], "source": source, **figures,
                     "train_ratio": format_ratio(ours["target_tokens_per_s"],
                                                 figures["target_tokens_per_s"]),
                     "beam5_ratio": format_ratio(ours["beam5_sentences_per_s"],
                                                 figures["beam5_sentences_per_s"])})

    print(f"seq2seq ({args.ours}, device {result.get('device')}): "
          f"{ours['target_tokens_per_s']} target tokens/s, "
          f"{ours['beam5_sentences_per_s']} sentences/s beam 5")
    print("| peer | figures | train tok/s | seq2seq / peer | beam-5 sent/s | seq2seq / peer |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['peer']} | {row['source']} | {row['target_tokens_per_s']:,.0f} | "
              f"{row['train_ratio']} | {row['beam5_sentences_per_s']:,.1f} | "
              f"{row['beam5_ratio']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"ours": ours, "peers": rows}, indent=2) + "\n",
                                   encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
