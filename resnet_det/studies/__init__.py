"""Experiments built on the library, which never imports them.

- :mod:`resnet_det.studies.paper`: the ResNet paper's VGG-16 -> ResNet-101 swap in Faster R-CNN on COCO
  (Table 8); ``resnet-det paper-study``.
- :mod:`resnet_det.studies.degradation`: the CIFAR-10 degradation study (plain vs residual nets,
  Fig. 6 / Table 6); ``resnet-det degradation-study``.
- :mod:`resnet_det.studies.benchmark`: speed and memory of our Faster R-CNN against torchvision's;
  ``resnet-det benchmark``.
"""
