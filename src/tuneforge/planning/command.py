"""`tuneforge plan [config.yaml] [--fit batch|seq]`: the run's memory and time, before training.

    tuneforge plan                      the default SmolLM2 run on this machine
    tuneforge plan run.yaml --fit       then probe the CUDA card for the largest batch that fits,
                                        written into <output_dir>/config.fit.yaml
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FIT_CONFIG_NAME = "config.fit.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (omit for the embedded default run)")
    parser.add_argument("--fit", nargs="?", const="batch", choices=("batch", "seq"),
                        help="CUDA only: probe steps find the largest batch (default) or max_seq_length (at batch "
                             "1) that fits the card; written into <output_dir>/config.fit.yaml")
    parser.add_argument("--output", help="override training.output_dir (where plan.json and the fitted config go)")
    parser.add_argument("--no-data", action="store_true",
                        help="skip tokenizing the dataset: assume every row is max_seq_length tokens")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of the table")


def run(args) -> int:
    from tuneforge.config import load_config
    from tuneforge.planning import plan_config

    config = load_config(args.config)
    if args.output:
        config.training.output_dir = args.output
    plan = plan_config(config, with_data=not args.no_data)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print("\n".join(plan.lines()), flush=True)
    written = plan.write(config.training.output_dir)
    print(f"plan written to {written}", flush=True)
    if args.fit:
        from tuneforge.planning.fit import fit

        result = fit(config, plan, args.fit)
        if result is not None:
            print("\n".join(result.lines()), flush=True)
            if result.value:
                path = write_fitted(config, args.fit, result.value)
                print(f"fitted config written to {path}: tuneforge train {path}", flush=True)
            else:
                return 1
    return 0


def write_fitted(config, what: str, value: int) -> Path:
    """The config with the fitted batch size or max_seq_length, as YAML in its output folder."""
    import yaml

    values = config.to_dict()
    if what == "batch":
        values["training"]["per_device_train_batch_size"] = value
    else:
        values["model"]["max_seq_length"] = value
    path = Path(config.training.output_dir) / FIT_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path
