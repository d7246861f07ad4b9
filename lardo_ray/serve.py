"""A Ray Serve application over a registered lardo_ray model: the same numbers as `lardo-ray predict`.

    serve run lardo_ray.serve:app model=models:/bbbp-rules_dsm/1 [tracking_uri=sqlite:///outputs/demo/mlflow.db]
    (or LARDO_MODEL_URI / MLFLOW_TRACKING_URI in the environment; `serve run configs/serve.yaml` on a cluster)

POST / with ``{"smiles": ["CCO", ...]}`` answers ``{"model": ..., "predictions": [{"pred_<target>": p,
"pred_<target>_std": s, "error": null}, ...]}`` (encoders: ``{"embedding": [...]}``), one entry per SMILES in
order; a SMILES the model refuses gets ``null`` numbers and its reason in ``error``. Concurrent requests
are batched into one forward pass (``@serve.batch``). A body that is not ``{"smiles": [strings]}`` gets
a 400 that says what is expected.
"""

from __future__ import annotations

import math
import os
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

MAX_SMILES_PER_REQUEST = 10_000


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


@serve.deployment(ray_actor_options={"num_cpus": 1})
class LardoPredictor:
    def __init__(self, model_uri: str, tracking_uri: str | None = None, batch_size: int = 256):
        from lardo_ray.models.mlflow_model import download, resolve_version
        from lardo_ray.models.saved import SavedModel

        self.model_uri = resolve_version(model_uri, tracking_uri) if tracking_uri else model_uri
        self.model = SavedModel(download(self.model_uri, tracking_uri))
        self.batch_size = batch_size

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _answer(self, requests: list[list[str]]) -> list[list[dict[str, Any]]]:
        """Every request of the batch in one model call, split back per request."""
        from lardo_ray.models.mlflow_model import output_frame

        flat = [s for smiles in requests for s in smiles]
        frame = output_frame(self.model, flat, self.batch_size)
        rows = [{k: _clean(v) for k, v in r.items()} for r in frame.to_dict(orient="records")]
        out, start = [], 0
        for smiles in requests:
            out.append(rows[start : start + len(smiles)])
            start += len(smiles)
        return out

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001 - any unparsable body is the client's error
            return JSONResponse({"error": 'the body must be JSON: {"smiles": ["CCO", ...]}'}, status_code=400)
        smiles = body.get("smiles") if isinstance(body, dict) else None
        if not isinstance(smiles, list) or not all(isinstance(s, str) for s in smiles):
            return JSONResponse({"error": 'expected {"smiles": [list of SMILES strings]}; got keys '
                                 f"{sorted(body) if isinstance(body, dict) else type(body).__name__}"},
                                status_code=400)
        if len(smiles) > MAX_SMILES_PER_REQUEST:
            return JSONResponse({"error": f"at most {MAX_SMILES_PER_REQUEST} SMILES per request (got {len(smiles)}); "
                                 "score files with `lardo-ray predict`"}, status_code=413)
        rows = await self._answer(smiles) if smiles else []
        return JSONResponse({"model": self.model_uri, "predictions": rows})


def app(args: dict[str, str] | None = None):
    """The application builder `serve run lardo_ray.serve:app model=URI` calls."""
    args = dict(args or {})
    model = args.get("model") or os.environ.get("LARDO_MODEL_URI")
    if not model:
        raise ValueError("no model: `serve run lardo_ray.serve:app model=models:/NAME/VERSION` or set LARDO_MODEL_URI")
    tracking = args.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    options: dict[str, Any] = {}
    if "num_cpus" in args:
        options["ray_actor_options"] = {"num_cpus": float(args["num_cpus"])}
    return LardoPredictor.options(**options).bind(model, tracking, int(args.get("batch_size", 256)))
