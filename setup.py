from pathlib import Path

from setuptools import find_packages, setup

try:
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # setuptools < 64 uses `setup.py develop`, which already works
    editable_wheel = None


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
        entry = str(Path(self._project_dir).resolve())
        wheel.writestr(f"__editable__.{self._name}.pth", f"{entry}\n".encode())

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None


cmdclass = {}
if editable_wheel is not None:

    class _EditableWheel(editable_wheel):
        def _select_strategy(self, name, tag, *args, **kwargs):
            # An explicit --config-settings editable_mode=... still wins.
            if self.mode:
                return super()._select_strategy(name, tag, *args, **kwargs)
            return _ProjectRootPth(name, self.project_dir)

    cmdclass["editable_wheel"] = _EditableWheel

setup(
    name="apigw",
    version="0.1.0",
    description="An event-driven API gateway on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # twisted.plugins carries our dropin; it has no __init__.py of ours.
    packages=find_packages(exclude=["tests", "tests.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/apigw_plugin.py"]},
    install_requires=[
        # 26.10: HTTPChannel refuses CR and LF in header values (26.4 let a
        # bare CR through to the upstream; tests/test_hostile.py), and Site
        # takes parsePOSTFormSubmission (25.5). No upper bound: what apigw takes
        # from Twisted's internals is in apigw/_twisted_compat.py, and
        # tests/test_twisted_compat.py fails by name when a release moves it.
        "twisted[tls]>=26.10",
        "treq>=23.11,<27",
        "txredisapi>=1.4.10,<2",
        "hiredis>=2.0,<4",
        "psycopg2-binary>=2.9,<3",
        "prometheus-client>=0.17,<1",
        "pyyaml>=6.0,<7",
        "klein>=23.5,<25",
        "python-dotenv>=1.0,<2",
        "attrs>=22.2",
        # The upstream client's framing: llhttp, Node's HTTP parser.
        "httptools>=0.6,<1",
    ],
    entry_points={
        "console_scripts": ["apigw-demo-backends = apigw.demo:main"],
    },
    cmdclass=cmdclass,
    extras_require={
        "test": [
            "pytest>=7.4,<10",
            "pytest-twisted>=1.14,<2",
            "hypothesis>=6.80,<7",
            "pytest-timeout>=2.1,<3",
        ],
    },
)
