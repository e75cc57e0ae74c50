"""Load on `--mode=serve`: requests/s, p50 / p99 latency and errors at 1, 4, 16 and 64
concurrent clients, beside the same requests sent one at a time to a server that does not
batch (--max_batch=1).

  python benchmarks/serve.py --workdir=/tmp/m6_base [--t2i_workdir=/tmp/m6_t2i]
      [--clients=1,4,16,64] [--seconds=30] [--json=PATH]

For each workdir the benchmark starts the server (`python -m m6_jax.main --mode=serve
--port=0`, warmed up) on localhost, then runs each level for --seconds: every client sends a
request, waits for its answer and sends the next (captions of rendered validation scenes,
base64 JSON; drawings of held-out captions, English and Chinese, --draw_images images each,
the default options, whose programs the warm-up compiled). Before each level, its "sequential" baseline runs as long: one client against
a second server started with --max_batch=1 (each request decoded alone, at once); the ratio
is the level's requests/s over that baseline's, so that a drift of the machine's load
between levels does not enter it. The server's resident memory is read from /proc after the
warm-up and after the last level. Prints a table and writes JSON (default
benchmarks/results/serve.json).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from PIL import Image  # noqa: E402

from m6_jax.data import synthetic  # noqa: E402

READY = re.compile(r"serving step \d+ of .* on http://([\d.]+):(\d+)")


def _rss_mib(pid: int) -> float:
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


class Server:
  """`--mode=serve` in a subprocess, on a free port of localhost."""

  def __init__(self, workdir: str, extra: list[str], log_path: str):
    self.log = open(log_path, "w")
    self.proc = subprocess.Popen(
      [sys.executable, "-m", "m6_jax.main", "--mode=serve", f"--workdir={workdir}", "--port=0"]
      + extra,
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=self.log,
      text=True,
    )
    start = time.perf_counter()
    for line in self.proc.stdout:
      match = READY.search(line)
      if match:
        self.host, self.port = match.group(1), int(match.group(2))
        break
    else:
      raise RuntimeError(f"the server did not start; see {log_path}")
    self.start_s = time.perf_counter() - start
    threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # drain stdout

  def batches(self, batcher: str) -> dict[int, int]:
    """Batch size -> batches the server's `batcher` ran so far (GET /v1/model)."""
    conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
    conn.request("GET", "/v1/model")
    runs = json.loads(conn.getresponse().read())["batches_run"].get(batcher, {})
    conn.close()
    return {int(k): v for k, v in runs.items()}

  def rss_mib(self) -> float:
    return _rss_mib(self.proc.pid)

  def stop(self) -> int:
    self.proc.send_signal(signal.SIGTERM)
    code = self.proc.wait(120)
    self.log.close()
    return code


def caption_bodies(n: int = 64) -> list[bytes]:
  bodies = []
  for i in range(n):
    buffer = io.BytesIO()
    image = synthetic.make_example(i, synthetic.split_index("validation", i))["image"]
    Image.fromarray(image).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode("ascii")
    bodies.append(json.dumps({"image": image}).encode())
  return bodies


def draw_bodies(num_images: int, n: int = 64) -> list[bytes]:
  bodies = []
  for i in range(n):
    example = synthetic.make_example(i, synthetic.split_index("validation", i))
    caption = example["caption_zh" if i % 2 else "caption_en"]
    body = {"prompt": caption, "num_images": num_images, "seed": i}  # default guidance: 3
    bodies.append(json.dumps(body, ensure_ascii=False).encode())
  return bodies


def run_level(server: Server, path: str, bodies: list[bytes], clients: int, seconds: float):
  """Closed-loop clients for `seconds`: (latencies of the answered requests, error count,
  wall seconds)."""
  latencies: list[float] = []
  errors = [0]
  lock = threading.Lock()
  deadline = time.perf_counter() + seconds

  def client(index: int) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
    i = index
    while time.perf_counter() < deadline:
      body = bodies[i % len(bodies)]
      i += clients
      start = time.perf_counter()
      try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        ok = response.status == 200
      except (OSError, http.client.HTTPException):
        ok = False
        conn.close()
        conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
      elapsed = time.perf_counter() - start
      with lock:
        if ok:
          latencies.append(elapsed)
        else:
          errors[0] += 1
    conn.close()

  start = time.perf_counter()
  threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return latencies, errors[0], time.perf_counter() - start


def _level(server: Server, batcher: str, path, bodies, clients: int, seconds: float):
  """run_level, and the mean rows per batch the server ran meanwhile."""
  before = server.batches(batcher)
  measured = run_level(server, path, bodies, clients, seconds)
  after = server.batches(batcher)
  ran = {k: v - before.get(k, 0) for k, v in after.items()}
  mean = sum(k * v for k, v in ran.items()) / max(1, sum(ran.values()))
  return (*measured, mean)


