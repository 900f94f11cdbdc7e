"""The variant study command end to end on tiny 2D synthetic pairs (the full comparison is a command, not a test)."""

import json
import os

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.networks.blocks import Warp

import monai_ipear  # noqa: F401 - short names for ConfigParser
from monai_ipear.data import SyntheticRegistrationDataset
from monai_ipear.studies.variants import variants_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dice_present(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the nonzero labels present in both maps (the evaluation's definition), by hand."""
    labels = sorted((set(np.unique(a)) & set(np.unique(b))) - {0})
    return float(np.mean([2 * np.sum((a == v) & (b == v)) / (np.sum(a == v) + np.sum(b == v)) for v in labels]))


def test_variants_study_command(tmp_path):
    out = tmp_path / "variants.json"
    threads = torch.get_num_threads()
    try:
        variants_main(["--variants", "iirp", "smgicnet", "--spatial_dims", "2", "--spatial_size", "64", "--steps", "4",
                       "--num_train_pairs", "2", "--num_val_pairs", "2", "--work_dir", str(tmp_path / "runs"),
                       "--override", "lr=0.0002", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    study = json.loads(out.read_text())
    rows = {r["variant"]: r for r in study["results"]}
    assert list(rows) == ["iirp", "smgicnet"]

    # the identity baseline, by hand: Dice of the unregistered labels of the validation pairs (seeds 100000, 100001)
    val = SyntheticRegistrationDataset(num_pairs=2, seed=100000, spatial_dims=2, spatial_size=64, num_labels=4,
                                       label_sigma=3.0, deform_sigma=5.0, max_displacement=4.0)
    identity = [_dice_present(p["moving_label"].numpy(), p["fixed_label"].numpy()) for p in val]
    for r in rows.values():
        np.testing.assert_allclose(r["identity_dice_per_pair"], identity, atol=1e-6)
        assert 0.0 < r["identity_dice"] < 1.0 and 0.0 <= r["trained_dice"] <= 1.0
        assert len(r["trained_dice_per_pair"]) == 2 and r["folding_pct"] >= 0.0
        assert r["train_s"] > 0 and r["train_cpu_s"] > 0 and r["eval_s"] > 0
    # the override reaches the training (the recipe's lr is 1e-4) and is recorded
    assert rows["iirp"]["steps"] == 4 and rows["iirp"]["epochs"] == 2
    assert rows["iirp"]["lr"] == 2e-4 and rows["iirp"]["override"] == {"lr": 0.0002}
    # SM-GICNet keeps its level-wise schedule (4/4/6/6 epochs): at least one update per epoch, all 4 levels reached
    sm = rows["smgicnet"]
    assert sm["epochs"] == 20 and sm["steps"] == 20
    assert sm["stages"] == {"stage_epochs": [4, 4, 6, 6], "final_stage": 4, "active_levels": 4}

    # the trained figure is the Dice of the saved final weights: re-register the validation pairs with them
    parser = ConfigParser({"spatial_dims": 2})
    parser.update(json.loads(open(os.path.join(REPO, "configs", "variants", "iirp.json")).read()))
    net = parser.get_parsed_content("network_def", instantiate=True)
    assert sum(p.numel() for p in net.parameters()) == rows["iirp"]["parameters"]
    state = torch.load(tmp_path / "runs" / "iirp" / "models" / "model_final.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(state["model"])
    net.eval()
    warp = Warp(mode="nearest", padding_mode="zeros")  # the evaluation iteration's label warp
    trained = []
    with torch.no_grad():
        for p in val:
            ddf = net(p["moving_image"][None].as_tensor(), p["fixed_image"][None].as_tensor())
            warped = warp(p["moving_label"][None].as_tensor().double(), ddf.double())[0]
            trained.append(_dice_present(warped.numpy(), p["fixed_label"].numpy()))
    np.testing.assert_allclose(rows["iirp"]["trained_dice_per_pair"], trained, atol=1e-6)

    table = (tmp_path / "variants.md").read_text()
    assert table.startswith("`python -m monai_ipear.studies.variants --variants iirp smgicnet")
    assert "| iirp (lr=0.0002) |" in table
    lines = [ln for ln in table.splitlines() if ln.startswith("| iirp") or ln.startswith("| smgicnet")]
    assert len(lines) == 2
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    assert cells[4] == f"{100 * rows['iirp']['identity_dice']:.1f}" and cells[5] == f"{100 * rows['iirp']['trained_dice']:.1f}"
    better = sum(t > i for t, i in zip(rows["iirp"]["trained_dice_per_pair"], identity))
    assert cells[7] == f"{better}/2"
    # --table re-renders the same Markdown from the JSON alone (no training)
    (tmp_path / "variants.md").unlink()
    variants_main(["--table", str(out)])
    assert (tmp_path / "variants.md").read_text() == table
