"""resnet-det: the distribution's own package.

- ``resnet_det_common``: the bottom layer every package uses (autocast, atomic file writes,
  distributed helpers, RNG states); it imports nothing else of this project.
- ``resnet_det.cli``: the ``resnet-det`` command (``python -m resnet_det``), the top layer.
- ``resnet_det.studies``: experiments (the paper study, the CIFAR-10 degradation study, the
  benchmark harness) that the library never imports.
- ``resnet_det.configs``: the shipped YAML configs (package data; the repository's ``configs/``).

The library itself is ``backbone`` <- ``detection`` <- ``segmentation``; see ARCHITECTURE.md.
"""

__version__ = "0.3.0"
