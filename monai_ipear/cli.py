"""Command-line interface: ``python -m monai_ipear register | warp | jacobian`` (built with ``fire``).

- ``register``: register a moving image onto a fixed image with a trained network and write the same files as
  the bundle's ``inference`` workflow (``<moving>_to_<fixed>_warped.nii.gz``, ``_ddf.nii.gz``,
  ``_warped_label.nii.gz`` with ``--moving-label``, ``iterations.csv``), through the same MONAI evaluator,
  :class:`~monai_ipear.engines.RegistrationEvalIteration` and
  :class:`~monai_ipear.engines.RegistrationOutputWriter`. ``--prealign affine`` first aligns the moving image
  (and label) affinely with ITK and resamples it onto the fixed image's grid.
- ``warp``: apply a saved DDF to another image (bilinear) or label map (``--label``: nearest).
- ``jacobian``: Jacobian-determinant map of a saved DDF and the percentage of folding voxels.

Errors in the arguments or in the input files are reported as one line on stderr (``error: ...``) with exit
code 2; set ``MONAI_IPEAR_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

__all__ = ["RegistrationCLIError", "register", "warp", "jacobian", "affine_prealign", "cli_main"]


class RegistrationCLIError(ValueError):
    """A bad argument or an unreadable input file (reported as one line, exit code 2)."""


_PROGRESS_STREAM = None  # the real stderr while ``main`` collects fire's messages
_OPEN_BARS: list = []  # closed by ``main`` before an error line, so the error starts on its own line


class _LineProgress:
    """Progress for a stream that is not a terminal (a log file, a pipe): one plain line per finished step,
    ``<desc>: <n>/<total> <what happened>``, instead of a bar redrawn with carriage returns."""

    def __init__(self, total: int, desc: str, stream) -> None:
        self.total, self.desc, self.stream, self.n, self.postfix = total, desc, stream, 0, ""

    def set_postfix_str(self, text: str) -> None:
        self.postfix = str(text)

    def update(self, n: int = 1) -> None:
        self.n += n
        print(f"{self.desc}: {self.n}/{self.total} {self.postfix}".rstrip(), file=self.stream, flush=True)

    def close(self) -> None:
        pass


def _progress(total: int, desc: str):
    """A step counter on stderr: a tqdm line on a terminal, plain lines otherwise; ``MONAI_IPEAR_QUIET=1``: none."""
    from tqdm.auto import tqdm

    stream = _PROGRESS_STREAM or sys.stderr
    quiet = os.environ.get("MONAI_IPEAR_QUIET", "0") == "1"
    if not quiet and not (hasattr(stream, "isatty") and stream.isatty()):
        bar = _LineProgress(total, desc, stream)
    else:
        bar = tqdm(total=total, desc=desc, file=stream, bar_format="{desc}: {n_fmt}/{total_fmt}{postfix}", disable=quiet)
    _OPEN_BARS.append(bar)
    return bar


def _check_file(path, what: str) -> str:
    if path is None or str(path) == "":
        raise RegistrationCLIError(f"--{what} is required.")
    path = str(path)
    if not os.path.isfile(path):
        raise RegistrationCLIError(f"{what} file not found: {path}")
    return path


def _load(path: str, what: str, dtype="float32"):
    """Read an image with MONAI's ``LoadImage`` (channel first); unreadable files raise a one-line error."""
    from monai.transforms import EnsureChannelFirst, LoadImage

    try:
        img = LoadImage(image_only=True, dtype=dtype)(path)
        return EnsureChannelFirst()(img)
    except Exception as e:  # MONAI's reader errors are multi-line lists of every reader's failure
        raise RegistrationCLIError(f"cannot read {what} file {path}: {type(e).__name__}") from e


def _check_readable(path: str, what: str, prealign: bool = False) -> tuple:
    """The spatial shape of a readable file; an image the affine pre-alignment will read must also pass
    :func:`~monai_ipear.data.transforms.check_image_content` (no NaN/Inf, not constant)."""
    x = _load(path, what)
    if prealign:
        from monai_ipear.data.transforms import check_image_content

        try:
            check_image_content(x, f"the {what} image {path}")
        except (ValueError, FloatingPointError) as e:
            raise RegistrationCLIError(str(e)) from e
    return tuple(x.shape[1:])


