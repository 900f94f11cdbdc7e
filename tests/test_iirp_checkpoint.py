"""The published IIRP-Net checkpoint format -> RPNet: key mapping, errors, and equivalence with the published forward.

``_published_*`` below is an independent re-statement, in plain torch.nn.functional, of what the published
code (Torbjorn1997/IIRP-Net, voxelmorph/torch/iirp.py) computes, written from its description: every warp is
``grid_sample`` on ``identity + flow`` normalised as ``2 x / (s - 1) - 1`` with zero padding and
``align_corners=True``; fields go up a level as ``interpolate(2 * flow, x2, trilinear, align_corners=True)``;
IterStop uses a batch-global NCC with unbiased stds and the loop structure described in
``monai_ipear/controllers/iterstop.py``. Our network runs through MONAI's Warp and the controller framework,
so agreement checks the whole chain. (The comparison with the published code itself, run outside the
repository on the real data, is described in docs/architecture.md.)
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from monai_ipear import IterStop, RPNet, SinglePass
from monai_ipear.networks.nets.pretrained import (
    IIRPCheckpointError,
    convert_iirp_state_dict,
    iirp_key_map,
    load_iirp_checkpoint,
)

WEIGHTS = Path(os.environ.get("IIRP_WEIGHTS", Path(__file__).resolve().parents[2] / "shared/weights/iirp_mindboggle.pt"))

# the published model_state layout (name, shape), as saved by voxelmorph's LoadableModel
_DEC = {4: (64, 32), 3: (64, 32), 2: (32, 32), 1: (16, 16)}  # level: (2C in, q)
PUBLISHED_LAYOUT = [
    ("encoder.block1.main", (8, 1)), ("encoder.block2.main", (16, 8)),
    ("encoder.block3.main", (32, 16)), ("encoder.block4.main", (32, 32)),
]
for _l, (_cin, _q) in _DEC.items():
    PUBLISHED_LAYOUT += [
        (f"decoder{_l}.Conv1.main", (_q, _cin)), (f"decoder{_l}.Conv2.main", (_q, _q)),
        (f"decoder{_l}.Conv3.main", (_q, _q)), (f"decoder{_l}.Conv4", (_q // 2, _q)), (f"decoder{_l}.Conv5", (3, _q // 2)),
    ]


def synthetic_state(seed: int = 0, scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (o, i) in PUBLISHED_LAYOUT:
        state[f"{name}.weight"] = scale * torch.randn(o, i, 3, 3, 3, generator=g)
        state[f"{name}.bias"] = scale * torch.randn(o, generator=g)
    return state


def save_published(path, state, config=None):
    torch.save({"config": config or {"first_channel": 8, "in_channel": 1, "size": (160, 192, 160)}, "model_state": state}, path)


# ---------------- independent functional statement of the published forward ----------------


def _warp(src, flow):
    shape = flow.shape[2:]
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    loc = grid[None] + flow
    loc = torch.stack([2 * loc[:, i] / (shape[i] - 1) - 1 for i in range(3)], dim=-1).flip(-1)
    return F.grid_sample(src, loc, mode="bilinear", padding_mode="zeros", align_corners=True)


def _up(flow, f):
    return F.interpolate(f * flow, scale_factor=f, mode="trilinear", align_corners=True)


def _conv(x, s, name, act=True):
    y = F.conv3d(x, s[f"{name}.weight"], s[f"{name}.bias"], padding=1)
    return F.leaky_relu(y, 0.1) if act else y


def _encode(x, s):
    feats = []
    for i in range(1, 5):
        x = _conv(x if i == 1 else F.avg_pool3d(x, 2), s, f"encoder.block{i}.main")
        feats.append(x)
    return feats


def _decode(s, lvl, a, b):
    h = _conv(torch.cat([a, b], 1), s, f"decoder{lvl}.Conv1.main")
    for r in ("Conv2", "Conv3"):
        h = F.leaky_relu(F.conv3d(h, s[f"decoder{lvl}.{r}.main.weight"], s[f"decoder{lvl}.{r}.main.bias"], padding=1) + h, 0.1)
    return _conv(_conv(h, s, f"decoder{lvl}.Conv4", act=False), s, f"decoder{lvl}.Conv5", act=False)


def _ncc(a, b):
    return torch.mean((a - a.mean()) * (b - b.mean()) / (a.std() * b.std()))


def _published_forward(s, x, y, iterate, delta=0.005, k_max=10):
    fx, fy = _encode(x, s), _encode(y, s)
    counts = []
    flow, best, n = None, 0.0, 0
    for _ in range(k_max if iterate else 1):  # coarsest level: check after each update, discard a failure
        d = _decode(s, 4, fx[3] if flow is None else _warp(fx[3], flow), fy[3])
        new = d if flow is None else _warp(flow, d) + d
        if iterate:
            ncc = _ncc(_warp(x, _up(new, 8)), y)
            if ncc < best + delta:
                break
            best = ncc
        flow, n = new, n + 1
    counts.append(n)
    if flow is None:
        flow = torch.zeros_like(d)
    for lvl in (3, 2, 1):  # finer levels: check the current field before each update
        flow = _up(flow, 2)
        best, n = 0.0, 0
        for _ in range(k_max if iterate else 1):
            if iterate:
                ncc = _ncc(_warp(x, _up(flow, 2 ** (lvl - 1)) if lvl > 1 else flow), y)
                if ncc < best + delta:
                    break
                best = ncc
            d = _decode(s, lvl, _warp(fx[lvl - 1], flow), fy[lvl - 1])
            flow = _warp(flow, d) + d
            n += 1
        counts.append(n)
    return flow, counts



def _blobs(size=(16, 16, 24), seed=0, shift=1):
    """A smooth random volume in [0, 1] and a shifted, slightly different copy: (moving, fixed) (1, 1, *size)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((1, 1, *size), generator=g)
    for _ in range(3):
        x = F.avg_pool3d(x, 3, 1, 1, count_include_pad=False)
    x = (x - x.min()) / (x.max() - x.min())
    y = torch.roll(x, shifts=(shift, -shift, shift), dims=(2, 3, 4))
    return x, 0.9 * y + 0.1 * x


