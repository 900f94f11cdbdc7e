"""Assemble the MONAI Model Zoo bundle archive from this repository, and run the Model Zoo's checks on an archive.

Usage (from the repository root)::

    python -m bundle.make_bundle build --weights-url https://.../model.pt --out dist/ipear_registration.zip \\
        [--model models/model.pt]
    python -m bundle.make_bundle check dist/ipear_registration.zip [--python 3.10 3.11 3.12] [--no-resolve]

``build`` packs, under one top folder ``ipear_registration/``: ``configs/`` (JSON configs, ``logging.conf``,
``variants/``), ``docs/README.md`` and the documents it links to, ``LICENSE``, ``scripts/`` (``scripts/__init__.py``
and the ``monai_ipear`` package source in ``scripts/monai_ipear``: the bundle needs no unpublished package) and
``large_files.yml`` with the SHA-256 of the weights and their download address ``--weights-url``. The weights:
``--model``, a state dict (a training run's ``models/model.pt``) or a file of the package's pretrained format;
by default the package's own pretrained model (``monai_ipear/pretrained/ipear_ixi_t1_2mm.pt``, trained on IXI T1,
docs/pretrained.md), so the bundle's ``models/model.pt`` and the ``register`` pipeline run the same network. A
pretrained-format file is written out as the bundle's state dict (float32, the keys of ``network_def``) to
``model.pt`` next to the archive: that file is the one to upload to the url. With a url, the weights themselves
are left out (the zoo's layout: ``large_files.yml`` fetches them; ``--include-weights`` packs them anyway);
without one they are packed, but ``check`` fails on the empty url.

``check`` unpacks an archive in a temporary folder and runs the Model Zoo's CI checks (Project-MONAI/model-zoo
``ci/``, re-implemented, each naming the zoo script it mirrors; those that need the bundle's code run in a fresh
process, :mod:`bundle.zoo_checks`):

- pre-commit hooks of the zoo (``.pre-commit-config.yaml``): JSON formatted as ``pretty-format-json --indent=4
  --no-sort-keys`` writes it, YAML parses, no trailing whitespace, files end with one newline, no file over 1 MB
  besides the large files, Python files have one module docstring and it comes first (``check-docstring-first``: a
  string at column 0 after it, e.g. an attribute docstring, fails), executable files start with a shebang;
- README: the zoo template's sections (``docs/readme_template.md``), TorchScript and TensorRT support stated, and no
  link to a file outside the archive;
- requirements (``ci/get_bundle_requirements.py``): the pins the zoo installs, none naming the bundle's own
  package, and (``--python``, default 3.10 3.11 3.12) a dry-run ``pip install`` of them for each Python version
  against the package index (``--no-resolve`` skips that; it needs the index);
- in the fresh process: large-file download and hash, directory, version/changelog, metadata schema
  (``bundle/meta_schema_20240725.json``, jsonschema), ``verify_net_in_out`` and ``ckpt_export`` on
  ``network_def``, the train / inference / evaluate workflows with their property checks (as the zoo's unit tests
  run them), and that ``monai_ipear`` came from ``scripts/`` (any installed copy is hidden).

Exit code 0 when every check passes, 1 otherwise. Each check prints ``[ok]``, ``[FAIL]`` or ``[n/a]`` (a zoo
check that does not apply, with the reason).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE_NAME = "ipear_registration"
SCHEMA = os.path.join(REPO, "bundle", "meta_schema_20240725.json")
PACKAGE = "monai_ipear"
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
    "scripts/__init__.py",
    "scripts/monai_ipear/__init__.py",
)
# the zoo's docs/readme_template.md: section headings (the optional ones included: we have them all)
README_SECTIONS = ("Authors", "Tags", "Model Description", "Data", "Performance", "Additional Usage Steps",
                   "System Configuration", "Limitations", "Citation Info", "References")
PYTHONS = ("3.10", "3.11", "3.12")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _large_files_yml(url: str, sha256: str) -> str:
    return (
        "large_files:\n"
        '  - path: "models/model.pt"\n'
        f'    url: "{url}"\n'
        f'    hash_val: "{sha256}"\n'
        '    hash_type: "sha256"\n'
    )


_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _local_links(markdown: str) -> list[str]:
    """Targets of the Markdown links / images that are files (not web addresses, mail or in-page anchors)."""
    out = []
    for target in _LINK.findall(markdown):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return [t for t in out if t]


def _docs_files() -> dict[str, str]:
    """``docs/README.md`` and, transitively, the repository files its links point to (archive name -> path)."""
    files, todo = {}, ["docs/README.md"]
    while todo:
        arc = todo.pop()
        path = os.path.join(REPO, arc)
        if arc in files or not os.path.isfile(path):
            continue
        files[arc] = path
        if arc.endswith(".md"):
            with open(path, encoding="utf-8") as f:
                for t in _local_links(f.read()):
                    todo.append(os.path.normpath(os.path.join(os.path.dirname(arc), t)).replace(os.sep, "/"))
    return files


def _package_files() -> dict[str, str]:
    """The package source (``.py`` files) for ``scripts/monai_ipear``, and ``scripts/__init__.py``."""
    files = {"scripts/__init__.py": os.path.join(REPO, "scripts", "__init__.py")}
    for root, dirs, names in os.walk(os.path.join(REPO, PACKAGE)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for n in sorted(names):
            if n.endswith(".py"):
                path = os.path.join(root, n)
                files["scripts/" + os.path.relpath(path, REPO).replace(os.sep, "/")] = path
    return files


def _bundle_weights(model: str, out: str) -> str:
    """``model`` itself when it is a state dict; a pretrained-format file is written to ``out`` as the bundle's
    state dict (float32; the file is byte-for-byte the same for the same weights). Returns the path to pack."""
    import torch
    from monai_ipear.pretrained import PretrainedModelError, load_pretrained

    try:
        net, meta = load_pretrained(model)
    except PretrainedModelError:  # not the pretrained format: a state dict, packed as it is
        return model
    if os.path.abspath(model) == os.path.abspath(out):
        raise SystemExit(f"error: the bundle's weights would overwrite their source {model}; choose another --out.")
    if meta.get("placeholder"):
        raise SystemExit(f"error: {model} is a placeholder with random weights, not a trained model.")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(net.state_dict(), out)
    print(f"wrote {out}: the weights of {os.path.basename(model)} ({meta.get('training', {}).get('steps')} training "
          "steps) as the bundle's models/model.pt; upload this file to --weights-url")
    return out


def build(model: str | None = None, out: str = "dist/ipear_registration.zip", weights_url: str = "",
          include_weights: bool | None = None, check: bool = True, python: tuple = PYTHONS,
          resolve: bool = True) -> str:
    """Assemble the archive ``out`` (see the module docstring); then ``check`` it unless ``check=False``.

    ``model``: a state dict file or a pretrained-format file (default: the package's pretrained model), see the
    module docstring."""
    if model is None:
        from monai_ipear.pretrained import DEFAULT_MODEL_PATH

        model = DEFAULT_MODEL_PATH
    if not os.path.isfile(str(model)):
        raise SystemExit(f"error: --model must name the trained weights file (got {model!r}).")
    model = _bundle_weights(str(model), os.path.join(os.path.dirname(os.path.abspath(str(out))), "model.pt"))
    sha = _sha256(str(model))
    files = {}
    for root, _, names in os.walk(os.path.join(REPO, "configs")):
        for n in sorted(names):
            if n.endswith((".json", ".conf", ".yaml")):
                path = os.path.join(root, n)
                files[os.path.relpath(path, REPO).replace(os.sep, "/")] = path
    files.update(_docs_files())
    files["LICENSE"] = os.path.join(REPO, "LICENSE")
    files.update(_package_files())
    pack_weights = (not weights_url) if include_weights is None else bool(include_weights)
    if pack_weights:
        files["models/model.pt"] = str(model)
    os.makedirs(os.path.dirname(os.path.abspath(str(out))), exist_ok=True)
    with zipfile.ZipFile(str(out), "w", compression=zipfile.ZIP_DEFLATED) as z:
        for arc, path in sorted(files.items()):
            z.write(path, f"{BUNDLE_NAME}/{arc}")
        info = zipfile.ZipInfo(f"{BUNDLE_NAME}/large_files.yml", date_time=(2022, 5, 30, 0, 0, 0))
        info.external_attr = 0o100644 << 16  # a regular file, rw-r--r-- (writestr's default is owner-only)
        info.compress_type = zipfile.ZIP_DEFLATED
        z.writestr(info, _large_files_yml(str(weights_url or ""), sha))
    print(f"wrote {out} ({len(files) + 1} files; weights sha256 {sha[:12]}..., "
          f"{'packed' if pack_weights else 'not packed'}; url {weights_url or '(empty)'})")
    if check:
        if check_archive(str(out), python=python, resolve=resolve):
            raise SystemExit(1)
    return str(out)


# ---------------------------------------------------------------------------------------------- offline checks


def _pretty_json(text: str) -> str:
    """What the zoo's ``pretty-format-json --autofix --no-sort-keys --indent=4`` hook writes for ``text``."""
    return json.dumps(json.loads(text), indent=4) + "\n"


def _docstring_first(text: str) -> list[str]:
    """The rule of the zoo's ``check-docstring-first`` hook (pre-commit-hooks): a string token that starts a line
    (column 0) is a module docstring; it must be the only one and come before any code (attribute "docstrings"
    after module-level assignments count as a second one: use ``#:`` comments)."""
    import io
    import tokenize

    docstring_line = code_line = None
    try:
        for tok in tokenize.tokenize(io.BytesIO(text.encode("utf-8")).readline):
            if tok.type == tokenize.STRING and tok.start[1] == 0:
                if docstring_line is not None:
                    return [f"{tok.start[0]}: second module docstring, first on line {docstring_line} "
                            "(check-docstring-first)"]
                if code_line is not None:
                    return [f"{tok.start[0]}: module docstring after code on line {code_line} (check-docstring-first)"]
                docstring_line = tok.start[0]
            elif tok.type not in (tokenize.COMMENT, tokenize.ENDMARKER, tokenize.NEWLINE, tokenize.NL,
                                  tokenize.ENCODING) and code_line is None:
                code_line = tok.start[0]
    except (tokenize.TokenError, SyntaxError) as e:
        return [f" does not tokenize: {e}"]
    return []


def check_precommit(root: str, large: set) -> list[str]:
    """zoo: ``.pre-commit-config.yaml`` (pre-commit-hooks: pretty-format-json, check-yaml, trailing-whitespace,
    end-of-file-fixer, mixed-line-ending, check-added-large-files 1024 kB, check-docstring-first,
    check-executables-have-shebangs)."""
    import yaml

    problems = []
    for dirpath, _, names in os.walk(root):
        for n in sorted(names):
            path = os.path.join(dirpath, n)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if rel in large:
                continue
            if os.path.getsize(path) > 1024 * 1024:
                problems.append(f"{rel}: larger than 1024 kB (check-added-large-files); list it in large_files.yml")
            if not n.endswith((".json", ".yml", ".yaml", ".md", ".py", ".conf", ".txt")) and n != "LICENSE":
                continue
            with open(path, encoding="utf-8", newline="") as f:
                text = f.read()
            if text and not text.endswith("\n") or text.endswith("\n\n"):
                problems.append(f"{rel}: must end with exactly one newline (end-of-file-fixer)")
            if re.search(r"[ \t]+\r?$", text, flags=re.MULTILINE):
                problems.append(f"{rel}: trailing whitespace (trailing-whitespace)")
            if "\r\n" in text and "\n" in text.replace("\r\n", ""):
                problems.append(f"{rel}: mixed line endings (mixed-line-ending)")
            if n.endswith(".json"):
                try:
                    if text != _pretty_json(text):
                        problems.append(f"{rel}: not formatted as pretty-format-json --indent=4 --no-sort-keys")
                except ValueError as e:
                    problems.append(f"{rel}: invalid JSON ({e})")
            elif n.endswith((".yml", ".yaml")):
                try:
                    yaml.safe_load(text)
                except yaml.YAMLError as e:
                    problems.append(f"{rel}: invalid YAML (check-yaml): {str(e).splitlines()[0]}")
            elif n.endswith(".py"):
                problems.extend(f"{rel}:{p}" for p in _docstring_first(text))
            if os.stat(path).st_mode & 0o111 and not text.startswith("#!"):
                problems.append(f"{rel}: executable without a shebang (check-executables-have-shebangs)")
    return problems


def check_readme(root: str) -> list[str]:
    """zoo: ``docs/readme_template.md`` sections; links must resolve inside the archive."""
    problems = []
    with open(os.path.join(root, "docs", "README.md"), encoding="utf-8") as f:
        readme = f.read()
    headings = [re.sub(r"[*#_`]", "", ln).strip().lower() for ln in readme.splitlines() if ln.startswith("#")]
    for section in README_SECTIONS:
        if not any(h.startswith(section.lower()) for h in headings):
            problems.append(f"docs/README.md lacks the '{section}' section of the zoo template")
    # the zoo excludes bundles from its TorchScript check (exclude_verify_torchscript_list) and includes them in its
    # TensorRT check (include_verify_tensorrt_dict) by hand: the README must say what is supported
    for term in ("TorchScript", "TensorRT"):
        if term not in readme:
            problems.append(f"docs/README.md does not state whether {term} export is supported")
    for dirpath, _, names in os.walk(root):
        for n in names:
            if not n.endswith(".md"):
                continue
            path = os.path.join(dirpath, n)
            with open(path, encoding="utf-8") as f:
                for target in _local_links(f.read()):
                    dest = os.path.normpath(os.path.join(dirpath, target))
                    rel = os.path.relpath(path, root)
                    if not dest.startswith(root + os.sep) or not os.path.exists(dest):
                        problems.append(f"{rel}: link '{target}' points outside the archive or to a missing file")
    return problems


def zoo_requirements(meta: dict, allow_monai_rc: bool = True) -> list[str]:
    """The requirement lines ``ci/get_bundle_requirements.py`` writes for this metadata (re-implemented).

    The zoo's premerge sets ``ALLOW_MONAI_RC=true``: monai ``>=X rc1, <X+0.0.1``; torch, numpy and every
    ``required_packages_version`` / ``optional_packages_version`` entry pinned with ``==``.
    """
    libs = []
    if "monai_version" in meta:
        v = str(meta["monai_version"])
        parts = (v.split(".") + ["0", "0"])[:3]
        nxt = ".".join(parts[:2] + [str(int(parts[2]) + 1)])
        libs.append(f"monai>={v}rc1,<{nxt}" if allow_monai_rc else f"monai=={v}")
    if "pytorch_version" in meta:
        libs.append(f"torch=={meta['pytorch_version']}")
    if "numpy_version" in meta:
        libs.append(f"numpy=={meta['numpy_version']}")
    for key in ("optional_packages_version", "required_packages_version"):
        for name, version in meta.get(key, {}).items():
            libs.append(f"{name}=={version}")
    return libs


def _pip_platform_args() -> list[str]:
    tags = [f"manylinux_2_{g}_x86_64" for g in range(5, 36)] + ["manylinux2014_x86_64", "manylinux2010_x86_64",
                                                                   "manylinux1_x86_64"]
    return [a for t in tags for a in ("--platform", t)]


def check_requirements(meta: dict, python: tuple = PYTHONS, resolve: bool = True,
                       timeout: int = 600) -> tuple[list[str], list[str]]:
    """Pins that the zoo can install: returns (problems, notes). ``resolve``: dry-run ``pip install`` of the zoo's
    requirement lines for each Python version in ``python`` (binary wheels for manylinux x86-64, ``--pre`` as the
    zoo's premerge); the index must be reachable."""
    from packaging.requirements import InvalidRequirement, Requirement

    lines = zoo_requirements(meta)
    problems, notes = [], []
    for line in lines:
        try:
            req = Requirement(line)
        except InvalidRequirement as e:
            problems.append(f"requirement '{line}' is not valid: {e}")
            continue
        if req.name.replace("_", "-").lower() in (PACKAGE.replace("_", "-"), BUNDLE_NAME.replace("_", "-")):
            problems.append(f"requirement '{line}' names the bundle's own package, which no index has: its code must "
                            f"travel in scripts/")
        if "*" in str(req.specifier):
            problems.append(f"requirement '{line}' is not an exact pin")
    if problems or not resolve:
        if not resolve:
            notes.append("resolution skipped (--no-resolve)")
        return problems, notes
    with tempfile.TemporaryDirectory() as tmp:
        req_file = os.path.join(tmp, "requirements.txt")
        with open(req_file, "w") as f:
            f.write("\n".join(lines) + "\n")
        for py in python:
            cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--pre",
                   "--only-binary=:all:", "--python-version", str(py), *_pip_platform_args(),
                   "--target", os.path.join(tmp, "target"), "-r", req_file]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                problems.append(f"Python {py}: pip resolution timed out after {timeout} s")
                continue
            if proc.returncode != 0:
                err = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")] or proc.stderr.splitlines()[-1:]
                problems.append(f"Python {py}: the zoo's pins do not install: {err[0] if err else proc.returncode}")
            else:
                notes.append(f"Python {py}: resolves")
    return problems, notes


