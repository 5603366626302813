"""The one build setting pyproject.toml cannot express: the package list with the configs in it.

The repository keeps its configs at the top level (``configs/``); installed, they are the package data
folder ``resnet_det/configs`` (``[tool.setuptools.package-dir]`` and ``package-data`` in
pyproject.toml), so ``resnet-det train shapes/faster_rcnn_R_50_FPN`` works from any folder. A mapped
folder must be listed as a package, and pyproject's ``packages.find`` cannot add to what it discovers:
hence the list here, the discovered code packages plus ``resnet_det.configs`` and its subfolders.
"""

from setuptools import find_namespace_packages, setup

CODE = find_namespace_packages(include=["backbone*", "detection*", "segmentation*", "resnet_det*"])
CONFIGS = ["resnet_det.configs", *(f"resnet_det.configs.{name}" for name in find_namespace_packages("configs"))]

setup(packages=[*CODE, *CONFIGS])
