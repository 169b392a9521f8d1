"""Merge benchmark: two synthetic SD1.5-size fp16 checkpoints (real key names and shapes).

Three ways of producing a weighted-sum merge, each in its own process so its peak RSS is its own:

- ``io``: just read both inputs and write an output of the same size (the floor for any merger);
- ``load_all``: what popular merger tools do: load both whole, weighted sum key by key, save;
- ``difftrain``: the streaming engine (fp32 arithmetic, fp16 output, input and output sha256,
  recipe metadata, atomic commit).

``--store minio`` runs the ``io`` floor and the engine against a real MinIO on loopback (started
from the test infrastructure's pinned binary) instead of the local disk. ``--tiny`` uses a tiny
model so the script can be smoke-tested in seconds. Every mode runs ``--repeat`` times; the best
time is reported (warm page cache for all of them alike).

    python benchmarks/merge_bench.py                # local disk, SD1.5 size (2 x 2.1 GB)
    python benchmarks/merge_bench.py --store minio  # from and to MinIO
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rss_mib() -> float:
    """Peak resident set of this process (VmHWM; ru_maxrss survives exec on Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mode_io(a: str, b: str, out: str, store_env: dict[str, str]) -> dict[str, float]:
    from difftrain.storage import is_s3, open_store, scratch_dir

    config = _config(store_env)
    start = time.perf_counter()
    # one pass over each input; the output (the size of one input) is a's bytes as they pass
    target = Path(out) if not is_s3(out) else scratch_dir() / "out.safetensors"
    with open(target, "wb") as fh:
        for uri in (a, b):
            with open_store(uri, config).open_stream(uri) as stream:
                while block := stream.read(8 << 20):
                    if uri == a:
                        fh.write(block)
    if is_s3(out):
        open_store(out, config).put_file(target, out)
        target.unlink()
    return {"seconds": time.perf_counter() - start, "peak_rss_mib": _rss_mib()}


def mode_load_all(a: str, b: str, out: str, store_env: dict[str, str]) -> dict[str, float]:
    import torch
    from safetensors.torch import load_file, save_file

    start = time.perf_counter()
    sa, sb = load_file(a), load_file(b)
    merged = {}
    for key, value in sa.items():
        if value.is_floating_point():
            merged[key] = (0.5 * value.float() + 0.5 * sb[key].float()).to(value.dtype)
        else:
            merged[key] = value
    del sa, sb
    save_file(merged, out)
    torch.cuda.empty_cache()
    return {"seconds": time.perf_counter() - start, "peak_rss_mib": _rss_mib()}


def mode_difftrain(a: str, b: str, out: str, store_env: dict[str, str]) -> dict[str, float]:
    """Inputs made elsewhere: their sha256 is computed while they stream by."""
    _manifests(a, b, store_env, None)
    return _merge(a, b, out, store_env)


def mode_difftrain_committed(
    a: str, b: str, out: str, store_env: dict[str, str]
) -> dict[str, float]:
    """Inputs committed by difftrain (a training export or an earlier merge): their manifests
    carry the sha256, so the output's own hash is computed while it is written."""
    _manifests(a, b, store_env, json.loads(store_env["known"]))
    try:
        return _merge(a, b, out, store_env)
    finally:
        _manifests(a, b, store_env, None)


def _manifests(a: str, b: str, store_env: dict[str, str], known: dict[str, str] | None) -> None:
    from difftrain.storage import FILE_MANIFEST_SUFFIX, open_store

    config = _config(store_env)
    for uri in (a, b):
        store = open_store(uri, config)
        if known is None:
            store.delete(uri + FILE_MANIFEST_SUFFIX)
        else:
            entry = {"name": uri, "size": store.size(uri), "sha256": known[uri]}
            store.put_bytes(json.dumps({"files": [entry]}).encode(), uri + FILE_MANIFEST_SUFFIX)


def _merge(a: str, b: str, out: str, store_env: dict[str, str]) -> dict[str, float]:
    from difftrain import api
    from difftrain.merge.engine import merge

    spec = api.parse_spec(
        "ModelMerge",
        {
            "models": [{"uri": a}, {"uri": b}],
            "alpha": 0.5,
            "vaeSource": "merge",
            "output": {"uri": out},
            **(
                {"storage": {"endpoint": store_env["endpoint"], "secure": False}}
                if "endpoint" in store_env
                else {}
            ),
        },
    )
    assert isinstance(spec, api.ModelMergeSpec)
    start = time.perf_counter()
    result = merge(spec, _config(store_env))
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss_mib": _rss_mib(),
        "tensors": result.tensors,
        "size_gb": result.size_bytes / 1e9,
    }


