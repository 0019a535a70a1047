"""A small synchronous client for an OpenAI-compatible fine-tuning API: the job runner
uploads a training file, starts a job, polls and cancels it, and the assessment asks a
model for chat completions. Django-free.

Every failure is one exception, ``UpstreamFailed``: an HTTP status other than 2xx, a
timeout, a connection that fails, or an answer that is not the JSON shape OpenAI
documents. Its message names the request (method and path under the base URL) and the
upstream's status and error ``code`` or ``type``, never the base URL (it may carry
credentials), the API key, or the upstream's error message (OpenAI's 401 message quotes
part of the key).
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from typing import Any

import httpx

JOB_STATUSES = frozenset(
    {"validating_files", "queued", "running", "succeeded", "failed", "cancelled"}
)


class UpstreamFailed(Exception):
    """The upstream failed to answer, or answered something unusable; the message is
    safe to store and show (no URL, key or upstream error text)."""


@dataclasses.dataclass(frozen=True)
class UpstreamJob:
    """A fine-tuning job as the upstream reports it."""

    status: str
    fine_tuned_model: str | None
    trained_tokens: int | None
    error_code: str | None
    error_message: str | None


@dataclasses.dataclass(frozen=True)
class Answer:
    """A chat completion's first choice: its text ("" when it has none) and finish reason."""

    text: str
    finish_reason: str | None


class FineTuningUpstream:
    """The fine-tuning and chat endpoints of one OpenAI-compatible ``base_url`` (the URL
    that ends in ``/v1``). Safe to share between threads; ``close`` when done."""

    def __init__(self, base_url: str, *, api_key: str = "", timeout: float = 30.0) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self._client = httpx.Client(
            base_url=base_url.rstrip("/") + "/",
            headers=headers,
            timeout=timeout,
            follow_redirects=False,
        )

    def __enter__(self) -> FineTuningUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def upload(self, content: bytes, filename: str) -> str:
        """Upload ``content`` as a ``fine-tune`` file; its file id."""
        body = self._send(
            "POST",
            "files",
            files={"file": (filename, content, "application/jsonl")},
            data={"purpose": "fine-tune"},
        )
        return _string(body, "id", "files")

    def create_job(
        self,
        *,
        model: str,
        training_file: str,
        suffix: str | None,
        hyperparameters: dict[str, Any] | None = None,
        seed: int | None = None,
    ) -> str:
        """Start fine-tuning ``model`` on ``training_file``; the job id."""
        request: dict[str, Any] = {"model": model, "training_file": training_file}
        for name, value in (
            ("suffix", suffix),
            ("hyperparameters", hyperparameters),
            ("seed", seed),
        ):
            if value is not None:
                request[name] = value
        body = self._send("POST", "fine_tuning/jobs", json=request)
        return _string(body, "id", "fine_tuning/jobs")

    def job(self, job_id: str) -> UpstreamJob:
        """The job's status, its model once it succeeded, and its error once it failed."""
        path = f"fine_tuning/jobs/{_segment(job_id)}"
        body = self._send("GET", path)
        status = body.get("status")
        if status not in JOB_STATUSES:
            raise UpstreamFailed(f"GET {path}: the answer has no known job status")
        model, tokens, error = (
            body.get("fine_tuned_model"),
            body.get("trained_tokens"),
            body.get("error"),
        )
        if model is not None and not isinstance(model, str):
            raise UpstreamFailed(f"GET {path}: 'fine_tuned_model' is not a string")
        if status == "succeeded" and not model:
            raise UpstreamFailed(f"GET {path}: a succeeded job names no fine-tuned model")
        if tokens is not None and type(tokens) is not int:
            raise UpstreamFailed(f"GET {path}: 'trained_tokens' is not an integer")
        code = message = None
        if isinstance(error, dict):
            code, message = error.get("code"), error.get("message")
            code = code if isinstance(code, str) else None
            message = message if isinstance(message, str) else None
        elif error is not None:
            raise UpstreamFailed(f"GET {path}: 'error' is not an object")
        return UpstreamJob(status, model, tokens, code, message)

    def cancel(self, job_id: str) -> None:
        """Ask the upstream to cancel the job."""
        self._send("POST", f"fine_tuning/jobs/{_segment(job_id)}/cancel")

    def chat(self, *, model: str, prompt: str, max_tokens: int) -> Answer:
        """``prompt`` as one user message to ``model``; the first choice's answer."""
        request = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
        }
        body = self._send("POST", "chat/completions", json=request)
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise UpstreamFailed("POST chat/completions: the answer has no choices")
        message = choices[0].get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if content is not None and not isinstance(content, str):
            raise UpstreamFailed("POST chat/completions: the message content is not text")
        finish = choices[0].get("finish_reason")
        return Answer(content or "", finish if isinstance(finish, str) else None)

    def _send(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """The JSON object the upstream answers ``method path`` with."""
        what = f"{method} {path}"
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise UpstreamFailed(f"{what}: no answer within {self.timeout:g} s") from None
        except httpx.HTTPError as error:
            # The exception's text may hold the URL; its kind says enough.
            raise UpstreamFailed(f"{what}: {type(error).__name__}") from None
        if not response.is_success:
            raise UpstreamFailed(f"{what}: HTTP {response.status_code}{_error_code(response)}")
        try:
            body = response.json()
        except ValueError:
            raise UpstreamFailed(f"{what}: the answer is not JSON") from None
        if not isinstance(body, dict):
            raise UpstreamFailed(f"{what}: the answer is not a JSON object")
        return body


def _segment(value: str) -> str:
    """``value`` as one path segment: an id cannot reach another path."""
    return urllib.parse.quote(value, safe="")


def _string(body: dict[str, Any], name: str, path: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise UpstreamFailed(f"POST {path}: the answer has no '{name}'")
    return value


def _error_code(response: httpx.Response) -> str:
    """`` (code)`` from an OpenAI error body: its ``code``, else its ``type``; else ""."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(error, dict):
        return ""
    for key in ("code", "type"):
        value = error.get(key)
        # Codes are short identifiers; anything else might be text worth keeping out.
        if isinstance(value, str) and value.replace("_", "").replace("-", "").isalnum():
            return f" ({value[:64]})"
    return ""
