"""slak-bench: the work counters against brute force and hand counts, the shapes registry, block masks, and the CLI
run in-process (CPU mode here: PyTorch timed on the CPU, Triton checked under the interpreter) writing well-formed
records."""

import csv
import datetime
import importlib.util
import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slak_triton import LAUNCH_COUNTS, block_shape
from slak_triton.bench import bench_candidates, bench_lk_conv2d, bench_models, counters, report
from slak_triton.bench.cli import main
from slak_triton.bench.env import git_commit, lookup_peaks
from slak_triton.bench.shapes import REGISTRY, reduce_for_cpu, select_shapes
from slak_triton.ops.compile_check import launch_plans

ROOT = Path(__file__).resolve().parents[1]
ON_GPU = torch.cuda.is_available()


def brute_force_taps(n, c, h, w, kernels, masks=None):
    """Counts, output by output and tap by tap, the taps whose input pixel lies inside the image."""
    total = 0
    for b, (kh, kw) in enumerate(kernels):
        for ch in range(c):
            for oy, ox, i, j in itertools.product(range(h), range(w), range(kh), range(kw)):
                if masks is not None and masks[b] is not None and not bool(masks[b][ch, 0, i, j]):
                    continue
                iy, ix = oy + i - kh // 2, ox + j - kw // 2
                if 0 <= iy < h and 0 <= ix < w:
                    total += 1
    return n * total


# ---------------------------------------------------------------------------------------------------- counters

def test_useful_taps_hand_checked_3x3():
    # 3x3 kernel on a 3x3 image: per axis the outputs see 2, 3, 2 taps inside -> 7 * 7 = 49 taps.
    assert counters.useful_taps(1, 1, 3, 3, [(3, 3)]) == 49
    assert counters.flops(49, "fwd") == 98
    assert counters.flops(49, "bwd") == 196
    assert counters.flops(49, "fwdbwd") == 294
    assert counters.nominal_taps(1, 1, 3, 3, [(3, 3)]) == 81
    # fp32: x 36 B read, y 36 B written, weights 36 B read.
    assert counters.min_bytes(1, 1, 3, 3, [(3, 3)], 4, "fwd") == 108
    # backward: dy and x read, dx written (3 * 36), weights read and dw written (2 * 36).
    assert counters.min_bytes(1, 1, 3, 3, [(3, 3)], 4, "bwd") == 180
    assert counters.min_bytes(1, 1, 3, 3, [(3, 3)], 4, "fwdbwd") == 288


def test_useful_taps_kernel_longer_than_plane():
    # 1 x 5 kernel on a 1 x 2 image: output 0 sees inputs 0, 1; output 1 sees 0, 1 -> 4 taps.
    assert counters.useful_taps(1, 1, 1, 2, [(1, 5)]) == 4


def test_useful_taps_match_brute_force():
    rnd = random.Random(7)
    for _ in range(25):
        n, c, h, w = rnd.randint(1, 2), rnd.randint(1, 3), rnd.randint(1, 9), rnd.randint(1, 9)
        kernels = [(rnd.choice([1, 3, 5, 7, 11]), rnd.choice([1, 3, 5, 9])) for _ in range(rnd.randint(1, 3))]
        masks = None
        if rnd.random() < 0.6:
            g = torch.Generator().manual_seed(rnd.randint(0, 10**6))
            masks = [None if rnd.random() < 0.3 else torch.rand(c, 1, kh, kw, generator=g) < 0.5 for kh, kw in kernels]
        assert counters.useful_taps(n, c, h, w, kernels, masks) == brute_force_taps(n, c, h, w, kernels, masks), \
            (n, c, h, w, kernels)


