"""The MONAI Model Zoo's CI checks that need the bundle's code, run on an unpacked bundle in a FRESH process.

Run by ``python -m bundle.make_bundle check`` as ``python -I bundle/zoo_checks.py --root <unpacked bundle> ...``
(``-I``: neither the current folder nor ``PYTHONPATH`` is on ``sys.path``). Like the zoo's ``ci/verify_bundle.py``
it puts the bundle root first on ``sys.path``; unlike this machine, the zoo's CI has no ``monai_ipear`` installed,
so an import hook hides any installed copy: the configs must find the package in the bundle's ``scripts/``.

Re-implemented (not copied) from Project-MONAI/model-zoo ``ci/``; each check names the zoo function it mirrors.
Prints one JSON object per check (``{"check", "status": "ok" | "fail" | "n/a", "detail"}``) on stdout.
"""

from __future__ import annotations

import argparse
import glob
import importlib.abc
import importlib.machinery
import json
import os
import shutil
import sys
import tempfile
import traceback
import warnings

RESULTS: list[dict] = []


def report(check: str, status: str, detail: str = "") -> None:
    RESULTS.append({"check": check, "status": status, "detail": detail})
    print(json.dumps(RESULTS[-1]), flush=True)


def _first_line(e: BaseException) -> str:
    """``Type: first line`` of ``e`` and of its root cause (MONAI's config errors wrap the real one)."""
    def line(x):
        text = str(x).strip().splitlines()
        return f"{type(x).__name__}: {text[0] if text else ''}".rstrip()

    root = e
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    return line(e) if root is e else f"{line(e)} <- {line(root)}"


class _BundledPackageOnly(importlib.abc.MetaPathFinder):
    """``import monai_ipear`` (and every ``monai_ipear.*`` module) finds only the copy in ``<root>/scripts`` (the zoo's
    CI has no installed one), and only once ``<root>/scripts`` is on ``sys.path`` (``import scripts`` puts it there),
    as without an installed copy.

    Submodules need the hook too: a module missing from the bundle's copy would otherwise fall through to later
    finders, e.g. setuptools' editable-install finder, which maps every ``monai_ipear.*`` name to the source tree."""

    def __init__(self, scripts_dir: str) -> None:
        self.scripts_dir = os.path.abspath(scripts_dir)

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "monai_ipear" and not fullname.startswith("monai_ipear."):
            return None
        spec = None
        if fullname == "monai_ipear":
            if any(os.path.abspath(p or os.getcwd()) == self.scripts_dir for p in sys.path):
                spec = importlib.machinery.PathFinder.find_spec(fullname, [self.scripts_dir])
        elif path is not None and all(os.path.abspath(p).startswith(self.scripts_dir + os.sep) for p in path):
            spec = importlib.machinery.PathFinder.find_spec(fullname, list(path))
        if spec is None:
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: the installed package is hidden (the Model Zoo's CI does not have "
                f"it) and the bundle's copy ({self.scripts_dir}/monai_ipear) is not on sys.path (or lacks it).",
                name=fullname)
        return spec


def check_large_files(root: str) -> None:
    """zoo: ``ci/utils.py`` ``download_large_files`` (called first by ``verify_bundle_directory``)."""
    from monai.apps.utils import download_url
    from monai.bundle import ConfigParser

    names = [n for n in ("large_files.yml", "large_files.yaml", "large_files.json") if os.path.isfile(os.path.join(root, n))]
    if not names:
        report("large files: download and hash", "n/a", "no large_files.yml")
        return
    try:
        parser = ConfigParser()
        parser.read_config(os.path.join(root, names[0]))
        done = []
        for item in parser.get()["large_files"]:
            item = dict(item)
            target = os.path.join(root, item.pop("path"))
            existed = os.path.isfile(target)
            if item.get("hash_val", "") == "":
                item.pop("hash_val", None)
            if item.get("hash_type", "") == "":
                item.pop("hash_type", None)
            download_url(filepath=target, fuzzy=True, progress=False, **item)
            done.append(f"{os.path.relpath(target, root)} ({'present, hash verified' if existed else 'downloaded'} "
                        f"from {item.get('url')}, {item.get('hash_type', 'no')} hash)")
        report("large files: download and hash", "ok", "; ".join(done))
    except Exception as e:
        report("large files: download and hash", "fail", _first_line(e))


