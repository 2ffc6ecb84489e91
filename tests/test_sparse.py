"""Tests of slak_triton.sparse: masks, exact prune/grow, block alignment, AMP skips, resume, DDP consistency, EMA."""

import copy
import io
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from slak_triton import block_shape, use_backend
from slak_triton.models import slak_test
from slak_triton.sparse import (
    MIN_PRUNE_RATE,
    DynamicSparsity,
    MaskedEMA,
    cosine_prune_rate,
    large_kernel_branches,
    load_masked_state_dict,
    solve_layer_densities,
)


@pytest.fixture(autouse=True)
def _reference_backend():
    # training-sized runs on CPU go through F.conv2d; the masks are what is under test here
    with use_backend("reference"):
        yield


def _data(n=4):
    return torch.randn(n, 1, 32, 32), torch.randint(0, 10, (n,))


def _model():
    return slak_test(in_chans=1)


def _train_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _unit_counts(ds):
    """name -> (active units, active elements)."""
    out = {}
    for layer in ds.layers:
        out[layer.name] = (int(layer.unit_mask().sum()), int((layer.mask != 0).sum()))
    return out


def _block_aligned(mask):
    """True when every block_shape block of every channel of a [C, 1, kh, kw] mask is all-0 or all-1."""
    kh, kw = mask.shape[-2:]
    bh, bw = block_shape(kh, kw)
    for i in range(0, kh, bh):
        for j in range(0, kw, bw):
            blk = mask[:, :, i:i + bh, j:j + bw].reshape(mask.shape[0], -1)
            if not torch.equal(blk.amax(1), blk.amin(1)):
                return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# structure and initialisation
# ---------------------------------------------------------------------------------------------------------------

