"""Benchmark: compose 4 bricks into a 0.5B Llama-shaped base, against PEFT and a file copy.

Measured in the same run, each contender in a fresh process, timing from the call to the
finished (fsynced) files on disk; import time and peak RSS (the kernel's VmHWM) are reported
separately:

* (a) ``brickyard``: `composer.compose` full merge (linear, 4 bricks of rank 16 on all 7
  projections of every layer);
* (b) ``peft``: load base, load adapters, ``add_weighted_adapter(cat)``, ``merge_and_unload``,
  ``save_pretrained``;
* (c) ``copy``: copying the base's shard files on the same disk (the floor), with
  ``shutil.copyfile`` (through the page cache, then fsync);
* (c') ``copy-direct``: the same copy written the way the merge writes (``O_DIRECT`` from an
  aligned buffer, `composer.io.copy_file`): the device's floor, without the page cache's
  CPU cost, which on these VMs varies from run to run with the host's memory reclaim;
* (a) again on a base twice as deep, for the flat-memory claim;
* adapter output at rank 16 from 4 bricks of ranks 8, 16, 32, 64: Brickyard (QR + small SVD)
  vs PEFT's ``svd`` combination, time and relative error against the exact delta. PEFT is
  timed on ``add_weighted_adapter`` alone; Brickyard from reading the bricks (page cache
  warmed first) to the fsynced adapter.

The synthetic base (bf16, ~200 MB shards) and bricks are cached under ``.bench/``.

    python bench/compose_speed.py                 # everything (a few minutes)
    python bench/compose_speed.py --layers 8      # a smaller model
    python bench/compose_speed.py --skip-peft     # only Brickyard and the floor
    python bench/compose_speed.py --object-store  # also: output published to S3 (moto on loopback,
                                                  # or --s3-endpoint URL for MinIO/S3)

With ``--object-store``: (d) ``brickyard -> S3``: the same merge, then every output file
published to an S3 blob store (`registry.storage.composition_outputs.publish_directory`: staging,
sha256, verified conditional upload), against (e) ``upload``: a plain ``upload_file`` of the
same output files with the same boto3 client and transfer settings (the floor there), each
into a fresh bucket; reported beside the local-disk numbers. Publishing alone against the
plain upload, and base registration from ``s3://``, are measured by ``bench/object_store.py``
(moto in a child process or MinIO), without the merge in the timing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MERGE_RANKS = (16, 16, 16, 16)
ADAPTER_RANKS = (8, 16, 32, 64)
WEIGHTS = (0.4, 0.3, -0.2, 0.5)


# -- fixtures -----------------------------------------------------------------------------


def _shape(args: argparse.Namespace, layers: int) -> dict[str, Any]:
    return {
        "num_layers": layers,
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "vocab": args.vocab,
        "num_heads": args.hidden // 64,
        "num_kv_heads": args.hidden // 64,
        "dtype": "bfloat16",
        "shard_bytes": args.shard_mb * 1000 * 1000,
    }


def _ensure_base(args: argparse.Namespace, layers: int) -> Path:
    sys.path.insert(0, str(ROOT))
    from composer.testing import make_synthetic_llama

    shape = _shape(args, layers)
    name = "base-" + "-".join(f"{k}{v}" for k, v in shape.items() if k != "dtype")
    path = CACHE / name
    if not (path / "config.json").exists():
        print(f"building {path.name} ...", flush=True)
        staging = CACHE / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        make_synthetic_llama(staging, **shape)
        staging.rename(path)
    return path


def _ensure_bricks(base: Path, ranks: tuple[int, ...], tag: str) -> list[Path]:
    from composer.testing import make_synthetic_lora

    bricks = []
    for index, rank in enumerate(ranks):
        path = CACHE / f"{base.name}-{tag}{index}-r{rank}"
        if not (path / "adapter_config.json").exists():
            make_synthetic_lora(base, path, r=rank, alpha=2 * rank, target_modules=PROJECTIONS, seed=100 + index)
        bricks.append(path)
    return bricks


# -- children (each runs in a fresh interpreter) ------------------------------------------------


def _peak_rss() -> int:
    status = Path("/proc/self/status")
    if status.exists():
        match = re.search(r"VmHWM:\s+(\d+) kB", status.read_text())
        if match:
            return int(match.group(1)) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _read_through(paths: list[Path]) -> None:
    """Read every file under ``paths`` once (into the page cache)."""
    for path in paths:
        for file in sorted(path.rglob("*")):
            if file.is_file():
                with open(file, "rb") as handle:
                    while handle.read(1 << 24):
                        pass


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _child(job: dict[str, Any]) -> dict[str, Any]:
    kind, base, bricks, out = job["kind"], Path(job["base"]), [Path(p) for p in job["bricks"]], Path(job["out"])
    weights = job["weights"]
    started = time.perf_counter()
    if kind == "copy":
        imports = time.perf_counter() - started
        started = time.perf_counter()
        out.mkdir()
        for shard in sorted(base.glob("*.safetensors")):
            shutil.copyfile(shard, out / shard.name)
        _fsync_tree(out)
    elif kind == "copy-direct":
        from composer.io import copy_file

        imports = time.perf_counter() - started
        started = time.perf_counter()
        out.mkdir()
        for shard in sorted(base.glob("*.safetensors")):
            copy_file(shard, out / shard.name, direct=True)
    elif kind in ("brickyard", "brickyard-adapter"):
        import torch
        import transformers
        from transformers import LlamaForCausalLM  # noqa: F401 - the planner builds it on the meta device

        from composer import BrickSource, compose

        del transformers
        imports = time.perf_counter() - started
        sources = [
            BrickSource(p.name, p / "adapter_config.json", p / "adapter_model.safetensors", w)
            for p, w in zip(bricks, weights, strict=True)
        ]
        started = time.perf_counter()
        if kind == "brickyard":
            compose(base, sources, out)
        else:
            compose(base, sources, out, output="adapter", rank=job["rank"])
    elif kind == "brickyard-s3":
        from composer import BrickSource, compose
        from registry.storage.composition_outputs import publish_directory
        from registry.storage.s3_blobs import S3BlobStore, make_s3_client

        imports = time.perf_counter() - started
        sources = [
            BrickSource(p.name, p / "adapter_config.json", p / "adapter_model.safetensors", w)
            for p, w in zip(bricks, weights, strict=True)
        ]
        client = make_s3_client(endpoint_url=job["endpoint"], region="us-east-1")
        store = S3BlobStore(client, job["bucket"], "blobs/", cache_dir=out.parent / f"{out.name}-cache")
        started = time.perf_counter()
        compose(base, sources, out)
        composed = time.perf_counter()
        publish_directory(store, out)
        publish = time.perf_counter() - composed
    elif kind == "upload":
        from boto3.s3.transfer import TransferConfig

        from registry.settings import BlobSettings
        from registry.storage.s3_blobs import make_s3_client

        imports = time.perf_counter() - started
        defaults = BlobSettings()  # the store's transfer settings
        config = TransferConfig(
            multipart_threshold=defaults.multipart_threshold_bytes,
            multipart_chunksize=defaults.multipart_chunk_bytes,
            max_concurrency=defaults.max_concurrency,
        )
        client = make_s3_client(endpoint_url=job["endpoint"], region="us-east-1")
        source = Path(job["source"])
        started = time.perf_counter()
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            client.upload_file(str(path), job["bucket"], f"plain/{path.name}", Config=config)
    elif kind in ("peft", "peft-svd"):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        imports = time.perf_counter() - started
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        peft_model = PeftModel.from_pretrained(model, bricks[0], adapter_name="b0")
        for index, brick in enumerate(bricks[1:], start=1):
            peft_model.load_adapter(brick, adapter_name=f"b{index}")
        names = [f"b{i}" for i in range(len(bricks))]
        if kind == "peft":
            peft_model.add_weighted_adapter(names, list(weights), "merged", combination_type="cat")
            peft_model.set_adapter("merged")
            merged = peft_model.merge_and_unload()
            merged.save_pretrained(out)
            _fsync_tree(out)
        else:
            loaded = time.perf_counter()
            peft_model.add_weighted_adapter(
                names, list(weights), "merged", combination_type="svd", svd_rank=job["rank"]
            )
            combine = time.perf_counter() - loaded
            peft_model.save_pretrained(out, selected_adapters=["merged"])
            _fsync_tree(out)
    else:
        raise ValueError(kind)
    seconds = time.perf_counter() - started
    result = {"kind": kind, "seconds": seconds, "imports": imports, "peak_rss": _peak_rss()}
    if kind == "peft-svd":
        result["combine_seconds"] = combine
    if kind == "brickyard-s3":
        result["publish_seconds"] = publish
    return result


def _run(kind: str, base: Path, bricks: list[Path], out: Path, **extra: Any) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    # Flush other files' dirty pages first: on ext4 an fsync can wait for them.
    os.sync()
    job = {"kind": kind, "base": str(base), "bricks": [str(b) for b in bricks], "out": str(out)}
    job |= {"weights": list(WEIGHTS[: len(bricks)])} | extra
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    env["TRANSFORMERS_VERBOSITY"] = "error"
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- adapter error against the exact delta --------------------------------------------------


def _adapter_errors(bricks: list[Path], weights: list[float], adapters: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Global and worst per-module relative Frobenius error of each adapter against the exact
    ``sum_i w_i * s_i * B_i @ A_i`` (float64)."""
    import torch
    from safetensors.torch import load_file

    def factors(path: Path) -> tuple[dict[str, torch.Tensor], float]:
        config = json.loads((path / "adapter_config.json").read_text())
        return load_file(str(path / "adapter_model.safetensors")), config["lora_alpha"] / config["r"]

    brick_data = [factors(p) for p in bricks]
    outputs = {name: factors(path) for name, path in adapters.items()}
    modules = sorted(k.removesuffix(".lora_A.weight") for k in brick_data[0][0] if k.endswith(".lora_A.weight"))
    total = 0.0
    errors = {name: 0.0 for name in adapters}
    worst = {name: 0.0 for name in adapters}
    for module in modules:
        exact = sum(
            w * s * (t[f"{module}.lora_B.weight"].double() @ t[f"{module}.lora_A.weight"].double())
            for (t, s), w in zip(brick_data, weights, strict=True)
        )
        norm = float(torch.linalg.vector_norm(exact)) ** 2
        total += norm
        for name, (tensors, scaling) in outputs.items():
            key = next(k for k in tensors if k.endswith(f"{module.removeprefix('base_model.model.')}.lora_A.weight"))
            approx = scaling * (tensors[key.replace("lora_A", "lora_B")].double() @ tensors[key].double())
            error = float(torch.linalg.vector_norm(exact - approx)) ** 2
            errors[name] += error
            worst[name] = max(worst[name], (error / norm) ** 0.5)
    return {name: {"relative_error": (errors[name] / total) ** 0.5, "worst_module": worst[name]} for name in adapters}