# ---------------- mapping and errors (synthetic state in the published layout) ----------------


def test_key_map_covers_rpnet_exactly():
    mapping = iirp_key_map()
    assert set(mapping) == {f"{n}.{p}" for n, _ in PUBLISHED_LAYOUT for p in ("weight", "bias")}
    assert set(mapping.values()) == set(RPNet().state_dict())
    assert len(set(mapping.values())) == len(mapping)


def test_load_synthetic_checkpoint_values(tmp_path):
    state = synthetic_state()
    save_published(tmp_path / "m.pt", state)
    net = load_iirp_checkpoint(tmp_path / "m.pt")
    ours = net.state_dict()
    for theirs, mine in iirp_key_map().items():
        assert torch.equal(ours[mine], state[theirs]), mine
    assert isinstance(net.controller, IterStop) and net.controller.faithful and not net.training
    assert net.iirp_config["first_channel"] == 8
    assert isinstance(load_iirp_checkpoint(tmp_path / "m.pt", controller=SinglePass()).controller, SinglePass)


def test_grid_buffers_are_ignored(tmp_path):
    state = synthetic_state()
    state["transformer.0.grid"] = torch.zeros(1, 3, 4, 4, 4)
    save_published(tmp_path / "m.pt", state)
    load_iirp_checkpoint(tmp_path / "m.pt")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("decoder2.Conv3.main.weight"), "missing keys ['decoder2.Conv3.main.weight']"),
        (lambda s: s.__setitem__("decoder1.Conv6.weight", torch.zeros(3)), "unexpected keys ['decoder1.Conv6.weight']"),
        (lambda s: s.__setitem__("decoder1.Conv5.weight", torch.zeros(2, 8, 3, 3, 3)), "decoder1.Conv5.weight has shape (2, 8, 3, 3, 3)"),
    ],
)
def test_mismatched_state_fails_and_loads_nothing(tmp_path, change, message):
    state = synthetic_state()
    change(state)
    net = RPNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(IIRPCheckpointError) as err:
        convert_iirp_state_dict(state, net)
    assert message in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    save_published(tmp_path / "bad.pt", state)
    with pytest.raises(IIRPCheckpointError, match="not an IIRP-Net/RP-Net checkpoint"):
        load_iirp_checkpoint(tmp_path / "bad.pt")


