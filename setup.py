"""Package discovery that pyproject.toml alone cannot express: the repo's top-level ``datasets/`` folder
(dataset cards and their loaders) is installed as the import package ``ctrlab_datasets``."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["ctrlab", "ctrlab.*"]) + ["ctrlab_datasets"],
    package_dir={"ctrlab_datasets": "datasets"},
    package_data={"ctrlab_datasets": ["*.yaml"], "ctrlab": ["py.typed"]},
)
