"""Hardening, round 2 (issue 12): no silent wrong result, no lost file, no code run from a file.

Every test here is a row of ``docs/reliability.md`` (numbered cases R2-1 .. R2-11 and the classes).
Volumes are tiny (16^3, 32^2) and models random or zero-field, so every test runs in seconds.
"""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import run

import monai_ipear
from monai_ipear.cli import cli_main as main
from monai_ipear.engines.outputs import label_dtype, write_label_map

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
SIZE = 16
# voxel axes -> world axes permuted: how coronal / sagittal acquisitions (MPRAGE, the IXI files) are stored
SAGITTAL = np.array([[0.0, 0.0, -1.0, 90.0], [-1.0, 0.0, 0.0, 126.0], [0.0, 1.0, 0.0, -72.0], [0, 0, 0, 1.0]])
CORONAL = np.array([[-1.2, 0.0, 0.0, 90.0], [0.0, 0.0, 1.0, -126.0], [0.0, 1.0, 0.0, -72.0], [0, 0, 0, 1.0]])
AXIAL = np.diag([1.2, 1.0, 1.5, 1.0])


def _save(array, path, affine=AXIAL):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return str(path)


def _model(path, spatial_dims=3, zero_field=False, nan=False):
    """iPEAR weights: a small nonzero field, an exactly zero field (identity warp) or NaN weights."""
    torch.manual_seed(0)
    sd = monai_ipear.iPEAR(spatial_dims=spatial_dims).state_dict()
    for k in sd:
        if ".cl3.conv." in k:
            sd[k] = sd[k] * (0.0 if zero_field or k.endswith("bias") else 0.05)
        if nan and k.endswith("weight"):
            sd[k] = torch.full_like(sd[k], float("nan"))
    torch.save(sd, str(path))
    return str(path)


def _images(rng, shape):
    return rng.random(shape).astype(np.float32) * 100.0, rng.random(shape).astype(np.float32) * 100.0


def _errors(capsys) -> list:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]


def _register(tmp_path, fixed, moving, model, out, *extra):
    return main(["register", "--fixed", fixed, "--moving", moving, "--model", model, "--out-dir", str(out),
                 "--device", "cpu", *extra])


# ---------------------------------------------------------------- R2-1 label values beyond int16 / float32


def test_label_dtype_holds_the_values():
    assert label_dtype(np.array([0, 255])) == np.uint8
    assert label_dtype(np.array([-1, 5])) == np.int16
    assert label_dtype(np.array([0, 40000])) == np.int32
    assert label_dtype(np.array([0, 16777217])) == np.int32
    assert label_dtype(np.array([0, 2**40])) == np.int64


def test_large_label_values_survive_register_and_warp(tmp_path):
    """Labels 40000 and 16777217 (> int16, > 2**24) come out unchanged (zero field: identity warp)."""
    rng = np.random.default_rng(0)
    fix, mov = _images(rng, (SIZE,) * 3)
    lab = np.zeros((SIZE,) * 3, np.int32)
    lab[2:7], lab[7:12], lab[12:14, :5] = 40000, 16777217, 3
    f, m = _save(fix, tmp_path / "f.nii.gz"), _save(mov, tmp_path / "m.nii.gz")
    lf = _save(lab, tmp_path / "lab.nii.gz")
    model = _model(tmp_path / "zero.pt", zero_field=True)
    assert _register(tmp_path, f, m, model, tmp_path / "out", "--moving-label", lf) == 0
    out = nib.load(str(tmp_path / "out" / "m_to_f_warped_label.nii.gz"))
    assert out.get_data_dtype() == np.int32
    assert np.array_equal(np.asarray(out.dataobj), lab)  # before: int16 cast, 40000 -> -25536, 16777217 -> 0
    ddf = str(tmp_path / "out" / "m_to_f_ddf.nii.gz")
    assert main(["warp", "--image", lf, "--ddf", ddf, "--out", str(tmp_path / "w.nii.gz"), "--label"]) == 0
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / "w.nii.gz")).dataobj), lab)
    # --label false (a string from fire) is parsed by the one boolean parser: bilinear, float output
    assert main(["warp", "--image", lf, "--ddf", ddf, "--out", str(tmp_path / "wf.nii.gz"), "--label", "false"]) == 0
    assert nib.load(str(tmp_path / "wf.nii.gz")).get_data_dtype() == np.float32
    # the writer alone, on a float64 tensor
    write_label_map(torch.as_tensor(lab, dtype=torch.float64)[None], torch.as_tensor(AXIAL), str(tmp_path / "d.nii.gz"))
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / "d.nii.gz")).dataobj), lab)


