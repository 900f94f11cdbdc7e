"""Variant configs (configs/variants/*.json): FARM swapped into RP-Net and TCI into IIRP-Net by config alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

import monai_ipear  # noqa: F401 - registers the short names for ConfigParser
from monai_ipear import (
    FARM,
    TCI,
    ConvEncoder,
    FixedIterations,
    IterStop,
    PyramidRegistrationNet,
    ResidualFlowEstimator,
    RPNet,
    SinglePass,
    iPEAR,
)

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ROOT / "configs" / "variants"
NAMES = ["rpnet", "iirp", "iirp_tci", "iirp_farm", "ipear_iterstop", "ipear_fixed3", "ipear_single"]


def build(name: str, spatial_dims: int = 3) -> torch.nn.Module:
    parser = ConfigParser({"spatial_dims": spatial_dims})
    parser.update(json.loads((VARIANTS / f"{name}.json").read_text()))
    return parser.get_parsed_content("network_def", instantiate=True)


def smooth_pair(spatial_dims: int, size: int = 16, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 1) + (size,) * spatial_dims
    x = torch.rand(shape, generator=g)
    pool = torch.nn.functional.avg_pool3d if spatial_dims == 3 else torch.nn.functional.avg_pool2d
    x = pool(x, 3, 1, 1)
    fixed = pool(torch.rand(shape, generator=g), 3, 1, 1)
    return x, 0.5 * x + 0.5 * fixed


RECIPE_KEYS = {"loss", "lr", "lr_scheduler"}  # a paper's training recipe (IIRP-Net / RP-Net, SACB-Net, RAN, SM-GICNet)


def test_variant_files_override_only_network_def_and_recipe():
    for name in NAMES:
        cfg = json.loads((VARIANTS / f"{name}.json").read_text())
        assert set(cfg) <= {"network_def", "inferer"} | RECIPE_KEYS, name


@pytest.mark.parametrize(
    "name, lr, scheduler, smooth_weight",
    [("iirp", 1e-4, "ConstantLR", 1.0), ("rpnet", 1e-4, "ConstantLR", 1.0), ("sacbnet", 1e-4, "PolynomialLR", 0.3)],
)
def test_variant_training_recipes(name, lr, scheduler, smooth_weight):
    """IIRP-Net / RP-Net: Adam, constant lr 1e-4, LNCC(9) + 1.0 * Grad(l2); SACB-Net: lr 1e-4 with polynomial decay
    (power 0.9 over the run), LNCC(9) + 0.3 * Grad(l2)."""
    from monai_ipear import GradientSmoothnessLoss, RegistrationLoss

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train.json"), str(VARIANTS / f"{name}.json")])
    parser["spatial_dims"] = 2
    parser["max_epochs"] = 10
    if name == "sacbnet":
        parser["network_def"] = {"_target_": "RPNet", "spatial_dims": 2}  # the schedule only; SACB-Net is tested elsewhere
    loss = parser.get_parsed_content("loss")
    assert isinstance(loss, RegistrationLoss) and loss.smooth_weight == smooth_weight
    assert isinstance(loss.regularization, GradientSmoothnessLoss)
    opt = parser.get_parsed_content("optimizer")
    sched = parser.get_parsed_content("lr_scheduler")
    assert isinstance(opt, torch.optim.Adam) and type(sched).__name__ == scheduler
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    if scheduler == "ConstantLR":
        assert lrs == [lr] * 10
    else:
        expected = [lr * (1 - e / 10) ** 0.9 for e in range(10)]
        assert all(abs(a - b) < 1e-12 for a, b in zip(lrs, expected))


@pytest.mark.parametrize(
    "name, cls, decoder, controller",
    [
        ("rpnet", RPNet, ResidualFlowEstimator, SinglePass),
        ("iirp", RPNet, ResidualFlowEstimator, IterStop),
        ("iirp_tci", PyramidRegistrationNet, ResidualFlowEstimator, TCI),
        ("iirp_farm", PyramidRegistrationNet, FARM, IterStop),
        ("ipear_iterstop", iPEAR, FARM, IterStop),
        ("ipear_fixed3", iPEAR, FARM, FixedIterations),
        ("ipear_single", iPEAR, FARM, SinglePass),
    ],
)
def test_variant_components(name, cls, decoder, controller):
    net = build(name)
    assert isinstance(net, cls)
    assert all(isinstance(d, decoder) for d in net.decoders) and len(net.decoders) == 4
    assert type(net.controller) is controller
    if name == "ipear_fixed3":
        assert net.controller.k_max == 3
    if name == "iirp":
        assert net.controller.faithful is True and net.controller.delta == 0.005 and net.controller.k_max == 10


def test_rpnet_variant_has_published_parameter_count():
    assert sum(p.numel() for p in build("rpnet").parameters()) == 419_964


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_tci_swapped_into_iirp_by_config(spatial_dims):
    """iirp_tci.json = RP-Net's modules under TCI: with RP-Net's weights it gives RPNet(controller=TCI())'s output."""
    torch.manual_seed(0)
    reference = RPNet(spatial_dims, controller=TCI()).eval()
    net = build("iirp_tci", spatial_dims).eval()
    net.load_state_dict(reference.state_dict(), strict=True)  # same module tree as RP-Net
    moving, fixed = smooth_pair(spatial_dims)
    with torch.no_grad():
        expected = reference(moving, fixed)
        got = net(moving, fixed)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert torch.equal(net.last_iterations, reference.last_iterations)
    # TCI with t = 3 runs at least 3 updates per level (and stops before k_max = 10 or at it)
    assert (net.last_iterations >= 3).all() and (net.last_iterations <= 10).all()
    # and TCI really replaced the single pass: the field differs from RP-Net's one-pass field
    single = RPNet(spatial_dims).eval()
    single.load_state_dict(reference.state_dict())
    with torch.no_grad():
        assert (single(moving, fixed) - got).abs().max() > 1e-6


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_farm_swapped_into_rpnet_by_config(spatial_dims):
    """iirp_farm.json = RP-Net's encoder with iPEAR's FARM decoders (same widths), IterStop control."""
    net = build("iirp_farm", spatial_dims).eval()
    rp, ip = RPNet(spatial_dims), iPEAR(spatial_dims)
    rp.encoder.load_state_dict(net.encoder.state_dict(), strict=True)
    ip.decoders.load_state_dict(net.decoders.state_dict(), strict=True)
    n_enc = sum(p.numel() for p in ConvEncoder(spatial_dims).parameters())
    n_dec = sum(p.numel() for p in ip.decoders.parameters())
    assert sum(p.numel() for p in net.parameters()) == n_enc + n_dec
    # same computation as the network assembled in Python from the same parts
    manual = PyramidRegistrationNet(rp.encoder, ip.decoders, IterStop(), spatial_dims=spatial_dims).eval()
    moving, fixed = smooth_pair(spatial_dims, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(net(moving, fixed), manual(moving, fixed), atol=1e-6, rtol=0)
    assert torch.equal(net.last_iterations, manual.last_iterations)


@pytest.mark.parametrize("base", ["train.json", "inference.json", "evaluate.json"])
def test_variants_merge_with_base_configs(base):
    path = ROOT / "configs" / base
    for name in NAMES:
        parser = ConfigParser()
        parser.read_config([str(path), str(VARIANTS / f"{name}.json")])
        assert "network_def" in parser.config, f"configs/{base} must keep the network in network_def"
        net = parser.get_parsed_content("network_def", instantiate=True)
        expected = build(name, parser.get_parsed_content("spatial_dims"))
        assert type(net) is type(expected) and type(net.controller) is type(expected.controller), name
        assert [type(d) for d in net.decoders] == [type(d) for d in expected.decoders], name


@pytest.mark.parametrize("base", ["inference.json", "evaluate.json"])
@pytest.mark.parametrize("name", ["ran", "sacbnet", "smgicnet"])
def test_comparison_variants_build_with_inference_and_evaluate(base, name):
    """The comparison networks' variant files (network + training recipe) also merge over the inference and
    evaluation configs, which only read ``network_def``."""
    from monai_ipear import RAN, SACBNet, SMGICNet

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / base), str(VARIANTS / f"{name}.json")])
    parser["spatial_dims"] = 2
    net = parser.get_parsed_content("network_def", instantiate=True)
    assert type(net) is {"ran": RAN, "sacbnet": SACBNet, "smgicnet": SMGICNet}[name] and net.spatial_dims == 2
