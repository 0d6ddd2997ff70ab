"""Data-parallel training with torchrun: two processes on CPU (gloo) train one model."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from training.digits import write_digits

pytestmark = pytest.mark.unit


def test_torchrun_two_processes_train_one_model(tmp_path):
    """torchrun --nproc_per_node=2 -m training.train: rank 0 fits the head on Lite0's packaged
    ImageNet features, DDP hands it to rank 1, both fine-tune on their halves of each epoch.
    Expected: both ranks end with the same parameters after the same number of steps, the epoch
    covers the whole train split once (shards summed), only rank 0 writes, and the fine-tuned
    model is as good as the head it started from (digits: >= 90 % on val)."""
    data = tmp_path / "digits"
    write_digits(data, size=32, seed=0)
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2",
           "-m", "training.train", "--data-dir", str(data), "--output-dir", str(out),
           "--arch", "tf_efficientnet_lite0", "--weights", "package", "--head-from-features",
           "--no-feature-flips", "--freeze-bn-stats", "--image-size", "64", "--epochs", "1",
           "--batch-size", "32", "--lr", "1e-4", "--hflip-prob", "0", "--min-crop-scale", "0.8",
           "--workers", "0", "--feature-cache", str(tmp_path / "cache")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    ranks = re.findall(r"rank (\d) of 2: (\d+) optimizer steps, parameter checksum (\S+)", log)
    print(f"\n[torchrun] {ranks}")
    assert sorted(r for r, _, _ in ranks) == ["0", "1"]
    assert len({(steps, checksum) for _, steps, checksum in ranks}) == 1  # one model
    train_images = sum(1 for p in (data / "train").rglob("*.png"))
    assert int(ranks[0][1]) == train_images // (2 * 32)  # each step takes 32 images per rank
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_val_accuracy"] >= 0.9, metrics
    ckpt = torch.load(out / "checkpoint_best.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the model, not the DDP wrapper
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == \
        ["checkpoint_best.pt", "checkpoint_last.pt"]