def test_large_kernel_branches_found_structurally():
    m = _model()
    names = sorted(large_kernel_branches(m))
    assert names == sorted(f"stages.{s}.0.large_kernel.{b}.conv" for s in range(4)
                           for b in ("LoRA1", "LoRA2", "small_conv"))
    # a stand-in with the same attribute structure but other classes is detected too
    class Branch(nn.Module):
        def __init__(self, c, k):
            super().__init__()
            self.conv = nn.Conv2d(c, c, k, padding=(k[0] // 2, k[1] // 2), groups=c, bias=False)

    class LK(nn.Module):
        def __init__(self):
            super().__init__()
            self.LoRA1, self.LoRA2, self.small_conv = Branch(4, (9, 3)), Branch(4, (3, 9)), Branch(4, (3, 3))

    wrapper = nn.Sequential(nn.Conv2d(4, 4, 9, padding=4, groups=4), LK())
    assert sorted(large_kernel_branches(wrapper)) == ["1.LoRA1.conv", "1.LoRA2.conv", "1.small_conv.conv"]


@pytest.mark.parametrize("init", ["uniform", "erk", "snip"])
def test_sparse_init_overall_density(init):
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    density = 0.4 + 0.3 * torch.rand(()).item()
    ds = DynamicSparsity(m, opt, density=density, sparse_init=init, snip_data=_data(16) if init == "snip" else None,
                         total_steps=100)
    # rounding: at most one unit of each size class per layer, plus the at-least-one-unit rule
    total = sum(layer.numel for layer in ds.candidates)
    tol = sum(2 * sum(layer.class_sizes) for layer in ds.candidates) / total
    assert abs(ds.overall_density() - density) <= tol, (ds.overall_density(), density, tol)
    dens = ds.layer_densities()
    for layer in ds.candidates:
        d0 = ds.layer_init_densities[layer.name]
        if d0 >= 0.99:
            assert layer.mask is None and dens[layer.name] == 1.0
            assert torch.count_nonzero(layer.weight) == layer.numel  # untouched dense layer
        else:
            m_ = layer.mask
            assert m_ is not None and m_.shape == layer.weight.shape and m_.dtype == layer.weight.dtype
            assert set(m_.unique().tolist()) <= {0.0, 1.0}
            assert torch.all(layer.weight[m_ == 0] == 0)
            assert "weight_mask" in layer.module._buffers
    if init == "uniform":
        assert not ds.dense_layers
    if init == "erk":
        # ERK: non-dense layers' densities are proportional to sum(shape) / prod(shape)
        ratios = [ds.layer_init_densities[lay.name] * lay.numel / sum(lay.shape) for lay in ds.candidates
                  if lay.mask is not None]
        assert max(ratios) - min(ratios) < 1e-9 * max(ratios)
        assert ds.dense_layers, "the stem of slak_test has a tiny fan-in: ERK keeps it dense"
    if init == "snip":
        vals = [ds.layer_init_densities[lay.name] for lay in ds.candidates]
        assert max(vals) - min(vals) > 0.05, "snip gives layer-dependent densities"


def test_snip_densities_come_from_global_topk():
    m = _model()
    x, y = _data(16)
    ref = copy.deepcopy(m)
    F.cross_entropy(ref(x), y).backward()
    ds = DynamicSparsity(m, torch.optim.SGD(m.parameters(), lr=0.1), density=0.5, sparse_init="snip",
                         snip_data=(x, y), total_steps=10)
    refmods = dict(ref.named_modules())
    scores = [(refmods[lay.name[:-7]].weight * refmods[lay.name[:-7]].weight.grad).abs().flatten()
              for lay in ds.candidates]
    flat = torch.cat(scores)
    thr = flat.sort(descending=True).values[int(round(0.5 * flat.numel())) - 1]
    raw = [float((s >= thr).sum()) / s.numel() for s in scores]
    expect = solve_layer_densities([s.numel() for s in scores], raw, 0.5)
    got = [ds.layer_init_densities[lay.name] for lay in ds.candidates]
    assert got == pytest.approx(expect, abs=1e-3)
    # snip must not leave gradients or changed BN statistics behind
    assert all(p.grad is None for p in m.parameters())
    assert torch.equal(m.stages[0][0].large_kernel.LoRA1.bn.running_mean, torch.zeros(8))


def test_solve_layer_densities_dense_threshold():
    d = solve_layer_densities([10, 1000, 1000], [50.0, 1.0, 1.0], 0.5)
    assert d[0] == 1.0 and d[1] == d[2] and abs(10 + 1000 * d[1] + 1000 * d[2] - 0.5 * 2010) < 1e-6
    assert solve_layer_densities([10, 10], [1.0, 1.0], 0.995) == [1.0, 1.0]


def test_only_large_kernels_and_validation():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ds = DynamicSparsity(m, opt, sparse_init="uniform", total_steps=10, only_large_kernels=True)
    # official --only-L: the LoRA1 / LoRA2 branches only ('large_kernel.LoRA' in the parameter name)
    official = {n for n, p in m.named_parameters() if p.dim() in (2, 4) and "large_kernel.LoRA" in n}
    assert set(ds.masks) == official and len(official) == 8
    assert not hasattr(m.head, "weight_mask") and m.stages[0][0].large_kernel.small_conv.conv.weight_mask is None
    m2 = _model()
    ds2 = DynamicSparsity(m2, torch.optim.SGD(m2.parameters(), lr=0.1), sparse_init="uniform", total_steps=10,
                          only_large_kernels=True, include_small_conv=True)
    assert set(n[:-7] for n in ds2.masks) == set(large_kernel_branches(m2))
    bad = [
        (dict(density=0.0), ValueError, "density"),
        (dict(density=1.5), ValueError, "density"),
        (dict(sparse_init="magic"), ValueError, "sparse_init"),
        (dict(growth="momentum_global"), ValueError, "growth"),
        (dict(prune_rate=1.0), ValueError, "prune_rate"),
        (dict(update_frequency=0), ValueError, "update_frequency"),
        (dict(total_steps=0), ValueError, "total_steps"),
        (dict(total_steps=2.5), TypeError, "total_steps"),
        (dict(lk_granularity="row"), ValueError, "lk_granularity"),
        (dict(sparse_init="snip"), ValueError, "snip_data"),
    ]
    for kw, exc, word in bad:
        kw = {"total_steps": 10, "sparse_init": "uniform", **kw}
        fresh = _model()
        with pytest.raises(exc, match=word):
            DynamicSparsity(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), **kw)
    with pytest.raises(TypeError, match="optimizer"):
        DynamicSparsity(_model(), "sgd", total_steps=10, sparse_init="uniform")


# ---------------------------------------------------------------------------------------------------------------
# training behaviour
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_masks_hold_after_every_step(opt_name):
    m = _model()
    if opt_name == "sgd":
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        keys = ["momentum_buffer"]
    else:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.05)
        keys = ["exp_avg", "exp_avg_sq"]
    ds = DynamicSparsity(m, opt, density=0.5, sparse_init="uniform", update_frequency=3, total_steps=20)
    for step in range(1, 6):
        _train_step(m, opt, *_data())
        assert ds.steps == step and ds.topology_updates == step // 3
        for name, mask in ds.masks.items():
            w = ds._by_name[name].weight
            off = mask == 0
            assert torch.all(w[off] == 0), name
            assert torch.count_nonzero(w[~off]) > 0
            for k in keys:
                assert torch.all(opt.state[w][k][off] == 0), (name, k)