def test_slak_t_stage1_matches_published_derivation():
    # slak_reference.md: SLaK-T stage 1 forward at N=64: 26.6 GFLOP nominal, 20.4 GFLOP on taps inside the image,
    # minimum traffic 199 MB fp32 / 99.5 MB fp16.
    s = REGISTRY["ts-s1-b64"]
    dims = (s.batch, s.channels, s.height, s.width)
    assert round(2 * counters.nominal_taps(*dims, s.kernels) / 1e9, 1) == 26.6
    assert round(counters.flops(counters.useful_taps(*dims, s.kernels), "fwd") / 1e9, 1) == 20.4
    assert round(counters.min_bytes(*dims, s.kernels, 4, "fwd") / 1e6) == 199
    assert abs(counters.min_bytes(*dims, s.kernels, 2, "fwd") / 1e6 - 99.5) < 0.5


# ---------------------------------------------------------------------------------------------------- shapes, masks

def test_registry_covers_every_stage_and_batch():
    assert len(REGISTRY) == 2 * 4 * 3
    expected = {"ts": (124, 249, 499, 998), "b": (166, 332, 665, 1331)}
    for fam, chans in expected.items():
        for stage, (c, side, k) in enumerate(zip(chans, (56, 28, 14, 7), (51, 49, 47, 13)), start=1):
            for n in (1, 16, 64):
                s = REGISTRY[f"{fam}-s{stage}-b{n}"]
                assert (s.batch, s.channels, s.height, s.width) == (n, c, side, side)
                assert s.kernels == ((k, 5), (5, k), (5, 5))
    assert {s.id for s in select_shapes("b")} == {i for i in REGISTRY if i.startswith("b-")}
    with pytest.raises(ValueError, match="unknown shape"):
        select_shapes("ts-s9-b1")


def test_reduce_for_cpu_merges_and_keeps_kernels():
    proxies = reduce_for_cpu([REGISTRY["ts-s1-b64"], REGISTRY["ts-s1-b1"], REGISTRY["b-s4-b16"]])
    assert len(proxies) == 2
    assert proxies[0].source == ("ts-s1-b64", "ts-s1-b1")
    assert proxies[0].kernels == REGISTRY["ts-s1-b64"].kernels
    assert proxies[1].height == 7 and proxies[1].kernels == ((13, 5), (5, 13), (5, 5))
    assert all(p.batch == 1 and p.channels <= 2 and p.height <= 28 for p in proxies)


@pytest.mark.parametrize("density", [0.6, 0.3])
def test_block_masks_are_block_structured(density):
    kernels = [(51, 5), (5, 51), (5, 5), (13, 5)]
    masks = bench_lk_conv2d.block_masks(6, kernels, density, torch.Generator().manual_seed(1))
    for (kh, kw), m in zip(kernels, masks):
        assert m.shape == (6, 1, kh, kw) and m.dtype == torch.bool
        bh, bw = block_shape(kh, kw)
        nb = math.ceil(kh / bh) * math.ceil(kw / bw)
        for c in range(6):
            active = 0
            for by in range(0, kh, bh):
                for bx in range(0, kw, bw):
                    blk = m[c, 0, by:by + bh, bx:bx + bw]
                    assert bool(blk.all()) or not bool(blk.any()), "mask cuts through a sparsity block"
                    active += int(blk.any())
            assert active == max(1, round(density * nb))
    assert bench_lk_conv2d.block_masks(6, kernels, 1.0, torch.Generator()) is None


# ---------------------------------------------------------------------------------------------------- env

def test_peak_table_by_device_name():
    assert lookup_peaks("NVIDIA H100 80GB HBM3").hbm_tbs == 3.35
    assert lookup_peaks("NVIDIA H100 80GB HBM3").fp32_fma_tflops == 67.0
    assert lookup_peaks("NVIDIA H100 PCIe").label == "H100 PCIe"
    assert lookup_peaks("NVIDIA H200").hbm_tbs == 4.8
    assert lookup_peaks("NVIDIA A100-SXM4-80GB").tensor_tflops(torch.bfloat16) == 312.0
    assert lookup_peaks("NVIDIA GeForce GTX 1080") is None


def test_git_commit_unknown_outside_a_repository(tmp_path):
    assert git_commit(tmp_path) == {"git_commit": "unknown", "git_dirty": None}


# ---------------------------------------------------------------------------------------------------- CLI

