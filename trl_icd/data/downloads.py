"""Where the official OK-VQA / VQAv2 files come from, written as shell steps for a given folder: shown when a data
folder is missing or incomplete (the README's "Getting the OK-VQA data" section lists the same steps).

The files unpack to the layout `trl_icd.data.okvqa` reads: the question/annotation JSON files in the folder,
the COCO images in `train2014/` and `val2014/` under it (or under `image_root`).
"""

from __future__ import annotations

COCO_2014_IMAGES = {
    "train2014": "http://images.cocodataset.org/zips/train2014.zip",  # 13 GB, 82,783 images
    "val2014": "http://images.cocodataset.org/zips/val2014.zip",  # 6 GB, 40,504 images
}
ANNOTATION_ZIPS = {
    "okvqa": tuple(
        f"https://okvqa.allenai.org/static/data/{name}.json.zip"
        for name in (
            "OpenEnded_mscoco_train2014_questions",
            "mscoco_train2014_annotations",
            "OpenEnded_mscoco_val2014_questions",
            "mscoco_val2014_annotations",
        )
    ),
    "vqav2": tuple(
        f"https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/{name}.zip"
        for name in (
            "v2_Questions_Train_mscoco",
            "v2_Annotations_Train_mscoco",
            "v2_Questions_Val_mscoco",
            "v2_Annotations_Val_mscoco",
        )
    ),
}
DISPLAY_NAMES = {"okvqa": "OK-VQA", "vqav2": "VQAv2"}
HUB_ALTERNATIVE = {"okvqa": "ReplugLens/OK-VQA", "vqav2": "lmms-lab/VQAv2 (validation only)"}


def download_instructions(dataset: str, root: str = "data/okvqa", images: bool = True) -> str:
    """Shell steps that put `dataset`'s official files (and, with `images`, the COCO 2014 images) into `root`."""
    if dataset not in ANNOTATION_ZIPS:
        raise ValueError(f"no download steps for {dataset!r}; known: {sorted(ANNOTATION_ZIPS)}")
    lines = [f"To get {DISPLAY_NAMES[dataset]} into {root}/ (official files; README: \"Getting the OK-VQA data\"):",
             f"  mkdir -p {root} && cd {root}"]
    for url in ANNOTATION_ZIPS[dataset]:
        name = url.rsplit("/", 1)[1]
        lines.append(f"  wget {url} && unzip -o {name} && rm {name}")
    if images:
        for folder, url in COCO_2014_IMAGES.items():
            lines.append(f"  wget {url} && unzip -q {folder}.zip && rm {folder}.zip    # COCO 2014 images -> {folder}/")
    lines.append(f"or read a Hub copy instead: --dataset_path {HUB_ALTERNATIVE[dataset]} (docs/data.md).")
    return "\n".join(lines)


__all__ = ["ANNOTATION_ZIPS", "COCO_2014_IMAGES", "download_instructions"]