def test_bad_files(tmp_path):
    torch.save({"state_dict": synthetic_state()}, tmp_path / "a.pt")
    with pytest.raises(IIRPCheckpointError, match="not a voxelmorph LoadableModel file"):
        load_iirp_checkpoint(tmp_path / "a.pt")
    save_published(tmp_path / "b.pt", synthetic_state(), {"first_channel": 16, "in_channel": 1, "size": (8, 8, 8)})
    with pytest.raises(IIRPCheckpointError, match="first_channel=16"):
        load_iirp_checkpoint(tmp_path / "b.pt")
    (tmp_path / "c.pt").write_text("not a checkpoint")
    with pytest.raises(IIRPCheckpointError, match="cannot read"):
        load_iirp_checkpoint(tmp_path / "c.pt")
    with pytest.raises(FileNotFoundError):
        load_iirp_checkpoint(tmp_path / "absent.pt")


def test_synthetic_weights_match_published_forward(tmp_path):
    state = synthetic_state(seed=3, scale=0.05)
    save_published(tmp_path / "m.pt", state)
    x, y = _blobs(seed=1)
    single = load_iirp_checkpoint(tmp_path / "m.pt", controller=SinglePass())
    faithful = load_iirp_checkpoint(tmp_path / "m.pt")
    with torch.no_grad():
        ref, _ = _published_forward(state, x, y, iterate=False)
        assert ref.abs().max() > 1.0  # a non-trivial field (about 3 voxels)
        assert (single(x, y) - ref).abs().max() < 1e-4
        ref_it, counts = _published_forward(state, x, y, iterate=True)
        got = faithful(x, y)
    assert faithful.last_iterations[0].flip(0).tolist() == counts == [1, 1, 1, 5]  # levels 4, 3, 2, 1
    assert (got - ref_it).abs().max() < 1e-4


# ---------------- the real published checkpoint ----------------


@pytest.fixture(scope="module")
def real():
    if not WEIGHTS.exists():
        pytest.skip(f"published IIRP-Net checkpoint not found at {WEIGHTS} (set IIRP_WEIGHTS)")
    return torch.load(WEIGHTS, map_location="cpu", weights_only=True)["model_state"]


def test_real_checkpoint_loads(real):
    net = load_iirp_checkpoint(WEIGHTS)
    assert sum(p.numel() for p in net.parameters()) == 419_964
    ours = net.state_dict()
    assert all(torch.equal(ours[m], real[t]) for t, m in iirp_key_map().items())


def test_real_checkpoint_matches_published_forward(real):
    x, y = _blobs(size=(24, 32, 32), seed=2, shift=2)
    single = load_iirp_checkpoint(WEIGHTS, controller=SinglePass())
    faithful = load_iirp_checkpoint(WEIGHTS)
    with torch.no_grad():
        ref, _ = _published_forward(real, x, y, iterate=False)
        assert (single(x, y) - ref).abs().max() < 1e-4
        ref_it, counts = _published_forward(real, x, y, iterate=True)
        got = faithful(x, y)
    assert faithful.last_iterations[0].flip(0).tolist() == counts
    assert sum(counts) > 4  # the check is not vacuous: IterStop iterated somewhere
    assert (got - ref_it).abs().max() < 1e-4