def check_directory(root: str) -> None:
    """zoo: ``verify_bundle.py`` ``verify_bundle_directory`` (necessary and preferred files)."""
    missing = [f for f in ("configs/metadata.json", "LICENSE", "models/model.pt") if not os.path.isfile(os.path.join(root, f))]
    if not any(os.path.isfile(os.path.join(root, "configs", f"inference.{e}")) for e in ("json", "yaml", "yml")):
        missing.append("configs/inference.json")
    report("necessary and preferred files", "fail" if missing else "ok", f"missing {missing}" if missing else "")


def check_version(root: str) -> None:
    """zoo: ``verify_bundle.py`` ``verify_version_changes`` (the zoo's model_info.json registry is not available)."""
    with open(os.path.join(root, "configs", "metadata.json")) as f:
        meta = json.load(f)
    problems = [f"'{k}' is missing" for k in ("version", "changelog") if k not in meta]
    if not problems and meta["version"] not in meta["changelog"]:
        problems.append(f"version {meta['version']} is missing in 'changelog'")
    report("version and changelog", "fail" if problems else "ok", "; ".join(problems))


def check_metadata_schema(root: str, schema: str) -> None:
    """zoo: ``prepare_schema.py`` (schema copied to ``eval/schema.json``) + ``verify_metadata_format``."""
    from monai.bundle import verify_metadata

    meta_file = os.path.join(root, "configs", "metadata.json")
    with open(meta_file) as f:
        url = json.load(f).get("schema", "")
    if os.path.basename(url) != os.path.basename(schema):
        report("metadata schema", "fail", f"metadata.json names {os.path.basename(url)!r}, the shipped schema is "
                                          f"{os.path.basename(schema)!r}")
        return
    target = os.path.join(root, "eval", "schema.json")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copyfile(schema, target)
    try:
        verify_metadata(meta_file=meta_file, filepath=target)  # the file exists: no download, jsonschema.validate
        report("metadata schema", "ok", f"{os.path.basename(url)} (jsonschema)")
    except Exception as e:
        report("metadata schema", "fail", _first_line(e))


def check_net_in_out(root: str) -> None:
    """zoo: ``verify_bundle.py`` ``verify_data_shape`` -> ``monai.bundle.verify_net_in_out`` on ``network_def``."""
    from monai.bundle import verify_net_in_out

    try:
        verify_net_in_out(net_id="network_def", meta_file=os.path.join(root, "configs", "metadata.json"),
                          config_file=os.path.join(root, "configs", "inference.json"), bundle_root=root, device="cpu")
        report("verify_net_in_out (network_def)", "ok", "one (1, 2, *spatial) tensor in, (1, 3, *spatial) field out")
    except Exception as e:
        report("verify_net_in_out (network_def)", "fail", _first_line(e))