# -- report --------------------------------------------------------------------------------


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _mb(value: float) -> str:
    return f"{value / 1e6:,.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=24, help="decoder layers of the base (default 24: ~0.5B)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-mb", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5, help="runs of Brickyard and of the copy (best is reported)")
    parser.add_argument("--skip-peft", action="store_true", help="skip the PEFT contenders (slow)")
    parser.add_argument("--skip-deep", action="store_true", help="skip the twice-as-deep memory check")
    parser.add_argument("--adapter-layers", type=int, default=None, help="layers of the base for the adapter test")
    parser.add_argument("--skip-adapter", action="store_true", help="skip the adapter-output comparison")
    parser.add_argument("--object-store", action="store_true", help="also publish the output to S3 (see above)")
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (default: moto on loopback)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return

    CACHE.mkdir(exist_ok=True)
    load_start = _load()
    base = _ensure_base(args, args.layers)
    bricks = _ensure_bricks(base, MERGE_RANKS, "merge")
    work = CACHE / "out"
    work.mkdir(exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from composer.basemodel import read_base_model

    layout = read_base_model(base)
    largest = max(info.nbytes for _, info in layout.tensors())
    print(
        f"base: {layout.parameter_count / 1e9:.2f}B parameters, {layout.dtype}, {len(layout.shards)} shards, "
        f"{_mb(layout.size_bytes)}; largest tensor {_mb(largest)}; 4 bricks of rank 16 on {len(PROJECTIONS)} "
        f"projections x {args.layers} layers",
        flush=True,
    )

    rows: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[float]] = {"copy": [], "copy-direct": [], "brickyard": []}
    # Interleave the copies and Brickyard so that both see the same machine state; keep the best
    # (the median is reported too: this machine is shared and its memory is reclaimed by the
    # host, so single runs vary).
    for _ in range(args.repeat):
        for kind in runs:
            result = _run(kind, base, bricks, work / kind)
            print(f"  {kind:<12} {result['seconds']:6.2f} s  peak RSS {_mb(result['peak_rss'])}", flush=True)
            runs[kind].append(result["seconds"])
            if kind not in rows or result["seconds"] < rows[kind]["seconds"]:
                rows[kind] = result
            shutil.rmtree(work / kind, ignore_errors=True)
    for kind, seconds in runs.items():
        rows[kind]["median"] = statistics.median(seconds)
    if not args.skip_peft:
        rows["peft"] = _run("peft", base, bricks, work / "peft")
        print(f"  peft         {rows['peft']['seconds']:6.2f} s  peak RSS {_mb(rows['peft']['peak_rss'])}", flush=True)
        shutil.rmtree(work / "peft", ignore_errors=True)
    deep: dict[str, Any] | None = None
    if not args.skip_deep:
        deep_base = _ensure_base(args, 2 * args.layers)
        deep_bricks = _ensure_bricks(deep_base, MERGE_RANKS, "merge")
        deep = _run("brickyard", deep_base, deep_bricks, work / "deep")
        shutil.rmtree(work / "deep", ignore_errors=True)

    print()
    print(f"Full merge, {args.layers} layers ({_mb(layout.size_bytes)} of bf16 weights), linear, 4 bricks x rank 16")
    print(f"load average at start {load_start}, now {_load()}")
    print(f"{'contender':<24}{'seconds':>9}{'median':>9}{'imports':>9}{'peak RSS':>12}{'vs copy':>9}{'vs peft':>9}")
    labels = {
        "brickyard": "(a) brickyard compose",
        "peft": "(b) peft cat + merge",
        "copy": "(c) copy shards",
        "copy-direct": "(c') copy, O_DIRECT",
    }
    for kind in labels:
        if kind not in rows:
            continue
        row = rows[kind]
        vs_copy = row["seconds"] / rows["copy"]["seconds"]
        vs_peft = f"{rows['peft']['seconds'] / row['seconds']:8.1f}x" if "peft" in rows else f"{'-':>9}"
        median = f"{row['median']:9.2f}" if "median" in row else f"{'-':>9}"
        print(
            f"{labels[kind]:<24}{row['seconds']:9.2f}{median}{row['imports']:9.2f}{_mb(row['peak_rss']):>12}"
            f"{vs_copy:8.2f}x{vs_peft}"
        )
    a = rows["brickyard"]
    print(
        f"goal (a) <= 1.3x (c): {a['seconds'] / rows['copy']['seconds']:.2f}x best, "
        f"{a['median'] / rows['copy']['median']:.2f}x median; against (c'): "
        f"{a['seconds'] / rows['copy-direct']['seconds']:.2f}x best, "
        f"{a['median'] / rows['copy-direct']['median']:.2f}x median"
    )
    if "peft" in rows:
        print(f"goal (a) >= 2.5x faster than (b): {rows['peft']['seconds'] / a['seconds']:.1f}x")
        print(f"goal peak RSS (a) <= 40% of (b): {100 * a['peak_rss'] / rows['peft']['peak_rss']:.0f}%")
    if deep is not None:
        grown = deep["peak_rss"] - a["peak_rss"]
        print(
            f"goal flat RSS: {2 * args.layers} layers peaks at {_mb(deep['peak_rss'])} (+{_mb(grown)}; "
            f"largest tensor {_mb(largest)}; merge took {deep['seconds']:.2f} s)"
        )

    if args.object_store:
        _object_store(args, base, bricks, work, rows)
    if args.skip_adapter:
        shutil.rmtree(work, ignore_errors=True)
        return

    # Adapter output: rank 16 from bricks of ranks 8, 16, 32, 64.
    adapter_base = base if args.adapter_layers is None else _ensure_base(args, args.adapter_layers)
    mixed = _ensure_bricks(adapter_base, ADAPTER_RANKS, "mixed")
    # PEFT's time below is its combination alone (loading and saving excluded); ours counts
    # reading the bricks and writing the adapter, so at least read them from memory, not
    # from a disk still busy writing the merges above.
    _read_through(mixed)
    ours = _run("brickyard-adapter", adapter_base, mixed, work / "adapter-ours", rank=16)
    print()
    layers = args.layers if args.adapter_layers is None else args.adapter_layers
    print(f"Adapter output, rank 16 from ranks {', '.join(map(str, ADAPTER_RANKS))} ({layers} layers)")
    print(f"{'contender':<24}{'seconds':>9}{'peak RSS':>12}{'rel. error':>12}{'worst module':>14}")
    adapters = {"brickyard": work / "adapter-ours"}
    theirs = None
    if not args.skip_peft:
        theirs = _run("peft-svd", adapter_base, mixed, work / "adapter-peft", rank=16)
        adapters["peft"] = work / "adapter-peft" / "merged"
    errors = _adapter_errors(mixed, list(WEIGHTS), adapters)
    print(
        f"{'brickyard (factors only)':<24}{ours['seconds']:9.2f}{_mb(ours['peak_rss']):>12}"
        f"{errors['brickyard']['relative_error']:12.6f}{errors['brickyard']['worst_module']:14.6f}"
    )
    if theirs is not None:
        print(
            f"{'peft svd (combine only)':<24}{theirs['combine_seconds']:9.2f}{_mb(theirs['peak_rss']):>12}"
            f"{errors['peft']['relative_error']:12.6f}{errors['peft']['worst_module']:14.6f}"
        )
        print(f"{'peft svd (whole run)':<24}{theirs['seconds']:9.2f}")
        print(f"goal >= 100x faster than PEFT svd: {theirs['combine_seconds'] / ours['seconds']:.0f}x (combine only)")
    shutil.rmtree(work, ignore_errors=True)


