"""scikit-learn's bundled datasets (``digits``, ``breast_cancer``, ``wine``): no network,
no file outside the installed packages, so the default run works on any machine."""

from __future__ import annotations

import numpy as np

from flwr_scaling.data.source_types import Source, SourceKind

# Examples in each set (fixed by scikit-learn; tests/test_config.py checks them). They bound
# num-clients before any data is loaded: every client needs MIN_PARTITION_SIZE training examples.
SIZES = {"digits": 1797, "breast_cancer": 569, "wine": 178}


def load_bundled(name: str) -> Source:
    """One of scikit-learn's bundled datasets by name."""
    from sklearn import datasets as skdatasets

    if name == "digits":
        bunch = skdatasets.load_digits()
        # Pixels are 0..16; scale to [0, 1] and keep the 8x8 image shape for the CNN.
        features = (bunch.data / 16.0).reshape(-1, 1, 8, 8).astype(np.float32)
        return Source(features, bunch.target.astype(np.int64), (1, 8, 8), "cnn")
    loader = {"breast_cancer": skdatasets.load_breast_cancer, "wine": skdatasets.load_wine}[name]
    bunch = loader()
    features = bunch.data.astype(np.float32)
    return Source(features, bunch.target.astype(np.int64), (features.shape[1],), "logreg", standardize=True)


def _bundled_kind(name: str) -> SourceKind:
    def load(target: str, label_column: str, test_path: str) -> Source:
        return load_bundled(name)

    load.__doc__ = f"scikit-learn's {name} dataset (the spec is the name; no path, no label column)."
    return SourceKind(name, load, takes_path=False, image=name == "digits", num_examples=SIZES[name],
                      text_labels=False)


BUNDLED_KINDS = tuple(_bundled_kind(name) for name in SIZES)
