"""bucket/signed.py, the lean signed requests: the substituter's GETs give the same answers as
the botocore client (bytes, absent, errors worded alike) and the uploads' PUTs store what it
would store (bytes, content type, metadata, multipart parts), against a real moto server; every
attempt is counted, and botocore's retries are kept, against an endpoint that fails on purpose."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from nixcache import metrics
from nixcache.bucket import signed
from nixcache.bucket.s3 import S3, job_requests
from nixcache.bucket.seaweed import free_port
from nixcache.config import S3Config
from nixcache.errors import S3Error
from tests.harness import MotoServer
from tests.unit.test_s3_client import s3_config


@pytest.fixture
def endpoint(moto: MotoServer) -> str:
    return moto.endpoint


KEYS = ["nix-cache-info", "0123456789abcdfghijklmnpqrsvwxyz.narinfo", "nar/abc.nar.zst", "odd/a b+c~d=é"]


def test_lean_reads_answer_as_the_client_does(tmp_path: Path, endpoint: str) -> None:
    cfg = s3_config(tmp_path, endpoint, "t-lean-reads")
    big = bytes(range(256)) * 4096  # 1 MiB: several chunks

    async def main() -> None:
        async with S3(cfg) as s3:
            await s3.create_bucket()
            for i, key in enumerate(KEYS):
                await s3.put(key, f"object {i}\n".encode())
            await s3.put("nar/big.nar", big)
            before = metrics.requests().get("GetObject", 0)
            with job_requests() as job:
                for key in KEYS:
                    assert await s3.fetch(key) == await s3.get(key)
                assert await s3.fetch("absent.narinfo") is None
                async with s3.reading("nar/big.nar") as reading:
                    assert reading is not None
                    head = await s3.head("nar/big.nar")
                    assert head is not None and (reading.size, reading.etag) == (len(big), head["ETag"])
                    chunks = [chunk async for chunk in reading.chunks]
                assert b"".join(chunks) == big and len(chunks) > 1
                async with s3.reading("absent") as reading:
                    assert reading is None
            # one request per read: len(KEYS) fetches and as many client GETs, 1 absent, 2 streams
            assert job["GetObject"] == 2 * len(KEYS) + 3 and job["HeadObject"] == 1
            assert metrics.requests()["GetObject"] - before == job["GetObject"]

    asyncio.run(main())


def test_a_missing_bucket_is_an_error_not_a_missing_object(tmp_path: Path, endpoint: str) -> None:
    cfg = s3_config(tmp_path, endpoint, "t-lean-no-bucket")

    async def main() -> None:
        async with S3(cfg) as s3:
            await s3.fetch("k.narinfo")

    with pytest.raises(S3Error, match=r"s3://t-lean-no-bucket/k.narinfo: NoSuchBucket \(HTTP 404\): the bucket does"):
        asyncio.run(main())


class Flaky:
    """An S3 endpoint that answers ``statuses`` in turn (then 200 with ``body``)."""

    def __init__(self, statuses: list[int], body: bytes = b"payload") -> None:
        self.statuses = statuses
        self.body = body
        self.seen: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append({"path": request.path_qs, "method": request.method, "body": body.hex(), **request.headers})
        if self.statuses:
            status = self.statuses.pop(0)
            if status < 300:  # a success other than 200
                return web.Response(status=status, headers={"ETag": '"e2xx"'})
            return web.Response(status=status, body=f"<Error><Code>Code{status}</Code></Error>")
        return web.Response(body=self.body, headers={"ETag": '"e"'})

    async def serve(self, cfg: S3Config, go: Any) -> Any:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        assert cfg.endpoint is not None
        await web.TCPSite(runner, "127.0.0.1", int(cfg.endpoint.rsplit(":", 1)[1])).start()
        try:
            async with S3(cfg) as s3:
                return await go(s3)
        finally:
            await runner.cleanup()


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(signed, "backoff", lambda attempt: 0.0)


def flaky_config(tmp_path: Path, attempts: int) -> S3Config:
    cfg = s3_config(tmp_path, f"http://127.0.0.1:{free_port()}", "t-flaky")
    return cfg.model_copy(update={"max_attempts": attempts})


@pytest.mark.usefixtures("no_backoff")
def test_5xx_and_429_are_retried_and_every_attempt_counted(tmp_path: Path) -> None:
    flaky = Flaky([503, 500, 429])
    cfg = flaky_config(tmp_path, attempts=4)

    async def go(s3: S3) -> tuple[bytes | None, int]:
        data = await s3.fetch("nar/x.nar")
        return data, s3.requests["GetObject"]

    assert asyncio.run(flaky.serve(cfg, go)) == (b"payload", 4)
    assert [seen["path"] for seen in flaky.seen] == ["/t-flaky/nar/x.nar"] * 4
    for seen in flaky.seen:  # signed as botocore signs: SigV4, with the payload hash header
        assert seen["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=")
        assert "x-amz-date" in seen["Authorization"] and seen["X-Amz-Content-SHA256"]


@pytest.mark.usefixtures("no_backoff")
def test_puts_are_retried_as_gets_with_the_same_body_and_its_own_hash(tmp_path: Path) -> None:
    flaky = Flaky([503, 500, 429])
    cfg = flaky_config(tmp_path, attempts=4)
    body = bytes(range(256)) * 1000  # hashed in a thread

    async def go(s3: S3) -> int:
        await s3.put("k.narinfo", body, "text/x-nix-narinfo")
        return s3.requests["PutObject"]

    assert asyncio.run(flaky.serve(cfg, go)) == 4
    for seen in flaky.seen:
        assert (seen["method"], seen["path"], seen["body"]) == ("PUT", "/t-flaky/k.narinfo", body.hex())
        assert seen["X-Amz-Content-SHA256"] == hashlib.sha256(body).hexdigest()
        assert seen["Content-Type"] == "text/x-nix-narinfo" and "content-type" in seen["Authorization"]


def test_lean_writes_store_what_the_client_would(tmp_path: Path, endpoint: str) -> None:
    cfg = s3_config(tmp_path, endpoint, "t-lean-writes")
    part = 5 << 20
    big = hashlib.shake_256(b"big").digest(2 * part + 12345)  # three parts, the last shorter

    async def chunks(data: bytes, size: int) -> Any:
        for i in range(0, len(data), size):
            yield data[i : i + size]

    async def main() -> None:
        async with S3(cfg) as s3:
            await s3.create_bucket()
            with job_requests() as job:
                await s3.put("gcroots/h/x.gcinfo", b"gz", "application/gzip", {"written-by": "h"})
                await s3.upload_stream("nar/big.nar", chunks(big, 300_001), part, "application/x-nix-nar")
                await s3.upload_stream("nar/exact.nar", chunks(big[:part], 1 << 20), part, "application/x-nix-nar")
                small = b"small nar"
                await s3.upload_stream(
                    "nar/small.nar",
                    chunks(small, 4),
                    part,
                    "application/x-nix-nar",
                    lambda: hashlib.sha256(small).digest(),
                )
            assert dict(job) == {
                "PutObject": 3, "CreateMultipartUpload": 1, "UploadPart": 3, "CompleteMultipartUpload": 1
            }  # fmt: skip
            head = await s3.head("gcroots/h/x.gcinfo")
            assert head is not None and head["ContentType"] == "application/gzip"
            assert head["Metadata"] == {"written-by": "h"}
            assert await s3.get("nar/big.nar") == big and await s3.get("nar/small.nar") == small
            assert await s3.get("nar/exact.nar") == big[:part]  # exactly one part: one PUT
            for key in ("nar/big.nar", "nar/small.nar"):
                head = await s3.head(key)
                assert head is not None and head["ContentType"] == "application/x-nix-nar"
            assert not (await s3.client.list_multipart_uploads(Bucket=s3.bucket)).get("Uploads")

    asyncio.run(main())


@pytest.mark.usefixtures("no_backoff")
def test_retries_give_up_with_one_clear_error(tmp_path: Path) -> None:
    flaky = Flaky([503, 503, 503])
    cfg = flaky_config(tmp_path, attempts=3)
    with pytest.raises(S3Error, match=r"s3://t-flaky/k: Code503 \(HTTP 503\) \(3 attempts\)"):
        asyncio.run(flaky.serve(cfg, lambda s3: s3.fetch("k")))
    assert flaky.statuses == [] and len(flaky.seen) == 3


@pytest.mark.usefixtures("no_backoff")
def test_other_answers_are_not_retried(tmp_path: Path) -> None:
    flaky = Flaky([403])
    cfg = flaky_config(tmp_path, attempts=3)
    with pytest.raises(S3Error, match=r"s3://t-flaky/k: Code403 \(HTTP 403\)$"):  # a code: not the bare 403's hint
        asyncio.run(flaky.serve(cfg, lambda s3: s3.fetch("k")))
    assert len(flaky.seen) == 1


def test_any_2xx_answer_to_a_put_is_a_success_as_for_botocore(tmp_path: Path) -> None:
    flaky = Flaky([204])
    cfg = flaky_config(tmp_path, attempts=3)
    assert asyncio.run(flaky.serve(cfg, lambda s3: s3._write("k", b"body"))) == '"e2xx"'
    assert len(flaky.seen) == 1


@pytest.mark.usefixtures("no_backoff")
def test_an_unreachable_endpoint_is_one_clear_error(tmp_path: Path) -> None:
    cfg = flaky_config(tmp_path, attempts=2)

    async def main() -> None:
        async with S3(cfg) as s3:
            await s3.fetch("k")

    with pytest.raises(S3Error, match=r"s3://t-flaky/k: ClientConnectorError: .* \(2 attempts\)"):
        asyncio.run(main())


def test_backoff_is_botocores_standard_mode() -> None:
    for attempt in range(1, 12):
        waits = [signed.backoff(attempt) for _ in range(200)]
        assert all(0 <= w <= min(20.0, 2.0 ** (attempt - 1)) for w in waits)
        assert max(waits) > min(20.0, 2.0 ** (attempt - 1)) / 2  # jittered over the whole range


@pytest.mark.parametrize(
    ("style", "base"),
    [("path", "http://s3.example.test:9000/t-bucket/"), ("virtual", "http://t-bucket.s3.example.test:9000/")],
)
def test_the_url_is_the_clients_own(tmp_path: Path, style: str, base: str) -> None:
    cfg = s3_config(tmp_path, "http://s3.example.test:9000", "t-bucket")
    cfg = cfg.model_copy(update={"addressing_style": style})

    async def main() -> str:
        async with S3(cfg) as s3:  # no request is made: the URL comes from a presigned one
            assert s3._reads is not None
            await s3._reads._ready("here")
            return s3._reads.base

    assert asyncio.run(main()) == base


def test_proxies_are_looked_up_once_as_botocore_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.test:3128")
    monkeypatch.setenv("NO_PROXY", "internal.test")
    assert signed._proxy_for("https://s3.example.test/b/") == "http://proxy.test:3128"
    assert signed._proxy_for("https://s3.internal.test/b/") is None
    assert signed._proxy_for("http://s3.example.test/b/") is None  # no HTTP_PROXY


# ---- from an adversarial review (a helper session): each failed on the first version ----------------


class Raw:
    """An endpoint answering each request with the next of ``answers`` (raw HTTP bytes; b"" closes
    the connection without answering, ``<CLOSE>`` at the end closes it after answering,
    ``<PAUSE>`` waits a little), then ``200 ok``. Records every request's head."""

    def __init__(self, *answers: bytes) -> None:
        self.answers = list(answers)
        self.heads: list[bytes] = []

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                self.heads.append(await reader.readuntil(b"\r\n\r\n"))
                answer = self.answers.pop(0) if self.answers else b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                if not answer:
                    writer.close()
                    return
                for piece in answer.removesuffix(b"<CLOSE>").split(b"<PAUSE>"):
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.05)
                if answer.endswith(b"<CLOSE>"):
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    def run(self, tmp_path: Path, go: Any, attempts: int = 3) -> Any:
        cfg = flaky_config(tmp_path, attempts)
        assert cfg.endpoint is not None

        async def main() -> Any:
            server = await asyncio.start_server(self._client, "127.0.0.1", int(cfg.endpoint.rsplit(":", 1)[1]))
            try:
                async with S3(cfg) as s3:
                    return await go(s3)
            finally:
                server.close()

        return asyncio.run(main())