# ---------------------------------------------------------------- R2-2 warp onto another grid


def test_warp_resamples_an_image_on_another_grid_and_jacobian_refuses_a_mask_there(tmp_path, capsys):
    rng = np.random.default_rng(1)
    img = rng.random((SIZE,) * 3).astype(np.float32)
    ddf = _save(np.zeros((SIZE,) * 3 + (3,), np.float32), tmp_path / "ddf.nii.gz")
    flipped = AXIAL.copy()
    flipped[0, 0], flipped[0, 3] = -flipped[0, 0], 18.0  # same shape, x axis flipped
    other = _save(img, tmp_path / "flipped.nii.gz", flipped)
    capsys.readouterr()
    # the image is placed by its own affine (the pipeline's raw moving scan): with a zero field the output is the
    # image in the field's frame, i.e. flipped along x (world x = 18 - 1.2 i = 1.2 (15 - i)), not the raw array
    assert main(["warp", "--image", other, "--ddf", ddf, "--out", str(tmp_path / "w.nii.gz")]) == 0
    out = nib.load(tmp_path / "w.nii.gz")
    assert np.allclose(out.affine, AXIAL)
    assert np.allclose(np.asarray(out.dataobj), img[::-1], atol=1e-5)
    mask = _save((img > 0.5).astype(np.uint8), tmp_path / "mask.nii.gz", flipped)
    assert main(["jacobian", "--ddf", ddf, "--mask", mask]) == 2
    assert "different affines" in _errors(capsys)[0]
    same = _save(img, tmp_path / "same.nii.gz")  # the field's grid: accepted
    assert main(["warp", "--image", same, "--ddf", ddf, "--out", str(tmp_path / "w.nii.gz")]) == 0


# ---------------------------------------------------------------- R2-3 NaN weights


def _inference_args(root, model, spatial_dims=3, size=SIZE, **extra):
    args = {"config_file": os.path.join(CONFIGS, "inference.json"), "meta_file": os.path.join(CONFIGS, "metadata.json"),
            "logging_file": os.path.join(CONFIGS, "logging.conf"), "bundle_root": str(root), "device": "cpu",
            "ckpt_path": model, "spatial_dims": spatial_dims, "synthetic#spatial_size": size,
            "synthetic#num_pairs": 1, "synthetic#num_labels": 2}
    args.update(extra)
    return args


def test_nan_weights_are_refused_and_nothing_is_written(tmp_path, capsys):
    rng = np.random.default_rng(2)
    fix, mov = _images(rng, (SIZE,) * 3)
    f, m = _save(fix, tmp_path / "f.nii.gz"), _save(mov, tmp_path / "m.nii.gz")
    model = _model(tmp_path / "nan.pt", nan=True)
    capsys.readouterr()
    assert _register(tmp_path, f, m, model, tmp_path / "out") == 2  # before: exit 0, NaN field, zero image
    assert "non-finite" in _errors(capsys)[0]
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".nii.gz")]
    with pytest.raises(Exception) as info:  # bundle inference.json
        run("run", **_inference_args(tmp_path / "bundle", model))
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(x, FloatingPointError) and "displacement field" in str(x) for x in chain)
    out = tmp_path / "bundle" / "outputs"
    assert not out.exists() or not [p for p in os.listdir(out) if p.endswith(".nii.gz")]


# ---------------------------------------------------------------- R2-8 coronal / sagittal storage


