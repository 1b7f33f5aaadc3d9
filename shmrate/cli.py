"""The ``shmrate`` command. The only module that prints."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import signal
import sys
import time
from collections.abc import Sequence

from .token_bucket import TokenBucket

__all__ = ["main"]


def _bucket_worker(
    bucket: TokenBucket, counts: list[int], slot: int, stop: float
) -> None:
    """Take one token at a time, as fast as the shared bucket allows."""
    got = 0
    while time.monotonic() < stop:
        if bucket.allow():
            got += 1
            counts[slot] = got
        else:
            time.sleep(0.0005)


def demo_bucket(workers: int, rate: int, seconds: float) -> int:
    """N forked workers share one TokenBucket; print the aggregate rate live."""
    ctx = mp.get_context("fork")
    counts = ctx.RawArray("q", workers)
    with TokenBucket(rate) as bucket:
        bucket.allow(bucket.capacity())  # start empty: show the steady rate
        stop = time.monotonic() + seconds
        procs = [
            ctx.Process(target=_bucket_worker, args=(bucket, counts, i, stop))
            for i in range(workers)
        ]
        for p in procs:
            p.start()
        print(f"{workers} forked workers share one TokenBucket of {rate}/s")
        t0 = last_t = time.monotonic()
        last_total = 0
        while any(p.is_alive() for p in procs):
            time.sleep(0.5)
            now, total = time.monotonic(), sum(counts)
            per_worker = " ".join(f"{c:>7}" for c in counts)
            rate_now = (total - last_total) / (now - last_t)
            print(
                f"\r{now - t0:5.1f} s  aggregate {rate_now:9.0f}/s"
                f"  (limit {rate}/s)  per worker: {per_worker}",
                end="",
                flush=True,
            )
            last_t, last_total = now, total
        for p in procs:
            p.join()
        total = sum(counts)
        print(
            f"\nadmitted {total} in {seconds:.1f} s = {total / seconds:.0f}/s "
            f"against a limit of {rate}/s ({100 * total / (rate * seconds):.1f}%)"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="shmrate", description="Rate limits shared by every process on one host."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="forked workers sharing one limit, live")
    demo.add_argument("--workers", type=int, default=4, help="worker processes (4)")
    demo.add_argument("--rate", type=int, default=5000, help="tokens per second (5000)")
    demo.add_argument("--seconds", type=float, default=5.0, help="how long (5)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.command == "demo":
        return demo_bucket(args.workers, args.rate, args.seconds)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
