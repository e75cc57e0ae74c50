"""Serving a trained workdir over HTTP: `--mode=serve` (m6_jax/cli/serve.py).

service.py holds the model behind dynamic batchers (batcher.py) with bucketed, pre-compiled
batch shapes; schemas.py and inputs.py turn requests into typed, bounded inputs; app.py is
the FastAPI app and the demo page (static/index.html); server.py runs it under uvicorn.
The API, its limits and its load figures: docs/serve.md.
"""
