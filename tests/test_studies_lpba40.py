"""The LPBA40 study data command on a tiny fake LPBA folder, and the real-data recipe overlay."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser

from monai_ipear import load_registration_pairs
from monai_ipear.studies.lpba40 import LPBA40_SPLIT, prepare_lpba40

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_lpba(folder, size=(8, 12, 8)):
    rng = np.random.default_rng(0)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    os.makedirs(os.path.join(folder, "images"))
    os.makedirs(os.path.join(folder, "labels"))
    codes = np.array([0, 21, 22, 182])
    for name in [LPBA40_SPLIT["atlas"]] + LPBA40_SPLIT["training"] + LPBA40_SPLIT["validation"]:
        img = rng.random(size).astype(np.float32)
        lab = codes[np.indices(size)[0] * 4 // size[0]].astype(np.uint8)  # four slabs along axis 0
        nib.save(nib.Nifti1Image(img, affine), os.path.join(folder, "images", f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, affine), os.path.join(folder, "labels", f"{name}.nii.gz"))


def test_prepare_renumbers_labels_halves_the_grid_and_writes_the_split(tmp_path):
    _fake_lpba(tmp_path / "src")
    datalist = prepare_lpba40(str(tmp_path / "src"), str(tmp_path / "out"), pixdim=2.0)
    assert datalist["label_codes"] == [21, 22, 182]
    lab = nib.load(tmp_path / "out" / "S11_label.nii.gz")
    assert lab.shape == (4, 6, 4)
    assert np.allclose(np.diag(lab.affine)[:3], [-2, -2, 2])
    assert set(np.unique(np.asarray(lab.dataobj)).tolist()) == {0, 1, 2, 3}
    on_disk = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert [e["image"] for e in on_disk["validation"]] == [f"S{i}_image.nii.gz" for i in range(36, 41)]
    train = load_registration_pairs(str(tmp_path / "out" / "dataset.json"), split="training")
    assert len(train) == 25 * 24  # all ordered inter-subject pairs of S11-S35
    atlas = load_registration_pairs(str(tmp_path / "out" / "dataset.json"), split="validation_atlas")
    assert [p["pair"] for p in atlas] == [f"S{i}_image_to_S01_image" for i in range(36, 41)]
    assert all(p["fixed_image"].endswith("S01_image.nii.gz") for p in atlas)


def test_prepare_refuses_a_folder_without_the_subjects(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="S01"):
        prepare_lpba40(str(tmp_path), str(tmp_path / "out"))


def test_real_data_overlay_trains_by_iterations_at_constant_lr():
    parser = ConfigParser()
    parser.read_config([os.path.join(ROOT, "configs", f) for f in ("train.json", "real_data.json")])
    parser.update({"num_iterations": 1000, "val_every_iterations": 250})
    assert parser.get_parsed_content("max_epochs") == 4
    assert parser.get_parsed_content("epoch_length") == 250
    assert parser.get_parsed_content("lr") == pytest.approx(1e-4)
    scheduler = parser.get_parsed_content("lr_scheduler")
    for _ in range(50):
        scheduler.step()
    assert scheduler.get_last_lr() == [pytest.approx(1e-4)]
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch_length == 250 and trainer.state.max_epochs == 4


def test_evaluate_scores_every_controller_and_the_identity(tmp_path):
    import torch

    from monai_ipear.benchmark.methods import make_network
    from monai_ipear.studies.lpba40 import evaluate_lpba40, format_lpba40_tables

    _fake_lpba(tmp_path / "src", size=(16, 16, 16))
    prepare_lpba40(str(tmp_path / "src"), str(tmp_path / "out"), pixdim=1.0)
    torch.manual_seed(0)
    ckpts = {}
    for arch in ("ipear", "rpnet"):
        ckpts[arch] = str(tmp_path / f"{arch}.pt")
        torch.save({"model": make_network(arch).state_dict()}, ckpts[arch])
    results = evaluate_lpba40(str(tmp_path / "out"), ckpts, protocols=("validation_atlas",), log=lambda *_: None)
    rows = results["validation_atlas"]
    assert list(rows) == ["No registration", "iPEAR (TCI)", "iPEAR single pass", "iPEAR fixed 3", "iPEAR IterStop",
                          "RP-Net single pass", "IIRP-Net (IterStop, published code)", "RP-Net + TCI"]
    assert all(len(r) == 5 for r in rows.values())
    # every fake subject has the same slabs: no registration gives Dice 1 and no folding
    assert all(r["dice_mean"] == 1.0 and r["folding_pct"] == 0.0 for r in rows["No registration"])
    assert all(r["iterations"] == [1, 1, 1, 1] for r in rows["iPEAR single pass"])
    assert all(r["iterations"] == [3, 3, 3, 3] for r in rows["iPEAR fixed 3"])
    assert all(min(r["iterations"]) >= 3 for r in rows["iPEAR (TCI)"])  # window t = 3
    table = format_lpba40_tables(results)
    assert any(line.startswith("| iPEAR (TCI) |") for line in table)


def test_autocast_twins_run_the_same_networks_under_autocast(tmp_path):
    """``--autocast`` adds, per method, a twin on the same weights whose forward runs under ``torch.autocast``
    (bfloat16 on CPU), so the study measures the agreement of the reduced precision with float32."""
    import torch

    from monai_ipear.benchmark.methods import make_network
    from monai_ipear.studies.lpba40 import lpba40_methods

    torch.manual_seed(0)
    path = str(tmp_path / "ipear.pt")
    torch.save({"model": make_network("ipear").state_dict()}, path)
    methods = lpba40_methods({"ipear": path}, autocast=True)
    names = [m.name for m in methods]
    assert names[4:] == [f"{n}, autocast" for n in names[:4]]
    seen = []
    hook = methods[0].network.encoder.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    moving, fixed = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    plain, reduced = methods[2].register(moving, fixed), methods[6].register(moving, fixed)  # fixed 3, both
    hook.remove()
    assert seen == [False, True]
    assert methods[6].network is methods[2].network  # same weights, same controller
    assert plain.dtype == reduced.dtype == torch.float32 and not torch.equal(plain, reduced)
    assert (plain - reduced).abs().max() < 1.0  # voxels: an untrained network's small field


def test_plot_joins_runs_of_one_name_at_their_first_steps(tmp_path):
    """``plot``'s curves: validation rounds (TensorBoard steps = rounds) times ``every``, shifted by the run's
    ``@first_step``; two runs under one name become one curve in step order; bad specs are refused."""
    from torch.utils.tensorboard import SummaryWriter

    from monai_ipear.studies.lpba40 import parse_run, validation_curves

    for run, values in (("a", [0.5, 0.6]), ("b", [0.7, 0.8, 0.9])):
        w = SummaryWriter(log_dir=str(tmp_path / run / "runs"))
        for epoch, v in enumerate(values, start=1):
            w.add_scalar("val_mean_dice", v, epoch)
            w.add_scalar("train_loss", -v, epoch)  # another tag, not read
        w.close()
    curves = validation_curves([f"net={tmp_path / 'a'}", f"net={tmp_path / 'b'}@200", f"other={tmp_path / 'a'}@1000"], every=100)
    assert [s for s, _ in curves["net"]] == [100, 200, 300, 400, 500]
    np.testing.assert_allclose([v for _, v in curves["net"]], [0.5, 0.6, 0.7, 0.8, 0.9], rtol=1e-6)
    assert [s for s, _ in curves["other"]] == [1100, 1200]
    assert parse_run("x=/runs/a@b@300") == ("x", "/runs/a@b", 300)
    for bad in ("no_equals", "=folder", "x=folder@", "x=folder@-3"):
        with pytest.raises(ValueError, match="NAME=bundle_root"):
            parse_run(bad)
    with pytest.raises(FileNotFoundError, match="no training run"):
        validation_curves([f"x={tmp_path / 'missing'}"], every=100)


def test_sacbnet_checkpoint_loads_with_its_variant_config_and_scores(tmp_path):
    """``evaluate --sacbnet``: the network is built from ``configs/variants/sacbnet.json`` (its constructor arguments),
    a bundle checkpoint's weights load into it, and the study's row registers with those weights; an unknown
    architecture is refused by name."""
    import torch

    from monai_ipear.studies.lpba40 import load_trained, lpba40_methods, variant_network

    torch.manual_seed(0)
    trained = variant_network("sacbnet")
    assert sum(p.numel() for p in trained.parameters()) == 1_105_591  # the paper's configuration (docs/architecture.md)
    path = str(tmp_path / "sacb.pt")
    torch.save({"model": trained.state_dict(), "optimizer": {}}, path)
    loaded = load_trained("sacbnet", path)
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), loaded.state_dict().values()))
    (method,) = lpba40_methods({"sacbnet": path})
    assert method.name == "SACB-Net"
    moving, fixed = torch.rand(1, 1, 32, 16, 16), torch.rand(1, 1, 32, 16, 16)  # 5 levels: 32 along one axis
    with torch.no_grad():
        expected = trained.eval()(moving, fixed)
    field = method.register(moving, fixed)
    assert field.shape == (1, 3, 32, 16, 16)
    torch.testing.assert_close(field, expected)
    with pytest.raises(ValueError, match="unknown architecture 'ran'"):
        load_trained("ran", path)


def test_committed_lpba40_weights_load_and_are_on_the_model_card():
    """Every state dict in ``models/lpba40/`` loads into the network its name starts with (strictly: same keys and
    shapes; the SACB-Net file is float16 and is cast into the float32 network), and the model card lists each file."""
    import glob

    import torch

    from monai_ipear.studies.lpba40 import ARCHITECTURES, load_trained

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "lpba40")
    files = sorted(glob.glob(os.path.join(folder, "*.pt")))
    assert len(files) >= 10
    with open(os.path.join(folder, "README.md")) as f:
        card = f.read()
    for path in files:
        name = os.path.basename(path)
        assert f"`{name}`" in card, f"{name} is not on the model card"
        arch = name.split("_")[0]
        assert arch in ARCHITECTURES, name
        net = load_trained(arch, path)
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in net.parameters()), name
