"""Data: the challenge files (`load_challenge`, `read_label_csv`), splits, torch datasets and the
built-in CT phantom (`python -m dataloaders.phantom`)."""
from dataloaders.challenge import ChallengeData, Split, load_challenge, make_split
from dataloaders.label_csv import load_label_masks, read_label_csv, write_label_csv

__all__ = ["ChallengeData", "Split", "load_challenge", "make_split", "load_label_masks",
           "read_label_csv", "write_label_csv"]
