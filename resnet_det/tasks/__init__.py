"""What a task is, per package: the detection tasks (`resnet_det.tasks.detection`) and the segmentation tasks
(`resnet_det.tasks.segmentation`). Only the command line and the tests import them."""