def error(status: str, code: str, extra: str = "") -> bytes:
    body = f"<Error><Code>{code}</Code><Message>m</Message></Error>".encode()
    return f"HTTP/1.1 {status}\r\n{extra}Content-Length: {len(body)}\r\n\r\n".encode() + body


@pytest.mark.usefixtures("no_backoff")
def test_error_codes_are_retried_as_botocores_standard_mode_does(tmp_path: Path) -> None:
    from botocore.retries.standard import ThrottledRetryableChecker, TransientRetryableChecker

    botocores = TransientRetryableChecker._TRANSIENT_ERROR_CODES + ThrottledRetryableChecker._THROTTLED_ERROR_CODES
    assert set(botocores) == signed.RETRIED_CODES
    raw = Raw(error("400 Bad Request", "RequestTimeout"), error("403 Forbidden", "SlowDown"))
    assert raw.run(tmp_path, lambda s3: s3.fetch("k")) == b"ok"
    assert len(raw.heads) == 3


def test_a_missing_bucket_is_an_error_however_its_answer_is_cut_in_pieces(tmp_path: Path) -> None:
    rest = b"<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message></Error>"
    answer = (
        b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'27\r\n<?xml version="1.0" encoding="UTF-8"?>\n\r\n<PAUSE>' + b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest)
    )
    with pytest.raises(S3Error, match="NoSuchBucket"):
        Raw(answer).run(tmp_path, lambda s3: s3.fetch("k"))


