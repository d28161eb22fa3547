from setuptools import find_packages, setup

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
        "twisted>=23.10,<27",
        "treq>=23.11,<27",
        "txredisapi>=1.4.10,<2",
        "hiredis>=2.0,<4",
        "psycopg2-binary>=2.9,<3",
        "prometheus-client>=0.17,<1",
        "pyyaml>=6.0,<7",
        "klein>=23.5,<25",
        "python-dotenv>=1.0,<2",
        "attrs>=22.2",
    ],
    extras_require={
        "test": [
            "pytest>=7.4,<10",
            "pytest-twisted>=1.14,<2",
            "hypothesis>=6.80,<7",
        ],
    },
)
