"""timm's model API on SLaK, tested the way timm's own model tests do (create, forward, backward, features_only,
forward_intermediates, reset_classifier) for every variant at a small input size, plus the model family
(decompose=False, ConvNeXt mode) against an independent float64 forward of the official layout, and the
constructor / input validation.

Every variant runs at 32 x 32 (one pixel at the last stage). SLaK-S/B/L run at a reduced width (width_factor 0.1:
same depths and kernels, 10x fewer channels) so that the whole file stays within seconds on 2 cores; their full-width
sizes are checked on the meta device in test_models.py.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import rel_err, require
from test_models import official_checkpoint, official_forward

import slak_triton
from slak_triton import models
from slak_triton.models import SLaK, count_parameters, load_official_checkpoint
from slak_triton.nn import ReparamLKConv

timm = require("timm", "timm is an optional extra (pip install slak_triton[timm])")
timm_optim = require("timm.optim", "timm is an optional extra (pip install slak_triton[timm])")

SIZE = 32
# name -> extra kwargs that keep the test small (same depths and kernels, fewer channels)
VARIANTS = {
    "slak_test": {},
    "slak_tiny": dict(width_factor=0.1),
    "slak_small": dict(width_factor=0.1),
    "slak_base": dict(width_factor=0.1),
    "slak_large": dict(width_factor=0.1),
    "slak_convnext_tiny": dict(width_factor=0.25),
}


@pytest.fixture(autouse=True)
def _reference_backend():
    # whole networks through F.conv2d; the op itself is tested under the interpreter below and in test_lk_conv2d
    with slak_triton.use_backend("reference"):
        yield


def _x(gen, n=2, size=SIZE):
    return torch.randn(n, 3, size, size, generator=gen)


# ----------------------------------------------------------------------------------------------------------------
# timm's model tests, per variant
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_create_forward_backward(name, gen):
    model = timm.create_model(name, num_classes=7, **VARIANTS[name])
    assert isinstance(model, SLaK) and name in timm.list_models("slak_*")
    cfg = model.pretrained_cfg
    assert cfg["interpolation"] == "bicubic" and cfg["mean"] == models.IMAGENET_MEAN
    assert cfg["first_conv"] == "downsample_layers.0.0" and cfg["classifier"] == "head"
    assert model.get_submodule(cfg["first_conv"]).in_channels == 3
    model.train()
    x = _x(gen)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    params = dict(model.named_parameters())
    no_grad = [n for n, p in params.items() if p.grad is None]
    assert not no_grad, no_grad
    # the composition timm relies on
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape[1] == model.num_features and feats.shape[-1] == SIZE // 32
        assert rel_err(model.forward_head(feats), model(x)) < 1e-6
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_features_only_forward_intermediates_reset_classifier(name, gen):
    kw = VARIANTS[name]
    model = timm.create_model(name, **kw).eval()
    x = _x(gen)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert [t.shape[-1] for t in inter] == [8, 4, 2, 1]
        assert [t.shape[1] for t in inter] == [f["num_chs"] for f in model.feature_info]
        assert rel_err(final, model.forward_features(x)) < 1e-6 and torch.equal(final, inter[-1])
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape[-1] for t in only] == [2, 1]

    feat = timm.create_model(name, features_only=True, out_indices=(-1, 1), **kw).eval()
    with torch.no_grad():
        outs = feat(x)
    # timm's order semantics: outputs in stage order, and feature_info listed in the same order
    assert [o.shape[1] for o in outs] == feat.feature_info.channels()
    assert [SIZE // o.shape[-1] for o in outs] == feat.feature_info.reduction() == [8, 32]
    assert len(feat.model.stages) == 4

    short = timm.create_model(name, features_only=True, out_indices=(0, 1), **kw)
    assert len(short.model.stages) == 2  # stages after the last output are pruned
    with torch.no_grad():
        o0, o1 = short(x)
    assert (o0.shape[-1], o1.shape[-1]) == (8, 4)

    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)
    model.reset_classifier(5, "max")
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    model.reset_classifier(3, "")
    with torch.no_grad():
        assert model(x).shape == (2, 3, 1, 1)


def test_feature_wrapper_matches_the_model(gen):
    model = timm.create_model("slak_test").eval()
    feat = timm.create_model("slak_test", features_only=True, out_indices=(2, 0)).eval()
    feat.model.load_state_dict({k: v for k, v in model.state_dict().items()
                                if k.startswith(("downsample_layers.0.", "downsample_layers.1.",
                                                 "downsample_layers.2.", "stages.0.", "stages.1.", "stages.2."))})
    x = _x(gen)
    with torch.no_grad():
        outs = feat(x)
        _, inter = model.forward_intermediates(x)
    assert feat.feature_info.channels() == [8, 16] and feat.feature_info.reduction() == [4, 16]
    assert rel_err(outs[0], inter[0]) < 1e-6 and rel_err(outs[1], inter[2]) < 1e-6


def test_pretrained_cfg_and_data_config():
    model = timm.create_model("slak_tiny", device="meta")
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 224, 224) and data["crop_pct"] == 0.875
    assert data["interpolation"] == "bicubic" and data["mean"] == models.IMAGENET_MEAN
    assert timm.create_model("slak_test").pretrained_cfg["input_size"] == (3, 32, 32)


def test_timm_keyword_arguments_are_forwarded(tmp_path):
    # timm >= 1.0.13 passes cache_dir (the failure of issue 13); device / dtype reach the constructor
    m = timm.create_model("slak_test", cache_dir=str(tmp_path), dtype=torch.float64, drop_rate=0.25,
                          drop_path_rate=0.1, global_pool="max", in_chans=1)
    assert m.head.weight.dtype == torch.float64 and m.head_drop.p == 0.25 and m.global_pool == "max"
    assert m.downsample_layers[0][0].in_channels == 1


def test_module_path_without_timm(monkeypatch):
    monkeypatch.setattr(models, "_timm_build_model_with_cfg", None)
    m = models.TIMM_ENTRYPOINTS["slak_test"](pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None,
                                            cache_dir=None, num_classes=4)
    assert isinstance(m, SLaK) and m.head.out_features == 4


def test_pretrained_loads_pth_and_safetensors_from_a_path(gen, tmp_path):
    st = require("safetensors.torch", "safetensors comes with timm")
    cfg = dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), kernel_size=(13, 11, 9, 7), small_kernel=5,
               num_classes=10)
    sd = official_checkpoint(cfg, gen)
    pth, safe = tmp_path / "checkpoint-best.pth", tmp_path / "slak_test.safetensors"
    torch.save({"model": sd, "epoch": 3}, pth)
    st.save_file({k: v.contiguous() for k, v in sd.items()}, str(safe))
    for path in (pth, safe):
        m = timm.create_model("slak_test", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        assert torch.equal(m.stages[2][0].large_kernel.LoRA2.conv.weight, sd["stages.2.0.large_kernel.LoRA2.conv.weight"])
        assert torch.equal(m.head.weight, sd["head.weight"])
        # the masks come from the checkpoint's zeros
        lk = m.stages[0][0].large_kernel.LoRA1.conv
        assert torch.equal(lk.weight_mask, (sd["stages.0.0.large_kernel.LoRA1.conv.weight"] != 0).float())
        other = timm.create_model("slak_test", pretrained=True, num_classes=3,
                                  pretrained_cfg_overlay=dict(file=str(path)))
        assert other.head.out_features == 3 and torch.equal(other.norm.weight, sd["norm.weight"])
        fresh = models.slak_test()
        load_official_checkpoint(fresh, str(path))
        assert torch.equal(fresh.head.bias, sd["head.bias"])
    with pytest.raises(ValueError, match="pretrained_cfg_overlay"):
        timm.create_model("slak_test", pretrained=True)


def test_layer_decay_and_no_weight_decay():
    model = timm.create_model("slak_test", num_classes=5)
    names = [n for n, _ in model.named_parameters()]
    layers = timm.models.group_parameters(model, model.group_matcher(), reverse=True)
    assert set(layers) == set(names)
    assert layers["head.weight"] == max(layers.values()) > layers["norm.weight"]  # unmatched: the last group
    stem = {layers[n] for n in names if n.startswith("downsample_layers.0.")}
    assert stem == {0}
    # depth order: stem < stage 0 < downsample 1 == first block of stage 1 < ... < final norm
    assert layers["stages.0.0.gamma"] < layers["downsample_layers.1.1.weight"] == layers["stages.1.0.gamma"]
    assert layers["stages.3.0.pwconv2.weight"] == layers["norm.weight"]  # timm: the final norm joins the last block
    opt = timm_optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale = {}
    for g in opt.param_groups:
        for p in g["params"]:
            scale[id(p)] = (g["lr_scale"], g["weight_decay"])
    by_name = {n: scale[id(p)] for n, p in model.named_parameters()}
    assert by_name["head.weight"] == (1.0, 0.05)
    assert by_name["downsample_layers.0.0.weight"][0] == pytest.approx(0.5 ** max(layers.values()))
    assert by_name["stages.0.0.gamma"][1] == 0.0 and by_name["stages.0.0.pwconv1.weight"][1] == 0.05
    assert model.no_weight_decay() == {n for n, p in model.named_parameters() if p.dim() == 1}
    coarse = timm.models.group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    assert coarse["stages.2.0.norm.weight"] == coarse["downsample_layers.2.1.weight"]


# ----------------------------------------------------------------------------------------------------------------
# activation checkpointing
# ----------------------------------------------------------------------------------------------------------------

def _one_step(model, x, y):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # drop path
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_grad_checkpointing_matches_and_updates_bn_once(gen):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = models.slak_test(drop_path_rate=0.2, layer_scale_init_value=0.5).train()
    ckpt = models.slak_test(drop_path_rate=0.2, layer_scale_init_value=0.5).train()
    ckpt.load_state_dict(model.state_dict())
    ckpt.set_grad_checkpointing()
    x, y = _x(gen, n=4), torch.randint(0, 10, (4,), generator=gen)
    g0, g1 = _one_step(model, x, y), _one_step(ckpt, x, y)
    assert set(g0) == set(g1)
    for n in g0:
        assert rel_err(g1[n], g0[n]) < 1e-5, n
    for (n, a), b in zip(model.named_buffers(), ckpt.buffers()):
        assert torch.equal(a, b), n  # running statistics updated once, as without checkpointing
    assert int(ckpt.stages[0][0].large_kernel.LoRA1.bn.num_batches_tracked) == 1


def test_grad_checkpointing_through_the_triton_op(gen, device):
    # one block with BN in training mode, small enough for the interpreter
    stage = models.SLaKStage(2, 1, 7, 3, [0.0], 0.5, True).to(device).train()
    ref = models.SLaKStage(2, 1, 7, 3, [0.0], 0.5, True).to(device).train()
    ref.load_state_dict(stage.state_dict())
    stage.grad_checkpointing = True
    x = torch.randn(2, 2, 5, 5, generator=gen).to(device)
    w = torch.randn(2, 2, 5, 5, generator=gen).to(device)
    n0 = slak_triton.LAUNCH_COUNTS["fwd"]
    with slak_triton.use_backend("triton"):
        (stage(x) * w).sum().backward()
        n1 = slak_triton.LAUNCH_COUNTS["fwd"]
        (ref(x) * w).sum().backward()
    assert slak_triton.LAUNCH_COUNTS["fwd"] - n1 < n1 - n0  # the checkpointed block ran twice
    for (n, a), b in zip(stage.named_parameters(), ref.parameters()):
        assert rel_err(a.grad, b.grad) < 1e-6, n
    for (n, a), b in zip(stage.named_buffers(), ref.buffers()):
        assert torch.equal(a, b), n


# ----------------------------------------------------------------------------------------------------------------
# the model family: decompose=False and ConvNeXt mode, official layouts written out here
# ----------------------------------------------------------------------------------------------------------------

def official_reparam_shapes(depths, dims, kernel_size, small_kernel, num_classes):
    """Key -> shape of the official SLaK state_dict with Decom=False (lkb_origin, small_conv when N < K)."""
    s = {"downsample_layers.0.0.weight": (dims[0], 3, 4, 4), "downsample_layers.0.0.bias": (dims[0],),
         "downsample_layers.0.1.weight": (dims[0],), "downsample_layers.0.1.bias": (dims[0],)}
    for i in (1, 2, 3):
        s[f"downsample_layers.{i}.0.weight"] = s[f"downsample_layers.{i}.0.bias"] = (dims[i - 1],)
        s[f"downsample_layers.{i}.1.weight"] = (dims[i], dims[i - 1], 2, 2)
        s[f"downsample_layers.{i}.1.bias"] = (dims[i],)
    for st in range(4):
        C, K = dims[st], kernel_size[st]
        for b in range(depths[st]):
            p = f"stages.{st}.{b}."
            branches = {"lkb_origin": (C, 1, K, K)}
            if small_kernel is not None and small_kernel < K:
                branches["small_conv"] = (C, 1, small_kernel, small_kernel)
            for br, shape in branches.items():
                s[p + f"large_kernel.{br}.conv.weight"] = shape
                for t in ("weight", "bias", "running_mean", "running_var"):
                    s[p + f"large_kernel.{br}.bn.{t}"] = (C,)
                s[p + f"large_kernel.{br}.bn.num_batches_tracked"] = ()
            s[p + "norm.weight"] = s[p + "norm.bias"] = (C,)
            s[p + "pwconv1.weight"], s[p + "pwconv1.bias"] = (4 * C, C), (4 * C,)
            s[p + "pwconv2.weight"], s[p + "pwconv2.bias"] = (C, 4 * C), (C,)
            s[p + "gamma"] = (C,)
    s["norm.weight"] = s["norm.bias"] = (dims[3],)
    s["head.weight"], s["head.bias"] = (num_classes, dims[3]), (num_classes,)
    return s


def _random_checkpoint(shapes, gen, sparsity=0.4):
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(5)
        elif k.endswith("running_var") or (len(shape) == 1 and k.endswith("weight")):
            sd[k] = 0.5 + torch.rand(shape, generator=gen)
        else:
            fan_in = max(1, math.prod(shape[1:])) if len(shape) > 1 else 1
            sd[k] = (0.3 if len(shape) == 1 else fan_in ** -0.5) * torch.randn(shape, generator=gen)
        if len(shape) in (2, 4):
            sd[k][torch.rand(shape, generator=gen) < sparsity] = 0
    return sd


@pytest.mark.parametrize("kernel_size,small_kernel", [((13, 11, 9, 7), 5), ((7, 7, 7, 7), None), ((9, 5, 3, 3), 5)])
def test_reparam_model_loads_official_layout_and_fuses(gen, kernel_size, small_kernel):
    cfg = dict(depths=(2, 1, 1, 1), dims=(8, 12, 16, 16), kernel_size=kernel_size, small_kernel=small_kernel,
               num_classes=6)
    shapes = official_reparam_shapes(**cfg)
    sd = _random_checkpoint(shapes, gen)
    model = SLaK(decompose=False, **cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    model.load_state_dict(sd, strict=True)
    model.eval()
    x = _x(gen)
    ref = official_forward(sd, x, cfg)
    with torch.no_grad():
        y = model(x)
        model.fuse()
        y_fused = model(x)
    assert rel_err(y, ref) < 1e-5 and rel_err(y_fused, ref) < 1e-5
    lk = model.stages[0][1].large_kernel
    assert isinstance(lk, ReparamLKConv) and lk.fused
    keys = {k for k in model.state_dict() if k.startswith("stages.0.1.large_kernel.") and "mask" not in k}
    assert keys == {"stages.0.1.large_kernel.lkb_reparam.weight", "stages.0.1.large_kernel.lkb_reparam.bias"}


def test_convnext_tiny_layout():
    m = models.slak_convnext_tiny(device="meta")
    assert m.dims == (96, 192, 384, 768) and m.depths == (3, 3, 9, 3)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == official_reparam_shapes(
        (3, 3, 9, 3), (96, 192, 384, 768), (7, 7, 7, 7), None, 1000)
    # ConvNeXt-T's 28,589,128 parameters, with a BatchNorm (2 C) instead of the depthwise bias (C) per block
    assert count_parameters(m, nonzero=False) == 28_589_128 + sum(d * c for d, c in zip(m.depths, m.dims))


def test_reparam_fuse_with_masks_through_the_op(gen, device):
    lk = ReparamLKConv(3, 9, 3)
    with torch.no_grad():
        for b in lk.branches():
            b.bn.running_mean.normal_(generator=gen)
            b.bn.running_var.uniform_(0.5, 1.5, generator=gen)
            b.bn.weight.normal_(generator=gen)
            b.conv.weight.normal_(generator=gen)
    lk.lkb_origin.conv.weight_mask = (torch.rand(3, 1, 9, 9, generator=gen) < 0.5).float()
    lk.small_conv.conv.weight_mask = (torch.rand(3, 1, 3, 3, generator=gen) < 0.5).float()
    lk.eval()
    x = torch.randn(2, 3, 7, 6, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        ref = lk(x)  # float64: the reference path, unfused
        lk.fuse()
        merged = lk.lkb_reparam
        # only taps that either branch had active are active after the merge
        assert torch.all(merged.weight[merged.weight_mask == 0] == 0)
        lk.to(device)
        with slak_triton.use_backend("triton"):
            y = lk(x.float().to(device))
    assert rel_err(y, ref) < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# validation (issue 15): constructor arguments, out_indices order, input size
# ----------------------------------------------------------------------------------------------------------------

TINY = dict(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), kernel_size=(7, 7, 5, 5))


@pytest.mark.parametrize("kwargs,match", [
    (dict(layer_scale_init_value=float("nan")), "layer_scale_init_value"),
    (dict(layer_scale_init_value=float("inf")), "layer_scale_init_value"),
    (dict(layer_scale_init_value="1e-6"), "layer_scale_init_value"),
    (dict(drop_path_rate=float("nan")), "drop_path_rate"),
    (dict(drop_rate=1.0), "drop_rate"),
    (dict(head_init_scale=float("nan")), "head_init_scale"),
    (dict(global_pool="mean"), "global_pool"),
    (dict(bn=1), "bn"),
    (dict(decompose="no"), "decompose"),
    (dict(small_kernel=4), "small_kernel"),
    (dict(small_kernel=None), "small_kernel"),
    (dict(features_only=True, out_indices=(0, 0)), "out_indices"),
    (dict(features_only=True, out_indices=(4,)), "out_indices"),
    (dict(in_chans=0), "in_chans"),
])
def test_invalid_arguments_raise_naming_them(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SLaK(**TINY, **kwargs)


def test_layer_scale_kept_or_dropped_as_asked():
    assert SLaK(**TINY, layer_scale_init_value=0.25).stages[0][0].gamma[0] == 0.25
    assert SLaK(**TINY, layer_scale_init_value=0).stages[0][0].gamma is None
    assert SLaK(**TINY, layer_scale_init_value=None).stages[0][0].gamma is None


@pytest.mark.parametrize("out_indices,stages", [((3, 0), [0, 3]), ((-1, 1), [1, 3]), ((2, -4, 1), [0, 1, 2]),
                                                (2, [2, 3])])
def test_features_only_info_in_the_order_of_the_outputs(gen, out_indices, stages):
    backbone = SLaK(**TINY, features_only=True, out_indices=out_indices).eval()
    with torch.no_grad():
        outs = backbone(_x(gen, n=1, size=64))
    assert [f["module"] for f in backbone.feature_info] == [f"stages.{i}" for i in stages]
    assert [64 // o.shape[-1] for o in outs] == [f["reduction"] for f in backbone.feature_info]
    assert {k[:5] for k in backbone.state_dict() if k.startswith("norm")} == {f"norm{i}" for i in stages}


@pytest.mark.parametrize("size", [(31, 64), (16, 16), (64, 8)])
def test_too_small_input_states_the_minimum(gen, size):
    model = models.slak_test().eval()
    with pytest.raises(ValueError, match=r"at least 32 x 32 pixels.*got %d x %d" % size):
        model(torch.randn(1, 3, *size, generator=gen))
    backbone = models.slak_test(features_only=True, out_indices=(0,)).eval()
    assert backbone(torch.randn(1, 3, 4, 4, generator=gen))[0].shape == (1, 8, 1, 1)  # needs one stage only
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 1, 32, 32, generator=gen))
