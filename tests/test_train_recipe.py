"""slak-train's recipe through timm on the bundled digits and on an ImageFolder tree: Mixup/CutMix, RandAugment,
RandomErasing, layer decay, gradient accumulation, --eval, --finetune with another class count, best checkpoints,
and the export to the official layout, loaded strictly by a model with the official key layout built here from the
documented pattern (slak_reference.md), not from this library's modules."""

import json
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import rel_err, require
from test_models import official_forward

require("sklearn", "slak-train's bundled data needs scikit-learn (extra 'train')")
require("timm", "the recipe needs timm (extra 'timm')")
PIL_Image = require("PIL.Image", "ImageFolder data needs torchvision and Pillow")
require("torchvision", "ImageFolder data needs torchvision")

from slak_triton import train, use_backend  # noqa: E402
from slak_triton.models import SLaK  # noqa: E402
from slak_triton.sparse import load_masked_state_dict  # noqa: E402

RECIPE = ["--mixup", "0.8", "--cutmix", "1.0", "--aa", train.OFFICIAL_AA, "--reprob", "0.25", "--layer-decay", "0.7",
          "--smoothing", "0.1"]


def _short(tmp_path, *extra, steps=4):
    return ["--epochs", "1", "--max-steps-per-epoch", str(steps), "--batch-size", "8", "--output-dir", str(tmp_path),
            "--update-frequency", "1", "--no-progress", "--seed", str(int(torch.randint(0, 1000, ()))), *extra]


# ----------------------------------------------------------------------------------------------------------------
# the official module tree, written from the documented key pattern
# ----------------------------------------------------------------------------------------------------------------

class _Affine(nn.Module):
    """The official LayerNorm's parameters (weight, bias)."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))


def _conv_bn(c, kh, kw):
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(c, c, (kh, kw), padding=(kh // 2, kw // 2), groups=c, bias=False),
                              bn=nn.BatchNorm2d(c)))


class OfficialSLaK(nn.Module):
    """Key layout of the official SLaK (decomposed large kernels); forward is ``official_forward`` of test_models."""

    def __init__(self, in_chans, num_classes, depths, dims, kernel_size, small_kernel):
        super().__init__()
        self.downsample_layers = nn.ModuleList([nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, 4), _Affine(dims[0]))])
        for i in range(1, 4):
            self.downsample_layers.append(nn.Sequential(_Affine(dims[i - 1]), nn.Conv2d(dims[i - 1], dims[i], 2, 2)))
        self.stages = nn.ModuleList()
        for s in range(4):
            c, k, n = dims[s], kernel_size[s], small_kernel
            blocks = []
            for _ in range(depths[s]):
                b = nn.Module()
                b.large_kernel = nn.Module()
                b.large_kernel.LoRA1, b.large_kernel.LoRA2 = _conv_bn(c, k, n), _conv_bn(c, n, k)
                if n < k:
                    b.large_kernel.small_conv = _conv_bn(c, n, n)
                b.norm, b.pwconv1, b.pwconv2 = nn.LayerNorm(c), nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
                b.gamma = nn.Parameter(torch.ones(c))
                blocks.append(b)
            self.stages.append(nn.Sequential(*blocks))
        self.norm, self.head = nn.LayerNorm(dims[3]), nn.Linear(dims[3], num_classes)


def _check_export(path, model: SLaK, cfg, gen, key="model"):
    exported = torch.load(path, weights_only=True)[key]
    assert not any("weight_mask" in k for k in exported)
    official = OfficialSLaK(model.in_chans, model.num_classes, **cfg)
    official.load_state_dict(exported, strict=True)
    # the exported weights compute what the trained (masked) model computes
    x = torch.randn(2, model.in_chans, 32, 32, generator=gen)
    with torch.no_grad(), use_backend("reference"):
        y = model.eval()(x)
    assert rel_err(y, official_forward(exported, x, dict(cfg, num_classes=model.num_classes))) < 1e-5
    return exported


# ----------------------------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------------------------

def test_recipe_on_digits_best_checkpoints_export_eval_and_finetune(tmp_path, capsys, gen):
    run1 = tmp_path / "run1"
    assert train.main(_short(run1, *RECIPE, "--accum-iter", "2", "--model-ema")) == 0
    out = capsys.readouterr().out
    assert "1 epochs x 2 steps of 2 micro-batches" in out
    summary = json.loads((run1 / "summary.json").read_text())
    assert summary["optimizer_steps"] == 2 and summary["topology_updates"] == 2
    assert summary["best_held_out_accuracy"] == summary["held_out_accuracy"]
    for name in ("checkpoint-best.pth", "checkpoint-best-ema.pth", "checkpoint-last.pth", "model-official.pth"):
        assert (run1 / name).is_file(), name

    # the export loads strictly into the official key layout and computes what the trained model computes
    model = train.build_model("digits", 1, 10, 0.0)
    load_masked_state_dict(model, torch.load(run1 / "checkpoint-last.pth", weights_only=False)["model"])
    assert any(getattr(m, "weight_mask", None) is not None for m in model.modules())
    cfg = {k: v for k, v in train.DIGITS_MODEL.items()}
    exported = _check_export(run1 / "model-official.pth", model, cfg, gen)
    lora = exported["stages.0.0.large_kernel.LoRA1.conv.weight"]
    assert 0 < float((lora == 0).float().mean()) < 1  # sparsity as zeros
    ema = train.build_model("digits", 1, 10, 0.0)
    load_masked_state_dict(ema, torch.load(run1 / "checkpoint-last.pth", weights_only=False)["model_ema"])
    _check_export(run1 / "model-official.pth", ema, cfg, gen, key="model_ema")

    # --eval reports the checkpoint's accuracy without training
    best = torch.load(run1 / "checkpoint-best.pth", weights_only=False)
    assert train.main(["--eval", "--resume", str(run1 / "checkpoint-best.pth"), "--batch-size", "64"]) == 0
    out = capsys.readouterr().out
    assert f"held-out accuracy {100 * best['accuracy']:.2f}%" in out and "epoch" not in out

    # --finetune with another class count: the head is dropped and re-initialised, the rest is loaded
    run2 = tmp_path / "run2"
    assert train.main(_short(run2, "--finetune", str(run1 / "model-official.pth"), "--num-classes", "12",
                             "--no-sparse", "--epochs", "1", "--lr", "1e-9", "--min-lr", "1e-9", steps=1)) == 0
    out = capsys.readouterr().out
    assert "head re-initialised for 12 classes" in out
    tuned = torch.load(run2 / "checkpoint-last.pth", weights_only=False)["model"]
    assert tuned["head.weight"].shape == (12, 96)
    w0, w1 = exported["stages.1.0.pwconv1.weight"], tuned["stages.1.0.pwconv1.weight"]
    assert rel_err(w1, w0) < 1e-3  # loaded, then one step at lr 1e-9

    # a checkpoint of another architecture is refused with the flag named
    assert train.main(_short(tmp_path / "run3", "--finetune", str(run1 / "model-official.pth"), "--model",
                             "slak_test", steps=1)) == 2
    assert "--finetune" in capsys.readouterr().err


def test_recipe_flags_validated_and_timm_named_when_missing(tmp_path, capsys, monkeypatch):
    for flags, name in ((["--mixup", "-1"], "--mixup"), (["--reprob", "1.5"], "--reprob"),
                        (["--layer-decay", "0"], "--layer-decay"), (["--accum-iter", "0"], "--accum-iter"),
                        (["--aa", "bogus"], "--aa"), (["--eval"], "--eval"), (["--crop-pct", "nan"], "--crop-pct"),
                        (["--finetune", str(tmp_path / "nope.pth")], "--finetune")):
        assert train.main(_short(tmp_path, *flags)) == 2, flags
        assert name in capsys.readouterr().err
    assert train.main(_short(tmp_path, "--accum-iter", "5", steps=4)) == 2
    assert "--accum-iter" in capsys.readouterr().err
    monkeypatch.setattr(train, "TimmMixup", None)
    assert train.main(_short(tmp_path, "--cutmix", "1.0")) == 2
    err = capsys.readouterr().err
    assert "--cutmix: needs timm" in err and "pip install" in err
    assert train.main(_short(tmp_path, "--no-sparse", steps=1)) == 0  # without the flags, no timm needed


def test_accumulation_equals_one_big_batch(gen):
    """Two micro-batches of 8 with --accum-iter 2 give the gradient of one batch of 16 (the loss is averaged)."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = train.build_model("digits", 1, 10, 0.0).eval()  # eval: BN statistics do not depend on the split
    x = torch.randn(16, 1, 32, 32, generator=gen)
    y = torch.randint(0, 10, (16,), generator=gen)
    args = train.build_parser().parse_args(["--accum-iter", "2"])
    recipe = train.build_recipe(args, 10)
    with use_backend("reference"):  # a whole network: F.conv2d, not the interpreter
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        full = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        for xs, ys in ((x[:8], y[:8]), (x[8:], y[8:])):
            (recipe.loss(model(xs), ys) / recipe.accum).backward()
    for a, b in zip(full, (p.grad for p in model.parameters())):
        assert rel_err(b, a) < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------------------------

