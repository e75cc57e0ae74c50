"""The HTTP API (FastAPI) over a Service, and the demo page at /.

    POST /v1/caption   image                  -> {"task", "output", "step"}
    POST /v1/answer    image, question        -> {"task", "question", "output", "step"}
    POST /v1/continue  prompt (image)         -> {"task", "prompt", "output", "step"}
    POST /v1/image     prompt, num_images ... -> {"prompt", "seed", "images": [base64 PNG], ...}
    GET  /v1/model     what is served;  GET /healthz

Each POST takes JSON (image base64) or a multipart form (image a file), with the decoding
options of --mode=generate (m6_jax/serve/schemas.py). Every error is a JSON body
{"error": "<one line>"} with its status: 4xx for what a request did wrong, 503 while the
server shuts down; an unexpected failure is a 500 and is logged.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import importlib.resources
import logging

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from m6_jax.errors import UserError
from m6_jax.serve import inputs, schemas
from m6_jax.serve.batcher import Closed
from m6_jax.serve.inputs import RequestError
from m6_jax.serve.service import TEXT_KINDS, Service

log = logging.getLogger("m6_jax.serve")

_TEXT_MODELS = {"caption": schemas.Caption, "answer": schemas.Answer, "continue": schemas.Continue}
_NEEDS_IMAGE = {"caption": True, "answer": True, "continue": False}


def _error(status: int, message: str) -> JSONResponse:
  return JSONResponse({"error": message}, status_code=status)


@functools.cache
def demo_page() -> str:
  return (importlib.resources.files("m6_jax.serve") / "static" / "index.html").read_text("utf-8")


def create_app(service: Service) -> FastAPI:
  async def off_loop(fn, *args):
    """fn(*args) on the service's worker threads (image decoding, drawing's last steps)."""
    return await asyncio.get_running_loop().run_in_executor(service.workers, fn, *args)

  # No /docs or /redoc: their pages load scripts from a CDN; /openapi.json stays.
  app = FastAPI(title="m6-jax", docs_url=None, redoc_url=None)
  max_bytes = service.limits.max_request_bytes
  step = int(service.model.step)

  @app.exception_handler(RequestError)
  async def request_error(_, e: RequestError):
    return _error(e.status, str(e))

  @app.exception_handler(pydantic.ValidationError)
  async def invalid(_, e: pydantic.ValidationError):
    return _error(422, schemas.one_line(e))

  @app.exception_handler(RequestValidationError)
  async def invalid_request(_, e: RequestValidationError):
    return _error(422, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))

  @app.exception_handler(HTTPException)
  async def http_error(_, e: HTTPException):
    return _error(e.status_code, str(e.detail))

  @app.exception_handler(UserError)
  async def user_error(_, e: UserError):  # a GenerationError, an ImageError
    return _error(400, str(e))

  @app.exception_handler(Closed)
  async def closed(_, e: Closed):
    return _error(503, str(e))

  @app.exception_handler(Exception)
  async def failure(_, e: Exception):
    log.exception("request failed")
    return _error(500, f"internal error ({type(e).__name__}); the server log has the details.")

  @app.get("/healthz")
  async def healthz():
    return {"status": "ok"}

  @app.get("/v1/model")
  async def model():
    return service.summary()

  @app.get("/", response_class=HTMLResponse)
  async def index():
    return demo_page()

  async def text(kind: str, request: Request):
    fields, image, form = await inputs.read_request(request, max_bytes)
    options = schemas.parse(_TEXT_MODELS[kind], fields, form)
    if image is None and _NEEDS_IMAGE[kind]:
      raise RequestError(
        422, "image: required (base64 in JSON, or a file named 'image' in a multipart form)."
      )
    pixels = None if image is None else await off_loop(service.pixels, image)
    name = TEXT_KINDS[kind]
    given = getattr(options, name) if name else None
    task, future = service.submit_text(kind, pixels, given, options)
    output = await asyncio.wrap_future(future)
    return {"task": task, **({name: given} if name else {}), "output": output, "step": step}

  @app.post("/v1/caption")
  async def caption(request: Request):
    return await text("caption", request)

  @app.post("/v1/answer")
  async def answer(request: Request):
    return await text("answer", request)

  @app.post("/v1/continue")
  async def continue_(request: Request):
    return await text("continue", request)

  @app.post("/v1/image")
  async def image(request: Request):
    fields, image, form = await inputs.read_request(request, max_bytes)
    req = schemas.parse(schemas.Draw, fields, form)
    if image is not None:
      raise RequestError(422, "image: /v1/image draws from a prompt and takes no image.")
    futures = service.submit_draw(req)
    codes = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    out = await off_loop(service.finish_draw, req, codes)
    pngs = [base64.b64encode(p).decode("ascii") for p in out.pop("pngs")]
    settings = req.model_dump(exclude={"prompt", "seed"})
    head = {"prompt": req.prompt, "seed": req.seed, "settings": settings, "images": pngs}
    return {**head, **out, "step": step}

  return app