# ------------------------------------------------------------------------------------------------------ runner


def check_archive(archive: str, python: tuple = PYTHONS, resolve: bool = True, schema: str = SCHEMA,
                  skip: tuple = (), timeout: int = 900) -> list[str]:
    """Run every check on ``archive``; prints one line per check and returns the failures (empty: all passed).

    ``skip``: names of fresh-process checks to leave out (``workflows``, ``export``; for quick tests).
    """
    failures: list[str] = []

    def report(name: str, problems: list[str], status: str | None = None, detail: str = "") -> None:
        status = status or ("ok" if not problems else "FAIL")
        print(f"[{status}] {name}" + (f": {detail}" if detail else ""))
        for p in problems:
            print(f"error: {name}: {p}", file=sys.stderr)
        failures.extend(f"{name}: {p}" for p in problems)

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
        tops = [d for d in os.listdir(tmp) if os.path.isdir(os.path.join(tmp, d))]
        root = os.path.join(tmp, tops[0]) if len(tops) == 1 else tmp
        missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(root, f))]
        report("required files", [f"missing {f}" for f in missing])
        if missing:
            return failures
        large = set()
        try:
            import yaml

            with open(os.path.join(root, "large_files.yml")) as f:
                large = {item["path"] for item in (yaml.safe_load(f) or {}).get("large_files", [])}
        except Exception:  # reported by the pre-commit check (check-yaml)
            pass
        report("pre-commit hooks (JSON indent 4, YAML, whitespace, end of file, size, docstrings)",
               check_precommit(root, large))
        report("README sections and links (TorchScript, TensorRT stated)", check_readme(root))
        try:
            with open(os.path.join(root, "configs", "metadata.json")) as f:
                meta = json.load(f)
            problems, notes = check_requirements(meta, python=tuple(python or ()), resolve=resolve)
            report("requirements (zoo pins)", problems, detail="; ".join(notes + zoo_requirements(meta)))
        except ValueError as e:
            report("requirements (zoo pins)", [f"metadata.json unreadable: {e}"])

        cmd = [sys.executable, "-I", os.path.join(REPO, "bundle", "zoo_checks.py"), "--root", root,
               "--schema", schema]
        if skip:
            cmd += ["--skip", *skip]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp)  # not the root
        except subprocess.TimeoutExpired:
            report("zoo checks in a fresh process", [f"timed out after {timeout} s"])
            return failures
        results = []
        for line in proc.stdout.splitlines():
            try:
                results.append(json.loads(line))
            except ValueError:
                continue
        for r in results:
            if r["status"] == "n/a":
                report(r["check"], [], status="n/a", detail=r["detail"])
            else:
                report(r["check"], [r["detail"]] if r["status"] == "fail" else [], detail=r["detail"] if r["status"] == "ok" else "")
        if proc.returncode != 0 and not any(r["status"] == "fail" for r in results):
            tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
            report("zoo checks in a fresh process", [f"exited with {proc.returncode}: {tail[0]}"])
    print("archive check: " + ("passed" if not failures else f"{len(failures)} problem(s)"))
    return failures


