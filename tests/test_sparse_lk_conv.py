"""SparseLKConv (SLaK's large-kernel module), LKConv2d and convert_depthwise.

References are computed independently in float64 with F.conv2d / F.batch_norm from the module's own tensors.
Most tests run on the reference backend (fast, differentiable); the Triton tests are few and tiny because on a
CPU-only machine they run under the interpreter.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import rel_err

import slak_triton
import slak_triton.nn as stnn
from slak_triton.nn import ConvBN, LKConv2d, SparseLKConv, convert_depthwise, is_convertible_depthwise

BRANCHES = ("LoRA1", "LoRA2", "small_conv")


def randomize_(m: SparseLKConv, gen: torch.Generator) -> SparseLKConv:
    """Fresh non-trivial values for every weight and BN statistic (never the init's ones / zeros)."""
    with torch.no_grad():
        for b in m.branches():
            b.conv.weight.copy_(torch.randn(b.conv.weight.shape, generator=gen) * 0.2)
            if b.has_bn:
                C = b.bn.num_features
                b.bn.weight.copy_(1 + 0.3 * torch.randn(C, generator=gen))
                b.bn.bias.copy_(0.3 * torch.randn(C, generator=gen))
                b.bn.running_mean.copy_(0.3 * torch.randn(C, generator=gen))
                b.bn.running_var.copy_(0.5 + torch.rand(C, generator=gen))
    return m


def reference_forward(m: SparseLKConv, x: torch.Tensor, training: bool = False) -> torch.Tensor:
    """float64 sum over branches of BN(conv(x, w * mask)) computed from the module's tensors (official form)."""
    x = x.double()
    y = 0
    for b in m.branches():
        w = b.conv.weight.detach().double()
        if b.conv.weight_mask is not None:
            w = w * b.conv.weight_mask.double()
        kh, kw = w.shape[-2:]
        out = F.conv2d(x, w, None, padding=(kh // 2, kw // 2), groups=x.shape[1])
        if b.has_bn:
            bn = b.bn
            out = F.batch_norm(out, bn.running_mean.double().clone(), bn.running_var.double().clone(),
                               bn.weight.detach().double(), bn.bias.detach().double(), training=training,
                               eps=bn.eps)
        y = y + out
    if m.bias is not None:
        y = y + m.bias.detach().double().view(1, -1, 1, 1)
    return y


# ----------------------------------------------------------------------------------------------------------------
# structure
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("K,N", [(51, 5), (13, 3), (7, 7)])
def test_official_keys_and_shapes(K, N):
    C = 6
    m = SparseLKConv(C, K, N)
    sd = m.state_dict()
    expected = {}
    shapes = {"LoRA1": (C, 1, K, N), "LoRA2": (C, 1, N, K), "small_conv": (C, 1, N, N)}
    for br in BRANCHES:
        if br == "small_conv" and not N < K:
            continue
        expected[f"{br}.conv.weight"] = shapes[br]
        for s in ("weight", "bias", "running_mean", "running_var"):
            expected[f"{br}.bn.{s}"] = (C,)
        expected[f"{br}.bn.num_batches_tracked"] = ()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    for b in m.branches():
        kh, kw = b.conv.kernel_size
        assert type(b.conv) is nn.Conv2d
        assert b.conv.groups == C and b.conv.bias is None and b.conv.padding == (kh // 2, kw // 2)
        assert isinstance(b.bn, nn.BatchNorm2d)
        assert "weight_mask" in b.conv._buffers and b.conv.weight_mask is None
    assert hasattr(m, "small_conv") == (N < K)


def test_bn_false_has_no_bn_and_no_bias(gen):
    m = SparseLKConv(4, 9, 3, bn=False)
    assert set(m.state_dict()) == {"LoRA1.conv.weight", "LoRA2.conv.weight", "small_conv.conv.weight"}
    randomize_(m, gen).train()
    x = torch.randn(2, 4, 10, 11, generator=gen)
    with slak_triton.use_backend("reference"):
        y = m(x)
        m.fuse()
        assert m.bias is None and m.fused
        y2 = m(x)
    ref = reference_forward(m, x)
    assert rel_err(y, ref) < 1e-5 and rel_err(y2, ref) < 1e-5


@pytest.mark.parametrize("kwargs,exc", [
    (dict(channels=4, kernel_size=50), ValueError),
    (dict(channels=4, kernel_size=65), ValueError),
    (dict(channels=4, kernel_size=7, small_kernel=9), ValueError),
    (dict(channels=4, kernel_size=7, small_kernel=4), ValueError),
    (dict(channels=0), ValueError),
    (dict(channels=4.0), TypeError),
    (dict(channels=True), TypeError),
    (dict(channels=4, bn=1), TypeError),
])
def test_invalid_arguments_name_the_argument(kwargs, exc):
    with pytest.raises(exc) as info:
        SparseLKConv(**kwargs)
    bad = [k for k in kwargs if k in str(info.value)]
    assert bad, f"message does not name the argument: {info.value}"


def test_extra_repr_shows_kernels_density_and_fused(gen):
    m = SparseLKConv(4, 11, 3)
    m.LoRA1.conv.weight_mask = (torch.rand(m.LoRA1.conv.weight.shape, generator=gen) < 0.5).float()
    r = repr(m)
    assert "kernel_size=11" in r and "small_kernel=3" in r and "fused=False" in r
    dens = m.density()
    assert 0 < dens < 1 and f"density={dens:.3f}" in r
    assert "fused=True" in repr(m.eval().fuse())


# ----------------------------------------------------------------------------------------------------------------
# numerics: training, eval, fuse
# ----------------------------------------------------------------------------------------------------------------

def test_training_mode_uses_per_branch_batch_statistics(gen):
    C = 5
    m = randomize_(SparseLKConv(C, 11, 3), gen).train()
    before = copy.deepcopy(m)
    x = torch.randn(3, C, 9, 12, generator=gen, requires_grad=True)
    with slak_triton.use_backend("reference"):
        y = m(x)
    ref = reference_forward(before, x, training=True)
    assert rel_err(y, ref) < 1e-5
    # a single BN over the summed branches (or folded eval statistics) would give something else
    assert rel_err(reference_forward(before, x, training=False), ref) > 1e-2
    # running statistics updated per branch exactly like BatchNorm2d on that branch alone
    for b_new, b_old in zip(m.branches(), before.branches()):
        kh, kw = b_old.conv.kernel_size
        out = F.conv2d(x.detach().double(), b_old.conv.weight.double(), padding=(kh // 2, kw // 2), groups=C)
        mean = out.mean(dim=(0, 2, 3))
        var = out.var(dim=(0, 2, 3), unbiased=True)
        exp_mean = 0.9 * b_old.bn.running_mean.double() + 0.1 * mean
        exp_var = 0.9 * b_old.bn.running_var.double() + 0.1 * var
        assert torch.allclose(b_new.bn.running_mean.double(), exp_mean, rtol=1e-5, atol=1e-6)
        assert torch.allclose(b_new.bn.running_var.double(), exp_var, rtol=1e-5, atol=1e-6)
    # gradients reach every branch weight and the input, matching float64 autograd
    g = torch.randn(y.shape, generator=gen)
    (y * g).sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    m64 = copy.deepcopy(before).double().train()
    with slak_triton.use_backend("reference"):
        (m64(x64) * g.double()).sum().backward()
    assert rel_err(x.grad, x64.grad) < 1e-5
    for b, b64 in zip(m.branches(), m64.branches()):
        assert rel_err(b.conv.weight.grad, b64.conv.weight.grad) < 1e-5


def test_eval_is_one_call_and_matches_float64(gen, monkeypatch):
    C = 6
    m = randomize_(SparseLKConv(C, 13, 5), gen).eval()
    calls = []
    real = stnn.lk_conv2d

    def spy(x, weight, bias=None, **kw):
        calls.append((len(weight), bias is not None, kw.get("mask")))
        return real(x, weight, bias, **kw)

    monkeypatch.setattr(stnn, "lk_conv2d", spy)
    x = torch.randn(2, C, 15, 10, generator=gen)
    with slak_triton.use_backend("reference"):
        y = m(x)
        ref = reference_forward(m, x)
        assert calls == [(3, True, None)]
        calls.clear()
        m.train()
        m(x)
        assert len(calls) == 3, "training mode with BN needs one call per branch"
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("K,N", [(13, 5), (9, 9)])
def test_fuse_matches_unfused_eval(gen, K, N):
    C = 7
    m = randomize_(SparseLKConv(C, K, N), gen).eval()
    m.LoRA2.conv.weight_mask = (torch.rand(m.LoRA2.conv.weight.shape, generator=gen) < 0.6).float()
    x = torch.randn(2, C, 12, 14, generator=gen)
    ref = reference_forward(m, x)
    with slak_triton.use_backend("reference"):
        y = m(x)
        fused = copy.deepcopy(m).fuse()
        y_f = fused(x)
    assert rel_err(y, ref) < 1e-5
    assert rel_err(y_f, y) < 1e-5
    assert rel_err(y_f, ref) < 1e-5
    assert fused.fused and fused.bias is not None and fused.bias.shape == (C,)
    assert not any(b.has_bn for b in fused.branches())
    assert fused.LoRA2.conv.weight_mask is not None, "fuse() must keep the masks"
    keys = set(fused.state_dict())
    assert "bias" in keys and not any(".bn." in k for k in keys)
    assert fused.fuse() is fused  # idempotent


def test_masks_are_passed_to_the_op_and_applied(gen, monkeypatch):
    C = 4
    m = randomize_(SparseLKConv(C, 11, 3), gen).eval()
    masks = {}
    for br in ("LoRA1", "small_conv"):
        conv = getattr(m, br).conv
        masks[br] = (torch.rand(conv.weight.shape, generator=gen) < 0.5).float()
        conv.weight_mask = masks[br]
    seen = []
    real = stnn.lk_conv2d

    def spy(x, weight, bias=None, **kw):
        seen.append(kw.get("mask"))
        return real(x, weight, bias, **kw)

    monkeypatch.setattr(stnn, "lk_conv2d", spy)
    x = torch.randn(2, C, 9, 9, generator=gen)
    with slak_triton.use_backend("reference"):
        y = m(x)
    assert len(seen) == 1 and seen[0][0] is masks["LoRA1"] and seen[0][1] is None and seen[0][2] is masks["small_conv"]
    ref = reference_forward(m, x)
    assert rel_err(y, ref) < 1e-5
    # the weights under the zeros of the mask are non-zero: ignoring the mask would change the output
    unmasked = copy.deepcopy(m)
    for b in unmasked.branches():
        b.conv.weight_mask = None
    assert rel_err(reference_forward(unmasked, x), ref) > 1e-3


def test_channels_last_input(gen):
    C = 6
    m = randomize_(SparseLKConv(C, 9, 3), gen).eval()
    x = torch.randn(2, C, 11, 13, generator=gen)
    with slak_triton.use_backend("reference"):
        y = m(x.to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, reference_forward(m, x)) < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# state_dict and masks
# ----------------------------------------------------------------------------------------------------------------

def test_official_state_dict_without_masks_loads_strictly_and_derives_masks(gen):
    C, K, N = 4, 13, 5
    src = randomize_(SparseLKConv(C, K, N), gen)
    sd = src.state_dict()
    zero = {}
    for br in ("LoRA1", "LoRA2"):  # sparse branches store zeros; small_conv stays dense
        w = sd[f"{br}.conv.weight"]
        zero[br] = torch.rand(w.shape, generator=gen) < 0.4
        w[zero[br]] = 0
    assert not any("weight_mask" in k for k in sd)
    dst = SparseLKConv(C, K, N)
    dst.small_conv.conv.weight_mask = torch.ones_like(dst.small_conv.conv.weight)  # stale mask must go
    result = dst.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for br in ("LoRA1", "LoRA2"):
        mask = getattr(dst, br).conv.weight_mask
        assert mask is not None and mask.dtype == torch.float32
        assert torch.equal(mask, (~zero[br]).float())
    assert dst.small_conv.conv.weight_mask is None
    # the derived masks are now state: a round trip carries them, and a fresh module loads them
    sd2 = dst.state_dict()
    assert "LoRA1.conv.weight_mask" in sd2 and "small_conv.conv.weight_mask" not in sd2
    fresh = SparseLKConv(C, K, N)
    fresh.load_state_dict(sd2, strict=True)
    assert torch.equal(fresh.LoRA1.conv.weight_mask, sd2["LoRA1.conv.weight_mask"])


def test_state_dict_mask_key_wins_over_weight_zeros(gen):
    C, K, N = 3, 9, 3
    src = randomize_(SparseLKConv(C, K, N), gen)
    mask = (torch.rand(src.LoRA2.conv.weight.shape, generator=gen) < 0.5).float()
    src.LoRA2.conv.weight_mask = mask  # weight itself has no zeros: the mask says what is active
    dst = SparseLKConv(C, K, N)
    dst.load_state_dict(src.state_dict(), strict=True)
    assert torch.equal(dst.LoRA2.conv.weight_mask, mask)
    assert dst.LoRA1.conv.weight_mask is None


# ----------------------------------------------------------------------------------------------------------------
# Triton path (interpreter on CPU)
# ----------------------------------------------------------------------------------------------------------------

def test_triton_forward_eval_and_fused_one_launch_each(gen, device):
    C = 4
    m = randomize_(SparseLKConv(C, 13, 5), gen).eval()
    m.LoRA1.conv.weight_mask = (torch.rand(m.LoRA1.conv.weight.shape, generator=gen) < 0.6).float()
    x = torch.randn(1, C, 9, 10, generator=gen)
    ref = reference_forward(m, x)
    n0 = slak_triton.LAUNCH_COUNTS["fwd"]
    m.to(device)
    with torch.no_grad(), slak_triton.use_backend("triton"):
        y = m(x.to(device))
        n1 = slak_triton.LAUNCH_COUNTS["fwd"]
        y_f = m.fuse()(x.to(device))
    n2 = slak_triton.LAUNCH_COUNTS["fwd"]
    assert n1 - n0 == 1 and n2 - n1 == 1
    assert rel_err(y, ref) < 1e-4
    assert rel_err(y_f, ref) < 1e-4


# ----------------------------------------------------------------------------------------------------------------
# drop-in conversion
# ----------------------------------------------------------------------------------------------------------------

class _ConvNeXtLikeBlock(nn.Module):
    """The layout of timm's / torchvision's ConvNeXt block (conv_dw 7x7 with bias, then MLP)."""

    def __init__(self, dim):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        return x + self.mlp(self.norm(y)).permute(0, 3, 1, 2)


class _RepLKLike(nn.Module):
    """RepLKNet-style large-kernel unit: 31x31 and 5x5 depthwise conv+BN branches (padding='same' on one)."""

    def __init__(self, dim):
        super().__init__()
        self.lkb_origin = nn.Sequential(nn.Conv2d(dim, dim, 31, padding=15, groups=dim, bias=False), nn.BatchNorm2d(dim))
        self.small_conv = nn.Sequential(nn.Conv2d(dim, dim, 5, padding="same", groups=dim, bias=False),
                                        nn.BatchNorm2d(dim))

    def forward(self, x):
        return self.lkb_origin(x) + self.small_conv(x)


def _foreign_model(dim=8):
    return nn.Sequential(
        nn.Conv2d(3, dim, 4, stride=4),                                   # dense: not converted
        _ConvNeXtLikeBlock(dim),
        nn.Conv2d(dim, dim, 7, stride=2, padding=3, groups=dim),           # strided: not converted
        _RepLKLike(dim),
        nn.Conv2d(dim, dim, 3, padding=1, groups=dim),                     # below min_kernel_size: not converted
        nn.Conv2d(dim, dim, 7, padding=3, groups=dim, padding_mode="reflect"),  # not zero padding
        nn.Conv2d(dim, dim, (1, 9), padding=(0, 4), groups=dim),          # rectangular, converted
        SparseLKConv(dim, 9, 3),                                          # already on lk_conv2d: left alone
    )


def test_convert_depthwise_on_a_foreign_model(gen):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = _foreign_model().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
    randomize_(model[7], gen)
    x = torch.randn(2, 3, 64, 48, generator=gen)
    sd_before = model.state_dict()
    with torch.no_grad():
        ref = model.double()(x.double())
    model.float()
    converted = convert_depthwise(model, min_kernel_size=7)
    kinds = [type(m).__name__ for m in converted.modules() if isinstance(m, nn.Conv2d)]
    assert kinds.count("LKConv2d") == 3, kinds  # conv_dw (7x7), lkb_origin (31x31), the 1x9
    assert isinstance(converted[1].conv_dw, LKConv2d)
    assert isinstance(converted[3].lkb_origin[0], LKConv2d)
    assert type(converted[3].small_conv[0]) is nn.Conv2d, "5x5 is below min_kernel_size=7"
    assert type(converted[2]) is nn.Conv2d and type(converted[4]) is nn.Conv2d and type(converted[5]) is nn.Conv2d
    assert isinstance(converted[6], LKConv2d)
    assert type(converted[7].LoRA1.conv) is nn.Conv2d, "SparseLKConv branches are not replaced"
    assert set(converted.state_dict()) == set(sd_before), "conversion keeps the state_dict keys"
    converted.load_state_dict(sd_before, strict=True)
    with torch.no_grad(), slak_triton.use_backend("reference"):
        y = converted(x)
    assert rel_err(y, ref) < 1e-5
    # a smaller threshold converts the 5x5 as well
    assert isinstance(convert_depthwise(converted, min_kernel_size=5)[3].small_conv[0], LKConv2d)


def test_from_conv2d_copies_and_rejects(gen):
    conv = nn.Conv2d(4, 4, (9, 3), padding=(4, 1), groups=4, bias=True)
    with torch.no_grad():
        conv.weight.normal_(generator=gen)
        conv.bias.normal_(generator=gen)
    conv.register_buffer("weight_mask", (torch.rand(conv.weight.shape, generator=gen) < 0.5).float())
    lk = SparseLKConv.from_conv2d(conv)
    assert isinstance(lk, LKConv2d) and isinstance(lk, nn.Conv2d)
    assert torch.equal(lk.weight, conv.weight) and torch.equal(lk.bias, conv.bias)
    assert torch.equal(lk.weight_mask, conv.weight_mask)
    x = torch.randn(2, 4, 10, 7, generator=gen)
    ref = F.conv2d(x.double(), (conv.weight * conv.weight_mask).double(), conv.bias.double(), padding=(4, 1), groups=4)
    with torch.no_grad(), slak_triton.use_backend("reference"):
        assert rel_err(lk(x), ref) < 1e-5
    for bad in (nn.Conv2d(4, 8, 7, padding=3, groups=4), nn.Conv2d(4, 4, 7, padding=2, groups=4),
                nn.Conv2d(4, 4, 6, padding=3, groups=4), nn.Conv2d(4, 4, 7, padding=3, groups=4, dilation=2),
                nn.Linear(3, 3)):
        assert not is_convertible_depthwise(bad)
        with pytest.raises(ValueError, match="conv"):
            LKConv2d.from_conv2d(bad)
    with pytest.raises(ValueError, match="min_kernel_size"):
        convert_depthwise(nn.Sequential(), min_kernel_size=0)


def test_lkconv2d_triton_path(gen, device):
    conv = nn.Conv2d(3, 3, 7, padding=3, groups=3)
    lk = LKConv2d.from_conv2d(conv).to(device)
    x = torch.randn(1, 3, 8, 9, generator=gen)
    n0 = slak_triton.LAUNCH_COUNTS["fwd"]
    with torch.no_grad(), slak_triton.use_backend("triton"):
        y = lk(x.to(device))
    assert slak_triton.LAUNCH_COUNTS["fwd"] == n0 + 1
    ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=3, groups=3)
    assert rel_err(y, ref) < 1e-4


def test_convbn_single_branch(gen):
    b = ConvBN(3, (7, 3))
    assert set(b.state_dict()) == {"conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                                   "bn.num_batches_tracked"}
    b.eval()
    x = torch.randn(2, 3, 8, 8, generator=gen)
    with slak_triton.use_backend("reference"):
        y = b(x)
    w, bias = b.folded()
    ref = F.conv2d(x.double(), w.double(), bias.double(), padding=(3, 1), groups=3)
    assert rel_err(y, ref) < 1e-5
