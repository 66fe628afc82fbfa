"""`python -m pipeline.serve -m MODEL_URI [--host 127.0.0.1] [--port 5002]`: the registered generator over HTTP.

It is MLflow's own scoring server (`mlflow models serve`'s app: POST /invocations with dataframe_split,
dataframe_records, inputs or instances plus params; GET /ping, /health, /version) behind a gate that checks
each request before MLflow reads it, with the generator's own checks (pipeline/generator.py), and refuses what it
cannot serve with HTTP 400 and one line: a body that is not JSON, rows without a `seed` column, a seed out of
range, an unknown or wrong-typed param, or a request above the cost limit (rows x steps network evaluations;
DDPM_SERVE_MAX_EVALS). `mlflow models serve` makes the same checks in predict, but MLflow wraps their message
in several lines that repeat the input, ignores unknown params and answers malformed JSON in its own words.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

BAD_REQUEST = 400


def first_line(text: str) -> str:
    return next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")


def check_body(body: bytes, model) -> str | None:
    """Why the generator cannot answer this /invocations body (one line), or None when it can."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.scoring_server import infer_and_parse_data

    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        return f"the body is not JSON ({getattr(e, 'msg', 'not UTF-8')}{where})"
    if not isinstance(payload, dict):
        return 'the body must be a JSON object, e.g. {"inputs": {"seed": [0, 1]}, "params": {"steps": 30}}'
    params = payload.get("params") or {}
    if not isinstance(params, dict):
        return 'params must be a JSON object, e.g. {"sampler": "ddim", "steps": 30}'
    try:
        # read without the schema, which would cast a seed of 1.5 to 1: seeds arrive as the client wrote them
        rows = infer_and_parse_data({k: v for k, v in payload.items() if k != "params"})
        model.unwrap_python_model().check(rows, params)
    except MlflowException as e:
        return first_line(e.message)
    except Exception as e:  # pandas or numpy could not make rows of it
        return f"the input could not be read as rows with a `seed` column ({type(e).__name__}: {first_line(e)})"
    return None


class Gate:
    """ASGI middleware: a POST to /invocations whose body `check` refuses gets HTTP 400 with one line; every
    other request, and the body as it came, goes on to the app."""

    def __init__(self, app, check: Callable[[bytes], str | None]):
        self.app, self.check = app, check

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/invocations" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        problem = self.check(body)
        if problem is None:
            async def replay() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            return await self.app(scope, replay, send)
        content = json.dumps({"error_code": "BAD_REQUEST", "message": problem}).encode()
        await send({"type": "http.response.start", "status": BAD_REQUEST,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})


def app_for(model_uri: str):
    """(the gated ASGI app, the loaded pyfunc model)."""
    import mlflow
    from mlflow.pyfunc import scoring_server

    from .tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    model = mlflow.pyfunc.load_model(model_uri)
    return Gate(scoring_server.init(model), lambda body: check_body(body, model)), model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.serve", description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model-uri", required=True, help="e.g. models:/ddpm-fashion-mnist@best-fid")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("-p", "--port", type=int, default=5002)
    args = ap.parse_args(argv)
    for key, value in (("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "true")):
        os.environ.setdefault(key, value)
    import uvicorn

    try:
        app, model = app_for(args.model_uri)
    except Exception as e:
        print(f"error: serve: {args.model_uri}: {type(e).__name__}: {first_line(e)}", file=sys.stderr)
        return 2
    gen = model.unwrap_python_model()
    print(f"serve: {args.model_uri} on http://{args.host}:{args.port}/invocations ({gen.device.type}; at most "
          f"{gen.max_evals:,} network evaluations per request, rows x steps)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, workers=1, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
