"""Export a trained model's feature graph for a runtime without the training stack.

    patchlab export SOURCE --format onnx|openvino --out DIR

SOURCE is what predict takes (run id, runs:/ or models:/ URI, run folder, bank file). DIR gets
embedding.onnx (or embedding.xml + .bin): every backbone member and its patch aggregation as
one graph with a dynamic batch axis and one output per member, and beside it the unchanged
memory_bank.safetensors (banks, config, preprocessing and decisions). Search and reweighting
stay outside the graph, so its size does not depend on the bank. Then:
patchlab predict DIR INPUT... --engine onnx --out OUT
"""

import shutil
import tempfile
from pathlib import Path

from patchlab.artifacts.bank import BANK_FILE
from patchlab.artifacts.store import given_tracking_uri
from patchlab.deploy.engines import (
    GRAPH_ENGINES,
    ONNX_FILE,
    OPENVINO_FILE,
    export_onnx,
    export_openvino,
    import_extra,
)
from patchlab.deploy.loading import fetch_source, input_unit, load_detector
from patchlab.errors import command_parser, exit_on_user_error

EXPORT_EXTRAS = {"onnx": ["onnx"], "openvino": ["onnx", "openvino"]}  # what writing each needs


def export(bank_path: Path, fmt: str, out: Path, weights: str | None = None) -> Path:
    """Writes the graph and the bank into `out`; returns the graph's path."""
    detector, cfg, _ = load_detector(bank_path, "torch", weights)
    out.mkdir(parents=True, exist_ok=True)
    if bank_path.resolve() != (out / BANK_FILE).resolve():
        shutil.copyfile(bank_path, out / BANK_FILE)
    onnx_path = out / ONNX_FILE
    export_onnx(detector.embedder, input_unit(detector, cfg), onnx_path)
    if fmt == "onnx":
        return onnx_path
    export_openvino(onnx_path, out / OPENVINO_FILE)
    onnx_path.unlink()
    return out / OPENVINO_FILE


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = command_parser("export", __doc__)
    parser.add_argument("source")
    parser.add_argument("--format", required=True, choices=list(GRAPH_ENGINES))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tracking-uri", default=None, help="default: as train.py resolves it")
    parser.add_argument("--weights", default=None, help="override the backbone's weights source")
    args = parser.parse_args(argv)
    for module in EXPORT_EXTRAS[args.format]:  # a missing extra before any loading
        import_extra(module)
    uri = given_tracking_uri(args.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        graph = export(
            fetch_source(args.source, uri, Path(tmp)), args.format, args.out, args.weights
        )
    print(f"wrote {graph} and {args.out / BANK_FILE}")


if __name__ == "__main__":
    main()
