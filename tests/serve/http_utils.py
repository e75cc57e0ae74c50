"""Sending requests to the app in this process, several at once (httpx over ASGI)."""

import asyncio
import base64

import httpx


def post_all(app, requests):
  """The responses to [(path, httpx keyword arguments)], sent concurrently."""

  async def send():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
      return await asyncio.gather(*(client.post(path, **kw) for path, kw in requests))

  return asyncio.run(send())


def post(app, path, **kw):
  return post_all(app, [(path, kw)])[0]


def get(app, path):
  async def send():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
      return await client.get(path)

  return asyncio.run(send())


def b64(path):
  with open(path, "rb") as f:
    return base64.b64encode(f.read()).decode("ascii")
