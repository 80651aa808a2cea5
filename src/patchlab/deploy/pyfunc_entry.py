"""What MLflow runs to load the logged model (models from code: no pickle)."""

from mlflow.models import set_model

from patchlab.deploy.pyfunc import PatchCoreModel

set_model(PatchCoreModel())
