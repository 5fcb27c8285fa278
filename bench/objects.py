"""Benchmark: Liftoff's object copy and verify against rclone, between two S3 servers on loopback.

One invocation starts two SeaweedFS servers (``liftoff_sandbox.s3.S3Server``: a source and a target), writes
N objects with deterministic content to the source (default 10,000: sizes 10 KiB to 8 MiB, log-normal around
150 KiB, plus one 50 MiB object per thousand, uploaded multipart so its ETag is no MD5, as a hosted Supabase
Storage gives for large files; about 4 GB), then runs each contender at the same concurrency:

  liftoff copy         ``liftoff.systems.s3.copy_batch`` over the streamed source listing, batches of ``--batch`` keys,
                       the outcome (with the target's answer to each write) written to a SQLite ledger every 50
                       objects, a batch of only small objects with 4x concurrency in flight (as
                       ``tasks/storage/copy.py``)
  liftoff verify       the storage gate's ``compare_bucket``: the target's listing merged with the ledger's record
                       of each write (same ETag, not modified since: size, MD5 and Content-Type proven without a
                       request), a HEAD for the rest and for a sample (the first 100 and 1% of the others)
  liftoff deep verify  the same, but the target's MD5 comes from re-reading and hashing every object
  rclone copy          ``rclone copy --checksum -M`` into a fresh target bucket: ``--transfers``/``--checkers``
                       = concurrency, one part at a time per object, chunk size and cutoff = our part size
  rclone check         ``rclone check`` between the source and rclone's copy (size and MD5)

and prints a table: objects, GB, seconds, objects/s, MB/s, client CPU seconds, SeaweedFS CPU seconds, peak
RSS, and each time's ratio to ``rclone copy``. Liftoff runs in this Python process (with the modules the
storage flow loads, Prefect included): its CPU is this process' rusage delta around the call, its peak RSS
this process' resident set sampled every 50 ms during the call. rclone's are its own: CPU from ``wait4``,
peak RSS its ``VmHWM`` read every 50 ms while it runs.

    .venv/bin/python bench/objects.py                          # 10,000 objects, about 4 GB
    .venv/bin/python bench/objects.py --objects 2000           # about 0.8 GB
    .venv/bin/python bench/objects.py --objects 500 --scale 0.1  # a smoke run, under a minute
    .venv/bin/python bench/objects.py --objects 100000 --small   # tiny objects: does the peak RSS grow?

The servers, their data and the ledger live in a private temp dir, removed on exit (Ctrl-C and SIGTERM
included) except its ``logs`` (rclone's output). rclone gets its remotes through ``RCLONE_CONFIG_<NAME>_*`` environment variables (no config file
holds a secret) and runs without ``AWS_CA_BUNDLE``, which makes it fail (``LoadCustomCABundleError``).
"""

from __future__ import annotations

import argparse
import itertools
import math
import multiprocessing
import os
import platform
import queue
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import prefect  # noqa: F401 - loaded as in the storage flow's process, so the RSS baseline is that one's

from liftoff.ledger import Ledger
from liftoff_sandbox.s3 import S3Server, weed_binary
from liftoff.systems import s3
from liftoff.tasks.storage.common import PHASE, item_kind
from liftoff.tasks.storage.copy import LEDGER_EVERY, in_flight, ledger_row
from liftoff.tasks.storage.gate import compare_bucket
from liftoff.systems.supabase_storage import SourceObject

KiB, MiB = 2**10, 2**20
MB = 10**6
RCLONE = shutil.which("rclone") or "/usr/bin/rclone"
SEED = 20261126
BUCKET = "tour-images"
LIFTOFF_BUCKET = "liftoff-tour-images"
RCLONE_BUCKET = "rclone-tour-images"
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")
KINDS = [(".jpg", "image/jpeg", "photo"), (".png", "image/png", "map"), (".webp", "image/webp", "thumb"),
         (".pdf", "application/pdf", "waiver")]