@pytest.mark.usefixtures("no_backoff")
def test_an_error_whose_answer_is_cut_is_retried_then_one_clear_error(tmp_path: Path) -> None:
    cut = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 500\r\n\r\n<Error>"  # then the connection closes
    raw = Raw(cut + b"<CLOSE>", cut + b"<CLOSE>")
    with pytest.raises(S3Error, match=r"s3://t-flaky/k: .*\(2 attempts\)"):
        raw.run(tmp_path, lambda s3: s3.fetch("k"), attempts=2)


def test_redirects_are_not_followed_and_every_request_on_the_wire_is_counted(tmp_path: Path) -> None:
    elsewhere = error("307 Temporary Redirect", "TemporaryRedirect", "Location: http://127.0.0.1:9/x\r\n")
    raw = Raw(elsewhere, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na", b"")

    async def go(s3: S3) -> list[Any]:
        out: list[Any] = []
        with pytest.raises(S3Error, match=r"TemporaryRedirect \(HTTP 307\)"):
            await s3.fetch("k")
        out.append(await s3.fetch("k"))  # on the kept connection
        # The server then closes that connection without answering: aiohttp sends again, by itself.
        out.append(await s3.fetch("k"))
        out.append(s3.requests["GetObject"])
        return out

    assert raw.run(tmp_path, go) == [b"a", b"ok", 4]
    assert len(raw.heads) == 4


def test_the_bytes_as_stored_never_a_compressed_copy(tmp_path: Path) -> None:
    raw = Raw()
    assert raw.run(tmp_path, lambda s3: s3.fetch("k")) == b"ok"
    head = raw.heads[0].decode().lower()
    assert "accept-encoding: identity\r\n" in head and "user-agent: nixcache/" in head


def test_a_bucket_in_another_region_is_named_in_the_error(tmp_path: Path) -> None:
    wrong = error("400 Bad Request", "AuthorizationHeaderMalformed", "x-amz-bucket-region: eu-central-1\r\n")
    with pytest.raises(S3Error, match=r"the bucket is in region eu-central-1, not us-east-1: set s3\.region"):
        Raw(wrong).run(tmp_path, lambda s3: s3.fetch("k"))


def test_opening_the_bucket_needs_no_credentials_and_a_read_says_they_are_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask a link-local address
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    cfg = flaky_config(tmp_path, attempts=1)
    (tmp_path / "credentials").write_text("")

    async def main() -> None:
        async with S3(cfg) as s3:  # opening: no error
            await s3.fetch("k")

    with pytest.raises(S3Error, match="s3://t-flaky/k: Unable to locate credentials"):
        asyncio.run(main())


def test_credentials_that_fail_to_refresh_are_one_clear_error_and_no_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiobotocore.credentials import AioCredentials
    from botocore.exceptions import ClientError

    async def refused(self: Any) -> Any:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "AssumeRoleWithWebIdentity")

    monkeypatch.setattr(AioCredentials, "get_frozen_credentials", refused)
    raw = Raw()

    async def go(s3: S3) -> None:
        await s3.fetch("k")

    # At the first read (the URL is presigned) or any later one (cannot get credentials: …)
    with pytest.raises(S3Error, match=r"s3://t-flaky/k: .*AccessDenied.*AssumeRoleWithWebIdentity"):
        raw.run(tmp_path, go)
    assert raw.heads == []
