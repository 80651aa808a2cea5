"""Export a trained model's feature graph for a runtime without the training stack.

    python -m patchlab.export SOURCE --format onnx|openvino --out DIR

SOURCE is what predict takes (run id, runs:/ or models:/ URI, run folder, bank file). DIR gets
embedding.onnx (or embedding.xml + .bin): backbone and patch aggregation as one graph with a
dynamic batch axis, and beside it the unchanged memory_bank.safetensors (bank, config,
preprocessing and decisions). Search and reweighting stay outside the graph, so its size does
not depend on the bank. Then: python -m patchlab.predict DIR INPUT... --engine onnx --out OUT
"""

import argparse
import shutil
import tempfile
from pathlib import Path

from patchlab.deploy.engines import (
    ONNX_FILE,
    OPENVINO_FILE,
    export_onnx,
    export_openvino,
    patch_embedding,
)
from patchlab.deploy.loading import deployable_config, fetch_source
from patchlab.errors import exit_on_user_error
from patchlab.outputs import BANK_FILE, check_bank, read_bank
from patchlab.tracking.runs import default_tracking_uri


def export(bank_path: Path, fmt: str, out: Path, weights: str | None = None) -> Path:
    """Writes the graph and the bank into `out`; returns the graph's path."""
    bank, metadata = read_bank(bank_path)
    cfg = deployable_config(bank_path, metadata)
    embedding = patch_embedding(cfg, weights)
    check_bank(bank_path, bank, metadata, embedding.feature_dim)
    out.mkdir(parents=True, exist_ok=True)
    if bank_path.resolve() != (out / BANK_FILE).resolve():
        shutil.copyfile(bank_path, out / BANK_FILE)
    onnx_path = out / ONNX_FILE
    export_onnx(embedding, int(cfg.data.crop_size), onnx_path)
    if fmt == "onnx":
        return onnx_path
    export_openvino(onnx_path, out / OPENVINO_FILE)
    onnx_path.unlink()
    return out / OPENVINO_FILE


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m patchlab.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source")
    parser.add_argument("--format", required=True, choices=["onnx", "openvino"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tracking-uri", default=None, help="default: as train.py resolves it")
    parser.add_argument("--weights", default=None, help="override the backbone's weights source")
    args = parser.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri()
    with tempfile.TemporaryDirectory() as tmp:
        graph = export(
            fetch_source(args.source, uri, Path(tmp)), args.format, args.out, args.weights
        )
    print(f"wrote {graph} and {args.out / BANK_FILE}")


if __name__ == "__main__":
    main()