@pytest.mark.parametrize("affine", [SAGITTAL, CORONAL], ids=["sagittal", "coronal"])
def test_coronal_and_sagittal_volumes_are_written_with_their_affine(tmp_path, affine):
    rng = np.random.default_rng(3)
    fix, mov = _images(rng, (SIZE,) * 3)
    f, m = _save(fix, tmp_path / "f.nii.gz", affine), _save(mov, tmp_path / "m.nii.gz", affine)
    lab = _save((mov > 50).astype(np.uint8), tmp_path / "l.nii.gz", affine)
    model = _model(tmp_path / "m.pt")
    assert _register(tmp_path, f, m, model, tmp_path / "out", "--moving-label", lab) == 0  # before: "error: Affine [["
    for suffix, shape in (("warped", (SIZE,) * 3), ("ddf", (SIZE,) * 3 + (3,)), ("warped_label", (SIZE,) * 3)):
        img = nib.load(str(tmp_path / "out" / f"m_to_f_{suffix}.nii.gz"))
        assert img.shape == shape and np.allclose(img.affine, affine, atol=1e-5), suffix
    # the arrays are stored as computed (no reorientation): the saved field warps the label map again to the same
    # warped label map
    ddf = str(tmp_path / "out" / "m_to_f_ddf.nii.gz")
    assert main(["warp", "--image", lab, "--ddf", ddf, "--out", str(tmp_path / "again.nii.gz"), "--label"]) == 0
    again = np.asarray(nib.load(str(tmp_path / "again.nii.gz")).dataobj)
    assert np.array_equal(again, np.asarray(nib.load(str(tmp_path / "out" / "m_to_f_warped_label.nii.gz")).dataobj))
    assert again.sum() > 0


# ---------------------------------------------------------------- R2-11 2D images


def test_2d_images_register_warp_and_run_the_bundle(tmp_path):
    rng = np.random.default_rng(4)
    fix, mov = _images(rng, (32, 32))
    f, m = _save(fix, tmp_path / "f.nii.gz", np.eye(4)), _save(mov, tmp_path / "m.nii.gz", np.eye(4))
    model = _model(tmp_path / "m2.pt", spatial_dims=2)
    # before: TypeError "'>=' not supported between 'NoneType' and 'int'" in the writer
    assert _register(tmp_path, f, m, model, tmp_path / "out") == 0
    warped = nib.load(str(tmp_path / "out" / "m_to_f_warped.nii.gz"))
    ddf = nib.load(str(tmp_path / "out" / "m_to_f_ddf.nii.gz"))
    assert warped.shape == (32, 32) and ddf.shape == (32, 32, 1, 2)
    assert np.abs(ddf.get_fdata()).max() > 0
    assert main(["warp", "--image", m, "--ddf", str(tmp_path / "out" / "m_to_f_ddf.nii.gz"),
                 "--out", str(tmp_path / "w.nii.gz")]) == 0
    assert nib.load(str(tmp_path / "w.nii.gz")).shape == (32, 32)
    assert main(["jacobian", "--ddf", str(tmp_path / "out" / "m_to_f_ddf.nii.gz")]) == 0
    # the bundle's inference.json on 2D synthetic data
    run("run", **_inference_args(tmp_path / "bundle", model, spatial_dims=2, size=32))
    files = sorted(os.listdir(tmp_path / "bundle" / "outputs"))
    assert "synthetic_100000_warped.nii.gz" in files and "synthetic_100000_warped_label.nii.gz" in files
    assert nib.load(str(tmp_path / "bundle" / "outputs" / "synthetic_100000_warped.nii.gz")).shape == (32, 32)


# ---------------------------------------------------------------- R2-4 output names unique per pair


