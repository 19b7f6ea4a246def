"""Reference-audio store in S3-compatible object storage (AWS S3, Alibaba OSS, SeaweedFS, MinIO...).

The option for several replicas sharing one bucket. Layout under `<prefix>/voices/<id>/`:
`audio.<ext>` (the upload as sent), `features.npz` (prompt features, transcript ids) and `meta.json`
(the VoiceRecord, its microsecond upload time `created_us` included, plus the audio
extension; older meta without `created_us` lists by its seconds). S3 PUTs are atomic per
object, so visibility is the meta object, written LAST: a crash before it leaves objects nobody
lists or loads. A failed upload (a 507 from the service, a network error) deletes what it had put
before the error propagates; what a crash leaves is swept once it is older than a grace period
(another replica may be mid-upload), at start-up and then every `sweep_every_s`, logging each key.
Delete removes meta.json first, then the rest, so a voice never half-disappears.
tests/test_server_store_crashes.py kills a process at every point of both paths (server/crash_points.py).

Meta objects are immutable, so `list` keeps them in an id -> record cache and only
GETs the ones it has not seen; deletes done on another replica drop out of the next
listing. `get`/`load_prompt` always ask the bucket (another replica may have deleted).
Blocking (boto3): call from a worker thread, not the event loop.
"""
from __future__ import annotations

import concurrent.futures
import io
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from scheduler.jobs import VoicePrompt
from server import crash_points
from server.store import VoiceRecord, _safe_ext, now_us, prompt_from_npz, prompt_to_npz
from server.voice_ids import is_voice_id

_META = "meta.json"
_FEATURES = "features.npz"
_AUDIO = "audio"
_LIST_FETCH_THREADS = 8  # parallel meta GETs when a listing meets many unseen voices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class S3Settings:
    bucket: str
    prefix: str = ""
    endpoint_url: str = ""  # "" = AWS's own endpoint for the region
    region: str = ""
    access_key: str = ""  # "" = boto3's standard chain (AWS_ACCESS_KEY_ID, ~/.aws, instance role)
    secret_key: str = ""
    addressing_style: str = "auto"  # "path" for most self-hosted servers, "virtual" for OSS
    max_connections: int = 16


