"""Build hook: the admin files (exim/, contrib/...) go into the wheel as exim_policy/share/.

They live once in the source tree, at its top (the tests and the docs name them there);
``build_py`` copies the ones exim_policy/admin_files.py lists into the built package, so
that ``pip install .`` and ``python -m build`` (through the sdist, see MANIFEST.in) both
ship them, and an installed exim-policy finds them with importlib.resources. Everything
else is in pyproject.toml.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _admin_files():
    """exim_policy/admin_files.py, loaded by path (the package is not installed yet)."""
    name = "_exim_policy_admin_files"
    spec = importlib.util.spec_from_file_location(name, HERE / "exim_policy" / "admin_files.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses looks its module up
    spec.loader.exec_module(module)
    return module


class BuildPyWithAdminFiles(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads them from the checkout itself
        admin = _admin_files()
        target = Path(self.build_lib, "exim_policy", admin.PACKAGE_DIR)
        shutil.rmtree(target, ignore_errors=True)  # nothing left from an older build
        for relative in admin.shipped_files(HERE):
            dest = target / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(HERE / relative, dest)


setup(cmdclass={"build_py": BuildPyWithAdminFiles})
