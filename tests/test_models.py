"""The SLaK network: parameter counts, official key layout, strict loading of an official-format checkpoint,
equality with an independent float64 implementation of the official forward, fuse, backbone mode, training.

Big variants are built on the meta device (no memory, no init cost). Numerics use ``slak_test``.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import rel_err, require

import slak_triton
from slak_triton.models import (
    MODEL_ENTRYPOINTS,
    SLaK,
    checkpoint_filter_fn,
    count_macs,
    count_parameters,
    load_official_checkpoint,
    register_timm_models,
    slak_base,
    slak_large,
    slak_small,
    slak_test,
    slak_tiny,
)
from slak_triton.nn import SparseLKConv

TEST_CFG = dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), kernel_size=(13, 11, 9, 7), small_kernel=5,
                num_classes=10)
# A second configuration with two blocks in a stage (block indices > 0) and a small kernel equal to K in the last
# stage (no small_conv there), still tiny.
TEST_CFG2 = dict(depths=(2, 1, 1, 1), dims=(8, 12, 16, 16), kernel_size=(13, 11, 9, 5), small_kernel=5,
                 num_classes=7)


# ----------------------------------------------------------------------------------------------------------------
# the official layout, written from the documented pattern (not from our modules)
# ----------------------------------------------------------------------------------------------------------------

def official_shapes(depths, dims, kernel_size, small_kernel, num_classes=1000, in_chans=3):
    """Key -> shape of the official SLaK state_dict (slak_reference.md)."""
    s = {"downsample_layers.0.0.weight": (dims[0], in_chans, 4, 4), "downsample_layers.0.0.bias": (dims[0],),
         "downsample_layers.0.1.weight": (dims[0],), "downsample_layers.0.1.bias": (dims[0],)}
    for i in (1, 2, 3):
        s[f"downsample_layers.{i}.0.weight"] = (dims[i - 1],)
        s[f"downsample_layers.{i}.0.bias"] = (dims[i - 1],)
        s[f"downsample_layers.{i}.1.weight"] = (dims[i], dims[i - 1], 2, 2)
        s[f"downsample_layers.{i}.1.bias"] = (dims[i],)
    N = small_kernel
    for st in range(4):
        C, K = dims[st], kernel_size[st]
        for b in range(depths[st]):
            p = f"stages.{st}.{b}."
            branches = {"LoRA1": (C, 1, K, N), "LoRA2": (C, 1, N, K)}
            if N < K:
                branches["small_conv"] = (C, 1, N, N)
            for br, shape in branches.items():
                s[p + f"large_kernel.{br}.conv.weight"] = shape
                for t in ("weight", "bias", "running_mean", "running_var"):
                    s[p + f"large_kernel.{br}.bn.{t}"] = (C,)
                s[p + f"large_kernel.{br}.bn.num_batches_tracked"] = ()
            s[p + "norm.weight"] = (C,)
            s[p + "norm.bias"] = (C,)
            s[p + "pwconv1.weight"] = (4 * C, C)
            s[p + "pwconv1.bias"] = (4 * C,)
            s[p + "pwconv2.weight"] = (C, 4 * C)
            s[p + "pwconv2.bias"] = (C,)
            s[p + "gamma"] = (C,)
    s["norm.weight"] = (dims[3],)
    s["norm.bias"] = (dims[3],)
    s["head.weight"] = (num_classes, dims[3])
    s["head.bias"] = (num_classes,)
    return s


def official_checkpoint(cfg, gen, sparsity=0.4):
    """A random official-format state_dict: every tensor fresh (no init values; layer scale large enough that the
    blocks matter), 40% of every 2-D / 4-D weight zeroed, BN statistics non-trivial."""
    shapes = official_shapes(cfg["depths"], cfg["dims"], cfg["kernel_size"], cfg["small_kernel"], cfg["num_classes"])
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(17)
        elif k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(shape, generator=gen)
        elif k.endswith("gamma"):
            sd[k] = 0.5 * torch.randn(shape, generator=gen)
        elif len(shape) == 1 and (k.endswith("norm.weight") or ".bn.weight" in k or k.endswith(".1.weight")
                                  or (k.startswith("downsample_layers") and k.endswith(".0.weight"))):
            sd[k] = 1 + 0.2 * torch.randn(shape, generator=gen)
        else:
            fan_in = max(1, torch.Size(shape[1:]).numel()) if len(shape) > 1 else 1
            scale = 0.3 if len(shape) == 1 else (1.0 / fan_in) ** 0.5
            sd[k] = scale * torch.randn(shape, generator=gen)
        if len(shape) in (2, 4):
            sd[k][torch.rand(shape, generator=gen) < sparsity] = 0
    return sd


def official_forward(sd, x, cfg):
    """The official SLaK forward written directly on the state_dict tensors in float64."""
    sd = {k: (v.double() if v.is_floating_point() else v) for k, v in sd.items()}
    x = x.double()

    def ln_cf(t, p):  # the official channels-first LayerNorm
        u = t.mean(1, keepdim=True)
        s = (t - u).pow(2).mean(1, keepdim=True)
        t = (t - u) / torch.sqrt(s + 1e-6)
        return sd[p + ".weight"][:, None, None] * t + sd[p + ".bias"][:, None, None]

    x = F.conv2d(x, sd["downsample_layers.0.0.weight"], sd["downsample_layers.0.0.bias"], stride=4)
    x = ln_cf(x, "downsample_layers.0.1")
    for st in range(4):
        if st > 0:
            x = ln_cf(x, f"downsample_layers.{st}.0")
            x = F.conv2d(x, sd[f"downsample_layers.{st}.1.weight"], sd[f"downsample_layers.{st}.1.bias"], stride=2)
        C = x.shape[1]
        for b in range(cfg["depths"][st]):
            p = f"stages.{st}.{b}."
            lk = 0
            for br in ("LoRA1", "LoRA2", "lkb_origin", "small_conv"):
                q = p + f"large_kernel.{br}."
                if q + "conv.weight" not in sd:
                    continue
                w = sd[q + "conv.weight"]
                y = F.conv2d(x, w, None, padding=(w.shape[-2] // 2, w.shape[-1] // 2), groups=C)
                lk = lk + F.batch_norm(y, sd[q + "bn.running_mean"], sd[q + "bn.running_var"], sd[q + "bn.weight"],
                                       sd[q + "bn.bias"], training=False, eps=1e-5)
            t = lk.permute(0, 2, 3, 1)
            t = F.layer_norm(t, (C,), sd[p + "norm.weight"], sd[p + "norm.bias"], 1e-6)
            t = F.linear(F.gelu(F.linear(t, sd[p + "pwconv1.weight"], sd[p + "pwconv1.bias"])),
                         sd[p + "pwconv2.weight"], sd[p + "pwconv2.bias"])
            x = x + (sd[p + "gamma"] * t).permute(0, 3, 1, 2)
    x = F.layer_norm(x.mean((-2, -1)), (x.shape[1],), sd["norm.weight"], sd["norm.bias"], 1e-6)
    return F.linear(x, sd["head.weight"], sd["head.bias"])


# ----------------------------------------------------------------------------------------------------------------
# sizes
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn,params,macs_g", [
    (slak_tiny, 50_703_838, 8.70), (slak_small, 91_131_820, 16.60), (slak_base, 157_950_792, 28.51)])
def test_dense_parameter_counts_and_official_layout(fn, params, macs_g):
    with torch.device("meta"):
        model = fn()
    assert count_parameters(model, nonzero=False) == params
    assert sum(p.numel() for p in model.parameters()) == params
    d = model.dims
    shapes = official_shapes(model.depths, d, (51, 49, 47, 13), 5)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    # 1-D parameters count in full, 2-D / 4-D weights at the published 40% sparsity
    dense_2d4d = sum(p.numel() for p in model.parameters() if p.dim() in (2, 4))
    assert count_parameters(model, density=0.6) == params - dense_2d4d + sum(
        round(0.6 * p.numel()) for p in model.parameters() if p.dim() in (2, 4))
    assert round(count_macs(model) / 1e9, 2) == macs_g


def test_published_sparse_sizes():
    with torch.device("meta"):
        tiny, base = slak_tiny(), slak_base()
    assert round(count_parameters(tiny, density=0.6) / 1e6) == 30    # published 30M
    assert round(count_parameters(base, density=0.6) / 1e6) == 95    # published 95M
    assert round(count_macs(base, density=0.6) / 1e9, 1) == 17.1     # published 17.1G
    assert round(count_macs(tiny, density=0.6) / 1e9, 1) == 5.2      # published 5.0G (uniform density: 5.2)
    with pytest.raises(ValueError, match="nonzero"):
        count_parameters(tiny, nonzero=True)
    with pytest.raises(ValueError, match="density"):
        count_macs(tiny, density=1.5)


def test_widths_and_large_variant():
    with torch.device("meta"):
        assert slak_tiny().dims == (124, 249, 499, 998)
        assert slak_base().dims == (166, 332, 665, 1331)
        large = slak_large()
        assert large.dims == (249, 499, 998, 1996) and large.depths == (3, 3, 27, 3)
        assert slak_tiny(width_factor=1.0).dims == (96, 192, 384, 768)


def test_count_nonzero_follows_masks(gen):
    model = slak_test()
    conv = model.stages[0][0].large_kernel.LoRA1.conv
    lin = model.stages[1][0].pwconv1
    dense = count_parameters(model, nonzero=False)
    assert count_parameters(model) == dense  # trunc_normal init has no zeros
    conv.weight_mask = (torch.rand(conv.weight.shape, generator=gen) < 0.5).float()
    lin.register_buffer("weight_mask", (torch.rand(lin.weight.shape, generator=gen) < 0.3).float())
    removed = int((conv.weight_mask == 0).sum() + (lin.weight_mask == 0).sum())
    assert count_parameters(model) == dense - removed
    m_dense = count_macs(model, (3, 32, 32))
    m_sparse = count_macs(model, (3, 32, 32), nonzero=True)
    # LoRA1 of stage 0 runs on 8 x 8 positions, pwconv1 of stage 1 on 4 x 4 tokens
    assert m_dense - m_sparse == 64 * int((conv.weight_mask == 0).sum()) + 16 * int((lin.weight_mask == 0).sum())


# ----------------------------------------------------------------------------------------------------------------
# official checkpoints
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [TEST_CFG, TEST_CFG2])
def test_official_checkpoint_loads_strictly_and_matches_official_forward(gen, cfg):
    sd = official_checkpoint(cfg, gen)
    model = SLaK(**cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    lk = model.stages[0][0].large_kernel
    assert torch.equal(lk.LoRA1.conv.weight_mask, (sd["stages.0.0.large_kernel.LoRA1.conv.weight"] != 0).float())
    model.eval()
    x = torch.randn(2, 3, 32, 32, generator=gen)
    ref = official_forward(sd, x, cfg)
    with torch.no_grad(), slak_triton.use_backend("reference"):
        y = model(x)
        y_cl = model(x.to(memory_format=torch.channels_last))
        model.fuse()
        y_fused = model(x)
    assert rel_err(y, ref) < 1e-5
    assert rel_err(y_cl, ref) < 1e-5
    assert rel_err(y_fused, ref) < 1e-5
    assert rel_err(y_fused, y) < 1e-5
    assert all(m.fused for m in model.modules() if isinstance(m, SparseLKConv))


def test_load_official_checkpoint_unwraps_and_reports(gen, tmp_path):
    sd = official_checkpoint(TEST_CFG, gen)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    ckpt = {"model": {"module." + k: v for k, v in sd.items()}, "model_ema": ema, "epoch": 299,
            "optimizer": {"state": {}}}
    model = slak_test()
    load_official_checkpoint(model, ckpt)
    assert torch.equal(model.head.weight, sd["head.weight"])
    load_official_checkpoint(model, ckpt, use_ema=True)
    assert torch.equal(model.head.weight, ema["head.weight"])
    path = tmp_path / "checkpoint-best.pth"
    torch.save(ckpt, path)
    fresh = slak_test()
    load_official_checkpoint(fresh, str(path))
    assert torch.equal(fresh.downsample_layers[1][1].weight, sd["downsample_layers.1.1.weight"])
    broken = dict(sd)
    del broken["stages.2.0.gamma"]
    broken["stages.2.0.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"missing keys \(1\): stages\.2\.0\.gamma"):
        load_official_checkpoint(slak_test(), broken)
    with pytest.raises(RuntimeError, match=r"unexpected keys \(1\): stages\.2\.0\.extra"):
        load_official_checkpoint(slak_test(), broken)
    with pytest.raises(ValueError, match="model_ema"):
        checkpoint_filter_fn({"model": sd}, use_ema=True)
    with pytest.raises(TypeError, match="path_or_dict"):
        load_official_checkpoint(slak_test(), 3)


def test_mask_buffers_on_other_layers_still_load_strictly(gen):
    """The sparse trainer masks Linear / Conv2d weights too; a mask-free checkpoint must still load strictly."""
    sd = official_checkpoint(TEST_CFG, gen)
    sd["head.weight"] = torch.randn(sd["head.weight"].shape, generator=gen)  # dense: its mask becomes None
    model = slak_test()
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and "weight_mask" not in m._buffers:
            m.register_buffer("weight_mask", torch.ones_like(m.weight))
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.stages[1][0].pwconv2.weight_mask, (sd["stages.1.0.pwconv2.weight"] != 0).float())
    assert torch.equal(model.downsample_layers[0][0].weight_mask, (sd["downsample_layers.0.0.weight"] != 0).float())
    assert model.head.weight_mask is None


# ----------------------------------------------------------------------------------------------------------------
# backbone mode
# ----------------------------------------------------------------------------------------------------------------

def test_features_only(gen):
    sd = official_checkpoint(TEST_CFG, gen)
    backbone = slak_test(features_only=True, out_indices=(0, 2, 3))
    assert [f["num_chs"] for f in backbone.feature_info] == [8, 16, 16]
    assert [f["reduction"] for f in backbone.feature_info] == [4, 16, 32]
    keys = set(backbone.state_dict())
    assert {"norm0.weight", "norm2.bias", "norm3.weight"} <= keys
    assert not any(k.startswith(("head.", "norm.", "norm1.")) for k in keys)
    # a classifier checkpoint loads into the backbone once filtered (the norms per output are new)
    filtered = checkpoint_filter_fn({"model": {"backbone." + k: v for k, v in sd.items()}}, backbone)
    assert "head.weight" not in filtered and "norm.weight" not in filtered and "stages.0.0.gamma" in filtered
    result = load_official_checkpoint(backbone, {"model": sd})  # strict, except for the new norms
    assert sorted(result.missing_keys) == ["norm0.bias", "norm0.weight", "norm2.bias", "norm2.weight",
                                           "norm3.bias", "norm3.weight"]
    assert not result.unexpected_keys
    with torch.no_grad():
        for i in (0, 2, 3):
            getattr(backbone, f"norm{i}").weight.normal_(generator=gen)
    backbone.eval()
    x = torch.randn(2, 3, 64, 32, generator=gen)
    with torch.no_grad(), slak_triton.use_backend("reference"):
        feats = backbone(x)
        classifier = slak_test().eval()
        classifier.load_state_dict(sd)
        s0 = classifier.stages[0](classifier.downsample_layers[0](x))
    assert [tuple(f.shape) for f in feats] == [(2, 8, 16, 8), (2, 16, 4, 2), (2, 16, 2, 1)]
    n0 = backbone.norm0
    ref0 = F.layer_norm(s0.permute(0, 2, 3, 1), (8,), n0.weight, n0.bias, 1e-6).permute(0, 3, 1, 2)
    assert rel_err(feats[0], ref0) < 1e-5
    with pytest.raises(ValueError, match="out_indices"):
        slak_test(features_only=True, out_indices=(4,))


def test_forward_features_and_head(gen):
    model = slak_test(num_classes=5).eval()
    x = torch.randn(3, 3, 64, 64, generator=gen)
    with torch.no_grad(), slak_triton.use_backend("reference"):
        f = model.forward_features(x)
        pre = model.forward_head(f, pre_logits=True)
        logits = model(x)
    assert f.shape == (3, 16, 2, 2) and pre.shape == (3, 16) and logits.shape == (3, 5)
    assert rel_err(model.head(pre), logits) < 1e-6
    model.reset_classifier(0)
    with torch.no_grad(), slak_triton.use_backend("reference"):
        assert model(x).shape == (3, 16)


# ----------------------------------------------------------------------------------------------------------------
# init, training, validation
# ----------------------------------------------------------------------------------------------------------------

def test_official_init_and_drop_path_schedule():
    torch.manual_seed(0)
    model = SLaK(depths=(2, 2, 2, 2), dims=(16, 32, 64, 128), kernel_size=(13, 11, 9, 7), drop_path_rate=0.35,
                 head_init_scale=0.5, num_classes=100)
    w = torch.cat([m.weight.detach().flatten() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                   and m is not model.head])
    assert abs(float(w.std()) - 0.02) < 1e-3 and float(w.abs().max()) <= 2.0
    assert all(float(m.bias.detach().abs().max()) == 0 for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None)
    assert abs(float(model.head.weight.detach().std()) - 0.01) < 1.5e-3
    assert torch.equal(model.stages[1][0].gamma, torch.full((32,), 1e-6))
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.stages for b in s]
    assert rates == pytest.approx([0.35 * i / 7 for i in range(8)])


def test_training_steps_reduce_the_loss(gen):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = slak_test(drop_path_rate=0.1, layer_scale_init_value=0.1).train()
    x = torch.randn(16, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (16,), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    with slak_triton.use_backend("reference"):
        for _ in range(30):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    lk = model.stages[0][0].large_kernel
    assert int(lk.LoRA2.bn.num_batches_tracked) == 30
    assert lk.LoRA1.conv.weight.grad is not None and lk.small_conv.conv.weight.grad is not None


@pytest.mark.parametrize("kwargs,match", [
    (dict(depths=(1, 1, 1), dims=(8, 8, 8, 8)), "depths"),
    (dict(depths=(1, 1, 1, 1), dims=(8, 8, 0, 8)), "dims"),
    (dict(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), kernel_size=(13, 12, 9, 7)), "kernel_size"),
    (dict(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), num_classes=-1), "num_classes"),
    (dict(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), drop_path_rate=1.0), "drop_path_rate"),
])
def test_invalid_config_names_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SLaK(**kwargs)


def test_pretrained_flag_is_refused():
    with pytest.raises(ValueError, match="load_official_checkpoint"):
        slak_tiny(pretrained=True)


# ----------------------------------------------------------------------------------------------------------------
# Triton path: one block under the interpreter (compiled on GPU)
# ----------------------------------------------------------------------------------------------------------------

def test_block_forward_through_triton(gen, device):
    sd = official_checkpoint(TEST_CFG, gen)
    model = slak_test().eval()
    model.load_state_dict(sd)
    block = model.stages[0][0]
    x = torch.randn(1, 8, 8, 8, generator=gen)
    # float64 reference of the block from the official formulas
    sub = {k[len("stages.0.0."):]: v.double() if v.is_floating_point() else v
           for k, v in sd.items() if k.startswith("stages.0.0.")}
    x64 = x.double()
    lk = 0
    for br in ("LoRA1", "LoRA2", "small_conv"):
        w = sub[f"large_kernel.{br}.conv.weight"]
        yb = F.conv2d(x64, w, padding=(w.shape[-2] // 2, w.shape[-1] // 2), groups=8)
        lk = lk + F.batch_norm(yb, sub[f"large_kernel.{br}.bn.running_mean"], sub[f"large_kernel.{br}.bn.running_var"],
                               sub[f"large_kernel.{br}.bn.weight"], sub[f"large_kernel.{br}.bn.bias"], False, eps=1e-5)
    t = F.layer_norm(lk.permute(0, 2, 3, 1), (8,), sub["norm.weight"], sub["norm.bias"], 1e-6)
    t = F.linear(F.gelu(F.linear(t, sub["pwconv1.weight"], sub["pwconv1.bias"])), sub["pwconv2.weight"],
                 sub["pwconv2.bias"])
    ref = x64 + (sub["gamma"] * t).permute(0, 3, 1, 2)
    n0 = slak_triton.LAUNCH_COUNTS["fwd"]
    block.to(device)
    with torch.no_grad(), slak_triton.use_backend("triton"):
        y = block(x.to(device)).cpu()
    assert slak_triton.LAUNCH_COUNTS["fwd"] == n0 + 1
    assert rel_err(y - x, ref - x64) < 1e-4


# ----------------------------------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------------------------------

def test_registration_with_a_fake_registry():
    registered = {}
    names = register_timm_models(lambda fn: registered.setdefault(fn.__name__, fn))
    assert set(names) == set(registered) == {"slak_tiny", "slak_small", "slak_base", "slak_large",
                                             "slak_convnext_tiny", "slak_test"}
    # timm (>= 1.0.13) calls entry points with these keyword arguments
    m = registered["slak_tiny"](pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
                                num_classes=21, device="meta")
    assert isinstance(m, SLaK) and m.head.out_features == 21 and m.head.weight.is_meta
    assert MODEL_ENTRYPOINTS["slak_test"] is slak_test
    # the module path accepts (and ignores) what timm passes, without timm
    with torch.device("meta"):
        m = slak_tiny(pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir="/nonexistent", num_classes=3)
    assert m.head.out_features == 3


def test_timm_create_model():
    timm = require("timm", "timm is an optional extra (pip install slak_triton[timm])")
    m = timm.create_model("slak_tiny", device="meta")
    assert isinstance(m, SLaK) and count_parameters(m, nonzero=False) == 50_703_838
