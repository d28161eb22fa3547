"""
Build a wheel, install it into a fresh virtualenv, and ask twistd and the
apigw command about it; then the same with an editable install.

These are the slow tests of the suite (a venv, a wheel build and pip
installs, about 30 s with a warm pip cache): they are the only proof that the
src/ layout with no custom setuptools command ships the dropin in
src/twisted/plugins/ in the wheel, that a default editable install still lets
twisted.plugins find it by scanning sys.path, and that the package data and
console scripts are there.
"""

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parent.parent
# What a wheel is built from; the rest of the tree (tests, .venv, build
# output of earlier runs) would only slow the copy down or leak stale files.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "src")
PIP_TIMEOUT_S = 240
TWISTD_TIMEOUT_S = 60


def _clean_env():
    env = dict(os.environ)
    # The outer venv must not leak into the one under test.
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP"):
        env.pop(name, None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(argv, cwd, timeout_s):
    result = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=_clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout_s,
    )
    assert result.returncode == 0, f"{argv} exited {result.returncode}:\n{result.stdout}"
    return result.stdout


def _copy_project(dest):
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
    for name in SOURCES:
        src = PROJECT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A virtualenv with pip and nothing of ours installed, and a copy of the project."""
    root = tmp_path_factory.mktemp("packaging")
    # The system python3 the machine has, not the project's .venv interpreter.
    base = getattr(sys, "_base_executable", None) or sys.executable
    env_dir = root / "venv"
    _run([base, "-m", "venv", env_dir], cwd=root, timeout_s=120)
    source = root / "src"
    source.mkdir()
    _copy_project(source)
    return root, env_dir / "bin", source


def _site_packages(bin_dir):
    out = _run(
        [bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        cwd=bin_dir,
        timeout_s=TWISTD_TIMEOUT_S,
    )
    return Path(out.strip())


def _assert_twistd_knows_apigw(root, bin_dir):
    listing = _run([bin_dir / "twistd", "--help"], cwd=root, timeout_s=TWISTD_TIMEOUT_S)
    commands = [line.split()[0] for line in listing.splitlines() if line.startswith("    ")]
    assert "apigw" in commands, listing
    usage = _run([bin_dir / "twistd", "apigw", "--help"], cwd=root, timeout_s=TWISTD_TIMEOUT_S)
    for option in ("--config=", "--port=", "--admin-port=", "--access-log="):
        assert option in usage, usage
    assert "gateway_config.yaml" in usage and "tcp:8000" in usage, usage


def _version():
    namespace = {}
    exec((PROJECT / "src" / "apigw" / "__init__.py").read_text(), namespace)
    return namespace["__version__"]


def test_wheel_install_has_the_dropin_the_commands_and_the_starter_config(fresh_venv):
    """When a wheel is built and installed into a fresh venv, twistd lists apigw and the apigw command works."""
    root, bin_dir, source = fresh_venv
    dist = root / "dist"
    _run([bin_dir / "pip", "wheel", "--no-deps", "-w", dist, source], cwd=root,
         timeout_s=PIP_TIMEOUT_S)
    (wheel,) = dist.glob("apigw-*.whl")
    assert wheel.name.startswith(f"apigw-{_version()}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/apigw_plugin.py" in names
    assert "apigw/starter_config.yaml" in names and "apigw/cli.py" in names
    # The admin page is served from the installed package.
    for asset in ("index.html", "app.css", "app.js"):
        assert f"apigw/admin_ui/{asset}" in names, names
    # twisted and twisted.plugins are Twisted's; an __init__.py of ours would shadow them.
    assert not [n for n in names if n.startswith("twisted/") and n.endswith("__init__.py")]
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n], names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names

    _run([bin_dir / "pip", "install", wheel], cwd=root, timeout_s=PIP_TIMEOUT_S)
    assert (_site_packages(bin_dir) / "twisted" / "plugins" / "apigw_plugin.py").is_file()
    _assert_twistd_knows_apigw(root, bin_dir)
    version = _run([bin_dir / "apigw", "version"], cwd=root, timeout_s=TWISTD_TIMEOUT_S)
    assert version.strip() == f"apigw {_version()}"
    work = root / "init"
    work.mkdir()
    _run([bin_dir / "apigw", "init"], cwd=work, timeout_s=TWISTD_TIMEOUT_S)
    assert (work / "gateway_config.yaml").read_bytes() == \
        (PROJECT / "src" / "apigw" / "starter_config.yaml").read_bytes()
    _run([bin_dir / "apigw", "check"], cwd=work, timeout_s=TWISTD_TIMEOUT_S)
    usage = _run([bin_dir / "apigw-demo-backends", "--help"], cwd=root, timeout_s=TWISTD_TIMEOUT_S)
    assert "--port1" in usage and "--port2" in usage, usage


def test_test_tools_are_an_extra_not_a_dependency(fresh_venv):
    """When the installed metadata is read, treq and pytest are required only by the test extra."""
    root, bin_dir, _ = fresh_venv
    out = _run([bin_dir / "python", "-c",
                "import importlib.metadata as m; print('\\n'.join(m.requires('apigw')))"],
               cwd=root, timeout_s=TWISTD_TIMEOUT_S)
    requires = out.splitlines()
    for tool in ("treq", "pytest"):
        mine = [r for r in requires if r.split(">")[0].split("<")[0].strip() == tool]
        assert mine and all('extra == "test"' in r for r in mine), requires
    assert any(r.startswith("twisted[tls]") and "extra" not in r for r in requires), requires


def test_editable_install_lists_apigw_in_twistd(fresh_venv):
    """When the project is installed with pip -e into a fresh venv, twistd still lists apigw and its options."""
    root, bin_dir, source = fresh_venv
    _run([bin_dir / "pip", "uninstall", "-y", "apigw"], cwd=root, timeout_s=PIP_TIMEOUT_S)
    _run([bin_dir / "pip", "install", "-e", source], cwd=root, timeout_s=PIP_TIMEOUT_S)
    site = _site_packages(bin_dir)
    # Otherwise the dropin could have been found through a stale copy left by
    # the wheel install rather than through the editable install.
    assert not (site / "twisted" / "plugins" / "apigw_plugin.py").exists()
    _assert_twistd_knows_apigw(root, bin_dir)
    version = _run([bin_dir / "apigw", "version"], cwd=root, timeout_s=TWISTD_TIMEOUT_S)
    assert version.strip() == f"apigw {_version()}"
