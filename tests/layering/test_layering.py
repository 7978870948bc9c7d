"""The layering DESIGN.md states, checked on the source and on real imports.

* Dependencies point one way: graphs <- compiler <- runtime <- tools (no module imports a layer above it).
* No import circle among the runtime's modules, counting imports made inside functions (a late import that
  closes a circle is how a module reaches a global registry as a service locator).
* Every runtime module imports on its own, in a fresh interpreter (an import circle that Python cannot
  resolve fails there, whichever module comes first).
* ``import ember.runtime`` does not import the compiler: a deployment that loads artifacts needs none of it;
  the compiler is imported by compile-on-first-use only.
"""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from .import_graph import find_cycle, import_graph, imports_of, modules

LAYERS = ("graphs", "compiler", "runtime", "tools")


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_no_layer_imports_one_above_it(layer):
    above = tuple(f"ember.{name}" for name in LAYERS[LAYERS.index(layer) + 1:])
    upward = {name: sorted(m for m in imports_of(name, path) if m.startswith(above))
              for name, path in modules(layer).items()}
    assert {k: v for k, v in upward.items() if v} == {}


def test_no_import_circle_in_the_runtime():
    assert find_cycle(import_graph("runtime")) is None


def test_no_import_circle_anywhere():
    assert find_cycle(import_graph(*LAYERS)) is None


def _import_alone(module: str) -> tuple[str, str]:
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    return module, (result.stderr.strip().splitlines() or [""])[-1] if result.returncode else ""


def test_every_runtime_module_imports_alone():
    names = sorted(modules("runtime"))
    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = {m: error for m, error in pool.map(_import_alone, names) if error}
    assert failures == {}


@pytest.mark.parametrize("module", ["ember.runtime", "ember.runtime.pipelines"])
def test_runtime_import_does_not_import_the_compiler(module):
    code = (f"import sys, {module}; "
            "print(sorted(m for m in sys.modules if m.startswith(('ember.compiler', 'onnx_ir', 'onnx.'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_running_a_compiled_artifact_needs_none_of_the_compiler(tmp_path):
    """The deployment path: a registry that does not compile loads an artifact and generates; of the compiler only
    the artifact format (``ember.compiler.artifact``, its hashing and its lock) is imported, never its passes or
    targets."""
    from ..reference.tiny_models import make_model
    from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig

    make_model("llama-gqa-llama3", tmp_path / "model")
    artifact = PIPELINE_REGISTRY.resolve(PipelineConfig(model_path=tmp_path / "model", cache_dir=tmp_path)).artifact
    code = ("import sys\n"
            "from ember.runtime.pipelines import BUILTIN_ARCHITECTURES, PipelineConfig, PipelineRegistry\n"
            "from ember.runtime.pipelines.registry import load_compiled_artifact\n"
            "registry = PipelineRegistry(BUILTIN_ARCHITECTURES, artifacts=load_compiled_artifact)\n"
            f"_, pipeline = registry.retrieve(PipelineConfig(model_path={str(artifact.path)!r}, max_batch_size=1))\n"
            "assert len(pipeline.generate_tokens([[1, 5, 9]])[0]) > 0\n"
            "print(sorted(m for m in sys.modules if m.startswith('ember.compiler')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("['ember.compiler', 'ember.compiler.artifact', 'ember.compiler.artifact_lock', "
                                     "'ember.compiler.hashing']")
