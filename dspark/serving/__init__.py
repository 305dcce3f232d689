"""`dspark serve`: the serving engine behind an OpenAI-compatible HTTP API (docs/serving.md).

`engine_loop` steps the engine in its own thread; `protocol` parses and checks request bodies and shapes
responses; `app` is the FastAPI application; `metrics` the Prometheus metrics; `server` starts uvicorn with
a draining SIGTERM; `ray_app` the same application as a Ray Serve deployment.
"""