class Interrupted(BaseException):
    """SIGTERM, turned into an exception so the finally blocks stop what was started."""


# ---------------------------------------------------------------------------------------------------------
# The objects: sizes, keys and bytes, all from the seed, streamed (never a list of every object)


@dataclass(frozen=True)
class Spec:
    index: int
    key: str
    size: int
    content_type: str


def specs(count: int, scale: float, small: bool) -> Iterator[Spec]:
    """The objects to write, in index order. Sizes: log-normal (median 150 KiB, sigma 1.3) kept within
    10 KiB..8 MiB, and one 50 MiB object per thousand; ``small``: 512 B..4 KiB, none large."""
    rng = random.Random(SEED)
    big_every = 1000 if count >= 1000 and not small else 0
    for i in range(count):
        ext, content_type, name = KINDS[rng.randrange(len(KINDS))]
        if small:
            size = int(math.exp(rng.uniform(math.log(512), math.log(4 * KiB))))
        elif big_every and i % big_every == big_every // 2:
            size, ext, content_type, name = 50 * MiB, ".zip", "application/zip", "export"
        else:
            while True:
                size = int(math.exp(rng.gauss(math.log(150 * KiB), 1.3)))
                if 10 * KiB <= size <= 8 * MiB:
                    break
        size = max(1, int(size * scale))
        yield Spec(i, f"tours/{i % 97:02d}/{name}-{i:07d}{ext}", size, content_type)


POOL = random.Random(SEED).randbytes(MiB + 4096)


def object_bytes(index: int, start: int, length: int) -> bytes:
    """Bytes [start, start + length) of object ``index``: the random pool read from an offset of its own,
    wrapping, with the object's index written over its first 16 bytes (so no two objects are equal)."""
    offset = (index * 7919 * 64 + start) % MiB
    pieces, need = [], length
    while need > 0:
        piece = POOL[offset:offset + min(need, MiB - offset)]
        pieces.append(piece)
        need -= len(piece)
        offset = 0
    data = b"".join(pieces)
    if start < 16:
        head = f"{index:016d}".encode()[start:start + length]
        data = head + data[len(head):]
    return data


def write_source(server: S3Server, count: int, scale: float, small: bool, concurrency: int,
                 part_size: int) -> tuple[int, int]:
    """Writes every object to the source in a child process (so the buffers it fills never count in this
    process' peak RSS, which is Liftoff's), ``concurrency`` in flight; returns (objects, bytes)."""
    context = multiprocessing.get_context("spawn")
    answer = context.Queue()
    child = context.Process(target=_write_source, args=(
        answer, server.endpoint_url, server.region, server.access_key, server.secret_key, count, scale, small,
        concurrency, part_size))
    child.start()
    try:
        while child.is_alive() or not answer.empty():
            try:
                said = answer.get(timeout=0.5)
            except queue.Empty:
                continue
            if isinstance(said, str):
                print(said, flush=True)
            else:
                child.join()
                return said
        raise RuntimeError(f"writing the source objects failed (exit {child.exitcode})")
    finally:
        if child.is_alive():
            child.terminate()
            child.join()