def _image_folder(root, gen, classes=3, per_class=4, size=40):
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                pixels = (torch.rand(size, size + 3, 3, generator=gen) * 255).to(torch.uint8).numpy()
                PIL_Image.fromarray(pixels).save(d / f"{i}.png")
    return root


def test_imagefolder_recipe_end_to_end(tmp_path, gen):
    data = _image_folder(tmp_path / "data", gen)
    out = tmp_path / "run"
    assert train.main(_short(out, "--data-path", str(data), "--model", "slak_test", "--input-size", "32",
                             *RECIPE, "--batch-size", "4", steps=2)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["held_out_images"] == 12 and summary["optimizer_steps"] == 2
    model = SLaK(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), kernel_size=(13, 11, 9, 7), small_kernel=5,
                 num_classes=3)
    load_masked_state_dict(model, torch.load(out / "checkpoint-last.pth", weights_only=False)["model"])
    _check_export(out / "model-official.pth", model, dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16),
                                                          kernel_size=(13, 11, 9, 7), small_kernel=5), gen)
    # the evaluation transform: bicubic resize of the short side to 32 / 0.875 = 36, centre crop 32
    train_tf, val_tf = train.imagefolder_transforms(32, train.build_parser().parse_args([]))
    img = PIL_Image.fromarray((torch.rand(40, 50, 3, generator=gen) * 255).to(torch.uint8).numpy())
    x = val_tf(img)
    assert x.shape == (3, 32, 32)
    resize = [t for t in val_tf.transforms if type(t).__name__ == "Resize"][0]
    assert resize.size == 36 and "bicubic" in str(resize.interpolation).lower()
