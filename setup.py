"""Only the editable-install strategy; the metadata lives in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.editable_wheel import editable_wheel


class _ProjectRootPth:
    """
    Editable strategy writing a .pth that puts the project root on sys.path.

    setuptools' default editable install for a flat layout is an import-hook
    finder, and twisted.plugins discovers dropins only by scanning sys.path
    for twisted/plugins directories, so `twistd --help` would not list apigw.
    """

    def __init__(self, name, project_dir):
        self._name = name
        self._project_dir = project_dir

    def __call__(self, wheel, files, mapping):
        entry = str(Path(self._project_dir, "src").resolve())
        wheel.writestr(f"__editable__.{self._name}.pth", f"{entry}\n".encode())

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None


class _EditableWheel(editable_wheel):
    def _select_strategy(self, name, tag, *args, **kwargs):
        # An explicit --config-settings editable_mode=... still wins.
        if self.mode:
            return super()._select_strategy(name, tag, *args, **kwargs)
        return _ProjectRootPth(name, self.project_dir)


setup(cmdclass={"editable_wheel": _EditableWheel})
