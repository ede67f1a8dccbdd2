"""`python -m cifar_tl.export_onnx --model DIR_OR_HUB_ID --output model.onnx`: write a model as one ONNX graph,
uint8 thumbnails [B, 3, data_size, data_size] in, fine-class logits out, with config.json in its metadata
(`onnx_backend.export_onnx`; `python app.py --model model.onnx` and `cifar_tl.predict` run it)."""
from __future__ import annotations

import sys
from pathlib import Path

from .console import FlagParser, error_line
from .files import WriteError


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(prog="python -m cifar_tl.export_onnx", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder or Hugging Face Hub id")
    parser.add_argument("--output", required=True, type=Path, help="where to write the .onnx file")
    args = parser.parse_args(argv)
    if args.output.suffix.lower() != ".onnx":  # every loader tells an ONNX file by its suffix
        parser.error(f"--output {args.output}: name the file *.onnx (the demo, predict and evaluate take it by "
                     "that name)")
    if args.model.lower().endswith(".onnx"):
        parser.error(f"--model {args.model}: already an ONNX file; give the model folder or Hub id it came from")
    if not args.output.parent.is_dir():  # as predict --output: a mistyped folder is not created silently
        return error_line(f"--output {args.output}: no folder {args.output.parent}")
    from .loading import ModelLoadError, load_predictor  # torch: seconds to import, not needed for --help
    from .onnx_backend import INPUT_NAME, OUTPUT_NAME, export_onnx

    try:
        predictor = load_predictor(args.model, device="cpu")
    except ModelLoadError as err:
        return error_line(err)
    try:
        path = export_onnx(predictor, args.output)
    except WriteError as err:  # a full disk, a read-only folder: the file and the reason
        return error_line(err)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): input '{INPUT_NAME}' uint8 "
          f"[batch, 3, {predictor.data_size}, {predictor.data_size}], output '{OUTPUT_NAME}' "
          f"[batch, {len(predictor.fine_names)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