def check(archive: str, python: tuple = PYTHONS, resolve: bool = True, schema: str = SCHEMA) -> None:
    """Check an archive; exit code 1 when a check fails."""
    if not os.path.isfile(str(archive)):
        raise SystemExit(f"error: archive not found: {archive}")
    if check_archive(str(archive), python=python, resolve=resolve, schema=schema):
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bundle.make_bundle", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="assemble the archive (and check it)")
    b.add_argument("--model", default=None,
                   help="trained weights: a state dict or a pretrained-format file (default: the package's pretrained "
                        "model, written as model.pt next to --out)")
    b.add_argument("--out", default="dist/ipear_registration.zip")
    b.add_argument("--weights-url", default="", help="download address of the weights for large_files.yml")
    b.add_argument("--include-weights", action="store_true", default=None,
                   help="pack models/model.pt even with --weights-url")
    b.add_argument("--no-check", action="store_true", help="do not check the archive")
    c = sub.add_parser("check", help="run the Model Zoo checks on an archive")
    c.add_argument("archive")
    c.add_argument("--schema", default=SCHEMA, help="metadata JSON schema (default: the shipped copy)")
    for p in (b, c):
        p.add_argument("--python", nargs="+", default=list(PYTHONS), help="Python versions the pins must install on")
        p.add_argument("--no-resolve", action="store_true", help="skip the pip resolution (needs the package index)")
    args = ap.parse_args(argv)
    if args.command == "build":
        build(model=args.model, out=args.out, weights_url=args.weights_url, include_weights=args.include_weights,
              check=not args.no_check, python=tuple(args.python), resolve=not args.no_resolve)
    else:
        check(args.archive, python=tuple(args.python), resolve=not args.no_resolve, schema=args.schema)
    return 0


if __name__ == "__main__":
    sys.exit(main())
