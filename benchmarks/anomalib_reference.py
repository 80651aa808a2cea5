"""anomalib 2.7's PatchCore on bottle with the same backbone, layers and weights, for comparison.

anomalib is not a dependency of this project; run this in a separate environment:

    python -m venv /tmp/anomalib && . /tmp/anomalib/bin/activate
    pip install torch==2.14.1 torchvision==0.29.1 anomalib==2.7.0 timm safetensors
    python benchmarks/anomalib_reference.py --crop 224     # the seed recipe: 256 -> crop 224
    python benchmarks/anomalib_reference.py --crop 0       # anomalib's default: 256, no crop

The weights are the EfficientNet-Lite2 file patchlab converts and caches on its first run
(`backbone=efficientnet_lite2`), so both projects start from identical tensors.
"""

import argparse
from pathlib import Path

from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.models import Patchcore
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = Path.home() / ".cache" / "patchlab" / "tf_efficientnet_lite2.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--crop", type=int, default=224, help="center crop; 0 for none")
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--root", type=Path, default=ROOT.parent / "shared" / "data" / "mvtec_ad")
    args = parser.parse_args()
    crop = (args.crop, args.crop) if args.crop else None
    model = Patchcore(
        backbone="tf_efficientnet_lite2",
        layers=["blocks.2", "blocks.4"],
        pre_trained=False,
        coreset_sampling_ratio=args.coreset_ratio,
        num_neighbors=9,
        pre_processor=Patchcore.configure_pre_processor((256, 256), crop),
    )
    extractor = model.model.feature_extractor.feature_extractor
    own = extractor.state_dict()
    extractor.load_state_dict({k: v for k, v in load_file(WEIGHTS).items() if k in own})
    datamodule = MVTecAD(root=args.root, category="bottle", num_workers=2)
    engine = Engine(default_root_dir=f"/tmp/anomalib-reference-{args.crop}", logger=False)
    engine.fit(model=model, datamodule=datamodule)
    engine.test(model=model, datamodule=datamodule)


if __name__ == "__main__":
    main()
