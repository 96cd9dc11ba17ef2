"""`tuneforge plan [config.yaml] [--fit batch|seq]`: the run's memory and time, before training.

    tuneforge plan                      the default SmolLM2 run on this machine
    tuneforge plan run.yaml --fit       then probe the CUDA card for the largest batch that fits,
                                        written as run.fit.yaml beside run.yaml
Nothing is written into training.output_dir (a run folder belongs to its run); --output PATH
writes the plan there as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_FIT_NAME = "default.fit.yaml"  # in the working folder, for the embedded default run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (omit for the embedded default run)")
    parser.add_argument("--fit", nargs="?", const="batch", choices=("batch", "seq"),
                        help="CUDA only: probe steps find the largest batch (default) or max_seq_length (at batch "
                             "1) that fits the card; written as <config>.fit.yaml beside the config")
    parser.add_argument("--output", help="also write the plan as JSON to this file")
    parser.add_argument("--no-data", action="store_true",
                        help="skip tokenizing the dataset: assume every row is max_seq_length tokens")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of the table")


def run(args) -> int:
    from tuneforge.config import load_config
    from tuneforge.planning import plan_config

    config = load_config(args.config)
    plan = plan_config(config, with_data=not args.no_data)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print("\n".join(plan.lines()), flush=True)
    if args.output:
        print(f"plan written to {plan.write(args.output)}", flush=True)
    if args.fit:
        from tuneforge.planning.fit import fit

        result = fit(config, plan, args.fit)
        if result is not None:
            print("\n".join(result.lines()), flush=True)
            if result.value:
                path = write_fitted(config, args.fit, result.value, args.config)
                print(f"fitted config written to {path}: tuneforge train {path}", flush=True)
            else:
                return 1
    return 0


def write_fitted(config, what: str, value: int, source: str | None) -> Path:
    """The config with the fitted batch size or max_seq_length, as YAML beside its source config."""
    import yaml

    values = config.to_dict()
    if what == "batch":
        values["training"]["per_device_train_batch_size"] = value
    else:
        values["model"]["max_seq_length"] = value
    path = Path(source).with_suffix(".fit.yaml") if source else Path(DEFAULT_FIT_NAME)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path