def _bids_dataset(root, n=3, size=SIZE):
    """``sub-XX/anat/T1.nii.gz`` + ``sub-XX/anat/seg.nii.gz``: every file has the same name."""
    rng = np.random.default_rng(5)
    subjects = []
    for i in range(n):
        d = root / f"sub-{i:02d}" / "anat"
        d.mkdir(parents=True)
        img = rng.random((size,) * 3).astype(np.float32)
        _save(img, d / "T1.nii.gz")
        _save((img > 0.5).astype(np.uint8) + (img > 0.8).astype(np.uint8), d / "seg.nii.gz")
        subjects.append({"image": f"sub-{i:02d}/anat/T1.nii.gz", "label": f"sub-{i:02d}/anat/seg.nii.gz"})
    with open(root / "dataset.json", "w") as f:
        json.dump({"training": subjects, "validation": subjects}, f)
    return str(root / "dataset.json")


def test_same_file_names_in_subject_folders_give_unique_outputs(tmp_path):
    data = tmp_path / "data"
    datalist = _bids_dataset(data)
    pairs = monai_ipear.load_registration_pairs(datalist, split="validation")
    names = [p["pair"] for p in pairs]
    assert len(names) == 6 and len(set(names)) == 6  # before: six times "T1_to_T1"
    assert "sub-00_anat_T1_to_sub-01_anat_T1" in names
    model = str(tmp_path / "rp.pt")
    torch.save(monai_ipear.RPNet(spatial_dims=3).state_dict(), model)
    run("run", **_inference_args(tmp_path / "bundle", model, datalist=datalist, dataset_dir=str(data),
                                 config_file=[os.path.join(CONFIGS, "inference.json"),
                                              os.path.join(CONFIGS, "variants", "rpnet.json")]))
    warped = [f for f in os.listdir(tmp_path / "bundle" / "outputs") if f.endswith("_warped.nii.gz")]
    assert sorted(warped) == sorted(f"{n}_warped.nii.gz" for n in names)  # six pairs, six files
    # the CLI names one pair the same way
    assert monai_ipear.pair_name(str(data / "sub-00/anat/T1.nii.gz"), str(data / "sub-01/anat/T1.nii.gz")) == \
        "sub-00_anat_T1_to_sub-01_anat_T1"


def test_writer_refuses_a_second_pair_of_the_same_name(tmp_path):
    from types import SimpleNamespace

    writer = monai_ipear.RegistrationOutputWriter(output_dir=str(tmp_path))
    engine = SimpleNamespace(state=SimpleNamespace(
        output={"ddf": torch.zeros(1, 3, 8, 8, 8), "warped_image": torch.zeros(1, 1, 8, 8, 8)},
        batch={"pair": ["T1_to_T1"]}))
    writer._reset()
    writer(engine)
    with pytest.raises(ValueError, match="two pairs of this run have the output name 'T1_to_T1'"):
        writer(engine)


# ---------------------------------------------------------------- R2-5 booleans from overrides


def test_one_boolean_parser_for_overrides(tmp_path):
    from monai.bundle import ConfigParser

    from monai_ipear.engines import as_bool

    for v in (True, "true", "True", "YES", "on", "1", 1):
        assert as_bool(v) is True, v
    for v in (False, "false", "False", "no", "off", "0", 0):
        assert as_bool(v) is False, v
    for v in ("flase", "", 2, None, 0.5):
        with pytest.raises(ValueError, match="must be a boolean"):
            as_bool(v, "resume")
    parser = ConfigParser()
    parser.read_config(os.path.join(CONFIGS, "train.json"))
    parser["bundle_root"] = "/nonexistent"
    for value, resumes in (("false", False), ("true", True), (False, False)):  # fire delivers 'false' as a string
        parser["resume"] = value
        parser.parse()
        handlers = parser.get_parsed_content("train#handlers", instantiate=True)
        assert (type(handlers[0]).__name__ == "ResumeCheckpointLoader") == resumes, value  # before: 'false' resumed
    parser["shuffle"] = "false"
    parser.parse()
    assert parser.get_parsed_content("train#dataloader#shuffle") is False
    assert monai_ipear.RegistrationMetricsWriter(surface="false").surface is False  # evaluate.json surface_metrics
    # a nested DataLoader key given as a string cannot be parsed where it is used: refused before training
    with pytest.raises(ValueError, match="train#dataloader#shuffle is the string 'false'"):
        monai_ipear.check_training_setup(str(tmp_path), shuffle="false")