def check_ckpt_export(root: str) -> None:
    """zoo: ``verify_bundle.py`` ``verify_torchscript`` -> ``monai.bundle.ckpt_export``.

    The zoo calls it on ``network_def`` in scripting mode unless the bundle is on its
    ``exclude_verify_torchscript_list`` (as mednist_reg, vista2d, vista3d are). TCI's data-dependent loop cannot be
    scripted, so this bundle belongs on that list: the scripting attempt is reported as ``n/a`` with its error.
    The supported TorchScript path is tracing the fixed-iteration ``export_network_def``; it must pass, load with
    ``torch.jit.load`` and agree with the eager network.
    """
    import torch
    from monai.bundle import ConfigParser, ckpt_export

    cfg = os.path.join(root, "configs")
    common = {"meta_file": os.path.join(cfg, "metadata.json"), "bundle_root": root,
              "ckpt_file": os.path.join(root, "models", "model.pt")}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt_export(net_id="network_def", filepath=os.path.join(root, "models", "verify_model.ts"),
                        config_file=os.path.join(cfg, "inference.json"), **common)
        report("ckpt_export network_def (TorchScript scripting)", "ok")
    except Exception as e:
        report("ckpt_export network_def (TorchScript scripting)", "n/a",
               f"not supported, stated in docs/README.md (zoo: exclude_verify_torchscript_list): {_first_line(e)}")
    try:
        configs = [os.path.join(cfg, "inference.json"), os.path.join(cfg, "export.json")]
        ts = os.path.join(root, "models", "verify_model_trace.ts")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt_export(net_id="export_network_def", filepath=ts, config_file=configs, use_trace=True, **common)
        loaded = torch.jit.load(ts)
        parser = ConfigParser()
        parser.read_config(configs)
        parser.read_meta(common["meta_file"])
        parser["bundle_root"] = root
        net = parser.get_parsed_content("export_network_def")
        net.load_state_dict(torch.load(common["ckpt_file"], map_location="cpu", weights_only=True))
        net.eval()
        shape = [1, 2] + [16] * 3
        torch.manual_seed(0)
        x = torch.rand(shape)
        with torch.no_grad():
            diff = float((loaded(x) - net(x)).abs().max())
        status = "ok" if diff < 1e-4 else "fail"
        report("ckpt_export export_network_def (TorchScript tracing)", status,
               f"torch.jit.load ok; max |traced - eager| = {diff:.3g} on {tuple(shape)}")
    except Exception as e:
        report("ckpt_export export_network_def (TorchScript tracing)", "fail", _first_line(e))


# the config IDs the zoo's unit tests (ci/unit_tests/test_*.py) override or use; they must exist
ZOO_TRAIN_IDS = ("train#dataset#data", "validate#dataset#data", "train#inferer", "validate#inferer", "train#handlers",
                 "validate#handlers", "train#trainer#max_epochs", "train#dataloader#num_workers",
                 "validate#dataloader#num_workers")
ZOO_INFER_IDS = ("dataset#data", "handlers#0#_disabled_", "inferer", "dataset_dir", "datalist")


def _workflow(root: str, workflow_type: str, config, overrides: dict, outputs, name: str) -> None:
    """zoo: ``ci/unit_tests/utils.py`` ``check_workflow`` (initialize, check_properties, run, finalize) on a
    ``ConfigWorkflow`` as the zoo's unit tests build it; ``outputs(tmp)`` returns the problems with what it wrote."""
    from monai.bundle import ConfigWorkflow

    with tempfile.TemporaryDirectory() as tmp:
        try:
            args = {k: (v.replace("{tmp}", tmp) if isinstance(v, str) else v) for k, v in overrides.items()}
            files = [os.path.join(root, "configs", c) for c in ([config] if isinstance(config, str) else config)]
            wf = ConfigWorkflow(workflow_type=workflow_type, config_file=files if len(files) > 1 else files[0],
                                logging_file=os.path.join(root, "configs", "logging.conf"),
                                meta_file=os.path.join(root, "configs", "metadata.json"), bundle_root=root, **args)
            ids = ZOO_TRAIN_IDS if workflow_type == "train" else ZOO_INFER_IDS
            absent = [i for i in ids if i.split("#_disabled_")[0] not in wf.parser]
            wf.initialize()
            missing = wf.check_properties()
            if missing or absent:
                report(name, "fail", f"missing or wrong properties {missing or []}; absent config IDs {absent}")
                return
            wf.run()
            wf.finalize()
            problems = outputs(tmp)
            report(name, "fail" if problems else "ok", "; ".join(problems) if problems else
                   f"properties of {workflow_type!r} complete, zoo IDs present, ran")
        except Exception as e:
            report(name, "fail", _first_line(e))


