"""The registered model as an MLflow pyfunc: the platform's preprocessing travels with the weights.

`mlflow.pyfunc.load_model("models:/imdb-sentiment@champion").predict(texts)`,
`mlflow models serve -m models:/imdb-sentiment@champion`, batch prediction
(pipelines.predict) and the Serve replicas all run `pipelines.inference.classifier.Classifier`
on the same model folder (pipelines.inference.variants): the same cleaning, head+tail
truncation and max length as training, so the same review gets the same label
everywhere.

Input: a list of strings, a pandas Series, or a DataFrame with a `text` column (else
its first column). Output: a DataFrame, one row per text: `label`, `label_id`,
`score`, `probability_<label>` per label. The backend is the version's default (the
fastest whose accuracy check passed) unless `params={"backend": ...}` or
$IMDB_INFERENCE_BACKEND names another.
"""

from __future__ import annotations

import os

import mlflow.pyfunc

BACKEND_ENV = "IMDB_INFERENCE_BACKEND"
MODEL_ARTIFACT = "model"


def texts_of(model_input) -> list[str]:
    """The texts in any input shape pyfunc hands over, as strings; refuses what is not text."""
    import numpy as np
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        values = model_input[column].tolist()
    elif isinstance(model_input, (pd.Series, np.ndarray)):
        values = list(np.asarray(model_input).reshape(-1))
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        values = list(model_input)
    bad = next((i for i, value in enumerate(values) if not isinstance(value, str)), None)
    if bad is not None:
        raise TypeError(f"input row {bad} is a {type(values[bad]).__name__}, not a text")
    return values


class SentimentModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from pipelines.inference import variants

        self.folder = context.artifacts[MODEL_ARTIFACT]
        self.default_backend = os.environ.get(BACKEND_ENV) or variants.load_scores(self.folder)["default_backend"]
        self._classifiers: dict = {}

    def classifier(self, backend: str):
        from pipelines.inference.classifier import load_classifier_from

        if backend not in self._classifiers:
            self._classifiers[backend] = load_classifier_from(self.folder, backend)
        return self._classifiers[backend]

    def predict(self, context, model_input, params=None):
        import pandas as pd

        backend = (params or {}).get("backend") or self.default_backend
        predictions = self.classifier(backend).predict(texts_of(model_input))
        labels = self.classifier(backend).labels
        return pd.DataFrame(
            {
                "label": [p["label"] for p in predictions],
                "label_id": [p["label_id"] for p in predictions],
                "score": [p["score"] for p in predictions],
                **{f"probability_{label}": [p["probabilities"][label] for p in predictions] for label in labels},
            }
        )