def _row(name: str, clients: int, latencies, errors: int, wall: float, batch: float) -> dict:
  ms = sorted(x * 1000 for x in latencies)
  pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))] if ms else float("nan")
  return {
    "row": name,
    "clients": clients,
    "requests": len(ms),
    "errors": errors,
    "requests_per_s": len(ms) / wall,
    "p50_ms": statistics.median(ms) if ms else float("nan"),
    "p99_ms": pick(0.99),
    "mean_batch": batch,
  }


def measure(workdir: str, kind: str, args, extra: list[str]) -> dict:
  if kind == "caption":
    path, bodies = "/v1/caption", caption_bodies()
  else:
    path, bodies = "/v1/image", draw_bodies(args.draw_images)
  log_dir = os.path.dirname(os.path.abspath(args.json))
  os.makedirs(log_dir, exist_ok=True)
  batcher = "text" if kind == "caption" else "codes"
  sequential = Server(workdir, extra + ["--max_batch=1"], os.path.join(log_dir, f"{kind}_seq.log"))
  server = Server(workdir, extra, os.path.join(log_dir, f"{kind}_server.log"))
  warm_rss = server.rss_mib()
  rows = []
  for clients in args.clients:  # each level right after its own baseline: the load drifts
    base = _row("sequential", 1, *_level(sequential, batcher, path, bodies, 1, args.seconds))
    row = _row("batched", clients, *_level(server, batcher, path, bodies, clients, args.seconds))
    row["rss_mib"] = server.rss_mib()  # after the level: a leak grows level after level
    base["vs_sequential"], row["vs_sequential"] = (
      1.0,
      row["requests_per_s"] / base["requests_per_s"],
    )
    rows += [base, row]
    print(_format([base, row], kind), flush=True)
  end_rss = server.rss_mib()
  code = server.stop()
  sequential.stop()
  return {
    "kind": kind,
    "rows": rows,
    "start_s": server.start_s,
    "rss_after_warmup_mib": warm_rss,
    "rss_at_end_mib": end_rss,
    "exit_status_after_sigterm": code,
  }


def _format(rows: list[dict], kind: str) -> str:
  lines = []
  for r in rows:
    lines.append(
      f"{kind:8s} {r['row']:10s} {r['clients']:7d} {r['requests']:8d} {r['errors']:6d} "
      f"{r['requests_per_s']:8.1f} {r['p50_ms']:9.1f} {r['p99_ms']:9.1f} "
      f"{r['mean_batch']:6.1f} {r.get('vs_sequential', float('nan')):6.2f}x"
    )
  return "\n".join(lines)


HEADER = "kind     row        clients requests errors    req/s    p50 ms    p99 ms  batch   ratio"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", help="a workdir that captions (e.g. the base model's)")
  parser.add_argument("--t2i_workdir", help="a text-to-image workdir (docs/text_to_image.md)")
  parser.add_argument("--vqgan_workdir", help="the text-to-image model's VQGAN, if not its own")
  parser.add_argument("--clients", default="1,4,16,64")
  parser.add_argument("--seconds", type=float, default=30.0, help="length of each level")
  parser.add_argument("--draw_images", type=int, default=1, help="images per drawing request")
  parser.add_argument("--server_flags", default="", help="more flags of --mode=serve")
  parser.add_argument("--json", default=os.path.join(REPO, "benchmarks", "results", "serve.json"))
  args = parser.parse_args()
  args.clients = [int(c) for c in args.clients.split(",")]
  extra = args.server_flags.split()
  results = {
    "cpu": common.cpu_model(),
    "cores": os.cpu_count(),
    "load_average_at_start": os.getloadavg(),
    "seconds_per_level": args.seconds,
    "server_flags": extra,
    "kinds": [],
  }
  print(HEADER, flush=True)
  if args.workdir:
    results["kinds"].append(measure(args.workdir, "caption", args, extra))
  if args.t2i_workdir:
    t2i_extra = extra + ([f"--vqgan_workdir={args.vqgan_workdir}"] if args.vqgan_workdir else [])
    results["kinds"].append(measure(args.t2i_workdir, "image", args, t2i_extra))
  results["load_average_at_end"] = os.getloadavg()
  print()
  print(HEADER)
  for k in results["kinds"]:
    print(_format(k["rows"], k["kind"]))
  for k in results["kinds"]:
    growth = 100 * (k["rss_at_end_mib"] / k["rss_after_warmup_mib"] - 1)
    print(
      f"{k['kind']}: server RSS {k['rss_after_warmup_mib']:.0f} MiB after warm-up, "
      f"{k['rss_at_end_mib']:.0f} MiB at the end ({growth:+.1f}%); started in "
      f"{k['start_s']:.1f}s; exit status after SIGTERM {k['exit_status_after_sigterm']}"
    )
  print(f"load average: {results['load_average_at_start']} -> {results['load_average_at_end']}")
  with open(args.json, "w") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
