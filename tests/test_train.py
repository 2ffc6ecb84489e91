"""Tests of the slak-train CLI: a short CPU job end to end, checkpoint + resume, argument errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import require

require("sklearn", "slak-train's bundled data needs scikit-learn (extra 'train')")

from slak_triton import train  # noqa: E402
from slak_triton.sparse import DynamicSparsity, load_masked_state_dict  # noqa: E402


def _short(tmp_path, *extra):
    return ["--epochs", "1", "--max-steps-per-epoch", "3", "--batch-size", "16", "--output-dir", str(tmp_path),
            "--update-frequency", "2", "--no-progress", *extra]


def test_short_cpu_job_end_to_end_and_resume(tmp_path, capsys):
    seed = int(torch.randint(0, 1000, ()).item())
    assert train.main(_short(tmp_path, "--model-ema", "--seed", str(seed))) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy:" in out and "density" in out and "topology updates" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["held_out_images"] == 359  # the fixed 20% stratified split of the 1,797 digits
    assert 0.0 <= summary["held_out_accuracy"] <= 1.0
    assert abs(summary["density"] - 0.6) < 0.01
    assert summary["optimizer_steps"] == 3 and summary["topology_updates"] == 1
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 3 and ckpt["sparsity"]["steps"] == 3
    assert any(k.endswith("weight_mask") for k in ckpt["model"])
    # the checkpoint's weights are zero wherever its masks are
    model = train.build_model("digits", 1, 10, 0.0)
    load_masked_state_dict(model, ckpt["model"])
    for name, mod in model.named_modules():
        mask = getattr(mod, "weight_mask", None)
        if isinstance(mask, torch.Tensor):
            assert torch.all(mod.weight[mask == 0] == 0), name

    # resume: epoch 2 continues the counters, the masks' topology and the schedule
    args = _short(tmp_path, "--model-ema", "--seed", str(seed), "--resume", "auto")
    args[1] = "2"
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "epoch 2/2" in out and "epoch 1/2" not in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["topology_updates"] == 3  # steps 2, 4, 6 of the whole run
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=False)["sparsity"]["steps"] == 6


def test_dense_run_and_argument_errors(tmp_path, capsys):
    assert train.main(_short(tmp_path, "--no-sparse")) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["density"] == 1.0 and summary["topology_updates"] == 0
    assert train.main(_short(tmp_path, "--density", "0")) == 2
    assert "--density" in capsys.readouterr().err
    assert train.main(_short(tmp_path, "--resume", str(tmp_path / "missing.pth"))) == 2
    with pytest.raises(SystemExit):
        train.main(["--growth", "magic"])
    with pytest.raises(SystemExit):  # needs a loaded sparse model: not a slak-train choice (--resume restores masks)
        train.main(["--sparse-init", "from_weights"])
    assert train.main(_short(tmp_path, "--fix", "--no-sparse")) == 2
    assert "--fix" in capsys.readouterr().err


def test_fix_keeps_the_initial_masks(tmp_path, capsys):
    # official --fix: static masks; with --update-frequency 1 every step would otherwise move the topology
    assert train.main(_short(tmp_path, "--fix", "--update-frequency", "1", "--sparse-init", "uniform")) == 0
    assert "topology fixed" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["topology_updates"] == 0 and summary["optimizer_steps"] == 3
    assert abs(summary["density"] - 0.6) < 0.01
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=False)
    assert ckpt["sparsity"]["schedule"]["update_frequency"] is None
    # the masks are the initial ones: the same seed draws them again in a fresh model
    model = train.build_model("digits", 1, 10, 0.0)
    opt = torch.optim.AdamW(model.parameters())
    fresh = DynamicSparsity(model, opt, sparse_init="uniform", total_steps=3, seed=0)
    for name, mask in fresh.masks.items():
        assert torch.equal(ckpt["sparsity"]["masks"][name], mask != 0), name


def test_module_entry_point_help():
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "slak_triton.train", "--help"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--data-path", "--sparse", "--density", "--update-frequency", "--prune-rate", "--growth",
                 "--sparse-init", "--model-ema", "--amp", "--resume", "--warmup-epochs", "--drop-path"):
        assert flag in r.stdout


def test_lr_schedule():
    lrs = [train.lr_at(s, 100, 10, 1e-3, 1e-6) for s in range(100)]
    assert lrs[9] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-5
