"""`tuneforge export`: a trained adapter folder -> adapter copy, merged 16/4-bit model, or GGUF (+ Hub).

    tuneforge export --adapter runs/smollm2 --format merged_16bit --output out/merged
    tuneforge export --adapter runs/smollm2/adapter --format gguf --quantization q4_k_m,q8_0 --output out/gguf

Works from files alone: the base checkpoint (adapter_config.json's base_model_name_or_path, or
--base) is read one shard at a time, so a model larger than memory exports.

An export is written whole or not at all: into a staging folder beside --output, renamed into
place at the end (tuneforge.atomic). A non-empty --output is refused unless --overwrite, which
replaces it as a whole (no stale model.safetensors beside new shards); an --output that is, or
holds, the adapter, its run folder or the base model is refused always. A full disk or Ctrl-C
mid-export leaves --output as it was. A damaged adapter is a one-line error before any work.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import shutil
import time
from pathlib import Path

from tuneforge.atomic import atomic_folder, folder_is_empty, is_disk_full
from tuneforge.export.adapter import adapter_folder, adapter_problem, load_tokenizer

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The export cannot be written where asked, or its input is damaged; the message says what to do."""

FORMATS = ("adapter", "merged_16bit", "merged_4bit", "gguf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True,
                        help="adapter folder (adapter_config.json) or a `tuneforge train` output folder")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", required=True, help="folder to write the export into (new or empty; see --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --output as a whole (its old files are removed once the new "
                             "export is complete)")
    parser.add_argument("--quantization", default="q8_0",
                        help="gguf only: f32, f16, bf16, q8_0, q4_0 ... natively; q4_k_m, q5_k_m, q6_k ... via "
                             "llama.cpp (pip install 'tuneforge[gguf]'); comma-separated for several files")
    parser.add_argument("--base", help="base model folder or name (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                        help="merged weights' type (default: the base's 16-bit type, else bfloat16)")
    parser.add_argument("--max-shard-size", default="5GB", help="merged formats: largest safetensors shard")
    parser.add_argument("--no-modelfile", action="store_true", help="gguf only: do not write an Ollama Modelfile")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the check of the export against the trained model (export_report.json)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the export to this Hub model repo")
    parser.add_argument("--token", help="Hub token (default: $HF_TOKEN or the saved login)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")


# What exports write (weights, configs, tokenizer files, GGUF, Modelfile, reports): --overwrite
# replaces a folder holding only these; anything else in it is the user's and stops it.
EXPORT_FILES = ("*.safetensors", "*.gguf", "*.json", "*.jinja", "*.bin", "tokenizer.model", "merges.txt",
                "vocab.txt", "README.md", "Modelfile", "*.png")


def _is_export_file(path: Path) -> bool:
    return path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in EXPORT_FILES)


def check_output(output: Path, overwrite: bool, keep: dict[str, Path]) -> None:
    """Refuse an --output whose replacement would lose files: one that is (or holds) a folder in
    `keep` (the adapter, its run folder, the base model), or a non-empty one without --overwrite."""
    out = output.expanduser().resolve()
    for what, folder in keep.items():
        folder = folder.expanduser().resolve()
        if out == folder or out in folder.parents:
            raise ExportError(f"--output {output} is {'' if out == folder else 'a folder above '}the {what} "
                              f"({folder}); writing the export there would replace it: choose another folder")
    if output.exists() and not output.is_dir():
        raise ExportError(f"--output {output} is a file, not a folder")
    if out in (Path.cwd().resolve(), Path.home().resolve()) or out.parent == out:
        raise ExportError(f"--output {output} is the current, home or root folder; write the export into a "
                          "folder of its own")
    foreign = [p.name for p in output.iterdir() if not _is_export_file(p)] if output.is_dir() else []
    if foreign and overwrite:
        raise ExportError(f"--output {output} holds files that no export writes ({', '.join(sorted(foreign)[:5])}); "
                          "--overwrite replaces the folder as a whole, so choose a folder of its own")
    if not folder_is_empty(output) and not overwrite:
        names = sorted(p.name for p in output.iterdir())
        raise ExportError(f"--output {output} is not empty ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''}): "
                          "loaders could pick its old files beside the new ones. Pass --overwrite to replace it "
                          "as a whole, or choose a new folder")


