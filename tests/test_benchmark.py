"""Benchmark harness, report, plots and speed study on tiny synthetic data."""

import json
import os
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_ipear.benchmark import (
    BenchmarkMethod,
    PeakMemory,
    VoxelMorphDDF,
    build_method,
    format_report,
    mean_sd,
    run_benchmark,
    speed_study,
    time_call,
)
from monai_ipear.benchmark.plots import has_matplotlib, write_plots


def _square_pair(shift: int = 3, size: int = 32):
    """2D pair: a labelled square in the fixed image, the same square shifted by ``shift`` along axis 0 in the
    moving image, so ddf = +shift along axis 0 aligns it exactly."""
    fixed = torch.zeros(1, 1, size, size)
    fixed[..., 8:20, 10:22] = 1.0
    fixed[..., 12:16, 14:18] = 2.0  # a second label inside
    moving = torch.roll(fixed, shifts=shift, dims=2)
    return {"moving_image": moving / 2, "fixed_image": fixed / 2, "moving_label": moving.clone(),
            "fixed_label": fixed.clone(), "pair": "square"}


def _constant(name: str, shift: float):
    def register(moving, fixed):
        ddf = torch.zeros(1, 2, *fixed.shape[2:])
        ddf[:, 0] = shift
        return ddf

    return BenchmarkMethod(name, register)


def test_time_call_counts_warmup_and_repeats():
    calls = []

    def fn(x):
        calls.append(x)
        time.sleep(0.01)
        return x + 1

    out, times, peak = time_call(fn, 1, repeats=3, warmup=2)
    assert out == 2 and len(calls) == 5 and len(times) == 3
    assert all(0.009 < t < 1.0 for t in times)


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory() as small:
        torch.zeros(10)
    with PeakMemory() as big:
        x = torch.ones(64, 2**20)  # 256 MiB, touched
        time.sleep(0.05)
        del x
    assert big.peak_mb > 200, big.peak_mb
    assert small.peak_mb < 50


def test_run_benchmark_values_with_known_fields():
    pair = _square_pair(shift=3)
    methods = [_constant("exact", 3.0), _constant("identity", 0.0), BenchmarkMethod("ants-syn", None, note="skipped")]
    logs = []
    res = run_benchmark(methods, [pair], repeats=2, warmup=1, log=logs.append)
    assert set(res) == {"exact", "identity"} and any("skipped" in m for m in logs)
    exact, ident = res["exact"][0], res["identity"][0]
    assert exact["dice_mean"] == pytest.approx(1.0) and exact["hd95_mean"] == pytest.approx(0.0)
    assert exact["folding_pct"] == 0.0 and len(exact["times_s"]) == 2
    # identity: label 1 is a 12x12 ring-shaped region minus the inner 4x4; shifted by 3 rows
    f, m = pair["fixed_label"][0, 0], pair["moving_label"][0, 0]
    for v in (1, 2):
        want = 2 * float(((f == v) & (m == v)).sum()) / float((f == v).sum() + (m == v).sum())
        assert ident[f"dice_{v}"] == pytest.approx(want)
    assert ident["dice_2"] == pytest.approx(0.25)  # 4x4 squares overlapping by 1 row of 4
    assert ident["iterations"] is None


def test_learned_methods_share_weights_and_record_iterations():
    torch.manual_seed(0)
    base = build_method("ipear", spatial_dims=2)
    fixed3 = build_method("ipear-fixed3", {"ipear": base.network}, spatial_dims=2)
    assert fixed3.parameters == base.parameters and "random" not in fixed3.note
    assert fixed3.network.encoder is base.network.encoder  # same weights
    pair = _square_pair()
    res = run_benchmark([fixed3, base], [pair], repeats=1, warmup=0, surface=False)
    assert res["ipear-fixed3"][0]["iterations"] == [3, 3, 3, 3]
    assert all(1 <= k <= 10 for k in res["ipear"][0]["iterations"])
    assert type(base.network.controller).__name__ == "TCI"  # the copy did not change the original
    iirp = build_method("iirpnet", spatial_dims=2)
    assert type(iirp.network.controller).__name__ == "IterStop" and "random" in iirp.note


