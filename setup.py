"""Maps the top-level code folders to the ``ember.*`` subpackages (DESIGN.md: repository layout).

``graphs/``, ``compiler/``, ``runtime/`` and ``tools/`` install as ``ember.graphs`` ... ``ember.tools``;
``ember`` itself is a namespace package, so nothing is installed under a generic name like ``tools``.
Everything else about the project lives in pyproject.toml.
"""
from setuptools import find_packages, setup

FOLDERS = ("graphs", "compiler", "runtime", "tools")

packages, package_dir = [], {}
for folder in FOLDERS:
    for sub in [""] + find_packages(folder):
        name = f"ember.{folder}" + (f".{sub}" if sub else "")
        packages.append(name)
        package_dir[name] = folder + ("/" + sub.replace(".", "/") if sub else "")

setup(packages=packages, package_dir=package_dir, include_package_data=True,
      package_data={"ember.graphs": ["**/*.json"], "ember.tools": ["**/*.txt"]})
