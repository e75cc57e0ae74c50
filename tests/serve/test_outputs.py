"""The server's outputs are --mode=generate's (the library calls it makes, on the same
checkpoint) for the same inputs and options, and do not depend on the requests that share
their batch: captions, answers, continuations (greedy, beam, sampled) and drawings (PNG
bytes)."""

import base64
import os

import pytest
from http_utils import b64, get, post, post_all

from m6_jax.checkpoint import checkpoints
from m6_jax.data import scripts
from m6_jax.infer import generate
from m6_jax.infer import text_to_image as t2i

QUESTION = "what color is the circle?"
SAMPLE = {"decoding": "sample", "temperature": 1.5, "top_k": 20}  # one setting: one compile
DECODINGS = [
  {},
  {"decoding": "beam", "beam_size": 3, "length_penalty": 1.0},
  {**SAMPLE, "seed": 7},
  {"language": "zh"},  # greedy, in Chinese
]


def _generate_kwargs(options):
  kw = {k: v for k, v in options.items() if k != "decoding"}
  return {"decoding_method": options.get("decoding", "greedy"), **kw}


def _request(kind, image, options, text="a small red"):
  body = dict(options)
  if kind != "continue":
    body["image"] = b64(image)
  if kind == "answer":
    body["question"] = QUESTION
  if kind == "continue":
    body["prompt"] = text
  return f"/v1/{kind}", {"json": body}


def _generated(model, kind, image, options, text="a small red"):
  """What --mode=generate writes for one input (its `generate.generate` call)."""
  inputs = {
    "caption": dict(images=[image]),
    "answer": dict(images=[image], questions=[QUESTION]),
    "continue": dict(prompt=text),
  }[kind]
  return generate.generate(model, **inputs, **_generate_kwargs(options))[0]


def test_description_health_and_demo_page(app, service, served):
  assert get(app, "/healthz").json() == {"status": "ok"}
  described = get(app, "/v1/model").json()
  model = service.model
  assert described["step"] == model.step > 0
  assert (
    described["tokenizer_sha256"]
    == checkpoints.tokenizer_fingerprint(model.tokenizer)["tokenizer_sha256"]
  )
  assert described["endpoints"] == ["caption", "answer", "continue", "image"]
  assert described["batching"]["buckets"] == [8, 16]  # rounded to the 8 devices' batch split
  assert described["model"]["code_vocab_size"] == 16
  assert served[0] not in str(described)  # no server path
  page = get(app, "/")
  assert page.status_code == 200 and 'id="image-file"' in page.text


@pytest.mark.parametrize("options", DECODINGS, ids=["greedy", "beam", "sample", "greedy_zh"])
def test_text_equals_generate(app, service, scene_files, options):
  for kind in ("caption", "answer", "continue"):
    path, kw = _request(kind, scene_files[0], options)
    response = post(app, path, **kw)
    assert response.status_code == 200, response.text
    got = response.json()
    want = _generated(service.model, kind, scene_files[0], options)
    assert got["task"] == want["task"] and got["output"] == want["output"], (kind, got, want)
    assert got["step"] == service.model.step
    if options.get("language") == "zh":
      assert "en" not in scripts.text_scripts(got["output"]), got


def test_text_does_not_depend_on_the_batch(app, service, scene_files):
  """12 requests of every kind and decoding, sent together (one batch per decoding setting,
  the greedy one of 6 rows), each equal to the same request sent alone."""
  requests = []
  for i, image in enumerate(scene_files[:6]):
    kind = ("caption", "answer", "continue")[i % 3]
    requests.append(_request(kind, image, {}, text=f"a large {i}"))
    requests.append(_request(kind, image, {**SAMPLE, "seed": i}))
  before = dict(service.text.batch_sizes)
  together = [r.json()["output"] for r in post_all(app, requests)]
  ran = service.text.batch_sizes - type(service.text.batch_sizes)(before)
  assert ran == {6: 2}, ran  # two settings, six rows each
  alone = [post(app, path, **kw).json()["output"] for path, kw in requests]
  assert together == alone
  assert len(set(alone[1::2])) > 1  # the seeds matter


def test_text_across_buckets(app, service, scene_files):
  """12 sampled captions at once run in the bucket of 16 rows; alone, in the bucket of 8."""
  requests = [_request("caption", image, {**SAMPLE, "seed": 3}) for image in scene_files]
  before = dict(service.text.batch_sizes)
  together = [r.json()["output"] for r in post_all(app, requests)]
  assert service.text.batch_sizes[12] == before.get(12, 0) + 1
  alone = [post(app, path, **kw).json()["output"] for path, kw in requests]
  assert together == alone


def test_multipart_upload_equals_base64(app, scene_files):
  with open(scene_files[1], "rb") as f:
    form = post(app, "/v1/answer", files={"image": f}, data={"question": QUESTION, "top_k": "3"})
  body = {"image": b64(scene_files[1]), "question": QUESTION, "top_k": 3}
  assert form.status_code == 200, form.text
  assert form.json() == post(app, "/v1/answer", json=body).json()


def test_chinese_text_in_every_encoding(app):
  prompt, want = "左侧有一个", None
  for kw in (
    {"json": {"prompt": prompt}},
    {"files": {"prompt": (None, prompt)}},  # multipart
    {"data": {"prompt": prompt}},  # urlencoded, percent-encoded as browsers send it
    {  # urlencoded, raw UTF-8 as `curl -d` sends it
      "content": f"prompt={prompt}".encode(),
      "headers": {"content-type": "application/x-www-form-urlencoded"},
    },
  ):
    got = post(app, "/v1/continue", **kw).json()
    assert got["prompt"] == prompt, (kw, got)
    want = want or got["output"]
    assert got["output"] == want


def _drawn_by_generate(served, vqgan_loader, tmp_path, **request):
  """The PNG files --mode=generate writes for the drawing request (`t2i.run`)."""
  out = str(tmp_path / f"out_{request['seed']}")
  req = t2i.ImageRequest(output_dir=out, **request)
  index = t2i.run(req, served[0], image_tokenizer_loader=vqgan_loader)
  files = []
  for name in index["files"]:
    with open(os.path.join(out, name), "rb") as f:
      files.append(f.read())
  return index, files


def test_drawings_equal_generate_png_bytes(app, served, vqgan_loader, tmp_path):
  request = dict(prompt="一个红色的圆", num_images=3, rerank=4, seed=5)
  index, files = _drawn_by_generate(served, vqgan_loader, tmp_path, **request)
  response = post(app, "/v1/image", json=request)
  assert response.status_code == 200, response.text
  got = response.json()
  assert [base64.b64decode(p) for p in got["images"]] == files
  assert got["candidates"] == index["candidates"] and got["scores"] == index["scores"]
  assert got["num_candidates"] == 4 and got["step"] == index["step"]

  plain = dict(prompt="a large blue square", num_images=2, seed=6, guidance_scale=1.0)
  _, files = _drawn_by_generate(served, vqgan_loader, tmp_path, **plain)
  got = post(app, "/v1/image", json=plain).json()
  assert [base64.b64decode(p) for p in got["images"]] == files and "scores" not in got


def test_drawings_do_not_depend_on_the_batch(app):
  requests = [
    ("/v1/image", {"json": {"prompt": p, "num_images": 3, "seed": s}})
    for p, s in [("一个红色的圆", 1), ("a green cross", 2), ("一个红色的圆", 3)]
  ]
  together = [r.json()["images"] for r in post_all(app, requests)]
  alone = [post(app, path, **kw).json()["images"] for path, kw in requests]
  assert together == alone
  assert together[0] != together[2]  # the seed matters, the prompt being the same
