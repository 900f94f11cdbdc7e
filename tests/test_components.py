"""Components resolve by short name in MONAI bundle configs, and no short name collides with MONAI's."""

import importlib
import inspect
import pkgutil

import monai
import torch
from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator

import monai_ipear


def _our_public_names():
    names = {}
    for info in pkgutil.walk_packages(monai_ipear.__path__, "monai_ipear."):
        if info.name.split(".")[-1].startswith("_") or ".studies" in info.name:
            continue
        mod = importlib.import_module(info.name)
        for name, obj in inspect.getmembers(mod):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == info.name and not name.startswith("_"):
                names.setdefault(name, []).append(info.name)
    return names


def test_locator_finds_ours_and_no_short_name_collides():
    names = _our_public_names()
    assert {"iPEAR", "FARM", "TCI", "IterStop", "NAEncoder", "ConvEncoder", "PyramidRegistrationNet"} <= set(names)
    locator = ComponentLocator()
    clashes = {}
    for name in names:
        found = locator.get_component_module_name(name)
        if not (isinstance(found, str) and found.startswith("monai_ipear.")):
            clashes[name] = found
    assert not clashes, f"short names that MONAI cannot resolve to one monai_ipear module: {clashes}"


def test_farm_and_tci_instantiate_from_config():
    parser = ConfigParser(
        {
            "farm": {"_target_": "FARM", "spatial_dims": 3, "in_channels": 8, "channels": 16, "use_sab": False},
            "tci": {"_target_": "TCI", "delta_s": 0.01, "order": "convergence", "similarity": "mse"},
            "net": {
                "_target_": "PyramidRegistrationNet",
                "encoder": {"_target_": "ConvEncoder", "spatial_dims": 2, "channels": [4, 8]},
                "decoders": [
                    {"_target_": "FARM", "spatial_dims": 2, "in_channels": 4, "channels": 8},
                    {"_target_": "ResidualFlowEstimator", "spatial_dims": 2, "in_channels": 8, "channels": 8},
                ],
                "controller": "@tci",
            },
        }
    )
    farm = parser.get_parsed_content("farm")
    assert type(farm).__name__ == "FARM" and isinstance(farm.sab, torch.nn.Identity)
    tci = parser.get_parsed_content("tci")
    assert isinstance(tci, monai_ipear.TCI) and tci.delta_s == 0.01 and tci.order == "convergence"
    assert tci.similarity is monai_ipear.negative_mse
    net = parser.get_parsed_content("net").eval()
    with torch.no_grad():
        net(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))
    assert net.controller is tci and net.last_iterations.shape == (1, 2)


def test_ipear_defaults_from_config():
    net = ConfigParser({"n": {"_target_": "iPEAR", "spatial_dims": 2}}).get_parsed_content("n")
    assert isinstance(net.controller, monai_ipear.TCI) and net.controller.k_max == 10
