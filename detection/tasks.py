"""Moved to `resnet_det.tasks.detection` in 0.3: `detection.tasks` and its submodules stay aliases of the new
modules, with a DeprecationWarning, until 0.4; import `resnet_det.tasks.detection`."""

from resnet_det_common.moved import alias_module

alias_module(__name__, "resnet_det.tasks.detection")
