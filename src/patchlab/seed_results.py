"""The seed notebook's per-category numbers (EfficientNet-B5, anomalib 0.7), to compare against."""

SEED_METRICS = ("image_auroc", "pixel_auroc", "pixel_f1_max")

SEED_RESULTS: dict[str, tuple[float, float, float]] = {
    "bottle": (1.0000, 0.9640, 0.6342),
    "cable": (0.9878, 0.9740, 0.5952),
    "capsule": (0.9154, 0.9837, 0.4922),
    "carpet": (0.9992, 0.9836, 0.5527),
    "grid": (0.9641, 0.9533, 0.2385),
    "hazelnut": (0.9993, 0.9810, 0.5772),
    "leather": (1.0000, 0.9820, 0.3537),
    "metal_nut": (1.0000, 0.9689, 0.7745),
    "pill": (0.9569, 0.9528, 0.6050),
    "screw": (0.9309, 0.9724, 0.2910),
    "tile": (0.9870, 0.9443, 0.6046),
    "toothbrush": (0.9889, 0.9799, 0.5543),
    "transistor": (0.9987, 0.9780, 0.7013),
    "wood": (0.9798, 0.9083, 0.4600),
    "zipper": (0.9947, 0.9703, 0.4844),
}
