"""Move trained HRM weights between hrm_jax, PyTorch, ONNX and TensorRT.

  python -m export torch --checkpoint runs/sudoku-.../best --out model.safetensors
  python -m export from-torch step_26040 --preset sudoku_extreme --out converted/
  python -m export onnx --checkpoint runs/sudoku-.../best --out model.onnx
  python -m export onnx --model pretrained --out sudoku.onnx        # the shipped Sudoku model
  python -m export tensorrt --onnx model.onnx --out model.engine --fp16

`torch` writes a state dict with the reference's key names (sapientinc/HRM), which its
`pretrain.py` and export/torch_model.py load; `from-torch` reads one (also the released
checkpoints, `_orig_mod.` prefixes and all) into a params-only orbax checkpoint that
`python -m experiments.sudoku eval|solve --checkpoint` accept. `onnx` writes the full-solve graph
to --out and the one-segment graph beside it (model.segment.onnx), then checks the export against
the torch module with onnxruntime. `tensorrt` builds an engine from the solve graph.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from hrm_jax import cli
from hrm_jax.config import HRMConfig
from hrm_jax.presets import MODEL_PRESETS  # HRM's and TRM's (trm_*) architectures
from hrm_jax.trm_config import TRMConfig

DTYPES = ("float32", "float16", "bfloat16")


def cmd_torch(args: argparse.Namespace) -> int:
    from export.convert import save_state_dict, to_torch_state_dict  # noqa: PLC0415

    params, config = _load_model(args)
    state_dict = to_torch_state_dict(params, config)
    path = save_state_dict(state_dict, args.out)
    print(f"wrote {path} ({len(state_dict)} tensors with the reference's key names)")
    return 0


def _load_model(args: argparse.Namespace):
    """(params, config) of --model (a shipped model or any checkpoint) or --checkpoint."""
    from hrm_jax.pretrained import load_model  # noqa: PLC0415  (jax only for the commands that read weights)

    if (args.model is None) == (args.checkpoint is None):
        raise cli.CLIError("give one of --checkpoint DIR or --model pretrained|DIR")
    return load_model(args.model if args.model is not None else args.checkpoint)


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=pathlib.Path, default=None, help="a run dir, its best/ or a step dir")
    parser.add_argument("--model", default=None,
                        help="'pretrained' (the shipped Sudoku model), 'pretrained:NAME', or a checkpoint/model dir")


def _config_for(args: argparse.Namespace) -> HRMConfig:
    if args.config_json:
        try:
            config_class = TRMConfig if args.family == "trm" else HRMConfig
            base = config_class(**json.loads(pathlib.Path(args.config_json).read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise cli.CLIError(f"--config-json {args.config_json}: not a readable {args.family.upper()}Config "
                               f"JSON ({err})") from None
    else:
        base = MODEL_PRESETS[args.preset]()
    changes = {}
    for item in args.set or ():
        field, sep, value = item.partition("=")
        if not sep or field not in base.to_dict():
            raise cli.CLIError(f"--set {item!r}: expected FIELD=VALUE with a field of {type(base).__name__} "
                                  f"({', '.join(base.to_dict())})")
        kind = type(base.to_dict()[field])
        changes[field] = (value if kind is str else value.lower() in ("1", "true", "yes") if kind is bool
                          else kind(float(value)) if kind is int else kind(value))
    return base.replace(**changes)


def cmd_from_torch(args: argparse.Namespace) -> int:
    from export.convert import from_torch_state_dict, load_state_dict  # noqa: PLC0415
    from hrm_jax.checkpoint import save_params  # noqa: PLC0415

    config = _config_for(args)
    params = from_torch_state_dict(load_state_dict(args.state_dict), config)  # lists every mismatch
    where = save_params(args.out, params, config, source=str(args.state_dict))
    print(f"wrote {where}\nuse it with: python -m experiments.sudoku eval --checkpoint {args.out} --data DIR")
    return 0


def _check_onnx(model, path: pathlib.Path, graph: str) -> str:
    """Runs the exported graph and the torch module on two random puzzles; the largest difference."""
    import torch  # noqa: PLC0415

    from export.onnx import OnnxSegment, OnnxSolver, example_inputs  # noqa: PLC0415

    if graph == "solve":
        inputs, ids, _ = example_inputs(model.config, "solve", batch=2, seed=1)
        got = OnnxSolver(path).solve(inputs.numpy(), ids.numpy())
        want = model.solve(inputs, ids)
        same = float(np.mean(got.predictions == want.logits.argmax(-1).numpy()))
        q_diff = float(np.max(np.abs(got.q_halt - want.q_halt_logits.float().numpy())))
        return f"predictions agree on {100 * same:.2f}% of cells, max |q_halt diff| {q_diff:.1e}"
    args = example_inputs(model.config, "segment", batch=2, dtype=model.dtype, seed=1)
    runner = OnnxSegment(path)
    carry, out = runner.step(runner.initial_carry(2), args[4].numpy(), args[5].numpy())
    with torch.no_grad():
        want = model(*args)[6].float().numpy()
    return f"max |logits diff| {np.max(np.abs(out['logits'].astype(np.float32) - want)):.1e} (one segment)"


def cmd_onnx(args: argparse.Namespace) -> int:
    from export.convert import to_torch_state_dict  # noqa: PLC0415
    from export.onnx import export_onnx  # noqa: PLC0415
    from export.trm_torch_model import torch_module  # noqa: PLC0415

    if args.out.suffix != ".onnx":
        raise cli.CLIError(f"--out {args.out}: give a file name ending in .onnx")
    params, config = _load_model(args)
    model = torch_module(config, args.dtype)
    model.load_state_dict(to_torch_state_dict(params, config), strict=True)
    graphs = {"solve": args.out, "segment": args.out.with_suffix(".segment.onnx")}
    for graph, path in graphs.items():
        if args.graph not in (graph, "both"):
            continue
        print(f"exporting the {graph} graph ({args.dtype}) to {path} ...", flush=True)
        export_onnx(model, path, graph)
        size = path.stat().st_size / 2**20
        if args.no_check or args.dtype == "bfloat16":  # onnxruntime's CPU provider has no bf16 kernels
            print(f"  {size:.0f} MiB, not checked")
        else:
            print(f"  {size:.0f} MiB; onnxruntime vs torch: {_check_onnx(model, path, graph)}")
    return 0


def cmd_tensorrt(args: argparse.Namespace) -> int:
    from export.tensorrt import build_engine, calibration_batches  # noqa: PLC0415

    precision = "int8" if args.int8 else "fp16" if args.fp16 else "fp32"
    calibration = None
    if precision == "int8":
        if args.calib_data is None:
            raise cli.CLIError("--int8 needs --calib-data DIR: a dataset built by `python -m experiments.<task> build`")
        from hrm_jax.data.format import load_split  # noqa: PLC0415

        split = load_split(args.calib_data, args.calib_split)
        inputs = np.concatenate([np.asarray(s.inputs) for s in split.sets.values()])
        # puzzle_identifiers are per puzzle; a puzzle's examples are rows puzzle_indices[p]:[p + 1].
        ids = np.concatenate([np.repeat(s.puzzle_identifiers, np.diff(s.puzzle_indices)) for s in split.sets.values()])
        calibration = list(calibration_batches(inputs, ids, args.calib_batch_size, args.calib_batches))
    out = args.out or args.onnx.with_suffix(f".{precision}.engine")
    path = build_engine(args.onnx, out, precision=precision, max_batch=args.max_batch, opt_batch=args.opt_batch,
                        calibration=calibration)
    print(f"wrote {path} and {path}.json; run it with: python -m experiments.sudoku solve --backend tensorrt "
          f"--engine {path} PUZZLE")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{torch,from-torch,onnx,tensorrt}")

    to_torch = sub.add_parser("torch", help="orbax checkpoint -> torch state dict (.pt or .safetensors)")
    _add_model_flags(to_torch)
    to_torch.add_argument("--out", type=pathlib.Path, required=True, help="FILE.pt or FILE.safetensors")

    from_torch = sub.add_parser("from-torch", help="torch state dict (ours or the reference's) -> orbax checkpoint")
    from_torch.add_argument("state_dict", type=pathlib.Path,
                            help=".pt/.pth/.bin/.safetensors or a reference step_N file")
    from_torch.add_argument("--preset", choices=sorted(MODEL_PRESETS), default="sudoku_extreme",
                            help="model config the weights were trained with (default sudoku_extreme)")
    from_torch.add_argument("--config-json", default=None,
                            help="an HRMConfig (or with --family trm a TRMConfig) as JSON instead of --preset")
    from_torch.add_argument("--family", choices=("hrm", "trm"), default="hrm",
                            help="the model family of --config-json (a --preset names its own)")
    from_torch.add_argument("--set", action="append", metavar="FIELD=VALUE",
                            help="override a config field, e.g. --set num_puzzle_identifiers=1")
    from_torch.add_argument("--out", type=pathlib.Path, required=True, help="new checkpoint directory")

    onnx = sub.add_parser("onnx", help="orbax checkpoint or shipped model -> ONNX (solve and segment graphs)")
    _add_model_flags(onnx)
    onnx.add_argument("--out", type=pathlib.Path, required=True,
                      help="FILE.onnx (the segment graph goes to FILE.segment.onnx)")
    onnx.add_argument("--graph", choices=("both", "solve", "segment"), default="both")
    onnx.add_argument("--dtype", choices=DTYPES, default="float32",
                      help="compute dtype (float32 for CPUs; float16/bfloat16 for GPUs)")
    onnx.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs torch check")

    trt = sub.add_parser("tensorrt", help="ONNX solve graph -> TensorRT engine (needs TensorRT and a GPU)")
    trt.add_argument("--onnx", type=pathlib.Path, required=True)
    trt.add_argument("--out", type=pathlib.Path, default=None, help="engine file (default beside the ONNX file)")
    precision = trt.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="allow fp16 kernels")
    precision.add_argument("--int8", action="store_true", help="int8 with entropy calibration (needs --calib-data)")
    trt.add_argument("--max-batch", type=cli.positive_int, default=64)
    trt.add_argument("--opt-batch", type=cli.positive_int, default=1, help="batch size to tune for")
    trt.add_argument("--calib-data", type=pathlib.Path, default=None, help="int8: a built dataset")
    trt.add_argument("--calib-split", default="train")
    trt.add_argument("--calib-batch-size", type=cli.positive_int, default=16)
    trt.add_argument("--calib-batches", type=cli.positive_int, default=32)
    return parser


@cli.cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    commands = {"torch": cmd_torch, "from-torch": cmd_from_torch, "onnx": cmd_onnx, "tensorrt": cmd_tensorrt}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
