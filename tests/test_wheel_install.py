"""The package as an admin gets it: an sdist of the source tree, a wheel built from that sdist
(what ``python -m build`` does), installed into a fresh venv and run from a directory
outside the checkout. The admin files must come from the installed package, equal to the
checkout's (the copy of it the sdist was made from), and the copied example configuration
must pass check-config.

Offline: the build uses this venv's setuptools (no build isolation), and the new venv
reaches this venv's packages for the wheel's dependencies through a .pth file.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from exim_policy.admin_files import shipped_files

REPO = Path(__file__).resolve().parents[1]
#: top-level entries of the checkout that no build reads
NOT_SOURCE = {".git", ".venv", "build", "dist", "tests", "bench", "docs", ".pytest_cache",
              ".hypothesis", ".ci"}
TIMEOUT = 120


@dataclass(frozen=True)
class Installed:
    source: Path  # the copy of the checkout the sdist was made from
    venv: Path
    workdir: Path  # outside the checkout: the cwd of every command

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        return subprocess.run(list(argv), cwd=self.workdir, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT)

    def exim_policy(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.venv / "bin" / "exim-policy"), *args)

    def python(self, code: str) -> str:
        result = self.run(str(self.venv / "bin" / "python"), "-c", code)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()


def _ignore_outside_the_source(directory: str, names: list[str]) -> set[str]:
    top = NOT_SOURCE if Path(directory) == REPO else set()
    return {n for n in names if n in top or n == "__pycache__" or n.endswith(".egg-info")}


def _backend(source: Path, hook: str, outdir: Path) -> Path:
    """Run the PEP 517 ``hook`` (build_sdist, build_wheel) of ``source`` into ``outdir``."""
    outdir.mkdir()
    code = f"import sys; from setuptools import build_meta; print(build_meta.{hook}(sys.argv[1]))"
    result = subprocess.run([sys.executable, "-c", code, str(outdir)], cwd=source,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return outdir / result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel-install")
    source = base / "source"
    shutil.copytree(REPO, source, ignore=_ignore_outside_the_source)
    sdist = _backend(source, "build_sdist", base / "sdist")
    with tarfile.open(sdist) as archive:  # the "data" filter where this Python has it
        archive.extractall(base / "unpacked",
                           **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    [unpacked] = (base / "unpacked").iterdir()
    wheel = _backend(unpacked, "build_wheel", base / "wheel")

    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=TIMEOUT)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True,
                               timeout=TIMEOUT).stdout.strip())
    # the wheel's dependencies: this venv's (only .pth files in site dirs are read, so the
    # editable install of the checkout that lives there is not)
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                          "install", "--no-deps", "--no-index", "--disable-pip-version-check",
                          "-q", str(wheel)], capture_output=True, text=True, timeout=TIMEOUT)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    workdir = base / "elsewhere"
    workdir.mkdir()
    return Installed(source, venv, workdir)


def test_the_package_runs_from_the_venv_not_the_checkout(installed):
    package = Path(installed.python("import exim_policy; print(exim_policy.__file__)"))
    assert package.is_relative_to(installed.venv)


def test_importlib_resources_finds_the_exim_config_in_the_installed_package(installed):
    path = Path(installed.python(
        "import importlib.resources as r\n"
        "print(r.files('exim_policy') / 'share' / 'exim' / 'acl_data.conf')"))
    assert path.is_relative_to(installed.venv) and path.is_file()
    assert path.read_bytes() == (installed.source / "exim" / "acl_data.conf").read_bytes()
    exim_dir = Path(installed.python(
        "from exim_policy.lab.exim import find_exim_dir; print(find_exim_dir())"))
    assert exim_dir == path.parent


def test_files_lists_the_installed_copies(installed):
    result = installed.exim_policy("files")
    assert result.returncode == 0, result.stderr
    header, *paths = result.stdout.splitlines()
    assert header.startswith(f"# {installed.venv}/") and "(installed package data)" in header
    assert tuple(paths) == shipped_files(installed.source)


def test_files_copy_then_check_config_on_the_example(installed):
    target = installed.workdir / "etc"
    result = installed.exim_policy("files", "--copy", str(target))
    assert result.returncode == 0, result.stderr
    for relative in shipped_files(installed.source):
        assert (target / relative).read_bytes() == (installed.source / relative).read_bytes(), \
            relative
    example = target / "contrib" / "config.example.toml"
    check = installed.exim_policy("check-config", "--quiet", "--config", str(example))
    assert check.returncode == 0, check.stderr


def test_files_show_prints_the_installed_file(installed):
    result = installed.exim_policy("files", "--show", "contrib/systemd/exim-policy.service")
    assert result.returncode == 0, result.stderr
    shipped = installed.source / "contrib" / "systemd" / "exim-policy.service"
    assert result.stdout == shipped.read_text()


@pytest.mark.real
def test_demo_runs_from_the_installed_package(installed):
    """The demo's Exim runs the installed exim/ configuration: no checkout needed."""
    if os.geteuid() != 0:
        pytest.fail("the demo must run as root", pytrace=False)
    from exim_policy.lab.scenarios import scenarios

    result = installed.exim_policy("demo")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    total = len(scenarios())
    assert f"{total} of {total} scenarios as expected" in out, out
