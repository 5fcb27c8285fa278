"""The sandbox's S3 server (SeaweedFS ``weed mini``) behaves as the storage phase needs an S3 server to, and
the fault proxy injects what it says while keeping SigV4 requests valid. Real servers, real boto3."""

from __future__ import annotations

import hashlib
import io
import json
import random
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError, ConnectionClosedError, IncompleteReadError, ResponseStreamingError

from liftoff_sandbox.faults import FaultProxy
from liftoff_sandbox.s3 import S3Server

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


@pytest.fixture(scope="module")
def client(s3):
    return s3.client()


@pytest.fixture
def bucket(client, request):
    name = "t-" + request.node.name.replace("_", "-")[:50].strip("-").lower()
    client.create_bucket(Bucket=name)
    return name


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def anonymous_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def error_code(exc: ClientError) -> str:
    return exc.response["Error"]["Code"]


# -- the server -------------------------------------------------------------------------------------------


def test_two_servers_run_side_by_side_with_their_own_data_and_keys(s3, client):
    with S3Server() as other:
        assert other.endpoint_url != s3.endpoint_url
        assert other.access_key != s3.access_key
        client.create_bucket(Bucket="only-on-first")
        client.put_object(Bucket="only-on-first", Key="k", Body=b"first")
        other_client = other.client()
        assert "only-on-first" not in [b["Name"] for b in other_client.list_buckets()["Buckets"]]
        other_client.create_bucket(Bucket="only-on-second")
        with pytest.raises(ClientError) as refused:
            s3.client(endpoint_url=other.endpoint_url).list_buckets()
        assert error_code(refused.value) == "InvalidAccessKeyId"
        root = other.root
    assert not root.exists()


def test_restart_keeps_objects_and_endpoint(s3):
    with S3Server() as server:
        server.client().create_bucket(Bucket="kept")
        server.client().put_object(Bucket="kept", Key="a b/ü.txt", Body=b"still here")
        endpoint = server.endpoint_url
        server.stop(remove=False)
        server.start()
        assert server.endpoint_url == endpoint
        assert server.client().get_object(Bucket="kept", Key="a b/ü.txt")["Body"].read() == b"still here"


def test_start_failure_raises_with_the_servers_own_error_line(tmp_path):
    # weed reads mini.options from its data dir; a metrics port already taken makes it exit at once.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "mini.options").write_text(f"metricsPort={taken}\n")
        server = S3Server(root=tmp_path)
        with pytest.raises(RuntimeError) as failed:
            server.start(timeout=15)
    message = str(failed.value)
    assert "weed mini exited" in message and str(server.port) in message
    assert f"127.0.0.1:{taken}: bind: address already in use" in message
    assert "goroutine" not in message
    assert server.proc.poll() is not None


def test_single_put_etag_is_the_md5_of_the_body(client, bucket):
    body = random.Random(1).randbytes(300_000)
    etag = client.put_object(Bucket=bucket, Key="photo.jpg", Body=body)["ETag"]
    assert etag.strip('"') == md5(body)
    assert client.head_object(Bucket=bucket, Key="photo.jpg")["ETag"].strip('"') == md5(body)


def test_multipart_etag_is_the_md5_of_part_md5s_with_the_part_count(client, bucket):
    parts = [random.Random(i).randbytes(size) for i, size in enumerate([5 * MiB, 5 * MiB, 1234])]
    upload = client.create_multipart_upload(Bucket=bucket, Key="big.bin")["UploadId"]
    done = []
    for number, data in enumerate(parts, start=1):
        etag = client.upload_part(Bucket=bucket, Key="big.bin", UploadId=upload, PartNumber=number, Body=data)["ETag"]
        assert etag.strip('"') == md5(data)
        done.append({"PartNumber": number, "ETag": etag})
    client.complete_multipart_upload(Bucket=bucket, Key="big.bin", UploadId=upload, MultipartUpload={"Parts": done})

    expected = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + "-3"
    head = client.head_object(Bucket=bucket, Key="big.bin")
    assert head["ETag"].strip('"') == expected
    assert head["ContentLength"] == sum(map(len, parts))
    assert md5(client.get_object(Bucket=bucket, Key="big.bin")["Body"].read()) == md5(b"".join(parts))


def test_content_type_cache_control_and_user_metadata_round_trip(client, bucket):
    client.put_object(
        Bucket=bucket, Key="waiver.pdf", Body=b"%PDF-1.7 ...", ContentType="application/pdf",
        CacheControl="max-age=3600", Metadata={"md5": "abc123", "source-key": "waivers/2024/x.pdf"},
    )
    for answer in (client.head_object(Bucket=bucket, Key="waiver.pdf"),
                   client.get_object(Bucket=bucket, Key="waiver.pdf")):
        assert answer["ContentType"] == "application/pdf"
        assert answer["CacheControl"] == "max-age=3600"
        assert answer["Metadata"] == {"md5": "abc123", "source-key": "waivers/2024/x.pdf"}


