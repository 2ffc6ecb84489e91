"""Reliability (docs/errors.md): no data loss, no silent acceptance of nonsense, errors that say what to fix.

slak-train: a finished run's results are never written over, a resumed run's summary covers the whole run, every
flag is checked before anything runs, unreadable --resume files and images are named. Checkpoint files given to
load_official_checkpoint. slak-bench: flags and output paths checked before the benchmark. LKConv2d / ConvBN
arguments. convert_depthwise converts only what it can convert exactly, and says what it skipped.
"""

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slak_triton
from slak_triton import train
from slak_triton.bench import bench_lk_conv2d, bench_models, report
from slak_triton.bench import cli as bench_cli
from slak_triton.models import load_official_checkpoint, slak_test
import slak_triton.nn as stnn
from slak_triton.nn import ConvBN, LKConv2d, convert_depthwise, convert_depthwise_plan

needs_digits = pytest.mark.skipif(train.load_digits is None, reason="slak-train's bundled data needs scikit-learn")


def _tiny(out_dir, *extra):
    return ["--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "16", "--output-dir", str(out_dir),
            "--update-frequency", "1", "--no-progress", *extra]


def _bad_files(tmp_path, gen):
    """name -> (path, words the error must contain): files that are not loadable checkpoints."""
    good = tmp_path / "good.pth"
    torch.save({"w": torch.randn(64, 64, generator=gen)}, good)
    data = good.read_bytes()
    files = {"empty": (b"", "empty"), "truncated": (data[: len(data) // 2], "truncated"),
             "text": (b"epoch,acc\n1,0.5\n", "not a PyTorch checkpoint")}
    out = {}
    for name, (content, words) in files.items():
        p = tmp_path / f"{name}.pth"
        p.write_bytes(content)
        out[name] = (p, words)
    (tmp_path / "adir.pth").mkdir()
    out["directory"] = (tmp_path / "adir.pth", "directory")
    out["missing"] = (tmp_path / "missing.pth", "no such file")
    return out


# ------------------------------------------------------------------------------------------------- slak-train

@needs_digits
def test_finished_run_is_kept_and_resumed_summary_covers_the_whole_run(tmp_path, capsys):
    seed = str(int(torch.randint(0, 1000, ())))
    assert train.main(_tiny(tmp_path, "--seed", seed)) == 0
    summary_1 = (tmp_path / "summary.json").read_bytes()
    ckpt_1 = (tmp_path / "checkpoint-last.pth").read_bytes()
    first = json.loads(summary_1)
    capsys.readouterr()

    # --resume auto on the finished run: nothing to do, its results stay as they are
    assert train.main(_tiny(tmp_path, "--seed", seed, "--resume", "auto")) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "summary.json").read_bytes() == summary_1
    assert (tmp_path / "checkpoint-last.pth").read_bytes() == ckpt_1
    # a fresh run into the same directory is refused before it writes anything
    assert train.main(_tiny(tmp_path, "--seed", seed)) == 2
    err = capsys.readouterr().err
    assert "--output-dir" in err and "already holds a run" in err and "--resume auto" in err
    assert (tmp_path / "summary.json").read_bytes() == summary_1
    assert (tmp_path / "checkpoint-last.pth").read_bytes() == ckpt_1
    # resuming with settings the checkpoint fixes is refused, naming them
    assert train.main(_tiny(tmp_path, "--seed", seed, "--resume", "auto", "--density", "0.5")) == 2
    err = capsys.readouterr().err
    assert "--density 0.6 (now 0.5)" in err
    args = _tiny(tmp_path, "--seed", seed, "--resume", "auto")
    args[1] = "2"
    assert train.main(args + ["--max-steps-per-epoch", "3"]) == 2
    assert "steps per epoch" in capsys.readouterr().err

    # a real resume (one more epoch): the summary holds both epochs, all optimizer steps, the whole history
    assert train.main(args) == 0
    whole = json.loads((tmp_path / "summary.json").read_text())
    assert whole["epochs"] == 2 and whole["optimizer_steps"] == 4 and whole["topology_updates"] == 4
    assert [h["epoch"] for h in whole["history"]] == [1, 2]
    assert whole["history"][0] == first["history"][0]
    assert whole["held_out_accuracy"] == whole["history"][-1]["val_acc"] and whole["held_out_images"] == 359
    # summary.json lost after the run finished: --resume auto rebuilds it from the checkpoint, trains nothing
    (tmp_path / "summary.json").unlink()
    assert train.main(args) == 0
    rebuilt = json.loads((tmp_path / "summary.json").read_text())
    assert {k: v for k, v in rebuilt.items() if k != "seconds"} == {k: v for k, v in whole.items() if k != "seconds"}
    # fewer epochs than the checkpoint has done
    assert train.main(_tiny(tmp_path, "--seed", seed, "--resume", "auto")) == 2
    assert "--epochs: expected at least 2" in capsys.readouterr().err


def test_resume_auto_without_checkpoint_does_not_overwrite_a_summary(tmp_path, capsys):
    (tmp_path / "summary.json").write_text('{"held_out_accuracy": 0.9}')
    assert train.main(_tiny(tmp_path, "--resume", "auto")) == 2
    err = capsys.readouterr().err
    assert "--output-dir" in err and "nothing to resume" in err
    assert (tmp_path / "summary.json").read_text() == '{"held_out_accuracy": 0.9}'


BAD_FLAGS = [
    (["--clip-grad", "-1"], "--clip-grad"),
    (["--clip-grad", "0"], "--clip-grad"),
    (["--lr", "-0.001"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--min-lr", "-0.000001"], "--min-lr"),
    (["--min-lr", "1"], "--min-lr"),
    (["--weight-decay", "-0.05"], "--weight-decay"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--input-size", "0"], "--input-size"),
    (["--input-size", "16"], "--input-size"),
    (["--num-classes", "0"], "--num-classes"),
    (["--num-classes", "-3"], "--num-classes"),
    (["--smoothing", "1"], "--smoothing"),
    (["--smoothing", "-0.1"], "--smoothing"),
    (["--warmup-epochs", "5"], "--warmup-epochs"),
    (["--warmup-epochs", "inf"], "--warmup-epochs"),
    (["--num-workers", "-1"], "--num-workers"),
    (["--drop-path", "nan"], "--drop-path"),
    (["--model-ema-decay", "1.5"], "--model-ema-decay"),
    (["--density", "inf"], "--density"),
    (["--seed", "-1"], "--seed"),
    (["--epochs", "0"], "--epochs"),
    (["--max-steps-per-epoch", "0"], "--max-steps-per-epoch"),
    (["--device", "cuda:%d" % torch.cuda.device_count()], "--device"),
    (["--device", "tpu"], "--device"),
    (["--device", "not a device"], "--device"),
    (["--data-path", "/nonexistent/imagenet"], "--data-path"),
    (["--resume", ""], "--resume"),
]


@pytest.mark.parametrize("flags,name", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_values_are_refused_before_anything_runs(tmp_path, capsys, flags, name):
    out = tmp_path / "run"
    assert train.main(_tiny(out, *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"slak-train: error: {name}"), err
    value = getattr(train.build_parser().parse_args(flags), name[2:].replace("-", "_"))
    assert f"got {value!r}" in err, err
    assert not out.exists(), "nothing is created for a run that is refused"


def test_device_cuda_without_cuda_says_so(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert train.main(_tiny(tmp_path / "run", "--device", "cuda")) == 2
    err = capsys.readouterr().err
    assert "--device" in err and "CUDA is not available" in err


def test_triton_backend_on_cpu_without_interpreter_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "interpreter_active", lambda: False)
    assert train.main(_tiny(tmp_path, "--device", "cpu", "--backend", "triton")) == 2
    assert "--backend: expected 'auto' or 'reference' on the CPU, got 'triton'" in capsys.readouterr().err


def test_torchrun_environment_is_checked(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert train.main(_tiny(tmp_path)) == 2
    assert "environment variable WORLD_SIZE: expected an int >= 1" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    assert train.main(_tiny(tmp_path)) == 2
    assert "environment variable RANK: expected 0..1" in capsys.readouterr().err


def test_public_helpers_check_their_arguments():
    with pytest.raises(ValueError, match="^size: expected an int >= 1, got 0"):
        train.digits_datasets(size=0)
    with pytest.raises(ValueError, match="^test_fraction"):
        train.digits_datasets(test_fraction=1.0)
    with pytest.raises(TypeError, match="^module: expected a module with a weight"):
        stnn.masked_weight(nn.ReLU())
    with pytest.raises(ValueError, match="^min_kernel_size"):
        stnn.is_convertible_depthwise(nn.Conv2d(3, 3, 3, padding=1, groups=3), 0)


@needs_digits
def test_more_labels_than_num_classes(tmp_path, capsys):
    assert train.main(_tiny(tmp_path, "--num-classes", "7")) == 2
    err = capsys.readouterr().err
    assert "--num-classes: expected at least 10" in err and "got 7" in err


def test_output_dir_that_cannot_be_written_is_found_before_training(tmp_path, capsys):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    assert train.main(_tiny(afile)) == 2
    assert "--output-dir: expected a directory" in capsys.readouterr().err
    assert train.main(_tiny(afile / "sub")) == 2
    assert "--output-dir: expected a writable directory" in capsys.readouterr().err


def test_unreadable_resume_files_are_named(tmp_path, capsys, gen):
    (tmp_path / "files").mkdir()
    bad = _bad_files(tmp_path / "files", gen)
    for name, (path, words) in bad.items():
        assert train.main(_tiny(tmp_path / name, "--resume", str(path))) == 2, name
        err = capsys.readouterr().err
        assert "--resume" in err and str(path) in err and words in err, (name, err)
        assert "weights_only" not in err, (name, err)
    official = tmp_path / "files" / "official.pth"
    torch.save({"model": slak_test().state_dict()}, official)
    assert train.main(_tiny(tmp_path / "official", "--resume", str(official))) == 2
    err = capsys.readouterr().err
    assert "not a slak-train checkpoint" in err and str(official) in err


@needs_digits
def test_divergence_names_the_learning_rate(tmp_path, capsys):
    rc = train.main(_tiny(tmp_path, "--lr", "1e30", "--min-lr", "0", "--warmup-epochs", "0", "--no-sparse"))
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "loss is" in err and "--lr" in err and "learning rate" in err


class _FakeDecoderError(Exception):
    pass


def test_corrupted_image_error_names_the_file(tmp_path):
    path = str(tmp_path / "train" / "cat" / "broken.jpg")

    def decode(p):
        raise _FakeDecoderError("cannot identify image file")

    with pytest.raises(train.TrainError, match=r"--data-path: cannot read image .*broken\.jpg.*cannot identify"):
        train._ImageLoader(decode)(path)
    assert train._ImageLoader(lambda p: p.upper())(path) == path.upper()


def test_train_and_val_class_folders_must_agree():
    train._check_same_classes(["cat", "dog"], ["cat", "dog"], "/data")
    with pytest.raises(ValueError, match=r"--data-path: expected the same class folders.*only in val/: \['emu'\]"):
        train._check_same_classes(["cat", "dog"], ["cat", "dog", "emu"], "/data")


# ------------------------------------------------------------------------------------------- checkpoint files

def test_load_official_checkpoint_names_the_file_and_the_problem(tmp_path, gen):
    for name, (path, words) in _bad_files(tmp_path, gen).items():
        with pytest.raises((ValueError, OSError)) as e:
            load_official_checkpoint(slak_test(), path)
        msg = str(e.value)
        assert "path_or_dict" in msg and str(path) in msg and words in msg, (name, msg)
        assert "weights_only" not in msg, (name, msg)
    lst = tmp_path / "list.pth"
    torch.save([torch.ones(1)], lst)
    with pytest.raises(ValueError, match="a mapping.*got a list"):
        load_official_checkpoint(slak_test(), lst)
    meta = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "args": {"lr": 1.0}}, meta)
    with pytest.raises(ValueError, match="holds no tensors"):
        load_official_checkpoint(slak_test(), meta)
    other = {"conv.weight": torch.randn(3, 3, generator=gen)}
    model = slak_test()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="none of the 1 tensors"):
        load_official_checkpoint(model, other, strict=False)  # loading nothing is never what was meant
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    other_variant = {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                     for k, v in slak_test(num_classes=7).state_dict().items()}
    with pytest.raises(ValueError, match=r"another shape.*head\.weight \(7, 16\) \(model \(10, 16\)\)"):
        load_official_checkpoint(model, other_variant)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "nothing half-loaded"
    # the weights_only hint stays where it is right: a readable file with a pickled object
    ns = tmp_path / "namespace.pth"
    torch.save({"model": slak_test().state_dict(), "args": _Opaque()}, ns)
    with pytest.raises(RuntimeError, match="weights_only=False"):
        load_official_checkpoint(slak_test(), ns)
    load_official_checkpoint(slak_test(), ns, weights_only=False)


class _Opaque:
    """A pickled object that weights_only loading refuses (as official checkpoints' argparse Namespace)."""


# ------------------------------------------------------------------------------------------------- slak-bench

@pytest.fixture
def no_benchmark(monkeypatch):
    """Makes running a benchmark an error: what these tests refuse must be refused before it runs."""
    def ran(*a, **k):
        raise AssertionError("the benchmark ran")
    monkeypatch.setattr(bench_models, "run_model_bench", ran)
    monkeypatch.setattr(bench_lk_conv2d, "run_op_bench", ran)


BAD_BENCH = [
    (["model", "--batch", "0"], "--batch"),
    (["model", "--batch", "-2"], "--batch"),
    (["model", "--image-size", "0"], "--image-size"),
    (["model", "--image-size", "31"], "--image-size"),
    (["model", "--rep-ms", "0"], "--rep-ms"),
    (["model", "--warmup-ms", "-1"], "--warmup-ms"),
    (["op", "--rep-ms", "nan"], "--rep-ms"),
    (["op", "--warmup-ms", "inf"], "--warmup-ms"),
    (["op", "--seed", "-1"], "--seed"),
]


@pytest.mark.parametrize("argv,name", BAD_BENCH, ids=[" ".join(a) for a, _ in BAD_BENCH])
def test_bench_flags_are_checked_before_the_benchmark(no_benchmark, capsys, argv, name):
    with pytest.raises(SystemExit) as e:
        bench_cli.main(argv + ["--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {name}: expected" in err and f"got {argv[-1]}" in err.replace("got '", "got "), err


@pytest.mark.parametrize("sub", ["op", "model"])
def test_bench_output_paths_are_checked_before_the_benchmark(no_benchmark, tmp_path, capsys, sub):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    cases = [(["--json", str(tmp_path)], "--json", "directory"),
             (["--csv", str(afile / "x.csv")], "--csv", "not a directory"),
             (["--json", str(tmp_path / "a.out"), "--csv", str(tmp_path / "a.out")], "--csv", "other than --json")]
    if sub == "op":
        cases.append((["--plot", str(tmp_path)], "--plot", "directory"))
    for flags, name, words in cases:
        with pytest.raises(SystemExit) as e:
            bench_cli.main([sub, "--no-progress", *flags])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"error: {name}: expected" in err and words in err, err
    assert afile.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_model_bench_config_is_validated():
    for bad, name in [(dict(batch=0), "batch"), (dict(image_size=16), "image_size"), (dict(dtype="fp8"), "dtype"),
                      (dict(variants=("T", "XL")), "variants"), (dict(kinds=()), "kinds"),
                      (dict(rep_ms=float("nan")), "rep_ms"), (dict(providers="torch"), "providers")]:
        with pytest.raises(ValueError, match=f"^{name}: expected"):
            bench_models.ModelBenchConfig(**bad)


def test_bench_csv_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "r.csv"
    report.write_csv(path, [{"a": 1, "b": 2}])
    before = path.read_text()

    class Unprintable:
        def __str__(self):
            raise RuntimeError("no text")

    with pytest.raises(RuntimeError, match="no text"):
        report.write_csv(path, [{"a": 3, "b": 4}, {"a": Unprintable(), "b": 5}])
    assert path.read_text() == before


# ------------------------------------------------------------------------------------------------- modules

@pytest.mark.parametrize("kernel_size,exc", [((7, 7, 7), ValueError), (7.0, TypeError), ((7.0, 7), TypeError),
                                             ([5], ValueError), (True, TypeError), ((7, 6), ValueError),
                                             ((0, 3), ValueError), (65, ValueError)])
def test_lkconv2d_kernel_size_is_checked(kernel_size, exc):
    with pytest.raises(exc, match=r"^kernel_size"):
        LKConv2d(4, kernel_size)
    with pytest.raises(exc, match=r"^kernel_size"):
        ConvBN(4, kernel_size if isinstance(kernel_size, (tuple, list)) else (kernel_size, kernel_size))


def test_lkconv2d_and_convbn_other_arguments():
    with pytest.raises(ValueError, match="^channels"):
        ConvBN(0, (7, 3))
    with pytest.raises(TypeError, match="^bn"):
        ConvBN(4, (7, 3), bn="yes")
    with pytest.raises(TypeError, match="^bias"):
        LKConv2d(4, 7, bias="no")
    assert LKConv2d(4, [7, 3]).kernel_size == (7, 3) and ConvBN(4, [5, 3]).conv.kernel_size == (5, 3)


class _DoubledConv(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


def _dw(c, k, gen, cls=nn.Conv2d):
    conv = cls(c, c, k, padding=k // 2, groups=c)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.3)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen))
    return conv


def test_convert_depthwise_never_changes_what_a_model_computes(gen):
    c = 3
    hooked = _dw(c, 7, gen)
    hooked.register_forward_hook(lambda m, i, o: o + 1.0)
    pre = _dw(c, 7, gen)
    pre.register_forward_pre_hook(lambda m, i: (i[0] * 0.5,))
    pnorm = nn.utils.parametrizations.weight_norm(_dw(c, 9, gen))
    spec = nn.utils.spectral_norm(_dw(c, 7, gen))
    masked = _dw(c, 7, gen)
    masked.register_buffer("weight_mask", (torch.rand(masked.weight.shape, generator=gen) < 0.5).float())
    shared = _dw(c, 7, gen)
    plain = _dw(c, 11, gen)
    model = nn.Sequential(_dw(c, 7, gen, _DoubledConv), hooked, pre, pnorm, spec, masked, shared, nn.GELU(),
                          nn.Sequential(shared), plain).eval()
    tied = _dw(c, 11, gen)
    tied.weight = plain.weight  # weight tying across two convs
    model.append(tied)
    x = torch.randn(2, c, 12, 10, generator=gen)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
    params = {id(p) for p in model.parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the conversion

    plan = convert_depthwise_plan(model, min_kernel_size=7)
    assert plan["6"] is None and plan["9"] is None and plan["10"] is None and "8.0" not in plan  # 8.0 is "6"
    with pytest.warns(UserWarning, match="convert_depthwise: left 6 depthwise conv") as rec:
        out = convert_depthwise(model, min_kernel_size=7)
    assert out is model
    msg = str(rec[0].message)
    for name, words in [("0", "overrides forward"), ("1", "forward hooks"), ("2", "forward pre hooks"),
                        ("3", "parametrized"), ("4", "hooks"), ("5", "weight_mask")]:
        assert f"{name}: " in msg and words in plan[name], (name, plan[name])
    kinds = [type(m).__name__ for m in model]
    assert kinds[:6] == ["_DoubledConv", "Conv2d", "Conv2d", "ParametrizedConv2d", "Conv2d", "Conv2d"], kinds
    assert isinstance(model[6], LKConv2d) and model[8][0] is model[6], "a shared conv stays one module"
    assert isinstance(model[9], LKConv2d) and isinstance(model[10], LKConv2d)
    assert model[10].weight is model[9].weight, "tied weights stay tied"
    assert {id(p) for p in model.parameters()} == params, "the optimizer still holds the model's parameters"
    with torch.no_grad(), slak_triton.use_backend("reference"):
        y = model(x)
    assert (y.double() - ref).abs().max() / ref.abs().max() < 1e-5
    with slak_triton.use_backend("reference"):
        F.mse_loss(model(x), torch.zeros_like(ref).float()).backward()
    w_before = model[9].weight.detach().clone()
    opt.step()
    assert not torch.equal(model[9].weight, w_before), "the pre-conversion optimizer trains the converted conv"
    # the model itself a conv: its replacement holds the same Parameters; an inexact one is returned as it is
    root = _dw(c, 7, gen)
    lk = convert_depthwise(root)
    assert isinstance(lk, LKConv2d) and lk.weight is root.weight and lk.bias is root.bias
    with pytest.warns(UserWarning, match=r"\(the model itself\): its class _DoubledConv overrides forward"):
        doubled = _dw(c, 7, gen, _DoubledConv)
        assert convert_depthwise(doubled) is doubled
    # nothing left to convert: no warning about convs that need no conversion, an empty plan is fine
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_depthwise(nn.Sequential(nn.Conv2d(3, 6, 3)))
