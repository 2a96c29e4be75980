"""Running the units: on an actor pool with Ray Data (a local Ray instance, or the cluster at
RAY_ADDRESS), or one after the other in this process (--executor local).

The unit, not the row, is the Ray Data item, so that a shard is only ever written by one actor, in
one piece, with the rows of its unit. Each actor loads its engines once (`ShardScorer.__init__`).
"""
from __future__ import annotations

import os
import time

from common import console
from common.config import ConfigError
from scorer.config import ScoreConfig
from scorer.unit import ShardScorer


def execute(cfg: ScoreConfig, units: list[dict], job_meta: dict, passthrough: bytes, progress: bool, run: str,
            started: float) -> list[dict]:
    """Score `units`; returns their results. The bar's `wall_tok_s` is tokens per second of wall-clock
    time since `started`, the clock of the run's `wall_tokens_per_second` in history.jsonl."""
    from tqdm import tqdm

    if cfg.executor == "ray":
        init_ray()  # before the bar: a cluster that cannot be reached is an error, not an empty bar
    bar = tqdm(total=len(units), desc="scoring shards", unit="shard", disable=not progress, file=console.err())
    results = []
    if cfg.executor == "local":
        scorer = ShardScorer(cfg, job_meta, passthrough, run)
        try:
            for u in units:
                results.append(scorer.score_unit(u))
                bar.update(1)
                bar.set_postfix(wall_tok_s=f"{sum(r['tokens'] for r in results) / (time.perf_counter() - started):.0f}")
        finally:
            scorer.close()
        bar.close()
        return results

    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one bar, ours
    gpus = cfg.gpus_per_actor
    if gpus < 0:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    actors = cfg.actors or default_actors(ray.nodes(), gpus, cfg.cpus_per_actor, len(units))
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(ShardScorer,
                        fn_constructor_kwargs={"cfg": cfg, "job_meta": job_meta, "passthrough": passthrough,
                                               "run": run},
                        batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=cfg.cpus_per_actor, num_gpus=gpus,
                        # actors over the nodes, not packed onto the first that has room: every node
                        # scores, and a lost node takes a share of the actors, not all of them
                        scheduling_strategy="SPREAD")
    # an actor that dies (its process or its node) is restarted and its unit retried: Ray Data's
    # defaults for actor pools (max_restarts=-1, max_task_retries=-1); the shard is written atomically
    tokens = 0
    for r in ds.iter_rows():
        results.append(r)
        tokens += r["tokens"]
        bar.update(1)
        bar.set_postfix(actors=actors, wall_tok_s=f"{tokens / (time.perf_counter() - started):.0f}", last=r["shard"])
    bar.close()
    return results


def default_actors(nodes: list[dict], gpus_per_actor: float, cpus_per_actor: float, units: int) -> int:
    """Actors when --actors is not given: one per GPU where the cluster has GPUs, else one per live node
    with CPUs (each actor's torch threads use its node's cores); never more than the units to score."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", n.get("alive", False))]
    if gpus_per_actor > 0:
        n = int(sum(r.get("GPU", 0) for r in alive) // gpus_per_actor)
    else:
        n = sum(1 for r in alive if r.get("CPU", 0) >= cpus_per_actor)
    return max(1, min(n, units))


def check_ray_address() -> None:
    """A RAY_ADDRESS (host:port or ray://host:port) that nothing answers on is refused before any
    model loads; Ray itself would keep retrying for a minute behind an empty progress bar."""
    import socket

    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address in ("", "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"RAY_ADDRESS={address!r} is not host:port (or ray://host:port); unset it for a local "
                          "Ray instance")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({e}); start it, fix the "
                          "address, or unset RAY_ADDRESS for a local Ray instance (--executor local: no Ray)") from None


def init_ray():
    """Local Ray instance, or the cluster at RAY_ADDRESS. Engines run in-process in each actor.

    Without RAY_ADDRESS a new local instance starts (address "local"), whatever cluster record
    `ray start` left in Ray's temporary folder: Ray would otherwise connect to that cluster, which
    may have died since. A cluster that refuses the connection (address, authentication token) is
    a ConfigError naming RAY_ADDRESS."""
    import ray

    if ray.is_initialized():
        return
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    # the hub library's settings (offline mode, cache folder, token) reach the actors as they are here
    env.update({k: v for k, v in os.environ.items() if k.startswith("HF_")})
    # and object storage's credentials and endpoint (common/storage.py): asked for once, on the driver
    env.update({k: v for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_", "GCS_"))})
    kwargs = dict(include_dashboard=False, log_to_driver=True, runtime_env={"env_vars": env})
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address:
        # a few more logical CPUs than cores: Ray Data's own tasks must not wait behind the actors
        kwargs.update(address="local", num_cpus=max(4, os.cpu_count() or 1))
    try:
        ray.init(**kwargs)
    except Exception as e:  # ConnectionError, Ray's AuthenticationError, a timeout, ...
        if not address:
            raise
        # a wrong token reaches Python as "Failed to connect"; the reason is in what Ray's C++ client
        # logged (to the stage's log when quiet, else on the terminal already)
        why = ("the cluster refused this machine's authentication token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
               "or ~/.ray/auth_token must hold the cluster's" if "InvalidAuthToken" in console.log_tail()
               else console.one_line(e))
        raise ConfigError(f"cannot connect to the Ray cluster at RAY_ADDRESS={address} ({why}); fix the address "
                          "or its authentication, or unset RAY_ADDRESS for a local Ray instance") from None