@pytest.mark.parametrize("growth", ["random", "gradient"])
@pytest.mark.parametrize("granularity", ["block", "element"])
def test_exact_counts_topology_moves_and_block_alignment(growth, granularity):
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3)
    ds = DynamicSparsity(m, opt, density=0.6, sparse_init="erk", growth=growth, prune_rate=0.5,
                         update_frequency=2, total_steps=40, lk_granularity=granularity)
    counts0 = _unit_counts(ds)
    masks0 = {k: v.clone() for k, v in ds.masks.items()}
    lk = {n + ".weight" for n in large_kernel_branches(m)}
    assert lk & set(ds.masks)
    for _ in range(8):
        _train_step(m, opt, *_data())
        assert _unit_counts(ds) == counts0  # exactly as many grown as pruned, in units and in elements
        for name, mask in ds.masks.items():
            if name in lk and granularity == "block":
                assert _block_aligned(mask), name
    assert ds.topology_updates == 4
    moved = {k: int((ds.masks[k] != masks0[k]).sum()) for k in masks0}
    assert all(v > 0 for v in moved.values()), moved
    if granularity == "element":
        assert not all(_block_aligned(ds.masks[n]) for n in lk if n in ds.masks)


def test_prune_smallest_grow_exact_zero_and_gradient_choice():
    lin = nn.Linear(20, 10, bias=False)
    opt = torch.optim.SGD(lin.parameters(), lr=0.0)
    ds = DynamicSparsity(lin, opt, density=0.5, sparse_init="uniform", growth="gradient", total_steps=10,
                         update_frequency=None)
    mask = lin.weight_mask
    with torch.no_grad():
        lin.weight.copy_(torch.randn(10, 20) * mask)
    lin.weight.grad = torch.randn(10, 20)
    active = mask.bool().clone()
    k = math.ceil(0.25 * int(active.sum()))
    w_abs = lin.weight.detach().abs()
    expect_pruned = set(torch.where(active.flatten(), w_abs.flatten(), torch.tensor(math.inf))
                        .argsort()[:k].tolist())
    g_abs = lin.weight.grad.abs().flatten().clone()
    w_before = lin.weight.detach().clone()
    ds.update_topology(rate=0.25)
    new = lin.weight_mask.bool().flatten()
    pruned = set(torch.nonzero(active.flatten() & ~new).flatten().tolist())
    grown = torch.nonzero(~active.flatten() & new).flatten()
    regrown = set(torch.nonzero(active.flatten()).flatten().tolist()) & expect_pruned & set(
        torch.nonzero(new).flatten().tolist())
    assert pruned | regrown == expect_pruned
    assert len(grown) + len(regrown) == k and int(new.sum()) == int(active.sum())
    # gradient growth: the grown (incl. re-grown) units are the k largest |grad| among inactive-after-prune units
    cand = ~active.flatten()
    cand[list(expect_pruned)] = True
    best = set(torch.where(cand, g_abs, torch.tensor(-math.inf)).argsort(descending=True)[:k].tolist())
    assert set(grown.tolist()) | regrown == best
    assert torch.all(lin.weight.flatten()[grown] == 0)
    # a unit pruned and grown back in the same update keeps its weight (official: the update is a no-op for it)
    assert torch.equal(lin.weight.flatten()[list(regrown)], w_before.flatten()[list(regrown)])