def _refuse_overwrite(out, *inputs) -> None:
    """Outputs never replace inputs: refuse an output path that is one of the input files."""
    real = {os.path.realpath(str(p)) for p in inputs if p is not None and str(p) != ""}
    if os.path.realpath(str(out)) in real:
        raise RegistrationCLIError(f"--out {out} is an input file; refusing to overwrite it.")


def _device(device):
    if device is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise RegistrationCLIError(f"invalid --device '{device}'.") from e


def _build_network(spatial_dims: int, config, model: str, device: torch.device) -> torch.nn.Module:
    """``network_def`` of a bundle config (default: ``iPEAR(spatial_dims)``) with the weights of ``model``."""
    import monai_ipear  # noqa: F401 - registers the package's names for the config parser
    from monai.bundle import ConfigParser

    if config is None:
        from monai_ipear.networks import iPEAR

        net = iPEAR(spatial_dims=spatial_dims)
    else:
        files = [str(c) for c in (config if isinstance(config, (list, tuple)) else str(config).split(","))]
        for f in files:
            _check_file(f, "config")
        parser = ConfigParser()
        parser.read_config(files)
        if "network_def" not in parser:
            raise RegistrationCLIError(f"config {files} has no 'network_def'.")
        parser["spatial_dims"] = spatial_dims
        net = parser.get_parsed_content("network_def", instantiate=True)
    try:
        state = torch.load(model, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RegistrationCLIError(f"cannot read model file {model}: {type(e).__name__}") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a full training checkpoint (model_final.pt)
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        raise RegistrationCLIError(
            f"model file {model} does not match the network {type(net).__name__} (pass --config with the "
            f"network_def it was trained with)."
        ) from e
    return net.to(device).eval()


def affine_prealign(fixed: str, moving: str, out_prefix: str, moving_label: str | None = None,
                    iterations: int = 200) -> dict:
    """Affine pre-alignment of ``moving`` onto ``fixed`` with ITK (the package has no affine network).

    ITK's ``ImageRegistrationMethodv4``: centre-of-mass-initialised ``AffineTransform``, Mattes mutual information
    (32 bins), regular-step gradient descent with physical-shift scales, 3 levels (shrink 4/2/1, smoothing
    2/1/0 voxels). The moving image is resampled onto the fixed image's grid (linear; the label map: nearest).

    Writes ``<out_prefix>_moving_affine.nii.gz``, ``<out_prefix>_moving_label_affine.nii.gz`` (with a label)
    and the transform ``<out_prefix>_affine.tfm``; returns their paths (keys ``moving``, ``moving_label``,
    ``transform``).
    """
    import itk

    fixed_img = itk.imread(fixed, itk.F)
    moving_img = itk.imread(moving, itk.F)
    dim = fixed_img.GetImageDimension()
    image_type = type(fixed_img)
    transform = itk.AffineTransform[itk.D, dim].New()
    # moments initialisation (ITK wraps CenteredTransformInitializer for rigid transforms only): rotation centre
    # at the fixed image's centre of mass, translation = moving minus fixed centre of mass
    centres = []
    for img in (fixed_img, moving_img):
        moments = itk.ImageMomentsCalculator[image_type].New(Image=img)
        moments.Compute()
        centres.append(np.asarray(moments.GetCenterOfGravity(), dtype=float))
    transform.SetCenter([float(v) for v in centres[0]])
    transform.SetTranslation([float(v) for v in centres[1] - centres[0]])
    metric = itk.MattesMutualInformationImageToImageMetricv4[image_type, image_type].New(NumberOfHistogramBins=32)
    optimizer = itk.RegularStepGradientDescentOptimizerv4[itk.D].New(
        LearningRate=1.0, MinimumStepLength=1e-4, RelaxationFactor=0.5, NumberOfIterations=int(iterations))
    scales = itk.RegistrationParameterScalesFromPhysicalShift[type(metric)].New(Metric=metric)
    optimizer.SetScalesEstimator(scales)
    reg = itk.ImageRegistrationMethodv4[image_type, image_type].New(
        FixedImage=fixed_img, MovingImage=moving_img, Metric=metric, Optimizer=optimizer,
        InitialTransform=transform, InPlace=True)
    reg.SetNumberOfLevels(3)
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.Update()

    out = {"moving": f"{out_prefix}_moving_affine.nii.gz", "transform": f"{out_prefix}_affine.tfm"}
    resampled = itk.resample_image_filter(moving_img, transform=transform, use_reference_image=True,
                                          reference_image=fixed_img)
    itk.imwrite(resampled, out["moving"])
    if moving_label is not None:
        label_img = itk.imread(moving_label, itk.F)
        nearest = itk.NearestNeighborInterpolateImageFunction[type(label_img), itk.D].New()
        lab = itk.resample_image_filter(label_img, transform=transform, interpolator=nearest,
                                        use_reference_image=True, reference_image=fixed_img)
        lab = itk.cast_image_filter(lab, ttype=(type(lab), itk.Image[itk.SS, dim]))
        out["moving_label"] = f"{out_prefix}_moving_label_affine.nii.gz"
        itk.imwrite(lab, out["moving_label"])
    itk.transformwrite([transform], out["transform"])
    return out


def register(fixed=None, moving=None, out_dir=None, moving_label=None, model=None,
             prealign=None, config=None, device=None, ddf_units="voxel", fixed_mask=None, moving_mask=None,
             iterations=None, autocast=False) -> dict:
    """Register MOVING onto FIXED and write the warped image, the field and the warped labels into OUT_DIR.

    Without ``--model`` (or with a file in the packaged-model format) this is the whole pipeline
    (:class:`monai_ipear.pipeline.RegistrationPipeline`, the same as the bundle's ``register`` run): the packaged
    iPEAR trained on IXI T1 brains at 2 mm. It expects SKULL-STRIPPED T1 brains: give ``--fixed-mask`` and
    ``--moving-mask`` for full-head scans. Any storage order and spacing; affine pre-alignment by default
    (elastix; ``--prealign none`` for pairs already aligned in scanner coordinates); outputs on the fixed
    image's own grid and affine: ``<moving>_to_<fixed>_warped.nii.gz`` (moving intensities in their original
    units), ``_ddf.nii.gz`` (ONE field composing the affine and the deformable parts), ``_warped_label.nii.gz``
    and ``_summary.json``; a one-line summary is printed.

    With ``--model`` a bundle-trained state dict: the images must share one grid (or ``--prealign affine``,
    plain ITK), intensities are min-max scaled, and the bundle inference files are written.

    Args:
        fixed: fixed image (NIfTI or any format ITK reads).
        moving: moving image.
        out_dir: output folder (created).
        moving_label: optional label map of the moving image, warped with nearest-neighbour sampling.
        model: default: the packaged pretrained model; else a pretrained-format file, or trained weights (a
            state dict such as the bundle's ``models/model.pt``, or a training checkpoint with a ``model`` entry).
        prealign: packaged model: ``affine`` (default) or ``none``; bundle weights: ``affine`` or none (default).
        config: bundle config file(s) (comma-separated) whose ``network_def`` bundle weights were trained with;
            default ``iPEAR`` with the image's number of spatial dimensions.
        device: e.g. ``cpu`` or ``cuda:0`` (default: the GPU when present).
        ddf_units: ``voxel`` (default) or ``mm``, as in the bundle's ``ddf_units``.
        fixed_mask, moving_mask: brain masks (nonzero = brain) on the images' grids (packaged model only).
        iterations: ``tci`` (the default: TCI decides per level) or a whole number ``k``: ``k`` updates at every
            pyramid level (``1`` = a single pass, the fastest).
        autocast: run the network in reduced precision (bfloat16 on CPU, float16 on CUDA): faster on CPUs with
            AVX512-BF16 or AMX and on GPUs; agreement with float32 for the packaged model in docs/pretrained.md.

    Returns a dict of the written paths and the updates made per level (printed on stdout).
    """
    from monai_ipear.booleans import as_bool
    from monai_ipear.controllers import controller_from_spec
    from monai_ipear.pretrained import is_pretrained_file

    try:
        autocast = as_bool(autocast, "--autocast")
    except ValueError as e:
        raise RegistrationCLIError(str(e)) from e
    if iterations is not None:
        try:
            controller_from_spec(iterations)
        except ValueError as e:
            raise RegistrationCLIError(f"--iterations: {e}") from e

    if model is None or (os.path.isfile(str(model)) and is_pretrained_file(str(model))):
        return _register_pipeline(fixed, moving, out_dir, moving_label, model, prealign, config, device, ddf_units,
                                  fixed_mask, moving_mask, iterations, autocast)
    if fixed_mask is not None or moving_mask is not None:
        raise RegistrationCLIError("--fixed-mask/--moving-mask work with the packaged (pretrained-format) model only.")
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedEvaluator

    from monai_ipear.data import pair_name, registration_pair_transforms
    from monai_ipear.engines import RegistrationEvalIteration, RegistrationOutputWriter

    fixed, moving = _check_file(fixed, "fixed"), _check_file(moving, "moving")
    if out_dir is None or str(out_dir) == "":
        raise RegistrationCLIError("--out-dir is required.")
    if moving_label is not None:
        moving_label = _check_file(moving_label, "moving-label")
    model = _check_file(model, "model")
    if prealign not in (None, "none", "affine"):
        raise RegistrationCLIError(f"--prealign must be 'affine' (or omitted), got '{prealign}'.")
    if ddf_units not in ("voxel", "mm"):
        raise RegistrationCLIError(f"--ddf-units must be 'voxel' or 'mm', got '{ddf_units}'.")
    dev = _device(device)
    out_dir = str(out_dir)
    name = pair_name(moving, fixed)
    steps = _progress(5 if prealign == "affine" else 4, f"register {name}")

    fixed_shape = _check_readable(fixed, "fixed", prealign == "affine")
    moving_shape = _check_readable(moving, "moving", prealign == "affine")
    if moving_label is not None:
        label_shape = _check_readable(moving_label, "moving-label")
        if label_shape != moving_shape:
            raise RegistrationCLIError(f"moving label shape {label_shape} differs from moving image shape {moving_shape}.")
    steps.set_postfix_str("inputs read")
    steps.update()
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    if prealign == "affine":
        pre = affine_prealign(fixed, moving, os.path.join(out_dir, name), moving_label)
        moving, moving_label = pre["moving"], pre.get("moving_label", moving_label)
        written.update({"prealigned": pre["moving"], "affine": pre["transform"]})
        moving_shape = fixed_shape
        steps.set_postfix_str("affine pre-alignment done")
        steps.update()
    elif moving_shape != fixed_shape:
        raise RegistrationCLIError(
            f"moving {moving_shape} and fixed {fixed_shape} are not on the same grid; use --prealign affine.")
    spatial_dims = len(fixed_shape)
    net = _build_network(spatial_dims, config, model, dev)
    if iterations is not None:
        from monai_ipear.pipeline import set_iteration_control

        try:
            set_iteration_control(net, iterations)
        except ValueError as e:
            raise RegistrationCLIError(f"--iterations: {e}") from e
    steps.set_postfix_str(f"{type(net).__name__} loaded on {dev}")
    steps.update()

    item = {"moving_image": moving, "fixed_image": fixed, "pair": name}
    label_keys = ()
    if moving_label is not None:
        item["moving_label"] = moving_label
        label_keys = ("moving_label",)
    loader = DataLoader(Dataset([item], registration_pair_transforms(label_keys=label_keys)), batch_size=1,
                        num_workers=0)
    writer = RegistrationOutputWriter(output_dir=out_dir, ddf_units=ddf_units)
    evaluator = SupervisedEvaluator(
        device=dev, val_data_loader=loader, network=net, iteration_update=RegistrationEvalIteration(),
        decollate=False, val_handlers=[writer], amp=autocast,
    )
    start = time.perf_counter()
    evaluator.run()
    steps.set_postfix_str(f"registered in {time.perf_counter() - start:.2f} s")
    steps.update()
    out = evaluator.state.output
    prefix = os.path.join(out_dir, name)
    written.update({"warped": f"{prefix}_warped.nii.gz", "ddf": f"{prefix}_ddf.nii.gz",
                    "ddf_itk": f"{prefix}_ddf_itk.nii.gz", "iterations_csv": os.path.join(out_dir, "iterations.csv")})
    if prealign == "affine":  # fixed point -> original moving point in one ITK transform: affine after the field
        from monai_ipear.itk_fields import write_itk_composite

        written["composite"] = write_itk_composite(written["affine"], written["ddf_itk"], f"{prefix}_composite.h5")
    if moving_label is not None:
        written["warped_label"] = f"{prefix}_warped_label.nii.gz"
    if "iterations" in out:
        written["iterations_per_level"] = [int(v) for v in out["iterations"][0]]
    steps.set_postfix_str(f"outputs written to {out_dir}")
    steps.update()
    steps.close()
    return written


def _register_pipeline(fixed, moving, out_dir, moving_label, model, prealign, config, device, ddf_units,
                       fixed_mask, moving_mask, iterations=None, autocast=False) -> dict:
    """``register`` with a pretrained-format model: :meth:`RegistrationPipeline.run_files`' work, CLI errors."""
    from monai_ipear.data import pair_name
    from monai_ipear.pipeline import PREALIGN_CHOICES, RegistrationPipeline
    from monai_ipear.pretrained import PretrainedModelError

    fixed, moving = _check_file(fixed, "fixed"), _check_file(moving, "moving")
    if out_dir is None or str(out_dir) == "":
        raise RegistrationCLIError("--out-dir is required.")
    if config is not None:
        raise RegistrationCLIError("--config applies to bundle weights (--model); the packaged model carries its own.")
    prealign = "affine" if prealign is None else str(prealign)
    if prealign not in PREALIGN_CHOICES:
        raise RegistrationCLIError(f"--prealign must be 'affine' or 'none', got '{prealign}'.")
    if ddf_units not in ("voxel", "mm"):
        raise RegistrationCLIError(f"--ddf-units must be 'voxel' or 'mm', got '{ddf_units}'.")
    extra = {"moving_label": moving_label, "fixed_mask": fixed_mask, "moving_mask": moving_mask}
    for k, v in extra.items():
        if v is not None:
            extra[k] = _check_file(v, k.replace("_", "-"))
    dev = _device(device)
    name = pair_name(moving, fixed)
    for suffix in ("warped.nii.gz", "ddf.nii.gz", "ddf_itk.nii.gz", "warped_label.nii.gz", "summary.json"):
        _refuse_overwrite(os.path.join(str(out_dir), f"{name}_{suffix}"), fixed, moving, *extra.values())
    steps = _progress(3, f"register {name}")
    images = {"fixed": _load(fixed, "fixed"), "moving": _load(moving, "moving")}
    images.update({k: _load(v, k.replace("_", "-")) for k, v in extra.items() if v is not None})
    try:
        pipeline = RegistrationPipeline(model=model, prealign=prealign, device=dev, iterations=iterations,
                                        autocast=autocast)
    except PretrainedModelError as e:
        raise RegistrationCLIError(str(e)) from e
    steps.set_postfix_str(f"inputs read, model on {dev}")
    steps.update()
    written = pipeline.run_files(images["fixed"], images["moving"], str(out_dir), images.get("fixed_mask"),
                                 images.get("moving_mask"), images.get("moving_label"), ddf_units, name=name)
    steps.set_postfix_str("registered")
    steps.update()
    steps.set_postfix_str(f"outputs written to {out_dir}")
    steps.update()
    steps.close()
    return written


def _load_ddf(ddf: str, ddf_units: str):
    """A saved DDF ``(*spatial, spatial_dims)`` NIfTI -> ``(1, spatial_dims, *spatial)`` voxel tensor, affine."""
    from monai_ipear.engines import ddf_to_mm

    from monai_ipear.engines.outputs import check_finite

    field = _load(_check_file(ddf, "ddf"), "ddf")
    sd = field.shape[0]
    if sd == 2 and field.ndim == 4 and field.shape[-1] == 1:  # a 2D field is stored (H, W, 1, 2)
        field = field[..., 0]
    if field.ndim - 1 != sd or sd not in (2, 3):
        raise RegistrationCLIError(
            f"{ddf} is not a displacement field: expected one component per spatial axis, got shape "
            f"{tuple(field.shape[1:]) + (sd,)}.")
    check_finite(field, f"the displacement field {ddf}", hint="it cannot be applied or measured.")
    affine = field.affine.double()
    t = field.as_tensor().float()
    if ddf_units == "mm":  # back to voxels: the inverse of the linear part of the fixed image's affine
        t = ddf_to_mm(t, torch.linalg.inv(affine[:sd, :sd]))
    elif ddf_units != "voxel":
        raise RegistrationCLIError(f"--ddf-units must be 'voxel' or 'mm', got '{ddf_units}'.")
    return t[None], affine, field


def _check_grid(img, field, what: str) -> None:
    """``img`` (an image or mask) must be on the field's (the fixed image's) grid: shape and affine."""
    from monai_ipear.data.transforms import check_same_grid

    try:
        check_same_grid(img, field, what, "the field")
    except ValueError as e:
        raise RegistrationCLIError(f"{e} (the field is on the fixed image's grid)") from e


def warp(image=None, ddf=None, out=None, label=False, ddf_units="voxel", itk_field=None) -> dict:
    """Apply a saved field to IMAGE and write OUT on the field's (the fixed image's) grid.

    The field may be ``register``'s DDF (``_ddf.nii.gz``, voxels), its ITK displacement field
    (``_ddf_itk.nii.gz``) or its ITK composite transform (``_composite.h5``, with ``--prealign affine``); the
    command says which form it read. With the DDF, IMAGE must be on the fixed grid (like the moving image the
    network saw); with the ITK forms it may be on any grid (world coordinates), e.g. the original moving image.

    Args:
        image: image or label map of the moving subject: on the fixed grid (MONAI ``Warp``), or on any other grid
            placed by its affine (e.g. the raw moving scan: sampled at ``A_image^-1 A_fixed (x + ddf(x))``).
        ddf: the field file (DDF, ITK displacement field or ITK composite transform).
        out: output file (written with the DDF's, i.e. the fixed image's, affine).
        label: nearest-neighbour sampling and integer output (for label maps); default bilinear, float.
        ddf_units: units of a DDF file (``voxel`` or ``mm``); ignored for the ITK forms.
        itk_field: also write the ITK displacement field of a DDF file to this path (optional).
    """
    from monai.networks.blocks import Warp

    from monai_ipear.engines import RegistrationOutputWriter
    from monai_ipear.engines.outputs import write_label_map
    from monai_ipear.itk_fields import apply_field, read_field, write_itk_displacement_field

    image = _check_file(image, "image")
    if out is None or str(out) == "":
        raise RegistrationCLIError("--out is required.")
    from monai_ipear.booleans import as_bool

    try:
        label = as_bool(label, "--label")  # the one boolean parser: --label false is false
    except ValueError as e:
        raise RegistrationCLIError(str(e)) from e
    _refuse_overwrite(out, image, ddf)
    if itk_field is not None:
        _refuse_overwrite(itk_field, image, ddf)
    steps = _progress(3, f"warp {os.path.basename(image)}")
    ddf_path = _check_file(ddf, "ddf")
    try:
        form = read_field(ddf_path)
    except Exception as e:
        raise RegistrationCLIError(f"cannot read field file {ddf_path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    steps.set_postfix_str(f"read {form.describe()}")
    img = _load(image, "image", dtype="float64" if label else "float32")  # labels exact up to 2**53
    steps.update()
    if form.kind == "monai-ddf":
        field, affine, field_img = _load_ddf(ddf_path, ddf_units)
        same_grid = tuple(img.shape[1:]) == tuple(field.shape[2:]) and torch.allclose(
            img.affine.double(), affine, rtol=0.0, atol=1e-3)
        if same_grid and label:
            warped = Warp(mode="nearest", padding_mode="zeros")(img.as_tensor()[None], field.double())[0]
        elif same_grid:
            warped = Warp(mode="bilinear", padding_mode="zeros")(img.as_tensor().float()[None], field)[0]
        else:  # an image on another grid (e.g. the raw moving scan of the pipeline): sampled at A_img^-1 A_F (x + ddf)
            from monai_ipear.pipeline import warp_to_fixed

            warped = warp_to_fixed(img, field[0], affine, mode="nearest" if label else "bilinear")
        if itk_field is not None:
            write_itk_displacement_field(field[0], affine, str(itk_field))
    else:
        if itk_field is not None:
            raise RegistrationCLIError("--itk-field converts a DDF file; the field given is already an ITK field.")
        if len(img.shape) - 1 != len(form.spatial_shape):
            raise RegistrationCLIError(f"image has {len(img.shape) - 1} spatial dimensions, the field {len(form.spatial_shape)}.")
        warped = apply_field(img, img.affine, form.points, mode="nearest" if label else "bilinear")
        affine = torch.as_tensor(form.affine)
    steps.update()
    os.makedirs(os.path.dirname(os.path.abspath(str(out))), exist_ok=True)
    if label:  # nearest integer in the smallest integer type that holds the labels
        write_label_map(warped, affine, str(out))
    else:
        RegistrationOutputWriter._save(warped.float(), affine, str(out))
    steps.set_postfix_str(f"wrote {out}")
    steps.update()
    steps.close()
    result = {"warped": str(out), "field": form.describe()}
    if itk_field is not None:
        result["itk_field"] = str(itk_field)
    return result


def jacobian(ddf=None, out=None, mask=None, ddf_units="voxel") -> dict:
    """Jacobian determinant of ``x -> x + ddf(x)`` (voxel units) and the percentage of voxels with det <= 0.

    Args:
        ddf: the displacement field file.
        out: output NIfTI of the determinant map (optional; only the folding percentage when omitted).
        mask: optional mask on the field's grid (nonzero voxels are counted).
        ddf_units: units the DDF was saved in (``voxel`` or ``mm``).
    """
    from monai_ipear.engines import RegistrationOutputWriter
    from monai_ipear.metrics import folding_percentage, jacobian_determinant

    if out is not None:
        _refuse_overwrite(out, ddf, mask)
    steps = _progress(2, "jacobian")
    field, affine, field_img = _load_ddf(ddf, ddf_units)
    m = None
    if mask is not None:
        mask_img = _load(_check_file(mask, "mask"), "mask")
        _check_grid(mask_img, field_img, f"mask {mask}")
        m = mask_img.as_tensor()[None]
        if not bool((m != 0).any()):
            raise RegistrationCLIError(f"mask {mask} is empty (no nonzero voxel): the folding percentage is undefined.")
    det = jacobian_determinant(field)
    folding = float(folding_percentage(field, m)[0])
    steps.update()
    result = {"folding_percent": folding, "det_min": float(det.min()), "det_max": float(det.max())}
    if out is not None:
        os.makedirs(os.path.dirname(os.path.abspath(str(out))), exist_ok=True)
        RegistrationOutputWriter._save(det[0], affine, str(out))
        result["jacobian"] = str(out)
    steps.set_postfix_str(f"folding {folding:.4f} %")
    steps.update()
    steps.close()
    return result


COMMANDS = {"register": register, "warp": warp, "jacobian": jacobian}


def _prog_name() -> str:
    """``monai-ipear`` when started by the console script, else ``python -m monai_ipear``."""
    return "monai-ipear" if os.path.basename(sys.argv[0] or "").startswith("monai-ipear") else "python -m monai_ipear"


def _command_help(prog: str, name: str) -> str:
    """Help of one command from its signature and docstring (summary, then one line per option)."""
    import inspect
    import textwrap

    func = COMMANDS[name]
    doc = inspect.getdoc(func) or ""
    summary, _, rest = doc.partition("\n\n")
    described: dict[str, str] = {}
    current = None
    in_args = False
    for line in rest.splitlines():
        if line.strip() == "Args:":
            in_args = True
            continue
        if in_args and line and not line.startswith(" "):
            in_args = False  # the Args section ended ("Returns ...")
        if not in_args or not line.strip():
            continue
        head, sep, text = line.strip().partition(": ")
        names = [n.strip() for n in head.split(",")]  # "a, b: text" describes both
        if line.startswith("    ") and not line.startswith("     ") and sep and all(n.isidentifier() for n in names):
            current = names
            for n in names:
                described[n] = text
        elif current is not None:
            for n in current:
                described[n] += " " + line.strip()
    required = {"register": ("fixed", "moving", "out_dir"), "warp": ("image", "ddf", "out"), "jacobian": ("ddf",)}[name]
    summary = " ".join(summary.replace("``", "'").split())
    lines = [f"usage: {prog} {name} [options]", "", textwrap.fill(summary, 100), "", "options:"]
    for param in inspect.signature(func).parameters.values():
        flag = "--" + param.name.replace("_", "-")
        default = param.default
        if isinstance(default, bool):
            flag_text = flag
        else:
            flag_text = f"{flag} {param.name.upper()}"
        text = described.get(param.name, "").replace("``", "'")
        if param.name in required:
            text += " (required)"
        elif default is not None and default is not False and "default" not in text:
            text += f" (default: {default})"
        wrapped = textwrap.wrap(text, 72) or [""]
        if len(flag_text) > 24:
            lines.append(f"  {flag_text}")
        else:
            lines.append(f"  {flag_text:<24}{wrapped.pop(0)}")
        lines.extend(f"  {'':<24}{w}" for w in wrapped)
    lines.append(f"  {'-h, --help':<24}show this help and exit")
    return "\n".join(lines)


def cli_main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m monai_ipear``; returns the exit code (0, or 2 on a reported error)."""
    import fire
    from fire.core import FireExit

    from .runtime import program_arguments

    argv = program_arguments(argv)  # as a program: the allocator setting of monai_ipear.runtime
    prog = _prog_name()
    if argv and argv[0] in ("-V", "--version"):
        from monai_ipear import __version__

        print(f"monai-ipear {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(f"usage: {prog} {{register,warp,jacobian}} [--help] [args]   |   {prog} --version\n"
              "  register --fixed F --moving M --out-dir D [--fixed-mask FM --moving-mask MM] [--moving-label L] "
              "[--prealign affine|none] [--device cpu] [--ddf-units voxel|mm] [--iterations tci|K] [--autocast]\n"
              "           (packaged IXI T1 model; skull-stripped brains or masks) or with bundle weights:\n"
              "           [--model models/model.pt] [--prealign affine] [--config C]\n"
              "  warp     --image I --ddf D --out O [--label] [--ddf-units voxel|mm] [--itk-field F]\n"
              "  jacobian --ddf D [--out O] [--mask M] [--ddf-units voxel|mm]\n"
              f"{prog} COMMAND --help describes a command.")
        return 0
    if argv[0] in COMMANDS and any(a in ("-h", "--help") for a in argv[1:]):
        print(_command_help(prog, argv[0]))
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command '{argv[0]}'; choose one of {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    import inspect

    known = list(inspect.signature(COMMANDS[argv[0]]).parameters)
    for arg in argv[1:]:  # reject unknown flags before anything runs (fire would run the command first)
        flag = arg[2:].split("=", 1)[0].replace("-", "_") if arg.startswith("--") else None
        if flag is None or flag in known or flag == "help" or (flag.startswith("no") and flag[2:] in known):
            continue
        print(f"error: unknown option --{flag.replace('_', '-')} for '{argv[0]}'; options: "
              f"{', '.join('--' + k.replace('_', '-') for k in known)}.", file=sys.stderr)
        return 2
    debug = os.environ.get("MONAI_IPEAR_DEBUG", "0") == "1"
    import contextlib
    import io

    global _PROGRESS_STREAM
    _PROGRESS_STREAM = sys.stderr
    fire_err = io.StringIO()
    try:
        # fire's own usage errors (unknown flag, missing value) go to stderr as several lines: keep the first
        with contextlib.redirect_stderr(fire_err) if "--help" not in argv else contextlib.nullcontext():
            results: list = []
            fire.Fire(COMMANDS[argv[0]], command=argv[1:], name=f"monai_ipear {argv[0]}",
                      serialize=lambda x: results.append(x))  # printed below, one "key: value" per line
            result = results[0] if results else None
    except FireExit as e:
        if e.code in (0, None):
            return 0
        lines = [ln for ln in fire_err.getvalue().splitlines() if ln.startswith("ERROR:")]
        msg = lines[0][len("ERROR:"):].strip() if lines else "invalid arguments"
        print(f"error: {msg} (see {prog} {argv[0]} --help)", file=sys.stderr)
        return 2
    except Exception as e:  # one clear line instead of a traceback
        for bar in _OPEN_BARS:
            bar.close()
        if debug:
            raise
        while str(e).startswith("applying transform") and e.__cause__ is not None:
            e = e.__cause__  # MONAI's Compose wraps a transform's error: report the transform's own message
        text = " ".join(ln.strip() for ln in str(e).strip().splitlines() if ln.strip())
        print(f"error: {text or type(e).__name__}", file=sys.stderr)
        return 2
    finally:
        _PROGRESS_STREAM = None
        _OPEN_BARS.clear()
    sys.stderr.write(fire_err.getvalue())
    if isinstance(result, dict):
        for k, v in result.items():
            print(f"{k}: {v}")
    elif result is not None:
        print(result)
    return 0
