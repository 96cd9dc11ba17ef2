"""The `tuneforge` command: train | plan | export | chat | eval | plot.

    tuneforge train [config.yaml]        train (no config: the embedded SmolLM2 demo run)
    tuneforge train cfg.yaml --nproc 2   the same on 2 GPUs (DDP; add --fsdp to shard the model)
    tuneforge plan [config.yaml] [--fit] peak memory and time before training; --fit probes the card
    tuneforge export --adapter OUT ...   adapter / merged 16-bit / merged 4-bit / GGUF
    tuneforge chat --model OUT           chat with a trained adapter or model, tokens streamed
    tuneforge eval --model OUT           loss, perplexity, exact match on held-out prompt/answer pairs
    tuneforge plot RUN                   loss / learning-rate PNG of a run folder
"""

from __future__ import annotations

import argparse
import logging
import sys


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser("train", help="fine-tune a model from a YAML config")
    parser.add_argument("config", nargs="?", help="YAML config (omit for the embedded default run)")
    parser.add_argument("--output", help="override training.output_dir")
    parser.add_argument("--max-steps", type=int, help="override training.max_steps")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in the "
                        "output folder (checked, falling back to an earlier one if the newest is damaged)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run in the output folder (without it, a used folder is refused)")
    parser.add_argument("--allow-changes", action="store_true",
                        help="with --resume: continue although the config, data or model differ from the run's")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes (GPUs) on this machine: N > 1 relaunches this command under torchrun, "
                             "data-parallel; training.per_device_train_batch_size is per process")
    parser.add_argument("--fsdp", action="store_true",
                        help="with --nproc N > 1 (or under torchrun): shard the model with FSDP2 instead of "
                             "replicating it (DDP); for models that do not fit on one GPU")
    parser.set_defaults(handler=_run_train)


def _run_train(args) -> int:
    from tuneforge.config import ConfigError, load_config, with_overrides
    from tuneforge.train import distributed
    from tuneforge.train.command import train

    config = load_config(args.config)  # validated before any process is started
    overrides = {"training.output_dir": args.output, "training.max_steps": args.max_steps}
    config = with_overrides(config, {key: value for key, value in overrides.items() if value is not None})
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the run in the output folder and --overwrite replaces it: choose one")
    if args.allow_changes and not args.resume:
        raise ConfigError("--allow-changes only means something with --resume")
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    if distributed.is_distributed():
        if args.nproc > 1 and args.nproc != distributed.world_size():
            raise ConfigError(f"--nproc {args.nproc} but the launcher started {distributed.world_size()} processes")
    elif args.nproc > 1:
        # torchrun runs this same command line in each process, where WORLD_SIZE is set.
        return distributed.relaunch(args.nproc, args.argv)
    elif args.fsdp:
        raise ConfigError("--fsdp shards the model over several processes: add --nproc N (N > 1)")
    train(config, resume=args.resume, overwrite=args.overwrite, allow_changes=args.allow_changes,
          strategy="fsdp" if args.fsdp else None)
    return 0


def _add_chat(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="chat with a model or a trained adapter (tokens streamed)")
    parser.add_argument("--model", required=True, help="adapter folder, model folder or shipped model name")
    parser.add_argument("--prompt", help="one prompt, answered then exit (default: interactive)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--system", help="system message")
    parser.add_argument("--no-4bit", action="store_true", help="load the base in 16/32-bit instead of NF4")
    parser.set_defaults(handler=_run_chat)


def _run_chat(args) -> int:
    from tuneforge.chat import chat

    return chat(args.model, prompt=args.prompt, max_new_tokens=args.max_new_tokens, system=args.system,
                load_in_4bit=not args.no_4bit)


def _add_eval(subparsers) -> None:
    from tuneforge.config import DEFAULT_HELDOUT

    parser = subparsers.add_parser("eval", help="loss / perplexity / exact match on held-out prompt/answer pairs")
    parser.add_argument("--model", required=True, help="run folder, adapter folder, model folder or shipped model name")
    parser.add_argument("--data", default=DEFAULT_HELDOUT,
                        help=f"prompt/answer rows (Alpaca, ShareGPT, messages); default {DEFAULT_HELDOUT}: "
                             "the shipped set's rows that the default run does not train on")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-4bit", action="store_true", help="load the base in 16/32-bit instead of NF4")
    parser.add_argument("--json", help="also write the scores and every answer to this JSON file")
    parser.set_defaults(handler=_run_eval)


def _run_eval(args) -> int:
    from tuneforge.evaluate import evaluate, write_report

    report = evaluate(args.model, args.data, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      load_in_4bit=not args.no_4bit)
    print(report.line(), flush=True)
    if args.json:
        print(f"answers written to {write_report(report, args.json)}")
    return 0


def _add_plot(subparsers) -> None:
    parser = subparsers.add_parser("plot", help="render a run's loss / learning-rate PNG")
    parser.add_argument("run", help="run folder (holding log.csv) or the log.csv itself")
    parser.add_argument("--out", help="PNG path (default: <run>/loss.png)")
    parser.set_defaults(handler=_run_plot)


def _run_plot(args) -> int:
    from tuneforge.train.callbacks import plot_log

    print(plot_log(args.run, args.out))
    return 0


def _add_plan(subparsers) -> None:
    from tuneforge.planning.command import add_arguments, run

    parser = subparsers.add_parser("plan", help="peak memory and time of a run, before training (--fit: probe the card)")
    add_arguments(parser)
    parser.set_defaults(handler=run)


def _add_export(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export an adapter, a merged model or a GGUF")
    try:
        from tuneforge.export.command import add_arguments, run
    except ImportError as error:  # export is part of the package; this only guards a broken install
        message = f"export unavailable: {error}"  # `error` is unbound once the except block ends
        parser.set_defaults(handler=lambda _: _fail(message))
        return
    add_arguments(parser)
    parser.set_defaults(handler=run)


def _fail(message: str) -> int:
    print(f"tuneforge: error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_train(subparsers)
    _add_plan(subparsers)
    _add_export(subparsers)
    _add_chat(subparsers)
    _add_eval(subparsers)
    _add_plot(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --nproc N` relaunches itself with it
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from tuneforge.config import ConfigError
    from tuneforge.data.errors import DataError
    from tuneforge.models.loader import ModelLoadError
    from tuneforge.train.guards import Interrupted, NonFiniteError
    from tuneforge.train.resume import ResumeError

    from tuneforge.export.command import ExportError
    from tuneforge.export.gguf_arch import UnsupportedForGGUF
    from tuneforge.export.verify import ExportVerificationError
    from tuneforge.export.gguf_tokenizer import UnsupportedTokenizer
    from tuneforge.export.hub import HubUnavailable
    from tuneforge.lora.inject import LoRAConfigError

    expected = (ConfigError, ModelLoadError, FileNotFoundError, DataError, ResumeError, NonFiniteError, ExportError,
                LoRAConfigError, HubUnavailable, UnsupportedForGGUF, UnsupportedTokenizer, NotImplementedError,
                ExportVerificationError)
    try:
        return int(args.handler(args) or 0)
    except expected as error:
        return _fail(str(error))
    except Interrupted as error:  # Ctrl-C during training, after the checkpoint and adapter were saved
        print(f"tuneforge: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("tuneforge: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    except OSError as error:
        from tuneforge.atomic import is_disk_full

        if not is_disk_full(error):
            raise
        return _fail(f"no space left on the device ({error}); free some space and run the command again")


if __name__ == "__main__":
    sys.exit(main())
