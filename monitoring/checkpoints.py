"""Audit checkpoints: the chain's latest ``seq`` and ``hash``, kept outside the database.

The hash chain (``monitoring.audit``) shows any row changed, inserted or removed
*before* the last row, but not rows cut from the end, nor a chain rewritten from some
row on with every hash recomputed: both leave a chain that is consistent with itself.
A checkpoint published earlier catches both, since its hash covers every row up to
its ``seq``: that row must still exist and have that hash (``verify_against``).

``publish_checkpoint`` (a periodic task, and the ``publish_audit_checkpoint``
command) writes the checkpoint where a database admin cannot reach it: a line
appended to ``STAGEGATE_AUDIT_CHECKPOINT_FILE``, a JSON POST to
``STAGEGATE_AUDIT_CHECKPOINT_WEBHOOK_URL``, and a log line; Prometheus keeps the
history of ``stagegate_audit_checkpoint_seq`` (``monitoring.metrics``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from monitoring.audit import GENESIS_HASH, ChainBreak, verify_chain
from monitoring.models import AuditEvent
from stagegate.webhooks import post_json

log = logging.getLogger(__name__)

_LITERAL = re.compile(r"(?P<seq>\d+):(?P<hash>[0-9a-f]{64})")
_LAST_LINE_BYTES = 4096  # a checkpoint line is about 130 bytes


class CheckpointInvalid(ValueError):
    """A checkpoint (text or file) that cannot be read; the message says where."""


@dataclass(frozen=True)
class Checkpoint:
    seq: int  # 0: the chain was empty
    hash: str

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"


def latest_checkpoint() -> Checkpoint:
    """The chain's last row as a checkpoint (seq 0 and the genesis hash when empty)."""
    tail = AuditEvent.objects.order_by("-seq").values_list("seq", "hash").first()
    return Checkpoint(*tail) if tail else Checkpoint(0, GENESIS_HASH)


@dataclass(frozen=True)
class Published:
    checkpoint: Checkpoint
    appended: bool  # False: the file's last line was this checkpoint already
    posted: bool  # False: no webhook configured


def _last_line(path: Path) -> str:
    try:
        with path.open("rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - _LAST_LINE_BYTES))
            lines = file.read().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    return lines[-1] if lines else ""


def publish_checkpoint() -> Published:
    """Publish the chain's latest checkpoint to the file, the webhook and the log.

    Idempotent: the file gets a line only when the checkpoint differs from its last
    one, so an idle chain does not grow it; the webhook and the log hear every run
    (a steady heartbeat: silence says publishing stopped). Raises WebhookFailed when
    the webhook does not take it, after the file and the log have it."""
    checkpoint = latest_checkpoint()
    line = json.dumps(
        {"seq": checkpoint.seq, "hash": checkpoint.hash, "at": timezone.now().isoformat()}
    )
    path = Path(settings.STAGEGATE_AUDIT_CHECKPOINT_FILE)
    try:
        last = _parse_line(_last_line(path), where=str(path))
    except CheckpointInvalid:  # empty, or a torn last line: write a whole one after it
        last = None
    appended = last != checkpoint
    if appended:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as file:
            file.write(line + "\n")
            file.flush()
            os.fsync(file.fileno())
    log.info("audit checkpoint %s", checkpoint)
    url = settings.STAGEGATE_AUDIT_CHECKPOINT_WEBHOOK_URL
    if url:
        post_json(url, {"event": "audit.checkpoint", **json.loads(line)})
    return Published(checkpoint, appended, bool(url))


def last_published() -> tuple[Checkpoint, str] | None:
    """The checkpoint on the checkpoint file's last line and when it was published (the
    line's ``at``, "" for a ``seq:hash`` line), or None: no file, empty, or torn."""
    line = _last_line(Path(settings.STAGEGATE_AUDIT_CHECKPOINT_FILE)).strip()
    try:
        checkpoint = _parse_line(line, where="checkpoint file")
    except CheckpointInvalid:
        return None
    try:
        at = str(json.loads(line).get("at", ""))
    except (ValueError, AttributeError):
        at = ""
    return checkpoint, at


def _parse_line(text: str, *, where: str) -> Checkpoint:
    text = text.strip()
    literal = _LITERAL.fullmatch(text)
    if literal:
        return Checkpoint(int(literal["seq"]), literal["hash"])
    try:
        data = json.loads(text)
        seq, hash_ = data["seq"], data["hash"]
    except (ValueError, TypeError, KeyError):
        raise CheckpointInvalid(
            f"{where}: not a checkpoint (a JSON line with seq and hash, or seq:hash)"
        ) from None
    if not (isinstance(seq, int) and seq >= 0 and isinstance(hash_, str)):
        raise CheckpointInvalid(f"{where}: seq must be a whole number and hash a string")
    if not re.fullmatch(r"[0-9a-f]{64}", hash_):
        raise CheckpointInvalid(f"{where}: hash must be 64 lower-case hex digits")
    return Checkpoint(seq, hash_)


def read_checkpoints(reference: str) -> list[Checkpoint]:
    """The checkpoints ``reference`` names: one ``seq:hash`` literal, or a file of
    them (the published JSON lines, or ``seq:hash`` lines; blank lines skipped)."""
    literal = _LITERAL.fullmatch(reference.strip())
    if literal:
        return [Checkpoint(int(literal["seq"]), literal["hash"])]
    path = Path(reference)
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise CheckpointInvalid(
            f"{reference!r} is neither seq:hash nor a readable file ({exc.strerror})"
        ) from None
    checkpoints = [
        _parse_line(line, where=f"{path}, line {number}")
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]
    if not checkpoints:
        raise CheckpointInvalid(f"{path} holds no checkpoint")
    return checkpoints


def verify_against(checkpoints: list[Checkpoint]) -> tuple[int, ChainBreak | None]:
    """``verify_chain`` that also requires every checkpoint's row to exist with its
    hash. Returns (rows checked, first break or None)."""
    expected: dict[int, str] = {}
    for checkpoint in checkpoints:
        known = expected.setdefault(checkpoint.seq, checkpoint.hash)
        if known != checkpoint.hash:
            # Published twice with two hashes: the row was replaced in between.
            return 0, ChainBreak(
                checkpoint.seq,
                f"two checkpoints name different hashes for row #{checkpoint.seq}: "
                "the chain was cut or rewritten between their publications",
            )
    return verify_chain(checkpoints=expected)
