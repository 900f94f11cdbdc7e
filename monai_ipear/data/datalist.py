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

from ..booleans import as_bool

__all__ = ["load_registration_pairs", "pair_name", "unique_stems"]


def _stem(path: str) -> str:
    name = os.path.basename(str(path))
    for ext in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nrrd.gz"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def unique_stems(paths) -> dict[str, str]:
    """A short name per distinct path: the file stem, prefixed with as many parent folders (joined by ``_``) as
    needed to tell paths with the same stem apart (``sub-01/T1.nii.gz`` -> ``sub-01_T1``).

    Raises ``ValueError`` when two different paths cannot be told apart this way (``T1.nii`` and ``T1.nii.gz`` in
    one folder)."""
    paths = list(dict.fromkeys(os.path.normpath(os.path.abspath(str(p))) for p in paths))
    parts = {p: Path(p).parent.parts[1:] for p in paths}  # without the root "/"
    depth = {p: 0 for p in paths}

    def name(p: str) -> str:
        d = depth[p]
        return "_".join(list(parts[p][len(parts[p]) - d:] if d else []) + [_stem(p)])

    while True:
        names: dict[str, list[str]] = {}
        for p in paths:
            names.setdefault(name(p), []).append(p)
        clashes = [group for group in names.values() if len(group) > 1]
        if not clashes:
            return {p: name(p) for p in paths}
        grown = False
        for group in clashes:
            for p in group:
                if depth[p] < len(parts[p]):
                    depth[p] += 1
                    grown = True
        if not grown:
            raise ValueError(f"files {clashes[0]} would get the same output name; rename one of them.")


def pair_name(moving: str, fixed: str, names: dict[str, str] | None = None) -> str:
    """The output prefix of a pair: ``<moving stem>_to_<fixed stem>``; stems made unique by :func:`unique_stems`
    (over ``names``' paths when given, else over the two files), so ``sub-01/T1`` -> ``sub-02/T1`` gives
    ``sub-01_T1_to_sub-02_T1``."""
    if names is None:
        names = unique_stems([moving, fixed]) if _stem(moving) == _stem(fixed) else {}
    key = lambda p: os.path.normpath(os.path.abspath(str(p)))  # noqa: E731
    return f"{names.get(key(moving), _stem(moving))}_to_{names.get(key(fixed), _stem(fixed))}"


def load_registration_pairs(
    datalist: str | dict,
    dataset_dir: str | None = None,
    split: str = "training",
    pairing: str = "inter_subject",
    atlas: str | int | None = None,
    check_files: bool = True,
) -> list[dict]:
    """Read a datalist and return one dict per ordered pair.

    Args:
        datalist: path of a JSON file, or the parsed dict.
        dataset_dir: folder the relative paths are relative to (default: the JSON file's folder).
        split: key of the subject list (``"training"``, ``"validation"``, ...).
        pairing: ``"inter_subject"`` (all ordered pairs of distinct subjects) or ``"atlas"``.
        atlas: for ``pairing="atlas"``: index into the split or an image path (relative to ``dataset_dir``);
            default: the first subject.
        check_files: refuse the datalist when a file it names does not exist (all missing files in one message),
            so a typo is found before any training or inference work.

    Raises:
        ValueError: unknown split or pairing, fewer than 2 subjects, a subject listed twice, label maps for some
            subjects but not all (Dice would silently be computed on a subset or on images), missing files.

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
    seen: set[str] = set()
    for s in subjects:
        if s["image"] in seen:
            raise ValueError(f"'{split}' lists {s['image']} more than once: each subject must appear once (a duplicate "
                             "makes identical pairs and weights that subject twice in the metrics).")
        seen.add(s["image"])
    with_labels = all(s["label"] is not None for s in subjects)
    unlabelled = [s["image"] for s in subjects if s["label"] is None]
    if unlabelled and not with_labels and len(unlabelled) < len(subjects):
        raise ValueError(f"in '{split}', {len(unlabelled)} of {len(subjects)} subjects have no label map "
                         f"({', '.join(os.path.basename(p) for p in unlabelled[:5])}{' ...' if len(unlabelled) > 5 else ''}): "
                         "give every subject a 'label' or none.")

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

    if as_bool(check_files, "check_files"):
        needed = {s["image"] for pair in ordered for s in pair}
        if with_labels:
            needed |= {s["label"] for pair in ordered for s in pair}
        missing = sorted(p for p in needed if not os.path.isfile(p))
        if missing:
            raise ValueError(f"{len(missing)} file(s) named in '{split}' do not exist: {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''} (paths are relative to dataset_dir={base!r}).")
    names = unique_stems([s["image"] for pair in ordered for s in pair])
    pairs, seen_pairs = [], set()
    for moving, fixed in ordered:
        if (moving["image"], fixed["image"]) in seen_pairs:
            raise ValueError(f"the pair {moving['image']} -> {fixed['image']} is listed more than once in '{split}'.")
        seen_pairs.add((moving["image"], fixed["image"]))
        item = {"moving_image": moving["image"], "fixed_image": fixed["image"],
                "pair": pair_name(moving["image"], fixed["image"], names)}
        if with_labels:
            item["moving_label"] = moving["label"]
            item["fixed_label"] = fixed["label"]
        pairs.append(item)
    return pairs