def test_study_table_on_a_tiny_pair():
    """The study command's core (same weights, several controllers) on a tiny labelled pair."""
    from monai_ipear import FixedIterations
    from monai_ipear.studies.iirp_tci import format_study_table, run_iirp_tci_study

    torch.manual_seed(0)
    net = RPNet()
    x, y = _blobs(size=(16, 16, 16), seed=4)
    lab_x, lab_y = (x > 0.5).float() + (x > 0.7).float(), (y > 0.5).float() + (y > 0.7).float()
    results = run_iirp_tci_study(
        net, [(x, lab_x, y, lab_y)], labels=[1, 2], controllers={"one": SinglePass(), "three": FixedIterations(3)}, log=lambda s: None
    )
    assert results["one"]["iterations"] == [[1, 1, 1, 1]] and results["three"]["iterations"] == [[3, 3, 3, 3]]
    assert 0.0 <= results["one"]["dice"][0] <= 100.0
    table = format_study_table(results).splitlines()
    assert len(table) == 4 and table[3].startswith("| three |") and table[3].endswith("| 3.0 / 3.0 / 3.0 / 3.0 |")
    assert f"{results['one']['dice'][0]:.2f}" in table[2]


def test_study_command_on_a_pretrained_ipear_and_a_datalist(tmp_path):
    """``--model`` (a monai_ipear pretrained file) and ``--datalist``: every ordered pair of the split under every
    controller, the fixed rows as asked, each row's Dice that of the network run directly under its controller."""
    import json

    import nibabel as nib
    import numpy as np

    from monai_ipear import TCI, FixedIterations, iPEAR
    from monai_ipear.pretrained import load_pretrained, save_pretrained
    from monai_ipear.studies.iirp_tci import _load, iirp_tci_study_cli, run_iirp_tci_study

    torch.manual_seed(0)
    config = {"encoder_channels": [4, 4, 4, 4], "decoder_channels": [4, 4, 4, 4], "num_heads": [1, 1, 1]}
    model = str(tmp_path / "tiny.pt")
    save_pretrained(iPEAR(**config), model, config)
    subjects = []
    for i in range(2):
        x, _ = _blobs(size=(16, 16, 16), seed=10 + i)
        img, lab = x[0, 0].numpy(), ((x[0, 0] > 0.5).float() + (x[0, 0] > 0.7).float()).numpy()
        for kind, arr in (("image", img), ("label", lab)):
            nib.save(nib.Nifti1Image(arr.astype(np.float32), np.eye(4)), str(tmp_path / f"s{i}_{kind}.nii.gz"))
        subjects.append({"image": f"s{i}_image.nii.gz", "label": f"s{i}_label.nii.gz"})
    (tmp_path / "dataset.json").write_text(json.dumps({"validation": subjects}))
    out = tmp_path / "study.md"
    text = iirp_tci_study_cli(["--model", model, "--datalist", str(tmp_path / "dataset.json"), "--fixed", "1", "2",
                               "--out", str(out)])
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| controller")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| single pass", "| IIRP IterStop, paper rule", "| IIRP IterStop, faithful (published code)",
        "| fixed 1 iterations", "| fixed 2 iterations", "| TCI (iPEAR defaults)"]
    assert rows[4].endswith("| 2.0 / 2.0 / 2.0 / 2.0 |") and "2 registrations" in text and out.read_text() == text
    # the fixed-2 row's Dice is the network's own under FixedIterations(2), pairs in the datalist's order
    net, _ = load_pretrained(model)
    loaded = [(_load(str(tmp_path / s["image"]), True), _load(str(tmp_path / s["label"]), False)) for s in subjects]
    pairs = [(*loaded[0], *loaded[1]), (*loaded[1], *loaded[0])]
    for name, controller in (("fixed 2 iterations", FixedIterations(2)), ("TCI (iPEAR defaults)", TCI())):
        results = run_iirp_tci_study(net, pairs, labels=None, controllers={name: controller}, log=lambda s: None)
        assert f"{statistics.mean(results[name]['dice']):.2f}" in next(r for r in rows if r.startswith(f"| {name} |"))
