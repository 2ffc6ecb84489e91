"""Side-by-side check of slak_triton.sparse against the official SLaK sparse trainer (VITA-Group/SLaK's
``sparse_core.py``, ``funcs.py`` and ``model_sema.py``), on CPU, on the same weights, masks and batches.

The official code is not part of this project: pass the directory that holds those three files from a checkout
of https://github.com/VITA-Group/SLaK (they need torch and numpy only)::

    python scripts/compare_official_sparse.py --official /path/to/SLaK [--steps 4] [--size 128]

Both sides train the same small SLaK (``slak_test``) in lockstep with AdamW (SGD where stated) on the same random
batches: the official side with plain convolutions of zeroed weights (no mask buffers, the official model's
execution) driven by ``Masking.step()``; this side with ``DynamicSparsity`` (element granularity, as the official
masks). At the topology update the grown and pruned sets are compared per layer. The EMA, ``--only-L`` and
``--sparse_init resume`` are compared too. Prints one line per comparison.
"""

import argparse
import contextlib
import copy
import io
import os
import sys
import types

import torch
import torch.nn.functional as F

from slak_triton import use_backend
from slak_triton.models import slak_test
from slak_triton.sparse import DynamicSparsity, MaskedEMA


def _official(path):
    for f in ("sparse_core.py", "funcs.py", "model_sema.py"):
        if not os.path.isfile(os.path.join(path, f)):
            raise SystemExit(f"--official: expected a directory with {f} from VITA-Group/SLaK, got {path!r}")
    sys.path.insert(0, path)
    import model_sema  # noqa: E402  (the official files, imported from the given directory)
    import sparse_core  # noqa: E402
    return sparse_core, model_sema


def _strip_masks(model):
    for mod in model.modules():
        if "weight_mask" in mod._buffers:
            mod._buffers["weight_mask"] = None
    return model


def _official_masking(sparse_core, model, opt, growth, update_frequency, prune_rate, total, only_l=False):
    args = types.SimpleNamespace(device="cpu", fix=update_frequency is None, update_frequency=update_frequency,
                                 only_L=only_l, sparse_init="resume", sparsity=0.4, distributed=False)
    decay = sparse_core.CosineDecay(prune_rate, total)
    with contextlib.redirect_stdout(io.StringIO()):
        mask = sparse_core.Masking(opt, train_loader=None, prune_rate_decay=decay, prune_rate=prune_rate,
                                   growth_mode=growth, redistribution_mode="none", args=args)
        mask.add_module(model)
    return mask


def _lockstep(sparse_core, model_sema, growth, opt_name, steps, size, seed, update_frequency=None, ema_decay=0.9):
    torch.manual_seed(seed)
    base = slak_test(in_chans=1)
    ours = copy.deepcopy(base)
    make_opt = ((lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05)) if opt_name == "adamw"
                else (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)))
    opt = make_opt(ours.parameters())
    uf = steps if update_frequency is None else update_frequency
    ds = DynamicSparsity(ours, opt, density=0.6, sparse_init="uniform", growth=growth, prune_rate=0.5,
                         update_frequency=uf, total_steps=100, lk_granularity="element", seed=seed)
    off = _strip_masks(copy.deepcopy(ours))  # same (masked) weights, plain convolutions
    opt_off = make_opt(off.parameters())
    mask = _official_masking(sparse_core, off, opt_off, growth, uf, 0.5, 100)
    assert set(mask.masks) == set(ds.masks), "same masked layers"
    for n in ds.masks:
        assert torch.equal(mask.masks[n] != 0, ds.masks[n] != 0), n
    ema, ema_off = MaskedEMA(ours, ema_decay), model_sema.ModelEma(off, decay=ema_decay)
    old = {}
    w_gap = 0.0
    for step in range(1, steps + 1):
        x, y = torch.randn(4, 1, size, size), torch.randint(0, 10, (4,))
        if step == steps:
            old = {n: m.clone() for n, m in ds.masks.items()}
            w_gap = max(float((dict(ours.named_parameters())[n] - dict(off.named_parameters())[n]).detach().abs().max())
                        for n in ds.masks)
        for model, o in ((ours, opt), (off, opt_off)):
            o.zero_grad()
            F.cross_entropy(model(x), y).backward()
        opt.step()
        with contextlib.redirect_stdout(io.StringIO()):
            mask.step()
        ema.update(ours)
        with contextlib.redirect_stdout(io.StringIO()):
            ema_off.update(off, mask)
    w_after = max(float((dict(ours.named_parameters())[n] - dict(off.named_parameters())[n]).detach().abs().max())
                  for n in ds.masks)
    print(f"[{growth}, {opt_name}] max |w_ours - w_official| over the masked weights after the update: {w_after:.3g}")
    return ds, mask, old, w_gap, ema, ema_off, ours, off