def _config(store_env: dict[str, str]):  # type: ignore[no-untyped-def]
    from difftrain.storage import Credentials, StoreConfig

    if "endpoint" not in store_env:
        return None
    return StoreConfig(
        endpoint=store_env["endpoint"],
        secure=False,
        credentials=Credentials(store_env["access"], store_env["secret"]),
    )


MODES = {
    "io": mode_io,
    "load_all": mode_load_all,
    "difftrain": mode_difftrain,
    "difftrain_committed": mode_difftrain_committed,
}


def run_child(mode: str, a: str, b: str, out: str, store_env: dict[str, str]) -> dict[str, float]:
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); "
        "from benchmarks.merge_bench import MODES; "
        "print(json.dumps(MODES[sys.argv[2]](sys.argv[3], sys.argv[4], sys.argv[5], "
        "json.loads(sys.argv[6]))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(REPO), mode, a, b, out, json.dumps(store_env)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{result.stderr[-3000:]}")
    measured: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model (smoke test)")
    parser.add_argument("--store", choices=["local", "minio"], default="local")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import torch

    from tests.sd_checkpoints import checkpoint_shapes, write_checkpoint

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="difftrain-merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    shapes = checkpoint_shapes("sd1", tiny=args.tiny)
    params = sum(torch.Size(s).numel() for s, _ in shapes.values())
    a, b = work / "a.safetensors", work / "b.safetensors"
    t0 = time.perf_counter()
    for seed, path in ((1, a), (2, b)):
        if not path.exists():
            write_checkpoint(path, shapes, seed)
    print(
        f"inputs: 2 x {a.stat().st_size / 1e9:.2f} GB, {len(shapes)} tensors, "
        f"{params / 1e9:.3f} B parameters (made in {time.perf_counter() - t0:.1f}s)"
    )

    from difftrain.storage import sha256_file

    hashes = {str(a): sha256_file(a), str(b): sha256_file(b)}
    store_env: dict[str, str] = {}
    minio = None
    uris = {"a": str(a), "b": str(b), "out": str(work / "out.safetensors")}
    modes = ["io", "load_all", "difftrain", "difftrain_committed"]
    if args.store == "minio":
        from minio import Minio

        from tests.infra.environment import MinioServer, binary_dir

        shutil.rmtree(work / "minio", ignore_errors=True)
        minio = MinioServer(binary_dir(), work / "minio")
        minio.start()
        store_env = {
            "endpoint": minio.endpoint,
            "access": minio.access_key,
            "secret": minio.secret_key,
        }
        mc = Minio(minio.endpoint, minio.access_key, minio.secret_key, secure=False)
        mc.make_bucket("bench")
        for name, path in (("a", a), ("b", b)):
            mc.fput_object("bench", f"{name}.safetensors", str(path))
        uris = {
            "a": "s3://bench/a.safetensors",
            "b": "s3://bench/b.safetensors",
            "out": "s3://bench/out.safetensors",
        }
        hashes = {uris["a"]: hashes[str(a)], uris["b"]: hashes[str(b)]}
        modes = ["io", "difftrain", "difftrain_committed"]
    store_env["known"] = json.dumps(hashes)
    try:
        # rounds interleave the modes, so page-cache and writeback state affect all alike
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for _ in range(args.repeat):
            for mode in modes:
                runs[mode].append(run_child(mode, uris["a"], uris["b"], uris["out"], store_env))
        results: dict[str, dict[str, float]] = {}
        for mode, measured in runs.items():
            best = min(measured, key=lambda r: r["seconds"])
            best["peak_rss_mib"] = max(r["peak_rss_mib"] for r in measured)
            results[mode] = best
    finally:
        if minio is not None:
            minio.stop()
            shutil.rmtree(work / "minio", ignore_errors=True)

    floor = results["io"]["seconds"]
    print(f"\nstore: {args.store}; cores: {os.cpu_count()}; torch {torch.__version__}")
    print(f"{'mode':<20} {'seconds':>8} {'x io':>6} {'peak RSS MiB':>13}")
    for mode, r in results.items():
        print(
            f"{mode:<20} {r['seconds']:8.2f} {r['seconds'] / floor:6.2f} {r['peak_rss_mib']:13.0f}"
        )
    if "load_all" in results:
        speed = results["load_all"]["seconds"] / results["difftrain"]["seconds"]
        memory = results["load_all"]["peak_rss_mib"] / results["difftrain"]["peak_rss_mib"]
        print(f"difftrain vs load_all: {speed:.2f}x faster, {memory:.1f}x less peak memory")
    if args.json:
        args.json.write_text(json.dumps({"store": args.store, "results": results}, indent=1))


if __name__ == "__main__":
    main()