def _write_source(answer, endpoint_url: str, region: str, access_key: str, secret_key: str, count: int,
                  scale: float, small: bool, concurrency: int, part_size: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it
    client = s3.client(s3.S3Endpoint(endpoint_url, region, access_key, secret_key),
                       max_pool_connections=concurrency + 2)

    def put(spec: Spec) -> int:
        headers = {"ContentType": spec.content_type, "CacheControl": "max-age=3600"}
        if spec.size <= part_size:
            client.put_object(Bucket=BUCKET, Key=spec.key, Body=object_bytes(spec.index, 0, spec.size), **headers)
            return spec.size
        upload = client.create_multipart_upload(Bucket=BUCKET, Key=spec.key, **headers)["UploadId"]
        parts = []
        for number, first in enumerate(range(0, spec.size, part_size), start=1):
            body = object_bytes(spec.index, first, min(part_size, spec.size - first))
            etag = client.upload_part(Bucket=BUCKET, Key=spec.key, UploadId=upload, PartNumber=number,
                                      Body=body)["ETag"]
            parts.append({"PartNumber": number, "ETag": etag})
        client.complete_multipart_upload(Bucket=BUCKET, Key=spec.key, UploadId=upload,
                                         MultipartUpload={"Parts": parts})
        return spec.size

    total = [0, 0]
    step = max(count // 10, 1)

    def done(n: int) -> None:
        total[0] += 1
        total[1] += n
        if total[0] % step == 0:
            answer.put(f"  source: {total[0]:,}/{count:,} objects, {total[1] / 1e9:.2f} GB")

    bounded(specs(count, scale, small), put, concurrency, done)
    answer.put((total[0], total[1]))


def bounded(items: Iterable, fn: Callable, concurrency: int, on_result: Callable) -> None:
    """``fn`` over a streamed iterable with at most ``2 * concurrency`` calls pending (no list of all of
    them); ``on_result`` runs in the calling thread. The first exception is raised."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        pending: set[Future] = set()
        for item in items:
            pending.add(pool.submit(fn, item))
            if len(pending) >= 2 * concurrency:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    on_result(future.result())
        for future in pending:
            on_result(future.result())


# ---------------------------------------------------------------------------------------------------------
# Measuring: time, CPU and peak RSS of this process (Liftoff) or of a child (rclone); the servers' CPU


@dataclass
class Result:
    name: str
    objects: int = 0
    bytes: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    server_cpu: float = 0.0
    peak_rss_kib: int = 0
    problems: int = 0
    notes: list[str] = field(default_factory=list)
    derived: bool = False  # a sum of two rows


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE // KiB


def _peak_rss_of(pid: int) -> int:
    """A running process' peak resident set (VmHWM), in KiB. Not wait4's ru_maxrss: that one keeps the
    resident set the child had before exec, a copy of this whole Python process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) and of its waited-for children."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / TICKS


class Servers:
    def __init__(self, *servers: S3Server):
        self.servers = servers

    def cpu(self) -> float:
        return sum(_cpu_seconds(s.proc.pid) for s in self.servers)


@contextmanager
def in_process(result: Result, servers: Servers):
    """Times the block; CPU = this process' user+sys delta; peak RSS = the highest resident set sampled
    every 50 ms while it ran."""
    peak, stop = [_rss_kib()], threading.Event()

    def sample():
        while not stop.wait(0.05):
            peak[0] = max(peak[0], _rss_kib())

    sampler = threading.Thread(target=sample, daemon=True)
    before, server_before = resource.getrusage(resource.RUSAGE_SELF), servers.cpu()
    sampler.start()
    started = time.monotonic()
    try:
        yield
    finally:
        result.seconds = time.monotonic() - started
        stop.set()
        sampler.join()
        after = resource.getrusage(resource.RUSAGE_SELF)
        result.cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        result.server_cpu = servers.cpu() - server_before
        result.peak_rss_kib = max(peak[0], _rss_kib())


def run_child(result: Result, servers: Servers, argv: list[str], env: dict[str, str], log: Path) -> int:
    """Runs argv (its own process group, output to ``log``); CPU (wait4) and peak RSS (VmHWM) are the child's."""
    server_before = servers.cpu()
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        peak = 0
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                peak = max(peak, _peak_rss_of(proc.pid))
                time.sleep(0.05)
        except BaseException:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(5)
                    break
                except subprocess.TimeoutExpired:
                    continue
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    result.seconds = time.monotonic() - started
    result.cpu = usage.ru_utime + usage.ru_stime
    result.peak_rss_kib = peak
    result.server_cpu = servers.cpu() - server_before
    return proc.returncode


# ---------------------------------------------------------------------------------------------------------
# Liftoff


def liftoff_copy(result: Result, src, dst, ledger: Ledger, concurrency: int, batch: int, part_size: int) -> None:
    """As the storage phase's copy step: the keys streamed (here from the source's listing), ``copy_batch``
    per batch, each outcome written to the ledger every ``LEDGER_EVERY`` objects in one transaction."""
    kind = item_kind(BUCKET)
    buffer: list[tuple] = []

    def record(outcome) -> None:
        buffer.append(ledger_row(outcome))
        if isinstance(outcome, s3.ObjectFailure):
            result.problems += 1
            if len(result.notes) < 3:
                result.notes.append(outcome.error[:160])
        if len(buffer) >= LEDGER_EVERY:
            ledger.set_items(PHASE, kind, buffer)
            buffer.clear()

    listed = ((obj.key, obj.size) for obj in s3.list_objects(src, BUCKET))
    while names := list(itertools.islice(listed, batch)):
        # as tasks/storage/copy.py: a batch of only small objects keeps more in flight (the sizes there come
        # from storage.objects, here from the listing)
        done = s3.copy_batch([key for key, _ in names], src, BUCKET, dst, LIFTOFF_BUCKET, part_size=part_size,
                             concurrency=in_flight(concurrency, [size for _, size in names]), on_done=record)
        result.objects += len(done.copied)
        result.bytes += done.bytes
    if buffer:
        ledger.set_items(PHASE, kind, buffer)


def liftoff_verify(result: Result, src, dst, ledger: Ledger, concurrency: int, deep: bool) -> None:
    """The storage gate's own per-bucket comparison (``liftoff.tasks.storage.gate.compare_bucket``): the target's
    listing merged with the ledger's record of each write, a HEAD only for what they cannot prove and for
    the sample; with ``deep`` one HEAD per object and the target re-read and hashed. The gate reads the source's side from ``storage.objects``; here it
    is the source's listing (size, ETag) with the Content-Type the objects were written with (by extension),
    which is what a ``storage.objects`` row holds."""
    types = {ext: content_type for ext, content_type, _ in KINDS} | {".zip": "application/zip"}

    def inventory() -> Iterator[SourceObject]:
        for obj in s3.list_objects(src, BUCKET):
            yield SourceObject(BUCKET, obj.key, obj.size, types[os.path.splitext(obj.key)[1]], obj.etag,
                               "max-age=3600", None)

    copied = ledger.item_details(PHASE, item_kind(BUCKET), "copied")
    check = compare_bucket(dst, BUCKET, LIFTOFF_BUCKET, inventory, copied, deep=deep, concurrency=concurrency)
    if not deep:
        result.notes.append(f"{check.by_listing:,} proven by listing + copy record, {check.by_head:,} by HEAD")
    result.objects, result.bytes = check.source_objects, check.source_bytes
    result.problems = check.problem_count + (0 if (check.source_objects, check.source_bytes) ==
                                             (check.target_objects, check.target_bytes) else 1)
    result.notes += [line[:160] for line in check.summary()[:3]]


# ---------------------------------------------------------------------------------------------------------
# rclone


def rclone_env(source: S3Server, target: S3Server, workdir: Path) -> dict[str, str]:
    """Two remotes, ``lsrc`` and ``ltgt``, through environment variables; without ``AWS_CA_BUNDLE`` (and any
    other AWS_ variable, so nothing from this shell changes what rclone signs with)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}
    env["RCLONE_CONFIG"] = str(workdir / "rclone.conf")  # never written: no user config is read
    for name, server in (("LSRC", source), ("LTGT", target)):
        env.update({
            f"RCLONE_CONFIG_{name}_TYPE": "s3", f"RCLONE_CONFIG_{name}_PROVIDER": "Other",
            f"RCLONE_CONFIG_{name}_ENDPOINT": server.endpoint_url, f"RCLONE_CONFIG_{name}_REGION": server.region,
            f"RCLONE_CONFIG_{name}_ACCESS_KEY_ID": server.access_key,
            f"RCLONE_CONFIG_{name}_SECRET_ACCESS_KEY": server.secret_key,
            f"RCLONE_CONFIG_{name}_FORCE_PATH_STYLE": "true",
        })
    return env


def rclone_copy(result: Result, servers: Servers, env: dict, log: Path, concurrency: int, part_size: int,
                source_objects: int, source_bytes: int) -> None:
    chunk = f"{part_size // MiB}Mi"
    rc = run_child(result, servers, [
        RCLONE, "copy", f"lsrc:{BUCKET}", f"ltgt:{RCLONE_BUCKET}", "--checksum", "--metadata",
        "--transfers", str(concurrency), "--checkers", str(concurrency), "--s3-upload-concurrency", "1",
        "--s3-chunk-size", chunk, "--s3-upload-cutoff", chunk, "--stats", "0", "--log-level", "NOTICE",
    ], env, log)
    if rc != 0:
        result.problems += 1
        result.notes.append(f"rclone copy exited {rc} (see {log})")
    result.objects, result.bytes = source_objects, source_bytes


def rclone_check(result: Result, servers: Servers, env: dict, log: Path, concurrency: int, target_bucket: str,
                 source_objects: int, source_bytes: int) -> None:
    start = log.stat().st_size if log.exists() else 0
    rc = run_child(result, servers, [
        RCLONE, "check", f"lsrc:{BUCKET}", f"ltgt:{target_bucket}", "--checkers", str(concurrency),
        "--log-level", "NOTICE",
    ], env, log)
    with open(log, "rb") as f:
        f.seek(start)
        said = f.read().decode(errors="replace")
    counts = {what: int(n.replace(",", "")) for n, what in re.findall(
        r"([\d,]+) (differences found|hashes could not be checked|matching files|files missing)", said)}
    result.objects, result.bytes = source_objects, source_bytes
    result.problems = counts.get("differences found", 0) + (1 if rc not in (0, 1) else 0)
    if counts.get("hashes could not be checked"):
        result.notes.append(f"{counts['hashes could not be checked']} hashes could not be checked (size only)")
    if rc != 0:
        result.notes.append(f"exit {rc} (see {log})")


# ---------------------------------------------------------------------------------------------------------
# Report


def summed(name: str, a: Result, b: Result) -> Result:
    return Result(name, a.objects, a.bytes, a.seconds + b.seconds, a.cpu + b.cpu, a.server_cpu + b.server_cpu,
                  max(a.peak_rss_kib, b.peak_rss_kib), a.problems + b.problems, derived=True)


def print_report(results: list[Result], baseline_rss_kib: int, args) -> None:
    by_name = {r.name: r for r in results}
    base = by_name.get("rclone copy --checksum")
    print()
    print("GB and MB/s in 10^9 / 10^6 bytes; client CPU = user+sys of the client process; server CPU = both "
          "SeaweedFS processes; ratio = seconds / rclone copy's seconds")
    header = (f"{'contender':<30} {'objects':>8} {'GB':>6} {'seconds':>8} {'obj/s':>7} {'MB/s':>7} "
              f"{'client CPU s':>12} {'server CPU s':>12} {'peak RSS MB':>11} {'ratio':>6}  result")
    print(header)
    print("-" * len(header))
    for r in results:
        rate = r.objects / r.seconds if r.seconds else 0
        mbs = r.bytes / MB / r.seconds if r.seconds else 0
        ratio = f"{r.seconds / base.seconds:6.2f}" if base and base.seconds else f"{'-':>6}"
        outcome = "ok" if not r.problems else f"{r.problems} DIFFER/FAILED"
        notes = "; ".join([outcome, *r.notes])
        name = ("= " if r.derived else "") + r.name
        print(f"{name:<30} {r.objects:>8,} {r.bytes / 1e9:6.2f} {r.seconds:8.1f} {rate:7.0f} {mbs:7.1f} "
              f"{r.cpu:12.1f} {r.server_cpu:12.1f} {r.peak_rss_kib / 1024:11.0f} {ratio}  {notes}")

    print()
    print("Targets")
    verdict = lambda ok: "HOLDS" if ok else "FAILS"
    both = by_name.get("liftoff copy+verify")
    if both and base:
        print(f"  Liftoff copy+verify no slower than rclone copy alone: {verdict(both.seconds <= base.seconds)} "
              f"({both.seconds:.1f} s vs {base.seconds:.1f} s, {both.seconds / base.seconds:.2f}x)")
    else:
        print("  Liftoff copy+verify no slower than rclone copy alone: not measured")
    peaks = [r.peak_rss_kib for r in results if r.name.startswith("liftoff") and not r.derived]
    if peaks:
        peak = max(peaks) / 1024
        at = f"at {args.objects:,} objects"
        if args.objects >= 100_000:
            print(f"  Liftoff peak RSS under 300 MB at 100,000 objects: {verdict(peak < 300)} ({peak:.0f} MB {at})")
        else:
            print(f"  Liftoff peak RSS under 300 MB at 100,000 objects: not measured here ({peak:.0f} MB {at}; "
                  f"run --objects 100000 --small)")
        print(f"  (this process' RSS before the first contender, boto3 and Prefect loaded: "
              f"{baseline_rss_kib / 1024:.0f} MB)")


def machine_facts() -> str:
    import boto3

    rclone = subprocess.run([RCLONE, "version"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    weed = subprocess.run([str(weed_binary()), "version"], capture_output=True, text=True,
                          check=False).stdout.split("\n")[0]
    with open("/proc/meminfo") as f:
        mem = next((line.split()[1] for line in f if line.startswith("MemTotal")), "0")
    return (f"{os.cpu_count()} cores, {int(mem) / 2**20:.0f} GiB RAM, {platform.platform()}, Python "
            f"{platform.python_version()}, boto3 {boto3.__version__}, {rclone}, SeaweedFS {weed.strip()}")


# ---------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=10_000, help="how many objects (10000: about 4 GB)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every object's size (0.1: a quick run)")
    parser.add_argument("--small", action="store_true", help="tiny objects (512 B..4 KiB): for the RSS check")
    parser.add_argument("--concurrency", type=int, default=8, help="objects in flight, for every contender")
    parser.add_argument("--batch", type=int, default=500, help="keys per copy_batch call (the storage phase's batch)")
    parser.add_argument("--part-size-mb", type=int, default=s3.DEFAULT_PART_SIZE // MiB,
                        help="multipart part size; rclone's chunk size and upload cutoff too")
    parser.add_argument("--only", default="liftoff,deep,rclone",
                        help="comma-separated contenders: liftoff (copy, verify), deep (deep verify, after liftoff), "
                             "rclone (copy, check); default all")
    parser.add_argument("--rclone-first", action="store_true", help="run rclone before Liftoff")
    args = parser.parse_args()
    only = set(args.only.split(","))
    part_size = args.part_size_mb * MiB
    if not Path(RCLONE).exists() and "rclone" in only:
        sys.exit("rclone is missing: apt-get install -y rclone")

    def on_sigterm(*_):
        raise Interrupted()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (&)
    workdir = Path(tempfile.mkdtemp(prefix="liftoff-bench-objects-"))
    logs = workdir / "logs"
    logs.mkdir()
    source, target = S3Server(root=workdir / "source"), S3Server(root=workdir / "target")
    results: list[Result] = []
    try:
        print(machine_facts(), flush=True)
        print(f"workdir {workdir}; starting two SeaweedFS servers ...", flush=True)
        source.start()
        target.start()
        servers = Servers(source, target)
        pool = min(64, args.concurrency * 4) + 2  # as tasks/storage/common.py::pool_size
        src = s3.client(s3.S3Endpoint(source.endpoint_url, source.region, source.access_key, source.secret_key),
                        max_pool_connections=pool)
        dst = s3.client(s3.S3Endpoint(target.endpoint_url, target.region, target.access_key, target.secret_key),
                        max_pool_connections=pool)
        for client, bucket in ((src, BUCKET), (dst, LIFTOFF_BUCKET), (dst, RCLONE_BUCKET)):
            client.create_bucket(Bucket=bucket)

        started = time.monotonic()
        print(f"writing {args.objects:,} objects to the source ({args.concurrency} in flight) ...", flush=True)
        count, total = write_source(source, args.objects, args.scale, args.small, args.concurrency, part_size)
        print(f"source ready in {time.monotonic() - started:.0f} s: {count:,} objects, {total / 1e9:.2f} GB "
              f"({total:,} bytes)", flush=True)
        baseline_rss = _rss_kib()

        def run_liftoff():
            ledger = Ledger(workdir / "state")
            copy = Result("liftoff copy")
            print(f"[liftoff copy] (load average {os.getloadavg()[0]:.2f}) ...", flush=True)
            with in_process(copy, servers):
                liftoff_copy(copy, src, dst, ledger, args.concurrency, args.batch, part_size)
            print(f"[liftoff copy] {copy.seconds:.1f} s", flush=True)
            verify = Result("liftoff verify")
            with in_process(verify, servers):
                liftoff_verify(verify, src, dst, ledger, args.concurrency, deep=False)
            print(f"[liftoff verify] {verify.seconds:.1f} s", flush=True)
            results.extend([copy, verify, summed("liftoff copy+verify", copy, verify)])
            if "deep" in only:  # needs the ledger and the copy above
                deep = Result("liftoff deep verify")
                with in_process(deep, servers):
                    liftoff_verify(deep, src, dst, ledger, args.concurrency, deep=True)
                print(f"[liftoff deep verify] {deep.seconds:.1f} s", flush=True)
                results.append(deep)

        def run_rclone():
            env, log = rclone_env(source, target, workdir), logs / "rclone.log"
            copy = Result("rclone copy --checksum")
            print(f"[rclone copy] (load average {os.getloadavg()[0]:.2f}) ...", flush=True)
            rclone_copy(copy, servers, env, log, args.concurrency, part_size, count, total)
            print(f"[rclone copy] {copy.seconds:.1f} s", flush=True)
            check = Result("rclone check")
            rclone_check(check, servers, env, log, args.concurrency, RCLONE_BUCKET, count, total)
            print(f"[rclone check] {check.seconds:.1f} s", flush=True)
            results.extend([copy, check, summed("rclone copy+check", copy, check)])

        order = [("rclone", run_rclone), ("liftoff", run_liftoff)]
        if not args.rclone_first:
            order.reverse()
        for key, run in order:
            if key in only:
                run()
        results.sort(key=lambda r: not r.name.startswith("liftoff"))
        if {"liftoff", "rclone"} <= only:  # rclone reads our md5chksum metadata: it checks Liftoff's copy too
            ours = Result("rclone check (Liftoff's copy)")
            rclone_check(ours, servers, rclone_env(source, target, workdir), logs / "rclone.log", args.concurrency,
                         LIFTOFF_BUCKET, count, total)
            results.append(ours)
        print(f"\n{count:,} objects, {total / 1e9:.2f} GB; concurrency {args.concurrency}; part size "
              f"{args.part_size_mb} MiB; batches of {args.batch} keys")
        print_report(results, baseline_rss, args)
        print(f"\nlogs: {logs}")
        return 0 if results and not any(r.problems for r in results) else 1
    except (KeyboardInterrupt, Interrupted):
        print("\ninterrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        source.stop()
        target.stop()
        for leftover in workdir.iterdir():  # the logs stay, small, for whoever reads a failure
            if leftover != logs:
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
