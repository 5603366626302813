"""Segmentation heads on top of the detector: Mask R-CNN instance masks and a semantic FPN head."""
