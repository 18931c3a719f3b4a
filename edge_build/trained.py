"""The trained classifier as later stages see it: checkpoint + everything needed to use it.

`load_trained(build_dir)` reads build/train/training.json (written by `edge-build train`)
and checks the network checkpoint it names; `TrainedModel.network()` rebuilds the
MindSpore classifier (BatchNorm folded for inference by default).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_build import taxonomy
from edge_build.errors import EdgeBuildError
from edge_build.hashing import sha256_file
from edge_build.preprocessing import Preprocessing
from edge_build.stages import RECORD_NAME as STAGE_RECORD

TRAIN_DIR = "train"
RECORD_NAME = "training.json"
_HINT = "run `edge-build features`, then `edge-build train`"


@dataclass(frozen=True)
class TrainedModel:
    directory: Path
    checkpoint: Path  # backbone + head, BatchNorm form (`network.ckpt`)
    head_checkpoint: Path
    metadata: dict[str, Any]  # the whole training record

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.metadata["preprocessing"])

    @property
    def padding(self) -> str:
        return str(self.metadata["padding"])

    @property
    def num_classes(self) -> int:
        return int(self.metadata["num_classes"])

    @property
    def labels(self) -> list[dict[str, Any]]:
        return list(self.metadata["labels"])

    @property
    def weights_metadata(self) -> dict[str, Any]:
        return dict(self.metadata["weights"]["metadata"])

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return dict(self.metadata.get("hyperparameters", {}))

    def network(self, fold_bn: bool = True, softmax: bool = False) -> Any:
        """The MindSpore classifier (image batch -> logits, or probabilities with `softmax`), eval mode."""
        from edge_build import network

        backbone = network.build_backbone(self.padding, batch_norm=True)
        head = network.build_head(self.num_classes)
        classifier = network.build_classifier(backbone, head, softmax=softmax)
        network.load_checkpoint(classifier, self.checkpoint)
        classifier.set_train(False)
        return network.fold_batchnorm(classifier) if fold_bn else classifier

    def summary(self) -> dict[str, Any]:
        """What an exported artifact should carry about the model it came from."""
        return {
            "architecture": self.metadata.get("architecture"),
            "num_classes": self.num_classes,
            "weights_sha256": self.metadata["weights"]["sha256"],
            "hyperparameters": self.hyperparameters,
            "train_features_sha256": self.metadata.get("inputs", {}).get("train_features_sha256"),
        }


def _recorded_outputs(directory: Path) -> dict[str, str]:
    """sha256 of each output as the train stage recorded it (empty when there is no record)."""
    try:
        record = json.loads((directory / STAGE_RECORD).read_text(encoding="utf-8"))
        return dict(record.get("outputs", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def load_trained(build_dir: Path) -> TrainedModel:
    """The model `edge-build train` left in build_dir/train; a clear error when there is none."""
    directory = Path(build_dir) / TRAIN_DIR
    record_path = directory / RECORD_NAME
    if not record_path.is_file():
        raise EdgeBuildError(f"no trained model in {directory}", _HINT)
    try:
        metadata = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EdgeBuildError(f"{record_path}: unreadable training record ({exc})", _HINT) from exc
    missing = [
        key for key in ("num_classes", "labels", "preprocessing", "padding", "weights", "files") if key not in metadata
    ]
    if missing:
        raise EdgeBuildError(f"{record_path}: missing '{missing[0]}'", _HINT)
    if metadata["num_classes"] != taxonomy.NUM_CLASSES:
        raise EdgeBuildError(
            f"{record_path}: a {metadata['num_classes']}-class model; edge-build knows {taxonomy.NUM_CLASSES} classes",
            _HINT,
        )
    checkpoint = directory / metadata["files"]["network"]
    head = directory / metadata["files"]["head"]
    outputs = _recorded_outputs(directory)
    for path in (checkpoint, head):
        if not path.is_file():
            raise EdgeBuildError(f"checkpoint missing: {path}", _HINT)
        recorded = outputs.get(path.name)
        if recorded is not None and sha256_file(path) != recorded:
            raise EdgeBuildError(
                f"{path}: changed since `edge-build train` wrote it (sha256 differs from {STAGE_RECORD})",
                "the file is corrupt or was replaced; run `edge-build train --force`",
            )
    return TrainedModel(directory=directory, checkpoint=checkpoint, head_checkpoint=head, metadata=metadata)
