"""Moved to `resnet_det.config` in 0.3: `detection.config` and its submodules stay aliases of the new modules, with a
DeprecationWarning, until 0.4; import `resnet_det.config`."""

from resnet_det_common.moved import alias_module

alias_module(__name__, "resnet_det.config")
