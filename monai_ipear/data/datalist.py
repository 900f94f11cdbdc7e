"""Users' data: a Learn2Reg-style ``dataset.json`` turned into registration pairs.

The datalist names subjects per split, each with an image and (optionally) a label map, paths relative to
``dataset_dir``::

    {"training":   [{"image": "imagesTr/s01.nii.gz", "label": "labelsTr/s01.nii.gz"}, ...],
     "validation": [{"image": "imagesVal/s07.nii.gz", "label": "labelsVal/s07.nii.gz"}, ...]}

Pairs are all ordered inter-subject pairs of a split (``n * (n - 1)`` pairs) or atlas-to-subject pairs (the
atlas is the moving image, every other subject fixed). An explicit list of pairs can be given instead under
``"<split>_pairs"``: ``[{"moving": "...", "fixed": "..."}]`` with image paths matching subjects of the split.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

__all__ = ["load_registration_pairs", "pair_name"]


def _stem(path: str) -> str:
    name = os.path.basename(str(path))
    for ext in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nrrd.gz"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def pair_name(moving: str, fixed: str) -> str:
    """The output prefix of a pair: ``<moving stem>_to_<fixed stem>``."""
    return f"{_stem(moving)}_to_{_stem(fixed)}"


def load_registration_pairs(
    datalist: str | dict,
    dataset_dir: str | None = None,
    split: str = "training",
    pairing: str = "inter_subject",
    atlas: str | int | None = None,
) -> list[dict]:
    """Read a datalist and return one dict per ordered pair.

    Args:
        datalist: path of a JSON file, or the parsed dict.
        dataset_dir: folder the relative paths are relative to (default: the JSON file's folder).
        split: key of the subject list (``"training"``, ``"validation"``, ...).
        pairing: ``"inter_subject"`` (all ordered pairs of distinct subjects) or ``"atlas"``.
        atlas: for ``pairing="atlas"``: index into the split or an image path (relative to ``dataset_dir``);
            default: the first subject.

    Returns:
        dicts with ``moving_image``, ``fixed_image``, ``moving_label`` and ``fixed_label`` (absolute paths;
        the label keys only when every subject of the split has a label) and ``pair`` (output name).
    """
    if isinstance(datalist, (str, Path)):
        with open(datalist) as f:
            data = json.load(f)
        base = dataset_dir if dataset_dir is not None else os.path.dirname(os.path.abspath(datalist))
    else:
        data = datalist
        base = dataset_dir or "."
    if split not in data:
        raise ValueError(f"the datalist has no '{split}' list; keys: {sorted(data)}.")

    def absolute(p: str) -> str:
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))

    subjects = [{"image": absolute(s["image"]), "label": absolute(s["label"]) if s.get("label") else None}
                for s in data[split]]
    with_labels = all(s["label"] is not None for s in subjects)

    if f"{split}_pairs" in data:
        by_image = {s["image"]: s for s in subjects}
        ordered = []
        for p in data[f"{split}_pairs"]:
            m, f_ = absolute(p["moving"]), absolute(p["fixed"])
            if m not in by_image or f_ not in by_image:
                raise ValueError(f"pair {p} names an image that is not in the '{split}' list.")
            ordered.append((by_image[m], by_image[f_]))
    elif pairing == "inter_subject":
        if len(subjects) < 2:
            raise ValueError(f"inter-subject pairing needs at least 2 subjects in '{split}', got {len(subjects)}.")
        ordered = list(itertools.permutations(subjects, 2))
    elif pairing == "atlas":
        if atlas is None or isinstance(atlas, int):
            ref = subjects[atlas or 0]
        else:
            matches = [s for s in subjects if s["image"] == absolute(atlas)]
            ref = matches[0] if matches else {"image": absolute(atlas), "label": None}
        ordered = [(ref, s) for s in subjects if s["image"] != ref["image"]]
        with_labels = with_labels and ref["label"] is not None
    else:
        raise ValueError(f"pairing must be 'inter_subject' or 'atlas', got '{pairing}'.")

    pairs = []
    for moving, fixed in ordered:
        item = {"moving_image": moving["image"], "fixed_image": fixed["image"],
                "pair": pair_name(moving["image"], fixed["image"])}
        if with_labels:
            item["moving_label"] = moving["label"]
            item["fixed_label"] = fixed["label"]
        pairs.append(item)
    return pairs
