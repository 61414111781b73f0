"""``synomaly evaluate``: labelled cases in; Dice, AUPRC and the rest beside the intensity baseline out."""
from pathlib import Path

from synomaly.commands.options import detection_options, detection_settings
from synomaly.commands.terminal import Progress
from synomaly.errors import InputError
from synomaly.files.outputs import check_writable


def run(args) -> int:
    from synomaly.evaluation.cases import cases_from_list, find_eval_cases
    from synomaly.evaluation.cases import unique_names as _unique_names
    from synomaly.evaluation.evaluate import evaluate
    from synomaly.evaluation.report import format_table
    from synomaly.files.model_file import load_model

    # Labelled cases are measured whatever their fit: each record says how far the case was from the model's.
    settings = detection_settings(args, fit_check=False)
    if not args.cases and not args.cases_csv:
        raise InputError("give the cases to evaluate: case folders, CSV lists, or --cases-csv LIST.")
    cases = find_eval_cases(args.cases) if args.cases else []
    if args.cases_csv:
        cases = _unique_names(cases + cases_from_list(args.cases_csv, args.use))
    out_dir = Path(args.output)
    check_writable(out_dir)
    model = load_model(args.model)
    bar = Progress("evaluating", enabled=not args.quiet)
    try:
        summary = evaluate(cases, model, settings, out_dir, target_fpr=args.target_fpr, progress=bar,
                           max_slices=args.max_slices, overwrite=args.overwrite)
    finally:
        bar.close()
    print(format_table(summary))
    print(f"details in {out_dir}/evaluation.json, evaluation.md and *_panel.png")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate against ground truth, next to the intensity baseline",
                       description="Cases: folders (image + *seg*/*label* [+ *mask*]), folders of such folders, "
                       "or a CSV with columns image,label[,mask][,name].")
    p.add_argument("cases", nargs="*", metavar="CASES")
    p.add_argument("--cases-csv", default=None, metavar="LIST",
                   help="a case list with columns case,folder,use (as ../shared/data/cases.csv): its cases "
                        "whose use is --use, each folder a case folder relative to the list")
    p.add_argument("--use", default="development", help="which use of --cases-csv to evaluate (default: development)")
    p.add_argument("-o", "--output", default="evaluation", help="output folder")
    detection_options(p)
    p.add_argument("--target-fpr", type=float, default=0.01)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in the output folder")
    p.add_argument("--max-slices", type=int, default=None, help="evaluate at most this many slices per case "
                   "(around the lesion; for quick checks)")
    p.set_defaults(func=run)
