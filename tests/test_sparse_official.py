"""Tests of the official SLaK sparse-training behaviours in slak_triton.sparse (growth with real gradients and
momenta, EMA of grown weights, from_weights / resume, --only-L, sparse fine-tuning) and of its refusals (a second
manager, a foreign optimizer, a state or model that does not match).

The selections are checked against scores recomputed here independently (float64 unit sums of the gradients or
optimizer moments the step really produced) and the gradients against a float64 autograd run of the same model
without masks (what the official code computes: plain convolutions of zeroed weights)."""

import copy
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import rel_err
from slak_triton import block_shape, use_backend
from slak_triton.models import slak_test
from slak_triton.sparse import (
    DynamicSparsity,
    FrozenSparsity,
    MaskedEMA,
    cosine_prune_rate,
    freeze_sparsity,
    large_kernel_branches,
    load_masked_state_dict,
    solve_layer_densities,
)

FP32_TOL = 1e-4  # fp32 results against float64 references


@pytest.fixture(autouse=True)
def _reference_backend():
    with use_backend("reference"):
        yield


def _data(n=4, size=32):
    return torch.randn(n, 1, size, size), torch.randint(0, 10, (n,))


def _model(**kw):
    return slak_test(in_chans=1, **kw)


def _step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


# ---------------------------------------------------------------------------------------------------------------
# an independent model of units, pruning and growth (loops over blocks; float64)
# ---------------------------------------------------------------------------------------------------------------