AWKWARD_KEYS = [
    "with space/tour photo 1.jpg",
    "ünïcødé/日本語/émoji-🚀.png",
    "plus+sign/a+b=c.txt",
    "percent/100%.txt",
    "percent/already%20encoded.txt",
    "a/b/c/d/e/f/g/h/i/j/deep.txt",
]


def test_awkward_keys_store_list_and_read_back_exactly(client, bucket):
    for i, key in enumerate(AWKWARD_KEYS):
        client.put_object(Bucket=bucket, Key=key, Body=f"object {i}".encode())
    listed = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(listed) == sorted(AWKWARD_KEYS)
    for i, key in enumerate(AWKWARD_KEYS):
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == f"object {i}".encode()


def test_empty_object_round_trips(client, bucket):
    etag = client.put_object(Bucket=bucket, Key="empty/.keep", Body=b"")["ETag"]
    assert etag.strip('"') == md5(b"")
    got = client.get_object(Bucket=bucket, Key="empty/.keep")
    assert got["ContentLength"] == 0 and got["Body"].read() == b""


def test_range_read_returns_exactly_the_requested_bytes(client, bucket):
    body = bytes(range(256)) * 4
    client.put_object(Bucket=bucket, Key="ranged", Body=body)
    got = client.get_object(Bucket=bucket, Key="ranged", Range="bytes=10-19")
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert got["ContentRange"] == f"bytes 10-19/{len(body)}"
    assert got["Body"].read() == body[10:20]


def test_public_read_policy_allows_anonymous_get_in_that_bucket_only(s3, client):
    client.create_bucket(Bucket="tour-images")
    client.create_bucket(Bucket="documents")
    client.put_bucket_policy(Bucket="tour-images", Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject"],
                       "Resource": ["arn:aws:s3:::tour-images/*"]}],
    }))
    key = "tours/lagoon 1+ü.jpg"
    client.put_object(Bucket="tour-images", Key=key, Body=b"jpeg bytes")
    client.put_object(Bucket="documents", Key=key, Body=b"signed waiver")

    assert anonymous_get(f"{s3.endpoint_url}/tour-images/{quote(key)}") == (200, b"jpeg bytes")
    status, body = anonymous_get(f"{s3.endpoint_url}/documents/{quote(key)}")
    assert status == 403 and b"signed waiver" not in body
    for listing in ("tour-images", "documents"):
        status, body = anonymous_get(f"{s3.endpoint_url}/{listing}?list-type=2")
        assert status == 403 and b"lagoon" not in body
    assert anonymous_get(f"{s3.endpoint_url}/")[0] == 403


def test_wrong_secret_is_refused_with_signature_does_not_match(s3, bucket):
    with pytest.raises(ClientError) as refused:
        s3.client(secret_key="not-" + s3.secret_key).put_object(Bucket=bucket, Key="k", Body=b"x")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert error_code(refused.value) == "SignatureDoesNotMatch"


def test_unknown_access_key_is_refused_with_invalid_access_key_id(s3, bucket):
    with pytest.raises(ClientError) as refused:
        s3.client(access_key="AKIANOSUCHKEY0000000").get_object(Bucket=bucket, Key="k")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert error_code(refused.value) == "InvalidAccessKeyId"


# -- the fault proxy --------------------------------------------------------------------------------------


def test_signed_requests_pass_through_the_proxy_and_every_put_is_counted(s3, client, bucket):
    with FaultProxy(s3.endpoint_url) as proxy:
        via = s3.client(endpoint_url=proxy.url)
        for i, key in enumerate(AWKWARD_KEYS[:3]):
            via.put_object(Bucket=bucket, Key=key, Body=f"through {i}".encode(), ContentType="text/plain")
        # A multipart upload through the proxy: 2 part PUTs, its create and complete are POSTs.
        data = random.Random(3).randbytes(6 * MiB)
        via.upload_fileobj(io.BytesIO(data), bucket, "multi", Config=TransferConfig(
            multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, use_threads=False))
        got = io.BytesIO()
        via.download_fileobj(bucket, "multi", got)
        assert md5(got.getvalue()) == md5(data)
        assert via.get_object(Bucket=bucket, Key=AWKWARD_KEYS[0])["Body"].read() == b"through 0"
        assert len(via.list_objects_v2(Bucket=bucket)["Contents"]) == 4
        via.delete_object(Bucket=bucket, Key=AWKWARD_KEYS[2])

        assert proxy.puts_forwarded == 3 + 2
        assert proxy.requests["PUT"] == 5 and proxy.forwarded["POST"] == 2 and proxy.requests["DELETE"] == 1
        assert sum(proxy.slowdowns.values()) == 0 and sum(proxy.drops.values()) == 0
    assert client.get_object(Bucket=bucket, Key=AWKWARD_KEYS[1])["Body"].read() == b"through 1"