def test_component_flags_read_override_strings_as_booleans():
    # `--network_def#network#unroll_training false` or `--network_def#network#use_sab false` reaches the component
    # as the string 'false'; every boolean a config can set goes through the one parser (before: 'false' was true)
    from monai.bundle import ConfigParser

    from monai_ipear.controllers import IterStop
    from monai_ipear.engines.outputs import RegistrationOutputWriter
    from monai_ipear.networks.blocks.neighborhood_attention import NeighborhoodAttention

    parser = ConfigParser()
    parser.read_config(os.path.join(CONFIGS, "train.json"))
    for value, expected in (("false", False), ("true", True), ("off", False)):
        for key in ("unroll_training", "use_sab", "use_seb", "use_rp"):
            parser[f"network_def#network#{key}"] = value
        parser["network_def#network#spatial_dims"] = 2
        parser.parse()
        net = parser.get_parsed_content("network_def#network", instantiate=True)
        farm = net.decoders[0]
        assert net.unroll_training is expected, value
        assert (type(farm.sab).__name__ == "FARMSpatialAttention") is expected, value
        assert (type(farm.seb).__name__ != "Identity") is expected and (farm.rp is not None) is expected, value
    assert monai_ipear.TCI(latched="false").latched is False and monai_ipear.TCI(latched="yes").latched is True
    assert IterStop(faithful="false").faithful is False
    assert RegistrationOutputWriter(itk_field="false").itk_field is False
    assert NeighborhoodAttention(2, 8, 2, use_natten="false", qkv_bias="false").qkv.bias is None
    assert monai_ipear.IterativeRegistration(torch.nn.Identity(), unroll_training="0").unroll_training is False
    with pytest.raises(ValueError, match="use_sab must be a boolean"):
        monai_ipear.iPEAR(spatial_dims=2, use_sab="flase")


# ---------------------------------------------------------------- bundle training helpers

TRAIN = {"spatial_dims": 3, "synthetic#spatial_size": SIZE, "synthetic#num_labels": 2, "num_train_pairs": 4,
         "num_val_pairs": 1, "val_interval": 1000, "max_epochs": 1, "train#dataloader#shuffle": False}


def _train_args(root, **extra):
    args = {"config_file": [os.path.join(CONFIGS, "train.json"), os.path.join(CONFIGS, "variants", "rpnet.json")],
            "meta_file": os.path.join(CONFIGS, "metadata.json"), "logging_file": os.path.join(CONFIGS, "logging.conf"),
            "bundle_root": str(root), "device": "cpu", **TRAIN}
    args.update(extra)
    return args


def _cause(exc, kind):
    """The innermost exception of type ``kind`` in the chain (monai.bundle wraps errors in RuntimeErrors)."""
    found = None
    while exc is not None:
        if isinstance(exc, kind):
            found = exc
        exc = exc.__cause__ or exc.__context__
    return found


# ---------------------------------------------------------------- R2-6 resume takes the newest checkpoint


def test_resume_takes_the_newest_checkpoint_not_an_older_runs_final(tmp_path):
    from ignite.engine import Engine

    from monai_ipear.engines import ResumeCheckpointLoader, find_resume_checkpoint

    models = tmp_path / "models"
    models.mkdir()
    old_net, new_net = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    torch.save({"model": old_net.state_dict(), "trainer": {"iteration": 50, "epoch_length": 10, "max_epochs": 5}},
               models / "model_final.pt")  # run A, finished
    os.utime(models / "model_final.pt", (1e9, 1e9))
    torch.save({"model": new_net.state_dict(), "trainer": {"iteration": 10, "epoch_length": 10, "max_epochs": 5}},
               models / "checkpoint_epoch=1.pt")  # run B, killed after its first epoch
    assert find_resume_checkpoint(str(models)) == str(models / "checkpoint_epoch=1.pt")
    net = torch.nn.Linear(2, 2)
    engine = Engine(lambda e, b: None)
    engine.state.max_epochs = 5
    loader = ResumeCheckpointLoader(load_path=str(models), load_dict={"model": net})  # train.json's default
    loader(engine)
    assert engine.state.iteration == 10 and torch.equal(net.weight, new_net.weight)  # before: run A's epoch 5
    assert loader.load_path == str(models / "checkpoint_epoch=1.pt")
    # nothing to resume: one clear error before training starts (before: FileNotFoundError traceback mid-run)
    empty = tmp_path / "empty"
    with pytest.raises(Exception) as info:
        run(**_train_args(empty, resume=True))
    err = _cause(info.value, ValueError)
    assert err is not None and "no checkpoint to resume" in str(err) and "start the run without --resume" in str(err)
    assert not list((empty / "models").glob("*.pt"))


