"""Assemble the MONAI Model Zoo bundle archive from this repository, and check an archive.

Usage (from the repository root)::

    python -m bundle.make_bundle build --model models/model.pt --out dist/ipear_registration.zip
    python -m bundle.make_bundle check dist/ipear_registration.zip

``build`` zips ``configs/`` (JSON configs, ``logging.conf``, ``variants/``), ``docs/README.md``, ``LICENSE``,
``large_files.yml`` (with the SHA-256 of the model) and ``models/model.pt`` (the TRAINED weights given with
``--model``: a real release needs the weights of a real training run) under one top folder, then checks it
(``--no-check`` skips that). ``check`` unpacks an archive in a temporary folder and verifies:

1. required files are present;
2. ``metadata.json`` has the Model Zoo keys, its ``version`` is the newest ``changelog`` entry, and the
   ``monai-ipear`` version it requires is the installed package's;
3. ``verify_net_in_out`` passes for ``export_network_def`` (the one-tensor network, configs/export.json);
4. the bundle's ``inference`` runs through ``python -I -m monai.bundle run`` in a fresh process whose working
   directory is the unpacked folder (``-I``: no current directory or PYTHONPATH on ``sys.path``, so only the
   installed ``monai_ipear`` package is used), and writes the warped image, the field and ``iterations.csv``.

Exit code 0 when every check passes, 1 otherwise (one line per failed check on stderr).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile

import fire

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE_NAME = "ipear_registration"
REQUIRED_FILES = (
    "configs/metadata.json",
    "configs/train.json",
    "configs/inference.json",
    "configs/evaluate.json",
    "configs/multi_gpu_train.json",
    "configs/export.json",
    "configs/logging.conf",
    "docs/README.md",
    "LICENSE",
    "large_files.yml",
    "models/model.pt",
)
METADATA_KEYS = (
    "schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
    "required_packages_version", "name", "task", "description", "authors", "copyright", "data_source",
    "data_type", "intended_use", "references", "network_data_format",
)


def _version_key(v: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in str(v).replace("-", ".").split("."))


def _large_files_yml(sha256: str) -> str:
    return (
        "large_files:\n"
        '  - path: "models/model.pt"\n'
        '    url: ""  # fill in the download address of the released weights\n'
        f'    hash_val: "{sha256}"\n'
        '    hash_type: "sha256"\n'
    )


def build(model: str | None = None, out: str = "dist/ipear_registration.zip", check: bool = True,
          inference_args: dict | None = None) -> str:
    """Assemble the archive ``out`` from the repository with the weights ``model``; then ``check`` it."""
    if model is None or not os.path.isfile(str(model)):
        raise SystemExit(f"error: --model must name the trained weights file (got {model!r}).")
    with open(model, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    files = {}
    for root, _, names in os.walk(os.path.join(REPO, "configs")):
        for n in sorted(names):
            if n.endswith((".json", ".conf", ".yaml")):
                path = os.path.join(root, n)
                files[os.path.relpath(path, REPO)] = path
    files["docs/README.md"] = os.path.join(REPO, "docs", "README.md")
    files["LICENSE"] = os.path.join(REPO, "LICENSE")
    files["models/model.pt"] = str(model)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for arc, path in sorted(files.items()):
            z.write(path, f"{BUNDLE_NAME}/{arc}")
        z.writestr(f"{BUNDLE_NAME}/large_files.yml", _large_files_yml(sha))
    print(f"wrote {out} ({len(files) + 1} files, model sha256 {sha[:12]}...)")
    if check:
        failures = check_archive(out, inference_args=inference_args)
        if failures:
            raise SystemExit(1)
    return out


def _check_metadata(meta: dict) -> list[str]:
    import monai_ipear

    problems = [f"metadata.json lacks '{k}'" for k in METADATA_KEYS if k not in meta]
    version, changelog = meta.get("version"), meta.get("changelog", {})
    if version not in changelog:
        problems.append(f"metadata version {version!r} has no changelog entry")
    elif changelog and max(changelog, key=_version_key) != version:
        problems.append(f"metadata version {version!r} is not the newest changelog entry ({max(changelog, key=_version_key)})")
    required = meta.get("required_packages_version", {}).get("monai-ipear")
    if required != monai_ipear.__version__:
        problems.append(f"metadata requires monai-ipear {required!r} but {monai_ipear.__version__} is installed")
    fmt = meta.get("network_data_format", {})
    if "image" not in fmt.get("inputs", {}) or "pred" not in fmt.get("outputs", {}):
        problems.append("network_data_format needs inputs.image and outputs.pred (verify_net_in_out)")
    return problems


def check_archive(archive: str, inference_args: dict | None = None, run_inference: bool = True,
                  timeout: int = 600) -> list[str]:
    """Check an archive (see the module docstring); prints one line per check, returns the failures."""
    failures: list[str] = []

    def report(name: str, problems: list[str]) -> None:
        print(f"[{'ok' if not problems else 'FAIL'}] {name}")
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        failures.extend(problems)

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
        tops = [d for d in os.listdir(tmp) if os.path.isdir(os.path.join(tmp, d))]
        root = os.path.join(tmp, tops[0]) if len(tops) == 1 else tmp
        missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(root, f))]
        report("required files", [f"missing {f}" for f in missing])
        if missing:
            return failures
        try:
            with open(os.path.join(root, "configs", "metadata.json")) as f:
                meta = json.load(f)
            report("metadata keys, version/changelog", _check_metadata(meta))
        except (OSError, ValueError) as e:
            report("metadata keys, version/changelog", [f"metadata.json unreadable: {e}"])
        cfg = os.path.join(root, "configs")
        try:
            from monai.bundle import verify_net_in_out

            verify_net_in_out(net_id="export_network_def", meta_file=os.path.join(cfg, "metadata.json"),
                              config_file=[os.path.join(cfg, "inference.json"), os.path.join(cfg, "export.json")],
                              device="cpu")
            report("verify_net_in_out", [])
        except Exception as e:  # report, do not stop the other checks
            report("verify_net_in_out", [f"verify_net_in_out failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"])
        if run_inference:
            out_dir = os.path.join(root, "outputs")
            cmd = [sys.executable, "-I", "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                   "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
                   "--bundle_root", "."]
            for k, v in (inference_args or {}).items():
                cmd += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
            proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
            problems = []
            if proc.returncode != 0:
                tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["(no stderr)"]
                problems.append(f"bundle inference exited with {proc.returncode}: {tail[0]}")
            else:
                written = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
                if "iterations.csv" not in written or not any(n.endswith("_ddf.nii.gz") for n in written) \
                        or not any(n.endswith("_warped.nii.gz") for n in written):
                    problems.append(f"bundle inference wrote {written}, expected warped, ddf and iterations.csv")
            report("inference in a fresh process (python -I -m monai.bundle run)", problems)
    print("archive check: " + ("passed" if not failures else f"{len(failures)} problem(s)"))
    return failures


def check(archive: str, inference_args: dict | None = None, run_inference: bool = True) -> None:
    """Check an archive; exit code 1 when a check fails."""
    if not os.path.isfile(str(archive)):
        raise SystemExit(f"error: archive not found: {archive}")
    if check_archive(str(archive), inference_args=inference_args, run_inference=run_inference):
        raise SystemExit(1)


if __name__ == "__main__":
    fire.Fire({"build": build, "check": check})
