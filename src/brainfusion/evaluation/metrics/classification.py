"""Classification scores on integer labels: confusion matrix, balanced accuracy, macro-F1.

Thin wrappers over scikit-learn's implementations (installed with nilearn, which brainfusion
already needs), so the numbers are the ones papers and other tools report, with one convention
fixed here: the confusion matrix always has `num_classes` rows, even when a class is missing from
a test set, so matrices of several runs can be averaged and plotted side by side.

Why these two headline numbers: the development slices are imbalanced 49:34:14:1 (2,560
NonDemented, 52 ModerateDemented), so plain accuracy rewards a classifier that ignores the rare
classes (always answering NonDemented scores 50 %). Balanced accuracy (the mean of per-class
recall, sklearn's `balanced_accuracy_score`: over the classes present in `y_true`) gives every
class one vote; macro-F1 (unweighted mean of per-class F1 over the classes present in `y_true` or
`y_pred`) also punishes false alarms of a rare class.
"""

from __future__ import annotations

import warnings

import numpy as np

from ...errors import BrainfusionError


def _labels(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.ndim != 1 or t.shape != p.shape or len(t) == 0:
        raise BrainfusionError(
            f"y_true and y_pred must be non-empty 1-D label arrays of one length, not shapes {t.shape} and {p.shape}; pass argmax(probs, 1)."
        )
    if t.dtype.kind not in "iu" or p.dtype.kind not in "iu":
        raise BrainfusionError(f"labels must be integers, not {t.dtype} and {p.dtype}; pass class indices, not names or probabilities.")
    return t.astype(np.int64), p.astype(np.int64)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts (num_classes, num_classes): row = true class, column = predicted class."""
    from sklearn.metrics import confusion_matrix as sk_confusion

    t, p = _labels(y_true, y_pred)
    if min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes:
        raise BrainfusionError(f"labels must lie in 0..{num_classes - 1}, but range from {min(t.min(), p.min())} to {max(t.max(), p.max())}; check num_classes.")
    return sk_confusion(t, p, labels=np.arange(num_classes))


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean recall over the classes present in `y_true` (chance level: 1 / that many classes)."""
    from sklearn.metrics import balanced_accuracy_score

    t, p = _labels(y_true, y_pred)
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": expected for small test sets
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(t, p))


def macro_f1(y_true, y_pred) -> float:
    """Unweighted mean F1 over the classes present in `y_true` or `y_pred` (0 for a class never hit)."""
    from sklearn.metrics import f1_score

    t, p = _labels(y_true, y_pred)
    return float(f1_score(t, p, average="macro", zero_division=0))


def per_class_recall(matrix: np.ndarray) -> np.ndarray:
    """Recall of each class from a confusion matrix; NaN for a class with no true examples."""
    matrix = np.asarray(matrix, dtype=np.float64)
    support = matrix.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(matrix) / support, np.nan)


def classification_scores(y_true, y_pred, num_classes: int) -> dict:
    """Balanced accuracy, macro-F1, plain accuracy, per-class recall and the confusion matrix, JSON-ready."""
    t, p = _labels(y_true, y_pred)
    matrix = confusion_matrix(t, p, num_classes)
    return {
        "balanced_accuracy": balanced_accuracy(t, p),
        "macro_f1": macro_f1(t, p),
        "accuracy": float(np.mean(t == p)),
        "recall_per_class": [None if np.isnan(r) else float(r) for r in per_class_recall(matrix)],
        "support_per_class": matrix.sum(1).astype(int).tolist(),
        "confusion_matrix": matrix.astype(int).tolist(),
        "n": int(len(t)),
    }