# ---------------------------------------------------------------- R2-7 two trainings into one bundle_root


def test_second_training_into_a_bundle_root_in_use_is_refused(tmp_path):
    import socket
    import subprocess
    import sys

    models = tmp_path / "models"
    models.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (models / ".training.lock").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(),
                                                           "started": "earlier"}))
        with pytest.raises(Exception) as info:
            run(**_train_args(tmp_path))
        err = _cause(info.value, RuntimeError)
        assert err is not None and f"another training run (pid {other.pid}" in str(err)
        assert not list(models.glob("*.pt"))  # the running one's files are untouched
    finally:
        other.kill()
        other.wait()
    # the other run ended without releasing (killed): its lock is taken over, the run trains and releases it
    run(**_train_args(tmp_path))
    assert (models / "model_final.pt").is_file() and not (models / ".training.lock").exists()


# ---------------------------------------------------------------- R2-9 crash during training keeps the epoch


class _CrashAt:
    """The bundle's loss, raising at call ``at`` (a crash inside the training loop)."""

    def __init__(self, at):
        self.loss = monai_ipear.RegistrationLoss(spatial_dims=3, ncc_kernel_size=5)
        self.at, self.calls = at, 0

    def __call__(self, warped, fixed, ddf):
        self.calls += 1
        if self.calls >= self.at:
            raise RuntimeError("simulated crash in iteration %d" % self.calls)
        return self.loss(warped, fixed, ddf)


def test_crash_in_bundle_training_writes_the_final_checkpoint(tmp_path):
    with pytest.raises(Exception) as info:
        run(**_train_args(tmp_path, loss=_CrashAt(3)))
    assert _cause(info.value, RuntimeError) is not None
    final = tmp_path / "models" / "model_final.pt"
    assert final.is_file()  # before: StatsHandler re-raised first, nothing was saved
    state = torch.load(final, map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values())


# ---------------------------------------------------------------- R2-10 no code run from a file


