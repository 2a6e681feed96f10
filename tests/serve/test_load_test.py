"""``scripts/load_test.py`` end to end: real servers with batching on and off, offline
translate beside them, and the same decoding flags passed to all three."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO
from tests.serve.conftest import ENV, translates_with_noise


def test_load_test_compares_on_off_and_offline_with_the_same_flags(checkpoint, test_sentences,
                                                                     tmp_path):
    source = tmp_path / "sentences.txt"
    source.write_text("\n".join(test_sentences[:24]) + "\n", encoding="utf-8")
    report_path = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "load_test.py"), "--checkpoint",
         str(checkpoint), "--input", str(source), "--sentences", "24", "--clients", "6",
         "--threads", "1", "--beam", "3", "--precision", "bf16", "--batch-wait-ms", "20",
         "--repeat", "2",
         "--json", str(report_path)],
        capture_output=True, text=True, timeout=600, env=ENV, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["setup"]["precision"] == "bf16" and report["setup"]["batch_wait_ms"] == 20
    from seq2seq.translate import Translator

    offline = Translator.from_checkpoint(checkpoint, device="cpu", precision="bf16")
    settings = offline.decode_settings(beam=3)
    for mode in ("batching on", "batching off"):
        assert report[mode]["sentences"] == 24 and report[mode]["failures"] == {}
        # Served bf16 beam-3 outputs are offline translate's with the same flags, up to ties
        # that the rounding of other batch shapes breaks otherwise (tests/serve/conftest.py,
        # Offline): one of the 48 answers at most, which translate gives with noise.
        differing = report[mode]["differing"]
        assert report[mode]["differ_from_offline"] == len(differing) <= 1, differing
        for answer in differing:  # (the sentences have no blank line: index = line)
            assert translates_with_noise(offline, settings, test_sentences[answer["index"]],
                                         [answer["served"]]), answer
    assert report["batching off"]["mean_batch"] == 1.0
    assert report["batching on"]["mean_batch"] >= 1.0
    assert report["offline translate"]["sentences"] == 24
    for mode in ("batching on", "batching off", "offline translate"):
        assert len(report[mode]["runs_sentences_per_s"]) == 2  # --repeat 2, medians reported
    on, off, offline = (report[mode]["sentences_per_s"]
                        for mode in ("batching on", "batching off", "offline translate"))
    assert report["ratios"]["on/off"] > 0 and report["ratios"]["on/offline"] > 0
    for name in ("on/off", "on/offline"):  # each run's ratio, and their median
        runs = report["ratios"][f"{name} runs"]
        assert len(runs) == 2 and min(runs) <= report["ratios"][name] <= max(runs)
    assert off in report["batching off"]["runs_sentences_per_s"] and offline > 0 and on > 0