def _units(weight, block):
    """[(neuron, slices)] of every unit of a weight: elements, or block_shape blocks of a [C, 1, kh, kw] weight."""
    if block is None:
        return [((i // (weight.numel() // weight.shape[0])), (i,)) for i in range(weight.numel())]
    C, _, kh, kw = weight.shape
    bh, bw = block
    return [(c, (c, 0, slice(i, i + bh), slice(j, j + bw)))
            for c in range(C) for i in range(0, kh, bh) for j in range(0, kw, bw)]


def _unit_values(t, units, block):
    t = t.detach().double()
    if block is None:
        flat = t.reshape(-1)
        return torch.stack([flat[u[1][0]] for u in units])
    return torch.stack([t[u[1]].sum() for u in units])


def _unit_sizes(weight, units, block):
    return _unit_values(torch.ones_like(weight), units, block)


def _check_growth(layer, old_mask, new_mask, w_after_step, score_elem, rate, neuron_shares=None):
    """The prune set is the k smallest active |w| units; the grown units are, per size class, exactly as many as
    pruned, and every grown unit scores at least as high as every candidate left out (per neuron for
    momentum_neuron, whose per-neuron counts must reach their shares)."""
    units = _units(layer.weight, layer.block)
    sizes = _unit_sizes(layer.weight, units, layer.block)
    old = _unit_values(old_mask, units, layer.block) > 0
    new = _unit_values(new_mask, units, layer.block) > 0
    mag = _unit_values((w_after_step * old_mask).abs(), units, layer.block)
    k = math.ceil(rate * int(old.sum()))
    order = sorted(range(len(units)), key=lambda i: (not old[i], float(mag[i]) if old[i] else 0.0))
    pruned = torch.zeros_like(old)
    pruned[order[:k]] = True
    assert bool((old & ~new & ~pruned).sum() == 0), "only the k smallest-magnitude units may be pruned"
    cand = ~old | pruned
    grown = new & cand
    # weights: grown from inactive start at 0; pruned and grown back keep their value (official: a no-op for them)
    w_now = _unit_values(layer.weight.abs(), units, layer.block)
    before = _unit_values((w_after_step * old_mask).abs(), units, layer.block)
    assert bool((w_now[new & ~old] == 0).all()) and bool((w_now[~new] == 0).all()), layer.name
    assert torch.equal(w_now[new & old], before[new & old]), layer.name
    score = _unit_values(score_elem.abs(), units, layer.block)
    neuron = torch.tensor([u[0] for u in units])
    for s in sizes.unique():
        cls = sizes == s
        kc = int((pruned & cls).sum())
        assert int((grown & cls).sum()) == kc, "as many units of each size grown as pruned"
        groups = [cls] if neuron_shares is None else [cls & (neuron == i) for i in range(layer.shape[0])]
        for grp in groups:
            g, left = score[grown & grp], score[cand & ~grown & grp]
            if g.numel() and left.numel():
                assert float(g.min()) >= float(left.max()) * (1 - 1e-6), (layer.name, float(g.min()), float(left.max()))
        if neuron_shares is not None:
            for i in range(layer.shape[0]):
                grp = cls & (neuron == i)
                share = min(math.floor(float(neuron_shares[i]) * kc), int((cand & grp).sum()))
                assert int((grown & grp).sum()) >= share, (layer.name, i)
    return grown


def _reference_grads(model, x, y):
    """float64 gradients of the same model with every mask removed (plain convolutions of the zeroed weights, as
    the official code computes them)."""
    ref = copy.deepcopy(model).double()
    for mod in ref.modules():
        if "weight_mask" in mod._buffers:
            mod._buffers["weight_mask"] = None
    F.cross_entropy(ref(x.double()), y).backward()
    return {n: p.grad for n, p in ref.named_parameters()}


def _capture_hook(model, opt, store):
    """A step post-hook registered before DynamicSparsity's: weights, gradients and optimizer state right after
    the optimizer's update, before the masks are re-applied and the topology moves."""
    def hook(o, args, kwargs):
        store["w"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        store["state"] = {n: {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
                          for n, p in model.named_parameters() if p in opt.state}
        store["masks"] = {n: m.clone() for n, m in ds_masks(model).items()}
    return opt.register_step_post_hook(hook)


def ds_masks(model):
    return {n + ".weight": m for n, mod in model.named_modules()
            if isinstance(m := mod._buffers.get("weight_mask"), torch.Tensor)}


# ---------------------------------------------------------------------------------------------------------------
# gradient and momentum growth
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("granularity", ["block", "element"])
def test_gradient_growth_reads_dense_large_kernel_gradients_on_update_steps_only(granularity):
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    store = {}
    _capture_hook(m, opt, store)
    ds = DynamicSparsity(m, opt, density=0.5, sparse_init="uniform", growth="gradient", prune_rate=0.5,
                         update_frequency=3, total_steps=100, lk_granularity=granularity)
    lk = {n + ".weight" for n in large_kernel_branches(m)} & set(ds.masks)
    assert len(lk) == 12
    for step in (1, 2, 3):
        x, y = _data()
        assert ds.dense_grad_next_step == (step == 3)
        ref = _reference_grads(m, x, y) if step == 3 else None
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        for name in lk:
            off = ds.masks[name] == 0
            if step < 3:  # ordinary steps: the masked, block-skipping weight gradient
                assert torch.all(grads[name][off] == 0), name
            else:  # the update step: the gradient of every tap, as the official plain convolution gives it
                assert rel_err(grads[name], ref[name]) <= FP32_TOL, name
        if step == 3:
            stage0 = "stages.0.0.large_kernel.LoRA1.conv.weight"  # 8x8 maps: every tap of 13x5 sees the image
            assert torch.count_nonzero(grads[stage0][ds.masks[stage0] == 0]) > 0
        old = {n: mk.clone() for n, mk in ds.masks.items()}
        opt.step()
    assert ds.topology_updates == 1
    rate = cosine_prune_rate(3, 0.5, 100)
    for layer in ds.layers:
        _check_growth(layer, old[layer.name], layer.mask, store["w"][layer.name], grads[layer.name], rate)


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_momentum_growth_scores_with_the_optimizer_moments(opt_name):
    m = _model()
    if opt_name == "adamw":
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.05)
    else:
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    store = {}
    _capture_hook(m, opt, store)
    ds = DynamicSparsity(m, opt, density=0.5, sparse_init="uniform", growth="momentum", prune_rate=0.5,
                         update_frequency=3, total_steps=100)
    stage0 = "stages.0.0.large_kernel.LoRA1.conv.weight"
    for step in (1, 2, 3):
        assert ds.dense_grad_next_step  # the moments must see dense gradients on every step, as officially
        x, y = _data()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        assert torch.count_nonzero(dict(m.named_parameters())[stage0].grad[ds.masks[stage0] == 0]) > 0
        old = {n: mk.clone() for n, mk in ds.masks.items()}
        opt.step()
    assert ds.topology_updates == 1
    rate = cosine_prune_rate(3, 0.5, 100)
    for layer in ds.layers:
        st = store["state"][layer.name]
        if opt_name == "adamw":  # the official score: exp_avg / (sqrt(exp_avg_sq) + 1e-8), no bias correction
            score = st["exp_avg"].double() / (st["exp_avg_sq"].double().sqrt() + 1e-8)
            assert torch.count_nonzero(st["exp_avg"][old[layer.name] == 0]) > 0  # inactive moments kept
        else:
            score = st["momentum_buffer"].double()
        _check_growth(layer, old[layer.name], layer.mask, store["w"][layer.name], score, rate)


def test_momentum_neuron_growth_shares_by_neuron_and_grows_exactly():
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    store = {}
    _capture_hook(m, opt, store)
    ds = DynamicSparsity(m, opt, density=0.5, sparse_init="uniform", growth="momentum_neuron", prune_rate=0.6,
                         update_frequency=2, total_steps=100)
    counts = {n: int((mk != 0).sum()) for n, mk in ds.masks.items()}
    for _ in range(2):
        old = {n: mk.clone() for n, mk in ds.masks.items()}
        _step(m, opt, *_data())
    rate = cosine_prune_rate(2, 0.6, 100)
    for layer in ds.layers:
        st = store["state"][layer.name]
        mom = (st["exp_avg"].double() / (st["exp_avg_sq"].double().sqrt() + 1e-8)).abs()
        v = mom.reshape(layer.shape[0], -1).mean(1)
        _check_growth(layer, old[layer.name], layer.mask, store["w"][layer.name], mom, rate,
                      neuron_shares=v / v.sum())
        assert int((layer.mask != 0).sum()) == counts[layer.name]  # exact, unlike the official floor-and-skip


def test_momentum_growth_needs_momentum_in_the_optimizer():
    m = _model()
    with pytest.raises(ValueError, match="momentum=0"):
        DynamicSparsity(m, torch.optim.SGD(m.parameters(), lr=0.1), sparse_init="uniform", growth="momentum",
                        total_steps=10)
    m = _model()
    ds = DynamicSparsity(m, torch.optim.SGD(m.parameters(), lr=0.1), sparse_init="uniform", total_steps=10)
    st = ds.state_dict()
    st["config"]["growth"] = "momentum"  # the checkpoint's settings win: checked against this optimizer
    with pytest.raises(ValueError, match="momentum=0"):
        ds.load_state_dict(st)
    assert ds.growth == "random"
    m = _model()
    opt = torch.optim.Adagrad(m.parameters(), lr=0.1)  # state without moments: refused at the first update
    ds = DynamicSparsity(m, opt, sparse_init="uniform", growth="momentum", update_frequency=1, total_steps=10)
    with pytest.raises(RuntimeError, match="exp_avg"):
        _step(m, opt, *_data())
    ds.remove()


def test_dense_gradient_hooks_survive_copies_and_pickling():
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    ds = DynamicSparsity(m, opt, density=0.5, sparse_init="uniform", growth="gradient", update_frequency=1,
                         total_steps=10)
    assert ds.dense_grad_next_step
    twin = copy.deepcopy(m)  # e.g. MaskedEMA's copy: its hooks are inert, it holds no reference to ds
    x, y = _data()
    F.cross_entropy(twin(x), y).backward()
    name = "stages.0.0.large_kernel.LoRA1"
    lora = dict(twin.named_modules())[name]
    assert torch.all(lora.conv.weight.grad[lora.conv.weight_mask == 0] == 0)
    buf = io.BytesIO()
    torch.save(m, buf)  # whole-model pickling still works
    buf.seek(0)
    assert isinstance(torch.load(buf, weights_only=False), nn.Module)
    ds.remove()
    F.cross_entropy(m(x), y).backward()  # hooks gone: the masked gradient again
    lora = dict(m.named_modules())[name]
    assert torch.all(lora.conv.weight.grad[lora.conv.weight_mask == 0] == 0)


# ---------------------------------------------------------------------------------------------------------------
# EMA of grown weights
# ---------------------------------------------------------------------------------------------------------------

def test_masked_ema_copies_a_grown_weight_at_its_first_nonzero_step():
    m = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 5))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    ds = DynamicSparsity(m, opt, density=0.5, sparse_init="uniform", growth="random", prune_rate=0.5,
                         update_frequency=2, total_steps=100)
    decay = 0.9
    ema = MaskedEMA(m, decay=decay)
    ref = {n: p.detach().double().clone() for n, p in m.named_parameters()}  # the official formula, float64
    masks = [{n: mk.clone() for n, mk in ds.masks.items()}]
    lives = []
    for _ in range(5):
        x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
        ema.update(m)
        masks.append({n: mk.clone() for n, mk in ds.masks.items()})
        lives.append({n: p.detach().double().clone() for n, p in m.named_parameters()})
        for n, live in lives[-1].items():
            e = ref[n] * decay + live * (1 - decay)
            if n in masks[-1]:  # official ModelEma.update: (ema*d + live*(1-d))*mask + (mask & ema==0)*d*live
                on = masks[-1][n].double()
                e = e * on + on * (ref[n] == 0).double() * decay * live
            ref[n] = e
    ema_params = dict(ema.module.named_parameters())
    for n, e in ref.items():
        assert rel_err(ema_params[n], e) <= FP32_TOL, n
    assert ds.topology_updates == 2
    for n in ds.masks:  # grown at the update of step 2: weight 0 at step 2, moved by the step-3 update
        grown = (masks[2][n] != 0) & (masks[1][n] == 0)
        assert torch.all(lives[1][n][grown] == 0) and torch.count_nonzero(lives[2][n][grown]) > 0
    # and directly, without the reference: one more real step after a real growth
    mk_before = {n: mk.clone() for n, mk in ds.masks.items()}
    opt.zero_grad()
    F.cross_entropy(m(torch.randn(8, 12)), torch.randint(0, 5, (8,))).backward()
    opt.step()  # step 6: an update step (growth; grown weights are 0)
    ema.update(m)
    grown6 = {n: (ds.masks[n] != 0) & (mk_before[n] == 0) for n in ds.masks}
    opt.zero_grad()
    F.cross_entropy(m(torch.randn(8, 12)), torch.randint(0, 5, (8,))).backward()
    opt.step()  # step 7: the grown weights become non-zero
    ema.update(m)
    for n, g in grown6.items():
        live = dict(m.named_parameters())[n].detach()
        moved = g & (live != 0)  # (a grown weight whose gradient is 0, e.g. behind a pruned column, stays 0)
        assert moved.sum() > g.sum() // 2
        assert torch.equal(ema_params[n][moved], live[moved]), n  # no lag from 0
        assert torch.all(ema_params[n][g & (live == 0)] == 0)


# ---------------------------------------------------------------------------------------------------------------
# initialisation from existing weights (official --sparse_init resume)
# ---------------------------------------------------------------------------------------------------------------

def _sparse_checkpoint(granularity="block", steps=3, with_masks=True):
    """A model trained sparse for a few steps: its state_dict, with its masks (slak_triton) or without them
    (sparsity as zeros only, as the official checkpoints store it)."""
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    DynamicSparsity(m, opt, density=0.6, sparse_init="erk", update_frequency=2, total_steps=100,
                    lk_granularity=granularity)
    for _ in range(steps):
        _step(m, opt, *_data())
    return {k: v for k, v in m.state_dict().items() if with_masks or not k.endswith("weight_mask")}


@pytest.mark.parametrize("init", ["from_weights", "resume"])
def test_from_weights_keeps_every_surviving_weight(init):
    sd = _sparse_checkpoint()
    m = _model()
    load_masked_state_dict(m, sd)
    nonzero = {n: int(torch.count_nonzero(p)) for n, p in m.named_parameters() if p.dim() in (2, 4)}
    saved = {k[: -len("_mask")]: v != 0 for k, v in sd.items() if k.endswith("weight_mask")}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    ds = DynamicSparsity(m, opt, sparse_init=init, update_frequency=2, total_steps=100)
    assert ds.sparse_init == "from_weights"
    for layer in ds.candidates:
        w = layer.weight
        assert int(torch.count_nonzero(w)) == nonzero[layer.name], layer.name  # nothing zeroed
        if layer.mask is not None:  # the checkpoint's masks, block-aligned (grown blocks may hold exact zeros)
            assert torch.equal(layer.mask != 0, saved[layer.name]), layer.name
            assert torch.all(w[layer.mask == 0] == 0)
        else:
            assert layer.name not in saved
    total = sum(layer.numel for layer in ds.candidates)
    assert ds.overall_density() == pytest.approx(sum(int(saved[n].sum()) if n in saved else
                                                     ds._by_name[n].numel for n in ds._by_name) / total)
    assert ds.density == pytest.approx(ds.overall_density())
    for _ in range(2):  # and it trains on: exact counts through an update
        _step(m, opt, *_data())
    assert ds.topology_updates == 1
    # the official alias and a matching explicit density are accepted; a wrong one is not
    m2 = _model()
    load_masked_state_dict(m2, sd)
    with pytest.raises(ValueError, match="density"):
        DynamicSparsity(m2, torch.optim.AdamW(m2.parameters()), sparse_init="from_weights", density=0.3,
                        total_steps=10)
    DynamicSparsity(m2, torch.optim.AdamW(m2.parameters()), sparse_init="from_weights",
                    density=round(ds.overall_density(), 3), total_steps=10)


def test_from_weights_refuses_what_it_cannot_keep():
    # an elementwise-sparse (official) checkpoint, zeros only, does not fit block masks
    sd = _sparse_checkpoint("element", steps=1, with_masks=False)
    m = _model()
    m.load_state_dict(sd)
    nonzero = sum(int(torch.count_nonzero(p)) for p in m.parameters() if p.dim() in (2, 4))
    with pytest.raises(ValueError, match="lk_granularity='element'"):
        DynamicSparsity(m, torch.optim.AdamW(m.parameters()), sparse_init="from_weights", total_steps=10)
    ds = DynamicSparsity(m, torch.optim.AdamW(m.parameters()), sparse_init="from_weights", total_steps=10,
                         lk_granularity="element")
    total = sum(layer.numel for layer in ds.candidates)
    assert ds.overall_density() == pytest.approx(nonzero / total)
    assert nonzero == sum(int(torch.count_nonzero(p)) for p in m.parameters() if p.dim() in (2, 4))
    # a dense model: nothing to keep
    dense = _model()
    with pytest.raises(ValueError, match="sparse model"):
        DynamicSparsity(dense, torch.optim.AdamW(dense.parameters()), sparse_init="from_weights", total_steps=10)
    # a random init on a loaded sparse model would zero its surviving weights: refused, pointing at from_weights
    m = _model()
    load_masked_state_dict(m, _sparse_checkpoint())
    for init in ("uniform", "erk"):
        with pytest.raises(ValueError, match="from_weights"):
            DynamicSparsity(m, torch.optim.AdamW(m.parameters()), sparse_init=init, total_steps=10)


# ---------------------------------------------------------------------------------------------------------------
# sparse fine-tuning of a backbone (official sparse=True)
# ---------------------------------------------------------------------------------------------------------------

def test_freeze_sparsity_matches_the_official_backbone_loop():
    src = _model(features_only=True)
    sd = {}
    for k, v in src.state_dict().items():  # an official-style sparse checkpoint: zeros, no mask keys
        sd[k] = v * (torch.rand_like(v) > 0.4) if (v.dim() in (2, 4) and v.is_floating_point()) else v
    net = _model(features_only=True)
    net.load_state_dict(sd)
    official = _model(features_only=True)
    official.load_state_dict(sd)
    for mod in official.modules():  # the official model has no masks in its modules
        if "weight_mask" in mod._buffers:
            mod._buffers["weight_mask"] = None
    masks = {n: (p != 0) for n, p in official.named_parameters() if p.dim() in (2, 4)}
    assert len(masks) == 4 * 5 + 4  # stem, 3 downsample convs, per stage 3 branches + 2 Linear
    fz = freeze_sparsity(net)
    assert set(fz.masks) == masks.keys() and isinstance(fz, FrozenSparsity)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    opt_off = torch.optim.AdamW(official.parameters(), lr=1e-2)
    for _ in range(3):
        x = torch.randn(2, 1, 32, 32)
        with torch.no_grad():  # official SLaK.forward_features: apply_mask() first
            for n, p in official.named_parameters():
                if n in masks:
                    p.mul_(masks[n])
        outs_off = official(x)
        outs = net(x)
        for a, b in zip(outs, outs_off):
            assert rel_err(a, b) <= FP32_TOL
        for o, model, opt_ in ((outs, net, opt), (outs_off, official, opt_off)):
            opt_.zero_grad()
            sum(t.square().mean() for t in o).backward()
            opt_.step()
    sd_after = net.state_dict()  # saved weights are sparse (masks re-applied before state_dict)
    for n, mk in masks.items():
        assert torch.all(sd_after[n][~mk] == 0), n
        assert torch.count_nonzero(sd_after[n]) == int(mk.sum()), n
    # without it, the stem / downsample / Linear weights turn dense after one step
    plain = _model(features_only=True)
    plain.load_state_dict(sd)
    o = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    o.zero_grad()
    sum(t.square().mean() for t in plain(torch.randn(2, 1, 32, 32))).backward()
    o.step()
    assert torch.count_nonzero(plain.stages[0][0].pwconv1.weight) == plain.stages[0][0].pwconv1.weight.numel()
    twin = copy.deepcopy(net)  # e.g. MaskedEMA's copy: inert hooks, no second manager of net's weights
    buf = io.BytesIO()
    torch.save(net, buf)
    fz.remove()
    assert not net._forward_pre_hooks and len(twin._forward_pre_hooks) == 1
    fz2 = freeze_sparsity(net, only_large_kernels=True)  # after remove() another manager may take over
    assert set(fz2.masks) == {n for n in masks if "large_kernel.LoRA" in n}
    with pytest.raises(ValueError, match="sparse model"):
        freeze_sparsity(_model())


# ---------------------------------------------------------------------------------------------------------------
# refusals (issue 15's classes for the sparse API)
# ---------------------------------------------------------------------------------------------------------------

def test_optimizer_must_hold_the_weights_it_steps():
    m, other = _model(), _model()
    with pytest.raises(ValueError, match="optimizer: expected an optimizer over the model's parameters"):
        DynamicSparsity(m, torch.optim.SGD(other.parameters(), lr=0.1), sparse_init="uniform", total_steps=10)
    head_only = torch.optim.SGD(m.head.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer"):
        DynamicSparsity(m, head_only, sparse_init="uniform", total_steps=10)
    assert all(getattr(mod, "weight_mask", None) is None for mod in m.modules())  # refused before any change


def test_second_manager_is_refused_until_the_first_is_removed():
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    ds = DynamicSparsity(m, opt, density=0.5, sparse_init="uniform", update_frequency=2, total_steps=10)
    masks = {n: mk.clone() for n, mk in ds.masks.items()}
    for kw in (dict(sparse_init="uniform"), dict(sparse_init="from_weights")):
        with pytest.raises(ValueError, match="remove"):
            DynamicSparsity(m, opt, total_steps=10, **kw)
    with pytest.raises(ValueError, match="remove"):
        freeze_sparsity(m)
    assert all(torch.equal(masks[n], ds.masks[n]) for n in masks)
    ds.remove()
    ds2 = DynamicSparsity(m, opt, sparse_init="from_weights", update_frequency=2, total_steps=10)
    assert all(torch.equal(masks[n], ds2.masks[n]) for n in masks)
    before = {n: int((mk != 0).sum()) for n, mk in ds2.masks.items()}
    _step(m, opt, *_data())
    _step(m, opt, *_data())
    assert ds2.topology_updates == 1 and ds.topology_updates == 0  # the removed one does nothing
    assert {n: int((mk != 0).sum()) for n, mk in ds2.masks.items()} == before


def test_load_state_dict_refuses_a_state_of_another_model():
    a = _model()
    ds_a = DynamicSparsity(a, torch.optim.AdamW(a.parameters()), sparse_init="uniform", total_steps=10)
    b = slak_test(in_chans=1, depths=(1, 2, 1, 1))  # one more block in stage 1
    ds_b = DynamicSparsity(b, torch.optim.AdamW(b.parameters()), sparse_init="uniform", total_steps=10)
    masks_b = {n: mk.clone() for n, mk in ds_b.masks.items()}
    with pytest.raises(ValueError, match=r"stages\.1\.1\."):
        ds_b.load_state_dict(ds_a.state_dict())
    assert all(torch.equal(masks_b[n], ds_b.masks[n]) for n in masks_b)  # nothing changed
    c = _model()
    ds_c = DynamicSparsity(c, torch.optim.AdamW(c.parameters()), sparse_init="uniform", total_steps=10,
                           only_large_kernels=True)
    with pytest.raises(ValueError, match="only_large_kernels"):
        ds_c.load_state_dict(ds_a.state_dict())
    st = ds_a.state_dict()
    name = next(iter(st["masks"]))
    st["masks"][name] = st["masks"][name].float() * 2
    with pytest.raises(ValueError, match="0s and 1s"):
        ds_a.load_state_dict(st)
    st = ds_a.state_dict()
    st["steps"] = -1
    with pytest.raises(ValueError, match="steps"):
        ds_a.load_state_dict(st)
    # a state from the same configuration loads (and a version-1 state with the old key set too)
    d = _model()
    ds_d = DynamicSparsity(d, torch.optim.AdamW(d.parameters()), sparse_init="uniform", total_steps=10, seed=5)
    v1 = ds_a.state_dict()
    v1["version"] = 1
    del v1["config"]["include_small_conv"]
    ds_d.load_state_dict(v1)
    assert all(torch.equal(ds_d.masks[n], ds_a.masks[n]) for n in ds_a.masks)


def test_sparse_api_argument_validation():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="snip_data"):
        DynamicSparsity(m, opt, sparse_init="uniform", snip_data=_data(), total_steps=10)
    with pytest.raises(TypeError, match="include_small_conv"):
        DynamicSparsity(m, opt, sparse_init="uniform", include_small_conv=1, total_steps=10)
    with pytest.raises(TypeError, match="model"):
        DynamicSparsity("net", opt, sparse_init="uniform", total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_prune_rate(0, 0.3, 0)
    with pytest.raises(ValueError, match="step"):
        cosine_prune_rate(-1, 0.3, 10)
    with pytest.raises(ValueError, match="prune_rate"):
        cosine_prune_rate(0, float("nan"), 10)
    with pytest.raises(ValueError, match="lengths"):
        solve_layer_densities([10, 10], [1.0], 0.5)
    with pytest.raises(ValueError, match=r"raw\[1\]"):
        solve_layer_densities([10, 10], [1.0, -2.0], 0.5)
    with pytest.raises(ValueError, match="density"):
        solve_layer_densities([10], [1.0], 0.0)
    with pytest.raises(TypeError, match="strict"):
        load_masked_state_dict(m, {}, strict="yes")
    sd = m.state_dict()
    key = "stages.0.0.large_kernel.LoRA1.conv.weight_mask"
    sd[key] = torch.full_like(sd["stages.0.0.large_kernel.LoRA1.conv.weight"], 0.5)
    with pytest.raises(ValueError, match="0s and 1s"):
        load_masked_state_dict(_model(), sd)
    ema = MaskedEMA(_model(), decay=0.9)
    with pytest.raises(ValueError, match="model"):
        ema.update(slak_test(in_chans=1, depths=(1, 2, 1, 1)))
    with pytest.raises(ValueError, match="shape"):
        ema.update(_model(num_classes=7))
    with pytest.raises(TypeError, match="model"):
        ema.update("net")


def test_block_granularity_follows_block_shape():
    # the unit geometry comes from block_shape (which may change): a block layer's units are its blocks
    m = _model()
    ds = DynamicSparsity(m, torch.optim.SGD(m.parameters(), lr=0.1), sparse_init="uniform", total_steps=10)
    layer = ds._by_name["stages.0.0.large_kernel.LoRA1.conv.weight"]
    kh, kw = layer.shape[-2:]
    assert layer.block == block_shape(kh, kw)
    assert layer.n_units == len(_units(layer.weight, layer.block))