class _Payload:
    """Unpickling this object runs code (what a crafted checkpoint does): it creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def test_a_crafted_pickle_runs_no_code_through_any_loader(tmp_path, capsys):
    import re
    import zipfile
    import pickle

    from ignite.engine import Engine

    from monai.handlers import CheckpointLoader

    from monai_ipear.engines import ResumeCheckpointLoader
    from monai_ipear.networks.nets.pretrained import IIRPCheckpointError, load_iirp_checkpoint

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"config": {"first_channel": 8}, "model_state": {}, "model": _Payload(str(marker))}, evil)
    # control: the file's pickle does run code when unpickled without restriction
    with zipfile.ZipFile(evil) as z:
        raw = z.read([n for n in z.namelist() if n.endswith("data.pkl")][0])
    pickle.loads(raw)
    assert marker.read_text() == "code ran"
    marker.unlink()

    with pytest.raises(IIRPCheckpointError, match="not loaded"):  # before: the unrestricted unpickler ran the code
        load_iirp_checkpoint(evil)
    capsys.readouterr()
    rng = np.random.default_rng(6)
    fix, mov = _images(rng, (SIZE,) * 3)
    f, m = _save(fix, tmp_path / "f.nii.gz"), _save(mov, tmp_path / "m.nii.gz")
    assert _register(tmp_path, f, m, str(evil), tmp_path / "out") == 2  # CLI --model
    assert "cannot read model file" in _errors(capsys)[0]
    net = torch.nn.Linear(2, 2)
    for loader in (ResumeCheckpointLoader(load_path=str(evil), load_dict={"model": net}),  # train.json --resume
                   CheckpointLoader(load_path=str(evil), load_dict={"model": net})):  # inference / evaluate.json
        with pytest.raises(pickle.UnpicklingError):
            loader(Engine(lambda e, b: None))
    from monai_ipear.benchmark.methods import build_method

    with pytest.raises(IIRPCheckpointError, match="not loaded"):  # the benchmark reads IIRP files through the same loader
        build_method("rpnet", {"rpnet": str(evil)})
    assert not marker.exists()  # no loader ran the payload
    # and no source file can: every torch.load in the package and its tests passes weights_only=True
    for folder in ("monai_ipear", "bundle", "tests"):
        for dirpath, _, files in os.walk(os.path.join(REPO, folder)):
            for name in files:
                if name.endswith(".py"):
                    text = open(os.path.join(dirpath, name)).read()
                    assert "weights_only=" + "False" not in text, name
                    for call in re.findall(r"torch\.load\([^\n]*", text):
                        assert "weights_only=True" in call, (name, call)


# ---------------------------------------------------------------- classes of unclear behaviour


def _messages(exc) -> str:
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return " | ".join(parts)


def test_class_metrics_on_the_wrong_label_set_are_refused(tmp_path, capsys):
    """Duplicate subjects, subjects without a label, labels >= num_classes, an empty mask, a NaN field."""
    from monai_ipear.metrics import folding_percentage

    data = tmp_path / "data"
    datalist = _bids_dataset(data)
    subjects = json.load(open(datalist))["training"]
    with pytest.raises(ValueError, match="more than once"):
        monai_ipear.load_registration_pairs({"training": subjects + subjects[:1]}, str(data))
    partial = [dict(subjects[0]), dict(subjects[1]), {"image": subjects[2]["image"]}]
    with pytest.raises(ValueError, match="1 of 3 subjects have no label map"):
        monai_ipear.load_registration_pairs({"training": partial}, str(data))
    pairs = monai_ipear.load_registration_pairs(datalist, split="validation")  # labels 0..2
    with pytest.raises(ValueError, match="--num_classes 3"):
        monai_ipear.check_training_setup(str(tmp_path / "m"), num_classes=2, val_pairs=pairs, datalist=datalist)
    assert monai_ipear.check_training_setup(str(tmp_path / "m"), num_classes=3, val_pairs=pairs, datalist=datalist)
    no_labels = [{k: v for k, v in p.items() if "label" not in k} for p in pairs]
    with pytest.raises(ValueError, match="validation subjects have no label maps"):
        monai_ipear.check_training_setup(str(tmp_path / "m"), num_classes=3, val_pairs=no_labels, datalist=datalist)
    # folding: an empty mask and a NaN field are undefined (NaN), not 0 %
    ddf = torch.zeros(2, 3, 8, 8, 8)
    ddf[1, 0, 2, 2, 2] = float("nan")
    mask = torch.ones(2, 1, 8, 8, 8)
    mask[0] = 0
    assert torch.isnan(folding_percentage(ddf, mask)).all() and torch.isnan(folding_percentage(ddf)[1])
    assert folding_percentage(ddf)[0] == 0.0
    ddf_file = _save(np.zeros((SIZE,) * 3 + (3,), np.float32), tmp_path / "ddf.nii.gz")
    empty = _save(np.zeros((SIZE,) * 3, np.uint8), tmp_path / "empty.nii.gz")
    capsys.readouterr()
    assert main(["jacobian", "--ddf", ddf_file, "--mask", empty]) == 2
    assert "is empty" in _errors(capsys)[0]
    nan_field = np.zeros((SIZE,) * 3 + (3,), np.float32)
    nan_field[1, 2, 3, 0] = np.nan
    assert main(["jacobian", "--ddf", _save(nan_field, tmp_path / "nan_ddf.nii.gz")]) == 2
    assert "non-finite" in _errors(capsys)[0]


def test_class_values_are_not_changed_silently(tmp_path):
    """A NaN in a label map is refused (it used to become label 0)."""
    rng = np.random.default_rng(7)
    img = rng.random((SIZE,) * 3).astype(np.float32)
    lab = (img > 0.5).astype(np.float32)
    lab[1, 1, 1] = np.nan
    item = {"moving_image": _save(img, tmp_path / "m.nii.gz"), "fixed_image": _save(img, tmp_path / "f.nii.gz"),
            "moving_label": _save(lab, tmp_path / "nan_seg.nii.gz")}
    with pytest.raises(RuntimeError) as info:
        monai_ipear.registration_pair_transforms()(item)
    assert "moving_label" in _messages(info.value) and "non-finite" in _messages(info.value)


def test_class_config_mistakes_are_found_before_training(tmp_path):
    """Wrong types, an unwritable checkpoint folder and a datalist naming a missing file: one error, before the
    first iteration, nothing trained or written."""
    with pytest.raises(ValueError) as info:
        monai_ipear.check_training_setup(str(tmp_path / "ok"), lr="abc", max_epochs=1.5, batch_size=0,
                                         resume="flase")
    msg = str(info.value)
    for part in ("lr must be a number > 0, got 'abc'", "max_epochs must be an integer >= 1, got 1.5",
                 "batch_size must be an integer >= 1", "resume must be a boolean"):
        assert part in msg, part
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the checkpoint folder should be")
    with pytest.raises(ValueError, match="checkpoint folder"):
        monai_ipear.check_training_setup(str(blocked / "models"))
    # through the bundle: --lr abc --max_epochs 1.5 stop in the preflight (before: an epoch, or a deep traceback)
    with pytest.raises(Exception) as info:
        run(**_train_args(tmp_path / "b", lr="abc", max_epochs=1.5))
    assert "training not started" in _messages(info.value) and "lr must be a number" in _messages(info.value)
    assert not (tmp_path / "b" / "models" / "model_final.pt").exists()
    data = tmp_path / "data"
    datalist = _bids_dataset(data)
    os.remove(data / "sub-02" / "anat" / "seg.nii.gz")
    with pytest.raises(Exception) as info:
        run(**_train_args(tmp_path / "c", datalist=datalist, dataset_dir=str(data), num_classes=3))
    assert "do not exist" in _messages(info.value) and "sub-02/anat/seg.nii.gz" in _messages(info.value)
    assert not list((tmp_path / "c").glob("models/*.pt"))


def test_class_errors_name_the_cause_on_one_whole_line(tmp_path, capsys, monkeypatch):
    import monai_ipear.cli as cli

    rng = np.random.default_rng(8)
    fix, mov = _images(rng, (SIZE,) * 3)
    f, m = _save(fix, tmp_path / "f.nii.gz"), _save(mov, tmp_path / "m.nii.gz")
    model = _model(tmp_path / "m.pt")

    def two_lines(*args, **kwargs):
        raise ValueError("first line of the cause\nsecond line with the detail")

    monkeypatch.setattr(cli, "_build_network", two_lines)
    capsys.readouterr()
    assert _register(tmp_path, f, m, model, tmp_path / "out") == 2
    assert _errors(capsys) == ["error: first line of the cause second line with the detail"]  # before: cut off


def test_class_python_api_dtypes_are_named():
    net = monai_ipear.RPNet(spatial_dims=2)
    x = torch.rand(1, 1, 16, 16)
    with pytest.raises(TypeError, match="moving has dtype torch.int64"):
        net((x * 10).long(), x)
    with pytest.raises(TypeError, match="different dtypes"):
        net(x, x.double())
    assert torch.isfinite(net.double()(x.double(), x.double())).all()  # a converted network takes its own dtype
