"""Moved to `resnet_det_common` in 0.3: `resnet_det.common` and its submodules stay aliases of the new modules, with
a DeprecationWarning, until 0.4; import `resnet_det_common`."""

from resnet_det_common.moved import alias_module

alias_module(__name__, "resnet_det_common")
