"""The one-tensor export wrapper (verify_net_in_out), TorchScript via ckpt_export, torch.export, ONNX."""

import os

import pytest
import torch
from monai.bundle import ckpt_export, verify_net_in_out

import monai_ipear
from monai_ipear.controllers import TCI
from monai_ipear.export import ExportableRegistrationNet, export_onnx, export_program, max_abs_difference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
BUNDLE_ARGS = {
    "meta_file": os.path.join(CONFIGS, "metadata.json"),
    "config_file": [os.path.join(CONFIGS, "inference.json"), os.path.join(CONFIGS, "export.json")],
}


def _net(spatial_dims, seed=0):
    """A random iPEAR with down-scaled last convolutions (small, non-zero fields)."""
    torch.manual_seed(seed)
    net = monai_ipear.iPEAR(spatial_dims=spatial_dims)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".cl3.conv." in name:
                p.mul_(0.05)
    return net.eval()


def test_wrapper_is_the_network_with_fixed_iterations():
    net = _net(3)
    wrapper = ExportableRegistrationNet(net, iterations=2).eval()
    assert isinstance(net.controller, TCI)  # the original keeps its controller
    moving, fixed = torch.rand(2, 1, 16, 16, 16), torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        ddf = wrapper(torch.cat([moving, fixed], 1))
        assert torch.equal(wrapper.network.last_iterations, torch.full((2, 4), 2))
        net.controller = monai_ipear.FixedIterations(2)
        expected = net(moving, fixed)
    assert torch.allclose(ddf, expected, atol=1e-6) and ddf.abs().max() > 1e-3
    assert set(wrapper.state_dict()) == set(net.state_dict())  # the bundle's model.pt loads directly
    with pytest.raises(ValueError, match="moving then fixed"):
        wrapper(torch.rand(1, 1, 16, 16, 16))


def test_verify_net_in_out_passes_for_the_bundle_network():
    verify_net_in_out(net_id="export_network_def", device="cpu", **BUNDLE_ARGS)
    # and fails on a wrong channel declaration (the check is real)
    with pytest.raises(ValueError, match="output channel"):
        verify_net_in_out(net_id="export_network_def", device="cpu",
                          **{"_meta_#network_data_format#outputs#pred#num_channels": 2}, **BUNDLE_ARGS)


def test_ckpt_export_torchscript_agrees_with_eager(tmp_path):
    net = _net(3)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    ts_path = str(tmp_path / "model.ts")
    ckpt_export(net_id="export_network_def", filepath=ts_path, ckpt_file=str(tmp_path / "model.pt"),
                use_trace=True, input_shape=[1, 2, 16, 16, 16], export_iterations=2, **BUNDLE_ARGS)
    scripted = torch.jit.load(ts_path)
    x = torch.rand(1, 2, 16, 16, 16)
    with torch.no_grad():
        eager = ExportableRegistrationNet(net, iterations=2).eval()(x)
        exported = scripted(x)
    assert eager.abs().max() > 1e-3
    assert max_abs_difference(exported, eager) < 1e-5


def test_torch_export_agrees_with_eager(tmp_path):
    wrapper = ExportableRegistrationNet(_net(2, seed=1), iterations=2).eval()
    example = torch.rand(2, 2, 16, 16)
    program = export_program(wrapper, example, str(tmp_path / "model.pt2"))
    loaded = torch.export.load(str(tmp_path / "model.pt2")).module()
    x = torch.rand(2, 2, 16, 16)  # new values, same shape
    with torch.no_grad():
        eager = wrapper(x)
        assert eager.abs().max() > 1e-3
        assert max_abs_difference(program.module()(x), eager) < 1e-5
        assert max_abs_difference(loaded(x), eager) < 1e-5


def test_onnx_export_agrees_with_eager(tmp_path):
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
    except ImportError:
        pytest.skip("ONNX export test needs the optional 'onnx' and 'onnxruntime' packages (not installed)")
    wrapper = ExportableRegistrationNet(_net(2, seed=2), iterations=2).eval()
    x = torch.rand(1, 2, 16, 16)
    path = export_onnx(wrapper, x, str(tmp_path / "model.onnx"))
    (out,) = ort.InferenceSession(path).run(None, {"image": x.numpy()})
    with torch.no_grad():
        assert max_abs_difference(torch.as_tensor(out), wrapper(x)) < 1e-4