def _object_store(
    args: argparse.Namespace, base: Path, bricks: list[Path], work: Path, rows: dict[str, dict[str, Any]]
) -> None:
    """(d) merge + publish to S3 against (e) a plain upload of the same output files."""
    import itertools

    server = None
    endpoint = args.s3_endpoint
    if endpoint is None:
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_EC2_METADATA_DISABLED="true"
        )
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
    from registry.storage.s3_blobs import make_s3_client

    client = make_s3_client(endpoint_url=endpoint, region="us-east-1")
    names = (f"bench-{os.getpid()}-{i}" for i in itertools.count())
    runs: dict[str, list[dict[str, Any]]] = {"brickyard-s3": [], "upload": []}
    try:
        for _ in range(args.repeat):
            bucket = next(names)
            client.create_bucket(Bucket=bucket)
            ours = _run("brickyard-s3", base, bricks, work / "s3", endpoint=endpoint, bucket=bucket)
            runs["brickyard-s3"].append(ours)
            bucket = next(names)
            client.create_bucket(Bucket=bucket)
            floor = _run(
                "upload", base, bricks, work / "upload", endpoint=endpoint, bucket=bucket, source=str(work / "s3")
            )
            runs["upload"].append(floor)
            print(
                f"  brickyard-s3 {ours['seconds']:6.2f} s (publish {ours['publish_seconds']:.2f} s)  "
                f"upload {floor['seconds']:6.2f} s",
                flush=True,
            )
            shutil.rmtree(work / "s3", ignore_errors=True)
            shutil.rmtree(work / "s3-cache", ignore_errors=True)
    finally:
        if server is not None:
            server.stop()
    best = min(runs["brickyard-s3"], key=lambda r: r["seconds"])
    floor = min(r["seconds"] for r in runs["upload"])
    publish = min(r["publish_seconds"] for r in runs["brickyard-s3"])
    local = rows["brickyard"]["seconds"]
    print()
    print(f"Output on object storage ({'moto on loopback' if server else endpoint}), best of {args.repeat}")
    print(f"{'contender':<28}{'seconds':>9}{'median':>9}{'vs upload':>11}")
    median = statistics.median(r["seconds"] for r in runs["brickyard-s3"])
    print(f"{'(d) brickyard -> S3':<28}{best['seconds']:9.2f}{median:9.2f}{best['seconds'] / floor:10.2f}x")
    print(f"{'    of which publishing':<28}{publish:9.2f}{'':>9}{publish / floor:10.2f}x")
    print(f"{'(e) upload (floor)':<28}{floor:9.2f}{statistics.median(r['seconds'] for r in runs['upload']):9.2f}")
    print(f"{'(a) brickyard -> local disk':<28}{local:9.2f}")
    print(f"{'(c) copy shards (local floor)':<28}{rows['copy']['seconds']:9.2f}")


if __name__ == "__main__":
    main()