def check_workflows(root: str, skip=()) -> None:
    """The zoo unit tests' workflow runs; ``skip``: any of ``train``, ``inference``, ``evaluate``,
    ``evaluate_on_train`` (for quick tests)."""
    tiny = {"synthetic#spatial_size": 16, "synthetic#num_labels": 2, "device": "$torch.device('cpu')"}

    def infer_outputs(tmp):
        written = os.listdir(tmp)
        need = ("_warped.nii.gz", "_ddf.nii.gz", "_ddf_itk.nii.gz")
        problems = [f"no *{s}" for s in need if not any(n.endswith(s) for n in written)]
        return problems + ([] if "iterations.csv" in written else ["no iterations.csv"])

    # the zoo unit tests' order (test_order: train, evaluate, inference); the first one imports the bundle's code
    evaluate = {**tiny, "synthetic#num_pairs": 1, "output_dir": "{tmp}", "surface_metrics": False}
    metrics = lambda tmp: [] if os.path.isfile(os.path.join(tmp, "metrics.csv")) else ["no metrics.csv"]  # noqa: E731
    runs = [
        ("train", "train", "train.json", {**tiny, "num_train_pairs": 2, "num_val_pairs": 1, "max_epochs": 1,
                                          "ckpt_dir": "{tmp}", "output_dir": "{tmp}/runs"},
         lambda tmp: [] if glob.glob(os.path.join(tmp, "model*.pt")) else ["no checkpoint written"],
         "workflow train (train properties, run)"),
        ("inference", "infer", "inference.json", {**tiny, "synthetic#num_pairs": 1, "output_dir": "{tmp}"},
         infer_outputs, "workflow inference (infer properties, run)"),
        ("evaluate", "infer", "evaluate.json", evaluate, metrics, "workflow evaluate (infer properties, run)"),
        # the zoo's unit tests (e.g. test_spleen_ct_segmentation.py) also run evaluate.json layered on train.json as
        # a "train" workflow: train.json's expressions must still resolve with evaluate.json's imports / initialize
        ("evaluate_on_train", "train", ["train.json", "evaluate.json"], evaluate, metrics,
         "workflow evaluate layered on train (train properties, run)"),
    ]
    for key, workflow_type, config, overrides, outputs, name in runs:
        if key not in skip:
            _workflow(root, workflow_type, config, overrides, outputs, name)


def check_self_contained(root: str) -> None:
    mod = sys.modules.get("monai_ipear")
    where = os.path.abspath(str(getattr(mod, "__file__", ""))) if mod else ""
    inside = bool(where) and where.startswith(os.path.join(os.path.abspath(root), "scripts") + os.sep)
    report("self-contained code (monai_ipear from scripts/)", "ok" if inside else "fail",
           f"monai_ipear imported from {os.path.relpath(where, root) if where else 'nowhere'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="unpacked bundle folder")
    ap.add_argument("--schema", required=True, help="metadata JSON schema file")
    ap.add_argument("--skip", nargs="*", default=[], help="checks to skip: workflows (all of them) or train, inference, evaluate, "
                                                         "evaluate_on_train; export")
    args = ap.parse_args(argv)
    root = os.path.abspath(args.root)
    sys.meta_path.insert(0, _BundledPackageOnly(os.path.join(root, "scripts")))
    warnings.filterwarnings("ignore")
    try:
        check_large_files(root)
        if "workflows" not in args.skip:
            # first, while neither the bundle root nor the working folder is on ``sys.path`` and nothing imported the
            # bundle's code: as ``python -m monai.bundle run ... --bundle_root <root>`` started in another folder.
            # The configs' ``initialize`` must find ``scripts/`` themselves (the zoo's unit tests put the root on
            # ``sys.path`` first; that case is the one of every check below).
            check_workflows(root, skip=args.skip)
        os.chdir(root)
        sys.path.insert(0, root)  # as ci/verify_bundle.py does
        check_directory(root)
        check_version(root)
        check_metadata_schema(root, os.path.abspath(args.schema))
        check_net_in_out(root)
        if "export" not in args.skip:
            check_ckpt_export(root)
        check_self_contained(root)
    except Exception as e:  # a crash of the checker itself is a failure too
        report("zoo checks", "fail", _first_line(e) + " | " + traceback.format_exc().strip().splitlines()[-1])
    return 1 if any(r["status"] == "fail" for r in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main())