def _compare_growth(label, ds, mask, old):
    """Per layer: the units active after the update that were inactive before ("newly grown"), ours against the
    official; and whether the whole new masks are equal."""
    inter = {"lk": 0, "other": 0}
    offn = {"lk": 0, "other": 0}
    ours_grown = {"lk": 0, "other": 0}
    equal_layers = 0
    worst = (1.0, "")
    act_ours = act_off = act_before = 0
    for n, new in ds.masks.items():
        o = old[n] != 0
        ours_new, off_new = new != 0, mask.masks[n] != 0
        g_ours, g_off = ours_new & ~o, off_new & ~o
        kind = "lk" if "large_kernel" in n else "other"
        inter[kind] += int((g_ours & g_off).sum())
        offn[kind] += int(g_off.sum())
        frac = int((g_ours & g_off).sum()) / max(int(g_off.sum()), 1)
        ours_grown[kind] += int(g_ours.sum())
        if int(g_off.sum()) and frac < worst[0]:
            worst = (frac, n)
        equal_layers += int(torch.equal(ours_new, off_new))
        act_ours += int(ours_new.sum())
        act_off += int(off_new.sum())
        act_before += int(o.sum())
    lk = inter["lk"] / max(offn["lk"], 1)
    oth = inter["other"] / max(offn["other"], 1)
    print(f"{label}: newly grown units shared with the official choice: large-kernel branches {lk:.3f} of "
          f"{offn['lk']}, other layers {oth:.3f} of {offn['other']} (worst layer {worst[0]:.3f} {worst[1]}; ours "
          f"grew {ours_grown['lk']} + {ours_grown['other']} new); "
          f"identical masks in {equal_layers}/{len(ds.masks)} layers; active units before {act_before}, after: "
          f"ours {act_ours}, official {act_off}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True, help="directory with the official sparse_core.py, funcs.py, "
                                                     "model_sema.py")
    p.add_argument("--steps", type=int, default=4, help="lockstep steps; the last one runs the topology update")
    p.add_argument("--size", type=int, default=128, help="input size (128: every tap of slak_test sees the image)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.steps < 1 or a.size < 32:
        raise SystemExit(f"--steps >= 1 and --size >= 32 expected, got {a.steps}, {a.size}")
    sparse_core, model_sema = _official(a.official)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with use_backend("reference"):
        for growth, opt_name in (("gradient", "adamw"), ("momentum", "adamw"), ("momentum", "sgd"),
                                 ("momentum_neuron", "adamw")):
            ds, mask, old, gap, ema, ema_off, ours, off = _lockstep(sparse_core, model_sema, growth, opt_name,
                                                                    a.steps, a.size, a.seed)
            print(f"[{growth}, {opt_name}] max |w_ours - w_official| over masked weights before the update: {gap:.3g}")
            _compare_growth(f"[{growth}, {opt_name}]", ds, mask, old)
            if growth == "gradient":
                e_ours = dict(ema.module.named_parameters())
                e_off = dict(ema_off.ema.named_parameters())
                gap_e = max(float((e_ours[n] - e_off[n]).abs().max()) for n in e_ours)
                print(f"[EMA, decay 0.9, {a.steps} steps with one growth] max |ema_ours - ema_official| over all "
                      f"parameters: {gap_e:.3g}")

        # --fix: static masks on both sides
        torch.manual_seed(a.seed)
        m = slak_test(in_chans=1)
        ds = DynamicSparsity(m, torch.optim.AdamW(m.parameters()), density=0.6, sparse_init="uniform",
                             update_frequency=None, total_steps=10, lk_granularity="element")
        off = _strip_masks(copy.deepcopy(m))
        mk = _official_masking(sparse_core, off, torch.optim.AdamW(off.parameters()), "random", None, 0.5, 10)
        print(f"[--fix] official update_frequency after Masking(): {mk.args.update_frequency}; ours "
              f"{ds.update_frequency}")

        # --only-L: the masked layers
        mk = _official_masking(sparse_core, copy.deepcopy(off), torch.optim.AdamW(off.parameters()), "random", 1,
                               0.5, 10, only_l=True)
        m2 = slak_test(in_chans=1)
        ds2 = DynamicSparsity(m2, torch.optim.AdamW(m2.parameters()), sparse_init="uniform", total_steps=10,
                              only_large_kernels=True, lk_granularity="element")
        print(f"[--only-L] same masked layers: {set(mk.masks) == set(ds2.masks)} ({len(ds2.masks)} layers)")

        # --sparse_init resume: masks from a loaded sparse model's zeros
        loaded = slak_test(in_chans=1)
        loaded.load_state_dict(off.state_dict())
        nz = sum(int(torch.count_nonzero(q)) for q in loaded.parameters() if q.dim() in (2, 4))
        ds3 = DynamicSparsity(loaded, torch.optim.AdamW(loaded.parameters()), sparse_init="resume", total_steps=10,
                              lk_granularity="element")
        off3 = _strip_masks(copy.deepcopy(loaded))
        mk3 = _official_masking(sparse_core, off3, torch.optim.AdamW(off3.parameters()), "random", 1, 0.5, 10)
        same = all(torch.equal(mk3.masks[n] != 0, ds3.masks[n] != 0) for n in ds3.masks) and set(mk3.masks) == set(
            ds3.masks)
        nz_after = sum(int(torch.count_nonzero(q)) for q in loaded.parameters() if q.dim() in (2, 4))
        print(f"[--sparse_init resume] same masks as official: {same}; non-zeros kept: {nz} -> {nz_after}")


if __name__ == "__main__":
    main()
