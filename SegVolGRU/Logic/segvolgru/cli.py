"""The ``segvolgru`` command line: demo, segment, evaluate, evaluate-gru, bench, download-weights, train.

Exit codes: 0 success; 2 bad input or usage (an output that cannot be written, an evaluation where every case
failed); 3 weights missing or invalid; 1 anything unexpected (one line, the traceback only with ``--debug``).
``--json`` prints one JSON object as the last stdout line.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback

from .errors import InputError, WeightsError
from .validation import add_correction_argument, correction_choice, positive_int

EXIT_OK, EXIT_UNEXPECTED, EXIT_INPUT, EXIT_WEIGHTS = 0, 1, 2, 3


def _demo(args) -> int:
    from .demo import run_demo

    summary = run_demo(args.output, weights=args.weights, clicks=args.clicks, quiet=args.quiet or args.json)
    if args.json:
        print(json.dumps(summary))
    return EXIT_OK


def _bench(args) -> int:
    from .bench import main as bench_main

    return bench_main((["--quick"] if args.quick else []) + ["--device", args.device] +
                      (["--json"] if args.json else []) + (["--threads", str(args.threads)] if args.threads else []))


def _download(args) -> int:
    from .files import check_output_folder
    from .weights import download_official_weights

    if args.cache_dir is not None:
        check_output_folder(args.cache_dir)  # a file there is a usage error, before any download
    path = download_official_weights(cache_dir=args.cache_dir, progress=not args.quiet)
    print(json.dumps({"weights": str(path)}) if args.json else f"official SegVol weights verified at {path}")
    return EXIT_OK


def _segment(args) -> int:
    from .segment_file import segment_file

    report = segment_file(args.image, args.prompts, args.output, weights=args.weights, device=args.device,
                          gru=not args.no_gru, correction=correction_choice(args.correction))
    if args.json:
        print(json.dumps(report))
    elif not args.quiet:
        print(f"wrote {report['output']} ({report['voxels']} voxels) with {report['weights']}")
    return EXIT_OK


def _evaluate(args) -> int:
    from .demo import pick_model
    from .evaluate import evaluate_folder, find_cases
    from .files import check_output_folder

    find_cases(args.data)  # a bad folder is a usage error before any weights load
    check_output_folder(args.output)
    loaded = pick_model(args.weights, correction=correction_choice(args.correction))
    if not args.quiet:
        print(f"weights: {loaded.description}", file=sys.stderr)
    summary = evaluate_folder(args.data, args.output, loaded.model, gru=not args.no_gru, fusion=not args.no_fusion,
                              cache=not args.no_cache, progress=not args.quiet)
    summary["weights"] = loaded.description
    if args.json:
        print(json.dumps(summary))
    elif not args.quiet:
        print(f"{summary['cases']} cases: DSC-AUC {summary['dsc_auc']:.3f}, final DSC {summary['dsc_final']:.3f}, "
              f"NSD-AUC {summary['nsd_auc']:.3f}; {len(summary['failed'])} failed; report in {args.output}")
    if not summary["cases"]:
        first = summary["failed"][0]
        print(f"segvolgru: error: every case failed ({len(summary['failed'])}; {first['case']}: {first['error']}); "
              f"see {args.output}/report.md", file=sys.stderr)
        return EXIT_INPUT
    return EXIT_OK


def _passthrough(command: str, rest: list[str]) -> int:
    """Commands with their own argument parsers (``train``, ``train-correction``, ``evaluate-gru``)."""
    if command == "train":
        from .train import main as command_main
    elif command == "train-correction":
        from .train_correction import main as command_main
    else:
        from .evaluate_gru import main as command_main
    try:
        return int(command_main(rest) or 0)
    except SystemExit as exc:  # their parsers' --help and usage errors
        return EXIT_OK if exc.code in (0, None) else EXIT_INPUT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segvolgru", description="SegVol + stateful GRU click correction.")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--quiet", action="store_true", help="no progress or summary on the terminal")
        p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")

    demo = sub.add_parser("demo", help="headless box + 5 clicks workflow through real MRML (the main job)")
    demo.add_argument("-o", "--output", default="out/demo", help="output folder (default out/demo)")
    demo.add_argument("--weights", default=None, help="official weights file (default: resolver, else demo model)")
    demo.add_argument("--clicks", type=int, default=5, help="number of simulated clicks (default 5)")
    common(demo)
    demo.set_defaults(run=_demo)

    seg = sub.add_parser("segment", help="segment an image file from a prompts JSON file")
    seg.add_argument("image", help="NIfTI, NRRD, MHA file or DICOM series folder")
    seg.add_argument("prompts", help='JSON: {"coordinates": "voxel"|"LPS"|"RAS", "box": [[..],[..]], "clicks": [...]}')
    seg.add_argument("-o", "--output", required=True, help="label image (.nii.gz, .nrrd) or .seg.nrrd")
    seg.add_argument("--weights", default=None)
    seg.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default cpu)")
    seg.add_argument("--no-gru", action="store_true", help="switch the GRU correction off")
    add_correction_argument(seg)
    common(seg)
    seg.set_defaults(run=_segment)

    ev = sub.add_parser("evaluate", help="the CVPR 2025 interactive protocol over a folder of cases")
    ev.add_argument("data", help="folder of challenge .npz cases or <case>.nii.gz + <case>_label.nii.gz pairs")
    ev.add_argument("-o", "--output", required=True, help="output folder (CSV per case, report.md, PNGs)")
    ev.add_argument("--weights", default=None)
    ev.add_argument("--no-gru", action="store_true", help="switch the GRU correction off")
    add_correction_argument(ev)
    ev.add_argument("--no-cache", action="store_true", help="no embedding cache (every encoder reruns)")
    ev.add_argument("--no-fusion", action="store_true", help="switch the multi-round fusion off")
    common(ev)
    ev.set_defaults(run=_evaluate)

    bench = sub.add_parser("bench", help="speed and memory figures (prints JSON)")
    bench.add_argument("--quick", action="store_true")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--threads", type=positive_int, default=None)
    common(bench)
    bench.set_defaults(run=_bench)

    dl = sub.add_parser("download-weights", help="download and verify the official BAAI/SegVol release")
    dl.add_argument("--cache-dir", default=None, help="cache folder (default $SEGVOLGRU_CACHE or ~/.cache/segvolgru)")
    common(dl)
    dl.set_defaults(run=_download)

    for name, text in (("train", "train a reduced SegVol and its GRU correction (see 'train --help')"),
                       ("train-correction", "train a click corrector on several bases (see 'train-correction --help')"),
                       ("evaluate-gru", "measure the corrector against its controls on held-out phantoms")):
        sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        if argv and argv[0] in ("train", "train-correction", "evaluate-gru"):
            return _passthrough(argv[0], argv[1:])
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:
            return EXIT_OK if exc.code in (0, None) else EXIT_INPUT
        return args.run(args)
    except InputError as exc:
        print(f"segvolgru: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except WeightsError as exc:
        print(f"segvolgru: weights: {exc}", file=sys.stderr)
        return EXIT_WEIGHTS
    except KeyboardInterrupt:
        return EXIT_UNEXPECTED
    except Exception as exc:  # noqa: BLE001 - the command line's last line of defence
        if debug:
            traceback.print_exc()
        print(f"segvolgru: unexpected error: {type(exc).__name__}: {exc} (rerun with --debug for details)",
              file=sys.stderr)
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