def test_cosine_prune_rate():
    assert cosine_prune_rate(0, 0.3, 100) == pytest.approx(0.3)
    assert cosine_prune_rate(100, 0.3, 100) == pytest.approx(MIN_PRUNE_RATE)
    assert cosine_prune_rate(500, 0.3, 100) == pytest.approx(MIN_PRUNE_RATE)
    assert cosine_prune_rate(50, 0.3, 100) == pytest.approx((0.3 + MIN_PRUNE_RATE) / 2)
    rates = [cosine_prune_rate(s, 0.5, 37) for s in range(38)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_gradscaler_skipped_step_changes_nothing():
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    ds = DynamicSparsity(m, opt, density=0.5, sparse_init="uniform", update_frequency=2, total_steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x, y = _data()

    def scaled_step(poison):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(m(x), y)
        if poison:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    scaled_step(False)
    assert ds.steps == 1 and ds.topology_updates == 0
    before = {k: v.clone() for k, v in m.state_dict().items()}
    masks = {k: v.clone() for k, v in ds.masks.items()}
    opt_state = copy.deepcopy(opt.state_dict())
    rng = ds.generator.get_state()
    scaled_step(True)  # non-finite gradients: GradScaler skips optimizer.step, so the hook must not run
    assert scaler.get_scale() < 2.0 ** 8
    assert ds.steps == 1 and ds.topology_updates == 0
    assert torch.equal(ds.generator.get_state(), rng)
    after = m.state_dict()
    for k, v in before.items():
        if "running" in k or "num_batches" in k:  # BN statistics move in the forward, not in the step
            continue
        assert torch.equal(v, after[k]), k
    assert all(torch.equal(masks[k], ds.masks[k]) for k in masks)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt_state["state"][0]["exp_avg"])
    scaled_step(False)  # the next real step is step 2: masks re-applied and the topology update runs
    assert ds.steps == 2 and ds.topology_updates == 1
    assert any(not torch.equal(masks[k], ds.masks[k]) for k in masks)
    for name, mask in ds.masks.items():
        assert torch.all(ds._by_name[name].weight[mask == 0] == 0)


def _run(model, opt, ds, batches):
    for x, y in batches:
        _train_step(model, opt, x, y)


def _save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("growth", ["random", "gradient"])
def test_resume_is_bitwise_exact(growth):
    batches = [_data() for _ in range(12)]
    init = _model()
    kw = dict(density=0.6, sparse_init="uniform", growth=growth, prune_rate=0.4, update_frequency=3, total_steps=12)

    a = copy.deepcopy(init)
    opt_a = torch.optim.AdamW(a.parameters(), lr=5e-3, weight_decay=0.05)
    ds_a = DynamicSparsity(a, opt_a, seed=7, **kw)
    _run(a, opt_a, ds_a, batches)

    b = copy.deepcopy(init)
    opt_b = torch.optim.AdamW(b.parameters(), lr=5e-3, weight_decay=0.05)
    ds_b = DynamicSparsity(b, opt_b, seed=7, **kw)
    _run(b, opt_b, ds_b, batches[:5])
    ckpt = _save({"model": b.state_dict(), "opt": opt_b.state_dict(), "sparsity": ds_b.state_dict()})
    del b, opt_b, ds_b

    c = _model()  # different initial weights, different seed, different settings: all must come from the checkpoint
    opt_c = torch.optim.AdamW(c.parameters(), lr=5e-3, weight_decay=0.05)
    ds_c = DynamicSparsity(c, opt_c, seed=99, density=0.3, sparse_init="uniform", update_frequency=5,
                           total_steps=100, prune_rate=0.1)
    load_masked_state_dict(c, ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    ds_c.load_state_dict(ckpt["sparsity"])
    _run(c, opt_c, ds_c, batches[5:])

    assert ds_c.steps == ds_a.steps == 12 and ds_c.topology_updates == ds_a.topology_updates == 4
    sa, sc = a.state_dict(), c.state_dict()
    assert sa.keys() == sc.keys()
    for k in sa:
        assert torch.equal(sa[k], sc[k]), k
    assert torch.equal(ds_a.generator.get_state(), ds_c.generator.get_state())


def test_model_state_dict_carries_masks_into_a_fresh_model():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ds = DynamicSparsity(m, opt, density=0.5, sparse_init="uniform", total_steps=10)
    sd = m.state_dict()
    assert all(n[:-len("weight")] + "weight_mask" in sd for n in ds.masks)
    fresh = _model()
    load_masked_state_dict(fresh, {"module." + k: v for k, v in sd.items()})  # DDP prefix stripped
    for name, mask in ds.masks.items():
        mod = dict(fresh.named_modules())[name[:-7]]
        assert torch.equal(mod.weight_mask, mask)


def test_masked_ema():
    lin = nn.Linear(16, 8)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    ds = DynamicSparsity(lin, opt, density=0.5, sparse_init="uniform", update_frequency=None, total_steps=10)
    ema = MaskedEMA(lin, decay=0.9)
    x = torch.randn(4, 16)
    lin(x).sum().backward()
    opt.step()
    ema.update(lin)
    old_mask = lin.weight_mask.clone()
    ema_w_before = ema.module.weight.clone()
    ema_b_before = ema.module.bias.clone()
    with torch.no_grad():
        lin.weight.add_(torch.randn_like(lin.weight))  # live weights move (also where the mask is off)
    ds.update_topology(rate=0.5)
    with torch.no_grad():  # make grown weights non-zero so that "copy the live weight" is visible
        grown = (lin.weight_mask != 0) & (old_mask == 0)
        lin.weight[grown] = torch.randn(int(grown.sum()))
    pruned = (lin.weight_mask == 0) & (old_mask != 0)
    assert grown.any() and pruned.any()
    ema.update(lin)
    ew, lw, mask = ema.module.weight, lin.weight.detach(), lin.weight_mask
    assert torch.all(ew[mask == 0] == 0)
    assert torch.equal(ew[grown], lw[grown])
    kept = (mask != 0) & ~grown
    assert torch.allclose(ew[kept], 0.9 * ema_w_before[kept] + 0.1 * lw[kept])
    assert torch.equal(ema.module.weight_mask, mask)
    assert torch.allclose(ema.module.bias, 0.9 * ema_b_before + 0.1 * lin.bias.detach())  # unmasked: plain EMA
    # the EMA's state_dict (with masks) round-trips into a fresh EMA
    ema2 = MaskedEMA(nn.Linear(16, 8), decay=0.9)
    ema2.load_state_dict(ema.state_dict())
    assert torch.equal(ema2.module.weight, ew) and torch.equal(ema2.module.weight_mask, mask)


# ---------------------------------------------------------------------------------------------------------------
# distributed: two CPU processes (gloo), different per-rank seeds and data
# ---------------------------------------------------------------------------------------------------------------

def _ddp_worker(rank, world, init_file, growth):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(1000 + rank)  # different initial weights and data on each rank
        with use_backend("reference"):
            # DDP broadcasts rank 0's weights once; broadcast_buffers=False: nothing else is ever synchronised
            model = nn.parallel.DistributedDataParallel(slak_test(in_chans=1), broadcast_buffers=False)
            opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
            x0, y0 = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
            ds = DynamicSparsity(model, opt, density=0.6, sparse_init="snip", snip_data=(x0, y0),
                                 growth=growth, prune_rate=0.5, update_frequency=2, total_steps=20, seed=3)
            for _ in range(6):
                x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            assert ds.topology_updates == 3
            assert ds.verify_consistent()
            flat = torch.cat([m.flatten() for m in ds.masks.values()])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            assert all(torch.equal(g, gathered[0]) for g in gathered)
            # the check can fail: corrupt one rank's mask
            if rank == 1:
                first = next(iter(ds.masks.values()))
                first.view(-1)[0] = 1.0 - first.view(-1)[0]
            assert not ds.verify_consistent()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("growth", ["gradient"])
def test_ddp_two_processes_keep_identical_masks(tmp_path, growth):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), growth), nprocs=2, join=True)


def test_verify_consistent_without_distributed():
    m = _model()
    ds = DynamicSparsity(m, torch.optim.SGD(m.parameters(), lr=0.1), sparse_init="uniform", total_steps=10)
    assert ds.verify_consistent()
    c0 = ds.mask_checksum()
    first = next(iter(ds.masks.values()))
    first.view(-1)[0] = 1.0 - first.view(-1)[0]
    assert ds.mask_checksum() != c0