def test_voxelmorph_wrapper_returns_monai_ddf():
    torch.manual_seed(0)
    net = VoxelMorphDDF(spatial_dims=2).eval()
    m, f = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(m, f), net.net(m, f)[1])


def test_unavailable_method_has_a_visible_note():
    ants = build_method("ants-syn")
    if ants.available:
        assert ants.timed_once
    else:
        assert "skipped" in ants.note and "antspyx" in ants.note
    with pytest.raises(ValueError):
        build_method("no-such-method")


def test_report_has_rows_and_statistics():
    res = {"exact": [{"pair": "a", "time_s": 1.0, "peak_mb": 10.0, "dice_mean": 0.8, "dice_1": 0.8, "folding_pct": 0.0,
                      "iterations": [3, 3, 4, 5]},
                     {"pair": "b", "time_s": 3.0, "peak_mb": 30.0, "dice_mean": 0.6, "dice_1": 0.6, "folding_pct": 0.1,
                      "iterations": [3, 3, 4, 3]}],
           "voxelmorph": [{"pair": "a", "time_s": 0.5, "peak_mb": 5.0, "dice_mean": 0.5, "folding_pct": 1.0, "iterations": None}]}
    text = format_report(res, {"exact": 1234, "voxelmorph": None}, "python -m monai_ipear.benchmark --x", ["a note"],
                         speed=[{"size": [8, 8], "method": "ipear", "time_s": 2.0, "peak_mb": 1.0, "ipear_ratio": 1.0}],
                         training=[{"method": "ipear", "budget_min": 1, "max_steps": None, "wall_min": 1.2, "steps": 7, "epochs": 1,
                                    "final_loss": -0.3}],
                         machine={"cpu": "test cpu"})
    assert "python -m monai_ipear.benchmark --x" in text and "test cpu" in text and "a note" in text
    rows = [l for l in text.splitlines() if l.startswith("| exact |")]
    assert rows == ["| exact | 1,234 | 2.000 (1.414) | 20 (14) | 70.00 (14.14) | n/a | n/a | 0.0500 (0.0707) "
                    "| 4.00 / 4.00 / 3.00 / 3.00 | 2 |"]
    assert "| MONAI VoxelMorph | - | 0.500 | 5 | 50.00 |" in text
    assert "| iPEAR (TCI) | 1 min | 1.2 | 7 | 1 | -0.3000 |" in text
    assert "| 8x8 | 1 | no | iPEAR (TCI) | 2.000 |" in text and "| 1.00 |" in text
    assert mean_sd([1.0, float("nan"), 3.0], "{:.1f}") == "2.0 (1.4)" and mean_sd([]) == "n/a"


def test_speed_study_ratios():
    torch.manual_seed(0)
    base = build_method("rpnet", spatial_dims=2).network
    nets = {"ipear": build_method("ipear-fixed3", {"ipear": build_method("ipear", spatial_dims=2).network}, spatial_dims=2).network,
            "rpnet": base}
    pair = _square_pair()
    rows = speed_study(nets, pair["moving_image"], pair["fixed_image"], [(16, 24)], repeats=1, warmup=0,
                       batch_sizes=(1, 2), log=lambda *_: None)
    assert len(rows) == 4
    for r in rows:
        ref = next(x for x in rows if x["method"] == "ipear" and x["batch"] == r["batch"])
        assert r["ipear_ratio"] == pytest.approx(ref["time_s"] / r["time_s"])
        assert r["size"] == [16, 24]
    assert rows[0]["iterations"] == [3.0] * 4


