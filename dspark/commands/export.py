"""`dspark export sglang`: SGLang's DSpark side files from dspark's SPS profile and calibration
(`dspark.serving.sglang`; docs/serving.md "Multi-GPU production").

    dspark export sglang --out DIR [--profile FILE] [--calibration FILE] [--sampling-temperature 1]
        [--max-batch-tokens 2048] [--block-size 7]

Writes DIR/sps_table.json (with --profile: a `dspark profile` JSON, best measured on the serving GPU) and
DIR/confidence_sts.json (with --calibration: a `dspark calibrate --method sts` file); at least one is needed.
Everything is read and checked before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from dspark.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser("export", help="files other engines read (SGLang's SPS table and STS calibration)")
    kinds = p.add_subparsers(dest="export", required=True)
    s = kinds.add_parser("sglang", help="SGLang's --speculative-dspark-sps-table-path and -confidence-sts-path files")
    s.add_argument("--out", required=True, help="folder for sps_table.json and confidence_sts.json")
    s.add_argument("--profile", default=None, help="SPS profile JSON (`dspark profile --out`)")
    s.add_argument("--calibration", default=None, help="calibration file fitted with --method sts")
    s.add_argument("--sampling-temperature", type=float, default=1.0,
                   help="the calibration regime to export: the one fitted nearest this temperature (default 1)")
    s.add_argument("--max-batch-tokens", type=int, default=2048, help="target tokens per step the table covers")
    s.add_argument("--block-size", type=int, default=7,
                   help="drafts per request, to read a grid profile's tokens as requests (default 7)")
    s.set_defaults(handler=run_export_sglang)


def run_export_sglang(args) -> int:
    from dspark.calibration.calibration_file import load_calibration
    from dspark.files import check_output_folder, write_text_atomically
    from dspark.scheduling.sps import SPSProfile
    from dspark.serving.sglang import sps_table, sts_file

    if args.profile is None and args.calibration is None:
        raise ConfigError("give --profile, --calibration or both")
    out = check_output_folder(args.out, "--out")
    files = {}
    if args.profile is not None:
        files["sps_table.json"] = sps_table(SPSProfile.load(args.profile), max_batch_tokens=args.max_batch_tokens,
                                            block_size=args.block_size)
    if args.calibration is not None:
        files["confidence_sts.json"] = sts_file(load_calibration(args.calibration), args.sampling_temperature)
    for name, content in files.items():
        path = write_text_atomically(Path(out) / name, json.dumps(content, indent=2) + "\n")
        print(path)
    return 0
