"""MLflow "models from code" entry: the pyfunc a logged lardo_ray model loads (no pickled Python object)."""

import mlflow.models

from lardo_ray.models.mlflow_model import LardoModel

mlflow.models.set_model(LardoModel())
