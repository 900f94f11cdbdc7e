"""bundle/make_bundle.py: the Model Zoo archive and the zoo's CI checks re-implemented in ``make_bundle check``."""

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

import monai_ipear
from bundle.make_bundle import (
    BUNDLE_NAME,
    REPO,
    REQUIRED_FILES,
    _pretty_json,
    build,
    check_archive,
    check_requirements,
    zoo_requirements,
)

QUICK = ("workflows", "export")  # the negative cases below need neither
with open(os.path.join(REPO, "monai_ipear", "export.py"), encoding="utf-8") as _f:
    _EXPORT_LINES = len(_f.read().splitlines())


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save(monai_ipear.iPEAR(spatial_dims=3).state_dict(), root / "model.pt")  # random weights: a test only
    return root / "model.pt"


@pytest.fixture(scope="module")
def archive(weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("archive") / "bundle.zip"
    return build(model=str(weights), out=str(out), weights_url=weights.as_uri(), check=False)


def _rewrite(src, dst, name, edit):
    """Copy the archive ``src`` to ``dst`` with member ``name`` changed by ``edit`` (None: dropped)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == f"{BUNDLE_NAME}/{name}" or (name.endswith("/") and item.filename.startswith(
                    f"{BUNDLE_NAME}/{name}")):
                if edit is None:
                    continue
                data = edit(data)
            zout.writestr(item, data)
    return str(dst)


def test_archive_contents(archive, weights):
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
        yml = z.read(f"{BUNDLE_NAME}/large_files.yml").decode()
    assert {f"{BUNDLE_NAME}/{f}" for f in REQUIRED_FILES} <= names
    assert f"{BUNDLE_NAME}/configs/variants/iirp.json" in names
    # the package source travels in scripts/ (every module of the repository's package)
    package = {os.path.relpath(p, REPO).replace(os.sep, "/") for p in glob.glob(os.path.join(REPO, "monai_ipear", "**", "*.py"),
                                                                             recursive=True)}
    assert {f"{BUNDLE_NAME}/scripts/{p}" for p in package} <= names
    # the documents docs/README.md links to are in the archive
    assert {f"{BUNDLE_NAME}/docs/benchmarks.md", f"{BUNDLE_NAME}/docs/benchmarks/dice_boxplot.png"} <= names
    # with a url the weights are fetched through large_files.yml, not packed
    assert f"{BUNDLE_NAME}/models/model.pt" not in names
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert f'hash_val: "{sha}"' in yml and f'url: "{weights.as_uri()}"' in yml


def test_default_weights_are_the_packaged_model(tmp_path):
    """Without ``--model`` the archive's weights are the package's pretrained model, written as the bundle's state
    dict next to the archive (the file to upload): its hash is the one large_files.yml names, it is the same file on
    every build, and the bundle's network_def loaded from it gives the packaged network's field."""
    from monai.bundle import ConfigParser
    from monai_ipear.pretrained import load_pretrained, save_pretrained

    first = build(out=str(tmp_path / "a" / "bundle.zip"), weights_url="https://example.org/model.pt", check=False)
    second = build(out=str(tmp_path / "b" / "bundle.zip"), weights_url="https://example.org/model.pt", check=False)
    weights = tmp_path / "a" / "model.pt"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert sha == hashlib.sha256((tmp_path / "b" / "model.pt").read_bytes()).hexdigest()
    for archive in (first, second):
        with zipfile.ZipFile(archive) as z:
            assert f'hash_val: "{sha}"' in z.read(f"{BUNDLE_NAME}/large_files.yml").decode()
    parser = ConfigParser()
    parser.read_config(os.path.join(REPO, "configs", "inference.json"))
    bundle_net = parser.get_parsed_content("network_def").eval()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values() if torch.is_floating_point(v))
    bundle_net.load_state_dict(state)  # strict: every key of network_def
    packaged, _ = load_pretrained()
    torch.manual_seed(1)
    moving, fixed = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        expected = packaged(moving, fixed)
        got = bundle_net(torch.cat([moving, fixed], dim=1))
    assert expected.abs().max() > 0 and torch.equal(got, expected)
    # a state dict given as --model is packed as it is; a placeholder of the pretrained format is refused
    plain = tmp_path / "plain.pt"
    torch.save(state, plain)
    third = build(model=str(plain), out=str(tmp_path / "c" / "bundle.zip"), weights_url="https://example.org/m.pt",
                  check=False)
    assert not (tmp_path / "c" / "model.pt").exists()
    with zipfile.ZipFile(third) as z:
        assert hashlib.sha256(plain.read_bytes()).hexdigest() in z.read(f"{BUNDLE_NAME}/large_files.yml").decode()
    save_pretrained(monai_ipear.iPEAR(spatial_dims=3), str(tmp_path / "placeholder.pt"), {"spatial_dims": 3},
                    placeholder=True)
    with pytest.raises(SystemExit, match="placeholder"), pytest.warns(UserWarning, match="placeholder"):
        build(model=str(tmp_path / "placeholder.pt"), out=str(tmp_path / "d" / "bundle.zip"), check=False)


def test_archive_passes_every_zoo_check(archive, capsys):
    failures = check_archive(archive, resolve=False)
    out = capsys.readouterr().out
    assert failures == [], failures
    for check in ("required files", "pre-commit hooks", "README sections and links", "requirements (zoo pins)",
                  "large files: download and hash: models/model.pt (downloaded from file://",
                  "necessary and preferred files", "version and changelog", "metadata schema: meta_schema_20240725",
                  "verify_net_in_out (network_def)", "ckpt_export export_network_def (TorchScript tracing)",
                  "workflow inference", "workflow evaluate (infer", "workflow train",
                  "workflow evaluate layered on train (train properties, run)",
                  "self-contained code (monai_ipear from scripts/): monai_ipear imported from scripts/monai_ipear"):
        assert f"[ok] {check}" in out, check
    # the zoo's scripting export does not apply (stated; zoo: exclude_verify_torchscript_list), and says why
    assert "[n/a] ckpt_export network_def (TorchScript scripting): not supported" in out
    assert "archive check: passed" in out


def test_zoo_requirement_lines():
    with open(os.path.join(REPO, "configs", "metadata.json")) as f:
        meta = json.load(f)
    lines = zoo_requirements(meta)
    assert lines[0] == f"monai>={meta['monai_version']}rc1,<1.6.2" and f"torch=={meta['pytorch_version']}" in lines
    assert not any(ln.startswith(("monai-ipear", "monai_ipear")) for ln in lines)
    problems, _ = check_requirements({**meta, "required_packages_version": {"monai-ipear": "0.1.0"}}, resolve=False)
    assert problems and "bundle's own package" in problems[0]
    problems, _ = check_requirements({**meta, "required_packages_version": {"tensorboard": "2.*"}}, resolve=False)
    assert problems and "not an exact pin" in problems[0]


def _index_reachable() -> bool:
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "numpy"], capture_output=True,
                              text=True, timeout=60)
        return proc.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_requirements_install_on_python_310():
    if not _index_reachable():
        pytest.skip("the package index is not reachable: pip resolution of the zoo's pins not run")
    with open(os.path.join(REPO, "configs", "metadata.json")) as f:
        meta = json.load(f)
    problems, notes = check_requirements(meta, python=("3.10",))
    assert problems == [] and notes == ["Python 3.10: resolves"], problems
    # and the check is real: numpy 2.4 has no build for Python 3.10
    problems, _ = check_requirements({**meta, "numpy_version": "2.4.0"}, python=("3.10",))
    assert problems and problems[0].startswith("Python 3.10: the zoo's pins do not install")


def test_configs_are_formatted_as_the_zoo_wants():
    for path in glob.glob(os.path.join(REPO, "configs", "**", "*.json"), recursive=True):
        with open(path) as f:
            text = f.read()
        assert text == _pretty_json(text), f"{os.path.relpath(path, REPO)}: not JSON with indent 4 (zoo pre-commit)"


def test_archive_check_reports_problems(archive, tmp_path):
    def meta_edit(change):
        def edit(data):
            meta = json.loads(data)
            change(meta)
            return _pretty_json(json.dumps(meta)).encode()
        return edit

    cases = [
        ("large_files.yml", lambda d: b'large_files:\n  - path: "models/model.pt"\n    url: ""\n    hash_type: "sha256"\n',
         "large files: download and hash: ValueError: unknown url type"),
        ("configs/metadata.json", meta_edit(lambda m: m.pop("authors")), "metadata schema: ValueError: 'authors' is a required property"),
        ("configs/metadata.json", meta_edit(lambda m: m.update(version="9.9.9")), "version and changelog: version 9.9.9"),
        ("configs/metadata.json", meta_edit(lambda m: m["required_packages_version"].update({"monai-ipear": "0.1.0"})),
         "requirements (zoo pins): requirement 'monai-ipear==0.1.0' names the bundle's own package"),
        ("configs/export.json", lambda d: json.dumps(json.loads(d)).encode() + b"\n",
         "pre-commit hooks (JSON indent 4, YAML, whitespace, end of file, size, docstrings): configs/export.json: not formatted"),
        # an attribute "docstring" after a module-level assignment: the zoo's check-docstring-first hook rejects it
        ("scripts/monai_ipear/export.py", lambda d: d + b'X = 1\n"""what X is."""\n',
         "pre-commit hooks (JSON indent 4, YAML, whitespace, end of file, size, docstrings): "
         f"scripts/monai_ipear/export.py:{_EXPORT_LINES + 2}: second module docstring"),
        ("docs/README.md", lambda d: d.replace(b"## **Authors**", b"## Writers"),
         "README sections and links (TorchScript, TensorRT stated): docs/README.md lacks the 'Authors' section"),
        ("docs/README.md", lambda d: d.replace(b"TensorRT", b"TRT"),
         "README sections and links (TorchScript, TensorRT stated): docs/README.md does not state whether TensorRT "
         "export is supported"),
        ("configs/inference.json", lambda d: _pretty_json(json.dumps({**json.loads(d), "network_def": {
            "_target_": "iPEAR", "spatial_dims": "@spatial_dims"}})).encode(),  # the two-argument network
         "verify_net_in_out (network_def): TypeError"),  # forward() missing 1 required positional argument: 'fixed'
        ("scripts/monai_ipear/", None, "required files: missing scripts/monai_ipear/__init__.py"),
        # without the code, the installed package is not used (the zoo's CI has none): the network cannot be built
        ("scripts/monai_ipear/networks/", None, "verify_net_in_out (network_def)"),
    ]
    for i, (member, edit, expected) in enumerate(cases):
        bad = _rewrite(archive, tmp_path / f"{i}.zip", member, edit)
        failures = check_archive(bad, resolve=False, skip=QUICK)
        assert any(f.startswith(expected) for f in failures), (member, expected, failures)  # str or tuple of str
    # train.json run from another folder (the bundle root not on sys.path, no installed package): its expressions
    # use `monai_ipear`, which only the configs' `initialize` can import; without re-binding it there they fail
    drop = b'        "$import monai_ipear",\n'
    bad = _rewrite(archive, tmp_path / "init.zip", "configs/train.json", lambda d: d.replace(drop, b"", 1))
    failures = check_archive(bad, resolve=False, skip=("export", "inference", "evaluate", "evaluate_on_train"))
    workflow = [f for f in failures if f.startswith("workflow")]
    assert len(workflow) == 1 and workflow[0].startswith(
        "workflow train (train properties, run): RuntimeError: Failed to evaluate ConfigExpression: <- "
        "OptionalImportError: import monai_ipear (No module named 'monai_ipear'"), failures
    # the README case also reports the link that leaves the archive
    bad = _rewrite(archive, tmp_path / "readme.zip", "docs/README.md", lambda d: d + b"\nsee [code](../monai_ipear/cli.py)\n")
    failures = check_archive(bad, resolve=False, skip=QUICK)
    assert failures == ["README sections and links (TorchScript, TensorRT stated): docs/README.md: link '../monai_ipear/cli.py' points outside the "
                        "archive or to a missing file"], failures


# a stand-in for the Model Zoo's ci/unit_tests/utils.py, whose check_workflow the zoo's unit tests import: the same
# steps (initialize; check_properties must report nothing; run; finalize)
_ZOO_UTILS = '''
def check_workflow(workflow, check_properties=False):
    workflow.initialize()
    if check_properties:
        missing = workflow.check_properties()
        if missing:
            raise ValueError(f"check properties for workflow failed: {missing}")
    workflow.run()
    workflow.finalize()
'''


def test_zoo_unit_test_passes_in_a_model_zoo_layout(archive, weights, tmp_path):
    """bundle/zoo_ci/test_ipear_registration.py (the file a Model Zoo submission adds as ci/unit_tests/) passes in a
    zoo checkout's layout: the archive unpacked in models/ with its large file in place (the zoo's verify_bundle.py
    downloads it before the unit tests), run from the checkout's root, the installed monai_ipear hidden (the zoo's
    CI has none)."""
    zoo = tmp_path / "model-zoo"
    with zipfile.ZipFile(archive) as z:
        z.extractall(zoo / "models")
    (zoo / "models" / BUNDLE_NAME / "models").mkdir()
    shutil.copy(weights, zoo / "models" / BUNDLE_NAME / "models" / "model.pt")
    unit = zoo / "ci" / "unit_tests"
    unit.mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "bundle", "zoo_ci", f"test_{BUNDLE_NAME}.py"), unit)
    (unit / "utils.py").write_text(_ZOO_UTILS)
    code = (
        "import importlib.util, runpy, sys\n"
        f"spec = importlib.util.spec_from_file_location('zoo_checks', {os.path.join(REPO, 'bundle', 'zoo_checks.py')!r})\n"
        "checks = importlib.util.module_from_spec(spec); spec.loader.exec_module(checks)\n"
        f"sys.meta_path.insert(0, checks._BundledPackageOnly('models/{BUNDLE_NAME}/scripts'))\n"
        "sys.path.insert(0, 'ci/unit_tests'); sys.argv = ['test', '-v']\n"
        "try:\n"
        f"    runpy.run_path('ci/unit_tests/test_{BUNDLE_NAME}.py', run_name='__main__')\n"
        "finally:\n"
        "    print('monai_ipear from', sys.modules['monai_ipear'].__file__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=zoo, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Ran 3 tests" in proc.stderr and "\nOK\n" in proc.stderr, proc.stderr[-2000:]
    assert f"monai_ipear from {zoo / 'models' / BUNDLE_NAME / 'scripts' / 'monai_ipear'}" in proc.stdout, proc.stdout