def make_client(s: S3Settings) -> Any:
    import boto3  # lazy: only the s3 store needs it (optional extra)
    from botocore.config import Config
    config = Config(
        s3={"addressing_style": s.addressing_style},
        max_pool_connections=s.max_connections,
        retries={"max_attempts": 3, "mode": "standard"},
        # boto3 >= 1.36 adds CRC trailers to every PUT by default; many S3-compatible
        # services (OSS among them) reject or mishandle them. Only checksum when required.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    kwargs: dict[str, Any] = {"config": config}
    if s.endpoint_url:
        kwargs["endpoint_url"] = s.endpoint_url
    if s.region:
        kwargs["region_name"] = s.region
    if s.access_key or s.secret_key:
        kwargs["aws_access_key_id"] = s.access_key
        kwargs["aws_secret_access_key"] = s.secret_key
    return boto3.session.Session().client("s3", **kwargs)


class S3VoiceStore:
    def __init__(self, settings: S3Settings, client: Any | None = None,
                 sweep_grace_s: float | None = 3600.0, clock: Callable[[], float] = time.time,
                 sweep_every_s: float | None = 3600.0) -> None:
        """`sweep_grace_s`: at start, delete meta-less objects older than this (None: no sweep); then
        again every `sweep_every_s` on a thread of its own (None: at start only), so the leftovers of
        a crash, too young at the restart that followed it, go too."""
        self._clock = clock
        self._s3 = client if client is not None else make_client(settings)
        self._bucket = settings.bucket
        prefix = settings.prefix.strip("/")
        self._root = f"{prefix}/voices/" if prefix else "voices/"
        self._lock = threading.Lock()
        self._records: dict[str, VoiceRecord] = {}
        self._fetchers: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = threading.Event()
        self._s3.head_bucket(Bucket=self._bucket)  # fail at start-up, not at the first upload
        if sweep_grace_s is not None:
            self.sweep(sweep_grace_s)
            if sweep_every_s is not None:
                threading.Thread(target=self._sweep_every, args=(sweep_every_s, sweep_grace_s),
                                 name="s3-sweep", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            fetchers, self._fetchers = self._fetchers, None
        if fetchers is not None:
            fetchers.shutdown(wait=False, cancel_futures=True)

    # -- queries -------------------------------------------------------------------------------
    def get(self, voice_id: str) -> VoiceRecord | None:
        meta = self._get_meta(voice_id)
        return _record(meta) if meta is not None else None

    def list(self, limit: int, order: str) -> list[VoiceRecord]:
        ids = [key[len(self._root):-len(_META) - 1] for key, _ in self._objects()
               if key.endswith("/" + _META)]
        with self._lock:
            known = {i: self._records[i] for i in ids if i in self._records}
        missing = [i for i in ids if i not in known]
        if missing:
            for voice_id, meta in zip(missing, self._fetch_pool().map(self._get_meta, missing)):
                if meta is not None:  # None: deleted between the listing and the GET
                    known[voice_id] = _record(meta)
        with self._lock:
            self._records = dict(known)  # also forgets voices deleted elsewhere
        reverse = order != "asc"
        records = sorted(known.values(), key=VoiceRecord.order_key, reverse=reverse)
        return records[:limit]

    def load_prompt(self, voice_id: str) -> VoicePrompt | None:
        """Fetches features.npz from the bucket: a voice uploaded on another replica works here too."""
        if self._get_meta(voice_id) is None:
            return None
        data = self._get_bytes(self._key(voice_id, _FEATURES))
        if data is None:  # deleted between the meta check and the read
            return None
        return prompt_from_npz(io.BytesIO(data))

    # -- mutations -----------------------------------------------------------------------------
    def add(self, filename: str, audio: bytes, text: str, prompt: VoicePrompt) -> VoiceRecord:
        voice_id = str(uuid.uuid4())
        ext = _safe_ext(filename)
        created_at, created_us = now_us(self._clock)
        record = VoiceRecord(voice_id, filename, len(audio), created_at, text, created_us)
        meta = json.dumps({**record.to_json(), "created_us": created_us, "audio_ext": ext},
                          ensure_ascii=False).encode()
        tried: list[str] = []  # a PUT that raised may still have landed (a lost answer): it counts
        try:
            for name, data, content_type, point in (
                    (_AUDIO + ext, audio, "application/octet-stream", "audio put"),
                    (_FEATURES, prompt_to_npz(prompt), "application/octet-stream", "features put"),
                    (_META, meta, "application/json", "meta put")):  # meta last: then it is visible
                tried.append(name)
                self._put(self._key(voice_id, name), data, content_type)
                crash_points.reached(point)
        except BaseException:
            # A failed upload (bucket full, network) leaves nothing behind; meta first, as in a delete.
            self._delete_quietly(voice_id, tried[::-1])
            raise
        with self._lock:
            self._records[voice_id] = record
        return record

    def delete(self, voice_id: str) -> bool:
        meta = self._get_meta(voice_id)
        if meta is None:
            return False
        self._s3.delete_object(Bucket=self._bucket, Key=self._key(voice_id, _META))  # first: invisible now
        crash_points.reached("meta deleted")
        with self._lock:
            self._records.pop(voice_id, None)
        ext = str(meta.get("audio_ext", ".bin"))
        for name, point in ((_AUDIO + ext, "audio deleted"), (_FEATURES, "features deleted")):
            self._s3.delete_object(Bucket=self._bucket, Key=self._key(voice_id, name))
            crash_points.reached(point)
        return True

    def sweep(self, grace_s: float) -> int:
        """Delete objects of voices without meta.json whose newest object is older than `grace_s`.

        The grace period protects uploads in progress on other replicas (and clock skew:
        ages are measured against the newest LastModified the bucket itself reports).
        Returns the number of objects removed.
        """
        groups: dict[str, list[tuple[str, datetime]]] = {}
        has_meta: set[str] = set()
        newest_seen = datetime.fromtimestamp(0, UTC)
        for key, modified in self._objects():
            voice_id, _, name = key[len(self._root):].partition("/")
            groups.setdefault(voice_id, []).append((key, modified))
            newest_seen = max(newest_seen, modified)
            if name == _META:
                has_meta.add(voice_id)
        now = max(datetime.now(UTC), newest_seen)
        removed = 0
        for voice_id, objects in groups.items():
            if voice_id in has_meta:
                continue
            if (now - max(m for _, m in objects)).total_seconds() < grace_s:
                continue
            for key, _ in objects:
                self._s3.delete_object(Bucket=self._bucket, Key=key)
                log.warning("store sweep: removed %s (a voice without meta.json: an unfinished upload or "
                            "delete)", key)
                removed += 1
        return removed

    def _sweep_every(self, interval_s: float, grace_s: float) -> None:
        while not self._closed.wait(interval_s):
            try:
                self.sweep(grace_s)
            except Exception:  # the bucket unreachable for a while: try again next time
                log.exception("store sweep failed")

    def _delete_quietly(self, voice_id: str, names: list[str]) -> None:
        """Best effort (the error that got us here is the one to report); what stays, the sweep takes."""
        for name in names:
            try:
                self._s3.delete_object(Bucket=self._bucket, Key=self._key(voice_id, name))
            except Exception:
                log.warning("could not remove %s of a failed upload; the sweep will",
                            self._key(voice_id, name), exc_info=True)

    # -- S3 plumbing -----------------------------------------------------------------------------
    def _key(self, voice_id: str, name: str) -> str:
        return f"{self._root}{voice_id}/{name}"

    def _objects(self) -> Iterator[tuple[str, datetime]]:
        """Every object under the voices root (all pages)."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self._bucket, "Prefix": self._root, "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._s3.list_objects_v2(**kwargs)
            for obj in page.get("Contents", ()):
                yield obj["Key"], obj["LastModified"]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def _get_meta(self, voice_id: str) -> dict[str, Any] | None:
        if not is_voice_id(voice_id):  # ids come from URLs: never build keys from anything else
            return None
        data = self._get_bytes(self._key(voice_id, _META))
        return json.loads(data) if data is not None else None

    def _get_bytes(self, key: str) -> bytes | None:
        try:
            resp = self._s3.get_object(Bucket=self._bucket, Key=key)
        except Exception as exc:  # botocore.ClientError; imported lazily, so matched by code
            if _error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        body = resp["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()

    def _put(self, key: str, data: bytes, content_type: str) -> None:
        self._s3.put_object(Bucket=self._bucket, Key=key, Body=data, ContentType=content_type)

    def _fetch_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        # Own small pool: `list` itself runs on the app's pool, and waiting there on tasks
        # queued behind us in the same pool could deadlock.
        with self._lock:
            if self._fetchers is None:
                self._fetchers = concurrent.futures.ThreadPoolExecutor(
                    _LIST_FETCH_THREADS, thread_name_prefix="s3-meta")
            return self._fetchers


def _record(meta: dict[str, Any]) -> VoiceRecord:
    created_at = int(meta["created_at"])
    return VoiceRecord(id=str(meta["id"]), filename=str(meta["filename"]), bytes=int(meta["bytes"]),
                       created_at=created_at, text=str(meta["text"]),
                       created_us=int(meta.get("created_us", created_at * 1_000_000)))  # older meta: seconds


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""
