"""Short bundle training of each variant config on the bundle's synthetic pairs, scored against no registration.

    python -m monai_ipear.studies.variants --variants ipear sacbnet ran smgicnet iirp \\
        --spatial_dims 2 --spatial_size 64 --steps 1000 --threads 1 --out docs/variants/synthetic_2d.json

For each variant, through ``monai.bundle`` (nothing here trains or scores by itself):

1. the training workflow of ``configs/train.json`` merged with ``configs/variants/<name>.json`` (``ipear``:
   ``train.json`` alone, the package default) with the overrides ``bundle_root`` (``<work_dir>/<name>``),
   ``device`` cpu, ``spatial_dims``, ``synthetic#spatial_size``, ``num_train_pairs``, ``num_val_pairs``,
   ``max_epochs`` and ``epoch_length`` (``steps`` optimiser updates, batch 1, split over ``epochs`` epochs so the
   per-epoch LR schedules of the configs run as written) and ``val_interval`` = the number of epochs (one
   validation, at the end). A variant with a level-wise schedule (``stage_epochs``, SM-GICNet: 4/4/6/6) keeps its
   number of epochs and gets ``steps // sum(stage_epochs)`` iterations per epoch, so the run covers every level
   in its paper's proportions. Everything else (network, loss and weights, optimiser, learning rate, schedule) is
   the variant config's;
2. the evaluation workflow of ``configs/evaluate.json`` merged with the same variant file, loading the run's
   ``models/model_final.pt``, on the synthetic validation pairs (the ones the training validated on: same
   generator settings, seeds 100000...), surface metrics off; its per-pair rows (``eval/metrics.csv``) give the
   Dice (mean over the labels present in both maps, background excluded) and folding;
3. the identity baseline: the same Dice (:func:`~monai_ipear.metrics.pair_registration_metrics`) of the
   unregistered moving label maps of those pairs.

The trainer's own final validation (MONAI ``MeanDice`` of the warped and of the unregistered moving labels, the
bundle's ``val_mean_dice`` / ``val_identity_dice``) is recorded next to it as a cross-check. Writes a JSON file
of the results and a Markdown table beside it (``.md``), and prints the table; ``--table JSON`` only re-renders
the table of an earlier run. ``--override KEY=VALUE`` adds training overrides for every variant (e.g. ``lr=0.001``):
a departure from the recipes, shown next to the variant's name in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

import torch

__all__ = ["DEFAULT_VARIANTS", "bundle_config_dir", "variant_config_files", "run_variant", "run_variants_study",
           "format_variants_table", "variants_main"]

DEFAULT_VARIANTS = ("ipear", "sacbnet", "ran", "smgicnet", "iirp")


def bundle_config_dir(bundle: str | None = None) -> str:
    """The ``configs`` folder of ``bundle`` (default: the repository holding this package, else the current folder)."""
    if bundle is None:
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        bundle = repo if os.path.isfile(os.path.join(repo, "configs", "train.json")) else os.getcwd()
    configs = os.path.join(bundle, "configs")
    if not os.path.isfile(os.path.join(configs, "train.json")):
        raise FileNotFoundError(f"{bundle} is not the bundle root: no configs/train.json (use --bundle).")
    return configs


def variant_config_files(configs: str, name: str, workflow: str = "train") -> list[str]:
    """``[configs/<workflow>.json, configs/variants/<name>.json]``; ``ipear``: the workflow config alone."""
    files = [os.path.join(configs, f"{workflow}.json")]
    if name != "ipear":
        variant = os.path.join(configs, "variants", f"{name}.json")
        if not os.path.isfile(variant):
            raise FileNotFoundError(f"no variant config {variant}.")
        files.append(variant)
    return files


def _workflow(files: list[str], configs: str, **override):
    from monai.bundle import create_workflow

    return create_workflow(config_file=files, meta_file=os.path.join(configs, "metadata.json"),
                           logging_file=os.path.join(configs, "logging.conf"), **override)


def _load_average() -> float:
    """The 1-minute load average (NaN where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _identity_dice(dataset) -> list[float]:
    """Mean Dice per pair of the unregistered moving labels (zero field), the evaluation's Dice definition."""
    from ..metrics import pair_registration_metrics

    out = []
    for item in dataset:
        moving, fixed = item["moving_label"][None].as_tensor(), item["fixed_label"][None].as_tensor()
        zero = torch.zeros(1, moving.ndim - 2, *moving.shape[2:])
        out.append(pair_registration_metrics(zero, warped_label=moving, fixed_label=fixed, surface=False)["dice_mean"])
    return out


def run_variant(
    name: str,
    work_dir: str,
    configs: str | None = None,
    spatial_dims: int = 2,
    spatial_size: int = 64,
    steps: int = 1000,
    epochs: int = 2,
    num_train_pairs: int = 40,
    num_val_pairs: int = 8,
    override: dict | None = None,
    log=print,
) -> dict:
    """Train ``name`` for ``steps`` updates on the synthetic pairs, evaluate it, and score no registration.

    Returns a dict: ``variant``, ``config_files``, ``parameters``, ``steps`` (updates run), ``epochs``,
    ``epoch_length``, ``stages`` (level-wise variants: stage epochs and the stage reached), ``identity_dice`` and
    ``trained_dice`` (mean over validation pairs, in [0, 1]) with per-pair lists, ``folding_pct``,
    ``val_mean_dice`` / ``val_identity_dice`` (the trainer's validation), ``final_loss``, ``train_s`` (wall clock, with the
    workflow's set-up and final validation), ``train_cpu_s`` (CPU time of this process over it: with one thread, about
    the wall time on an idle machine), ``load_average`` (1-minute, before and after training), ``eval_s``.
    ``override``: more training-workflow overrides (e.g. ``{"lr": 1e-3}``), recorded in the result; they depart
    from the variant's recipe.
    """
    from monai.bundle import ConfigParser

    configs = configs or bundle_config_dir()
    root = os.path.join(work_dir, name)
    if os.path.exists(root):
        shutil.rmtree(root)  # a fresh run: the bundle would otherwise refuse or resume
    os.makedirs(root)
    files = variant_config_files(configs, name, "train")
    merged = ConfigParser()
    merged.read_config(files)
    stage_epochs = (override or {}).get("stage_epochs", merged.get("stage_epochs"))
    n_epochs = int(sum(stage_epochs)) if stage_epochs else int(epochs)
    epoch_length = max(1, int(steps) // n_epochs)
    common = {"bundle_root": root, "device": "$torch.device('cpu')", "spatial_dims": int(spatial_dims),
              "synthetic#spatial_size": int(spatial_size)}
    train_override = dict(common, num_train_pairs=int(num_train_pairs), num_val_pairs=int(num_val_pairs),
                          epoch_length=epoch_length, val_interval=n_epochs)
    if not stage_epochs:
        train_override["max_epochs"] = n_epochs
    train_override.update(override or {})
    log(f"[{name}] training: {n_epochs} epochs x {epoch_length} iterations, {spatial_dims}D size {spatial_size}")
    load_before = _load_average()
    start, cpu_start = time.perf_counter(), time.process_time()
    wf = _workflow(files, configs, **train_override)
    wf.run()
    train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    trainer = wf.parser.get_parsed_content("train#trainer")
    metrics = dict(wf.parser.get_parsed_content("validate#evaluator").state.metrics)
    network = wf.parser.get_parsed_content("network")
    stages = None
    if stage_epochs:
        stages = {"stage_epochs": [int(e) for e in stage_epochs],
                  "final_stage": int(wf.parser.get_parsed_content("levelwise").stage),
                  "active_levels": int(getattr(network, "active_levels", -1))}
    result = {
        "variant": name,
        "config_files": [os.path.relpath(f, os.path.dirname(configs)) for f in files],
        "parameters": int(sum(p.numel() for p in network.parameters())),
        "steps": int(trainer.state.iteration),
        "epochs": int(trainer.state.epoch),
        "epoch_length": epoch_length,
        "stages": stages,
        "override": dict(override or {}),
        "lr": float(wf.parser.get_parsed_content("lr")),
        "final_loss": float(trainer.state.output["loss"]) if trainer.state.output else float("nan"),
        "val_mean_dice": float(metrics.get("val_mean_dice", float("nan"))),
        "val_identity_dice": float(metrics.get("val_identity_dice", float("nan"))),
        "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "load_average": [load_before, _load_average()],
    }
    # the evaluation scores exactly the pairs the training validated on: same generator settings and seeds
    same_pairs = {f"synthetic#{k}": v for k, v in wf.parser.get_parsed_content("synthetic").items()}
    same_pairs.update({"synthetic#num_pairs": len(wf.parser.get_parsed_content("validate#dataset")),
                       "synthetic#seed": wf.parser.get_parsed_content("validate#synthetic_dataset").seeds[0]})
    wf.finalize()

    start = time.perf_counter()
    ev = _workflow(variant_config_files(configs, name, "evaluate"), configs, **dict(common, **same_pairs),
                   ckpt_path=os.path.join(root, "models", "model_final.pt"), output_dir=os.path.join(root, "eval"),
                   surface_metrics=False)
    ev.run()
    ev.finalize()
    result["eval_s"] = time.perf_counter() - start
    rows = ev.parser.get_parsed_content("metrics_writer").rows
    result["trained_dice_per_pair"] = [float(r["dice_mean"]) for r in rows]
    result["identity_dice_per_pair"] = [float(v) for v in _identity_dice(ev.parser.get_parsed_content("synthetic_dataset"))]
    result["trained_dice"] = sum(result["trained_dice_per_pair"]) / len(rows)
    result["identity_dice"] = sum(result["identity_dice_per_pair"]) / len(rows)
    result["folding_pct"] = sum(float(r["folding_pct"]) for r in rows) / len(rows)
    log(f"[{name}] Dice identity {result['identity_dice']:.4f} -> trained {result['trained_dice']:.4f} "
        f"({result['steps']} steps, training {train_s:.0f} s wall, {train_cpu_s:.0f} s CPU)")
    return result


def run_variants_study(variants: Sequence[str] = DEFAULT_VARIANTS, work_dir: str | None = None, log=print,
                       **kwargs) -> dict:
    """:func:`run_variant` for each name; ``{"settings": ..., "machine": ..., "results": [...]}``.

    ``work_dir`` (default: a temporary folder, removed afterwards) holds one bundle root per variant."""
    keep = work_dir is not None
    work_dir = work_dir or tempfile.mkdtemp(prefix="variants_")
    try:
        results = [run_variant(name, work_dir, log=log, **kwargs) for name in variants]
    finally:
        if not keep:
            shutil.rmtree(work_dir, ignore_errors=True)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
               f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    return {"settings": {"variants": list(variants), **kwargs}, "machine": machine, "results": results}


def format_variants_table(study: dict) -> str:
    """Markdown table of :func:`run_variants_study`'s output (Dice in %, mean over the validation pairs; "pairs
    better": validation pairs whose Dice after registration exceeds their identity Dice)."""
    lines = [
        "| variant | parameters | steps (epochs x iterations) | lr | Dice identity | Dice trained | gain "
        "| pairs better | folding % | trainer validation, identity / trained | training wall (CPU) s | evaluation s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in study["results"]:
        schedule = f"{r['steps']} ({r['epochs']} x {r['epoch_length']})"
        if r.get("stages"):
            schedule += f", stages {'/'.join(map(str, r['stages']['stage_epochs']))} epochs, " \
                        f"{r['stages']['active_levels']} levels active at the end"
        pairs = list(zip(r["trained_dice_per_pair"], r["identity_dice_per_pair"]))
        better = sum(t > i for t, i in pairs)
        name = r["variant"] + (" (" + ", ".join(f"{k}={v}" for k, v in r["override"].items()) + ")" if r.get("override") else "")
        lines.append(
            f"| {name} | {r['parameters']:,} | {schedule} | {r['lr']:g} | {100 * r['identity_dice']:.1f} "
            f"| {100 * r['trained_dice']:.1f} | {100 * (r['trained_dice'] - r['identity_dice']):+.1f} "
            f"| {better}/{len(pairs)} | {r['folding_pct']:.3f} | {100 * r['val_identity_dice']:.1f} / {100 * r['val_mean_dice']:.1f} "
            f"| {r['train_s']:.0f} ({r['train_cpu_s']:.0f}) | {r['eval_s']:.0f} |"
        )
    s = study["settings"]
    loads = [v for r in study["results"] for v in r.get("load_average", []) if v == v]
    load = f"; 1-minute load average {min(loads):.1f}-{max(loads):.1f} around the trainings" if loads else ""
    lines += ["", f"{s.get('spatial_dims', 2)}D synthetic pairs of size {s.get('spatial_size', 64)}, "
              f"{s.get('num_train_pairs', 40)} training and {s.get('num_val_pairs', 8)} validation pairs; "
              f"{study['machine']}{load}."]
    return "\n".join(lines)


def _parse_overrides(items: Sequence[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--override takes KEY=VALUE, got {item!r}.")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a plain string (e.g. a "$..." expression)
    return out


def variants_main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m monai_ipear.studies.variants", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                   help="names of configs/variants/*.json; 'ipear' = configs/train.json alone")
    p.add_argument("--spatial_dims", type=int, default=2, choices=(2, 3))
    p.add_argument("--spatial_size", type=int, default=64, help="synthetic image size per axis (voxels)")
    p.add_argument("--steps", type=int, default=1000, help="optimiser updates per variant (batch 1)")
    p.add_argument("--epochs", type=int, default=2,
                   help="epochs the steps are split over (train.json's default 2); level-wise variants keep theirs")
    p.add_argument("--num_train_pairs", type=int, default=40)
    p.add_argument("--num_val_pairs", type=int, default=8)
    p.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra training overrides for every variant (JSON values), e.g. lr=0.001: not the recipes")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--bundle", default=None, help="bundle root with configs/ (default: this repository)")
    p.add_argument("--work_dir", default=None, help="keep the runs (bundle roots) here (default: a removed temp dir)")
    p.add_argument("--out", default=None, help="JSON file of the results; the Markdown table is written beside it")
    p.add_argument("--table", default=None, metavar="JSON",
                   help="only (re)write the Markdown table beside an existing results JSON; trains nothing")
    a = p.parse_args(argv)
    if a.table:
        with open(a.table) as f:
            study = json.load(f)
        _write_table(study, a.table)
        return study
    torch.set_num_threads(a.threads)
    study = run_variants_study(
        a.variants, work_dir=a.work_dir, configs=bundle_config_dir(a.bundle), spatial_dims=a.spatial_dims,
        spatial_size=a.spatial_size, steps=a.steps, epochs=a.epochs, num_train_pairs=a.num_train_pairs,
        num_val_pairs=a.num_val_pairs, override=_parse_overrides(a.override),
    )
    study["settings"].pop("configs", None)
    study["command"] = "python -m monai_ipear.studies.variants " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(study, f, indent=1)
    _write_table(study, a.out)
    return study


def _write_table(study: dict, json_path: str | None) -> None:
    """Print the table; with ``json_path``, write it (after the command) to the ``.md`` file beside the JSON."""
    table = format_variants_table(study)
    if json_path:
        with open(os.path.splitext(json_path)[0] + ".md", "w") as f:
            f.write(f"`{study['command']}`\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    variants_main()
