"""`dspark export sglang`: SGLang's DSpark side files from dspark's SPS profile and calibration
(`dspark.serving.sglang`; docs/serving.md "Multi-GPU production").

    dspark export sglang --out DIR [--profile FILE] [--calibration FILE] [--sampling-temperature 1]
        [--max-batch-tokens 2048] [--block-size γ]

Writes DIR/sps_table.json (with --profile: a `dspark profile` JSON, best measured on the serving GPU) and
DIR/confidence_sts.json (with --calibration: a `dspark calibrate --method sts` file); at least one is needed.
Everything is read and checked before anything is written. `dspark profile --sglang-out DIR` and `dspark
calibrate --sglang-out DIR` write the same files as they go (`add_sps_table_args` and `write_sps_table` are
shared with `dspark profile`); the way back, an STS file into a calibration bound to a drafter, is
`dspark calibrate --from-sglang`.
"""

from __future__ import annotations

from dspark.errors import ConfigError


def add_sps_table_args(parser, note: str = "") -> None:
    """--max-batch-tokens and --block-size: how a profile becomes SGLang's SPS table (`dspark.serving.sglang.sps_table`)."""
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help=f"target tokens per step the SPS table covers (default 2048){note}")
    parser.add_argument("--block-size", type=int, default=None,
                        help="drafts per request, to read a grid profile's tokens as requests (default: the profiled "
                             f"drafter's block size, else 7){note}")


def write_sps_table(profile, folder, args) -> list:
    """SGLang's SPS table of `profile` (an `SPSProfile` or a profile dict) written to folder/sps_table.json with
    the options of `add_sps_table_args`; the path written, in a list."""
    from dspark.scheduling.sps import SPSProfile
    from dspark.serving.sglang import SPS_TABLE_FILE, sps_table, write_files

    if not isinstance(profile, SPSProfile):
        profile = SPSProfile.from_dict(profile)
    table = sps_table(profile, max_batch_tokens=args.max_batch_tokens, block_size=args.block_size)
    return write_files(folder, {SPS_TABLE_FILE: table})


def register(sub) -> None:
    p = sub.add_parser("export", help="files other engines read (SGLang's SPS table and STS calibration)")
    kinds = p.add_subparsers(dest="export", required=True)
    s = kinds.add_parser("sglang", help="SGLang's --speculative-dspark-sps-table-path and -confidence-sts-path files")
    s.add_argument("--out", required=True, help="folder for sps_table.json and confidence_sts.json")
    s.add_argument("--profile", default=None, help="SPS profile JSON (`dspark profile --out`)")
    s.add_argument("--calibration", default=None, help="calibration file fitted with --method sts")
    s.add_argument("--sampling-temperature", type=float, default=1.0,
                   help="the calibration regime to export: the one fitted nearest this temperature (default 1)")
    add_sps_table_args(s)
    s.set_defaults(handler=run_export_sglang)


def run_export_sglang(args) -> int:
    from dspark.calibration.calibration_file import load_calibration
    from dspark.files import check_output_folder
    from dspark.scheduling.sps import SPSProfile
    from dspark.serving.sglang import SPS_TABLE_FILE, STS_FILE, check_table_options, sps_table, sts_file, write_files

    if args.profile is None and args.calibration is None:
        raise ConfigError("give --profile, --calibration or both")
    check_table_options(args.max_batch_tokens, args.block_size)
    out = check_output_folder(args.out, "--out")
    files = {}
    if args.profile is not None:
        files[SPS_TABLE_FILE] = sps_table(SPSProfile.load(args.profile), max_batch_tokens=args.max_batch_tokens,
                                          block_size=args.block_size)
    if args.calibration is not None:
        files[STS_FILE] = sts_file(load_calibration(args.calibration), args.sampling_temperature)
    for path in write_files(out, files):
        print(path)
    return 0
