"""Serving: `fastdiff serve`, an HTTP service of fastdiff engines on Ray Serve.

- `fastdiff.serving.api`: the HTTP API (FastAPI): POST /v1/images, GET /v1/models, health,
  readiness, the playground page at /, OpenAPI docs; request checks and limits. No Ray needed.
- `fastdiff.serving.runner`: the model side: one Engine, one request's check, a batch of
  requests in as few sampling calls as their settings allow. No Ray needed.
- `fastdiff.serving.app`: the Ray Serve application (deployments, ``@serve.batch``, replicas,
  autoscaling, metrics); needs the serve extra: pip install "fastdiff[serve]".
"""