def test_speed_study_times_training_steps_apart_and_divides_like_by_like(monkeypatch):
    """Training steps run after the inference rounds, after their own warm-up steps; an encoder row is divided into
    iPEAR's encoder row and a training step into iPEAR's training step."""
    from monai_ipear.benchmark import speed as speed_mod

    calls = []  # "_Call" for inference and encoder calls (``_EncoderCall`` inherits ``__call__``), "_TrainCall"
    for cls in (speed_mod._Call, speed_mod._TrainCall):
        def wrapped(self, a, b, _original=cls.__call__, _kind=cls.__name__):
            calls.append(_kind)
            return _original(self, a, b)

        monkeypatch.setattr(cls, "__call__", wrapped)
    torch.manual_seed(0)
    nets = {"ipear": build_method("ipear", spatial_dims=2).network, "rpnet": build_method("rpnet", spatial_dims=2).network}
    pair = _square_pair()
    rows = speed_study(nets, pair["moving_image"], pair["fixed_image"], [(16, 24)], repeats=2, warmup=1,
                       encoders=("ipear", "rpnet"), train_steps=("ipear", "rpnet"), train_warmup=3, memory=False,
                       log=lambda *_: None)
    by = {r["method"]: r for r in rows}
    assert list(by) == ["ipear", "rpnet", "encoder:ipear", "encoder:rpnet", "train:ipear", "train:rpnet"]
    assert by["encoder:rpnet"]["ipear_ratio"] == pytest.approx(by["encoder:ipear"]["time_s"] / by["encoder:rpnet"]["time_s"])
    assert by["train:rpnet"]["ipear_ratio"] == pytest.approx(by["train:ipear"]["time_s"] / by["train:rpnet"]["time_s"])
    assert by["rpnet"]["ipear_ratio"] == pytest.approx(by["ipear"]["time_s"] / by["rpnet"]["time_s"])
    first_train = calls.index("_TrainCall")
    assert "_TrainCall" not in calls[:first_train] and set(calls[first_train:]) == {"_TrainCall"}
    assert len(calls[first_train:]) == 2 * (3 + 2)  # two methods x (3 warm-up steps + 2 timed rounds)
    assert all(len(r["times_s"]) == 2 for r in rows)


def test_speed_study_counts_the_arithmetic_of_each_row():
    """``flops``: a network that is one convolution has the textbook count (2 x voxels x in x out x kernel per
    sample), a training step adds its backward, and the reference's count is divided like the times."""
    from monai_ipear.benchmark.report import speed_table

    class OneConv(torch.nn.Module):  # moving, fixed -> field by one 3x3 convolution
        spatial_dims = 2

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, moving, fixed):
            return self.conv(torch.cat([moving, fixed], 1))

    torch.manual_seed(0)
    pair = _square_pair()
    nets = {"ipear": OneConv(), "rpnet": build_method("rpnet", spatial_dims=2).network}
    rows = speed_study(nets, pair["moving_image"], pair["fixed_image"], [(16, 24)], repeats=1, warmup=0,
                       batch_sizes=(2,), memory=False, flops=True, log=lambda *_: None)
    by = {r["method"]: r for r in rows}
    one_conv = 2 * (2 * 16 * 24) * 2 * 2 * 9 / 1e9  # batch 2, 16 x 24, 2 -> 2 channels, 3 x 3
    assert by["ipear"]["gflop"] == pytest.approx(one_conv)
    assert by["rpnet"]["gflop"] > 10 * one_conv
    assert by["rpnet"]["ipear_gflop_ratio"] == pytest.approx(one_conv / by["rpnet"]["gflop"])
    table = speed_table(rows)
    assert table[0].endswith("GFLOP (convolutions, products) | GFLOP/s | iPEAR / this, GFLOP |")
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert "GFLOP" not in speed_table([{k: v for k, v in rows[0].items() if "gflop" not in k}])[0]
    # a training step counts its backward too: the gradients of every convolution's input and weights
    train = speed_study({"rpnet": nets["rpnet"]}, pair["moving_image"], pair["fixed_image"], [(16, 24)], repeats=1,
                        warmup=0, train_steps=("rpnet",), memory=False, flops=True, reference="rpnet",
                        log=lambda *_: None)
    by = {r["method"]: r for r in train}
    assert by["train:rpnet"]["gflop"] > 2 * by["rpnet"]["gflop"]


