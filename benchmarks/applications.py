"""The keras.applications models the benchmarks run (no flags here: importable from any of them)."""

# name: (keras.applications builder, the smallest input side it accepts)
ZOO = {
    "resnet50": ("ResNet50", 32), "inception_v3": ("InceptionV3", 75), "vgg16": ("VGG16", 32),
    "mobilenet_v2": ("MobileNetV2", 32), "mobilenet": ("MobileNet", 32), "mobilenet_v3_small": ("MobileNetV3Small", 32),
    "resnet50_v2": ("ResNet50V2", 32), "densenet121": ("DenseNet121", 32), "xception": ("Xception", 71),
    "inception_resnet_v2": ("InceptionResNetV2", 75), "nasnet_mobile": ("NASNetMobile", 32),
    "efficientnet_b0": ("EfficientNetB0", 32), "efficientnet_v2_b0": ("EfficientNetV2B0", 32),
    "convnext_tiny": ("ConvNeXtTiny", 32), "mobilenet_v3_large": ("MobileNetV3Large", 32),
}