def test_slowdown_answers_s3_503_without_reaching_the_server(s3, client, bucket):
    with FaultProxy(s3.endpoint_url, slowdown={"PUT": 1.0}) as proxy:
        via = s3.client(endpoint_url=proxy.url)
        with pytest.raises(ClientError) as slowed:
            via.put_object(Bucket=bucket, Key="never-stored", Body=b"x" * 1000)
        assert slowed.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        assert error_code(slowed.value) == "SlowDown"
        assert via.list_objects_v2(Bucket=bucket).get("KeyCount") == 0  # GETs are not slowed
        assert proxy.slowdowns["PUT"] == 1 and proxy.puts_forwarded == 0
    with pytest.raises(ClientError) as missing:
        client.head_object(Bucket=bucket, Key="never-stored")
    assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_dropped_put_reaches_the_server_but_the_client_sees_the_connection_close(s3, client, bucket):
    with FaultProxy(s3.endpoint_url, drop={"PUT": 1.0}) as proxy:
        with pytest.raises(ConnectionClosedError):
            s3.client(endpoint_url=proxy.url).put_object(Bucket=bucket, Key="stored", Body=b"payload")
        assert proxy.drops["PUT"] == 1 and proxy.puts_forwarded == 1
    assert client.get_object(Bucket=bucket, Key="stored")["Body"].read() == b"payload"


def test_dropped_get_cuts_the_body_midway(s3, client, bucket):
    body = random.Random(4).randbytes(200_000)
    client.put_object(Bucket=bucket, Key="cut", Body=body)
    with FaultProxy(s3.endpoint_url, drop={"GET": 1.0}) as proxy:
        got = s3.client(endpoint_url=proxy.url).get_object(Bucket=bucket, Key="cut")
        assert got["ContentLength"] == len(body)
        with pytest.raises((IncompleteReadError, ResponseStreamingError)):
            got["Body"].read()
        assert proxy.drops["GET"] == 1


def test_same_seed_injects_the_same_faults_in_the_same_order(s3, bucket):
    def outcomes(seed: int) -> list[str]:
        seen = []
        with FaultProxy(s3.endpoint_url, slowdown=0.3, drop=0.3, seed=seed) as proxy:
            via = s3.client(endpoint_url=proxy.url)
            for i in range(20):
                try:
                    via.put_object(Bucket=bucket, Key=f"seq/{i}", Body=b"x")
                    seen.append("ok")
                except ClientError as exc:
                    seen.append(error_code(exc))
                except ConnectionClosedError:
                    seen.append("dropped")
        return seen

    first = outcomes(seed=11)
    assert first == outcomes(seed=11)
    assert {"ok", "SlowDown", "dropped"} <= set(first)
    assert first != outcomes(seed=12)


def test_copy_through_slowdowns_and_drops_completes_intact_with_standard_retries(s3, client, bucket):
    rng = random.Random(2024)
    # botocore's standard retry mode spends a shared quota (500 tokens, 5 a retry, 10 after a dropped
    # connection): 50 objects at these fault rates could exhaust it now and then, so 30 it is.
    objects = {f"objects/{i:02d} é+%.bin": rng.randbytes(rng.choice([0, 1, 700, 20_000, 150_000, 400_000]))
               for i in range(30)}
    transfer = TransferConfig(use_threads=False)
    with FaultProxy(s3.endpoint_url, slowdown=0.3, drop=0.1, seed=5) as proxy:
        via = s3.client(endpoint_url=proxy.url, retries={"mode": "standard", "max_attempts": 10},
                        max_pool_connections=16)

        def round_trip(item):
            key, data = item
            via.upload_fileobj(io.BytesIO(data), bucket, key, Config=transfer)
            back = io.BytesIO()
            via.download_fileobj(bucket, key, back, Config=transfer)
            return key, md5(back.getvalue())

        with ThreadPoolExecutor(12) as pool:
            downloaded = dict(pool.map(round_trip, objects.items()))

        assert downloaded == {key: md5(data) for key, data in objects.items()}
        assert proxy.slowdowns["PUT"] > 0 and proxy.slowdowns["GET"] + proxy.slowdowns["HEAD"] > 0
        assert proxy.drops["PUT"] > 0 and proxy.drops["GET"] + proxy.drops["HEAD"] > 0
        assert proxy.puts_forwarded >= len(objects)
    for key, data in objects.items():  # what the server holds, seen without the proxy
        assert client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"') == md5(data)