@pytest.mark.skipif(not has_matplotlib, reason="matplotlib not installed (optional extra 'bench')")
def test_plots_are_png_files(tmp_path):
    res = {"ipear": [{"dice_mean": 0.7, "time_s": 1.0, "iterations": [3, 4, 3, 3]},
                     {"dice_mean": 0.8, "time_s": 1.2, "iterations": [3, 3, 5, 3]}],
           "rpnet": [{"dice_mean": 0.6, "time_s": 0.2, "iterations": [1, 1, 1, 1]}]}
    paths = write_plots(res, str(tmp_path))
    assert len(paths) == 3
    for p in paths.values():
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 2000


def test_command_end_to_end_on_synthetic_files(tmp_path):
    from monai_ipear.benchmark.__main__ import benchmark_main as main

    rng = np.random.default_rng(0)
    entries = []
    for i in range(4):
        lab = np.zeros((32, 32, 32), np.float32)
        lab[8 + i:22 + i, 6:24, 9:23] = 1
        lab[12 + i:16 + i, 10:15, 12:18] = 2
        img = lab * 0.4 + rng.random(lab.shape).astype(np.float32) * 0.1
        for kind, arr in (("img", img), ("lab", lab)):
            nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / f"s{i}_{kind}.nii.gz")
        entries.append({"image": f"s{i}_img.nii.gz", "label": f"s{i}_lab.nii.gz"})
    with open(tmp_path / "dataset.json", "w") as f:
        json.dump({"training": entries[:2], "validation": entries[2:]}, f)
    out = tmp_path / "report.md"
    ran = main(["--datalist", str(tmp_path / "dataset.json"), "--methods", "rpnet", "iirpnet", "ants-syn",
                "--train-steps", "2", "--models-dir", str(tmp_path / "models"), "--repeats", "1", "--warmup", "0",
                "--out", str(out)])
    text = out.read_text()
    assert "--train-steps 2" in text
    for row in ("| RP-Net (single pass) | 419,964 |", "| IIRP-Net (RP-Net + IterStop) | 419,964 |"):
        assert row in text
    assert "| RP-Net (single pass) | 2 steps |" in text  # training table states the budget
    assert os.path.exists(tmp_path / "models" / "rpnet.pt")
    assert len(ran["results"]["rpnet"]) == 2 and ran["training"][0]["steps"] == 2
    assert "ANTs SyN" in text or "antspyx" in text  # present as a row or as a visible skip note
    r = ran["results"]["rpnet"][0]
    assert 0 < r["dice_mean"] <= 1 and r["hd95_mean"] >= 0 and r["pair"] == "s2_img_to_s3_img"


def _allocate(mib: int) -> float:
    x = torch.ones(mib * 2**18)  # float32: mib MiB
    return float(x[-1])


def _overlapping_tensors(held: list, mib: int) -> float:
    """Frees ``held``'s tensor (allocated before the call: must not count against the call's own), then holds
    mib + 2 mib + mib MiB, frees the first mib, adds 2 mib (peak: 5 x mib), frees 3 x mib and adds 2 mib."""
    held.clear()
    a = torch.ones(mib * 2**18)
    b = torch.ones(2 * mib * 2**18)
    c = a + 1
    del a
    d = torch.ones(2 * mib * 2**18)
    del b, c
    e = d * 2
    return float(e[0])


def test_cpu_tensor_peak_is_the_most_the_calls_tensors_hold_at_once():
    from monai_ipear.benchmark.memory import cpu_tensor_peak_bytes

    held = [torch.ones(64 * 2**18)]  # 64 MiB allocated before the call, freed inside it
    peak = cpu_tensor_peak_bytes(_overlapping_tensors, held, 8)
    assert not held
    assert peak is not None and abs(peak / 2**20 - 40) < 0.01, peak / 2**20
    assert abs(cpu_tensor_peak_bytes(_allocate, 3) / 2**20 - 3) < 0.01


def _measure_after_a_larger_peak(mib: int) -> dict:
    from monai_ipear.benchmark.memory import measure_call_peak

    big = torch.ones(3 * mib * 2**18)  # an earlier, larger peak (as a child inherits from a large parent)
    del big
    return measure_call_peak(_allocate, mib)


