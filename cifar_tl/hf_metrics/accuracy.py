"""Accuracy as a local 🤗 `evaluate` metric module, loaded by path so the cross-check needs no Hub
(`evaluate.load("accuracy")` fetches its script from the Hub; the evaluate wheel ships no metrics):

    evaluate.load(str(Path(cifar_tl.__file__).parent / "hf_metrics" / "accuracy.py"))

The inputs and output of the Hub's `evaluate-metric/accuracy` (predictions, references, normalize,
sample_weight -> {"accuracy": float}), written without sklearn. The features are int32, so string predictions
(a forgotten label_mapping) fail loudly instead of scoring 0."""
import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the fraction of predictions equal to their reference (or the count with normalize=False)."
_KWARGS = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids.
    normalize (bool): return the fraction (default) or the number of correct predictions.
    sample_weight (list of float): optional per-sample weights.
Returns:
    {"accuracy": float}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int32"),
                                        "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        p, r = np.asarray(predictions), np.asarray(references)
        w = np.ones(len(p)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        correct = float(((p == r) * w).sum())
        return {"accuracy": correct / w.sum() if normalize else correct}
