"""Export the feature table of a corpus once: CLIP image + question embeddings (or the weight-free fallback).

    python examples/export_features.py --source /data/okvqa --image_root /data/coco \\
        --model_name_or_path openai/clip-vit-large-patch14 --output_dir features/okvqa_clip_l14
    python examples/export_features.py --dataset vqav2 --source /data/vqav2 --output_dir features/vqav2_clip_l14 \\
        --device cuda --dtype float16 --batch_size 256
    python examples/export_features.py --source ReplugLens/OK-VQA --output_dir features/okvqa_hub

The table (`<output_dir>/image.npy`, `text.npy`, `features.json` with ids, metadata and a content hash) holds one row
per corpus item in corpus order, for the splits asked; training and evaluation load it with
`FeatureTable.load(output_dir)` (memory-mapped read-only, one copy in the page cache for every process) for the same
corpus (same source and splits). It is never part of a selector checkpoint: a trained selector reads any table
exported with the same featuriser (model and dims), so export the splits or corpus you want to evaluate on the same
way. An existing table is never overwritten unless `--overwrite`.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trl import TrlParser

from trl_icd.data import FeatureTable, compute_clip_features, fallback_features, load_okvqa, load_vqav2

logger = logging.getLogger("export_features")


@dataclass
class ExportArguments:
    source: str = field(metadata={"help": "Folder with the official question/annotation JSON files, or a Hub id."})
    output_dir: str = field(metadata={"help": "Where to write the feature table (a folder)."})
    dataset: str = field(default="okvqa", metadata={"help": "okvqa or vqav2 (selects the official file names)."})
    splits: list[str] = field(default_factory=lambda: ["train", "val"], metadata={"help": "Splits, in corpus order."})
    image_root: str | None = field(
        default=None, metadata={"help": "Folder holding train2014/ and val2014/ (default: the source folder)."}
    )
    featurizer: str = field(default="clip", metadata={"help": "clip or fallback (no weights)."})
    model_name_or_path: str = field(
        default="openai/clip-vit-large-patch14", metadata={"help": "CLIP checkpoint (Hub id or local folder)."}
    )
    batch_size: int = field(default=64, metadata={"help": "Images / questions per CLIP forward pass."})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ... (default: cuda when available)."})
    dtype: str = field(default="float32", metadata={"help": "CLIP weights dtype: float32, float16 or bfloat16."})
    max_missing_fraction: float = field(
        default=0.01, metadata={"help": "Fail if more than this fraction of images cannot be read (else zero rows)."}
    )
    fallback_image_dim: int | None = field(default=None, metadata={"help": "Fallback featuriser image dimension."})
    fallback_text_dim: int = field(default=256, metadata={"help": "Fallback featuriser text dimension."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing table at output_dir."})


def load_corpus(args: ExportArguments):
    loader = {"okvqa": load_okvqa, "vqav2": load_vqav2}.get(args.dataset)
    if loader is None:
        raise ValueError(f"--dataset must be okvqa or vqav2, got {args.dataset!r}")
    if Path(args.source).exists():
        return loader(args.source, splits=args.splits, image_root=args.image_root)
    return loader(args.source, splits=args.splits)


def compute_features(args: ExportArguments, corpus) -> FeatureTable:
    if args.featurizer == "fallback":
        return fallback_features(
            corpus,
            image_dim=args.fallback_image_dim,
            text_dim=args.fallback_text_dim,
            max_missing_fraction=args.max_missing_fraction,
        )
    if args.featurizer != "clip":
        raise ValueError(f"--featurizer must be clip or fallback, got {args.featurizer!r}")
    import torch
    from transformers import AutoProcessor, CLIPModel

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = CLIPModel.from_pretrained(args.model_name_or_path, dtype=getattr(torch, args.dtype))
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    table = compute_clip_features(
        corpus,
        model,
        processor,
        batch_size=args.batch_size,
        device=device,
        max_missing_fraction=args.max_missing_fraction,
    )
    table.meta["model"] = args.model_name_or_path
    return table


def main(argv: list[str] | None = None) -> FeatureTable:
    (args,) = TrlParser((ExportArguments,)).parse_args_and_config(argv)
    output = Path(args.output_dir)
    if output.exists() and any(output.iterdir()):
        if not args.overwrite:
            raise FileExistsError(f"{output} is not empty; pass --overwrite to replace the feature table there")
        if not FeatureTable.is_table_dir(output):
            raise FileExistsError(f"{output} holds files other than a feature table; refusing to overwrite it")
    corpus = load_corpus(args)
    logger.info("corpus: %s", corpus)
    table = compute_features(args, corpus)
    table.meta.update({"source": args.source, "dataset": args.dataset, "splits": list(args.splits)})
    table.save(output)
    reloaded = FeatureTable.load(output)  # memory-mapped: what training and evaluation will see
    reloaded.check_aligned(corpus)
    logger.info(
        "wrote %d items (image %d-d, text %d-d) to %s; %d items without a readable image",
        len(reloaded), reloaded.image_dim, reloaded.text_dim, output, len(reloaded.meta.get("missing_image_ids", [])),
    )
    return reloaded


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])