def test_call_peak_is_not_hidden_by_an_earlier_larger_peak():
    """ru_maxrss never falls, and a fork+exec child starts with its parent's: the call's own peak must still show."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        r = pool.apply(_measure_after_a_larger_peak, (300,))
    assert r["peak_in_call"] and 250 < r["peak_rise_mb"] < 450, r


def test_fresh_process_peak_memory_sees_the_allocation_every_time():
    """The in-process sampler reports ~0 once the allocator keeps memory; a fresh process per call does not."""
    import functools

    from monai_ipear.benchmark.memory import peak_memory_in_fresh_process

    runs = [peak_memory_in_fresh_process(functools.partial(_allocate, 300)) for _ in range(2)]
    for r in runs:
        assert "error" not in r, r
        assert r["peak_in_call"] and 250 < r["peak_rise_mb"] < 450, r
        assert r["peak_mb"] >= r["peak_rise_mb"]
        assert abs(r["tensor_peak_mb"] - 300) < 1, r  # the tensor alone, whatever the allocator keeps
    small = peak_memory_in_fresh_process(functools.partial(_allocate, 1))
    assert small["peak_rise_mb"] < 60, small


# ---- other tools as speed rows (antspyx / unigradicon are optional: faked here, so the plumbing is tested in CI)


class _FakeICONNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.regis_net = torch.nn.Conv3d(2, 3, 3)

    def clean(self):  # uniGradICON's: drops the last call's transforms
        del self.phi_AB


def _fake_unigradicon(monkeypatch):
    """Stand-ins for ``unigradicon`` and ``icon_registration.itk_wrapper`` that record what they are given."""
    import sys
    import types

    calls = []

    def register_pair(model, image_A, image_B, finetune_steps=None, **kwargs):
        print("loss printed by the tool")
        model.phi_AB = lambda coordinates: coordinates  # kept by the real network: a closure, not picklable
        calls.append({"model": model, "A": image_A, "B": image_B, "steps": finetune_steps,
                      "grad": torch.is_grad_enabled()})
        return ("phi_AB", "phi_BA")

    ugi = types.ModuleType("unigradicon")
    ugi.input_shape = [1, 1, 175, 175, 175]
    ugi.make_network = lambda shape, include_last_step=False: _FakeICONNet()
    icon = types.ModuleType("icon_registration")
    wrapper = types.ModuleType("icon_registration.itk_wrapper")
    wrapper.register_pair = register_pair
    icon.itk_wrapper = wrapper
    for name, mod in (("unigradicon", ugi), ("icon_registration", icon), ("icon_registration.itk_wrapper", wrapper)):
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def test_unigradicon_speed_row_runs_its_register_pair_as_its_command_does(monkeypatch, tmp_path, capsys):
    import pickle

    import itk

    from monai_ipear.benchmark.methods import display_name
    from monai_ipear.benchmark.speed import _Call

    calls = _fake_unigradicon(monkeypatch)
    moving = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 1, 2, 3, 4) / 24
    fixed = 1 - moving
    weights = tmp_path / "Step_2_final.trch"
    reference = torch.nn.Conv3d(2, 3, 3)
    torch.save(reference.state_dict(), weights)
    for name, steps in (("unigradicon", None), ("unigradicon-io7", 7)):
        method = build_method(name, {"unigradicon": str(weights)})
        assert method.register is None and not method.available  # no field: not a row of the accuracy table
        assert method.note == "speed row only" and method.parameters == 3 * 2 * 27 + 3
        assert torch.equal(method.network.net.regis_net.weight, reference.weight)  # the given weights are loaded
        _Call(method.network, False, "cpu")(moving, fixed)  # as the speed study calls it (under no_grad)
        call = calls[-1]
        assert call["steps"] == steps and call["grad"] is (steps is not None)  # instance optimisation needs gradients
        assert call["model"] is method.network.net
        pickle.dumps(method.network)  # picklable after a call: the study measures memory in a spawned process
        # image_A is the moving image (phi_AB warps A onto B), as an ITK image of the same array
        np.testing.assert_array_equal(itk.array_from_image(call["A"]), moving[0, 0].numpy())
        np.testing.assert_array_equal(itk.array_from_image(call["B"]), fixed[0, 0].numpy())
    assert "loss printed by the tool" not in capsys.readouterr().out  # its prints do not flood the study's log
    assert display_name("unigradicon-io50") == "uniGradICON, 50 instance-optimisation steps"
    assert display_name("unigradicon-io1") == "uniGradICON, 1 instance-optimisation step"
    assert display_name("unigradicon") == "uniGradICON (network only)" and display_name("rpnet") == "RP-Net (single pass)"
    with pytest.raises(ValueError, match="3D images"):
        method.network(moving[..., 0], fixed[..., 0])
    random = build_method("unigradicon")
    assert "random weights" in random.note
    with pytest.raises(ValueError, match="io_steps"):
        type(random.network)(io_steps=0)


def test_unigradicon_missing_is_a_clear_error_of_the_speed_study(monkeypatch, tmp_path):
    from monai_ipear.benchmark import methods
    from monai_ipear.benchmark.__main__ import benchmark_main as main

    monkeypatch.setattr(methods, "has_unigradicon", lambda: False)
    assert methods.build_method("unigradicon").network is None
    img = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8)).astype(np.float32), np.eye(4)), img)
    with pytest.raises(SystemExit, match="unigradicon: no speed row .skipped: unigradicon"):
        main(["--methods", "--speed-images", str(img), str(img), "--speed-sizes", "8x8x8", "--speed-methods",
              "rpnet", "unigradicon", "--no-memory", "--out", str(tmp_path / "speed.md")])


def test_ants_speed_row_registers_fixed_and_moving_in_ants_order_with_the_study_threads(monkeypatch):
    import sys
    import types

    from monai_ipear.benchmark.external import AntsSyN

    seen = {}
    ants = types.ModuleType("ants")
    ants.from_numpy = lambda a: ("image", a)

    def registration(fixed, moving, type_of_transform):
        seen.update(fixed=fixed[1], moving=moving[1], kind=type_of_transform,
                    threads=os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"))
        return {"fwdtransforms": ["warp.nii.gz", "affine.mat"]}

    ants.registration = registration
    monkeypatch.setitem(sys.modules, "ants", ants)
    monkeypatch.delenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", raising=False)
    moving = torch.rand(1, 1, 3, 4, 5)
    fixed = torch.rand(1, 1, 3, 4, 5)
    out = AntsSyN()(moving, fixed)
    assert out["fwdtransforms"][0] == "warp.nii.gz" and seen["kind"] == "SyN"
    np.testing.assert_array_equal(seen["fixed"], fixed[0, 0].numpy())
    np.testing.assert_array_equal(seen["moving"], moving[0, 0].numpy())
    assert seen["threads"] == str(torch.get_num_threads())
    with pytest.raises(ValueError, match="one single-channel pair per call"):  # batch 2 would time one pair only
        AntsSyN()(moving.repeat(2, 1, 1, 1, 1), fixed.repeat(2, 1, 1, 1, 1))
    # the accuracy table's method registers through the same call, then samples the coordinates through its transforms
    from monai_ipear.benchmark import methods

    applied = []

    class _Image:
        def __init__(self, a):
            self.a = a

        def numpy(self):
            return self.a + 0.5  # a transform that shifts every sample by half a voxel

    ants.apply_transforms = lambda f, m, transforms, interpolator: applied.append(transforms) or _Image(m[1])
    monkeypatch.setattr(methods, "ants", ants)
    monkeypatch.setattr(methods, "has_ants", True)
    method = methods.build_method("ants-syn")
    assert isinstance(method.network, AntsSyN) and method.timed_once
    ddf = method.register(moving, fixed)
    assert ddf.shape == (1, 3, 3, 4, 5) and torch.allclose(ddf, torch.full_like(ddf, 0.5))
    assert applied == [["warp.nii.gz", "affine.mat"]] * 3  # the transforms of that registration, once per axis
