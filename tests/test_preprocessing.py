"""Preprocessing: elastix pre-alignment recovers a known affine; the MONAI chain masks, boxes and scales."""

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_ipear.preprocessing import AffinePrealignd, elastix_ddf, elastix_register, has_elastix, real_scan_preprocessing

needs_elastix = pytest.mark.skipif(not has_elastix(), reason="itk-elastix not installed (optional extra 'prealign')")


def _phantom(coords: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Smooth anisotropic blobs (analytic, so moved copies need no interpolation). coords (n, *spatial)."""
    n = coords.shape[0]
    d = coords - center.reshape((n,) + (1,) * n)
    shape = [(np.zeros(n), np.array([9.0, 7.0, 8.0][:n]), 1.0),
             (np.array([3.0, -2.0, 1.0][:n]), np.array([3.0, 2.5, 4.0][:n]), 0.8),
             (np.array([-4.0, 3.0, -3.0][:n]), np.array([2.5, 3.5, 2.5][:n]), -0.5)]
    out = np.zeros(coords.shape[1:])
    for mu, sd, amp in shape:
        r2 = sum(((d[i] - mu[i]) / sd[i]) ** 2 for i in range(n))
        out += amp * np.exp(-0.5 * r2 ** 2)  # flat-topped blobs with smooth edges
    return out.astype(np.float32)


def _known_pair(n: int, size: int):
    """fixed(x) = f(x); moving(y) = f(A^-1 (y - c - t) + c), so moving(x + ddf(x)) = fixed(x) with
    ddf(x) = A (x - c) + c + t - x (pull convention)."""
    x = np.stack(np.meshgrid(*[np.arange(size, dtype=float)] * n, indexing="ij"))
    c = np.full(n, (size - 1) / 2.0)
    th = math.radians(7.0)
    a = np.eye(n)
    a[:2, :2] = [[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]]
    a = a * 1.06
    t = np.array([1.5, -2.0, 1.0][:n])
    cb = c.reshape((n,) + (1,) * n)
    fixed = _phantom(x, c)
    y = np.einsum("ij,j...->i...", np.linalg.inv(a), x - cb - t.reshape(cb.shape)) + cb
    moving = _phantom(y, c)
    ddf = np.einsum("ij,j...->i...", a, x - cb) + cb + t.reshape(cb.shape) - x
    return moving, fixed, ddf, a


@needs_elastix
@pytest.mark.parametrize("n,size", [(2, 48), (3, 32)])
def test_elastix_recovers_known_affine(n, size, tmp_path, monkeypatch):
    moving, fixed, ddf_true, a = _known_pair(n, size)
    result = elastix_register(moving, fixed, transform="affine", num_iterations=200, num_resolutions=2, seed=1,
                              metric="AdvancedNormalizedCorrelation")
    monkeypatch.chdir(tmp_path)
    ddf = elastix_ddf(result, moving).numpy()
    assert list(tmp_path.iterdir()) == []  # transformix's deformationField.nii stays out of the working directory
    inside = fixed > 0.1
    err = np.linalg.norm(ddf - ddf_true, axis=0)[inside]
    # stated tolerance: mean displacement error < 0.3 voxel, max < 0.75 voxel over the object, matrix within 0.03
    assert err.mean() < 0.3, err.mean()
    assert err.max() < 0.75, err.max()
    np.testing.assert_allclose(result.matrix, a, atol=0.03)
    # the identity initial guess is far off: the known field moves the object by several voxels
    assert np.linalg.norm(ddf_true, axis=0)[inside].max() > 2.0


@needs_elastix
def test_affine_prealignd_resamples_labels_onto_fixed_grid():
    moving, fixed, _, _ = _known_pair(3, 32)
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    d = {
        "image": MetaTensor(torch.from_numpy(moving)[None]),
        "label": MetaTensor(torch.from_numpy((moving > 0.5).astype(np.float32) * 3)[None]),
        "fixed": MetaTensor(torch.from_numpy(fixed)[None], affine=affine),
    }
    out = AffinePrealignd(["image", "label"], "image", "fixed", mode=["bilinear", "nearest"], num_iterations=200,
                          num_resolutions=2, metric="AdvancedNormalizedCorrelation")(d)
    ref = fixed > 0.5
    lab = out["label"][0].numpy()
    assert set(np.unique(lab)) <= {0.0, 3.0}  # nearest neighbour keeps label values
    dice = 2 * ((lab == 3) & ref).sum() / ((lab == 3).sum() + ref.sum())
    before = 2 * ((moving > 0.5) & ref).sum() / ((moving > 0.5).sum() + ref.sum())
    assert dice > 0.95 and before < 0.85, (dice, before)
    np.testing.assert_allclose(np.asarray(out["image"].affine), affine.numpy())
    assert float(torch.mean(torch.abs(out["image"][0] - torch.from_numpy(fixed)))) < 0.03
    assert out["prealign_result"].spacing == (2.0, 2.0, 2.0)


def test_chain_masks_boxes_and_scales_without_prealignment():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 40, 36, 30, generator=g) * 500 + 100
    label = torch.zeros(1, 40, 36, 30)
    label[0, 10:25, 8:20, 5:21] = 2
    label[0, 12:14, 10:12, 7:9] = 5
    d = {"image": MetaTensor(image.clone()), "label": MetaTensor(label.clone())}
    out = real_scan_preprocessing("image", "label", template_image_key=None, template_mask_key=None, load=False,
                                  margin=2, k_divisible=8)(d)
    img, lab = out["image"], out["label"]
    # box: label bbox 15x12x16 + 2*2 margin, rounded up to multiples of 8
    assert tuple(img.shape[1:]) == (24, 16, 24)
    assert tuple(lab.shape) == tuple(img.shape)
    assert float(img.min()) == 0.0 and float(img.max()) == 1.0
    # masking: every voxel outside the brain (label 0) is 0 before scaling, so still the minimum after it
    assert torch.all(img[lab == 0] == 0)
    assert int((lab == 5).sum()) == 8 and int((lab == 2).sum()) == 15 * 12 * 16 - 8


def test_chain_is_usable_from_a_bundle_config():
    from monai.bundle import ConfigParser

    parser = ConfigParser({"pre": {"_target_": "real_scan_preprocessing", "image_key": "image", "label_key": "label",
                                   "template_image_key": None, "template_mask_key": None, "load": False,
                                   "margin": 0, "k_divisible": 4}})
    chain = parser.get_parsed_content("pre")
    label = torch.zeros(1, 16, 16, 16)
    label[0, 3:9, 4:10, 5:11] = 1
    out = chain({"image": MetaTensor(torch.rand(1, 16, 16, 16) + 1), "label": MetaTensor(label)})
    assert tuple(out["image"].shape) == (1, 8, 8, 8)  # 6-voxel box rounded up to a multiple of 4
    assert any(type(t).__name__ == "MaskIntensityd" for t in chain.transforms)
    if has_elastix():
        cfg = ConfigParser({"t": {"_target_": "AffinePrealignd", "keys": ["image"], "moving_key": "image",
                                  "fixed_key": "fixed"}})
        assert isinstance(cfg.get_parsed_content("t"), AffinePrealignd)
