"""bundle/make_bundle.py: assemble the Model Zoo archive and check it (files, metadata, verify, fresh-process run)."""

import json
import zipfile

import pytest
import torch

import monai_ipear
from bundle.make_bundle import BUNDLE_NAME, REQUIRED_FILES, build, check_archive

FAST_INFERENCE = {"synthetic#spatial_size": 16, "synthetic#num_pairs": 1, "device": "$torch.device('cpu')"}


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    torch.manual_seed(0)
    torch.save(monai_ipear.iPEAR(spatial_dims=3).state_dict(), root / "model.pt")  # random weights: a test only
    return build(model=str(root / "model.pt"), out=str(root / "bundle.zip"), check=False)


def _rewrite(src, dst, name, edit):
    """Copy the archive ``src`` to ``dst`` with member ``name`` changed by ``edit`` (None: dropped)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == f"{BUNDLE_NAME}/{name}":
                if edit is None:
                    continue
                data = edit(data)
            zout.writestr(item, data)
    return dst


def test_archive_contents(archive):
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
        assert {f"{BUNDLE_NAME}/{f}" for f in REQUIRED_FILES} <= names
        assert f"{BUNDLE_NAME}/configs/variants/iirp.json" in names
        import hashlib

        sha = hashlib.sha256(z.read(f"{BUNDLE_NAME}/models/model.pt")).hexdigest()
        assert f'hash_val: "{sha}"' in z.read(f"{BUNDLE_NAME}/large_files.yml").decode()


def test_archive_check_passes_with_fresh_process_inference(archive, capsys):
    failures = check_archive(archive, inference_args=FAST_INFERENCE)
    out = capsys.readouterr().out
    assert failures == [], failures
    for line in ("[ok] required files", "[ok] metadata keys, version/changelog", "[ok] verify_net_in_out",
                 "[ok] inference in a fresh process"):
        assert line in out


def test_archive_check_reports_problems(archive, tmp_path):
    def bump_version(data):
        meta = json.loads(data)
        meta["version"] = "9.9.9"
        return json.dumps(meta).encode()

    def wrong_channels(data):
        meta = json.loads(data)
        meta["network_data_format"]["outputs"]["pred"]["num_channels"] = 2
        return json.dumps(meta).encode()

    bad = _rewrite(archive, tmp_path / "a.zip", "configs/metadata.json", bump_version)
    failures = check_archive(str(bad), run_inference=False)
    assert failures == ["metadata version '9.9.9' has no changelog entry"]
    bad = _rewrite(archive, tmp_path / "b.zip", "docs/README.md", None)
    assert check_archive(str(bad), run_inference=False) == ["missing docs/README.md"]
    bad = _rewrite(archive, tmp_path / "c.zip", "configs/metadata.json", wrong_channels)
    failures = check_archive(str(bad), run_inference=False)
    assert len(failures) == 1 and failures[0].startswith("verify_net_in_out failed: output channel number")
    # a broken inference config fails the fresh-process run
    bad = _rewrite(archive, tmp_path / "d.zip", "configs/inference.json",
                   lambda d: d.replace(b'"_target_": "iPEAR"', b'"_target_": "NoSuchNet"'))
    failures = check_archive(str(bad), inference_args=FAST_INFERENCE)
    assert any(f.startswith("verify_net_in_out failed") for f in failures)
    assert any(f.startswith("bundle inference exited with") for f in failures)