def export(adapter: str | Path, fmt: str, output: str | Path, quantization: str | list[str] = "q8_0",
           base: str | Path | None = None, dtype: str | None = None, max_shard_size: str = "5GB",
           modelfile: bool = True, overwrite: bool = False) -> list[Path]:
    """The export itself (the CLI's body); returns the files or folder written.

    overwrite: replace a non-empty `output` as a whole; without it such an `output` is refused.
    """
    from tuneforge.export.adapter import LoraAdapter
    from tuneforge.export.merge import resolve_base

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    adapter_dir = adapter_folder(adapter)
    problem = adapter_problem(adapter_dir)
    if problem:
        raise ExportError(problem)
    output = Path(output)
    keep = {"adapter folder": adapter_dir}
    if adapter_dir.name == "adapter" and (adapter_dir.parent / "config.resolved.json").is_file():
        keep["run folder"] = adapter_dir.parent
    if fmt != "adapter":
        keep["base model folder"] = resolve_base(LoraAdapter.load(adapter_dir), base)
    check_output(output, overwrite, keep)
    try:
        with atomic_folder(output) as staging:
            written = _write(adapter_dir, fmt, staging, output.name or "model", quantization, base, dtype,
                             max_shard_size, modelfile)
    except OSError as error:
        if not is_disk_full(error):
            raise
        raise ExportError(f"no space left on the device while writing the {fmt} export; nothing was written to "
                          f"{output}{' (its earlier contents are untouched)' if output.exists() else ''}") from error
    return [output / path.relative_to(staging) for path in written]


def _write(adapter_dir: Path, fmt: str, output: Path, name: str, quantization, base, dtype, max_shard_size,
           modelfile: bool) -> list[Path]:
    """Write the export into the (staging) folder `output`; `name` is the final folder's name."""
    from tuneforge.export.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter, copy_tokenizer_files
    from tuneforge.export.merge import CheckpointSource, copy_side_files, merge_adapter_folder, resolve_base, \
        resolve_dtype

    if fmt == "adapter":
        for file_name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md"):
            if (adapter_dir / file_name).is_file():
                shutil.copy2(adapter_dir / file_name, output / file_name)
        copy_tokenizer_files(adapter_dir, output)
        LoraAdapter.load(output)  # the copy must read back as an adapter
        return [output]
    if fmt == "merged_16bit":
        return [merge_adapter_folder(adapter_dir, output, base=base, dtype=dtype, max_shard_size=max_shard_size)]
    lora = LoraAdapter.load(adapter_dir)
    base_dir = resolve_base(lora, base)
    source = CheckpointSource(base_dir, lora)
    if fmt == "merged_4bit":
        from tuneforge.export.merge4bit import write_merged_4bit

        out = write_merged_4bit(source, output, resolve_dtype(dtype, source.config), max_shard_size)
        copy_side_files(base_dir, adapter_dir, out)
        return [out]
    from tuneforge.export.gguf import save_gguf
    from tuneforge.export.ollama import write_modelfile

    methods = [m.strip() for m in quantization.split(",")] if isinstance(quantization, str) else quantization
    tokenizer = load_tokenizer(adapter_dir, base_dir)
    paths = save_gguf(source, tokenizer, output, methods, basename=name)
    if modelfile:
        from transformers import GenerationConfig

        generation = GenerationConfig.from_pretrained(str(base_dir)) \
            if (base_dir / "generation_config.json").is_file() else None
        context = source.config.get("max_position_embeddings", 4096)
        paths.append(write_modelfile(paths[0], tokenizer, generation, num_ctx=min(4096, context)))
    return paths


def run(args) -> int:
    started = time.perf_counter()
    if args.push_to_hub:
        from tuneforge.export.hub import require_online

        require_online(args.push_to_hub)  # before the export, not after it
    paths = export(args.adapter, args.format, args.output, args.quantization, base=args.base, dtype=args.dtype,
                   max_shard_size=args.max_shard_size, modelfile=not args.no_modelfile, overwrite=args.overwrite)
    from tuneforge.export.merge import peak_rss_bytes

    print(f"exported {args.format} to {args.output} ({', '.join(p.name for p in paths)}) in "
          f"{time.perf_counter() - started:.1f} s, peak RSS {peak_rss_bytes() / 2**30:.2f} GiB", flush=True)
    if not args.no_verify:
        from tuneforge.export.verify import verify_folder_export

        verify_folder_export(args.adapter, args.format, paths, args.output, base=args.base)
    if args.push_to_hub:
        from tuneforge.export.hub import push_folder

        url = push_folder(args.output, args.push_to_hub, token=args.token, private=args.private)
        print(f"pushed to {url}", flush=True)
    return 0
