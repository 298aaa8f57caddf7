"""Hugging Face `evaluate` modules shipped with the package (pass their path to `evaluate.load`)."""

from pathlib import Path

VQA_ACCURACY_PATH = str(Path(__file__).with_name("vqa_accuracy.py"))

__all__ = ["VQA_ACCURACY_PATH"]
