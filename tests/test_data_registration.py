"""Synthetic pair generator, datalist pairing and file transforms."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_ipear.data import SyntheticPairGenerator, SyntheticRegistrationDataset, load_registration_pairs
from monai_ipear.data import registration_pair_transforms


def _dice(a, b, labels):
    return np.mean([2 * ((a == v) & (b == v)).sum() / ((a == v).sum() + (b == v).sum()) for v in labels])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_synthetic_pairs_are_deterministic_and_consistent(spatial_dims):
    gen = SyntheticPairGenerator(spatial_size=24, spatial_dims=spatial_dims, num_labels=3, noise_std=0.0)
    a, b, c = gen(5), gen(5), gen(6)
    for k in ("moving_image", "fixed_image", "moving_label", "fixed_label"):
        assert a[k].shape == (1,) + (24,) * spatial_dims
        assert torch.equal(a[k], b[k])  # same seed, same pair
    assert not torch.equal(a["fixed_image"], c["fixed_image"])
    for name in ("moving", "fixed"):
        img, lab = a[f"{name}_image"], a[f"{name}_label"]
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
        assert set(torch.unique(lab).tolist()) <= {0.0, 1.0, 2.0, 3.0}
        # background is dark (only linear-interpolation rims at label borders), labels are bright
        assert float(img[lab == 0].mean()) < 0.05
        assert float(img[lab > 0].mean()) > 0.2
    # moving and fixed are different deformations of one template: partial, not full, overlap
    d = _dice(a["moving_label"].numpy(), a["fixed_label"].numpy(), [1, 2, 3])
    assert 0.2 < d < 0.95


def test_synthetic_dataset_items_and_caching():
    ds = SyntheticRegistrationDataset(num_pairs=3, seed=10, spatial_size=16, num_labels=2)
    assert len(ds) == 3
    assert ds[1]["pair"] == "synthetic_00011"
    assert torch.equal(ds[1]["moving_image"], SyntheticPairGenerator(16, num_labels=2)(11)["moving_image"])


def _write_subjects(root, n=3, size=16):
    gen = SyntheticPairGenerator(size, num_labels=2)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 3.0]
    subjects = []
    for i in range(n):
        p = gen(i)
        img = os.path.join(root, f"img{i}.nii.gz")
        lab = os.path.join(root, f"lab{i}.nii.gz")
        nib.save(nib.Nifti1Image(100.0 * p["fixed_image"][0].numpy() + 20.0, affine), img)
        nib.save(nib.Nifti1Image(p["fixed_label"][0].numpy().astype(np.int16), affine), lab)
        subjects.append({"image": os.path.basename(img), "label": os.path.basename(lab)})
    return subjects, affine


def test_datalist_pairs(tmp_path):
    subjects, _ = _write_subjects(str(tmp_path))
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"training": subjects, "validation": subjects[:2]}))
    pairs = load_registration_pairs(str(path))
    assert len(pairs) == 6  # 3 * 2 ordered pairs
    assert {(p["moving_image"], p["fixed_image"]) for p in pairs} == {
        (str(tmp_path / f"img{i}.nii.gz"), str(tmp_path / f"img{j}.nii.gz")) for i in range(3) for j in range(3) if i != j
    }
    assert pairs[0]["pair"] == "img0_to_img1" and pairs[0]["moving_label"].endswith("lab0.nii.gz")
    atlas = load_registration_pairs(str(path), pairing="atlas", atlas=2)
    assert [p["pair"] for p in atlas] == ["img2_to_img0", "img2_to_img1"]
    assert len(load_registration_pairs(str(path), split="validation")) == 2
    with pytest.raises(ValueError, match="no 'test'"):
        load_registration_pairs(str(path), split="test")


@pytest.mark.parametrize("reader", ["NibabelReader", "ITKReader"])
def test_transforms_load_scale_pad_keep_affine(tmp_path, reader):
    subjects, affine = _write_subjects(str(tmp_path), n=2, size=14)
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"training": subjects}))
    item = registration_pair_transforms(reader=reader, divisible_k=8)(load_registration_pairs(str(path))[0])
    img, lab = item["moving_image"], item["moving_label"]
    assert img.shape == (1, 16, 16, 16) and lab.shape == (1, 16, 16, 16)  # padded at the far end
    assert float(img.min()) == pytest.approx(0.0) and float(img.max()) == pytest.approx(1.0)
    assert np.allclose(np.asarray(img.affine), affine, atol=1e-4)  # end padding keeps the origin
    raw = nib.load(str(tmp_path / "lab0.nii.gz")).get_fdata()
    assert np.array_equal(lab[0, :14, :14, :14].numpy(), raw)
    assert float(lab[0, 14:].abs().sum()) == 0.0