REQUIRED = {
    "device", "torch", "triton", "git_commit", "date", "cpu_mode", "where", "shape", "batch", "channels", "height",
    "width", "kernels", "dtype", "density", "mode", "provider", "status", "ms", "ms_p20", "ms_p80", "host_ms",
    "flop_useful", "bytes_min", "tflops", "pct_fp32_fma_peak", "pct_tensor_peak", "pct_mem_floor", "speedup_vs_torch",
    "check_rel_err", "check_ok",
}


def test_cli_op_cpu_mode_writes_well_formed_records(tmp_path, capsys):
    out_json, out_csv = tmp_path / "out.json", tmp_path / "out.csv"
    rc = main(["op", "--shapes", "tiny", "--dtypes", "fp32", "--densities", "1.0,0.3", "--modes", "fwd,fwdbwd",
               "--json", str(out_json), "--csv", str(out_csv), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    doc = json.loads(out_json.read_text())
    assert doc["schema"] == report.SCHEMA and doc["partial"] is False
    recs = doc["records"]
    assert len(recs) == 1 * 2 * 2 * len(bench_lk_conv2d.PROVIDERS)
    for r in recs:
        missing = REQUIRED - set(r)
        assert not missing, missing
        assert r["device"] and r["torch"] == torch.__version__ and r["triton"]
        assert r["git_commit"] != ""
        datetime.datetime.fromisoformat(r["date"])
        assert r["cpu_mode"] is (not ON_GPU)
        # the counters, recomputed by brute force on the shape the record says it ran
        masks_dense = r["density"] == 1.0
        dims = (r["batch"], r["channels"], r["height"], r["width"])
        kernels = [tuple(int(v) for v in k.split("x")) for k in r["kernels"].split("+")]
        if masks_dense:
            assert r["flop_useful"] == 2 * counters.passes(r["mode"]) * brute_force_taps(*dims, kernels)
        else:
            assert 0 < r["flop_useful"] < 2 * counters.passes(r["mode"]) * brute_force_taps(*dims, kernels)
        assert r["status"] in ("timed", "checked", "unavailable")
        if r["status"] == "unavailable":
            assert r["reason"]
        else:
            assert r["check_ok"] is True, r
        if r["status"] == "timed":
            assert 0 < r["ms_p20"] <= r["ms"] <= r["ms_p80"]
            # the host's time per call: measured on CUDA only (on the CPU, ms is host time)
            assert (r["host_ms"] > 0) if ON_GPU else (r["host_ms"] is None)
            assert r["tflops"] == pytest.approx(r["flop_useful"] / (r["ms"] * 1e-3) / 1e12)
    by = {(r["density"], r["mode"], r["provider"]): r for r in recs}
    if not ON_GPU:
        assert all(r["where"] == "CPU MODE" for r in recs)
        for prov in bench_lk_conv2d.TRITON_PROVIDERS:
            r = by[(1.0, "fwd", prov)]
            assert r["status"] == "checked" and r["ms"] is None and r["triton_launches"] > 0
        # the compact table: one line per (dtype, density, mode), providers as columns, CPU mode said once
        table_lines = [ln for ln in text.splitlines() if ln.startswith("cpu-tiny ")]
        assert len(table_lines) == len({(r["dtype"], r["density"], r["mode"]) for r in recs}) == 4
        assert all(ln.count("ok ") == len(bench_lk_conv2d.TRITON_PROVIDERS) for ln in table_lines)
        assert any(ln.startswith("CPU MODE:") for ln in text.splitlines())
        assert "not gpu numbers" in " ".join(text.split()).lower()
    assert max(len(ln) for ln in text.splitlines()) <= 100
    for mode in ("fwd", "fwdbwd"):
        assert by[(1.0, mode, "torch")]["status"] == "timed"
        assert by[(1.0, mode, "torch")]["speedup_vs_torch"] == pytest.approx(1.0)
    with out_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(recs) and REQUIRED <= set(rows[0])


def test_cli_candidates_stacked_weight_gradient_matches_the_launch_plan(tmp_path):
    """On a plane where the dense weight gradient stacks its lines (``lk_conv2d_plane_dw_stack_kernel``), the
    records of ``slak-bench candidates`` match the launch plan's candidates, and the plan lists that kernel."""
    out = tmp_path / "cand.json"
    rc = main(["candidates", "--shape", "2,2,14,13,7", "--kinds", "dw", "--dtypes", "bf16", "--densities", "1.0",
               "--limit", "2", "--no-progress", "--json", str(out)])
    assert rc == 0
    recs = json.loads(out.read_text())["records"]
    plans = launch_plans("dw", 2, 2, 14, 13, 7, "bfloat16", 1.0)
    assert [p["launches"][0]["kernel"].__name__ for p in plans] == ["lk_conv2d_plane_dw_stack_kernel"] * len(plans)
    assert len(recs) == 2 and [r["config"] for r in recs] == [p["config"] for p in plans[:2]]
    assert all(r["launches"] == 1 and math.isfinite(r["ms"]) and r["ms"] > 0 for r in recs)


def test_cli_candidates_matrix_kernels_match_the_launch_plan(tmp_path):
    """On a 7x7 plane (an 8 x 8 grid) the op runs the matrix kernels: the records of ``slak-bench candidates`` match
    the launch plan's candidates, which list those kernels (dense and sparse, forward, input and weight gradient,
    and the fused backward)."""
    out = tmp_path / "cand.json"
    rc = main(["candidates", "--shape", "2,2,7,7,7", "--kinds", "fwd,dx,dw,bwd", "--dtypes", "bf16", "--densities",
               "1.0,0.6", "--limit", "2", "--no-progress", "--json", str(out)])
    assert rc == 0
    recs = json.loads(out.read_text())["records"]
    assert len(recs) == 4 * 2 * 2
    for r in recs:
        plans = launch_plans(r["kind"], 2, 2, 7, 7, 7, "bfloat16", r["density"])
        name = "lk_conv2d_matrix_fwd_kernel" if r["kind"] in ("fwd", "dx") else "lk_conv2d_matrix_bwd_kernel"
        assert all([ln["kernel"].__name__ for ln in p["launches"]] == [name] for p in plans)
        match = [p for p in plans if p["config"] == r["config"]]
        assert len(match) == 1 and r["launches"] == 1, r["config"]


def test_cli_candidates_records_match_the_launch_plan(tmp_path, capsys, monkeypatch):
    """``slak-bench candidates`` (CPU mode: the kernels under the interpreter) writes one record per op call and
    candidate whose config is a candidate of ``launch_plans`` for the same call, with the number of launches the plan
    lists, so ``sass_model.py calibrate`` can match every record; a candidate that raises is listed as failed (exit
    status 1), not recorded."""
    out = tmp_path / "cand.json"
    rc = main(["candidates", "--shape", "2,3,12,12,7", "--kinds", "fwd,dx,dw", "--dtypes", "bf16",
               "--densities", "1.0,0.6", "--limit", "2", "--no-progress", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    recs, failed = doc["records"], doc["failed"]
    assert failed == [] and len(recs) == 3 * 2 * 2
    assert {(r["kind"], r["density"]) for r in recs} == {(k, d) for k in ("fwd", "dx", "dw") for d in (1.0, 0.6)}
    for r in recs:
        assert (r["N"], r["C"], r["H"], r["W"], r["K"], r["dtype"]) == (2, 3, 12, 12, 7, "bfloat16")
        plans = launch_plans(r["kind"], 2, 3, 12, 12, 7, "bfloat16", r["density"])
        match = [p for p in plans if p["config"] == r["config"]]
        assert len(match) == 1, r["config"]
        assert r["launches"] == len(match[0]["launches"])
        assert math.isfinite(r["ms"]) and r["ms"] > 0
        assert (r["host_ms"] > 0) if ON_GPU else (r["host_ms"] is None)
    assert bench_candidates.active_lines(0.6) == (3, 3) and bench_candidates.active_lines(0.3) == (2, 1)

    def broken(*args, config=None, **kw):
        if config["IMG"] == 16:
            raise RuntimeError("out of resources")
        return real(*args, config=config, **kw)
    real = bench_candidates.launch_lk_conv2d_fwd
    monkeypatch.setattr(bench_candidates, "launch_lk_conv2d_fwd", broken)
    rc = main(["candidates", "--shape", "2,3,12,12,7", "--kinds", "fwd", "--dtypes", "bf16", "--densities", "1.0",
               "--limit", "2", "--no-progress", "--json", str(out)])
    assert rc == 1
    doc = json.loads(out.read_text())
    assert [r["config"]["IMG"] for r in doc["records"]] == [8]
    assert [f["config"]["IMG"] for f in doc["failed"]] == [16] and "out of resources" in doc["failed"][0]["error"]
    assert "FAILED fwd" in capsys.readouterr().out


def test_cli_candidates_rejects_bad_arguments(capsys):
    for argv, words in ((["--limit", "0"], "--limit: expected an int >= 1, got 0"),
                        (["--shape", "2,3,12"], "--shape: expected N,C,H,W,K"),
                        (["--stages", "5"], "--stages"), (["--kinds", "dy"], "--kinds")):
        with pytest.raises(SystemExit) as e:
            main(["candidates", *argv])
        assert e.value.code == 2
        assert words in capsys.readouterr().err


def test_cli_rejects_unknown_shape(capsys):
    with pytest.raises(SystemExit) as e:
        main(["op", "--shapes", "nope"])
    assert e.value.code == 2
    assert "unknown shape" in capsys.readouterr().err


def test_cli_plot_or_clear_message(tmp_path, capsys):
    png = tmp_path / "p.png"
    rc = main(["op", "--shapes", "tiny", "--dtypes", "fp32", "--densities", "1.0", "--modes", "fwd",
               "--providers", "torch,torch-cl", "--plot", str(png), "--no-progress"])
    if report.MATPLOTLIB_ERROR is None:
        assert rc == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert rc == 1 and not png.exists()
        assert "matplotlib" in capsys.readouterr().err


def test_cli_model_subcommand(tmp_path, capsys):
    out = tmp_path / "m.json"
    rc = main(["model", "--variants", "T", "--kinds", "eval", "--batch", "1", "--image-size", "32",
               "--json", str(out), "--no-progress"])
    if bench_models.MODELS_IMPORT_ERROR is not None:
        assert rc == 2 and "slak_triton.models is not available" in capsys.readouterr().err
        return
    assert rc == 0
    recs = json.loads(out.read_text())["records"]
    assert {r["provider"] for r in recs} == set(bench_models.MODEL_PROVIDERS)
    torch_rec = next(r for r in recs if r["provider"] == "torch")
    assert torch_rec["status"] == "timed" and torch_rec["images_per_s"] == pytest.approx(1 / (torch_rec["ms"] * 1e-3))


def test_cli_model_convnext_comparator(tmp_path, capsys):
    out = tmp_path / "m.json"
    rc = main(["model", "--variants", "convnext,T", "--kinds", "eval", "--batch", "1", "--image-size", "32",
               "--json", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    recs = json.loads(out.read_text())["records"]
    by = {(r["model"], r["provider"]): r for r in recs}
    assert set(by) == {(m, p) for m in ("ConvNeXt-T", "SLaK-T") for p in bench_models.MODEL_PROVIDERS}
    for m in ("ConvNeXt-T", "SLaK-T"):
        for p in ("torch", "torch-cl"):
            assert by[(m, p)]["status"] == "timed"
        assert by[(m, "triton")]["status"] == ("timed" if ON_GPU else "unavailable")
    cnx = by[("ConvNeXt-T", "torch-cl")]["images_per_s"]
    r = by[("SLaK-T", "torch")]
    assert r["throughput_vs_convnext"] == pytest.approx(r["images_per_s"] / cnx)
    lines = text.splitlines()
    assert any(ln.startswith("ConvNeXt-T  eval") for ln in lines) and any(ln.startswith("SLaK-T") for ln in lines)
    assert max(len(ln) for ln in lines) <= 100


def _what_if(shape, **env):
    """Runs bench/tools/what_if_plan.py's launch_plans for a dense bf16 fwd and dw on shape (N, C, H, W, K) in a
    subprocess (importing it patches the project's modules) with ``env`` added; the completed process, whose last
    line of output is {kind: [KW_T, KH_W, programs]} of each kind's first candidate."""
    code = ("import json, sys; sys.path.insert(0, 'bench/tools'); import what_if_plan as w\n"
            "out = {}\n"
            "for kind in ('fwd', 'dw'):\n"
            f"    ls = w.launch_plans(kind, {', '.join(map(str, shape))}, 'bfloat16', 1.0)[0]['launches'][0]\n"
            "    out[kind] = [ls['args'].get('KW_T'), ls['args'].get('KH_W'), ls['programs']]\n"
            "print(json.dumps(out))")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env})


def test_what_if_plan_changes_only_what_it_is_asked():
    """bench/tools/what_if_plan.py (the bounds in bench/NOTES.md): SLAK_WHATIF_LINES makes dense calls run the
    kernels of fewer lines, SLAK_WHATIF_DW_SPLITS the plane weight gradient's image groups; unset, it is the
    project's plan."""
    def plans(shape, **env):
        r = _what_if(shape, **env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.splitlines()[-1])

    stage1 = (64, 124, 56, 56, 51)   # (on the plane weight-gradient kernel, the one SLAK_WHATIF_DW_SPLITS acts on)
    direct = {k: launch_plans(k, *stage1, "bfloat16", 1.0)[0]["launches"][0] for k in ("fwd", "dw")}
    assert "plane_dw_kernel" in direct["dw"]["kernel"].__name__
    assert plans(stage1) == {k: [5, 5, direct[k]["programs"]] for k in ("fwd", "dw")}
    assert direct["dw"]["programs"] != 124 * 4
    assert plans(stage1, SLAK_WHATIF_DW_SPLITS="4")["dw"] == [5, 5, 124 * 4]
    lines = plans((8, 3, 28, 28, 13), SLAK_WHATIF_LINES="3,2")
    assert lines["fwd"][:2] == [3, 2] and lines["dw"][:2] == [3, 2]
    bad = _what_if(stage1, SLAK_WHATIF_LINES="0,9")
    assert bad.returncode != 0 and "SLAK_WHATIF_LINES" in bad.stderr


def test_host_time_tool_times_every_part_without_a_kernel():
    """bench/tools/host_time.py (bench/NOTES.md "Host time per call"): a positive median for every part of the
    op, with the launch stubbed out while it times (no kernel runs) and put back afterwards."""
    spec = importlib.util.spec_from_file_location("host_time", ROOT / "bench" / "tools" / "host_time.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    real_run = tool.op._run
    before = dict(LAUNCH_COUNTS)
    res = tool.parts(stage=4, batch=1, channels=2, dtype=torch.bfloat16, calls=3)
    assert dict(LAUNCH_COUNTS) == before, "a kernel was launched while timing the host"
    assert tool.op._run is real_run
    assert {"lk_conv2d forward (no grad)", "  fold_branches", "    launch_lk_conv2d_fwd",
            "      fwd_launch_spec (cached)", "      fwd_launch_spec (built)", "lk_conv2d forward + backward"} <= set(res)
    assert all(us > 0 for us in res.values()), res


def test_gpu_check_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], check=True)


def test_workflows_parse_and_run_the_documented_commands():
    yaml = pytest.importorskip("yaml")
    ci = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    gpu = yaml.safe_load((ROOT / ".github" / "workflows" / "gpu.yml").read_text())
    ci_runs = " ".join(s.get("run", "") for s in ci["jobs"]["cpu"]["steps"])
    assert "download.pytorch.org/whl/cpu" in ci_runs and "-c .ci/constraints.txt" in ci_runs and "pytest -q" in ci_runs
    job = gpu["jobs"]["gpu-check"]
    assert job["runs-on"] == ["self-hosted", "gpu"]
    assert any("bench/gpu_check.sh" in s.get("run", "") for s in job["steps"])
    assert any(s.get("with", {}).get("path") == "bench/results/" for s in job["steps"])
